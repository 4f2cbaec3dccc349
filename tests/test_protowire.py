"""protowire: bytes fields written and read around protobuf, checked against protobuf itself.

Writing: ``bytes_field`` pieces appended to a serialized head parse (with protobuf) to the
message protobuf would have built, merged along the path, with numpy chunks taken as they are.
Reading: ``detach`` leaves a rest that protobuf parses to the message without those fields,
hands the fields out as views of the received bytes, keeps unknown fields and every wire type,
and raises only ``MalformedMessage`` on bad bytes. Then the server -> client round trip.
"""

from __future__ import annotations

import numpy as np
import pytest
from google.protobuf.message import DecodeError
from hypothesis import given, settings
from hypothesis import strategies as st

from vaeserve.client.tensors import answer_parser
from vaeserve.proto.inference import grpc_service_pb2 as oip
from vaeserve.proto.v1 import vaeserve_pb2 as pb
from vaeserve.protowire import (
    MalformedMessage,
    bytes_field,
    detach,
    field_path,
    fields_of_type,
    serialize,
    varint,
)
from vaeserve.tensors import describe

TENSORS = ("samples", "labels", "latents")
PATHS = {name: field_path(pb.SampleResponse, name, "data") for name in TENSORS}
SAMPLES = PATHS["samples"]
RAW_OUTPUT = field_path(oip.ModelInferResponse, "raw_output_contents")

heads = st.builds(
    pb.SampleResponse,
    model_name=st.text(max_size=8),
    model_version=st.integers(-(2**63), 2**63 - 1),
    seed=st.integers(0, 2**64 - 1),
    start_index=st.integers(-(2**63), 2**63 - 1),
)
tensors = st.builds(
    pb.Tensor,
    dtype=st.sampled_from([pb.FLOAT32, pb.FLOAT16, pb.INT64, pb.UINT8]),
    shape=st.lists(st.integers(0, 2**40), max_size=3),
    data=st.binary(max_size=40),
)
chunk_lists = st.lists(st.binary(max_size=12), max_size=5)  # zero chunks, empty chunks


def key(number: int, wire_type: int) -> bytes:
    return varint(number << 3 | wire_type)


def ld(number: int, payload: bytes) -> bytes:
    """A length-delimited field, written by hand."""
    return key(number, 2) + varint(len(payload)) + payload


@pytest.mark.parametrize("n", [0, 1, 127, 128, 300, 2**32, 2**63 - 1, 2**64 - 1])
def test_varint_is_protobufs_own_encoding(n):
    wire = pb.SampleRequest(seed=n).SerializeToString()  # optional uint64: sent even when 0
    assert wire == key(5, 0) + varint(n)


def test_varint_refuses_negative_values():
    with pytest.raises(ValueError, match="-1"):
        varint(-1)


def test_field_path_gives_the_descriptors_numbers():
    fields = pb.SampleResponse.DESCRIPTOR.fields_by_name
    for name in TENSORS:
        expected = (fields[name].number, pb.Tensor.DESCRIPTOR.fields_by_name["data"].number)
        assert field_path(pb.SampleResponse, name, "data") == expected
    assert field_path(pb.SampleResponse, "seed") == (fields["seed"].number,)
    assert RAW_OUTPUT == (
        oip.ModelInferResponse.DESCRIPTOR.fields_by_name["raw_output_contents"].number,
    )


def test_a_path_through_a_non_message_field_or_an_empty_path_is_refused():
    with pytest.raises(ValueError, match="model_name is not a message field"):
        field_path(pb.SampleResponse, "model_name", "data")
    with pytest.raises(ValueError, match="path is empty"):
        bytes_field((), [b"x"])


@settings(max_examples=150, deadline=None)
@given(head=heads, chunks=chunk_lists, described=st.booleans(), labels=st.none() | tensors)
def test_appended_field_parses_as_the_message_protobuf_builds(head, chunks, described, labels):
    if described:
        head.samples.dtype = pb.UINT8
        head.samples.shape.extend([len(b"".join(chunks)), 1])
    if labels is not None:
        head.labels.CopyFrom(labels)
    expected = pb.SampleResponse()
    expected.CopyFrom(head)
    expected.samples.data = b"".join(chunks)
    wire = b"".join([head.SerializeToString(), *bytes_field(SAMPLES, chunks)])
    parsed = pb.SampleResponse.FromString(wire)
    assert parsed == expected
    assert parsed.HasField("samples")
    assert (parsed.samples.dtype, list(parsed.samples.shape)) == (
        (head.samples.dtype, list(head.samples.shape)) if described else (0, [])
    )


def test_repeated_bytes_field_appends_arrays_in_order_without_copying_them():
    head = oip.ModelInferResponse(model_name="m")
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    y = np.arange(5, dtype=np.uint8)
    first, second = bytes_field(RAW_OUTPUT, [x]), bytes_field(RAW_OUTPUT, [y])
    assert first[1].obj is x and second[1].obj is y
    assert np.shares_memory(np.frombuffer(first[1], np.uint8), x)
    wire = b"".join([head.SerializeToString(), *first, *second])
    parsed = oip.ModelInferResponse.FromString(wire)
    assert list(parsed.raw_output_contents) == [x.tobytes(), y.tobytes()]
    assert parsed.model_name == "m"

    rest, found = detach(wire, [RAW_OUTPUT])
    assert rest == head.SerializeToString()
    assert [bytes(v) for v in found[RAW_OUTPUT]] == [x.tobytes(), y.tobytes()]


@pytest.mark.parametrize("shape", [(0,), (0, 784), (2, 0, 3)])
def test_arrays_without_elements_give_an_empty_field(shape):
    wire = b"".join(bytes_field(RAW_OUTPUT, [np.zeros(shape, np.float32)]))
    assert list(oip.ModelInferResponse.FromString(wire).raw_output_contents) == [b""]


def test_a_three_step_path_adds_an_entry_to_a_repeated_message_field():
    path = field_path(oip.ModelInferResponse, "outputs", "contents", "bytes_contents")
    head = oip.ModelInferResponse()
    head.outputs.add(name="a")
    wire = b"".join([head.SerializeToString(), *bytes_field(path, [b"ab", b"", b"c"])])
    outputs = oip.ModelInferResponse.FromString(wire).outputs
    assert [o.name for o in outputs] == ["a", ""]
    assert list(outputs[1].contents.bytes_contents) == [b"abc"]


@settings(max_examples=150, deadline=None)
@given(
    head=heads,
    parts=st.fixed_dictionaries({name: st.none() | tensors for name in TENSORS}),
    detached=st.sets(st.sampled_from(TENSORS)),
)
def test_detach_leaves_protobufs_message_without_the_fields_and_views_them(head, parts, detached):
    for name, tensor in parts.items():
        if tensor is not None:
            getattr(head, name).CopyFrom(tensor)
    raw = head.SerializeToString()
    rest, found = detach(raw, [PATHS[name] for name in detached])

    expected = pb.SampleResponse()
    expected.CopyFrom(head)
    for name in detached:
        if expected.HasField(name):
            getattr(expected, name).ClearField("data")
    assert pb.SampleResponse.FromString(rest) == expected
    sent = {n for n in detached if parts[n] is not None and parts[n].data}  # b"" is not sent
    assert {PATHS[n]: [bytes(v) for v in found[PATHS[n]]] for n in sent} == {
        PATHS[n]: [parts[n].data] for n in sent
    }
    assert found.keys() == {PATHS[n] for n in sent}
    for views in found.values():
        assert views[0].obj is raw
        assert np.shares_memory(np.frombuffer(views[0], np.uint8), np.frombuffer(raw, np.uint8))


def test_repeated_occurrences_of_a_sub_message_are_listed_in_wire_order():
    first = pb.SampleResponse(samples=pb.Tensor(dtype=pb.UINT8, data=b"first"))
    second = pb.SampleResponse(samples=pb.Tensor(shape=[7], data=b"second!"))
    raw = first.SerializeToString() + second.SerializeToString()
    rest, found = detach(raw, [SAMPLES])
    assert [bytes(v) for v in found[SAMPLES]] == [b"first", b"second!"]
    whole = pb.SampleResponse.FromString(raw)
    assert whole.samples.data == bytes(found[SAMPLES][-1])  # protobuf's last-one-wins
    whole.samples.ClearField("data")
    assert pb.SampleResponse.FromString(rest) == whole


def test_unknown_fields_and_every_wire_type_pass_through_unchanged():
    # Known fields in number order, then unknown ones: the order protobuf writes them in.
    kept_before = key(1, 0) + varint(pb.FLOAT32) + ld(2, varint(3) + varint(300))
    kept_after = key(90, 5) + b"\x01\x02\x03\x04" + key(91, 1) + bytes(range(8)) + ld(92, b"?")
    tensor = kept_before + ld(3, b"DATA") + kept_after
    before = ld(1, b"name") + key(3, 0) + varint(2**64 - 1)
    after = key(99, 5) + b"abcd" + key(100, 1) + b"12345678" + ld(101, b"unknown")
    after += key(102, 0) + varint(2**63)
    rest, found = detach(before + ld(5, tensor) + after, list(PATHS.values()))
    assert rest == before + ld(5, kept_before + kept_after) + after
    assert [bytes(v) for v in found[SAMPLES]] == [b"DATA"] and len(found) == 1
    parsed = pb.SampleResponse.FromString(rest)
    assert (parsed.model_name, parsed.seed, list(parsed.samples.shape)) == (
        "name",
        2**64 - 1,
        [3, 300],
    )
    assert parsed.SerializeToString() == rest  # the unknown fields survive protobuf too


@pytest.mark.parametrize(
    "raw",
    [
        pytest.param(b"\x80", id="truncated-key"),
        pytest.param(key(3, 0) + b"\xff", id="truncated-varint"),
        pytest.param(key(3, 0) + b"\xff" * 10 + b"\x01", id="varint-over-10-bytes"),
        pytest.param(key(1, 2) + varint(5) + b"abc", id="length-past-the-end"),
        pytest.param(key(1, 2) + b"\x80", id="truncated-length"),
        pytest.param(ld(5, key(3, 2) + varint(9) + b"abc"), id="nested-length-past-the-end"),
        pytest.param(ld(5, key(1, 0)), id="nested-truncated-varint"),
        pytest.param(ld(5, key(9, 3)), id="nested-group"),
        # Followed by bytes that would parse if the field were skipped as empty, or as a varint.
        *(pytest.param(key(9, t) + key(1, 0) + b"\x01", id=f"wire-type-{t}") for t in (3, 4, 6, 7)),
        *(pytest.param(key(9, t) + b"\x01\x08\x01", id=f"wire-type-{t}-then-byte") for t in (3, 6)),
        pytest.param(key(100, 1) + bytes(7), id="fixed64-cut-short"),
        pytest.param(key(99, 5) + bytes(3), id="fixed32-cut-short"),
    ],
)
def test_malformed_bytes_raise_malformed_message(raw):
    with pytest.raises(MalformedMessage):
        detach(raw, list(PATHS.values()))


def _mutated(data) -> bytes:
    """A well-formed answer, cut short or with one byte changed."""
    message = data.draw(heads)
    message.samples.CopyFrom(data.draw(tensors))
    raw = bytearray(message.SerializeToString())
    at = data.draw(st.integers(0, len(raw)))
    if data.draw(st.booleans()) or at == len(raw):
        return bytes(raw[:at])
    raw[at] = data.draw(st.integers(0, 255))
    return bytes(raw)


@settings(max_examples=200, deadline=None)
@given(data=st.data())
def test_any_bytes_give_malformed_message_or_a_rest_consistent_with_protobuf(data):
    raw = data.draw(st.binary(max_size=48)) if data.draw(st.booleans()) else _mutated(data)
    try:
        rest, found = detach(raw, list(PATHS.values()))
    except MalformedMessage:
        return
    try:
        parsed = pb.SampleResponse.FromString(rest)
    except DecodeError:
        # What detach passed on must be malformed only where raw was: a rest that protobuf
        # rejects is fine only if it rejects raw too (detach left the fault in place).
        with pytest.raises(DecodeError):
            pb.SampleResponse.FromString(raw)
        return
    for name, path in PATHS.items():
        if path in found:
            getattr(parsed, name).data = bytes(found[path][-1])
    assert pb.SampleResponse.FromString(raw) == parsed


def test_server_answer_round_trips_through_the_client_parser_without_copies():
    samples = np.random.default_rng(0).random((5, 1, 8, 8), dtype=np.float32)
    labels = np.arange(5, dtype=np.int64)
    answer = pb.SampleResponse(model_name="mnist", model_version=3, seed=7)
    fields = [
        (PATHS[name], [describe(a, out=getattr(answer, name))])
        for name, a in [("samples", samples), ("labels", labels)]
    ]
    raw = serialize(answer, fields)
    parsed = answer_parser(pb.SampleResponse, *TENSORS)(raw)
    assert (parsed.message.model_name, parsed.message.seed) == ("mnist", 7)
    assert parsed.message.samples.data == b"" and parsed.message.labels.data == b""
    for name, original in [("samples", samples), ("labels", labels)]:
        back = parsed.tensor(name)
        assert back.dtype == original.dtype and back.shape == original.shape
        np.testing.assert_array_equal(back, original)
        assert not back.flags.writeable
        assert np.shares_memory(back, np.frombuffer(raw, np.uint8))
    assert parsed.optional_tensor("latents") is None


def test_fields_of_type_finds_every_tensor_field_and_its_data():
    tensor = pb.Tensor.DESCRIPTOR.full_name
    assert fields_of_type(pb.SampleResponse, tensor, "data") == PATHS
    assert fields_of_type(pb.EncodeRequest, tensor, "data") == {
        "x": field_path(pb.EncodeRequest, "x", "data")
    }
    assert fields_of_type(pb.SampleRequest, tensor, "data") == {}


# --- the server's request parser: protobuf first for short messages, the walk's outcome ---

REQUESTS = (oip.ModelInferRequest, pb.SampleRequest, oip.RepositoryModelLoadRequest)
PIECES = st.sampled_from(
    [
        key(20, 3) + key(20, 4),  # a well-formed group: protobuf keeps it, the walk refuses it
        ld(2, key(9, 3) + key(9, 4)),  # a group inside a known sub-message
        ld(3, ld(1, b"k") + ld(2, key(7, 3) + key(7, 4))),  # ... inside a map entry's value
        key(90, 0) + varint(5),  # an unknown varint
        ld(91, b"??"),  # an unknown length-delimited field
        key(1, 0) + varint(2**70 // 2**7),  # a known field with the wrong wire type
        ld(6, b"raw"),  # ModelInferRequest.raw_input_contents
        b"\x08" + b"\xff" * 10 + b"\x01",  # a varint over 10 bytes
        key(9, 6),  # a wire type nobody reads
    ]
)


def _outcome(parsed) -> tuple:
    from vaeserve.server.handlers import DetachedRequest, MalformedRequest

    if isinstance(parsed, MalformedRequest):
        return ("malformed", parsed.message)
    if isinstance(parsed, DetachedRequest):
        # The walk leaves bulk bytes in the buffer; a native parse keeps them in the message.
        # Either way the request reads the same: put them back to compare.
        message = type(parsed.message)()
        message.CopyFrom(parsed.message)
        for name, views in parsed.detached.items():
            getattr(message, name).extend(bytes(v) for v in views)
        parsed = message
    return ("parsed", parsed.SerializeToString(deterministic=True))


@settings(max_examples=300, deadline=None)
@given(data=st.data())
def test_short_requests_parse_natively_to_what_the_walk_gives(data):
    from vaeserve.server import handlers

    cls = data.draw(st.sampled_from(REQUESTS))
    if data.draw(st.booleans()):
        message = cls(model_name="m") if cls is oip.ModelInferRequest else cls()
        if cls is oip.ModelInferRequest:
            message.inputs.add(name="z", datatype="FP32", shape=[1, 2])
            message.raw_input_contents.extend([b"12345678", b""])
            message.parameters["p"].int64_param = 3
        raw = message.SerializeToString() + b"".join(data.draw(st.lists(PIECES, max_size=3)))
    else:
        raw = data.draw(st.binary(max_size=40))
    fast = handlers._tolerant_parser(cls, 1 << 14)(raw)
    saved = handlers.SMALL_REQUEST_BYTES
    handlers.SMALL_REQUEST_BYTES = -1  # a parser built now always walks
    try:
        walked = handlers._tolerant_parser(cls, 1 << 14)(raw)
    finally:
        handlers.SMALL_REQUEST_BYTES = saved
    assert _outcome(fast) == _outcome(walked)


def test_a_recursive_type_has_no_depth_and_always_takes_the_walk():
    from google.protobuf import struct_pb2

    from vaeserve.protowire import depth_of, layout_of

    assert depth_of(layout_of(struct_pb2.Struct.DESCRIPTOR)) is None
    assert depth_of(layout_of(oip.ModelInferRequest.DESCRIPTOR)) == 3
    assert depth_of(layout_of(pb.ModelRef.DESCRIPTOR)) == 0
