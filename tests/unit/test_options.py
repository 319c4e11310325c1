import pytest

from blip2_triton.errors import ConfigurationError
from blip2_triton.options import ServerOptions, parameters_from_model_config


def test_environment_overrides_config_parameters() -> None:
    options = ServerOptions.resolve(
        {"model_id": "from-config", "dtype": "float32", "max_max_tokens": "64"},
        env={"BLIP2_MODEL_ID": "/models/blip2", "BLIP2_MAX_MAX_TOKENS": "128"},
    )
    assert options.model_id == "/models/blip2"
    assert options.dtype == "float32"
    assert options.max_max_tokens == 128


def test_empty_values_fall_back_to_defaults() -> None:
    options = ServerOptions.resolve({"model_id": "", "quantization": ""}, env={"BLIP2_DTYPE": ""})
    assert (options.model_id, options.dtype, options.quantization) == ("", "auto", "none")


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"BLIP2_DTYPE": "float8"}, "dtype must be one of auto, float16, bfloat16, float32, got 'float8'"),
        ({"BLIP2_QUANTIZATION": "3bit"}, "quantization must be one of none, 8bit, 4bit"),
        ({"BLIP2_DEVICE": "tpu"}, "device must be one of"),
        ({"BLIP2_MAX_MAX_TOKENS": "many"}, "max_max_tokens must be an integer, got 'many'"),
        ({"BLIP2_MAX_IMAGE_BYTES": "0"}, "max_image_bytes must be >= 1"),
        ({"BLIP2_DEFAULT_MAX_TOKENS": "300"}, "default_max_tokens (300) exceeds max_max_tokens (256)"),
        ({"BLIP2_CUDNN_ATTENTION": "yes"}, "cudnn_attention must be one of on, off, got 'yes'"),
    ],
)
def test_invalid_options_are_rejected_at_load(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigurationError) as e:
        ServerOptions.resolve({}, env=env)
    assert message in str(e.value)


def test_triton_parameters_are_flattened() -> None:
    config = {"parameters": {"dtype": {"string_value": "bfloat16"}, "model_id": {"string_value": ""}}}
    assert parameters_from_model_config(config) == {"dtype": "bfloat16", "model_id": ""}
    assert parameters_from_model_config({}) == {}


def test_cudnn_attention_is_switched_off_on_cuda_only_unless_asked_for() -> None:
    import torch

    from blip2_triton.llm.runner import configure_attention

    before = torch.backends.cuda.cudnn_sdp_enabled()
    try:
        torch.backends.cuda.enable_cudnn_sdp(True)
        assert ServerOptions.resolve({}, env={}).cudnn_attention == "off"
        assert configure_attention("cpu", cudnn=False) is False
        assert configure_attention("cuda:0", cudnn=True) is False
        assert torch.backends.cuda.cudnn_sdp_enabled()
        # The flag is a host-side setting, so its effect on kernel choice can be checked without a GPU.
        assert configure_attention("cuda:0", cudnn=False) is True
        assert not torch.backends.cuda.cudnn_sdp_enabled()
    finally:
        torch.backends.cuda.enable_cudnn_sdp(before)


@pytest.mark.parametrize(("setting", "allowed"), [("off", False), ("on", True)])
def test_language_stage_applies_the_cudnn_setting(tiny_model_dir, monkeypatch, setting: str, allowed: bool) -> None:
    from blip2_triton.llm import stage

    calls: list[tuple[str, bool]] = []
    monkeypatch.setattr(stage, "configure_attention", lambda device, *, cudnn: calls.append((device, cudnn)))
    stage.LanguageStage(ServerOptions(model_id=str(tiny_model_dir), cudnn_attention=setting))
    assert calls == [("cpu", allowed)]


def test_quantization_without_bitsandbytes_is_a_configuration_error(monkeypatch) -> None:
    import importlib.util

    import torch

    from blip2_triton import checkpoint

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "bitsandbytes" else real(name, *a))
    with pytest.raises(ConfigurationError, match=r"quantization=8bit needs bitsandbytes.*GPU image"):
        checkpoint.quantization_config(ServerOptions(quantization="8bit"), torch.float32)
    assert checkpoint.quantization_config(ServerOptions(), torch.float32) is None


def test_checkpoint_without_image_token_index_is_a_configuration_error(tiny_model_dir) -> None:
    from blip2_triton.checkpoint import load_stage
    from blip2_triton.llm import LanguageStage

    options = ServerOptions(model_id=str(tiny_model_dir))
    loaded = load_stage("llm", options)
    loaded.config.image_token_id = None  # as in configs saved by older transformers releases
    with pytest.raises(ConfigurationError, match="no image_token_index"):
        LanguageStage(options, loaded)


def test_boolean_options_and_the_t5_prefix() -> None:
    assert ServerOptions.resolve({}, env={"BLIP2_ALLOW_PICKLE": "on"}).allow_pickle is True
    t5 = {"env_prefix": "BLIP2_T5_", "tiny_family": "t5"}
    options = ServerOptions.resolve(t5, env={"BLIP2_DTYPE": "float16", "BLIP2_T5_DTYPE": "bfloat16"})
    assert (options.dtype, options.tiny_family) == ("bfloat16", "t5")


def test_launch_settings_from_the_environment() -> None:
    from blip2_triton.supervisor import LauncherError, LaunchSettings

    env = {"TRITON_HTTP_PORT": "9000", "BLIP2_TRITON_ARGS": "--a=1 --b 'c d'", "BLIP2_WATCHDOG": "0",
           "BLIP2_MODEL_REPOSITORY": "/srv/repo", "TRITON_HOST": "", "TRITON_ADMIN_KEY": "k"}
    settings = LaunchSettings.from_env(env, max_restarts=2)
    assert (settings.http_port, settings.grpc_port, settings.watchdog, settings.max_restarts) == (9000, 8001, False, 2)
    assert settings.extra_args == ("--a=1", "--b", "c d") and str(settings.model_repository) == "/srv/repo"
    # Loopback unless asked: the image sets TRITON_HOST=0.0.0.0 for its clients (issue: serve bound everything).
    assert settings.host == LaunchSettings().host == "127.0.0.1"
    assert LaunchSettings.from_env({"TRITON_HOST": "0.0.0.0"}).host == "0.0.0.0"
    assert settings.admin_key == "k" and LaunchSettings.from_env({"BLIP2_WATCHDOG": "1"}).watchdog
    assert LaunchSettings.from_env({"BLIP2_STARTUP_TIMEOUT_S": "90.5"}).startup_timeout_s == 90.5
    with pytest.raises(LauncherError, match="TRITON_GRPC_PORT: expected int, got 'x'"):
        LaunchSettings.from_env({"TRITON_GRPC_PORT": "x"})
    with pytest.raises(LauncherError, match=r"not stage options: \['dtpye', 'model_id'\]"):
        LaunchSettings(options={"dtpye": "float16", "model_id": "m"})


def test_a_gpu_instance_runs_on_the_gpu_triton_assigned_it() -> None:
    options = ServerOptions(device="cpu")
    assert options.on_instance("GPU", 3).device == "cuda:3"
    assert options.on_instance("KIND_GPU".removeprefix("KIND_"), "1").device == "cuda:1"
    assert options.on_instance("CPU", 0) is options
    ServerOptions(device="cuda:2").validate()
    with pytest.raises(ConfigurationError, match="device must be one of auto, cuda, cpu or cuda:N, got 'gpu0'"):
        ServerOptions(device="gpu0").validate()


def test_a_cuda_device_that_is_not_there_is_a_configuration_error(monkeypatch) -> None:
    import torch

    from blip2_triton.checkpoint import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigurationError, match="device=cuda:1 was requested but no CUDA device is visible"):
        resolve_device("cuda:1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ConfigurationError, match="device=cuda:1: only 1 CUDA devices are visible"):
        resolve_device("cuda:1")
    assert resolve_device("cuda:0") == torch.device("cuda:0")


def test_serve_flags_for_retrieval_are_launch_settings(tmp_path) -> None:
    import dataclasses

    from blip2_triton import cli
    from blip2_triton.supervisor import LaunchSettings

    for argv, serves in ((["serve"], False), (["serve", "--itm"], True),
                         (["serve", "--itm-model-id", "Salesforce/blip2-itm-vit-g"], True)):
        given = {k: v for k, v in vars(cli.build_parser().parse_args(argv)).items() if k not in ("command", "func")}
        assert dataclasses.replace(LaunchSettings(), **given).serves_itm is serves, argv
    assert ServerOptions.resolve({"env_prefix": "BLIP2_ITM_"}, env={"BLIP2_ITM_FEATURES_CACHE_BYTES": "0",
                                                                     "BLIP2_FEATURES_CACHE_BYTES": "7"}) \
        .features_cache_bytes == 0
    with pytest.raises(ConfigurationError, match="features_cache_bytes must be >= -1"):
        ServerOptions(features_cache_bytes=-2).validate()
    assert cli.main(["tiny-model", str(tmp_path / "itm"), "--family", "itm"]) == 0
    assert (tmp_path / "itm" / "TINY_MODEL.json").read_text().count('"itm"') == 1
