import numpy as np
import pytest

from blip2_triton.errors import InvalidRequestError
from blip2_triton.serving.tensors import generation_requests, image_requests, text_output

EMB = np.zeros((2, 8, 64), dtype=np.float32)


def test_image_rows_become_requests() -> None:
    reqs = image_requests({"image": np.array([[b"a"], [b"bb"]], dtype=np.object_)})
    assert [r.data for r in reqs] == [b"a", b"bb"]


@pytest.mark.parametrize(
    ("inputs", "message"),
    [
        ({}, "image: required input is missing"),
        ({"image": np.array([b"a"], dtype=np.object_)}, "image: expected shape [batch, 1], got [1]"),
        ({"image": np.array([[b"a", b"b"]], dtype=np.object_)}, "image: expected shape [batch, 1], got [1, 2]"),
    ],
)
def test_bad_image_inputs(inputs, message) -> None:
    with pytest.raises(InvalidRequestError) as e:
        image_requests(inputs)
    assert str(e.value) == message


def test_generation_controls_are_per_row() -> None:
    reqs = generation_requests(
        {
            "_query_embeds": EMB,
            "text_input": np.array([[b"Question: hi? Answer:"], [b"   "]], dtype=np.object_),
            "max_tokens": np.array([[5], [7]], dtype=np.int32),
            "seed": np.array([[1], [2**64 - 1]], dtype=np.uint64),
        }
    )
    assert [r.prompt for r in reqs] == ["Question: hi? Answer:", None]
    assert [r.max_tokens for r in reqs] == [5, 7]
    assert [r.seed for r in reqs] == [1, 2**64 - 1]
    assert reqs[0].temperature is None


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"max_tokens": np.array([[5], [7]], dtype=np.int64)}, "max_tokens: expected INT32, got INT64"),
        ({"temperature": np.array([[1.0]], dtype=np.float32)}, "temperature: expected 2 rows like the other inputs"),
        ({"text_input": np.array([[b"\xff\xfe"], [b"ok"]], dtype=np.object_)}, "expected UTF-8 text"),
    ],
)
def test_bad_generation_inputs(extra, message) -> None:
    with pytest.raises(InvalidRequestError) as e:
        generation_requests({"_query_embeds": EMB, **extra})
    assert message in str(e.value)


def test_text_output_is_utf8_bytes() -> None:
    out = text_output(["café", ""])
    assert out.shape == (2, 1)
    assert out[0, 0] == "café".encode()
