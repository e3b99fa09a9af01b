"""Encoders: text or image in, L2-normalised float32 vectors out, with onnxruntime only (no torch).

An encoder lives in a directory holding `encoder.json` (an `EncoderSpec`), the ONNX file and, for text,
`tokenizer.json` (HuggingFace `tokenizers` format). The sha256 of every file is checked against the spec
BEFORE anything is loaded, and `encoder.sha256` (the ONNX hash) is the "encoder lock" a pack records, so a pack
is never searched with vectors from a different model.

Image preprocessing is explicit in the spec: pixels are divided by 255 when `pixel_scale` is "0..1" (mean/std
are then on the 0..1 scale) and left as-is when it is "0..255"; then `(x - mean) / std` per RGB channel; the
tensor layout is NCHW.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Optional, Union

import numpy as np

from ..errors import InputError, IntegrityError, ModelError
from ..paths import atomic_write_text, sha256_file

log = logging.getLogger(__name__)

ENCODER_JSON = "encoder.json"
CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"

TEXT_POOLINGS = ("mean", "cls", "none", "static")  # "static": token-vector table, see static_encoder.py
IMAGE_POOLINGS = ("none", "mean")
RESIZE_MODES = ("shorter_side_center_crop", "squash", "pad")
PIXEL_SCALES = ("0..1", "0..255")
TOKENIZE_SLICE = 8192  # texts tokenised (and length-sorted) together


@dataclass
class EncoderSpec:
    """Everything needed to turn input into the vectors a pack was built with. Fields unused by a kind are None."""

    kind: str  # "text" | "image"
    name: str
    dim: int
    onnx_file: str  # the model file; for text pooling "static" the token-vector table (.npy), no ONNX
    onnx_sha256: str
    output_name: str
    pooling: str  # text: "mean" | "cls" | "none" (already pooled); image: "none" | "mean" (spatial)
    normalize: bool
    # text only
    tokenizer_file: Optional[str] = None
    tokenizer_sha256: Optional[str] = None
    input_ids_name: Optional[str] = None
    attention_mask_name: Optional[str] = None
    token_type_ids_name: Optional[str] = None  # None when the model has no such input
    max_length: Optional[int] = None
    query_prefix: str = ""
    document_prefix: str = ""
    # image only
    input_name: Optional[str] = None
    image_size: Optional[int] = None
    resize_mode: Optional[str] = None  # see RESIZE_MODES
    crop_fraction: Optional[float] = None  # shorter_side_center_crop: shorter side -> image_size / crop_fraction
    pixel_scale: Optional[str] = None  # "0..1" (divide by 255 first) | "0..255"
    mean: Optional[list] = None  # per RGB channel, on the pixel_scale
    std: Optional[list] = None
    layout: Optional[str] = None  # "NCHW"

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "EncoderSpec":
        if not isinstance(data, dict):
            raise IntegrityError("encoder spec is not a JSON object")
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - names)
        missing = sorted(names - set(data))
        if unknown:
            raise IntegrityError(f"encoder spec has unknown fields: {', '.join(unknown)}")
        if missing:
            raise IntegrityError(f"encoder spec is missing fields: {', '.join(missing)}")
        spec = cls(**data)
        spec.validate()
        return spec

    def validate(self) -> None:
        def need(cond: bool, what: str) -> None:
            if not cond:
                raise IntegrityError(f"encoder spec {self.name!r}: {what}")

        need(self.kind in ("text", "image"), f"kind must be 'text' or 'image', not {self.kind!r}")
        need(isinstance(self.dim, int) and self.dim > 0, "dim must be a positive integer")
        need(_is_sha256(self.onnx_sha256), "onnx_sha256 must be 64 hex digits")
        need(isinstance(self.normalize, bool), "normalize must be true or false")
        if self.kind == "text":
            need(self.pooling in TEXT_POOLINGS, f"text pooling must be one of {TEXT_POOLINGS}")
            need(bool(self.tokenizer_file) and _is_sha256(self.tokenizer_sha256), "text needs tokenizer_file/sha256")
            if self.pooling != "static":  # a static encoder runs no ONNX graph, so it has no input names
                need(bool(self.input_ids_name) and bool(self.attention_mask_name), "text needs input names")
            need(isinstance(self.max_length, int) and self.max_length > 2, "max_length must be an integer > 2")
        else:
            need(self.pooling in IMAGE_POOLINGS, f"image pooling must be one of {IMAGE_POOLINGS}")
            need(bool(self.input_name), "image needs input_name")
            need(isinstance(self.image_size, int) and self.image_size > 0, "image_size must be positive")
            need(self.resize_mode in RESIZE_MODES, f"resize_mode must be one of {RESIZE_MODES}")
            need(self.pixel_scale in PIXEL_SCALES, f"pixel_scale must be one of {PIXEL_SCALES}")
            need(self.layout == "NCHW", "layout must be NCHW")
            need(isinstance(self.mean, list) and len(self.mean) == 3, "mean must have 3 values")
            need(isinstance(self.std, list) and len(self.std) == 3 and all(s > 0 for s in self.std), "bad std")
            if self.resize_mode == "shorter_side_center_crop":
                need(isinstance(self.crop_fraction, (int, float)) and 0 < self.crop_fraction <= 1, "bad crop_fraction")


def _is_sha256(value) -> bool:
    return isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value)


def read_spec(encoder_dir: str | os.PathLike) -> EncoderSpec:
    path = Path(encoder_dir) / ENCODER_JSON
    if not path.is_file():
        raise ModelError(f"no {ENCODER_JSON} in encoder directory {encoder_dir}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise IntegrityError(f"{path} is not valid JSON: {e}") from None
    return EncoderSpec.from_dict(data)


def write_spec(encoder_dir: str | os.PathLike, spec: EncoderSpec) -> Path:
    spec.validate()
    path = Path(encoder_dir) / ENCODER_JSON
    atomic_write_text(path, json.dumps(spec.to_dict(), indent=2, sort_keys=True) + "\n")
    return path


def _check_file(path: Path, expected: str) -> None:
    if not path.is_file():
        raise ModelError(f"encoder file missing: {path}")
    actual = sha256_file(path)
    if actual != expected:
        raise IntegrityError(f"encoder file {path.name} has sha256 {actual}, expected {expected} (file changed?)")


# The default thread count (physical cores within the CPU affinity and cgroup quota) has one owner, medrwr_edge.cpu,
# for llama.cpp and onnxruntime alike; re-exported here for this module's callers.
from ..cpu import physical_cores  # noqa: E402,F401


def make_session(onnx_path: str | os.PathLike, prefer_gpu: bool = True, threads: Optional[int] = None):
    """Return (InferenceSession, provider_used, note). `note` explains any GPU fallback; it is "" otherwise."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.intra_op_num_threads = threads or physical_cores()
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3  # warnings from ORT's optimiser are not the user's problem
    available = ort.get_available_providers()
    note = ""
    if prefer_gpu and CUDA in available:
        providers = [CUDA, CPU]
    else:
        providers = [CPU]
        if prefer_gpu:
            note = "GPU requested but onnxruntime offers no CUDAExecutionProvider (install onnxruntime-gpu); using CPU"
    try:
        session = ort.InferenceSession(str(onnx_path), sess_options=opts, providers=providers)
    except Exception as e:  # ORT raises assorted types for truncated/garbage protobufs
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ModelError(f"cannot load ONNX model {Path(onnx_path).name}: {first[:200]}") from None
    used = session.get_providers()[0]
    if prefer_gpu and CUDA in providers and used != CUDA:
        note = "CUDAExecutionProvider failed to initialise (see onnxruntime log); using CPU"
    if note:
        log.info(note)
    return session, used, note


class _Encoder:
    def __init__(self, spec: EncoderSpec, session, provider: str, note: str):
        self.spec = spec
        self.session = session
        self.provider = provider
        self.provider_note = note

    @property
    def sha256(self) -> str:
        return self.spec.onnx_sha256

    @property
    def dim(self) -> int:
        return self.spec.dim

    @property
    def kind(self) -> str:
        return self.spec.kind

    @property
    def name(self) -> str:
        return self.spec.name

    def _finish(self, vectors: np.ndarray) -> np.ndarray:
        vectors = np.asarray(vectors, dtype=np.float32)
        if vectors.ndim != 2 or vectors.shape[1] != self.spec.dim:
            raise ModelError(f"encoder {self.spec.name} produced shape {vectors.shape}, expected (n, {self.spec.dim})")
        if self.spec.normalize:
            norms = np.linalg.norm(vectors, axis=1, keepdims=True)
            vectors = vectors / np.maximum(norms, 1e-12)
        return np.ascontiguousarray(vectors, dtype=np.float32)


class TextEncoder(_Encoder):
    def __init__(self, spec: EncoderSpec, session, provider: str, note: str, tokenizer):
        super().__init__(spec, session, provider, note)
        tokenizer.no_padding()  # we pad per length bucket ourselves
        tokenizer.enable_truncation(spec.max_length)
        self.tokenizer = tokenizer
        self._input_names = {i.name for i in session.get_inputs()}
        for name in (spec.input_ids_name, spec.attention_mask_name, spec.token_type_ids_name):
            if name and name not in self._input_names:
                raise ModelError(f"ONNX model {spec.onnx_file} has no input {name!r} (has {sorted(self._input_names)})")

    def embed(self, texts: list[str], *, is_query: bool = False, batch_size: int = 64, bucketed: bool = True) -> np.ndarray:
        """(n, dim) float32 vectors in input order. `bucketed=False` pads every batch in input order (benchmark)."""
        if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
            raise InputError("texts to embed must be a list of strings")
        if batch_size < 1:
            raise InputError("batch_size must be at least 1")
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        prefix = self.spec.query_prefix if is_query else self.spec.document_prefix
        out = np.empty((len(texts), self.dim), dtype=np.float32)
        # Tokenise in slices so a 100k-text pack build never holds 100k Encoding objects at once.
        for base in range(0, len(texts), TOKENIZE_SLICE):
            encodings = self.tokenizer.encode_batch([prefix + t for t in texts[base : base + TOKENIZE_SLICE]])
            ids = [e.ids for e in encodings]
            del encodings
            # Sorting by length means each batch pads only to its own longest text, not the slice's.
            order = sorted(range(len(ids)), key=lambda i: len(ids[i])) if bucketed else list(range(len(ids)))
            for start in range(0, len(order), batch_size):
                chunk = order[start : start + batch_size]
                out[[base + i for i in chunk]] = self._run([ids[i] for i in chunk])
        return self._finish(out)

    def _run(self, batch_ids: list[list[int]]) -> np.ndarray:
        width = max(len(x) for x in batch_ids)
        input_ids = np.zeros((len(batch_ids), width), dtype=np.int64)
        mask = np.zeros((len(batch_ids), width), dtype=np.int64)
        for row, seq in enumerate(batch_ids):
            input_ids[row, : len(seq)] = seq
            mask[row, : len(seq)] = 1
        feeds = {self.spec.input_ids_name: input_ids, self.spec.attention_mask_name: mask}
        if self.spec.token_type_ids_name:
            feeds[self.spec.token_type_ids_name] = np.zeros_like(input_ids)
        (hidden,) = self.session.run([self.spec.output_name], feeds)
        if self.spec.pooling == "none":
            return hidden
        if self.spec.pooling == "cls":
            return hidden[:, 0, :]
        weights = mask[:, :, None].astype(np.float32)
        return (hidden * weights).sum(axis=1) / np.maximum(weights.sum(axis=1), 1e-9)


class ImageEncoder(_Encoder):
    def __init__(self, spec: EncoderSpec, session, provider: str, note: str):
        super().__init__(spec, session, provider, note)
        names = [i.name for i in session.get_inputs()]
        if spec.input_name not in names:
            raise ModelError(f"ONNX model {spec.onnx_file} has no input {spec.input_name!r} (has {names})")
        self._mean = np.asarray(spec.mean, dtype=np.float32).reshape(3, 1, 1)
        self._std = np.asarray(spec.std, dtype=np.float32).reshape(3, 1, 1)

    def preprocess(self, pixels: np.ndarray) -> np.ndarray:
        """RGB uint8 (H, W, 3) -> float32 (3, S, S) exactly as the model was trained."""
        from PIL import Image

        if not isinstance(pixels, np.ndarray) or pixels.dtype != np.uint8 or pixels.ndim != 3 or pixels.shape[2] != 3:
            got = f"{pixels.dtype} {pixels.shape}" if isinstance(pixels, np.ndarray) else type(pixels).__name__
            raise InputError(f"image to embed must be an RGB uint8 array of shape (H, W, 3), got {got}")
        if pixels.shape[0] < 1 or pixels.shape[1] < 1:
            raise InputError("image to embed is empty")
        size = self.spec.image_size
        img = Image.fromarray(pixels, "RGB")
        if self.spec.resize_mode == "squash":
            img = img.resize((size, size), Image.BICUBIC)
        elif self.spec.resize_mode == "pad":
            scale = size / max(img.size)
            w, h = max(1, round(img.width * scale)), max(1, round(img.height * scale))
            canvas = Image.new("RGB", (size, size), (0, 0, 0))
            canvas.paste(img.resize((w, h), Image.BICUBIC), ((size - w) // 2, (size - h) // 2))
            img = canvas
        else:  # shorter side -> size / crop_fraction, then a centred size x size crop (ImageNet eval transform)
            target = int(round(size / self.spec.crop_fraction))
            scale = target / min(img.size)
            w, h = max(size, round(img.width * scale)), max(size, round(img.height * scale))
            img = img.resize((w, h), Image.BICUBIC)
            left, top = (w - size) // 2, (h - size) // 2
            img = img.crop((left, top, left + size, top + size))
        x = np.asarray(img, dtype=np.float32).transpose(2, 0, 1)
        if self.spec.pixel_scale == "0..1":
            x = x / 255.0
        return (x - self._mean) / self._std

    def embed(self, images: list[np.ndarray], *, batch_size: int = 16) -> np.ndarray:
        if isinstance(images, np.ndarray) and images.ndim == 3:
            raise InputError("images to embed must be a list of arrays, not a single array")
        if len(images) == 0:
            return np.zeros((0, self.dim), dtype=np.float32)
        out = []
        for start in range(0, len(images), batch_size):
            batch = np.stack([self.preprocess(p) for p in images[start : start + batch_size]])
            (features,) = self.session.run([self.spec.output_name], {self.spec.input_name: batch})
            if self.spec.pooling == "mean" and features.ndim == 4:
                features = features.mean(axis=(2, 3))
            out.append(features.reshape(features.shape[0], -1))
        return self._finish(np.concatenate(out))


Encoder = Union[TextEncoder, ImageEncoder]


def load_encoder(encoder_dir: str | os.PathLike, *, prefer_gpu: bool = True) -> Encoder:
    """Verify every file against encoder.json, then load the encoder it describes."""
    encoder_dir = Path(encoder_dir)
    if not encoder_dir.is_dir():
        raise ModelError(f"encoder directory not found: {encoder_dir}")
    spec = read_spec(encoder_dir)
    if spec.kind == "text" and spec.pooling == "static":
        from .static_encoder import load_static_encoder

        return load_static_encoder(encoder_dir, spec)
    onnx_path = encoder_dir / spec.onnx_file
    _check_file(onnx_path, spec.onnx_sha256)
    if spec.kind == "text":
        tok_path = encoder_dir / spec.tokenizer_file
        _check_file(tok_path, spec.tokenizer_sha256)
        from tokenizers import Tokenizer

        try:
            tokenizer = Tokenizer.from_file(str(tok_path))
        except Exception as e:
            raise ModelError(f"cannot load tokenizer {tok_path.name}: {str(e).splitlines()[0][:200]}") from None
        session, provider, note = make_session(onnx_path, prefer_gpu=prefer_gpu)
        return TextEncoder(spec, session, provider, note, tokenizer)
    session, provider, note = make_session(onnx_path, prefer_gpu=prefer_gpu)
    return ImageEncoder(spec, session, provider, note)
