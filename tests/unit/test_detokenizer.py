"""Stream detokenising: a few tokens per step, the same text as decoding everything, or whole decodes where a
tokenizer's text is not local to its tokens."""

from __future__ import annotations

import random
from typing import Any

import pytest
from transformers import AutoTokenizer

from blip2_triton import scenes, tiny
from blip2_triton.llm.detokenizer import Detokenizer, StreamText

TOKENIZERS = {
    "scenes_bpe": lambda: AutoTokenizer.from_pretrained(scenes.shipped_model_dir("opt")),
    "tiny_opt_bpe": tiny._build_tokenizer,
    "tiny_t5_sentencepiece": tiny._build_t5_tokenizer,
}


@pytest.mark.parametrize("name", sorted(TOKENIZERS))
def test_window_decoding_equals_the_whole_decode_at_every_step(name: str) -> None:
    tokenizer = TOKENIZERS[name]()
    detok = Detokenizer(tokenizer)
    assert detok.incremental
    rng = random.Random(7)
    texts = ["a red circle to the left of a blue triangle .", "caf\u00e9 \u65e5\u672c \U0001f600 , yes"]
    sequences = [tokenizer.encode(t, add_special_tokens=False) for t in texts]
    sequences += [[rng.randrange(len(tokenizer)) for _ in range(60)] for _ in range(20)]
    for ids in sequences:
        state = StreamText()
        for end in range(1, len(ids) + 1):
            text = detok.advance(state, ids[:end])
            assert text == tokenizer.decode(ids[:state.read], skip_special_tokens=True)
            assert not text.endswith("\ufffd") or state.read == 0
        # The stream catches up with the whole text whenever it ends on a complete character.
        whole = tokenizer.decode(ids, skip_special_tokens=True)
        if not whole.endswith("\ufffd"):
            assert state.read == len(ids) and state.text == whole
        assert detok.text(ids) == whole.strip()


def test_a_step_decodes_a_window_not_the_whole_answer() -> None:
    tokenizer = tiny._build_tokenizer()
    detok = Detokenizer(tokenizer)
    lengths: list[int] = []
    window = detok._window
    detok._window = lambda ids: (lengths.append(len(ids)), window(ids))[1]  # type: ignore[method-assign]
    ids = tokenizer.encode("a photo of a cat sitting on a red sofa next to a dog . " * 8, add_special_tokens=False)
    state = StreamText()
    for end in range(1, len(ids) + 1):
        detok.advance(state, ids[:end])
    assert state.text == tokenizer.decode(ids)
    assert len(ids) > 100 and max(lengths) <= 3


class _JoinedCount:
    """A tokenizer whose text is not local to tokens: it ends with the number of tokens."""

    all_special_ids: tuple[int, ...] = ()

    def __len__(self) -> int:
        return 50

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return [ord(c) % 50 for c in text]

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return "".join(chr(97 + i % 26) for i in ids) + f" ({len(ids)})"


def test_a_tokenizer_whose_text_is_not_local_decodes_whole_every_step() -> None:
    tokenizer: Any = _JoinedCount()
    detok = Detokenizer(tokenizer)
    assert not detok.incremental
    state = StreamText()
    assert detok.advance(state, [1, 2, 3]) == "bcd (3)"
    assert detok.advance(state, [1, 2, 3, 4]) == "bcde (4)"
