"""`medrwr-edge export encoder HF_DIR OUT`: a text encoder a user brings (BERT / XLM-R family) -> ONNX + encoder.json.

The ONNX graph comes from optimum's exporter (`optimum.exporters.onnx.main_export`, task feature-extraction,
output `last_hidden_state`); pooling and L2 normalisation are done by `kb_pack.encoders.TextEncoder` as the spec
says, so the same spec drives pack building and query embedding. Before the directory is published, ORT output is
compared with the torch model on a few sentences (pooled + normalised, max abs diff < 1e-4).

Typical settings (the spec records them, packs built with the encoder are locked to its ONNX hash):
  BGE-M3 (XLM-R, the paper's retriever):   --pooling cls  --normalize      (no query instruction)
  MedCPT query / article encoders (BERT):  --pooling cls  --normalize      (the pack compares cosines)
  sentence-transformers MiniLM-style:      --pooling mean --normalize

Versions: optimum-onnx 0.1.0 needs transformers < 4.58, which also runs Qwen2.5-VL, so one `[export]` extra
(transformers==4.57.6) serves both exporters.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import numpy as np

from ..errors import InputError, ModelError
from ..paths import atomic_directory, sha256_file

SUPPORTED_TYPES = ("bert", "xlm-roberta", "roberta", "distilbert", "electra", "camembert", "mpnet")
PARITY_ATOL = 1e-4
PARITY_TEXTS = [
    "Right lower lobe consolidation with air bronchograms.",
    "J93.0 Spontaneous tension pneumothorax",
    "What is the most likely diagnosis?",
]


def export_text_encoder(
    hf_dir: str | Path,
    out: str | Path,
    *,
    name: Optional[str] = None,
    pooling: str = "cls",
    normalize: bool = True,
    query_prefix: str = "",
    document_prefix: str = "",
    max_length: int = 512,
    opset: int = 17,
    overwrite: bool = False,
    progress=None,
) -> Path:
    say = progress or (lambda msg: None)
    hf_dir, out = Path(hf_dir), Path(out)
    if pooling not in ("cls", "mean"):
        raise InputError(f"--pooling must be cls or mean (got {pooling!r})")
    if out.exists() and not overwrite:
        raise InputError(f"{out} already exists (give --overwrite to replace it)")
    cfg_path = hf_dir / "config.json"
    if not cfg_path.is_file():
        raise InputError(f"{hf_dir} has no config.json: not a Hugging Face model directory")
    config = json.loads(cfg_path.read_text(encoding="utf-8"))
    model_type = config.get("model_type", "unknown")
    if model_type not in SUPPORTED_TYPES:
        raise InputError(f"{hf_dir} is a {model_type} model; text encoders must be BERT/XLM-R family "
                         f"({', '.join(SUPPORTED_TYPES)})")
    if not any((hf_dir / f).is_file() for f in ("tokenizer.json", "vocab.txt", "sentencepiece.bpe.model",
                                                   "vocab.json")):
        raise InputError(f"{hf_dir} has no tokenizer files (tokenizer.json, vocab.txt or sentencepiece model)")
    try:
        import torch
        from optimum.exporters.onnx import main_export
        from transformers import AutoModel, AutoTokenizer
    except ImportError:
        raise ModelError("exporting a text encoder needs optimum-onnx, torch and transformers: "
                         "pip install 'medrwr-edge[export]'") from None

    from ..kb_pack.encoders import EncoderSpec, load_encoder, write_spec

    tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    if not getattr(tokenizer, "is_fast", False):
        raise InputError(f"{hf_dir}: the runtime needs a fast (tokenizers) tokenizer and none could be built")
    with atomic_directory(out, overwrite=overwrite) as tmp:
        say("optimum ONNX export (feature-extraction)")
        main_export(str(hf_dir), output=tmp / "onnx", task="feature-extraction", opset=opset, device="cpu",
                    do_validation=False)
        onnx_src = tmp / "onnx" / "model.onnx"
        if not onnx_src.is_file():
            raise ModelError("optimum produced no model.onnx")
        onnx_src.rename(tmp / "model.onnx")
        tokenizer.backend_tokenizer.save(str(tmp / "tokenizer.json"))
        import shutil

        shutil.rmtree(tmp / "onnx")
        import onnx

        graph_inputs = {i.name for i in onnx.load(str(tmp / "model.onnx"), load_external_data=False).graph.input}
        spec = EncoderSpec(
            kind="text",
            name=name or hf_dir.name,
            dim=int(config["hidden_size"]),
            onnx_file="model.onnx",
            onnx_sha256=sha256_file(tmp / "model.onnx"),
            output_name="last_hidden_state",
            pooling=pooling,
            normalize=normalize,
            tokenizer_file="tokenizer.json",
            tokenizer_sha256=sha256_file(tmp / "tokenizer.json"),
            input_ids_name="input_ids",
            attention_mask_name="attention_mask",
            token_type_ids_name="token_type_ids" if "token_type_ids" in graph_inputs else None,
            max_length=min(int(max_length), int(config.get("max_position_embeddings", max_length))),
            query_prefix=query_prefix,
            document_prefix=document_prefix,
        )
        write_spec(tmp, spec)
        say("parity: ONNX encoder vs torch")
        encoder = load_encoder(tmp, prefer_gpu=False)
        got = encoder.embed(PARITY_TEXTS)
        model = AutoModel.from_pretrained(hf_dir).eval()
        with torch.no_grad():
            batch = tokenizer(PARITY_TEXTS, padding=True, truncation=True, max_length=spec.max_length,
                              return_tensors="pt")
            hidden = model(**batch).last_hidden_state
            if pooling == "cls":
                ref = hidden[:, 0]
            else:
                mask = batch["attention_mask"].unsqueeze(-1).float()
                ref = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            if normalize:
                ref = torch.nn.functional.normalize(ref, dim=-1)
        diff = float(np.abs(got - ref.numpy()).max())
        if diff > PARITY_ATOL:
            raise ModelError(f"ONNX text encoder differs from torch by {diff:.2e} (> {PARITY_ATOL}): export is wrong")
        (tmp / "export.json").write_text(json.dumps({"source": str(hf_dir), "model_type": model_type,
                                                     "parity_max_abs_diff": diff, "opset": opset}, indent=2))
        say(f"parity ok: max abs diff {diff:.1e}")
    return out
