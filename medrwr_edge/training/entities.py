"""Offline medical entity extraction for the query-semantic reward.

The reference code links entities with scispaCy's `en_core_sci_lg` model and its UMLS linker. Neither can be
installed here (the model and the UMLS index are downloads from outside a package registry, and UMLS needs a
licence), so this module uses what ships offline:

* **ICD-10-CM** (`simple_icd_10_cm`, already a runtime dependency): every code description is split into words;
  words that are not stop words or ICD bookkeeping words ("unspecified", "encounter", "sequela", ...) become
  single-word terms, and two- and three-word runs of such words that recur in at least two descriptions become
  phrases ("subarachnoid hemorrhage", "lobar pneumonia").
* **A curated term list** (`medrwr_edge/data/medical_terms.txt`, ~250 lines written for this project): imaging
  modalities and findings, anatomy, signs, tests and drug classes that ICD-10-CM rarely words that way
  ("consolidation", "ground-glass opacity", "ct angiography").
* ICD-10-CM **codes** written in the text (I60.9, J18.1) are entities too.

Extraction lower-cases, splits into words, and takes the longest phrase match at each position (up to three
words), else a single-word term. A plural falls back to its singular ("nodules" -> "nodule"). This is a
vocabulary matcher, not a linker: it has no synonyms or abbreviation expansion ("MI" is not "myocardial
infarction"), which the UMLS linker had; what it finds is exact and explainable. Building the vocabulary takes
~2-3 s once per process.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from typing import Iterable

MAX_PHRASE_WORDS = 3
MIN_PHRASE_DESCRIPTIONS = 2  # a word run must recur to be a phrase (drops one-off combinations)
MIN_TERM_CHARS = 3

WORD_RE = re.compile(r"[a-z0-9][a-z0-9'\-]*[a-z0-9]|[a-z]")
ICD_CODE_RE = re.compile(r"\b([A-Z][0-9][0-9A-Z](?:\.[0-9A-Z]{1,4})?)\b")

STOP_WORDS = frozenset("""
a about above after again against all also am an and any are as at be because been before being below between
both but by can could did do does doing down during each few for from further had has have having he her here
hers him his how i if in into is it its itself just may me might more most must my no nor not now of off on once
only or other others our out over own same she should so some such than that the their them then there these
they this those through to too under until up upon very was we were what when where which while who whom why
will with within without would you your yes per via vs versus etc
""".split())

# Words that are everywhere in ICD-10-CM descriptions but name no medical concept.
ICD_BOOKKEEPING_WORDS = frozenset("""
unspecified specified encounter initial subsequent sequela routine delayed healing type level classified
elsewhere nos nec part site sites unsp due left right bilateral side first second third fourth fifth degree
stage stages episode care use condition conditions disease disorder disorders personal history status family
code codes category other
ii iii iv v vi vii viii ix x xi xii iiia iiib iiic
""".split())

# Ordinary words that ICD-10-CM happens to contain but that say nothing medical in a question or a query.
GENERIC_WORDS = frozenset("""
patient patients person persons man woman men women male female child children adult year years old day days
week weeks month months hour hours time sudden severe mild moderate organism following associated involving
complicating resulting except including likely presents presented shows showing finding findings normal
abnormal new old small large multiple single diagnosis diagnoses treatment management cause causes
""".split())


@dataclass(frozen=True)
class MedicalVocabulary:
    terms: frozenset  # single words
    phrases: frozenset  # tuples of 2..MAX_PHRASE_WORDS words
    sources: tuple  # what it was built from, for records

    def __len__(self) -> int:
        return len(self.terms) + len(self.phrases)


def words(text: str) -> list[str]:
    """Lower-cased word tokens (letters, digits, inner hyphens/apostrophes)."""
    return WORD_RE.findall(text.lower())


def _content(word: str) -> bool:
    return (len(word) >= MIN_TERM_CHARS and word not in STOP_WORDS and word not in ICD_BOOKKEEPING_WORDS
            and word not in GENERIC_WORDS and not word.isdigit())


def curated_terms() -> list[str]:
    text = resources.files("medrwr_edge").joinpath("data/medical_terms.txt").read_text("utf-8")
    out = []
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip().lower()
        if line:
            out.append(line)
    return out


def build_vocabulary(icd_descriptions: Iterable[str], extra_terms: Iterable[str] = ()) -> MedicalVocabulary:
    """The vocabulary from ICD-style descriptions plus extra terms (single words or phrases)."""
    terms: set[str] = set()
    run_counts: Counter = Counter()
    for description in icd_descriptions:
        ws = words(description)
        terms.update(w for w in ws if _content(w))
        runs = set()
        for n in range(2, MAX_PHRASE_WORDS + 1):
            for i in range(len(ws) - n + 1):
                run = tuple(ws[i : i + n])
                if all(_content(w) for w in run):
                    runs.add(run)
        run_counts.update(runs)
    phrases = {run for run, count in run_counts.items() if count >= MIN_PHRASE_DESCRIPTIONS}
    for term in extra_terms:
        ws = tuple(words(term))
        if len(ws) == 1:
            terms.add(ws[0])
        elif 1 < len(ws) <= MAX_PHRASE_WORDS:
            phrases.add(ws)
    return MedicalVocabulary(frozenset(terms), frozenset(phrases), ("custom",))


@lru_cache(maxsize=1)
def default_vocabulary() -> MedicalVocabulary:
    """ICD-10-CM (all codes of simple_icd_10_cm) + the curated term list. Cached per process."""
    import simple_icd_10_cm as icd

    descriptions = (icd.get_description(code) for code in icd.get_all_codes(with_dots=False))
    vocab = build_vocabulary(descriptions, curated_terms())
    return MedicalVocabulary(vocab.terms, vocab.phrases,
                             (f"simple_icd_10_cm {_package_version('simple_icd_10_cm')}", "medical_terms.txt"))


def _package_version(name: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return "unknown"


def _singular(word: str) -> str:
    if word.endswith("ies") and len(word) > 4:
        return word[:-3] + "y"
    if word.endswith("es") and len(word) > 4 and word[-3] in "sxz":
        return word[:-2]
    if word.endswith("s") and not word.endswith("ss") and len(word) > 3:
        return word[:-1]
    return word


def extract_entities(text: str, vocabulary: MedicalVocabulary | None = None) -> list[str]:
    """Medical entities in `text`, in order of first appearance, without repeats (phrases as space-joined)."""
    vocab = vocabulary or default_vocabulary()
    found: list[str] = []
    seen: set[str] = set()

    def add(entity: str) -> None:
        if entity not in seen:
            seen.add(entity)
            found.append(entity)

    for code in ICD_CODE_RE.findall(text):
        add(code.lower())
    ws = words(text)
    i = 0
    while i < len(ws):
        for n in range(min(MAX_PHRASE_WORDS, len(ws) - i), 1, -1):
            run = tuple(ws[i : i + n])
            singular_run = run[:-1] + (_singular(run[-1]),)
            match = run if run in vocab.phrases else singular_run if singular_run in vocab.phrases else None
            if match is not None:
                add(" ".join(match))
                i += n
                break
        else:
            # Curated short terms ("ct", "mri") are in `terms` too; ICD words shorter than 3 letters never are.
            w = ws[i]
            if w not in STOP_WORDS and w not in GENERIC_WORDS:
                singular = _singular(w)
                if singular != w and singular in vocab.terms:
                    add(singular)
                elif w in vocab.terms:
                    add(w)
            i += 1
    return found


def entity_words(entities: Iterable[str]) -> list[str]:
    """The words of a list of entities (what the reward counts), in order."""
    return [w for e in entities for w in e.split()]
