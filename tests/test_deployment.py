"""Deployment files, checked without a Docker engine: compose, Dockerfile, pins and deploy/ YAML.

There is no Docker engine on the build machines, so nothing here builds or runs an image. What
is checked instead: ``docker-compose config`` accepts docker-compose.yml; every command a
service, an image or a manifest runs is a console script of ours whose ``--help`` works and
knows each flag given to it; the serving stages run as non-root with a gRPC HEALTHCHECK; every
pinned version satisfies pyproject.toml; and the ports and health checks named under deploy/
are those the server has.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml
from missing import missing
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from vaeserve.client.arguments import INDEX_ENV
from vaeserve.server.servicer import SERVICE_NAME
from vaeserve.server.settings import ServerSettings, build_parser

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
SCRIPTS = PYPROJECT["project"]["scripts"]
GRPC_PORT = next(f.default for f in dataclasses.fields(ServerSettings) if f.name == "port")
METRICS_PORT = 8002  # the Open Inference Protocol work's --metrics-port default (not yet a flag)
PROFILES = ("train", "gpu", "generate", "lb")
OUR_IMAGES = ("vaeserve:serve", "vaeserve:serve-gpu", "vaeserve:train", "vaeserve:client")


def _load_script(path: Path) -> ModuleType:
    """deploy/requirements.py is a script for the image build, not a package module."""
    spec = importlib.util.spec_from_file_location(path.stem, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


extra_requirements = _load_script(ROOT / "deploy" / "requirements.py").extra_requirements


# ---- commands ----------------------------------------------------------------------------------


def _commands(argv: list[str]) -> list[list[str]]:
    """The argv of each program a command runs; ``sh -c 'a && b'`` runs two."""
    if argv[:2] == ["sh", "-c"]:
        return [shlex.split(part) for part in argv[2].split("&&")]
    return [argv]


def _flags(argv: list[str]) -> list[str]:
    return [arg.split("=", 1)[0] for arg in argv[1:] if arg.startswith("--")]


_HELP: dict[str, subprocess.CompletedProcess[str]] = {}


def _help(script: str) -> subprocess.CompletedProcess[str]:
    if script not in _HELP:
        _HELP[script] = subprocess.run(
            [str(BIN / script), "--help"], capture_output=True, text=True, timeout=120
        )
    return _HELP[script]


def assert_runs_our_entry_point(argv: list[str], where: str) -> None:
    """Each program in ``argv`` is a console script of ours that accepts every flag given."""
    for command in _commands(argv):
        script = command[0]
        assert script in SCRIPTS, f"{where}: {script!r} is not one of our entry points {SCRIPTS}"
        proc = _help(script)
        assert proc.returncode == 0, f"{where}: `{script} --help` failed:\n{proc.stderr}"
        for flag in _flags(command):
            known = re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", proc.stdout)
            assert known, f"{where}: {script} has no flag {flag}"


@pytest.fixture(scope="module", autouse=True)
def _warm_help() -> None:
    # The torch entry points take seconds to import: run the --help of each command the
    # deployment files use at once, up front.
    used = [
        s
        for s in ("vae-train", "vae-export", "vae-serve", "vae-generate", "vae-healthcheck")
        if s in SCRIPTS
    ]
    with ThreadPoolExecutor(len(used)) as pool:
        list(pool.map(_help, used))


# ---- docker-compose.yml ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def compose(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """docker-compose.yml as `docker-compose config` resolves it, with every profile on."""
    exe = shutil.which("docker-compose")
    if exe is None:
        missing("docker-compose is not installed (Debian package; .ci/run installs it)")
    # Defaults only: no VAESERVE_* of the caller's shell and no .env file.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VAESERVE_", "COMPOSE_"))}
    no_env_file = tmp_path_factory.mktemp("compose") / "empty.env"
    no_env_file.write_text("")
    profiles = [arg for p in PROFILES for arg in ("--profile", p)]
    proc = subprocess.run(
        [exe, "--project-directory", str(ROOT), "-f", str(ROOT / "docker-compose.yml"),
         "--env-file", str(no_env_file), *profiles, "config"],
        capture_output=True, text=True, env=env, cwd=ROOT, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 0, f"docker-compose config rejected the file:\n{proc.stderr}"
    return yaml.safe_load(proc.stdout)


def _service(compose: dict[str, Any], name: str) -> dict[str, Any]:
    assert name in compose["services"], f"no service {name!r} in docker-compose.yml"
    return compose["services"][name]


@dataclass(frozen=True)
class _Mount:
    source: str
    target: str
    read_only: bool


def _mounts(service: dict[str, Any]) -> list[_Mount]:
    # docker-compose v1 prints "src:dst[:mode]"; Compose v2 prints the long syntax.
    out = []
    for v in service.get("volumes", []):
        if isinstance(v, str):
            parts = v.split(":")
            out.append(_Mount(parts[0], parts[1], len(parts) > 2 and "ro" in parts[2].split(",")))
        else:
            out.append(_Mount(v.get("source", ""), v["target"], bool(v.get("read_only"))))
    return out


def _container_ports(service: dict[str, Any]) -> set[int]:
    out = set()
    for p in service.get("ports", []):
        if isinstance(p, dict):
            out.add(int(p["target"]))
        else:
            out.add(int(str(p).split("/")[0].rsplit(":", 1)[-1]))
    return out


def _image_stage(service: dict[str, Any]) -> str:
    return service["build"]["target"]


def test_compose_has_the_services_and_profiles(compose: dict[str, Any]) -> None:
    profiles = {name: tuple(s.get("profiles", ())) for name, s in compose["services"].items()}
    assert profiles == {
        "train": ("train",),
        "server": (),
        "server-gpu": ("gpu",),
        "generate": ("generate",),
        "generate-gpu": ("gpu",),
        "replica": ("lb",),
        "envoy": ("lb",),
    }
    assert set(compose["volumes"]) == {"models", "runs"}


def test_every_compose_command_is_our_entry_point(compose: dict[str, Any], dockerfile) -> None:
    for name, service in compose["services"].items():
        if service["image"] not in OUR_IMAGES:
            continue
        command = service.get("command") or dockerfile.stages[_image_stage(service)].cmd
        assert_runs_our_entry_point(command, f"service {name}")
        test = service.get("healthcheck", {}).get("test")
        if test:
            assert test[0] == "CMD", f"service {name}: healthcheck needs no shell"
            assert_runs_our_entry_point(test[1:], f"service {name} healthcheck")


def test_train_job_trains_digits_and_exports_into_the_models_volume(
    compose: dict[str, Any],
) -> None:
    train = _service(compose, "train")
    assert _image_stage(train) == "train"
    train_cmd, export_cmd = _commands(train["command"])
    assert train_cmd[0] == "vae-train" and export_cmd[0] == "vae-export"
    assert train_cmd[train_cmd.index("--dataset") + 1] == "digits"
    out = train_cmd[train_cmd.index("--out") + 1]
    assert export_cmd[export_cmd.index("--checkpoint") + 1] == f"{out}/checkpoint.pt"
    repository = export_cmd[export_cmd.index("--repository") + 1]
    assert _Mount("models", repository, False) in _mounts(train)


@pytest.mark.parametrize(("name", "stage"), [("server", "serve"), ("server-gpu", "serve-gpu")])
def test_server_serves_the_volume_read_only_with_health_ports_and_limits(
    compose: dict[str, Any], dockerfile, name: str, stage: str
) -> None:
    server = _service(compose, name)
    assert _image_stage(server) == stage
    env = {**dockerfile.stages[stage].env, **(server.get("environment") or {})}
    assert _Mount("models", env["VAESERVE_REPOSITORY"], True) in _mounts(server)
    http_port = int(env["VAESERVE_HTTP_PORT"])
    assert _container_ports(server) == {GRPC_PORT, http_port, METRICS_PORT}
    assert int(env["VAESERVE_PORT"]) == GRPC_PORT
    assert server["healthcheck"]["test"][1] == "vae-healthcheck"
    assert server["restart"] in {"always", "unless-stopped", "on-failure"}
    assert server["deploy"]["resources"]["limits"]["memory"]
    assert server.get("read_only") is True


def test_server_environment_names_real_flags(compose: dict[str, Any]) -> None:
    flags = {opt for action in build_parser()._actions for opt in action.option_strings}
    for name in ("server", "server-gpu", "replica"):
        for var in _service(compose, name).get("environment") or {}:
            assert var.startswith("VAESERVE_"), f"{name}: {var} is not a vae-serve variable"
            flag = "--" + var.removeprefix("VAESERVE_").lower().replace("_", "-")
            assert flag in flags, f"{name}: {var} matches no vae-serve flag ({flag})"


def test_gpu_profile_reserves_an_nvidia_device(compose: dict[str, Any]) -> None:
    devices = _service(compose, "server-gpu")["deploy"]["resources"]["reservations"]["devices"]
    assert any(d["driver"] == "nvidia" and "gpu" in d["capabilities"] for d in devices)


@pytest.mark.parametrize(
    ("name", "server"), [("generate", "server"), ("generate-gpu", "server-gpu")]
)
def test_generate_waits_for_a_healthy_server_and_writes_to_a_bind_mount(
    compose: dict[str, Any], name: str, server: str
) -> None:
    job = _service(compose, name)
    assert job["depends_on"] == {server: {"condition": "service_healthy"}}
    (command,) = _commands(job["command"])
    assert command[0] == "vae-generate"
    host, port = command[command.index("--server") + 1].rsplit(":", 1)
    assert (host, int(port)) == (server, GRPC_PORT)
    out = command[command.index("--out") + 1]
    bind = [m for m in _mounts(job) if m.source.startswith("/")]  # config makes paths absolute
    assert any(out.startswith(m.target) and not m.read_only for m in bind)


def test_envoy_balances_over_the_replicas(compose: dict[str, Any]) -> None:
    envoy_config = yaml.safe_load((ROOT / "deploy/envoy.yaml").read_text())
    (cluster,) = envoy_config["static_resources"]["clusters"]
    (endpoint,) = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"]
    address = endpoint["endpoint"]["address"]["socket_address"]
    assert address["address"] in compose["services"]
    assert address["port_value"] == GRPC_PORT
    assert _container_ports(_service(compose, "envoy")) >= {GRPC_PORT}


# ---- Dockerfile --------------------------------------------------------------------------------


@dataclass
class _Stage:
    base: str
    instructions: list[tuple[str, str]] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    cmd: list[str] = field(default_factory=list)
    user: str = "root"
    healthcheck: str = ""


@dataclass
class _Dockerfile:
    args: dict[str, str]
    stages: dict[str, _Stage]


def _logical_lines(text: str) -> Iterator[str]:
    line = ""
    for raw in text.splitlines():
        stripped = raw.strip()
        if stripped.startswith("#") or not stripped:
            continue  # comments may sit between continuation lines too
        line += stripped[:-1] + " " if stripped.endswith("\\") else stripped
        if not stripped.endswith("\\"):
            yield line
            line = ""


@pytest.fixture(scope="module")
def dockerfile() -> _Dockerfile:
    args: dict[str, str] = {}
    stages: dict[str, _Stage] = {}
    stage: _Stage | None = None
    for line in _logical_lines((ROOT / "Dockerfile").read_text()):
        op, _, rest = line.partition(" ")
        op = op.upper()
        if op == "ARG" and stage is None:
            name, _, value = rest.partition("=")
            args[name] = value
        elif op == "FROM":
            words = rest.split()
            base = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], words[0])
            stage = stages.setdefault(words[-1], _Stage(base=base))
        elif stage is not None:
            stage.instructions.append((op, rest))
            if op == "ENV":
                stage.env.update(dict(re.findall(r"(\w+)=(\S+)", rest)))
            elif op == "CMD":
                stage.cmd = json.loads(rest)
            elif op == "USER":
                stage.user = rest
            elif op == "HEALTHCHECK":
                stage.healthcheck = rest
    return _Dockerfile(args, stages)


def test_dockerfile_has_the_stages_on_pinned_bases(dockerfile: _Dockerfile) -> None:
    assert {"serve", "serve-gpu", "train", "client"} <= set(dockerfile.stages)
    for name, stage in dockerfile.stages.items():
        if stage.base in dockerfile.stages:
            continue
        image, _, tag = stage.base.partition(":")
        assert re.search(r"\d", tag) and "latest" not in tag, f"{name}: unpinned base {stage.base}"
    assert _inherited(dockerfile, "serve").base.startswith("python:3.11-slim")
    assert re.fullmatch(r"nvidia/cuda:\d+\.\d+\.\d+-cudnn-runtime-ubuntu\d+\.\d+",
                        dockerfile.stages["serve-gpu"].base)  # fmt: skip


def _inherited(dockerfile: _Dockerfile, name: str) -> _Stage:
    """A stage with what it inherits from a stage it is built FROM."""
    stage = dockerfile.stages[name]
    parent = dockerfile.stages.get(stage.base)
    if parent is None:
        return stage
    base = _inherited(dockerfile, stage.base)
    merged = _Stage(base.base, base.instructions + stage.instructions, {**base.env, **stage.env})
    merged.cmd = stage.cmd or base.cmd
    merged.user = stage.user if stage.user != "root" else base.user
    merged.healthcheck = stage.healthcheck or base.healthcheck
    return merged


@pytest.mark.parametrize("name", ["serve", "serve-gpu", "train", "client"])
def test_stage_runs_our_entry_point_as_non_root(dockerfile: _Dockerfile, name: str) -> None:
    stage = _inherited(dockerfile, name)
    assert stage.user not in {"root", "0", ""}, f"{name} runs as root"
    assert_runs_our_entry_point(stage.cmd, f"Dockerfile stage {name}")


@pytest.mark.parametrize("name", ["serve", "serve-gpu"])
def test_serving_stage_has_a_grpc_healthcheck(dockerfile: _Dockerfile, name: str) -> None:
    stage = dockerfile.stages[name]
    match = re.search(r"CMD (\[.*\])", stage.healthcheck)
    assert match, f"{name}: no exec-form HEALTHCHECK CMD"
    probe = json.loads(match.group(1))
    assert probe[0] == "vae-healthcheck"
    assert_runs_our_entry_point(probe, f"{name} HEALTHCHECK")
    assert stage.cmd[0] == "vae-serve"
    assert {"VAESERVE_REPOSITORY", "VAESERVE_HOST", "VAESERVE_PORT"} <= set(stage.env)


def test_gpu_stage_uses_onnxruntime_gpu_and_insists_on_cuda(dockerfile: _Dockerfile) -> None:
    stage = dockerfile.stages["serve-gpu"]
    assert stage.cmd == ["vae-serve", "--device", "cuda"]
    runs = " ".join(rest for op, rest in stage.instructions if op in {"RUN", "COPY"})
    assert "serve-gpu.txt" in runs and "/serve.txt" not in runs


def test_train_stage_takes_torch_from_the_cpu_index(dockerfile: _Dockerfile) -> None:
    assert dockerfile.args["TORCH_INDEX"] == "https://download.pytorch.org/whl/cpu"
    runs = [rest for op, rest in dockerfile.stages["train"].instructions if op == "RUN"]
    assert any('--index-url "${TORCH_INDEX}"' in r and " torch" in r for r in runs)


@pytest.mark.parametrize("name", ["serve", "serve-gpu", "train", "client"])
def test_dependencies_are_installed_before_the_code(dockerfile: _Dockerfile, name: str) -> None:
    ops = dockerfile.stages[name].instructions
    deps = [i for i, (op, rest) in enumerate(ops) if op == "RUN" and "pip install -r" in rest]
    code = [i for i, (op, rest) in enumerate(ops) if "/wheels" in rest]
    assert deps and code and max(deps) < min(code), f"{name}: code is copied before the deps"
    for op, rest in ops:
        if op == "COPY" and "--from=" not in rest:
            assert rest.split()[0].startswith("deploy/"), f"{name}: COPY {rest} busts the cache"


def test_dockerignore_keeps_the_context_to_what_images_install() -> None:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    patterns = [ln for ln in lines if ln and not ln.startswith("#")]
    assert patterns[0] == "*", "the context should be an allow-list"
    allowed = {p[1:] for p in patterns if p.startswith("!")}
    folders = PYPROJECT["tool"]["setuptools"]["package-dir"].values()
    assert set(folders) <= allowed
    assert {"pyproject.toml", "deploy/requirements.py"} <= allowed


# ---- pinned versions ---------------------------------------------------------------------------


def _pins(path: Path) -> dict[str, str]:
    pins = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            pins[canonicalize_name(name)] = version
    return pins


@pytest.mark.parametrize(
    ("extra", "gpu", "constraints"),
    [
        ("serve", False, "constraints-serve.txt"),
        ("serve", True, "constraints-serve.txt"),
        ("client", False, "constraints-serve.txt"),
        ("train", False, "constraints-train.txt"),
    ],
)
def test_every_requirement_is_pinned_within_pyproject(
    extra: str, gpu: bool, constraints: str
) -> None:
    pins = _pins(ROOT / "deploy" / constraints)
    for line in extra_requirements(ROOT / "pyproject.toml", extra, gpu):
        req = Requirement(line)
        name = canonicalize_name(req.name)
        assert name in pins, f"{constraints}: no pin for {req.name} ({extra} extra)"
        assert req.specifier.contains(pins[name], prereleases=True), (
            f"{constraints}: {name}=={pins[name]} is outside pyproject's {line}"
        )


def test_gpu_requirements_swap_onnxruntime_only(tmp_path: Path) -> None:
    pyproject = tmp_path / "pyproject.toml"
    pyproject.write_text(
        '[project]\ndependencies = ["numpy>=1"]\n[project.optional-dependencies]\n'
        'serve = ["onnxruntime>=1.20", "onnxruntime-extensions", "numpy>=1"]\n'
    )
    assert extra_requirements(pyproject, "serve", gpu=True) == [
        "numpy>=1",
        "onnxruntime-gpu>=1.20",
        "onnxruntime-extensions",
    ]
    with pytest.raises(KeyError, match="no extra 'train'"):
        extra_requirements(pyproject, "train")


# ---- deploy/ YAML ------------------------------------------------------------------------------


def _documents() -> dict[tuple[str, str], tuple[Path, dict[str, Any]]]:
    docs = {}
    for path in sorted((ROOT / "deploy").rglob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc and "kind" in doc:
                docs[(doc["kind"], doc["metadata"]["name"])] = (path, doc)
    return docs


def test_deploy_yaml_parses() -> None:
    assert set(_documents()) == {
        ("PersistentVolumeClaim", "vaeserve-models"),
        ("Job", "vaeserve-train"),
        ("Service", "vaeserve-train-ddp"),
        ("PersistentVolumeClaim", "vaeserve-runs"),
        ("Job", "vaeserve-train-ddp"),
        ("PersistentVolumeClaim", "vaeserve-samples"),
        ("Job", "vaeserve-generate"),
        ("Deployment", "vaeserve"),
        ("Service", "vaeserve"),
        ("Service", "vaeserve-headless"),
        ("ServingRuntime", "vaeserve"),
        ("InferenceService", "digits"),
    }


def deploy_health_checks() -> list[tuple[str, int, str]]:
    """(where, port, service) of every gRPC health check under deploy/: probes and Envoy's."""
    checks = []
    for (kind, name), (_, doc) in _documents().items():
        if kind in {"Deployment", "ServingRuntime"}:
            container = _container(doc)
            for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                if "grpc" in container.get(probe, {}):
                    grpc_probe = container[probe]["grpc"]
                    where = f"{kind} {name} {probe}"
                    checks.append((where, grpc_probe["port"], grpc_probe.get("service", "")))
    envoy = yaml.safe_load((ROOT / "deploy" / "envoy.yaml").read_text())
    for cluster in envoy["static_resources"]["clusters"]:
        endpoints = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"]
        port = endpoints[0]["endpoint"]["address"]["socket_address"]["port_value"]
        for check in cluster["health_checks"]:
            service = check["grpc_health_check"].get("service_name", "")
            checks.append((f"envoy cluster {cluster['name']}", port, service))
    return checks


def test_health_checks_ask_the_server_port_about_services_it_reports() -> None:
    # The server reports "" (the whole server) and each service it adds (server/app.py);
    # tests/test_serve_install.py asks a running server about each of these.
    reported = {"", SERVICE_NAME}
    checks = deploy_health_checks()
    assert len(checks) >= 4  # the Deployment's three probes and Envoy's check
    for where, port, service in checks:
        assert port == GRPC_PORT, f"{where}: port {port}"
        assert service in reported, f"{where}: the server reports no health for {service!r}"


def _container(doc: dict[str, Any]) -> dict[str, Any]:
    spec = doc["spec"]
    pod = spec["template"]["spec"] if "template" in spec else spec
    (container,) = pod["containers"]
    return container


def test_k8s_deployment_probes_the_grpc_health_service_on_the_server_port() -> None:
    _, deployment = _documents()[("Deployment", "vaeserve")]
    container = _container(deployment)
    env = {e["name"]: e["value"] for e in container["env"]}
    assert int(env["VAESERVE_PORT"]) == GRPC_PORT
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    http_port = int(env["VAESERVE_HTTP_PORT"])
    assert ports == {"grpc": GRPC_PORT, "http": http_port, "metrics": METRICS_PORT}
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["grpc"]["port"] == GRPC_PORT, probe
    mount = next(
        m for m in container["volumeMounts"] if m["mountPath"] == env["VAESERVE_REPOSITORY"]
    )
    assert mount["readOnly"] is True
    assert container["image"] == "vaeserve:serve"
    pod = deployment["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True


def test_k8s_services_route_to_named_container_ports() -> None:
    docs = _documents()
    ports = {p["name"] for p in _container(docs[("Deployment", "vaeserve")][1])["ports"]}
    for name in ("vaeserve", "vaeserve-headless"):
        service = docs[("Service", name)][1]
        for port in service["spec"]["ports"]:
            assert port["targetPort"] in ports, f"{name}: targetPort {port['targetPort']}"
    assert docs[("Service", "vaeserve-headless")][1]["spec"]["clusterIP"] == "None"


def test_k8s_training_job_runs_our_entry_points() -> None:
    docs = _documents()
    container = _container(docs[("Job", "vaeserve-train")][1])
    argv = container["command"] + container["args"]
    assert_runs_our_entry_point(argv, "Job vaeserve-train")
    assert container["image"] == "vaeserve:train"


def _variables(args: list[str]) -> set[str]:
    """The $(NAME) references Kubernetes expands in a container's args."""
    return {name for arg in args for name in re.findall(r"\$\((\w+)\)", arg)}


def test_k8s_distributed_training_job_runs_torchrun_with_real_flags() -> None:
    docs = _documents()
    job = docs[("Job", "vaeserve-train-ddp")][1]
    container = _container(job)
    assert container["command"] == ["torchrun"] and container["image"] == "vaeserve:train"
    args = container["args"]
    module = args.index("-m")
    assert args[module + 1] == "vaeserve.training"
    launcher, script = args[:module], args[module + 2 :]
    torchrun_help = subprocess.run(
        [str(BIN / "torchrun"), "--help"], capture_output=True, text=True, timeout=120
    ).stdout
    for flag in _flags(["torchrun", *launcher]):
        assert flag in torchrun_help, f"torchrun has no flag {flag}"
    assert_runs_our_entry_point(["vae-train", *script], "Job vaeserve-train-ddp")
    options = dict(arg.split("=", 1) for arg in launcher if "=" in arg)
    spec = job["spec"]
    # One pod per node, pod i is node rank i, pod 0 is the rendezvous host.
    assert spec["completionMode"] == "Indexed"
    assert int(options["--nnodes"]) == spec["completions"] == spec["parallelism"]
    assert options["--node-rank"] == "$(JOB_COMPLETION_INDEX)"
    assert _variables(args) <= {"JOB_COMPLETION_INDEX"} | {
        e["name"] for e in container.get("env", [])
    }  # JOB_COMPLETION_INDEX: set by Kubernetes in an Indexed Job's pods
    pod = spec["template"]["spec"]
    service = docs[("Service", pod["subdomain"])][1]["spec"]
    assert options["--master-addr"] == f"{job['metadata']['name']}-0.{pod['subdomain']}"
    assert service["clusterIP"] == "None"
    assert service["selector"] == {"job-name": job["metadata"]["name"]}
    (port,) = service["ports"]
    assert int(options["--master-port"]) == port["port"] == container["ports"][0]["containerPort"]
    # The run folder is shared: rank 0 writes it, a restarted job resumes from it.
    out = next(arg.split("=", 1)[1] for arg in script if arg.startswith("--out="))
    _, claim = _mounted_claim(docs, pod, container, out)
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]
    assert "--resume-if-present" in script


def _mounted_claim(docs, pod: dict[str, Any], container: dict[str, Any], path: str):
    """(volume mount, claim) of the PersistentVolumeClaim that holds ``path`` in the pod."""
    mount = next(m for m in container["volumeMounts"] if (path + "/").startswith(m["mountPath"]))
    volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
    claim = docs[("PersistentVolumeClaim", volume["persistentVolumeClaim"]["claimName"])][1]
    return mount, claim


def test_k8s_generation_job_splits_one_job_across_indexed_pods() -> None:
    docs = _documents()
    job = docs[("Job", "vaeserve-generate")][1]
    container = _container(job)
    assert container["command"] == ["vae-generate"] and container["image"] == "vaeserve:client"
    args = container["args"]
    assert_runs_our_entry_point(["vae-generate", *args], "Job vaeserve-generate")
    options = dict(arg.split("=", 1) for arg in args if "=" in arg)
    spec = job["spec"]
    # Worker i of N is pod i: vae-generate reads the index Kubernetes sets in Indexed Jobs.
    assert spec["completionMode"] == "Indexed"
    assert int(options["--num-workers"]) == spec["completions"] == spec["parallelism"]
    assert "--worker-index" not in options and not _variables(args)
    assert INDEX_ENV == "JOB_COMPLETION_INDEX", "vae-generate no longer reads the index"
    assert "--seed" in options and ":" in options["--model"], "one seed, one pinned version"
    pod = spec["template"]["spec"]
    models, models_claim = _mounted_claim(docs, pod, container, options["--local"])
    assert models["readOnly"] is True and models_claim["metadata"]["name"] == "vaeserve-models"
    _, samples = _mounted_claim(docs, pod, container, options["--out"])
    assert samples["spec"]["accessModes"] == ["ReadWriteMany"]


def test_kserve_runtime_args_parse_as_vae_serve_flags() -> None:
    docs = _documents()
    container = _container(docs[("ServingRuntime", "vaeserve")][1])
    settings = ServerSettings.from_args(container["args"], environ={})
    assert settings.repository == Path("/mnt/models")  # where KServe puts storageUri
    assert settings.models == ("{{.Name}}",)  # KServe's template: the InferenceService's name
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    # KServe routes the port named h2c as gRPC, the other as HTTP/1.1.
    assert ports == {"http1": settings.http_port, "h2c": settings.port}
    for probe in ("readinessProbe", "livenessProbe"):
        check = container[probe]["httpGet"]
        assert check["port"] == settings.http_port, probe
        assert check["path"] in {"/v2/health/ready", "/v2/health/live"}, probe
    runtime = docs[("ServingRuntime", "vaeserve")][1]["spec"]
    assert set(runtime["protocolVersions"]) == {"v2", "grpc-v2"}
    isvc = docs[("InferenceService", "digits")][1]["spec"]["predictor"]["model"]
    assert isvc["runtime"] == "vaeserve" and isvc["protocolVersion"] in runtime["protocolVersions"]
    assert isvc["modelFormat"]["name"] in {f["name"] for f in runtime["supportedModelFormats"]}
    # The model served is the InferenceService's name: a folder of the repository it mounts.
    assert isvc["storageUri"] == "pvc://vaeserve-models"
