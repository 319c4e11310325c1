from __future__ import annotations

import hashlib
import random
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # `loadtest` is a plain directory of the checkout, not an installed package

from loadtest import images  # noqa: E402
from loadtest.workload import Workload, load_prompts  # noqa: E402


def _digests(directory: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir())}


def test_generated_image_set_is_deterministic_and_varied(tmp_path: Path) -> None:
    first = images.ensure_images(tmp_path / "a")
    second = images.ensure_images(tmp_path / "b")
    assert _digests(first) == _digests(second)
    formats, sizes, modes = set(), set(), set()
    for name, data in images.load_images(first):
        spec = next(s for s in images.SPECS if s[0] == name)
        with Image.open(first / name) as image:
            assert image.size == (spec[1], spec[2])
            formats.add(image.format)
            sizes.add(image.size)
            modes.add(image.mode)
        assert len(data) > 1000
    assert {"JPEG", "PNG", "WEBP", "GIF", "BMP"} <= formats
    assert len(sizes) >= 10
    assert {"RGB", "L", "RGBA", "P"} <= modes


def test_ensure_images_reuses_and_repairs_cache(tmp_path: Path) -> None:
    directory = images.ensure_images(tmp_path / "set")
    marker = directory / "thumb_64x64.png"
    mtime = marker.stat().st_mtime_ns
    assert images.ensure_images(directory) == directory
    assert marker.stat().st_mtime_ns == mtime  # reused, not regenerated
    marker.unlink()
    images.ensure_images(directory)
    assert marker.exists()


def test_load_images_from_custom_dir(tmp_path: Path) -> None:
    Image.new("RGB", (8, 8), "red").save(tmp_path / "x.JPG", format="JPEG")
    (tmp_path / "notes.txt").write_text("not an image")
    assert [name for name, _ in images.load_images(tmp_path)] == ["x.JPG"]
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError):
        images.load_images(tmp_path / "empty")


def test_load_prompts_skips_comments_and_blanks(tmp_path: Path) -> None:
    path = tmp_path / "p.txt"
    path.write_text("# header\n\n  Question: a? Answer:  \n#x\nQuestion: b? Answer:\n")
    assert load_prompts(path) == ["Question: a? Answer:", "Question: b? Answer:"]
    assert len(load_prompts()) >= 10  # the shipped default
    path.write_text("# nothing\n")
    with pytest.raises(ValueError):
        load_prompts(path)


@pytest.mark.parametrize("ratio", [0.0, 0.3, 1.0])
def test_pick_honours_vqa_ratio(ratio: float) -> None:
    work = Workload(images=[("a", b"A"), ("b", b"B")], prompts=["p1", "p2"], vqa_ratio=ratio, repeat_ratio=1.0)
    rng = random.Random(1)
    picks = [work.pick(rng) for _ in range(2000)]
    vqa = [p for p in picks if p[0] == "vqa"]
    assert abs(len(vqa) / len(picks) - ratio) < 0.05
    assert all(p[2] in ("p1", "p2") for p in vqa)
    assert all(p[2] is None for p in picks if p[0] == "caption")
    assert {p[1] for p in picks} == {b"A", b"B"}


def test_images_are_unique_unless_repeats_are_asked_for(tmp_path: Path) -> None:
    originals = images.load_images(images.ensure_images(tmp_path / "set"))
    work = Workload(images=originals, prompts=["p"])
    rng = random.Random(3)
    sent = [work.pick(rng)[1] for _ in range(300)]
    assert len(set(sent)) == len(sent)  # a byte-keyed server cache never hits
    assert not set(sent) & {data for _, data in originals}
    # Another process (or a rerun) with the same seed still sends different bytes.
    assert Workload(images=originals, prompts=["p"]).pick(random.Random(3))[1] != sent[0]

    repeating = Workload(images=originals, prompts=["p"], repeat_ratio=0.25)
    picks = [repeating.pick(rng)[1] for _ in range(2000)]
    share = sum(1 for data in picks if data in {d for _, d in originals}) / len(picks)
    assert abs(share - 0.25) < 0.05


def test_make_unique_keeps_pixels_for_every_format(tmp_path: Path) -> None:
    import io

    for name, data in images.load_images(images.ensure_images(tmp_path / "set")):
        first, second = images.make_unique(data, b"run-1-0"), images.make_unique(data, b"run-1-1")
        assert len({data, first, second}) == 3, name
        with Image.open(io.BytesIO(data)) as original, Image.open(io.BytesIO(first)) as unique:
            assert unique.format == original.format, name
            assert unique.mode == original.mode and unique.size == original.size, name
            assert unique.tobytes() == original.tobytes(), name
    with pytest.raises(ValueError):
        images.make_unique(b"x", b"t" * 256)


def test_workload_validation() -> None:
    with pytest.raises(ValueError):
        Workload(images=[("a", b"A")], prompts=["p"], vqa_ratio=1.5)
    with pytest.raises(ValueError):
        Workload(images=[("a", b"A")], prompts=["p"], repeat_ratio=-0.1)
    with pytest.raises(ValueError):
        Workload(images=[], prompts=["p"])


def test_locustfile_loads_and_lists_its_users() -> None:
    # A separate process: importing locust monkey-patches the interpreter with gevent.
    result = subprocess.run(
        [sys.executable, "-m", "locust", "-f", str(ROOT / "loadtest" / "locustfile.py"), "--list"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr
    assert "Blip2GrpcUser" in result.stdout and "Blip2HttpUser" in result.stdout
    assert "Blip2OpenAIUser" in result.stdout
    assert "Blip2RetrievalUser" in result.stdout
