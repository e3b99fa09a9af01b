"""What of a retrieved entry an untrained model reads (guided and rag protocols only; native splices whole entries).

An ICD-10-CM entry is ~200 words in lines: the code and its title, its place in the hierarchy, then its notes
(subdivisions, inclusion terms, Excludes1, ...). Spliced whole, three entries drown a 1.5B model; cut to their
first N words, the notes a question is about (its Excludes1 list) never reach it. `focus_excerpt` keeps the first
line, then the lines that share the most terms with the question, its options and the query, in the entry's own
order, and within a long list line the items that match -- a search engine's snippet, per line.
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
    """About `words` words of `text` (0: all of it), on one line: its first line, then its other lines ranked by the
    weight of the `focus` terms they share, shown in the entry's order; a list line ("Label: a; b; c") too long for
    what is left keeps its label and its best-matching items. Terms of the first line do not rank the others (it is
    always shown: the code's title words recur in every line of the hierarchy). Without focus terms, or for
    single-line text, this is `first_words`; text within the budget is returned as it is."""
    if words <= 0 or len(text.split()) <= words:
        return text
    lines = [" ".join(ln.split()) for ln in text.splitlines() if ln.strip()]
    head, rest = lines[0], lines[1:]
    left = words - len(head.split())
    if not rest or not focus or left <= 0:
        return first_words(text, words)
    focus = {t: w for t, w in focus.items() if t not in terms(head)}
    order = sorted(range(len(rest)), key=lambda i: -_score(rest[i], focus))  # stable: ties keep the entry's order
    kept: dict[int, str] = {}
    for i in order:
        if left < 4:  # fewer words would be a label with nothing after it
            break
        n = len(rest[i].split())
        kept[i] = rest[i] if n <= left else _clip_line(rest[i], focus, left)
        left -= min(n, left)
    shown = " ".join([head] + [kept[i] for i in sorted(kept)])
    return shown if len(kept) == len(rest) or shown.endswith(ELLIPSIS) else shown + " " + ELLIPSIS


def _score(text: str, focus: dict[str, int]) -> int:
    return sum(focus.get(t, 0) for t in terms(text))


def _clip_line(line: str, focus: dict[str, int], words: int) -> str:
    """A line cut to about `words` words; a "Label: a; b; c" line keeps its label and its best-matching items."""
    label, sep, body = line.partition(": ")
    items = body.split("; ") if sep else []
    left = words - len(label.split())
    if len(items) < 2 or left <= 0:
        return first_words(line, words)
    chosen = []
    for i in sorted(range(len(items)), key=lambda i: -_score(items[i], focus)):
        n = len(items[i].split())
        if n <= left:
            chosen.append(i)
            left -= n
    if not chosen:
        return first_words(line, words)
    return f"{label}: " + "; ".join(items[i] for i in sorted(chosen)) + ("; " + ELLIPSIS if len(chosen) < len(items)
                                                                          else "")
