"""Numerical parity of the edge artefacts with the original torch model (export time and tests).

- text: next-token logits of a text prompt, GGUF (llama.cpp) vs torch;
- image+text: the same for a prompt with two images, ONNX embeds -> llama.cpp batch with M-RoPE positions vs
  the HF model on the HF processor's pixel values (the reference computes its own positions: get_rope_index);
- negative control: the same image+text run with 1-D positions (each image token its own t = y = x, text
  continuing at start + n) — it must be far off, otherwise the test could not tell positions apart;
- quantised: the quantised GGUF on the image+text prompt: max logit difference and whether the top token agrees.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import numpy as np

from ..runtime.vision import VisionSpec

TEXT_PROMPT = "<|im_start|>user\nWhich finding is most likely? A. Pleural effusion B. Pneumothorax<|im_end|>\n" \
              "<|im_start|>assistant\n<think>"
IMAGE_PROMPT_HEAD = "<|im_start|>user\n"
IMAGE_PROMPT_TAIL = "What does the study show? A. mass B. effusion<|im_end|>\n<|im_start|>assistant\n<think>"


def parity_images() -> list[np.ndarray]:
    """Two real images of different aspect ratios (multi-image prompt), from skimage when available."""
    from .qwen import sample_images

    imgs = sample_images()
    if len(imgs) >= 2:
        a, b = imgs[0], imgs[min(3, len(imgs) - 1)]
    else:
        a = b = imgs[0]
    return [a[::2, ::2].copy(), b[:, : b.shape[1] * 2 // 3].copy()]  # smaller + non-square: fast, exercises windows


def torch_model(checkpoint: str | Path):
    import torch
    from transformers import Qwen2_5_VLForConditionalGeneration

    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(checkpoint, dtype=torch.float32)
    return model.eval()


def torch_text_logits(model, tokenizer, text: str) -> tuple[np.ndarray, list[int]]:
    import torch

    ids = tokenizer(text)["input_ids"]
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0, -1].float().numpy()
    return logits, ids


def torch_image_logits(model, tokenizer, checkpoint, images, head: str, tail: str) -> np.ndarray:
    """HF reference: the HF (slow, PIL) image processor + the full model forward with its own rope index."""
    import torch
    from transformers import AutoImageProcessor

    proc = AutoImageProcessor.from_pretrained(checkpoint, use_fast=False)
    config = json.loads((Path(checkpoint) / "config.json").read_text())
    batch = proc(images=list(images), return_tensors="pt")
    ids = tokenizer(head)["input_ids"]
    for grid in batch["image_grid_thw"]:
        n = int(grid.prod()) // proc.merge_size**2
        ids += tokenizer("<|vision_start|>")["input_ids"] + [config["image_token_id"]] * n
        ids += tokenizer("<|vision_end|>")["input_ids"]
    ids += tokenizer(tail)["input_ids"]
    with torch.no_grad():
        out = model(input_ids=torch.tensor([ids]), pixel_values=batch["pixel_values"],
                    image_grid_thw=batch["image_grid_thw"])
    return out.logits[0, -1].float().numpy()


def edge_image_logits(gguf: Path, vision_onnx: Path, spec: VisionSpec, images, head: str, tail: str,
                      one_d_positions: bool = False) -> np.ndarray:
    from ..runtime.backend import ImageInput
    from ..runtime.multimodal_backend import QwenVLBackend

    parts: list = [head]
    for img in images:
        parts += ["<|vision_start|>", ImageInput(img, ""), "<|vision_end|>"]
    parts.append(tail)
    with QwenVLBackend(gguf, vision_onnx, spec, n_ctx=4096) as be:
        be.one_d_positions = one_d_positions
        be.prefill(parts)
        return be.last_logits()


def max_diff(a: np.ndarray, b: np.ndarray) -> float:
    n = min(a.shape[0], b.shape[0])  # GGUF may pad the vocabulary
    return float(np.abs(a[:n] - b[:n]).max())


def bundle_parity(checkpoint: str | Path, gguf: Path, vision_onnx: Path, spec: VisionSpec,
                  quantised: Optional[Path] = None) -> dict:
    from transformers import AutoTokenizer

    from ..runtime import llama_native

    model = torch_model(checkpoint)
    tok = AutoTokenizer.from_pretrained(checkpoint)
    ref_text, ids = torch_text_logits(model, tok, TEXT_PROMPT)
    m = llama_native.NativeModel(gguf)
    try:
        ctx = llama_native.NativeContext(m, 1024, 512, llama_native.physical_cores())
        try:
            ctx.decode_tokens(ids, 0)
            text = np.array(ctx.last_logits(), dtype=np.float32)
        finally:
            ctx.close()
    finally:
        m.close()
    images = parity_images()
    ref_img = torch_image_logits(model, tok, checkpoint, images, IMAGE_PROMPT_HEAD, IMAGE_PROMPT_TAIL)
    edge = edge_image_logits(gguf, vision_onnx, spec, images, IMAGE_PROMPT_HEAD, IMAGE_PROMPT_TAIL)
    wrong = edge_image_logits(gguf, vision_onnx, spec, images, IMAGE_PROMPT_HEAD, IMAGE_PROMPT_TAIL, one_d_positions=True)
    n = ref_img.shape[0]
    result = {
        "text_logits_max_abs_diff": max_diff(text, ref_text),
        "image_text_logits_max_abs_diff": max_diff(edge, ref_img),
        "negative_control_1d_positions_max_abs_diff": max_diff(wrong, ref_img),
        "logit_scale": float(np.abs(ref_img).max()),
        "top_token_agrees": bool(edge[:n].argmax() == ref_img.argmax()),
    }
    if quantised is not None:
        q = edge_image_logits(quantised, vision_onnx, spec, images, IMAGE_PROMPT_HEAD, IMAGE_PROMPT_TAIL)
        result["quantised_image_text_logits_max_abs_diff"] = max_diff(q, ref_img)
        result["quantised_top_token_agrees"] = bool(q[:n].argmax() == ref_img.argmax())
    return result
