import pytest
import torch
from torch import nn

from blip2_triton import packed_linear
from blip2_triton.checkpoint import load_stage
from blip2_triton.errors import ConfigurationError
from blip2_triton.options import ServerOptions
from blip2_triton.packed_linear import PackedLinear, pack_linears


class QuantisedLike(nn.Linear):
    """Stands for bitsandbytes' layers: an nn.Linear subclass with its own weight format."""


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 96), nn.GELU(), nn.Linear(96, 40, bias=False), QuantisedLike(40, 8))


def test_packed_layers_compute_what_the_linears_did() -> None:
    model = _model()
    x = torch.randn(2, 7, 64)
    with torch.inference_mode():
        want = model(x)
    assert pack_linears(model) == 2
    assert [type(m).__name__ for m in model] == ["PackedLinear", "GELU", "PackedLinear", "QuantisedLike"]
    with torch.inference_mode():
        got = model(x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_a_rows_result_is_the_same_at_every_batch_size() -> None:
    # Bit-for-bit equality holds on the benchmark host but depends on oneDNN's kernel choice per CPU; closeness
    # at every row count is what a layout or batching bug would break.
    torch.manual_seed(1)
    layer = PackedLinear(nn.Linear(512, 2048))
    x = torch.randn(40, 512)
    with torch.inference_mode():
        full = layer(x)
        for rows in (1, 2, 3, 5, 8, 17, 32):
            torch.testing.assert_close(layer(x[:rows]), full[:rows], rtol=1e-5, atol=1e-5)


def test_weights_stay_readable_and_tied_weights_stay_tied() -> None:
    embed = nn.Embedding(50, 16)
    head = nn.Linear(16, 50, bias=False)
    head.weight = embed.weight
    model = nn.ModuleDict({"embed": embed, "head": head})
    assert pack_linears(model) == 1
    assert isinstance(model["head"], PackedLinear)
    assert model["head"].weight is model["embed"].weight
    assert set(model.state_dict()) == {"embed.weight", "head.weight"}


def test_the_training_flag_is_kept() -> None:
    layer = nn.Linear(4, 4).eval()
    assert not PackedLinear(layer).training


def test_a_linear_under_two_parents_is_packed_once() -> None:
    shared = nn.Linear(8, 8)
    model = nn.ModuleDict({"a": nn.Sequential(shared), "b": nn.Sequential(shared)})
    assert pack_linears(model) == 1
    assert model["a"][0] is model["b"][0]
    assert isinstance(model["a"][0], PackedLinear)


def test_a_failed_check_leaves_the_model_unchanged(monkeypatch) -> None:
    model = _model()
    # A tolerance that no output meets stands for a kernel that computes something else.
    monkeypatch.setitem(packed_linear._CHECK_RTOL, torch.float32, -1.0)
    with pytest.raises(RuntimeError, match=r"failed its check on a \(96, 64\) layer: .*differs from F\.linear"):
        pack_linears(model)
    assert [type(m) for m in model][:3] == [nn.Linear, nn.GELU, nn.Linear]


def test_float16_layers_are_left_alone() -> None:
    model = nn.Sequential(nn.Linear(8, 8)).half()
    assert pack_linears(model) == 0
    assert type(model[0]) is nn.Linear


@pytest.mark.parametrize("stage", ["vision", "llm"])
def test_cpu_stages_load_with_packed_weights_by_default(tiny_model_dir, stage: str) -> None:
    loaded = load_stage(stage, ServerOptions(model_id=str(tiny_model_dir), device="cpu"))
    linears = [m for m in loaded.model.modules() if isinstance(m, nn.Linear | PackedLinear)]
    assert loaded.packed_layers == len(linears) > 0
    assert all(isinstance(m, PackedLinear) for m in linears)
    off = load_stage(stage, ServerOptions(model_id=str(tiny_model_dir), device="cpu", packed_weights="off"))
    assert off.packed_layers == 0
    assert not any(isinstance(m, PackedLinear) for m in off.model.modules())
    # Same parameters either way: the packed copy is not a parameter, and counts are taken before packing.
    assert (loaded.parameter_count, loaded.parameter_bytes) == (off.parameter_count, off.parameter_bytes)


def test_packed_llm_stage_matches_hf_linears_on_a_prompt(tiny_model_dir) -> None:
    packed = load_stage("llm", ServerOptions(model_id=str(tiny_model_dir), device="cpu")).model.language_model
    plain = load_stage("llm", ServerOptions(model_id=str(tiny_model_dir), device="cpu", packed_weights="off"))
    ids = torch.tensor([[2, 31, 7, 19, 4, 11]])
    with torch.inference_mode():
        want = plain.model.language_model(input_ids=ids).logits
        got = packed(input_ids=ids).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert torch.equal(got.argmax(-1), want.argmax(-1))


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"dtype": "float16"}, "device=cpu, quantization=none, dtype=float16"),
        ({"quantization": "8bit"}, "device=cpu, quantization=8bit, dtype=float32"),
    ],
)
def test_packed_weights_on_refuses_what_it_cannot_pack(tiny_model_dir, options: dict[str, str],
                                                        message: str) -> None:
    if options.get("quantization", "none") != "none":
        pytest.importorskip("bitsandbytes")
    with pytest.raises(ConfigurationError, match=f"packed_weights=on needs .*; got {message}"):
        load_stage("vision", ServerOptions(model_id=str(tiny_model_dir), device="cpu", packed_weights="on",
                                           **options))


def test_a_failed_packing_falls_back_under_auto_and_refuses_to_start_under_on(tiny_model_dir, monkeypatch,
                                                                              caplog) -> None:
    from blip2_triton import checkpoint

    def broken(model: nn.Module) -> int:
        raise RuntimeError("oneDNN weight packing failed its check on a (8, 8) layer: differs")

    monkeypatch.setattr(checkpoint, "pack_linears", broken)
    with caplog.at_level("WARNING", logger="blip2_triton.checkpoint"):
        loaded = load_stage("llm", ServerOptions(model_id=str(tiny_model_dir), device="cpu"))
    assert loaded.packed_layers == 0
    assert "linear layers keep HF's implementation: oneDNN weight packing failed its check" in caplog.text
    with pytest.raises(ConfigurationError, match="packed_weights=on: oneDNN weight packing failed its check"):
        load_stage("llm", ServerOptions(model_id=str(tiny_model_dir), device="cpu", packed_weights="on"))


def test_auto_skips_float16_quietly(tiny_model_dir, caplog) -> None:
    with caplog.at_level("WARNING", logger="blip2_triton"):
        loaded = load_stage("vision", ServerOptions(model_id=str(tiny_model_dir), device="cpu", dtype="float16"))
    assert loaded.packed_layers == 0
    assert "HF's implementation" not in caplog.text


def test_packed_weights_option_is_validated() -> None:
    with pytest.raises(ConfigurationError, match="packed_weights must be one of auto, on, off, got 'yes'"):
        ServerOptions.resolve({}, env={"BLIP2_PACKED_WEIGHTS": "yes"})
    assert ServerOptions.resolve({}, env={"BLIP2_PACKED_WEIGHTS": "off"}).packed_weights == "off"


def test_bfloat16_layers_are_packed_and_checked(tiny_model_dir) -> None:
    options = ServerOptions(model_id=str(tiny_model_dir), device="cpu", dtype="bfloat16")
    packed = load_stage("llm", options)
    plain = load_stage("llm", ServerOptions(model_id=str(tiny_model_dir), device="cpu", dtype="bfloat16",
                                            packed_weights="off"))
    assert packed.packed_layers > 0
    ids = torch.tensor([[2, 31, 7, 19, 4, 11]])
    with torch.inference_mode():
        want = plain.model.language_model(input_ids=ids).logits.float()
        got = packed.model.language_model(input_ids=ids).logits.float()
    torch.testing.assert_close(got, want, rtol=5e-2, atol=5e-2 * want.abs().max().item())


def test_a_tied_output_projection_keeps_the_embeddings(tiny_model_dir, tmp_path) -> None:
    # Salesforce's OPT checkpoints tie the output projection to the input embeddings; the tiny one does not.
    import json
    import shutil

    from safetensors.torch import load_file, save_file

    tied = tmp_path / "tied"
    shutil.copytree(tiny_model_dir, tied)
    weights = load_file(tied / "model.safetensors")
    del weights["language_model.lm_head.weight"]  # as tied checkpoints are saved
    save_file(weights, tied / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((tied / "config.json").read_text())
    config["text_config"]["tie_word_embeddings"] = True
    (tied / "config.json").write_text(json.dumps(config))
    packed = load_stage("llm", ServerOptions(model_id=str(tied), device="cpu")).model.language_model
    plain = load_stage("llm", ServerOptions(model_id=str(tied), device="cpu", packed_weights="off"))
    head = packed.get_output_embeddings()
    assert isinstance(head, PackedLinear)
    assert head.weight is packed.get_input_embeddings().weight
    plain_lm = plain.model.language_model
    assert plain_lm.get_output_embeddings().weight is plain_lm.get_input_embeddings().weight
    ids = torch.tensor([[2, 31, 7, 19, 4, 11]])
    with torch.inference_mode():
        want = plain.model.language_model(input_ids=ids).logits
        got = packed(input_ids=ids).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
