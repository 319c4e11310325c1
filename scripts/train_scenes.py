"""Trains the small BLIP-2 shipped as the embedded default on synthetic scenes (`blip2_triton.scenes`), from scratch.

Vision tower, Q-Former, projection and language model are all trained, on freshly drawn scenes at every step (scene
seeds below `HELD_OUT_SEED_START`), to caption a scene from the bare image tokens + BOS and to answer
`Question: <q>? Answer:` prompts, each target followed by EOS. Inputs are laid out exactly as `Blip2Processor` and
`Blip2ForConditionalGeneration.generate` lay them out, so greedy `generate` returns the trained text and stops.
Writes a complete Hugging Face checkpoint directory, then measures greedy `generate` on held-out scenes with the
checkpoint as saved. A training-only probe on the Q-Former's query outputs (`SceneProbe`, not saved) teaches the
vision side what each slot holds; training stops early once unseen check scenes are answered exactly.

    nice -n 19 .venv/bin/python scripts/train_scenes.py --out src/blip2_triton/data/scenes-blip2-opt
"""

from __future__ import annotations

import argparse
import json
import math
import random
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from transformers import (
    Blip2Config,
    Blip2ForConditionalGeneration,
    Blip2Processor,
    BlipImageProcessor,
    GenerationConfig,
    PreTrainedTokenizerFast,
)

from blip2_triton.scenes import (
    BACKGROUNDS,
    COLOURS,
    HELD_OUT_SEED_START,
    IMAGE_SIZE,
    NUMBERS,
    PATCH_SIZE,
    POSITIONS,
    SHAPES,
    SLOTS,
    Scene,
    make_scene,
    requests,
    training_seeds,
    vqa_prompt,
)

# Bumped whenever training changes what the script produces; recorded in the checkpoint's SCENES_MODEL.json.
SCRIPT_VERSION = 4
OPT_IDS = {"bos": 2, "eos": 2, "pad": 1}
T5_IDS = {"eos": 1, "pad": 0, "decoder_start": 0}
MAX_NEW_TOKENS = 24


def _corpus() -> Iterator[str]:
    # Everything the grammar can say, in the forms training feeds (questions also capitalised and spelt "color"),
    # so that every word of it is one token.
    words = [*SHAPES, *(f"{s}s" for s in SHAPES), *COLOURS, *BACKGROUNDS, *NUMBERS,
             *POSITIONS, "yes", "no", "a", "an", "and", "to", "the", "left", "right",
             "of", "what", "colour", "color", "shape", "object", "is", "there", "how", "many",
             "shapes", "are", "where", "background", "What", "How", "Where", "Is"]
    for seed in range(1000):
        scene = make_scene(seed)
        yield scene.caption
        for question, answer in scene.qa:
            for q in _variants(question):
                yield f"{vqa_prompt(q)} {answer}"
    for _ in range(20):
        yield " ".join(words)


def _variants(question: str) -> list[str]:
    spelt = question.replace("colour", "color")
    return list(dict.fromkeys([question, spelt, question[0].upper() + question[1:], spelt[0].upper() + spelt[1:]]))


def build_tokenizer(family: str) -> PreTrainedTokenizerFast:
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    if family == "opt":
        # OPT's layout: <s>=0, <pad>=1, </s>=2 (BOS and EOS), <unk>=3; BOS prepended to every text.
        tok = Tokenizer(models.BPE(unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer: Any = trainers.BpeTrainer(
            vocab_size=448, special_tokens=["<s>", "<pad>", "</s>", "<unk>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
        )
        tok.train_from_iterator(_corpus(), trainer=trainer)
        tok.post_processor = processors.TemplateProcessing(
            single="</s> $A", pair="</s> $A </s> $B", special_tokens=[("</s>", OPT_IDS["eos"])]
        )
        return PreTrainedTokenizerFast(
            tokenizer_object=tok, bos_token="</s>", eos_token="</s>", pad_token="<pad>",
            unk_token="<unk>", model_max_length=512,
        )
    # T5's layout: <pad>=0 (also the decoder start), </s>=1 appended to every text, <unk>=2. A SentencePiece-style
    # unigram model written out rather than trained (the trainer keeps splitting words this small corpus repeats):
    # every word of the grammar is one piece, and single characters spell out anything else.
    words = sorted({w for line in _corpus() for w in re.findall(r"\w+|[^\w\s]", line)})
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), *((f"\u2581{w}", -2.0) for w in words),
              *((w, -3.0) for w in words if len(w) > 1), ("\u2581", -4.0), *((chr(c), -6.0) for c in range(33, 127))]
    tok = Tokenizer(models.Unigram(list(dict.fromkeys(pieces)), unk_id=2))
    tok.normalizer = normalizers.NFKC()
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tok.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", T5_IDS["eos"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
        model_max_length=512,
    )


def build_processor(family: str, num_query_tokens: int) -> Blip2Processor:
    image_processor = BlipImageProcessor(
        size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        image_mean=[0.48145466, 0.4578275, 0.40821073],
        image_std=[0.26862954, 0.26130258, 0.27577711],
        do_convert_rgb=True,
    )
    return Blip2Processor(image_processor=image_processor, tokenizer=build_tokenizer(family),
                          num_query_tokens=num_query_tokens)


def build_config(processor: Blip2Processor, args: argparse.Namespace) -> Blip2Config:
    width = args.width
    heads = width // 32
    vocab = ((len(processor.tokenizer) + 63) // 64) * 64
    if args.family == "opt":
        text_config: dict[str, Any] = {
            "model_type": "opt", "hidden_size": width, "word_embed_proj_dim": width, "ffn_dim": 4 * width,
            "num_hidden_layers": args.lm_layers, "num_attention_heads": heads, "max_position_embeddings": 512,
            "vocab_size": vocab, "bos_token_id": OPT_IDS["bos"], "eos_token_id": OPT_IDS["eos"],
            "pad_token_id": OPT_IDS["pad"], "tie_word_embeddings": True, "do_layer_norm_before": True,
            "dropout": 0.0, "attention_dropout": 0.0, "activation_dropout": 0.0,
        }
    else:
        text_config = {
            "model_type": "t5", "d_model": width, "d_kv": width // heads, "d_ff": 2 * width,
            "num_layers": args.lm_layers, "num_decoder_layers": args.lm_layers, "num_heads": heads,
            "feed_forward_proj": "gated-gelu", "is_encoder_decoder": True, "tie_word_embeddings": False,
            "vocab_size": vocab, "pad_token_id": T5_IDS["pad"], "eos_token_id": T5_IDS["eos"],
            "decoder_start_token_id": T5_IDS["decoder_start"], "dropout_rate": 0.0,
        }
    return Blip2Config(
        vision_config={
            "hidden_size": width, "intermediate_size": 4 * width, "num_hidden_layers": args.vision_layers,
            "num_attention_heads": heads, "image_size": IMAGE_SIZE, "patch_size": PATCH_SIZE,
            "attention_dropout": 0.0, "initializer_range": 0.02,
        },
        qformer_config={
            "hidden_size": width, "intermediate_size": 4 * width, "num_hidden_layers": args.qformer_layers,
            "num_attention_heads": heads, "cross_attention_frequency": 1, "vocab_size": 64,
            "max_position_embeddings": 64, "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0,
        },
        text_config=text_config,
        num_query_tokens=args.query_tokens,
        image_token_index=processor.tokenizer.convert_tokens_to_ids("<image>"),
    )


def generation_config(family: str) -> GenerationConfig:
    if family == "opt":
        return GenerationConfig(bos_token_id=OPT_IDS["bos"], eos_token_id=OPT_IDS["eos"], pad_token_id=OPT_IDS["pad"])
    return GenerationConfig(decoder_start_token_id=T5_IDS["decoder_start"], eos_token_id=T5_IDS["eos"],
                            pad_token_id=T5_IDS["pad"])


def init_weights(model: Blip2ForConditionalGeneration, seed: int, position_std: float) -> None:
    # HF's initialiser zeroes the query tokens (every query would stay identical) and gives the vision tower a std
    # of 1e-10 (it expects pretrained weights there); training from scratch needs plain small random weights.
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name.lower():
                param.fill_(1.0) if name.endswith("weight") else param.zero_()
            elif name.endswith("bias"):
                param.zero_()
            elif name.endswith("position_embedding"):
                # Strong enough beside the patch contents that attention can tell positions apart from the start:
                # every question about where a shape is, and caption order, depends on it.
                param.normal_(0.0, position_std)
            else:
                param.normal_(0.0, 0.02)


@dataclass
class Example:
    # OPT: image tokens, BOS and the prompt. T5: the encoder's input (image tokens, the prompt, EOS).
    context: list[int]
    # What greedy decoding must produce: the caption or answer, then EOS.
    target: list[int]


class Encoder:
    """Token ids laid out as inference lays them out."""

    def __init__(self, processor: Blip2Processor, config: Blip2Config) -> None:
        self.tokenizer = processor.tokenizer
        self.decoder_only = config.use_decoder_only_language_model
        self.image = [config.image_token_index] * config.num_query_tokens
        self.eos = config.text_config.eos_token_id
        self._cache: dict[tuple[str | None, str], Example] = {}

    def encode(self, prompt: str | None, target: str) -> Example:
        key = (prompt, target)
        if key in self._cache:
            return self._cache[key]
        if not self.decoder_only:
            # T5 captions take the processor's text path with an empty prompt (T5 has no BOS for generate()'s
            # no-text path); the tokenizer appends EOS to both sides.
            context = self.image + self.tokenizer(prompt or "").input_ids
            example = Example(context, self.tokenizer(target).input_ids)
        elif prompt is None:
            # generate()'s no-text path starts from image tokens + BOS; the caption then begins without a space.
            context = [*self.image, self.tokenizer.bos_token_id]
            example = Example(context, [*self.tokenizer(target, add_special_tokens=False).input_ids, self.eos])
        else:
            context = self.image + self.tokenizer(prompt).input_ids
            example = Example(context, [*self.tokenizer(" " + target, add_special_tokens=False).input_ids, self.eos])
        self._cache[key] = example
        return example


def inference_inputs(processor: Blip2Processor, decoder_only: bool, image: Any, prompt: str | None
                     ) -> dict[str, torch.Tensor]:
    return processor(images=image, text=prompt if decoder_only or prompt else "", return_tensors="pt")


def check_layout(processor: Blip2Processor, encoder: Encoder, model: Blip2ForConditionalGeneration) -> None:
    """Training ids must be what the processor and generate() feed at inference, or the model learns another task."""
    config = model.config
    scene = make_scene(0)
    for prompt, answer in requests(scene):
        ex = encoder.encode(prompt, answer)
        if prompt is None and encoder.decoder_only:
            served = [config.image_token_index] * config.num_query_tokens + [config.text_config.bos_token_id]
        else:
            served = inference_inputs(processor, encoder.decoder_only, scene.image, prompt)["input_ids"][0].tolist()
        assert ex.context == served, (ex.context, served)
        if prompt is not None and encoder.decoder_only:
            # The answer is what follows the prompt when the whole text is tokenized.
            joined = processor(images=scene.image, text=f"{prompt} {answer}").input_ids[0]
            assert ex.context + ex.target[:-1] == joined, (ex, joined)
    for word in (*SHAPES, *COLOURS, *BACKGROUNDS, *NUMBERS, *POSITIONS):
        assert len(processor.tokenizer(" " + word, add_special_tokens=False).input_ids) == 1, word


def training_examples(scene: Scene, rng: random.Random, questions: int) -> list[tuple[str | None, str]]:
    caption, *qa = requests(scene)
    # Kinds first, then a question of each: a scene has one count question but up to three "where" ones, and the
    # kinds that need the model to look across slots (counts, presence) are the slowest to learn.
    by_kind: dict[str, list[tuple[str | None, str]]] = {}
    for prompt, answer in qa:
        by_kind.setdefault(question_kind(prompt), []).append((prompt, answer))
    kinds = rng.sample(sorted(by_kind), min(questions, len(by_kind)))
    out = [caption]
    for prompt, answer in (rng.choice(by_kind[kind]) for kind in kinds):
        # Mostly the canonical form; sometimes capitalised or spelt "color", as users write.
        if rng.random() >= 0.6:
            question = prompt.removeprefix("Question: ").removesuffix(" Answer:")  # type: ignore[union-attr]
            prompt = vqa_prompt(rng.choice(_variants(question)))
        out.append((prompt, answer))
    return out


def _padded(rows: list[list[int]], fill: int) -> torch.Tensor:
    out = torch.full((len(rows), max(len(r) for r in rows)), fill, dtype=torch.long)
    for i, r in enumerate(rows):
        out[i, : len(r)] = torch.tensor(r)
    return out


def forward(model: Blip2ForConditionalGeneration, pixel_values: torch.Tensor, per_image: list[list[Example]]
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Logits at the target positions, the targets, which sequence each belongs to, and the Q-Former's output. The
    image features are computed once per image and placed on every sequence about it, as
    `Blip2ForConditionalGeneration.forward` does."""
    config = model.config
    image_outputs = model.get_image_features(pixel_values, return_dict=True)
    features = image_outputs.pooler_output
    examples = [ex for exs in per_image for ex in exs]
    owner = torch.tensor([i for i, exs in enumerate(per_image) for _ in exs])
    pad = config.text_config.pad_token_id
    if config.use_decoder_only_language_model:
        ids = _padded([ex.context + ex.target for ex in examples], pad)
        labels = _padded([[-100] * len(ex.context) + ex.target for ex in examples], -100)
    else:
        ids = _padded([ex.context for ex in examples], pad)
        labels = _padded([ex.target for ex in examples], -100)
    mask = _padded([[1] * len(ex.context + (ex.target if config.use_decoder_only_language_model else []))
                    for ex in examples], 0)
    embeds = model.get_input_embeddings()(ids)
    image_mask = (ids == config.image_token_index).unsqueeze(-1)
    embeds = embeds.masked_scatter(image_mask, features[owner].to(embeds.dtype))
    if config.use_decoder_only_language_model:
        logits = model.language_model(inputs_embeds=embeds, attention_mask=mask).logits[:, :-1]
        # Position t predicts token t + 1.
        labels = labels[:, 1:]
    else:
        logits = model.language_model(inputs_embeds=embeds, attention_mask=mask, labels=labels).logits
    picked = labels != -100
    rows = torch.arange(len(examples)).unsqueeze(1).expand_as(labels)[picked]
    return logits[picked], labels[picked], rows, image_outputs.qformer_outputs.last_hidden_state


class SceneProbe(torch.nn.Module):
    """Training-only head (not saved): query token i of the Q-Former's output must tell what slot i holds (shape and
    colour, or empty), and the next query the background. Its direct gradient teaches the vision tower and Q-Former
    what a scene holds far sooner than the gradient that reaches them through the language model alone (as BLIP-2's
    own first stage trains the Q-Former before a language model is attached), and one query per slot, left to right,
    hands the language model the scene already sorted the way captions list it."""

    def __init__(self, config: Blip2Config) -> None:
        super().__init__()
        if config.num_query_tokens < SLOTS + 1:
            raise ValueError(f"the scene probe needs a query token per slot and one for the background ({SLOTS + 1})")
        self.sizes = [len(SHAPES) + 1, len(COLOURS) + 1]
        width = config.qformer_config.hidden_size
        self.slot = torch.nn.Linear(width, sum(self.sizes))
        self.background = torch.nn.Linear(width, len(BACKGROUNDS))

    @staticmethod
    def targets(scenes: list[Scene]) -> tuple[torch.Tensor, torch.Tensor]:
        """[scenes, slots, (shape + 1 or 0, colour + 1 or 0)] and [scenes] background."""
        slots = torch.zeros(len(scenes), SLOTS, 2, dtype=torch.long)
        for i, scene in enumerate(scenes):
            for shape in scene.shapes:
                slots[i, shape.slot, 0] = SHAPES.index(shape.kind) + 1
                slots[i, shape.slot, 1] = list(COLOURS).index(shape.colour) + 1
        background = torch.tensor([list(BACKGROUNDS).index(s.background) for s in scenes])
        return slots, background

    def loss(self, query_output: torch.Tensor, targets: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        slots, background = targets
        parts = self.slot(query_output[:, :SLOTS]).split(self.sizes, dim=-1)
        loss = F.cross_entropy(self.background(query_output[:, SLOTS]), background)
        for k, (part, size) in enumerate(zip(parts, self.sizes, strict=True)):
            loss = loss + F.cross_entropy(part.reshape(-1, size), slots[..., k].reshape(-1))
        return loss


class SceneStream:
    """Training scenes from consecutive seeds of the run's training range, optionally only the simpler ones."""

    def __init__(self, run_seed: int) -> None:
        self.seeds = iter(training_seeds(run_seed))

    def take(self, count: int, max_shapes: int) -> list[Scene]:
        out: list[Scene] = []
        while len(out) < count:
            scene = make_scene(next(self.seeds))
            if len(scene.shapes) <= max_shapes:
                out.append(scene)
        return out


def batch(processor: Blip2Processor, encoder: Encoder, scenes: list[Scene], rng: random.Random, questions: int
          ) -> tuple[torch.Tensor, list[list[Example]]]:
    pixel_values = processor.image_processor([s.image for s in scenes], return_tensors="pt").pixel_values
    per_image = [[encoder.encode(p, t) for p, t in training_examples(s, rng, questions)] for s in scenes]
    return pixel_values, per_image


def max_shapes_at(step: int, curriculum: list[tuple[int, int]]) -> int:
    return next((limit for until, limit in curriculum if step < until), 3)


def question_kind(prompt: str | None) -> str:
    if prompt is None:
        return "caption"
    question = prompt.removeprefix("Question: ")
    for prefix in ("how many shapes", "how many", "what colour is the background", "what colour", "what shape",
                   "where", "is there", "what is"):
        if question.startswith(prefix):
            return prefix
    return "other"


@torch.no_grad()
def forced_accuracy(model: Blip2ForConditionalGeneration, processor: Blip2Processor, encoder: Encoder,
                    seeds: list[int]) -> dict[str, float]:
    """Exact-match rate of captions and answers by question kind, under teacher forcing. A sequence whose every
    target token is the arg-max given the true prefix is exactly what greedy decoding returns, so this equals greedy
    exact match."""
    model.eval()
    scenes = [make_scene(s) for s in seeds]
    pixel_values = processor.image_processor([s.image for s in scenes], return_tensors="pt").pixel_values
    jobs = [requests(s) for s in scenes]
    per_image = [[encoder.encode(p, t) for p, t in js] for js in jobs]
    logits, targets, rows, _ = forward(model, pixel_values, per_image)
    wrong = torch.zeros(sum(len(x) for x in per_image), dtype=torch.bool)
    wrong.index_put_((rows,), logits.argmax(-1) != targets, accumulate=True)
    kinds = [question_kind(p) for js in jobs for p, _ in js]
    model.train()
    right: dict[str, list[bool]] = {}
    for kind, bad in zip(kinds, wrong.tolist(), strict=True):
        right.setdefault(kind, []).append(not bad)
        if kind != "caption":
            right.setdefault("vqa", []).append(not bad)
    return _rates(right)


def _rates(right: dict[str, list[bool]]) -> dict[str, float]:
    return {kind: round(sum(r) / len(r), 4) for kind, r in sorted(right.items())}


def evaluate_generate(out_dir: Path, seeds: range) -> dict[str, Any]:
    """Greedy `generate` with the checkpoint as saved, loaded and fed the way users load and feed it."""
    model = Blip2ForConditionalGeneration.from_pretrained(out_dir, dtype=torch.float32).eval()
    processor = Blip2Processor.from_pretrained(out_dir)
    decoder_only = model.config.use_decoder_only_language_model
    eos = model.generation_config.eos_token_id
    right: dict[str, list[bool]] = {}
    longest = 0
    misses: list[str] = []
    for seed in seeds:
        scene = make_scene(seed)
        for prompt, expected in requests(scene):
            inputs = inference_inputs(processor, decoder_only, scene.image, prompt)
            with torch.no_grad():
                out = model.generate(**inputs, max_new_tokens=MAX_NEW_TOKENS, do_sample=False)
            # Decoder-only output starts with the prompt (for captions, the image tokens + BOS generate() put
            # there itself); encoder-decoder output with the decoder start token.
            if not decoder_only:
                start = 1
            elif prompt is None:
                start = model.config.num_query_tokens + 1
            else:
                start = inputs["input_ids"].shape[1]
            new = out[0, start:]
            text = processor.tokenizer.decode(new, skip_special_tokens=True).strip()
            ended = int(new[-1]) == eos and len(new) < MAX_NEW_TOKENS
            longest = max(longest, len(new))
            ok = text == expected and ended
            right.setdefault(question_kind(prompt), []).append(ok)
            if prompt is not None:
                right.setdefault("vqa", []).append(ok)
            if not ok and len(misses) < 20:
                misses.append(f"seed {seed}: {prompt or '<caption>'} -> {text!r}, expected {expected!r}")
    rates = _rates(right)
    return {"scenes": len(seeds), "caption_exact": rates.pop("caption"), "vqa_exact": rates.pop("vqa"),
            "questions": len(right["vqa"]), "vqa_exact_by_kind": rates, "longest_output_tokens": longest,
            "misses": misses}


def param_groups(model: Blip2ForConditionalGeneration, patch_lr_scale: float) -> list[dict[str, Any]]:
    # Adam moves every weight by about the learning rate per step, so the patch embedding (fan-in 3 × patch²,
    # several times any other layer's) would change its outputs that much more; at the common rate its shape features
    # never settle and the model learns colours but not shapes.
    groups: dict[tuple[float, float], list[torch.nn.Parameter]] = {}
    for name, param in model.named_parameters():
        scale = patch_lr_scale if "patch_embedding" in name else 1.0
        decay = 0.01 if param.dim() >= 2 and "embed" not in name else 0.0
        groups.setdefault((scale, decay), []).append(param)
    return [{"params": ps, "lr_scale": scale, "weight_decay": decay} for (scale, decay), ps in groups.items()]


def lr_at(step: int, args: argparse.Namespace) -> float:
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    progress = (step - args.warmup) / max(1, args.steps - args.warmup)
    return args.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress)))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--family", choices=("opt", "t5"), default="opt")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=3000, help="at most; training stops early at --stop-at")
    parser.add_argument("--images", type=int, default=32, help="scenes per step")
    parser.add_argument("--questions", type=int, default=3, help="questions per scene and step, besides the caption")
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument("--probe-weight", type=float, default=1.0, help="weight of the training-only scene probe")
    parser.add_argument("--curriculum", default="",
                        help="STEP:N,...: until STEP, train on scenes of at most N shapes")
    parser.add_argument("--position-std", type=float, default=0.5, help="initial std of the ViT position embedding")
    parser.add_argument("--patch-lr-scale", type=float, default=0.25,
                        help="learning-rate factor of the patch embedding")
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--vision-layers", type=int, default=2)
    parser.add_argument("--qformer-layers", type=int, default=2)
    parser.add_argument("--lm-layers", type=int, default=3)
    parser.add_argument("--query-tokens", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--check-every", type=int, default=100, help="steps between exact-match checks")
    parser.add_argument("--check-scenes", type=int, default=200, help="unseen scenes each check measures")
    parser.add_argument("--stop-at", type=float, default=0.96,
                        help="stop once the check scenes' captions and answers of every question kind are this exact")
    parser.add_argument("--eval-scenes", type=int, default=200)
    parser.add_argument("--dtype", choices=("float16", "float32"), default="float16", help="stored weights")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    started = time.monotonic()
    processor = build_processor(args.family, args.query_tokens)
    config = build_config(processor, args)
    model = Blip2ForConditionalGeneration(config)
    init_weights(model, args.seed, args.position_std)
    model.train()
    encoder = Encoder(processor, config)
    check_layout(processor, encoder, model)
    params = sum(p.numel() for p in model.parameters())
    print(f"parameters: {params:,}  vocab: {len(processor.tokenizer)}", flush=True)

    probe = SceneProbe(config)
    optimizer = torch.optim.AdamW(
        [*param_groups(model, args.patch_lr_scale), {"params": list(probe.parameters()), "lr_scale": 1.0,
                                                     "weight_decay": 0.0}],
        lr=args.lr, betas=(0.9, 0.98))
    rng = random.Random(args.seed)
    stream = SceneStream(args.seed)
    curriculum = [(int(until), int(limit)) for until, limit in
                  (phase.split(":") for phase in args.curriculum.split(",") if phase)]
    # Unseen scenes, apart from the final evaluation's.
    check_seeds = list(range(HELD_OUT_SEED_START + 100_000, HELD_OUT_SEED_START + 100_000 + args.check_scenes))
    running = [0.0, 0.0]
    checks: list[dict[str, Any]] = []
    step = 0
    for step in range(1, args.steps + 1):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step - 1, args) * group["lr_scale"]
        scenes = stream.take(args.images, max_shapes_at(step - 1, curriculum))
        pixel_values, per_image = batch(processor, encoder, scenes, rng, args.questions)
        logits, targets, _, query_output = forward(model, pixel_values, per_image)
        lm_loss = F.cross_entropy(logits, targets)
        probe_loss = probe.loss(query_output, SceneProbe.targets(scenes))
        loss = lm_loss + args.probe_weight * probe_loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        running = [0.95 * r + 0.05 * x.item() if step > 1 else x.item()
                   for r, x in zip(running, (lm_loss, probe_loss), strict=True)]
        if step % args.check_every == 0 or step == args.steps:
            exact = forced_accuracy(model, processor, encoder, check_seeds)
            checks.append({"step": step, **exact})
            print(f"step {step}/{args.steps} loss {running[0]:.4f} scene probe loss {running[1]:.4f} "
                  f"lr {lr_at(step - 1, args):.2e} {time.monotonic() - started:.0f}s  exact: "
                  + ", ".join(f"{k} {v:.3f}" for k, v in exact.items()), flush=True)
            if min(exact.values()) >= args.stop_at:
                break
    train_s = time.monotonic() - started

    model.eval()
    model.generation_config = generation_config(args.family)
    args.out.mkdir(parents=True, exist_ok=True)
    model.to(getattr(torch, args.dtype)).save_pretrained(args.out, safe_serialization=True)
    processor.save_pretrained(args.out)
    result = evaluate_generate(args.out, range(HELD_OUT_SEED_START, HELD_OUT_SEED_START + args.eval_scenes))
    for miss in result.pop("misses"):
        print("  miss", miss)
    record = {
        "generator": "scripts/train_scenes.py", "script_version": SCRIPT_VERSION,
        # Every option but --out: the same options reproduce the same weights (on the same torch and thread count).
        "options": {k: v for k, v in vars(args).items() if k != "out"},
        "steps_run": step, "parameters": params, "train_seconds": round(train_s),
        "held_out_seeds": [HELD_OUT_SEED_START, HELD_OUT_SEED_START + args.eval_scenes], **result,
    }
    (args.out / "SCENES_MODEL.json").write_text(json.dumps(record, indent=1) + "\n")
    print(json.dumps(record, indent=1), flush=True)


if __name__ == "__main__":
    main()
