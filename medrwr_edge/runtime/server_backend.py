"""`ServerBackend`: the `runtime.backend.Backend` contract over HTTP, against an inference server.

Only token generation moves to the server; packs, evidence, reports and logs stay here. The sequence (what the
in-process backend keeps in its KV cache) lives in this object as token ids and text. Every `generate()` sends the
WHOLE sequence as the prompt; the server compares it with what its cache holds and computes only the new suffix
(llama.cpp server: `cache_prompt` on a slot; vLLM: automatic prefix caching; llama-cpp-python: its one context's
prefix match). So splicing a retrieve block is "previous prompt + generated text + block" — a cache hit, not a
re-encode — and a rollback (CDIR) is simply a shorter prompt next time, still a hit.

Two dialects (llama.cpp server; OpenAI-style /v1/completions: vLLM, llama-cpp-python), chosen by probing the server
once: see `runtime/engine_dialects.py`.

Stop strings are applied HERE, on the streamed tokens, with the in-process backend's exact-cut rule (the sequence
ends exactly at `</query>`; a token that ran past it is replaced by the tokenization of the rest up to the stop
string), and the stream is closed at the hit. The server is not given the stop strings: each engine cuts text its
own way (llama.cpp and llama-cpp-python drop the stop word, vLLM keeps or drops it by a flag), and we need one rule.

Exact identity with the in-process backend needs token-id prompts: with a text prompt the server re-tokenizes the
whole sequence, and where a BPE merge spans a splice point (e.g. `</query>` + "\n") its tokens differ from the
loop's. Each request records the prompt length as the server counted it (`requests[*].server_prompt_tokens`).
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from typing import Callable, Optional, Sequence
from urllib.parse import urlsplit

from ..errors import InputError, SettingError
from .backend import BackendInfo, BackendStats, Generation, GeneratedToken, ImageInput, PromptPart, SamplingSettings
from .engine_dialects import (  # noqa: F401 - EngineError/EngineTimeout are part of this module's API
    EngineError,
    EngineHTTP,
    EngineTimeout,
    LlamaCppDialect,
    StreamEnd,
    origin,
    probe,
)
from .stops import StopCut

DEFAULT_TIMEOUT_S = 120.0  # seconds without a byte from the server before a request is given up
TOP_PROBS = 20  # top-k logprobs asked for by next_token_probs (vLLM's default --max-logprobs is 20)


@dataclass
class EngineInfo(BackendInfo):
    """BackendInfo plus what the record says about the server."""

    url: str = ""
    dialect: str = ""  # "llama.cpp" | "openai"
    server: str = ""  # "llama.cpp server", "vLLM", "llama-cpp-python", "openai-compatible"
    model_id: str = ""  # the model as the server names it
    token_prompts: bool = False  # does the server take token-id prompts (the prompt it sees is exactly ours)?
    cache_counters: bool = False  # does it report how many prompt tokens came from its cache?


@dataclass
class _Segment:
    """A run of the sequence: the prompt, an appended text, one generated token, or a stop-string tail."""

    ids: list  # token ids (an entry is None where the server gave only text)
    text: str


class ServerBackend:
    """The Backend contract against an inference server at `url`. See the module docstring."""

    def __init__(self, url: str, *, timeout: float = DEFAULT_TIMEOUT_S, n_ctx: Optional[int] = None,
                 cache_prompt: bool = True, slot: Optional[int] = None, api_key: Optional[str] = None):
        try:
            import httpx  # noqa: F401 - only to say so early when it is missing
        except ImportError:
            raise SettingError("engine", "needs httpx: pip install httpx (or the package's serve extra)") from None
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise SettingError("engine", f"{url!r} is not an http(s):// URL of an inference server")
        self.url = url.rstrip("/")
        self.cache_prompt = cache_prompt
        self.slot = slot
        self.timeout = timeout
        self._api_key = api_key
        self.http = EngineHTTP(self.url, timeout, api_key)
        try:
            self._dialect = probe(self.http, cache_prompt, slot)
        except BaseException:
            self.http.close()
            raise
        d = self._dialect
        notes: list[str] = []
        server_ctx = getattr(d, "n_ctx", 0)
        ctx = server_ctx or n_ctx or 8192
        if not server_ctx:
            notes.append(f"the inference server does not report its context size; {ctx} tokens assumed (--ctx)")
        elif n_ctx and n_ctx < server_ctx:
            ctx = n_ctx
        if not d.token_prompts:
            notes.append(f"the inference server ({d.server}) takes text prompts only: it re-tokenizes the sequence "
                         "each pass, so exact identity with the in-process backend cannot be promised")
        if not d.cache_counters:
            notes.append(f"the inference server ({d.server}) does not report prompt tokens served from its cache")
        model_id = getattr(d, "model_id", "") or getattr(d, "model_path", "").rsplit("/", 1)[-1]
        self.info = EngineInfo(
            # The server does not expose its weights' hash: the record's sha256 is of the model id it reports
            # (engine_record says so), so replay can tell a different model by name, not by bytes.
            name=f"server:{d.server}", model_path=model_id, model_sha256=_id_sha256(d.server, model_id),
            has_vision=False, n_ctx=ctx,
            device="server", notes=notes, url=origin(self.url), dialect="llama.cpp" if isinstance(d, LlamaCppDialect)
            else "openai", server=d.server, model_id=model_id, token_prompts=d.token_prompts,
            cache_counters=d.cache_counters,
        )
        self.image_refusal = _image_refusal(d, self.info.url)  # Session.ask refuses an image question with it
        self.stats = BackendStats()
        self.requests: list[dict] = []  # one entry per completion request of the current sequence
        self._segs: list[_Segment] = []
        self._n = 0

    # ---- several sequences on one server (serve's workers) -----------------------------------------------

    def default_parallel(self) -> int:
        """How many sequences the server says it decodes at once: a llama.cpp server's slots (`--parallel`); 1
        where the server does not say (vLLM batches whatever it is sent: choose `--engine-parallel` there)."""
        return max(1, int(getattr(self._dialect, "total_slots", 1)))

    def sibling(self, slot: Optional[int] = None) -> "ServerBackend":
        """Another, independent sequence on the same server (one per `serve` worker): its own connection and
        record, the probe's findings reused. `slot`: a llama.cpp server slot (`id_slot`), so that each worker's
        prefix stays cached in its own slot; ignored by servers without slots."""
        twin = copy.copy(self)
        twin.http = EngineHTTP(self.url, self.timeout, self._api_key)
        twin._dialect = copy.copy(self._dialect)
        twin._dialect.http = twin.http
        if isinstance(twin._dialect, LlamaCppDialect):
            twin._dialect.slot = twin.slot = slot
        twin.info = copy.deepcopy(self.info)
        twin.reset()
        return twin

    # ---- the sequence ----------------------------------------------------------------------------------

    def tokenize(self, text: str) -> list[int]:
        """Tokens of `text` as it would be appended (no BOS; special tokens parsed), by the server's tokenizer."""
        return self._dialect.tokenize(text, add_special=False) if text else []

    def n_tokens(self) -> int:
        return self._n

    def tokens(self) -> list:
        return [t for s in self._segs for t in s.ids]

    def text(self) -> str:
        return "".join(s.text for s in self._segs)

    def reset(self) -> None:
        self._segs = []
        self._n = 0
        self.stats = BackendStats()
        self.requests = []

    def _push(self, ids: list, text: str) -> None:
        self._segs.append(_Segment(list(ids), text))
        self._n += len(ids)

    def prefill(self, prompt: Sequence[PromptPart]) -> int:
        if self._segs:
            raise RuntimeError("prefill() needs an empty sequence: call reset() first")
        if isinstance(prompt, str):
            prompt = [prompt]
        if any(isinstance(p, ImageInput) for p in prompt):
            raise InputError(self.image_refusal, names=("engine",))
        text = "".join(p for p in prompt if isinstance(p, str))
        if not text:
            raise InputError("the prompt is empty")
        t0 = time.perf_counter()
        ids = self._dialect.tokenize(text, add_special=True)  # BOS (if the model uses one) only here
        self._check_room(len(ids), "prompt")
        self._push(ids, text)
        # Nothing is computed yet: the server encodes the prompt with the first generate() (and caches it).
        self.stats.prompt_tokens += len(ids)
        self.stats.prefill_seconds += time.perf_counter() - t0
        return self._n

    def append_text(self, text: str) -> int:
        if not self._segs:
            raise RuntimeError("append_text() before prefill()")
        ids = self.tokenize(text)
        if not ids:
            return 0
        self._check_room(len(ids), "appended text")
        self._push(ids, text)
        self.stats.inserted_tokens += len(ids)
        return len(ids)

    def rollback(self, n_keep: int) -> None:
        if not 0 <= n_keep <= self._n:
            raise ValueError(f"rollback({n_keep}) outside the sequence of {self._n} tokens")
        dropped = self._n - n_keep
        if dropped == 0:
            return
        pos = 0
        for i, seg in enumerate(self._segs):
            if pos + len(seg.ids) > n_keep:
                keep = n_keep - pos
                if keep:
                    if any(t is None for t in seg.ids[:keep]):
                        raise EngineError("cannot roll back into the middle of generated text on a text-prompt server")
                    self._segs[i] = _Segment(seg.ids[:keep], self._dialect.detokenize(seg.ids[:keep]))
                    i += 1
                del self._segs[i:]
                break
            pos += len(seg.ids)
        self._n = n_keep
        self.stats.rolled_back_tokens += dropped  # the server drops them when it sees the shorter prompt

    def _check_room(self, n_new: int, what: str) -> None:
        from .llama_backend import ContextFullError

        if self._n + n_new > self.info.n_ctx:
            raise ContextFullError(
                f"{what} of {n_new} tokens does not fit: {self._n} of {self.info.n_ctx} context tokens used")

    def _prompt(self):
        """What the server is sent: token ids where it takes them (exactly the loop's sequence), else the text."""
        if self._dialect.token_prompts:
            return self.tokens()
        return self.text()

    # ---- generation ------------------------------------------------------------------------------------

    def generate(self, settings: SamplingSettings, stop: Sequence[str],
                 on_piece: Optional[Callable[[str], None]] = None) -> Generation:
        """Stream tokens from the server until a stop string (cut exactly, as in-process), end of turn, max_tokens
        or a full context. A dropped connection or a timeout raises EngineError; the sequence is left as it was
        before this pass (nothing of a broken pass is kept)."""
        if not self._segs:
            raise RuntimeError("generate() before prefill()")
        if settings.temperature < 0 or not 0 < settings.top_p <= 1 or settings.top_k < 0:
            raise InputError(f"invalid sampling settings: {settings}")
        t0 = time.perf_counter()
        room = self.info.n_ctx - self._n
        if room <= 0:
            return Generation("", [], "context", seconds=0.0)
        max_new = min(settings.max_tokens, room)
        cut = StopCut(stop, on_piece)
        kept: list[GeneratedToken] = []
        kept_ids: list = []
        stop_reason, tail = "length", ""
        end = StreamEnd("unknown")
        prompt_len = self._n
        prompt = self._prompt()
        stream = self._dialect.stream(prompt, settings, max_new, 1, end)
        try:
            for tok in stream:
                stopped = cut.offer(tok.text)
                if stopped and cut.overshoot:  # the token ran past the stop string: its text up to it is kept
                    tail = cut.tail
                else:  # a token of the pass, or the one whose end is the stop string's end
                    kept.append(GeneratedToken(tok.token_id if tok.token_id is not None else -1, tok.text, tok.prob))
                    kept_ids.append(tok.token_id)
                if stopped:
                    stop_reason = "stop"
                    break
            else:
                stop_reason = end.reason if end.reason in ("eos", "length") else "length"
                if stop_reason == "length" and len(kept) >= room:
                    stop_reason = "context"
        finally:
            stream.close()  # closes the connection at a stop string: the server stops generating
        self._drop_eos(end, kept, kept_ids)
        for k, tid in zip(kept, kept_ids):
            self._push([tid], k.piece)
        self.stats.generated_tokens += len(kept)
        if tail:
            tail_ids = self.tokenize(tail)
            self._push(tail_ids, tail)
            self.stats.inserted_tokens += len(tail_ids)
        cut.flush()
        seconds = time.perf_counter() - t0
        self.stats.generate_seconds += seconds
        self._note_request(prompt, prompt_len, end, len(kept))
        return Generation(text=cut.text, tokens=kept, stop_reason=stop_reason, stop_string=cut.stop_hit,
                          overshoot_chars=cut.overshoot, seconds=seconds)

    def _drop_eos(self, end: StreamEnd, kept: list, kept_ids: list) -> None:
        """llama.cpp streams the end-of-turn token itself (empty text) before stopping; the in-process backend
        never keeps it, so neither do we."""
        if isinstance(self._dialect, LlamaCppDialect) and end.reason == "eos" and kept and kept[-1].piece == "":
            kept.pop()
            kept_ids.pop()

    def _note_request(self, prompt, prompt_len: int, end: StreamEnd, generated: int) -> None:
        entry: dict = {"prompt_tokens": prompt_len, "generated_tokens": generated}
        if end.cached is not None:
            entry["cached_tokens"] = end.cached
            entry["computed_tokens"] = end.computed if end.computed is not None else max(0, prompt_len - end.cached)
        server_count = end.prompt_tokens
        if server_count is None and isinstance(prompt, str):
            # A text prompt is re-tokenized by the server: check that it sees as many tokens as the loop holds.
            server_count = len(self._dialect.tokenize(prompt, add_special=True))
        if server_count is not None:
            entry["server_prompt_tokens"] = server_count
        self.requests.append(entry)

    # ---- next-token probabilities ------------------------------------------------------------------------

    def next_token_probs(self, token_ids: Sequence[int]) -> list[float]:
        """p(candidate) at the next position (softmax of the raw logits, temperature 1), decoding nothing here.

        Asked as a 1-token greedy request for the top TOP_PROBS logprobs (the prompt is a cache hit). A candidate
        outside the returned top-k gets an upper bound on its probability, min(p_k, 1 - sum(top-k)): the server did
        not say more. `self.last_probs_bounded` lists, per candidate, whether its value is such a bound."""
        if not self._segs:
            raise RuntimeError("next_token_probs() before prefill()")
        end = StreamEnd("unknown")
        greedy = SamplingSettings(temperature=0.0, max_tokens=1)
        stream = self._dialect.stream(self._prompt(), greedy, 1, TOP_PROBS, end)
        try:
            first = next(iter(stream), None)
        finally:
            stream.close()
        top = dict(first.top) if first is not None else {}
        if first is not None and first.token_id is not None and first.prob == first.prob:
            top.setdefault(first.token_id, first.prob)
        # Any token outside the top-k has p <= the k-th probability and p <= the mass the top-k leave.
        bound = min(min(top.values(), default=1.0), max(0.0, 1.0 - sum(top.values())))
        if top and all(isinstance(k, str) for k in top):  # a text-only server names tokens by their text
            top = self._ids_for_pieces(top, token_ids)
        self.last_probs_bounded = [int(t) not in top for t in token_ids]
        return [top.get(int(t), bound) for t in token_ids]

    def _ids_for_pieces(self, top: dict, token_ids: Sequence[int]) -> dict:
        pieces = {int(t): self._dialect.detokenize([int(t)]) for t in token_ids}
        return {t: top[p] for t, p in pieces.items() if p in top}

    # ---- lifetime ------------------------------------------------------------------------------------

    def engine_record(self) -> dict:
        """What the evidence record says about the engine: which server, its model id, and per completion
        request how many prompt tokens it served from its cache (where the server reports it)."""
        info = self.info
        computed = [r.get("computed_tokens") for r in self.requests]
        return {
            "url": info.url, "dialect": info.dialect, "server": info.server, "model_id": info.model_id,
            "token_prompts": info.token_prompts, "cache_prompt": self.cache_prompt,
            **({"slot": self.slot} if self.slot is not None else {}),
            "model_sha256_of": "the model id the server reports (the server does not expose its weights' hash)",
            "requests": [dict(r) for r in self.requests],
            "prompt_tokens_computed": sum(computed) if computed and None not in computed else None,
        }

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> "ServerBackend":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _image_refusal(d, url: str) -> str:
    """Why an image question cannot go through this server, naming what it lacks. The model on the server is
    the one that should see the image (Med-RwR is a vision-language model); answering without showing it would
    look like an answer about the image, so the question is refused rather than answered blind."""
    if isinstance(d, LlamaCppDialect):
        lacks = ("its /completion takes images only with a text prompt (multimodal_data), not with the token-id "
                 "prompts this runtime sends" if getattr(d, "vision", False) else
                 "its model has no vision input (no --mmproj), and its /completion takes images only with a text "
                 "prompt, not with the token-id prompts this runtime sends")
    elif d.server == "vLLM":
        lacks = "its /v1/completions has no image input (vLLM takes images in chat requests only)"
    else:
        lacks = "its /v1/completions has no image input"
    return (f"the inference server at {url} ({d.server}) cannot be shown images: {lacks}; ask without the image, "
            "or without {engine} (in-process)")  # {engine}: the setting, as each front end names it


def _id_sha256(server: str, model_id: str) -> str:
    import hashlib

    return hashlib.sha256(f"{server}|{model_id}".encode("utf-8")).hexdigest()
