"""Export Qwen2.5-VL's vision tower + patch merger to ONNX (torch at export time only).

optimum has no qwen2_5_vl ONNX config, and the HF forward cannot be traced as is: it derives the rotary angles
and the window permutation from the image grid with Python loops, and splits attention by `cu_seqlens`
(`.tolist()`). The wrapper below keeps every weight and operation of the HF blocks but takes those grid-dependent
pieces as inputs, computed in numpy at run time by `runtime.vision`:

    pixel_values (N, 1176)  cos, sin (N, head_dim)  window_index, reverse_index (N/4,)  window_bias (N, N)

Windowed blocks add `window_bias` (0 inside a window, -1e9 across) to the attention scores; full-attention
blocks (fullatt_block_indexes) attend to every patch of the image. Same math as the HF split, in one matmul.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..runtime.vision import VisionSpec, vision_inputs

INPUT_NAMES = ["pixel_values", "cos", "sin", "window_index", "reverse_index", "window_bias"]
OUTPUT_NAME = "image_embeds"
OPSET = 18


def visual_module(model):
    """The vision tower of a Qwen2_5_VLForConditionalGeneration (its place moved across transformers versions)."""
    inner = getattr(model, "model", None)
    if inner is not None and hasattr(inner, "visual"):
        return inner.visual
    return model.visual


def make_wrapper(visual):
    import torch
    from torch import nn

    class QwenVisionExport(nn.Module):
        def __init__(self, visual):
            super().__init__()
            self.visual = visual
            self.unit = visual.spatial_merge_unit
            self.full = set(int(i) for i in visual.fullatt_block_indexes)

        def attention(self, attn, x, cos, sin, bias):
            n = x.shape[0]
            qkv = attn.qkv(x).reshape(n, 3, attn.num_heads, -1).permute(1, 0, 2, 3)
            q, k, v = qkv[0], qkv[1], qkv[2]  # (n, heads, head_dim)
            c, s = cos.unsqueeze(-2), sin.unsqueeze(-2)
            q = q * c + _rotate_half(q) * s
            k = k * c + _rotate_half(k) * s
            q, k, v = q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1)  # (heads, n, head_dim)
            scores = torch.matmul(q, k.transpose(1, 2)) * attn.scaling
            if bias is not None:
                scores = scores + bias
            probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
            out = torch.matmul(probs, v).transpose(0, 1).reshape(n, -1)
            return attn.proj(out)

        def forward(self, pixel_values, cos, sin, window_index, reverse_index, window_bias):
            vis = self.visual
            h = vis.patch_embed(pixel_values)
            n = h.shape[0]
            h = h.reshape(n // self.unit, self.unit, -1)[window_index].reshape(n, -1)
            for i, blk in enumerate(vis.blocks):
                bias = None if i in self.full else window_bias
                h = h + self.attention(blk.attn, blk.norm1(h), cos, sin, bias)
                h = h + blk.mlp(blk.norm2(h))
            h = vis.merger(h)
            return h[reverse_index]

    def _rotate_half(x):
        half = x.shape[-1] // 2
        return torch.cat((-x[..., half:], x[..., :half]), dim=-1)

    return QwenVisionExport(visual).eval()


def torch_reference(model, pixel_values: np.ndarray, grid: tuple[int, int, int]) -> np.ndarray:
    """The HF vision tower's own forward (split attention, its own rotary/window code) on the same patches."""
    import torch

    vis = visual_module(model)
    with torch.no_grad():
        out = vis(torch.from_numpy(pixel_values), grid_thw=torch.tensor([list(grid)]))
    out = getattr(out, "pooler_output", None) if not isinstance(out, torch.Tensor) else out
    return out.float().numpy()


def export_vision_onnx(model, spec: VisionSpec, out_path: str | Path, sample_pixels: np.ndarray) -> Path:
    """Trace the wrapper on one sample image and write ONNX with a dynamic number of patches."""
    import torch

    wrapper = make_wrapper(visual_module(model))
    inputs = vision_inputs(sample_pixels, spec)
    args = tuple(torch.from_numpy(a) for a in inputs.feeds().values())
    out_path = Path(out_path)
    n, q = "n_patches", "n_tokens"
    with torch.no_grad():
        torch.onnx.export(
            wrapper,
            args,
            str(out_path),
            input_names=INPUT_NAMES,
            output_names=[OUTPUT_NAME],
            opset_version=OPSET,
            dynamic_axes={
                "pixel_values": {0: n},
                "cos": {0: n},
                "sin": {0: n},
                "window_index": {0: q},
                "reverse_index": {0: q},
                "window_bias": {0: n, 1: n},
                OUTPUT_NAME: {0: q},
            },
            dynamo=False,  # the TorchScript exporter handles the data-dependent reshapes with dynamic_axes
        )
    return out_path


def onnx_embeds(onnx_path: str | Path, spec: VisionSpec, pixels: np.ndarray) -> np.ndarray:
    from ..runtime.vision import VisionEncoder

    return VisionEncoder(onnx_path, spec).encode(pixels)[0]


def quantize_int8(src: str | Path, dst: str | Path) -> Path:
    """Dynamic int8 (weights int8, activations quantised per batch) of the MatMul/Gemm weights."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul", "Gemm"])
    return Path(dst)


def cosine_rows(a: np.ndarray, b: np.ndarray) -> float:
    """The smallest per-token cosine similarity between two (n, d) embedding sets."""
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    num = (a64 * b64).sum(-1)
    den = np.linalg.norm(a64, axis=-1) * np.linalg.norm(b64, axis=-1) + 1e-12
    return float((num / den).min())
