"""Writes a tiny random-weight BLIP-2 image-text retrieval checkpoint (`Blip2ForImageTextRetrieval`) offline.

Laid out like `Salesforce/blip2-itm-vit-g`: a BERT WordPiece tokenizer (`BertTokenizer`, lower-cased, `[CLS] text
[SEP]`, `[DEC]` added as BOS, `<image>` added by the processor), a Q-Former with BERT-style text input whose
vocabulary covers the tokenizer but not `<image>`, vision/text projections and the ITM head. Loadable by
`Blip2ForImageTextRetrieval`, `Blip2TextModelWithProjection`, `Blip2VisionModelWithProjection` and
`Blip2Processor.from_pretrained`.
"""

from __future__ import annotations

import argparse
import os
import string
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .tiny import _CORPUS, TINY_SEED, clip_image_processor, randomize_weights, save_checkpoint

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

# Bumped whenever the generator's output changes, so a cached embedded default from an older release is not reused.
TINY_ITM_VERSION = 1
# Deliberately unlike the published sizes (32 queries, 256-d embeddings, 224 px, 1408-wide ViT, 768-wide Q-Former)
# and unlike each other, so code that hard-codes a size or mixes two of them up fails here.
NUM_QUERY_TOKENS = 5
EMBED_DIM = 24
# Few text positions: the text-length limit that comes from the checkpoint is reachable in tests.
MAX_TEXT_POSITIONS = 32
# ITM logit scale: a random head's mean-over-queries logits stay small, so every probability sits near 0.5 and
# whether a pair "matches" is close to float noise; scaled, the probabilities spread over (0, 1).
_ITM_SCALE = 4.0
# Vision-tower weight std, twice the rest: image features then vary enough between images that the closest
# contrastive scores of the test images sit an order of magnitude further apart (margin test in test_retrieval).
_VISION_STD = 0.3


def _build_bert_tokenizer() -> PreTrainedTokenizerBase:
    from transformers import BertTokenizer

    # bert-base-uncased's layout: whole words, `##` continuation pieces, one token per punctuation mark; every
    # letter and digit also as a piece, so any ASCII word tokenizes without [UNK].
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    chars = string.ascii_lowercase + string.digits
    words = sorted({w for line in _CORPUS for w in line.lower().split() if w.isalnum()})
    pieces = [*specials, *string.punctuation, *chars, *(f"##{c}" for c in chars), *words]
    vocab = {token: i for i, token in enumerate(dict.fromkeys(pieces))}
    tokenizer = BertTokenizer(vocab=vocab, do_lower_case=True, model_max_length=512)
    # As the published ITM checkpoints: LAVIS's tokenizer adds `[DEC]` (the Q-Former's decoder BOS) to BERT's.
    tokenizer.add_special_tokens({"bos_token": "[DEC]"})
    return tokenizer


@dataclass(frozen=True)
class ItmSizes:
    """A retrieval checkpoint's sizes: ViT (width, MLP, layers, heads, image and patch size), Q-Former (width, MLP,
    layers, heads, text positions), queries and embedding width."""

    vision: tuple[int, int, int, int, int, int] = (48, 96, 2, 4, 48, 16)
    qformer: tuple[int, int, int, int, int] = (64, 128, 2, 4, MAX_TEXT_POSITIONS)
    num_query_tokens: int = NUM_QUERY_TOKENS
    embed_dim: int = EMBED_DIM


TINY_ITM_SIZES = ItmSizes()


def write_tiny_itm_model(out_dir: str | os.PathLike[str], *, seed: int = TINY_SEED,
                         sizes: ItmSizes = TINY_ITM_SIZES) -> Path:
    """The tiny checkpoint; other `sizes` give a random-weight retrieval checkpoint laid out the same way (the
    retrieval benchmark's)."""
    import torch
    from transformers import Blip2Config, Blip2ForImageTextRetrieval, Blip2Processor

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = _build_bert_tokenizer()
    # The Q-Former embeds the tokenizer's ids, [DEC] included; the processor's `<image>` (added next) is not among
    # them: the model strips image tokens before embedding text, as the published checkpoints do.
    qformer_vocab = len(tokenizer)
    width, mlp, layers, heads, image_size, patch_size = sizes.vision
    q_width, q_mlp, q_layers, q_heads, positions = sizes.qformer
    processor = Blip2Processor(
        image_processor=clip_image_processor(image_size), tokenizer=tokenizer, num_query_tokens=sizes.num_query_tokens
    )
    config = Blip2Config(
        vision_config={
            "hidden_size": width, "intermediate_size": mlp, "num_hidden_layers": layers,
            "num_attention_heads": heads, "image_size": image_size, "patch_size": patch_size,
        },
        qformer_config={
            "hidden_size": q_width, "intermediate_size": q_mlp, "num_hidden_layers": q_layers,
            "num_attention_heads": q_heads, "cross_attention_frequency": 2, "vocab_size": qformer_vocab,
            "max_position_embeddings": positions, "use_qformer_text_input": True,
        },
        num_query_tokens=sizes.num_query_tokens,
        image_text_hidden_size=sizes.embed_dim,
        image_token_index=processor.tokenizer.convert_tokens_to_ids("<image>"),
    )
    torch.manual_seed(seed)
    model = Blip2ForImageTextRetrieval(config).eval()
    with torch.no_grad():
        randomize_weights(model, lambda name: _VISION_STD if name.startswith("vision_model") else 0.15)
        model.itm_head.weight.mul_(_ITM_SCALE)
    save_checkpoint(
        model, processor, out,
        {"seed": seed, "family": "itm", "version": TINY_ITM_VERSION, "generator": "blip2_triton.tiny_itm"},
    )
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("out_dir")
    parser.add_argument("--seed", type=int, default=TINY_SEED)
    args = parser.parse_args(argv)
    print(write_tiny_itm_model(args.out_dir, seed=args.seed))


if __name__ == "__main__":
    main()
