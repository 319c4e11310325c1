"""Writes tiny random-weight BLIP-2 checkpoints (OPT or FlanT5 language model) without any network access.

The checkpoint is a complete Hugging Face model directory: `config.json`, `generation_config.json`,
`model.safetensors`, tokenizer files and processor files, loadable by `Blip2ForConditionalGeneration` and
`Blip2Processor.from_pretrained`.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch
    from transformers import BlipImageProcessor, PreTrainedModel, PreTrainedTokenizerBase, ProcessorMixin

# Training text for the toy BPE tokenizer: enough distinct words that prompts used in tests and demos
# tokenize into several tokens and that decoded outputs read as words.
_CORPUS = (
    '',
    'a photo of a cat sitting on a red sofa next to a dog . a man riding a bicycle down the street .',
    'question : what color is the car ? answer : the car is blue . how many people are in the picture ?',
    'two people standing on the beach at sunset with the ocean in the background . a plate of food with',
    'rice , vegetables and meat on a wooden table . a train traveling down the tracks near a station .',
    'a group of children playing soccer in a green field . an airplane flying over the city skyline .',
    'what is the man holding ? a kite . is it raining ? yes . no . where is the bus ? in the parking lot .',
    'black white yellow orange purple pink brown gray large small old young happy tree house window',
    '',
)

TINY_SEED = 1234
# Bumped whenever the generator's output changes, so a cached embedded default from an older release is not reused.
TINY_VERSION = 2
# Logit scale for the output head: random heads produce logits of ~1e-2 spread, where greedy picks
# would flip on float noise between batched and single-request execution. A large scale gives the top
# two candidates margins orders of magnitude above that noise, which the equality tests rely on.
_LOGIT_SCALE = 60.0


def _build_tokenizer() -> PreTrainedTokenizerBase:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    # Same special-token layout as OPT's GPT-2 BPE tokenizer: <s>=0, <pad>=1, </s>=2, <unk>=3, and
    # `</s>` prepended as BOS to every encoded text.
    specials = ["<s>", "<pad>", "</s>", "<unk>"]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([line for line in _CORPUS if line.strip()] * 4, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="</s> $A", pair="</s> $A </s> $B", special_tokens=[("</s>", 2)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="</s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        model_max_length=512,
    )


def _build_t5_tokenizer() -> PreTrainedTokenizerBase:
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    # T5's layout: <pad>=0 (also the decoder start), </s>=1 appended to every text, <unk>=2; SentencePiece
    # style word boundaries.
    tok = Tokenizer(models.Unigram())
    tok.normalizer = normalizers.NFKC()
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    trainer = trainers.UnigramTrainer(
        vocab_size=400,
        special_tokens=["<pad>", "</s>", "<unk>"],
        unk_token="<unk>",
        # Every printable ASCII character, so prompts with capitals or digits never map to <unk>.
        initial_alphabet=[chr(c) for c in range(33, 127)],
        show_progress=False,
    )
    tok.train_from_iterator([line for line in _CORPUS if line.strip()] * 4, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="</s>", pad_token="<pad>", unk_token="<unk>", model_max_length=512
    )


def _damp_unreadable_tokens(lm_head: torch.nn.Linear, tokenizer: PreTrainedTokenizerBase) -> None:
    # Byte-level and partial tokens decode to control or replacement characters; damping their output rows
    # keeps generated text readable words (demo output) without changing how decoding works.
    # Rows past the tokenizer (vocab padded to a multiple of 64) and the image token decode to nothing.
    for token_id in range(lm_head.weight.shape[0]):
        text = tokenizer.decode([token_id]) if token_id < len(tokenizer) else ""
        if not text.strip() or not text.isprintable() or "\ufffd" in text or text == "<image>":
            lm_head.weight[token_id].mul_(0.02)


def clip_image_processor(size: int) -> BlipImageProcessor:
    """BLIP-2's image preprocessing (CLIP normalisation) at a tiny square size."""
    from transformers import BlipImageProcessor

    return BlipImageProcessor(
        size={"height": size, "width": size},
        image_mean=[0.48145466, 0.4578275, 0.40821073],
        image_std=[0.26862954, 0.26130258, 0.27577711],
        do_convert_rgb=True,
    )


def randomize_weights(model: PreTrainedModel, std: Callable[[str], float]) -> None:
    """Draws every matrix from N(0, std(name)) and the query tokens from N(0, 1), from torch's global RNG.

    The default initialiser gives the vision tower a std of 1e-10, which would make every image produce the same
    query embeddings; real-looking spread keeps outputs image-dependent."""
    for name, param in model.named_parameters():
        if param.dim() >= 2 and "norm" not in name:
            param.normal_(0.0, std(name))
    model.query_tokens.normal_(0.0, 1.0)


def save_checkpoint(model: PreTrainedModel, processor: ProcessorMixin, out: Path, stamp: dict[str, object]) -> None:
    model.save_pretrained(out, safe_serialization=True)
    processor.save_pretrained(out)
    (out / "TINY_MODEL.json").write_text(json.dumps(stamp) + "\n")


@dataclass(frozen=True)
class _Family:
    build_tokenizer: Callable[[], PreTrainedTokenizerBase]
    # Deliberately not 32 query tokens and not 224 px: code that hard-codes the published sizes fails here.
    num_query_tokens: int
    text_config: dict[str, object]
    lm_std: float
    logit_scale: float
    generation: dict[str, int]
    # Output rows to damp besides unreadable tokens (T5's <pad> is also its decoder start token: a random head
    # that favours it generates nothing but padding).
    damped: tuple[int, ...] = ()


_FAMILIES = {
    "opt": _Family(
        build_tokenizer=lambda: _build_tokenizer(),
        num_query_tokens=8,
        text_config={
            "model_type": "opt", "hidden_size": 64, "word_embed_proj_dim": 64, "ffn_dim": 256,
            "num_hidden_layers": 2, "num_attention_heads": 4, "max_position_embeddings": 512,
            "bos_token_id": 2, "eos_token_id": 2, "pad_token_id": 1, "tie_word_embeddings": False,
            "do_layer_norm_before": True,
        },
        lm_std=0.08,
        logit_scale=_LOGIT_SCALE,
        generation={"bos_token_id": 2, "eos_token_id": 2, "pad_token_id": 1},
    ),
    "t5": _Family(
        build_tokenizer=lambda: _build_t5_tokenizer(),
        num_query_tokens=6,
        text_config={
            "model_type": "t5", "d_model": 64, "d_kv": 16, "d_ff": 128, "num_layers": 2, "num_decoder_layers": 2,
            "num_heads": 4, "feed_forward_proj": "gated-gelu", "is_encoder_decoder": True,
            "tie_word_embeddings": False, "pad_token_id": 0, "eos_token_id": 1, "decoder_start_token_id": 0,
        },
        lm_std=0.1,
        logit_scale=_LOGIT_SCALE / 8,
        generation={"decoder_start_token_id": 0, "eos_token_id": 1, "pad_token_id": 0},
        damped=(0, 2),
    ),
}


def write_tiny_model(
    out_dir: str | os.PathLike[str], *, family: str = "opt", seed: int = TINY_SEED
) -> Path:
    import torch
    from transformers import Blip2Config, Blip2ForConditionalGeneration, Blip2Processor, GenerationConfig

    if family not in _FAMILIES:
        raise ValueError(f"family must be one of {', '.join(_FAMILIES)}, got {family!r}")
    spec = _FAMILIES[family]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    processor = Blip2Processor(
        image_processor=clip_image_processor(64),
        tokenizer=spec.build_tokenizer(),
        num_query_tokens=spec.num_query_tokens,
    )
    config = Blip2Config(
        vision_config={
            "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
            "image_size": 64, "patch_size": 16,
        },
        qformer_config={
            "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
            "cross_attention_frequency": 1, "vocab_size": 128, "max_position_embeddings": 64,
        },
        text_config={**spec.text_config, "vocab_size": ((len(processor.tokenizer) + 63) // 64) * 64},
        num_query_tokens=spec.num_query_tokens,
        image_token_index=processor.tokenizer.convert_tokens_to_ids("<image>"),
    )
    torch.manual_seed(seed)
    model = Blip2ForConditionalGeneration(config).eval()
    with torch.no_grad():
        randomize_weights(model, lambda name: spec.lm_std if name.startswith("language_model") else 0.15)
        lm_head = model.language_model.lm_head
        lm_head.weight.mul_(spec.logit_scale)
        _damp_unreadable_tokens(lm_head, processor.tokenizer)
        for token_id in spec.damped:
            lm_head.weight[token_id].mul_(0.02)
    model.generation_config = GenerationConfig(**spec.generation)
    stamp = {"seed": seed, "family": family, "version": TINY_VERSION, "generator": "blip2_triton.tiny"}
    save_checkpoint(model, processor, out, stamp)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("out_dir")
    parser.add_argument("--family", choices=("opt", "t5"), default="opt")
    parser.add_argument("--seed", type=int, default=TINY_SEED)
    args = parser.parse_args(argv)
    print(write_tiny_model(args.out_dir, family=args.family, seed=args.seed))


if __name__ == "__main__":
    main()
