"""The LLM stage: a checkpoint's language model, its tokenizer and the rules that turn a request into a sequence
(the prompt tokenized as `Blip2Processor` does, with the image tokens the query embeddings replace)."""

from __future__ import annotations

import logging
import os

import torch

from ..checkpoint import LoadedStage, load_stage
from ..compute_lock import ComputeLock
from ..cuda_graphs import fixed_buffers
from ..errors import ConfigurationError, InvalidRequestError
from ..options import ServerOptions
from ..requests import GenerationRequest
from . import static
from .detokenizer import Detokenizer
from .runner import ModelRunner, configure_attention
from .sampler import Sampler
from .sequence import Completion, Sequence
from .static import StaticRunner

log = logging.getLogger(__name__)


class LanguageStage:
    def __init__(self, options: ServerOptions, loaded: LoadedStage | None = None) -> None:
        self.options = options
        self.loaded = loaded or load_stage("llm", options)
        config = self.loaded.config
        self.decoder_only = bool(config.use_decoder_only_language_model)
        self.lm = self.loaded.model.language_model
        self.tokenizer = self.loaded.processor.tokenizer
        self.detokenizer = Detokenizer(self.tokenizer)
        self.num_query_tokens = int(config.num_query_tokens)
        self.hidden_size = int(config.text_config.hidden_size)
        if config.image_token_id is None:
            # Checkpoints saved by older transformers may lack it; the current BLIP-2 code (and so the HF reference)
            # cannot place the query embeddings without it.
            raise ConfigurationError(
                f"checkpoint {self.loaded.source!r}: config.json has no image_token_index; add the id of the "
                "processor's image token (e.g. 50265 for the Salesforce blip2-opt checkpoints), as the current "
                "Salesforce checkpoints have"
            )
        self.image_token_id = int(config.image_token_id)
        # T5 configs have no BOS; captions then go through the processor's text path with an empty prompt.
        bos = getattr(config.text_config, "bos_token_id", None)
        self.bos_token_id = int(bos) if bos is not None else None
        # The processor decides how many image tokens a prompt gets (HF's text path); the model config decides it
        # for captions (HF's no-text path). They agree on every published checkpoint.
        self.processor_query_tokens = int(self.loaded.processor.num_query_tokens or self.num_query_tokens)
        image_token = getattr(self.loaded.processor, "image_token", None)
        self.image_token_text = getattr(image_token, "content", None) or str(image_token or "<image>")
        gen = self.lm.generation_config
        eos = gen.eos_token_id if gen.eos_token_id is not None else config.text_config.eos_token_id
        self.eos_token_ids = {int(e) for e in (eos if isinstance(eos, list | tuple) else [eos]) if e is not None}
        pad = gen.pad_token_id if gen.pad_token_id is not None else self.tokenizer.pad_token_id
        pad_token_id = int(pad if pad is not None else next(iter(self.eos_token_ids), 0))
        self.max_positions = int(getattr(config.text_config, "max_position_embeddings", 2048))
        self.device = self.loaded.device
        configure_attention(str(self.device), cudnn=options.cudnn_attention == "on")
        runner_kwargs = {"device": self.device, "image_token_id": self.image_token_id, "pad_token_id": pad_token_id,
                         "decoder_only": self.decoder_only, "eos_token_ids": self.eos_token_ids,
                         "compute": ComputeLock.for_stage(options.compute_lock, options.compute_lock_file)}
        if self._fixed_buffers():
            graphs = self.device.type == "cuda"
            # Room for the longest request `prepare` accepts.
            capacity = min(self.max_positions, self.num_query_tokens + options.max_prompt_tokens + 1
                           + options.max_max_tokens)
            self.runner: ModelRunner = StaticRunner(self.lm, capacity=capacity, graphs=graphs, **runner_kwargs)
            log.info("decoding steps on fixed buffers (%s): up to %d positions per sequence",
                     "CUDA graphs" if graphs else "eager, no CUDA device", capacity)
        else:
            self.runner = ModelRunner(self.lm, **runner_kwargs)
        self.sampler = Sampler(gen.repetition_penalty)

    def _fixed_buffers(self) -> bool:
        if self.options.cuda_graphs == "off":
            return False
        reason = static.supports(self.lm) if self.decoder_only else "encoder-decoder LMs are generated whole"
        if reason is None and self.options.max_active_sequences > static.ROW_BUCKETS[-1]:
            reason = (f"the fixed-buffer decoding step holds at most {static.ROW_BUCKETS[-1]} rows, "
                      f"max_active_sequences is {self.options.max_active_sequences}")
        return fixed_buffers(self.options.cuda_graphs, reason=reason, device=self.device, dtype=self.loaded.dtype)

    @property
    def embeds_shape(self) -> tuple[int, int]:
        return (self.num_query_tokens, self.hidden_size)

    def prompt_ids(self, prompt: str | None) -> list[int]:
        if not prompt and self.decoder_only and self.bos_token_id is not None:
            # HF's no-text path: image tokens + BOS, built by `generate` itself.
            return [self.image_token_id] * self.num_query_tokens + [self.bos_token_id]
        text_ids = self.tokenizer(prompt or "")["input_ids"]
        image_ids = self.tokenizer(self.image_token_text * self.processor_query_tokens,
                                   add_special_tokens=False)["input_ids"]
        return list(image_ids) + list(text_ids)

    def prepare(self, request: GenerationRequest) -> Sequence:
        request.validate(self.options, expected_embeds_shape=self.embeds_shape)
        ids = self.prompt_ids(request.prompt)
        if ids.count(self.image_token_id) != self.num_query_tokens:
            raise InvalidRequestError(f"text_input: must not contain the image token {self.image_token_text!r}")
        text_tokens = len(ids) - self.num_query_tokens
        if text_tokens > self.options.max_prompt_tokens:
            raise InvalidRequestError(f"text_input: expected at most {self.options.max_prompt_tokens} tokens, "
                                      f"got {text_tokens}")
        assert request.max_tokens is not None
        if len(ids) + request.max_tokens > self.max_positions:
            raise InvalidRequestError(f"text_input + max_tokens: expected at most {self.max_positions} positions, "
                                      f"got {len(ids)} + {request.max_tokens}")
        generator = None
        if request.do_sample:
            seed = request.seed if request.seed is not None else int.from_bytes(os.urandom(8), "little") >> 1
            generator = torch.Generator(device="cpu").manual_seed(seed % (2**63))
        whole = request.num_beams > 1 or not self.decoder_only
        return Sequence(request=request, prompt_ids=ids, whole=whole, generator=generator)

    def text(self, seq: Sequence) -> str:
        return self.detokenizer.text(seq.generated)

    def run(self, requests: list[GenerationRequest]) -> list[str | InvalidRequestError]:
        """Generates `requests` as one static batch on the calling thread (warm-up, benchmarks, tests)."""
        from .engine import run_static

        return [r.text if isinstance(r, Completion) else r for _, r in run_static(self, requests)]  # type: ignore[misc]
