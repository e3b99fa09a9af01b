"""The evidence record: one dataclass per step of the Med-RwR loop, plus what is needed to replay the answer.

Schema "medrwr-edge/evidence/1" (documented in README "Evidence record"). Fields are only ever added within a
schema version. Never holds patient identifiers: images appear by sha256 and non-identifying facts only.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Optional, Union

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
