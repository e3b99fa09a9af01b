"""Tiny random Qwen2.5-VL checkpoints for the export and multimodal tests (needs the `[export]` extra).

`make_tiny_qwen25vl(out_dir)` writes a Hugging Face-format checkpoint of a few MB in seconds:
config.json + model.safetensors, a byte-level BPE tokenizer trained offline here with `tokenizers` (Qwen2's
pre-tokenizer regex and Qwen's special tokens), tokenizer_config.json with the Qwen2-VL chat template, and
preprocessor_config.json with the training max_pixels (262144).

The weights are random but scaled up (initializer_range 0.1, 5x the HF default) so the logits depend strongly on positions: a
parity test with wrong positions then fails by far more than its tolerance (the negative control).
"""

from __future__ import annotations

import json
from pathlib import Path

# Qwen2's pre-tokenizer (tokenizer.json of Qwen2 / Qwen2.5 / Qwen2.5-VL).
QWEN2_PRETOKENIZE_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
]
CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}<|im_start|>system\n"
    "You are a helpful assistant.<|im_end|>\n{% endif %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n{% else %}"
    "{% for content in message['content'] %}{% if content['type'] == 'image' or 'image' in content %}"
    "<|vision_start|><|image_pad|><|vision_end|>{% elif 'text' in content %}{{ content['text'] }}{% endif %}"
    "{% endfor %}<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
OPENAI_CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
OPENAI_CLIP_STD = [0.26862954, 0.26130258, 0.27577711]

_CORPUS = [
    "You are an experienced expert in medicine. You are given a question, an image and a list of choices.",
    "First observe the image, think about the question and each choice within <think> </think> tags.",
    "<query> pneumonia lobar consolidation </query> <retrieve> (1) J18.1 Lobar pneumonia, unspecified organism",
    "<answer> B </answer> The chest radiograph shows a right lower lobe opacity with air bronchograms.",
    "Which finding is most likely? A. Pleural effusion B. Pneumothorax C. Cardiomegaly D. Atelectasis",
    "CT of the abdomen shows a hypodense lesion in the liver, 3.5 cm, with peripheral enhancement.",
    "0123456789 mm cm mg/kg %, (), [], {}; question answer retrieve query think",
]


def train_tokenizer(vocab_size: int = 512):
    """A byte-level BPE tokenizer with Qwen2's pre-tokenizer, trained on a few lines here (no download)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=SPECIAL_TOKENS,
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 4, trainer=trainer)
    return tok


def make_tiny_qwen25vl(
    out_dir: str | Path,
    *,
    seed: int = 0,
    text_hidden: int = 64,
    text_layers: int = 2,
    vision_hidden: int = 32,
    vision_depth: int = 4,
    vision_heads: int = 2,
    vision_intermediate: int | None = None,
    fullatt_block_indexes: list | None = None,
    initializer_range: float = 0.1,
) -> Path:
    """Write a tiny random Qwen2.5-VL checkpoint to out_dir (created) and return it."""
    import torch
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = train_tokenizer()
    tok.save(str(out / "tokenizer.json"))
    ids = {t: tok.token_to_id(t) for t in SPECIAL_TOKENS}
    vocab_size = tok.get_vocab_size()
    vocab_size += -vocab_size % 64  # Qwen pads the embedding table; the converter adds [PAD] tokens for the gap
    heads = 4
    config = Qwen2_5_VLConfig(
        vocab_size=vocab_size,
        hidden_size=text_hidden,
        intermediate_size=2 * text_hidden,
        num_hidden_layers=text_layers,
        num_attention_heads=heads,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        rope_theta=1_000_000.0,
        rms_norm_eps=1e-6,
        # mrope sections (t, h, w) sum to head_dim / 2, as in the 7B model ([16, 24, 24] for head_dim 128).
        rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]},
        tie_word_embeddings=False,
        initializer_range=initializer_range,
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        bos_token_id=ids["<|endoftext|>"],
        eos_token_id=ids["<|im_end|>"],
        vision_config={
            "depth": vision_depth,
            "hidden_size": vision_hidden,
            "intermediate_size": vision_intermediate or 2 * vision_hidden,
            "num_heads": vision_heads,
            "out_hidden_size": text_hidden,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "window_size": 112,
            # every 2nd block full attention by default (the 7B: every 8th, [7, 15, 23, 31])
            "fullatt_block_indexes": fullatt_block_indexes or list(range(1, vision_depth, 2)),
            "in_chans": 3,
            "hidden_act": "silu",
            "initializer_range": initializer_range,
        },
        torch_dtype="float32",
    )
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(config).eval()
    with torch.no_grad():  # HF init leaves norms at 1 and biases at 0; random ones exercise more of the graph
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(out, safe_serialization=True)
    # transformers 4.57 leaves "architectures" out of a composite config; every published checkpoint has it.
    cfg = json.loads((out / "config.json").read_text())
    cfg["architectures"] = ["Qwen2_5_VLForConditionalGeneration"]
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "Qwen2TokenizerFast",
        "model_max_length": 4096,
        "bos_token": None,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "unk_token": None,
        "add_prefix_space": False,
        "errors": "replace",
        "clean_up_tokenization_spaces": False,
        "split_special_tokens": False,
        "chat_template": CHAT_TEMPLATE,
        "added_tokens_decoder": {
            str(ids[t]): {"content": t, "lstrip": False, "rstrip": False, "normalized": False,
                          "single_word": False, "special": True}
            for t in SPECIAL_TOKENS
        },
    }, indent=2))
    (out / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "Qwen2VLImageProcessor",
        "processor_class": "Qwen2_5_VLProcessor",
        "do_convert_rgb": True,
        "do_resize": True,
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": OPENAI_CLIP_MEAN,
        "image_std": OPENAI_CLIP_STD,
        "resample": 3,
        "min_pixels": 3136,
        "max_pixels": 262144,
        "patch_size": 14,
        "temporal_patch_size": 2,
        "merge_size": 2,
    }, indent=2))
    return out


def tiny_image(width: int = 224, height: int = 168, seed: int = 0):
    """A deterministic RGB test image (smooth gradients + noise), uint8 (H, W, 3)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    img = np.stack([x / width * 255, y / height * 255, (x + y) / (width + height) * 255], axis=-1)
    img += rng.normal(0, 20, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


# ---- cached artefacts shared by the export and multimodal tests (built once per test process) ---------------------

_CACHE: dict = {}


def _workdir() -> Path:
    import tempfile

    if "dir" not in _CACHE:
        _CACHE["dir"] = Path(tempfile.mkdtemp(prefix="medrwr-qwen-fixtures-"))
    return _CACHE["dir"]


def require_export_deps():
    """Skip (with the install command) when the [export] extra is missing."""
    import pytest

    for mod in ("torch", "transformers", "safetensors", "onnx"):
        pytest.importorskip(mod, reason=f"needs the export extra ({mod}): pip install -e '.[export]'")


def converter_source():
    """The llama.cpp converter tree already in the cache (tests never download); skip with the command if absent."""
    import os

    import pytest

    from medrwr_edge.errors import MedrwrError
    from medrwr_edge.export import llama_cpp_src as LS

    if "src" not in _CACHE:
        given = os.environ.get("MEDRWR_LLAMA_CPP_SRC")
        tree = LS.cache_dir() / f"llama_cpp_python-{LS.LLAMA_CPP_PYTHON_VERSION}"
        if given is None and not tree.is_dir():
            pytest.skip("llama.cpp converter not cached: run `medrwr-edge export fetch-converter` (online, once)")
        try:
            _CACHE["src"] = LS.obtain(given)
        except MedrwrError as e:
            pytest.skip(f"llama.cpp converter unavailable: {e}")
    return _CACHE["src"]


def tiny_checkpoint() -> Path:
    require_export_deps()
    if "ckpt" not in _CACHE:
        _CACHE["ckpt"] = make_tiny_qwen25vl(_workdir() / "tiny-qwen25vl")
    return _CACHE["ckpt"]


def tiny_f32_gguf() -> Path:
    """The tiny checkpoint's decoder as an f32 GGUF via the vendored converter."""
    if "gguf" not in _CACHE:
        from medrwr_edge.export.qwen import check_checkpoint, convert_gguf

        ck = check_checkpoint(tiny_checkpoint())
        _CACHE["gguf"] = convert_gguf(ck, converter_source(), _workdir() / "tiny-f32.gguf", "f32")
    return _CACHE["gguf"]


def tiny_bundle() -> Path:
    """A full export of the tiny checkpoint: q8_0 decoder, fp32 + int8 ONNX vision, mmproj, parity in the manifest."""
    if "bundle" not in _CACHE:
        import os

        from medrwr_edge.export.qwen import export_model

        converter_source()  # skips the test when the converter is not cached
        _CACHE["bundle"] = export_model(tiny_checkpoint(), _workdir() / "bundle", quant="q8_0", vision_int8=True,
                                        mmproj=True, parity=True, llama_cpp_src=os.environ.get("MEDRWR_LLAMA_CPP_SRC"))
    return _CACHE["bundle"]


def tiny_spec():
    from medrwr_edge.runtime.vision import VisionSpec

    ck = tiny_checkpoint()
    return VisionSpec.from_hf(json.loads((ck / "config.json").read_text()),
                              json.loads((ck / "preprocessor_config.json").read_text()))


def tiny_torch_model():
    if "torch_model" not in _CACHE:
        from medrwr_edge.export.parity import torch_model

        _CACHE["torch_model"] = torch_model(tiny_checkpoint())
    return _CACHE["torch_model"]


def tiny_vision_onnx() -> Path:
    """The tiny checkpoint's vision tower + merger as fp32 ONNX (export.qwen_vision)."""
    if "onnx" not in _CACHE:
        from medrwr_edge.export.qwen_vision import export_vision_onnx

        _CACHE["onnx"] = export_vision_onnx(tiny_torch_model(), tiny_spec(), _workdir() / "vision.onnx",
                                            tiny_image(224, 168))
    return _CACHE["onnx"]
