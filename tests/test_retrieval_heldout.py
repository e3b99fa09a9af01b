"""The held-out TEST split of the ICD-10-CM retrieval benchmark: deterministic and pinned by its manifest,
disjoint from the TUNE split in gold codes and wording, and unambiguous -- each check recomputed here from the
ICD-10-CM data rather than trusted from the generator."""

from __future__ import annotations

import collections
import random
import re

import pytest

pytest.importorskip("simple_icd_10_cm")

from medrwr_edge.bench_data import icd10_heldout as heldout  # noqa: E402
from medrwr_edge.bench_data import icd10_retrieval as tune  # noqa: E402
from medrwr_edge.errors import IntegrityError  # noqa: E402
from medrwr_edge.kb_pack.icd10 import _icd  # noqa: E402


@pytest.fixture(scope="module")
def corpus():
    return tune.quick_corpus_codes()


@pytest.fixture(scope="module")
def tune_items():
    return tune.committed_items()


@pytest.fixture(scope="module")
def items(corpus, tune_items):
    return heldout.generate_test_items(heldout.DEFAULT_COUNT, heldout.DEFAULT_SEED, corpus,
                                       exclude=[i.gold_id for i in tune_items])


def test_deterministic_and_pinned_by_its_manifest(corpus, items, tune_items):
    manifest = tune.committed_manifest(heldout.MANIFEST_NAME)
    assert (manifest["seed"], manifest["count"], manifest["split"]) == (heldout.DEFAULT_SEED, 600, "test")
    assert manifest["disjoint_from"] == tune.committed_manifest()["set_sha256"]
    assert [[i.kind, i.gold_id, i.item_hash()] for i in items] == manifest["items"]
    assert [i.item_hash() for i in heldout.committed_test_items()] == [row[2] for row in manifest["items"]]
    assert collections.Counter(i.kind for i in items) == {kind: 100 for kind in tune.KINDS}
    other = heldout.generate_test_items(60, heldout.DEFAULT_SEED + 1, corpus, exclude=[i.gold_id for i in tune_items])
    assert not {i.item_hash() for i in other} <= {i.item_hash() for i in items}


def test_a_changed_test_split_is_refused(monkeypatch):
    real = tune.committed_manifest
    def changed(name=tune.MANIFEST_NAME):
        m = real(name)
        return {**m, "set_sha256": "0" * 64} if name == heldout.MANIFEST_NAME else m
    monkeypatch.setattr(tune, "committed_manifest", changed)
    with pytest.raises(IntegrityError, match="differ from the committed manifest"):
        heldout.committed_test_items()


def test_disjoint_from_the_tune_split(items, tune_items):
    assert not {i.gold_id for i in items} & {i.gold_id for i in tune_items}
    assert not {i.question.casefold() for i in items} & {i.question.casefold() for i in tune_items}
    # No tune-split template wording: no phrase (two words or more) of a tune template is in a test question.
    fixed = {part.strip(" ?:'\"").casefold() for templates in tune._TEMPLATES.values() for t in templates
             for part in re.split(r"\{[a-z_]+\}", t) if len(part.split()) >= 2}
    for item in items:
        assert not [p for p in fixed if p in item.question.casefold()], item


def _text_of(item) -> str:
    """The rewritten text inside the item's template."""
    for template in sorted(heldout._TEMPLATES[item.kind], key=len, reverse=True):  # "{text}" last
        pattern = "^" + re.escape(template).replace(re.escape("{text}"), "(?P<text>.+)") + "$"
        m = re.match(pattern, item.question)
        if m:
            return m.group("text")
    raise AssertionError(f"no template matches {item}")


def test_items_are_unambiguous(corpus, items):
    icd = _icd()
    codes = [c for c in corpus if "-" not in c and not c.startswith("Chapter")]
    description = {c: icd.get_description(c) for c in codes}
    terms = {c: icd.get_inclusion_term(c) for c in codes}
    owners = collections.defaultdict(set)  # content words -> codes with such a description or inclusion term
    for c in codes:
        for text in [description[c]] + terms[c]:
            owners[heldout.content_key(text)].add(c)
    abbreviated = collections.Counter(tune._norm(heldout.abbreviate(description[c]) or description[c]) for c in codes)
    words = [tune._words(description[c]) for c in codes]
    for item in items:
        assert item.gold_id in description, item
        mentions_gold = any(f in item.question.casefold() for f in (item.gold_id.casefold(),
                                                                    item.gold_id.replace(".", "").casefold()))
        if item.kind in ("code", "excludes"):
            assert mentions_gold, item
            continue
        text = _text_of(item)
        assert not tune._CODE_SHAPE.search(text), item  # nothing that names a code
        key = heldout.content_key(text)
        if item.kind == "description":
            assert key == heldout.content_key(description[item.gold_id]), item
            assert owners[key] == {item.gold_id}, item
            assert tune._norm(text) != tune._norm(description[item.gold_id]), item  # reworded
        elif item.kind == "inclusion":
            assert any(key == heldout.content_key(t) for t in terms[item.gold_id]), item
            assert owners[key] == {item.gold_id}, item
            assert all(tune._norm(text) != tune._norm(t) for t in terms[item.gold_id]), item  # paraphrased
        elif item.kind == "abbreviated":
            assert tune._norm(text) == tune._norm(heldout.abbreviate(description[item.gold_id])), item
            assert abbreviated[tune._norm(text)] == 1, item
        elif item.kind == "partial":
            assert sum(1 for ws in words if tune._words(text) <= ws) == 1, item
            assert tune._words(description[item.gold_id]) >= tune._words(text), item


def test_rewrites():
    rng = random.Random(0)
    assert heldout.paraphrase_term("Shadow, lung", rng) == "lung shadow"
    assert heldout.paraphrase_term("Abscess of lung NOS", rng) == "lung abscess"
    assert heldout.paraphrase_term("Tracheitis, chronic, with laryngitis", rng) == "chronic tracheitis with laryngitis"
    assert heldout.paraphrase_term("Tracheitis (acute) NOS", random.Random(1)) in ("tracheitis", "tracheitis acute")
    assert heldout.singular("fractures") == "fracture" and heldout.singular("injuries") == "injury"
    assert heldout.singular("pubis") == "pubis" and heldout.singular("loss") == "loss"
    assert heldout.abbreviate("Displaced fracture of left clavicle, initial encounter") == "disp fx of L clavicle initial enc"
    assert heldout.abbreviate("Acute bronchiolitis") is None  # nothing to abbreviate: not an abbreviated question
    for seed in range(20):
        lay = heldout.lay_description("Multiple fractures of ribs, left side", random.Random(seed))
        assert lay and heldout.content_key(lay) == heldout.content_key("multiple fracture of rib, left side")
