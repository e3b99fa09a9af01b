"""The built-in ICD-10-CM benchmark: deterministic, valid, unambiguous, and identical to the committed manifest."""

from __future__ import annotations

import json
from collections import Counter

import pytest

pytest.importorskip("simple_icd_10_cm")

import simple_icd_10_cm as icd  # noqa: E402

from medrwr_edge.errors import IntegrityError  # noqa: E402
from medrwr_edge.eval import icd10_mcq as gen  # noqa: E402
from medrwr_edge.eval.datasets import item_set_sha256  # noqa: E402


@pytest.fixture(scope="module")
def builtin():
    return gen.builtin_items()  # regenerates the set and verifies it against the committed manifest


def test_builtin_set_matches_the_committed_manifest(builtin):
    manifest = gen.committed_manifest()
    assert manifest["schema"] == gen.MANIFEST_SCHEMA and manifest["count"] == len(builtin) == 300
    assert [[i.id, i.content_sha256()] for i in builtin] == manifest["items"]
    assert item_set_sha256(builtin) == manifest["set_sha256"]


def test_a_changed_item_is_caught_by_the_manifest(builtin):
    manifest = json.loads(json.dumps(gen.committed_manifest()))
    manifest["items"][5][1] = "0" * 64
    with pytest.raises(IntegrityError, match=builtin[5].id):
        gen.verify_against_manifest(builtin, manifest)
    manifest["items"] = manifest["items"][:-1]
    with pytest.raises(IntegrityError, match="different items"):
        gen.verify_against_manifest(builtin, manifest)


def test_generation_is_deterministic_and_seed_dependent():
    a = gen.generate_icd10_mcq(30, seed=3, chapters=[10])
    b = gen.generate_icd10_mcq(30, seed=3, chapters=[10])
    c = gen.generate_icd10_mcq(30, seed=4, chapters=[10])
    assert [i.to_json() for i in a] == [i.to_json() for i in b]
    assert [i.id for i in a] != [i.id for i in c]


def test_items_are_valid_and_unambiguous(builtin):
    assert len({i.id for i in builtin}) == len(builtin)
    assert Counter(i.meta["kind"] for i in builtin) == {k: 100 for k in gen.KINDS}
    # the gold letter is spread over A-D (no position bias a model could exploit)
    assert all(n > 45 for n in Counter(i.answer for i in builtin).values())
    for item in builtin:
        assert gen.check_unambiguous(item) == [], item.id
        assert len(item.options) == 4 and [o[0] for o in item.options] == list("ABCD")
        kind, code = item.meta["kind"], item.meta["code"]
        gold_text = item.options[ord(item.answer) - 65][3:]
        if kind == "code-to-description":
            assert gold_text == icd.get_description(code) and code in item.question
            # hard distractors: real codes of the same block
            for o in item.options:
                assert o[3:] != icd.get_description(code) or o[0] == item.answer
        elif kind == "description-to-code":
            assert gold_text == code and icd.get_description(code) in item.question
            for o in item.options:
                assert icd.is_valid_item(o[3:]) and icd.get_ancestors(o[3:])[-2] == item.meta["block"]
        else:
            excluded = " ".join(icd.get_excludes1(code)).casefold()
            assert gold_text.casefold() in excluded
            inside = {icd.get_description(d) for d in icd.get_descendants(code)}
            for o in item.options:
                if o[0] != item.answer:
                    assert o[3:] in inside  # the distractors ARE coded in the category
            assert "(" not in gold_text  # its code reference (a give-away) was stripped


def test_items_come_from_the_default_pack_chapters(builtin):
    from medrwr_edge.kb_pack.icd10 import DEFAULT_PACK_CHAPTERS

    for item in builtin:
        assert int(icd.get_ancestors(item.meta["code"])[-1]) in DEFAULT_PACK_CHAPTERS
