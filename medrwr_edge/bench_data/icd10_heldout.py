"""The held-out TEST split of the ICD-10-CM retrieval benchmark (issue 22): the committed set of
`icd10_retrieval` (seed 13) is the TUNE split that fusion and BM25 weights are chosen on; this one is only
reported on.

It differs from the tune split in seed, in gold codes (none of the tune split's gold codes is used) and in
wording -- a second template family, written the way a hurried user or a chart does:

* `code` / `excludes`: other phrasings ("my chart says S42.422G, what is that?", "s42422g excludes list");
* `description`: lay wording of the description -- clauses rotated ("initial encounter ..., fracture of ..."),
  "A of B" turned into "B A" ("fracture of one rib" -> "one rib fracture"), plurals made singular --
  inside "my chart says ...", "need the dx code: ..." templates;
* `inclusion`: paraphrased inclusion terms -- "NOS" dropped, "(acute)" dropped or unwrapped, inverted index
  forms put back in reading order ("Shadow, lung" -> "lung shadow"), "A of B" -> "B A";
* `abbreviated`: the description with chart abbreviations written differently from the tune split's table
  (`ABBREVIATIONS` below vs `icd10_retrieval.ABBREVIATIONS`: "L"/"R", "w/out", "unspec", "disp", "LOC", "NEC"...);
  where a spelling is the one every chart uses ("fx", "COPD", "HTN", "PNA") it is the same;
* `partial`: some content words of the description, in shuffled order.

Unambiguous, checked per item: a rewritten description or inclusion term has the content words (filler words,
"NOS" left out, plurals made singular) of exactly one corpus entry's description or inclusion terms -- the
gold's; an abbreviated description abbreviates no other corpus description to the same text; the words of a
partial question are contained in exactly one corpus description (as in the tune split). Description-type
questions never contain a code.

Deterministic like the tune split: same seed, corpus and ICD-10-CM release -> identical items;
`data/icd10_retrieval_test_manifest.json` records every item's hash and `committed_test_items()` refuses a
mismatch.
"""

from __future__ import annotations

import random
import re
from typing import Iterable, Optional, Sequence

from ..errors import InputError
from . import icd10_retrieval as tune

GENERATOR_VERSION = 1
DEFAULT_SEED = 2207
DEFAULT_COUNT = 600
MANIFEST_NAME = "icd10_retrieval_test_manifest.json"
TEMPLATE_FAMILY = "heldout-1"

# Chart abbreviations as a second writer spells them (lower-case matching, whole words, longest first).
# Deliberately not the tune split's table: a method tuned there must not see these spellings.
ABBREVIATIONS: tuple[tuple[str, str], ...] = (
    ("chronic obstructive pulmonary disease", "COPD"),
    ("shortness of breath", "SOB"),
    ("not elsewhere classified", "NEC"),
    ("loss of consciousness", "LOC"),
    ("initial encounter", "initial enc"),
    ("subsequent encounter", "subsq enc"),
    ("diagnostic imaging", "dx imaging"),
    ("hypertension", "HTN"),
    ("pneumonia", "PNA"),
    ("fracture", "fx"),
    ("nondisplaced", "nondisp"),
    ("displaced", "disp"),
    ("unspecified", "unspec"),
    ("without", "w/out"),
    ("with", "w"),
    ("right", "R"),
    ("left", "L"),
    ("bilateral", "B/L"),
    ("abnormal", "abn"),
    ("pulmonary", "pulm"),
    ("respiratory", "resp"),
    ("laceration", "lac"),
    ("dislocation", "disloc"),
    ("syndrome", "synd"),
    ("disease", "dz"),
    ("infection", "infxn"),
    ("minutes", "min"),
    ("hours", "hrs"),
)

_TEMPLATES = {
    "code": (
        "my chart says {code}, what is that?",
        "ICD 10 {code} definition",
        "dx code {code_nodot_upper}",
        "{code_lower}?",
    ),
    "description": (
        "my chart says {text}",
        "need the dx code: {text}",
        "which dx code is {text}?",
        "{text} -- which code?",
    ),
    "inclusion": (
        "my chart says {text}",
        "pt dx: {text} - what is the icd code",
        "how do I code {text}?",
        "{text} icd 10",
    ),
    "excludes": (
        "excludes1 and excludes2 for {code}",
        "what is not coded under {code_lower}",
        "{code_nodot} excludes list",
    ),
    "abbreviated": ("{text}", "dx: {text}", "{text} code?"),
    "partial": ("{text}", "something like {text}", "{text}?"),
}

_OF = re.compile(r"^(\w+(?: \w+){0,2}) of (\w+(?: \w+){0,2})$")
_PAREN = re.compile(r"\s*\(([^()]*)\)")
_CONNECTORS = ("with", "without", "of", "due", "in", "on", "from", "and", "or", "not", "by", "as", "for", "nos")
_IGNORED = tune._FILLER | {"nos"}


def singular(word: str) -> str:
    """A crude singular for comparing word sets ("fractures" ~ "fracture"; "injuries" ~ "injury")."""
    if len(word) > 4 and word.endswith("ies"):
        return word[:-3] + "y"
    if len(word) > 3 and word.endswith("s") and not word.endswith(("ss", "us", "is", "ys")):
        return word[:-1]
    return word


def content_key(text: str) -> frozenset[str]:
    """The words that carry meaning, filler and "NOS" left out, plurals made singular."""
    return frozenset(singular(w) for w in tune._WORD.findall(text.casefold()) if w not in _IGNORED)


def _invert_of(text: str) -> Optional[str]:
    m = _OF.match(text)
    if not m or "of" in m.group(1).split() or "of" in m.group(2).split():
        return None
    return f"{m.group(2)} {m.group(1)}"


def paraphrase_term(term: str, rng: random.Random) -> str:
    """An inclusion term as a person writes it: no NOS, parentheses dropped or unwrapped, reading order."""
    text = re.sub(r"\bNOS\b", "", term)
    text = _PAREN.sub(lambda m: (" " + m.group(1)) if rng.random() < 0.5 else "", text)
    parts = [p.strip() for p in text.split(",") if p.strip()]
    if len(parts) >= 2:  # the index's inverted form: "Shadow, lung" / "Tracheitis, chronic, with laryngitis"
        mods = []
        for p in parts[1:]:
            if len(p.split()) > 2 or p.split()[0].casefold() in _CONNECTORS:
                break
            mods.append(p)
        rest = parts[1 + len(mods):]
        text = " ".join(list(reversed(mods)) + [parts[0]] + rest)
    else:
        text = parts[0] if parts else ""
    text = " ".join(text.casefold().split())
    return _invert_of(text) or text


def lay_description(description: str, rng: random.Random) -> str:
    """The description reworded: clauses rotated, "A of B" -> "B A", plurals made singular (each when it
    applies, at least one of them)."""
    parts = [p.strip() for p in description.casefold().split(",") if p.strip()]
    ops = []
    if len(parts) >= 2:
        ops.append("rotate")
    if _invert_of(parts[0]):
        ops.append("invert")
    if any(singular(w) != w for w in tune._WORD.findall(description.casefold())):
        ops.append("singular")
    if not ops:
        return ""
    chosen = set(rng.sample(ops, rng.randint(1, len(ops))))
    if "invert" in chosen:
        parts[0] = _invert_of(parts[0])
    if "rotate" in chosen:
        parts = parts[1:] + parts[:1]
    text = ", ".join(parts)
    if "singular" in chosen:
        text = re.sub(r"[a-z]+", lambda m: singular(m.group(0)), text)
    return text


def abbreviate(description: str) -> Optional[str]:
    return tune._abbreviate(description, ABBREVIATIONS)


class _HeldOut(tune._Generator):
    """The tune split's pools and checks, minus the excluded (tune) gold codes, with the second wording."""

    def __init__(self, entries, rng, exclude: frozenset[str]):
        super().__init__(entries, rng)
        self.exclude = exclude
        # content key -> owners, over every entry's description and inclusion terms
        self.owners: dict[frozenset[str], set[str]] = {}
        for e in entries:
            for text in [e.description] + e.inclusion_terms:
                self.owners.setdefault(content_key(text), set()).add(e.code)
        abbreviated: dict[str, set[str]] = {}
        for e in entries:
            short = abbreviate(e.description)
            abbreviated.setdefault(tune._norm(short or e.description), set()).add(e.code)
        self.abbreviated_owners = abbreviated

    def _template(self, kind: str) -> str:
        return self.rng.choice(_TEMPLATES[kind])

    def _code_question(self, kind: str, e) -> str:
        code = e.code
        return self._template(kind).format(code=code, code_lower=code.lower(), code_nodot=code.replace(".", "").lower(),
                                           code_nodot_upper=code.replace(".", ""))

    def _unique(self, text: str, gold: str) -> bool:
        return bool(text) and self.owners.get(content_key(text)) == {gold} and not tune._CODE_SHAPE.search(text)

    def _partial_shuffled(self, e) -> Optional[str]:
        kept = self._partial(e)
        if kept is None:
            return None
        words = kept.split()
        self.rng.shuffle(words)
        return " ".join(words)

    def items_of(self, kind: str, count: int) -> list[tune.RetrievalItem]:
        if count <= 0:
            return []
        items: list[tune.RetrievalItem] = []

        def add(text: str, e) -> None:
            items.append(tune.RetrievalItem(self._template(kind).format(text=text), e.code, kind))

        if kind in ("code", "excludes"):
            pool = [e for e in self.codes if e.code not in self.exclude and (kind == "code" or e.has_excludes)]
            for e in self.rng.sample(pool, min(count, len(pool))):
                items.append(tune.RetrievalItem(self._code_question(kind, e), e.code, kind))
            return items
        if kind == "inclusion":
            pool = [(e, t) for e, t in self.inclusion if e.code not in self.exclude]
        elif kind in ("description", "abbreviated", "partial"):
            pool = [(e, e.description) for e in self.unique_description if e.code not in self.exclude]
        else:
            raise InputError(f"unknown question kind {kind!r}; use one of {', '.join(tune.KINDS)}")
        self.rng.shuffle(pool)
        used: set[str] = set()
        for e, source in pool:
            if len(items) >= count:
                break
            if e.code in used:  # one question per gold code: a code's several terms would weigh it double
                continue
            if kind == "inclusion":
                text = paraphrase_term(source, self.rng)
                ok = tune._norm(text) != tune._norm(source) and self._unique(text, e.code)
            elif kind == "description":
                text = lay_description(source, self.rng)
                ok = self._unique(text, e.code)
            elif kind == "abbreviated":
                text = abbreviate(source) or ""
                ok = bool(text) and self.abbreviated_owners.get(tune._norm(text)) == {e.code}
            else:
                text = self._partial_shuffled(e) or ""
                ok = bool(text)
            if ok:
                used.add(e.code)
                add(text, e)
        return items


def generate_test_items(
    n: int = DEFAULT_COUNT,
    seed: int = DEFAULT_SEED,
    codes: Optional[Iterable[str]] = None,
    exclude: Optional[Iterable[str]] = None,
    kinds: Sequence[str] = tune.KINDS,
) -> list[tune.RetrievalItem]:
    """`n` held-out questions spread evenly over `kinds`; no gold code is in `exclude` (default: the gold codes
    of the committed tune split, regenerated from its seed on the same corpus)."""
    if n < 0:
        raise InputError(f"n must be >= 0, got {n}")
    corpus = list(codes) if codes is not None else tune.quick_corpus_codes()
    if exclude is None:
        exclude = [i.gold_id for i in tune.generate_items(tune.DEFAULT_COUNT, tune.DEFAULT_SEED, corpus)]
    generator = _HeldOut(tune._load_corpus(corpus), random.Random(seed), frozenset(exclude))
    items: list[tune.RetrievalItem] = []
    for i, kind in enumerate(kinds):
        count = n // len(kinds) + (1 if i < n % len(kinds) else 0)
        items.extend(generator.items_of(kind, count))
    return items


def committed_test_items() -> list[tune.RetrievalItem]:
    """Regenerate the committed test split; IntegrityError if it differs from its manifest."""
    return tune.verified_items(tune.committed_manifest(MANIFEST_NAME), MANIFEST_NAME, GENERATOR_VERSION,
                               lambda m, codes: generate_test_items(m["count"], m["seed"], codes))


def write_committed_manifest() -> str:
    """Regenerate `data/icd10_retrieval_test_manifest.json` (after a deliberate generator change)."""
    codes = tune.quick_corpus_codes()
    items = generate_test_items(DEFAULT_COUNT, DEFAULT_SEED, codes)
    manifest = tune.build_manifest(items, DEFAULT_COUNT, DEFAULT_SEED, codes, generator_version=GENERATOR_VERSION,
                                   split="test", templates=TEMPLATE_FAMILY,
                                   disjoint_from=tune.committed_manifest()["set_sha256"])
    return tune.write_manifest(MANIFEST_NAME, manifest)


if __name__ == "__main__":  # python -m medrwr_edge.bench_data.icd10_heldout
    print(write_committed_manifest())
