"""Server configuration as plain data, read from flags and VAESERVE_* variables in one place.

Every flag ``--some-flag`` has the environment variable ``VAESERVE_SOME_FLAG``; a flag given
on the command line wins over the variable, which wins over the default. Which flags there
are, how each parses and its help: server/flags.py; the defaults, the checks and the parser
built from them: here.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vaeserve.info import Limits
from vaeserve.server.flags import ENV_PREFIX, FLAGS, env_name, from_environ

__all__ = [
    "DEVICES",
    "ENV_PREFIX",
    "LOG_FORMATS",
    "QUEUE_DELAY_POLICIES",
    "MODEL_CONTROL_MODES",
    "BatchingSettings",
    "ServerSettings",
    "usable_cores",
]

DEVICES = ("auto", "cpu", "cuda")
_MIB = 1 << 20
_LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
LOG_FORMATS = ("text", "json")
# adaptive: spend the queue delay only while recent batches held several requests (a lone
# caller never waits); always: every batch may wait the delay for company (Triton's rule).
QUEUE_DELAY_POLICIES = ("adaptive", "always")
# Triton's --model-control-mode: none: the models found at start, changed only by SIGHUP;
# poll: also rescanned every reload_interval_s; explicit: loaded and unloaded by the
# repository API (RepositoryModelLoad/Unload), the models named at start loaded first.
MODEL_CONTROL_MODES = ("none", "poll", "explicit")
# What vae-serve (flags, VAESERVE_* variables) uses where the library default differs: the
# REST port is off for ServerSettings built in code (tests bind port 0 many times over), on
# at Triton's 8000 for the command.
_COMMAND_DEFAULTS = {"http_port": 8000}


@dataclass(frozen=True)
class BatchingSettings:
    """How each graph's dynamic batcher forms batches (max_batch_size 1: batching off)."""

    max_batch_size: int = 1024  # rows per onnxruntime run; larger requests are split
    max_queue_delay_ms: float = 1.0  # how long the oldest queued request may wait for company
    max_queue_size: int = 1024  # requests waiting per graph before RESOURCE_EXHAUSTED
    queue_delay_policy: str = "adaptive"  # one of QUEUE_DELAY_POLICIES
    # Runs of one graph in flight at once (Triton's instance count). Above 1, each run is
    # single-threaded, and idle instances share queued rows out between them. 0: one per
    # onnxruntime thread on the CPU (intra_op_threads, or the usable cores), 1 on CUDA.
    instances: int = 0

    def __post_init__(self) -> None:
        _check(self.max_batch_size >= 1, "max_batch_size", "an integer >= 1", self.max_batch_size)
        _check(
            0 <= self.max_queue_delay_ms <= 10_000,
            "max_queue_delay_ms",
            "0..10000 milliseconds",
            self.max_queue_delay_ms,
        )
        _check(self.max_queue_size >= 1, "max_queue_size", "an integer >= 1", self.max_queue_size)
        _check(0 <= self.instances <= 64, "instances", "an integer in 0..64", self.instances)
        _check(
            self.queue_delay_policy in QUEUE_DELAY_POLICIES,
            "queue_delay_policy",
            " or ".join(QUEUE_DELAY_POLICIES),
            self.queue_delay_policy,
        )


@dataclass(frozen=True)
class ServerSettings:
    """Everything ``vae-serve`` can be told; built by ``from_args`` or ``from_env``."""

    repository: Path
    models: tuple[str, ...] = ()  # model names to serve; empty: every model in the repository
    host: str = "127.0.0.1"  # 0.0.0.0 in a container
    port: int = 8001  # gRPC; 0: any free port (tests)
    http_port: int | None = None  # REST (the protocol's HTTP/JSON transport); None: off, 0: any
    device: str = "auto"  # auto | cpu | cuda
    intra_op_threads: int = 0  # onnxruntime threads per run; 0: one per physical core
    inter_op_threads: int = 0  # 0: onnxruntime's default
    max_samples_per_request: int = 4096  # rows of a Sample/Encode/Decode/Reconstruct call
    max_stream_samples: int = 1 << 24  # num_samples of one SampleStream call
    default_stream_chunk_size: int = 1024
    max_stream_chunk_size: int = 4096
    max_score_samples: int = 1000  # k (importance samples per input) of one Score call
    max_score_rows: int = 65536  # n * k (decoder rows) of one Score call
    max_message_bytes: int = 64 * _MIB  # gRPC send/receive limit; 4096x784 fp32 is 12.8 MB
    grace_period_s: float = 10.0  # how long in-flight calls may finish after SIGTERM
    log_level: str = "INFO"
    log_format: str = "text"  # text | json (one object per line)
    metrics_port: int | None = None  # Prometheus /metrics on this port; None: off, 0: any free
    tls_cert: Path | None = None  # PEM certificate chain; with tls_key, the port speaks TLS
    tls_key: Path | None = None
    tls_client_ca: Path | None = None  # PEM CA: clients must show a certificate it signed
    auth_token_file: Path | None = None  # every RPC but health needs "Bearer <its content>"
    reload_interval_s: float = 0.0  # rescan the repository this often; 0: on SIGHUP only
    model_control_mode: str = "none"  # one of MODEL_CONTROL_MODES; reload_interval_s > 0: poll
    workers: int = 1  # server processes sharing the port (SO_REUSEPORT); see server/workers.py
    # Bounds against hostile or runaway callers (server/limits.py, docs/reliability.md).
    max_small_request_bytes: int = 64 << 10  # requests of the methods that carry no tensors
    max_request_fields: int = 16384  # protobuf fields one request may hold, nested included
    max_inflight_calls: int = 1024
    max_waiting_calls: int = 1024  # calls gRPC holds before the server takes them up
    max_inflight_request_bytes: int = 1 << 30
    max_pending_answer_bytes: int = 512 * _MIB  # streamed answers written, not yet read
    stream_stall_timeout_s: float = 30.0  # a stream whose client reads nothing is cut off
    max_concurrent_streams: int = 256  # calls in progress on one connection
    min_ping_interval_s: float = 10.0  # a client pinging more often is sent GOAWAY
    max_connection_idle_s: float = 300.0  # a connection without calls is closed after this
    max_connection_age_s: float = 3600.0  # 0: no limit; clients reconnect (load balancing)
    max_connection_age_grace_s: float = 60.0  # in-progress calls may finish past the age
    batching: BatchingSettings = field(default_factory=BatchingSettings)

    def __post_init__(self) -> None:
        object.__setattr__(self, "repository", Path(self.repository))
        object.__setattr__(self, "models", tuple(self.models))
        _check(self.device in DEVICES, "device", "one of " + ", ".join(DEVICES), self.device)
        _check(0 <= self.port <= 65535, "port", "0..65535", self.port)
        if self.http_port is not None:
            _check(0 <= self.http_port <= 65535, "http_port", "0..65535 or off", self.http_port)
        for name in ("intra_op_threads", "inter_op_threads"):
            _check(getattr(self, name) >= 0, name, "an integer >= 0", getattr(self, name))
        for name in ("max_samples_per_request", "max_stream_samples", "max_stream_chunk_size",
                     "max_score_samples", "max_score_rows"):  # fmt: skip
            _check(getattr(self, name) >= 1, name, "an integer >= 1", getattr(self, name))
        _check(
            1 <= self.default_stream_chunk_size <= self.max_stream_chunk_size,
            "default_stream_chunk_size",
            f"1..max_stream_chunk_size ({self.max_stream_chunk_size})",
            self.default_stream_chunk_size,
        )
        _check(
            self.max_message_bytes >= _MIB, "max_message_bytes", ">= 1 MiB", self.max_message_bytes
        )
        _check(self.log_level in _LOG_LEVELS, "log_level", " | ".join(_LOG_LEVELS), self.log_level)
        _check(self.grace_period_s >= 0, "grace_period_s", "seconds >= 0", self.grace_period_s)
        _check(self.log_format in LOG_FORMATS, "log_format", " | ".join(LOG_FORMATS),
               self.log_format)  # fmt: skip
        if self.metrics_port is not None:
            _check(0 <= self.metrics_port <= 65535, "metrics_port", "0..65535", self.metrics_port)
        for name in ("tls_cert", "tls_key", "tls_client_ca", "auth_token_file"):
            value = getattr(self, name)
            object.__setattr__(self, name, None if value in (None, "") else Path(value))
        _check(
            self.reload_interval_s >= 0, "reload_interval_s", "seconds >= 0", self.reload_interval_s
        )
        self._check_model_control()
        _check(self.workers >= 1, "workers", "an integer >= 1", self.workers)
        for name in ("max_small_request_bytes", "max_request_fields", "max_inflight_calls",
                     "max_waiting_calls", "max_inflight_request_bytes", "max_pending_answer_bytes",
                     "max_concurrent_streams"):  # fmt: skip
            _check(getattr(self, name) >= 1, name, "an integer >= 1", getattr(self, name))
        for name in ("stream_stall_timeout_s", "min_ping_interval_s", "max_connection_idle_s"):
            _check(getattr(self, name) > 0, name, "seconds > 0", getattr(self, name))
        for name in ("max_connection_age_s", "max_connection_age_grace_s"):
            _check(getattr(self, name) >= 0, name, "seconds >= 0", getattr(self, name))

    def _check_model_control(self) -> None:
        mode = self.model_control_mode
        _check(mode in MODEL_CONTROL_MODES, "model_control_mode", " | ".join(MODEL_CONTROL_MODES),
               mode)  # fmt: skip
        if mode == "none" and self.reload_interval_s > 0:
            # A polling interval given without a mode (what --reload-interval always meant).
            object.__setattr__(self, "model_control_mode", "poll")
        elif mode == "poll":
            _check(self.reload_interval_s > 0, "reload_interval_s",
                   "seconds > 0 with model_control_mode poll", self.reload_interval_s)  # fmt: skip
        elif mode == "explicit":
            _check(self.reload_interval_s == 0, "reload_interval_s",
                   "0 with model_control_mode explicit (the API loads and unloads)",
                   self.reload_interval_s)  # fmt: skip
            # Each worker process holds its own models: a load would reach one of them.
            _check(self.workers == 1, "workers", "1 with model_control_mode explicit",
                   self.workers)  # fmt: skip

    def limits(self) -> Limits:
        """The bounds a request must keep, as ``GetModelInfo`` reports them."""
        return Limits(
            max_batch_size=self.batching.max_batch_size,
            max_samples_per_request=self.max_samples_per_request,
            max_message_bytes=self.max_message_bytes,
            max_stream_chunk_size=self.max_stream_chunk_size,
            default_stream_chunk_size=self.default_stream_chunk_size,
            max_stream_samples=self.max_stream_samples,
            max_score_samples=self.max_score_samples,
            max_score_rows=self.max_score_rows,
        )

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> ServerSettings:
        """Settings from VAESERVE_* variables (``os.environ`` by default), then ``overrides``.

        Raises:
            ValueError: a variable that does not parse, naming it and what was expected.
        """
        values = _defaults()
        values.update(from_environ(os.environ if environ is None else environ))
        values.update(overrides)
        return _build(values)

    @classmethod
    def from_args(
        cls, argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None
    ) -> ServerSettings:
        """Settings from command-line flags over VAESERVE_* variables over defaults.

        Raises:
            SystemExit: a flag that does not parse (argparse prints the usage).
        """
        parser = build_parser()
        try:
            values = _defaults()
            values.update(from_environ(os.environ if environ is None else environ))
        except ValueError as exc:
            parser.error(str(exc))
        parser.set_defaults(**values)
        args = vars(parser.parse_args(argv))
        if args.get("repository") is None:
            parser.error(f"--repository is required (or {ENV_PREFIX}REPOSITORY)")
        try:
            return _build(args)
        except ValueError as exc:
            parser.error(str(exc))
        raise AssertionError("unreachable")  # parser.error exits


def usable_cores() -> int:
    """The cores this process may run on (a container's share, not the host's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


_BATCHING_FIELDS = frozenset(f.name for f in dataclasses.fields(BatchingSettings))


def _defaults() -> dict[str, Any]:
    values: dict[str, Any] = {"repository": None}
    for f in dataclasses.fields(ServerSettings):
        if f.default is not dataclasses.MISSING:
            values[f.name] = f.default
    values.update(dataclasses.asdict(BatchingSettings()))
    values.update(_COMMAND_DEFAULTS)
    return values


def _build(values: Mapping[str, Any]) -> ServerSettings:
    if values.get("repository") is None:
        raise ValueError(f"repository is required (--repository or {ENV_PREFIX}REPOSITORY)")
    batching = BatchingSettings(**{k: v for k, v in values.items() if k in _BATCHING_FIELDS})
    server = {k: v for k, v in values.items() if k not in _BATCHING_FIELDS}
    return ServerSettings(**server, batching=batching)


def _shown_default(value: Any) -> str:
    if value is None:
        return "none"
    if isinstance(value, tuple):
        return ",".join(value) or "all"
    return str(value)


def build_parser() -> argparse.ArgumentParser:
    """The ``vae-serve`` argument parser; defaults are filled in by ``from_args``."""
    parser = argparse.ArgumentParser(
        prog="vae-serve",
        description="Serve VAE/CVAE models from a model repository over gRPC.",
        epilog=f"Every flag can also be set as {ENV_PREFIX}<FLAG>, e.g. {ENV_PREFIX}PORT=8001.",
    )
    defaults = _defaults()
    for flag in FLAGS:
        option = "--" + flag.name.replace("_", "-")
        # argparse's %(default)s would show None: defaults are applied after env variables.
        shown = _shown_default(defaults.get(flag.name)).replace("%", "%%")
        help_text = f"{flag.help} [default: {shown}; env {env_name(flag)}]"
        kwargs: dict[str, Any] = {"dest": flag.name, "type": flag.parse, "help": help_text}
        if flag.name == "device":
            kwargs["choices"] = DEVICES
        if flag.name == "models":
            kwargs["metavar"] = "NAME[,NAME...]"
        if flag.name == "log_format":
            kwargs["choices"] = LOG_FORMATS
        if flag.name == "queue_delay_policy":
            kwargs["choices"] = QUEUE_DELAY_POLICIES
        if flag.name == "model_control_mode":
            kwargs["choices"] = MODEL_CONTROL_MODES
        if flag.name == "http_port":
            kwargs["metavar"] = "PORT|off"
        parser.add_argument(option, *flag.aliases, **kwargs)
    return parser


def _check(ok: bool, name: str, expected: str, value: Any) -> None:
    if not ok:
        raise ValueError(f"{name}: expected {expected}, got {value!r}")
