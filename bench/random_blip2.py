"""Random-weight BLIP-2 OPT models of fixed shapes for benchmarks: built locally, no downloads.

`SMALL` is the benchmark model of the throughput issue (≈64 M parameters), `OPT_2_7B` has the exact shapes of
`Salesforce/blip2-opt-2.7b`, `TINY` is for smoke tests. Weights are seeded, so a rebuild is bit-identical, and
generation always runs to `max_tokens` (the EOS logit is pinned at zero), so work per request is fixed.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

SEED = 2024
# Greedy picks must not flip on batched-vs-single float noise, or served and in-process runs would do
# different work; a scaled head gives margins far above that noise (as in blip2_triton.tiny).
LOGIT_SCALE = 60.0


@dataclass(frozen=True)
class Shapes:
    name: str
    vision_layers: int
    vision_width: int
    vision_mlp: int
    vision_heads: int
    image_size: int
    patch_size: int
    qformer_layers: int
    qformer_width: int
    qformer_mlp: int
    qformer_heads: int
    num_query_tokens: int
    opt_layers: int
    opt_width: int
    opt_ffn: int
    opt_heads: int
    vocab_size: int = 50272
    max_positions: int = 2048


SMALL = Shapes(
    name="small", vision_layers=6, vision_width=384, vision_mlp=1536, vision_heads=6, image_size=224, patch_size=16,
    qformer_layers=4, qformer_width=384, qformer_mlp=1536, qformer_heads=6, num_query_tokens=32,
    opt_layers=6, opt_width=512, opt_ffn=2048, opt_heads=8,
)
# Salesforce/blip2-opt-2.7b: EVA ViT-g/14 (39 × 1408, 16 heads, 6144 MLP), Q-Former 12 × 768, OPT-2.7B
# (32 × 2560, 32 heads, 10240 FFN).
OPT_2_7B = Shapes(
    name="blip2-opt-2.7b", vision_layers=39, vision_width=1408, vision_mlp=6144, vision_heads=16, image_size=224,
    patch_size=14, qformer_layers=12, qformer_width=768, qformer_mlp=3072, qformer_heads=12, num_query_tokens=32,
    opt_layers=32, opt_width=2560, opt_ffn=10240, opt_heads=32,
)
TINY = Shapes(
    name="tiny", vision_layers=2, vision_width=64, vision_mlp=128, vision_heads=4, image_size=224, patch_size=16,
    qformer_layers=2, qformer_width=64, qformer_mlp=128, qformer_heads=4, num_query_tokens=32,
    opt_layers=2, opt_width=64, opt_ffn=256, opt_heads=4, vocab_size=50272,
)


# Training text of the toy tokenizer. Kept here rather than shared with blip2_triton.tiny: the benchmark model
# must not change when the test model's tokenizer does.
_CORPUS = (
    "a photo of a cat sitting on a red sofa next to a dog . a man riding a bicycle down the street .",
    "question : what color is the car ? answer : the car is blue . how many people are in the picture ?",
    "two people standing on the beach at sunset with the ocean in the background . a plate of food with",
    "rice , vegetables and meat on a wooden table . a train traveling down the tracks near a station .",
    "a group of children playing soccer in a green field . an airplane flying over the city skyline .",
    "what is the man holding ? a kite . is it raining ? yes . no . where is the bus ? in the parking lot .",
    "black white yellow orange purple pink brown gray large small old young happy tree house window",
)


def build_tokenizer():  # -> PreTrainedTokenizerFast
    """A byte-level BPE with OPT's special-token layout: <s>=0, <pad>=1, </s>=2 (BOS and EOS), <unk>=3."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600, special_tokens=["<s>", "<pad>", "</s>", "<unk>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(list(_CORPUS) * 4, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="</s> $A", pair="</s> $A </s> $B", special_tokens=[("</s>", 2)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="</s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
        model_max_length=512,
    )


def _damp_unreadable(head: torch.Tensor, tokenizer: Any) -> None:
    # Ids that decode to nothing readable (byte pieces, specials, `<image>`, and the rows past the toy
    # tokenizer, most of the 50272) get a small logit, so generated text reads as words.
    n = len(tokenizer)
    head[n:].mul_(0.02)
    for token_id in range(n):
        text = tokenizer.decode([token_id])
        if not text.strip() or not text.isprintable() or "\ufffd" in text or text == "<image>":
            head[token_id].mul_(0.02)


def build_processor(shapes: Shapes):  # -> Blip2Processor
    from transformers import Blip2Processor, BlipImageProcessor

    # The toy byte-level BPE stands in for GPT-2's: prompt lengths differ a little from the real tokenizer,
    # compute per token does not. Its ids all sit below the model's 50272-row vocabulary, and so does the
    # `<image>` token the processor appends.
    tokenizer = build_tokenizer()
    image_processor = BlipImageProcessor(
        size={"height": shapes.image_size, "width": shapes.image_size},
        image_mean=[0.48145466, 0.4578275, 0.40821073],
        image_std=[0.26862954, 0.26130258, 0.27577711],
        do_convert_rgb=True,
    )
    processor = Blip2Processor(
        image_processor=image_processor, tokenizer=tokenizer, num_query_tokens=shapes.num_query_tokens
    )
    if len(processor.tokenizer) > shapes.vocab_size:
        raise ValueError(f"tokenizer has {len(processor.tokenizer)} ids, model vocabulary {shapes.vocab_size}")
    return processor


def build_config(shapes: Shapes, image_token_id: int):  # -> Blip2Config
    from transformers import Blip2Config

    return Blip2Config(
        vision_config={
            "hidden_size": shapes.vision_width, "intermediate_size": shapes.vision_mlp,
            "num_hidden_layers": shapes.vision_layers, "num_attention_heads": shapes.vision_heads,
            "image_size": shapes.image_size, "patch_size": shapes.patch_size,
        },
        qformer_config={
            "hidden_size": shapes.qformer_width, "intermediate_size": shapes.qformer_mlp,
            "num_hidden_layers": shapes.qformer_layers, "num_attention_heads": shapes.qformer_heads,
            "encoder_hidden_size": shapes.vision_width,
        },
        text_config={
            "model_type": "opt", "vocab_size": shapes.vocab_size, "hidden_size": shapes.opt_width,
            "word_embed_proj_dim": shapes.opt_width, "ffn_dim": shapes.opt_ffn,
            "num_hidden_layers": shapes.opt_layers, "num_attention_heads": shapes.opt_heads,
            "max_position_embeddings": shapes.max_positions, "bos_token_id": 2, "eos_token_id": 2,
            "pad_token_id": 1, "do_layer_norm_before": True,
        },
        num_query_tokens=shapes.num_query_tokens,
        image_token_index=image_token_id,
    )


@torch.no_grad()
def build_model(
    shapes: Shapes, *, seed: int = SEED, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
) -> tuple[Any, Any]:
    """(Blip2ForConditionalGeneration, Blip2Processor) with seeded random weights, in eval mode."""
    from transformers import Blip2ForConditionalGeneration, GenerationConfig

    processor = build_processor(shapes)
    image_token_id = processor.tokenizer.convert_tokens_to_ids("<image>")
    config = build_config(shapes, image_token_id)
    torch.manual_seed(seed)
    with torch.device(device):
        model = Blip2ForConditionalGeneration(config)
    generator = torch.Generator(device=device).manual_seed(seed)
    for name, param in model.named_parameters():
        # HF's initialiser gives the vision tower a near-zero spread, which would make every image embed
        # alike; real-looking spread keeps the work and the text image-dependent.
        if param.dim() >= 2 and "norm" not in name:
            std = (0.08 if name.startswith("language_model") else 0.15) / max(1.0, (param.shape[-1] / 512) ** 0.5)
            param.normal_(0.0, std, generator=generator)
    model.query_tokens.normal_(0.0, 1.0, generator=generator)
    head = model.language_model.get_output_embeddings().weight
    head.mul_(LOGIT_SCALE)
    _damp_unreadable(head, processor.tokenizer)
    # The EOS row is zero, so its logit is 0 while the best of the others is far above: sequences never
    # stop early and every request does the same work.
    head[2].zero_()
    model.generation_config = GenerationConfig(bos_token_id=2, eos_token_id=2, pad_token_id=1)
    model = model.to(dtype).eval()
    if dtype != torch.float32:
        # As `from_pretrained(dtype=...)` loads it: the Q-Former and query tokens stay in float32.
        model.qformer.float()
        model.query_tokens.data = model.query_tokens.data.float()
    return model, processor


def parameter_count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def ensure_model(shapes: Shapes, cache_dir: Path, *, seed: int = SEED) -> Path:
    """The checkpoint directory, written once per shapes and seed (atomically, so concurrent runs are safe)."""
    tag = f"bench-blip2-{shapes.name}-seed{seed}-v2"
    target = cache_dir / tag
    marker = target / "BENCH_MODEL.json"
    if marker.exists():
        return target
    cache_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".bench-", dir=cache_dir))
    try:
        model, processor = build_model(shapes, seed=seed)
        model.save_pretrained(staging, safe_serialization=True)
        processor.save_pretrained(staging)
        (staging / "BENCH_MODEL.json").write_text(
            json.dumps({"shapes": asdict(shapes), "seed": seed, "parameters": parameter_count(model)}) + "\n"
        )
        try:
            os.rename(staging, target)
        except OSError:
            if not marker.exists():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target
