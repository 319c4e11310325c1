"""Client for the BLIP-2 Triton deployment: captions, visual question answering, image-text retrieval and matching.

from blip2_client import Blip2Client

with Blip2Client("localhost:8001") as client:
    print(client.caption("cat.jpg"))
    print(client.ask("cat.jpg", "what color is the cat?", max_tokens=10))
    print(client.match("cat.jpg", "a cat on a sofa"))  # P(match), on a server with retrieval (`serve --itm`)
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
from ._request import CONTROL_SPECS, Controls, Generation, ModelMetadata, TensorSpec, vqa_prompt
from ._retrieval import RetrievalModels, similarity_scores
from ._sync import Blip2Client

__version__ = "0.1.0"

__all__ = [
    "CONTROL_SPECS",
    "AsyncBlip2Client",
    "Blip2Client",
    "Blip2Error",
    "Controls",
    "DeadlineExceededError",
    "Generation",
    "ImageInput",
    "InvalidInputError",
    "ModelMetadata",
    "RetrievalModels",
    "ServerUnavailableError",
    "StreamingUnsupportedError",
    "TensorSpec",
    "__version__",
    "encode_image",
    "similarity_scores",
    "vqa_prompt",
]
