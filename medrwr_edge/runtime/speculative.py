"""Speculative decoding for `LlamaBackend.generate`: where drafts come from, and the acceptance rule.

Plain decoding reads every weight once per token, so on a CPU it runs at memory bandwidth ÷ model size. A
batch of k+1 tokens costs little more than one token to decode, so if k guessed tokens can be checked in one
batch, every accepted guess is a token for (nearly) free. Guesses come from

* prompt lookup: Med-RwR answers copy text already in the sequence (the option it picks, the ICD-10-CM code and
  description it just retrieved, phrases of the question): find the last few generated tokens earlier in the
  sequence and propose what followed them there;
* a draft model: a small GGUF with the same vocabulary (Qwen2.5-Coder-0.5B for the 1.5B) decoding greedily.

The target model then verifies all drafts in one batch (see `LlamaBackend.generate`): a draft token is kept
when the target's own pick at that position (argmax, or a sample with the position's random number) equals it —
for deterministic drafts this is the speculative-sampling acceptance rule, and the output is plain decoding's.
`DraftLength` decides from measured costs and acceptance how many tokens to draft, or none.
"""

from __future__ import annotations

import os
import time
from typing import Optional, Sequence

import numpy as np

from medrwr_edge.errors import ModelError
from medrwr_edge.runtime import llama_native
from medrwr_edge.runtime.settings import SPECULATIVE_MODES as MODES  # one owner: the settings


def lookup_draft(seq: Sequence[int], k: int, ngram_max: int = 4, ngram_min: int = 2) -> list[int]:
    """Up to k tokens that followed the most recent earlier occurrence of the longest suffix n-gram of `seq`
    (n from ngram_max down to ngram_min); [] if none occurs. Long n-grams first: a 4-token match is far more
    likely to continue the same way than a 2-token one."""
    n_seq = len(seq)
    if k <= 0 or n_seq <= ngram_min:
        return []
    a = np.asarray(seq, dtype=np.int64)
    for n in range(min(ngram_max, n_seq - 1), ngram_min - 1, -1):
        tail = a[n_seq - n :]
        # Start positions i with a[i:i+n] == tail and at least one token after the match (i + n < n_seq).
        hits = np.flatnonzero(a[: n_seq - n] == tail[0])
        for j in range(1, n):
            if not hits.size:
                break
            hits = hits[a[hits + j] == tail[j]]
        if hits.size:
            start = int(hits[-1]) + n
            return a[start : start + k].tolist()
    return []


class DraftLength:
    """How many draft tokens pay off, from what this machine measured (running estimates, updated every batch).

    A verification batch of 1 + k tokens costs t1 * (1 + k * r): on an idle many-core machine decoding is
    bandwidth-bound and r is small, but on 2 busy cores a batch is compute-bound and r approaches 1. Drafting
    costs d per draft token (0 for prompt lookup, the draft model's decode for a draft model). With each draft
    token accepted with probability a (geometric), a batch yields 1 + a(1 - a^k)/(1 - a) tokens. k is chosen to
    maximise tokens per unit of time; 0 (plain decoding) when no k beats it — then every 16th chance drafts
    one token anyway, so a change of load or of text is noticed."""

    PROBE_EVERY = 16
    DECAY = 0.9  # the estimates follow the last ~10 batches

    def __init__(self, n_max: int, prior_cost: float = 0.25, adaptive: bool = True):
        self.n_max = n_max
        self.adaptive = adaptive  # False: always n_max (tests, benchmarks of a fixed length)
        self.ok, self.bad = 2.0, 1.0  # pseudo-counts of accepted / rejected draft tokens (prior a = 2/3)
        self.t1: Optional[float] = None  # seconds of a one-token decode
        self.r = prior_cost  # extra cost of each verified draft token, in units of t1
        self.d = 0.0  # cost of producing one draft token, in units of t1
        self._skipped = 0

    @property
    def acceptance(self) -> float:
        return self.ok / (self.ok + self.bad)

    def choose(self, room: int) -> int:
        if not self.adaptive:
            return max(0, min(self.n_max, room))
        a, best_k, best = min(self.acceptance, 0.999), 0, 1.02  # a batch must beat plain decoding by 2%
        for k in range(1, min(self.n_max, room) + 1):
            gain = (1 + a * (1 - a**k) / (1 - a)) / (1 + k * (self.r + self.d))
            if gain > best:
                best_k, best = k, gain
        if best_k == 0 and room > 0:
            self._skipped += 1
            if self._skipped >= self.PROBE_EVERY:
                self._skipped = 0
                return 1
        return best_k

    def single(self, seconds: float) -> None:
        self.t1 = seconds if self.t1 is None else self.DECAY * self.t1 + (1 - self.DECAY) * seconds

    def batch(self, n_drafts: int, accepted: int, verify_seconds: float, draft_seconds: float) -> None:
        self.ok = self.DECAY * self.ok + accepted
        self.bad = self.DECAY * self.bad + (accepted < n_drafts)
        if self.t1 and n_drafts:
            r = max(0.0, verify_seconds / self.t1 - 1) / n_drafts
            d = draft_seconds / self.t1 / n_drafts
            self.r = self.DECAY * self.r + (1 - self.DECAY) * r
            self.d = self.DECAY * self.d + (1 - self.DECAY) * d


class DraftModel:
    """A small GGUF proposing tokens greedily. Its KV cache follows the target's sequence lazily: before each
    draft the common prefix of what it holds and the target's tokens is kept and the rest decoded, so appends
    (retrieved documents), rollbacks, the stop-string cut and reset/prefill of the target need no hooks."""

    def __init__(
        self,
        path: str | os.PathLike,
        target: llama_native.NativeModel,
        *,
        n_ctx: int,
        n_threads: int,
        n_batch: int = 512,
        p_min: float = 0.5,
    ):
        self.model = llama_native.NativeModel(path)
        try:
            _check_same_vocab(self.model, target)
            self.ctx = llama_native.NativeContext(self.model, n_ctx, n_batch, n_threads)
        except BaseException:
            self.model.close()
            raise
        self.path = str(self.model.path)
        self.p_min = p_min  # stop drafting when the draft itself is less sure than this: a likely rejection
        self.tokens: list[int] = []  # exactly what the draft's KV cache holds
        self._logits_valid = False  # do the draft context's last logits belong to self.tokens[-1]?
        self._buf = np.empty(self.model.facts.n_vocab, dtype=np.float32)
        self.last_seconds = 0.0

    def draft(self, seq: Sequence[int], k: int) -> list[int]:
        """Up to k greedy draft tokens following `seq`."""
        if k <= 0 or not seq:
            return []
        self._follow(seq)
        t0 = time.perf_counter()
        out: list[int] = []
        buf = self._buf
        while True:
            logits = self.ctx.last_logits()
            tok = int(logits.argmax())
            np.subtract(logits, logits[tok], out=buf)
            np.exp(buf, out=buf)
            if self.model.is_eog(tok) or 1.0 / float(buf.sum()) < self.p_min:
                break
            out.append(tok)
            if len(out) >= k or len(self.tokens) + 1 >= self.ctx.n_ctx:
                break
            self.ctx.decode_one(tok, len(self.tokens))
            self.tokens.append(tok)
        self.last_seconds = time.perf_counter() - t0  # drafting only: catching up on new context is not per draft
        return out

    def _follow(self, seq: Sequence[int]) -> None:
        """Make the draft's cache hold exactly `seq`, with the next-token logits after it."""
        n = _common_prefix(self.tokens, seq)
        if n == len(seq) and n == len(self.tokens) and self._logits_valid:
            return
        n = min(n, len(seq) - 1)  # at least the last token is decoded: its logits are what drafting needs
        if n < len(self.tokens):
            self.ctx.remove_from(n)
            del self.tokens[n:]
        tail = list(seq[n:])
        self.ctx.decode_tokens(tail, n, logits_last=True)
        self.tokens.extend(tail)
        self._logits_valid = True

    def close(self) -> None:
        if getattr(self, "ctx", None) is not None:
            self.ctx.close()
            self.ctx = None
        if getattr(self, "model", None) is not None:
            self.model.close()
            self.model = None


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    if list(a[:n]) == list(b[:n]):
        return n
    x = np.asarray(a[:n], dtype=np.int64) != np.asarray(b[:n], dtype=np.int64)
    return int(np.argmax(x))


def _check_same_vocab(draft: llama_native.NativeModel, target: llama_native.NativeModel) -> None:
    """Draft token ids are verified as the target's ids: the vocabularies must be the same (sizes may differ by
    padding rows, as Qwen2.5's do, like llama.cpp's own check)."""
    nd, nt = draft.facts.n_vocab, target.facts.n_vocab
    if abs(nd - nt) > 128:
        raise ModelError(f"draft model vocabulary ({nd} tokens) does not match the model's ({nt})")
    n = min(nd, nt)
    for tok in list(range(0, n, max(1, n // 2000))) + [n - 1]:
        if draft.piece(tok) != target.piece(tok):
            raise ModelError(f"draft model tokenizer differs from the model's (token {tok}); use one of the same family")


def speculative_args(mode: str, draft_model: Optional[str] = None) -> dict:
    """LlamaBackend keyword arguments for a `--speculative` mode; 'draft' without a path uses the installed
    Qwen2.5-Coder-0.5B (`medrwr-edge models install qwen2.5-coder-0.5b-instruct`)."""
    from medrwr_edge.errors import SettingError

    if mode not in MODES:
        raise SettingError("speculative", f"must be one of {', '.join(MODES)}, not {mode!r}")
    if mode != "draft":
        return {"speculative": mode}
    if draft_model is None:
        from medrwr_edge import assets

        draft_model = str(assets.installed_path(assets.QWEN_0_5B))  # not installed: says how to install it
    return {"speculative": mode, "draft_model": draft_model}
