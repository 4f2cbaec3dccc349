"""The server: builds it, starts it, loads the models, and shuts it down gracefully.

Run: vae-serve --repository models [--host 0.0.0.0] [--port 8001] [--http-port 8000|off]
               [--device auto|cpu|cuda]
               [--max-batch-size 1024] [--max-queue-delay-ms 1]
               [--queue-delay-policy adaptive|always] [--instances N] [--metrics-port 9090]
               [--tls-cert F --tls-key F [--tls-client-ca F]] [--auth-token-file F]
               [--reload-interval S] [--workers N]

One port carries the typed API, the Open Inference Protocol (KServe v2, with Triton's
ModelConfig), the standard ``grpc.health.v1`` service (NOT_SERVING until every model is loaded
and warm) and server reflection; each front end is a ``ServiceAdder`` in ``SERVICES``.
Cross-cutting concerns are interceptors: the request observer (metrics, one log line per
failed call), then bearer-token auth, then the server-wide bounds. ``--http-port`` (on by
default for the command, off for settings built in code) also serves the Open Inference
Protocol over REST (server/rest.py), with the same protocol core, token, TLS files, bounds
and metrics, on the same event loop. Prometheus metrics are served on their own HTTP port.
SIGHUP (and ``--reload-interval``) rescans the repository (server/reload.py). SIGTERM: health
goes NOT_SERVING, new calls get UNAVAILABLE (REST: 503), in-flight calls get
``grace_period_s`` to finish, the process exits 0. ``--workers N`` (N > 1) runs N such
processes on one port (and one REST port) under a supervisor (server/workers.py).
"""

from __future__ import annotations

import asyncio
import gc
import logging
import signal
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from vaeserve.engine.runner import ProviderUnavailable, runner_factory
from vaeserve.proto.inference import grpc_service_pb2 as oip_pb
from vaeserve.proto.v1 import vaeserve_pb2 as pb
from vaeserve.server import model_control
from vaeserve.server.handlers import add_service
from vaeserve.server.inference_protocol import GRAPHS, InferenceProtocol
from vaeserve.server.limits import RequestLimits, connection_options
from vaeserve.server.memory import keep_freed_memory
from vaeserve.server.metrics import MetricsEndpoint, ServerMetrics
from vaeserve.server.observer import UNKNOWN_MODEL, RequestObserver
from vaeserve.server.oip_servicer import OipServicer
from vaeserve.server.reload import Reloader, ReloadPlan
from vaeserve.server.repository import ModelRegistry, RepositoryError
from vaeserve.server.security import BearerTokenInterceptor, read_token, settings_credentials
from vaeserve.server.servicer import VaeServicer
from vaeserve.server.settings import ServerSettings

if TYPE_CHECKING:
    from vaeserve.server.rest import RestFrontend

__all__ = ["ServiceAdder", "SERVICES", "VaeServer", "create_server", "serve", "run"]

logger = logging.getLogger(__name__)

# Shutdown waits until no new call has arrived for this long before gRPC stops accepting.
_QUIET_S = 0.05
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING

# Adds one servicer to the server and returns the full names of the services it added; the
# protocol is the one Open Inference Protocol front every transport of this server shares.
ServiceAdder = Callable[
    [grpc.aio.Server, ModelRegistry, ServerSettings, InferenceProtocol], Sequence[str]
]


def add_typed_api(
    server: grpc.aio.Server, registry: ModelRegistry, settings: ServerSettings,
    protocol: InferenceProtocol,
) -> Sequence[str]:  # fmt: skip
    service = pb.DESCRIPTOR.services_by_name["VaeService"]
    servicer = VaeServicer(registry, settings)
    return [add_service(server, service, servicer, settings.max_request_fields)]


def add_inference_protocol(
    server: grpc.aio.Server, registry: ModelRegistry, settings: ServerSettings,
    protocol: InferenceProtocol,
) -> Sequence[str]:  # fmt: skip
    service = oip_pb.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    servicer = OipServicer(protocol)
    return [add_service(server, service, servicer, settings.max_request_fields)]


SERVICES: tuple[ServiceAdder, ...] = (add_typed_api, add_inference_protocol)


class VaeServer:
    """A grpc.aio server and what it serves: the registry and the health service; and the
    REST front end when there is one."""

    def __init__(
        self,
        grpc_server: grpc.aio.Server,
        registry: ModelRegistry,
        health_servicer: health.aio.HealthServicer,
        service_names: Sequence[str],
        port: int,
        settings: ServerSettings,
        rest: RestFrontend | None = None,
    ):
        """Args:
        settings: also the metrics port, its TLS files and the reload interval.
        rest: the protocol's REST front end, its port already bound; None: no REST port.
        """
        self.grpc_server = grpc_server
        self.registry = registry
        self.health = health_servicer
        self.port = port
        self.rest = rest
        self.http_port: int | None = None if rest is None else rest.port
        self.metrics_port: int | None = None  # once start() has bound it
        self._settings = settings
        self._service_names = list(service_names)
        self._load_task: asyncio.Task[None] | None = None
        self._metrics_endpoint: MetricsEndpoint | None = None
        self.reloader: Reloader = model_control.reloader(registry, settings)  # by mode
        self._stopped = False

    async def start(self) -> None:
        """Start answering (health NOT_SERVING) and load the models in the background."""
        s = self._settings
        if s.metrics_port is not None:
            tls = [None if p is None else str(p) for p in (s.tls_cert, s.tls_key, s.tls_client_ca)]
            self._metrics_endpoint = MetricsEndpoint(
                self.registry.metrics.registry, s.host, s.metrics_port, *tls
            )
            self.metrics_port = self._metrics_endpoint.port
        await self.grpc_server.start()
        if self.rest is not None:
            await self.rest.start()
        self._load_task = asyncio.get_running_loop().create_task(self._load(), name="load")

    async def _load(self) -> None:
        await self.registry.load()
        # Explicit mode may start empty (models come through the repository API), unless
        # the models it was told to load all failed.
        explicit = self._settings.model_control_mode == "explicit"
        if self.registry.count() == 0 and (not explicit or self._settings.models):
            raise RepositoryError("no model version could be loaded; see the errors above")
        for name in ("", *self._service_names):
            await self.health.set(name, SERVING)
        logger.info("ready: health is SERVING")
        self.reloader.start()  # rescans only once the first load is done

    async def reload(self) -> ReloadPlan:
        """Rescan the repository now (what SIGHUP asks for) and return what changed."""
        return await self.reloader.rescan()

    async def wait_ready(self) -> None:
        """Return once every model is loaded and warm.

        Raises:
            RepositoryError: nothing could be loaded (or the repository is unusable).
        """
        assert self._load_task is not None, "start() first"
        await asyncio.shield(self._load_task)

    async def stop(self, grace_s: float | None = None) -> None:
        """Health NOT_SERVING, refuse new calls, let in-flight ones finish, stop batchers."""
        if self._stopped:
            return
        self._stopped = True
        await self.reloader.stop()
        await self.health.enter_graceful_shutdown()
        self.registry.drain()  # from here on, new calls get UNAVAILABLE from the servicers
        if self._load_task is not None and not self._load_task.done():
            self._load_task.cancel()
        loop = asyncio.get_running_loop()
        end = None if grace_s is None else loop.time() + grace_s
        if not await self._drained(end):
            logger.warning(
                "%d call(s) did not finish within the grace period", self.registry.in_flight
            )
        left = None if end is None else max(0.0, end - loop.time())
        if self.rest is None:
            await self.grpc_server.stop(left)
        else:
            await asyncio.gather(self.grpc_server.stop(left), self.rest.stop(left))
        await self.registry.close()
        if self._load_task is not None:  # collect its outcome: cancelled, failed or done
            await asyncio.gather(self._load_task, return_exceptions=True)
        if self._metrics_endpoint is not None:
            await asyncio.to_thread(self._metrics_endpoint.close)

    async def _drained(self, end: float | None) -> bool:
        """Keep answering until in-flight calls are done and new ones stopped coming.

        Once gRPC itself stops, a call it had accepted but not yet handed to a servicer
        would end CANCELLED; until then, such calls reach us and get UNAVAILABLE.

        Returns:
            False if ``end`` (loop time) came first.
        """
        loop = asyncio.get_running_loop()
        while True:
            refused = self.registry.refused
            await asyncio.sleep(_QUIET_S)
            if self.registry.in_flight == 0 and self.registry.refused == refused:
                return True
            if end is not None and loop.time() >= end:
                return False

    async def wait_for_termination(self) -> None:
        await self.grpc_server.wait_for_termination()


async def create_server(
    settings: ServerSettings,
    services: Sequence[ServiceAdder] = SERVICES,
    interceptors: Sequence[grpc.aio.ServerInterceptor] = (),
    credentials: grpc.ServerCredentials | None = None,
    reuse_port: bool = False,
) -> tuple[VaeServer, int]:
    """Build the server and bind its ports; call ``start()`` on the result to serve.

    Must run inside the event loop that will serve it (grpc.aio binds to it).

    Args:
        services: the servicers to add besides health and reflection.
        interceptors: more grpc.aio server interceptors, outermost first; they run inside
            the request observer and the token check that ``settings`` asks for.
        credentials: TLS credentials; None: those of ``settings.tls_*``, or an insecure port.
        reuse_port: share the port with other processes that set it too (``--workers``).

    Returns:
        (server, port): port is the bound gRPC one (useful with ``settings.port == 0``); the
        REST one is ``server.http_port``.

    Raises:
        ProviderUnavailable: ``settings.device`` is "cuda" and CUDA is not available.
        RepositoryError: the repository folder does not exist.
        ValueError: a TLS or token file that is missing, unreadable or malformed.
        RuntimeError: an address cannot be bound.
    """
    open_graph = runner_factory(
        settings.device, settings.intra_op_threads, settings.inter_op_threads
    )
    if not settings.repository.is_dir():
        raise RepositoryError(f"repository {settings.repository} is not a folder")
    credentials = credentials or settings_credentials(settings)
    registry = ModelRegistry(
        settings,
        open_graph,
        ServerMetrics(settings.batching.max_batch_size),
    )
    token = None if settings.auth_token_file is None else read_token(settings.auth_token_file)
    label = _model_label(registry)
    # Outermost first: the observer also counts and logs the calls that auth turns away.
    guards: list[grpc.aio.ServerInterceptor] = [RequestObserver(registry.metrics, label)]
    if token is not None:
        guards.append(BearerTokenInterceptor(token))
    # Inside the token check: a caller without the token is never counted nor parsed.
    limits = RequestLimits(settings)
    guards.append(limits)
    grpc_server = grpc.aio.server(
        interceptors=[*guards, *interceptors],
        options=[
            ("grpc.max_send_message_length", settings.max_message_bytes),
            ("grpc.max_receive_message_length", settings.max_message_bytes),
            # A port in use is an error, not silently shared, unless our own workers share it.
            ("grpc.so_reuseport", int(reuse_port)),
            *connection_options(settings),
        ],
    )
    protocol = InferenceProtocol(registry, settings, registry.metrics)
    names = [name for add in services for name in add(grpc_server, registry, settings, protocol)]
    health_servicer = health.aio.HealthServicer()
    for name in ("", *names):
        await health_servicer.set(name, NOT_SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, grpc_server)
    reflection.enable_server_reflection(
        [*names, health.SERVICE_NAME, reflection.SERVICE_NAME], grpc_server
    )
    address = _address(settings.host, settings.port)
    if credentials is None:
        port = grpc_server.add_insecure_port(address)
    else:
        port = grpc_server.add_secure_port(address, credentials)
    if port == 0:
        raise RuntimeError(f"could not bind {address}")
    rest = None
    if settings.http_port is not None:
        # Imported here: a server without a REST port never loads aiohttp.
        from vaeserve.server.rest import RestFrontend

        rest = RestFrontend(protocol, settings, registry.metrics, limits, label, token, reuse_port)
    server = VaeServer(grpc_server, registry, health_servicer, names, port, settings, rest)
    return server, port


def _model_label(registry: ModelRegistry) -> Callable[[str], str]:
    """Request metrics label a model by the name asked for, if served (the typed API's
    ``NAME`` or the protocol's ``NAME-encoder``), else as one "unknown" label."""

    def label(name: str) -> str:
        if registry.versions(name):
            return name
        base, _, graph = name.rpartition("-")
        return name if graph in GRAPHS and registry.versions(base) else UNKNOWN_MODEL

    return label


def _address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


async def serve(
    settings: ServerSettings,
    reuse_port: bool = False,
    on_ready: Callable[[], None] | None = None,
) -> int:
    """Serve until SIGTERM/SIGINT; return the process exit code.

    Args:
        reuse_port: see ``create_server``.
        on_ready: called once every model is loaded and warm (a worker tells its supervisor).
    """
    server, port = await create_server(settings, reuse_port=reuse_port)
    await server.start()
    logger.info("listening on %s", _address(settings.host, port))
    if server.rest is not None:  # after gRPC's line, which tools read the port from
        logger.info("REST listening on %s", server.rest.url)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, server.reloader.trigger)
    ready = loop.create_task(server.wait_ready())
    stopping = loop.create_task(stop.wait())
    await asyncio.wait([ready, stopping], return_when=asyncio.FIRST_COMPLETED)
    code = 0
    if ready.done() and ready.exception() is not None:
        logger.error("cannot serve: %s", ready.exception())
        code = 1
    else:
        if ready.done():
            # Everything alive now (models, sessions, protobuf descriptors) lives as long as
            # the process: out of the collector's sight, its first full collection under load
            # pauses the loop < 1 ms instead of 15-19 ms (docs/performance.md). Here, not in
            # VaeServer: it concerns the whole process, which the command owns.
            gc.collect()
            gc.freeze()
            if on_ready is not None:
                on_ready()
        await stopping
        logger.info("shutting down: in-flight calls get %.1f s", settings.grace_period_s)
    stopping.cancel()
    await server.stop(settings.grace_period_s)
    logger.info("stopped")
    return code


def run(
    settings: ServerSettings,
    reuse_port: bool = False,
    on_ready: Callable[[], None] | None = None,
) -> int:
    """Serve in this process (logging already configured); return the exit code."""
    keep_freed_memory()
    try:
        return asyncio.run(serve(settings, reuse_port, on_ready))
    except (ProviderUnavailable, RepositoryError, RuntimeError, ValueError) as exc:
        logger.error("cannot start: %s", exc)
        return 2
