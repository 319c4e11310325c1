"""LLM stage: projected query embeddings + prompt -> generated text.

Builds the LLM input exactly as `Blip2ForConditionalGeneration.generate` does (image tokens scattered with the
query embeddings, then the prompt), and decodes a whole batch in one loop where every row keeps its own
controls: greedy rows take the arg-max, sampled rows draw from their own seeded generator, so a request's
result does not depend on which neighbours it was batched with.
"""

from __future__ import annotations

import inspect
import logging
import os
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import OPTForCausalLM
from transformers.generation.logits_process import (
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from .checkpoint import LoadedStage, load_stage
from .compute_lock import ComputeLock
from .errors import ConfigurationError, InvalidRequestError
from .options import ServerOptions
from .requests import GenerationRequest

log = logging.getLogger(__name__)


def select_rows(cache: Any, mask: torch.Tensor, keep: list[int]) -> torch.Tensor:
    """Keeps only the rows `keep` of a KV cache (in place) and its attention mask (returned)."""
    index = torch.tensor(keep, device=mask.device)
    cache.batch_select_indices(index)
    return mask.index_select(0, index)


def configure_attention(device: str, *, cudnn: bool) -> bool:
    """Keeps PyTorch's attention off cuDNN's kernel on CUDA unless asked for; True when it was switched off.

    The setting is process-wide: the LLM stage runs in a process of its own under Triton.
    """
    if not device.startswith("cuda") or cudnn:
        return False
    torch.backends.cuda.enable_cudnn_sdp(False)
    log.info("attention: cuDNN kernel off (flash, memory-efficient or math instead; BLIP2_CUDNN_ATTENTION=on "
             "allows it)")
    return True


@dataclass(eq=False)
class _Row:
    request: GenerationRequest
    input_ids: list[int]
    generated: list[int] = field(default_factory=list)
    generator: torch.Generator | None = None
    done: bool = False
    # Set when this row alone cannot go on (its sampling settings overflowed); the row is then done.
    error: InvalidRequestError | None = None


def _cache_kwarg(module: torch.nn.Module) -> str:
    # transformers 5.x renames `past_key_values` to `cache` (the old name goes in 5.40).
    return "cache" if "cache" in inspect.signature(module.forward).parameters else "past_key_values"


def _sampling_overflow(request: GenerationRequest) -> InvalidRequestError:
    return InvalidRequestError(
        f"temperature: sampling overflowed float32 with temperature={request.temperature}, "
        f"repetition_penalty={request.repetition_penalty}; expected settings whose logits stay finite"
    )


class LanguageStage:
    def __init__(self, options: ServerOptions, loaded: LoadedStage | None = None) -> None:
        self.options = options
        self.loaded = loaded or load_stage("llm", options)
        config = self.loaded.config
        self.decoder_only = bool(config.use_decoder_only_language_model)
        self.lm = self.loaded.model.language_model
        self.tokenizer = self.loaded.processor.tokenizer
        self.num_query_tokens = int(config.num_query_tokens)
        self.hidden_size = int(config.text_config.hidden_size)
        if config.image_token_id is None:
            # Checkpoints saved by older transformers may lack it; the current BLIP-2 code (and so the HF
            # reference) cannot place the query embeddings without it.
            raise ConfigurationError(
                f"checkpoint {self.loaded.source!r}: config.json has no image_token_index; add the id of the "
                "processor's image token (e.g. 50265 for the Salesforce blip2-opt checkpoints), as the current "
                "Salesforce checkpoints have"
            )
        self.image_token_id = int(config.image_token_id)
        # T5 configs have no BOS; captions then go through the processor's text path with an empty prompt.
        bos = getattr(config.text_config, "bos_token_id", None)
        self.bos_token_id = int(bos) if bos is not None else None
        # The processor decides how many image tokens a prompt gets (HF's text path); the model config decides
        # it for captions (HF's no-text path). They agree on every published checkpoint.
        self.processor_query_tokens = int(self.loaded.processor.num_query_tokens or self.num_query_tokens)
        image_token = getattr(self.loaded.processor, "image_token", None)
        self.image_token_text = getattr(image_token, "content", None) or str(image_token or "<image>")
        gen = self.lm.generation_config
        eos = gen.eos_token_id if gen.eos_token_id is not None else config.text_config.eos_token_id
        self.eos_token_ids = {int(e) for e in (eos if isinstance(eos, list | tuple) else [eos]) if e is not None}
        pad = gen.pad_token_id if gen.pad_token_id is not None else self.tokenizer.pad_token_id
        self.pad_token_id = int(pad if pad is not None else next(iter(self.eos_token_ids), 0))
        self.default_repetition_penalty = gen.repetition_penalty
        self.max_positions = int(getattr(config.text_config, "max_position_embeddings", 2048))
        self.device = self.loaded.device
        self.compute = ComputeLock.for_stage(options.compute_lock, options.compute_lock_file)
        configure_attention(str(self.device), cudnn=options.cudnn_attention == "on")
        self.embed_tokens = self.lm.get_input_embeddings()
        params = inspect.signature(self.lm.forward).parameters
        self._cache_kwarg = _cache_kwarg(self.lm)
        # Prefill needs the logits of the last position only; the vocabulary projection of every prompt position
        # would cost more than the rest of the prefill (as HF generate does, when the model supports it).
        self._prefill_kwargs = {"logits_to_keep": 1} if "logits_to_keep" in params else {}
        # OPT's causal-LM forward is its decoder, then the output projection of the kept positions, nothing else.
        # Calling the two apart lets the in-flight engine project a step's rows and its newcomers' last prompt
        # positions in one pass over the 50272-row weight (`step_and_prefill`). Other LM classes may do more
        # between the two (scaling, soft-capping), so they keep the whole forward.
        self._decoder: torch.nn.Module | None = None
        if isinstance(self.lm, OPTForCausalLM):
            self._decoder = self.lm.get_decoder()
            self._decoder_cache_kwarg = _cache_kwarg(self._decoder)
            self._output_projection = self.lm.get_output_embeddings()

    @property
    def embeds_shape(self) -> tuple[int, int]:
        return (self.num_query_tokens, self.hidden_size)

    def prompt_ids(self, prompt: str | None) -> list[int]:
        if not prompt and self.decoder_only and self.bos_token_id is not None:
            # HF's no-text path: image tokens + BOS, built by `generate` itself.
            return [self.image_token_id] * self.num_query_tokens + [self.bos_token_id]
        text_ids = self.tokenizer(prompt or "")["input_ids"]
        image_ids = self.tokenizer(self.image_token_text * self.processor_query_tokens, add_special_tokens=False)[
            "input_ids"
        ]
        return list(image_ids) + list(text_ids)

    def prepare(self, request: GenerationRequest) -> _Row:
        request.validate(self.options, expected_embeds_shape=self.embeds_shape)
        ids = self.prompt_ids(request.prompt)
        if ids.count(self.image_token_id) != self.num_query_tokens:
            raise InvalidRequestError(
                f"text_input: must not contain the image token {self.image_token_text!r}"
            )
        text_tokens = len(ids) - self.num_query_tokens
        if text_tokens > self.options.max_prompt_tokens:
            raise InvalidRequestError(
                f"text_input: expected at most {self.options.max_prompt_tokens} tokens, got {text_tokens}"
            )
        assert request.max_tokens is not None
        if len(ids) + request.max_tokens > self.max_positions:
            raise InvalidRequestError(
                f"text_input + max_tokens: expected at most {self.max_positions} positions, "
                f"got {len(ids)} + {request.max_tokens}"
            )
        generator = None
        if request.do_sample:
            seed = request.seed if request.seed is not None else int.from_bytes(os.urandom(8), "little") >> 1
            generator = torch.Generator(device="cpu").manual_seed(seed % (2**63))
        return _Row(request=request, input_ids=ids, generator=generator)

    def _inputs_embeds(self, row: _Row) -> torch.Tensor:
        ids = torch.tensor(row.input_ids, device=self.device)
        embeds = self.embed_tokens(ids)
        mask = (ids == self.image_token_id).unsqueeze(-1)
        # A copy: arrays from Triton are read-only views of its shared memory.
        query = torch.tensor(row.request.query_embeds, device=self.device, dtype=embeds.dtype)
        return embeds.masked_scatter(mask, query)

    def run(self, requests: list[GenerationRequest]) -> list[str | InvalidRequestError]:
        results: list[str | InvalidRequestError] = [""] * len(requests)
        batch: list[tuple[int, _Row]] = []
        for i, req in enumerate(requests):
            try:
                batch.append((i, self.prepare(req)))
            except InvalidRequestError as e:
                results[i] = e
        single = [(i, r) for i, r in batch if r.request.num_beams > 1]
        stepped = [(i, r) for i, r in batch if r.request.num_beams == 1]
        if stepped:
            if self.decoder_only:
                self._decode([r for _, r in stepped])
            else:
                self._decode_seq2seq([r for _, r in stepped])
        for _, row in single:
            self._beam_search(row)
        for i, row in stepped + single:
            results[i] = row.error if row.error is not None else self.text(row)
        return results

    def _left_padded(self, rows: list[_Row]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The rows' input embeddings, attention mask and token ids as one left-padded batch."""
        width = max(len(r.input_ids) for r in rows)
        pad_embed = self.embed_tokens(torch.tensor([self.pad_token_id], device=self.device))[0]
        embeds = pad_embed.expand(len(rows), width, -1).clone()
        mask = torch.zeros(len(rows), width, dtype=torch.long, device=self.device)
        ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long, device=self.device)
        for b, row in enumerate(rows):
            n = len(row.input_ids)
            # Left padding keeps every row's newest token in the last column, as HF batches decoder-only LMs;
            # encoders ignore masked positions either way.
            embeds[b, width - n:] = self._inputs_embeds(row)
            mask[b, width - n:] = 1
            ids[b, width - n:] = torch.tensor(row.input_ids, device=self.device)
        return embeds, mask, ids

    def _hf_generate(self, rows: list[_Row], **kwargs: object) -> list[list[int]]:
        """HF `generate` over rows of one kind; returns each row's new tokens, cut at EOS and at its max_tokens."""
        embeds, mask, ids = self._left_padded(rows)
        width = mask.shape[1]
        inputs: dict[str, torch.Tensor] = {"inputs_embeds": embeds, "attention_mask": mask}
        if self.decoder_only:
            inputs["input_ids"] = ids
        with self.compute:
            out = self.lm.generate(**inputs, max_new_tokens=max(int(r.request.max_tokens or 0) for r in rows),
                                   **kwargs)
        # Decoder-only output repeats the prompt; encoder-decoder output starts with the decoder start token.
        new = out[:, width:] if self.decoder_only else out[:, 1:]
        results = []
        for row, tokens in zip(rows, new.tolist(), strict=True):
            kept: list[int] = []
            for t in tokens[: row.request.max_tokens]:
                if t in self.eos_token_ids:
                    break
                kept.append(t)
            results.append(kept)
        return results

    @staticmethod
    def _hf_controls(request: GenerationRequest) -> dict[str, object]:
        kwargs: dict[str, object] = {}
        if request.repetition_penalty is not None:
            kwargs["repetition_penalty"] = request.repetition_penalty
        if request.do_sample:
            # Explicit values: HF's own sampling defaults (top_k=50) would differ from our contract.
            kwargs.update(
                do_sample=True,
                temperature=request.temperature if request.temperature is not None else 1.0,
                top_k=request.top_k or 0,
                top_p=request.top_p if request.top_p is not None else 1.0,
            )
        else:
            kwargs["do_sample"] = False
        return kwargs

    @torch.inference_mode()
    def _beam_search(self, row: _Row) -> None:
        # Beam search is deterministic and per-request; HF's implementation is the reference for it.
        (row.generated,) = self._hf_generate([row], num_beams=row.request.num_beams, **self._hf_controls(row.request))

    @torch.inference_mode()
    def _decode_seq2seq(self, rows: list[_Row]) -> None:
        # Greedy rows share one batched HF generate (a greedy row's tokens do not depend on its neighbours);
        # sampled rows run alone with their own seed so their text does not depend on the batch either.
        greedy = [r for r in rows if not r.request.do_sample and r.request.repetition_penalty is None]
        if greedy:
            for row, tokens in zip(greedy, self._hf_generate(greedy, do_sample=False), strict=True):
                row.generated = tokens
        for row in rows:
            if row in greedy:
                continue
            if row.generator is not None:
                torch.manual_seed(int(row.generator.initial_seed()))
            try:
                (row.generated,) = self._hf_generate([row], **self._hf_controls(row.request))
            except RuntimeError as e:
                # torch.multinomial's refusal of overflowed probabilities (see `_next_tokens`): this row's fault.
                if "probability tensor" not in str(e):
                    raise
                row.error = _sampling_overflow(row.request)

    def _penalty(self, request: GenerationRequest) -> float | None:
        penalty = request.repetition_penalty
        penalty = penalty if penalty is not None else self.default_repetition_penalty
        return penalty if penalty is not None and penalty != 1.0 else None

    def _next_tokens(self, rows: list[_Row], logits: torch.Tensor) -> list[int]:
        # One arg-max over the whole batch serves every plain greedy row; only rows with their own processing
        # (penalty, sampling) pay for a per-row pass. Per-row Python work dominates small models' steps.
        tokens: list[int] = logits.argmax(-1).tolist()
        for pos, row in enumerate(rows):
            req = row.request
            penalty = self._penalty(req)
            if penalty is None and not req.do_sample:
                continue
            scores = logits[pos].float().unsqueeze(0)
            if penalty is not None:
                history = torch.tensor([row.input_ids + row.generated], device=scores.device)
                scores = RepetitionPenaltyLogitsProcessor(penalty)(history, scores)
            if not req.do_sample:
                tokens[pos] = int(scores.argmax(-1))
                continue
            # Same warper order as HF's sampling: temperature, top-k, top-p.
            if req.temperature is not None and req.temperature != 1.0:
                scores = TemperatureLogitsWarper(req.temperature)(None, scores)
            if req.top_k:
                scores = TopKLogitsWarper(top_k=req.top_k)(None, scores)
            if req.top_p is not None and req.top_p < 1.0:
                scores = TopPLogitsWarper(top_p=req.top_p)(None, scores)
            probs = torch.softmax(scores, dim=-1).cpu()
            if not torch.isfinite(probs).all():
                # A tiny temperature or penalty overflows float32 (HF's `generate` raises in multinomial then);
                # the request fails alone instead of taking the rest of the batch with it.
                row.error = _sampling_overflow(req)
                continue
            tokens[pos] = int(torch.multinomial(probs, 1, generator=row.generator))
        return tokens

    def finish_token(self, row: _Row, token: int) -> bool:
        """Records a sampled token; True when the row is complete (EOS, which is not kept, max_tokens, or `error`)."""
        if row.error is not None:
            row.done = True
            return True
        if token in self.eos_token_ids:
            row.done = True
            return True
        row.generated.append(token)
        assert row.request.max_tokens is not None
        row.done = len(row.generated) >= row.request.max_tokens
        return row.done

    def text(self, row: _Row) -> str:
        return self.tokenizer.decode(row.generated, skip_special_tokens=True).strip()

    def _prefill_inputs(self, rows: list[_Row]) -> tuple[dict[str, Any], torch.Tensor]:
        embeds, mask, _ = self._left_padded(rows)
        positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
        return {"inputs_embeds": embeds, "attention_mask": mask, "position_ids": positions, "use_cache": True}, mask

    @torch.inference_mode()
    def prefill(self, rows: list[_Row]) -> tuple[Any, torch.Tensor, torch.Tensor]:
        """Runs the prompts of `rows` as one left-padded batch: (KV cache, attention mask, last-position logits)."""
        inputs, mask = self._prefill_inputs(rows)
        with self.compute:
            out = self.lm(**inputs, **{self._cache_kwarg: None}, **self._prefill_kwargs)
        return out.past_key_values, mask, out.logits[:, -1, :]

    @property
    def shares_output_projection(self) -> bool:
        """Whether `step_and_prefill` can serve a step and a prefill with one output projection."""
        return self._decoder is not None

    @torch.inference_mode()
    def step_and_prefill(self, cache: Any, mask: torch.Tensor, tokens: list[int], rows: list[_Row], *,
                         padded: bool = True) -> tuple[torch.Tensor, tuple[Any, torch.Tensor, torch.Tensor]]:
        """`step(cache, mask, tokens)` and `prefill(rows)` in one call: (step logits, prefill's result).

        On CPU the output projection of a single prompt's last position is a pass over all of its weights (103 MB
        on the benchmark model) for one row: 9.3 ms through `F.linear`, 4.9 ms with packed weights, against well
        under a millisecond more as an 18th row of the step's projection; the in-flight engine admits one or two
        prompts per iteration.
        """
        assert self._decoder is not None, "step_and_prefill needs shares_output_projection"
        prefill_inputs, prefill_mask = self._prefill_inputs(rows)
        cache_kwarg = self._decoder_cache_kwarg
        with self.compute:
            stepped = self._decoder(**self._step_inputs(mask, tokens, padded), **{cache_kwarg: cache})
            prefilled = self._decoder(**prefill_inputs, **{cache_kwarg: None})
            last = torch.cat([stepped.last_hidden_state[:, -1], prefilled.last_hidden_state[:, -1]])
            logits = self._output_projection(last)
        return logits[: len(tokens)], (prefilled.past_key_values, prefill_mask, logits[len(tokens):])

    def _decode_attention_mask(self, mask: torch.Tensor, padded: bool) -> torch.Tensor | None:
        """The attention mask of a one-token step, ready for the attention kernel.

        Given the 2D padding mask, transformers rebuilds a 4D mask on every forward and PyTorch then converts and
        re-pads it in every layer; on a GPU that host work doubled a 32-row step of blip2-opt-2.7b (27.5 vs
        13.6 ms). A one-token step needs no causal part, so the padding mask alone, additive, in the model's dtype
        and in a buffer whose row stride is a multiple of 8 (the memory-efficient kernel's alignment), is passed
        as it is. Without padding there is no mask at all, which lets the flash kernel run.
        """
        if not padded:
            return None
        rows, width = mask.shape
        # The hidden states (and so attention) take the embeddings' dtype, also in bitsandbytes models.
        dtype = self.embed_tokens.weight.dtype
        if not dtype.is_floating_point:
            dtype = self.lm.dtype
        buffer = torch.full((rows, 1, 1, -(-width // 8) * 8), torch.finfo(dtype).min, dtype=dtype,
                            device=mask.device)
        additive = buffer[..., :width]
        additive.masked_fill_(mask[:, None, None, :].bool(), 0.0)
        return additive

    def _step_inputs(self, mask: torch.Tensor, tokens: list[int], padded: bool) -> dict[str, Any]:
        return {
            "input_ids": torch.tensor(tokens, device=self.device).unsqueeze(-1),
            "attention_mask": self._decode_attention_mask(mask, padded),
            "position_ids": mask.sum(-1, keepdim=True) - 1,
            "use_cache": True,
        }

    @torch.inference_mode()
    def step(self, cache: Any, mask: torch.Tensor, tokens: list[int], *, padded: bool = True) -> torch.Tensor:
        """Feeds one token per row; `mask` must already include the new column. Returns next-token logits.

        `padded`: whether any row has padding (callers know it from lengths on the host; reading the mask from
        a GPU would wait for the queue)."""
        with self.compute:
            out = self.lm(**self._step_inputs(mask, tokens, padded), **{self._cache_kwarg: cache})
        return out.logits[:, -1, :]

    @torch.inference_mode()
    def _decode(self, rows: list[_Row]) -> None:
        """Static batching: the whole batch decodes until its last row finishes."""
        cache, mask, logits = self.prefill(rows)
        active = list(range(len(rows)))
        # Rows step together, so a row is padded for good once a longer prompt shared its batch.
        width = mask.shape[1]
        while True:
            live = [rows[i] for i in active]
            next_ids = self._next_tokens(live, logits)
            keep = [pos for pos, (row, tok) in enumerate(zip(live, next_ids, strict=True))
                    if not self.finish_token(row, tok)]
            if not keep:
                return
            if len(keep) < len(active):
                # Retire finished rows from the KV cache so the remaining steps only pay for live sequences.
                mask = select_rows(cache, mask, keep)
                active = [active[k] for k in keep]
                next_ids = [next_ids[k] for k in keep]
            mask = torch.cat([mask, mask.new_ones(len(active), 1)], dim=1)
            logits = self.step(cache, mask, next_ids, padded=min(len(rows[i].input_ids) for i in active) < width)
