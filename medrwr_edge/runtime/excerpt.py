"""What of a retrieved entry an untrained model reads (guided and rag protocols only; native splices whole entries).

An ICD-10-CM entry is ~200 words in lines: the code and its title, its place in the hierarchy, then its notes
(subdivisions, inclusion terms, Excludes1, ...). Spliced whole, three entries drown a 1.5B model; cut to their
first N words, the notes a question is about (its Excludes1 list) never reach it. `focus_excerpt` keeps the first
line, then the list items that share the most terms with the question, its options and the query -- every matching
line's best item before any line's second -- shown in the entry's own order: a search engine's snippet, per line.
"""

from __future__ import annotations

import re

WORD_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9.\-]*")
# Words every question or entry of the domain carries: matching them says nothing about which line matters.
_STOPWORDS = frozenset(
    "the and for with what which does code codes icd icd-10-cm cm this that from into are was were is of in on to "
    "a an or not under denote denotes condition conditions diagnosis patient".split())
ELLIPSIS = "…"


def terms(text: str) -> set[str]:
    """Content words of a text, lower case: 3+ letters or containing a digit, stopwords dropped."""
    return {w.lower().rstrip(".-") for w in WORD_RE.findall(text)
            if (len(w) >= 3 or any(c.isdigit() for c in w)) and w.lower() not in _STOPWORDS}


def first_words(text: str, words: int) -> str:
    """The text's first `words` words on one line and "…"; the text as it is when it has no more (or words is 0)."""
    w = text.split()
    return " ".join(w[:words]) + " " + ELLIPSIS if 0 < words < len(w) else text


def focus_terms(asked: str, options: str = "") -> dict[str, int]:
    """The terms an excerpt should show, weighted: what the question and query ask (2) over the options' words (1)."""
    weights = dict.fromkeys(terms(options), 1)
    weights.update(dict.fromkeys(terms(asked), 2))
    return weights


def focus_excerpt(text: str, focus: dict[str, int], words: int) -> str:
    """About `words` words of `text` (0: all of it), on one line: its first line, then what of its other lines matches
    the `focus` terms, shown in the entry's order. A list line ("Label: a; b; c") is read item by item, and the
    matching items are taken in rounds -- the best match of every matching line before the second-best of any -- so
    one long line (a code's subdivisions, which share the options' words) cannot crowd out a short one the question
    asks about (its Excludes1 note). Words left over go to the rest, best-matching lines first, and what is still
    left to the first words of the best line that did not fit, when it is prose (not a list). Terms of the first
    line do not rank the others (it is always shown: the code's title words recur in every line of the hierarchy).
    Without focus terms, or for single-line text, this is `first_words`; text within the budget is returned as is."""
    if words <= 0 or len(text.split()) <= words:
        return text
    lines = [" ".join(ln.split()) for ln in text.splitlines() if ln.strip()]
    head, rest = lines[0], lines[1:]
    left = words - len(head.split())
    if not rest or not focus or left <= 0:
        return first_words(text, words)
    focus = {t: w for t, w in focus.items() if t not in terms(head)}
    parts = [_Line.of(ln, focus) for ln in rest]
    by_score = sorted(range(len(parts)), key=lambda i: -parts[i].score)  # stable: ties keep the entry's order
    matching = [[j for j in p.best_first() if p.item_scores[j] > 0] for p in parts]
    for r in range(max(map(len, matching))):  # the rounds: each matching line's r-th best item
        for i in by_score:
            if r < len(matching[i]):
                left = parts[i].take(matching[i][r], left)
    for i in by_score:  # the rest, best-matching lines first, each in its own order
        for j in range(len(parts[i].items)):
            left = parts[i].take(j, left)
    if left >= 4:  # the best line that did not fit, when it is not a list: its first words
        for i in by_score:
            if not parts[i].chosen and parts[i].label is None:
                parts[i].clipped = first_words(parts[i].items[0], left)
                break
    shown = " ".join([head] + [r for r in map(_Line.render, parts) if r])
    return shown if all(p.complete() for p in parts) or shown.endswith(ELLIPSIS) else shown + " " + ELLIPSIS


def _score(text: str, focus: dict[str, int]) -> int:
    return sum(focus.get(t, 0) for t in terms(text))


class _Line:
    """One line of an entry as a label and its items ("Label: a; b; c"), or, when it is not such a list, one item."""

    def __init__(self, label, items, focus):
        self.label, self.items = label, items
        self.item_scores = [_score(x, focus) for x in items]
        self.score = _score(self.line(), focus)
        self.chosen: set[int] = set()
        self.clipped = ""

    @classmethod
    def of(cls, line: str, focus: dict[str, int]) -> "_Line":
        label, sep, body = line.partition(": ")
        items = body.split("; ") if sep else []
        return cls(label, items, focus) if len(items) >= 2 else cls(None, [line], focus)

    def line(self) -> str:
        return self.items[0] if self.label is None else f"{self.label}: " + "; ".join(self.items)

    def best_first(self) -> list[int]:
        return sorted(range(len(self.items)), key=lambda j: -self.item_scores[j])

    def take(self, j: int, left: int) -> int:
        """Show item j if it fits in `left` words (with the label, for this line's first item); the words left."""
        if j in self.chosen:
            return left
        cost = len(self.items[j].split()) + (len(self.label.split()) if self.label and not self.chosen else 0)
        if cost > left:
            return left
        self.chosen.add(j)
        return left - cost

    def complete(self) -> bool:
        return len(self.chosen) == len(self.items) and not self.clipped

    def render(self) -> str:
        if self.clipped:
            return self.clipped
        if not self.chosen:
            return ""
        if self.label is None:
            return self.items[0]
        more = "" if self.complete() else "; " + ELLIPSIS
        return f"{self.label}: " + "; ".join(self.items[j] for j in sorted(self.chosen)) + more
