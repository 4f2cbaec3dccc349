"""The built wheel: one import name, the console scripts, the layer rule and honest extras.

The wheel is built from the image's build context (what .dockerignore lets in) and unpacked
into a folder that then stands in for site-packages. import-linter reads the layer rule from
pyproject.toml; it walks that installed copy, because the source tree's package-dir mapping
(server/ installs as vaeserve/server) hides the parts from a walk of vaeserve/.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest
from build_context import ROOT, build_context
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
BIN = Path(sys.executable).parent
SCRIPTS = {
    "vae-train": "vaeserve.training.cli:main",
    "vae-eval": "vaeserve.training.evaluate:main",
    "vae-export": "vaeserve.export.onnx_export:main",
    "vae-serve": "vaeserve.server.cli:main",
    "vae-healthcheck": "vaeserve.server.healthcheck:main",
    "vae-generate": "vaeserve.client.generate:main",
    "vae-score": "vaeserve.client.score_job:main",
}
# Which parts each extra installs for (the core and the engine come with every part).
EXTRA_PARTS = {
    "train": ("vaeserve.training", "vaeserve.export"),
    "serve": ("vaeserve.server",),
    "client": ("vaeserve.client",),
}


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("wheel")
    context = build_context(tmp / "context")
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
         "--quiet", "-w", str(tmp / "dist"), str(context)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (built,) = (tmp / "dist").glob("vaeserve-*.whl")
    return built


@pytest.fixture(scope="module")
def site(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel unpacked: a pure-Python wheel installs by extraction."""
    folder = tmp_path_factory.mktemp("site")
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(folder)
    return folder


def _lint_imports(site: Path) -> subprocess.CompletedProcess[str]:
    # cwd = the installed copy: import-linter puts the working directory first on sys.path, and
    # the repository root holds a vaeserve/ folder without the mapped parts.
    return subprocess.run(
        [str(BIN / "lint-imports"), str(ROOT / "pyproject.toml"), "--no-cache"],
        cwd=site, env={**os.environ, "PYTHONPATH": str(site)},
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip


def test_the_wheel_installs_one_import_name(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
    top = {name.split("/", 1)[0] for name in names}
    assert top == {"vaeserve", f"{wheel.name.split('-py3')[0]}.dist-info"}, sorted(top)
    for part in ("training", "export", "server", "client", "engine", "manifest", "proto"):
        assert f"vaeserve/{part}/__init__.py" in names, part
    assert "vaeserve/proto/v1/vaeserve_pb2.py" in names


def test_every_package_of_the_tree_is_in_the_wheel(wheel: Path) -> None:
    # setuptools installs only the packages pyproject lists: a new subpackage left off the
    # list would be missing from every install while the editable checkout still works.
    mapping = PYPROJECT["tool"]["setuptools"]["package-dir"]
    expected = set()
    for package, folder in mapping.items():
        for init in (ROOT / folder).rglob("__init__.py"):
            relative = init.parent.relative_to(ROOT / folder)
            expected.add(".".join([package, *relative.parts]))
    with zipfile.ZipFile(wheel) as archive:
        shipped = {n.rsplit("/", 1)[0].replace("/", ".") for n in archive.namelist()
                   if n.endswith("/__init__.py")}  # fmt: skip
    assert shipped == expected, (sorted(expected - shipped), sorted(shipped - expected))


def test_console_scripts_keep_their_names(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as archive:
        (entry_points,) = [n for n in archive.namelist() if n.endswith("entry_points.txt")]
        text = archive.read(entry_points).decode()
    scripts = dict(re.findall(r"^(vae-[a-z]+) = (\S+)$", text, re.M))
    assert scripts == SCRIPTS


@pytest.mark.parametrize(
    ("part", "script"),
    [("training", "vae-train"), ("export", "vae-export"), ("server", "vae-serve"),
     ("client", "vae-generate")],
)  # fmt: skip
def test_each_part_runs_as_python_dash_m(site: Path, part: str, script: str) -> None:
    env = {**os.environ, "PYTHONPATH": str(site), "COLUMNS": "100"}
    as_module = subprocess.run(
        [sys.executable, "-m", f"vaeserve.{part}", "--help"],
        cwd=site, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    as_script = subprocess.run(
        [str(BIN / script), "--help"], env=env, capture_output=True, text=True, timeout=120
    )
    assert as_module.returncode == 0, as_module.stderr
    # The same parser: only the program name in the usage line may differ.
    assert as_module.stdout.split("\n", 1)[1] == as_script.stdout.split("\n", 1)[1]


def test_the_layer_rule_holds(site: Path) -> None:
    proc = _lint_imports(site)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    contracts = PYPROJECT["tool"]["importlinter"]["contracts"]
    assert f"Contracts: {len(contracts)} kept, 0 broken." in proc.stdout


@pytest.mark.parametrize(
    ("module", "source", "broken"),
    [
        ("vaeserve/engine/planted.py", "import vaeserve.server.app\n", "Layers"),
        ("vaeserve/client/planted.py", "import vaeserve.server.settings\n", "Layers"),
        ("vaeserve/errors_planted.py", "import vaeserve.engine\n", "Layers"),
        ("vaeserve/server/planted.py", "import torch\n", "never imports training"),
        ("vaeserve/server/planted.py", "import vaeserve.server.cli\n", "No import cycles"),
    ],
    ids=["engine-imports-server", "client-imports-server", "core-imports-engine",
         "server-imports-torch", "cycle"],
)  # fmt: skip
def test_a_broken_layer_is_caught(
    site: Path, tmp_path: Path, module: str, source: str, broken: str
) -> None:
    copy = tmp_path / "site"
    shutil.copytree(site, copy)
    (copy / module).write_text(source)
    if broken == "No import cycles":  # close the loop: cli -> ... -> settings -> planted -> cli
        settings = copy / "vaeserve/server/settings.py"
        settings.write_text(settings.read_text() + "\nimport vaeserve.server.planted  # noqa\n")
    proc = _lint_imports(copy)
    assert proc.returncode != 0, proc.stdout
    broken_section = proc.stdout.split("Broken contracts", 1)[-1]
    assert broken in broken_section, proc.stdout


_REACHED = """
import json, sys
import grimp
parts = tuple(sys.argv[1:])
graph = grimp.build_graph("vaeserve", include_external_packages=True, cache_dir=None)
assert graph.find_modules_directly_imported_by("vaeserve.server.cli"), "walked the wrong tree"
reached = set()
for module in graph.modules:
    if module.startswith(parts):
        reached |= {module, *graph.find_upstream_modules(module)}
print(json.dumps(sorted(m for m in reached if not m.startswith("vaeserve"))))
"""


def _imports_of(site: Path, parts: tuple[str, ...]) -> set[str]:
    """Top-level names of third-party modules that ``parts`` import, directly or through
    other vaeserve modules (function-level imports included: ``--local`` is a lazy import)."""
    # A fresh process: in this one, `vaeserve` may already be imported from the source tree.
    proc = subprocess.run(
        [sys.executable, "-c", _REACHED, *parts],
        cwd=site, env={**os.environ, "PYTHONPATH": str(site)},
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    return set(json.loads(proc.stdout)) - set(sys.stdlib_module_names)


def _requirement_names(requirements: list[str]) -> set[str]:
    return {canonicalize_name(Requirement(line).name) for line in requirements}


@pytest.mark.parametrize("extra", sorted(EXTRA_PARTS))
def test_each_extra_lists_exactly_what_its_parts_import(site: Path, extra: str) -> None:
    project = PYPROJECT["project"]
    listed = _requirement_names(project["optional-dependencies"][extra])
    base = _requirement_names(project["dependencies"])
    providers = importlib.metadata.packages_distributions()
    needed: dict[str, set[str]] = {}  # import name -> the distributions that provide it
    for name in _imports_of(site, EXTRA_PARTS[extra]):
        assert name in providers, f"{extra}: {name} is imported but no installed package has it"
        needed[name] = {canonicalize_name(d) for d in providers[name]}
    missing = {name for name, dists in needed.items() if not dists & (listed | base)}
    assert not missing, f"the {extra} extra lacks what provides {sorted(missing)}"
    used = set().union(*needed.values())
    unused = listed - used - base
    assert not unused, f"the {extra} extra lists {sorted(unused)}, which its parts never import"
