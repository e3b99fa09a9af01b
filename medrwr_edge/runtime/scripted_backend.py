"""A scripted backend for testing the loop's logic without a model.

Each `generate()` call plays the next scripted output. It honours stop strings exactly like a real backend (text
after the stop string is discarded), keeps a token list standing in for the KV cache, and counts every token it
"decodes", so tests can check KV-continuation accounting. Tokens are tags, words, single spaces/punctuation.
Token probabilities come from `probs`: {token text: probability}, default `default_prob`; `next_probs`
({token text: probability}) answers `next_token_probs` (guided letters, the letter confidence). Token ids are
stable per token text (a growing vocabulary), so a tokenized letter can be looked up again.
"""

from __future__ import annotations

import re
from typing import Callable, Optional, Sequence

from ..errors import ModelError
from .backend import (
    BackendInfo,
    BackendStats,
    Generation,
    GeneratedToken,
    ImageInput,
    PromptPart,
    SamplingSettings,
)

_TOKEN_RE = re.compile(r"<\|[^|]*\|>|</?[a-z]+>|\w+|\s|[^\w\s]")
_SPACED_WORD = re.compile(r" \w+")


def scripted_tokenize(text: str) -> list[str]:
    return _TOKEN_RE.findall(text)


class ScriptedBackend:
    def __init__(
        self,
        outputs: Sequence[str],
        probs: Optional[dict[str, float]] = None,
        default_prob: float = 0.9,
        n_ctx: int = 8192,
        has_vision: bool = False,
        next_probs: Optional[dict[str, float]] = None,
    ):
        self.outputs = list(outputs)
        self.calls = 0
        self.probs = probs or {}
        self.default_prob = default_prob
        # Scripts are written in the protocol's tags, as a model trained on Med-RwR writes: "auto" runs it native.
        self.info = BackendInfo("scripted", "scripted", "0" * 64, has_vision, n_ctx, "cpu", declares_protocol=True)
        self.stats = BackendStats()
        self.cache: list[str] = []  # token texts in the "KV cache"
        self.prefills = 0
        self.next_probs = next_probs
        self._vocab: dict[str, int] = {}

    def tokenize(self, text: str) -> list[int]:
        # A space and one word alone (" C": how models write an option letter after <answer>) is one token, as in
        # BPE vocabularies; everywhere else spaces are tokens of their own (the scripts' token counts rely on it).
        toks = [text] if _SPACED_WORD.fullmatch(text) else scripted_tokenize(text)
        return [self._vocab.setdefault(t, len(self._vocab)) for t in toks]

    def next_token_probs(self, token_ids: Sequence[int]) -> list[float]:
        if self.next_probs is None:
            raise AttributeError("this scripted backend has no next-token distribution (give next_probs)")
        texts = {i: t for t, i in self._vocab.items()}
        return [self.next_probs.get(texts.get(i, ""), 0.0) for i in token_ids]

    def reset(self) -> None:
        self.cache.clear()
        self.stats = BackendStats()
        self.calls = 0

    def prefill(self, prompt: Sequence[PromptPart]) -> int:
        self.prefills += 1
        for part in prompt:
            toks = ["<image>"] if isinstance(part, ImageInput) else scripted_tokenize(part)
            self.cache += toks
        self.stats.prompt_tokens += len(self.cache)
        return len(self.cache)

    def append_text(self, text: str) -> int:
        toks = scripted_tokenize(text)
        self.cache += toks
        self.stats.inserted_tokens += len(toks)
        return len(toks)

    def append_parts(self, parts: Sequence[PromptPart]) -> int:
        """Text and images after the cache (CDIR's reference image on a vision model); an image is one entry."""
        if not self.info.has_vision:
            raise ModelError("model has no vision input")
        toks = [t for part in parts for t in (["<image>"] if isinstance(part, ImageInput) else scripted_tokenize(part))]
        self.cache += toks
        self.stats.inserted_tokens += len(toks)
        return len(toks)

    def generate(
        self,
        settings: SamplingSettings,
        stop: Sequence[str],
        on_piece: Optional[Callable[[str], None]] = None,
    ) -> Generation:
        script = self.outputs[self.calls] if self.calls < len(self.outputs) else ""
        self.calls += 1
        stop_reason, stop_string = "eos", None
        hits = [(script.find(s), s) for s in stop if s in script]
        if hits:
            at, stop_string = min(hits)
            script, stop_reason = script[: at + len(stop_string)], "stop"
        tokens = scripted_tokenize(script)
        if len(tokens) > settings.max_tokens:
            tokens, stop_reason, stop_string = tokens[: settings.max_tokens], "length", None
        if len(self.cache) + len(tokens) > self.info.n_ctx:
            tokens = tokens[: max(0, self.info.n_ctx - len(self.cache))]
            stop_reason, stop_string = "context", None
        out = []
        for t in tokens:
            out.append(GeneratedToken(len(self.cache), t, self.probs.get(t, self.default_prob)))
            self.cache.append(t)
            if on_piece:
                on_piece(t)
        self.stats.generated_tokens += len(tokens)
        return Generation("".join(tokens), out, stop_reason, stop_string)

    def n_tokens(self) -> int:
        return len(self.cache)

    def rollback(self, n_keep: int) -> None:
        self.stats.rolled_back_tokens += len(self.cache) - n_keep
        del self.cache[n_keep:]

    def cache_text(self) -> str:
        return "".join(self.cache)

    def close(self) -> None:
        pass
