"""One decoder pass over a decoding step and a prefill, against HF's own two forwards (`opt_fused`)."""

from __future__ import annotations

import pytest
import torch
from transformers import OPTConfig, OPTForCausalLM

from blip2_triton import opt_fused


def _model(attn: str, **config: object) -> OPTForCausalLM:
    torch.manual_seed(0)
    cfg = OPTConfig(vocab_size=97, hidden_size=32, num_hidden_layers=3, ffn_dim=48, num_attention_heads=4,
                    max_position_embeddings=64, pad_token_id=1, **config)
    cfg._attn_implementation = attn
    return OPTForCausalLM(cfg).eval()


def _left_padded(lengths: list[int], width: int, dim: int, gen: torch.Generator
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    embeds = torch.randn(len(lengths), width, dim, generator=gen)
    mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for row, n in enumerate(lengths):
        mask[row, width - n:] = 1
    positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
    return embeds, mask, positions


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("config", [
    {},
    # opt-350m's layout: post-layer norms and a projection in and out of a narrower embedding.
    {"do_layer_norm_before": False, "word_embed_proj_dim": 16},
])
@pytest.mark.parametrize("running, newcomers", [([5, 3], [4, 7, 2]), ([6, 6], [3])])
def test_matches_a_step_and_a_prefill_by_hf(attn, config, running, newcomers) -> None:
    lm = _model(attn, **config)
    decoder = lm.get_decoder()
    dim = lm.config.word_embed_proj_dim
    gen = torch.Generator().manual_seed(1)
    embeds, mask, positions = _left_padded(running, max(running), dim, gen)
    new_embeds, new_mask, new_positions = _left_padded(newcomers, max(newcomers), dim, gen)
    tokens = torch.randint(2, 97, (len(running), 1), generator=gen)
    step_mask = torch.cat([mask, mask.new_ones(len(running), 1)], dim=1)
    step_positions = step_mask.sum(-1, keepdim=True) - 1

    results = []
    with torch.inference_mode():
        for fused in (False, True):
            cache = decoder(inputs_embeds=embeds, attention_mask=mask, position_ids=positions, use_cache=True).cache
            if fused:
                step, new_cache, new = opt_fused.step_and_prefill(
                    decoder, step_ids=tokens, step_mask=step_mask, step_positions=step_positions, step_cache=cache,
                    prefill_embeds=new_embeds, prefill_mask=new_mask, prefill_positions=new_positions)
            else:
                step = decoder(input_ids=tokens, attention_mask=step_mask, position_ids=step_positions,
                               cache=cache, use_cache=True).last_hidden_state[:, -1]
                out = decoder(inputs_embeds=new_embeds, attention_mask=new_mask, position_ids=new_positions,
                              use_cache=True)
                new, new_cache = out.last_hidden_state[:, -1], out.cache
            results.append((step, new, cache, new_cache))
    (step_a, new_a, cache_a, new_cache_a), (step_b, new_b, cache_b, new_cache_b) = results
    torch.testing.assert_close(step_b, step_a, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(new_b, new_a, rtol=1e-5, atol=1e-5)
    for a, b in zip(list(cache_a.layers) + list(new_cache_a.layers),
                    list(cache_b.layers) + list(new_cache_b.layers), strict=True):
        torch.testing.assert_close(b.keys, a.keys, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(b.values, a.values, rtol=1e-5, atol=1e-5)


def test_supported_only_for_plain_opt_in_eval_with_mask_only_attention() -> None:
    assert opt_fused.supports(_model("sdpa"))
    flash = _model("sdpa")
    # Flash attention (not installable here) takes positions and sequence lengths from the layer's kwargs.
    flash.config._attn_implementation = "flash_attention_2"
    assert not opt_fused.supports(flash)
    assert not opt_fused.supports(_model("sdpa").train())
