"""One expensive request never holds up the others: huge images decode beside the model instead of in front of
it, and beam search runs beside the running batch (issue: "cheap requests monopolise a stage")."""

from __future__ import annotations

import io
import threading

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from PIL import Image
from triton_helpers import Clients

pytestmark = pytest.mark.integration


def one_bit_png(width: int, height: int) -> bytes:
    # A few KB on the wire, a lot of pixels to decode: the cheap request that used to stall the vision stage.
    buffer = io.BytesIO()
    Image.new("1", (width, height), 1).save(buffer, "PNG")
    return buffer.getvalue()


def test_a_request_of_huge_images_does_not_hold_up_a_small_one(triton_server, sample_images, reference) -> None:
    # Six different images: the same one six times is decoded once, in about the 0.3 s this test waits below, so on
    # an idle host the heavy request could finish first without holding anything up.
    heavy = [one_bit_png(4000, 4000 - i) for i in range(6)]
    order: list[str] = []
    started = threading.Event()

    def send_heavy() -> None:
        client = grpcclient.InferenceServerClient(triton_server.grpc_url)
        image = grpcclient.InferInput("image", [6, 1], "BYTES")
        image.set_data_from_numpy(np.array([[data] for data in heavy], dtype=np.object_))
        tokens = grpcclient.InferInput("max_tokens", [6, 1], "INT32")
        tokens.set_data_from_numpy(np.full((6, 1), 3, dtype=np.int32))
        started.set()
        client.infer("blip2", [image, tokens], client_timeout=300)
        order.append("heavy")
        client.close()

    thread = threading.Thread(target=send_heavy)
    thread.start()
    assert started.wait(30)
    threading.Event().wait(0.3)  # the heavy request is decoding
    small = Clients("grpc", triton_server)
    text = small.infer(sample_images["bmp"], None, max_tokens=3)
    order.append("small")
    small.close()
    thread.join(300)
    assert text == reference(sample_images["bmp"], None, 3)
    assert order == ["small", "heavy"]
