"""How `ServerBackend` talks to an inference server: one HTTP client, and one dialect per kind of server.

  llama.cpp   `GET /props` answers. `POST /completion` with a token-id prompt, `cache_prompt`, `id_slot`, `n_probs`,
              `return_tokens`; `/tokenize`, `/detokenize`; cache counters from `timings.cache_n` / `tokens_cached`
              and `timings.prompt_n`. Implemented from the server's documented API; NOT tested here (no C++ server
              on this machine).
  openai      `GET /v1/models` answers. `POST /v1/completions` with `logprobs`. Token-id prompts where the server
              takes them (vLLM: probed by a 1-token request), else the text of the sequence (llama-cpp-python's
              `llama_cpp.server`, tested here). Tokenizer: vLLM `/tokenize` {prompt}, llama-cpp-python `/tokenize`
              {input} (or `/extras/tokenize`). Cache counters: vLLM's `usage.prompt_tokens_details.cached_tokens`.

A dialect streams `Token`s (id where the server names it, text, p at temperature 1, top-k) and fills a `StreamEnd`
(why it stopped, the server's prompt/cache counters). It is never given stop strings: `ServerBackend` cuts.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional, Sequence
from urllib.parse import urlsplit

from ..errors import ModelError
from .backend import SamplingSettings

CONNECT_TIMEOUT_S = 5.0


class EngineError(ModelError):
    """The inference server is unreachable, refused a request, or broke off an answer."""


class EngineTimeout(EngineError):
    """The inference server did not answer within the timeout."""


@dataclass
class Token:
    """One streamed token: id (None when the server only gives text), its text, p(token) at temperature 1."""

    token_id: Optional[int]
    text: str
    prob: float
    top: dict = field(default_factory=dict)  # {token id or piece: probability} when asked for


@dataclass
class StreamEnd:
    reason: str  # "eos" | "length" | "stop" (the server's own) | "unknown"
    prompt_tokens: Optional[int] = None  # the prompt as the server counted it
    cached: Optional[int] = None  # prompt tokens served from the server's cache
    computed: Optional[int] = None  # prompt tokens the server computed


def _http_error(url: str, exc: Exception) -> EngineError:
    import httpx

    where = origin(url)
    if isinstance(exc, httpx.TimeoutException):
        return EngineTimeout(f"the inference server at {where} did not answer in time ({type(exc).__name__}); "
                             "it may be overloaded: raise {engine_timeout} or try again",
                             names=("engine_timeout",))
    if isinstance(exc, httpx.ConnectError):
        return EngineError(f"cannot reach the inference server at {where}: {exc or 'connection refused'}")
    if isinstance(exc, (httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError)):
        return EngineError(f"the inference server at {where} dropped the connection: {exc or type(exc).__name__}")
    return EngineError(f"inference server at {where}: {type(exc).__name__}: {exc}")


def origin(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}"


class Dialect:
    """How one kind of server is asked to tokenize and complete."""

    server = ""
    token_prompts = False
    cache_counters = False

    def __init__(self, http: "EngineHTTP"):
        self.http = http

    def tokenize(self, text: str, add_special: bool) -> list[int]: ...

    def detokenize(self, ids: Sequence[int]) -> str: ...

    def stream(self, prompt, settings: SamplingSettings, max_tokens: int, n_probs: int,
               end: "StreamEnd") -> Iterator["Token"]: ...


class LlamaCppDialect(Dialect):
    """The C++ llama.cpp server (`llama-server`): /completion, /tokenize, /detokenize, /props."""

    server = "llama.cpp server"
    token_prompts = True
    cache_counters = True

    def __init__(self, http: "EngineHTTP", props: dict, cache_prompt: bool = True, slot: Optional[int] = None):
        super().__init__(http)
        self.cache_prompt, self.slot = cache_prompt, slot
        gen = props.get("default_generation_settings") or {}
        self.n_ctx = int(gen.get("n_ctx") or (gen.get("params") or {}).get("n_ctx") or 0)
        self.model_path = str(props.get("model_path") or "")
        self.vision = bool((props.get("modalities") or {}).get("vision"))
        self.total_slots = int(props.get("total_slots") or 1)

    def tokenize(self, text: str, add_special: bool) -> list[int]:
        out = self.http.post("/tokenize", {"content": text, "add_special": add_special, "parse_special": True})
        return [int(t if not isinstance(t, dict) else t["id"]) for t in out["tokens"]]

    def detokenize(self, ids: Sequence[int]) -> str:
        return str(self.http.post("/detokenize", {"tokens": list(ids)}).get("content", ""))

    def stream(self, prompt, settings, max_tokens, n_probs, end):
        body = {
            "prompt": prompt,
            "n_predict": max_tokens,
            "stream": True,
            "cache_prompt": self.cache_prompt,
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
        if self.slot is not None:
            body["id_slot"] = self.slot
        decoder = _Utf8()
        for chunk in self.http.sse("/completion", body):
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
                yield Token(tid, text, prob, top)
            if chunk.get("stop"):
                stop_type = chunk.get("stop_type") or ""
                end.reason = {"eos": "eos", "limit": "length", "word": "stop"}.get(stop_type, "unknown")
                timings = chunk.get("timings") or {}
                end.computed = _int(timings.get("prompt_n"))
                end.cached = _int(timings.get("cache_n", chunk.get("tokens_cached")))
                evaluated = _int(chunk.get("tokens_evaluated"))
                end.prompt_tokens = evaluated if evaluated is not None else None
                return


class OpenAIDialect(Dialect):
    """`/v1/completions` (vLLM, llama-cpp-python's `llama_cpp.server`, other OpenAI-compatible servers)."""

    def __init__(self, http: "EngineHTTP", models: dict):
        super().__init__(http)
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
                body = {field_: "a", **({"add_special_tokens": False} if field_ == "prompt" else {})}
                out = self.http.post(route, body)
            except EngineError:
                continue
            if isinstance(out, dict) and isinstance(out.get("tokens"), list):
                if field_ == "input" and self.server != "vLLM":
                    self.server = "llama-cpp-python"
                return route, field_, detok
        raise EngineError(f"the inference server at {origin(self.http.url)} offers no tokenizer endpoint (/tokenize): "
                          "the loop needs token counts to fit retrieved documents and roll back")

    def _probe_bos(self) -> list[int]:
        """llama-cpp-python's /tokenize adds the model's BOS; the contract's tokenize() must not."""
        if self._tok_field == "prompt":
            return []
        return self._raw_tokenize("")[:1]

    def _probe_token_prompts(self) -> bool:
        ids = self.tokenize("Hi", add_special=True)
        try:
            self.http.post("/v1/completions", {"model": self.model_id, "prompt": ids, "max_tokens": 1,
                                               "temperature": 0.0})
            return True
        except EngineError:
            return False

    def _raw_tokenize(self, text: str, add_special: bool = False) -> list[int]:
        body: dict[str, Any] = {self._tok_field: text}
        if self._tok_field == "prompt":
            body["add_special_tokens"] = add_special
        if self.model_id:
            body["model"] = self.model_id
        return [int(t) for t in self.http.post(self._tok_route, body)["tokens"]]

    def tokenize(self, text: str, add_special: bool) -> list[int]:
        ids = self._raw_tokenize(text, add_special)
        if self.bos and not add_special and ids[:1] == self.bos:
            ids = ids[1:]  # this server always adds the BOS: drop it where the contract wants none
        return ids

    def detokenize(self, ids: Sequence[int]) -> str:
        route = self._tok_route.replace("tokenize", "detokenize")
        out = self.http.post(route, {"tokens": list(ids), **({"model": self.model_id} if self.model_id else {})})
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
        for chunk in self.http.sse("/v1/completions", body):
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
                    yield Token(tid, piece, math.exp(lp_i) if lp_i is not None else float("nan"), top)
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


def probe(http: "EngineHTTP", cache_prompt: bool = True, slot: Optional[int] = None) -> Dialect:
    """Which kind of server answers at http.url: llama.cpp (GET /props) or OpenAI-style (GET /v1/models)."""
    props = http.get("/props")
    if isinstance(props, dict) and "default_generation_settings" in props:
        d = LlamaCppDialect(http, props, cache_prompt, slot)
        models = http.get("/v1/models")
        data = (models or {}).get("data") or [{}] if isinstance(models, dict) else [{}]
        d.model_id = str(data[0].get("id") or d.model_path.rsplit("/", 1)[-1])
        return d
    models = http.get("/v1/models")
    if isinstance(models, dict) and models.get("data"):
        return OpenAIDialect(http, models)
    raise EngineError(f"{origin(http.url)} answers HTTP but is neither a llama.cpp server (/props) nor an "
                      "OpenAI-style completion server (/v1/models)")


class EngineHTTP:
    """The one HTTP client to the server at `url` (no proxy from the environment: only that host is contacted)."""

    def __init__(self, url: str, timeout: float, api_key: Optional[str] = None):
        import httpx

        self.url = url
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._client = httpx.Client(base_url=url, headers=headers, trust_env=False,
                                    timeout=httpx.Timeout(timeout, connect=min(timeout, CONNECT_TIMEOUT_S)))

    def get(self, path: str):
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

    def post(self, path: str, body: dict):
        import httpx

        try:
            r = self._client.post(path, json=body)
        except httpx.HTTPError as e:
            raise _http_error(self.url, e) from None
        if r.status_code != 200:
            raise EngineError(f"the inference server refused {path}: HTTP {r.status_code} {brief(r.text)}")
        try:
            return r.json()
        except ValueError:
            raise EngineError(f"the inference server sent {path} a reply that is not JSON") from None

    def sse(self, path: str, body: dict) -> Iterator[dict]:
        """The JSON objects of a server-sent-events response, as they arrive. Closing the generator closes the
        connection: the server stops generating for this request."""
        import httpx

        try:
            with self._client.stream("POST", path, json=body) as r:
                if r.status_code != 200:
                    r.read()
                    raise EngineError(f"the inference server refused {path}: HTTP {r.status_code} {brief(r.text)}")
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
                        raise EngineError("the inference server failed during generation: "
                                          f"{brief(str(chunk['error']))}")
                    yield chunk
                    if isinstance(chunk, dict) and chunk.get("stop") is True:
                        done = True  # llama.cpp's last event
                        break
                if not done:
                    raise EngineError(f"the inference server at {origin(self.url)} ended the answer stream early "
                                      "(connection closed mid-generation)")
        except httpx.HTTPError as e:
            raise _http_error(self.url, e) from None

    def close(self) -> None:
        self._client.close()


def brief(text: str, limit: int = 200) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[:limit] + "…"
