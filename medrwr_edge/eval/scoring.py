"""Scoring answers: option letters for multiple choice, normalised diagnosis match for open-ended cases.

Open-ended (DiagnosisArena-style): the model's answer may list several diagnoses ("1. X\\n2. Y", "X; Y").
top-1 is right when the first candidate matches the gold diagnosis or one of its synonyms, top-5 when any
of the first five does. A candidate matches a gold name when, after normalisation (case, accents, punctuation,
articles, "disease"/"syndrome" possessives), they are equal, or the gold name appears in the candidate as whole
words and the candidate adds at most MAX_EXTRA_WORDS words ("acute appendicitis" matches "appendicitis";
"appendicitis ruled out, likely mesenteric adenitis" does not). Negated candidates ("not X", "no X") never match.

The optional LLM judge asks a local model whether a candidate and the gold name the same condition; it is
used only where the normalised match said no, and its verdicts are counted separately from the strict score.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass
from typing import Optional, Sequence

MAX_EXTRA_WORDS = 3
_ARTICLES = {"a", "an", "the"}
_NEGATIONS = ("not ", "no ", "without ", "rule out ", "ruled out ", "unlikely ")


def normalise(text: str) -> str:
    text = unicodedata.normalize("NFKD", text)
    text = "".join(c for c in text if not unicodedata.combining(c)).casefold()
    text = re.sub(r"'s\b", "", text)  # Crohn's disease -> crohn disease
    text = re.sub(r"[^\w\s]", " ", text)
    return " ".join(w for w in text.split() if w not in _ARTICLES)


def split_candidates(answer: Optional[str], limit: int = 5) -> list[str]:
    """The diagnoses an answer lists, in order: numbered/bulleted lines, else ';' or newline separated."""
    if not answer or not answer.strip():
        return []
    parts = re.split(r"\n+|;|\s(?=\(?\d{1,2}[\.\)]\s)", answer)
    out = []
    for part in parts:
        part = re.sub(r"^\s*(?:\(?\d{1,2}[\.\)]|[-*•])\s*", "", part).strip().rstrip(".")
        part = re.sub(r"^(?:final |most likely |primary )?diagnosis\s*(?:is|:)\s*", "", part, flags=re.I).strip()
        if part:
            out.append(part)
    return out[:limit]


def names_match(candidate: str, gold: str) -> bool:
    lowered = candidate.strip().casefold()
    if lowered.startswith(_NEGATIONS):
        return False
    c, g = normalise(candidate), normalise(gold)
    if not c or not g:
        return False
    if c == g:
        return True
    cw, gw = c.split(), g.split()
    if len(cw) - len(gw) > MAX_EXTRA_WORDS:
        return False
    return f" {g} " in f" {c} "


def option_from_text(answer: Optional[str], options: Sequence[str]) -> Optional[str]:
    """The option letter when an answer gives an option's text instead of its letter ("<answer> Asthma </answer>").

    The paper scores the first answer token only; models that write the option text would score 0 there. This
    reads the answer as the option whose full text it contains (as whole words); when several are contained,
    the longest wins only if it contains all the others. Negated answers ("not asthma") do not count."""
    if not answer or answer.strip().casefold().startswith(_NEGATIONS):
        return None
    text = f" {normalise(answer)} "
    hits = [o for o in options if normalise(o[3:]) and f" {normalise(o[3:])} " in text]
    if not hits:
        return None
    longest = max(hits, key=lambda o: len(normalise(o[3:])))
    if all(f" {normalise(h[3:])} " in f" {normalise(longest[3:])} " for h in hits):
        return longest[0]
    return None


@dataclass
class OpenScore:
    top1: bool
    top5: bool
    candidates: list[str]
    matched_rank: Optional[int]  # 1-based rank of the first matching candidate


def score_open(answer: Optional[str], gold: Sequence[str]) -> OpenScore:
    candidates = split_candidates(answer)
    for rank, cand in enumerate(candidates, 1):
        if any(names_match(cand, g) for g in gold):
            return OpenScore(rank == 1, True, candidates, rank)
    return OpenScore(False, False, candidates, None)


class LlmJudge:
    """Asks a local model (any backend: llama.cpp, scripted) whether two diagnoses name the same condition.

    Greedy, 4 tokens, answer read as yes/no. A judge is only as good as its model: a 135M model is a weak judge;
    verdicts are reported apart from the strict normalised-match score."""

    PROMPT = (
        "<|im_start|>system\nYou are a careful medical examiner. Answer only yes or no.<|im_end|>\n"
        "<|im_start|>user\nCorrect diagnosis: {gold}\nCandidate diagnosis: {candidate}\n"
        "Does the candidate name the same condition as the correct diagnosis?<|im_end|>\n<|im_start|>assistant\n"
    )

    def __init__(self, backend):
        self.backend = backend

    def same(self, candidate: str, gold: Sequence[str]) -> bool:
        from ..runtime.backend import SamplingSettings

        names = gold[0] + (f" (also called: {', '.join(gold[1:])})" if len(gold) > 1 else "")
        self.backend.reset()
        self.backend.prefill([self.PROMPT.format(gold=names, candidate=candidate)])
        out = self.backend.generate(SamplingSettings(temperature=0.0, max_tokens=4), ["<|im_end|>", "\n"])
        return out.text.strip().casefold().startswith("yes")
