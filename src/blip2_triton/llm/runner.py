"""Executes the language model: a prefill of newcomers, a decoding step of the running batch, or both with one
output projection, each returning next-token logits; and HF's `generate` for whole requests (beam search,
encoder-decoder LMs). Inputs are built exactly as `Blip2ForConditionalGeneration` builds them: the prompt's
embeddings with the projected query embeddings scattered onto the image-token positions.

This is where a step's inputs become device work, so a runner that replays captured graphs replaces `decode`.
"""

from __future__ import annotations

import contextlib
import inspect
import itertools
import logging
from typing import Any

import torch
from transformers import OPTForCausalLM

from .batch import BatchState, Prefilled
from .sampler import sampling_overflow
from .sequence import Sequence

log = logging.getLogger(__name__)


def _cache_kwarg(module: torch.nn.Module) -> str:
    # transformers 5.x renames `past_key_values` to `cache` (the old name goes in 5.40).
    return "cache" if "cache" in inspect.signature(module.forward).parameters else "past_key_values"


def configure_attention(device: str, *, cudnn: bool) -> bool:
    """Keeps PyTorch's attention off cuDNN's kernel on CUDA unless asked for; True when it was switched off.

    With a padding mask PyTorch picks cuDNN first, and the in-flight batch's shape changes every step, which costs
    host time per layer (docs/BENCHMARK.md, GPU check). Process-wide: the LLM stage has a process of its own.
    """
    if not device.startswith("cuda") or cudnn:
        return False
    torch.backends.cuda.enable_cudnn_sdp(False)
    log.info("attention: cuDNN kernel off (flash, memory-efficient or math instead; BLIP2_CUDNN_ATTENTION=on "
             "allows it)")
    return True


class ModelRunner:
    def __init__(self, lm: torch.nn.Module, *, device: torch.device, image_token_id: int, pad_token_id: int,
                 decoder_only: bool, eos_token_ids: set[int],
                 compute: contextlib.AbstractContextManager[Any] | None = None) -> None:
        self.lm, self.device = lm, device
        self.image_token_id, self.pad_token_id = image_token_id, pad_token_id
        self.decoder_only, self.eos_token_ids = decoder_only, eos_token_ids
        self.compute: contextlib.AbstractContextManager[Any] = compute or contextlib.nullcontext()
        self.embed_tokens = lm.get_input_embeddings()
        self._cache_kwarg = _cache_kwarg(lm)
        # Prefill needs the last position's logits only (as HF generate does, where the model supports it).
        params = inspect.signature(lm.forward).parameters
        self._prefill_kwargs = {"logits_to_keep": 1} if "logits_to_keep" in params else {}
        # OPT's causal-LM forward is its decoder and then the output projection, nothing between: called apart, a
        # step's rows and its newcomers' last prompt positions share one pass over the vocabulary weight. Other LM
        # classes may do more between the two (scaling, soft-capping), so they keep the whole forward.
        self._decoder: torch.nn.Module | None = None
        if isinstance(lm, OPTForCausalLM):
            self._decoder = lm.get_decoder()
            self._decoder_cache_kwarg = _cache_kwarg(self._decoder)
            self._output_projection = lm.get_output_embeddings()

    def new_batch(self, *, max_rows: int) -> BatchState:
        return BatchState(max_rows=max_rows)

    def capture_graphs(self, batch: BatchState, max_rows: int) -> int:
        """Captures the decoding step's CUDA graphs for `batch` now, rather than at each bucket's first use; how many
        (none on this eager runner)."""
        return 0

    @property
    def shares_output_projection(self) -> bool:
        """Whether `decode_and_prefill` serves a step and a prefill with one output projection."""
        return self._decoder is not None

    def _inputs_embeds(self, seq: Sequence) -> torch.Tensor:
        ids = torch.tensor(seq.prompt_ids, device=self.device)
        embeds = self.embed_tokens(ids)
        mask = (ids == self.image_token_id).unsqueeze(-1)
        # A copy: arrays from Triton are read-only views of its shared memory.
        query = torch.tensor(seq.request.query_embeds, device=self.device, dtype=embeds.dtype)
        return embeds.masked_scatter(mask, query)

    def _left_padded(self, seqs: list[Sequence]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The sequences' input embeddings, attention mask and token ids as one left-padded batch."""
        width = max(len(s.prompt_ids) for s in seqs)
        pad_embed = self.embed_tokens(torch.tensor([self.pad_token_id], device=self.device))[0]
        embeds = pad_embed.expand(len(seqs), width, -1).clone()
        mask = torch.zeros(len(seqs), width, dtype=torch.long, device=self.device)
        ids = torch.full((len(seqs), width), self.pad_token_id, dtype=torch.long, device=self.device)
        for b, seq in enumerate(seqs):
            n = len(seq.prompt_ids)
            # Left padding keeps every row's newest token in the last column, as HF batches decoder-only LMs;
            # encoders ignore masked positions either way.
            embeds[b, width - n:] = self._inputs_embeds(seq)
            mask[b, width - n:] = 1
            ids[b, width - n:] = torch.tensor(seq.prompt_ids, device=self.device)
        return embeds, mask, ids

    def _prefill_inputs(self, seqs: list[Sequence]) -> tuple[dict[str, Any], torch.Tensor]:
        embeds, mask, _ = self._left_padded(seqs)
        positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
        return {"inputs_embeds": embeds, "attention_mask": mask, "position_ids": positions, "use_cache": True}, mask

    @torch.inference_mode()
    def prefill(self, seqs: list[Sequence]) -> Prefilled:
        """Runs the prompts of `seqs` as one left-padded batch."""
        inputs, mask = self._prefill_inputs(seqs)
        with self.compute:
            out = self.lm(**inputs, **{self._cache_kwarg: None}, **self._prefill_kwargs)
        return Prefilled(out.past_key_values, mask, out.logits[:, -1, :])

    @torch.inference_mode()
    def decode(self, batch: BatchState) -> torch.Tensor:
        """One step of the running batch (after `batch.begin_step()`): next-token logits per row."""
        with self.compute:
            out = self.lm(**self._step_inputs(batch), **{self._cache_kwarg: batch.cache})
        return out.logits[:, -1, :]

    @torch.inference_mode()
    def decode_and_prefill(self, batch: BatchState, seqs: list[Sequence]) -> tuple[torch.Tensor, Prefilled]:
        """`decode(batch)` and `prefill(seqs)` with one output projection (the engine admits one or two prompts per
        iteration: a single row's projection would be a whole pass over the vocabulary weight)."""
        assert self._decoder is not None, "decode_and_prefill needs shares_output_projection"
        prefill_inputs, prefill_mask = self._prefill_inputs(seqs)
        cache_kwarg = self._decoder_cache_kwarg
        with self.compute:
            stepped = self._decoder(**self._step_inputs(batch), **{cache_kwarg: batch.cache})
            prefilled = self._decoder(**prefill_inputs, **{cache_kwarg: None})
            last = torch.cat([stepped.last_hidden_state[:, -1], prefilled.last_hidden_state[:, -1]])
            logits = self._output_projection(last)
        return logits[: len(batch)], Prefilled(prefilled.past_key_values, prefill_mask, logits[len(batch):])

    def _decode_attention_mask(self, batch: BatchState) -> torch.Tensor | None:
        """The attention mask of a one-token step as the kernel takes it. Given the 2D padding mask, transformers
        rebuilds a 4D mask on every forward and PyTorch converts and re-pads it in every layer (host work that
        dominated GPU steps); a one-token step needs no causal part, so the padding mask alone goes in: additive, in
        the model's dtype, with a row stride that is a multiple of 8 (the memory-efficient kernel's alignment). No
        padding, no mask, which lets flash attention run."""
        if not batch.padded:
            return None
        assert batch.mask is not None
        rows, width = batch.mask.shape
        # The hidden states (and so attention) take the embeddings' dtype, also in bitsandbytes models.
        dtype = self.embed_tokens.weight.dtype
        if not dtype.is_floating_point:
            dtype = self.lm.dtype
        buffer = torch.full((rows, 1, 1, -(-width // 8) * 8), torch.finfo(dtype).min, dtype=dtype,
                            device=batch.mask.device)
        additive = buffer[..., :width]
        additive.masked_fill_(batch.mask[:, None, None, :].bool(), 0.0)
        return additive

    def _step_inputs(self, batch: BatchState) -> dict[str, Any]:
        assert batch.mask is not None
        return {
            # Copied without waiting: `torch.tensor(..., device=cuda)` is a blocking copy, a second sync per step.
            "input_ids": torch.tensor(batch.tokens).to(self.device, non_blocking=True).unsqueeze(-1),
            "attention_mask": self._decode_attention_mask(batch),
            "position_ids": batch.mask.sum(-1, keepdim=True) - 1,
            "use_cache": True,
        }

    # ---- whole requests: HF `generate` -----------------------------------------------------------------------

    @torch.inference_mode()
    def generate(self, seqs: list[Sequence]) -> None:
        """Generates each sequence whole (sets `generated`, or `error` for that sequence alone)."""
        beams = [s for s in seqs if s.request.num_beams > 1]
        # Greedy rows share one batched call (a greedy row's tokens do not depend on its neighbours); sampled rows
        # run alone with their own seed so their text does not depend on the batch either.
        greedy = [s for s in seqs if s.request.num_beams == 1 and not s.request.do_sample
                  and s.request.repetition_penalty is None]
        if greedy:
            for seq, tokens in zip(greedy, self._hf_generate(greedy, do_sample=False), strict=True):
                seq.generated = tokens
        for seq in seqs:
            if seq in greedy:
                continue
            if seq.generator is not None:
                torch.manual_seed(int(seq.generator.initial_seed()))
            try:
                (seq.generated,) = self._hf_generate([seq], **self._hf_controls(seq))
            except RuntimeError as e:
                # torch.multinomial's refusal of overflowed probabilities: this sequence's fault alone.
                if "probability tensor" not in str(e) or seq in beams:
                    raise
                seq.error = sampling_overflow(seq.request)
        for seq in seqs:
            seq.done = True

    @staticmethod
    def _hf_controls(seq: Sequence) -> dict[str, object]:
        request = seq.request
        kwargs: dict[str, object] = {"do_sample": request.do_sample}
        if request.num_beams > 1:
            kwargs["num_beams"] = request.num_beams
        if request.repetition_penalty is not None:
            kwargs["repetition_penalty"] = request.repetition_penalty
        if request.do_sample:
            # Explicit values: HF's own sampling defaults (top_k=50) would differ from our contract.
            kwargs.update(temperature=request.temperature if request.temperature is not None else 1.0,
                          top_k=request.top_k or 0, top_p=request.top_p if request.top_p is not None else 1.0)
        return kwargs

    def _hf_generate(self, seqs: list[Sequence], **kwargs: object) -> list[list[int]]:
        """HF `generate` over sequences of one kind; each one's new tokens, cut at EOS and at its max_tokens."""
        embeds, mask, ids = self._left_padded(seqs)
        width = mask.shape[1]
        inputs: dict[str, torch.Tensor] = {"inputs_embeds": embeds, "attention_mask": mask}
        if self.decoder_only:
            inputs["input_ids"] = ids
        with self.compute:
            out = self.lm.generate(**inputs, max_new_tokens=max(s.max_tokens for s in seqs), **kwargs)
        # Decoder-only output repeats the prompt; encoder-decoder output starts with the decoder start token.
        new = out[:, width:] if self.decoder_only else out[:, 1:]
        return [list(itertools.takewhile(lambda t: t not in self.eos_token_ids, tokens[: seq.max_tokens]))
                for seq, tokens in zip(seqs, new.tolist(), strict=True)]
