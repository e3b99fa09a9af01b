"""Build knowledge packs from `Document`s: embed, index (hnswlib + SQLite FTS5), write a manifest.

Three properties matter more than speed:

* Atomic: everything is written into a temp directory beside the target and renamed into place at the end
  (`paths.atomic_directory`), so Ctrl-C or an error never leaves a half pack.
* Resumable: embedding is the slow part (minutes for the 98,505 ICD-10-CM entries on 2 cores), so each batch of
  vectors is saved to `<out>.partial-work/` as it is computed, under a key that hashes the inputs and the
  encoder; rerunning the same command skips finished batches. The work dir is removed once the pack exists.
* Deterministic: fixed insertion order, single-threaded hnswlib with a fixed seed, SQLite built in order and
  VACUUMed, PNGs written without metadata, `created` from SOURCE_DATE_EPOCH when set: the same inputs give a
  byte-identical pack.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
import sqlite3
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterable, Optional

import numpy as np

from .. import __version__
from ..errors import InputError, MedrwrError, ModelError
from ..paths import atomic_directory, atomic_write_bytes, sha256_bytes, sha256_file
from . import lexical
from .documents import Document
from .pack import (DOCS_FILE, FORMAT_VERSION, HYBRID_CANDIDATES, IMAGES_DIR, INDEX_FILE, MANIFEST_FILE, SEARCH_MODES,
                   HnswParams, manifest_bytes)

THUMBNAIL_PX = 512
_NAME_OK = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")


# ------------------------------------------------------------------------------------------- public API


def build_text_pack(
    docs: Iterable[Document],
    out_dir: str | os.PathLike,
    encoder,
    *,
    name: str,
    version: str,
    hnsw: HnswParams = HnswParams(),
    search_mode: str = "hybrid",
    fusion: lexical.FusionParams = lexical.FusionParams(),
    source_description: str = "",
    build_params: Optional[dict] = None,
    overwrite: bool = False,
    progress: bool = True,
    batch_size: int = 256,
) -> Path:
    """Embed `docs` with a text encoder and write a text pack to `out_dir`. Returns the pack path."""
    if getattr(encoder, "kind", "text") != "text":
        raise InputError(f"a text pack needs a text encoder, got a {encoder.kind} encoder")
    return _build("text", docs, out_dir, encoder, name=name, version=version, hnsw=hnsw, search_mode=search_mode,
                  fusion=fusion, source_description=source_description, build_params=build_params,
                  overwrite=overwrite, progress=progress, batch_size=batch_size)


def build_image_pack(
    docs: Iterable[Document],
    out_dir: str | os.PathLike,
    encoder,
    *,
    name: str,
    version: str,
    hnsw: HnswParams = HnswParams(),
    search_mode: str = "dense",
    fusion: lexical.FusionParams = lexical.FusionParams(),
    source_description: str = "",
    build_params: Optional[dict] = None,
    overwrite: bool = False,
    progress: bool = True,
    batch_size: int = 16,
    thumbnail_px: int = THUMBNAIL_PX,
) -> Path:
    """Load each doc's `image_path`, embed it with an image encoder, store a PNG thumbnail + caption."""
    if getattr(encoder, "kind", "image") != "image":
        raise InputError(f"an image pack needs an image encoder, got a {encoder.kind} encoder")
    return _build("image", docs, out_dir, encoder, name=name, version=version, hnsw=hnsw, search_mode=search_mode,
                  fusion=fusion, source_description=source_description, build_params=build_params,
                  overwrite=overwrite, progress=progress, batch_size=batch_size, thumbnail_px=thumbnail_px)


def work_dir_for(out_dir: str | os.PathLike) -> Path:
    out_dir = Path(out_dir)
    return out_dir.with_name(out_dir.name + ".partial-work")


# ---------------------------------------------------------------------------------------------- internals


def _created_timestamp() -> str:
    epoch = os.environ.get("SOURCE_DATE_EPOCH")
    if epoch:
        try:
            when = datetime.fromtimestamp(int(epoch), tz=timezone.utc)
        except (ValueError, OverflowError):
            raise InputError(f"SOURCE_DATE_EPOCH must be an integer number of seconds, not {epoch!r}") from None
    else:
        when = datetime.now(timezone.utc).replace(microsecond=0)
    return when.strftime("%Y-%m-%dT%H:%M:%SZ")


def image_file_name(doc_id: str) -> str:
    """A filesystem-safe, collision-free PNG name for a doc id (readable prefix + hash of the full id)."""
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", doc_id).strip("._")[:60] or "image"
    return f"{IMAGES_DIR}/{safe}-{sha256_bytes(doc_id.encode('utf-8'))[:10]}.png"


def _validate(kind: str, docs: list[Document], name: str, version: str, search_mode: str) -> None:
    if not _NAME_OK.match(name or ""):
        raise InputError(f"pack name {name!r} must be 1-100 letters, digits, '.', '_' or '-'")
    if not str(version or "").strip():
        raise InputError("pack version must not be empty")
    if search_mode not in SEARCH_MODES:
        raise InputError(f"unknown search mode {search_mode!r}; use one of {', '.join(SEARCH_MODES)}")
    if not docs:
        raise InputError("the source has no documents")
    seen: set[str] = set()
    for doc in docs:
        if not isinstance(doc, Document):
            raise InputError(f"expected Document objects, got {type(doc).__name__}")
        if not doc.id or not doc.id.strip():
            raise InputError("a document has an empty id")
        if doc.id in seen:
            raise InputError(f"duplicate document id {doc.id!r}")
        seen.add(doc.id)
        if kind == "text" and not doc.text.strip():
            raise InputError(f"document {doc.id!r} has no text")
        if kind == "image":
            if not doc.image_path:
                raise InputError(f"document {doc.id!r} has no image_path")
            if not (doc.caption or doc.text or "").strip():
                raise InputError(f"document {doc.id!r} has no caption")


def _metadata_json(doc: Document) -> str:
    try:
        return json.dumps(doc.metadata or {}, sort_keys=True, ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise InputError(f"document {doc.id!r} has metadata that is not plain JSON ({e})") from None


def _content_sha256(doc: Document, image_sha256: Optional[str]) -> str:
    """What `pack diff` compares: everything about a document that a search result can show."""
    payload = {"id": doc.id, "text": doc.text, "source": doc.source, "title": doc.title, "caption": doc.caption,
               "metadata": json.loads(_metadata_json(doc)), "image_sha256": image_sha256}
    if doc.embed_text is not None:  # changes the vector, so it is part of the content (and the resume key)
        payload["embed_text"] = doc.embed_text
    return sha256_bytes(json.dumps(payload, sort_keys=True, ensure_ascii=False).encode("utf-8"))


class _Progress:
    """A rich progress bar when wanted, a no-op otherwise."""

    def __init__(self, enabled: bool, description: str, total: int):
        self._bar = None
        if enabled:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self._bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TimeRemainingColumn(), transient=True)
            self._task = self._bar.add_task(description, total=total)

    def __enter__(self):
        if self._bar:
            self._bar.start()
        return self

    def advance(self, n: int) -> None:
        if self._bar:
            self._bar.advance(self._task, n)

    def __exit__(self, *exc):
        if self._bar:
            self._bar.stop()


def _save_npy(path: Path, array: np.ndarray) -> None:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    atomic_write_bytes(path, buf.getvalue())


def _png_bytes(pixels: np.ndarray, max_px: int) -> bytes:
    from PIL import Image

    img = Image.fromarray(np.ascontiguousarray(pixels), "RGB")
    img.thumbnail((max_px, max_px), Image.LANCZOS)
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=False)  # no text chunks, no timestamps: deterministic bytes
    return buf.getvalue()


def _embed_all(kind: str, docs: list[Document], encoder, work: Path, key: str, batch_size: int,
               progress: bool, thumbnail_px: int) -> np.ndarray:
    """Embed every document, reusing batches a previous (interrupted) run saved under the same key."""
    key_file = work / "key.txt"
    if work.exists() and (not key_file.is_file() or key_file.read_text().strip() != key):
        shutil.rmtree(work)  # leftovers from a different source or encoder: nothing reusable
    work.mkdir(parents=True, exist_ok=True)
    if not key_file.exists():
        atomic_write_bytes(key_file, (key + "\n").encode())
    if kind == "image":
        (work / IMAGES_DIR).mkdir(exist_ok=True)
    chunks = []
    n_batches = (len(docs) + batch_size - 1) // batch_size
    with _Progress(progress, f"embedding {len(docs)} {'images' if kind == 'image' else 'documents'}", len(docs)) as bar:
        for b in range(n_batches):
            batch = docs[b * batch_size : (b + 1) * batch_size]
            chunk_path = work / f"batch-{b:06d}.npy"
            if chunk_path.is_file():
                try:
                    vectors = np.load(chunk_path, allow_pickle=False)
                    if vectors.shape == (len(batch), encoder.dim):
                        chunks.append(vectors)
                        bar.advance(len(batch))
                        continue
                except (OSError, ValueError):
                    pass  # a damaged checkpoint is simply recomputed
            if kind == "text":
                vectors = encoder.embed([d.embed_text or d.text for d in batch])
            else:
                from ..imaging import load_image

                pixels = []
                for d in batch:
                    loaded = load_image(d.image_path)
                    pixels.append(loaded.pixels)
                    # thumbnails before the vectors: a saved batch always has its images
                    atomic_write_bytes(work / image_file_name(d.id), _png_bytes(loaded.pixels, thumbnail_px))
                vectors = encoder.embed(pixels)
            vectors = np.asarray(vectors, dtype=np.float32)
            if vectors.shape != (len(batch), encoder.dim):
                raise ModelError(f"encoder returned shape {vectors.shape} for {len(batch)} inputs (dim {encoder.dim})")
            if not np.all(np.isfinite(vectors)):
                raise ModelError(f"encoder returned non-finite values for batch {b} (documents {batch[0].id!r}…)")
            _save_npy(chunk_path, vectors)
            chunks.append(vectors)
            bar.advance(len(batch))
    vectors = np.concatenate(chunks)
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    if np.any(norms == 0):
        bad = docs[int(np.flatnonzero(norms[:, 0] == 0)[0])].id
        raise ModelError(f"encoder returned a zero vector for document {bad!r}")
    return np.ascontiguousarray(vectors / norms, dtype=np.float32)


def _write_index(path: Path, vectors: np.ndarray, hnsw: HnswParams) -> None:
    import hnswlib

    index = hnswlib.Index(space=hnsw.space, dim=vectors.shape[1])
    index.init_index(max_elements=len(vectors), M=hnsw.M, ef_construction=hnsw.ef_construction,
                     random_seed=hnsw.seed)
    # One thread: with several, insertion order (and so the graph and its bytes) depends on scheduling.
    index.add_items(vectors, np.arange(len(vectors)), num_threads=1)
    index.save_index(str(path))


def _cannot_write(out_dir: Path, e: BaseException) -> MedrwrError:
    reason = " ".join(str(getattr(e, "strerror", None) or e).split())
    return MedrwrError(f"cannot write pack {out_dir}: {reason}; no pack was written (finished embeddings are kept: "
                       "free some space and run the same command again to continue)")


def _write_sqlite(path: Path, docs: list[Document], image_files: list[Optional[str]],
                  content_hashes: list[str]) -> None:
    try:
        _write_sqlite_rows(path, docs, image_files, content_hashes)
    except sqlite3.OperationalError as e:  # "database or disk is full", a read-only or vanished directory
        raise _cannot_write(path.parent, e) from None


def _write_sqlite_rows(path: Path, docs: list[Document], image_files: list[Optional[str]],
                       content_hashes: list[str]) -> None:
    conn = sqlite3.connect(str(path))
    try:
        conn.executescript(lexical.SCHEMA)
        with conn:
            for row, (doc, image_file, digest) in enumerate(zip(docs, image_files, content_hashes)):
                metadata = _metadata_json(doc)
                conn.execute(
                    "INSERT INTO documents(row, doc_id, text, source, title, caption, image_file, metadata, "
                    "content_sha256) VALUES (?,?,?,?,?,?,?,?,?)",
                    (row, doc.id, doc.text or doc.caption or "", doc.source or "", doc.title or "", doc.caption,
                     image_file, metadata, digest),
                )
                conn.executemany("INSERT OR IGNORE INTO doc_keys(key, row) VALUES (?, ?)",
                                 [(key, row) for key in lexical.document_keys(doc.id, doc.metadata or {})])
            conn.execute("INSERT INTO fts(fts) VALUES('rebuild')")
            conn.execute("INSERT INTO fts(fts) VALUES('optimize')")
        conn.execute("VACUUM")
    finally:
        conn.close()


def _build(kind: str, docs: Iterable[Document], out_dir, encoder, *, name: str, version: str, hnsw: HnswParams,
           search_mode: str, fusion: lexical.FusionParams, source_description: str, build_params: Optional[dict],
           overwrite: bool, progress: bool, batch_size: int, thumbnail_px: int = THUMBNAIL_PX) -> Path:
    out_dir = Path(out_dir)
    docs = list(docs)
    _validate(kind, docs, name, version, search_mode)
    if out_dir.exists() and not overwrite:
        raise InputError(f"{out_dir} already exists (use --overwrite to replace it)")
    if batch_size < 1:
        raise InputError("batch_size must be at least 1")
    created = _created_timestamp()

    image_hashes: list[Optional[str]] = [None] * len(docs)
    if kind == "image":
        for i, doc in enumerate(docs):
            if not Path(doc.image_path).is_file():
                raise InputError(f"document {doc.id!r}: image {doc.image_path} not found")
            image_hashes[i] = sha256_file(doc.image_path)
    content_hashes = [_content_sha256(d, h) for d, h in zip(docs, image_hashes)]
    # The checkpoint key: same docs (content + order), same encoder, same batching -> reusable batches.
    key = hashlib.sha256(json.dumps([kind, encoder.sha256, batch_size, thumbnail_px, content_hashes]).encode()).hexdigest()

    work = work_dir_for(out_dir)
    try:
        vectors = _embed_all(kind, docs, encoder, work, key, batch_size, progress, thumbnail_px)
    except BaseException as e:
        if not any(work.glob("batch-*.npy")):  # nothing worth resuming: leave no litter
            shutil.rmtree(work, ignore_errors=True)
        if isinstance(e, OSError):  # disk full, permissions: the user's to fix, then resume
            raise _cannot_write(out_dir, e) from None
        raise

    image_files = [image_file_name(d.id) if kind == "image" else None for d in docs]
    with atomic_directory(out_dir, overwrite=overwrite) as tmp:
        _write_index(tmp / INDEX_FILE, vectors, hnsw)
        _write_sqlite(tmp / DOCS_FILE, docs, image_files, content_hashes)
        if kind == "image":
            (tmp / IMAGES_DIR).mkdir()
            for rel in image_files:
                shutil.copyfile(work / rel, tmp / rel)
        files = {}
        for rel in [INDEX_FILE, DOCS_FILE] + sorted(f for f in image_files if f):
            p = tmp / rel
            files[rel] = {"sha256": sha256_file(p), "size": p.stat().st_size}
        spec = encoder.spec.to_dict() if hasattr(encoder.spec, "to_dict") else dict(encoder.spec)
        manifest = {
            "format_version": FORMAT_VERSION,
            "kind": kind,
            "name": name,
            "version": str(version),
            "created": created,
            "doc_count": len(docs),
            "encoder": {"spec": spec, "sha256": encoder.sha256},
            "hnsw": {**hnsw.to_dict(), "dim": int(vectors.shape[1])},
            "lexical": {"engine": "sqlite-fts5", "table": "fts", "columns": ["title", "text"],
                        "tokenizer": lexical.FTS_TOKENIZER, "bm25_weights": list(lexical.BM25_WEIGHTS),
                        "exact_keys": "doc id, id after namespace ':' or '/', metadata.code; case-folded, dots removed"},
            "search": {"mode": search_mode, "fusion": fusion.to_dict(), "hybrid_candidates": HYBRID_CANDIDATES},
            "build": {"source": source_description, "params": build_params or {}, "seeds": {"hnsw": hnsw.seed},
                      "builder": f"medrwr-edge {__version__}", "thumbnail_px": thumbnail_px if kind == "image" else None},
            "files": files,
        }
        (tmp / MANIFEST_FILE).write_bytes(manifest_bytes(manifest))
    shutil.rmtree(work, ignore_errors=True)
    return out_dir
