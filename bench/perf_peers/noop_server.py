"""The floor under any Python OIP server: a grpc.aio ModelInfer that computes nothing.

Run: python bench/perf_peers/noop_server.py --onnx DIR/decoder.onnx [--name reference-decoder]

It answers ModelInfer with zeros of the right shape: the request is parsed by protobuf (to
read its batch size) and the answer's bytes are built once per batch size and re-sent, so a
call costs grpc.aio's machinery and one native parse. What vae-serve spends above this
server's figures is its own work (bench_perf_analyzer prints the ratio).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import numpy as np  # noqa: E402
from oip_common import Graph, InferenceBase, arguments, pb, serve  # noqa: E402


class NoOp(InferenceBase):
    def __init__(self, name: str, graph: Graph, max_batch: int):
        super().__init__(name, graph, max_batch)
        self._answers: dict[int, bytes] = {}

    async def ModelInfer(self, request, context):
        rows = request.inputs[0].shape[0]
        answer = self._answers.get(rows)
        if answer is None:
            response = pb.ModelInferResponse(model_name=self.name, model_version="1")
            for t in self.graph.outputs:
                out = response.outputs.add(name=t.name, datatype=t.datatype)
                out.shape.extend((rows, *t.dims))
                response.raw_output_contents.append(np.zeros((rows, *t.dims), t.dtype).tobytes())
            answer = self._answers[rows] = response
        return answer


def main() -> None:
    args = arguments(__doc__)
    serve(NoOp(args.name, Graph.read(args.onnx), args.max_batch), args.port)


if __name__ == "__main__":
    main()
