"""Stop strings, one rule for every backend that sees its tokens one by one (llama.cpp in-process, an inference
server): a pass ends at the stop string that COMPLETES first, cut right after it; text streams as it grows, except a
tail that could still become a stop string (held back until it cannot, so a UI never shows half a `</query>`)."""

from __future__ import annotations

from typing import Callable, Optional, Sequence


class StopCut:
    """The text of one generate pass, as token texts arrive: where a stop string completes, and what to stream.

    What the KV cache keeps of the token that completed a stop string is the backend's business (the token itself
    when the cut is at its end, else the tokenization of `tail`); the text is the same either way."""

    def __init__(self, stops: Sequence[str], on_piece: Optional[Callable[[str], None]] = None):
        self.stops = [s for s in stops if s]
        self.on_piece = on_piece
        self._longest = max((len(s) for s in self.stops), default=0)
        self.text = ""  # the pass so far; after a stop, up to and including the stop string
        self.stop_hit: Optional[str] = None
        self.tail = ""  # after a stop: the text of the last token that is kept (up to the stop string's end)
        self.overshoot = 0  # after a stop: characters of the last token past the stop string
        self._streamed = 0  # characters of `text` given to on_piece

    def offer(self, piece: str) -> bool:
        """Add one token's text; True when a stop string completed in it (`stop_hit`, `tail`, `overshoot` say how).
        Otherwise what can no longer begin a stop string is streamed."""
        candidate = self.text + piece
        hit = first_stop(candidate, self.stops, max(0, len(self.text) - self._longest + 1))
        if hit is not None:
            self.stop_hit, end = hit
            self.tail, self.overshoot = candidate[len(self.text) : end], len(candidate) - end
            self.text = candidate[:end]
            return True
        self.text = candidate
        self._stream(len(candidate) - partial_stop_len(candidate, self.stops))
        return False

    def flush(self) -> None:
        """The pass ended: stream what was held back."""
        self._stream(len(self.text))

    def _stream(self, upto: int) -> None:
        if self.on_piece is not None and upto > self._streamed:
            self.on_piece(self.text[self._streamed : upto])
            self._streamed = upto


def first_stop(text: str, stops: Sequence[str], search_from: int) -> Optional[tuple[str, int]]:
    """The stop string that completes first in text[search_from:], with the index just past it."""
    best: Optional[tuple[str, int]] = None
    for s in stops:
        i = text.find(s, search_from)
        if i >= 0 and (best is None or i + len(s) < best[1]):
            best = (s, i + len(s))
    return best


def partial_stop_len(text: str, stops: Sequence[str]) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of some stop string (held back from streaming)."""
    best = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:n]):
                best = n
                break
    return best
