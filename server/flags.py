"""Which ``vae-serve`` flags there are: each setting's flag (``--some-flag``), its environment
variable (``VAESERVE_SOME_FLAG``), how its text parses and its help. server/settings.py
builds the parser, the defaults and ``ServerSettings`` from this table.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["ENV_PREFIX", "FLAGS", "Flag", "env_name", "from_environ", "port_or_off"]

ENV_PREFIX = "VAESERVE_"


@dataclass(frozen=True)
class Flag:
    """One setting as the command line and the environment name it."""

    name: str  # the dataclass field, also the flag (with '-') and the variable (upper case)
    parse: Callable[[str], Any]
    help: str
    aliases: tuple[str, ...] = ()  # more option strings, e.g. "--reload-interval"


def _models(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(",") if part.strip())


def port_or_off(text: str) -> int | None:
    """A port number, or "off" (None): the value of --http-port."""
    return None if text.strip().lower() == "off" else int(text)


FLAGS = (
    Flag(
        "repository",
        Path,
        "model repository: <dir>/<name>/<version>/manifest.json",
        aliases=("--model-repository",),
    ),  # fmt: skip
    Flag(
        "models",
        _models,
        "comma-separated model names to serve (explicit mode: to load at start); empty: all",
        aliases=("--load-model",),
    ),  # fmt: skip
    Flag("host", str, "address to bind (0.0.0.0 in a container)"),
    Flag("port", int, "gRPC port to bind; 0 picks a free one", aliases=("--grpc-port",)),
    Flag(
        "http_port",
        port_or_off,
        "REST port of the Open Inference Protocol (v2 HTTP/JSON); 0 picks a free one; off: none",
    ),  # fmt: skip
    Flag("device", str, "onnxruntime device: auto (CUDA if available), cpu or cuda"),
    Flag("intra_op_threads", int, "onnxruntime threads within one run; 0: per core"),
    Flag("inter_op_threads", int, "onnxruntime threads across graph nodes; 0: default"),
    Flag("max_samples_per_request", int, "most rows in one unary call"),
    Flag("max_stream_samples", int, "most samples in one SampleStream call"),
    Flag("default_stream_chunk_size", int, "samples per streamed answer by default"),
    Flag("max_stream_chunk_size", int, "most samples per streamed answer"),
    Flag("max_score_samples", int, "most importance samples k per input of one Score call"),
    Flag("max_score_rows", int, "most decoder rows (inputs x k) of one Score call"),
    Flag(
        "max_message_bytes", int, "gRPC message size limit, both directions; REST infer body limit"
    ),
    Flag("grace_period_s", float, "seconds in-flight calls get to finish on SIGTERM"),
    Flag("log_level", str, "DEBUG, INFO, WARNING or ERROR"),
    Flag("log_format", str, "text, or json: one object per line"),
    Flag(
        "metrics_port",
        int,
        "serve Prometheus metrics at :PORT/metrics (0: any free port); unset: off",
    ),
    Flag("tls_cert", Path, "PEM certificate chain: serve TLS (needs --tls-key)"),
    Flag("tls_key", Path, "PEM private key of --tls-cert"),
    Flag("tls_client_ca", Path, "PEM CA bundle: require client certificates it signed"),
    Flag(
        "auth_token_file",
        Path,
        "file holding a bearer token every call but health needs (gRPC and REST)",
    ),
    Flag(
        "reload_interval_s",
        float,
        "rescan the repository every S seconds (0: on SIGHUP only)",
        aliases=("--reload-interval", "--repository-poll-secs"),
    ),  # fmt: skip
    Flag(
        "model_control_mode",
        str,
        "none: the models found at start (SIGHUP rescans); poll: also every reload interval; "
        "explicit: loaded and unloaded through the repository API",
    ),  # fmt: skip
    Flag("workers", int, "server processes sharing the port; >1: metrics on PORT+i each"),
    Flag("max_small_request_bytes", int, "largest request of a method that carries no tensors"),
    Flag("max_request_fields", int, "most protobuf fields in one request, nested included"),
    Flag("max_inflight_calls", int, "calls in progress before new ones get RESOURCE_EXHAUSTED"),
    Flag("max_waiting_calls", int, "calls not yet taken up; past it gRPC ends new ones CANCELLED"),
    Flag("max_inflight_request_bytes", int, "request bytes held by calls in progress, in all"),
    Flag("max_pending_answer_bytes", int, "streamed answer bytes not yet read by clients"),
    Flag(
        "stream_stall_timeout_s",
        float,
        "cut off a stream whose client reads nothing this long; REST: the time limit of a "
        "request's header and body and of reading the answer",
    ),
    Flag("max_concurrent_streams", int, "calls in progress on one connection"),
    Flag("min_ping_interval_s", float, "clients pinging more often than this get GOAWAY"),
    Flag(
        "max_connection_idle_s",
        float,
        "close a connection without calls after this (gRPC and REST)",
    ),
    Flag("max_connection_age_s", float, "close connections after this (0: never)"),
    Flag("max_connection_age_grace_s", float, "time in-progress calls get past the age"),
    Flag("max_batch_size", int, "rows per batched run; 1 switches batching off"),
    Flag("max_queue_delay_ms", float, "how long a request may wait to share a batch"),
    Flag("max_queue_size", int, "queued requests per graph before RESOURCE_EXHAUSTED"),
    Flag(
        "instances",
        int,
        "graph runs in flight at once, each single-threaded when > 1; 0: one per "
        "onnxruntime thread on CPU, 1 on CUDA",
    ),  # fmt: skip
    Flag(
        "queue_delay_policy",
        str,
        "adaptive: wait the queue delay only while recent batches were shared; "
        "always: every batch may wait it",
    ),  # fmt: skip
)


def env_name(flag: Flag) -> str:
    """The variable of ``flag``: VAESERVE_ and its name in upper case."""
    return ENV_PREFIX + flag.name.upper()


def from_environ(environ: Mapping[str, str]) -> dict[str, Any]:
    """The settings the VAESERVE_* variables of ``environ`` set, parsed.

    Raises:
        ValueError: naming the variable that does not parse.
    """
    values = {}
    for flag in FLAGS:
        text = environ.get(env_name(flag))
        if text is None or text == "":
            continue
        try:
            values[flag.name] = flag.parse(text)
        except ValueError:
            raise ValueError(
                f"{env_name(flag)}={text!r} is not valid: expected {flag.parse.__name__}"
            ) from None
    return values
