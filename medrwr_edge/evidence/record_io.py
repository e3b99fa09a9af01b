"""Reading evidence records back: from a JSON file, stdin, or the answer log, into `EvidenceRecord`.

The JSON Schema (`medrwr_edge/data/evidence.schema.json`) is the documented contract; tests validate every
record against it with `jsonschema`. At run time we do not depend on jsonschema: `record_from_dict` checks
exactly what `report` and `replay` rely on and turns anything else into one clear `InputError` line.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from importlib import resources
from pathlib import Path
from typing import Any, Union

from ..errors import InputError
from ..runtime.steps import (
    SCHEMA,
    Answer,
    CdirRetrieve,
    EvidenceRecord,
    PassStats,
    Query,
    RetrievedDoc,
    Retrieve,
    Think,
)

STEP_TYPES = {"think": Think, "query": Query, "retrieve": Retrieve, "answer": Answer, "cdir": CdirRetrieve}
REQUIRED_KEYS = ("question", "options", "images", "model", "packs", "settings", "steps", "passes", "assistant_text")
MAX_RECORD_BYTES = 64 * 1024 * 1024  # a record is kilobytes; refuse to parse something absurd


def schema_path(name: str = "evidence") -> Path:
    """Path of a bundled JSON Schema file: evidence, answer-log or replay."""
    return Path(str(resources.files("medrwr_edge") / "data" / f"{name}.schema.json"))


def load_schema(name: str = "evidence") -> dict:
    return json.loads(schema_path(name).read_text("utf-8"))


def as_dict(record: Union[EvidenceRecord, dict]) -> dict:
    return record.to_dict() if isinstance(record, EvidenceRecord) else dict(record)


def read_record_json(source: str) -> dict:
    """A record from a JSON file path, or '-' for stdin (e.g. `ask --json | medrwr-edge report - -o r.html`)."""
    if source == "-":
        text = sys.stdin.read()
        where = "stdin"
    else:
        path = Path(source)
        if not path.is_file():
            raise InputError(f"evidence record not found: {source}")
        if path.stat().st_size > MAX_RECORD_BYTES:
            raise InputError(f"{source} is too large to be an evidence record")
        try:
            text = path.read_bytes().decode("utf-8")
        except UnicodeDecodeError:
            raise InputError(f"{source} is not UTF-8 text (expected an evidence record in JSON)") from None
        where = source
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise InputError(f"{where} is not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})") from None
    check_record_dict(data, where)
    return data


def check_record_dict(data: Any, where: str = "record") -> None:
    if not isinstance(data, dict):
        raise InputError(f"{where} is not an evidence record (expected a JSON object)")
    schema = data.get("schema")
    if schema != SCHEMA:
        if isinstance(schema, str) and schema.startswith("medrwr-edge/evidence/"):
            raise InputError(f"{where} uses schema {schema}; this medrwr-edge reads {SCHEMA} (upgrade medrwr-edge)")
        raise InputError(f"{where} is not a medrwr-edge evidence record (no \"schema\": \"{SCHEMA}\")")
    missing = [k for k in REQUIRED_KEYS if k not in data]
    if missing:
        raise InputError(f"{where} lacks {', '.join(missing)}: not a complete evidence record")
    for key, kind in (("options", list), ("images", list), ("packs", list), ("steps", list), ("passes", list),
                      ("model", dict), ("settings", dict), ("assistant_text", str), ("question", str)):
        if not isinstance(data[key], kind):
            raise InputError(f"{where}: \"{key}\" must be a JSON {'array' if kind is list else kind.__name__}")


def _build(cls, data: Any, where: str):
    """A dataclass from a dict, ignoring keys this version does not know (fields are added within a schema)."""
    if not isinstance(data, dict):
        raise InputError(f"{where}: expected a JSON object for {cls.__name__}")
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {k: v for k, v in data.items() if k in names}
    try:
        return cls(**kwargs)
    except TypeError as e:  # a required field is missing
        raise InputError(f"{where}: incomplete {cls.__name__} ({e})") from None


def record_from_dict(data: dict, where: str = "record") -> EvidenceRecord:
    check_record_dict(data, where)
    steps = []
    for i, raw in enumerate(data["steps"]):
        kind = raw.get("type") if isinstance(raw, dict) else None
        cls = STEP_TYPES.get(kind)
        if cls is None:
            raise InputError(f"{where}: step {i + 1} has unknown type {kind!r}")
        step = _build(cls, raw, f"{where} step {i + 1}")
        if isinstance(step, Retrieve):
            step.docs = [_build(RetrievedDoc, d, f"{where} step {i + 1} doc") for d in step.docs or []]
        steps.append(step)
    passes = [_build(PassStats, p, f"{where} pass {i + 1}") for i, p in enumerate(data["passes"])]
    top = {k: v for k, v in data.items() if k not in ("steps", "passes")}
    record = _build(EvidenceRecord, top, where)
    record.steps, record.passes = steps, passes
    return record
