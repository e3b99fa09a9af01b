"""`QwenVLBackend`: Qwen2.5-VL on the edge = ONNX vision tower + llama.cpp text decoder with M-RoPE positions.

An image part of the prompt goes: pixels -> `runtime.vision` preprocessing (the HF processor, numpy/PIL) ->
ONNX vision tower + merger -> (n, n_embd) embeddings -> decoded into the SAME llama.cpp sequence as the text,
each embedding with 4 rotary positions (t, y, x, 0). Text after an image continues at
start + max(merged grid h, merged grid w), so a token's position is no longer its index in the sequence: this
class keeps, for every entry of the sequence, its temporal position and the position that follows it, and
overrides the few places of `LlamaBackend` that assumed position == index (decode, rollback, state).

Everything else — sampling, stop strings, append_text for retrieved documents, CDIR rollback — is inherited
unchanged, which is what lets the Med-RwR loop run on it as on the text backend. `append_parts` adds what the
text backend cannot: an image decoded after prefill (CDIR's reference image, spliced into the assistant turn).
"""

from __future__ import annotations

import struct
import time
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from ..errors import InputError, ModelError
from . import llama_native
from .backend import ImageInput, PromptPart
from .llama_backend import LlamaBackend
from .vision import VisionEncoder, VisionSpec, mrope_positions, n_image_tokens, preprocess

IMAGE_PAD = "<|image_pad|>"
_STATE_MAGIC = b"MRWRVL1\0"


class QwenVLBackend(LlamaBackend):
    """A Qwen2.5-VL model bundle: text GGUF + ONNX vision encoder (+ its spec). See `runtime.backend.Backend`."""

    def __init__(
        self,
        model_path: str | Path,
        vision_onnx: str | Path,
        vision_spec: VisionSpec,
        *,
        vision_threads: Optional[int] = None,
        **kwargs,
    ):
        super().__init__(model_path, **kwargs)
        try:
            if llama_native.positions_per_embedding(self._model) != 4:
                raise ModelError(f"{model_path} is not an M-RoPE (Qwen2-VL family) decoder; it cannot take images")
            if vision_spec.out_hidden_size != self._model.facts.n_embd:
                raise ModelError(
                    f"vision encoder width {vision_spec.out_hidden_size} does not match the decoder's "
                    f"{self._model.facts.n_embd}: the bundle mixes two models"
                )
            pad = self.tokenize(IMAGE_PAD)
            if len(pad) != 1:
                raise ModelError(f"the decoder vocabulary has no {IMAGE_PAD} token: not a Qwen2-VL tokenizer")
            self.image_pad_token = pad[0]
            self.vision = VisionEncoder(vision_onnx, vision_spec, threads=vision_threads or self.n_threads)
        except BaseException:
            super().close()
            raise
        self.spec = vision_spec
        self.info.name = "llama.cpp+onnx-vision"
        self.info.has_vision = True
        self._pos: list[int] = []  # temporal (first-row) position of each sequence entry
        self._after: list[int] = []  # the position that follows each entry (image: start + max(h, w))
        self.vision_seconds = 0.0
        self.images_seen = 0
        # Parity tests' negative control only: give image tokens 1-D positions (t = y = x = start + i, text after
        # at start + n), the layout of a text-only model. The logits must then disagree with the reference.
        self.one_d_positions = False

    # ---- positions --------------------------------------------------------------------------------------

    def _next_pos(self) -> int:
        return self._after[-1] if self._after else 0

    def positions(self) -> list[int]:
        return list(self._pos)

    def reset(self) -> None:
        super().reset()
        self._pos, self._after = [], []

    def _decode_tokens(self, tokens: Sequence[int], logits_last: bool = True) -> None:
        start = self._next_pos()
        self._ctx.decode_tokens(tokens, start, logits_last)
        self._tokens.extend(tokens)
        self._pos.extend(range(start, start + len(tokens)))
        self._after.extend(range(start + 1, start + len(tokens) + 1))
        self.stats.decode_calls += -(-len(tokens) // self._ctx.n_batch)
        self._logits_valid = logits_last
        self._state_logits = None

    def _decode_sampled(self, token: int) -> None:
        pos = self._next_pos()
        self._ctx.decode_one(token, pos)
        self._tokens.append(token)
        self._pos.append(pos)
        self._after.append(pos + 1)
        self.stats.generated_tokens += 1
        self.stats.decode_calls += 1
        self._logits_valid = True
        self._state_logits = None

    def _decode_embeddings(self, embd: np.ndarray, placeholder_token: int, logits_last: bool = True) -> None:
        """Embeddings with 1-D positions (each its own t = y = x): audio-like, not an image. Kept for the hook."""
        n = int(np.asarray(embd).shape[0])
        start = self._next_pos()
        pos = np.tile(np.arange(start, start + n, dtype=np.int32), (4, 1))
        pos[3] = 0
        self._decode_embeddings_at(embd, pos, n, placeholder_token, logits_last)

    def _decode_embeddings_at(self, embd, positions: np.ndarray, n_pos: int, placeholder: int, logits_last: bool):
        n = int(np.asarray(embd).shape[0])
        self._check_room(n, "image embeddings")
        start = self._next_pos()
        llama_native.decode_embeddings_mrope(self._ctx, embd, positions, logits_last)
        self._tokens.extend([placeholder] * n)
        self._pos.extend(int(p) for p in positions[0])
        self._after.extend([start + n_pos] * n)
        self.stats.decode_calls += -(-n // self._ctx.n_batch)
        self._logits_valid = logits_last
        self._state_logits = None

    def _decode_part(self, part: PromptPart) -> None:
        self.stats.prompt_tokens += self._decode_image(part)

    def _decode_image(self, part: PromptPart) -> int:
        """Encode one image part and decode its embeddings after the sequence, at M-RoPE positions that start at
        the next position (so an image appended mid-turn gets the same layout as one in the prompt)."""
        if not isinstance(part, ImageInput):
            raise InputError(f"unsupported prompt part: {type(part).__name__}")
        embeds, grid = self.encode_image(part.pixels)
        if self.one_d_positions:
            self._decode_embeddings(embeds, self.image_pad_token)
            return int(embeds.shape[0])
        positions, n_pos = mrope_positions(grid, self.spec, self._next_pos())
        self._decode_embeddings_at(embeds, positions, n_pos, self.image_pad_token, logits_last=True)
        return int(embeds.shape[0])

    def append_parts(self, parts: Sequence[PromptPart]) -> int:
        """Text and images decoded after what is in the cache (CDIR's reference image spliced into the turn);
        returns the sequence entries added, counted as inserted. Text parts are tokenized as `append_text` does
        (adjacent ones together). On any failure the sequence is rolled back to where it was: never half a
        splice in the cache."""
        if not self._tokens:
            raise RuntimeError("append_parts() before prefill()")
        n0 = len(self._tokens)
        try:
            pending: list[str] = []
            for part in list(parts) + [None]:
                if isinstance(part, str):
                    pending.append(part)
                    continue
                if pending:
                    tokens = self.tokenize("".join(pending))
                    pending = []
                    if tokens:
                        self._check_room(len(tokens), "appended text")
                        self._decode_tokens(tokens)
                if part is not None:
                    self._decode_image(part)  # checks the room for its embeddings first
        except BaseException:
            partial = len(self._tokens) - n0
            self.rollback(n0)
            self._ctx.remove_from(self._next_pos())  # entries of a batch that failed half-way are not in _tokens
            self.stats.rolled_back_tokens -= partial  # never counted as inserted either: the accounting stays exact
            raise
        added = len(self._tokens) - n0
        self.stats.inserted_tokens += added
        return added

    def encode_image(self, pixels) -> tuple[np.ndarray, tuple[int, int, int]]:
        """ONNX vision embeddings of one RGB image (n_image_tokens, n_embd) and its patch grid."""
        t0 = time.perf_counter()
        embeds, grid = self.vision.encode(pixels)
        self.vision_seconds += time.perf_counter() - t0
        self.images_seen += 1
        return embeds, grid

    def image_token_count(self, pixels) -> int:
        """How many sequence entries an image will take (for context budgeting), without running the encoder."""
        _, grid = preprocess(pixels, self.spec)
        return n_image_tokens(grid, self.spec)

    # ---- sequence edits ----------------------------------------------------------------------------------

    def _cache_position(self, n_keep: int) -> int:
        # All tokens of one image share their temporal position: a cut inside an image cannot be expressed as
        # "drop positions >= p" (llama.cpp's sequence removal), so it is refused rather than done wrongly.
        if 0 < n_keep and self._pos[n_keep] == self._pos[n_keep - 1]:
            raise ValueError(f"rollback({n_keep}) would cut an image in half")
        return self._pos[n_keep]

    def _truncate(self, n_keep: int) -> None:
        del self._tokens[n_keep:], self._pos[n_keep:], self._after[n_keep:]

    def save_state(self) -> bytes:
        pos = np.asarray(self._pos, dtype="<i4").tobytes()
        after = np.asarray(self._after, dtype="<i4").tobytes()
        return _STATE_MAGIC + struct.pack("<I", len(self._pos)) + pos + after + super().save_state()

    def restore_state(self, data: bytes) -> None:
        head = len(_STATE_MAGIC) + 4
        if len(data) < head or not data.startswith(_STATE_MAGIC):
            raise ModelError("not a saved Qwen2.5-VL sequence state")
        (n,) = struct.unpack("<I", data[len(_STATE_MAGIC) : head])
        pos = np.frombuffer(data, dtype="<i4", count=n, offset=head).tolist()
        after = np.frombuffer(data, dtype="<i4", count=n, offset=head + 4 * n).tolist()
        super().restore_state(data[head + 8 * n :])
        if len(self._tokens) != n:
            raise ModelError("the saved sequence state is inconsistent (position and token counts differ)")
        self._pos, self._after = pos, after

    def _ensure_logits(self) -> None:
        if not (self._logits_valid or self._state_logits is not None) and self._tokens:
            if self._tokens[-1] == self.image_pad_token and self._pos[-1] == self._pos[-2 if len(self._pos) > 1 else -1]:
                raise ModelError("cannot recompute logits that end inside an image; roll back before the image")
        super()._ensure_logits()


def load_bundle(directory: str | Path, *, n_ctx: int = 8192, gpu_layers: int = 0, seed: int = 0,
                prefer_int8: bool = True) -> LlamaBackend:
    """The backend for a model bundle (`export.bundle`): QwenVLBackend when it has a vision encoder, else the text
    backend. Every file it loads is checked against the bundle manifest first."""
    from ..export.bundle import VISION_INT8_ONNX, VISION_ONNX, read_manifest, verify_file

    directory = Path(directory)
    manifest = read_manifest(directory)
    text = verify_file(directory, manifest, manifest["text_model"])
    sha = manifest["files"][manifest["text_model"]]["sha256"]
    vision_name = manifest.get("vision_encoder")
    if not vision_name:
        return LlamaBackend(text, n_ctx=n_ctx, gpu_layers=gpu_layers, seed=seed, sha256=sha)
    if not prefer_int8 and vision_name == VISION_INT8_ONNX and VISION_ONNX in manifest["files"]:
        vision_name = VISION_ONNX
    onnx_path = verify_file(directory, manifest, vision_name)
    spec = VisionSpec.load(verify_file(directory, manifest, manifest.get("vision_spec") or "vision.json"))
    backend = QwenVLBackend(text, onnx_path, spec, n_ctx=n_ctx, gpu_layers=gpu_layers, seed=seed, sha256=sha)
    backend.info.notes.append(f"vision encoder {vision_name} (ONNX Runtime, CPU); images at most {spec.max_pixels} pixels")
    return backend
