"""An image-pack encoder from the model's own vision tower: Qwen2.5-VL tower + merger, mean-pooled, L2-normalised.

CDIR compares the question image with reference images. Building the reference pack with this encoder puts
both in the space of the vision tower Med-RwR was trained with, instead of a generic ImageNet CNN's.

The pack format's `ImageEncoder` feeds a fixed-size NCHW batch (squash-resized to `image_size`, 0..1, CLIP
mean/std). Because the size is fixed, everything grid-dependent (patch order, rotary angles, window permutation
and mask) is a constant of the graph, computed once here by `runtime.vision` and stored as buffers; the graph
patchifies the batch in the HF processor's order and runs the tower on all images at once (attention per image).
Output `image_embedding` (B, out_hidden_size): the mean of the image's merged tokens; the spec says normalize.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..runtime.vision import VisionSpec, vision_inputs_from_patches

INPUT_NAME = "pixel_values"
OUTPUT_NAME = "image_embedding"
DEFAULT_SIZE = 224  # 16 x 16 patches -> 64 tokens: cheap enough to embed thousands of reference images


def make_pooled_wrapper(visual, spec: VisionSpec, size: int):
    import torch
    from torch import nn

    p, m, tp = spec.patch_size, spec.merge_size, spec.temporal_patch_size
    if size % (p * m):
        raise ValueError(f"image size must be a multiple of {p * m}")
    g = size // p
    dummy = np.zeros((g * g, spec.patch_dim), dtype=np.float32)
    inputs = vision_inputs_from_patches(dummy, (1, g, g), spec)

    class PooledQwenVision(nn.Module):
        def __init__(self):
            super().__init__()
            self.visual = visual
            self.full = set(int(i) for i in visual.fullatt_block_indexes)
            self.register_buffer("cos", torch.from_numpy(inputs.cos))
            self.register_buffer("sin", torch.from_numpy(inputs.sin))
            self.register_buffer("window_index", torch.from_numpy(inputs.window_index))
            self.register_buffer("reverse_index", torch.from_numpy(inputs.reverse_index))
            self.register_buffer("window_bias", torch.from_numpy(inputs.window_bias))

        def patchify(self, x):
            b, c = x.shape[0], x.shape[1]
            x = x.unsqueeze(1).expand(b, tp, c, size, size)  # one image = tp identical frames
            x = x.reshape(b, 1, tp, c, g // m, m, p, g // m, m, p)
            x = x.permute(0, 1, 4, 7, 5, 8, 3, 2, 6, 9)  # the HF processor's order, with a batch axis in front
            return x.reshape(b * g * g, c * tp * p * p)

        def attention(self, attn, x, bias):
            b, n, _ = x.shape
            qkv = attn.qkv(x).reshape(b, n, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4)
            q, k, v = qkv[0], qkv[1], qkv[2]  # (b, heads, n, head_dim)
            c, s = self.cos.unsqueeze(0), self.sin.unsqueeze(0)
            q = q * c + _rotate_half(q) * s
            k = k * c + _rotate_half(k) * s
            scores = torch.matmul(q, k.transpose(-1, -2)) * attn.scaling
            if bias is not None:
                scores = scores + bias
            out = torch.matmul(torch.softmax(scores, dim=-1), v)  # (b, heads, n, head_dim)
            return attn.proj(out.transpose(1, 2).reshape(b, n, -1))

        def forward(self, pixel_values):
            vis = self.visual
            b = pixel_values.shape[0]
            n = g * g
            unit = m * m
            h = vis.patch_embed(self.patchify(pixel_values)).reshape(b, n // unit, unit, -1)
            h = h[:, self.window_index].reshape(b, n, -1)
            for i, blk in enumerate(vis.blocks):
                h = h + self.attention(blk.attn, blk.norm1(h), None if i in self.full else self.window_bias)
                h = h + blk.mlp(blk.norm2(h))
            merged = vis.merger.mlp(vis.merger.ln_q(h).reshape(b, n // unit, -1))
            return merged[:, self.reverse_index].mean(dim=1)

    def _rotate_half(x):
        half = x.shape[-1] // 2
        return torch.cat((-x[..., half:], x[..., :half]), dim=-1)

    return PooledQwenVision().eval()


def export_image_encoder(visual, spec: VisionSpec, out_dir: str | Path, name: str, size: int = DEFAULT_SIZE) -> Path:
    """Write model.onnx + encoder.json (kb_pack.encoders format) into out_dir (which must exist)."""
    import torch

    from ..kb_pack.encoders import EncoderSpec, write_spec
    from ..paths import sha256_file

    out_dir = Path(out_dir)
    wrapper = make_pooled_wrapper(visual, spec, size)
    sample = torch.zeros(2, spec.in_channels, size, size)
    onnx_path = out_dir / "model.onnx"
    with torch.no_grad():
        torch.onnx.export(wrapper, (sample,), str(onnx_path), input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                          opset_version=18, dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
                          dynamo=False)
    enc_spec = EncoderSpec(
        kind="image",
        name=name,
        dim=spec.out_hidden_size,
        onnx_file="model.onnx",
        onnx_sha256=sha256_file(onnx_path),
        output_name=OUTPUT_NAME,
        pooling="none",  # pooled in the graph
        normalize=True,
        input_name=INPUT_NAME,
        image_size=size,
        resize_mode="squash",
        pixel_scale="0..1",
        mean=list(spec.image_mean),
        std=list(spec.image_std),
        layout="NCHW",
    )
    write_spec(out_dir, enc_spec)
    return out_dir


def torch_pooled_reference(visual, spec: VisionSpec, pixels_square: np.ndarray) -> np.ndarray:
    """The HF tower's own forward on the HF-processed image (already size x size), mean-pooled, L2-normalised."""
    from .qwen_vision import torch_reference
    from ..runtime.vision import preprocess

    patches, grid = preprocess(pixels_square, spec)
    holder = type("Holder", (), {"visual": visual})()
    v = torch_reference(holder, patches, grid).mean(axis=0)
    return v / np.linalg.norm(v)
