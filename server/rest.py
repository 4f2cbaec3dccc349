"""The Open Inference Protocol's REST transport: KServe v2 over HTTP/JSON, with Triton's
binary tensor data, model configuration, statistics and model repository extensions.

An aiohttp application on the server's event loop, beside gRPC. Like the gRPC servicer it only
translates: each endpoint hands its request to ``InferenceProtocol`` (server/inference_protocol
.py), so both transports resolve names, check tensors, batch and word errors in one place;
the bodies are converted by server/rest_tensors.py and server/rest_json.py. Errors carry
gRPC's text as ``{"error": "..."}`` under the HTTP status of their gRPC code
(``HTTP_STATUS``).

The gRPC interceptors' concerns are applied here per request, in the same order: metrics and
one log line per failure (under the gRPC method's name, so dashboards see both transports),
then the bearer token (health stays open), then the server-wide bounds of ``RequestLimits``
(calls and request bytes in flight are shared with gRPC). Body size, header and body time
bounds are server/rest_http.py's; an infer answer must be taken by its client within
``stream_stall_timeout_s`` too (``rest_http.send_answer``). Endpoints and examples: docs/rest.md.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import HttpVersion11, web

from vaeserve.errors import InvalidRequest
from vaeserve.proto.inference import grpc_service_pb2 as pb
from vaeserve.server import rest_json
from vaeserve.server import rest_tensors as tensors
from vaeserve.server.inference_protocol import InferenceProtocol
from vaeserve.server.limits import RequestLimits
from vaeserve.server.metrics import ServerMetrics
from vaeserve.server.observer import report_call
from vaeserve.server.rest_http import (
    HTTP_STATUS,
    Admission,
    GuardedSite,
    Refusal,
    binary_header_length,
    bind,
    json_response,
    model_and_version,
    read_body,
    readiness_response,
    send_answer,
    server_ssl_context,
)
from vaeserve.server.security import UNAUTHENTICATED_MESSAGE, bearer_credential
from vaeserve.server.settings import ServerSettings
from vaeserve.server.status import status_of

__all__ = ["HTTP_STATUS", "JSON_COST", "RestFrontend"]

logger = logging.getLogger(__name__)

# Memory a parsed JSON body holds per byte of its text, roughly (Python floats and list slots
# for numbers of a few characters): JSON bodies count this many times their size against
# max_inflight_request_bytes, binary data once.
JSON_COST = 8
# Bodies and answers past these sizes are converted on a worker thread, off the event loop.
_THREAD_BODY_BYTES = 256 << 10
_THREAD_ANSWER_VALUES = 1 << 16
# After the drain, how long aiohttp may take to finish writing answers and close connections.
_CLOSE_S = 1.0
_OPEN_PATHS = frozenset({"/v2/health/live", "/v2/health/ready"})
_MODEL = "/v2/models/{name}"
_VERSION = "/v2/models/{name}/versions/{version}"

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


_ADMISSION = web.RequestKey("admission", Admission)


class RestFrontend:
    """The protocol's REST endpoints on one port, answered by ``protocol``."""

    def __init__(
        self,
        protocol: InferenceProtocol,
        settings: ServerSettings,
        metrics: ServerMetrics,
        limits: RequestLimits,
        model_label: Callable[[str], str],
        token: str | None,
        reuse_port: bool = False,
    ):
        """Binds the port (``settings.host``, ``settings.http_port``); ``start`` serves it.

        Args:
            limits: the gRPC interceptor whose in-flight counts REST calls share.
            model_label: maps a requested model name to its metrics label.
            token: the bearer token every endpoint but health needs; None: no auth.
            reuse_port: share the port with other processes that set it too (``--workers``).

        Raises:
            RuntimeError: the address cannot be bound.
            ValueError: TLS files that cannot be used.
        """
        self._protocol = protocol
        self._settings = settings
        self._metrics = metrics
        self._limits = limits
        self._label = model_label
        self._token = None if token is None else token.encode("ascii")
        self._bounds = rest_json.JsonBounds(
            max_containers=max(settings.max_request_fields, 64 * settings.max_samples_per_request)
        )
        self._ssl = server_ssl_context(settings)
        assert settings.http_port is not None, "the REST port is off"
        self._sock = bind(settings.host, settings.http_port, reuse_port)
        self.port: int = self._sock.getsockname()[1]
        self._runner: web.AppRunner | None = None
        self._site: GuardedSite | None = None
        self._in_progress = 0

    @property
    def url(self) -> str:
        host = self._settings.host
        scheme = "https" if self._ssl else "http"
        return (
            f"{scheme}://[{host}]:{self.port}" if ":" in host else f"{scheme}://{host}:{self.port}"
        )

    def _app(self) -> web.Application:
        # client_max_size only bounds aiohttp's own readers, which no endpoint uses (read_body
        # has the per-method caps); set anyway, so that none can ever read more.
        app = web.Application(
            middlewares=[self._guarded], client_max_size=self._settings.max_message_bytes
        )
        get, e = app.router.add_get, self._endpoint
        s = self._settings

        def post(path: str, handler: Handler, cap: int = s.max_small_request_bytes) -> None:
            app.router.add_post(path, handler, expect_handler=self._expecting(cap))

        get("/v2/health/live", e("ServerLive", self._live))
        get("/v2/health/ready", e("ServerReady", self._ready))
        get("/v2", e("ServerMetadata", self._server_metadata))
        get("/v2/models/stats", e("ModelStatistics", self._statistics))
        for base in (_MODEL, _VERSION):
            get(base, e("ModelMetadata", self._model_metadata))
            get(f"{base}/ready", e("ModelReady", self._model_ready))
            get(f"{base}/config", e("ModelConfig", self._model_config))
            get(f"{base}/stats", e("ModelStatistics", self._statistics))
            post(f"{base}/infer", e("ModelInfer", self._infer), s.max_message_bytes)
        post("/v2/repository/index", e("RepositoryIndex", self._repository_index))
        post("/v2/repository/models/{name}/load", e("RepositoryModelLoad", self._load))
        post("/v2/repository/models/{name}/unload", e("RepositoryModelUnload", self._unload))
        return app

    async def start(self) -> None:
        """Start answering on the bound port."""
        s = self._settings
        self._runner = web.AppRunner(
            self._app(), access_log=None, shutdown_timeout=_CLOSE_S,
            keepalive_timeout=s.max_connection_idle_s,
            # An answered request's unread body is not read to drain it: the connection
            # closes once the answer is written (a refused body is never read).
            lingering_time=0,
        )  # fmt: skip
        await self._runner.setup()
        self._site = GuardedSite(
            self._runner, self._sock, s.stream_stall_timeout_s, s.max_connection_idle_s, self._ssl
        )
        await self._site.start()

    async def stop(self, grace_s: float | None) -> None:
        """Stop accepting connections, let requests in progress finish within ``grace_s``
        (None: as long as they take), then close every connection."""
        if self._runner is None:
            self._sock.close()
            return
        assert self._site is not None
        await self._site.stop()
        loop = asyncio.get_running_loop()
        end = None if grace_s is None else loop.time() + grace_s
        while self._in_progress and (end is None or loop.time() < end):
            await asyncio.sleep(0.02)
        await self._runner.cleanup()
        self._runner = None

    # --- what every request goes through ---

    @web.middleware
    async def _guarded(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """Stop the connection's header clock; answer unknown paths in JSON (401 first when
        the token is missing, as gRPC says UNAUTHENTICATED for unknown methods)."""
        guard = self._site.guard_of(request.protocol) if self._site else None
        if guard is not None:
            guard.request_started()
        self._in_progress += 1
        try:
            unmatched = request.match_info.http_exception
            if unmatched is not None:
                if not self._authorized(request):
                    response = self._unauthorized()
                else:
                    message = f"no endpoint {request.method} {request.path}"
                    response = json_response({"error": message}, unmatched.status)
            else:
                response = await handler(request)
            if not request.content.is_eof():
                response.force_close()  # an unread body is never drained: close instead
            return response
        finally:
            self._in_progress -= 1
            if guard is not None:
                guard.request_ended()

    def _expecting(self, cap: int) -> Callable[[web.Request], Awaitable[None]]:
        """An ``Expect: 100-continue`` handler that invites the body only when it will be
        read: the caller has the token and its Content-Length is within ``cap``. Otherwise
        the refusal (401, 413) comes before the client sends any of it."""

        async def expect(request: web.Request) -> None:
            if request.version != HttpVersion11:
                return
            if request.headers.get("Expect", "").lower() != "100-continue":
                raise web.HTTPExpectationFailed(text=f"Unknown Expect: {request.headers['Expect']}")
            length = request.content_length
            if self._authorized(request) and (length is None or length <= cap):
                await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
                request.writer.output_size = 0  # the answer's own size starts after it

        return expect

    def _authorized(self, request: web.Request) -> bool:
        if self._token is None or request.path in _OPEN_PATHS:
            return True
        given = bearer_credential(request.headers.get("Authorization", ""))
        # compare_digest takes the same time wherever the first differing byte is.
        return hmac.compare_digest(given, self._token)

    @staticmethod
    def _unauthorized() -> web.Response:
        response = json_response({"error": UNAUTHENTICATED_MESSAGE}, 401)
        response.headers["WWW-Authenticate"] = "Bearer"
        return response

    def _endpoint(self, rpc: str, method: Handler) -> Handler:
        """``method`` behind auth, the in-flight bounds, error mapping and metrics."""

        async def endpoint(request: web.Request) -> web.StreamResponse:
            start = time.perf_counter()
            model = request.match_info.get("name", "")
            code, message = "OK", ""
            admission = Admission(self._limits)
            try:
                if not self._authorized(request):
                    code, message = "UNAUTHENTICATED", UNAUTHENTICATED_MESSAGE
                    return self._unauthorized()
                admission.enter()
                request[_ADMISSION] = admission
                return await method(request)
            except asyncio.CancelledError:
                code = "CANCELLED"  # the client went away
                raise
            except Refusal as exc:
                code, message = exc.code, str(exc)
                return json_response({"error": message}, exc.status)
            except Exception as exc:  # noqa: BLE001 - the one place REST errors are mapped
                status, message = status_of(exc)
                code = status.name
                if code == "INTERNAL":
                    logger.error("unexpected error in REST %s", rpc, exc_info=exc)
                return json_response({"error": message}, HTTP_STATUS.get(code, 500))
            finally:
                admission.leave()
                label = self._label(model) if model else ""
                latency = time.perf_counter() - start
                report_call(self._metrics, rpc, label, code, latency, lambda: message, "rest")

        return endpoint

    async def _body(self, request: web.Request, cap: int) -> bytearray:
        admission = request[_ADMISSION]
        json_part = binary_header_length(request)

        def admit(size: int) -> None:
            json_size = size if json_part is None else min(json_part, size)
            admission.reserve(size + (JSON_COST - 1) * json_size)

        return await read_body(request, cap, self._settings.stream_stall_timeout_s, admit)

    async def _json_body(self, request: web.Request) -> dict[str, Any]:
        body = await self._body(request, self._settings.max_small_request_bytes)
        if not body.strip():
            return {}
        document = rest_json.load_json(body, "the request body", self._bounds)
        if not isinstance(document, dict):
            raise InvalidRequest("the request body is not a JSON object")
        return document

    # --- the endpoints ---

    async def _live(self, request: web.Request) -> web.StreamResponse:
        return readiness_response(True)

    async def _ready(self, request: web.Request) -> web.StreamResponse:
        return readiness_response(self._protocol.server_ready())

    async def _server_metadata(self, request: web.Request) -> web.StreamResponse:
        metadata = self._protocol.server_metadata()
        return json_response(
            {"name": metadata.name, "version": metadata.version,
             "extensions": list(metadata.extensions)}
        )  # fmt: skip

    async def _model_metadata(self, request: web.Request) -> web.StreamResponse:
        name, version = model_and_version(request)
        return json_response(
            rest_json.model_metadata_json(self._protocol.model_metadata(name, version))
        )

    async def _model_ready(self, request: web.Request) -> web.StreamResponse:
        return readiness_response(self._protocol.model_ready(*model_and_version(request)))

    async def _model_config(self, request: web.Request) -> web.StreamResponse:
        return json_response(
            rest_json.message_json(self._protocol.model_config(*model_and_version(request)))
        )

    async def _statistics(self, request: web.Request) -> web.StreamResponse:
        name, version = model_and_version(request)
        return json_response(rest_json.message_json(self._protocol.statistics(name, version)))

    async def _infer(self, request: web.Request) -> web.StreamResponse:
        name, version = model_and_version(request)
        header_length = binary_header_length(request)
        body = await self._body(request, self._settings.max_message_bytes)
        # Large conversions run on a thread: they hold the GIL, but the loop gets its turns.
        args = (body, header_length, name, version, self._bounds)
        if len(body) > _THREAD_BODY_BYTES:
            parsed = await asyncio.to_thread(tensors.infer_request, *args)
        else:
            parsed = tensors.infer_request(*args)
        deadline = None
        if parsed.timeout_us is not None:
            deadline = time.monotonic() + parsed.timeout_us / 1e6
        inference = await self._protocol.infer(parsed.request, deadline)
        answer = (inference, parsed.binary_outputs, parsed.binary_by_output)
        if sum(getattr(a, "size", 0) for a in inference.arrays.values()) > _THREAD_ANSWER_VALUES:
            header, buffers = await asyncio.to_thread(tensors.infer_response, *answer)
        else:
            header, buffers = tensors.infer_response(*answer)
        limit = self._settings.stream_stall_timeout_s
        if not buffers:
            return await send_answer(request, [header], "application/json", limit)
        return await send_answer(request, [header, *buffers], "application/octet-stream", limit)

    async def _repository_index(self, request: web.Request) -> web.StreamResponse:
        document = await self._json_body(request)
        ready = document.get("ready", False)
        if not isinstance(ready, bool):
            raise InvalidRequest(f"ready is {ready!r}, expected true or false")
        index = await self._protocol.repository_index(pb.RepositoryIndexRequest(ready=ready))
        return json_response([rest_json.message_json(m) for m in index.models])

    async def _load(self, request: web.Request) -> web.StreamResponse:
        document = await self._json_body(request)
        load = pb.RepositoryModelLoadRequest(model_name=request.match_info["name"])
        rest_json.repository_parameters(document.get("parameters", {}), load.parameters)
        await self._protocol.repository_model_load(load)
        return web.Response(status=200)

    async def _unload(self, request: web.Request) -> web.StreamResponse:
        document = await self._json_body(request)
        unload = pb.RepositoryModelUnloadRequest(model_name=request.match_info["name"])
        rest_json.repository_parameters(document.get("parameters", {}), unload.parameters)
        await self._protocol.repository_model_unload(unload)
        return web.Response(status=200)
