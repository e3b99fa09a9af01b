"""Every ctypes call into llama.cpp goes through this module (llama-cpp-python==0.3.36 low-level bindings).

Why ctypes and not the high-level `llama_cpp.Llama`: the Med-RwR loop needs exact control of ONE sequence in
the KV cache (decode after the current position, drop a tail with `llama_memory_seq_rm`, snapshot a sequence
with `llama_state_seq_get_data`), and the raw logits of every sampled token. `Llama` hides the cache behind its
own prefix matching and sampler chain.

GPU builds. The PyPI sdist of llama-cpp-python compiles llama.cpp at install time; the backend is chosen by
CMake flags passed through the environment (the installed build decides, nothing at run time):

    CMAKE_ARGS="-DGGML_CUDA=on"   pip install --no-cache-dir --force-reinstall llama-cpp-python==0.3.36   # NVIDIA
    CMAKE_ARGS="-DGGML_METAL=on"  pip install ... llama-cpp-python==0.3.36                               # Apple
    CMAKE_ARGS="-DGGML_VULKAN=on" pip install ... llama-cpp-python==0.3.36                               # Vulkan
    CMAKE_ARGS="-DGGML_HIP=on"    pip install ... llama-cpp-python==0.3.36                               # AMD ROCm

`supports_gpu_offload()` says whether the installed build can offload layers at all.
"""

from __future__ import annotations

import ctypes
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from medrwr_edge.errors import ModelError

# Importing llama_cpp installs llama-cpp-python's own log callback (which prints to stderr); we replace it below.
import llama_cpp.llama_cpp as lc  # noqa: E402

log = logging.getLogger("medrwr_edge.llama_cpp")
log.addHandler(logging.NullHandler())  # silent unless the application configures logging

# enum ggml_log_level in this llama.cpp: NONE 0, DEBUG 1, INFO 2, WARN 3, ERROR 4, CONT 5 (as seen with 0.3.36).
_GGML_LOG_LEVELS = {0: logging.DEBUG, 1: logging.DEBUG, 2: logging.INFO, 3: logging.WARNING, 4: logging.ERROR}
_last_level = logging.DEBUG
_error_lines: list[str] = []  # ERROR lines from llama.cpp since the last model load began; the first is quoted


@lc.llama_log_callback
def _route_log(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
    # llama.cpp logs hundreds of lines per model load; they go to Python logging at DEBUG (warnings/errors at
    # their level) instead of the terminal. Level 5 means "continuation of the previous message".
    global _last_level
    py_level = _last_level if level == 5 else _GGML_LOG_LEVELS.get(level, logging.DEBUG)
    _last_level = py_level
    if py_level >= logging.ERROR and level != 5:
        _error_lines.append(text.decode("utf-8", errors="replace").strip())
    if log.isEnabledFor(py_level):
        line = text.decode("utf-8", errors="replace").rstrip("\n")
        if line:
            log.log(py_level, "%s", line)


_backend_ready = False


def _init_once() -> None:
    global _backend_ready
    if not _backend_ready:
        lc.llama_log_set(_route_log, ctypes.c_void_p(0))  # module-level callback object stays alive
        lc.llama_backend_init()
        _backend_ready = True


def supports_gpu_offload() -> bool:
    _init_once()
    return bool(lc.llama_supports_gpu_offload())


def system_info() -> str:
    return lc.llama_print_system_info().decode("utf-8", errors="replace")


def build_id() -> str:
    """Which llama.cpp computes: the binding's version and the compiled features (CPU kernels, GPU backends).
    Two builds may round differently, so KV states and replays are only comparable within one build id."""
    import llama_cpp

    _init_once()
    return f"llama-cpp-python {llama_cpp.__version__}; " + " ".join(system_info().split())


# The default thread count (physical cores within the CPU affinity and cgroup quota) has one owner, medrwr_edge.cpu,
# for llama.cpp and onnxruntime alike; re-exported here for this module's callers.
from ..cpu import physical_cores  # noqa: E402,F401


GGUF_MAGIC = b"GGUF"
_MIN_GGUF_BYTES = 1 << 16  # header + metadata of the smallest real model is far larger; less is a broken file


def check_gguf(path: str | os.PathLike) -> Path:
    """Cheap checks before llama.cpp touches the file: it exists, is large enough, and starts with the GGUF magic."""
    p = Path(path)
    if not p.exists():
        raise ModelError(f"model file not found: {p}")
    if not p.is_file():
        raise ModelError(f"model path is not a file: {p}")
    size = p.stat().st_size
    with open(p, "rb") as f:
        head = f.read(8)
    if head[:4] != GGUF_MAGIC:
        raise ModelError(f"model file is not GGUF (bad magic {head[:4]!r}): {p}")
    version = int.from_bytes(head[4:8], "little") if len(head) == 8 else 0
    if version not in (2, 3):
        raise ModelError(f"unsupported GGUF version {version}: {p}")
    if size < _MIN_GGUF_BYTES:
        raise ModelError(f"model file is truncated ({size} bytes): {p}")
    return p


@dataclass
class ModelFacts:
    n_ctx_train: int
    n_vocab: int
    n_embd: int
    description: str
    size_bytes: int
    add_bos: bool


class NativeModel:
    """A loaded llama_model and its vocabulary (tokenize / detokenize / end-of-generation)."""

    def __init__(self, path: str | os.PathLike, gpu_layers: int = 0, repack: bool = True):
        _init_once()
        self.path = check_gguf(path)
        params = lc.llama_model_default_params()
        params.n_gpu_layers = int(gpu_layers)
        # Repacked CPU weights (llama.cpp's extra buffer types) multiply batches of >= 4 rows with other kernels
        # than single rows: faster prefill, but logits that differ in the last bits from one-token decoding.
        params.use_extra_bufts = bool(repack)
        _error_lines.clear()
        self._model = lc.llama_model_load_from_file(str(self.path).encode("utf-8"), params)
        if not self._model:
            reason = _error_lines[0].split("error loading model: ")[-1] if _error_lines else "corrupt GGUF?"
            raise ModelError(f"llama.cpp could not load the model {self.path}: {reason}")
        self._vocab = lc.llama_model_get_vocab(self._model)
        if not self._vocab:
            self.close()
            raise ModelError(f"model has no vocabulary: {self.path}")
        buf = ctypes.create_string_buffer(256)
        lc.llama_model_desc(self._model, buf, len(buf))
        self.facts = ModelFacts(
            n_ctx_train=int(lc.llama_model_n_ctx_train(self._model)),
            n_vocab=int(lc.llama_vocab_n_tokens(self._vocab)),
            n_embd=int(lc.llama_model_n_embd(self._model)),
            description=buf.value.decode("utf-8", errors="replace"),
            size_bytes=int(lc.llama_model_size(self._model)),
            add_bos=bool(lc.llama_vocab_get_add_bos(self._vocab)),
        )
        self._piece_cache: dict[int, bytes] = {}
        self._eog_cache: dict[int, bool] = {}

    @property
    def handle(self):
        return self._model

    def metadata(self, key: str) -> str | None:
        """A GGUF metadata value as text (e.g. "general.name"), or None when the file does not have the key."""
        buf = ctypes.create_string_buffer(512)
        n = lc.llama_model_meta_val_str(self._model, key.encode("utf-8"), buf, len(buf))
        return buf.value.decode("utf-8", errors="replace") if n >= 0 else None

    def tokenize(self, text: str | bytes, add_special: bool, parse_special: bool = True) -> list[int]:
        data = text.encode("utf-8") if isinstance(text, str) else text
        if not data:
            return []
        cap = len(data) + 8
        buf = (lc.llama_token * cap)()
        n = lc.llama_tokenize(self._vocab, data, len(data), buf, cap, add_special, parse_special)
        if n < 0:  # buffer too small: llama.cpp returns minus the needed size
            cap = -n
            buf = (lc.llama_token * cap)()
            n = lc.llama_tokenize(self._vocab, data, len(data), buf, cap, add_special, parse_special)
        if n < 0:
            raise ModelError("tokenization failed")
        return list(buf[:n])

    def piece(self, token: int) -> bytes:
        """The bytes a token adds to the text (special tokens rendered, e.g. b"<|im_end|>")."""
        cached = self._piece_cache.get(token)
        if cached is None:
            buf = ctypes.create_string_buffer(64)
            n = lc.llama_token_to_piece(self._vocab, token, buf, len(buf), 0, True)
            if n < 0:
                buf = ctypes.create_string_buffer(-n)
                n = lc.llama_token_to_piece(self._vocab, token, buf, len(buf), 0, True)
            cached = buf.raw[: max(n, 0)]
            self._piece_cache[token] = cached
        return cached

    def is_eog(self, token: int) -> bool:
        cached = self._eog_cache.get(token)
        if cached is None:
            cached = bool(lc.llama_vocab_is_eog(self._vocab, token))
            self._eog_cache[token] = cached
        return cached

    def close(self) -> None:
        if getattr(self, "_model", None):
            lc.llama_model_free(self._model)
            self._model = None

    def __del__(self) -> None:  # a context holds a reference to its model, so it is freed first
        try:
            self.close()
        except Exception:  # interpreter shutdown: the bindings may already be gone
            pass


class DecodeError(ModelError):
    pass


class NativeContext:
    """A llama_context holding one sequence (id 0), with a reusable token batch."""

    SEQ = 0

    def __init__(
        self,
        model: NativeModel,
        n_ctx: int,
        n_batch: int,
        n_threads: int,
        flash_attn: bool = False,
        n_ubatch: int | None = None,
        n_threads_batch: int | None = None,
    ):
        self.model = model
        params = lc.llama_context_default_params()
        params.n_ctx = n_ctx
        params.n_batch = n_batch
        params.n_ubatch = min(n_ubatch or n_batch, n_batch)
        params.n_seq_max = 1
        params.n_threads = n_threads
        params.n_threads_batch = n_threads_batch or n_threads
        params.flash_attn_type = lc.LLAMA_FLASH_ATTN_TYPE_ENABLED if flash_attn else lc.LLAMA_FLASH_ATTN_TYPE_DISABLED
        params.no_perf = True
        self.kv_type = f"k:{int(params.type_k)} v:{int(params.type_v)}"  # ggml type ids of the KV cache
        self._ctx = lc.llama_init_from_model(model.handle, params)
        if not self._ctx:
            raise ModelError(f"llama.cpp could not create a context of {n_ctx} tokens (out of memory?)")
        self._mem = lc.llama_get_memory(self._ctx)
        self.n_ctx = int(lc.llama_n_ctx(self._ctx))
        self.n_batch = n_batch
        self.n_vocab = model.facts.n_vocab
        self._batch = lc.llama_batch_init(n_batch, 0, 1)
        self._embd_batch = None
        self._embd_batch_size = 0
        for i in range(n_batch):  # one sequence: seq ids never change, set them once
            self._batch.n_seq_id[i] = 1
            self._batch.seq_id[i][0] = self.SEQ

    def decode_tokens(self, tokens: Sequence[int], start_pos: int, logits_last: bool = True) -> None:
        """Decode `tokens` at positions start_pos.. in chunks of n_batch; logits only for the very last token."""
        b = self._batch
        n_total = len(tokens)
        for off in range(0, n_total, self.n_batch):
            chunk = tokens[off : off + self.n_batch]
            n = len(chunk)
            for i, tok in enumerate(chunk):
                b.token[i] = tok
                b.pos[i] = start_pos + off + i
                b.logits[i] = 0
            if logits_last and off + n == n_total:
                b.logits[n - 1] = 1
            b.n_tokens = n
            self._decode(b)

    def decode_one(self, token: int, pos: int) -> None:
        """The generation hot path: one token, logits on."""
        b = self._batch
        b.token[0] = token
        b.pos[0] = pos
        b.logits[0] = 1
        b.n_tokens = 1
        self._decode(b)

    def decode_all_logits(self, tokens: Sequence[int], start_pos: int) -> np.ndarray:
        """Decode up to n_batch tokens as ONE batch with logits for every position (speculative verification).

        Returns a zero-copy (len(tokens), n_vocab) view, valid until the next decode: row i holds the next-token
        logits after tokens[i]."""
        n = len(tokens)
        if not 0 < n <= self.n_batch:
            raise ModelError(f"a verification batch holds 1..{self.n_batch} tokens, got {n}")
        b = self._batch
        for i, tok in enumerate(tokens):
            b.token[i] = tok
            b.pos[i] = start_pos + i
            b.logits[i] = 1
        b.n_tokens = n
        self._decode(b)
        ptr = lc.llama_get_logits(self._ctx)
        if not ptr:
            raise ModelError("no logits available after a verification batch")
        return np.ctypeslib.as_array(ptr, shape=(n, self.n_vocab))

    def decode_embeddings(self, embd: np.ndarray, start_pos: int, logits_last: bool = True) -> None:
        """Decode input embeddings (n, n_embd) float32, e.g. projected image patches, at positions start_pos..

        The hook for a multimodal backend; a text model accepts embeddings of its own width too."""
        embd = np.ascontiguousarray(embd, dtype=np.float32)
        n_embd = self.model.facts.n_embd
        if embd.ndim != 2 or embd.shape[1] != n_embd:
            raise ModelError(f"embeddings must have shape (n, {n_embd}), got {embd.shape}")
        if self._embd_batch is None:
            self._embd_batch = lc.llama_batch_init(self.n_batch, n_embd, 1)
            for i in range(self.n_batch):
                self._embd_batch.n_seq_id[i] = 1
                self._embd_batch.seq_id[i][0] = self.SEQ
        b = self._embd_batch
        n_total = embd.shape[0]
        for off in range(0, n_total, self.n_batch):
            chunk = embd[off : off + self.n_batch]
            n = chunk.shape[0]
            ctypes.memmove(b.embd, chunk.ctypes.data, chunk.nbytes)
            for i in range(n):
                b.pos[i] = start_pos + off + i
                b.logits[i] = 0
            if logits_last and off + n == n_total:
                b.logits[n - 1] = 1
            b.n_tokens = n
            self._decode(b)

    def _decode(self, batch) -> None:
        rc = lc.llama_decode(self._ctx, batch)
        if rc != 0:
            raise DecodeError(f"llama_decode failed (code {rc}; 1 = no room in the KV cache)")

    def last_logits(self) -> np.ndarray:
        """A zero-copy view of the logits of the last decoded output (valid until the next decode)."""
        ptr = lc.llama_get_logits_ith(self._ctx, -1)
        if not ptr:
            raise ModelError("no logits available (nothing decoded with logits on)")
        return np.ctypeslib.as_array(ptr, shape=(self.n_vocab,))

    def remove_from(self, pos: int) -> None:
        """Drop KV entries of the sequence at positions >= pos."""
        if not lc.llama_memory_seq_rm(self._mem, self.SEQ, pos, -1):
            raise ModelError(f"llama.cpp could not drop KV entries from position {pos}")

    def kv_positions(self) -> int:
        """How many positions of the sequence the KV cache holds (max position + 1; 0 when empty)."""
        return int(lc.llama_memory_seq_pos_max(self._mem, self.SEQ)) + 1

    def clear(self) -> None:
        lc.llama_memory_clear(self._mem, True)

    def save_sequence(self) -> bytes:
        size = lc.llama_state_seq_get_size(self._ctx, self.SEQ)
        buf = (ctypes.c_uint8 * size)()
        written = lc.llama_state_seq_get_data(self._ctx, buf, size, self.SEQ)
        if written != size:
            raise ModelError(f"saving the sequence state wrote {written} of {size} bytes")
        return bytes(buf)

    def restore_sequence(self, data: bytes) -> None:
        self.remove_from(0)
        buf = (ctypes.c_uint8 * len(data)).from_buffer_copy(data)
        if lc.llama_state_seq_set_data(self._ctx, buf, len(data), self.SEQ) == 0:
            raise ModelError("llama.cpp rejected the saved sequence state")

    def close(self) -> None:
        if getattr(self, "_ctx", None):
            lc.llama_batch_free(self._batch)
            if self._embd_batch is not None:
                lc.llama_batch_free(self._embd_batch)
                self._embd_batch = None
            lc.llama_free(self._ctx)
            self._ctx = None

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass


# ==== M-RoPE embedding batches (added by H7 for runtime/multimodal_backend.py) ====================================
# Qwen2-VL / Qwen2.5-VL decoders rotate with 4 position rows per embedding (t, y, x, 0 — llama.cpp's section
# order). A `llama_batch` of embeddings then carries n_tokens * 4 positions, section-major (pos[j*n + i]), exactly
# as llama.cpp's mtmd helper lays out an image chunk. llama_batch_init allocates only n positions, so these
# batches are built here from numpy buffers (seq_id/n_seq_id NULL = sequence 0).

_MROPE_TYPES = (lc.LLAMA_ROPE_TYPE_MROPE, lc.LLAMA_ROPE_TYPE_IMROPE, lc.LLAMA_ROPE_TYPE_VISION)


def positions_per_embedding(model: NativeModel) -> int:
    """4 for M-RoPE decoders (one position per rotary section), else 1."""
    return 4 if int(lc.llama_model_rope_type(model.handle)) in _MROPE_TYPES else 1


def decode_embeddings_mrope(ctx: NativeContext, embd: np.ndarray, positions: np.ndarray, logits_last: bool = True) -> None:
    """Decode embeddings (n, n_embd) with explicit positions (n_pos_rows, n): 4 rows for an M-RoPE model, 1 else.

    Chunks of n_batch; each chunk gets its own section-major position array. Logits only for the very last row."""
    embd = np.ascontiguousarray(embd, dtype=np.float32)
    positions = np.asarray(positions, dtype=np.int32)
    n_embd = ctx.model.facts.n_embd
    rows = positions_per_embedding(ctx.model)
    if embd.ndim != 2 or embd.shape[1] != n_embd:
        raise ModelError(f"embeddings must have shape (n, {n_embd}), got {embd.shape}")
    if positions.shape != (rows, embd.shape[0]):
        raise ModelError(f"positions must have shape ({rows}, {embd.shape[0]}) for this model, got {positions.shape}")
    n_total = embd.shape[0]
    for off in range(0, n_total, ctx.n_batch):
        chunk = np.ascontiguousarray(embd[off : off + ctx.n_batch])
        n = chunk.shape[0]
        pos = np.ascontiguousarray(positions[:, off : off + n]).reshape(-1)  # section-major
        logits = np.zeros(n, dtype=np.int8)
        if logits_last and off + n == n_total:
            logits[-1] = 1
        batch = lc.llama_batch()
        batch.n_tokens = n
        batch.token = ctypes.cast(None, ctypes.POINTER(lc.llama_token))
        batch.embd = chunk.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
        batch.pos = pos.ctypes.data_as(ctypes.POINTER(lc.llama_pos))
        batch.n_seq_id = ctypes.cast(None, ctypes.POINTER(ctypes.c_int32))
        batch.seq_id = ctypes.cast(None, ctypes.POINTER(ctypes.POINTER(lc.llama_seq_id)))
        batch.logits = logits.ctypes.data_as(ctypes.POINTER(ctypes.c_int8))
        ctx._decode(batch)  # chunk, pos and logits stay referenced until llama_decode returns


# ==== GGUF quantisation (added by H7 for export/qwen.py; export time only) ==========================================
QUANT_FTYPES = {
    "f32": lc.LLAMA_FTYPE_ALL_F32,
    "f16": lc.LLAMA_FTYPE_MOSTLY_F16,
    "q8_0": lc.LLAMA_FTYPE_MOSTLY_Q8_0,
    "q5_k_m": lc.LLAMA_FTYPE_MOSTLY_Q5_K_M,
    "q4_k_m": lc.LLAMA_FTYPE_MOSTLY_Q4_K_M,
}


def quantize_model(src: str | os.PathLike, dst: str | os.PathLike, quant: str, n_threads: int = 0) -> None:
    """llama_model_quantize: src GGUF (f32/f16) -> dst GGUF of type `quant` (a QUANT_FTYPES key).

    Tensors whose rows do not fit the quant's block size (tiny test models) fall back to a type that does,
    as llama.cpp's own llama-quantize does."""
    _init_once()
    if quant not in QUANT_FTYPES:
        raise ModelError(f"unknown quantisation {quant!r}; choose one of {', '.join(QUANT_FTYPES)}")
    params = lc.llama_model_quantize_default_params()
    params.nthread = int(n_threads)
    params.ftype = QUANT_FTYPES[quant]
    _error_lines.clear()
    rc = lc.llama_model_quantize(str(src).encode("utf-8"), str(dst).encode("utf-8"), ctypes.byref(params))
    if rc != 0:
        reason = _error_lines[0] if _error_lines else f"code {rc}"
        raise ModelError(f"llama.cpp could not quantise {src} to {quant}: {reason}")
