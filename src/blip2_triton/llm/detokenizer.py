"""Text of generated tokens: the final answer decoded whole, as HF does, and a stream's text step by step.

Decoding a stream's whole answer at every step costs O(length) per row and step (at 32 streams of 200 tokens most of
an engine iteration's host time). A stream instead decodes a short window: the tokens since the text it last took,
after one earlier token of context, since some decoders (SentencePiece, word-level) render a token differently at
the start of a text. A probe at load time checks, on random token sequences, that the window's text equals the
whole decode at every step; a tokenizer where it does not (a clean-up pass that joins across tokens, say) decodes
whole every step, as before.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)

_PROBE_SEQUENCES = 48
_PROBE_LENGTH = 40
# Text where clean-up passes join across tokens (" ." -> "."), plus multi-byte characters split over tokens.
_PROBE_TEXTS = ("a cat . is it ? yes , it 's a dog ; it isn't ! \" quoted \" ' single ' 1 . 5",
                "caf\u00e9 na\u00efve \u65e5\u672c\u8a9e \U0001f600 end")


@dataclass
class StreamText:
    """A stream's decoding state: `text` is the decode of its first `read` tokens; `context` marks where the next
    window starts."""

    context: int = 0
    read: int = 0
    text: str = ""


class Detokenizer:
    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        backend = getattr(tokenizer, "backend_tokenizer", None)
        # The Rust decoder directly: HF's `decode` first walks the id list in Python, which is most of its cost.
        self._window: Callable[[list[int]], str] = (
            (lambda ids: backend.decode(ids, skip_special_tokens=True)) if backend is not None else self.decode
        )
        self.incremental = self._probe()
        if not self.incremental:
            log.info("streams decode their whole text every step: this tokenizer's text is not local to tokens")

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def text(self, ids: list[int]) -> str:
        """The final answer: HF's decode of every generated token, stripped."""
        return self.decode(ids).strip()

    def advance(self, state: StreamText, ids: list[int]) -> str:
        """The decode of `ids` so far (unstripped), as far as it is settled; updates `state`."""
        return self._windowed(state, ids) if self.incremental else self.decode(ids)

    def _windowed(self, state: StreamText, ids: list[int]) -> str:
        if len(ids) == state.read:
            return state.text
        before = self._window(ids[state.context:state.read])
        after = self._window(ids[state.context:])
        # An incomplete multi-byte character, or a token with no text yet (a skipped special token): wait for more.
        if len(after) > len(before) and not after.endswith("\ufffd"):
            state.text += after[len(before):]
            state.context, state.read = state.read, len(ids)
        return state.text

    def _probe(self) -> bool:
        rng = random.Random(0)  # noqa: S311 - reproducible probe ids, not secrets
        vocab = len(self.tokenizer)
        specials = [i for i in getattr(self.tokenizer, "all_special_ids", []) if 0 <= i < vocab]
        sequences = [self.tokenizer.encode(text, add_special_tokens=False) for text in _PROBE_TEXTS]
        sequences += [[rng.choice(specials) if specials and rng.random() < 0.05 else rng.randrange(vocab)
                       for _ in range(_PROBE_LENGTH)] for _ in range(_PROBE_SEQUENCES)]
        for sequence in sequences:
            state = StreamText()
            for end in range(1, len(sequence) + 1):
                self._windowed(state, sequence[:end])
                if state.text != self.decode(sequence[:state.read]):
                    return False
        return True
