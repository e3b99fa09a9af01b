"""Training data from local JSONL files, validated row by row (bad rows are reported as `file:line: why`).

Three kinds of rows:

* **MCQ** (GRPO stage 1 and 2), any of these shapes:
    - MedQA: {"question", "options": {"A": "...", ...}, "answer_idx": "C", "answer": "option text"}
    - MedMCQA: {"question", "opa", "opb", "opc", "opd", "cop": 1..4}  (the original release is 1-based; rows
      exported from the Hugging Face copy are 0-based: pass `medmcqa_cop_base=0`). "cop" may also be a letter.
    - ours / eval layout: {"question", "options": ["A. ...", ...] or {...}, "answer": "B"}
    - multimodal: any of the above plus "image": "x.png" (or "images": [...]); relative paths are resolved
      against the JSONL file's folder. Stage 2 requires an image on every row (`require_image=True`).
* **SFT**: {"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]} (the last message is
  the assistant's) or {"prompt": "...", "response": "..."}; optional "image".
* **DPO**: {"prompt": "...", "chosen": "...", "rejected": "...", optional "image"}.

`on_error="fail"` (default) raises one InputError that names every bad row (first 5 shown, then a count);
`on_error="skip"` keeps the good rows and lists the bad ones in `.problems`. A file with no valid row is always
an error. `.sha256` is the hash of the file's bytes: a resumed run checks it is training on the same data.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Generic, Optional, TypeVar

from ..errors import InputError
from ..eval.datasets import _gold_letter, _images, _LineError, _normalise_options, _records, _resolve_image
from ..runtime.protocol import Option

T = TypeVar("T")
MEDMCQA_KEYS = ("opa", "opb", "opc", "opd")
ROLES = ("system", "user", "assistant")
MAX_SHOWN_PROBLEMS = 5


@dataclass
class McqExample:
    """One multiple-choice question. `options` are lettered A, B, C... in order; `answer` is the gold letter."""

    id: str
    question: str
    options: list[Option]
    answer: str
    images: list[str] = field(default_factory=list)  # absolute paths; the last one is the image asked about
    line: int = 0  # 1-based line in the source file
    source: str = ""  # file name, for messages

    @property
    def answer_text(self) -> str:
        return next(o.text for o in self.options if o.letter == self.answer)

    @property
    def image(self) -> Optional[str]:
        return self.images[-1] if self.images else None

    @property
    def letters(self) -> list[str]:
        return [o.letter for o in self.options]


@dataclass
class SftExample:
    """A conversation; the loss is on the final assistant message only."""

    messages: list[dict]  # [{"role", "content"}], the last one is the assistant's
    images: list[str] = field(default_factory=list)
    line: int = 0

    @property
    def prompt_messages(self) -> list[dict]:
        return self.messages[:-1]

    @property
    def response(self) -> str:
        return self.messages[-1]["content"]


@dataclass
class DpoExample:
    prompt: str
    chosen: str
    rejected: str
    images: list[str] = field(default_factory=list)
    line: int = 0


@dataclass
class LoadedRows(Generic[T]):
    path: Path
    rows: list[T]
    problems: list[str]  # "file.jsonl:7: why" for every skipped row
    sha256: str  # of the file's bytes

    def __len__(self) -> int:
        return len(self.rows)

    def __iter__(self):
        return iter(self.rows)

    def __getitem__(self, i: int) -> T:
        return self.rows[i]


# ------------------------------------------------------------------ public loaders


def load_mcq_jsonl(path: str | os.PathLike, *, require_image: bool = False, on_error: str = "fail",
                   medmcqa_cop_base: int = 1, limit: Optional[int] = None) -> LoadedRows[McqExample]:
    """MedQA / MedMCQA / our MCQ rows. `require_image=True` for multimodal (stage-2) data."""
    if medmcqa_cop_base not in (0, 1):
        raise InputError(f"medmcqa_cop_base must be 0 or 1 (got {medmcqa_cop_base})")
    seen: set[str] = set()

    def parse(obj: dict, line_no: int, roots: list[Path]) -> McqExample:
        ex = _parse_mcq(obj, line_no, roots, medmcqa_cop_base)
        if require_image and not ex.images:
            raise _LineError("no 'image': multimodal (stage-2) rows need one")
        if ex.id in seen:
            raise _LineError(f"id {ex.id!r} repeats an earlier row")
        seen.add(ex.id)
        ex.source = Path(path).name
        return ex

    return _load(path, parse, on_error, limit)


def load_sft_jsonl(path: str | os.PathLike, *, on_error: str = "fail",
                   limit: Optional[int] = None) -> LoadedRows[SftExample]:
    return _load(path, _parse_sft, on_error, limit)


def load_dpo_jsonl(path: str | os.PathLike, *, on_error: str = "fail",
                   limit: Optional[int] = None) -> LoadedRows[DpoExample]:
    return _load(path, _parse_dpo, on_error, limit)


# ------------------------------------------------------------------ shared reading loop


def _load(path: str | os.PathLike, parse: Callable[[dict, int, list[Path]], T], on_error: str,
          limit: Optional[int]) -> LoadedRows[T]:
    path = Path(path)
    if on_error not in ("skip", "fail"):
        raise InputError(f"on_error must be 'skip' or 'fail' (got {on_error!r})")
    if limit is not None and limit < 1:
        raise InputError(f"limit must be at least 1 (got {limit})")
    if not path.is_file():
        raise InputError(f"training data file not found: {path}")
    data = path.read_bytes()
    roots = [path.parent]
    rows: list[T] = []
    problems: list[str] = []
    for line_no, raw in _records(data, path):
        try:
            if isinstance(raw, _LineError):
                raise raw
            if not isinstance(raw, dict):
                raise _LineError(f"expected a JSON object, got {type(raw).__name__}")
            row = parse(raw, line_no, roots)
            rows.append(row)
        except _LineError as e:
            problems.append(f"{path.name}:{line_no}: {e}")
        if limit is not None and len(rows) >= limit:
            break
    if problems and on_error == "fail":
        shown = "; ".join(problems[:MAX_SHOWN_PROBLEMS])
        more = f" (and {len(problems) - MAX_SHOWN_PROBLEMS} more)" if len(problems) > MAX_SHOWN_PROBLEMS else ""
        raise InputError(f"{len(problems)} bad row(s) in {path}: {shown}{more}")
    if not rows:
        first = f"; first problem: {problems[0]}" if problems else ""
        raise InputError(f"{path} has no valid rows ({len(problems)} bad row(s){first})")
    return LoadedRows(path, rows, problems, hashlib.sha256(data).hexdigest())


# ------------------------------------------------------------------ row parsers


def _text_field(obj: dict, key: str, *, required: bool = True) -> Optional[str]:
    value = obj.get(key)
    if value is None or (isinstance(value, str) and not value.strip()):
        if required:
            raise _LineError(f"missing {key!r}")
        return None
    if not isinstance(value, str):
        raise _LineError(f"{key!r} must be text, got {type(value).__name__}")
    return value.strip()


def _row_images(obj: dict, roots: list[Path]) -> list[str]:
    return [_resolve_image(p, roots) for p in _images(obj, "images", "image")]


def _parse_mcq(obj: dict, line_no: int, roots: list[Path], cop_base: int) -> McqExample:
    question = _text_field(obj, "question")
    if all(k in obj for k in MEDMCQA_KEYS):  # MedMCQA
        options = _normalise_options({letter: obj[k] if obj[k] is not None else "" for letter, k in zip("ABCD", MEDMCQA_KEYS)})
        answer = _medmcqa_letter(obj.get("cop"), cop_base)
    elif "options" in obj:  # MedQA (answer_idx) or ours (answer = letter or option text)
        options = _normalise_options(obj["options"])
        answer_raw = obj.get("answer_idx", obj.get("answer"))
        answer = _gold_letter(answer_raw, options)
        if "answer_idx" in obj and isinstance(obj.get("answer"), str) and obj["answer"].strip():
            # MedQA carries both; a row whose letter and text disagree is mislabelled, not a training signal.
            text = next(o[3:] for o in options if o[0] == answer)
            if " ".join(obj["answer"].split()).casefold() != text.casefold():
                raise _LineError(f"answer_idx {answer} ({text!r}) disagrees with answer {obj['answer']!r}")
    else:
        raise _LineError("no options: expected 'options' (MedQA) or 'opa'..'opd' (MedMCQA)")
    parsed = [Option(o[0], o[3:]) for o in options]
    raw_id = obj.get("id")
    if raw_id is not None and not isinstance(raw_id, (str, int)):
        raise _LineError(f"'id' must be text or a number, got {type(raw_id).__name__}")
    row_id = str(raw_id).strip() if raw_id is not None and str(raw_id).strip() else f"line-{line_no}"
    return McqExample(row_id, question, parsed, answer, _row_images(obj, roots), line_no)


def _medmcqa_letter(cop: Any, base: int) -> str:
    if isinstance(cop, str) and cop.strip().upper() in ("A", "B", "C", "D"):
        return cop.strip().upper()
    if isinstance(cop, str) and cop.strip().isdigit():
        cop = int(cop.strip())
    if isinstance(cop, bool) or not isinstance(cop, int):
        raise _LineError(f"'cop' must be the correct option's number or letter (got {cop!r})")
    index = cop - base
    if not 0 <= index < 4:
        hint = " (Hugging Face exports are 0-based: medmcqa_cop_base=0)" if cop == 0 else ""
        raise _LineError(f"'cop' {cop} is outside {base}..{base + 3}{hint}")
    return "ABCD"[index]


def _parse_sft(obj: dict, line_no: int, roots: list[Path]) -> SftExample:
    if "messages" in obj:
        messages = obj["messages"]
        if not isinstance(messages, list) or not messages:
            raise _LineError("'messages' must be a non-empty list")
        clean = []
        for i, m in enumerate(messages, 1):
            if not isinstance(m, dict):
                raise _LineError(f"message {i} must be an object with 'role' and 'content'")
            role, content = m.get("role"), m.get("content")
            if role not in ROLES:
                raise _LineError(f"message {i} has role {role!r}; expected one of {', '.join(ROLES)}")
            if not isinstance(content, str) or not content.strip():
                raise _LineError(f"message {i} has no text content")
            clean.append({"role": role, "content": content})
        if clean[-1]["role"] != "assistant":
            raise _LineError("the last message must be the assistant's (it is what the model learns)")
        if not any(m["role"] == "user" for m in clean[:-1]):
            raise _LineError("no user message before the assistant's reply")
    elif "prompt" in obj or "response" in obj:
        prompt, response = _text_field(obj, "prompt"), _text_field(obj, "response")
        clean = [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
    else:
        raise _LineError("expected 'messages' or 'prompt' and 'response'")
    return SftExample(clean, _row_images(obj, roots), line_no)


def _parse_dpo(obj: dict, line_no: int, roots: list[Path]) -> DpoExample:
    prompt, chosen, rejected = (_text_field(obj, k) for k in ("prompt", "chosen", "rejected"))
    if chosen == rejected:
        raise _LineError("'chosen' and 'rejected' are the same text: no preference to learn")
    return DpoExample(prompt, chosen, rejected, _row_images(obj, roots), line_no)
