"""A learned mixture prior from training to serving: exported to prior.npz, named and
checksummed by the manifest (format 2), gated for parity, sampled and scored by the engine.

The sampling contract of the mixture (component stream, rows a function of (seed, index)) is
checked against the independent oracle in test_sampling_contract.py; the served Score against
training.losses in test_score.py ("vae-vamp").
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from export_fixtures import save_tiny_checkpoint, tiny_config

from vaeserve.engine import Engine, sampling
from vaeserve.errors import ManifestError
from vaeserve.export.onnx_export import export_checkpoint
from vaeserve.export.parity import ParityError, check_prior_parity
from vaeserve.manifest import MANIFEST_FILE, PRIOR_FILE, load_version_manifest, read_manifest
from vaeserve.training.checkpoint import load_model
from vaeserve.training.config import TrainConfig
from vaeserve.training.train import train


@pytest.fixture(scope="module")
def vamp(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """(torch model, export result) of a tiny VampPrior VAE with random weights."""
    root = tmp_path_factory.mktemp("vamp")
    config = tiny_config(latent_dim=3, prior="vamp", prior_components=6)
    checkpoint = save_tiny_checkpoint(root / "checkpoint.pt", config)
    result = export_checkpoint(checkpoint, root / "repo", "vamp")
    model, _ = load_model(checkpoint)
    return model, result


def test_the_version_holds_the_models_mixture(vamp: Any) -> None:
    model, result = vamp
    manifest, folder = result.manifest, result.version_dir
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        ["encoder.onnx", "decoder.onnx", MANIFEST_FILE, PRIOR_FILE]
    )
    raw = json.loads((folder / MANIFEST_FILE).read_text())
    assert raw["format_version"] == 2
    assert raw["prior"]["kind"] == "gaussian-mixture" and raw["prior"]["components"] == 6
    assert load_version_manifest(folder) == manifest
    with torch.no_grad():
        means, logvars, log_weights = model.prior_components()
    with np.load(folder / PRIOR_FILE) as prior:
        np.testing.assert_array_equal(prior["means"], means.numpy())
        np.testing.assert_array_equal(prior["logvars"], logvars.numpy())
        np.testing.assert_allclose(prior["weights"], np.full(6, 1 / 6), rtol=1e-12)
    gate = manifest.parity["prior"]
    assert 0 <= gate["max_abs"] < 1e-4
    assert "mixture prior" in manifest.parity["inputs"]


def test_a_standard_normal_version_is_written_as_before(tmp_path: Path) -> None:
    checkpoint = save_tiny_checkpoint(tmp_path / "checkpoint.pt", tiny_config())
    result = export_checkpoint(checkpoint, tmp_path / "repo", "plain")
    raw = json.loads((result.version_dir / MANIFEST_FILE).read_text())
    assert raw["format_version"] == 1 and "prior" not in raw
    assert not (result.version_dir / PRIOR_FILE).exists()
    assert Engine.open(tmp_path / "repo", "plain").prior_mixture is None


def test_the_engine_samples_the_torch_models_prior(vamp: Any) -> None:
    model, result = vamp
    engine = Engine.open(result.version_dir.parent.parent, "vamp")
    mixture = engine.prior_mixture
    n = 30_000
    picked = mixture.choose(seed=11, start=0, count=n)
    counts = np.bincount(picked, minlength=6)
    chi2 = float((((counts - n / 6) ** 2) / (n / 6)).sum())
    assert chi2 < 25.0, counts  # 5 degrees of freedom: p < 1e-4 for a fair draw
    z = sampling.prior_latents(3, 11, 0, n, mixture=mixture)
    with torch.no_grad():
        reference = model.sample_latent(n, generator=torch.Generator().manual_seed(0)).numpy()
        means, logvars, _ = model.prior_components()
    # Per component, the standardised draws are N(0, I): the engine's noise is scaled by σ_c.
    standardised = (z - means.numpy()[picked]) / np.exp(0.5 * logvars.numpy()[picked])
    np.testing.assert_allclose(standardised.mean(0), 0.0, atol=0.04)
    np.testing.assert_allclose(standardised.std(0), 1.0, atol=0.03)
    # And the two samplers agree in distribution (means and quantiles of each coordinate).
    spread = reference.std(0)
    np.testing.assert_allclose(z.mean(0), reference.mean(0), atol=0.05 * spread.max())
    for q in (0.1, 0.5, 0.9):
        np.testing.assert_allclose(
            np.quantile(z, q, axis=0), np.quantile(reference, q, axis=0), atol=0.06 * spread.max()
        )


def test_engine_samples_are_a_function_of_seed_and_index(vamp: Any) -> None:
    _, result = vamp
    engine = Engine.open(result.version_dir.parent.parent, "vamp")
    whole = engine.sample(12, seed=2**63 + 9)
    again = engine.sample(12, seed=2**63 + 9)
    part = engine.sample(5, seed=2**63 + 9, start=7)
    np.testing.assert_array_equal(whole.z, again.z)
    np.testing.assert_array_equal(whole.x, again.x)
    np.testing.assert_array_equal(whole.z[7:], part.z)
    np.testing.assert_array_equal(whole.x[7:], part.x)
    assert not np.array_equal(engine.sample(12, seed=1).z, whole.z)


def test_the_gate_fails_a_prior_that_differs_from_the_models(vamp: Any) -> None:
    model, result = vamp
    mixture = Engine.open(result.version_dir.parent.parent, "vamp").prior_mixture
    assert check_prior_parity(model, mixture)["max_abs"] < 1e-4
    shifted = sampling.MixturePrior(mixture.means + 0.01, mixture.logvars, mixture.weights)
    with pytest.raises(ParityError, match="prior"):
        check_prior_parity(model, shifted)


def _copy(folder: Path, tmp_path: Path) -> Path:
    target = tmp_path / "vamp" / "1"
    target.mkdir(parents=True)
    for path in folder.iterdir():
        (target / path.name).write_bytes(path.read_bytes())
    return target


def test_a_changed_prior_file_is_refused(vamp: Any, tmp_path: Path) -> None:
    folder = _copy(vamp[1].version_dir, tmp_path)
    with np.load(folder / PRIOR_FILE) as prior:
        arrays = dict(prior)
    arrays["means"] = arrays["means"] + 1.0
    np.savez(folder / PRIOR_FILE, **arrays)
    with pytest.raises(ManifestError, match=r"prior\.npz: sha256 .* field 'prior\.sha256'"):
        load_version_manifest(folder)
    (folder / PRIOR_FILE).unlink()
    with pytest.raises(ManifestError, match=r"prior\.npz: prior file is missing"):
        load_version_manifest(folder)


def _rewrite(folder: Path, change) -> None:
    raw = json.loads((folder / MANIFEST_FILE).read_text())
    change(raw)
    (folder / MANIFEST_FILE).write_text(json.dumps(raw))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda m: m.update(format_version=1), "format_version"),
        (lambda m: m.pop("prior"), "format_version"),
        (lambda m: m["prior"].update(kind="flow"), r"'prior'\.kind"),
        (lambda m: m["prior"].update(file="../prior.npz"), r"'prior'\.file"),
        (lambda m: m["prior"].update(components=0), r"'prior'\.components"),
        (lambda m: m["prior"].update(sha256="abc"), r"'prior'\.sha256"),
    ],
)
def test_a_malformed_prior_field_is_refused(vamp: Any, tmp_path: Path, change, message) -> None:
    folder = _copy(vamp[1].version_dir, tmp_path)
    _rewrite(folder, change)
    with pytest.raises(ManifestError, match=message):
        read_manifest(folder / MANIFEST_FILE)


def test_a_prior_file_that_disagrees_with_the_manifest_is_refused(
    vamp: Any, tmp_path: Path
) -> None:
    folder = _copy(vamp[1].version_dir, tmp_path)
    _rewrite(folder, lambda m: m["prior"].update(components=5))
    with pytest.raises(ManifestError, match=r"array 'means' is float32\[6, 3\], expected"):
        Engine.open(tmp_path, "vamp")


def test_a_mixture_prior_on_a_cvae_is_refused(vamp: Any) -> None:
    raw = vamp[1].manifest.to_dict()
    raw.update(kind="cvae", conditioning="prior", num_classes=2, class_names=["a", "b"])
    raw["prior_means"] = [[0.0, 0.0, 0.0]] * 2
    with pytest.raises(ManifestError, match="'prior'"):
        type(vamp[1].manifest).from_dict(raw)


def test_a_vamp_model_trains_exports_and_scores(tmp_path: Path) -> None:
    # Seconds: a narrow net, a few epochs; what matters is that the path holds end to end.
    config = TrainConfig(
        prior="vamp",
        prior_components=8,
        latent_dim=2,
        hidden_dims=(32,),
        epochs=3,
        kl_warmup_epochs=1,
        train_k=2,
        eval_k=8,
        num_threads=1,
    )
    metrics = train(config, tmp_path / "run", progress=False)
    assert math.isfinite(metrics["test_nll_nats"]) and metrics["test_kl_nats"] > 0
    result = export_checkpoint(tmp_path / "run" / "checkpoint.pt", tmp_path / "repo", "digits")
    assert result.manifest.prior is not None
    engine = Engine.open(tmp_path / "repo", "digits")
    x = np.zeros((2, 1, 8, 8), np.float32)
    scores = engine.score(x, k=4, seed=3)
    assert np.all(np.isfinite(scores.log_px)) and np.all(np.isfinite(scores.kl))
    assert dataclasses.is_dataclass(scores)
