"""ICD-10-CM documents from simple-icd-10-cm 1.5.0: counts, determinism, passage content, filters."""

from __future__ import annotations

import collections
import hashlib

import pytest

pytest.importorskip("simple_icd_10_cm")

from medrwr_edge.errors import InputError  # noqa: E402
from medrwr_edge.kb_pack import icd10  # noqa: E402


@pytest.fixture(scope="module")
def all_docs():
    return list(icd10.icd10_documents())


def test_every_unique_code_once_and_counts_match_the_package(all_docs):
    import simple_icd_10_cm as icd

    names = icd.get_all_codes()
    assert len(names) == 98_505  # what the package counts, incl. 39 blocks named like their only category
    assert len(set(names)) == icd10.UNIQUE_CODE_COUNT == 98_466
    ids = [d.id for d in all_docs]
    assert len(ids) == len(set(ids)) == icd10.UNIQUE_CODE_COUNT
    kinds = collections.Counter(d.metadata["kind"] for d in all_docs)
    assert kinds == {"extension": 51_305, "subcategory": 44_963, "category": 1_918, "block": 258, "chapter": 22}


def test_tabular_order_and_chapter_ids(all_docs):
    assert all_docs[0].id == "Chapter 1"
    assert all_docs[1].id == "A00-A09"
    assert all_docs[2].id == "A00"
    assert [d.metadata["chapter"] for d in all_docs] == sorted(d.metadata["chapter"] for d in all_docs)


def test_deterministic():
    def digest():
        h = hashlib.sha256()
        for d in icd10.icd10_documents(chapters=[10, 18]):
            h.update(repr((d.id, d.text, d.title, d.source, sorted(d.metadata.items()))).encode())
        return h.hexdigest()

    assert digest() == digest()


def test_fracture_code_passage():
    doc = icd10.icd10_document("S42.422G")
    assert doc.id == "S42.422G"
    assert doc.title == ("Displaced comminuted supracondylar fracture without intercondylar fracture of left "
                         "humerus, subsequent encounter for fracture with delayed healing")
    assert doc.text.startswith(f"ICD-10-CM S42.422G: {doc.title}")
    assert "Category S42: Fracture of shoulder and upper arm" in doc.text
    assert "Block S40-S49: Injuries to the shoulder and upper arm" in doc.text
    assert "Chapter 19: Injury, poisoning and certain other consequences of external causes" in doc.text
    # excludes written on S42 apply to every code below it
    assert "Excludes1 (from S42): traumatic amputation of shoulder and upper arm (S48.-)" in doc.text
    assert doc.source == "ICD-10-CM (simple-icd-10-cm 1.5.0)"
    assert doc.metadata == {"code": "S42.422G", "kind": "extension", "chapter": 19, "block": "S40-S49",
                            "is_leaf": True}


def test_hypertension_passage_has_includes_and_both_excludes():
    doc = icd10.icd10_document("I10")
    assert doc.title == "Essential (primary) hypertension"
    assert "Includes: high blood pressure" in doc.text
    assert "Excludes1 (never coded together with this code): hypertensive disease complicating pregnancy" in doc.text
    assert "Excludes2 (not part of this code; may be coded together): essential (primary) hypertension " \
           "involving vessels of brain (I60-I69)" in doc.text
    assert doc.metadata["is_leaf"] is True


def test_diabetes_passage_has_use_additional_code():
    doc = icd10.icd10_document("e119")  # lower case, no dot: normalised
    assert doc.id == "E11.9"
    assert "Type 2 diabetes mellitus without complications" in doc.text
    assert "type 2 diabetes mellitus, without complications in remission (E11.A)" in doc.text
    assert "Use additional code (from E11):" in doc.text and "insulin (Z79.4)" in doc.text


def test_non_leaf_lists_subdivisions_and_seventh_characters():
    doc = icd10.icd10_document("S42.422")
    assert doc.metadata["is_leaf"] is False
    assert "S42.422G ... subsequent encounter for fracture with delayed healing" in doc.text
    assert "7th characters: A initial encounter for closed fracture" in doc.text


def test_single_category_block_is_folded_into_its_category():
    doc = icd10.icd10_document("B99")
    assert doc.metadata["kind"] == "category"
    assert "Block B99: Other infectious diseases" in doc.text


def test_filters():
    docs = list(icd10.icd10_documents(chapters=["10"]))
    assert docs and {d.metadata["chapter"] for d in docs} == {10}
    assert docs[0].id == "Chapter 10"
    picked = list(icd10.icd10_documents(codes=["S42422G", "i10", "Chapter 2", "S40-S49"]))
    assert [d.id for d in picked] == ["Chapter 2", "I10", "S40-S49", "S42.422G"]  # tabular order
    assert len(list(icd10.icd10_documents(limit=7))) == 7
    no_ext = list(icd10.icd10_documents(chapters=[19], include_extensions=False, limit=3000))
    assert no_ext and all(d.metadata["kind"] != "extension" for d in no_ext)


@pytest.mark.parametrize("kwargs, message", [
    ({"chapters": [23]}, "chapter must be a number 1-22"),
    ({"chapters": ["x"]}, "chapter must be a number 1-22"),
    ({"codes": ["Q99.999X"]}, "unknown ICD-10-CM code"),
    ({"limit": -1}, "limit must be >= 0"),
])
def test_bad_filters_raise_one_line_input_errors(kwargs, message):
    with pytest.raises(InputError, match=message) as info:
        list(icd10.icd10_documents(**kwargs))
    assert "\n" not in str(info.value)


def test_default_pack_subset():
    docs = list(icd10.default_pack_documents())
    assert len(docs) == 15_024  # documented in DEFAULT_PACK_CHAPTERS; ~1-1.5 min to embed on 2 cores
    assert {d.metadata["chapter"] for d in docs} == set(icd10.DEFAULT_PACK_CHAPTERS)
    assert all(d.metadata["kind"] != "extension" for d in docs)
    injuries = [d for d in docs if d.metadata["chapter"] == 19 and d.metadata["kind"] not in ("chapter", "block")]
    assert {d.id[:3] for d in injuries} == set(icd10.DEFAULT_PACK_CHAPTER19_CATEGORIES)
    ids = {d.id for d in docs}
    assert {"S42.422", "I63.9", "J18.9", "C34.90", "R91.8", "M81.0"} <= ids


def test_embedding_text_is_the_passage_head_plus_inclusion_terms():
    doc = icd10.icd10_document("R91.8")
    head = icd10.embedding_text(doc.text)
    assert head.splitlines()[0] == "ICD-10-CM R91.8: Other nonspecific abnormal finding of lung field"
    assert "Inclusion terms: Lung mass NOS found on diagnostic imaging of lung" in head
    assert "Chapter 18" not in head and len(head) < len(doc.text)
    fracture = icd10.icd10_document("S42.422G")
    assert "Excludes" not in icd10.embedding_text(fracture.text)
