"""`LlamaBackend`: the text-only llama.cpp implementation of `runtime.backend.Backend`.

One sequence lives in the KV cache for one assistant turn. The prompt is decoded once (`prefill`); retrieved
documents are decoded after the current position (`append_text`), so the prompt is never re-encoded; a tail can
be dropped (`rollback`) or the whole sequence snapshotted (`save_state` / `restore_state`).

Sampling happens here in numpy on the raw logits so that every sampled token carries the probability the model
gave it (softmax at temperature 1) — the loop's answer confidence — and so greedy decoding is bit-reproducible.

A multimodal backend can subclass this one: `prefill` hands each part to `_decode_part`, and
`_decode_embeddings` decodes image embeddings into the same sequence.
"""

from __future__ import annotations

import codecs
import os
import struct
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np

from medrwr_edge.errors import InputError, ModelError
from medrwr_edge.paths import sha256_file
from medrwr_edge.runtime import llama_native
from medrwr_edge.runtime.backend import (
    BackendInfo,
    BackendStats,
    Generation,
    GeneratedToken,
    ImageInput,
    PromptPart,
    SamplingSettings,
)
from medrwr_edge.runtime.speculative import MODES as SPECULATIVE_MODES
from medrwr_edge.runtime.speculative import DraftLength, DraftModel, lookup_draft
from medrwr_edge.runtime.stops import StopCut


class ContextFullError(InputError):
    """The text to decode does not fit in the model's context window."""


class _LlamaInfo(BackendInfo):
    """BackendInfo whose model_sha256 is computed on first read (hashing a 1 GB GGUF takes seconds)."""

    _sha256: Optional[str] = None

    @property
    def model_sha256(self) -> str:  # type: ignore[override]
        if self._sha256 is None:
            self._sha256 = sha256_file(self.model_path)
        return self._sha256

    @model_sha256.setter
    def model_sha256(self, value: str) -> None:
        self._sha256 = value or None


# Tokens whose logit is this far below the maximum carry < e^-30 of the mass each; top-p skips sorting them.
_TOP_P_LOGIT_WINDOW = 30.0
_STATE_MAGIC = b"MRWRKV1\0"
PROTOCOL_METADATA_KEY = "medrwr.protocol"  # "native" in a GGUF trained on the Med-RwR protocol


class PrefixCache:
    """KV states of system prompts, on disk, keyed by everything that decides their bytes (see `key`) + the prompt
    tokens. A few MB each; the newest `keep` are kept. A damaged or foreign file is detected by restore_state()
    and recomputed."""

    def __init__(self, directory, keep: int = 16):
        from pathlib import Path

        self.dir = Path(directory)
        self.keep = keep

    @staticmethod
    def key(identity: dict, tokens: Sequence[int]) -> str:
        """`identity`: model sha256, device and GPU offload, context size, n_batch/n_ubatch, flash attention, KV
        type, llama.cpp build id (`LlamaBackend.kv_identity`). A state saved by a GPU run, another batch
        size or another build would restore fine yet differ in the last bits: it must never be found."""
        import hashlib
        import json

        h = hashlib.sha256(json.dumps(identity, sort_keys=True).encode())
        h.update(np.asarray(tokens, dtype="<i4").tobytes())
        return h.hexdigest()

    def load(self, key: str) -> Optional[bytes]:
        try:
            return (self.dir / f"{key}.kv").read_bytes()
        except OSError:
            return None

    def store(self, key: str, state: bytes) -> None:
        from medrwr_edge.paths import atomic_write_bytes

        try:
            atomic_write_bytes(self.dir / f"{key}.kv", state)
            entries = sorted(self.dir.glob("*.kv"), key=lambda p: p.stat().st_mtime, reverse=True)
            for old in entries[self.keep :]:
                old.unlink(missing_ok=True)
        except OSError:
            pass  # a read-only data directory only costs the prefill next time


def _gpu_device_name() -> str:
    info = llama_native.system_info().upper()
    for key, name in (("CUDA", "cuda"), ("METAL", "metal"), ("VULKAN", "vulkan"), ("HIP", "rocm"), ("SYCL", "sycl")):
        if key in info:
            return name
    return "gpu"


class LlamaBackend:
    """A GGUF model run by llama.cpp: text in, tokens out (`QwenVLBackend` adds the images). See
    `runtime.backend.Backend` for the contract."""

    def __init__(
        self,
        model_path: str | os.PathLike,
        *,
        n_ctx: int = 8192,
        n_batch: int = 512,
        n_threads: Optional[int] = None,
        gpu_layers: int = 0,
        seed: int = 0,
        sha256: Optional[str] = None,
        flash_attn: bool = False,
        prefix_cache_dir: Optional[str] = None,
        n_ubatch: Optional[int] = None,
        speculative: str = "off",
        draft_model: Optional[str | os.PathLike] = None,
        n_draft: int = 8,
        adaptive_draft: bool = True,
    ):
        if speculative not in SPECULATIVE_MODES:
            raise InputError(f"speculative must be one of {', '.join(SPECULATIVE_MODES)}, not {speculative!r}")
        if speculative == "draft" and draft_model is None:
            raise InputError("speculative 'draft' needs a draft model (a small GGUF with the same tokenizer)")
        notes: list[str] = []
        device = "cpu"
        if gpu_layers != 0:  # -1 = every layer, as in llama.cpp
            if llama_native.supports_gpu_offload():
                device = _gpu_device_name()
            else:
                notes.append("GPU offload requested but this llama.cpp build is CPU-only; ran on CPU")
                gpu_layers = 0
        self._model = llama_native.NativeModel(model_path, gpu_layers=gpu_layers)
        facts = self._model.facts
        if facts.n_ctx_train and n_ctx > facts.n_ctx_train:
            notes.append(f"n_ctx {n_ctx} capped at the model's training context {facts.n_ctx_train}")
            n_ctx = facts.n_ctx_train
        self.n_threads = n_threads or llama_native.physical_cores()
        try:
            self._ctx = llama_native.NativeContext(
                self._model, n_ctx, n_batch, self.n_threads, flash_attn, n_ubatch=n_ubatch
            )
        except ModelError:
            self._model.close()
            raise
        # auto: prompt lookup where the model runs on a GPU, where a batch of a few tokens costs about one; plain
        # decoding on CPU, where on 2 shared cores a verification batch is compute-bound and both lookup and the
        # 0.5B draft model measured slower than plain decoding (benchmarks/bench_speculative.py, README).
        self.speculative_requested = speculative
        if speculative == "auto":
            speculative = "lookup" if device != "cpu" else "off"
        self.speculative = speculative
        self.n_draft = n_draft
        # How many tokens to draft: measured per mode (adaptive), or always n_draft.
        self._draft_len = {m: DraftLength(n_draft, adaptive=adaptive_draft) for m in ("lookup", "draft")}
        self._draft_model: Optional[DraftModel] = None
        if self.speculative == "draft":
            try:
                self._draft_model = DraftModel(draft_model, self._model, n_ctx=self._ctx.n_ctx, n_threads=self.n_threads)
            except BaseException:
                self._ctx.close()
                self._model.close()
                raise
        self.seed = seed
        self.info = _LlamaInfo(
            name="llama.cpp",
            model_path=str(self._model.path),
            model_sha256=sha256 or "",
            has_vision=False,
            n_ctx=self._ctx.n_ctx,
            device=device,
            gpu_layers=gpu_layers,
            notes=notes,
            declares_protocol=self._model.metadata(PROTOCOL_METADATA_KEY) == "native",
            build=llama_native.build_id(),
            compute={"n_batch": n_batch, "n_ubatch": n_batch, "flash_attn": bool(flash_attn),
                     "kv_type": self._ctx.kv_type},
        )
        self.stats = BackendStats()
        self._tokens: list[int] = []  # exactly what the KV cache holds, position i = self._tokens[i]
        self._logits_valid = False  # do the context's last logits belong to self._tokens[-1]?
        self._state_logits: Optional[np.ndarray] = None  # logits restored by restore_state, until the next decode
        # Next-token logits at the start of each generate pass, keyed by sequence length. A rollback to one of
        # these lengths (CDIR drops a generated answer) reuses them: re-decoding the last token alone would give
        # slightly different numbers than the batched decode that produced it, and greedy output could drift.
        self._checkpoints: dict[int, np.ndarray] = {}
        self._rng: Optional[np.random.Generator] = None
        self._rng_seed: Optional[int] = None
        self._exp_buf = np.empty(facts.n_vocab, dtype=np.float32)
        self.prefix_cache = PrefixCache(prefix_cache_dir) if prefix_cache_dir else None

    # ---- sequence management -------------------------------------------------------------------------

    def tokenize(self, text: str) -> list[int]:
        """Tokens of `text` as it would be appended (no BOS; special tokens like <|im_start|> parsed)."""
        return self._model.tokenize(text, add_special=False, parse_special=True)

    def detokenize(self, tokens: Sequence[int]) -> str:
        return b"".join(self._model.piece(t) for t in tokens).decode("utf-8", errors="replace")

    def n_tokens(self) -> int:
        return len(self._tokens)

    def tokens(self) -> list[int]:
        return list(self._tokens)

    def reset(self) -> None:
        self._clear_sequence()
        self._rng = None
        self.stats = BackendStats()

    def _clear_sequence(self) -> None:
        self._ctx.clear()
        self._tokens.clear()
        self._logits_valid = False
        self._state_logits = None
        self._checkpoints.clear()

    def prefill(self, prompt: Sequence[PromptPart]) -> int:
        if self._tokens:
            raise RuntimeError("prefill() needs an empty sequence: call reset() first")
        if isinstance(prompt, str):
            prompt = [prompt]
        if not self.info.has_vision and any(isinstance(p, ImageInput) for p in prompt):
            raise ModelError("model has no vision input")  # before anything is decoded
        t0 = time.perf_counter()
        try:
            self._prefill_parts(prompt)
        except BaseException:
            self.reset()  # never leave half a prompt in the cache (subclasses clear their own bookkeeping too)
            raise
        if not self._tokens:
            raise InputError("the prompt is empty")
        self.stats.prefill_seconds += time.perf_counter() - t0
        return len(self._tokens)

    def _prefill_parts(self, prompt: Sequence[PromptPart]) -> None:
        pending_text: list[str] = []
        for part in list(prompt) + [None]:
            if isinstance(part, str):
                pending_text.append(part)  # adjacent text parts are tokenized together (same merges as one string)
                continue
            if pending_text:
                text = "".join(pending_text)
                pending_text = []
                # BOS (if this model uses one) only at the very start of the sequence.
                tokens = self._model.tokenize(text, add_special=not self._tokens, parse_special=True)
                self._check_room(len(tokens), "prompt")
                if not self._tokens:
                    tokens = tokens[self._decode_system_prefix(tokens):]
                if tokens:
                    self._decode_tokens(tokens)
                    self.stats.prompt_tokens += len(tokens)
            if part is not None:
                self._decode_part(part)

    def _decode_system_prefix(self, tokens: list[int]) -> int:
        """Decode the system turn (tokens up to its first end-of-turn token) as a batch of its own; return its
        length. With a prefix cache its KV state is restored from disk instead of computed, which cuts the time to
        first token after model load to the user turn alone. The prompt is ALWAYS split here, cached or not, so
        both paths run the same computations and give bit-identical results (a different batch split could change
        logits in the last bits and, rarely, a greedy token)."""
        end = next((i + 1 for i, t in enumerate(tokens) if self._model.is_eog(t)), 0)
        if end == 0 or end == len(tokens):
            return 0
        prefix = tokens[:end]
        key = PrefixCache.key(self.kv_identity(), prefix) if self.prefix_cache else ""
        state = self.prefix_cache.load(key) if self.prefix_cache else None
        if state is not None:
            try:
                self.restore_state(state)
                if self._tokens == prefix:
                    self.stats.cached_prompt_tokens += len(prefix)
                    return end
            except ModelError:
                pass
            self._clear_sequence()  # unusable entry: compute it
        self._decode_tokens(prefix)
        self.stats.prompt_tokens += len(prefix)
        if self.prefix_cache:
            self.prefix_cache.store(key, self.save_state())
        return end

    def kv_identity(self) -> dict:
        """Everything that decides the bytes of a KV state (the prefix-cache key; the record's model entry)."""
        i = self.info
        return {"model_sha256": i.model_sha256, "device": i.device, "gpu_layers": i.gpu_layers, "n_ctx": i.n_ctx,
                "build": i.build, **i.compute}

    def prefill_tokens(self, tokens: Sequence[int]) -> int:
        """Prefill exact token ids (benchmarks, tests, and callers that tokenized themselves)."""
        if self._tokens:
            raise RuntimeError("prefill_tokens() needs an empty sequence: call reset() first")
        if not tokens:
            raise InputError("the prompt is empty")
        t0 = time.perf_counter()
        self._check_room(len(tokens), "prompt")
        self._decode_tokens(list(tokens))
        self.stats.prompt_tokens += len(tokens)
        self.stats.prefill_seconds += time.perf_counter() - t0
        return len(self._tokens)

    def _decode_part(self, part: PromptPart) -> None:
        """Decode one non-text prompt part; a multimodal subclass encodes images and calls _decode_embeddings."""
        if isinstance(part, ImageInput):
            raise ModelError("model has no vision input")
        raise InputError(f"unsupported prompt part: {type(part).__name__}")

    def append_text(self, text: str) -> int:
        if not self._tokens:
            raise RuntimeError("append_text() before prefill()")
        tokens = self.tokenize(text)
        if not tokens:
            return 0
        self._check_room(len(tokens), "appended text")
        self._decode_tokens(tokens)
        self.stats.inserted_tokens += len(tokens)
        return len(tokens)

    def rollback(self, n_keep: int) -> None:
        if not 0 <= n_keep <= len(self._tokens):
            raise ValueError(f"rollback({n_keep}) outside the sequence of {len(self._tokens)} tokens")
        dropped = len(self._tokens) - n_keep
        if dropped == 0:
            return
        self._ctx.remove_from(self._cache_position(n_keep))
        self._truncate(n_keep)
        self.stats.rolled_back_tokens += dropped
        self._logits_valid = False
        for length in [k for k in self._checkpoints if k > n_keep]:
            del self._checkpoints[length]
        self._state_logits = self._checkpoints.get(n_keep)

    def _cache_position(self, n_keep: int) -> int:
        """The KV-cache position where the token at index n_keep sits (text only: the same number)."""
        return n_keep

    def _truncate(self, n_keep: int) -> None:
        """Drop per-token bookkeeping past n_keep (subclasses keep more than the token list)."""
        del self._tokens[n_keep:]

    def save_state(self) -> bytes:
        """Snapshot the sequence (KV cache, token list, next-token logits) for restore_state()."""
        logits = self._current_logits() if (self._logits_valid or self._state_logits is not None) else None
        header = _STATE_MAGIC + struct.pack("<IIB", len(self._tokens), self._model.facts.n_vocab, logits is not None)
        parts = [header, np.asarray(self._tokens, dtype="<i4").tobytes()]
        if logits is not None:
            parts.append(np.asarray(logits, dtype="<f4").tobytes())
        parts.append(self._ctx.save_sequence())
        return b"".join(parts)

    def restore_state(self, data: bytes) -> None:
        head_len = len(_STATE_MAGIC) + 9
        if len(data) < head_len or not data.startswith(_STATE_MAGIC):
            raise ModelError("not a saved llama sequence state")
        n_tok, n_vocab, has_logits = struct.unpack("<IIB", data[len(_STATE_MAGIC) : head_len])
        if n_vocab != self._model.facts.n_vocab or n_tok > self._ctx.n_ctx:
            raise ModelError("the saved sequence state belongs to a different model or context size")
        off = head_len
        tokens = np.frombuffer(data, dtype="<i4", count=n_tok, offset=off).tolist()
        off += 4 * n_tok
        logits = None
        if has_logits:
            logits = np.frombuffer(data, dtype="<f4", count=n_vocab, offset=off).astype(np.float32)
            off += 4 * n_vocab
        self._ctx.restore_sequence(data[off:])
        self._tokens = tokens
        self._state_logits = logits
        self._logits_valid = False
        self._checkpoints.clear()

    def next_token_probs(self, token_ids: Sequence[int]) -> list[float]:
        """Probability of each token at the next position (softmax at temperature 1 on the raw logits, the same
        number generate() gives a sampled token). Decodes nothing unless the logits must be recomputed."""
        self._ensure_logits()
        logits = self._current_logits()
        m = float(logits.max())
        buf = self._exp_buf
        np.subtract(logits, m, out=buf)
        np.exp(buf, out=buf)
        total = float(buf.sum())
        return [float(buf[int(t)]) / total for t in token_ids]

    def last_logits(self) -> np.ndarray:
        """A copy of the next-token logits after the current sequence."""
        self._ensure_logits()
        return np.array(self._current_logits(), dtype=np.float32)

    # ---- generation ----------------------------------------------------------------------------------

    def generate(
        self,
        settings: SamplingSettings,
        stop: Sequence[str],
        on_piece: Optional[Callable[[str], None]] = None,
    ) -> Generation:
        """Sample until a stop string, end of turn (the end token is not kept), max_tokens or a full context.

        With stop_reason "stop" the text ends with the stop string and the cache holds exactly that text (a token
        that ran past it is replaced by the tokens of its piece up to the stop string). If a pass ends by length
        inside a multi-byte character, `text` omits the incomplete character; the cache has its bytes.

        With speculative decoding on, each kept token is decoded together with draft tokens that may follow it
        (one batch, logits for every position); drafts are kept while the model's own pick at that position equals
        them (see `_sample`), the first disagreement is replaced by that pick, and the rejected drafts are removed
        from the KV cache. Every kept token goes through the same
        stop-string, end-of-turn and length checks as in plain decoding."""
        if not self._tokens:
            raise RuntimeError("generate() before prefill()")
        if settings.temperature < 0 or not 0 < settings.top_p <= 1 or settings.top_k < 0:
            raise InputError(f"invalid sampling settings: {settings}")
        t0 = time.perf_counter()
        run = _PassText(self._model, [s for s in stop if s], on_piece)
        n_ctx = self._ctx.n_ctx
        speculate = self._speculation_on()

        self._ensure_logits()
        if len(self._tokens) not in self._checkpoints:
            self._checkpoints[len(self._tokens)] = np.array(self._current_logits(), dtype=np.float32)
        stop_reason = "length"
        pending: Optional[tuple[int, float]] = None  # a token sampled from known logits, not yet offered

        while len(run.kept) < settings.max_tokens:
            if len(self._tokens) >= n_ctx:
                stop_reason = "context"
                break
            token, prob = pending if pending is not None else self._sample(self._current_logits(), settings)
            pending = None
            outcome = run.offer(token, prob)
            if outcome != "keep":
                stop_reason = self._end_pass(run, outcome, in_cache=False)
                break
            room = min(settings.max_tokens - len(run.kept), n_ctx - len(self._tokens) - 1, self._ctx.n_batch - 1)
            policy = self._draft_len.get(self.speculative) if speculate else None
            k = policy.choose(room) if policy is not None else 0
            t_draft = time.perf_counter()
            drafts = self._draft(token, k) if k else []
            t_verify = time.perf_counter()
            if not drafts:
                self._decode_sampled(token)
                if policy is not None:
                    policy.single(time.perf_counter() - t_verify)
                continue
            rows = self._verify(token, drafts)
            verify_seconds = time.perf_counter() - t_verify
            first = len(self._tokens) - len(drafts)  # index of drafts[0] in the sequence
            accepted_before = self.stats.accepted_tokens
            for i, d in enumerate(drafts):
                if len(run.kept) >= settings.max_tokens:
                    self._drop_drafts(first + i, rows[i])
                    break
                token, prob = self._sample(rows[i], settings)
                if token != d:
                    self._drop_drafts(first + i, rows[i])
                    pending = (token, prob)
                    break
                self.stats.accepted_tokens += 1
                outcome = run.offer(token, prob)
                if outcome == "keep":
                    self.stats.generated_tokens += 1
                    continue
                exact = outcome == "stop" and run.exact
                # Keep the stop token itself only if the stop string ends exactly at its end.
                self._drop_drafts(first + i + 1 if exact else first + i, rows[i + 1] if exact else rows[i])
                stop_reason = self._end_pass(run, outcome, in_cache=exact)
                break
            draft_seconds = self._draft_model.last_seconds if self.speculative == "draft" else t_verify - t_draft
            policy.batch(len(drafts), self.stats.accepted_tokens - accepted_before, verify_seconds, draft_seconds)
            if stop_reason != "length":
                break
        run.cut.flush()
        seconds = time.perf_counter() - t0
        self.stats.generate_seconds += seconds
        return Generation(
            text=run.cut.text,
            tokens=run.kept,
            stop_reason=stop_reason,
            stop_string=run.cut.stop_hit,
            overshoot_chars=run.cut.overshoot,
            seconds=seconds,
        )

    def _end_pass(self, run: "_PassText", outcome: str, in_cache: bool) -> str:
        """The offered token ended the pass ("eos" or "stop"); make the cache hold exactly the pass's text.
        `in_cache`: the token is already decoded (an accepted draft whose stop string ends at its end)."""
        if outcome == "eos":
            return "eos"
        if run.exact:
            if in_cache:
                self.stats.generated_tokens += 1
            else:
                self._decode_sampled(run.last[0])  # the stop string ends exactly at this token's end
            run.kept.append(GeneratedToken(*run.last))
        else:
            self._cut_to(run.cut.text, run.kept, run.pass_bytes)
        return "stop"

    def _cut_to(self, target: str, kept: list[GeneratedToken], pass_bytes: bytearray) -> None:
        """The stop string ended inside the token just sampled (not decoded): make the cache hold exactly `target`.

        Keep the longest run of this pass's tokens whose bytes are a prefix of `target` and end on a character
        boundary (usually all of them), then decode the tokenization of the rest of `target`."""
        target_bytes = target.encode("utf-8")
        n_drop = 0
        keep_bytes = bytes(pass_bytes)
        while not (target_bytes.startswith(keep_bytes) and _is_complete_utf8(keep_bytes)):
            n_drop += 1
            keep_bytes = keep_bytes[: len(keep_bytes) - len(self._model.piece(kept[-n_drop].token_id))]
        if n_drop:
            del kept[-n_drop:]
            self.rollback(len(self._tokens) - n_drop)
        tail = self._model.tokenize(target_bytes[len(keep_bytes) :], add_special=False, parse_special=True)
        if tail:
            self._check_room(len(tail), "stop-string tail")
            self._decode_tokens(tail)
            self.stats.inserted_tokens += len(tail)

    def _sample(self, logits: np.ndarray, settings: SamplingSettings) -> tuple[int, float]:
        """Pick the next token; return it with its softmax probability at temperature 1 on the raw logits.

        A draft token is checked by sampling as usual and keeping the draft only if the sample equals it. With a
        deterministic draft d this IS the speculative-sampling rule (keep d with probability p(d), else a token
        from p without d, normalised: Leviathan et al. 2023 with a one-hot draft distribution), and it draws one
        random number per position exactly as plain sampling does: with the same seed and logits the output is
        plain sampling's, whatever was drafted, and a replay does not depend on how many tokens were drafted."""
        best = int(logits.argmax())
        m = float(logits[best])
        buf = self._exp_buf  # preallocated: no per-token allocation of a vocab-sized array
        np.subtract(logits, m, out=buf)
        np.exp(buf, out=buf)
        total = float(buf.sum())
        if settings.temperature == 0:
            return best, 1.0 / total  # exp(max - max) / total
        cand, p = self._target_distribution(logits, m, settings)
        cdf = np.cumsum(p)
        j = min(int(np.searchsorted(cdf, self._random_stream(settings).random() * cdf[-1], side="right")), len(cdf) - 1)
        token = int(j if cand is None else cand[j])
        return token, float(np.exp(float(logits[token]) - m)) / total

    def _random_stream(self, settings: SamplingSettings) -> np.random.Generator:
        if self._rng is None or self._rng_seed != settings.seed:
            # Seeded once per sequence: the passes of one turn continue one random stream.
            self._rng = np.random.default_rng([self.seed, settings.seed])
            self._rng_seed = settings.seed
        return self._rng

    def _target_distribution(
        self, logits: np.ndarray, m: float, settings: SamplingSettings
    ) -> tuple[Optional[np.ndarray], np.ndarray]:
        """The sampling distribution (temperature, top-k, top-p): candidate ids (None = all, by id) and probs."""
        t = settings.temperature
        if settings.top_k > 0:
            k = min(settings.top_k, logits.shape[0])
            cand = np.argpartition(logits, -k)[-k:]
        elif settings.top_p < 1.0:
            cand = np.flatnonzero(logits >= m - _TOP_P_LOGIT_WINDOW * t)
        else:
            cand = None
        z = (logits if cand is None else logits[cand]).astype(np.float64)
        if cand is not None:
            order = np.argsort(-z, kind="stable")
            cand, z = cand[order], z[order]
        p = np.exp((z - z.max()) / t)
        p /= p.sum()
        if cand is not None and settings.top_p < 1.0:
            cut = int(np.searchsorted(np.cumsum(p), settings.top_p)) + 1
            cand, p = cand[:cut], p[:cut] / p[:cut].sum()
        return cand, p

    # ---- speculative decoding --------------------------------------------------------------------------

    def _speculation_on(self) -> bool:
        # Vision bundles place tokens at M-RoPE positions this verification batch does not compute.
        return self.speculative != "off" and not self.info.has_vision

    def _draft(self, token: int, k: int) -> list[int]:
        """Up to k guesses for the tokens after the sequence + `token` (sampled, about to be decoded)."""
        seq = self._tokens + [token]
        if self.speculative == "draft" and self._draft_model is not None:
            return self._draft_model.draft(seq, k)
        return lookup_draft(seq, k)

    def _verify(self, token: int, drafts: list[int]) -> np.ndarray:
        """Decode `token` and the drafts as one batch; row i = next-token logits after the i-th of them."""
        batch = [token, *drafts]
        rows = self._ctx.decode_all_logits(batch, len(self._tokens))
        self._tokens.extend(batch)
        self.stats.generated_tokens += 1
        self.stats.drafted_tokens += len(drafts)
        self.stats.verify_batches += 1
        self.stats.decode_calls += 1
        self._logits_valid = True  # the context's last output row is the last draft's
        self._state_logits = None
        return rows

    def _drop_drafts(self, index: int, next_logits: np.ndarray) -> None:
        """Remove the drafts from sequence index `index` on; `next_logits` (a verification row) become the
        next-token logits. Not a rollback(): these tokens were never part of the output."""
        if index < len(self._tokens):
            self._ctx.remove_from(self._cache_position(index))
            self._truncate(index)
            self._state_logits = np.array(next_logits, dtype=np.float32)  # the row dies at the next decode
            self._logits_valid = False

    def speculative_record(self) -> dict:
        """What speculation did since reset(), for the evidence record."""
        st = self.stats
        rec = {"mode": self.speculative if self._speculation_on() else "off", "requested": self.speculative_requested}
        if rec["mode"] != "off":
            rec.update(
                drafted=st.drafted_tokens,
                accepted=st.accepted_tokens,
                acceptance_rate=round(st.accepted_tokens / st.drafted_tokens, 4) if st.drafted_tokens else None,
                mean_accepted=round(st.accepted_tokens / st.verify_batches, 3) if st.verify_batches else None,
            )
            if rec["mode"] == "draft":
                rec["draft_model"] = Path(self._draft_model.path).name
        return rec

    # ---- decoding ------------------------------------------------------------------------------------

    def _current_logits(self) -> np.ndarray:
        return self._state_logits if self._state_logits is not None else self._ctx.last_logits()

    def _ensure_logits(self) -> None:
        """After a rollback the context's logits belong to a dropped position: re-decode the last kept token."""
        if self._logits_valid or self._state_logits is not None:
            return
        if not self._tokens:
            raise RuntimeError("no tokens in the sequence")
        last = self._tokens[-1]
        self.rollback(len(self._tokens) - 1)
        self._decode_tokens([last])
        self.stats.inserted_tokens += 1

    def _check_room(self, n_new: int, what: str) -> None:
        if len(self._tokens) + n_new > self._ctx.n_ctx:
            raise ContextFullError(
                f"{what} of {n_new} tokens does not fit: {len(self._tokens)} of {self._ctx.n_ctx} context tokens used"
            )

    def _decode_tokens(self, tokens: Sequence[int], logits_last: bool = True) -> None:
        """Decode tokens after the current position (n_batch chunks, logits for the last one only)."""
        self._ctx.decode_tokens(tokens, len(self._tokens), logits_last)
        self._tokens.extend(tokens)
        self.stats.decode_calls += -(-len(tokens) // self._ctx.n_batch)
        self._logits_valid = logits_last
        self._state_logits = None

    def _decode_embeddings(self, embd: np.ndarray, placeholder_token: int, logits_last: bool = True) -> None:
        """Decode input embeddings (n, n_embd) after the current position; the token list records each
        position as `placeholder_token` so n_tokens()/rollback() stay consistent."""
        n = int(np.asarray(embd).shape[0])
        self._check_room(n, "embeddings")
        self._ctx.decode_embeddings(embd, len(self._tokens), logits_last)
        self._tokens.extend([placeholder_token] * n)
        self.stats.decode_calls += -(-n // self._ctx.n_batch)
        self._logits_valid = logits_last
        self._state_logits = None

    def _decode_sampled(self, token: int) -> None:
        self._ctx.decode_one(token, len(self._tokens))
        self._tokens.append(token)
        self.stats.generated_tokens += 1
        self.stats.decode_calls += 1
        self._logits_valid = True
        self._state_logits = None

    # ---- lifetime ------------------------------------------------------------------------------------

    def close(self) -> None:
        if getattr(self, "_draft_model", None) is not None:
            self._draft_model.close()
            self._draft_model = None
        ctx, model = getattr(self, "_ctx", None), getattr(self, "_model", None)
        if ctx is not None:
            ctx.close()
        if model is not None:
            model.close()
        # Any later call fails with AttributeError instead of handing freed pointers to llama.cpp.
        self._ctx = self._model = None  # type: ignore[assignment]

    def __enter__(self) -> "LlamaBackend":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class _PassText:
    """The tokens of one generate pass, offered one by one; the text, its stop strings and streaming are `cut`'s."""

    def __init__(self, model: llama_native.NativeModel, stops: list[str], on_piece: Optional[Callable[[str], None]]):
        self.model, self.cut = model, StopCut(stops, on_piece)
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.kept: list[GeneratedToken] = []
        self.pass_bytes = bytearray()  # bytes of the kept tokens of this pass
        # Set when a stop string completes: the offered token (id, piece, prob), and whether the stop string ends
        # exactly at its last byte (then the token itself is kept, else the cache is cut to `cut.text`).
        self.last: tuple[int, str, float] = (0, "", 0.0)
        self.exact = False

    def offer(self, token: int, prob: float) -> str:
        """Returns "keep" (appended to kept and the text, streamed), "eos" or "stop" (not kept; see `last`)."""
        if self.model.is_eog(token):
            return "eos"
        piece = self.model.piece(token)
        new_text = self.decoder.decode(piece)
        if self.cut.offer(new_text):
            self.last = (token, new_text, prob)
            self.exact = bytes(self.pass_bytes) + piece == self.cut.text.encode("utf-8")
            return "stop"
        self.kept.append(GeneratedToken(token, new_text, prob))
        self.pass_bytes += piece
        return "keep"


def _is_complete_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False
