"""The ICD-10-CM retrieval benchmark: deterministic, matches its committed manifest, items valid and
unambiguous, and the evaluation computes the right numbers on a real (small) pack."""

from __future__ import annotations

import collections
import re

import pytest

pytest.importorskip("simple_icd_10_cm")

from medrwr_edge.bench_data import icd10_retrieval as bench  # noqa: E402
from medrwr_edge.errors import IntegrityError  # noqa: E402
from medrwr_edge.kb_pack.icd10 import _icd  # noqa: E402


@pytest.fixture(scope="module")
def corpus():
    return bench.quick_corpus_codes()


@pytest.fixture(scope="module")
def items(corpus):
    return bench.generate_items(bench.DEFAULT_COUNT, bench.DEFAULT_SEED, corpus)


def test_quick_corpus(corpus):
    assert len(corpus) == 3_898 == bench.committed_manifest()["corpus"]["size"]
    assert corpus[0] == "Chapter 10" and "S42.422" in corpus and "R91.8" in corpus


def test_same_seed_same_items_other_seed_other_items(corpus, items):
    again = bench.generate_items(bench.DEFAULT_COUNT, bench.DEFAULT_SEED, corpus)
    assert [i.item_hash() for i in again] == [i.item_hash() for i in items]
    other = bench.generate_items(bench.DEFAULT_COUNT, bench.DEFAULT_SEED + 1, corpus)
    assert len({i.item_hash() for i in other} & {i.item_hash() for i in items}) < len(items) // 4


def test_matches_committed_manifest(items):
    manifest = bench.committed_manifest()
    assert manifest["seed"] == bench.DEFAULT_SEED and manifest["count"] == bench.DEFAULT_COUNT
    assert [[i.kind, i.gold_id, i.item_hash()] for i in items] == manifest["items"]
    assert bench.set_sha256(items) == manifest["set_sha256"]
    assert [i.item_hash() for i in bench.committed_items()] == [row[2] for row in manifest["items"]]


def test_committed_items_refuses_a_changed_set(monkeypatch):
    manifest = bench.committed_manifest()
    manifest["set_sha256"] = "0" * 64
    monkeypatch.setattr(bench, "committed_manifest", lambda: manifest)
    with pytest.raises(IntegrityError, match="differ from the committed manifest"):
        bench.committed_items()


def test_every_kind_is_represented_evenly(items):
    counts = collections.Counter(i.kind for i in items)
    assert counts == {kind: bench.DEFAULT_COUNT // len(bench.KINDS) for kind in bench.KINDS}


def _forms(code: str) -> list[str]:
    return [code.casefold(), code.replace(".", "").casefold()]


def test_items_are_valid_and_unambiguous(corpus, items):
    icd = _icd()
    in_corpus = set(corpus)
    descriptions = collections.Counter(bench._norm(icd.get_description(c)) for c in corpus if "-" not in c
                                       and not c.startswith("Chapter"))
    code_words = [bench._words(icd.get_description(c)) for c in corpus if "-" not in c and not c.startswith("Chapter")]
    for item in items:
        assert item.gold_id in in_corpus, item
        question = item.question.casefold()
        mentions_gold = any(re.search(rf"(?<![0-9a-z]){re.escape(f)}(?![0-9a-z])", question) for f in _forms(item.gold_id))
        if item.kind in ("code", "excludes"):
            assert mentions_gold, item
        else:
            # description-type questions must not give the answer away (nor name any other code)
            assert not mentions_gold, item
            assert not bench._CODE_SHAPE.search(item.question.replace("ICD-10-CM", "").replace("icd10", "")
                                                .replace("icd-10", "")), item
        description = icd.get_description(item.gold_id)
        if item.kind == "description":
            assert description.casefold() in question
            assert descriptions[bench._norm(description)] == 1, item
        elif item.kind == "excludes":
            assert icd.get_excludes1(item.gold_id) or icd.get_excludes2(item.gold_id)
        elif item.kind == "inclusion":
            terms = [t for t in icd.get_inclusion_term(item.gold_id) if t.casefold() in question]
            assert terms, item
            owners = [c for c in corpus if "-" not in c and not c.startswith("Chapter")
                      and any(bench._norm(t) == bench._norm(x) for t in terms for x in icd.get_inclusion_term(c))]
            assert owners == [item.gold_id], item
        elif item.kind == "partial":
            words = bench._words(item.question) - bench._words("which code covers icd-10")
            assert sum(1 for ws in code_words if words <= ws) == 1, item
            assert bench._words(description) >= words
        elif item.kind == "abbreviated":
            assert item.question == item.question.lower()
            assert description.casefold() not in question  # something was abbreviated


def test_scores_from_ranks():
    s = bench.score_ranks([1, 2, None, 4, 11])
    assert (s.n, s.hit1, s.hit3, s.hit10) == (5, 0.2, 0.4, 0.6)
    assert s.mrr == pytest.approx((1 + 1 / 2 + 1 / 4 + 1 / 11) / 5)
    assert bench.gold_ranks([["a", "b"], ["c"]], [bench.RetrievalItem("q", "b", "code"),
                                                   bench.RetrievalItem("q", "x", "code")]) == [2, None]


def test_evaluate_on_a_real_pack(tmp_path, items):
    """A real pack (SQLite FTS5 + hnswlib) over 800 ICD-10-CM passages, with the feature-hashing test encoder:
    identifier questions must be answered first by the exact-match path, description questions mostly by BM25."""
    from medrwr_edge.kb_pack.build import build_text_pack
    from medrwr_edge.kb_pack.icd10 import icd10_documents
    from medrwr_edge.kb_pack.pack import Pack
    from pack_fakes import HashingTextEncoder

    docs = list(icd10_documents(chapters=[10], include_extensions=False))[:800]
    codes = [d.id for d in docs]
    sample = bench.generate_items(120, 7, codes)
    assert {i.gold_id for i in sample} <= set(codes)
    pack_dir = build_text_pack(docs, tmp_path / "icd10-ch10", HashingTextEncoder(dim=256), name="icd10-ch10",
                               version="test", progress=False)
    with Pack.open(pack_dir, encoder=HashingTextEncoder(dim=256)) as pack:
        results = bench.evaluate(pack, sample, k=10)
    assert set(results) == {"dense", "lexical", "hybrid"}
    for mode in ("lexical", "hybrid"):
        assert results[mode]["code"].hit1 == 1.0, (mode, results[mode]["code"])
        assert results[mode]["excludes"].hit1 == 1.0
    assert results["lexical"]["description"].hit3 >= 0.8
    assert results["hybrid"]["all"].n == len(sample)
    table = bench.format_table(results)
    assert "hybrid" in table and "description" in table
