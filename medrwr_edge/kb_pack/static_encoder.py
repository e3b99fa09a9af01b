"""A static text encoder distilled from a transformer text encoder (the model2vec idea), numpy + tokenizers only.

Distillation (`distil_static_encoder`, run once, needs onnxruntime): every token id of the source encoder's
WordPiece vocabulary goes through the source ONNX model once as `[CLS] token [SEP]`; the output at the token's
position (`output="token"`) or the mean over the three positions (`output="mean"`) becomes that token's vector.
The table is then centred and rotated onto its principal axes (PCA via numpy eigh of the covariance), optionally keeping
fewer dimensions; centring removes the component every token shares, which lifted dense hit@3 0.40 -> 0.44. Each vector is then multiplied by a frequency weight,
SIF-style `a / (a + p(token))` with p estimated from the ICD-10-CM embedding texts, so tokens that occur
everywhere ("of", "unspecified", "##s") count little. The weight is baked into the stored vector: a text's
embedding is the L2-normalised SUM of its tokens' rows, which equals the normalised weighted mean.

Run time (`StaticTextEncoder`): tokenise with the same tokenizer.json (no [CLS]/[SEP], [PAD] dropped), add
up rows of `vectors.npy`, normalise. No matrix multiply per token, so a pack build is bound by tokenisation.

The encoder directory is an ordinary one: `encoder.json` with `pooling: "static"` and `onnx_file` naming the
token-vector table (`vectors.npy`, loaded with allow_pickle=False); its sha256 is the encoder lock a pack
records, exactly as the ONNX file's is for a transformer encoder.
"""

from __future__ import annotations

import io
import json
import os
from collections import Counter
from pathlib import Path
from typing import Callable, Iterable, Optional

import numpy as np

from ..errors import InputError, ModelError
from ..paths import atomic_directory, atomic_write_bytes, sha256_file
from .encoders import EncoderSpec, _Encoder, _check_file, make_session, read_spec, write_spec

VECTORS_FILE = "vectors.npy"
TOKENIZER_FILE = "tokenizer.json"
OUTPUTS = ("token", "mean")
WEIGHTINGS = ("sif", "none")
DEFAULT_SIF_A = 1e-4  # tokens with p(w) >> a get weight ~a/p; 1e-4 beat SIF's usual 1e-3 on hybrid hit@3
STATIC_MAX_LENGTH = 512  # truncation only; a static encoder has no position limit, ICD texts are ~60 tokens


class StaticTextEncoder(_Encoder):
    """Text -> L2-normalised sum of the (weighted) token rows of `vectors`. Same interface as TextEncoder."""

    def __init__(self, spec: EncoderSpec, vectors: np.ndarray, tokenizer):
        super().__init__(spec, None, "numpy", "")
        tokenizer.no_padding()
        tokenizer.enable_truncation(spec.max_length)
        self.tokenizer = tokenizer
        self.vectors = vectors
        # Special tokens carry no meaning of the text; [UNK] stays (it is a token of the text).
        self._skip = np.zeros(len(vectors), dtype=bool)
        for tok in ("[CLS]", "[SEP]", "[PAD]", "[MASK]"):
            tid = tokenizer.token_to_id(tok)
            if tid is not None and tid < len(vectors):
                self._skip[tid] = True

    def embed(self, texts: list[str], *, is_query: bool = False, batch_size: int = 4096,
              bucketed: bool = True) -> np.ndarray:
        """(n, dim) float32 vectors in input order. `bucketed` is accepted for interface parity (no padding)."""
        if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
            raise InputError("texts to embed must be a list of strings")
        if batch_size < 1:
            raise InputError("batch_size must be at least 1")
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        prefix = self.spec.query_prefix if is_query else self.spec.document_prefix
        for base in range(0, len(texts), batch_size):
            chunk = [prefix + t for t in texts[base : base + batch_size]]
            encodings = self.tokenizer.encode_batch(chunk, add_special_tokens=False)
            lengths = np.fromiter((len(e.ids) for e in encodings), dtype=np.int64, count=len(encodings))
            ids = np.fromiter((i for e in encodings for i in e.ids), dtype=np.int64, count=int(lengths.sum()))
            keep = ~self._skip[ids]
            owner = np.repeat(np.arange(len(chunk)), lengths)[keep]
            # Sum rows per text: np.add.at is slow; a sorted-owner reduceat is one vectorised pass.
            rows = self.vectors[ids[keep]]
            if len(rows):
                starts = np.flatnonzero(np.r_[True, owner[1:] != owner[:-1]])
                out[base + owner[starts]] = np.add.reduceat(rows, starts, axis=0)
        return self._finish(out)


def load_static_encoder(encoder_dir: Path, spec: EncoderSpec) -> StaticTextEncoder:
    """Called by encoders.load_encoder for `pooling == "static"`; file hashes are checked first."""
    vec_path = encoder_dir / spec.onnx_file
    tok_path = encoder_dir / spec.tokenizer_file
    _check_file(vec_path, spec.onnx_sha256)
    _check_file(tok_path, spec.tokenizer_sha256)
    try:
        vectors = np.load(vec_path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise ModelError(f"cannot read token vectors {vec_path.name}: {str(e).splitlines()[0][:200]}") from None
    if vectors.ndim != 2 or vectors.shape[1] != spec.dim or vectors.dtype not in (np.float32, np.float16):
        raise ModelError(f"token vectors {vec_path.name} are {vectors.dtype} {vectors.shape}, expected float (n, {spec.dim})")
    from tokenizers import Tokenizer

    try:
        tokenizer = Tokenizer.from_file(str(tok_path))
    except Exception as e:
        raise ModelError(f"cannot load tokenizer {tok_path.name}: {str(e).splitlines()[0][:200]}") from None
    if tokenizer.get_vocab_size() != len(vectors):
        raise ModelError(f"{vec_path.name} has {len(vectors)} rows but the tokenizer has {tokenizer.get_vocab_size()} tokens")
    return StaticTextEncoder(spec, np.ascontiguousarray(vectors, dtype=np.float32), tokenizer)


# ----------------------------------------------------------------------------------------------- distillation


def token_vectors(source_dir: str | os.PathLike, *, output: str = "token", batch_size: int = 1024,
                  threads: int = 1, vocab_limit: Optional[int] = None,
                  progress: Optional[Callable[[str], None]] = None) -> np.ndarray:
    """(vocab, dim) float32: the source ONNX encoder's output for `[CLS] token [SEP]`, for every token id.

    `vocab_limit` (tests, quick trials) runs only ids below it; the other rows stay zero.
    """
    if output not in OUTPUTS:
        raise InputError(f"output must be one of {OUTPUTS}, not {output!r}")
    source_dir = Path(source_dir)
    spec = read_spec(source_dir)
    if spec.kind != "text" or spec.pooling == "static":
        raise InputError(f"{source_dir} is not a transformer text encoder (kind {spec.kind}, pooling {spec.pooling})")
    _check_file(source_dir / spec.onnx_file, spec.onnx_sha256)
    _check_file(source_dir / spec.tokenizer_file, spec.tokenizer_sha256)
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(source_dir / spec.tokenizer_file))
    cls_id, sep_id = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
    if cls_id is None or sep_id is None:
        raise ModelError(f"tokenizer of {source_dir} has no [CLS]/[SEP] tokens (not a WordPiece/BERT tokenizer)")
    # One thread: the int8 GEMMs are then bit-for-bit reproducible, so the same source gives the same sha256.
    session, _, _ = make_session(source_dir / spec.onnx_file, prefer_gpu=False, threads=threads)
    vocab = tokenizer.get_vocab_size()
    todo = vocab if vocab_limit is None else max(0, min(vocab, vocab_limit))
    out = np.zeros((vocab, spec.dim), dtype=np.float32)
    for start in range(0, todo, batch_size):
        ids = np.arange(start, min(start + batch_size, todo), dtype=np.int64)
        input_ids = np.stack([np.full_like(ids, cls_id), ids, np.full_like(ids, sep_id)], axis=1)
        feeds = {spec.input_ids_name: input_ids, spec.attention_mask_name: np.ones_like(input_ids)}
        if spec.token_type_ids_name:
            feeds[spec.token_type_ids_name] = np.zeros_like(input_ids)
        (hidden,) = session.run([spec.output_name], feeds)
        out[ids] = hidden[:, 1, :] if output == "token" else hidden.mean(axis=1)
        if progress and (start // batch_size) % 10 == 0:
            progress(f"token vectors {start + len(ids)}/{vocab}")
    return out


def icd10_embedding_texts() -> list[str]:
    """Every ICD-10-CM entry's embedding text (what a pack build embeds): the corpus for token frequencies."""
    from .icd10 import icd10_documents

    return [d.embed_text or d.text for d in icd10_documents()]


def sif_weights(tokenizer, texts: Iterable[str], a: float = DEFAULT_SIF_A) -> np.ndarray:
    """a / (a + p(token)) per token id, p from the token counts of `texts` (unseen tokens: weight 1)."""
    counts: Counter = Counter()
    batch: list[str] = []
    for text in texts:
        batch.append(text)
        if len(batch) == 8192:
            counts.update(i for e in tokenizer.encode_batch(batch, add_special_tokens=False) for i in e.ids)
            batch = []
    if batch:
        counts.update(i for e in tokenizer.encode_batch(batch, add_special_tokens=False) for i in e.ids)
    total = sum(counts.values())
    p = np.zeros(tokenizer.get_vocab_size(), dtype=np.float64)
    if total:
        for tid, c in counts.items():
            p[tid] = c / total
    return (a / (a + p)).astype(np.float32)


def principal_axes(vectors: np.ndarray, dims: int) -> np.ndarray:
    """Project onto the top `dims` principal axes (centred; sign fixed so the result is deterministic)."""
    centred = vectors.astype(np.float64) - vectors.mean(axis=0, dtype=np.float64)
    # Eigenvectors of the (dim x dim) covariance = the SVD's right singular vectors, at a fraction of the cost
    # of an SVD of the (vocab x dim) table (seconds on a busy 2-core machine even for 1,500 rows).
    values, vectors_ = np.linalg.eigh(centred.T @ centred)
    axes = vectors_[:, np.argsort(-values, kind="stable")[:dims]].T.copy()
    axes *= np.where(axes[np.arange(dims), np.abs(axes).argmax(axis=1)] < 0, -1.0, 1.0)[:, None]
    return (centred @ axes.T).astype(np.float32)


def distil_static_encoder(
    source_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    name: Optional[str] = None,
    output: str = "token",
    weighting: str = "sif",
    sif_a: float = DEFAULT_SIF_A,
    pca: bool = True,
    dims: Optional[int] = None,
    corpus_texts: Optional[Iterable[str]] = None,
    threads: int = 1,
    vocab_limit: Optional[int] = None,
    overwrite: bool = False,
    progress: Optional[Callable[[str], None]] = None,
) -> Path:
    """Write a static encoder directory distilled from `source_dir`. Same inputs -> same files (sha256)."""
    if weighting not in WEIGHTINGS:
        raise InputError(f"weighting must be one of {WEIGHTINGS}, not {weighting!r}")
    if not (sif_a > 0):
        raise InputError("sif_a must be positive")
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise InputError(f"{out_dir} already exists (use --overwrite to replace it)")
    source_dir = Path(source_dir)
    source = read_spec(source_dir)
    if dims is not None and not (pca and 0 < dims <= source.dim):
        raise InputError(f"dims needs PCA and must be between 1 and {source.dim}")
    vectors = token_vectors(source_dir, output=output, threads=threads, vocab_limit=vocab_limit, progress=progress)
    if pca:
        done = len(vectors) if vocab_limit is None else max(1, min(len(vectors), vocab_limit))
        reduced = np.zeros((len(vectors), dims or source.dim), dtype=np.float32)
        reduced[:done] = principal_axes(vectors[:done], dims or source.dim)
        vectors = reduced
    if weighting == "sif":
        from tokenizers import Tokenizer

        tokenizer = Tokenizer.from_file(str(source_dir / source.tokenizer_file))
        if progress:
            progress("token frequencies")
        texts = icd10_embedding_texts() if corpus_texts is None else corpus_texts
        vectors = vectors * sif_weights(tokenizer, texts, sif_a)[:, None]
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    buf = io.BytesIO()
    np.save(buf, vectors, allow_pickle=False)
    try:
        with atomic_directory(out_dir, overwrite=overwrite) as tmp:
            atomic_write_bytes(tmp / VECTORS_FILE, buf.getvalue())
            atomic_write_bytes(tmp / TOKENIZER_FILE, (source_dir / source.tokenizer_file).read_bytes())
            spec = EncoderSpec(
                kind="text", name=name or out_dir.name, dim=int(vectors.shape[1]), onnx_file=VECTORS_FILE,
                onnx_sha256=sha256_file(tmp / VECTORS_FILE), output_name="static", pooling="static",
                normalize=True, tokenizer_file=TOKENIZER_FILE, tokenizer_sha256=sha256_file(tmp / TOKENIZER_FILE),
                max_length=STATIC_MAX_LENGTH, query_prefix=source.query_prefix,
                document_prefix=source.document_prefix)
            write_spec(tmp, spec)
            recipe = {"source": source.name, "source_sha256": source.onnx_sha256, "output": output,
                      "weighting": weighting, "sif_a": sif_a if weighting == "sif" else None, "pca": pca, "vocab_limit": vocab_limit,
                      "dim": int(vectors.shape[1])}
            # The recipe is a note for people; encoder.json + the hashes are what loading relies on.
            atomic_write_bytes(tmp / "distilled.json", (json.dumps(recipe, indent=2, sort_keys=True) + "\n").encode())
    except OSError as e:
        raise InputError(f"cannot write {out_dir}: {e.strerror or e}") from None
    return out_dir
