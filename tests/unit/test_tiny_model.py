import os
import time
from pathlib import Path

from safetensors.torch import load_file
from transformers import Blip2Config, Blip2Processor

from blip2_triton.checkpoint import STALE_STAGING_S, ensure_tiny_model, tiny_dirname
from blip2_triton.tiny import TINY_VERSION, write_tiny_model


def test_tiny_model_is_deterministic_and_complete(tmp_path: Path, tiny_model_dir: Path) -> None:
    again = write_tiny_model(tmp_path / "again")
    for name in ("config.json", "tokenizer.json", "processor_config.json", "generation_config.json"):
        assert (again / name).read_text() == (tiny_model_dir / name).read_text(), name
    a, b = load_file(again / "model.safetensors"), load_file(tiny_model_dir / "model.safetensors")
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)
    processor = Blip2Processor.from_pretrained(again)
    config = Blip2Config.from_pretrained(again)
    assert processor.num_query_tokens == config.num_query_tokens
    assert processor.tokenizer.convert_tokens_to_ids("<image>") == config.image_token_id


def test_embedded_default_is_generated_once(tmp_path: Path) -> None:
    first = ensure_tiny_model(tmp_path)
    stamp = (first / "model.safetensors").stat().st_mtime_ns
    assert ensure_tiny_model(tmp_path) == first
    assert (first / "model.safetensors").stat().st_mtime_ns == stamp
    assert [p.name for p in tmp_path.iterdir()] == [tiny_dirname("opt")]
    # A cache written by another generator version is not reused.
    assert tiny_dirname("opt").endswith(f"-v{TINY_VERSION}")


def test_a_killed_generators_staging_directory_is_removed(tmp_path: Path) -> None:
    # A generator killed mid-write leaves its staging directory; the next one removes it unless it may still be
    # in use by a generator running right now.
    stale, fresh = tmp_path / ".tiny-killed", tmp_path / ".tiny-running"
    for d in (stale, fresh):
        d.mkdir()
        (d / "model.safetensors").write_bytes(b"partial")
    old = time.time() - STALE_STAGING_S - 60
    os.utime(stale, (old, old))
    ensure_tiny_model(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".tiny-running", tiny_dirname("opt")]


def test_stale_staging_is_removed_when_the_model_already_exists(tmp_path: Path) -> None:
    # The usual crash loop: a killed generator, then one that succeeds; later starts return early.
    ensure_tiny_model(tmp_path)
    stale = tmp_path / ".tiny-killed"
    stale.mkdir()
    old = time.time() - STALE_STAGING_S - 60
    os.utime(stale, (old, old))
    ensure_tiny_model(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == [tiny_dirname("opt")]
