"""vae-generate against a real server: kill/resume byte-identity, a server restart, --local."""

from __future__ import annotations

import fcntl
import filecmp
import json
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from client_fixtures import CVAE, OutputLines, ServerProcess, free_port, serve

from vaeserve.client.generate import main
from vaeserve.client.shards import JobSpec, npz_bytes, read_job

JOB_TIMEOUT_S = 60
_COMMAND = [
    sys.executable,
    "-c",
    "import sys; from vaeserve.client.generate import main; sys.exit(main())",
]
# vae-generate that SIGKILLs itself at a chosen point, through the job's public events.
_KILLED = [sys.executable, str(Path(__file__).with_name("killed_job.py"))]
# 5 shards, the last one short; pieces of 30 samples so that a kill can land mid-shard.
JOB = ["--num", "450", "--shard-size", "100", "--request-size", "30", "--seed", "11"]
JOB += ["--concurrency", "2", "--no-progress", "--log-level", "WARNING"]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    yield from serve(tmp_path_factory)


def _args(served, out: Path, *extra: str, model: str = CVAE) -> list[str]:
    return ["--server", served.address, "--model", model, "--out", str(out), *JOB, *extra]


def _run_child(args: list[str], kill_at: str = "none") -> subprocess.CompletedProcess:
    return subprocess.run(
        [*_KILLED, kill_at, *args], capture_output=True, text=True, timeout=JOB_TIMEOUT_S
    )


def _assert_same_files(actual: Path, expected: Path) -> None:
    names = sorted(p.relative_to(expected) for p in expected.rglob("*") if p.is_file())
    assert sorted(p.relative_to(actual) for p in actual.rglob("*") if p.is_file()) == names
    _, mismatch, errors = filecmp.cmpfiles(expected, actual, names, shallow=False)
    assert not mismatch and not errors, f"differ: {mismatch + errors}"


@pytest.fixture(scope="module")
def reference(served, tmp_path_factory):
    """An uninterrupted run, by --format."""
    done = {}

    def get(fmt: str) -> Path:
        if fmt not in done:
            out = tmp_path_factory.mktemp("reference") / fmt
            assert main(_args(served, out, "--format", fmt)) == 0
            done[fmt] = out
        return done[fmt]

    return get


def _visible_shards_are_complete(out: Path) -> None:
    job = read_job(out)
    for entry in out.iterdir():
        if entry.name.startswith(".") or entry.name == "job.json":
            continue
        index = int(entry.name.split("-")[1].split(".")[0])
        rows = len(job.spec.labels_for(*job.spec.shard_range(index)))
        if entry.suffix == ".npz":
            with np.load(entry) as shard:
                assert len(shard["samples"]) == len(shard["labels"]) == rows
        else:
            assert len(list(entry.glob("*.png"))) == rows


@pytest.mark.parametrize(
    ("fmt", "kill_points"),
    [
        ("npz", ["samples:130", "written:2", "published:3", "recorded:3", "samples:30"]),
        ("png", ["samples:250", "written:3", "published:4"]),
    ],
)
def test_killed_job_resumes_to_identical_files(served, reference, tmp_path, fmt, kill_points):
    out = tmp_path / "job"
    args = _args(served, out, "--format", fmt)
    for point in kill_points:
        result = _run_child(args, kill_at=point)
        assert result.returncode == -signal.SIGKILL, result.stderr
        _visible_shards_are_complete(out)
    result = _run_child(args)
    assert result.returncode == 0, result.stderr
    _assert_same_files(out, reference(fmt))


def test_job_survives_a_server_restart(served, tmp_path):
    # Long enough (500 requests) that it cannot finish between its first shard and the kill.
    longer = ["--num", "5000", "--shard-size", "500", "--request-size", "10"]
    assert main(_args(served, tmp_path / "reference", *longer)) == 0
    server = ServerProcess(served.repository)
    out = tmp_path / "job"
    args = _args(served, out, *longer, "--log-level", "DEBUG")
    args[1] = f"127.0.0.1:{server.port}"
    job = subprocess.Popen(_COMMAND + args, stderr=subprocess.PIPE, text=True)
    lines = OutputLines(job)
    try:
        lines.wait_for("wrote shard shard-00000")
        # Frozen while its server dies, the job is sure to meet the outage when it thaws.
        job.send_signal(signal.SIGSTOP)
        server.kill()
        job.send_signal(signal.SIGCONT)
        lines.wait_for("failed with UNAVAILABLE")
        server = ServerProcess(served.repository, port=server.port)
        assert job.wait(timeout=JOB_TIMEOUT_S) == 0, lines.text()
    finally:
        job.kill()
        job.wait(timeout=JOB_TIMEOUT_S)
        lines.text()
        server.kill()
    _assert_same_files(out, tmp_path / "reference")


@pytest.mark.parametrize(
    "options",
    [[], ["--output", "draw", "--encoding", "uint8", "--latents", "--labels", "7,2"]],
    ids=["mean", "draw-uint8-latents"],
)
def test_local_and_served_jobs_write_the_same_bytes(served, tmp_path, options):
    assert main(_args(served, tmp_path / "served", *options)) == 0
    local = _args(served, tmp_path / "local", *options)
    local[:2] = ["--local", str(served.repository)]
    assert main(local) == 0
    _assert_same_files(tmp_path / "local", tmp_path / "served")


def test_resume_verifies_finished_shards_and_redoes_a_damaged_one(served, reference, tmp_path):
    out = tmp_path / "job"
    assert main(_args(served, out)) == 0
    damaged = out / "shard-00002.npz"
    data = bytearray(damaged.read_bytes())
    data[len(data) // 2] ^= 0xFF  # a sample's byte: the file still opens, its sha256 differs
    damaged.write_bytes(bytes(data))
    assert damaged.read_bytes() != (reference("npz") / damaged.name).read_bytes()
    assert main(_args(served, out)) == 0
    _assert_same_files(out, reference("npz"))


def test_vae_job_and_preview_grids(served, tmp_path):
    preview = ["--preview", str(tmp_path / "vae.png")]
    assert main(_args(served, tmp_path / "vae", *preview, model=served.vae)) == 0
    with np.load(tmp_path / "vae" / "shard-00000.npz") as shard:
        assert sorted(shard) == ["samples"] and shard["samples"].shape == (100, 1, 8, 8)
    assert main(_args(served, tmp_path / "cvae", "--preview", str(tmp_path / "cvae.png"))) == 0
    from PIL import Image

    # 8x8 digits are scaled by 8; one row per class for the CVAE, 4 rows for the VAE.
    for name, size in [("cvae.png", (728, 728)), ("vae.png", (728, 296))]:
        with Image.open(tmp_path / name) as image:
            assert image.size == size


def _fails_before_work(args: list[str], out: Path, capsys, message: str, code: int = 2) -> None:
    assert main(args) == code
    err = capsys.readouterr().err
    assert message in err, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--model", "no-such-model"], "--model: "),
        (["--model", f"{CVAE}:7"], "--model: model.version 7"),
        (["--model", "tiny-cvae:x"], "--model: expected NAME or NAME:VERSION"),
        (["--labels", "10"], "--labels: class 10 is out of range: expected 0..9"),
        (["--labels", "3,cat"], "--labels: 'cat' is not a class index or name"),
        (["--num", "0"], "--num: expected an integer >= 1, got 0"),
        (["--num", "-5"], "--num: expected an integer >= 1, got -5"),
        (["--shard-size", "0"], "--shard-size: expected an integer >= 1"),
        (["--temperature", "-1"], "--temperature: expected a finite number >= 0"),
        (["--seed", str(2**64)], "--seed: expected an integer in 0..2**64-1"),
        (["--format", "png", "--encoding", "float32"], "--encoding: --format png stores uint8"),
    ],
    ids=lambda v: v if isinstance(v, str) else " ".join(v),
)
def test_bad_arguments_fail_with_a_clear_message_before_any_work(
    served, tmp_path, capsys, extra, message
):
    out = tmp_path / "job"
    _fails_before_work(_args(served, out) + extra, out, capsys, message)
    assert not out.exists()


def test_labels_for_a_vae_are_refused(served, tmp_path, capsys):
    out = tmp_path / "job"
    args = _args(served, out, "--labels", "1", model=served.vae)
    _fails_before_work(args, out, capsys, "--labels: model 'tiny-vae' is a vae and takes no labels")
    assert not out.exists()


def test_an_output_folder_of_other_files_or_another_job_is_refused(served, tmp_path, capsys):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    _fails_before_work(_args(served, foreign), foreign, capsys, "not a vae-generate job")
    assert sorted(p.name for p in foreign.iterdir()) == ["notes.txt"]

    out = tmp_path / "job"
    assert main(_args(served, out)) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    for extra, changed in [
        (["--seed", "12"], "seed: recorded 11, now 12"),
        (["--temperature", "0.5"], "temperature: recorded 1.0, now 0.5"),
        (["--format", "npy"], "format: recorded 'npz', now 'npy'"),
    ]:
        _fails_before_work(_args(served, out) + extra, out, capsys, changed)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_two_runs_on_one_folder_are_refused(served, tmp_path, capsys):
    out = tmp_path / "job"
    assert main(_args(served, out)) == 0
    with open(out / ".lock") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        _fails_before_work(_args(served, out), out, capsys, "in use by another vae-generate run")


def test_a_changed_model_version_on_resume_is_refused(served, tmp_path, capsys):
    # A second version of the same graphs: only the version number differs.
    repository = tmp_path / "repository"
    source = served.repository / CVAE / "1"
    for version in ("1", "2"):
        target = repository / CVAE / version
        target.mkdir(parents=True)
        for f in source.iterdir():
            (target / f.name).write_bytes(f.read_bytes())
    manifest = json.loads((repository / CVAE / "2" / "manifest.json").read_text())
    manifest["version"] = 2
    (repository / CVAE / "2" / "manifest.json").write_text(json.dumps(manifest))

    out = tmp_path / "job"
    local = ["--local", str(repository), "--model", f"{CVAE}:1", "--out", str(out), *JOB]
    assert main(local) == 0
    local[3] = f"{CVAE}:2"
    _fails_before_work(local, out, capsys, "model_version: recorded 1, now 2")
    # Without a version, the job keeps the version it pinned, although 2 is the latest now.
    local[3] = CVAE
    assert main(local) == 0


def test_unreachable_server_means_exit_1(tmp_path, capsys):
    out = tmp_path / "job"
    args = ["--server", f"127.0.0.1:{free_port()}", "--model", CVAE, "--out", str(out), *JOB]
    _fails_before_work([*args, "--retry-timeout", "0.3"], out, capsys, "UNAVAILABLE", code=1)
    assert not out.exists()


# --- pieces, without a server ------------------------------------------------------------


def test_labels_of_a_sample_depend_only_on_its_index():
    spec = JobSpec("m", 1, "", 1000, "3,1,4", (3, 1, 4), 0, 1.0, "mean", "float32", False, 7, "npz")
    whole = spec.labels_for(0, 1000)
    for start, stop in [(0, 7), (7, 14), (995, 1000), (13, 500)]:
        np.testing.assert_array_equal(spec.labels_for(start, stop), whole[start:stop])
    np.testing.assert_array_equal(whole[:6], [3, 1, 4, 3, 1, 4])
    assert spec.num_shards == 143 and spec.shard_range(142) == (994, 1000)


def test_npz_shards_are_byte_deterministic_and_loadable(tmp_path):
    arrays = {"samples": np.arange(12, dtype=np.float32).reshape(3, 4), "labels": np.arange(3)}
    first = npz_bytes(arrays)
    assert first == npz_bytes(arrays)
    (tmp_path / "a.npz").write_bytes(first)
    with np.load(tmp_path / "a.npz") as loaded:
        np.testing.assert_array_equal(loaded["samples"], arrays["samples"])
