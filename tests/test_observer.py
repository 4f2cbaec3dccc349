"""RequestObserver's bookkeeping: which model each request names (its metrics label)."""

from __future__ import annotations

from vaeserve.proto.inference import grpc_service_pb2 as oip
from vaeserve.proto.v1 import vaeserve_pb2 as pb
from vaeserve.server.handlers import DetachedRequest, MalformedRequest
from vaeserve.server.observer import model_name_of


def test_the_model_label_comes_from_wherever_each_request_type_names_it():
    """model_name_of remembers per request type where the name is: asked twice, each request
    (a DetachedRequest by the type it wraps) still gives its own name."""
    requests = [
        (pb.SampleRequest(model=pb.ModelRef(name="a")), "a"),
        (pb.SampleStreamRequest(request=pb.SampleRequest(model=pb.ModelRef(name="b"))), "b"),
        (oip.ModelInferRequest(model_name="c-decoder"), "c-decoder"),
        (DetachedRequest(oip.ModelInferRequest(model_name="d-decoder"), {}), "d-decoder"),
        (DetachedRequest(pb.EncodeRequest(model=pb.ModelRef(name="e")), {}), "e"),
        (oip.ModelReadyRequest(name="f-encoder"), "f-encoder"),
        (pb.ListModelsRequest(), ""),
        (MalformedRequest("x", ValueError("bad")), ""),
    ]
    for _ in range(2):
        for request, name in requests:
            assert model_name_of(request) == name
    assert model_name_of(pb.SampleRequest(model=pb.ModelRef(name="other"))) == "other"
