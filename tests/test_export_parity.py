"""Parity of the exported graphs with PyTorch, per model variant, and the gate's teeth.

Each variant is exported once (tiny random-weight model, see export_fixtures.py) and then
checked independently of the gate: onnxruntime against the PyTorch model at batch 1 and 256.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from export_fixtures import digits_info, save_tiny_checkpoint, tiny_config

from vaeserve.export.graphs import GRAPH_FILES, RANDOM_OPS, graph_modules
from vaeserve.export.onnx_export import export_checkpoint
from vaeserve.export.parity import (
    TOLERANCES,
    ParityError,
    Tolerance,
    build_cases,
    check_parity,
    compare,
    reference_data,
)
from vaeserve.manifest import MANIFEST_FILE, load_version_manifest
from vaeserve.training.checkpoint import load_model

VARIANTS = {
    "vae-mlp-bernoulli": ({}, False),
    "vae-mlp-gaussian": ({"likelihood": "gaussian", "gaussian_sigma": 0.2}, False),
    "vae-conv-gaussian-learned": ({"arch": "conv", "likelihood": "gaussian-learned"}, False),
    "concat-mlp-bernoulli": ({"kind": "cvae", "conditioning": "concat"}, False),
    "concat-conv-gaussian": (
        {"kind": "cvae", "conditioning": "concat", "arch": "conv", "likelihood": "gaussian"},
        False,
    ),
    "prior-mlp-gaussian-learned": (
        {"kind": "cvae", "conditioning": "prior", "likelihood": "gaussian-learned"},
        False,
    ),
    "prior-conv-bernoulli": ({"kind": "cvae", "conditioning": "prior", "arch": "conv"}, False),
    "vae-conv-bernoulli-fp16": ({"arch": "conv"}, True),
    "concat-mlp-gaussian-learned-fp16": (
        {"kind": "cvae", "conditioning": "concat", "likelihood": "gaussian-learned"},
        True,
    ),
}


@pytest.fixture(scope="module", params=list(VARIANTS))
def published(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Any:
    """(model, manifest, version folder, fp16) of one variant, exported once per module."""
    overrides, fp16 = VARIANTS[request.param]
    root = tmp_path_factory.mktemp(request.param)
    checkpoint = save_tiny_checkpoint(root / "checkpoint.pt", tiny_config(**overrides))
    result = export_checkpoint(checkpoint, root / "repo", "tiny", fp16=fp16)
    model, _ = load_model(checkpoint)
    return model, result.manifest, result.version_dir, fp16


def _session(path: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("batch", [1, 256])
def test_onnxruntime_matches_torch(published: Any, batch: int) -> None:
    model, manifest, version_dir, fp16 = published
    tol = TOLERANCES["fp16" if fp16 else "fp32"]
    x, y, _ = reference_data(digits_info())
    rows = np.arange(batch) % len(x)
    x, y = x[rows], y[rows]
    rng = np.random.default_rng(batch)
    z = rng.standard_normal((batch, manifest.latent_dim)).astype(np.float32)
    if manifest.prior_means is not None:
        z += np.asarray(manifest.prior_means, dtype=np.float32)[y]  # z ~ N(μ_y, I)
    with torch.no_grad():
        label = torch.from_numpy(y) if manifest.encoder_takes_label else None
        mu, logvar = model.encode(torch.from_numpy(x), label)
        params = model.decode(torch.from_numpy(z), label)
    encoder_feed = {"x": x, "y": y} if manifest.encoder_takes_label else {"x": x}
    decoder_feed = {"z": z, "y": y} if manifest.decoder_takes_label else {"z": z}
    got_mu, got_logvar = _session(version_dir / "encoder.onnx").run(["mu", "logvar"], encoder_feed)
    decoder = _session(version_dir / "decoder.onnx")
    names = list(manifest.decoder.outputs)
    got = dict(zip(names, decoder.run(names, decoder_feed), strict=True))
    assert set(got) == set(params)
    pairs = [(got_mu, mu), (got_logvar, logvar)] + [(got[n], params[n]) for n in params]
    for actual, expected in pairs:
        assert actual.shape == tuple(expected.shape)
        np.testing.assert_allclose(actual, expected.numpy(), rtol=tol.rtol, atol=tol.atol)


def test_manifest_describes_the_version(published: Any) -> None:
    model, manifest, version_dir, fp16 = published
    config = model.config
    assert load_version_manifest(version_dir) == manifest
    assert (manifest.kind, manifest.conditioning, manifest.likelihood) == (
        config.kind,
        config.conditioning,
        config.likelihood,
    )
    assert manifest.sample_shape == config.data_shape and manifest.latent_dim == 2
    assert manifest.class_names == (tuple("0123456789") if config.kind == "cvae" else ())
    if config.conditioning == "prior":
        np.testing.assert_array_equal(manifest.prior_means, model.prior_means.detach().numpy())
    assert manifest.source["precision"] == ("fp16" if fp16 else "fp32")
    assert manifest.producers["torch"] == torch.__version__
    assert manifest.training_metrics == {"test_elbo_nats": -31.5, "test_nll_iwae_nats": 30.25}
    parity = manifest.parity
    assert parity["batch_sizes"] == [1, 7, 256]
    assert 0 <= parity["max_abs"] <= parity["tolerance"]["atol"]
    assert set(parity["results"]["CPUExecutionProvider"]) == {"encoder", "decoder"}


def test_graphs_are_self_contained_dynamic_and_deterministic(published: Any) -> None:
    _, manifest, version_dir, _ = published
    assert sorted(p.name for p in version_dir.iterdir()) == sorted(
        [*GRAPH_FILES.values(), MANIFEST_FILE]
    )
    assert [p.name for p in version_dir.parent.iterdir()] == ["1"]  # no staging folder left
    for file in GRAPH_FILES.values():
        proto = onnx.load(str(version_dir / file), load_external_data=False)
        onnx.checker.check_model(proto, full_check=True)
        assert {i.domain or "ai.onnx": i.version for i in proto.opset_import}["ai.onnx"] == 20
        assert not {n.op_type for n in proto.graph.node} & RANDOM_OPS
        for value in [*proto.graph.input, *proto.graph.output]:
            batch = value.type.tensor_type.shape.dim[0]
            assert batch.dim_param and not batch.HasField("dim_value"), value.name
    session = _session(version_dir / "decoder.onnx")
    feed = {"z": np.random.default_rng(0).standard_normal((5, 2), dtype=np.float32)}
    if manifest.decoder_takes_label:
        feed["y"] = np.arange(5, dtype=np.int64)
    first, second = session.run(None, feed), session.run(None, feed)  # no random ops: equal
    for a, b in zip(first, second, strict=True):
        np.testing.assert_array_equal(a, b)


# --- the gate itself -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def vae(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """A published tiny VAE and the gate's cases for it."""
    root = tmp_path_factory.mktemp("gate")
    checkpoint = save_tiny_checkpoint(root / "checkpoint.pt", tiny_config())
    version_dir = export_checkpoint(checkpoint, root / "repo", "tiny").version_dir
    model, ckpt = load_model(checkpoint)
    modules = graph_modules(model, fp16=False)
    io = {g: (m.input_names, m.output_names) for g, m in modules.items()}
    x, y, _ = reference_data(ckpt.data_info)
    cases = build_cases(modules["encoder"], modules["decoder"], io, (x, y), 2, None)
    return version_dir, cases


def _tampered_copy(version_dir: Path, tmp_path: Path, initializer: str, delta: float) -> dict:
    """The VAE's graphs with ``delta`` added to every value of one encoder initializer."""
    graphs = {g: tmp_path / f for g, f in GRAPH_FILES.items()}
    for g, f in GRAPH_FILES.items():
        shutil.copy(version_dir / f, graphs[g])
    proto = onnx.load(str(graphs["encoder"]))
    (tensor,) = [t for t in proto.graph.initializer if t.name == initializer]
    values = onnx.numpy_helper.to_array(tensor) + np.float32(delta)
    tensor.CopyFrom(onnx.numpy_helper.from_array(values.astype(np.float32), initializer))
    onnx.save(proto, str(graphs["encoder"]))
    return graphs


def test_gate_passes_the_published_graphs(vae: Any) -> None:
    version_dir, cases = vae
    graphs = {g: version_dir / f for g, f in GRAPH_FILES.items()}
    results = check_parity(graphs, cases, TOLERANCES["fp32"])
    assert results["CPUExecutionProvider"]["encoder"]["mu"]["max_abs"] < 1e-5


def test_gate_fails_on_a_tampered_weight(vae: Any, tmp_path: Path) -> None:
    version_dir, cases = vae
    graphs = _tampered_copy(version_dir, tmp_path, "model.to_mu.bias", 0.01)
    with pytest.raises(ParityError) as info:
        check_parity(graphs, cases, TOLERANCES["fp32"])
    message = str(info.value)
    assert "encoder output 'mu' at batch" in message and "CPUExecutionProvider" in message
    assert "|Δ| 0.01" in message and "x the bound" in message


def test_gate_ignores_a_change_within_tolerance(vae: Any, tmp_path: Path) -> None:
    version_dir, cases = vae
    graphs = _tampered_copy(version_dir, tmp_path, "model.to_mu.bias", 1e-6)
    check_parity(graphs, cases, TOLERANCES["fp32"])


def test_gate_reports_an_unloadable_graph(vae: Any, tmp_path: Path) -> None:
    version_dir, cases = vae
    graphs = _tampered_copy(version_dir, tmp_path, "model.to_mu.bias", 0.0)
    graphs["decoder"].write_bytes(b"not an onnx graph")
    with pytest.raises(ParityError, match="onnxruntime cannot load decoder.onnx"):
        check_parity(graphs, cases, TOLERANCES["fp32"])


@pytest.mark.parametrize(
    ("actual", "expected", "ok"),
    [
        pytest.param([1.0, 2.0], [1.0, 2.0], True, id="equal"),
        pytest.param([1.0, np.nan], [1.0, np.nan], True, id="nan-both"),
        pytest.param([1.0, np.nan], [1.0, 2.0], False, id="nan-one-side"),
        pytest.param([1.0, 2.0 + 2.9e-3], [1.0, 2.0], True, id="within-rtol"),
        pytest.param([1.0, 2.0 + 3.1e-3], [1.0, 2.0], False, id="over-rtol"),
        pytest.param([1.0], [1.0, 2.0], False, id="shape"),
    ],
)
def test_compare(actual: list[float], expected: list[float], ok: bool) -> None:
    result = compare(np.array(actual), np.array(expected), Tolerance(atol=1e-3, rtol=1e-3))
    assert result["ok"] is ok, result
