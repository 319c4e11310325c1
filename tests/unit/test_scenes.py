import itertools
import json

import numpy as np
import pytest
import torch
from transformers import Blip2Config, Blip2ForConditionalGeneration, Blip2Processor

from blip2_triton.scenes import (
    BACKGROUNDS,
    COLOURS,
    HELD_OUT_SEED_START,
    NUMBERS,
    PATCH_SIZE,
    POSITIONS,
    SLOTS,
    Scene,
    make_scene,
    requests,
    shipped_model_dir,
    training_seeds,
    vqa_prompt,
)

MAX_NEW_TOKENS = 24


def test_a_seed_always_gives_the_same_scene() -> None:
    for seed in (0, 7, HELD_OUT_SEED_START + 3):
        a, b = make_scene(seed), make_scene(seed)
        assert a.image.tobytes() == b.image.tobytes()
        assert (a.caption, a.qa, a.shapes, a.background) == (b.caption, b.qa, b.shapes, b.background)
    assert make_scene(1).image.tobytes() != make_scene(2).image.tobytes()


def test_training_seeds_never_reach_the_held_out_range() -> None:
    runs = [training_seeds(run) for run in range(10)]
    assert all(r.stop <= HELD_OUT_SEED_START for r in runs)
    assert all(a.stop <= b.start for a, b in itertools.pairwise(runs))
    with pytest.raises(ValueError, match="run seed"):
        training_seeds(10)


def _check_answers(scene: Scene) -> None:
    shapes = scene.shapes
    assert 1 <= len(shapes) <= 3
    assert [s.slot for s in shapes] == sorted({s.slot for s in shapes})
    assert len({s.name for s in shapes}) == len(shapes)
    questions = [q for q, _ in scene.qa]
    assert len(set(questions)) == len(questions)
    by_name = {s.name: s for s in shapes}
    for question, answer in scene.qa:
        assert question.endswith("?")
        words = question[:-1].split()
        if question.startswith("what colour is the ") and words[-1] != "background":
            matching = [s for s in shapes if s.kind == words[-1]]
            assert [s.colour for s in matching] == [answer], question
        elif question == "what colour is the background?":
            assert answer == scene.background
        elif question.startswith("what shape is the "):
            matching = [s for s in shapes if s.colour == words[-2]]
            assert [s.kind for s in matching] == [answer], question
        elif question == "how many shapes are there?":
            assert answer == NUMBERS[len(shapes)]
        elif question.startswith("how many "):
            assert answer == NUMBERS[sum(f"{s.kind}s" == words[2] for s in shapes)], question
        elif question.startswith("is there "):
            assert answer == ("yes" if " ".join(words[-2:]) in by_name else "no"), question
        elif question.startswith("where is the "):
            assert answer == POSITIONS[by_name[" ".join(words[-2:])].slot]
        elif question.startswith("what is to the "):
            left, right = shapes
            assert answer == (left.name if words[4] == "left" else right.name), question
            assert " ".join(words[-2:]) == (right.name if words[4] == "left" else left.name), question
        else:
            raise AssertionError(f"unknown question kind: {question}")


def test_every_question_has_exactly_one_answer() -> None:
    for seed in range(1500):
        _check_answers(make_scene(seed))


def test_captions_list_the_shapes_left_to_right() -> None:
    assert make_scene(2).caption == "a green triangle"
    assert make_scene(0).caption == "a blue circle, a green square and a blue square"
    for seed in range(300):
        scene = make_scene(seed)
        names = [s.name for s in scene.shapes]
        if len(names) == 2:
            assert scene.caption == f"a {names[0]} to the left of a {names[1]}"
        else:
            assert scene.caption.replace(" and ", ", ").split(", ") == [f"a {n}" for n in names]


def _patch_pixels(scene: Scene) -> np.ndarray:
    """The pixels of each ViT patch of the image: [rows, columns, pixels, rgb]."""
    pixels = np.asarray(scene.image, dtype=np.float32)
    return pixels.reshape(SLOTS, PATCH_SIZE, SLOTS, PATCH_SIZE, 3).transpose(0, 2, 1, 3, 4).reshape(SLOTS, SLOTS, -1, 3)


def test_each_shape_is_drawn_in_its_own_patch_in_its_colour() -> None:
    # Slots, counts and relations are read off whole patches, so a shape's pixels must never reach another patch.
    palette = {name: np.array(rgb, dtype=np.float32) for name, rgb in COLOURS.items()}
    for seed in range(HELD_OUT_SEED_START, HELD_OUT_SEED_START + 100):
        scene = make_scene(seed)
        patches = _patch_pixels(scene)
        background = np.median(patches[0].reshape(-1, 3), axis=0)
        assert np.abs(background - np.array(BACKGROUNDS[scene.background])).max() < 30, seed
        changed = (np.abs(patches - background).max(axis=-1) > 40).mean(axis=-1)
        occupied = {s.slot for s in scene.shapes}
        for row in range(SLOTS):
            for col in range(SLOTS):
                if row == SLOTS // 2 and col in occupied:
                    assert changed[row, col] > 0.08, (seed, row, col)
                else:
                    assert changed[row, col] < 0.01, (seed, row, col)
        for shape in scene.shapes:
            patch = patches[SLOTS // 2, shape.slot]
            inside = patch[np.abs(patch - background).max(axis=-1) > 40]
            nearest = min(palette, key=lambda c: float(np.abs(np.median(inside, axis=0) - palette[c]).max()))
            assert nearest == shape.colour, (seed, shape)
            # How much of its bounding box a shape covers tells the kinds apart (square 1, circle π/4, triangle 1/2;
            # less where anti-aliased edges widen the box).
            diff = np.abs(patch - background).max(axis=-1).reshape(PATCH_SIZE, PATCH_SIZE)
            mask = diff > diff.max() / 2
            ys, xs = np.nonzero(mask)
            fill = mask.sum() / ((np.ptp(ys) + 1) * (np.ptp(xs) + 1))
            low, high = {"square": (0.78, 1.0), "circle": (0.66, 0.9), "triangle": (0.4, 0.67)}[shape.kind]
            assert low < fill <= high, (seed, shape, fill)


def test_scene_colours_stay_apart() -> None:
    palette = np.array([*COLOURS.values(), *BACKGROUNDS.values()], dtype=np.float32)
    gaps = np.abs(palette[:, None] - palette[None]).max(axis=-1) + np.eye(len(palette)) * 1e3
    # Each colour is jittered by at most 15 per channel, so 2 × 15 plus margin keeps every name decidable.
    assert gaps.min() > 60


@pytest.fixture(scope="module")
def shipped() -> tuple[Blip2ForConditionalGeneration, Blip2Processor]:
    path = shipped_model_dir()
    model = Blip2ForConditionalGeneration.from_pretrained(path, dtype=torch.float32).eval()
    return model, Blip2Processor.from_pretrained(path)


def test_the_shipped_checkpoint_is_a_complete_small_blip2(
        shipped: tuple[Blip2ForConditionalGeneration, Blip2Processor]) -> None:
    path = shipped_model_dir()
    model, processor = shipped
    assert sum(f.stat().st_size for f in path.iterdir()) < 8 * 2**20
    config = Blip2Config.from_pretrained(path)
    assert config.text_config.model_type == "opt"
    assert processor.num_query_tokens == config.num_query_tokens
    assert processor.tokenizer.convert_tokens_to_ids("<image>") == config.image_token_id
    assert model.generation_config.eos_token_id == processor.tokenizer.eos_token_id
    record = json.loads((path / "SCENES_MODEL.json").read_text())
    assert record["caption_exact"] >= 0.9 and record["vqa_exact"] >= 0.9


def test_greedy_generate_captions_and_answers_unseen_scenes(
        shipped: tuple[Blip2ForConditionalGeneration, Blip2Processor]) -> None:
    model, processor = shipped
    eos = model.generation_config.eos_token_id
    results: dict[bool, list[bool]] = {True: [], False: []}
    misses = []
    for seed in range(HELD_OUT_SEED_START + 500, HELD_OUT_SEED_START + 530):
        scene = make_scene(seed)
        for prompt, expected in requests(scene)[:4]:
            inputs = processor(images=scene.image, text=prompt, return_tensors="pt")
            with torch.no_grad():
                out = model.generate(**inputs, max_new_tokens=MAX_NEW_TOKENS, do_sample=False)
            start = inputs["input_ids"].shape[1] if prompt else model.config.num_query_tokens + 1
            new = out[0, start:].tolist()
            # Stops by itself, well before the token budget.
            assert new[-1] == eos and len(new) <= MAX_NEW_TOKENS // 2, (seed, prompt, new)
            text = processor.tokenizer.decode(new, skip_special_tokens=True).strip()
            results[prompt is None].append(text == expected)
            if text != expected:
                misses.append((seed, prompt, text, expected))
    assert np.mean(results[True]) >= 0.9, misses
    assert np.mean(results[False]) >= 0.9, misses
    assert len(results[False]) >= 80


def test_vqa_prompt_is_the_blip2_form() -> None:
    assert vqa_prompt("what colour is the circle?") == "Question: what colour is the circle? Answer:"


def test_the_embedded_default_is_the_shipped_model_and_t5_stays_generated(tmp_path) -> None:
    from blip2_triton.checkpoint import resolve_model_source, tiny_dirname
    from blip2_triton.options import ServerOptions

    assert resolve_model_source(ServerOptions(cache_dir=str(tmp_path))) == str(shipped_model_dir("opt"))
    t5 = resolve_model_source(ServerOptions(cache_dir=str(tmp_path), tiny_family="t5"))
    assert t5 == str(tmp_path / tiny_dirname("t5"))


def test_the_scene_command_draws_a_scene_and_prints_its_answers(tmp_path, capsys) -> None:
    from PIL import Image

    from blip2_triton.cli import main

    out = tmp_path / "scene.png"
    assert main(["scene", str(out), "--seed", str(HELD_OUT_SEED_START + 39), "--scale", "4"]) == 0
    scene = make_scene(HELD_OUT_SEED_START + 39)
    printed = capsys.readouterr().out.splitlines()
    assert printed[1] == f"caption: {scene.caption}"
    assert printed[2:] == [f"{q} {a}" for q, a in scene.qa]
    with Image.open(out) as image:
        assert image.size == (scene.image.width * 4, scene.image.height * 4)
        # Enlarged without smoothing: every 4 x 4 block is one pixel of the scene.
        assert image.convert("RGB").resize(scene.image.size, Image.Resampling.NEAREST).tobytes() == \
            scene.image.tobytes()
