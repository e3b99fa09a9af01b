"""Med-RwR's GRPO rewards, each a pure function of a finished rollout, and their weighted sum.

    R = w_fmt * R_format + w_acc * R_accuracy + w_sem * R_query_semantic + w_conf * R_confidence_gain
    weights (paper): format 1, accuracy 5, query-semantic 0.4, confidence-gain 5

* **format** — 1 when the completion follows the protocol: it opens with a non-empty `<think>`, every `<query>`
  is followed by a `<retrieve>` block, and exactly one non-empty `<answer>` closes it (only whitespace after).
  +1 more when retrieval was used (a served `<retrieve>` block) AND the answer is right: retrieving is rewarded
  only when it led to the right answer.
* **accuracy** — 1 when the option letter read from `<answer>` (the runtime's rule, `protocol.answer_letter`: the
  first token, case-insensitive, '.' and brackets stripped) is the gold letter, else 0.
* **query-semantic** — textual part: the share of the gold answer's entity words found in the queries, plus the
  share found in the retrieved documents, plus the share of query words that are medical entities (a focused
  query). Entities come from `training.entities` (ICD-10-CM + a curated term list; the reference's UMLS linker
  cannot be installed offline). Visual part, when an image–text scorer is given: the image–query similarity
  (cosine in a joint image–text space, e.g. a BiomedCLIP-style encoder). Without one the visual part is omitted
  and the breakdown says so (our packs' text and image encoders do not share a space: their cosine means nothing).
  0 when the completion has no query.
* **confidence gain** — log π(gold letter | with retrieval) − log π(gold letter | y′), y′ = the text generated
  before the first query, answered at once without retrieval (`rollout.py` computes both). 0 without retrieval.
  That is the paper's formula and it is unbounded; by default it is clipped to ±0.5 (`RewardOptions.
  confidence_gain_clip`; `confidence_gain_scale` 0.1 + no clip = the reference code, 1 + no clip = the paper).

Stage 1 (text MCQ) uses format + accuracy; stage 2 (multimodal MCQ) uses all four.

Reference bugs NOT copied (tests pin each): the gold letter was lower-cased while the logprob tokens are upper-case
("A"), so its confidence reward never matched anything; gold entities were extracted from the letter ("b") rather
than the answer's text; retrieved text was searched for in the prompt (which has no `<retrieve>` blocks) instead
of the completion. The reference's length penalty (-1 outside 512..3072 characters without retrieved text) and
its format penalties (-1 for an empty tag block, -1 for three or more newlines in a row) are options, off by
default; so is its cap on query entities (-1 for more than 5).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

from ..runtime import protocol as P
from .entities import MedicalVocabulary, entity_words, extract_entities, words

RETRIEVE_BLOCK_RE = re.compile(r"<retrieve>(.*?)</retrieve>", re.S)
QUERY_BLOCK_RE = re.compile(r"<query>(.*?)</query>", re.S)
TAG_BLOCK_RES = [re.compile(rf"<{t}>(.*?)</{t}>", re.S) for t in ("think", "query", "retrieve", "answer")]
EMPTY_RETRIEVE = "None"

# An image-text scorer: (image path, text) -> cosine similarity in a joint space.
ImageTextScorer = Callable[[str, str], float]


@dataclass
class RewardWeights:
    format: float = 1.0
    accuracy: float = 5.0
    query_semantic: float = 0.4
    confidence_gain: float = 5.0


@dataclass
class RewardOptions:
    """The reference's extra penalties, off by default (the paper's formulas do not have them)."""

    length_penalty: bool = False  # -1 when the text without <retrieve> blocks is outside [min, max] characters
    length_min_chars: int = 512
    length_max_chars: int = 3072
    empty_block_penalty: bool = False  # -1 when any tag block is empty
    newline_penalty: bool = False  # -1 for three or more newlines in a row
    query_entity_limit: Optional[int] = None  # -1 when the queries hold more entities than this (reference: 5)
    # Scale guard on the confidence gain (an unbounded log-ratio: a y' with log p = -20 gives +20, x5 weight = 100
    # against accuracy's 5). term = clip(scale * (log p_with - log p_without), -clip, +clip).
    # scale 1, clip None = the paper's formula; scale 0.1, clip None = the reference code (RetrieveLogitORM).
    # Default scale 1, clip 0.5: the weighted term spans at most +-2.5, half of accuracy's weight, so a confidence
    # swing alone never outvotes a right answer; on the tiny fixture (benchmarks/bench_reward_scale.py) the clip
    # never binds and x0.1 would shrink the term 10x to noise next to the other terms. See docs/training.md.
    confidence_gain_scale: float = 1.0
    confidence_gain_clip: Optional[float] = 0.5


@dataclass
class RewardInputs:
    """What the rewards need from one rollout. `completion` is the whole assistant turn, retrieve blocks included."""

    completion: str
    gold_letter: str
    letters: Sequence[str]
    gold_text: str = ""  # the gold option's text (entities are taken from it, never from the letter)
    retrieval_used: bool = False  # a <retrieve> block with documents was spliced in
    logp_gold_with: Optional[float] = None  # log π(gold letter | completion with retrieval)
    logp_gold_without: Optional[float] = None  # log π(gold letter | y′)
    image: Optional[str] = None


@dataclass
class RewardBreakdown:
    format: float
    accuracy: float
    query_semantic: float
    confidence_gain: float
    penalties: float
    total: float
    notes: list[str] = field(default_factory=list)

    def as_metrics(self) -> dict[str, float]:
        return {"reward": self.total, "reward_format": self.format, "reward_accuracy": self.accuracy,
                "reward_query_semantic": self.query_semantic, "reward_confidence_gain": self.confidence_gain,
                "reward_penalties": self.penalties}


# ------------------------------------------------------------------ the four terms


def predicted_letter(completion: str, letters: Sequence[str]) -> Optional[str]:
    return P.answer_letter(P.parse_answer(completion), letters)


def accuracy_reward(completion: str, gold_letter: str, letters: Sequence[str]) -> float:
    predicted = predicted_letter(completion, letters)
    return 1.0 if predicted is not None and predicted == gold_letter.strip().upper() else 0.0


def format_ok(completion: str) -> bool:
    """The protocol's shape: <think> first (non-empty), each <query> answered by a <retrieve>, one final <answer>."""
    text = completion.strip()
    think = re.match(r"<think>(.*?)</think>", text, re.S)
    if think is None or not think.group(1).strip():
        return False
    answers = list(P.ANSWER_RE.finditer(text))
    if len(answers) != 1 or not answers[0].group(1).strip() or text[answers[0].end():].strip():
        return False
    # Each query must be followed by a retrieve block before the next query or the answer.
    events = re.findall(r"<(query|retrieve|answer)>", text)
    pending_query = False
    for tag in events:
        if tag == "query":
            if pending_query:
                return False
            pending_query = True
        elif tag == "retrieve":
            if not pending_query:
                return False
            pending_query = False
        elif pending_query:  # an answer right after an unanswered query
            return False
    return True


def format_reward(completion: str, *, retrieval_used: bool, correct: bool) -> float:
    if not format_ok(completion):
        return 0.0
    return 2.0 if retrieval_used and correct else 1.0


def queries_in(completion: str) -> list[str]:
    return [q for q in (P.extract_query(m.group(0)) for m in QUERY_BLOCK_RE.finditer(completion)) if q]


def retrieved_text_in(completion: str) -> str:
    """The documents the completion received (its <retrieve> blocks; `None` blocks hold nothing)."""
    blocks = [b.strip() for b in RETRIEVE_BLOCK_RE.findall(completion)]
    return "\n".join(b for b in blocks if b and b != EMPTY_RETRIEVE)


def overlap_share(text: str, gold_entity_words: Sequence[str]) -> float:
    """Share of the gold entities' words that occur as words of `text` (whole words, not substrings: the
    reference's `e in text` counted "art" inside "heart")."""
    if not gold_entity_words:
        return 0.0
    present = set(words(text))
    return sum(1 for w in gold_entity_words if w in present) / len(gold_entity_words)


def query_semantic_reward(
    completion: str,
    gold_text: str,
    *,
    vocabulary: Optional[MedicalVocabulary] = None,
    image: Optional[str] = None,
    image_text_scorer: Optional[ImageTextScorer] = None,
    options: Optional[RewardOptions] = None,
    notes: Optional[list[str]] = None,
) -> float:
    """Entity overlap of the queries and the retrieved documents with the gold answer's TEXT (+ image-query
    similarity when a joint image-text scorer is given). 0 when there is no query."""
    options = options or RewardOptions()
    notes = notes if notes is not None else []
    queries = queries_in(completion)
    if not queries:
        return 0.0
    query = " ".join(queries)
    gold_words = entity_words(extract_entities(gold_text, vocabulary))
    if not gold_words:
        notes.append("query-semantic: the gold answer's text has no medical entity; overlap terms are 0")
    query_entities = extract_entities(query, vocabulary)
    query_words = words(query)
    density = len(entity_words(query_entities)) / len(query_words) if query_words else 0.0
    value = overlap_share(query, gold_words) + overlap_share(retrieved_text_in(completion), gold_words) \
        + min(1.0, density)
    if options.query_entity_limit is not None and len(query_entities) > options.query_entity_limit:
        value -= 1.0
    if image is not None:
        if image_text_scorer is None:
            notes.append("query-semantic: image-query similarity omitted (no joint image-text encoder given)")
        else:
            value += float(image_text_scorer(image, query))
    return value


def confidence_gain_reward(logp_gold_with: Optional[float], logp_gold_without: Optional[float],
                           retrieval_used: bool, *, scale: float = 1.0, clip: Optional[float] = None) -> float:
    """scale · (log π(gold | with retrieval) − log π(gold | y′)), clipped to ±clip when given; 0 when nothing was
    retrieved or a term is missing. scale 1 and no clip is the paper's formula (`RewardOptions` has the guard)."""
    if not retrieval_used or logp_gold_with is None or logp_gold_without is None:
        return 0.0
    if not (math.isfinite(logp_gold_with) and math.isfinite(logp_gold_without)):
        return 0.0
    value = scale * float(logp_gold_with - logp_gold_without)
    return value if clip is None else min(clip, max(-clip, value))


# ------------------------------------------------------------------ penalties (reference options)


def penalties(completion: str, options: RewardOptions) -> float:
    value = 0.0
    if options.length_penalty:
        without = RETRIEVE_BLOCK_RE.sub("", completion)
        if not options.length_min_chars <= len(without) <= options.length_max_chars:
            value -= 1.0
    if options.empty_block_penalty and any(not m.strip() for r in TAG_BLOCK_RES for m in r.findall(completion)):
        value -= 1.0
    if options.newline_penalty and re.search(r"[\r\n]{3,}", completion):
        value -= 1.0
    return value


# ------------------------------------------------------------------ the sum


def compute_reward(
    inputs: RewardInputs,
    *,
    stage: int,
    weights: Optional[RewardWeights] = None,
    options: Optional[RewardOptions] = None,
    vocabulary: Optional[MedicalVocabulary] = None,
    image_text_scorer: Optional[ImageTextScorer] = None,
) -> RewardBreakdown:
    """Stage 1: format + accuracy. Stage 2: all four terms. Penalties only when switched on in `options`."""
    if stage not in (1, 2):
        raise ValueError(f"stage must be 1 or 2, not {stage!r}")
    weights = weights or RewardWeights()
    options = options or RewardOptions()
    notes: list[str] = []
    acc = accuracy_reward(inputs.completion, inputs.gold_letter, inputs.letters)
    fmt = format_reward(inputs.completion, retrieval_used=inputs.retrieval_used, correct=acc == 1.0)
    sem = conf = 0.0
    if stage == 2:
        sem = query_semantic_reward(inputs.completion, inputs.gold_text, vocabulary=vocabulary, image=inputs.image,
                                    image_text_scorer=image_text_scorer, options=options, notes=notes)
        conf = confidence_gain_reward(inputs.logp_gold_with, inputs.logp_gold_without, inputs.retrieval_used,
                                      scale=options.confidence_gain_scale, clip=options.confidence_gain_clip)
    pen = penalties(inputs.completion, options)
    total = (weights.format * fmt + weights.accuracy * acc + weights.query_semantic * sem
             + weights.confidence_gain * conf + pen)
    return RewardBreakdown(fmt, acc, sem, conf, pen, total, notes)
