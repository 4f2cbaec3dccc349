"""vae-score: shards equal Engine/VaeClient.score, kill/resume byte-identity, summary, AUROC."""

from __future__ import annotations

import filecmp
import json
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from client_fixtures import CVAE, VAE, serve, tiny_repository

from vaeserve.client import VaeClient
from vaeserve.client.score_data import load_score_data
from vaeserve.client.score_job import main
from vaeserve.client.score_summary import auroc, average_ranks
from vaeserve.client.scorers import LocalScorer
from vaeserve.engine import Engine

N = 130
JOB = ["--k", "4", "--seed", "7", "--shard-size", "40", "--batch", "16", "--log-level", "ERROR"]
# vae-score that SIGKILLs itself at a shard point: argv[1] is "written:K" or "recorded:K".
_KILLED = """
import os, signal, sys
from vaeserve.client.score_job import ScoreEvents, main
point, _, shard = sys.argv[1].partition(":")
def die(i):
    if i == int(shard):
        os.kill(os.getpid(), signal.SIGKILL)
sys.exit(main(sys.argv[2:], events=ScoreEvents(**{"shard_" + point: die})))
"""


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    return tiny_repository(tmp_path_factory)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """uint8 (N, 8, 8) images with labels 0..9, as a user's .npz would hold them."""
    rng = np.random.default_rng(0)
    path = tmp_path_factory.mktemp("data") / "digits.npz"
    x = rng.integers(0, 256, size=(N, 8, 8), dtype=np.uint8)
    np.savez(path, x=x, y=rng.integers(0, 10, size=N))
    return path


def _args(repo: Path, data: Path, out: Path, *extra: str, model: str = CVAE) -> list[str]:
    return ["--local", str(repo), "--model", model, "--data", f"npz:{data}", "--out", str(out)]


def _columns(out: Path) -> dict[str, np.ndarray]:
    shards = sorted(out.glob("shard-*.npz"))
    loaded = [dict(np.load(p)) for p in shards]
    return {key: np.concatenate([s[key] for s in loaded]) for key in loaded[0]}


@pytest.fixture(scope="module")
def reference(repo, data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("reference") / "job"
    assert main([*_args(repo, data, out), *JOB, "--anomaly-class", "3"]) == 0
    return out


def test_scores_equal_engine_score_for_the_same_rows_and_seed(repo, data, reference):
    got = _columns(reference)
    with np.load(data) as f:
        x, y = f["x"].astype(np.float32)[:, None] / 255.0, f["y"]
    engine = Engine.open(repo, CVAE)
    want = engine.score(x, labels=y, k=4, seed=7, start=0)
    for name in ("elbo", "log_px", "log_likelihood", "kl"):  # the same engine: the same bytes
        np.testing.assert_array_equal(got[name], getattr(want, name))
    np.testing.assert_array_equal(got["index"], np.arange(N))
    np.testing.assert_array_equal(got["row"], np.arange(N))
    np.testing.assert_array_equal(got["y"], y)
    # Any row range scored alone (its start_index) gives that row's numbers.
    part = engine.score(x[50:57], labels=y[50:57], k=4, seed=7, start=50)
    np.testing.assert_array_equal(got["log_px"][50:57], part.log_px)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    yield from serve(tmp_path_factory)


def test_served_job_equals_vaeclient_score(served, data, tmp_path):
    out = tmp_path / "served"
    args = ["--server", served.address, "--model", VAE, "--data", f"npz:{data}"]
    assert main([*args, "--out", str(out), *JOB]) == 0
    got = _columns(out)
    with np.load(data) as f:
        x = f["x"].astype(np.float32)[:, None] / 255.0
    client = VaeClient(served.address)
    try:
        want = client.score(VAE, x, k=4, seed=7)
    finally:
        client.close()
    assert "y" in got  # the labels travel with a VAE's scores too (not to the model)
    for name in ("elbo", "log_px", "log_likelihood", "kl"):
        np.testing.assert_allclose(got[name], getattr(want, name), rtol=0, atol=1e-9)


def _same_files(actual: Path, expected: Path) -> None:
    names = sorted(p.name for p in expected.iterdir() if p.is_file())
    assert sorted(p.name for p in actual.iterdir() if p.is_file()) == names
    _, mismatch, errors = filecmp.cmpfiles(expected, actual, names, shallow=False)
    assert not mismatch and not errors, f"differ: {mismatch + errors}"


def test_killed_job_resumes_to_identical_files(repo, data, reference, tmp_path):
    out = tmp_path / "job"
    args = [*_args(repo, data, out), *JOB, "--anomaly-class", "3"]
    for point in ("recorded:1", "written:2"):
        run = [sys.executable, "-c", _KILLED, point, *args]
        result = subprocess.run(run, capture_output=True, text=True, timeout=60)
        assert result.returncode == -signal.SIGKILL, result.stderr
        assert not (out / "summary.json").exists()
    job = json.loads((out / "job.json").read_text())
    assert sorted(job["shards"]) == ["0", "1"] and not job["complete"]
    assert main(args) == 0
    _same_files(out, reference)
    # Deleting the last shard and its record, then re-running, ends the same too.
    job = json.loads((out / "job.json").read_text())
    del job["shards"]["3"]
    job["complete"] = False
    (out / "job.json").write_text(json.dumps(job))
    (out / "shard-00003.npz").unlink()
    assert main(args) == 0
    _same_files(out, reference)


def test_summary_matches_numpy_on_the_concatenated_shards(reference):
    summary = json.loads((reference / "summary.json").read_text())
    columns = _columns(reference)
    assert summary["count"] == N
    for name in ("log_px", "elbo"):
        values = columns[name]
        assert summary[name]["mean"] == pytest.approx(values.mean(), rel=1e-12)
        assert summary[name]["std"] == pytest.approx(values.std(), rel=1e-12)
        percents = [1, 5, 25, 50, 75, 95, 99]
        qs = np.quantile(values, [p / 100 for p in percents])
        assert [summary[name]["quantiles"][f"{p}%"] for p in percents] == qs.tolist()
    anomaly = summary["anomaly"]
    assert anomaly["auroc"] == auroc(-columns["log_px"], columns["y"] == 3)
    assert anomaly["positives"] == int((columns["y"] == 3).sum())


def test_auroc_by_hand_with_ties():
    np.testing.assert_array_equal(average_ranks(np.array([3.0, 1.0, 3.0, 2.0])), [3.5, 1, 3.5, 2])
    # Pairs (positive, negative): (0.4, 0.1) 1, (0.4, 0.4) ½, (0.8, 0.1) 1, (0.8, 0.4) 1.
    scores = np.array([0.1, 0.4, 0.4, 0.8])
    assert auroc(scores, np.array([False, True, False, True])) == 3.5 / 4
    assert auroc(np.ones(5), np.array([1, 0, 1, 0, 0], bool)) == 0.5
    assert auroc(-scores, np.array([False, True, False, True])) == 0.5 / 4
    with pytest.raises(ValueError):
        auroc(scores, np.zeros(4, bool))


def test_split_test_is_vae_trains_test_split(repo, data):
    from vaeserve.training.data import load_dataset

    info = LocalScorer(repo, CVAE, 0).info
    for split in ("test", "train", "val"):
        ours = load_score_data(f"npz:{data}", split, info)
        theirs = getattr(load_dataset(f"npz:{data}"), split)
        np.testing.assert_array_equal(ours.x, theirs.x)
        np.testing.assert_array_equal(ours.y, theirs.y)


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("missing", "does not exist"),
        ("shape", "images have shape (1, 7, 7), but tiny-cvae:1 takes (1, 8, 8)"),
        ("k0", "--k: expected an integer >= 1, got 0"),
        ("range", "outside tiny-cvae's value_range [0, 1]"),
        ("nolabels", "holds no labels"),
        ("digits", "needs scikit-learn"),
    ],
)
def test_bad_inputs_give_one_clear_line_and_exit_2(repo, data, tmp_path, capsys, case, message):
    spec = f"npz:{data}"
    k = "4"
    if case == "missing":
        spec = f"npz:{tmp_path / 'nope.npz'}"
    elif case == "shape":
        np.savez(tmp_path / "d.npz", x=np.zeros((5, 7, 7), np.uint8), y=np.zeros(5, int))
        spec = f"npz:{tmp_path / 'd.npz'}"
    elif case == "range":
        np.savez(tmp_path / "d.npz", x=np.full((5, 8, 8), 2.0, np.float32), y=np.zeros(5, int))
        spec = f"npz:{tmp_path / 'd.npz'}"
    elif case == "nolabels":
        np.savez(tmp_path / "d.npz", x=np.zeros((5, 8, 8), np.uint8))
        spec = f"npz:{tmp_path / 'd.npz'}"
    elif case == "digits":
        spec = "digits"
    elif case == "k0":
        k = "0"
    out = tmp_path / "out"
    args = ["--local", str(repo), "--model", CVAE, "--data", spec, "--out", str(out), "--k", k]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("vae-score: error: "), err
    assert message in err
    assert not out.exists()


def test_a_resume_with_other_parameters_is_refused(repo, data, reference, tmp_path, capsys):
    out = tmp_path / "job"
    assert main([*_args(repo, data, out), *JOB]) == 0
    changed = [*JOB[:-2], "--log-level", "ERROR"]
    changed[1] = "8"
    assert main([*_args(repo, data, out), *changed]) == 2
    assert "k 4 (now 8)" in capsys.readouterr().err
