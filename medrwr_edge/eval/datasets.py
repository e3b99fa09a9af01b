"""Evaluation datasets from local files, validated line by line.

Layouts (`layout="auto"` picks one from the first valid record's keys):

* `mcq` (ours): JSONL, one object per line:
      {"id": "q1", "question": "...", "options": ["A. ...", "B. ..."] or {"A": "...", ...},
       "answer": "B", "image": "x.png" | "images": ["prior.png", "current.png"]}
  Without "options" the item is open-ended: {"question", "answer" or "diagnosis", "synonyms": [...]}.
* `medxpertqa`: MedXpertQA MM/Text JSONL as downloaded ({"id", "question" ending in "Answer Choices: (A) ...",
  "options": {"A": ...}, "label": "C", "images": ["MM-1-a.jpeg"], "medical_task", "body_system", ...}).
  Images are looked up beside the file and in an `images/` folder beside it.
* `mmmu`: MMMU / MMMU-Pro rows exported to JSONL ({"id", "question" with "<image 1>" markers, "options": a
  Python-literal list string "['a', 'b']" or a list, "answer": "A", "image_1".."image_7": file paths}).
* `ecbench`: the Med-RwR ECBench layout ({"images": [...], "question": "...\\nA. ...\\nB. ...", "answer": "A"}),
  options written inside the question text. A JSON array file is accepted as well as JSONL.
* `diagnosisarena`: DiagnosisArena cases ({"id", "Case Information", "Physical Examination",
  "Diagnostic Tests", "Final Diagnosis", "Options", "Right Option"}): open-ended by default (case text ->
  diagnosis, scored by normalised match); `diagnosis_as_mcq=True` uses its four options instead.

Bad lines (not JSON, no question, option letters that do not match the options, an answer outside the options,
a missing image file, a repeated id) are reported by line number, then skipped (`on_error="skip"`) or fatal
(`on_error="fail"`). A dataset with no valid item is always an error.
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional

from ..errors import InputError
from ..runtime.protocol import OPTION_RE

LAYOUTS = ("mcq", "medxpertqa", "mmmu", "ecbench", "diagnosisarena")
MAX_OPTIONS = 26
DIAGNOSIS_QUESTION = "What is the most likely diagnosis? Give the single most likely diagnosis first."


@dataclass
class EvalItem:
    """One question: multiple choice when `options` is non-empty, else open-ended against `gold`."""

    id: str
    question: str
    options: list[str] = field(default_factory=list)  # "A. text", letters A, B, C... in order
    answer: Optional[str] = None  # gold letter (multiple choice)
    gold: list[str] = field(default_factory=list)  # open-ended: the diagnosis then its synonyms; MCQ: option text
    images: list[str] = field(default_factory=list)  # absolute paths; the last is the current image
    meta: dict = field(default_factory=dict)
    line: int = 0  # 1-based line (or array index) in the source file

    @property
    def kind(self) -> str:
        return "mcq" if self.options else "open"

    def content_sha256(self) -> str:
        """Hash of what the model is asked and what counts as right (not of images' paths, which move)."""
        payload = {"id": self.id, "question": self.question, "options": self.options, "answer": self.answer,
                   "gold": self.gold}
        return hashlib.sha256(json.dumps(payload, sort_keys=True, ensure_ascii=False).encode("utf-8")).hexdigest()

    def to_json(self) -> dict:
        d = {"id": self.id, "question": self.question}
        if self.options:
            d["options"], d["answer"] = list(self.options), self.answer
        else:
            d["answer"], d["synonyms"] = self.gold[0], list(self.gold[1:])
        if self.images:
            d["images"] = list(self.images)
        if self.meta:
            d["meta"] = dict(self.meta)
        return d


def item_set_sha256(items) -> str:
    """One hash for an ordered set of items (ids + contents): what manifests and run headers pin."""
    h = hashlib.sha256()
    for item in items:
        h.update(f"{item.id} {item.content_sha256()}\n".encode("utf-8"))
    return h.hexdigest()


@dataclass
class LoadedDataset:
    path: Path
    layout: str
    items: list[EvalItem]
    problems: list[str]  # "line 7: ..." for every skipped line
    sha256: str  # of the file's bytes: a resumed run must be on the same data


class _LineError(Exception):
    pass


def load_dataset(
    path: str | os.PathLike,
    layout: str = "auto",
    on_error: str = "skip",
    limit: Optional[int] = None,
    image_root: Optional[str | os.PathLike] = None,
    diagnosis_as_mcq: bool = False,
) -> LoadedDataset:
    """Read and validate a dataset file. `image_root`: where relative image paths are resolved (default: the
    dataset file's folder, then its `images/` subfolder)."""
    path = Path(path)
    if layout != "auto" and layout not in LAYOUTS:
        raise InputError(f"unknown dataset layout {layout!r}; choose one of: auto, {', '.join(LAYOUTS)}")
    if on_error not in ("skip", "fail"):
        raise InputError(f"on_error must be 'skip' or 'fail' (got {on_error!r})")
    if limit is not None and limit < 1:
        raise InputError(f"--limit must be at least 1 (got {limit})")
    if not path.is_file():
        raise InputError(f"dataset file not found: {path}")
    data = path.read_bytes()
    roots = [Path(image_root)] if image_root else [path.parent, path.parent / "images"]

    items: list[EvalItem] = []
    problems: list[str] = []
    seen_ids: set[str] = set()
    chosen = None if layout == "auto" else layout
    for line_no, raw in _records(data, path):
        try:
            if isinstance(raw, _LineError):
                raise raw
            if not isinstance(raw, dict):
                raise _LineError(f"expected a JSON object, got {type(raw).__name__}")
            if chosen is None:
                chosen = detect_layout(raw)
            item = _PARSERS[chosen](raw, line_no, diagnosis_as_mcq)
            item.images = [_resolve_image(p, roots) for p in item.images]
            if item.id in seen_ids:
                raise _LineError(f"id {item.id!r} repeats an earlier item")
            seen_ids.add(item.id)
            item.line = line_no
            items.append(item)
        except _LineError as e:
            message = f"{path.name} line {line_no}: {e}"
            if on_error == "fail":
                raise InputError(message) from None
            problems.append(message)
        if limit is not None and len(items) >= limit:
            break
    if not items:
        first = f"; first problem: {problems[0]}" if problems else ""
        raise InputError(f"{path} has no valid items ({len(problems)} bad line(s){first})")
    return LoadedDataset(path, chosen or "mcq", items, problems, hashlib.sha256(data).hexdigest())


def _records(data: bytes, path: Path) -> Iterator[tuple[int, Any]]:
    """(line number, parsed object or _LineError) for JSONL, or (index + 1, object) for a JSON array file."""
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise InputError(f"{path} is not UTF-8 text") from None
    if text.lstrip().startswith("["):
        try:
            array = json.loads(text)
        except json.JSONDecodeError as e:
            raise InputError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
        for i, obj in enumerate(array, 1):
            yield i, obj
        return
    for i, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            yield i, json.loads(line)
        except json.JSONDecodeError as e:
            yield i, _LineError(f"not valid JSON ({e.msg} at column {e.colno})")


def detect_layout(obj: dict) -> str:
    if "Final Diagnosis" in obj or "Case Information" in obj:
        return "diagnosisarena"
    if "label" in obj and ("medical_task" in obj or "body_system" in obj or isinstance(obj.get("options"), dict)):
        return "medxpertqa"
    if "image_1" in obj or (isinstance(obj.get("options"), str) and obj["options"].lstrip().startswith("[")):
        return "mmmu"
    if "options" not in obj and "images" in obj and _options_in_text(str(obj.get("question", "")))[1]:
        return "ecbench"
    return "mcq"


# ------------------------------------------------------------------ field helpers


def _text(obj: dict, *keys: str, required: bool = True) -> Optional[str]:
    for key in keys:
        value = obj.get(key)
        if isinstance(value, str) and value.strip():
            return value.strip()
        if value is not None and not isinstance(value, str):
            raise _LineError(f"field {key!r} must be text, got {type(value).__name__}")
    if required:
        raise _LineError(f"missing {' or '.join(repr(k) for k in keys)}")
    return None


def _item_id(obj: dict, line_no: int) -> str:
    value = obj.get("id")
    if value is None or (isinstance(value, str) and not value.strip()):
        return f"line-{line_no}"
    if not isinstance(value, (str, int)):
        raise _LineError(f"'id' must be text or a number, got {type(value).__name__}")
    return str(value).strip()


def _normalise_options(options: Any) -> list[str]:
    """A list ("A. x" or plain "x", lettered in order) or a {"A": "x"} dict -> ["A. x", "B. y", ...].

    Letters, when given, must be A, B, C... in order: a list whose letters skip or repeat is a broken item."""
    if isinstance(options, dict):
        pairs = [(str(k).strip(), v) for k, v in options.items()]
    elif isinstance(options, list):
        pairs = []
        for i, raw in enumerate(options):
            if not isinstance(raw, str):
                raise _LineError(f"option {i + 1} must be text, got {type(raw).__name__}")
            m = OPTION_RE.match(raw)
            pairs.append((m.group(1), m.group(2)) if m and len(raw.strip()) > 2 else ("", raw))
        if all(letter == "" for letter, _ in pairs):
            pairs = [(chr(ord("A") + i), text) for i, (_, text) in enumerate(pairs)]
        elif any(letter == "" for letter, _ in pairs):
            raise _LineError("some options have letters and some do not")
    else:
        raise _LineError(f"'options' must be a list or an object, got {type(options).__name__}")
    if len(pairs) < 2:
        raise _LineError(f"a multiple-choice item needs at least 2 options (got {len(pairs)})")
    if len(pairs) > MAX_OPTIONS:
        raise _LineError(f"at most {MAX_OPTIONS} options (got {len(pairs)})")
    expected = [chr(ord("A") + i) for i in range(len(pairs))]
    letters = [letter.upper() for letter, _ in pairs]
    if letters != expected:
        raise _LineError(f"option letters {', '.join(letters)} do not match the options (expected "
                         f"{', '.join(expected)})")
    out = []
    for letter, text in pairs:
        if not isinstance(text, str) or not text.strip():
            raise _LineError(f"option {letter} is empty")
        out.append(f"{letter}. {' '.join(text.split())}")
    texts = [o[3:].casefold() for o in out]
    if len(set(texts)) != len(texts):
        raise _LineError("two options have the same text")
    return out


def _gold_letter(answer: Any, options: list[str]) -> str:
    """The gold letter from "B", "(B)", "B.", "B. text" or the option's exact text."""
    if not isinstance(answer, str) or not answer.strip():
        raise _LineError("missing the answer letter")
    letters = [o[0] for o in options]
    raw = answer.strip()
    m = re.fullmatch(r"\(?([A-Za-z])[\.\):]?(\s+.*)?", raw, re.S)
    if m and (m.group(2) is None or _same_text(m.group(2), options, m.group(1).upper())):
        letter = m.group(1).upper()
        if letter in letters:
            return letter
        raise _LineError(f"answer {raw!r} is not one of the options {letters[0]}-{letters[-1]}")
    for o in options:
        if o[3:].casefold() == " ".join(raw.split()).casefold():
            return o[0]
    raise _LineError(f"answer {raw!r} is not one of the options {letters[0]}-{letters[-1]}")


def _same_text(text: str, options: list[str], letter: str) -> bool:
    match = next((o for o in options if o[0] == letter), None)
    return match is not None and match[3:].casefold() == " ".join(text.split()).casefold()


def _images(obj: dict, *keys: str) -> list[str]:
    found: list[str] = []
    for key in keys:
        value = obj.get(key)
        if value is None:
            continue
        for entry in value if isinstance(value, list) else [value]:
            if isinstance(entry, dict) and isinstance(entry.get("path"), str):
                entry = entry["path"]  # a Hugging Face Image feature exported with its file path
            if not isinstance(entry, str) or not entry.strip():
                raise _LineError(f"field {key!r} must hold image file paths")
            found.append(entry.strip())
    return found


def _resolve_image(name: str, roots: list[Path]) -> str:
    p = Path(name).expanduser()
    candidates = [p] if p.is_absolute() else [root / p for root in roots]
    for c in candidates:
        if c.is_file():
            return str(c.resolve())
    raise _LineError(f"image file not found: {name}")


def _options_in_text(question: str) -> tuple[str, list[str]]:
    """Split "stem\\nA. x\\nB. y" (or "(A) x (B) y" after "Answer Choices:") into (stem, ["A. x", ...])."""
    marker = re.search(r"\n?\s*Answer Choices:\s*", question)
    if marker:
        stem, tail = question[: marker.start()], question[marker.end() :]
        parts = re.split(r"\(([A-Z])\)\s*", tail)
        if len(parts) >= 5 and not parts[0].strip():
            return stem.strip(), [f"{parts[i]}. {parts[i + 1].strip()}" for i in range(1, len(parts) - 1, 2)]
    lines = question.rstrip().split("\n")
    opts: list[str] = []
    while lines and re.match(r"^\s*\(?[A-Z][\.\)]\s+\S", lines[-1]):
        opts.insert(0, lines.pop().strip())
    if len(opts) >= 2:
        return "\n".join(lines).strip(), opts
    return question.strip(), []


# ------------------------------------------------------------------ layouts


def _parse_mcq(obj: dict, line_no: int, _da: bool) -> EvalItem:
    question = _text(obj, "question")
    item_id = _item_id(obj, line_no)
    images = _images(obj, "image", "images")
    meta = obj.get("meta") if isinstance(obj.get("meta"), dict) else {}
    if obj.get("options") is None:
        gold = _text(obj, "answer", "diagnosis")
        synonyms = obj.get("synonyms", [])
        if not isinstance(synonyms, list) or not all(isinstance(s, str) for s in synonyms):
            raise _LineError("'synonyms' must be a list of text")
        return EvalItem(item_id, question, gold=[gold] + [s.strip() for s in synonyms if s.strip()],
                        images=images, meta=meta)
    options = _normalise_options(obj["options"])
    letter = _gold_letter(obj.get("answer"), options)
    return EvalItem(item_id, question, options, letter, [options[ord(letter) - 65][3:]], images, meta)


def _parse_medxpertqa(obj: dict, line_no: int, _da: bool) -> EvalItem:
    question = _text(obj, "question")
    if obj.get("options") is None:
        raise _LineError("missing 'options'")
    options = _normalise_options(obj["options"])
    stem, _ = _options_in_text(question)  # the options are given twice; the model gets them once
    letter = _gold_letter(obj.get("label"), options)
    meta = {k: obj[k] for k in ("medical_task", "body_system", "question_type") if isinstance(obj.get(k), str)}
    return EvalItem(_item_id(obj, line_no), stem, options, letter, [options[ord(letter) - 65][3:]],
                    _images(obj, "images"), meta)


def _parse_mmmu(obj: dict, line_no: int, _da: bool) -> EvalItem:
    question = _text(obj, "question")
    raw_options = obj.get("options")
    if isinstance(raw_options, str):
        try:
            # MMMU stores options as a Python list literal; literal_eval evaluates literals only (no code).
            raw_options = ast.literal_eval(raw_options)
        except (ValueError, SyntaxError):
            raise _LineError("'options' is not a list literal") from None
    images = _images(obj, *[f"image_{i}" for i in range(1, 8)])
    meta = {k: obj[k] for k in ("subfield", "img_type", "topic_difficulty", "subject") if isinstance(obj.get(k), str)}
    item_id = _item_id(obj, line_no)
    if not raw_options or obj.get("question_type") == "open":
        gold = obj.get("answer")
        golds = gold if isinstance(gold, list) else [gold]
        if not golds or not all(isinstance(g, str) and g.strip() for g in golds):
            raise _LineError("an open MMMU item needs an 'answer'")
        return EvalItem(item_id, question, gold=[g.strip() for g in golds], images=images, meta=meta)
    options = _normalise_options(raw_options)
    letter = _gold_letter(obj.get("answer"), options)
    return EvalItem(item_id, question, options, letter, [options[ord(letter) - 65][3:]], images, meta)


def _parse_ecbench(obj: dict, line_no: int, _da: bool) -> EvalItem:
    question = _text(obj, "question")
    stem, options = _options_in_text(question)
    if obj.get("options") is not None:
        options = _normalise_options(obj["options"])
    elif not options:
        raise _LineError("no options found in the question text (expected lines 'A. ...', 'B. ...')")
    else:
        options = _normalise_options(options)
    letter = _gold_letter(obj.get("answer"), options)
    images = _images(obj, "images", "image")
    return EvalItem(_item_id(obj, line_no), stem, options, letter, [options[ord(letter) - 65][3:]], images)


def _parse_diagnosisarena(obj: dict, line_no: int, as_mcq: bool) -> EvalItem:
    sections = []
    for key in ("Case Information", "Physical Examination", "Diagnostic Tests"):
        value = _text(obj, key, required=key == "Case Information")
        if value:
            sections.append(f"{key}:\n{value}")
    case = "\n\n".join(sections)
    item_id = _item_id(obj, line_no)
    if as_mcq:
        if obj.get("Options") is None:
            raise _LineError("missing 'Options' (needed with diagnosis_as_mcq)")
        options = _normalise_options(obj["Options"])
        letter = _gold_letter(obj.get("Right Option"), options)
        return EvalItem(item_id, case + "\n\nWhat is the most likely diagnosis?", options, letter,
                        [options[ord(letter) - 65][3:]])
    diagnosis = _text(obj, "Final Diagnosis")
    synonyms = obj.get("synonyms", obj.get("Synonyms", []))
    if not isinstance(synonyms, list) or not all(isinstance(s, str) for s in synonyms):
        raise _LineError("'synonyms' must be a list of text")
    return EvalItem(item_id, case + "\n\n" + DIAGNOSIS_QUESTION, gold=[diagnosis] + [s for s in synonyms if s.strip()])


_PARSERS = {
    "mcq": _parse_mcq,
    "medxpertqa": _parse_medxpertqa,
    "mmmu": _parse_mmmu,
    "ecbench": _parse_ecbench,
    "diagnosisarena": _parse_diagnosisarena,
}


def write_items_jsonl(items: list[EvalItem], path: str | os.PathLike) -> None:
    """Write items in our `mcq` layout (atomically), e.g. to export the built-in benchmark."""
    from ..paths import atomic_write_text

    atomic_write_text(path, "".join(json.dumps(i.to_json(), ensure_ascii=False) + "\n" for i in items))
