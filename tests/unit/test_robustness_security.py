"""Security defaults without a server: admin APIs restricted by the supervisor's command line (the container runs
the same, tests/unit/test_deploy_static.py), safetensors-only weights, no checkpoint code."""

from __future__ import annotations

import ast
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from blip2_triton.checkpoint import load_stage
from blip2_triton.errors import ConfigurationError
from blip2_triton.options import ServerOptions
from blip2_triton.supervisor import LaunchSettings, TritonInstall, tritonserver_command

ROOT = Path(__file__).resolve().parents[2]
INSTALL = TritonInstall(Path("/opt/tritonserver/bin/tritonserver"), None, {})
REPO = ROOT / "model_repository"


def restricted_flags(settings: LaunchSettings) -> dict[str, str]:
    out = {}
    for arg in tritonserver_command(settings, INSTALL):
        name, _, value = arg.partition("=")
        if name in ("--http-restricted-api", "--grpc-restricted-protocol"):
            out[name] = value
    return out


def test_launcher_restricts_admin_apis_with_an_unguessable_key() -> None:
    first = restricted_flags(LaunchSettings(model_repository=REPO))
    second = restricted_flags(LaunchSettings.from_env({"TRITON_ADMIN_KEY": ""}, model_repository=REPO))
    assert set(first) == {"--http-restricted-api", "--grpc-restricted-protocol"}
    spec = first["--http-restricted-api"]
    assert first["--grpc-restricted-protocol"] == spec
    apis, header = spec.split(":", 1)
    assert set(apis.split(",")) == {"model-repository", "shared-memory", "trace", "logging"}
    key_name, key = header.split("=", 1)
    assert key_name == "triton-admin-key" and re.fullmatch(r"[0-9a-f]{64}", key)
    assert first != second


def test_operator_key_and_opt_out() -> None:
    settings = LaunchSettings.from_env({"TRITON_ADMIN_KEY": "operator-secret"}, model_repository=REPO)
    assert restricted_flags(settings)["--http-restricted-api"].endswith(":triton-admin-key=operator-secret")
    assert "operator-secret" not in repr(settings), "the key stays out of logged settings"
    assert restricted_flags(LaunchSettings(model_repository=REPO, admin_key="k"))[
        "--grpc-restricted-protocol"].endswith("=k")
    assert restricted_flags(LaunchSettings(model_repository=REPO, restrict_admin_apis=False)) == {}
    # The operator's own flags replace ours instead of clashing with them.
    own = LaunchSettings(model_repository=REPO, extra_args=("--http-restricted-api=model-repository:k=v",))
    assert [a for a in tritonserver_command(own, INSTALL) if "restricted" in a] == [
        "--http-restricted-api=model-repository:k=v"]


def test_no_code_enables_trust_remote_code() -> None:
    offenders = []
    for path in [*(ROOT / "src").rglob("*.py"), *(ROOT / "client" / "blip2_client").rglob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            enabled = not (isinstance(getattr(node, "value", None), ast.Constant) and node.value.value is False)
            if isinstance(node, ast.keyword) and node.arg == "trust_remote_code" and enabled:
                offenders.append(f"{path}:{node.value.lineno}")
    assert not offenders


def test_pickle_opt_in_parsing() -> None:
    def allowed(env: dict[str, str], parameters: dict[str, str] | None = None) -> bool:
        return ServerOptions.resolve(parameters, env=env).allow_pickle

    assert not allowed({}) and not allowed({"BLIP2_ALLOW_PICKLE": "0"})
    assert allowed({"BLIP2_ALLOW_PICKLE": "1"}) and allowed({"BLIP2_ALLOW_PICKLE": " true "})
    # Trust is per checkpoint: the FlanT5 models read their own variable.
    assert not allowed({"BLIP2_ALLOW_PICKLE": "1"}, {"env_prefix": "BLIP2_T5_"})
    assert allowed({"BLIP2_T5_ALLOW_PICKLE": "1"}, {"env_prefix": "BLIP2_T5_"})
    with pytest.raises(ConfigurationError, match="allow_pickle must be 1 or 0, got 'maybe'"):
        allowed({"BLIP2_ALLOW_PICKLE": "maybe"})


def test_pickle_only_checkpoint_is_refused_unless_allowed(tiny_model_dir: Path, tmp_path: Path) -> None:
    pickled = tmp_path / "pickled"
    shutil.copytree(tiny_model_dir, pickled)
    weights = load_file(pickled / "model.safetensors")
    (pickled / "model.safetensors").unlink()
    torch.save(weights, pickled / "pytorch_model.bin")
    with pytest.raises(ConfigurationError, match=r"only pickle \(\.bin\) weights.*BLIP2_ALLOW_PICKLE=1 \(unsafe"):
        load_stage("vision", ServerOptions(model_id=str(pickled), device="cpu"))
    loaded = load_stage("vision", ServerOptions(model_id=str(pickled), device="cpu", allow_pickle=True))
    reference = load_stage("vision", ServerOptions(model_id=str(tiny_model_dir), device="cpu"))
    assert loaded.parameter_count == reference.parameter_count


def test_ruff_security_rules_cover_the_shipped_packages() -> None:
    config = (ROOT / "pyproject.toml").read_text()
    select = re.search(r"^select = \[(.*)\]$", config, re.M)
    assert select and '"S"' in select.group(1)
    assert '"!{src,client}/**" = ["S"]' in config
