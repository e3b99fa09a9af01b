"""`ServerBackend`: the `runtime.backend.Backend` contract over HTTP, against an inference server.

Only token generation moves to the server; packs, evidence, reports and logs stay here. The sequence (what the
in-process backend keeps in its KV cache) lives in this object as token ids and text. Every `generate()` sends the
WHOLE sequence as the prompt; the server compares it with what its cache holds and computes only the new suffix
(llama.cpp server: `cache_prompt` on a slot; vLLM: automatic prefix caching; llama-cpp-python: its one context's
prefix match). So splicing a retrieve block is "previous prompt + generated text + block" — a cache hit, not a
re-encode — and a rollback (CDIR) is simply a shorter prompt next time, still a hit.

Two dialects, chosen by probing the server once:

  llama.cpp   `GET /props` answers. `POST /completion` with a token-id prompt, `cache_prompt`, `id_slot`, `n_probs`,
              `return_tokens`; `/tokenize`, `/detokenize`; cache counters from `timings.cache_n` / `tokens_cached`
              and `timings.prompt_n`. Implemented from the server's documented API; NOT tested here (no C++ server
              on this machine).
  openai      `GET /v1/models` answers. `POST /v1/completions` with `logprobs`. Token-id prompts where the server
              takes them (vLLM: probed by a 1-token request), else the text of the sequence (llama-cpp-python's
              `llama_cpp.server`, tested here). Tokenizer: vLLM `/tokenize` {prompt}, llama-cpp-python `/tokenize`
              {input} (or `/extras/tokenize` in older versions). Cache counters: vLLM's
              `usage.prompt_tokens_details.cached_tokens` when it reports them.

Stop strings are applied HERE, on the streamed tokens, with the in-process backend's exact-cut rule (the sequence
ends exactly at `</query>`; a token that ran past it is replaced by the tokenization of the rest up to the stop
string), and the stream is closed at the hit. The server is not given the stop strings: each engine cuts text its
own way (llama.cpp and llama-cpp-python drop the stop word, vLLM keeps or drops it by a flag), and we need one rule.

Exact identity with the in-process backend needs token-id prompts: with a text prompt the server re-tokenizes the
whole sequence, and where a BPE merge spans a splice point (e.g. `</query>` + "\n") its tokens differ from the
loop's. Each request records whether the server's prompt token count matched ours (`requests[*].prompt_tokens_match`).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Optional, Sequence
from urllib.parse import urlsplit

from ..errors import InputError, ModelError
from .backend import BackendInfo, BackendStats, Generation, GeneratedToken, ImageInput, PromptPart, SamplingSettings
from .llama_backend import _first_stop, _partial_stop_len

DEFAULT_TIMEOUT_S = 120.0  # seconds without a byte from the server before a request is given up
CONNECT_TIMEOUT_S = 5.0
TOP_PROBS = 20  # top-k logprobs asked for by next_token_probs (vLLM's default --max-logprobs is 20)


class EngineError(ModelError):
    """The inference server is unreachable, refused a request, or broke off an answer."""


class EngineTimeout(EngineError):
    """The inference server did not answer within the timeout."""


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
class _Token:
    """One streamed token: id (None when the server only gives text), its text, p(token) at temperature 1."""

    token_id: Optional[int]
    text: str
    prob: float
    top: dict = field(default_factory=dict)  # {token id or piece: probability} when asked for


@dataclass
class _StreamEnd:
    reason: str  # "eos" | "length" | "stop" (the server's own) | "unknown"
    prompt_tokens: Optional[int] = None  # the prompt as the server counted it
    cached: Optional[int] = None  # prompt tokens served from the server's cache
    computed: Optional[int] = None  # prompt tokens the server computed


@dataclass
class _Segment:
    """A run of the sequence: the prompt, an appended text, one generated token, or a stop-string tail."""

    ids: list  # token ids (an entry is None where the server gave only text)
    text: str


def _http_error(url: str, exc: Exception) -> EngineError:
    import httpx

    where = _origin(url)
    if isinstance(exc, httpx.TimeoutException):
        return EngineTimeout(f"the inference server at {where} did not answer in time ({type(exc).__name__}); "
                             "it may be overloaded: raise --engine-timeout or try again")
    if isinstance(exc, httpx.ConnectError):
        return EngineError(f"cannot reach the inference server at {where}: {exc or 'connection refused'}")
    if isinstance(exc, (httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError)):
        return EngineError(f"the inference server at {where} dropped the connection: {exc or type(exc).__name__}")
    return EngineError(f"inference server at {where}: {type(exc).__name__}: {exc}")


def _origin(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}"


class _Dialect:
    """How one kind of server is asked to tokenize and complete."""

    server = ""
    token_prompts = False
    cache_counters = False

    def __init__(self, backend: "ServerBackend"):
        self.be = backend

    def tokenize(self, text: str, add_special: bool) -> list[int]: ...

    def detokenize(self, ids: Sequence[int]) -> str: ...

    def stream(self, prompt, settings: SamplingSettings, max_tokens: int, n_probs: int,
               end: _StreamEnd) -> Iterator[_Token]: ...


class _LlamaCpp(_Dialect):
    """The C++ llama.cpp server (`llama-server`): /completion, /tokenize, /detokenize, /props."""

    server = "llama.cpp server"
    token_prompts = True
    cache_counters = True

    def __init__(self, backend: "ServerBackend", props: dict):
        super().__init__(backend)
        gen = props.get("default_generation_settings") or {}
        self.n_ctx = int(gen.get("n_ctx") or (gen.get("params") or {}).get("n_ctx") or 0)
        self.model_path = str(props.get("model_path") or "")
        self.vision = bool((props.get("modalities") or {}).get("vision"))
        self.total_slots = int(props.get("total_slots") or 1)

    def tokenize(self, text: str, add_special: bool) -> list[int]:
        out = self.be._post("/tokenize", {"content": text, "add_special": add_special, "parse_special": True})
        return [int(t if not isinstance(t, dict) else t["id"]) for t in out["tokens"]]

    def detokenize(self, ids: Sequence[int]) -> str:
        return str(self.be._post("/detokenize", {"tokens": list(ids)}).get("content", ""))

    def stream(self, prompt, settings, max_tokens, n_probs, end):
        body = {
            "prompt": prompt,
            "n_predict": max_tokens,
            "stream": True,
            "cache_prompt": self.be.cache_prompt,
            "return_tokens": True,
            "n_probs": n_probs,
            "post_sampling_probs": False,  # softmax of the raw logits, as the in-process backend reports
            "seed": settings.seed,
            **_plain_sampling(settings),
            # The loop's sampling only: switch off everything llama.cpp adds by default.
            "min_p": 0.0, "typical_p": 1.0, "repeat_penalty": 1.0, "repeat_last_n": 0, "presence_penalty": 0.0,
            "frequency_penalty": 0.0, "dry_multiplier": 0.0, "xtc_probability": 0.0, "mirostat": 0,
            "samplers": ["top_k", "top_p", "temperature"],
        }
        if self.be.slot is not None:
            body["id_slot"] = self.be.slot
        decoder = _Utf8()
        for chunk in self.be._sse("/completion", body):
            ids = [int(t) for t in chunk.get("tokens") or []]
            probs = chunk.get("probs") or chunk.get("completion_probabilities") or []
            for i, tid in enumerate(ids):
                p = probs[i] if i < len(probs) else {}
                raw = bytes(p["bytes"]) if p.get("bytes") is not None else None
                # Without per-token bytes the chunk's text goes to its last token (exact text for the stop cut).
                text = decoder.feed(raw) if raw is not None else (
                    chunk.get("content", "") if i == len(ids) - 1 else "")
                top = {int(t["id"]): math.exp(t["logprob"]) for t in p.get("top_logprobs") or [] if "id" in t}
                prob = math.exp(p["logprob"]) if "logprob" in p else top.get(tid, float("nan"))
                yield _Token(tid, text, prob, top)
            if chunk.get("stop"):
                stop_type = chunk.get("stop_type") or ""
                end.reason = {"eos": "eos", "limit": "length", "word": "stop"}.get(stop_type, "unknown")
                timings = chunk.get("timings") or {}
                end.computed = _int(timings.get("prompt_n"))
                end.cached = _int(timings.get("cache_n", chunk.get("tokens_cached")))
                evaluated = _int(chunk.get("tokens_evaluated"))
                end.prompt_tokens = evaluated if evaluated is not None else None
                return


class _OpenAI(_Dialect):
    """`/v1/completions` (vLLM, llama-cpp-python's `llama_cpp.server`, other OpenAI-compatible servers)."""

    def __init__(self, backend: "ServerBackend", models: dict):
        super().__init__(backend)
        data = (models.get("data") or [{}])[0]
        self.model_id = str(data.get("id") or "")
        self.n_ctx = int(data.get("max_model_len") or 0)  # vLLM says; llama-cpp-python does not
        owner = str(data.get("owned_by") or "")
        self.server = "vLLM" if owner == "vllm" else "openai-compatible"
        self._tok_route, self._tok_field, self._detok_field = self._probe_tokenizer()
        self.bos = self._probe_bos()
        self.token_prompts = self._probe_token_prompts()
        self.cache_counters = self.server == "vLLM"

    def _probe_tokenizer(self) -> tuple[str, str, str]:
        for route, field_, detok in (("/tokenize", "prompt", "prompt"), ("/tokenize", "input", "text"),
                                     ("/extras/tokenize", "input", "text")):
            try:
                out = self.be._post(route, {field_: "a", **({"add_special_tokens": False} if field_ == "prompt" else {})},
                                    quiet=True)
            except EngineError:
                continue
            if isinstance(out, dict) and isinstance(out.get("tokens"), list):
                if field_ == "input" and self.server != "vLLM":
                    self.server = "llama-cpp-python"
                return route, field_, detok
        raise EngineError(f"the inference server at {_origin(self.be.url)} offers no tokenizer endpoint (/tokenize): "
                          "the loop needs token counts to fit retrieved documents and roll back")

    def _probe_bos(self) -> list[int]:
        """llama-cpp-python's /tokenize adds the model's BOS; the contract's tokenize() must not."""
        if self._tok_field == "prompt":
            return []
        return self._raw_tokenize("")[:1]

    def _probe_token_prompts(self) -> bool:
        ids = self.tokenize("Hi", add_special=True)
        try:
            self.be._post("/v1/completions", {"model": self.model_id, "prompt": ids, "max_tokens": 1,
                                              "temperature": 0.0}, quiet=True)
            return True
        except EngineError:
            return False

    def _raw_tokenize(self, text: str, add_special: bool = False) -> list[int]:
        body: dict[str, Any] = {self._tok_field: text}
        if self._tok_field == "prompt":
            body["add_special_tokens"] = add_special
        if self.model_id:
            body["model"] = self.model_id
        return [int(t) for t in self.be._post(self._tok_route, body)["tokens"]]

    def tokenize(self, text: str, add_special: bool) -> list[int]:
        ids = self._raw_tokenize(text, add_special)
        if self.bos and not add_special and ids[:1] == self.bos:
            ids = ids[1:]  # this server always adds the BOS: drop it where the contract wants none
        return ids

    def detokenize(self, ids: Sequence[int]) -> str:
        route = self._tok_route.replace("tokenize", "detokenize")
        out = self.be._post(route, {"tokens": list(ids), **({"model": self.model_id} if self.model_id else {})})
        return str(out.get(self._detok_field, out.get("text", out.get("prompt", ""))))

    def stream(self, prompt, settings, max_tokens, n_probs, end):
        body = {
            "model": self.model_id,
            "prompt": prompt,
            "max_tokens": max_tokens,
            "stream": True,
            "logprobs": max(1, n_probs),
            "seed": settings.seed,
            **_plain_sampling(settings),
            "min_p": 0.0, "presence_penalty": 0.0, "frequency_penalty": 0.0,
            "repeat_penalty": 1.0,  # llama-cpp-python (default 1.1)
            "repetition_penalty": 1.0,  # vLLM
        }
        if self.server == "vLLM":
            body["return_tokens_as_token_ids"] = True  # logprobs name tokens "token_id:N": exact ids
            body["stream_options"] = {"include_usage": True}
        for chunk in self.be._sse("/v1/completions", body):
            usage = chunk.get("usage")
            if usage:
                end.prompt_tokens = _int(usage.get("prompt_tokens"))
                end.cached = _int((usage.get("prompt_tokens_details") or {}).get("cached_tokens"))
                if end.cached is not None and end.prompt_tokens is not None:
                    end.computed = end.prompt_tokens - end.cached
            for choice in chunk.get("choices") or []:
                lp = choice.get("logprobs") or {}
                names = lp.get("tokens") or []
                lps = lp.get("token_logprobs") or []
                tops = lp.get("top_logprobs") or []
                text = choice.get("text") or ""
                if not names and text:
                    names, lps = [text], [None]
                for i, name in enumerate(names):
                    tid = _token_id(name)
                    top = {(_token_id(k) if _token_id(k) is not None else k): math.exp(v)
                           for k, v in ((tops[i] if i < len(tops) and tops[i] else {}).items())}
                    lp_i = lps[i] if i < len(lps) else None
                    # The piece: the chunk's text when it carries one token (partial UTF-8 held back by the
                    # server comes with a later token). A chunk of several tokens named by id (vLLM with a stream
                    # interval) gives its whole text to its last token, so the text stays exact for the stop cut.
                    if len(names) == 1:
                        piece = text
                    elif tid is None:
                        piece = name
                    else:
                        piece = text if i == len(names) - 1 else ""
                    yield _Token(tid, piece, math.exp(lp_i) if lp_i is not None else float("nan"), top)
                if choice.get("finish_reason"):
                    # No stop strings are sent, so "stop" is the end of turn.
                    end.reason = {"stop": "eos", "length": "length"}.get(choice["finish_reason"], "unknown")
        return


def _plain_sampling(s: SamplingSettings) -> dict:
    return {"temperature": float(s.temperature), "top_p": float(s.top_p), "top_k": int(s.top_k)}


def _token_id(name) -> Optional[int]:
    if isinstance(name, str) and name.startswith("token_id:"):
        try:
            return int(name[len("token_id:"):])
        except ValueError:
            return None
    return None


def _int(v) -> Optional[int]:
    try:
        return None if v is None else int(v)
    except (TypeError, ValueError):
        return None


class _Utf8:
    """Incremental UTF-8 decoding of token bytes (a character may span tokens)."""

    def __init__(self):
        import codecs

        self._dec = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def feed(self, data: bytes) -> str:
        return self._dec.decode(data)


class ServerBackend:
    """The Backend contract against an inference server at `url`. See the module docstring."""

    def __init__(self, url: str, *, timeout: float = DEFAULT_TIMEOUT_S, n_ctx: Optional[int] = None,
                 cache_prompt: bool = True, slot: Optional[int] = None, api_key: Optional[str] = None):
        try:
            import httpx
        except ImportError:
            raise InputError("--engine needs httpx: pip install httpx (or the package's serve extra)") from None
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise InputError(f"--engine {url!r} is not an http(s):// URL of an inference server")
        self.url = url.rstrip("/")
        self.cache_prompt = cache_prompt
        self.slot = slot
        self.timeout = timeout
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        # trust_env=False: no proxy from the environment; the only host contacted is the one the user named.
        self._client = httpx.Client(base_url=self.url, headers=headers, trust_env=False,
                                    timeout=httpx.Timeout(timeout, connect=min(timeout, CONNECT_TIMEOUT_S)))
        try:
            self._dialect = self._probe()
        except BaseException:
            self._client.close()
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
        if getattr(d, "vision", False):
            notes.append("the llama.cpp server's model takes images (--mmproj), but /completion carries them only with "
                         "a text prompt (multimodal_data), not with the token-id prompts this backend sends: images "
                         "are not shown to the model through --engine")
        if not d.cache_counters:
            notes.append(f"the inference server ({d.server}) does not report prompt tokens served from its cache")
        model_id = getattr(d, "model_id", "") or getattr(d, "model_path", "").rsplit("/", 1)[-1]
        self.info = EngineInfo(
            # The server does not expose its weights' hash: the record's sha256 is of the model id it reports
            # (engine_record says so), so replay can tell a different model by name, not by bytes.
            name=f"server:{d.server}", model_path=model_id, model_sha256=_id_sha256(d.server, model_id), has_vision=False, n_ctx=ctx,
            device="server", notes=notes, url=_origin(self.url), dialect="llama.cpp" if isinstance(d, _LlamaCpp)
            else "openai", server=d.server, model_id=model_id, token_prompts=d.token_prompts,
            cache_counters=d.cache_counters,
        )
        self.stats = BackendStats()
        self.requests: list[dict] = []  # one entry per completion request of the current sequence
        self._segs: list[_Segment] = []
        self._n = 0

    # ---- HTTP ------------------------------------------------------------------------------------------

    def _probe(self) -> _Dialect:
        props = self._get("/props")
        if isinstance(props, dict) and "default_generation_settings" in props:
            d = _LlamaCpp(self, props)
            models = self._get("/v1/models")
            data = (models or {}).get("data") or [{}] if isinstance(models, dict) else [{}]
            d.model_id = str(data[0].get("id") or d.model_path.rsplit("/", 1)[-1])
            return d
        models = self._get("/v1/models")
        if isinstance(models, dict) and models.get("data"):
            return _OpenAI(self, models)
        raise EngineError(f"{_origin(self.url)} answers HTTP but is neither a llama.cpp server (/props) nor an "
                          "OpenAI-style completion server (/v1/models)")

    def _get(self, path: str):
        import httpx

        try:
            r = self._client.get(path)
        except httpx.HTTPError as e:
            raise _http_error(self.url, e) from None
        if r.status_code != 200:
            return None
        try:
            return r.json()
        except ValueError:
            return None

    def _post(self, path: str, body: dict, quiet: bool = False):
        import httpx

        try:
            r = self._client.post(path, json=body)
        except httpx.HTTPError as e:
            raise _http_error(self.url, e) from None
        if r.status_code != 200:
            raise EngineError(f"the inference server refused {path}: HTTP {r.status_code} {_brief(r.text)}")
        try:
            return r.json()
        except ValueError:
            raise EngineError(f"the inference server sent {path} a reply that is not JSON") from None

    def _sse(self, path: str, body: dict) -> Iterator[dict]:
        """The JSON objects of a server-sent-events response, as they arrive. Closing the generator closes the
        connection: the server stops generating for this request."""
        import httpx

        try:
            with self._client.stream("POST", path, json=body) as r:
                if r.status_code != 200:
                    r.read()
                    raise EngineError(f"the inference server refused {path}: HTTP {r.status_code} {_brief(r.text)}")
                done = False
                for line in r.iter_lines():
                    if not line.startswith("data:"):
                        continue
                    data = line[5:].strip()
                    if data == "[DONE]":
                        done = True
                        break
                    try:
                        chunk = json.loads(data)
                    except ValueError:
                        raise EngineError(f"the inference server sent a malformed event on {path}") from None
                    if isinstance(chunk, dict) and chunk.get("error"):
                        raise EngineError(f"the inference server failed during generation: {_brief(str(chunk['error']))}")
                    yield chunk
                    if isinstance(chunk, dict) and chunk.get("stop") is True:
                        done = True  # llama.cpp's last event
                        break
                if not done:
                    raise EngineError(f"the inference server at {_origin(self.url)} ended the answer stream early "
                                      "(connection closed mid-generation)")
        except httpx.HTTPError as e:
            raise _http_error(self.url, e) from None

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
            raise ModelError(f"the inference server ({self._dialect.server}) takes no images through this backend: "
                             "its completion API has no image input that the Med-RwR prompt can use")
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
        stops = [s for s in stop if s]
        max_stop = max((len(s) for s in stops), default=0)
        room = self.info.n_ctx - self._n
        if room <= 0:
            return Generation("", [], "context", seconds=0.0)
        max_new = min(settings.max_tokens, room)
        kept: list[GeneratedToken] = []
        kept_ids: list = []
        text, streamed = "", 0
        stop_reason, stop_hit, overshoot, tail = "length", None, 0, ""
        end = _StreamEnd("unknown")
        prompt_len = self._n
        prompt = self._prompt()
        stream = self._dialect.stream(prompt, settings, max_new, 1, end)
        try:
            for tok in stream:
                search_from = max(0, len(text) - max_stop + 1)
                candidate = text + tok.text
                hit = _first_stop(candidate, stops, search_from) if stops else None
                if hit is None:
                    kept.append(GeneratedToken(tok.token_id if tok.token_id is not None else -1, tok.text, tok.prob))
                    kept_ids.append(tok.token_id)
                    text = candidate
                else:
                    stop_hit, cut = hit
                    stop_reason = "stop"
                    target = candidate[:cut]
                    if candidate == target:  # the stop string ends exactly at this token's end
                        kept.append(GeneratedToken(tok.token_id if tok.token_id is not None else -1, tok.text,
                                                   tok.prob))
                        kept_ids.append(tok.token_id)
                    else:
                        overshoot = len(candidate) - cut
                        tail = target[len(text):]
                    text = target
                    break
                safe = len(text) - _partial_stop_len(text, stops)
                if on_piece is not None and safe > streamed:
                    on_piece(text[streamed:safe])
                    streamed = safe
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
        if on_piece is not None and len(text) > streamed:
            on_piece(text[streamed:])
        seconds = time.perf_counter() - t0
        self.stats.generate_seconds += seconds
        self._note_request(prompt, prompt_len, end, len(kept))
        return Generation(text=text, tokens=kept, stop_reason=stop_reason, stop_string=stop_hit,
                          overshoot_chars=overshoot, seconds=seconds)

    def _drop_eos(self, end: _StreamEnd, kept: list, kept_ids: list) -> None:
        """llama.cpp streams the end-of-turn token itself (empty text) before stopping; the in-process backend
        never keeps it, so neither do we."""
        if isinstance(self._dialect, _LlamaCpp) and end.reason == "eos" and kept and kept[-1].piece == "":
            kept.pop()
            kept_ids.pop()

    def _note_request(self, prompt, prompt_len: int, end: _StreamEnd, generated: int) -> None:
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
        end = _StreamEnd("unknown")
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
            "model_sha256_of": "the model id the server reports (the server does not expose its weights' hash)",
            "requests": [dict(r) for r in self.requests],
            "prompt_tokens_computed": sum(computed) if computed and None not in computed else None,
        }

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> "ServerBackend":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _id_sha256(server: str, model_id: str) -> str:
    import hashlib

    return hashlib.sha256(f"{server}|{model_id}".encode("utf-8")).hexdigest()


def _brief(text: str, limit: int = 200) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[:limit] + "…"
