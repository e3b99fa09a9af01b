"""Readers that turn user files into `Document`s, and word chunking.

All readers are strict: text must be UTF-8 (an error names the line and byte offset), every record needs
non-empty text, and problems are raised as one-line `InputError`s. Ids that a source does not give are derived
from the file name and record number, so the same file always yields the same ids.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Iterator

from ..errors import InputError
from .documents import Document

TEXT_SUFFIXES = (".txt", ".md")


def _decode_line(raw: bytes, path: Path, lineno: int, offset: int) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise InputError(
            f"{path}: line {lineno} is not valid UTF-8 (byte offset {offset + e.start} in the file)"
        ) from None


def _require_file(path: str | Path) -> Path:
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: no such file")
    if not path.is_file():
        raise InputError(f"{path}: not a file")
    return path


def _opt_str(value, what: str, path: Path, where: str) -> str:
    if value is None:
        return ""
    if not isinstance(value, (str, int, float)) or isinstance(value, bool):
        raise InputError(f"{path}: {where}: field {what!r} must be a string")
    return str(value).strip()


def read_jsonl(path: str | Path) -> Iterator[Document]:
    """One JSON object per line: {"text": ..., "id"?: ..., "source"?: ..., "title"?: ..., "metadata"?: {...}}.

    Blank lines are skipped. Missing ids become `<file stem>:<line number>`.
    """
    path = _require_file(path)
    for lineno, obj in _jsonl_objects(path):
        where = f"line {lineno}"
        text = _opt_str(obj.get("text"), "text", path, where)
        if not text:
            raise InputError(f"{path}: line {lineno} has no 'text'")
        doc_id = _opt_str(obj.get("id"), "id", path, where) or f"{path.stem}:{lineno}"
        metadata = obj.get("metadata") or {}
        if not isinstance(metadata, dict):
            raise InputError(f"{path}: line {lineno}: 'metadata' must be an object")
        yield Document(
            id=doc_id,
            text=text,
            source=_opt_str(obj.get("source"), "source", path, where) or path.name,
            title=_opt_str(obj.get("title"), "title", path, where),
            metadata=metadata,
        )


def _jsonl_objects(path: Path) -> Iterator[tuple[int, dict]]:
    """(line number, object) for each non-blank line; strict UTF-8 and JSON, errors name the line."""
    offset = 0
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            line = _decode_line(raw, path, lineno, offset)
            offset += len(raw)
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise InputError(f"{path}: line {lineno} is not valid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(obj, dict):
                raise InputError(f"{path}: line {lineno} must be a JSON object")
            yield lineno, obj


def _read_text_strict(path: Path) -> str:
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        lineno = data[: e.start].count(b"\n") + 1
        raise InputError(f"{path}: line {lineno} is not valid UTF-8 (byte offset {e.start})") from None


def read_csv(path: str | Path, text_column: str = "text") -> Iterator[Document]:
    """CSV with a header row containing `text_column`; optional columns id, source, title."""
    path = _require_file(path)
    content = _read_text_strict(path)
    reader = csv.DictReader(io.StringIO(content, newline=""))
    if reader.fieldnames is None:
        raise InputError(f"{path}: empty CSV (no header row)")
    fields = [f.strip() for f in reader.fieldnames]
    if text_column not in fields:
        raise InputError(f"{path}: header has no {text_column!r} column (found: {', '.join(fields)})")
    reader.fieldnames = fields
    for recno, row in enumerate(reader, start=1):
        lineno = reader.line_num
        if None in row:
            raise InputError(f"{path}: line {lineno} has more fields than the header")
        text = (row.get(text_column) or "").strip()
        if not text:
            raise InputError(f"{path}: line {lineno} has an empty {text_column!r} field")
        yield Document(
            id=(row.get("id") or "").strip() or f"{path.stem}:{recno}",
            text=text,
            source=(row.get("source") or "").strip() or path.name,
            title=(row.get("title") or "").strip(),
        )


def read_folder(path: str | Path) -> Iterator[Document]:
    """Every .txt/.md file under `path` (sorted, recursive) is one document; id = relative path."""
    root = Path(path)
    if not root.exists():
        raise InputError(f"{root}: no such folder")
    if not root.is_dir():
        raise InputError(f"{root}: not a folder")
    for file in sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES):
        text = _read_text_strict(file).strip()
        if not text:
            continue
        rel = file.relative_to(root).as_posix()
        title = ""
        first = text.splitlines()[0].strip()
        if first.startswith("#"):
            title = first.lstrip("#").strip()
        yield Document(id=rel, text=text, source=rel, title=title or file.stem)


def read_text_source(path: str | Path) -> Iterator[Document]:
    """Dispatch on what `path` is: folder, .jsonl or .csv."""
    p = Path(path)
    if p.is_dir():
        return read_folder(p)
    if not p.exists():
        raise InputError(f"{p}: no such file or folder")
    suffix = p.suffix.lower()
    if suffix in (".jsonl", ".ndjson"):
        return read_jsonl(p)
    if suffix == ".csv":
        return read_csv(p)
    raise InputError(f"{p}: unsupported source type {suffix or '(none)'}; use a .jsonl, .csv or a folder")


def read_image_captions(path: str | Path) -> Iterator[Document]:
    """A CSV (columns image, caption, optional id/source/title) or JSONL with the same fields.

    Image paths are relative to the captions file. The image itself is checked when the pack is built.
    """
    p = _require_file(path)
    base = p.parent
    if p.suffix.lower() in (".jsonl", ".ndjson"):
        records = [(lineno, {k: obj.get(k) for k in ("image", "caption", "id", "source", "title")})
                   for lineno, obj in _jsonl_objects(p)]
    elif p.suffix.lower() == ".csv":
        reader = csv.DictReader(io.StringIO(_read_text_strict(p), newline=""))
        fields = [f.strip() for f in (reader.fieldnames or [])]
        for need in ("image", "caption"):
            if need not in fields:
                raise InputError(f"{p}: header has no {need!r} column (found: {', '.join(fields) or 'nothing'})")
        reader.fieldnames = fields
        records = [(reader.line_num, dict(row)) for row in reader]
    else:
        raise InputError(f"{p}: captions must be a .csv or .jsonl file")
    for lineno, rec in records:
        where = f"line {lineno}"
        image = _opt_str(rec.get("image"), "image", p, where)
        caption = _opt_str(rec.get("caption"), "caption", p, where)
        if not image:
            raise InputError(f"{p}: line {lineno} has no 'image'")
        if not caption:
            raise InputError(f"{p}: line {lineno} has no 'caption'")
        image_path = (base / image).resolve()
        if not image_path.is_file():
            raise InputError(f"{p}: line {lineno}: image {image} not found")
        yield Document(
            id=_opt_str(rec.get("id"), "id", p, where) or Path(image).as_posix(),
            text=caption,
            source=_opt_str(rec.get("source"), "source", p, where) or p.name,
            title=_opt_str(rec.get("title"), "title", p, where),
            image_path=str(image_path),
            caption=caption,
        )


def chunk_words(text: str, min_words: int = 100, max_words: int = 200, overlap: int = 20) -> list[str]:
    """Split `text` into chunks of at most `max_words` words, each (but a lone short text) ≥ `min_words`.

    Windows advance by `max_words - overlap` words; a last window shorter than `min_words` is extended
    backwards (more overlap with the previous chunk), so no chunk is shorter than `min_words` unless the
    whole text is. The paper's knowledge base uses chunks of ≥ 100 words.
    """
    if min_words < 1 or max_words < min_words or not (0 <= overlap < max_words):
        raise InputError(
            f"bad chunking parameters: need 1 ≤ min_words ≤ max_words and 0 ≤ overlap < max_words "
            f"(got min={min_words}, max={max_words}, overlap={overlap})"
        )
    words = text.split()
    if len(words) <= max_words:
        return [" ".join(words)] if words else []
    step = max_words - overlap
    starts = list(range(0, len(words), step))
    chunks: list[tuple[int, int]] = []
    for s in starts:
        e = min(s + max_words, len(words))
        chunks.append((s, e))
        if e == len(words):
            break
    s, e = chunks[-1]
    if e - s < min_words:
        chunks[-1] = (max(0, e - min_words), e)
    return [" ".join(words[s:e]) for s, e in chunks]


def chunk_documents(docs, min_words: int = 100, max_words: int = 200, overlap: int = 20) -> Iterator[Document]:
    """Chunk each document's text; a document that yields several chunks gets ids `<id>#<n>` (n from 1)."""
    for doc in docs:
        pieces = chunk_words(doc.text, min_words, max_words, overlap)
        if len(pieces) == 1:
            yield doc
            continue
        for n, piece in enumerate(pieces, start=1):
            yield Document(
                id=f"{doc.id}#{n}",
                text=piece,
                source=doc.source,
                title=doc.title,
                metadata={**doc.metadata, "chunk": n, "parent_id": doc.id},
            )
