"""A thread-pool OIP server without batching: grpc's synchronous server, one onnxruntime run
per ModelInfer on the handler's own thread.

Run: python bench/perf_peers/thread_pool_server.py --onnx DIR/decoder.onnx [--workers 16]

The other classic shape of a Python model server: no event loop and no queue, so a call's
path is short; onnxruntime releases the GIL, so concurrent calls run concurrently (each run on
a session of ``--threads`` threads, default 1: the handler threads are the parallelism).
"""

from __future__ import annotations

import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import grpc  # noqa: E402
import numpy as np  # noqa: E402
from oip_common import Graph, InferenceBase, arguments, bind, options, pb, pb_grpc  # noqa: E402
from simple_batcher import session  # noqa: E402


class ThreadPool(InferenceBase):
    def __init__(self, name: str, graph: Graph, max_batch: int, threads: int):
        super().__init__(name, graph, max_batch)
        self._session = session(graph, threads)
        self._outputs = [t.name for t in graph.outputs]
        self._dtypes = {t.name: t.dtype for t in graph.inputs}

    def ModelInfer(self, request, context):
        feed = {
            tensor.name: np.frombuffer(raw, self._dtypes[tensor.name]).reshape(tuple(tensor.shape))
            for tensor, raw in zip(request.inputs, request.raw_input_contents, strict=True)
        }
        outputs = self._session.run(self._outputs, feed)
        response = pb.ModelInferResponse(model_name=self.name, model_version="1", id=request.id)
        for spec, array in zip(self.graph.outputs, outputs, strict=True):
            response.outputs.add(name=spec.name, datatype=spec.datatype, shape=array.shape)
            response.raw_output_contents.append(array.tobytes())
        return response


def main() -> None:
    args = arguments(__doc__)
    servicer = ThreadPool(args.name, Graph.read(args.onnx), args.max_batch, args.threads or 1)
    server = grpc.server(ThreadPoolExecutor(args.workers), options=options())
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(servicer, server)
    bind(server, args.port)
    server.start()
    server.wait_for_termination()


if __name__ == "__main__":
    main()
