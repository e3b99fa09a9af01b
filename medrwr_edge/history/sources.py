"""History files -> passages: plain text (notes, reports extracted from PDF as text) and DICOM structured reports.

Formats, decided by content first and then by extension:

* DICOM (the `DICM` magic): must be a structured report (Modality SR, or a ContentSequence). Its content tree is
  walked and TEXT, CODE and NUM items become readable lines ("Finding: small right pleural effusion",
  "Diameter: 12 mm"); containers become headings. Only the content tree is read, never the patient/study modules,
  and content items that name people or identifiers (PNAME items, "... Name", "... ID", UIDs, birth dates,
  dates and times) are skipped, so no identifier tag can reach the history.
* `.txt`, `.text`, `.md`: UTF-8 text (a BOM is dropped). "report.pdf-as-text" means this: a PDF report whose text
  was extracted first (e.g. `pdftotext -layout report.pdf report.txt`). A real PDF is refused with that advice:
  no PDF text extractor is installed, and adding one is a heavy dependency for a one-line workaround.
* anything else: one clear error naming the supported formats.

Errors name a file by its position on the command line and its extension only: a file name may hold a
patient's name or record number.

Chunking: blank-line paragraphs; a short paragraph (< MIN_WORDS, e.g. a heading "Medications:") is joined to the
next; a long one is cut at sentence ends into windows of at most MAX_WORDS words (one very long sentence at word
boundaries). One passage = one retrievable document; small enough that a retrieved passage is about one thing,
large enough to carry its context.
"""

from __future__ import annotations

import hashlib
import io
import re
from dataclasses import dataclass
from pathlib import Path

from ..errors import InputError

TEXT_EXTENSIONS = (".txt", ".text", ".md")
MAX_FILE_BYTES = 20 * 1024 * 1024
MIN_WORDS = 12
MAX_WORDS = 120

# DICOM SR concept names that identify a person, device or object: never copied, even inside the content tree.
_IDENTIFYING_CONCEPT = re.compile(
    r"\bname\b|\bid\b|identifier|\buid\b|birth|address|phone|telephone|accession|record number|\bmrn\b|"
    r"insurance|social security|e-?mail",
    re.I,
)
_SENTENCE_END = re.compile(r"(?<=[.!?;])\s+")


@dataclass(frozen=True)
class SourceText:
    """What one history file contributed: its kind, its sha256 (of the raw bytes) and its passages."""

    kind: str  # "text" | "dicom-sr"
    sha256: str
    passages: list[str]


def read_history_file(path: str | Path, position: int = 1) -> SourceText:
    """Read one history file into passages; `position` (1-based argument number) names it in errors."""
    path = Path(path)
    what = f"history file {position} ({path.suffix.lower() or 'no extension'})"
    if not path.is_file():
        raise InputError(f"{what} not found or not a file")
    size = path.stat().st_size
    if size > MAX_FILE_BYTES:
        raise InputError(f"{what} is {size:,} bytes; the limit is {MAX_FILE_BYTES:,}")
    try:
        data = path.read_bytes()
    except OSError as e:
        raise InputError(f"cannot read {what}: {e.strerror}") from None
    if not data.strip():
        raise InputError(f"{what} is empty")
    digest = hashlib.sha256(data).hexdigest()
    if len(data) >= 132 and data[128:132] == b"DICM":
        text, kind = dicom_sr_text(data, what), "dicom-sr"
    elif data.startswith(b"%PDF-") or path.suffix.lower() == ".pdf":
        raise InputError(
            f"{what} is a PDF; extract its text first (e.g. `pdftotext -layout IN.pdf OUT.txt`) and add the "
            ".txt: no PDF text extractor is installed"
        )
    elif path.suffix.lower() in TEXT_EXTENSIONS:
        text, kind = _utf8_text(data, what), "text"
    else:
        raise InputError(
            f"{what}: unknown history format; give UTF-8 text (.txt, .text, .md; a PDF report as extracted text) "
            "or a DICOM structured report"
        )
    passages = chunk_text(text)
    if not passages:
        raise InputError(f"{what} has no text to store")
    return SourceText(kind, digest, passages)


def _utf8_text(data: bytes, what: str) -> str:
    if b"\x00" in data:
        raise InputError(f"{what} contains NUL bytes: it is not a text file")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise InputError(
            f"{what} is not valid UTF-8 (byte {e.start}); convert it first, e.g. `iconv -f latin1 -t utf-8`"
        ) from None


# ------------------------------------------------------------------------------------------------- chunking


def chunk_text(text: str) -> list[str]:
    paragraphs = [" ".join(p.split()) for p in re.split(r"\n\s*\n", text.replace("\r\n", "\n").replace("\r", "\n"))]
    paragraphs = [p for p in paragraphs if p]
    merged: list[str] = []
    pending = ""
    for p in paragraphs:
        p = f"{pending} {p}".strip() if pending else p
        pending = ""
        if len(p.split()) < MIN_WORDS:
            pending = p
            continue
        merged.append(p)
    if pending:
        if merged and len(merged[-1].split()) + len(pending.split()) <= MAX_WORDS:
            merged[-1] = f"{merged[-1]} {pending}"
        else:
            merged.append(pending)
    passages: list[str] = []
    for p in merged:
        passages.extend(_windows(p))
    return passages


def _windows(paragraph: str) -> list[str]:
    if len(paragraph.split()) <= MAX_WORDS:
        return [paragraph]
    out, current = [], []
    for sentence in _SENTENCE_END.split(paragraph):
        words = sentence.split()
        while len(words) > MAX_WORDS:  # one sentence longer than a window: cut at word boundaries
            if current:
                out.append(" ".join(current))
                current = []
            out.append(" ".join(words[:MAX_WORDS]))
            words = words[MAX_WORDS:]
        if current and len(current) + len(words) > MAX_WORDS:
            out.append(" ".join(current))
            current = []
        current.extend(words)
    if current:
        out.append(" ".join(current))
    return out


# ---------------------------------------------------------------------------------------------- DICOM SR


def dicom_sr_text(data: bytes, what: str) -> str:
    """The readable content of a DICOM structured report: one paragraph per top-level content item."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    from ..imaging import _quiet_pydicom  # pydicom warnings can quote tag values (a patient's name)

    with _quiet_pydicom():
        try:
            ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)
        except (InvalidDicomError, ValueError, TypeError, KeyError, AttributeError, EOFError, OSError):
            raise InputError(f"{what} is not a readable DICOM file") from None
        content = ds.get("ContentSequence")
        if str(ds.get("Modality", "")).upper() != "SR" and content is None:
            raise InputError(
                f"{what} is a DICOM file but not a structured report (modality "
                f"{str(ds.get('Modality', '?')) or '?'}); only DICOM SR reports can be added to a history"
            )
        paragraphs = []
        for item in content or []:
            lines = _content_lines(item, depth=0)
            if lines:
                paragraphs.append("\n".join(lines))
    text = "\n\n".join(paragraphs)
    if not text.strip():
        raise InputError(f"{what} is a DICOM structured report with no text, code or numeric content")
    return text


def _concept_name(item) -> str:
    seq = item.get("ConceptNameCodeSequence")
    if seq:
        return str(seq[0].get("CodeMeaning", "") or "").strip()
    return ""


def _content_lines(item, depth: int) -> list[str]:
    if depth > 16:  # a malformed (cyclic-looking) tree: stop rather than recurse without end
        return []
    value_type = str(item.get("ValueType", "")).upper()
    name = _concept_name(item)
    if _IDENTIFYING_CONCEPT.search(name):
        return []
    value = ""
    if value_type == "TEXT":
        value = str(item.get("TextValue", "") or "").strip()
    elif value_type == "CODE":
        seq = item.get("ConceptCodeSequence")
        value = str(seq[0].get("CodeMeaning", "") or "").strip() if seq else ""
    elif value_type == "NUM":
        seq = item.get("MeasuredValueSequence")
        if seq:
            number = str(seq[0].get("NumericValue", "") or "").strip()
            units = seq[0].get("MeasurementUnitsCodeSequence")
            unit = str(units[0].get("CodeValue", "") or "").strip() if units else ""
            value = f"{number} {unit}".strip() if unit not in ("", "1") else number
    lines = []
    if value_type == "CONTAINER":
        children = []
        for child in item.get("ContentSequence") or []:
            children += _content_lines(child, depth + 1)
        if children:
            lines = ([f"{name}:"] if name else []) + children
    elif value:  # PNAME, DATE, TIME, DATETIME, UIDREF, IMAGE, COMPOSITE, SCOORD...: never copied
        lines = [f"{name}: {value}" if name else value]
        for child in item.get("ContentSequence") or []:  # e.g. a finding's qualifiers
            lines += _content_lines(child, depth + 1)
    return lines
