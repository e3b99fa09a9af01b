"""Models, prompts and token log-probabilities for training: the one place that turns rows into tensors.

* `load_model(path)`: a local Hugging Face checkpoint directory (never a hub id): Qwen2.5-VL (vision) or any
  causal LM, with its tokenizer, and for Qwen2.5-VL the image preprocessing spec.
* `encode(...)`: prompt + response → input_ids / attention mask / loss mask (+ pixel_values / image_grid_thw).
  The prompt text is built by `medrwr_edge.runtime.protocol.chatml_prompt`, and images are preprocessed by
  `medrwr_edge.runtime.vision.preprocess` (equal to HF's Qwen2VLImageProcessor, pinned by the export tests), so
  the model trains on exactly the tokens and pixels the edge runtime feeds it. Prompt and response are
  tokenised separately, as the runtime does (it encodes the prompt, then decodes the continuation).
* `token_logprobs` / `sequence_logprobs`: log p(response tokens | prefix), shared by SFT, DPO and GRPO.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

from ..errors import InputError, ModelError
from ..runtime import protocol

VISION_MODEL_TYPES = ("qwen2_5_vl", "qwen2_vl")
IMAGE_PAD = "<|image_pad|>"
END_OF_TURN = "<|im_end|>"
# A retrieved block is written by the search engine, not the model: SFT/GRPO give its tokens no loss.
RETRIEVE_SPAN_RE = re.compile(r"<retrieve>.*?</retrieve>\n?", re.S)


@dataclass
class LoadedModel:
    model: Any  # transformers PreTrainedModel
    tokenizer: Any
    path: Path
    vision: bool  # Qwen2.5-VL: images go into the prompt
    vision_spec: Any = None  # runtime.vision.VisionSpec for Qwen2.5-VL

    @property
    def pad_id(self) -> int:
        tok = self.tokenizer
        pid = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        return int(pid if pid is not None else 0)


def check_model_dir(path: str | Path) -> Path:
    path = Path(path)
    if not path.is_dir():
        raise InputError(f"model must be a local Hugging Face checkpoint directory: {path} is not a directory")
    if not (path / "config.json").is_file():
        raise InputError(f"no config.json in {path}: not a Hugging Face checkpoint directory")
    if not any(path.glob("*.safetensors")):
        raise InputError(f"no *.safetensors weights in {path} (pickled .bin weights are not loaded)")
    return path


def load_model(path: str | Path, *, for_training: bool = True) -> LoadedModel:
    """Load a local checkpoint in fp32 (master weights; bf16 comes from autocast on GPU)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    path = check_model_dir(path)
    try:
        config = AutoConfig.from_pretrained(path, local_files_only=True)
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        if config.model_type in VISION_MODEL_TYPES:
            from transformers import Qwen2_5_VLForConditionalGeneration

            model = Qwen2_5_VLForConditionalGeneration.from_pretrained(
                path, local_files_only=True, dtype=torch.float32, use_safetensors=True)
        else:
            model = AutoModelForCausalLM.from_pretrained(
                path, local_files_only=True, dtype=torch.float32, use_safetensors=True)
    except (OSError, ValueError, KeyError) as e:
        raise ModelError(f"cannot load the checkpoint in {path}: {str(e).splitlines()[0]}") from None
    spec = None
    vision = config.model_type in VISION_MODEL_TYPES
    if vision:
        from ..runtime.vision import VisionSpec

        pre = path / "preprocessor_config.json"
        if not pre.is_file():
            raise InputError(f"no preprocessor_config.json in {path}: a Qwen2.5-VL checkpoint needs it for images")
        spec = VisionSpec.from_hf(json.loads((path / "config.json").read_text("utf-8")),
                                  json.loads(pre.read_text("utf-8")))
    model.train(for_training)
    return LoadedModel(model, tokenizer, path, vision, spec)


# ---- prompts ------------------------------------------------------------------------------------------------------


def prompt_text(messages: Sequence[dict], n_images: int, vision: bool, system: Optional[str] = None) -> str:
    """ChatML for `messages` (system?/user/assistant..., ending before the reply) up to the assistant header.

    No system message → the Med-RwR protocol's system prompt (image or text variant), as `ask` uses. Images go
    first in the first user turn; a text-only model gets none (as at run time). A single user turn is built by
    `protocol.chatml_prompt` itself, so it is byte-identical to the runtime's prompt.
    """
    msgs = list(messages)
    if msgs and msgs[0]["role"] == "system":
        system, msgs = msgs[0]["content"], msgs[1:]
    if system is None:
        system = protocol.system_prompt(has_image=vision and n_images > 0)
    placeholders = [_ImageSlot()] * n_images
    if len(msgs) == 1 and msgs[0]["role"] == "user":
        parts = protocol.chatml_prompt(system, protocol.neutralise_control_tokens(msgs[0]["content"]),
                                       placeholders, vision=vision)
        return protocol.prompt_text(parts)
    text = f"<|im_start|>system\n{system}<|im_end|>\n"
    images_done = False
    for m in msgs:
        content = protocol.neutralise_control_tokens(m["content"])
        if m["role"] == "user" and not images_done:
            images = "".join(f"{protocol.VISION_START}{IMAGE_PAD}{protocol.VISION_END}" for _ in placeholders)
            content = (images if vision else "") + content
            images_done = True
        text += f"<|im_start|>{m['role']}\n{content}<|im_end|>\n"
    return text + "<|im_start|>assistant\n"


class _ImageSlot:
    """Stands in for an ImageInput: chatml_prompt only places it; prompt_text renders it as <|image_pad|>."""


# ---- encoding -----------------------------------------------------------------------------------------------------


@dataclass
class Encoded:
    """One tokenised example. `loss_mask[i]` = 1 where token i is a response token the model is trained on."""

    input_ids: list[int]
    loss_mask: list[int]
    pixel_values: Any = None  # float32 tensor (n_patches, patch_dim) or None
    image_grid_thw: Any = None  # int64 tensor (n_images, 3) or None
    truncated: bool = False
    meta: dict = field(default_factory=dict)

    @property
    def response_tokens(self) -> int:
        return int(sum(self.loss_mask))


def encode(lm: LoadedModel, messages: Sequence[dict], response: str, images: Sequence[str | Any] = (),
           *, max_length: int, mask_retrieved: bool = True, system: Optional[str] = None) -> Encoded:
    """Tokenise prompt (messages) + response + <|im_end|>; the loss mask covers the response only, minus
    `<retrieve>…</retrieve>` blocks (written by the search engine) when `mask_retrieved`."""
    import torch

    tok = lm.tokenizer
    n_images = len(images) if lm.vision else 0
    text = prompt_text(messages, n_images, lm.vision, system)
    pixel_values = grid = None
    if n_images:
        from ..runtime.vision import n_image_tokens, preprocess

        patches, grids = [], []
        for img in images:
            pixels = _pixels(img)
            p, g = preprocess(pixels, lm.vision_spec)
            patches.append(torch.from_numpy(p))
            grids.append(list(g))
        # Each <|image_pad|> placeholder becomes one token per merged 2x2 patch, as Qwen2.5-VL's processor does.
        pieces = text.split(IMAGE_PAD)
        text = pieces[0] + "".join(IMAGE_PAD * n_image_tokens(tuple(g), lm.vision_spec) + rest
                                   for g, rest in zip(grids, pieces[1:]))
        pixel_values = torch.cat(patches).float()
        grid = torch.tensor(grids, dtype=torch.long)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    mask = [0] * len(ids)
    for segment, trained in _response_segments(protocol.neutralise_control_tokens(response), mask_retrieved):
        seg_ids = tok(segment, add_special_tokens=False)["input_ids"]
        ids += seg_ids
        mask += [int(trained)] * len(seg_ids)
    end = tok.convert_tokens_to_ids(END_OF_TURN)
    if end is None or end == tok.unk_token_id:
        end = tok.eos_token_id
    ids.append(int(end))
    mask.append(1)  # the model must learn to stop
    truncated = len(ids) > max_length
    if truncated:
        if sum(mask[:max_length]) == 0:
            raise InputError(f"max_length {max_length} cuts off the whole response (the prompt alone is "
                             f"{mask.index(1) if 1 in mask else len(ids)} tokens)")
        ids, mask = ids[:max_length], mask[:max_length]
        if n_images and ids.count(tok.convert_tokens_to_ids(IMAGE_PAD)) != int(grid.prod(-1).sum()) // \
                lm.vision_spec.merge_size ** 2:
            raise InputError(f"max_length {max_length} cuts through an image's tokens; raise max_length")
    return Encoded(ids, mask, pixel_values, grid, truncated)


def _response_segments(response: str, mask_retrieved: bool) -> list[tuple[str, bool]]:
    if not mask_retrieved:
        return [(response, True)]
    out, pos = [], 0
    for m in RETRIEVE_SPAN_RE.finditer(response):
        if m.start() > pos:
            out.append((response[pos:m.start()], True))
        out.append((m.group(0), False))
        pos = m.end()
    if pos < len(response):
        out.append((response[pos:], True))
    return out


def _pixels(img):
    """A path (PNG/JPEG/DICOM via medrwr_edge.imaging, as `ask` reads it) or an RGB uint8 array."""
    if isinstance(img, (str, Path)):
        from ..imaging import load_image

        return load_image(img).pixels
    return img


def collate(examples: Sequence[Encoded], pad_id: int) -> dict:
    """Right-pad to the longest example: input_ids, attention_mask, loss_mask (+ pixel_values, image_grid_thw)."""
    import torch

    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    attn = torch.zeros((len(examples), width), dtype=torch.long)
    loss = torch.zeros((len(examples), width), dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e.input_ids)
        ids[i, :n] = torch.tensor(e.input_ids)
        attn[i, :n] = 1
        loss[i, :n] = torch.tensor(e.loss_mask)
    batch = {"input_ids": ids, "attention_mask": attn, "loss_mask": loss}
    with_images = [e for e in examples if e.pixel_values is not None]
    if with_images:
        batch["pixel_values"] = torch.cat([e.pixel_values for e in with_images])
        batch["image_grid_thw"] = torch.cat([e.image_grid_thw for e in with_images])
    return batch


def model_inputs(batch: dict, device) -> dict:
    """The tensors the model's forward takes (loss_mask stays with the caller), moved to `device`."""
    keys = ("input_ids", "attention_mask", "pixel_values", "image_grid_thw")
    return {k: batch[k].to(device) for k in keys if k in batch}


# ---- log-probabilities --------------------------------------------------------------------------------------------


def token_logprobs(model, input_ids, attention_mask, labels_mask, **extra):
    """log p(token t | tokens < t) for t = 1..T-1, and the mask of tokens that count: (logp, mask), both (B, T-1).

    logp is 0 where the mask is 0. Computed as logit[token] - logsumexp(logits) in fp32, which does not keep a
    second (B, T, vocab) log-softmax tensor alive.
    """
    import torch

    logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **extra).logits
    logits = logits[:, :-1].float()
    targets = input_ids[:, 1:]
    picked = torch.gather(logits, -1, targets.unsqueeze(-1)).squeeze(-1)
    logp = picked - torch.logsumexp(logits, dim=-1)
    anchor = vision_anchor(model, extra)
    if anchor is not None:
        logp = logp + anchor
    mask = (labels_mask[:, 1:] * attention_mask[:, 1:]).to(logp.dtype)
    return logp * mask, mask


def sequence_logprobs(model, input_ids, attention_mask, labels_mask, **extra):
    """Sum of log p over the masked (response) tokens of each sequence: (B,)."""
    logp, mask = token_logprobs(model, input_ids, attention_mask, labels_mask, **extra)
    return logp.sum(-1)


def vision_anchor(model, extra: dict):
    """0 x (the vision tower on a one-token dummy image), for a text-only batch of a vision model in a
    distributed run; None otherwise.

    DDP and FSDP reduce the gradients of every parameter on every rank in the same order. A rank whose batch has
    no image never runs the vision tower, so it would skip those reductions while a rank with an image waits in
    them: a hang or a collective mismatch. Running the tower on the smallest possible input keeps every rank's
    graph the same; multiplying by zero keeps the loss and the gradients exactly what they were.
    """
    import torch
    import torch.distributed as dist

    if "pixel_values" in extra or not (dist.is_available() and dist.is_initialized()):
        return None
    inner = getattr(model, "module", model)  # DDP wrapper
    visual = getattr(getattr(inner, "model", None), "visual", None) or getattr(inner, "visual", None)
    if visual is None:
        return None
    cfg = visual.config
    merge = int(getattr(cfg, "spatial_merge_size", 2))
    patch_dim = int(cfg.in_channels if hasattr(cfg, "in_channels") else cfg.in_chans) * \
        int(cfg.temporal_patch_size) * int(cfg.patch_size) ** 2
    param = next(visual.parameters())
    pixels = torch.zeros((merge * merge, patch_dim), device=param.device, dtype=param.dtype)
    grid = torch.tensor([[1, merge, merge]], device=param.device)
    out = visual(pixels, grid_thw=grid)
    out = out.pooler_output if hasattr(out, "pooler_output") else out
    return 0.0 * out.float().sum()
