"""Shared bits of the training tests: tiny checkpoints, data files and configs (needs the `[train]` extra)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from fixtures_qwen import make_tiny_qwen25vl, tiny_image, train_tokenizer

_CACHE: dict = {}

QUESTION = "Which finding is most likely?"
OPTIONS = ["A. cyst", "B. hemangioma"]
USER_TEXT = QUESTION + "\nA. cyst\nB. hemangioma"  # what protocol.user_text builds from them
TRACE = "<think> Peripheral enhancement. </think>\n<answer> B </answer>"


def require_train_deps() -> None:
    for mod in ("torch", "transformers", "safetensors", "accelerate", "yaml"):
        pytest.importorskip(mod, reason=f"needs the train extra ({mod}): pip install -e '.[train]'")


def tiny_vl(tmp_root: Path) -> Path:
    """A private copy of the tiny random Qwen2.5-VL checkpoint (built once per process)."""
    require_train_deps()
    if "vl" not in _CACHE:
        _CACHE["vl"] = make_tiny_qwen25vl(tmp_root / "_tiny-qwen25vl-src")
    out = tmp_root / "tiny-qwen25vl"
    if not out.exists():
        shutil.copytree(_CACHE["vl"], out)
    return out


def tiny_causal_lm(out: Path) -> Path:
    """A tiny random Qwen2 text-only causal LM with the same byte-level tokenizer (no vision)."""
    require_train_deps()
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from fixtures_qwen import CHAT_TEMPLATE, SPECIAL_TOKENS

    out.mkdir(parents=True, exist_ok=True)
    tok = train_tokenizer()
    tok.save(str(out / "tokenizer.json"))
    ids = {t: tok.token_to_id(t) for t in SPECIAL_TOKENS}
    config = Qwen2Config(vocab_size=tok.get_vocab_size() + (-tok.get_vocab_size() % 64), hidden_size=32,
                         intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=2048, tie_word_embeddings=True, initializer_range=0.1,
                         bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"])
    torch.manual_seed(0)
    Qwen2ForCausalLM(config).save_pretrained(out, safe_serialization=True)
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "Qwen2TokenizerFast", "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
        "bos_token": None, "unk_token": None, "chat_template": CHAT_TEMPLATE, "model_max_length": 2048,
        "added_tokens_decoder": {str(ids[t]): {"content": t, "lstrip": False, "rstrip": False, "normalized": False,
                                               "single_word": False, "special": True} for t in SPECIAL_TOKENS},
    }))
    return out


def write_image(path: Path, width: int = 120, height: int = 90, seed: int = 0) -> Path:
    from PIL import Image

    Image.fromarray(tiny_image(width, height, seed)).save(path)
    return path


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def write_yaml(path: Path, values: dict) -> Path:
    import yaml

    path.write_text(yaml.safe_dump(values, sort_keys=False), encoding="utf-8")
    return path


def sft_rows(image_name: str = "img.png") -> list[dict]:
    return [
        {"prompt": USER_TEXT, "response": TRACE, "image": image_name},
        {"messages": [{"role": "user", "content": "Chest film: lobar opacity. A. effusion B. pneumonia"},
                      {"role": "assistant", "content": "<think> Consolidation. </think>\n<query> lobar pneumonia "
                                                       "</query>\n<retrieve> (1) J18.1 Lobar pneumonia\n </retrieve>\n"
                                                       "<answer> B </answer>"}]},
    ]


def state_copy(model) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}
