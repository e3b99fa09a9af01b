"""Hybrid retrieval: FTS5 BM25, exact identifier boosting, fusion order, k guarantees, hostile query text."""

from __future__ import annotations

import threading

import pytest

from medrwr_edge.kb_pack import lexical
from medrwr_edge.kb_pack.build import build_text_pack
from medrwr_edge.kb_pack.documents import Document
from medrwr_edge.kb_pack.lexical import FusionParams, fts_match_expression, fuse, query_keys
from medrwr_edge.kb_pack.pack import Pack
from pack_fakes import HashingTextEncoder

ICD_LIKE = [
    ("S42.422G", "Displaced comminuted supracondylar fracture without intercondylar fracture of left humerus, "
                 "subsequent encounter for fracture with delayed healing"),
    ("S42.421A", "Displaced comminuted supracondylar fracture without intercondylar fracture of right humerus, "
                 "initial encounter for closed fracture"),
    ("S42.422A", "Displaced comminuted supracondylar fracture without intercondylar fracture of left humerus, "
                 "initial encounter for closed fracture"),
    ("J18.9", "Pneumonia, unspecified organism"),
    ("J93.0", "Spontaneous tension pneumothorax"),
    ("J90", "Pleural effusion, not elsewhere classified"),
    ("I63.9", "Cerebral infarction, unspecified"),
    ("K35.80", "Unspecified acute appendicitis"),
    ("I51.7", "Cardiomegaly"),
    ("K80.20", "Calculus of gallbladder without cholecystitis without obstruction"),
    ("Chapter 2", "Neoplasms"),
    ("C34.90", "Malignant neoplasm of unspecified part of unspecified bronchus or lung"),
]


@pytest.fixture(scope="module")
def icd_pack(tmp_path_factory):
    docs = [Document(id=code, text=f"{code} {desc}", title=desc, source="ICD-10-CM", metadata={"code": code})
            for code, desc in ICD_LIKE]
    enc = HashingTextEncoder()
    path = build_text_pack(docs, tmp_path_factory.mktemp("icd") / "icd", enc, name="icd", version="t", progress=False)
    with Pack.open(path, encoder=enc) as pack:
        yield pack


def test_fts_round_trip(icd_pack):
    hits = icd_pack.search("tension pneumothorax", k=2, mode="lexical")
    assert hits[0].doc_id == "J93.0" and hits[0].ranks["lexical"] == 1 and hits[0].mode == "lexical"
    # porter stemming: "neoplasms" finds "neoplasm"
    assert {h.doc_id for h in icd_pack.search("neoplasms", k=2, mode="lexical")} == {"Chapter 2", "C34.90"}


def test_lexical_mode_returns_only_matches(icd_pack):
    hits = icd_pack.search("gallbladder", k=5, mode="lexical")
    assert [h.doc_id for h in hits] == ["K80.20"]


@pytest.mark.parametrize("query", ["What is S42.422G?", "code s42422g", "S42.422g please", "(S42.422G)"])
def test_exact_code_comes_first(icd_pack, query):
    for mode in ("hybrid", "lexical"):
        hits = icd_pack.search(query, k=3, mode=mode)
        assert hits[0].doc_id == "S42.422G", (mode, [h.doc_id for h in hits])
        assert hits[0].ranks["exact"] == 1


def test_exact_code_beats_near_identical_neighbours(icd_pack):
    # S42.422A differs from S42.422G only in the 7th character; dense and BM25 alone cannot tell them apart.
    hits = icd_pack.search("left humerus supracondylar fracture S42.422A", k=3)
    assert hits[0].doc_id == "S42.422A"


def test_namespaced_and_chapter_ids():
    assert "s42422g" in query_keys("icd10:S42.422G")
    assert lexical.document_keys("icd10:S42.422G", {}) == ["icd10:s42422g", "s42422g"]
    assert lexical.document_keys("Chapter 2", {"code": "Chapter 2"}) == ["chapter 2"]
    # plain numbers and words are not identifiers: "12 year old" must not pull up a doc whose id is "kb:12"
    assert lexical.document_keys("kb:12", {}) == ["kb:12"] and lexical.document_keys("notes/two.md", {}) == []


def test_two_word_code_and_no_false_exact_match(icd_pack):
    assert icd_pack.search("what is in chapter 2?", k=1, mode="lexical")[0].doc_id == "Chapter 2"
    hits = icd_pack.search("lung 90", k=3, mode="hybrid")
    assert all(h.ranks["exact"] is None for h in hits)


@pytest.mark.parametrize("query", ['"', '" OR "', "- : * ^ ( ) NEAR", "fracture\" AND -x:y", "'; DROP TABLE fts; --",
                                    "title:pneumonia", "a*b", "\u00e9\u00e8 \u4e2d\u6587"])
def test_hostile_query_text_never_breaks_fts(icd_pack, query):
    for mode in ("hybrid", "lexical"):
        hits = icd_pack.search(query, k=3, mode=mode)
        assert isinstance(hits, list)
    assert len(icd_pack.search(query, k=3, mode="hybrid")) == 3


def test_all_punctuation_query_gives_dense_results(icd_pack):
    assert fts_match_expression("?!-- :: \"\" ()") is None
    hits = icd_pack.search("?!-- :: \"\" ()", k=3, mode="hybrid")
    assert len(hits) == 3 and all(h.ranks["lexical"] is None and h.ranks["dense"] is not None for h in hits)
    assert icd_pack.search("?!--", k=3, mode="lexical") == []


def test_hybrid_never_returns_fewer_than_k(icd_pack):
    for k in range(1, icd_pack.doc_count + 1):
        hits = icd_pack.search("gallbladder", k=k, mode="hybrid")  # only 1 lexical match
        assert len(hits) == k and len({h.doc_id for h in hits}) == k


def test_fts_expression_quotes_every_term():
    assert fts_match_expression('What is the "S42.422G" code?') == '"s42" OR "422g" OR "code"'


def test_rrf_fusion_order_by_hand():
    dense = [(1, 0.9), (2, 0.8), (3, 0.7)]
    lexical_ = [(3, 12.0), (4, 9.0), (1, 1.0)]
    fused = fuse(dense, lexical_, FusionParams(method="rrf", rrf_k=60, w_dense=1.0, w_lexical=1.0))
    # doc 1: 1/61 + 1/63 ; doc 3: 1/63 + 1/61 (tie, broken by better dense rank -> 1 first); 2: 1/62; 4: 1/62
    assert [r for r, _ in fused] == [1, 3, 2, 4]
    assert fused[0][1] == pytest.approx(1 / 61 + 1 / 63)
    weighted = fuse(dense, lexical_, FusionParams(method="rrf", rrf_k=60, w_dense=1.0, w_lexical=2.0))
    assert [r for r, _ in weighted] == [3, 1, 4, 2]


def test_linear_fusion_and_exact_head():
    dense = [(1, 0.9), (2, 0.5), (3, 0.1)]
    lexical_ = [(3, 10.0), (2, 5.0)]
    fused = fuse(dense, lexical_, FusionParams(method="linear", w_dense=1.0, w_lexical=1.0))
    # 1: 1.0+0 ; 2: 0.5+0 ; 3: 0+1.0 -> 1 and 3 tie at 1.0 (dense rank breaks it), then 2
    assert [r for r, _ in fused] == [1, 3, 2]
    with_exact = fuse(dense, lexical_, FusionParams(), exact=[2, 9])
    assert [r for r, _ in with_exact][:2] == [2, 9] and len(with_exact) == 4


def test_mode_default_comes_from_manifest_and_query_overrides(tmp_path):
    enc = HashingTextEncoder()
    docs = [Document(id=c, text=d) for c, d in ICD_LIKE]
    path = build_text_pack(docs, tmp_path / "p", enc, name="p", version="1", search_mode="dense", progress=False)
    with Pack.open(path, encoder=enc) as pack:
        assert pack.default_mode == "dense"
        assert pack.search("J93.0", k=2)[0].mode == "dense"
        assert pack.search("J93.0", k=2, mode="hybrid")[0].doc_id == "J93.0"


def test_concurrent_searches(icd_pack):
    errors = []

    def worker():
        try:
            for _ in range(30):
                assert icd_pack.search("S42.422G fracture", k=3)[0].doc_id == "S42.422G"
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []


def test_default_fusion_is_lexical_weighted_linear():
    # chosen by the retrieval benchmarks; a strong BM25 hit beats a middling dense one. By hand, min-max
    # normalised: dense 1 -> 1.0, 2 -> 0.8, 3 -> 0.0; lexical 3 -> 1.0, 2 -> 0.0625, 1 -> 0.0; with weights 1:4
    # the fused scores are 3: 4.0, 2: 1.05, 1: 1.0 (with 1:2 it would be 3, 1, 2)
    dense = [(1, 0.80), (2, 0.78), (3, 0.70)]
    lexical_ = [(3, 20.0), (2, 5.0), (1, 4.0)]
    assert FusionParams().w_lexical == 4.0
    assert [r for r, _ in fuse(dense, lexical_, FusionParams())] == [3, 2, 1]
    assert [r for r, _ in fuse(dense, lexical_, FusionParams(w_lexical=2.0))] == [3, 1, 2]
