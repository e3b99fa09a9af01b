"""Numerical parity of the edge artefacts with the original torch model: the export's gates (and the tests').

Checks, each on the next-token logits at the end of a probe prompt, judged RELATIVE to the logit scale (the
largest |logit| torch gives on that probe), so one bound holds for a tiny random model and a 7B:

- text: a short probe set of text prompts, the unquantised GGUF (llama.cpp) vs torch;
- image+text: a prompt with two images, ONNX embeds -> llama.cpp batch with M-RoPE positions vs the HF model on
  the HF processor's pixel values (the reference computes its own positions: get_rope_index);
- negative control: the same image+text run with 1-D positions (each image token its own t = y = x, text
  continuing at start + n). It must miss the reference by several times the image+text bound, otherwise the
  image+text check could not tell right positions from wrong ones and proves nothing;
- quantised: the quantised GGUF on every probe (text + image): the share of probes whose top-1 token agrees with
  torch's (its max logit difference is recorded, not gated: quantisation error is expected).

Two torch references, same probes, same numbers:

- `FullReference`: the whole HF model in RAM (float32; checkpoints up to 2 GB of weights by default);
- `layered_reference.LayeredReference`: for larger checkpoints (a 7B needs ~32 GB as float32), the decoder one
  layer at a time from the safetensors (peak memory: one layer + the vision tower + activations).

`check_gates(result)` raises `ParityError` naming the first failing check and its figure; the exporter calls it
before the bundle directory is published, so a failing export leaves nothing behind.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np

from ..errors import ModelError
from ..runtime.vision import VisionSpec

TEXT_PROMPT = "<|im_start|>user\nWhich finding is most likely? A. Pleural effusion B. Pneumothorax<|im_end|>\n" \
              "<|im_start|>assistant\n<think>"
IMAGE_PROMPT_HEAD = "<|im_start|>user\n"
IMAGE_PROMPT_TAIL = "What does the study show? A. mass B. effusion<|im_end|>\n<|im_start|>assistant\n<think>"
# The text probe set: short, so the layered path stays bounded; ends where a Med-RwR model writes its first
# reasoning, query or answer token.
TEXT_PROBES = (
    TEXT_PROMPT,
    "<|im_start|>user\nA 64-year-old smoker has haemoptysis and a 3 cm spiculated lung mass. Next step?<|im_end|>\n"
    "<|im_start|>assistant\n<think> The mass is suspicious for carcinoma. </think>\n<query>",
    "<|im_start|>user\nCT of the abdomen: hypodense liver lesion, 3.5 cm, peripheral enhancement.<|im_end|>\n"
    "<|im_start|>assistant\n<think> Peripheral nodular enhancement suggests a haemangioma. </think>\n<answer>",
    "<|im_start|>user\nWhich ICD-10-CM code is lobar pneumonia, unspecified organism? A. J18.1 B. J15.9"
    "<|im_end|>\n<|im_start|>assistant\n<think>",
)

Progress = Callable[[str], None]


class ParityError(ModelError):
    """An exported artefact does not reproduce the torch model within its bound."""


@dataclass(frozen=True)
class Bounds:
    """Parity bounds, relative to the logit scale (max |torch logit| on the probe). Recorded in the manifest."""

    text_rel: float  # unquantised GGUF vs torch, text probes
    image_text_rel: float  # the ONNX-embeds path vs torch, image+text probe
    negative_control_min_rel: float  # 1-D positions must miss torch by at least this much
    quantised_min_top1_agreement: float  # share of probes whose top-1 token the quantised GGUF keeps

    def to_dict(self) -> dict:
        return {**asdict(self), "relative_to": "max |torch logit| of each probe"}


# f32 GGUF: llama.cpp's KV cache is f16 even for f32 weights; measured on the tiny fixture: text 6.9e-4, image+text
# 1.5e-4 of the scale. f16 GGUF (checkpoints >= 512 MB): f16 weights too; measured 1.1e-3 / 1.5e-3 (tiny, layered).
# A scaled tensor (test) or 1-D image positions (negative control, 2.7e-1) miss by far more.
_UNQUANTISED_REL = {"f32": 5e-3, "f16": 2e-2}
NEGATIVE_CONTROL_FACTOR = 3.0  # the negative control must miss by >= 3x the image+text bound
# Share of probes (text + image) whose top-1 token the quantised decoder keeps. k-quants may flip a near tie on one
# of the five probes; q8_0 and f16 may not.
_QUANT_MIN_TOP1 = {"q4_k_m": 0.8, "q5_k_m": 0.8, "q8_0": 1.0, "f16": 1.0, "f32": 1.0}


def bounds_for(base_type: str, quant: str) -> Bounds:
    rel = _UNQUANTISED_REL[base_type]
    return Bounds(rel, rel, NEGATIVE_CONTROL_FACTOR * rel, _QUANT_MIN_TOP1.get(quant, 0.8))


def parity_images() -> list[np.ndarray]:
    """Two real images of different aspect ratios (multi-image prompt), from skimage when available."""
    from .qwen import sample_images

    imgs = sample_images()
    if len(imgs) >= 2:
        a, b = imgs[0], imgs[min(3, len(imgs) - 1)]
    else:
        a = b = imgs[0]
    return [a[::2, ::2].copy(), b[:, : b.shape[1] * 2 // 3].copy()]  # smaller + non-square: fast, exercises windows


# ---------------------------------------------------------------------------------------------- torch side


def torch_model(checkpoint: str | Path):
    import torch
    from transformers import Qwen2_5_VLForConditionalGeneration

    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(checkpoint, dtype=torch.float32)
    return model.eval()


@dataclass
class ImageProbe:
    ids: list[int]
    pixel_values: object  # torch tensor from the HF (slow, PIL) image processor
    grid_thw: object  # torch tensor (n_images, 3)


def image_probe(tokenizer, checkpoint, images, head: str, tail: str) -> ImageProbe:
    """The HF reference's input: the HF image processor's pixels and `<|image_pad|>` x n per image."""
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
    return ImageProbe(ids, batch["pixel_values"], batch["image_grid_thw"])


def torch_text_logits(model, tokenizer, text: str) -> tuple[np.ndarray, list[int]]:
    import torch

    ids = tokenizer(text)["input_ids"]
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0, -1].float().numpy()
    return logits, ids


def torch_image_logits(model, tokenizer, checkpoint, images, head: str, tail: str) -> np.ndarray:
    """HF reference: the HF (slow, PIL) image processor + the full model forward with its own rope index."""
    return FullReference(model).logits([], image_probe(tokenizer, checkpoint, images, head, tail))[1]


class FullReference:
    """The whole HF model in RAM."""

    method = "full"

    def __init__(self, model):
        self.model = model

    def logits(self, text_ids: Sequence[list[int]], probe: Optional[ImageProbe]) -> tuple[list[np.ndarray], Optional[np.ndarray]]:
        import torch

        with torch.no_grad():
            texts = [self.model(input_ids=torch.tensor([ids])).logits[0, -1].float().numpy() for ids in text_ids]
            image = None
            if probe is not None:
                out = self.model(input_ids=torch.tensor([probe.ids]), pixel_values=probe.pixel_values,
                                 image_grid_thw=probe.grid_thw)
                image = out.logits[0, -1].float().numpy()
        return texts, image


# ---------------------------------------------------------------------------------------------- edge side


def _image_parts(images, head: str, tail: str) -> list:
    from ..runtime.backend import ImageInput

    parts: list = [head]
    for img in images:
        parts += ["<|vision_start|>", ImageInput(img, ""), "<|vision_end|>"]
    parts.append(tail)
    return parts


def edge_image_logits(gguf: Path, vision_onnx: Path, spec: VisionSpec, images, head: str, tail: str,
                      one_d_positions: bool = False) -> np.ndarray:
    from ..runtime.multimodal_backend import QwenVLBackend

    with QwenVLBackend(gguf, vision_onnx, spec, n_ctx=4096) as be:
        be.one_d_positions = one_d_positions
        be.prefill(_image_parts(images, head, tail))
        return be.last_logits()


def edge_logits(gguf: Path, vision_onnx: Path, spec: VisionSpec, text_ids: Sequence[list[int]], images,
                negative_control: bool = False) -> tuple[list[np.ndarray], np.ndarray, Optional[np.ndarray]]:
    """llama.cpp logits for the text probes (same token ids as torch), the image+text probe, and optionally the
    image+text probe with 1-D positions (negative control); one model load."""
    from ..runtime.multimodal_backend import QwenVLBackend

    parts = _image_parts(images, IMAGE_PROMPT_HEAD, IMAGE_PROMPT_TAIL)
    with QwenVLBackend(gguf, vision_onnx, spec, n_ctx=4096) as be:
        texts = []
        for ids in text_ids:
            be.reset()
            be.prefill_tokens(ids)
            texts.append(be.last_logits())
        be.reset()
        be.prefill(parts)
        image = be.last_logits()
        wrong = None
        if negative_control:
            be.reset()
            be.one_d_positions = True
            be.prefill(parts)
            wrong = be.last_logits()
    return texts, image, wrong


def max_diff(a: np.ndarray, b: np.ndarray) -> float:
    n = min(a.shape[0], b.shape[0])  # GGUF may pad the vocabulary
    return float(np.abs(a[:n] - b[:n]).max())


def _rel(edge: np.ndarray, ref: np.ndarray) -> float:
    return max_diff(edge, ref) / max(float(np.abs(ref).max()), 1e-9)


def _top1(edge: np.ndarray, ref: np.ndarray) -> bool:
    return bool(edge[: ref.shape[0]].argmax() == ref.argmax())


# ---------------------------------------------------------------------------------------------- the gates


def bundle_parity(checkpoint: str | Path, gguf: Path, vision_onnx: Path, spec: VisionSpec, *,
                  quantised: Optional[Path] = None, quant: str = "f32", base_type: str = "f32",
                  method: str = "full", tower=None, progress: Optional[Progress] = None) -> dict:
    """Every check's figures, the bounds and which reference was used (`method`: "full" or "layer-by-layer")."""
    from transformers import AutoTokenizer

    say = progress or (lambda msg: None)
    t0 = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(checkpoint)
    text_ids = [tok(p)["input_ids"] for p in TEXT_PROBES]
    images = parity_images()
    probe = image_probe(tok, checkpoint, images, IMAGE_PROMPT_HEAD, IMAGE_PROMPT_TAIL)
    if method == "full":
        ref = FullReference(torch_model(checkpoint))
    elif method == "layer-by-layer":
        from .layered_reference import LayeredReference

        ref = LayeredReference(checkpoint, tower=tower)
    else:
        raise ValueError(f"unknown parity method {method!r}")
    say(f"parity: torch reference ({ref.method}) on {len(text_ids)} text probes + 1 image+text probe")
    t_ref = time.perf_counter()
    ref_texts, ref_img = ref.logits(text_ids, probe)
    t_ref = time.perf_counter() - t_ref
    layered = {"layer_seconds": [round(s, 3) for s in ref.layer_seconds],
               "peak_layer_bytes_f32": ref.peak_layer_bytes} if ref.method == "layer-by-layer" else {}
    method = ref.method
    del ref  # the torch model's memory is needed for llama.cpp now
    say("parity: GGUF + ONNX-embeds path on the same probes, and the 1-D-positions negative control")
    texts, img, wrong = edge_logits(gguf, vision_onnx, spec, text_ids, images, negative_control=True)
    bounds = bounds_for(base_type, quant)
    result = {
        "method": method,
        "probes": {"text": len(text_ids), "image_text": 1, "image_tokens": int(sum(
            int(g.prod()) for g in probe.grid_thw) // 4), "longest_text_tokens": max(len(i) for i in text_ids)},
        "bounds": bounds.to_dict(),
        "unquantised_gguf": gguf.name,
        "logit_scale": float(np.abs(ref_img).max()),
        "text_logits_max_rel_diff": max(_rel(e, r) for e, r in zip(texts, ref_texts)),
        "text_logits_max_abs_diff": max(max_diff(e, r) for e, r in zip(texts, ref_texts)),
        "image_text_logits_max_rel_diff": _rel(img, ref_img),
        "image_text_logits_max_abs_diff": max_diff(img, ref_img),
        "negative_control_1d_positions_rel_diff": _rel(wrong, ref_img),
        "negative_control_1d_positions_max_abs_diff": max_diff(wrong, ref_img),
        "top_token_agrees": _top1(img, ref_img) and all(_top1(e, r) for e, r in zip(texts, ref_texts)),
    }
    if quantised is not None:
        say(f"parity: quantised {quantised.name} on the same probes")
        q_texts, q_img, _ = edge_logits(quantised, vision_onnx, spec, text_ids, images)
        agree = [_top1(e, r) for e, r in zip(q_texts + [q_img], ref_texts + [ref_img])]
        result.update({
            "quantised_gguf": quantised.name,
            "quantised_top1_agreement": sum(agree) / len(agree),
            "quantised_top_token_agrees": all(agree),
            "quantised_logits_max_rel_diff": max(_rel(e, r) for e, r in zip(q_texts + [q_img], ref_texts + [ref_img])),
            "quantised_image_text_logits_max_abs_diff": max_diff(q_img, ref_img),
        })
    result.update(layered)
    result["seconds"] = {"torch_reference": round(t_ref, 3), "total": round(time.perf_counter() - t0, 3)}
    return result


def check_gates(result: dict) -> None:
    """Raise ParityError for the first check out of bounds, naming it and its figure (one line)."""
    b = result["bounds"]
    checks = [
        ("text logits (GGUF vs torch)", result["text_logits_max_rel_diff"], "<=", b["text_rel"]),
        ("image+text logits (ONNX embeds + GGUF vs torch)", result["image_text_logits_max_rel_diff"], "<=",
         b["image_text_rel"]),
        ("negative control (1-D positions must miss torch)", result["negative_control_1d_positions_rel_diff"], ">=",
         b["negative_control_min_rel"]),
    ]
    if "quantised_top1_agreement" in result:
        checks.append((f"quantised top-1 agreement ({result['quantised_gguf']})", result["quantised_top1_agreement"],
                       ">=", b["quantised_min_top1_agreement"]))
    for name, value, op, bound in checks:
        ok = value <= bound if op == "<=" else value >= bound
        if not ok:
            unit = "" if name.startswith("quantised") else " of the logit scale"
            raise ParityError(f"parity check failed: {name}: {value:.3g}{unit}, bound {op} {bound:.3g}; "
                              "no bundle written (--no-parity skips the checks, and says so in the manifest)")
