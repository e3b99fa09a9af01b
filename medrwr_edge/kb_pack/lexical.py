"""Lexical retrieval (SQLite FTS5 / BM25), exact-identifier keys, and rank fusion.

Why lexical at all (issue 13): a MiniLM embedding of "S42.422G" is nearly meaningless, so dense search alone
finds the right ICD-10-CM entry for only ~40% of code questions; BM25 over the same text finds ~90%. Hybrid
mode fuses both ranked lists and puts an exact identifier match first.

Everything lives inside `docs.sqlite`, so the manifest's per-file sha256 covers the lexical index too.
"""

from __future__ import annotations

import re
import sqlite3
from dataclasses import dataclass
from typing import Iterable, Sequence

# porter stemming so "fractures" finds "fracture"; unicode61 folds case and (with 2) diacritics.
FTS_TOKENIZER = "porter unicode61 remove_diacritics 2"
# Title (a code's short description, an article heading) counts 20x against body text. Read at query time (the
# manifest's lexical.bm25_weights only records the build's value). Re-chosen on the TUNE split among 1..40 by
# benchmarks/bench_retrieval_split.py: 40 ties 20 there and is no better on the held-out TEST split, so 20 stays.
BM25_WEIGHTS = (20.0, 1.0)  # (title = the entry's description, text); see benchmarks/bench_retrieval.py

# Words that would make an OR query match nearly every document without telling BM25 anything.
_STOPWORDS = frozenset(
    """a an and are as at be by can could did do does for from had has have how i in into is it its of on or
    that the their there these this to was what when where which who why will with would you your
    patient patients""".split()
)
_WORD = re.compile(r"\w+", re.UNICODE)
# An identifier-shaped token: letters/digits joined by . - _ : / (e.g. S42.422G, icd10:A00.0, RX-12)
_IDENT = re.compile(r"[A-Za-z0-9]+(?:[.\-_:/][A-Za-z0-9]+)*")


def normalize_key(token: str) -> str:
    """The form in which ids and codes are compared: case-folded, dots removed (S42.422G == s42422g)."""
    return token.replace(".", "").casefold()


def _identifier_like(key: str) -> bool:
    """Letters AND digits (S42422g, a00, rx-12): ids such as "12" or "notes.md" would match ordinary words."""
    return any(c.isdigit() for c in key) and any(c.isalpha() for c in key)


def document_keys(doc_id: str, metadata: dict) -> list[str]:
    """Normalised keys under which a query token selects this document exactly.

    The id itself and its part after a namespace prefix (`icd10:S42.422G` -> `S42.422G`), if identifier-like;
    and a metadata `code` (trusted as given: the source says it is a code, e.g. "Chapter 2").
    """
    keys = {normalize_key(doc_id)}
    for sep in (":", "/"):
        if sep in doc_id:
            keys.add(normalize_key(doc_id.rsplit(sep, 1)[1]))
    keys = {k for k in keys if _identifier_like(k)}
    code = metadata.get("code") if isinstance(metadata, dict) else None
    if isinstance(code, str) and code.strip():
        keys.add(normalize_key(" ".join(code.split())))
    return sorted(k for k in keys if k)


def query_keys(query: str) -> list[str]:
    """Normalised identifier-shaped tokens in a user query, in order of appearance, without duplicates."""
    seen: dict[str, None] = {}
    tokens = [m.group(0) for m in _IDENT.finditer(query)]
    for a, b in zip(tokens, tokens[1:]):  # two-word codes such as "Chapter 2"
        seen.setdefault(normalize_key(f"{a} {b}"), None)
    for tok in tokens:
        seen.setdefault(normalize_key(tok), None)
        # "code S42.422G:" style trailing separators are already excluded by the regex; also try the tail of
        # a namespaced token so "icd10:S42.422G" and "S42.422G" both match.
        for sep in (":", "/"):
            if sep in tok:
                seen.setdefault(normalize_key(tok.rsplit(sep, 1)[1]), None)
    return [k for k in seen if k]


def fts_match_expression(query: str) -> str | None:
    """Build a safe FTS5 MATCH expression (an OR of quoted terms) from arbitrary user text.

    Every term is a double-quoted FTS5 string made only of \\w characters, so user text can never be read as
    FTS5 syntax (NEAR, AND, -, :, column filters, unbalanced quotes). Returns None when nothing searchable is
    left (e.g. the query is all punctuation); the caller then falls back to dense results.
    """
    terms: dict[str, None] = {}
    for m in _WORD.finditer(query):
        word = m.group(0).casefold()
        if word in _STOPWORDS:
            continue
        terms.setdefault(word, None)
    if not terms:
        return None
    return " OR ".join(f'"{t}"' for t in terms)


SCHEMA = f"""
CREATE TABLE documents (
    row INTEGER PRIMARY KEY,          -- == the hnsw label
    doc_id TEXT NOT NULL UNIQUE,
    text TEXT NOT NULL,
    source TEXT NOT NULL,
    title TEXT NOT NULL,
    caption TEXT,
    image_file TEXT,                  -- relative to the pack directory (image packs)
    metadata TEXT NOT NULL,           -- JSON, sorted keys
    content_sha256 TEXT NOT NULL
);
CREATE TABLE doc_keys (key TEXT NOT NULL, row INTEGER NOT NULL, PRIMARY KEY (key, row)) WITHOUT ROWID;
CREATE VIRTUAL TABLE fts USING fts5(
    title, text, content='documents', content_rowid='row', tokenize='{FTS_TOKENIZER}'
);
"""


def lexical_search(conn: sqlite3.Connection, query: str, limit: int) -> list[tuple[int, float]]:
    """BM25 top-`limit` as (row, score) with higher score = better; [] when the query has no usable terms."""
    expr = fts_match_expression(query)
    if expr is None or limit <= 0:
        return []
    w_title, w_text = BM25_WEIGHTS
    rows = conn.execute(
        f"SELECT rowid, bm25(fts, {w_title}, {w_text}) AS s FROM fts WHERE fts MATCH ? ORDER BY s, rowid LIMIT ?",
        (expr, limit),
    ).fetchall()
    # FTS5's bm25() is negative (more negative = better); flip it so every list is "higher is better".
    return [(int(r), -float(s)) for r, s in rows]


def exact_matches(conn: sqlite3.Connection, query: str) -> list[int]:
    """Rows whose id/code equals a token of the query, in query-token order."""
    out: list[int] = []
    for key in query_keys(query):
        for (row,) in conn.execute("SELECT row FROM doc_keys WHERE key = ? ORDER BY row", (key,)):
            if row not in out:
                out.append(int(row))
    return out


# ---------------------------------------------------------------------------------------------------- fusion


@dataclass(frozen=True)
class FusionParams:
    """How dense and lexical lists are combined in hybrid mode.

    method "rrf": score = w_dense/(k+rank_dense) + w_lexical/(k+rank_lexical) (ranks from 1; a list in which the
    doc is absent contributes 0). method "linear": min-max normalise each list's scores to [0, 1] over its
    candidates and add them with the same weights.

    Default chosen by measurement. benchmarks/bench_fusion.py (2,994 ICD-10-CM injury codes, MiniLM int8, 600
    questions, hit@3): dense 0.19, BM25 0.70, RRF k=60 1:1 0.64, RRF 1:2 0.69, linear 1:1 0.67, linear 1:2 0.715
    (1:3, 1:4 no better). Then benchmarks/bench_retrieval.py, the issue's benchmark (3,898 entries, header-only
    embeddings, BM25 title weight 20, 600 committed questions, hit@3 overall / description): lexical 0.897 / 0.94,
    linear 1:2 0.925 / 0.93, linear 1:4 0.925 / 0.94 -- 1:4 is the only setting at or above the better single
    list on every question kind (code, description, inclusion, excludes, abbreviated, partial) with MRR 0.874.
    Plain RRF lets a confidently-wrong dense list drown BM25; min-max linear fusion keeps BM25's score gaps, and
    weighting lexical leaves dense to break lexical ties and to find paraphrases.

    Those numbers are on the split the weights were tuned on. benchmarks/bench_retrieval_split.py re-tunes on that
    (TUNE) split only -- 288 settings of method, weights, rrf k, candidates per list and BM25 title weight, ranked
    by the weakest question kind's hit@3 -- and reports on a held-out TEST split (other codes, other wording):
    no setting raises TUNE's weakest kind (abbreviated 0.72) and the pick is no better on TEST (hybrid hit@3 0.873
    vs 0.878), so these defaults stay. Packs store their fusion in the manifest at build time (search.fusion, no
    override field), so a changed default reaches an existing pack only through `setup --rebuild`.
    """

    method: str = "linear"
    rrf_k: int = 60
    w_dense: float = 1.0
    w_lexical: float = 4.0

    def to_dict(self) -> dict:
        return {"method": self.method, "rrf_k": self.rrf_k, "w_dense": self.w_dense, "w_lexical": self.w_lexical}

    @classmethod
    def from_dict(cls, d: dict) -> "FusionParams":
        return cls(
            method=str(d.get("method", "linear")),
            rrf_k=int(d.get("rrf_k", 60)),
            w_dense=float(d.get("w_dense", 1.0)),
            w_lexical=float(d.get("w_lexical", cls.w_lexical)),
        )


def fuse(
    dense: Sequence[tuple[int, float]],
    lexical: Sequence[tuple[int, float]],
    params: FusionParams,
    exact: Iterable[int] = (),
) -> list[tuple[int, float]]:
    """Fuse two ranked (row, score) lists into one (row, fused score) list, best first.

    Exact-identifier rows come first (in the given order), then the fused ranking; ties break on the better
    dense rank, then on row number, so the output is deterministic.
    """
    fused: dict[int, float] = {}
    if params.method == "rrf":
        for weight, ranked in ((params.w_dense, dense), (params.w_lexical, lexical)):
            for rank, (row, _) in enumerate(ranked, start=1):
                fused[row] = fused.get(row, 0.0) + weight / (params.rrf_k + rank)
    elif params.method == "linear":
        for weight, ranked in ((params.w_dense, dense), (params.w_lexical, lexical)):
            if not ranked:
                continue
            scores = [s for _, s in ranked]
            lo, hi = min(scores), max(scores)
            span = hi - lo
            for row, s in ranked:
                norm = (s - lo) / span if span > 0 else 1.0
                fused[row] = fused.get(row, 0.0) + weight * norm
        for row, _ in list(dense) + list(lexical):
            fused.setdefault(row, 0.0)
    else:
        raise ValueError(f"unknown fusion method {params.method!r}")
    dense_rank = {row: i for i, (row, _) in enumerate(dense)}
    order = sorted(fused, key=lambda r: (-fused[r], dense_rank.get(r, len(dense_rank)), r))
    exact = [r for r in dict.fromkeys(exact)]
    top = max(fused.values(), default=0.0) + 1.0
    head = [(r, top + (len(exact) - i)) for i, r in enumerate(exact)]
    return head + [(r, fused[r]) for r in order if r not in set(exact)]
