"""A knowledge pack: an opened, verified, searchable directory.

Why a DIRECTORY and not one archive file: hnswlib's `load_index` and SQLite both read their files in place, so
opening a pack needs no extraction step, no temp space, and no copy of a 160 MB index (the 98,505-entry
ICD-10-CM pack opens in well under 0.3 s). Each file gets its own sha256 in the manifest, so `pack verify` names
exactly which file is damaged. For transport a pack can still be tarred (`pack export`).

Layout (format_version 1):

    manifest.json   kind, name, version, created, doc_count, encoder lock, hnsw/lexical/search params,
                    build description, files {relative path: {sha256, size}}, manifest_sha256 (of the rest)
    index.hnsw      hnswlib index; label i == documents.row i
    docs.sqlite     documents table + doc_keys (exact id/code lookup) + fts (FTS5, BM25)
    images/*.png    image packs only: thumbnail copies (≤ 512 px) of the reference images

Documents stay in SQLite and are fetched per hit; only the vector index is held in memory.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np

from ..errors import EncoderMismatchError, InputError, IntegrityError, ModelError
from ..paths import models_dir, packs_dir, reading_directory, sha256_file
from . import lexical

FORMAT_VERSION = 1
MANIFEST_FILE = "manifest.json"
INDEX_FILE = "index.hnsw"
DOCS_FILE = "docs.sqlite"
IMAGES_DIR = "images"
SEARCH_MODES = ("dense", "lexical", "hybrid")
# Hybrid fuses this many candidates from each list (or k, if larger): deep enough that a doc ranked ~20th by
# one list and ~5th by the other still surfaces, cheap enough (one hnsw query, one FTS5 query) to stay < 10 ms.
HYBRID_CANDIDATES = 50


@dataclass(frozen=True)
class HnswParams:
    """hnswlib parameters. Defaults chosen by benchmarks/bench_hnsw.py (recall@10 ≥ 0.98, p50 < 1 ms, 100k×384)."""

    space: str = "ip"  # vectors are L2-normalised, so inner product == cosine similarity
    M: int = 16
    ef_construction: int = 200
    ef_search: int = 96
    seed: int = 100

    def to_dict(self) -> dict:
        return {"space": self.space, "M": self.M, "ef_construction": self.ef_construction,
                "ef_search": self.ef_search, "seed": self.seed}


@dataclass
class Hit:
    doc_id: str
    text: str
    score: float
    source: str = ""
    title: str = ""
    caption: Optional[str] = None
    image_path: Optional[str] = None  # absolute path of the pack's PNG copy (image packs)
    metadata: dict = field(default_factory=dict)
    ranks: dict = field(default_factory=dict)  # {"dense": int|None, "lexical": int|None, "exact": int|None, "fused": int}
    mode: str = "dense"

    def to_dict(self) -> dict:
        return {
            "doc_id": self.doc_id, "text": self.text, "score": self.score, "source": self.source,
            "title": self.title, "caption": self.caption, "image_path": self.image_path,
            "metadata": self.metadata, "ranks": self.ranks, "mode": self.mode,
        }


# ------------------------------------------------------------------------------------------------ manifest


def manifest_digest(manifest: dict) -> str:
    """sha256 of the canonical JSON of the manifest without its own `manifest_sha256` field.

    The manifest cannot list its own file hash, so it carries this instead: any hand edit is detected.
    """
    body = {k: v for k, v in manifest.items() if k != "manifest_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, ensure_ascii=False).encode("utf-8")).hexdigest()


def manifest_bytes(manifest: dict) -> bytes:
    manifest = dict(manifest)
    manifest["manifest_sha256"] = manifest_digest(manifest)
    return (json.dumps(manifest, indent=2, sort_keys=True, ensure_ascii=False) + "\n").encode("utf-8")


def read_manifest(pack_dir: Path) -> dict:
    path = pack_dir / MANIFEST_FILE
    if not path.is_file():
        raise IntegrityError(f"{pack_dir} is not a knowledge pack (no {MANIFEST_FILE})")
    try:
        manifest = json.loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise IntegrityError(f"pack {pack_dir}: {MANIFEST_FILE} is not valid JSON ({e})") from None
    if not isinstance(manifest, dict):
        raise IntegrityError(f"pack {pack_dir}: {MANIFEST_FILE} is not a JSON object")
    version = manifest.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise IntegrityError(f"pack {pack_dir}: manifest has no valid format_version")
    if version > FORMAT_VERSION:
        raise IntegrityError(
            f"pack {pack_dir} has format {version}; this medrwr-edge reads ≤ {FORMAT_VERSION} (upgrade medrwr-edge)"
        )
    if manifest.get("manifest_sha256") != manifest_digest(manifest):
        raise IntegrityError(f"pack {pack_dir}: {MANIFEST_FILE} was modified after the pack was built")
    for key in ("kind", "name", "version", "doc_count", "encoder", "hnsw", "files", "search"):
        if key not in manifest:
            raise IntegrityError(f"pack {pack_dir}: manifest lacks {key!r}")
    if manifest["kind"] not in ("text", "image"):
        raise IntegrityError(f"pack {pack_dir}: unknown kind {manifest['kind']!r}")
    return manifest


def resolve_pack_path(pack: str | os.PathLike) -> Path:
    """A pack argument is a directory path, or the name of a pack installed under packs_dir()."""
    p = Path(pack)
    if p.exists() or os.sep in str(pack) or str(pack).startswith("."):
        return p
    installed = packs_dir() / str(pack)
    return installed if installed.exists() else p


# ---------------------------------------------------------------------------------------------------- Pack


class Pack:
    """An opened knowledge pack. Use `Pack.open(path)`; search with `pack.search(query, k)`."""

    def __init__(self, path: Path, manifest: dict, index, conn: sqlite3.Connection, encoder=None):
        self.path = path
        self.manifest = manifest
        self._index = index
        self._conn = conn
        self._encoder = encoder
        # One lock for SQLite, hnswlib's ef setting and lazy encoder loading: one process, several threads.
        self._lock = threading.RLock()

    # -------------------------------------------------------------------------------------------- opening

    @classmethod
    def open(cls, path: str | os.PathLike, encoder=None, verify: str = "fast") -> "Pack":
        """Open a pack. verify="fast": manifest digest, files present with recorded sizes; "full": + sha256."""
        if verify not in ("fast", "full"):
            raise InputError(f"verify must be 'fast' or 'full', not {verify!r}")
        pack_dir = resolve_pack_path(path)
        if not pack_dir.exists():
            raise InputError(f"pack not found: {path}")
        if not pack_dir.is_dir():
            raise InputError(f"{pack_dir} is not a pack directory")
        # Every file is read from one version of the directory, even if an install swaps it meanwhile.
        with reading_directory(pack_dir) as held:
            try:
                manifest = read_manifest(held)
                problems = check_files(held, manifest, full=(verify == "full"))
                if problems:
                    more = f" (+{len(problems) - 3} more; run `medrwr-edge pack verify`)" if len(problems) > 3 else ""
                    raise IntegrityError(f"pack {pack_dir}: {'; '.join(problems[:3])}{more}")
                if encoder is not None:
                    check_encoder_lock(manifest, encoder, pack_dir)
                index = _load_index(held, manifest)
                conn = _connect(held / DOCS_FILE)
            except IntegrityError as e:  # name the pack as the user did, not the held /proc/self/fd path
                raise type(e)(str(e).replace(str(held), str(pack_dir))) from None
        pack = cls(pack_dir, manifest, index, conn, encoder)
        if verify == "full":
            problems = pack._check_contents()
            if problems:
                pack.close()
                raise IntegrityError(f"pack {pack_dir}: {problems[0]}")
        return pack

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def __enter__(self) -> "Pack":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------------------------------ properties

    @property
    def name(self) -> str:
        return self.manifest["name"]

    @property
    def version(self) -> str:
        return self.manifest["version"]

    @property
    def kind(self) -> str:
        return self.manifest["kind"]

    @property
    def doc_count(self) -> int:
        return int(self.manifest["doc_count"])

    @property
    def encoder_sha256(self) -> str:
        return self.manifest["encoder"]["sha256"]

    @property
    def default_mode(self) -> str:
        return self.manifest["search"].get("mode", "dense")

    @property
    def fusion(self) -> lexical.FusionParams:
        return lexical.FusionParams.from_dict(self.manifest["search"].get("fusion", {}))

    def info(self) -> dict:
        m = self.manifest
        files = m["files"]
        return {
            "schema": "medrwr-edge/pack-info/1",
            "path": str(self.path.resolve()),
            "name": self.name,
            "version": self.version,
            "kind": self.kind,
            "format_version": m["format_version"],
            "created": m.get("created"),
            "doc_count": self.doc_count,
            "encoder": {"name": m["encoder"]["spec"].get("name"), "sha256": self.encoder_sha256,
                        "dim": m["hnsw"]["dim"]},
            "hnsw": m["hnsw"],
            "search": m["search"],
            "build": m.get("build", {}),
            "files": len(files),
            "bytes": sum(int(f["size"]) for f in files.values()),
        }

    # ------------------------------------------------------------------------------------------ verifying

    def verify(self) -> list[str]:
        """Full check: every file's sha256, document count, index size, FTS integrity. [] means intact."""
        try:
            manifest = read_manifest(self.path)
        except IntegrityError as e:
            return [str(e)]
        problems = check_files(self.path, manifest, full=True)
        if not problems:
            problems += self._check_contents()
        return problems

    def _check_contents(self) -> list[str]:
        problems = []
        with self._lock:
            try:
                (count,) = self._conn.execute("SELECT count(*) FROM documents").fetchone()
                if count != self.doc_count:
                    problems.append(f"docs.sqlite has {count} documents, manifest says {self.doc_count}")
                # Byte-level damage is already caught by the sha256 check; this catches a pack that was built
                # damaged (e.g. a disk error while building), which hashes "correctly".
                (result,) = self._conn.execute("PRAGMA quick_check").fetchone()
                if result != "ok":
                    problems.append(f"docs.sqlite fails SQLite's check: {result}")
            except sqlite3.DatabaseError as e:
                problems.append(f"docs.sqlite is damaged ({e})")
        if self._index.get_current_count() != self.doc_count:
            problems.append(f"index.hnsw has {self._index.get_current_count()} vectors, manifest says {self.doc_count}")
        return problems

    # ------------------------------------------------------------------------------------------- encoders

    def encoder(self):
        """The encoder this pack was built with: the one given at open, else loaded from the models dir."""
        with self._lock:
            if self._encoder is None:
                self._encoder = _load_locked_encoder(self.manifest, self.path)
            return self._encoder

    # ------------------------------------------------------------------------------------------- searching

    def search(self, query: Any, k: int = 3, mode: Optional[str] = None) -> list[Hit]:
        """Top-k documents for a text query (str), a query vector (np.ndarray) or an image (LoadedImage).

        mode: "dense", "lexical" or "hybrid" (default: the pack's). Text on an image pack searches captions
        lexically; a vector or image query is always dense.
        """
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
            raise InputError(f"k must be an integer, not {type(k).__name__}")
        if k <= 0:
            raise InputError(f"k must be at least 1 (got {k})")
        if k > self.doc_count:
            raise InputError(f"k={k} is more than the {self.doc_count} documents in pack {self.name}")
        k = int(k)
        explicit_mode = mode is not None
        mode = mode or self.default_mode
        if mode not in SEARCH_MODES:
            raise InputError(f"unknown search mode {mode!r}; use one of {', '.join(SEARCH_MODES)}")

        text: Optional[str] = None
        vector: Optional[np.ndarray] = None
        if isinstance(query, str):
            text = query
            if not text.strip():
                raise InputError("query is empty")
            if self.kind == "image":
                if mode == "dense" and explicit_mode:
                    raise InputError(f"image pack {self.name} needs an image for dense search; text searches captions")
                mode = "lexical"
        elif isinstance(query, np.ndarray):
            vector = query
            if mode == "lexical":
                raise InputError("lexical search needs a text query, not a vector")
            mode = "dense"
        elif hasattr(query, "pixels"):  # imaging.LoadedImage
            if self.kind != "image":
                raise InputError(f"pack {self.name} is a text pack; it cannot be searched with an image")
            if mode == "lexical":
                raise InputError("lexical search needs a text query, not an image")
            mode = "dense"
            vector = self.encoder().embed([query.pixels])[0]
        else:
            raise InputError(f"cannot search with a {type(query).__name__}; give text, a vector or an image")

        depth = max(k, HYBRID_CANDIDATES) if mode == "hybrid" else k
        dense: list[tuple[int, float]] = []
        if mode in ("dense", "hybrid"):
            if vector is None:
                vector = self.encoder().embed([text], is_query=True)[0]
            dense = self._dense(vector, min(depth, self.doc_count))
        with self._lock:
            lex = lexical.lexical_search(self._conn, text, depth) if text is not None and mode != "dense" else []
            exact = lexical.exact_matches(self._conn, text) if text is not None and mode != "dense" else []
        if mode == "dense":
            ranked = dense
        elif mode == "lexical":
            # BM25 order with exact identifier matches first; scores stay BM25 (exact-only hits get theirs too).
            lex_scores = dict(lex)
            head = [r for r in dict.fromkeys(exact)]
            ranked = [(r, lex_scores.get(r, 0.0)) for r in head] + [(r, s) for r, s in lex if r not in set(head)]
        else:
            ranked = lexical.fuse(dense, lex, self.fusion, exact=exact)
        ranked = ranked[:k]

        dense_rank = {r: i for i, (r, _) in enumerate(dense, start=1)}
        lex_rank = {r: i for i, (r, _) in enumerate(lex, start=1)}
        exact_rank = {r: i for i, r in enumerate(exact, start=1)}
        rows = self._fetch([r for r, _ in ranked])
        hits = []
        for fused_rank, (row, score) in enumerate(ranked, start=1):
            doc = rows[row]
            hits.append(Hit(
                doc_id=doc["doc_id"], text=doc["text"], score=float(score), source=doc["source"],
                title=doc["title"], caption=doc["caption"],
                image_path=str((self.path / doc["image_file"]).resolve()) if doc["image_file"] else None,
                metadata=doc["metadata"],
                ranks={"dense": dense_rank.get(row), "lexical": lex_rank.get(row), "exact": exact_rank.get(row),
                       "fused": fused_rank},
                mode=mode,
            ))
        return hits

    def _dense(self, vector: np.ndarray, n: int) -> list[tuple[int, float]]:
        dim = int(self.manifest["hnsw"]["dim"])
        v = np.asarray(vector, dtype=np.float32).reshape(-1)
        if v.shape[0] != dim:
            raise InputError(f"query vector has {v.shape[0]} dimensions; pack {self.name} uses {dim}")
        norm = float(np.linalg.norm(v))
        if not np.isfinite(norm) or norm == 0.0:
            raise InputError("query vector is zero or not finite")
        v = (v / norm)[None, :]
        with self._lock:
            try:
                labels, dists = self._index.knn_query(v, k=n, num_threads=1)
            except RuntimeError:
                # hnswlib cannot always return n results from a small or oddly-shaped graph; fall back to an
                # exact scan (rare, and only ever on small packs or huge k) so callers always get n results.
                allv = np.asarray(self._index.get_items(list(range(self.doc_count))), dtype=np.float32)
                sims = allv @ v[0]
                order = np.argsort(-sims, kind="stable")[:n]
                return [(int(i), float(sims[i])) for i in order]
        return [(int(l), float(1.0 - d)) for l, d in zip(labels[0], dists[0])]

    def _fetch(self, rows: list[int]) -> dict[int, dict]:
        if not rows:
            return {}
        marks = ",".join("?" * len(rows))
        with self._lock:
            cur = self._conn.execute(
                f"SELECT row, doc_id, text, source, title, caption, image_file, metadata FROM documents "
                f"WHERE row IN ({marks})", rows)
            out = {}
            for row, doc_id, text, source, title, caption, image_file, metadata in cur:
                out[row] = {"doc_id": doc_id, "text": text, "source": source, "title": title, "caption": caption,
                            "image_file": image_file, "metadata": json.loads(metadata)}
        missing = [r for r in rows if r not in out]
        if missing:
            raise IntegrityError(f"pack {self.path}: index label {missing[0]} has no document in docs.sqlite")
        return out

    def document_hashes(self) -> dict[str, str]:
        """{doc_id: content_sha256} for every document (used by diff)."""
        with self._lock:
            return dict(self._conn.execute("SELECT doc_id, content_sha256 FROM documents ORDER BY row"))


# ---------------------------------------------------------------------------------------------- helpers


def check_files(pack_dir: Path, manifest: dict, full: bool) -> list[str]:
    """Problems with the files the manifest lists (missing, wrong size, wrong sha256 when full)."""
    problems = []
    files = manifest.get("files")
    if not isinstance(files, dict) or not files:
        return ["manifest lists no files"]
    for required in (INDEX_FILE, DOCS_FILE):
        if required not in files:
            problems.append(f"manifest does not list {required}")
    for rel, entry in sorted(files.items()):
        path = (pack_dir / rel)
        if ".." in Path(rel).parts or Path(rel).is_absolute():
            problems.append(f"manifest lists a path outside the pack: {rel}")
            continue
        if not path.is_file():
            problems.append(f"{rel} is missing")
            continue
        size = path.stat().st_size
        if size != entry.get("size"):
            problems.append(f"{rel} has {size} bytes, manifest says {entry.get('size')}")
            continue
        if full and sha256_file(path) != entry.get("sha256"):
            problems.append(f"{rel} has been modified (sha256 differs from the manifest)")
    if full and (pack_dir / IMAGES_DIR).is_dir():
        for extra in sorted((pack_dir / IMAGES_DIR).iterdir()):
            rel = f"{IMAGES_DIR}/{extra.name}"
            if rel not in files:
                problems.append(f"{rel} is not listed in the manifest")
    return problems


def check_encoder_lock(manifest: dict, encoder, pack_dir: Path) -> None:
    locked = manifest["encoder"]["sha256"]
    if encoder.sha256 != locked:
        raise EncoderMismatchError(
            f"pack {pack_dir} was built with encoder sha256 {locked}, but the encoder offered has sha256 "
            f"{encoder.sha256}; rebuild the pack or use the encoder it was built with"
        )
    if getattr(encoder, "kind", manifest["kind"]) != manifest["kind"]:
        raise EncoderMismatchError(f"pack {pack_dir} is a {manifest['kind']} pack; the encoder is {encoder.kind}")


# Installed encoders loaded by packs, shared: two packs built with MiniLM (or `serve` answering with several packs)
# use one ONNX session, not one each. Keyed by the folder's files (name, size, mtime), so a replaced file is loaded
# (and verified) again. Encoders are read-only after loading, and ONNX Runtime sessions are thread-safe.
_SHARED_ENCODERS: dict = {}
_SHARED_ENCODERS_LOCK = threading.Lock()


def _shared_encoder(folder: Path, load):
    stamp = tuple(sorted((p.name, st.st_size, st.st_mtime_ns) for p in folder.iterdir()
                         if p.is_file() for st in [p.stat()]))
    key = (str(folder.resolve()), stamp)
    with _SHARED_ENCODERS_LOCK:
        if key not in _SHARED_ENCODERS:
            _SHARED_ENCODERS[key] = load(folder)
        return _SHARED_ENCODERS[key]


def _load_locked_encoder(manifest: dict, pack_dir: Path):
    from .encoders import load_encoder

    name = manifest["encoder"]["spec"].get("name", "")
    candidates = [models_dir() / name] if name else []
    from .. import assets

    for fn in ("default_text_encoder_dir", "default_image_encoder_dir"):
        try:
            candidates.append(Path(getattr(assets, fn)()))
        except (AttributeError, ModelError, IntegrityError):
            pass  # not installed: the models dir by spec name is the primary location anyway
    for cand in candidates:
        if (cand / "encoder.json").is_file():
            try:
                from .encoders import read_spec

                if read_spec(cand).onnx_sha256 != manifest["encoder"]["sha256"]:
                    continue
            except IntegrityError:
                continue
            encoder = _shared_encoder(cand, load_encoder)
            check_encoder_lock(manifest, encoder, pack_dir)
            return encoder
    raise ModelError(
        f"pack {pack_dir.name} needs encoder {name!r} (sha256 {manifest['encoder']['sha256'][:12]}…), which is "
        f"not installed under {models_dir()}; run `medrwr-edge models install`"
    )


def _load_index(pack_dir: Path, manifest: dict):
    import hnswlib

    h = manifest["hnsw"]
    try:
        index = hnswlib.Index(space=h["space"], dim=int(h["dim"]))
        index.load_index(str(pack_dir / INDEX_FILE), max_elements=int(manifest["doc_count"]))
    except (RuntimeError, KeyError, ValueError, TypeError) as e:
        raise IntegrityError(f"pack {pack_dir}: cannot load {INDEX_FILE} ({e})") from None
    index.set_ef(int(h.get("ef_search", 64)))
    return index


def _connect(db_path: Path) -> sqlite3.Connection:
    """Open docs.sqlite read-only: the very file `db_path` names now, even under a /proc/self/fd/N path.

    SQLite resolves symlinks itself (readlink), which turns a held /proc/self/fd/N directory
    (paths.reading_directory) back into a path a swap can redirect. So it is given the file's real path, and the
    file at that path must still be the one opened here afterwards (a swapped-out pack is never swapped back in).
    """
    for _ in range(10):
        try:
            fd = os.open(db_path, os.O_RDONLY)
        except OSError as e:
            raise IntegrityError(f"{db_path} cannot be opened ({e.strerror})") from None
        try:
            held = os.fstat(fd)
            proc = f"/proc/self/fd/{fd}"
            real = os.readlink(proc) if os.path.exists(proc) else os.path.abspath(db_path)
        finally:
            os.close(fd)
        # immutable=1: the pack never changes while open, so SQLite takes no locks and writes no journal.
        uri = Path(real).as_uri() + "?mode=ro&immutable=1"
        conn = None
        try:
            conn = sqlite3.connect(uri, uri=True, check_same_thread=False)
            conn.execute("SELECT count(*) FROM sqlite_master").fetchone()
        except sqlite3.DatabaseError as e:
            if _still(real, held):
                raise IntegrityError(f"{db_path} is not a readable SQLite database ({e})") from None
        if conn is not None and _still(real, held):
            return conn
        if conn is not None:
            conn.close()  # swapped while connecting: try again from the held directory
    raise IntegrityError(f"{db_path} kept changing while it was being opened")


def _still(path: str, st: os.stat_result) -> bool:
    try:
        return os.path.samestat(os.stat(path), st)
    except OSError:
        return False
