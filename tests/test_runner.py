"""OnnxRunner: provider choice for auto/cpu/cuda, and running a graph.

No GPU exists here, so which providers onnxruntime offers is the one thing faked
(``onnxruntime.get_available_providers``); the sessions are real.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from vaeserve.engine.runner import (
    CPU_PROVIDER,
    CUDA_PROVIDER,
    OnnxRunner,
    ProviderUnavailable,
    select_providers,
)

CPU_ONLY = ["AzureExecutionProvider", CPU_PROVIDER]
WITH_CUDA = [CUDA_PROVIDER, CPU_PROVIDER]


@pytest.fixture
def offered(monkeypatch):
    """Set which providers onnxruntime claims to have."""

    def offer(providers):
        monkeypatch.setattr(ort, "get_available_providers", lambda: list(providers))

    return offer


@pytest.fixture(scope="module")
def double_graph(tmp_path_factory):
    """y = 2x, x float32 [batch, 3]."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3])
    two = helper.make_tensor("two", TensorProto.FLOAT, [], [2.0])
    graph = helper.make_graph(
        [helper.make_node("Mul", ["x", "two"], ["y"])], "double", [x], [y], [two]
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path = tmp_path_factory.mktemp("graph") / "double.onnx"
    onnx.save(model, path)
    return path


@pytest.mark.parametrize(
    "device, providers, expected",
    [
        pytest.param("cpu", WITH_CUDA, [CPU_PROVIDER], id="cpu-even-with-cuda"),
        pytest.param("cuda", WITH_CUDA, [CUDA_PROVIDER, CPU_PROVIDER], id="cuda"),
        pytest.param("auto", WITH_CUDA, [CUDA_PROVIDER, CPU_PROVIDER], id="auto-picks-cuda"),
        pytest.param("auto", CPU_ONLY, [CPU_PROVIDER], id="auto-falls-back-to-cpu"),
    ],
)
def test_provider_selection(offered, device, providers, expected):
    offered(providers)
    assert select_providers(device) == expected


def test_cuda_fails_at_start_when_not_available(offered):
    offered(CPU_ONLY)
    with pytest.raises(ProviderUnavailable, match="device 'cuda'.*onnxruntime-gpu"):
        select_providers("cuda")


def test_auto_logs_what_it_chose(offered, caplog):
    offered(CPU_ONLY)
    with caplog.at_level(logging.INFO, logger="vaeserve.engine.runner"):
        select_providers("auto")
    assert f"device auto: using {CPU_PROVIDER}" in caplog.text


def test_unknown_device_is_refused():
    with pytest.raises(ValueError, match="device"):
        select_providers("tpu")


def test_a_session_that_silently_falls_back_to_cpu_is_refused(offered, double_graph):
    # The CPU wheel has no CUDA provider: asked for it anyway, onnxruntime warns and runs on
    # the CPU. The runner must turn that into an error, never serve on the wrong device.
    if CUDA_PROVIDER in ort.get_available_providers():
        pytest.skip("this onnxruntime has a working CUDA provider")
    offered(WITH_CUDA)
    with pytest.warns(UserWarning, match="CUDAExecutionProvider"):
        with pytest.raises(ProviderUnavailable, match="fell back to CPUExecutionProvider"):
            OnnxRunner(double_graph, select_providers("cuda"))


def test_auto_falls_back_to_cpu_when_cuda_is_offered_but_fails(offered, double_graph, caplog):
    # onnxruntime-gpu on a host without a usable GPU still lists CUDA: `auto` must then serve
    # on the CPU (and say so), where `cuda` refuses to start (test above).
    if CUDA_PROVIDER in ort.get_available_providers():
        pytest.skip("this onnxruntime has a working CUDA provider")
    offered(WITH_CUDA)
    with caplog.at_level(logging.WARNING, logger="vaeserve.engine.runner"):
        with pytest.warns(UserWarning, match="CUDAExecutionProvider"):
            runner = OnnxRunner(double_graph, select_providers("auto"), allow_fallback=True)
    assert runner.provider == CPU_PROVIDER
    assert "device auto uses CPUExecutionProvider" in caplog.text
    x = np.ones((2, 3), np.float32)
    np.testing.assert_array_equal(runner.run({"x": x})["y"], 2 * x)


@pytest.mark.parametrize("intra, inter", [(0, 0), (1, 1)])
def test_runner_runs_the_graph_and_reports_its_signature(double_graph, intra, inter):
    runner = OnnxRunner(double_graph, [CPU_PROVIDER], intra, inter)
    assert runner.provider == CPU_PROVIDER
    inputs, outputs = runner.signature()
    assert inputs == [("x", "tensor(float)", ["batch", 3])]
    assert outputs == [("y", "tensor(float)", ["batch", 3])]
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    x.setflags(write=False)  # request bytes arrive as read-only views
    np.testing.assert_array_equal(runner.run({"x": x})["y"], 2 * x)


@pytest.mark.parametrize("intra, separate", [(0, True), (2, True), (1, False)])
def test_small_batches_run_on_a_single_threaded_session_with_the_same_results(
    double_graph, intra, separate
):
    runner = OnnxRunner(double_graph, [CPU_PROVIDER], intra)
    serial = runner._serial_session
    assert (serial is not runner._session) == separate
    assert serial.get_session_options().intra_op_num_threads == 1
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    np.testing.assert_array_equal(runner.run_small({"x": x})["y"], runner.run({"x": x})["y"])


@pytest.mark.gpu
def test_cuda_session_runs_on_the_gpu(double_graph):
    if CUDA_PROVIDER not in ort.get_available_providers():
        pytest.skip("needs onnxruntime-gpu and a CUDA device")
    runner = OnnxRunner(double_graph, select_providers("cuda"))
    assert runner.provider == CUDA_PROVIDER
    x = np.ones((4, 3), dtype=np.float32)
    np.testing.assert_array_equal(runner.run({"x": x})["y"], 2 * x)
