"""The vision stage: `images` (decoding within the limits), `stage` (ViT + Q-Former + projection), `pipeline` (the
served form: a decoder pool beside one compute thread)."""

from .images import decode_image
from .stage import VisionStage

__all__ = ["VisionStage", "decode_image"]
