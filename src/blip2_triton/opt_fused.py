"""OPT's decoder run once over a decoding step of the running batch and the prefill of newcomers.

On CPU a decoder forward of the benchmark model is mostly the reading of its weights (a one-row step costs 8.4 ms,
a 17-row step 19 ms), so the in-flight engine's iterations that both step and admit paid that twice. Here every
token of both groups goes through each linear layer, layer norm and activation as one matrix (the newcomers'
prompt tokens below the step's rows), and only attention is computed per group, with the same KV cache update,
mask and attention function that HF's own forward uses for each group alone. The operations, their order and
their inputs are those of `OPTDecoder.forward` / `OPTDecoderLayer.forward` (transformers 5.x); only the row count
of the matrix products differs, which changes rounding the way a different batch size does.

`LanguageStage` checks at load time that this matches two separate forwards of the model it serves, and falls
back to them otherwise (a transformers release that changes OPT's forward must not change outputs).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers import OPTForCausalLM
from transformers.cache_utils import DynamicCache
from transformers.models.opt import modeling_opt

# Attention implementations that take the mask and nothing else from the layer's kwargs.
SUPPORTED_ATTENTION = ("sdpa", "eager")


def supports(lm: nn.Module) -> bool:
    decoder = lm.get_decoder() if isinstance(lm, OPTForCausalLM) else None
    return (
        decoder is not None
        and decoder.config._attn_implementation in SUPPORTED_ATTENTION
        and all(type(layer) is modeling_opt.OPTDecoderLayer for layer in decoder.layers)
        and not decoder.training
    )


def _input_hidden(decoder: Any, embeds: torch.Tensor, mask: torch.Tensor | None, cached: int,
                  positions: torch.Tensor) -> torch.Tensor:
    pos_embeds = decoder.embed_positions(mask, cached, position_ids=positions)
    if decoder.project_in is not None:
        embeds = decoder.project_in(embeds)
    return embeds + pos_embeds.to(embeds.device)


def _attention(attn: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, rows: int,
               mask: torch.Tensor | None, cache: Any, positions: torch.Tensor) -> torch.Tensor:
    """`OPTAttention.forward` between its input and output projections, for one group's rows of q, k and v."""
    tokens = query.shape[0] // rows
    query, key, value = (t.view(rows, tokens, attn.num_heads, attn.head_dim).transpose(1, 2)
                         for t in (query, key, value))
    key, value = cache.update(key, value, attn.layer_idx)
    interface = modeling_opt.ALL_ATTENTION_FUNCTIONS.get_interface(attn.config._attn_implementation,
                                                                   modeling_opt.eager_attention_forward)
    out, _ = interface(attn, query, key, value, mask, dropout=0.0, scaling=1.0, position_ids=positions)
    return out.reshape(rows * tokens, -1)


def step_and_prefill(
    decoder: Any,
    *,
    step_ids: torch.Tensor,
    step_mask: torch.Tensor | None,
    step_positions: torch.Tensor,
    step_cache: Any,
    prefill_embeds: torch.Tensor,
    prefill_mask: torch.Tensor,
    prefill_positions: torch.Tensor,
) -> tuple[torch.Tensor, DynamicCache, torch.Tensor]:
    """(last hidden state of each step row, the newcomers' KV cache, last hidden state of each newcomer).

    `step_mask` is the step's ready 4D mask (or None), as `LanguageStage.step` passes it; `prefill_mask` the
    newcomers' 2D padding mask.
    """
    config = decoder.config
    rows, (group, width) = step_ids.shape[0], prefill_mask.shape
    step_embeds = decoder.embed_tokens(step_ids)
    prefill_cache = DynamicCache(config=config)
    # The masks HF's forward would build for each group alone (a ready 4D mask is passed through as it is).
    step_attention = modeling_opt.create_causal_mask(config=config, inputs_embeds=step_embeds,
                                                     attention_mask=step_mask, cache=step_cache)
    prefill_attention = modeling_opt.create_causal_mask(config=config, inputs_embeds=prefill_embeds,
                                                        attention_mask=prefill_mask, cache=prefill_cache)
    hidden = torch.cat([
        _input_hidden(decoder, step_embeds, None, step_cache.get_seq_length(), step_positions).reshape(rows, -1),
        _input_hidden(decoder, prefill_embeds, prefill_mask, 0, prefill_positions).reshape(group * width, -1),
    ])
    for layer in decoder.layers:
        attn = layer.self_attn
        residual = hidden
        if layer.do_layer_norm_before:
            hidden = layer.self_attn_layer_norm(hidden)
        query, key, value = attn.q_proj(hidden) * attn.scaling, attn.k_proj(hidden), attn.v_proj(hidden)
        attended = torch.cat([
            _attention(attn, query[:rows], key[:rows], value[:rows], rows, step_attention, step_cache,
                       step_positions),
            _attention(attn, query[rows:], key[rows:], value[rows:], group, prefill_attention, prefill_cache,
                       prefill_positions),
        ])
        hidden = residual + attn.out_proj(attended)
        if not layer.do_layer_norm_before:
            hidden = layer.self_attn_layer_norm(hidden)
        residual = hidden
        if layer.do_layer_norm_before:
            hidden = layer.final_layer_norm(hidden)
        hidden = residual + layer.fc2(layer.activation_fn(layer.fc1(hidden)))
        if not layer.do_layer_norm_before:
            hidden = layer.final_layer_norm(hidden)
    if decoder.final_layer_norm is not None:
        hidden = decoder.final_layer_norm(hidden)
    if decoder.project_out is not None:
        hidden = decoder.project_out(hidden)
    return hidden[:rows], prefill_cache, hidden[rows:].reshape(group, width, -1)[:, -1]
