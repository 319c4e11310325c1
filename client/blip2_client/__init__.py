"""Client for the BLIP-2 Triton deployment: captions and visual question answering.

from blip2_client import Blip2Client

with Blip2Client("localhost:8001") as client:
    print(client.caption("cat.jpg"))
    print(client.ask("cat.jpg", "what color is the cat?", max_tokens=10))
"""

from ._async import AsyncBlip2Client
from ._errors import (
    Blip2Error,
    DeadlineExceededError,
    InvalidInputError,
    ServerUnavailableError,
    StreamingUnsupportedError,
)
from ._images import ImageInput, encode_image
from ._request import CONTROL_SPECS, Controls, ModelMetadata, TensorSpec, vqa_prompt
from ._sync import Blip2Client

__version__ = "0.1.0"

__all__ = [
    "CONTROL_SPECS",
    "AsyncBlip2Client",
    "Blip2Client",
    "Blip2Error",
    "Controls",
    "DeadlineExceededError",
    "ImageInput",
    "InvalidInputError",
    "ModelMetadata",
    "ServerUnavailableError",
    "StreamingUnsupportedError",
    "TensorSpec",
    "__version__",
    "encode_image",
    "vqa_prompt",
]
