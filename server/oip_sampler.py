"""NAME-sampler: the typed API's ``Sample`` through the Open Inference Protocol.

A request names the samples it wants by their index in the seed's sequence: input ``index``
(INT64, [n], any order, repeats allowed) and, for a CVAE, ``y`` (INT64, [n]: each sample's
class); request parameters ``seed`` (absent: the server picks one and answers it as response
parameter ``seed``), ``temperature`` and ``output`` ("mean" or "draw"). The outputs are the
typed ``SampleResponse``'s tensors under its names: ``samples`` (FP32, [n, *sample_shape]),
``latents`` (FP32, [n, latent_dim]) and, for a CVAE, ``labels`` (INT64, [n]); which of them
come back is the request's ``outputs`` list (all when empty), as for every protocol model, so
the typed ``return_latents`` has no parameter of its own. The typed ``encoding`` has none
either: the protocol declares one datatype per output, so samples are always FP32.

Row k of the answer has the bytes of the typed ``Sample(seed, start_index=index[k],
num_samples=1, label=y[k], ...)``: the indices are sorted, cut into runs of consecutive
indices, and each run is ``pipeline.sample`` of a contiguous ``SampleJob``, so whatever prior
the model has is drawn as the typed path draws it. The decoder rows of all runs of a request
go to the decoder's batcher as one call (``_SharedDecoder``), where they batch with other
requests' rows.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from vaeserve.engine import pipeline, sampling
from vaeserve.engine.checks import check_labels
from vaeserve.errors import InvalidRequest
from vaeserve.manifest import ModelManifest, TensorSpec
from vaeserve.proto.inference import grpc_service_pb2 as pb
from vaeserve.server import oip_convert as convert
from vaeserve.server.batcher import DynamicBatcher
from vaeserve.server.protocol_models import SERVER_PLATFORM, Answer
from vaeserve.server.repository import LoadedModel
from vaeserve.server.settings import ServerSettings
from vaeserve.server.validation import MAX_TEMPERATURE

__all__ = ["SamplerKind", "SamplerRequest", "sampler_inputs", "sampler_outputs", "sampler_request"]

_INDEX = TensorSpec("int64", (-1,))
_OUTPUT_KINDS = ("mean", "draw")
# Runs started per turn of the event loop: each costs ~100 µs of numpy and task on the loop,
# so 1024 scattered indices started at once held it ~100 ms (no health check, no other
# call's bytes); 32 at a time hold it ~3 ms.
_RUNS_PER_TURN = 32
_NUMBERS = ("double_param", "int64_param", "uint64_param", "string_param")


def sampler_inputs(m: ModelManifest) -> dict[str, TensorSpec]:
    """NAME-sampler's inputs: index and, for a CVAE, y (INT64, one per sample each)."""
    inputs = {"index": _INDEX}
    if m.kind == "cvae":
        inputs["y"] = _INDEX
    return inputs


def sampler_outputs(m: ModelManifest) -> dict[str, TensorSpec]:
    """NAME-sampler's outputs, named as the typed ``SampleResponse``'s tensors."""
    outputs = {
        "samples": TensorSpec("float32", (-1, *m.sample_shape)),
        "latents": TensorSpec("float32", (-1, m.latent_dim)),
    }
    if m.kind == "cvae":
        outputs["labels"] = _INDEX
    return outputs


@dataclass(frozen=True)
class SamplerRequest:
    """A checked NAME-sampler request: which samples, and how they are drawn."""

    index: np.ndarray  # (n,) int64, each in 0..MAX_ROW_INDEX-1
    labels: np.ndarray | None  # (n,) int64 for a CVAE
    seed: int
    temperature: float  # as the typed API's float field holds it: a float32 value
    draw: bool


def sampler_request(
    request: pb.ModelInferRequest, m: ModelManifest, max_rows: int
) -> SamplerRequest:
    """Check a NAME-sampler request's tensors and parameters, as ``validate_sample`` checks a
    typed ``Sample`` (same bounds for seed and temperature, same label checks).

    Raises:
        InvalidRequest: a missing, unknown or duplicated input (a CVAE's y included), a wrong
            datatype or shape, contents that do not fill the shape, more than ``max_rows``
            rows, an index outside 0..MAX_ROW_INDEX-1, a class y the model does not have, or
            a seed, temperature or output parameter of the wrong kind or out of range.
    """
    specs = sampler_inputs(m)
    names = [t.name for t in request.inputs]
    if sorted(names) != sorted(specs):
        why = f": {m.name} is a cvae, y gives each sample's class" if "y" in specs else ""
        raise InvalidRequest(f"inputs are {names}, expected exactly {list(specs)}{why}")
    # Rows are counted from the shapes before any contents are read or copied.
    arrays = convert.decode_inputs(request, specs, max_rows)
    index = arrays["index"]
    low, high = int(index.min()), int(index.max())
    if low < 0 or high >= sampling.MAX_ROW_INDEX:
        bad = low if low < 0 else high
        raise InvalidRequest(
            f"input 'index' holds {bad}, expected sample indices 0..{sampling.MAX_ROW_INDEX - 1}"
        )
    labels = arrays.get("y")
    if labels is not None:
        check_labels("input 'y'", labels, m)
    seed = convert.seed_parameter(request)
    if seed is None:
        seed = sampling.new_seed()
    return SamplerRequest(index, labels, seed, _temperature(request), _draw(request))


def _temperature(request: pb.ModelInferRequest) -> float:
    if "temperature" not in request.parameters:
        return 1.0
    parameter = request.parameters["temperature"]
    kind = parameter.WhichOneof("parameter_choice")
    value = getattr(parameter, kind) if kind in _NUMBERS else None
    if kind == "string_param":
        # Triton's clients (tritonclient 2.41, perf_analyzer) cannot send a double: a number
        # written as text is taken too.
        try:
            value = float(value)
        except ValueError:
            value = None
    if value is None:
        got = repr(parameter.string_param) if kind == "string_param" else (kind or "empty")
        raise InvalidRequest(
            f"parameter 'temperature' is {got}, expected a number: double_param, an integer "
            "(int64_param, uint64_param) or a decimal in string_param"
        )
    if not 0 <= value <= MAX_TEMPERATURE:  # NaN fails too
        raise InvalidRequest(f"temperature is {value}, expected a number in 0..{MAX_TEMPERATURE:g}")
    # The typed field is a float: rounding to float32 here gives the typed call's samples.
    return float(np.float32(value))


def _draw(request: pb.ModelInferRequest) -> bool:
    if "output" not in request.parameters:
        return False
    parameter = request.parameters["output"]
    kind = parameter.WhichOneof("parameter_choice")
    value = parameter.string_param if kind == "string_param" else None
    if value not in _OUTPUT_KINDS:
        got = repr(value) if kind == "string_param" else (kind or "empty")
        raise InvalidRequest(
            f"parameter 'output' is {got}, expected string_param 'mean' (E[x|z]) or 'draw' "
            "(one draw from p(x|z))"
        )
    return value == "draw"


def index_runs(index: np.ndarray) -> tuple[np.ndarray | None, np.ndarray, list[tuple[int, int]]]:
    """The order that sorts ``index`` (None when it is sorted), the sorted indices, and their
    runs: (offset, count) with sorted[offset + j] == sorted[offset] + j."""
    order = None
    if len(index) > 1 and not (index[1:] >= index[:-1]).all():
        order = np.argsort(index, kind="stable")
        index = index[order]
    breaks = np.flatnonzero(np.diff(index) != 1) + 1
    edges = [0, *breaks.tolist(), len(index)]
    return order, index, [(a, b - a) for a, b in zip(edges[:-1], edges[1:], strict=True)]


class _SharedDecoder:
    """The decoder as the runs' ``pipeline.sample`` calls see it: their rows are gathered and
    sent to the real batcher as one call once every run has sent its rows (or ended without),
    then each run gets its own rows back.

    One call instead of one per run (``pipeline.sample`` on the real decoder for each run):
    measured served on 2 shared cores (reference MLP, 1024 distinct random indices), the two
    cost the same within the noise, 170-200 ms against 195-230 ms a request, both dominated by
    ~50 µs a run of re-keying Philox in ``prior_latents`` and ~30 µs of task; at n=1 both are
    the same single ``pipeline.sample``. The shared call is kept for what the clock does not
    show: one run per index would queue up to 1024 requests in the batcher, whose
    max_queue_size (default 1024) counts requests, not rows, so two such requests at once would
    be refused RESOURCE_EXHAUSTED; and ModelStatistics would count runs, not requests.
    """

    def __init__(self, decoder: DynamicBatcher, runs: int, deadline: float | None):
        self._decoder = decoder
        self._pending = runs  # runs that have neither sent their rows nor ended
        self._deadline = deadline
        self._parts: list[tuple[Mapping[str, np.ndarray], asyncio.Future]] = []
        self._flush: asyncio.Task | None = None
        self._closed = False

    def slot(self) -> _Slot:
        return _Slot(self)

    def send(self, inputs: Mapping[str, np.ndarray]) -> asyncio.Future:
        future = asyncio.get_running_loop().create_future()
        self._parts.append((inputs, future))
        self._arrived()
        return future

    def withdraw(self) -> None:
        """A run ended without sending rows (it failed first, or was cancelled)."""
        self._pending -= 1
        self._arrived()

    def close(self) -> None:
        """The request is answered or has failed: nothing more is computed for it."""
        self._closed = True
        if self._flush is not None:
            self._flush.cancel()
        for _, future in self._parts:
            future.cancel()

    def _arrived(self) -> None:
        if not self._closed and self._parts and len(self._parts) == self._pending:
            parts, self._parts, self._pending = self._parts, [], 0
            # A task of its own: the last run may arrive through withdraw(), which cannot wait.
            self._flush = asyncio.ensure_future(self._run(parts))

    async def _run(self, parts: list[tuple[Mapping[str, np.ndarray], asyncio.Future]]) -> None:
        inputs = {name: np.concatenate([p[name] for p, _ in parts]) for name in parts[0][0]}
        try:
            outputs = await self._decoder.run(inputs, self._deadline)
        except BaseException as exc:
            failed = isinstance(exc, Exception)
            for _, future in parts:
                if not future.done():
                    future.set_exception(exc) if failed else future.cancel()
            if not failed:
                raise
            return  # the runs raise it; raised here too, it would be logged as never retrieved
        start = 0
        for p, future in parts:
            rows = len(next(iter(p.values())))
            if not future.done():
                future.set_result({k: v[start : start + rows] for k, v in outputs.items()})
            start += rows


class _Slot:
    """One run's view of the shared decoder: its first call joins the shared batcher call."""

    def __init__(self, shared: _SharedDecoder):
        self._shared = shared
        self.sent = False

    async def run(self, inputs: Mapping[str, np.ndarray], deadline: float | None = None):
        if self.sent:  # a second decoder call of one run is its own batcher call
            return await self._shared._decoder.run(inputs, deadline)
        self.sent = True
        return await self._shared.send(inputs)


class _RunModel:
    """The model as one run's ``pipeline.sample`` sees it: its decoder is its slot."""

    def __init__(self, model: LoadedModel, decoder: _Slot):
        self._model = model
        self.decoder = decoder

    def __getattr__(self, name: str) -> Any:  # manifest, prior_means, any prior to come
        return getattr(self._model, name)


async def sample(
    model: LoadedModel, request: SamplerRequest, deadline: float | None
) -> pipeline.Samples:
    """The samples at ``request.index``, in its order, each as the typed ``Sample`` draws it."""
    order, index, spans = index_runs(request.index)
    labels = request.labels
    if labels is not None and order is not None:
        labels = labels[order]

    def job(offset: int, count: int) -> pipeline.SampleJob:
        part = None if labels is None else labels[offset : offset + count]
        start = int(index[offset])
        return pipeline.SampleJob(
            count, start, request.seed, request.temperature, part, request.draw
        )

    if len(spans) == 1:  # consecutive once sorted: the typed call's own job
        parts = [await pipeline.sample(model, job(0, len(index)), deadline)]
    else:
        parts = await _sample_runs(model, [job(a, n) for a, n in spans], deadline)
    x = np.concatenate([p.x for p in parts]) if len(parts) > 1 else parts[0].x
    z = np.concatenate([p.z for p in parts]) if len(parts) > 1 else parts[0].z
    if order is not None:  # from sorted order back to the request's
        x_sorted, z_sorted = x, z
        x, z = np.empty_like(x_sorted), np.empty_like(z_sorted)
        x[order], z[order] = x_sorted, z_sorted
    return pipeline.Samples(x=x, z=z, seed=request.seed)


async def _sample_runs(
    model: LoadedModel, jobs: list[pipeline.SampleJob], deadline: float | None
) -> list[pipeline.Samples]:
    shared = _SharedDecoder(model.decoder, len(jobs), deadline)

    async def one(job: pipeline.SampleJob) -> pipeline.Samples:
        slot = shared.slot()
        stand_in: Any = _RunModel(model, slot)  # a pipeline.Model, by its attributes
        try:
            return await pipeline.sample(stand_in, job, deadline)
        finally:
            if not slot.sent:
                shared.withdraw()

    tasks: list[asyncio.Future[pipeline.Samples]] = []
    try:
        for job in jobs:
            tasks.append(asyncio.ensure_future(one(job)))
            if len(tasks) % _RUNS_PER_TURN == 0:
                await asyncio.sleep(0)
        return await asyncio.gather(*tasks)
    finally:  # after a failure or a cancellation, the other runs stop too
        for task in tasks:
            task.cancel()
        shared.close()


@dataclass(frozen=True)
class SamplerKind:
    """NAME-sampler: the typed ``Sample`` by sample index; the seed is answered as ``seed``."""

    suffix: str = "sampler"
    platform: str = SERVER_PLATFORM
    backend: str = SERVER_PLATFORM
    graph: str = "decoder"
    # index and y are [n]: no per-row shape, which Triton's implicit batch axis cannot declare
    # (perf_analyzer refuses such an input), so the config declares full shapes instead.
    implicit_batch_axis: bool = False

    def inputs(self, model: LoadedModel) -> dict[str, TensorSpec]:
        return sampler_inputs(model.manifest)

    def outputs(self, model: LoadedModel) -> dict[str, TensorSpec]:
        return sampler_outputs(model.manifest)

    async def infer(
        self,
        model: LoadedModel,
        request: pb.ModelInferRequest,
        settings: ServerSettings,
        deadline: float | None,
    ) -> Answer:
        m = model.manifest
        specs = self.outputs(model)
        names = convert.requested_outputs(request, specs)
        checked = sampler_request(request, m, settings.max_samples_per_request)
        rows = len(checked.index)
        convert.check_answer_fits(rows, names, specs, settings.max_message_bytes)
        samples = await sample(model, checked, deadline)
        arrays = {"samples": samples.x, "latents": samples.z, "labels": checked.labels}
        return Answer({name: arrays[name] for name in names}, {"seed": checked.seed})
