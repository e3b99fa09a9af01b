"""Qwen2.5-VL image input in numpy/PIL: the HF processor's preprocessing and the vision tower's index inputs.

No torch here (the edge runtime never imports it). Everything the exported ONNX vision graph cannot compute
from tensors alone (it depends on the image's grid size through Python loops in the HF code) is computed here:

- `preprocess`: `Qwen2VLImageProcessor` (the slow, PIL one): smart_resize to multiples of patch*merge = 28 with
  the training pixel budget (max_pixels = 262144), bicubic PIL resize, rescale 1/255, CLIP mean/std, the
  frame repeated to temporal_patch_size = 2, then patchify in the processor's exact element order.
- `vision_inputs`: the rotary cos/sin of each patch (2-D (row, col) rotary, already in window order), the
  window permutation and its inverse, and an additive attention bias that confines the windowed blocks to
  their 112-pixel windows (the HF code splits by cu_seqlens; a block-diagonal bias is the same computation).
- `mrope_positions`: the decoder's 4-row M-RoPE positions of the image tokens (t, y, x, 0), as llama.cpp's
  mtmd lays them out for Qwen2-VL; text after the image continues at start + max(grid_h, grid_w) (merged grid).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from ..errors import InputError, ModelError

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
TRAINING_MAX_PIXELS = 262144  # Med-RwR's training budget (512*512): ~330 image tokens per image
# Softmax weight exp(-1e9) is exactly 0 in float32: masked keys contribute nothing, as with a split.
_MASKED = np.float32(-1e9)


@dataclass
class VisionSpec:
    """What the runtime needs to know about the exported vision tower (vision.json in a model bundle)."""

    patch_size: int = 14
    merge_size: int = 2
    temporal_patch_size: int = 2
    min_pixels: int = 3136
    max_pixels: int = TRAINING_MAX_PIXELS
    image_mean: tuple = OPENAI_CLIP_MEAN
    image_std: tuple = OPENAI_CLIP_STD
    window_size: int = 112
    num_heads: int = 16
    hidden_size: int = 1280  # vision width
    out_hidden_size: int = 3584  # = the decoder's n_embd
    rope_theta: float = 10000.0
    fullatt_block_indexes: list = field(default_factory=lambda: [7, 15, 23, 31])
    in_channels: int = 3

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def patch_dim(self) -> int:
        return self.in_channels * self.temporal_patch_size * self.patch_size * self.patch_size

    @classmethod
    def from_hf(cls, config: dict, preprocessor: dict, max_pixels: int | None = None) -> "VisionSpec":
        """From a checkpoint's config.json and preprocessor_config.json (max_pixels: override, e.g. training's)."""
        v = config["vision_config"]
        size = preprocessor.get("size") or {}
        return cls(
            patch_size=int(preprocessor.get("patch_size", v.get("patch_size", 14))),
            merge_size=int(preprocessor.get("merge_size", v.get("spatial_merge_size", 2))),
            temporal_patch_size=int(preprocessor.get("temporal_patch_size", v.get("temporal_patch_size", 2))),
            min_pixels=int(preprocessor.get("min_pixels", size.get("shortest_edge", 3136))),
            max_pixels=int(max_pixels or preprocessor.get("max_pixels", size.get("longest_edge", TRAINING_MAX_PIXELS))),
            image_mean=tuple(preprocessor.get("image_mean", OPENAI_CLIP_MEAN)),
            image_std=tuple(preprocessor.get("image_std", OPENAI_CLIP_STD)),
            window_size=int(v.get("window_size", 112)),
            num_heads=int(v["num_heads"]),
            hidden_size=int(v["hidden_size"]),
            out_hidden_size=int(v["out_hidden_size"]),
            fullatt_block_indexes=list(v.get("fullatt_block_indexes", [])),
            in_channels=int(v.get("in_chans", v.get("in_channels", 3))),
        )

    def to_json(self) -> str:
        d = asdict(self)
        d["image_mean"], d["image_std"] = list(self.image_mean), list(self.image_std)
        return json.dumps(d, indent=2)

    @classmethod
    def load(cls, path: str | Path) -> "VisionSpec":
        try:
            d = json.loads(Path(path).read_text(encoding="utf-8"))
            d["image_mean"], d["image_std"] = tuple(d["image_mean"]), tuple(d["image_std"])
            return cls(**d)
        except (OSError, ValueError, TypeError, KeyError) as e:
            raise ModelError(f"unreadable vision spec {path}: {e}") from None


def smart_resize(height: int, width: int, factor: int = 28, min_pixels: int = 3136, max_pixels: int = TRAINING_MAX_PIXELS):
    """Qwen2-VL's smart_resize: sides divisible by `factor`, pixels within [min, max], aspect kept (HF code)."""
    if min(height, width) < 1:
        raise InputError(f"image of {width}x{height} pixels is empty")
    if max(height, width) / min(height, width) > 200:
        raise InputError(f"image aspect ratio {max(height, width) / min(height, width):.0f}:1 is over 200:1")
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def preprocess(pixels: np.ndarray, spec: VisionSpec) -> tuple[np.ndarray, tuple[int, int, int]]:
    """RGB uint8 (H, W, 3) -> (flattened patches (N, C*T*P*P) float32, grid (t, h, w) in patches)."""
    from PIL import Image

    arr = np.asarray(pixels)
    if arr.ndim == 2:
        arr = np.stack([arr] * 3, axis=-1)
    if arr.ndim != 3 or arr.shape[2] not in (3, 4) or arr.dtype != np.uint8:
        raise InputError(f"image must be RGB uint8 (H, W, 3); got {arr.dtype} {arr.shape}")
    arr = arr[..., :3]
    p, m, tp = spec.patch_size, spec.merge_size, spec.temporal_patch_size
    h, w = smart_resize(arr.shape[0], arr.shape[1], p * m, spec.min_pixels, spec.max_pixels)
    if (h, w) != arr.shape[:2]:
        arr = np.asarray(Image.fromarray(np.ascontiguousarray(arr)).resize((w, h), resample=Image.BICUBIC))
    # transformers' rescale (float64 multiply, then float32) and normalize (float32), in that order.
    x = (arr.astype(np.float64) * (1 / 255)).astype(np.float32)
    x = (x - np.asarray(spec.image_mean, dtype=np.float32)) / np.asarray(spec.image_std, dtype=np.float32)
    x = x.transpose(2, 0, 1)[None]  # (1, C, H, W)
    x = np.repeat(x, tp, axis=0)  # one image = tp identical frames
    c = x.shape[1]
    gt, gh, gw = 1, h // p, w // p
    x = x.reshape(gt, tp, c, gh // m, m, p, gw // m, m, p)
    x = x.transpose(0, 3, 6, 4, 7, 2, 1, 5, 8)
    return np.ascontiguousarray(x.reshape(gt * gh * gw, c * tp * p * p), dtype=np.float32), (gt, gh, gw)


def window_index(grid: tuple[int, int, int], spec: VisionSpec) -> tuple[np.ndarray, np.ndarray]:
    """HF get_window_index for one image: merged-unit permutation into windows, and cumulative window lengths."""
    t, gh, gw = grid
    m = spec.merge_size
    vws = spec.window_size // m // spec.patch_size
    lh, lw = gh // m, gw // m
    index = np.arange(t * lh * lw).reshape(t, lh, lw)
    pad_h, pad_w = vws - lh % vws, vws - lw % vws
    nwh, nww = (lh + pad_h) // vws, (lw + pad_w) // vws
    padded = np.full((t, lh + pad_h, lw + pad_w), -100, dtype=np.int64)
    padded[:, :lh, :lw] = index
    padded = padded.reshape(t, nwh, vws, nww, vws).transpose(0, 1, 3, 2, 4).reshape(t, nwh * nww, vws, vws)
    seqlens = (padded != -100).sum(axis=(2, 3)).reshape(-1)
    flat = padded.reshape(-1)
    order = flat[flat != -100]
    cu = np.concatenate([[0], np.cumsum(seqlens) * m * m])
    return order.astype(np.int64), cu.astype(np.int64)


def rotary_freqs(grid: tuple[int, int, int], spec: VisionSpec) -> np.ndarray:
    """HF rot_pos_emb for one image: (N, head_dim/2) angles, rows in the processor's patch order."""
    t, h, w = grid
    m = spec.merge_size
    hpos = np.broadcast_to(np.arange(h)[:, None], (h, w)).reshape(h // m, m, w // m, m).transpose(0, 2, 1, 3).reshape(-1)
    wpos = np.broadcast_to(np.arange(w)[None, :], (h, w)).reshape(h // m, m, w // m, m).transpose(0, 2, 1, 3).reshape(-1)
    pos = np.tile(np.stack([hpos, wpos], axis=-1), (t, 1))
    dim = spec.head_dim // 2
    inv_freq = (1.0 / (spec.rope_theta ** (np.arange(0, dim, 2, dtype=np.float32) / dim))).astype(np.float32)
    full = np.outer(np.arange(max(h, w), dtype=np.float32), inv_freq).astype(np.float32)
    return full[pos].reshape(pos.shape[0], -1)


@dataclass
class VisionInputs:
    """The ONNX vision graph's inputs for one image."""

    pixel_values: np.ndarray  # (N, patch_dim) float32
    cos: np.ndarray  # (N, head_dim) float32, window order
    sin: np.ndarray  # (N, head_dim) float32, window order
    window_index: np.ndarray  # (N/4,) int64: merged units into window order
    reverse_index: np.ndarray  # (N/4,) int64: back to raster order after the merger
    window_bias: np.ndarray  # (N, N) float32: 0 inside a window, -1e9 across windows
    grid: tuple[int, int, int]

    def feeds(self) -> dict[str, np.ndarray]:
        return {
            "pixel_values": self.pixel_values,
            "cos": self.cos,
            "sin": self.sin,
            "window_index": self.window_index,
            "reverse_index": self.reverse_index,
            "window_bias": self.window_bias,
        }


def vision_inputs(pixels: np.ndarray, spec: VisionSpec) -> VisionInputs:
    patches, grid = preprocess(pixels, spec)
    return vision_inputs_from_patches(patches, grid, spec)


def vision_inputs_from_patches(patches: np.ndarray, grid: tuple[int, int, int], spec: VisionSpec) -> VisionInputs:
    unit = spec.merge_size**2
    n = patches.shape[0]
    order, cu = window_index(grid, spec)
    freqs = rotary_freqs(grid, spec).reshape(n // unit, unit, -1)[order].reshape(n, -1)
    emb = np.concatenate([freqs, freqs], axis=-1)
    cu = np.unique(cu)  # HF unique_consecutive (cu is non-decreasing): empty padded windows vanish
    segment = np.repeat(np.arange(len(cu) - 1), np.diff(cu))
    bias = np.where(segment[:, None] == segment[None, :], np.float32(0), _MASKED).astype(np.float32)
    return VisionInputs(
        pixel_values=patches,
        cos=np.cos(emb).astype(np.float32),
        sin=np.sin(emb).astype(np.float32),
        window_index=order,
        reverse_index=np.argsort(order).astype(np.int64),
        window_bias=bias,
        grid=grid,
    )


def n_image_tokens(grid: tuple[int, int, int], spec: VisionSpec) -> int:
    t, h, w = grid
    return t * h * w // spec.merge_size**2


def mrope_positions(grid: tuple[int, int, int], spec: VisionSpec, start: int) -> tuple[np.ndarray, int]:
    """(4, n) decoder positions of an image's tokens (rows t, y, x, 0 — llama.cpp's section order) and the number
    of positions the image occupies: text after it starts at start + max(merged grid h, merged grid w)."""
    t, h, w = grid
    mh, mw = h // spec.merge_size, w // spec.merge_size
    ys, xs = np.divmod(np.arange(t * mh * mw) % (mh * mw), mw)
    pos = np.zeros((4, t * mh * mw), dtype=np.int32)
    pos[0] = start  # one frame: every token shares the temporal position
    pos[1] = start + ys
    pos[2] = start + xs
    return pos, max(mh, mw)


class VisionEncoder:
    """The exported ONNX vision tower + merger: RGB pixels -> (n_image_tokens, out_hidden_size) embeddings."""

    def __init__(self, onnx_path: str | Path, spec: VisionSpec, threads: int | None = None):
        import onnxruntime as ort

        self.spec = spec
        self.path = Path(onnx_path)
        if not self.path.is_file():
            raise ModelError(f"vision encoder not found: {self.path}")
        from ..cpu import physical_cores

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads or physical_cores()  # ORT's own default ignores CPU affinity
        opts.log_severity_level = 3
        try:
            self.session = ort.InferenceSession(str(self.path), opts, providers=["CPUExecutionProvider"])
        except Exception as e:  # onnxruntime raises its own Fail/InvalidGraph types
            raise ModelError(f"onnxruntime could not load the vision encoder {self.path}: {str(e).splitlines()[0]}") from None

    def encode(self, pixels: np.ndarray) -> tuple[np.ndarray, tuple[int, int, int]]:
        inputs = vision_inputs(pixels, self.spec)
        (embeds,) = self.session.run(["image_embeds"], inputs.feeds())
        return np.asarray(embeds, dtype=np.float32), inputs.grid
