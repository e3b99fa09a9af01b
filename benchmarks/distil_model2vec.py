"""Distil a static encoder from the installed MiniLM with the `model2vec` library, offline, for comparison with
`medrwr-edge export static-encoder` (benchmarks/bench_static_encoder.py --static OUT).

model2vec's `distill_from_model` expects a transformers model; only MiniLM's int8 ONNX export is on this
machine (no torch weights, no hub), so a small torch module runs that ONNX file (the same source our own
distillation reads) behind the interface model2vec calls: forward(input_ids, attention_mask, token_type_ids)
-> last_hidden_state. The result is written in our static-encoder format (vectors.npy rows per MiniLM token id,
the MiniLM tokenizer.json), so both are scored by the same retrieval benchmark code; the library's own
run-time (`StaticModel.encode`) is timed against ours on the same texts.

    pip install "model2vec[distill]==0.9.0"     # 0.10 needs huggingface-hub >= 1.0, transformers 4.57 < 1.0
    python benchmarks/distil_model2vec.py OUT [--pca 256|384|none]
    python benchmarks/distil_model2vec.py OUT --runtime-only     # time StaticModel.encode vs ours on OUT
"""

from __future__ import annotations

import argparse
import io
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def onnx_as_torch_model(source_dir: Path, id_map: np.ndarray):
    """`id_map[i]`: the MiniLM id of model2vec's token i (it prunes added tokens like [MASK] and re-numbers)."""
    import torch

    from medrwr_edge.kb_pack.encoders import make_session, read_spec

    spec = read_spec(source_dir)
    session, _, _ = make_session(source_dir / spec.onnx_file, prefer_gpu=False, threads=1)
    from tokenizers import Tokenizer

    vocab = Tokenizer.from_file(str(source_dir / spec.tokenizer_file)).get_vocab_size()

    class OnnxEncoder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embeddings = torch.nn.Embedding(vocab, 1)  # stands in for the ONNX model's table (unused)
            self.config = SimpleNamespace(vocab_size=vocab, pad_token_id=0)
            self.name_or_path = str(source_dir)

        @property
        def device(self):
            return torch.device("cpu")

        def get_input_embeddings(self):
            return self.embeddings

        def resize_token_embeddings(self, n):
            if n != len(id_map):
                raise ValueError(f"model2vec's vocabulary has {n} tokens, the id map {len(id_map)}")

        def forward(self, input_ids, attention_mask, token_type_ids=None):
            feeds = {spec.input_ids_name: id_map[input_ids.numpy()].astype(np.int64),
                     spec.attention_mask_name: attention_mask.numpy().astype(np.int64)}
            if spec.token_type_ids_name:
                feeds[spec.token_type_ids_name] = np.zeros_like(feeds[spec.input_ids_name])
            (hidden,) = session.run([spec.output_name], feeds)
            return SimpleNamespace(last_hidden_state=torch.from_numpy(hidden), pooler_output=None)

    return OnnxEncoder(), spec


def compare_runtimes(out: Path, rounds: int = 3) -> int:
    """Texts/s of model2vec's StaticModel.encode vs our StaticTextEncoder.embed, same table, same texts,
    alternating; and the largest difference between their normalised embeddings."""
    from model2vec import StaticModel

    from medrwr_edge.bench_data import icd10_retrieval as bench
    from medrwr_edge.kb_pack.encoders import load_encoder
    from medrwr_edge.kb_pack.icd10 import default_pack_documents

    texts = [d.embed_text or d.text for d in default_pack_documents()
             if d.metadata["chapter"] in bench.QUICK_CORPUS_CHAPTERS]
    theirs, ours = StaticModel.from_pretrained(str(out / "model2vec")), load_encoder(out)
    times = {"model2vec": [], "ours": []}
    for _ in range(rounds):
        for name, fn in (("model2vec", lambda: theirs.encode(texts)), ("ours", lambda: ours.embed(texts))):
            c0 = time.process_time()
            emb = fn()
            times[name].append(time.process_time() - c0)
            if name == "model2vec":
                a = emb / np.linalg.norm(emb, axis=1, keepdims=True).clip(1e-12)
            else:
                diff = float(np.abs(a - emb).max())
    for name, t in times.items():
        print(f"{name:9} {len(texts) / min(t):8.0f} texts per CPU-second (best of {rounds}, {len(texts)} texts)")
    print(f"max |difference| between the two normalised embeddings: {diff:.2e}; load "
          f"{open('/proc/loadavg').read().split()[:3]}")
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--minilm", type=Path, default=None)
    ap.add_argument("--pca", default="256", help="model2vec pca_dims: a number, or 'none'")
    ap.add_argument("--runtime-only", action="store_true", help="only time the two run-times on an existing OUT")
    args = ap.parse_args()
    if args.runtime_only:
        return compare_runtimes(args.out)
    from model2vec.distill import distill_from_model
    from transformers import PreTrainedTokenizerFast

    from medrwr_edge.kb_pack.encoders import EncoderSpec, write_spec
    from medrwr_edge.kb_pack.static_encoder import STATIC_MAX_LENGTH, TOKENIZER_FILE, VECTORS_FILE
    from medrwr_edge.paths import sha256_file

    if args.minilm is None:
        from medrwr_edge.assets import default_text_encoder_dir

        args.minilm = Path(default_text_encoder_dir())
    from skeletoken import TokenizerModel

    from medrwr_edge.kb_pack.encoders import read_spec

    tok_path = args.minilm / read_spec(args.minilm).tokenizer_file
    tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(tok_path), unk_token="[UNK]", pad_token="[PAD]",
                                        cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]")
    # The same pruning distill_from_model does first; its token mapping is new id -> MiniLM id.
    mapping = TokenizerModel.from_transformers_tokenizer(tokenizer).prune_added_tokens().model_delta.token_mapping
    id_map = np.array([mapping[i] for i in range(len(mapping))], dtype=np.int64)
    model, spec = onnx_as_torch_model(args.minilm, id_map)
    pca = None if args.pca == "none" else int(args.pca)
    t0 = time.perf_counter()
    m2v = distill_from_model(model, tokenizer, device="cpu", pca_dims=pca, token_remove_pattern=None)
    print(f"model2vec distillation {time.perf_counter() - t0:.0f} s; {m2v.embedding.shape} table")
    # Rows by MiniLM token id, so our run-time (same tokenizer.json) reads them; tokens model2vec dropped: 0.
    from tokenizers import Tokenizer

    ours = Tokenizer.from_file(str(tok_path)).get_vocab()
    theirs = m2v.tokenizer.get_vocab()
    vectors = np.zeros((len(ours), m2v.embedding.shape[1]), dtype=np.float32)
    for token, i in ours.items():
        j = theirs.get(token)
        if j is not None:
            vectors[i] = np.asarray(m2v.embedding[j], dtype=np.float32)
    print(f"{sum(t in theirs for t in ours)} of {len(ours)} MiniLM tokens have a model2vec row")
    args.out.mkdir(parents=True, exist_ok=False)
    buf = io.BytesIO()
    np.save(buf, vectors, allow_pickle=False)
    (args.out / VECTORS_FILE).write_bytes(buf.getvalue())
    (args.out / TOKENIZER_FILE).write_bytes(tok_path.read_bytes())
    write_spec(args.out, EncoderSpec(
        kind="text", name="model2vec-minilm", dim=int(vectors.shape[1]), onnx_file=VECTORS_FILE,
        onnx_sha256=sha256_file(args.out / VECTORS_FILE), output_name="static", pooling="static", normalize=True,
        tokenizer_file=TOKENIZER_FILE, tokenizer_sha256=sha256_file(args.out / TOKENIZER_FILE),
        max_length=STATIC_MAX_LENGTH, query_prefix=spec.query_prefix, document_prefix=spec.document_prefix))
    m2v.save_pretrained(str(args.out / "model2vec"))  # the library's own format, for its run-time timing
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
