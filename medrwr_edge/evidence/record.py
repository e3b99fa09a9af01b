"""The evidence record: its schema as dataclasses (one per step of the Med-RwR loop, plus what is needed to replay
the answer), and reading it back from JSON, stdin or the answer log.

Schema "medrwr-edge/evidence/1" (documented in README "Evidence record"; the JSON Schema is
`medrwr_edge/data/evidence.schema.json`). Fields are only ever added within a schema version. Never holds patient
identifiers: images appear by sha256 and non-identifying facts only.

Tests validate every record against the JSON Schema with `jsonschema`. At run time we do not depend on jsonschema:
`record_from_dict` checks exactly what `report` and `replay` rely on and turns anything else into one clear
`InputError` line.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Optional, Union

from ..errors import InputError

SCHEMA = "medrwr-edge/evidence/1"


@dataclass
class Think:
    text: str
    pass_index: int
    type: str = "think"


@dataclass
class Query:
    text: str  # normalised (quotes stripped, whitespace collapsed): what was searched
    raw: str  # as the model wrote it between the tags
    pass_index: int
    served: bool = True
    reason: str = ""  # why a query was not served (pass limit, retrieval disabled, empty)
    type: str = "query"
    # "model": the model wrote it; "runtime": guided decoding issued it from the question because the model's own
    # query was unusable (`raw` then keeps what the model wrote, `reason` says why it was replaced)
    issued_by: str = "model"


@dataclass
class RetrievedDoc:
    pack: str
    pack_version: str
    doc_id: str
    score: float
    snippet: str  # the text spliced into the turn (after any truncation to fit the context)
    source: str = ""
    ranks: dict = field(default_factory=dict)  # per-list ranks from hybrid search (dense, lexical, fused)
    mode: str = ""


@dataclass
class Retrieve:
    query: str
    docs: list[RetrievedDoc]
    block: str  # exactly what was appended to the assistant turn
    tokens_inserted: int
    pass_index: int
    truncated: bool = False  # documents shortened to fit the context window
    seconds: float = 0.0
    type: str = "retrieve"


@dataclass
class Answer:
    text: Optional[str]  # inside <answer></answer>, None when the model never answered
    letter: Optional[str]  # option letter for multiple-choice questions
    confidence: Optional[float]  # letter mode: p(first answer token); open-ended: mean token probability
    confidence_kind: str  # "first-answer-token" | "mean-answer-token" | "none"
    confidence_token: Optional[str]  # the token whose probability is the confidence
    pass_index: int
    type: str = "answer"
    # "tagged": read from <answer></answer> (the protocol); "untagged": the model wrote no Med-RwR tags (e.g. an
    # SFT-only model) and its output (after any </think>) is the answer; "none": no answer
    answer_kind: str = "tagged"
    differential: list[str] = field(default_factory=list)  # --top-k-diagnoses: the ranked diagnoses, best first


@dataclass
class CdirRetrieve:
    """Confidence-Driven Image Re-retrieval: taken when the answer's confidence is below the threshold."""

    threshold: float
    confidence_before: Optional[float]
    answer_before: Optional[str]
    reference_pack: str
    reference_pack_version: str
    reference_doc_id: str
    reference_caption: str
    reference_score: float
    reference_image_sha256: str
    block: str  # what was spliced into the turn
    model_saw_reference_image: bool  # False for a text-only model: it read the caption only
    answer_after: Optional[str] = None
    confidence_after: Optional[float] = None
    changed: bool = False
    seconds: float = 0.0
    type: str = "cdir"
    # The reference looked up for each input image CDIR consulted: the current study, plus every prior for a
    # text-only model (it sees no image, so each study's nearest reference caption is spliced, labelled).
    # [{"index" (into record.images), "role", "reference_pack", "reference_doc_id", "reference_caption",
    #   "reference_score", "reference_image_sha256"}]
    references: list[dict] = field(default_factory=list)
    # guided only: the regenerated answer was less confident than the first, which stands (record.answer)
    kept_first: bool = False


Step = Union[Think, Query, Retrieve, Answer, CdirRetrieve]


@dataclass
class PassStats:
    index: int
    kind: str  # "reasoning" | "cdir"
    generated_tokens: int
    inserted_tokens: int  # tokens spliced after this pass (retrieve block, CDIR block)
    stop_reason: str
    seconds: float


@dataclass
class EvidenceRecord:
    question: str
    options: list[dict]  # [{"letter": "A", "text": ...}]
    images: list[dict]  # [{"sha256", "role", "index", "study_date", "format", "width", "height", "meta"}]
    model: dict  # path name, sha256, backend, has_vision, device, gpu_layers, notes
    packs: list[dict]  # [{"name", "version", "kind", "encoder_sha256", "role"}]
    settings: dict
    steps: list[Step] = field(default_factory=list)
    passes: list[PassStats] = field(default_factory=list)
    assistant_text: str = ""  # the whole assistant turn the model saw and wrote, in order
    prompt: str = ""  # the rendered prompt (images as <|image_pad|>)
    answer: Optional[str] = None
    letter: Optional[str] = None
    confidence: Optional[float] = None
    confidence_kind: str = "none"
    status: str = "answered"  # "answered" | "no-answer"
    # How the turn was decoded: "native" (the paper's protocol, byte-exact), "guided" (protocol guidance for models
    # never trained on it: scaffold tags, a query always served, the letter read at the model's answer position),
    # "rag" (the baseline: one search on the question, entries in the user turn, one pass)
    protocol: str = "native"
    answer_kind: str = "none"  # of the final answer: "tagged" | "untagged" (no Med-RwR tags) | "none"
    differential: list[str] = field(default_factory=list)  # --top-k-diagnoses: ranked diagnoses, best first
    tokens: dict = field(default_factory=dict)  # prompt, generated, inserted, decoded, rolled_back
    timings: dict = field(default_factory=dict)  # seconds: load, prefill, generate, retrieval, cdir, total
    notes: list[str] = field(default_factory=list)
    created: str = ""
    medrwr_edge_version: str = ""
    schema: str = SCHEMA

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d = {"schema": d.pop("schema"), **d}
        return d

    # Convenience views used by the CLI, tests and reports.
    def queries(self) -> list[Query]:
        return [s for s in self.steps if isinstance(s, Query)]

    def retrievals(self) -> list[Retrieve]:
        return [s for s in self.steps if isinstance(s, Retrieve)]

    def cdir(self) -> Optional[CdirRetrieve]:
        return next((s for s in self.steps if isinstance(s, CdirRetrieve)), None)


# ------------------------------------------------------------------ reading records back

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
