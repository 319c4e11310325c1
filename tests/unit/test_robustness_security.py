"""Security defaults without a server: admin APIs restricted by the launcher (like the container entrypoint),
safetensors-only weights, no checkpoint code."""

from __future__ import annotations

import ast
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from blip2_triton.checkpoint import ALLOW_PICKLE_ENV, load_stage, pickle_allowed
from blip2_triton.errors import ConfigurationError
from blip2_triton.launcher import RESTRICTED_APIS, TritonInstall, TritonServer
from blip2_triton.options import ServerOptions

ROOT = Path(__file__).resolve().parents[2]
INSTALL = TritonInstall(Path("/opt/tritonserver/bin/tritonserver"), None, {})


def restricted_flags(server: TritonServer) -> dict[str, str]:
    out = {}
    for arg in server.command(INSTALL):
        name, _, value = arg.partition("=")
        if name in ("--http-restricted-api", "--grpc-restricted-protocol"):
            out[name] = value
    return out


def test_launcher_restricts_admin_apis_with_an_unguessable_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TRITON_ADMIN_KEY", raising=False)
    first = restricted_flags(TritonServer(model_repository=ROOT / "model_repository"))
    second = restricted_flags(TritonServer(model_repository=ROOT / "model_repository"))
    assert set(first) == {"--http-restricted-api", "--grpc-restricted-protocol"}
    spec = first["--http-restricted-api"]
    assert first["--grpc-restricted-protocol"] == spec
    apis, header = spec.split(":", 1)
    assert set(apis.split(",")) == {"model-repository", "shared-memory", "trace", "logging"}
    key_name, key = header.split("=", 1)
    assert key_name == "triton-admin-key" and re.fullmatch(r"[0-9a-f]{64}", key)
    assert first != second


def test_operator_key_and_opt_out(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRITON_ADMIN_KEY", "operator-secret")
    server = TritonServer(model_repository=ROOT / "model_repository")
    assert restricted_flags(server)["--http-restricted-api"].endswith(":triton-admin-key=operator-secret")
    assert server.admin_key == "operator-secret"
    assert restricted_flags(TritonServer(model_repository=ROOT / "model_repository", admin_key="k"))[
        "--grpc-restricted-protocol"].endswith("=k")
    assert restricted_flags(TritonServer(model_repository=ROOT / "model_repository", restrict_admin_apis=False)) == {}
    # The operator's own flags replace ours instead of clashing with them.
    own = TritonServer(model_repository=ROOT / "model_repository",
                       extra_args=["--http-restricted-api=model-repository:k=v"])
    assert [a for a in own.command(INSTALL) if "restricted" in a] == ["--http-restricted-api=model-repository:k=v"]


def test_launcher_and_entrypoint_restrict_the_same_apis() -> None:
    entrypoint = (ROOT / "docker" / "entrypoint.sh").read_text()
    match = re.search(r'^restricted="([^:]+):triton-admin-key=\$\{admin_key\}"$', entrypoint, re.M)
    assert match, "docker/entrypoint.sh changed how it restricts the admin APIs"
    assert set(match.group(1).split(",")) == set(RESTRICTED_APIS)
    assert "TRITON_ADMIN_KEY" in entrypoint


def test_no_code_enables_trust_remote_code() -> None:
    offenders = []
    for path in [*(ROOT / "src").rglob("*.py"), *(ROOT / "client" / "blip2_client").rglob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            enabled = not (isinstance(getattr(node, "value", None), ast.Constant) and node.value.value is False)
            if isinstance(node, ast.keyword) and node.arg == "trust_remote_code" and enabled:
                offenders.append(f"{path}:{node.value.lineno}")
    assert not offenders


def test_pickle_opt_in_parsing() -> None:
    assert not pickle_allowed({})
    assert not pickle_allowed({ALLOW_PICKLE_ENV: "0"})
    assert pickle_allowed({ALLOW_PICKLE_ENV: "1"}) and pickle_allowed({ALLOW_PICKLE_ENV: " true "})


def test_pickle_only_checkpoint_is_refused_unless_allowed(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pickled = tmp_path / "pickled"
    shutil.copytree(tiny_model_dir, pickled)
    weights = load_file(pickled / "model.safetensors")
    (pickled / "model.safetensors").unlink()
    torch.save(weights, pickled / "pytorch_model.bin")
    monkeypatch.delenv(ALLOW_PICKLE_ENV, raising=False)
    with pytest.raises(ConfigurationError, match=r"only pickle \(\.bin\) weights.*BLIP2_ALLOW_PICKLE=1 \(unsafe\)"):
        load_stage("vision", ServerOptions(model_id=str(pickled), device="cpu"))
    monkeypatch.setenv(ALLOW_PICKLE_ENV, "1")
    loaded = load_stage("vision", ServerOptions(model_id=str(pickled), device="cpu"))
    reference = load_stage("vision", ServerOptions(model_id=str(tiny_model_dir), device="cpu"))
    assert loaded.parameter_count == reference.parameter_count


def test_ruff_security_rules_cover_the_shipped_packages() -> None:
    config = (ROOT / "pyproject.toml").read_text()
    select = re.search(r"^select = \[(.*)\]$", config, re.M)
    assert select and '"S"' in select.group(1)
    assert '"!{src,client}/**" = ["S"]' in config
