"""Soak: vae-serve under mixed load from many clients for a bounded time, with overload bursts.

Run: python bench/soak.py [--duration-s 600] [--clients 32] [--json soak.json]
     python bench/soak.py --repository DIR --vae NAME --cvae NAME   (skip the export)

Without --repository it exports random-weight models of the reference size of
docs/architecture.md (MLP 784 -> 512 -> 512 -> 32 and back, 1x28x28): a VAE and a concat
CVAE, through vae-export's Python API (so it needs the train extra, in this process only).
Then it starts vae-serve in a child process on 127.0.0.1 with a small queue bound, and drives
it from grpc.aio clients here:

  - ``--clients`` closed-loop clients, each call drawn at random: typed Sample (small and
    large, CVAE labels, compact encodings), SampleStream, Encode, Decode, a fixed-seed Sample
    whose bytes must never change, and Open Inference Protocol ModelInfer on both graphs when
    the server offers that service;
  - every ``--overload-every-s``, for ``--overload-s``, ``--burst-clients`` more clients send
    large requests without backoff: past the queue bound they must get RESOURCE_EXHAUSTED
    promptly; after the burst a probe measures how soon calls succeed again;
  - the server's RSS is sampled every ``--sample-every-s``.

Every client is bounded in calls and time; all traffic goes to 127.0.0.1. It prints requests,
failures by status, latency percentiles per call, the RSS over time and its growth after the
warm-up, and exits 1 if any call failed with a status other than RESOURCE_EXHAUSTED, an answer
was wrong, vae-serve did not exit 0 on SIGTERM, or (runs of 5 minutes or more) RSS grew more
than ``--max-growth-pct``.
"""

from __future__ import annotations

import argparse
import array
import asyncio
import json
import os
import random
import re
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from vaeserve.proto.v1 import vaeserve_pb2 as pb
from vaeserve.proto.v1 import vaeserve_pb2_grpc as pb_grpc

_SERVE = "import sys; from vaeserve.server.cli import main; sys.exit(main())"  # vae-serve
START_TIMEOUT_S = 180.0
CALL_TIMEOUT_S = 30.0
MAX_MESSAGE = 64 << 20
MEMORY_JUDGED_FROM_S = 300.0  # shorter runs report RSS but are not judged on it
RECOVERY_PROBE_S = 0.01


# --- models ----------------------------------------------------------------------------


def export_reference_models(root: Path) -> tuple[Path, str, str]:
    """Random-weight VAE and concat CVAE of the reference size, in <root>/models."""
    import torch

    from vaeserve.export.onnx_export import export_checkpoint
    from vaeserve.training.checkpoint import save_checkpoint
    from vaeserve.training.config import ModelConfig
    from vaeserve.training.model import build_model

    data_info = {  # no data set on disk: the exporter's parity gate uses synthetic images
        "spec": f"npz:{root / 'absent.npz'}",
        "shape": [1, 28, 28],
        "value_range": [0.0, 1.0],
        "binarize": "none",
        "num_classes": 10,
        "class_names": [str(i) for i in range(10)],
        "split_seed": 0,
    }
    names = {"soak-vae": {}, "soak-cvae": {"kind": "cvae", "conditioning": "concat"}}
    for name, kind in names.items():
        classes = {"num_classes": 10} if kind else {}
        config = ModelConfig(
            data_shape=(1, 28, 28), latent_dim=32, hidden_dims=(512, 512), **kind, **classes
        )
        torch.manual_seed(0)
        checkpoint = save_checkpoint(
            root / f"{name}.pt",
            model_config=config,
            state_dict=build_model(config).state_dict(),
            train_config={},
            data_info=data_info,
        )
        export_checkpoint(checkpoint, root / "models", name, version=1)
    return root / "models", "soak-vae", "soak-cvae"


@dataclass(frozen=True)
class Model:
    """What the load needs to know about a served model (from GetModelInfo)."""

    name: str
    latent_dim: int
    sample_shape: tuple[int, ...]
    num_classes: int  # 0 for a vae
    encoder_takes_label: bool
    decoder_takes_label: bool


async def model_of(stub: pb_grpc.VaeServiceStub, name: str) -> Model:
    info = (await stub.GetModelInfo(pb.GetModelInfoRequest(model=pb.ModelRef(name=name)))).model
    return Model(
        name=info.name,
        latent_dim=info.latent_dim,
        sample_shape=tuple(info.sample_shape),
        num_classes=info.num_classes,
        encoder_takes_label=any(t.name == "y" for t in info.encoder_inputs),
        decoder_takes_label=any(t.name == "y" for t in info.decoder_inputs),
    )


# --- the server ------------------------------------------------------------------------


class Server:
    """vae-serve in a child process, its log in a file; RSS read from /proc."""

    def __init__(self, repository: Path, models: list[str], log: Path, flags: list[str]):
        command = [sys.executable, "-c", _SERVE, "--repository", str(repository)]
        command += ["--models", ",".join(models), "--host", "127.0.0.1", "--port", "0"]
        command += ["--http-port", "off"]
        command += ["--device", "cpu", *flags]
        self.log = log
        with open(log, "w") as f:
            self.process = subprocess.Popen(command, stderr=f)
        self.port = self._port()

    def _port(self) -> int:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            match = re.search(r"listening on \S+:(\d+)", self.log.read_text())
            if match:
                return int(match.group(1))
            if self.process.poll() is not None:
                raise RuntimeError(f"vae-serve exited: {self.log.read_text()}")
            time.sleep(0.05)
        raise RuntimeError(f"vae-serve did not start within {START_TIMEOUT_S} s")

    def rss_mib(self) -> float:
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        raise RuntimeError("no VmRSS line")

    def terminate(self) -> int:
        """SIGTERM, then the exit code (killed after START_TIMEOUT_S)."""
        self.process.terminate()
        try:
            return self.process.wait(START_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait()


async def wait_serving(channel: grpc.aio.Channel) -> None:
    stub = health_pb2_grpc.HealthStub(channel)
    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
        try:
            answer = await stub.Check(health_pb2.HealthCheckRequest(), timeout=5)
            if answer.status == health_pb2.HealthCheckResponse.SERVING:
                return
        except grpc.aio.AioRpcError as exc:
            if exc.code() != grpc.StatusCode.UNAVAILABLE:
                raise
        if time.monotonic() > deadline:
            raise RuntimeError(f"vae-serve not SERVING after {START_TIMEOUT_S} s")
        await asyncio.sleep(0.1)


# --- the calls -------------------------------------------------------------------------


class WrongAnswer(Exception):
    """An answer of the wrong shape, or a fixed-seed sample whose bytes changed."""


Call = Callable[[random.Random], Awaitable[None]]


def _tensor(x: np.ndarray) -> pb.Tensor:
    wire = {np.float32: pb.FLOAT32, np.float16: pb.FLOAT16}[x.dtype.type]
    return pb.Tensor(dtype=wire, shape=x.shape, data=x.tobytes())


def _expect(shape: tuple[int, ...], want: tuple[int, ...], what: str) -> None:
    if tuple(shape) != tuple(want):
        raise WrongAnswer(f"{what}: shape {list(shape)}, expected {list(want)}")


class Calls:
    """Every kind of call the load makes, each checking the shape of its answer."""

    def __init__(self, channel: grpc.aio.Channel, vae: Model, cvae: Model, oip: bool):
        self.typed = pb_grpc.VaeServiceStub(channel)
        self.vae, self.cvae = vae, cvae
        self.golden: bytes | None = None
        self.oip = None
        if oip:
            from vaeserve.proto.inference import grpc_service_pb2 as oip_pb
            from vaeserve.proto.inference import grpc_service_pb2_grpc as oip_grpc

            self.oip, self.oip_pb = oip_grpc.GRPCInferenceServiceStub(channel), oip_pb

    def kinds(self) -> dict[str, tuple[float, Call]]:
        """name -> (weight, call)."""
        kinds = {
            "Sample small": (30.0, self.sample_small),
            "Sample large": (6.0, self.sample_large),
            "Sample fixed": (4.0, self.sample_fixed),
            "SampleStream": (2.0, self.sample_stream),
            "Encode": (12.0, self.encode),
            "Decode": (10.0, self.decode),
        }
        if self.oip is not None:
            kinds["OIP decoder"] = (12.0, self.oip_decoder)
            kinds["OIP encoder"] = (8.0, self.oip_encoder)
        return kinds

    def _model(self, rng: random.Random) -> Model:
        return self.cvae if rng.random() < 0.6 else self.vae

    def _labels(self, m: Model, n: int, rng: random.Random) -> list[int]:
        return [rng.randrange(m.num_classes) for _ in range(n)] if m.num_classes else []

    async def sample_n(self, m: Model, n: int, rng: random.Random, **fields) -> pb.SampleResponse:
        request = pb.SampleRequest(model=pb.ModelRef(name=m.name), num_samples=n, **fields)
        if m.num_classes:
            if rng.random() < 0.5:
                request.label = rng.randrange(m.num_classes)
            else:
                request.labels.extend(self._labels(m, n, rng))
        answer = await self.typed.Sample(request, timeout=CALL_TIMEOUT_S)
        _expect(answer.samples.shape, (n, *m.sample_shape), f"Sample {m.name}")
        return answer

    async def sample_small(self, rng: random.Random) -> None:
        await self.sample_n(self._model(rng), rng.randint(1, 16), rng, seed=rng.getrandbits(63))

    async def sample_large(self, rng: random.Random) -> None:
        encoding = rng.choice(
            [pb.SAMPLE_ENCODING_FLOAT32, pb.SAMPLE_ENCODING_UINT8, pb.SAMPLE_ENCODING_FLOAT16]
        )
        await self.sample_n(self._model(rng), rng.randint(1024, 4096), rng, encoding=encoding)

    async def sample_fixed(self, rng: random.Random) -> None:
        request = pb.SampleRequest(
            model=pb.ModelRef(name=self.cvae.name), num_samples=8, seed=12345, label=7
        )
        data = (await self.typed.Sample(request, timeout=CALL_TIMEOUT_S)).samples.data
        if self.golden is None:
            self.golden = data
        elif data != self.golden:
            raise WrongAnswer("Sample fixed: seed 12345 gave other bytes than before")

    async def sample_stream(self, rng: random.Random) -> None:
        m, n = self._model(rng), rng.randint(2000, 12000)
        request = pb.SampleRequest(model=pb.ModelRef(name=m.name), num_samples=n)
        if m.num_classes:
            request.label = rng.randrange(m.num_classes)
        stream = self.typed.SampleStream(
            pb.SampleStreamRequest(request=request, chunk_size=1024), timeout=CALL_TIMEOUT_S
        )
        rows = 0
        async for chunk in stream:
            rows += chunk.samples.shape[0]
        if rows != n:
            raise WrongAnswer(f"SampleStream: {rows} samples, expected {n}")

    def _x(self, m: Model, n: int, rng: random.Random) -> np.ndarray:
        seed = rng.getrandbits(32)
        return np.random.default_rng(seed).random((n, *m.sample_shape), dtype=np.float32)

    async def encode(self, rng: random.Random) -> None:
        m, n = self._model(rng), rng.choice([1, 2, 8, 64, 256])
        labels = self._labels(m, n, rng) if m.encoder_takes_label else []
        request = pb.EncodeRequest(
            model=pb.ModelRef(name=m.name), x=_tensor(self._x(m, n, rng)), labels=labels
        )
        answer = await self.typed.Encode(request, timeout=CALL_TIMEOUT_S)
        _expect(answer.mu.shape, (n, m.latent_dim), f"Encode {m.name}")

    async def decode(self, rng: random.Random) -> None:
        m, n = self._model(rng), rng.choice([1, 4, 32, 512])
        z = np.random.default_rng(rng.getrandbits(32)).standard_normal((n, m.latent_dim))
        labels = self._labels(m, n, rng) if m.decoder_takes_label else []
        request = pb.DecodeRequest(
            model=pb.ModelRef(name=m.name), z=_tensor(z.astype(np.float32)), labels=labels
        )
        answer = await self.typed.Decode(request, timeout=CALL_TIMEOUT_S)
        _expect(answer.x.shape, (n, *m.sample_shape), f"Decode {m.name}")

    async def _infer(self, m: Model, graph: str, inputs: dict[str, np.ndarray]) -> None:
        request = self.oip_pb.ModelInferRequest(model_name=f"{m.name}-{graph}")
        for name, value in inputs.items():
            datatype = "INT64" if value.dtype == np.int64 else "FP32"
            request.inputs.add(name=name, datatype=datatype, shape=value.shape)
            request.raw_input_contents.append(value.tobytes())
        answer = await self.oip.ModelInfer(request, timeout=CALL_TIMEOUT_S)
        n = len(next(iter(inputs.values())))
        for out in answer.outputs:
            if out.shape[0] != n:
                raise WrongAnswer(f"ModelInfer {request.model_name}: {out.shape[0]} rows, not {n}")

    async def oip_decoder(self, rng: random.Random) -> None:
        m, n = self._model(rng), rng.choice([1, 4, 64, 256])
        z = np.random.default_rng(rng.getrandbits(32)).standard_normal((n, m.latent_dim))
        inputs = {"z": z.astype(np.float32)}
        if m.decoder_takes_label:
            inputs["y"] = np.array(self._labels(m, n, rng), dtype=np.int64)
        await self._infer(m, "decoder", inputs)

    async def oip_encoder(self, rng: random.Random) -> None:
        m, n = self._model(rng), rng.choice([1, 8, 64])
        inputs = {"x": self._x(m, n, rng)}
        if m.encoder_takes_label:
            inputs["y"] = np.array(self._labels(m, n, rng), dtype=np.int64)
        await self._infer(m, "encoder", inputs)


# --- recording -------------------------------------------------------------------------


@dataclass
class Record:
    """Every call's start, latency, kind, status and client type, in compact arrays."""

    kinds: list[str]
    start: array.array = field(default_factory=lambda: array.array("d"))
    latency: array.array = field(default_factory=lambda: array.array("d"))
    kind: array.array = field(default_factory=lambda: array.array("b"))
    code: array.array = field(default_factory=lambda: array.array("b"))
    burst: array.array = field(default_factory=lambda: array.array("b"))
    wrong: list[str] = field(default_factory=list)
    details: dict[str, str] = field(default_factory=dict)  # first message per failure code

    def add(self, kind: int, start: float, latency: float, code: int, burst: bool) -> None:
        self.start.append(start)
        self.latency.append(latency)
        self.kind.append(kind)
        self.code.append(code)
        self.burst.append(int(burst))


_CODES = list(grpc.StatusCode)
_OK = _CODES.index(grpc.StatusCode.OK)
_EXHAUSTED = _CODES.index(grpc.StatusCode.RESOURCE_EXHAUSTED)
_WRONG = -1  # a call that answered OK with a wrong answer


async def _timed(record: Record, kind: int, call: Awaitable[None], burst: bool) -> int:
    start = time.monotonic()
    code = _OK
    try:
        await call
    except grpc.aio.AioRpcError as exc:
        code = _CODES.index(exc.code())
        record.details.setdefault(exc.code().name, exc.details() or "")
    except WrongAnswer as exc:
        code = _WRONG
        record.wrong.append(str(exc))
    record.add(kind, start, time.monotonic() - start, code, burst)
    return code


# --- the load --------------------------------------------------------------------------


@dataclass
class Plan:
    duration_s: float
    clients: int
    burst_clients: int
    overload_every_s: float
    overload_s: float
    sample_every_s: float
    max_calls_per_client: int
    seed: int


async def steady_client(
    i: int, calls: Calls, record: Record, plan: Plan, until: float, stop: asyncio.Event
) -> None:
    rng = random.Random(plan.seed * 1_000_003 + i)
    kinds = calls.kinds()
    names, weights = list(kinds), [w for w, _ in kinds.values()]
    for _ in range(plan.max_calls_per_client):
        if stop.is_set() or time.monotonic() >= until:
            return
        name = rng.choices(names, weights)[0]
        await _timed(record, record.kinds.index(name), kinds[name][1](rng), burst=False)


async def burst_client(i: int, calls: Calls, record: Record, until: float, limit: int) -> None:
    """Large requests without backoff until ``until``: more than the queue bound admits."""
    rng = random.Random(i)
    kind = record.kinds.index("Burst Sample")
    for _ in range(limit):
        if time.monotonic() >= until:
            return
        call = calls.sample_n(calls.vae, 4096, rng, encoding=pb.SAMPLE_ENCODING_UINT8)
        await _timed(record, kind, call, burst=True)


async def recovery_s(calls: Calls, since: float, limit_s: float) -> float | None:
    """Seconds from ``since`` until a small Sample succeeds again (None: not within limit_s)."""
    rng = random.Random(0)
    while time.monotonic() - since < limit_s:
        try:
            await calls.sample_n(calls.vae, 1, rng)
            return time.monotonic() - since
        except grpc.aio.AioRpcError as exc:
            if exc.code() != grpc.StatusCode.RESOURCE_EXHAUSTED:
                raise
        await asyncio.sleep(RECOVERY_PROBE_S)
    return None


async def overload(
    calls: Calls, record: Record, plan: Plan, until: float, stop: asyncio.Event
) -> list[dict]:
    """Bursts every overload_every_s; returns each burst's window and recovery time."""
    bursts = []
    while not stop.is_set():
        try:
            await asyncio.wait_for(stop.wait(), plan.overload_every_s)
            return bursts
        except TimeoutError:
            pass
        start = time.monotonic()
        end = min(start + plan.overload_s, until)
        if end - start < plan.overload_s / 2:
            return bursts
        limit = 1000
        await asyncio.gather(
            *(burst_client(i, calls, record, end, limit) for i in range(plan.burst_clients))
        )
        ended = time.monotonic()
        bursts.append(
            {"start": start, "end": ended, "recovery_s": await recovery_s(calls, ended, 30.0)}
        )
    return bursts


async def sample_rss(server: Server, plan: Plan, stop: asyncio.Event) -> list[tuple[float, float]]:
    samples, start = [], time.monotonic()
    while True:
        samples.append((time.monotonic() - start, server.rss_mib()))
        try:
            await asyncio.wait_for(stop.wait(), plan.sample_every_s)
            samples.append((time.monotonic() - start, server.rss_mib()))
            return samples
        except TimeoutError:
            pass


async def drive(server: Server, names: tuple[str, str], plan: Plan) -> dict:
    options = [("grpc.max_receive_message_length", MAX_MESSAGE)]
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}", options=options) as ch:
        await wait_serving(ch)
        typed = pb_grpc.VaeServiceStub(ch)
        vae, cvae = await model_of(typed, names[0]), await model_of(typed, names[1])
        calls = Calls(ch, vae, cvae, oip=await _offers_oip(ch))
        record = Record(kinds=[*calls.kinds(), "Burst Sample"])
        stop = asyncio.Event()
        load = [os.getloadavg()[0]]
        started = time.monotonic()
        until = started + plan.duration_s
        rss = asyncio.ensure_future(sample_rss(server, plan, stop))
        bursts = asyncio.ensure_future(overload(calls, record, plan, until, stop))
        await asyncio.gather(
            *(steady_client(i, calls, record, plan, until, stop) for i in range(plan.clients))
        )
        stop.set()
        windows = [
            {**b, "start": b["start"] - started, "end": b["end"] - started} for b in await bursts
        ]
        load.append(os.getloadavg()[0])
        return {"record": record, "rss": await rss, "bursts": windows, "started": started,
                "oip": calls.oip is not None, "load": load}  # fmt: skip


async def _offers_oip(channel: grpc.aio.Channel) -> bool:
    """Whether the server answers the Open Inference Protocol (it is optional here)."""
    from vaeserve.proto.inference import grpc_service_pb2 as oip_pb
    from vaeserve.proto.inference import grpc_service_pb2_grpc as oip_grpc

    try:
        live = oip_grpc.GRPCInferenceServiceStub(channel).ServerLive
        await live(oip_pb.ServerLiveRequest(), timeout=CALL_TIMEOUT_S)
    except grpc.aio.AioRpcError as exc:
        if exc.code() == grpc.StatusCode.UNIMPLEMENTED:
            return False
        raise
    return True


# --- the report ------------------------------------------------------------------------


def _percentiles(values: np.ndarray) -> dict[str, float]:
    if len(values) == 0:
        return {}
    p50, p90, p99 = np.percentile(values, [50, 90, 99]) * 1e3
    return {"p50_ms": p50, "p90_ms": p90, "p99_ms": p99, "max_ms": values.max() * 1e3}


def summarize(result: dict, plan: Plan, warmup_s: float, exit_code: int) -> dict:
    r: Record = result["record"]
    start = np.frombuffer(r.start, dtype=np.float64) - result["started"]
    latency = np.frombuffer(r.latency, dtype=np.float64)
    kind = np.frombuffer(r.kind, dtype=np.int8)
    code = np.frombuffer(r.code, dtype=np.int8)
    burst = np.frombuffer(r.burst, dtype=np.int8).astype(bool)

    def name(c: int) -> str:
        return "WRONG_ANSWER" if c == _WRONG else _CODES[c].name

    by_kind = {}
    for k, kname in enumerate(r.kinds):
        mine = kind == k
        if mine.any():
            failed = Counter(code[mine & (code != _OK)])
            by_kind[kname] = {
                "requests": int(mine.sum()),
                "failures": {name(c): int(n) for c, n in failed.items()},
                **_percentiles(latency[mine & (code == _OK)]),
            }
    failures = Counter(name(c) for c in code[code != _OK])
    # Steady clients' refusals outside the bursts (plus a recovery allowance) show whether
    # the server recovers as soon as the load drops.
    # A refusal is immediate, so it is placed at the end of its call.
    refused_at = start + latency
    in_burst = np.zeros(len(start), dtype=bool)
    for b in result["bursts"]:
        allowance = (b["recovery_s"] or 0.0) + 0.5
        in_burst |= (refused_at >= b["start"]) & (refused_at < b["end"] + allowance)
    steady_refused = int(((code == _EXHAUSTED) & ~burst & ~in_burst).sum())
    refusals = latency[code == _EXHAUSTED]
    rss = result["rss"]
    growth = rss_growth(rss, warmup_s)
    return {
        "duration_s": plan.duration_s,
        "clients": plan.clients,
        "burst_clients": plan.burst_clients,
        "oip": result["oip"],
        "requests": int(len(code)),
        "ok": int((code == _OK).sum()),
        "failures": dict(failures),
        "failures_not_resource_exhausted": int(
            sum(n for c, n in failures.items() if c != "RESOURCE_EXHAUSTED")
        ),
        "failure_details": r.details,
        "wrong_answers": r.wrong[:10],
        "by_kind": by_kind,
        "all_ok": _percentiles(latency[code == _OK]),
        "resource_exhausted_latency": _percentiles(refusals),
        "steady_refused_outside_bursts": steady_refused,
        "bursts": result["bursts"],
        "rss_mib": [(round(t, 1), round(m, 1)) for t, m in rss],
        "rss_start_mib": rss[0][1],
        "rss_after_warmup_mib": growth["first_mib"],
        "rss_end_mib": rss[-1][1],
        "rss_max_mib": max(m for _, m in rss),
        "rss_last_mib": growth["last_mib"],
        "rss_growth_after_warmup_pct": growth["pct"],
        "rss_slope_mib_per_min": growth["slope_mib_per_min"],
        "load_average": result["load"],
        "warmup_s": warmup_s,
        "server_exit_code": exit_code,
    }


def rss_growth(rss: list[tuple[float, float]], warmup_s: float) -> dict[str, float]:
    """RSS growth after the warm-up, robust to the transient buffers of large answers.

    Each sample catches whatever large answers are in flight at that instant (tens of MiB
    with 1024x784 answers), so single samples are noisy. Growth compares the median of the
    first and of the last fifth of the samples after the warm-up; the least-squares slope
    over all of them says whether memory keeps climbing.
    """
    after = [(t, m) for t, m in rss if t >= warmup_s] or rss[-1:]
    fifth = max(1, len(after) // 5)
    first = float(np.median([m for _, m in after[:fifth]]))
    last = float(np.median([m for _, m in after[-fifth:]]))
    times = np.array([t for t, _ in after])
    slope = float(np.polyfit(times, [m for _, m in after], 1)[0]) * 60 if len(after) > 2 else 0.0
    return {
        "first_mib": first,
        "last_mib": last,
        "pct": (last - first) / first * 100,
        "slope_mib_per_min": slope,
    }


def verdict(s: dict, max_growth_pct: float) -> list[str]:
    problems = []
    if s["failures_not_resource_exhausted"]:
        problems.append(f"failures other than RESOURCE_EXHAUSTED: {s['failures']}")
    if s["server_exit_code"] != 0:
        problems.append(f"vae-serve exited {s['server_exit_code']} on SIGTERM")
    if (
        s["duration_s"] >= MEMORY_JUDGED_FROM_S
        and s["rss_growth_after_warmup_pct"] > max_growth_pct
    ):
        problems.append(f"RSS grew {s['rss_growth_after_warmup_pct']:.1f}% after the warm-up")
    if any(b["recovery_s"] is None for b in s["bursts"]):
        problems.append("a burst was not recovered from within 30 s")
    return problems


def print_report(s: dict, problems: list[str]) -> None:
    print(
        f"\nsoak: {s['duration_s']:.0f} s, {s['clients']} clients + bursts of "
        f"{s['burst_clients']}, Open Inference Protocol {'on' if s['oip'] else 'not offered'}"
    )
    print(f"requests {s['requests']:,}, ok {s['ok']:,}, failures {s['failures'] or 'none'}")
    head = ("call", "requests", "failures", "p50 ms", "p90 ms", "p99 ms", "max ms")
    print(f"{head[0]:16}" + "".join(f"{h:>12}" for h in head[1:]))
    for kname, k in s["by_kind"].items():
        failed = sum(k["failures"].values())
        cells = [f"{k['requests']:,}", f"{failed:,}"]
        cells += [f"{k.get(p, float('nan')):.1f}" for p in ("p50_ms", "p90_ms", "p99_ms", "max_ms")]
        print(f"{kname:16}" + "".join(f"{c:>12}" for c in cells))
    refusal = s["resource_exhausted_latency"]
    if refusal:
        print(
            f"RESOURCE_EXHAUSTED answered in p50 {refusal['p50_ms']:.1f} ms, "
            f"p99 {refusal['p99_ms']:.1f} ms, max {refusal['max_ms']:.1f} ms"
        )
    for i, b in enumerate(s["bursts"]):
        rec = "never" if b["recovery_s"] is None else f"{b['recovery_s'] * 1e3:.0f} ms"
        print(f"burst {i}: {b['start']:.1f}-{b['end']:.1f} s, calls succeed again after {rec}")
    print(f"steady clients refused outside bursts: {s['steady_refused_outside_bursts']}")
    print("RSS (MiB) over time: " + ", ".join(f"{t:.0f}s {m:.0f}" for t, m in s["rss_mib"]))
    print(
        f"RSS (MiB) at start {s['rss_start_mib']:.1f}, at the end {s['rss_end_mib']:.1f}, max "
        f"{s['rss_max_mib']:.1f}; median of the first fifth after the {s['warmup_s']:.0f} s "
        f"warm-up {s['rss_after_warmup_mib']:.1f}, of the last fifth {s['rss_last_mib']:.1f}: "
        f"growth {s['rss_growth_after_warmup_pct']:+.2f}%, slope "
        f"{s['rss_slope_mib_per_min']:+.2f} MiB/min"
    )
    print(f"load average (1 min) at start and end: {s['load_average']}")
    print(f"vae-serve exit code on SIGTERM: {s['server_exit_code']}")
    print("verdict: " + ("PASS" if not problems else "FAIL: " + "; ".join(problems)))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--duration-s", type=float, default=600.0, help="length of the soak")
    parser.add_argument("--clients", type=int, default=32, help="steady closed-loop clients")
    parser.add_argument("--burst-clients", type=int, default=96, help="clients of a burst")
    parser.add_argument("--overload-every-s", type=float, default=60.0, help="burst period")
    parser.add_argument("--overload-s", type=float, default=5.0, help="length of a burst")
    parser.add_argument("--warmup-s", type=float, help="default: a tenth of the duration")
    parser.add_argument("--sample-every-s", type=float, default=10.0, help="RSS sampling")
    parser.add_argument("--max-calls-per-client", type=int, default=1_000_000)
    parser.add_argument("--max-queue-size", type=int, default=48, help="vae-serve's bound")
    parser.add_argument("--max-growth-pct", type=float, default=5.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repository", type=Path, help="an existing model repository")
    parser.add_argument("--vae", help="a VAE in --repository")
    parser.add_argument("--cvae", help="a concat CVAE in --repository")
    parser.add_argument("--serve-args", default="", help="extra vae-serve flags")
    parser.add_argument("--json", type=Path, help="also write the summary here")
    parser.add_argument("--log", type=Path, help="keep vae-serve's log here")
    args = parser.parse_args(argv)
    given = (args.repository, args.vae, args.cvae)
    if any(v is not None for v in given) and not all(v is not None for v in given):
        parser.error("--repository, --vae and --cvae go together")
    plan = Plan(
        args.duration_s,
        args.clients,
        args.burst_clients,
        args.overload_every_s,
        args.overload_s,
        args.sample_every_s,
        args.max_calls_per_client,
        args.seed,
    )
    warmup_s = args.duration_s / 10 if args.warmup_s is None else args.warmup_s
    with tempfile.TemporaryDirectory(prefix="vae-soak-") as tmp:
        if args.repository is None:
            print("exporting the reference-size models ...", flush=True)
            repository, vae, cvae = export_reference_models(Path(tmp))
        else:
            repository, vae, cvae = args.repository, args.vae, args.cvae
        flags = ["--max-queue-size", str(args.max_queue_size), *args.serve_args.split()]
        log = args.log or Path(tmp) / "server.log"
        server = Server(repository, [vae, cvae], log, flags)
        try:
            result = asyncio.run(drive(server, (vae, cvae), plan))
        finally:
            exit_code = server.terminate()
        summary = summarize(result, plan, warmup_s, exit_code)
    problems = verdict(summary, args.max_growth_pct)
    print_report(summary, problems)
    if args.json is not None:
        args.json.write_text(json.dumps({**summary, "problems": problems}, indent=2) + "\n")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
