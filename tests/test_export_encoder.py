"""`export encoder`: a tiny random BERT (generated here, WordPiece vocabulary trained offline) through optimum."""

from __future__ import annotations

import json

import numpy as np
import pytest

from medrwr_edge.errors import InputError

pytest.importorskip("optimum.exporters.onnx", reason="needs optimum-onnx (the [export] extra)")
pytest.importorskip("transformers", reason="needs transformers (the [export] extra)")

CORPUS = ["pneumothorax air in the pleural space", "lobar pneumonia consolidation", "J93.0 tension pneumothorax",
          "pleural effusion fluid", "what is the most likely diagnosis"] * 5


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory):
    import torch
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import BertConfig, BertModel, BertTokenizerFast

    d = tmp_path_factory.mktemp("bert")
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.train_from_iterator(CORPUS, trainers.WordPieceTrainer(
        vocab_size=200, special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"], show_progress=False))
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]",
        special_tokens=[("[CLS]", tok.token_to_id("[CLS]")), ("[SEP]", tok.token_to_id("[SEP]"))])
    BertTokenizerFast(tokenizer_object=tok).save_pretrained(d)
    torch.manual_seed(0)
    config = BertConfig(vocab_size=tok.get_vocab_size(), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=128)
    BertModel(config).eval().save_pretrained(d)
    return d


@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_exported_encoder_matches_torch_and_loads_as_pack_encoder(tmp_path, tiny_bert, pooling):
    import torch
    from transformers import AutoModel, AutoTokenizer

    from medrwr_edge.export.text_encoder import export_text_encoder
    from medrwr_edge.kb_pack.encoders import load_encoder, read_spec

    out = export_text_encoder(tiny_bert, tmp_path / "enc", name="tiny-bert", pooling=pooling,
                              query_prefix="query: ")
    spec = read_spec(out)
    assert spec.kind == "text" and spec.dim == 32 and spec.pooling == pooling and spec.normalize
    assert spec.query_prefix == "query: " and spec.token_type_ids_name == "token_type_ids"
    enc = load_encoder(out, prefer_gpu=False)
    texts = ["tension pneumothorax", "fluid in the pleural space with a long description of it"]
    got = enc.embed(texts, is_query=True)
    tok, model = AutoTokenizer.from_pretrained(tiny_bert), AutoModel.from_pretrained(tiny_bert).eval()
    with torch.no_grad():
        for i, t in enumerate(texts):  # one at a time: no padding in the reference
            h = model(**tok("query: " + t, return_tensors="pt")).last_hidden_state[0]
            v = h[0] if pooling == "cls" else h.mean(0)
            assert np.abs(got[i] - torch.nn.functional.normalize(v, dim=-1).numpy()).max() < 1e-4
    assert json.loads((out / "export.json").read_text())["parity_max_abs_diff"] < 1e-4


def test_non_encoder_model_is_refused(tmp_path):
    from medrwr_edge.export.text_encoder import export_text_encoder

    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text(json.dumps({"model_type": "qwen2"}))
    with pytest.raises(InputError, match="qwen2 model; text encoders must be BERT/XLM-R"):
        export_text_encoder(tmp_path / "m", tmp_path / "out")
    assert not (tmp_path / "out").exists()
