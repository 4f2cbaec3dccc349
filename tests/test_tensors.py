"""Wire tensors: byte-exact round trips, checked lengths, and the compact sample encodings."""

from __future__ import annotations

import re

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from vaeserve.errors import InvalidRequest
from vaeserve.proto.v1 import vaeserve_pb2 as pb
from vaeserve.tensors import decode_uint8, encode_samples, from_array, to_array


@pytest.mark.parametrize("dtype", [np.float32, np.float16, np.int64, np.uint8])
def test_round_trip_is_byte_exact(dtype):
    x = np.arange(24).reshape(2, 3, 4).astype(dtype)
    wire = pb.Tensor.FromString(from_array(x).SerializeToString())
    back = to_array(wire, "x")
    assert back.dtype == x.dtype and back.shape == x.shape
    np.testing.assert_array_equal(back, x)
    assert not back.flags.writeable  # a view of the request's bytes, not a copy


def test_filling_an_answer_field_in_place():
    answer = pb.SampleResponse()
    from_array(np.ones((2, 2), np.float32), out=answer.samples)
    assert list(answer.samples.shape) == [2, 2] and answer.samples.dtype == pb.FLOAT32


@pytest.mark.parametrize(
    "tensor, message",
    [
        pytest.param(
            pb.Tensor(dtype=pb.FLOAT32, shape=[2, 2], data=bytes(15)),
            "x.data holds 15 bytes, expected 16 (2x2 of float32)",
            id="short",
        ),
        pytest.param(
            pb.Tensor(dtype=pb.DATA_TYPE_UNSPECIFIED, shape=[1], data=bytes(4)),
            "x.dtype is DATA_TYPE_UNSPECIFIED",
            id="no-dtype",
        ),
        pytest.param(
            pb.Tensor(dtype=42, shape=[1], data=bytes(4)), "x.dtype is 42", id="unknown-dtype"
        ),
        pytest.param(
            pb.Tensor(dtype=pb.FLOAT32, shape=[-1, 2], data=b""),
            "x.shape is [-1, 2], expected non-negative",
            id="negative-dim",
        ),
    ],
)
def test_malformed_tensors_name_the_field(tensor, message):
    with pytest.raises(InvalidRequest, match=re.escape(message)):
        to_array(tensor, "x")


@settings(max_examples=50, deadline=None)
@given(
    x=hnp.arrays(np.float32, (3, 5), elements=st.floats(-3, 3, width=32)),
    low=st.floats(-2, 0),
    width=st.floats(0.5, 4),
)
def test_uint8_maps_the_value_range_onto_0_255_rounding_and_clipping(x, low, width):
    value_range = (low, low + width)
    q = to_array(encode_samples(x, pb.SAMPLE_ENCODING_UINT8, value_range), "q")
    assert q.dtype == np.uint8
    inside = (x >= value_range[0]) & (x <= value_range[1])
    step = width / 255
    error = np.abs(decode_uint8(q, value_range) - x)
    assert (error[inside] <= step / 2 + 1e-5 * width).all()  # rounded to the nearest level
    assert (q[x < value_range[0]] == 0).all() and (q[x > value_range[1]] == 255).all()


def test_float16_and_float32_encodings():
    x = np.linspace(0, 1, 12, dtype=np.float32).reshape(3, 4)
    half = to_array(encode_samples(x, pb.SAMPLE_ENCODING_FLOAT16, (0, 1)), "x")
    np.testing.assert_array_equal(half, x.astype(np.float16))
    exact = to_array(encode_samples(x, pb.SAMPLE_ENCODING_FLOAT32, (0, 1)), "x")
    np.testing.assert_array_equal(exact, x)
