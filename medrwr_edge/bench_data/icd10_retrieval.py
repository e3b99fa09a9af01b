"""The ICD-10-CM retrieval benchmark (issue 13): questions a coder, clinician or the model writes, each
with the one ICD-10-CM entry that answers it.

Kinds of question (each gold id is an ICD-10-CM code as the pack's document ids spell it):

* `code`: "What does ICD-10-CM code S42.422G denote?", also typed as "s42422g meaning" (no dot, lower case);
* `description`: "Which ICD-10-CM code is used for <the code's description>?" (case varies);
* `inclusion`: "Which ICD-10-CM entry covers '<an inclusion term>'?" -- chart phrases such as
  "Shadow, lung" that the tabular list files under a code;
* `excludes`: "What does ICD-10-CM code J93.0 exclude?" (only codes with their own Excludes notes);
* `abbreviated`: the description as typed in a chart: lower case, "fx", "lt", "w/o", "htn", "copd"...;
* `partial`: the description with some words left out, in their original order.

Unambiguous by construction and checked: description-type questions never contain the gold code; every
description, inclusion term and partial description used identifies exactly one entry of the corpus (the
pack's codes): descriptions and inclusion terms are unique after normalisation, and the words of a partial
description are contained in exactly one corpus description.

Deterministic: the corpus is in tabular-list order and one `random.Random(seed)` drives every choice, so
the same seed, corpus and ICD-10-CM release give identical items. `data/icd10_retrieval_manifest.json`
records every item's hash; `committed_items()` regenerates the committed set and refuses a mismatch.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from dataclasses import dataclass
from importlib import resources
from typing import Iterable, Optional, Sequence

from ..errors import InputError, IntegrityError
from ..kb_pack.icd10 import _icd, default_pack_documents, doc_id

GENERATOR_VERSION = 1
DEFAULT_SEED = 13
DEFAULT_COUNT = 600
KINDS = ("code", "description", "inclusion", "excludes", "abbreviated", "partial")
MANIFEST_NAME = "icd10_retrieval_manifest.json"
MANIFEST_SCHEMA = "medrwr-edge/icd10-retrieval-manifest/1"
SOURCE = "simple-icd-10-cm==1.5.0"
# The quick corpus: default-pack entries of chapter 10 (respiratory), chapter 18 (symptoms, abnormal
# imaging findings) and the chapter-19 fracture/organ-injury categories -- 3,898 entries, among them
# thousands of near-identical fracture codes (left/right, displaced/nondisplaced): the hard case.
QUICK_CORPUS_CHAPTERS = (10, 18, 19)

# Chart abbreviations (lower-case, whole words). Longer phrases first so "malignant neoplasm" wins over parts.
ABBREVIATIONS: tuple[tuple[str, str], ...] = (
    ("chronic obstructive pulmonary disease", "copd"),
    ("acute myocardial infarction", "ami"),
    ("myocardial infarction", "mi"),
    ("secondary malignant neoplasm", "mets"),
    ("malignant neoplasm", "ca"),
    ("benign neoplasm", "benign tumor"),
    ("atrial fibrillation", "afib"),
    ("deep vein thrombosis", "dvt"),
    ("pulmonary embolism", "pe"),
    ("heart failure", "hf"),
    ("hypertension", "htn"),
    ("hypertensive", "htn"),
    ("urinary tract infection", "uti"),
    ("cerebral infarction", "cva"),
    ("osteoarthritis", "oa"),
    ("rheumatoid arthritis", "ra"),
    ("pneumonia", "pna"),
    ("initial encounter", "init"),
    ("subsequent encounter", "subs"),
    ("fractures", "fxs"),
    ("fracture", "fx"),
    ("nondisplaced", "nondispl"),
    ("displaced", "displ"),
    ("unspecified", "unsp"),
    ("without", "w/o"),
    ("with", "w/"),
    ("right", "rt"),
    ("left", "lt"),
    ("bilateral", "bilat"),
    ("other", "oth"),
    ("vertebra", "vert"),
    ("abnormal", "abnl"),
)

_TEMPLATES = {
    "code": (
        "What does ICD-10-CM code {code} denote?",
        "{code_lower} meaning",
        "icd10 {code_nodot}",
        "Which condition is coded as {code}?",
    ),
    "description": (
        "Which ICD-10-CM code is used for {text}?",
        "icd-10 code for {text_lower}",
        "Code for: {text}",
    ),
    "inclusion": (
        "Which ICD-10-CM entry covers '{text}'?",
        "what code do I use for {text_lower}",
        "The chart says \"{text}\". Which ICD-10-CM code?",
    ),
    "excludes": (
        "What does ICD-10-CM code {code} exclude?",
        "excludes notes for {code_lower}",
        "Which conditions are excluded from {code}?",
    ),
    "abbreviated": ("{text}", "icd10 {text}", "code for {text}"),
    "partial": ("{text}", "Which code covers {text}?", "icd-10 {text}"),
}

_CODE_SHAPE = re.compile(r"\b[A-Z]\d[0-9A-Z](?:\.?[0-9A-Z]{1,4})?\b", re.IGNORECASE)
_WORD = re.compile(r"[a-z0-9]+")
_FILLER = frozenset("of the and or to in on by for a an as at".split())


@dataclass(frozen=True)
class RetrievalItem:
    question: str
    gold_id: str
    kind: str

    def item_hash(self) -> str:
        return hashlib.sha256(json.dumps([self.kind, self.gold_id, self.question]).encode("utf-8")).hexdigest()

    def to_dict(self) -> dict:
        return {"question": self.question, "gold_id": self.gold_id, "kind": self.kind}


def _norm(text: str) -> str:
    return " ".join(_WORD.findall(text.casefold()))


def _words(text: str) -> frozenset[str]:
    return frozenset(_WORD.findall(text.casefold()))


@dataclass
class _Entry:
    code: str  # document id
    description: str
    inclusion_terms: list[str]
    has_excludes: bool
    is_code: bool  # category/subcategory/extension (not a block or chapter)


def quick_corpus_codes() -> list[str]:
    """Document ids of the quick benchmark corpus, in tabular-list order."""
    return [d.id for d in default_pack_documents() if d.metadata["chapter"] in QUICK_CORPUS_CHAPTERS]


def _load_corpus(codes: Sequence[str]) -> list[_Entry]:
    icd = _icd()
    entries = []
    for code in codes:
        name = code[len("Chapter ") :] if code.startswith("Chapter ") else code
        if not icd.is_valid_item(name):
            raise InputError(f"unknown ICD-10-CM code {code!r} in the benchmark corpus")
        is_code = icd.is_category(name) or icd.is_subcategory(name)
        description = " ".join(icd.get_description(name, prioritize_blocks=not is_code).split())
        entries.append(_Entry(
            code=doc_id(name),
            description=description,
            inclusion_terms=[" ".join(t.split()) for t in icd.get_inclusion_term(name)] if is_code else [],
            has_excludes=bool(icd.get_excludes1(name) or icd.get_excludes2(name)) if is_code else False,
            is_code=is_code,
        ))
    return entries


def _abbreviate(description: str, table: Sequence[tuple[str, str]] = ABBREVIATIONS) -> Optional[str]:
    """The description as a chart abbreviates it with `table`; None when no phrase of the table occurs."""
    text = description.casefold()
    changed = False
    for phrase, short in table:
        new = re.sub(rf"\b{re.escape(phrase)}\b", short, text)
        changed |= new != text
        text = new
    text = text.replace(",", "")
    return " ".join(text.split()) if changed else None


class _Generator:
    def __init__(self, entries: list[_Entry], rng: random.Random):
        self.entries = entries
        self.rng = rng
        codes = [e for e in entries if e.is_code]
        desc_count: dict[str, int] = {}
        for e in entries:
            desc_count[_norm(e.description)] = desc_count.get(_norm(e.description), 0) + 1
        self.unique_description = [e for e in codes if desc_count[_norm(e.description)] == 1]
        # word -> indexes of code descriptions containing it, for the partial-description uniqueness check
        self.word_sets = [_words(e.description) for e in codes]
        self.codes = codes
        self.index: dict[str, set[int]] = {}
        for i, words in enumerate(self.word_sets):
            for w in words:
                self.index.setdefault(w, set()).add(i)
        term_owners: dict[str, set[str]] = {}
        for e in codes:
            for t in e.inclusion_terms:
                term_owners.setdefault(_norm(t), set()).add(e.code)
        self.inclusion = [
            (e, t) for e in codes for t in e.inclusion_terms
            if len(term_owners[_norm(t)]) == 1 and _norm(t) not in desc_count and not _CODE_SHAPE.search(t)
        ]
        self.position = {e.code: i for i, e in enumerate(codes)}

    def _template(self, kind: str) -> str:
        return self.rng.choice(_TEMPLATES[kind])

    def _code_question(self, kind: str, e: _Entry) -> str:
        code = e.code
        return self._template(kind).format(code=code, code_lower=code.lower(), code_nodot=code.replace(".", "").lower())

    def _matches(self, words: frozenset[str]) -> set[int]:
        sets = [self.index.get(w, set()) for w in words]
        if not sets:
            return set()
        return set.intersection(*sorted(sets, key=len))

    def _partial(self, e: _Entry) -> Optional[str]:
        # What a hurried user types: the description without filler words and one or two content words
        # missing. Long descriptions (head-injury codes run to 30 words) are not typed out, so skip them.
        content = [t for t in _WORD.findall(e.description.casefold()) if t not in _FILLER]
        if not 4 <= len(content) <= 12:
            return None
        for n_drop in ((2, 1) if len(content) >= 6 else (1,)):
            drop = set(self.rng.sample(range(len(content)), n_drop))
            kept = [t for i, t in enumerate(content) if i not in drop]
            if self._matches(frozenset(kept)) == {self.position[e.code]}:
                return " ".join(kept)
        return None

    def items_of(self, kind: str, count: int) -> list[RetrievalItem]:
        if count <= 0:
            return []
        items: list[RetrievalItem] = []
        if kind == "code":
            for e in self.rng.sample(self.codes, min(count, len(self.codes))):
                items.append(RetrievalItem(self._code_question(kind, e), e.code, kind))
        elif kind == "excludes":
            pool = [e for e in self.codes if e.has_excludes]
            for e in self.rng.sample(pool, min(count, len(pool))):
                items.append(RetrievalItem(self._code_question(kind, e), e.code, kind))
        elif kind == "description":
            pool = self.unique_description
            for e in self.rng.sample(pool, min(count, len(pool))):
                text = e.description
                items.append(RetrievalItem(self._template(kind).format(text=text, text_lower=text.lower()), e.code, kind))
        elif kind == "inclusion":
            for e, term in self.rng.sample(self.inclusion, min(count, len(self.inclusion))):
                items.append(RetrievalItem(self._template(kind).format(text=term, text_lower=term.lower()), e.code, kind))
        elif kind in ("abbreviated", "partial"):
            pool = list(self.unique_description)
            self.rng.shuffle(pool)
            for e in pool:
                if len(items) >= count:
                    break
                text = _abbreviate(e.description) if kind == "abbreviated" else self._partial(e)
                if text:
                    items.append(RetrievalItem(self._template(kind).format(text=text), e.code, kind))
        else:
            raise InputError(f"unknown question kind {kind!r}; use one of {', '.join(KINDS)}")
        return items


def generate_items(
    n: int = DEFAULT_COUNT,
    seed: int = DEFAULT_SEED,
    codes: Optional[Iterable[str]] = None,
    kinds: Sequence[str] = KINDS,
) -> list[RetrievalItem]:
    """`n` questions spread evenly over `kinds`, answerable from a pack whose document ids are `codes`
    (default: the quick corpus). Fewer come back only when the corpus has too few eligible entries."""
    if n < 0:
        raise InputError(f"n must be >= 0, got {n}")
    corpus = list(codes) if codes is not None else quick_corpus_codes()
    rng = random.Random(seed)
    generator = _Generator(_load_corpus(corpus), rng)
    items: list[RetrievalItem] = []
    for i, kind in enumerate(kinds):
        count = n // len(kinds) + (1 if i < n % len(kinds) else 0)
        items.extend(generator.items_of(kind, count))
    return items


def corpus_sha256(codes: Sequence[str]) -> str:
    return hashlib.sha256("\n".join(codes).encode("utf-8")).hexdigest()


def set_sha256(items: Sequence[RetrievalItem]) -> str:
    return hashlib.sha256("\n".join(i.item_hash() for i in items).encode("ascii")).hexdigest()


def build_manifest(items: Sequence[RetrievalItem], n: int, seed: int, codes: Sequence[str],
                   generator_version: int = GENERATOR_VERSION, **extra) -> dict:
    """The manifest of a split; `extra` keys (e.g. the test split's "split", "templates") go before the items."""
    return {
        "schema": MANIFEST_SCHEMA,
        "generator_version": generator_version,
        "source": SOURCE,
        "seed": seed,
        "count": n,
        "corpus": {"chapters": list(QUICK_CORPUS_CHAPTERS), "size": len(codes), "sha256": corpus_sha256(codes)},
        **extra,
        "set_sha256": set_sha256(items),
        "items": [[i.kind, i.gold_id, i.item_hash()] for i in items],
    }


def committed_manifest(name: str = MANIFEST_NAME) -> dict:
    text = resources.files("medrwr_edge").joinpath("data", name).read_text(encoding="utf-8")
    return json.loads(text)


def verified_items(manifest: dict, name: str, generator_version: int, generate) -> list[RetrievalItem]:
    """Items of the split whose committed manifest `data/<name>` is `manifest`, regenerated by
    `generate(manifest, codes)`; IntegrityError if the generator version, the corpus or any item differs."""
    if manifest.get("schema") != MANIFEST_SCHEMA or manifest.get("generator_version") != generator_version:
        raise IntegrityError(f"{name} was written by another generator version")
    codes = quick_corpus_codes()
    if corpus_sha256(codes) != manifest["corpus"]["sha256"]:
        raise IntegrityError("the quick ICD-10-CM corpus differs from the committed one (another ICD-10-CM release?)")
    items = generate(manifest, codes)
    if set_sha256(items) != manifest["set_sha256"]:
        raise IntegrityError("regenerated retrieval items differ from the committed manifest")
    return items


def committed_items() -> list[RetrievalItem]:
    """Regenerate the committed benchmark set (the TUNE split); IntegrityError if it differs from the manifest."""
    return verified_items(committed_manifest(), MANIFEST_NAME, GENERATOR_VERSION,
                          lambda manifest, codes: generate_items(manifest["count"], manifest["seed"], codes))


# ---------------------------------------------------------------------------------------------- evaluation


@dataclass
class Scores:
    n: int = 0
    hit1: float = 0.0
    hit3: float = 0.0
    hit10: float = 0.0
    mrr: float = 0.0

    def to_dict(self) -> dict:
        return {"n": self.n, "hit@1": self.hit1, "hit@3": self.hit3, "hit@10": self.hit10, "mrr": self.mrr}


def score_ranks(ranks: Sequence[Optional[int]]) -> Scores:
    """Scores from the 1-based rank of the gold id per question (None = not in the top k)."""
    n = len(ranks)
    if n == 0:
        return Scores()
    def hit(cut: int) -> float:
        return sum(1 for r in ranks if r is not None and r <= cut) / n
    return Scores(n, hit(1), hit(3), hit(10), sum(1.0 / r for r in ranks if r is not None) / n)


def gold_ranks(ranked_ids: Sequence[Sequence[str]], items: Sequence[RetrievalItem]) -> list[Optional[int]]:
    out = []
    for ids, item in zip(ranked_ids, items):
        ids = list(ids)
        out.append(ids.index(item.gold_id) + 1 if item.gold_id in ids else None)
    return out


def scores_by_kind(ranks: Sequence[Optional[int]], items: Sequence[RetrievalItem]) -> dict[str, Scores]:
    table = {"all": score_ranks(ranks)}
    for kind in dict.fromkeys(i.kind for i in items):
        table[kind] = score_ranks([r for r, i in zip(ranks, items) if i.kind == kind])
    return table


def evaluate(pack, items: Sequence[RetrievalItem], modes: Sequence[str] = ("dense", "lexical", "hybrid"),
             k: int = 10) -> dict[str, dict[str, Scores]]:
    """{mode: {"all" | kind: Scores}} from `pack.search(question, k, mode)` for every item."""
    results = {}
    for mode in modes:
        ranked = [[hit.doc_id for hit in pack.search(item.question, k=k, mode=mode)] for item in items]
        results[mode] = scores_by_kind(gold_ranks(ranked, items), items)
    return results


def format_table(results: dict[str, dict[str, Scores]]) -> str:
    """Plain-text table: one row per (kind, mode)."""
    lines = [f"{'kind':<12} {'mode':<34} {'n':>5} {'hit@1':>6} {'hit@3':>6} {'hit@10':>6} {'MRR':>6}"]
    kinds = list(dict.fromkeys(kind for per_mode in results.values() for kind in per_mode))
    for kind in kinds:
        for mode, per_kind in results.items():
            s = per_kind.get(kind)
            if s is None:
                continue
            lines.append(f"{kind:<12} {mode:<34} {s.n:>5} {s.hit1:>6.3f} {s.hit3:>6.3f} {s.hit10:>6.3f} {s.mrr:>6.3f}")
    return "\n".join(lines)


def write_manifest(name: str, manifest: dict) -> str:
    """Write `data/<name>`: header keys indented, one item per line. Returns its path."""
    from pathlib import Path

    from ..paths import atomic_write_text

    manifest = dict(manifest)
    path = Path(__file__).resolve().parents[1] / "data" / name
    items_json = ",\n".join("  " + json.dumps(row) for row in manifest.pop("items"))
    head = json.dumps(manifest, indent=1)[:-2]  # without the closing brace: items go last, one per line
    atomic_write_text(path, f'{head},\n "items": [\n{items_json}\n ]\n}}\n')
    return str(path)


def write_committed_manifest() -> str:
    """Regenerate `data/icd10_retrieval_manifest.json` (after a deliberate generator change). Returns its path."""
    codes = quick_corpus_codes()
    items = generate_items(DEFAULT_COUNT, DEFAULT_SEED, codes)
    return write_manifest(MANIFEST_NAME, build_manifest(items, DEFAULT_COUNT, DEFAULT_SEED, codes))


if __name__ == "__main__":  # python -m medrwr_edge.bench_data.icd10_retrieval
    print(write_committed_manifest())
