"""Per-stage parameter counts and weight memory of a BLIP-2 checkpoint, from its config alone.

    python scripts/stage_memory.py /path/to/checkpoint        # a local checkpoint's config.json
    python scripts/stage_memory.py --published blip2-flan-t5-xl

The model is instantiated on PyTorch's meta device: no weights are read or allocated.
"""

from __future__ import annotations

import argparse
import json

import torch
from transformers import Blip2Config, Blip2ForConditionalGeneration

_VISION_G = {"hidden_size": 1408, "intermediate_size": 6144, "num_hidden_layers": 39, "num_attention_heads": 16,
             "image_size": 224, "patch_size": 14}
_QFORMER = {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
            "cross_attention_frequency": 2, "vocab_size": 30522}
# Sizes of the published Salesforce checkpoints (their config.json), for planning before downloading them.
PUBLISHED = {
    "blip2-opt-2.7b": {"model_type": "opt", "hidden_size": 2560, "ffn_dim": 10240, "num_hidden_layers": 32,
                       "num_attention_heads": 32, "vocab_size": 50272, "word_embed_proj_dim": 2560,
                       "max_position_embeddings": 2048, "tie_word_embeddings": True},
    "blip2-opt-6.7b": {"model_type": "opt", "hidden_size": 4096, "ffn_dim": 16384, "num_hidden_layers": 32,
                       "num_attention_heads": 32, "vocab_size": 50272, "word_embed_proj_dim": 4096,
                       "max_position_embeddings": 2048, "tie_word_embeddings": True},
    "blip2-flan-t5-xl": {"model_type": "t5", "d_model": 2048, "d_kv": 64, "d_ff": 5120, "num_layers": 24,
                         "num_decoder_layers": 24, "num_heads": 32, "vocab_size": 32128,
                         "feed_forward_proj": "gated-gelu", "tie_word_embeddings": False},
    "blip2-flan-t5-xxl": {"model_type": "t5", "d_model": 4096, "d_kv": 64, "d_ff": 10240, "num_layers": 24,
                          "num_decoder_layers": 24, "num_heads": 64, "vocab_size": 32128,
                          "feed_forward_proj": "gated-gelu", "tie_word_embeddings": False},
}
BYTES = {"float32": 4.0, "float16/bfloat16": 2.0, "8bit": 1.0, "4bit": 0.5}


def stage_counts(config: Blip2Config) -> dict[str, int]:
    with torch.device("meta"):
        model = Blip2ForConditionalGeneration(config)
    counts = {"vision": 0, "llm": 0}
    seen: set[int] = set()
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) in seen:  # tied embeddings are stored once
            continue
        seen.add(id(param))
        counts["llm" if name.startswith("language_model.") else "vision"] += param.numel()
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", nargs="?")
    parser.add_argument("--published", choices=sorted(PUBLISHED))
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if args.published:
        config = Blip2Config(vision_config=_VISION_G, qformer_config=_QFORMER,
                             text_config=PUBLISHED[args.published], num_query_tokens=32)
    elif args.checkpoint:
        config = Blip2Config.from_pretrained(args.checkpoint)
    else:
        parser.error("give a checkpoint directory or --published NAME")
    counts = stage_counts(config)
    # Quantisation applies to Linear weights only; embeddings, norms and the Q-Former stay in fp16/fp32, so the
    # 8/4-bit rows are lower bounds.
    table = {stage: {"parameters": n, **{k: n * b for k, b in BYTES.items()}} for stage, n in counts.items()}
    if args.json:
        print(json.dumps(table, indent=2))
        return
    print(f"{'stage':8} {'parameters':>14} " + " ".join(f"{k:>17}" for k in BYTES))
    for stage, row in table.items():
        print(f"{stage:8} {row['parameters']:>14,} " + " ".join(f"{row[k] / 2**30:>13.2f} GiB" for k in BYTES))


if __name__ == "__main__":
    main()
