"""vae-generate split across workers (--num-workers N --worker-index I) writing one folder.

Workers run --local on the tiny repository, as child processes that are SIGKILLed at a shard
point through the job's public events (tests/killed_job.py, which also records, through
JobEvents.shard_written, every shard a process writes). The finalized folder must be
byte-identical to a single-process run of the same job, shard for shard and job.json.
"""

from __future__ import annotations

import fcntl
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from client_fixtures import CVAE, tiny_repository

from vaeserve.client.generate import main

TIMEOUT_S = 60  # of each child process
# 12 shards of 100 (the last one short), fetched 25 at a time. With 3 workers, worker I owns
# shards I, I+3, I+6, I+9.
JOB = ["--num", "1150", "--shard-size", "100", "--request-size", "25", "--seed", "11"]
JOB += ["--concurrency", "2", "--no-progress", "--log-level", "WARNING"]
SHARDS = 12
_KILLED = [sys.executable, str(Path(__file__).with_name("killed_job.py"))]


@pytest.fixture(scope="module")
def repository(tmp_path_factory) -> Path:
    return tiny_repository(tmp_path_factory)


def _args(repository: Path, out: Path, *extra: str) -> list[str]:
    return ["--local", str(repository), "--model", CVAE, "--out", str(out), *JOB, *extra]


def _worker(repository: Path, out: Path, index: int, *extra: str, n: int = 3) -> list[str]:
    return _args(repository, out, "--num-workers", str(n), "--worker-index", str(index), *extra)


@pytest.fixture(scope="module")
def reference(repository, tmp_path_factory) -> Path:
    """The same job run by one process."""
    out = tmp_path_factory.mktemp("reference") / "job"
    assert main(_args(repository, out)) == 0
    return out


class Worker:
    """A worker in a child process; the shards it writes are appended to ``spy``."""

    def __init__(self, args: list[str], spy: Path, kill_at: str = "none"):
        env = {**os.environ, "KILLED_JOB_SPY": str(spy)}
        self.process = subprocess.Popen(
            [*_KILLED, kill_at, *args], stderr=subprocess.PIPE, text=True, env=env
        )

    def wait(self) -> tuple[int, str]:
        try:
            _, err = self.process.communicate(timeout=TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.process.kill()
            _, err = self.process.communicate()
            pytest.fail(f"a worker ran past {TIMEOUT_S} s: {err}")
        return self.process.returncode, err


def _job_files(out: Path) -> dict[str, bytes]:
    """Every file of the folder but the workers' own (workers/), by relative path."""
    files = (p for p in out.rglob("*") if p.is_file())
    return {
        str(p.relative_to(out)): p.read_bytes()
        for p in files
        if p.parts[len(out.parts)] != "workers"
    }


def _assert_same_job(actual: Path, expected: Path) -> None:
    got, want = _job_files(actual), _job_files(expected)
    assert sorted(got) == sorted(want)
    differ = [name for name in want if got[name] != want[name]]
    assert not differ, f"differ from the single-process run: {differ}"


def _written(spy: Path) -> list[int]:
    return [int(line) for line in spy.read_text().split()] if spy.exists() else []


def _one_line(capsys, *fragments: str) -> str:
    err = capsys.readouterr().err
    lines = [
        line for line in err.strip().splitlines() if not line.startswith(("INFO ", "WARNING "))
    ]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert all(f in lines[0] for f in fragments), lines[0]
    return lines[0]


def _stamps(out: Path, names: list[str]) -> dict[str, tuple[int, int]]:
    return {n: ((out / n).stat().st_ino, (out / n).stat().st_mtime_ns) for n in names}


def test_three_workers_one_killed_and_restarted_end_identical_to_one_process(
    repository, reference, tmp_path
):
    out = tmp_path / "job"
    spies = [tmp_path / f"spy-{i}" for i in range(3)]
    # Worker 1 dies after renaming shard 4 and before recording it; 0 and 2 run meanwhile.
    workers = [
        Worker(_worker(repository, out, i), spies[i], kill_at="published:4" if i == 1 else "none")
        for i in range(3)
    ]
    results = [w.wait() for w in workers]
    assert results[1][0] == -signal.SIGKILL, results[1][1]
    for code, err in (results[0], results[2]):
        assert code == 0, err
    assert not (out / "job.json").exists(), "job.json written before every shard was done"

    # Nobody else's file is touched by the restarted worker 1: same inode, same mtime.
    others = ["workers/worker-0.json", "workers/worker-2.json"]
    others += [f"shard-{k:05d}.npz" for k in range(SHARDS) if k % 3 != 1]
    before = _stamps(out, others)
    code, err = Worker(_worker(repository, out, 1), spies[1]).wait()
    assert code == 0, err  # the last to finish: it verified every shard and wrote job.json
    assert _stamps(out, others) == before

    _assert_same_job(out, reference)
    for i, spy in enumerate(spies):
        written = _written(spy)
        assert written and all(k % 3 == i for k in written), (i, written)
    assert sorted(set(_written(spies[0]) + _written(spies[1]) + _written(spies[2]))) == list(
        range(SHARDS)
    )
    assert _written(spies[1]).count(4) == 2  # published but unrecorded when killed: redone


def _finished(repository: Path, out: Path, workers=range(3)) -> None:
    for i in workers:
        assert main(_worker(repository, out, i)) == 0


def test_worker_index_defaults_to_the_indexed_job_variable(repository, tmp_path, monkeypatch):
    out = tmp_path / "job"
    monkeypatch.setenv("JOB_COMPLETION_INDEX", "2")
    args = _worker(repository, out, 0)
    del args[-2:]  # no --worker-index
    assert main(args) == 0
    shards = sorted(p.name for p in out.glob("shard-*"))
    assert shards == [f"shard-{k:05d}.npz" for k in (2, 5, 8, 11)]
    assert sorted(p.name for p in (out / "workers").glob("*.json")) == ["job.json", "worker-2.json"]


def test_a_worker_of_another_job_definition_is_refused(repository, tmp_path, capsys):
    out = tmp_path / "job"
    _finished(repository, out, workers=[0])
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    for args, changed in [
        (_worker(repository, out, 0, n=2), "num_workers: recorded 3, now 2"),
        (_worker(repository, out, 1, "--seed", "12"), "seed: recorded 11, now 12"),
        (_worker(repository, out, 1, "--shard-size", "50"), "shard_size: recorded 100, now 50"),
        (_worker(repository, out, 2, "--labels", "3"), "labels: recorded 'balanced', now '3'"),
        (_args(repository, out), "holds a job split across 3 workers"),
    ]:
        assert main(args) == 2
        _one_line(capsys, f"--out: {out}", changed)
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


def test_a_worker_on_a_single_process_folder_is_refused(repository, reference, capsys):
    assert main(_worker(repository, reference, 0)) == 2
    _one_line(capsys, "holds a job run by a single process", "without --num-workers")


def test_finalize_names_missing_and_damaged_shards_then_succeeds(
    repository, reference, tmp_path, capsys
):
    out = tmp_path / "job"
    _finished(repository, out, workers=[0, 1])
    assert main(["--out", str(out), "--finalize"]) == 1  # worker 2 has not run
    _one_line(capsys, "4 of 12 shards are not done", "shard-00002.npz (worker 2: not finished)")
    assert not (out / "job.json").exists()

    _finished(repository, out, workers=[2])  # the last one: finalizes on its own
    _assert_same_job(out, reference)
    (out / "shard-00004.npz").unlink()
    damaged = out / "shard-00008.npz"
    data = bytearray(damaged.read_bytes())
    data[len(data) // 2] ^= 0xFF  # a sample's byte (the file's last byte is already 0)
    damaged.write_bytes(bytes(data))
    assert main(["--out", str(out), "--finalize"]) == 1
    line = _one_line(
        capsys,
        "2 of 12 shards are not done",
        "shard-00004.npz (worker 1: missing)",
        "shard-00008.npz (worker 2: sha256 differs",
        "worker(s) 1, 2",
    )
    assert "shard-00000" not in line

    # Each worker re-checks its own shards and redoes the bad ones, then tries to finalize:
    # worker 1 cannot while worker 2's shard is damaged, and says whose it is.
    assert main(_worker(repository, out, 1)) == 1
    _one_line(capsys, "worker 1 of 3 is done, but", "shard-00008.npz (worker 2: sha256 differs")
    assert (out / "shard-00004.npz").exists()  # its own: redone
    assert main(_worker(repository, out, 2)) == 0
    _assert_same_job(out, reference)


def test_finalize_is_idempotent_and_concurrent_finalizers_agree(repository, reference, tmp_path):
    out = tmp_path / "job"
    _finished(repository, out)
    job = out / "job.json"
    first = job.read_bytes()
    job.unlink()  # as if the last worker died before finalizing
    finalizers = [
        subprocess.Popen(
            [*_KILLED, "none", "--out", str(out), "--finalize"], stderr=subprocess.PIPE
        )
        for _ in range(2)
    ]
    for f in finalizers:
        _, err = f.communicate(timeout=TIMEOUT_S)
        assert f.returncode == 0, err
    assert job.read_bytes() == first
    stamp = _stamps(out, ["job.json"])
    assert main(["--out", str(out), "--finalize"]) == 0
    assert _stamps(out, ["job.json"]) == stamp  # verified again, left as it was
    _assert_same_job(out, reference)


def test_one_worker_index_runs_once_and_others_run_beside_it(repository, tmp_path, capsys):
    out = tmp_path / "job"
    (out / "workers").mkdir(parents=True)
    with open(out / "workers" / "worker-0.lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)  # worker 0 is running
        assert main(_worker(repository, out, 0)) == 2
        _one_line(capsys, "--worker-index: worker 0 of", "in use by another vae-generate run")
        assert main(_worker(repository, out, 1)) == 0
    with open(out / ".lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)  # a single-process run holds the folder
        assert main(_worker(repository, out, 2)) == 2
        _one_line(capsys, "in use by a vae-generate run of the whole job")


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--num-workers", "3", "--worker-index", "3"], "--worker-index: expected 0..2"),
        (["--num-workers", "3", "--worker-index", "-1"], "--worker-index: expected 0..2"),
        (["--num-workers", "0", "--worker-index", "0"], "--num-workers: expected an integer >= 1"),
        (["--worker-index", "0"], "--worker-index: needs --num-workers"),
        (["--num-workers", "3"], "--worker-index: required with --num-workers"),
        (["--num-workers", "2", "--worker-index", "0", "--preview", "p.png"], "--preview: not"),
    ],
    ids=lambda v: v if isinstance(v, str) else " ".join(v),
)
def test_bad_worker_arguments_fail_in_one_line_before_any_work(
    repository, tmp_path, capsys, monkeypatch, extra, message
):
    monkeypatch.delenv("JOB_COMPLETION_INDEX", raising=False)
    out = tmp_path / "job"
    assert main(_args(repository, out, *extra)) == 2
    _one_line(capsys, message)
    assert not out.exists()


def test_bad_index_variable_and_missing_seed_are_refused(repository, tmp_path, capsys, monkeypatch):
    out = tmp_path / "job"
    monkeypatch.setenv("JOB_COMPLETION_INDEX", "x")
    assert main(_args(repository, out, "--num-workers", "3")) == 2
    _one_line(capsys, "--worker-index: $JOB_COMPLETION_INDEX is 'x'")
    args = _worker(repository, out, 0)
    del args[args.index("--seed") : args.index("--seed") + 2]
    assert main(args) == 2
    _one_line(capsys, "--seed: required with --num-workers")
    assert not out.exists()


def test_finalize_takes_only_the_folder_of_a_split_job(repository, reference, tmp_path, capsys):
    assert main(["--out", str(tmp_path), "--finalize", "--model", CVAE]) == 2
    _one_line(capsys, "--finalize: takes only --out", "--model")
    assert main(["--out", str(reference), "--finalize"]) == 2
    _one_line(capsys, "a job run by a single process")
    assert main(["--out", str(tmp_path / "none"), "--finalize"]) == 2
    _one_line(capsys, "is not a folder")
