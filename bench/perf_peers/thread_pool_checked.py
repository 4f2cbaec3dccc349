"""thread_pool_server.py plus vae-serve's own per-call work: what vae-serve would reach on
grpc's thread-pool server instead of grpc.aio, without rewriting it.

Run: python bench/perf_peers/thread_pool_checked.py --onnx DIR/decoder.onnx [--workers 16]

Unlike the other peers it imports vae-serve's server modules, on purpose: each ModelInfer is
parsed by vae-serve's request parser (``handlers.add_service``), checked by its tensor checks
(``oip_convert``: datatypes, shapes, row bound, finite values, the answer's size), answered by
its encoder, refused with its status codes and counted in its metrics; it runs on the
handler's thread as the thread-pool peer does. What it leaves out: the bearer token, the
in-flight bounds, the request observer, the registry and batching. The manifest is read from
the decoder's folder.
"""

from __future__ import annotations

import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import grpc  # noqa: E402
from oip_common import Graph, InferenceBase, arguments, bind, options, pb  # noqa: E402
from simple_batcher import session  # noqa: E402

from vaeserve.errors import VaeServeError  # noqa: E402
from vaeserve.manifest import load_version_manifest  # noqa: E402
from vaeserve.server import oip_convert as convert  # noqa: E402
from vaeserve.server.handlers import add_service  # noqa: E402
from vaeserve.server.metrics import ServerMetrics  # noqa: E402
from vaeserve.server.status import status_of  # noqa: E402

_MAX_FIELDS = 1 << 16


class CheckedThreadPool(InferenceBase):
    def __init__(self, name: str, graph: Graph, max_batch: int, threads: int):
        super().__init__(name, graph, max_batch)
        self._session = session(graph, threads)
        manifest = load_version_manifest(Path(graph.path).parent)
        self._manifest, self._max_rows = manifest, max_batch
        self._inputs, self._outputs = manifest.decoder.inputs, manifest.decoder.outputs
        self._metrics = ServerMetrics(max_batch)

    def ModelInfer(self, request, context):
        try:
            return self._infer(request)
        except VaeServeError as exc:  # vae-serve's status codes and messages
            context.abort(*status_of(exc))

    def _infer(self, request):
        start = time.perf_counter()
        arrays = convert.decode_inputs(request, self._inputs, self._max_rows)
        convert.check_values(self._manifest, arrays)
        names = convert.requested_outputs(request, self._outputs)
        rows = len(next(iter(arrays.values())))
        convert.check_answer_fits(rows, names, self._outputs, 256 << 20)
        names_out = list(self._outputs)
        outputs = dict(zip(names_out, self._session.run(names_out, arrays), strict=True))
        response = pb.ModelInferResponse(
            model_name=request.model_name, model_version="1", id=request.id
        )
        answer = convert.encode_outputs(response, outputs, names, self._outputs)
        self._metrics.observe_request("ModelInfer", self.name, "OK", time.perf_counter() - start)
        return answer


def main() -> None:
    args = arguments(__doc__)
    graph = Graph.read(args.onnx)
    servicer = CheckedThreadPool(args.name, graph, args.max_batch, args.threads or 1)
    server = grpc.server(ThreadPoolExecutor(args.workers), options=options())
    service = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    add_service(server, service, servicer, _MAX_FIELDS)
    bind(server, args.port)
    server.start()
    server.wait_for_termination()


if __name__ == "__main__":
    main()
