"""The HF reference exactly as users call it, one request at a time."""

from __future__ import annotations

import io
from pathlib import Path

import torch
from PIL import Image
from transformers import Blip2ForConditionalGeneration, Blip2Processor


class HFReference:
    def __init__(self, model_dir: str | Path, **load_kwargs: object) -> None:
        self.processor = Blip2Processor.from_pretrained(model_dir)
        self.model = Blip2ForConditionalGeneration.from_pretrained(model_dir, **load_kwargs).eval()
        self._cache: dict[tuple[bytes, str | None, int], str] = {}

    @torch.inference_mode()
    def __call__(self, image: bytes, prompt: str | None, max_tokens: int, **generate_kwargs: object) -> str:
        key = (image, prompt, max_tokens)
        if not generate_kwargs and key in self._cache:
            return self._cache[key]
        img = Image.open(io.BytesIO(image)).convert("RGB")
        if self.model.config.text_config.is_encoder_decoder:
            # HF returns only decoder tokens for T5. Its no-text path needs a BOS that T5 configs lack, so
            # captions go through the processor with an empty prompt.
            inputs = self.processor(images=img, text=prompt or "", return_tensors="pt")
            prefix = 0
        elif prompt:
            inputs = self.processor(images=img, text=prompt, return_tensors="pt")
            prefix = inputs["input_ids"].shape[1]
        else:
            inputs = self.processor(images=img, return_tensors="pt")
            # Without text HF builds image tokens + BOS itself.
            prefix = self.model.config.num_query_tokens + 1
        inputs = inputs.to(self.model.device)
        if "pixel_values" in inputs and self.model.dtype != torch.float32:
            inputs["pixel_values"] = inputs["pixel_values"].to(self.model.dtype)
        ids = self.model.generate(**inputs, max_new_tokens=max_tokens, **generate_kwargs)
        text = self.processor.batch_decode(ids[:, prefix:], skip_special_tokens=True)[0].strip()
        if not generate_kwargs:
            self._cache[key] = text
        return text


# Largest difference allowed from transformers' retrieval values (embeddings, contrastive scores, ITM probabilities,
# all of order 1), single or batched, in-process or served: several times the float32 noise of batched matmuls,
# padded attention and packed CPU weights (docs/BENCHMARK.md has the measured differences).
RETRIEVAL_ATOL = 5e-6
# Texts the retrieval tests score against every sample image.
RETRIEVAL_TEXTS = (
    "a photo of a cat",
    "Two people standing on the beach at sunset.",
    "a red car",
    "What is the man holding?",
    "zebra",
    "a plate of food with rice, vegetables and meat on a wooden table",
)


class HFRetrievalReference:
    """`Blip2ForImageTextRetrieval` called as its documentation shows: processor(images, text), then forward with
    or without the matching head. Batches go through the processor together (texts padded)."""

    def __init__(self, model_dir: str | Path) -> None:
        from transformers import Blip2ForImageTextRetrieval

        self.processor = Blip2Processor.from_pretrained(model_dir)
        self.model = Blip2ForImageTextRetrieval.from_pretrained(model_dir).eval()

    def _inputs(self, images: list[bytes], texts: list[str]):  # -> BatchFeature
        pil = [Image.open(io.BytesIO(b)).convert("RGB") for b in images]
        return self.processor(images=pil, text=texts, return_tensors="pt", padding=True)

    @torch.inference_mode()
    def contrastive(self, images: list[bytes], texts: list[str]):  # -> Blip2ImageTextMatchingModelOutput
        """logits_per_image [images, texts], image_embeds [images, queries, dim], text_embeds [texts, dim] and the
        ViT's output (vision_model_output.last_hidden_state): every image scored against every text."""
        return self.model(**self._inputs(images, texts), use_image_text_matching_head=False)

    @torch.inference_mode()
    def match(self, images: list[bytes], texts: list[str]) -> list[float]:
        """ITM probability of each (image i, text i) pair."""
        out = self.model(**self._inputs(images, texts), use_image_text_matching_head=True)
        return out.logits_per_image.softmax(dim=1)[:, 1].tolist()
