"""The patient history store: add, list, show, delete, and open a history as a searchable kb_pack `Pack`.

Layout (directories 0700, files 0600, under `data_dir()/history/`):

    secret.key             the install's history secret (see crypto.py)
    .lock                  taken (flock) while a history is added to or deleted
    <history id>/          one per patient; the name is HMAC(secret, key), never the key
        history.enc        AES-GCM(JSON): entries (file sha256, kind, date, label, added) and passages
        vectors.enc        AES-GCM(.npy float32): one MiniLM vector per passage, in passage order

Why not an on-disk kb_pack directory: a pack's docs.sqlite holds every passage and, in its FTS5 index, every word
in plain text, so it cannot be encrypted passage by passage without losing lexical search. A history is small
(tens to hundreds of passages), so it is stored sealed and, when asked, materialised in memory as an ordinary
`kb_pack.pack.Pack` (an in-memory SQLite with the same schema, FTS5 and exact-id keys, and an hnswlib index built
from the stored vectors with the same parameters): search (dense + BM25 hybrid, exact ids) is the kb_pack code,
unchanged. Integrity: AES-GCM authenticates every stored byte; the in-memory manifest lists the sha256 of both
sealed files, so a record's manifest_sha256 names the exact history state it used.

An add is incremental (only new passages are embedded) and atomic (the history directory is rebuilt in a temp
directory and renamed); a file whose sha256 is already in the history is skipped and reported. File names are
never stored (they may hold a patient's name): a file is its sha256 plus an optional user label (sealed).
Passage ids are `note-<first 8 hex of the file sha256>-<n>`.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import io
import json
import os
import shutil
import sqlite3
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional, Sequence

import numpy as np

from ..errors import InputError, IntegrityError, MedrwrError
from ..paths import atomic_directory, sha256_bytes
from . import crypto
from .sources import read_history_file

HISTORY_FILE = "history.enc"
VECTORS_FILE = "vectors.enc"
PACK_NAME = "patient-history"
ROLE = "patient-history"
SOURCE = "history"
MAX_KEY_CHARS = 256
MAX_LABEL_CHARS = 200
STATE_FORMAT = "medrwr-edge-history-state/1"


@dataclass
class HistoryState:
    """The sealed content of one history (history.enc), plus its vectors (vectors.enc)."""

    created: str
    updated: str
    revision: int
    encoder_sha256: str
    entries: list[dict] = field(default_factory=list)  # {sha256, kind, date, label, added, passages}
    passages: list[dict] = field(default_factory=list)  # {id, text, date, kind, entry}
    vectors: Optional[np.ndarray] = None

    def to_json(self) -> dict:
        return {"format": STATE_FORMAT, "created": self.created, "updated": self.updated, "revision": self.revision,
                "encoder_sha256": self.encoder_sha256, "entries": self.entries, "passages": self.passages}


@dataclass
class AddResult:
    history_id: str
    created: bool
    added: list[tuple[int, int]]  # (argument position, passages added)
    unchanged: list[int]  # argument positions whose file was already in the history
    passage_count: int
    revision: int


@dataclass
class HistorySummary:
    history_id: str
    passage_count: int
    revision: int
    created: str
    updated: str
    dates: list[str]
    entries: list[dict]  # show(): every entry (kind, date, label, passages, sha256 prefix); list(): []
    damaged: bool = False  # list(): the sealed files do not open (see crypto.unseal)

    def to_dict(self) -> dict:
        return {"history_id": self.history_id, "passages": self.passage_count, "revision": self.revision,
                "created": self.created, "updated": self.updated, "dates": self.dates, "entries": self.entries,
                "damaged": self.damaged}


# --------------------------------------------------------------------------------------------- helpers


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).strftime("%Y-%m-%dT%H:%M:%SZ")


def check_key(key: str) -> str:
    if not isinstance(key, str) or not key.strip():
        raise InputError("the patient key is empty")
    key = key.strip()
    if len(key) > MAX_KEY_CHARS:
        raise InputError(f"the patient key is longer than {MAX_KEY_CHARS} characters")
    return key


def check_date(date: Optional[str]) -> Optional[str]:
    if date is None:
        return None
    try:
        if len(date) != 10:
            raise ValueError
        return _dt.date.fromisoformat(date).isoformat()
    except ValueError:
        raise InputError("--date must be a calendar date written YYYY-MM-DD") from None


def _history_dir(hid: str) -> Path:
    return crypto.history_root() / hid


def _unknown_key() -> InputError:
    # The key itself is never echoed: it may be a record number.
    return InputError("no patient history is stored under the key given (`medrwr-edge history list` shows the "
                      "stored history ids)")


def resolve(key: str, must_exist: bool = True) -> tuple[bytes, str, Path]:
    """(secret, history id, directory) for a patient key."""
    key = check_key(key)
    if must_exist and not crypto.secret_path().exists() and not crypto.stored_history_ids():
        raise _unknown_key()
    secret = crypto.load_secret(create=not must_exist)
    hid = crypto.history_id(secret, key)
    path = _history_dir(hid)
    if must_exist and not (path / HISTORY_FILE).is_file():
        raise _unknown_key()
    return secret, hid, path


@contextlib.contextmanager
def _store_lock() -> Iterator[None]:
    """One writer at a time (two concurrent adds to one history would otherwise lose one of them)."""
    root = crypto.ensure_private_dir(crypto.history_root())
    fd = os.open(root / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            import fcntl

            fcntl.flock(fd, fcntl.LOCK_EX)
        except ImportError:  # not POSIX: no advisory lock; adds are still atomic, just not serialised
            pass
        yield
    finally:
        os.close(fd)


def load_state(secret: bytes, hid: str, path: Path) -> HistoryState:
    try:
        sealed_state = (path / HISTORY_FILE).read_bytes()
        sealed_vectors = (path / VECTORS_FILE).read_bytes()
    except OSError as e:
        raise IntegrityError(f"history {hid} is incomplete or unreadable ({e.strerror})") from None
    try:
        data = json.loads(crypto.unseal(secret, hid, HISTORY_FILE, sealed_state).decode("utf-8"))
        vectors = np.load(io.BytesIO(crypto.unseal(secret, hid, VECTORS_FILE, sealed_vectors)), allow_pickle=False)
    except (ValueError, UnicodeDecodeError) as e:
        raise IntegrityError(f"history {hid} does not decode ({e})") from None
    if not isinstance(data, dict) or data.get("format") != STATE_FORMAT:
        raise IntegrityError(f"history {hid} has an unknown format")
    state = HistoryState(data["created"], data["updated"], int(data["revision"]), data["encoder_sha256"],
                         list(data["entries"]), list(data["passages"]), vectors)
    if vectors.ndim != 2 or vectors.shape[0] != len(state.passages):
        raise IntegrityError(f"history {hid} has {vectors.shape[0]} vectors for {len(state.passages)} passages")
    return state


def _write_state(secret: bytes, hid: str, path: Path, state: HistoryState) -> None:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(state.vectors, dtype=np.float32), allow_pickle=False)
    state_bytes = json.dumps(state.to_json(), ensure_ascii=False, sort_keys=True).encode("utf-8")
    with atomic_directory(path, overwrite=True) as tmp:  # mkdtemp: 0700
        for name, plain in ((HISTORY_FILE, state_bytes), (VECTORS_FILE, buf.getvalue())):
            fd = os.open(tmp / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(crypto.seal(secret, hid, name, plain))
                f.flush()
                os.fsync(f.fileno())
    os.chmod(path, 0o700)


def _default_encoder():
    from .. import assets
    from ..kb_pack.encoders import load_encoder

    return load_encoder(assets.default_text_encoder_dir())


def snippet_text(text: str, date: Optional[str]) -> str:
    """What is spliced into <retrieve>: the passage, saying it is this patient's history and when.

    Only the passage itself is embedded and indexed: a shared "Patient history" prefix would match every query
    that says "history" and pull every passage's vector towards the same point."""
    return f"Patient history ({date or 'undated'}): {text}"


# ------------------------------------------------------------------------------------------------ commands


def add(key: str, files: Sequence[str | os.PathLike], *, date: Optional[str] = None, label: Optional[str] = None,
        encoder=None) -> AddResult:
    """Add files to a patient's history (creating it). Every file is read and checked before anything is written."""
    if not files:
        raise InputError("give at least one history file")
    date = check_date(date)
    if label is not None:
        label = " ".join(label.split())
        if len(label) > MAX_LABEL_CHARS:
            raise InputError(f"--label is longer than {MAX_LABEL_CHARS} characters")
    sources = [read_history_file(f, i) for i, f in enumerate(files, 1)]
    secret, hid, path = resolve(key, must_exist=False)
    with _store_lock():
        exists = (path / HISTORY_FILE).is_file()
        encoder = encoder or _default_encoder()
        if exists:
            state = load_state(secret, hid, path)
        else:
            now = _now()
            state = HistoryState(now, now, 0, encoder.sha256, vectors=np.zeros((0, encoder.dim), np.float32))
        if state.encoder_sha256 != encoder.sha256:  # the encoder was upgraded: re-embed the (small) history
            state.vectors = encoder.embed([p["text"] for p in state.passages]) if state.passages else \
                np.zeros((0, encoder.dim), np.float32)
            state.encoder_sha256 = encoder.sha256
        known = {e["sha256"] for e in state.entries}
        added, unchanged, new_passages = [], [], []
        for position, src in enumerate(sources, 1):
            if src.sha256 in known:
                unchanged.append(position)
                continue
            known.add(src.sha256)
            entry_index = len(state.entries)
            state.entries.append({"sha256": src.sha256, "kind": src.kind, "date": date, "label": label,
                                  "added": _now(), "passages": len(src.passages)})
            for n, text in enumerate(src.passages, 1):
                new_passages.append({"id": f"note-{src.sha256[:8]}-{n}", "text": text,
                                     "date": date, "kind": src.kind, "entry": entry_index})
            added.append((position, len(src.passages)))
        if new_passages:
            ids = {p["id"] for p in state.passages}
            clash = next((p["id"] for p in new_passages if p["id"] in ids), None)
            if clash:  # two different files whose sha256 share 8 hex digits: vanishingly rare, but never merge them
                raise MedrwrError(f"passage id {clash} already exists in this history; the file cannot be added")
            vectors = encoder.embed([p["text"] for p in new_passages])
            state.passages += new_passages
            state.vectors = np.concatenate([np.asarray(state.vectors, np.float32).reshape(-1, encoder.dim), vectors])
            state.revision += 1
            state.updated = _now()
            _write_state(secret, hid, path, state)
    return AddResult(hid, not exists, added, unchanged, len(state.passages), state.revision)


def _summary(hid: str, state: HistoryState, with_entries: bool) -> HistorySummary:
    dates = sorted({e["date"] for e in state.entries if e.get("date")})
    entries = []
    if with_entries:
        entries = [{"n": i, "kind": e["kind"], "date": e.get("date"), "label": e.get("label"),
                    "passages": e["passages"], "sha256": e["sha256"][:16], "added": e["added"]}
                   for i, e in enumerate(state.entries, 1)]
    return HistorySummary(hid, len(state.passages), state.revision, state.created, state.updated, dates, entries)


def list_histories() -> list[HistorySummary]:
    """Every stored history by opaque id (keys are not stored, so they cannot be listed)."""
    root = crypto.history_root()
    if not crypto.stored_history_ids():
        return []
    secret = crypto.load_secret(create=False)
    out = []
    for path in (root / hid for hid in crypto.stored_history_ids()):
        if (path / HISTORY_FILE).is_file():
            try:
                out.append(_summary(path.name, load_state(secret, path.name, path), with_entries=False))
            except IntegrityError:  # listed, so that it can be seen (and deleted by key), not hidden
                out.append(HistorySummary(path.name, -1, -1, "", "", [], [], damaged=True))
    return out


def show(key: str) -> HistorySummary:
    secret, hid, path = resolve(key)
    return _summary(hid, load_state(secret, hid, path), with_entries=True)


@dataclass
class DeleteResult:
    history_id: str
    passages: int
    log_entries_removed: int


def delete(key: str) -> DeleteResult:
    """Remove a patient's history completely: its directory, and every logged answer that searched it."""
    from ..evidence.log import purge_history_entries

    secret, hid, path = resolve(key)
    with _store_lock():
        try:
            passages = len(load_state(secret, hid, path).passages)
        except IntegrityError:
            passages = 0  # a damaged history is still deleted
        # The log first: if it cannot be purged, the history stays and the command can simply be run again.
        removed = purge_history_entries(hid)
        shutil.rmtree(path)
        for leftover in path.parent.glob(f".{hid}.*"):  # an update interrupted by a crash (atomic_directory temps)
            shutil.rmtree(leftover, ignore_errors=True)
    return DeleteResult(hid, passages, removed)


# ------------------------------------------------------------------------------------ opening for search


def open_history_pack(key: str, encoder=None):
    """(an in-memory kb_pack `Pack` over the patient's history, its record for the evidence `packs` list)."""
    secret, hid, path = resolve(key)
    state = load_state(secret, hid, path)
    encoder = encoder or _default_encoder()
    vectors = state.vectors
    if state.encoder_sha256 != encoder.sha256:  # an upgraded encoder: re-embed in memory (histories are small)
        vectors = encoder.embed([p["text"] for p in state.passages])
    pack = _memory_pack(hid, path, state, np.asarray(vectors, np.float32), encoder)
    record = {
        "name": PACK_NAME,
        "version": pack.version,
        "kind": "text",
        "role": ROLE,
        "doc_count": pack.doc_count,
        "encoder_sha256": pack.encoder_sha256,
        "manifest_sha256": pack.manifest["manifest_sha256"],
        "path": str(path.resolve()),
        "history_id": hid,  # opaque; `history delete` finds logged answers by it. Never the key.
    }
    return pack, record


def _memory_pack(hid: str, path: Path, state: HistoryState, vectors: np.ndarray, encoder):
    import hnswlib

    from ..kb_pack import lexical
    from ..kb_pack.build import _content_sha256, _metadata_json
    from ..kb_pack.documents import Document
    from ..kb_pack.pack import HYBRID_CANDIDATES, FORMAT_VERSION, HnswParams, Pack, manifest_digest

    if not state.passages:
        raise IntegrityError(f"history {hid} has no passages")
    docs = [Document(id=p["id"], text=p["text"], source=SOURCE, title="",
                     metadata={"date": p.get("date"), "kind": p.get("kind")}) for p in state.passages]
    hnsw = HnswParams()
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    vectors = np.ascontiguousarray(vectors / np.maximum(norms, 1e-12), dtype=np.float32)
    index = hnswlib.Index(space=hnsw.space, dim=int(vectors.shape[1]))
    index.init_index(max_elements=len(vectors), M=hnsw.M, ef_construction=hnsw.ef_construction, random_seed=hnsw.seed)
    index.add_items(vectors, np.arange(len(vectors)), num_threads=1)  # one thread: deterministic graph
    index.set_ef(hnsw.ef_search)

    # The same tables and rows as kb_pack/build.py writes to docs.sqlite, but in memory: nothing in plain text
    # ever reaches the disk.
    conn = sqlite3.connect(":memory:", check_same_thread=False)
    conn.executescript(lexical.SCHEMA)
    with conn:
        for row, doc in enumerate(docs):
            conn.execute(
                "INSERT INTO documents(row, doc_id, text, source, title, caption, image_file, metadata, "
                "content_sha256) VALUES (?,?,?,?,?,?,?,?,?)",
                (row, doc.id, doc.text, doc.source, doc.title, None, None, _metadata_json(doc),
                 _content_sha256(doc, None)))
            conn.executemany("INSERT OR IGNORE INTO doc_keys(key, row) VALUES (?, ?)",
                             [(k, row) for k in lexical.document_keys(doc.id, doc.metadata)])
        conn.execute("INSERT INTO fts(fts) VALUES('rebuild')")

    spec = encoder.spec.to_dict() if hasattr(encoder.spec, "to_dict") else dict(encoder.spec)
    files = {name: {"sha256": sha256_bytes((path / name).read_bytes()), "size": (path / name).stat().st_size}
             for name in (HISTORY_FILE, VECTORS_FILE)}
    manifest = {
        "format_version": FORMAT_VERSION, "kind": "text", "name": PACK_NAME, "version": f"r{state.revision}",
        "created": state.created, "doc_count": len(docs), "encoder": {"spec": spec, "sha256": encoder.sha256},
        "hnsw": {**hnsw.to_dict(), "dim": int(vectors.shape[1])},
        "lexical": {"engine": "sqlite-fts5", "table": "fts", "columns": ["title", "text"],
                    "tokenizer": lexical.FTS_TOKENIZER, "bm25_weights": list(lexical.BM25_WEIGHTS)},
        "search": {"mode": "hybrid", "fusion": lexical.FusionParams().to_dict(),
                   "hybrid_candidates": HYBRID_CANDIDATES},
        "build": {"source": "patient history (sealed; materialised in memory)", "history_id": hid},
        "files": files,
    }
    manifest["manifest_sha256"] = manifest_digest(manifest)
    return Pack(path, manifest, index, conn, encoder)


def open_history_for_record(key: str, entry: dict, encoder=None):
    """Reopen the history a record's `packs` entry names (for replay): the key must lead to that history id, and
    the history must be in the same state (manifest digest over its sealed files) as when the answer was made."""
    pack, record = open_history_pack(key, encoder)
    problem = None
    if record["history_id"] != entry.get("history_id"):
        problem = "the key given opens a different patient's history than the one this answer searched"
    elif record["manifest_sha256"] != entry.get("manifest_sha256"):
        problem = (f"the patient history changed since this answer (revision {entry.get('version')} then, "
                   f"{record['version']} now)")
    if problem:
        pack.close()
        raise InputError(problem)
    return pack, record
