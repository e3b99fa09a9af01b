"""Run llama.cpp's convert_hf_to_gguf.py with ITS OWN gguf-py, in a separate process.

Usage (by `export.gguf_text`): python _gguf_convert_driver.py LLAMA_CPP_ROOT -- <convert_hf_to_gguf args>

Separate process: the vendored `gguf` package must win over any PyPI `gguf` in the environment, and the
converter's module-level state (logging, registries) must not leak into ours.

One adjustment, and only one: the converter names a BPE tokenizer's pre-tokenizer by hashing the token ids of a
test string, which works only for vocabularies it has seen (the real Qwen2.5-VL tokenizer hashes to "qwen2").
A checkpoint with a retrained vocabulary but the identical Qwen2 pre-tokenizer (the test fixtures, or a
fine-tune that extended the vocabulary) has an unknown hash; we then read tokenizer.json and answer "qwen2" if,
and only if, its pre-tokenizer is exactly Qwen2's split regex + byte-level. Anything else still fails.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

QWEN2_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def is_qwen2_pretokenizer(model_dir: Path) -> bool:
    try:
        pre = json.loads((model_dir / "tokenizer.json").read_text(encoding="utf-8"))["pre_tokenizer"]
        split, byte_level = pre["pretokenizers"]
        return (
            pre["type"] == "Sequence"
            and split["type"] == "Split"
            and split["pattern"].get("Regex") == QWEN2_REGEX
            and split["behavior"] == "Isolated"
            and not split["invert"]
            and byte_level["type"] == "ByteLevel"
            and not byte_level.get("use_regex", True)
        )
    except (OSError, KeyError, TypeError, ValueError):
        return False


def main() -> None:
    root = Path(sys.argv[1]).resolve()
    args = sys.argv[3:] if len(sys.argv) > 2 and sys.argv[2] == "--" else sys.argv[2:]
    sys.path.insert(0, str(root / "gguf-py"))
    sys.path.insert(0, str(root))
    import conversion.base as base  # the vendored converter package

    original = base.TextModel.get_vocab_base_pre

    def get_vocab_base_pre(self, tokenizer) -> str:
        try:
            return original(self, tokenizer)
        except NotImplementedError:
            if is_qwen2_pretokenizer(Path(self.dir_model)):
                print("pre-tokenizer identified from tokenizer.json: qwen2", file=sys.stderr)
                return "qwen2"
            raise

    base.TextModel.get_vocab_base_pre = get_vocab_base_pre
    import convert_hf_to_gguf

    sys.argv = [str(root / "convert_hf_to_gguf.py"), *args]
    convert_hf_to_gguf.main()


if __name__ == "__main__":
    main()
