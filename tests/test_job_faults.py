"""vae-generate under faults: SIGKILL at random moments, a full disk, an unwritable folder.

test_generate.py kills jobs at chosen points (after M samples, between a shard's write and its
rename, between the rename and job.json); here the kills come from outside at random times,
over many trials, and each interrupted job resumed must end byte-identical to an
uninterrupted one. Disk full is a real tmpfs of a few shards when this process may mount one
(root with CAP_SYS_ADMIN), and RLIMIT_FSIZE (writes fail with EFBIG) everywhere.
"""

from __future__ import annotations

import errno
import random
import re
import resource
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from client_fixtures import CVAE, OutputLines, serve
from os_faults import read_only_folder
from test_generate import _assert_same_files, _visible_shards_are_complete

from vaeserve.client.generate import main
from vaeserve.client.shards import JOB_FILE, read_job, verify_shard

TIMEOUT_S = 60
TRIALS = 10  # random-kill trials, each: kill, resume and kill again, resume to the end
# vae-generate, SIGKILLed at a chosen point through the job's public events when asked.
_KILLED = [sys.executable, str(Path(__file__).with_name("killed_job.py"))]
# 12 shards (the last one short) of 250 samples, fetched 20 at a time: ~150 requests.
JOB = ["--num", "2900", "--shard-size", "250", "--request-size", "20", "--seed", "5"]
JOB += ["--concurrency", "2", "--no-progress"]
SHARDS = 12
SHARD_BYTES = 66_512  # one npz shard of 250 samples of 1x8x8 float32 and their labels


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    yield from serve(tmp_path_factory)


def _args(served, out: Path, *extra: str) -> list[str]:
    return ["--server", served.address, "--model", CVAE, "--out", str(out), *JOB, *extra]


class Run:
    """vae-generate in a child process, its log lines read as they come."""

    def __init__(self, args: list[str], kill_at: str = "none", preexec=None):
        self.started = time.monotonic()
        self.process = subprocess.Popen(
            [*_KILLED, kill_at, *args, "--log-level", "INFO"],
            stderr=subprocess.PIPE,
            text=True,
            preexec_fn=preexec,
        )
        self.output = OutputLines(self.process)

    def wait(self) -> int:
        code = self.process.wait(TIMEOUT_S)
        self.output.text()
        return code


@pytest.fixture(scope="module")
def reference(served, tmp_path_factory) -> tuple[Path, float]:
    """An uninterrupted run's folder, and how long its job took after it logged "job:"."""
    out = tmp_path_factory.mktemp("reference") / "job"
    run = Run(_args(served, out))
    run.output.wait_for(r"INFO vaeserve\.client\.generate: job:")
    began = time.monotonic()
    assert run.wait() == 0, run.output.text()
    return out, time.monotonic() - began


def _kill_at_random(run: Run, delay_s: float) -> bool:
    """SIGKILL ``delay_s`` after the job starts; True if it was still running then."""
    run.output.wait_for(r"vaeserve\.client\.generate: job:|complete")
    time.sleep(delay_s)  # the point of the trial is a moment nobody chose
    if run.process.poll() is not None:
        run.wait()
        return False
    run.process.send_signal(signal.SIGKILL)
    code = run.wait()
    # The job may end on its own between poll() and the signal: then the kill missed it.
    assert code in (-signal.SIGKILL, 0), code
    return code == -signal.SIGKILL


def test_jobs_killed_at_random_moments_resume_to_identical_files(
    served, reference, tmp_path, figure
):
    expected, job_s = reference
    landed = 0
    for trial in range(TRIALS):
        rng = random.Random(1130 + trial)
        out = tmp_path / f"trial-{trial}"
        for _ in range(2):  # the second kill hits a resumed run, possibly while it verifies
            # A moment within the work still left: a resumed run only has the missing shards.
            job = read_job(out)
            left = 1.0 - (0 if job is None else len(job.shards)) / SHARDS
            landed += _kill_at_random(Run(_args(served, out)), rng.uniform(0.0, job_s * left))
            if (out / JOB_FILE).exists():
                _visible_shards_are_complete(out)
        final = Run(_args(served, out))
        assert final.wait() == 0, final.output.text()
        _assert_same_files(out, expected)
    figure("kills", 2 * TRIALS)
    figure("kills_that_hit_a_running_job", landed)
    # Time is the feature (kills at moments nobody chose, so some miss a job that just ended);
    # half of them is generous, as each delay is drawn within the job's expected remaining time.
    assert landed >= TRIALS, f"only {landed} of {2 * TRIALS} kills hit a running job"


# --- a full disk ------------------------------------------------------------------------


@pytest.fixture
def tmpfs(tmp_path) -> Iterator[Path]:
    """A mount point for a tmpfs of the test's size (skips where mounting is not allowed)."""
    point = tmp_path / "tmpfs"
    point.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(point)], capture_output=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        yield point
    finally:
        subprocess.run(["umount", "-l", str(point)], check=True)


def _resize(point: Path, option: str) -> None:
    subprocess.run(["mount", "-o", f"remount,{option}", str(point)], check=True)


# A line gRPC's C core logs itself (glog format: "E1206 20:18:22.935088   13078 file.cc:373]").
# Under RLIMIT_FSIZE its event engine sometimes reports an interrupted epoll_wait; that is
# gRPC's diagnostic, not the job's message, which is what these tests hold to one line.
_GRPC_CORE_LOG = re.compile(r"^[EWIF]\d{4} \d\d:\d\d:\d\d\.\d+ +\d+ \S+:\d+\]")


def _one_clear_line(err: str, *fragments: str) -> None:
    lines = [
        line
        for line in err.strip().splitlines()
        if not line.startswith("INFO ") and not _GRPC_CORE_LOG.match(line)
    ]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert all(f in lines[0] for f in fragments), lines[0]


def _finished_shards_intact(out: Path) -> int:
    job = read_job(out)
    assert job is not None and all(verify_shard(out, r) for r in job.shards.values())
    visible = {p.name for p in out.iterdir() if not p.name.startswith(".")}
    assert visible == {JOB_FILE, *(r.path for r in job.shards.values())}
    assert not [p for p in out.iterdir() if ".tmp-" in p.name], "a partial shard was left"
    return len(job.shards)


def test_a_full_disk_stops_the_job_with_a_clear_error_and_keeps_finished_shards(
    served, reference, tmpfs, capsys
):
    _resize(tmpfs, f"size={3 * SHARD_BYTES + 32 * 1024}")  # job.json and three shards, nearly
    out = tmpfs / "job"
    assert main(_args(served, out)) == 1
    _one_clear_line(capsys.readouterr().err, "job incomplete", "No space left on device", "re-run")
    assert 1 <= _finished_shards_intact(out) < 12
    _resize(tmpfs, "size=4m")
    assert main(_args(served, out)) == 0
    _assert_same_files(out, reference[0])


def _file_size_limit(limit: int):
    def apply() -> None:
        # Past the limit a write fails with EFBIG instead of the process dying of SIGXFSZ.
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


def test_a_file_size_limit_stops_the_job_with_a_clear_error_and_keeps_finished_shards(
    served, reference, tmp_path
):
    out = tmp_path / "job"
    killed = Run(_args(served, out), kill_at="written:3")
    assert killed.wait() == -signal.SIGKILL  # shards 0-2 recorded, 3 written, not published
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.name.startswith("shard-")}
    limited = Run(_args(served, out), preexec=_file_size_limit(SHARD_BYTES // 2))
    assert limited.wait() == 1
    _one_clear_line(limited.output.text(), "job incomplete", "File too large", "re-run")
    assert _finished_shards_intact(out) == 3
    for name in ("shard-00000.npz", "shard-00001.npz", "shard-00002.npz"):
        assert (out / name).read_bytes() == before[name]
    assert main(_args(served, out)) == 0
    _assert_same_files(out, reference[0])


# --- an output folder that cannot be written ---------------------------------------------


def test_a_read_only_output_folder_is_a_clear_error(served, reference, tmpfs, capsys):
    out = tmpfs / "job"
    shutil.copytree(reference[0], out)  # a finished job ...
    (out / "shard-00004.npz").unlink()  # ... that lost a shard, on a read-only disk
    _resize(tmpfs, "ro")
    assert main(_args(served, out)) == 1
    _one_clear_line(capsys.readouterr().err, f"--out {out}", "Read-only file system")
    assert main(_args(served, tmpfs / "new")) == 2
    _one_clear_line(capsys.readouterr().err, f"--out: cannot create {tmpfs / 'new'}")
    _resize(tmpfs, "rw")
    assert main(_args(served, out)) == 0
    _assert_same_files(out, reference[0])


def test_a_read_only_output_folder_is_a_clear_error_on_any_machine(
    served, reference, tmp_path, capsys, monkeypatch
):
    """The test above on machines that cannot mount a tmpfs: the kernel's EROFS injected at
    the OS boundary (tests/os_faults.py) for everything under the "disk" folder."""
    disk = tmp_path / "disk"
    disk.mkdir()
    out = disk / "job"
    shutil.copytree(reference[0], out)  # a finished job ...
    (out / "shard-00004.npz").unlink()  # ... that lost a shard, on a read-only disk
    read_only_folder(monkeypatch, disk, errno.EROFS)
    assert main(_args(served, out)) == 1
    _one_clear_line(capsys.readouterr().err, f"--out {out}", "Read-only file system")
    assert main(_args(served, disk / "new")) == 2
    _one_clear_line(capsys.readouterr().err, f"--out: cannot create {disk / 'new'}")
    monkeypatch.undo()  # the disk is writable again
    assert main(_args(served, out)) == 0
    _assert_same_files(out, reference[0])


@pytest.mark.parametrize("where", ["file", "under-a-file"])
def test_an_output_path_that_is_not_a_folder_is_a_clear_error(served, tmp_path, capsys, where):
    (tmp_path / "taken").write_text("mine")
    out = tmp_path / "taken" if where == "file" else tmp_path / "taken" / "job"
    assert main(_args(served, out)) == 2
    _one_clear_line(capsys.readouterr().err, "--out")
    assert (tmp_path / "taken").read_text() == "mine"


def test_a_local_repository_that_is_a_file_is_a_clear_error(tmp_path, capsys):
    (tmp_path / "models").write_text("not a folder")
    args = ["--local", str(tmp_path / "models"), "--model", CVAE, "--out", str(tmp_path / "job")]
    assert main([*args, *JOB]) == 2
    _one_clear_line(capsys.readouterr().err, "--local: model repository", "is not a folder")
    assert not (tmp_path / "job").exists()
