"""Tiny models and packs for the GRPO tests: a random Qwen2 causal LM (text, stage 1) with the byte-level BPE
tokenizer of tests/fixtures_qwen.py (trained offline on a few lines), and a small text pack built with the
deterministic hashing encoder of tests/pack_fakes.py."""

from __future__ import annotations

import json
from pathlib import Path

from fixtures_qwen import CHAT_TEMPLATE, SPECIAL_TOKENS, train_tokenizer

def make_tiny_qwen2_lm(out_dir: str | Path, *, seed: int = 0, hidden: int = 64, layers: int = 2) -> Path:
    """Write a tiny random Qwen2ForCausalLM checkpoint (config.json, model.safetensors, tokenizer) to out_dir."""
    import torch
    from tokenizers import Tokenizer
    from transformers import Qwen2Config, Qwen2ForCausalLM

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok: Tokenizer = train_tokenizer()
    tok.save(str(out / "tokenizer.json"))
    ids = {t: tok.token_to_id(t) for t in SPECIAL_TOKENS}
    vocab = tok.get_vocab_size()
    vocab += -vocab % 64
    config = Qwen2Config(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=8192, tie_word_embeddings=True,
                         bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"],
                         pad_token_id=ids["<|endoftext|>"])
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config).eval()
    model.save_pretrained(out, safe_serialization=True)
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "Qwen2TokenizerFast", "model_max_length": 8192, "bos_token": None,
        "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "unk_token": None, "add_prefix_space": False,
        "errors": "replace", "clean_up_tokenization_spaces": False, "split_special_tokens": False,
        "chat_template": CHAT_TEMPLATE,
        "added_tokens_decoder": {
            str(ids[t]): {"content": t, "lstrip": False, "rstrip": False, "normalized": False,
                          "single_word": False, "special": True} for t in SPECIAL_TOKENS},
    }, indent=2))
    return out


def load_tiny(path: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True)
    return model, tok


PACK_DOCS = [
    ("d1", "Lobar pneumonia is consolidation of a whole lobe of the lung, often with air bronchograms."),
    ("d2", "Pleural effusion is fluid in the pleural space, blunting the costophrenic angle."),
    ("d3", "Pneumothorax is air in the pleural space with a visible pleural line and no lung markings."),
    ("d4", "Cardiomegaly is an enlarged cardiac silhouette, cardiothoracic ratio above 0.5."),
    ("d5", "Subarachnoid hemorrhage appears as hyperdense blood in the basal cisterns on CT."),
    ("d6", "Atelectasis is collapse of lung tissue with volume loss and shift of fissures."),
]


def make_text_pack(out_dir: Path):
    """A 6-document text pack (hashing encoder); returns (pack path, encoder)."""
    from pack_fakes import HashingTextEncoder

    from medrwr_edge.kb_pack.build import build_text_pack
    from medrwr_edge.kb_pack.documents import Document

    enc = HashingTextEncoder(dim=64)
    docs = [Document(id=i, text=t, source="test", title=i) for i, t in PACK_DOCS]
    path = build_text_pack(docs, out_dir, enc, name="tiny-text", version="t", search_mode="dense", progress=False)
    return path, enc


class ScriptedLM:
    """A real model whose next-token choice is forced to follow a script of generation passes.

    `passes[i]` is the text the model "writes" in generation pass i (pass i begins after the i-th retrieve block);
    after a pass's text the model is forced to end its turn. Logits are the real model's plus a large bias on the
    scripted token, so rollouts are deterministic while every forward (KV cache, positions) is the real one.
    The wrapper keeps the ids it has seen (cache positions say where each forward starts)."""

    BIAS = 1.0e4

    def __init__(self, model, tokenizer, passes: list[str], prompt_marker: str = "<|im_start|>assistant\n"):
        self.lm, self.tokenizer, self.passes, self.marker = model, tokenizer, passes, prompt_marker
        self.config = model.config
        self.seen: list[int] = []
        self.end_id = tokenizer.convert_tokens_to_ids("<|im_end|>")

    @property
    def model(self):
        return self.lm.model  # the inner model, where Qwen2.5-VL keeps its M-RoPE state (as on the real one)

    def parameters(self):
        return self.lm.parameters()

    def __call__(self, input_ids=None, cache_position=None, **kwargs):
        start = int(cache_position[0]) if cache_position is not None else 0
        self.seen = self.seen[:start] + input_ids[0].tolist()
        out = self.lm(input_ids=input_ids, cache_position=cache_position, **kwargs)
        forced = self._next_token()
        if forced is not None:
            out.logits[0, -1, forced] += self.BIAS
        return out

    def _next_token(self):
        text = self.tokenizer.decode(self.seen, skip_special_tokens=False)
        at = text.rfind(self.marker)
        if at < 0:
            return None
        turn = text[at + len(self.marker):]
        index = turn.count("</retrieve>")
        written = turn[turn.rfind("</retrieve>\n") + len("</retrieve>\n"):] if index else turn
        if index >= len(self.passes):
            return self.end_id
        target = self.passes[index]
        if not target.startswith(written):
            return None  # off script (a rollback re-feeds text): let the model be
        rest = target[len(written):]
        if not rest:
            return self.end_id
        return self.tokenizer.encode(rest, add_special_tokens=False)[0]
