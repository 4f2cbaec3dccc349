"""A simple batching OIP server: grpc.aio + an asyncio queue + onnxruntime, nothing else.

Run: python bench/perf_peers/simple_batcher.py --onnx DIR/decoder.onnx [--instances 2]

What a small independent server does, as the peer vae-serve is measured against: each
ModelInfer's raw inputs are viewed as arrays and queued; one task per instance takes whatever
is queued (up to --max-batch rows, no waiting for company), runs it on a worker thread and
hands each request its rows. No limits, no metrics, no checks beyond the shapes.
"""

from __future__ import annotations

import asyncio
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import numpy as np  # noqa: E402
import onnxruntime as ort  # noqa: E402
from oip_common import Graph, InferenceBase, arguments, pb, serve  # noqa: E402


def session(graph: Graph, threads: int) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(graph.path), options, providers=["CPUExecutionProvider"])


class SimpleBatcher(InferenceBase):
    def __init__(self, name: str, graph: Graph, max_batch: int, instances: int, threads: int):
        super().__init__(name, graph, max_batch)
        self._max = max_batch
        self._queue: asyncio.Queue | None = None
        # One session per instance, each with cores // instances threads.
        self._sessions = [session(graph, threads) for _ in range(instances)]
        self._pool = ThreadPoolExecutor(instances)
        self._inputs = [t.name for t in graph.inputs]
        self._outputs = [t.name for t in graph.outputs]

    async def start(self) -> None:
        self._queue = asyncio.Queue()
        self._tasks = [asyncio.create_task(self._serve(s)) for s in self._sessions]

    async def ModelInfer(self, request, context):
        arrays = []
        for tensor, raw in zip(request.inputs, request.raw_input_contents, strict=True):
            spec = next(t for t in self.graph.inputs if t.name == tensor.name)
            arrays.append(np.frombuffer(raw, spec.dtype).reshape(tuple(tensor.shape)))
        future = asyncio.get_running_loop().create_future()
        await self._queue.put((arrays, future))
        outputs = await future
        response = pb.ModelInferResponse(model_name=self.name, model_version="1", id=request.id)
        for spec, array in zip(self.graph.outputs, outputs, strict=True):
            response.outputs.add(name=spec.name, datatype=spec.datatype, shape=array.shape)
            response.raw_output_contents.append(array.tobytes())
        return response

    async def _serve(self, sess: ort.InferenceSession) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = [await self._queue.get()]
            rows = len(batch[0][0][0])
            while not self._queue.empty() and rows < self._max:
                item = self._queue.get_nowait()
                batch.append(item)
                rows += len(item[0][0])
            feed = {
                name: np.concatenate([arrays[i] for arrays, _ in batch])
                for i, name in enumerate(self._inputs)
            }
            try:
                outputs = await loop.run_in_executor(self._pool, sess.run, self._outputs, feed)
            except Exception as exc:  # noqa: BLE001 - the callers get it
                for _, future in batch:
                    future.set_exception(exc)
                continue
            first = 0
            for arrays, future in batch:
                end = first + len(arrays[0])
                if not future.done():
                    future.set_result([o[first:end] for o in outputs])
                first = end


def main() -> None:
    args = arguments(__doc__)
    cores = len(os.sched_getaffinity(0))
    instances = args.instances or cores
    threads = args.threads or max(1, cores // instances)
    servicer = SimpleBatcher(args.name, Graph.read(args.onnx), args.max_batch, instances, threads)
    serve(servicer, args.port, servicer.start)


if __name__ == "__main__":
    main()
