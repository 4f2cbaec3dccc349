"""Our Open Inference Protocol subset is wire-compatible with the protos Triton's client ships.

The tritonclient wheel carries its own generated ``inference`` protos. Importing them next to
ours fails in protobuf's descriptor pool (docs/architecture.md, "A trap"), so the test reads their
serialized descriptors out of the wheel's source without importing it, and compares every
message, field, enum value and RPC we declare with the upstream one of the same name.
"""

from __future__ import annotations

import ast
import importlib.util
from pathlib import Path

import pytest
from google.protobuf import descriptor_pb2
from missing import missing

from vaeserve.proto.inference import grpc_service_pb2, model_config_pb2

_F = descriptor_pb2.FieldDescriptorProto


def _upstream_file(module: str) -> descriptor_pb2.FileDescriptorProto:
    spec = importlib.util.find_spec("tritonclient")
    if spec is None or not spec.submodule_search_locations:
        missing("tritonclient is not installed (the dev extra installs it)")
    source = Path(spec.submodule_search_locations[0], "grpc", f"{module}.py").read_text()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "AddSerializedFile":
            return descriptor_pb2.FileDescriptorProto.FromString(ast.literal_eval(node.args[0]))
    raise AssertionError(f"no serialized descriptor in tritonclient/grpc/{module}.py")


def _ours(module) -> descriptor_pb2.FileDescriptorProto:
    proto = descriptor_pb2.FileDescriptorProto()
    module.DESCRIPTOR.CopyToProto(proto)
    return proto


def _messages(msgs, prefix: str) -> dict[str, descriptor_pb2.DescriptorProto]:
    out = {}
    for msg in msgs:
        name = f"{prefix}.{msg.name}"
        out[name] = msg
        out.update(_messages(msg.nested_type, name))
    return out


def _enums(file: descriptor_pb2.FileDescriptorProto) -> dict[str, dict[str, int]]:
    out = {f".inference.{e.name}": {v.name: v.number for v in e.value} for e in file.enum_type}
    for name, msg in _messages(file.message_type, ".inference").items():
        for e in msg.enum_type:
            out[f"{name}.{e.name}"] = {v.name: v.number for v in e.value}
    return out


def _field_key(msg: descriptor_pb2.DescriptorProto, field: _F) -> tuple:
    oneof = msg.oneof_decl[field.oneof_index].name if field.HasField("oneof_index") else None
    type_name = field.type_name.split(".")[-1] if field.type_name else ""
    return field.number, field.type, field.label, type_name, oneof


@pytest.fixture(scope="module")
def upstream():
    return [_upstream_file("service_pb2"), _upstream_file("model_config_pb2")]


@pytest.fixture(scope="module")
def ours():
    return [_ours(grpc_service_pb2), _ours(model_config_pb2)]


def test_every_field_matches_upstream(upstream, ours):
    theirs = {}
    for file in upstream:
        theirs.update(_messages(file.message_type, ".inference"))
    mine = {}
    for file in ours:
        mine.update(_messages(file.message_type, ".inference"))
    assert mine, "no messages in our inference protos"
    for name, msg in mine.items():
        assert name in theirs, f"{name} is not an upstream message"
        their_fields = {f.name: _field_key(theirs[name], f) for f in theirs[name].field}
        for field in msg.field:
            assert field.name in their_fields, f"{name}.{field.name} is not an upstream field"
            assert _field_key(msg, field) == their_fields[field.name], f"{name}.{field.name}"


def test_every_enum_value_matches_upstream(upstream, ours):
    theirs = {k: v for file in upstream for k, v in _enums(file).items()}
    for name, values in (kv for file in ours for kv in _enums(file).items()):
        assert name in theirs, f"{name} is not an upstream enum"
        assert values.items() <= theirs[name].items(), name


def test_every_rpc_matches_upstream(upstream, ours):
    (their_service,) = upstream[0].service
    (our_service,) = ours[0].service
    assert ours[0].package == upstream[0].package == "inference"
    assert our_service.name == their_service.name == "GRPCInferenceService"
    theirs = {m.name: (m.input_type, m.output_type) for m in their_service.method}
    for method in our_service.method:
        assert theirs.get(method.name) == (method.input_type, method.output_type), method.name
    required = {"ServerLive", "ServerReady", "ModelReady", "ServerMetadata", "ModelMetadata"}
    assert required | {"ModelInfer", "ModelConfig"} <= {m.name for m in our_service.method}
