"""Decoding steps on fixed buffers: the form CUDA graphs need (BLIP2_CUDA_GRAPHS).

HF's eager forward costs a decoding step its Python and kernel launches whatever the batch (docs/BENCHMARK.md). Here
the running batch lives in buffers allocated once: each layer's keys and values as [rows, heads, capacity, head_dim],
and per row its cached length and next token as device tensors. A step reads only those buffers, writes one column
per row at that row's own length, and attends over the first `length + 1` columns through a mask built from the
lengths on the device, so its shapes depend only on the (rows, columns) bucket it runs in. On CUDA each bucket's step
is captured once as a graph and replayed; elsewhere the same step runs eagerly (the CPU tests run it that way).

Rows are right-aligned from column 0 (no left padding): a prefill's left-padded cache is copied in at admission. OPT
language models only: the step is OPT's decoder layer written out over the model's own modules, with HF's order of
operations.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.nn.functional as F
from transformers import OPTForCausalLM

from ..cuda_graphs import GraphPool, bucket, quantized
from .batch import BatchState, Prefilled
from .kv_cache import fill_holes
from .runner import ModelRunner
from .sequence import Sequence

log = logging.getLogger(__name__)

ROW_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
COLUMN_BUCKET = 64


def supports(lm: torch.nn.Module) -> str | None:
    """Why the fixed-buffer step cannot serve `lm`, or None."""
    if not isinstance(lm, OPTForCausalLM):
        return f"the fixed-buffer decoding step covers OPT language models, got {type(lm).__name__}"
    if quantized(lm):
        return "the fixed-buffer decoding step does not cover bitsandbytes-quantized layers"
    return None


class StaticBatchState:
    """The running batch in fixed buffers; the engine's view is the same as `batch.BatchState`'s."""

    def __init__(self, lm: OPTForCausalLM, *, max_rows: int, capacity: int, device: torch.device) -> None:
        config = lm.config
        heads = int(config.num_attention_heads)
        head_dim = int(config.hidden_size) // heads
        dtype = lm.get_input_embeddings().weight.dtype
        self.max_rows = bucket(max_rows, ROW_BUCKETS)
        self.capacity = -(-capacity // COLUMN_BUCKET) * COLUMN_BUCKET
        shape = (self.max_rows, heads, self.capacity, head_dim)
        layers = int(config.num_hidden_layers)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]
        # Allocated once: the engine reports it every iteration.
        self.nbytes = sum(t.nbytes for t in self.keys + self.values)
        # Inputs of a step, on the device: each slot's cached length and the token it feeds next.
        self.lengths = torch.zeros(self.max_rows, dtype=torch.long, device=device)
        self.tokens = torch.zeros(self.max_rows, dtype=torch.long, device=device)
        self.seqs: list[Sequence] = []
        # A graph replays the buffers it was captured on: each batch state holds its own graphs, per
        # (rows, columns) bucket, in its own memory pool, and they all go with it.
        self.graphs: dict[tuple[int, int], tuple[Any, torch.Tensor]] = {}
        self.pool = GraphPool(device)

    def __len__(self) -> int:
        return len(self.seqs)

    @property
    def graph_bytes(self) -> int:
        return self.pool.nbytes

    def columns(self) -> int:
        """The column bucket the next step needs: every row's cache plus the column it writes."""
        return bucket(max(seq.cached_positions for seq in self.seqs) + 1,
                      tuple(range(COLUMN_BUCKET, self.capacity + 1, COLUMN_BUCKET)))

    def begin_step(self) -> None:
        # One small host-to-device copy per step: the tokens sampled at the previous one (lengths stay on the device).
        self.tokens[: len(self.seqs)].copy_(torch.tensor([s.next_token for s in self.seqs]), non_blocking=True)

    def end_step(self) -> None:
        self.lengths[: len(self.seqs)] += 1

    def merge(self, seqs: list[Sequence], prefilled: Prefilled) -> None:
        start = len(self.seqs)
        if start + len(seqs) > self.max_rows:
            raise RuntimeError(f"static batch holds {self.max_rows} rows, asked for {start + len(seqs)}")
        width = prefilled.mask.shape[1]
        lengths = [len(seq.prompt_ids) for seq in seqs]
        device = self.lengths.device
        # Every position of every new row in one indexed copy per layer and buffer, not one per row (a kernel
        # launch each on a GPU). The prefill is left-padded: a row's own positions are its last `length` columns.
        rows = torch.tensor([row for row, length in enumerate(lengths) for _ in range(length)], device=device)
        columns = torch.tensor([column for length in lengths for column in range(length)], device=device)
        counts = torch.tensor(lengths, device=device)
        padded = columns + (width - counts).repeat_interleave(counts)
        slots = rows + start
        for layer, cached in enumerate(prefilled.cache.layers):
            self.keys[layer][slots, :, columns] = cached.keys[rows, :, padded]
            self.values[layer][slots, :, columns] = cached.values[rows, :, padded]
        self.lengths[start:start + len(seqs)] = counts
        self.seqs.extend(seqs)

    def retain(self, keep: list[int]) -> None:
        """Keeps the rows at positions `keep` (ascending); rows from the end fill the holes."""
        moves, order = fill_holes(keep)
        if moves:
            holes, movers = zip(*moves, strict=True)
            dst = torch.tensor(holes, device=self.lengths.device)
            src = torch.tensor(movers, device=self.lengths.device)
            for buffer in self.keys + self.values:
                buffer[dst] = buffer[src]
            self.lengths[dst] = self.lengths[src]
        self.seqs = [self.seqs[i] for i in order]

    def trim(self) -> None:
        """Nothing to drop: the columns a step reads follow the longest row (`columns`)."""

    def clear(self) -> None:
        self.seqs = []


class StaticDecoder:
    """OPT's decoding step over a `StaticBatchState`, per (rows, columns) bucket; replayed from CUDA graphs on CUDA."""

    def __init__(self, lm: OPTForCausalLM, *, graphs: bool, device: torch.device) -> None:
        self.lm = lm
        self.decoder = lm.get_decoder()
        self.graphs = graphs

    @torch.inference_mode()
    def __call__(self, batch: StaticBatchState) -> torch.Tensor:
        rows = bucket(len(batch), ROW_BUCKETS)
        columns = batch.columns()
        logits = self._replay(batch, rows, columns) if self.graphs else self._step(batch, rows, columns)
        batch.end_step()
        return logits[: len(batch)]

    def capture_all(self, batch: StaticBatchState, max_rows: int) -> int:
        """Captures every bucket `batch` can run, up to `max_rows` rows, before it holds any row (a capture
        computes the step once: on an empty batch that writes nowhere a row will read); how many were new."""
        if not self.graphs:
            return 0
        if batch.seqs:
            raise RuntimeError("graphs are captured before the batch holds rows")
        top = min(bucket(max_rows, ROW_BUCKETS), batch.max_rows)
        keys = [(rows, columns) for rows in ROW_BUCKETS if rows <= top
                for columns in range(COLUMN_BUCKET, batch.capacity + 1, COLUMN_BUCKET)]
        new = [key for key in keys if key not in batch.graphs]
        for rows, columns in new:
            self._capture(batch, rows, columns)
        return len(new)

    def _capture(self, batch: StaticBatchState, rows: int, columns: int) -> tuple[Any, torch.Tensor]:
        captured = batch.pool.capture(lambda: self._step(batch, rows, columns),
                                      f"the decoding step for {rows} rows x {columns} columns")
        batch.graphs[(rows, columns)] = captured
        return captured

    def _replay(self, batch: StaticBatchState, rows: int, columns: int) -> torch.Tensor:
        graph, logits = batch.graphs.get((rows, columns)) or self._capture(batch, rows, columns)
        batch.pool.replay(graph)
        return logits

    def _step(self, batch: StaticBatchState, rows: int, columns: int) -> torch.Tensor:
        """One token for every slot of the bucket (slots past the batch compute on zeros and are never read)."""
        decoder = self.decoder
        tokens, lengths = batch.tokens[:rows], batch.lengths[:rows]
        hidden = decoder.embed_tokens(tokens)[:, None, :]
        if decoder.project_in is not None:
            hidden = decoder.project_in(hidden)
        # OPTLearnedPositionalEmbedding offsets positions by 2; a row's new token sits at its cached length.
        positions = decoder.embed_positions.weight[lengths + decoder.embed_positions.offset]
        hidden = hidden + positions[:, None, :].to(hidden.dtype)
        visible = torch.arange(columns, device=lengths.device)[None, :] <= lengths[:, None]
        mask = torch.zeros(visible.shape, dtype=hidden.dtype, device=hidden.device)
        mask = mask.masked_fill(~visible, torch.finfo(hidden.dtype).min)[:, None, None, :]
        slots = torch.arange(rows, device=lengths.device)
        for index, layer in enumerate(decoder.layers):
            hidden = self._layer(layer, hidden, batch.keys[index], batch.values[index], slots, lengths, mask, columns)
        if decoder.final_layer_norm is not None:
            hidden = decoder.final_layer_norm(hidden)
        if decoder.project_out is not None:
            hidden = decoder.project_out(hidden)
        return self.lm.get_output_embeddings()(hidden[:, 0])

    @staticmethod
    def _layer(layer: Any, hidden: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, slots: torch.Tensor,
               lengths: torch.Tensor, mask: torch.Tensor, columns: int) -> torch.Tensor:
        attn = layer.self_attn
        rows, _, width = hidden.shape
        residual = hidden
        if layer.do_layer_norm_before:
            hidden = layer.self_attn_layer_norm(hidden)
        query = (attn.q_proj(hidden) * attn.scaling).view(rows, 1, attn.num_heads, attn.head_dim).transpose(1, 2)
        keys[slots, :, lengths] = attn.k_proj(hidden).view(rows, attn.num_heads, attn.head_dim)
        values[slots, :, lengths] = attn.v_proj(hidden).view(rows, attn.num_heads, attn.head_dim)
        out = F.scaled_dot_product_attention(query, keys[:rows, :, :columns], values[:rows, :, :columns],
                                             attn_mask=mask, scale=1.0)
        hidden = residual + attn.out_proj(out.transpose(1, 2).reshape(rows, 1, width))
        if not layer.do_layer_norm_before:
            hidden = layer.self_attn_layer_norm(hidden)
        residual = hidden
        if layer.do_layer_norm_before:
            hidden = layer.final_layer_norm(hidden)
        hidden = residual + layer.fc2(layer.activation_fn(layer.fc1(hidden)))
        if not layer.do_layer_norm_before:
            hidden = layer.final_layer_norm(hidden)
        return hidden


class StaticRunner(ModelRunner):
    """`ModelRunner` whose decoding steps run on a `StaticBatchState` (prefill and whole requests stay eager)."""

    def __init__(self, lm: torch.nn.Module, *, capacity: int, graphs: bool, **kwargs: Any) -> None:
        super().__init__(lm, **kwargs)
        self.capacity = capacity
        self.decoder = StaticDecoder(lm, graphs=graphs, device=self.device)  # type: ignore[arg-type]
        # The step and a prefill each project on their own: the step's shapes must not depend on admissions.
        self._decoder = None

    def new_batch(self, *, max_rows: int) -> BatchState:
        return StaticBatchState(self.lm, max_rows=max_rows, capacity=self.capacity,  # type: ignore[return-value]
                                device=self.device)

    @torch.inference_mode()
    def decode(self, batch: BatchState) -> torch.Tensor:
        with self.compute:
            return self.decoder(batch)  # type: ignore[arg-type]

    @torch.inference_mode()
    def capture_graphs(self, batch: BatchState, max_rows: int) -> int:
        with self.compute:
            return self.decoder.capture_all(batch, max_rows)  # type: ignore[arg-type]
