"""The built-in benchmark: multiple-choice questions generated from ICD-10-CM (`simple-icd-10-cm==1.5.0`).

Three kinds of item, each with four options and hard distractors taken from the same category or block:

* `code-to-description`: "In ICD-10-CM, which condition does code J93.0 denote?" -> descriptions of J93.0 and
  its siblings (same parent code first, then the same category, then other categories of the same block);
* `description-to-code`: "Which ICD-10-CM code is 'Spontaneous tension pneumothorax'?" -> J93.0 and sibling codes;
* `excludes1`: "Which condition is NOT coded under category J93 ...?" -> one term from J93's Excludes1 note
  (its code reference stripped, which would give it away) against descriptions of three codes inside J93.

Unambiguous by construction, and checked: option texts are distinct after normalisation, no distractor has
the gold description, and for `excludes1` no distractor appears in the category's Excludes1/Excludes2 notes.
Deterministic: codes come in tabular-list order and one `random.Random(seed)` drives every choice, so the
same seed and ICD-10-CM release give byte-identical items. `data/icd10_mcq_manifest.json` records every item's
hash; `builtin_items()` refuses to run a set that does not match it (results would not be comparable).

Codes are drawn from the chapters of the default ICD-10-CM knowledge pack (`kb_pack.icd10.DEFAULT_PACK_*`), so
every item's answer is in that pack: retrieval can help, which is what the benchmark measures.
"""

from __future__ import annotations

import json
import random
import re
from importlib import resources
from typing import Iterable, Optional

from ..errors import InputError, IntegrityError
from ..kb_pack.icd10 import DEFAULT_PACK_CHAPTER19_CATEGORIES, DEFAULT_PACK_CHAPTERS, _icd
from .datasets import EvalItem, item_set_sha256

GENERATOR_VERSION = 1
DEFAULT_SEED = 20251125
DEFAULT_COUNT = 300
KINDS = ("code-to-description", "description-to-code", "excludes1")
MANIFEST_NAME = "icd10_mcq_manifest.json"
MANIFEST_SCHEMA = "medrwr-edge/icd10-mcq-manifest/1"
SOURCE = "simple-icd-10-cm==1.5.0"
N_OPTIONS = 4

_CODE_REF = re.compile(r"\s*\((?:[A-Z]\d[0-9A-Z](?:\.[0-9A-Z-]*)?(?:-[A-Z]\d[0-9A-Z](?:\.[0-9A-Z-]*)?)?"
                       r"(?:,\s*)?)+\)\s*$")


def _norm(text: str) -> str:
    return " ".join(re.sub(r"[^\w\s]", " ", text.casefold()).split())


class _Tree:
    """The slice of ICD-10-CM the benchmark draws from, in tabular-list order."""

    def __init__(self, chapters: Iterable[int]):
        icd = self.icd = _icd()
        wanted = set(chapters)
        self.codes: list[str] = []  # billable codes (leaves), no 7th-character extensions
        self.categories: list[str] = []
        for name in icd.get_all_codes(with_dots=True):
            if icd.is_chapter(name) or icd.is_extended_subcategory(name):
                continue
            if not (icd.is_category(name) or icd.is_subcategory(name)):
                continue
            chapter = int(icd.get_ancestors(name)[-1])
            if chapter not in wanted or (chapter == 19 and name[:3] not in DEFAULT_PACK_CHAPTER19_CATEGORIES):
                continue
            if icd.is_category(name) and name not in self.categories:
                self.categories.append(name)
            if icd.is_leaf(name) and name not in self.codes:
                self.codes.append(name)

    def description(self, code: str) -> str:
        return " ".join(self.icd.get_description(code).split())

    def block(self, code: str) -> str:
        return self.icd.get_ancestors(code)[-2]

    def descendants(self, code: str) -> list[str]:
        return [d for d in self.icd.get_descendants(code) if not self.icd.is_extended_subcategory(d)]

    def sibling_pool(self, code: str) -> list[str]:
        """Codes nearest first: same parent, then the same category, then the same block."""
        icd = self.icd
        parent = icd.get_parent(code)
        pool = [c for c in icd.get_children(parent) if c != code] if parent and "-" not in parent else []
        category = code[:3]
        pool += [c for c in self.descendants(category) if c != code and c not in pool]
        block = self.block(code)
        for cat in icd.get_children(block):
            if cat != category:
                pool += [c for c in [cat] + self.descendants(cat) if c not in pool]
        return [c for c in pool if not icd.is_extended_subcategory(c)]


def _pick_distinct(pool: list[str], gold_text: str, text_of, rng: random.Random, n: int,
                   banned: Iterable[str] = ()) -> Optional[list[str]]:
    """n entries of `pool` (nearest first, ties broken by rng) whose texts are distinct from each other, from
    the gold text and from `banned` (normalised)."""
    seen = {_norm(gold_text)} | {_norm(b) for b in banned}
    near, far = pool[: 2 * n], pool[2 * n :]
    rng.shuffle(near)  # hard distractors come from the closest codes, but not always the same ones
    chosen = []
    for entry in near + far:
        text = _norm(text_of(entry))
        if text and text not in seen:
            seen.add(text)
            chosen.append(entry)
            if len(chosen) == n:
                return chosen
    return None


def _options(gold: str, distractors: list[str], rng: random.Random) -> tuple[list[str], str]:
    texts = list(distractors)
    at = rng.randrange(len(texts) + 1)
    texts.insert(at, gold)
    return [f"{chr(65 + i)}. {t}" for i, t in enumerate(texts)], chr(65 + at)


def _code_to_description(tree: _Tree, code: str, rng: random.Random) -> Optional[EvalItem]:
    gold = tree.description(code)
    picked = _pick_distinct(tree.sibling_pool(code), gold, tree.description, rng, N_OPTIONS - 1)
    if picked is None:
        return None
    options, letter = _options(gold, [tree.description(c) for c in picked], rng)
    return EvalItem(f"icd10-c2d-{code}", f"In ICD-10-CM, which condition does code {code} denote?", options,
                    letter, [gold], meta={"kind": KINDS[0], "code": code, "block": tree.block(code)})


def _description_to_code(tree: _Tree, code: str, rng: random.Random) -> Optional[EvalItem]:
    gold = tree.description(code)
    # A distractor code must have a description different from the gold one, else two options are right.
    pool = [c for c in tree.sibling_pool(code) if _norm(tree.description(c)) != _norm(gold)]
    picked = _pick_distinct(pool, code, lambda c: c, rng, N_OPTIONS - 1)
    if picked is None:
        return None
    options, letter = _options(code, picked, rng)
    return EvalItem(f"icd10-d2c-{code}", f"Which ICD-10-CM code is \"{gold}\"?", options, letter, [code],
                    meta={"kind": KINDS[1], "code": code, "block": tree.block(code)})


def _excludes1(tree: _Tree, category: str, rng: random.Random) -> Optional[EvalItem]:
    icd = tree.icd
    terms = [_CODE_REF.sub("", t).strip() for t in icd.get_excludes1(category)]
    terms = [t for t in terms if len(t) > 3 and "(" not in t and ")" not in t]
    if not terms:
        return None
    gold = terms[rng.randrange(len(terms))]
    gold = gold[0].upper() + gold[1:]  # notes are lower case, descriptions capitalised: do not give it away
    # Everything the category's notes mention is off limits as a distractor (it would read as excluded).
    banned = [_CODE_REF.sub("", t) for t in icd.get_excludes1(category) + icd.get_excludes2(category)]
    inside = [c for c in tree.descendants(category) if "unspecified" not in tree.description(c).casefold()]
    picked = _pick_distinct(inside, gold, tree.description, rng, N_OPTIONS - 1, banned)
    if picked is None:
        return None
    options, letter = _options(gold, [tree.description(c) for c in picked], rng)
    title = tree.description(category)
    question = (f"ICD-10-CM category {category} ({title}) carries an Excludes1 note. Which of these conditions is "
                f"NOT coded under {category}?")
    return EvalItem(f"icd10-ex1-{category}", question, options, letter, [gold],
                    meta={"kind": KINDS[2], "code": category, "block": tree.block(category)})


def generate_icd10_mcq(count: int = DEFAULT_COUNT, seed: int = DEFAULT_SEED,
                       chapters: Iterable[int] = DEFAULT_PACK_CHAPTERS) -> list[EvalItem]:
    """`count` items, kinds in rotation (code->description, description->code, excludes1), deterministic."""
    if count < 1:
        raise InputError(f"count must be at least 1 (got {count})")
    tree = _Tree(chapters)
    rng = random.Random(seed)
    queues = {
        KINDS[0]: rng.sample(tree.codes, len(tree.codes)),
        KINDS[1]: rng.sample(tree.codes, len(tree.codes)),
        KINDS[2]: rng.sample(tree.categories, len(tree.categories)),
    }
    makers = {KINDS[0]: _code_to_description, KINDS[1]: _description_to_code, KINDS[2]: _excludes1}
    items: list[EvalItem] = []
    turn = 0
    while len(items) < count and any(queues.values()):
        kind = KINDS[turn % len(KINDS)]
        turn += 1
        while queues[kind]:
            item = makers[kind](tree, queues[kind].pop(), rng)
            if item is not None:
                items.append(item)
                break
    if len(items) < count:
        raise InputError(f"the chosen chapters yield only {len(items)} items (asked for {count})")
    return items


def check_unambiguous(item: EvalItem) -> list[str]:
    """Problems that would make an item have no or several right answers (empty list: fine)."""
    problems = []
    texts = [_norm(o[3:]) for o in item.options]
    if len(set(texts)) != len(texts):
        problems.append("two options have the same text")
    gold = _norm(item.gold[0])
    if texts.count(gold) != 1 or texts[ord(item.answer) - 65] != gold:
        problems.append("the gold text is not exactly one option, at the answer letter")
    if item.meta.get("kind") == KINDS[1]:
        icd = _icd()
        descriptions = [_norm(icd.get_description(o[3:])) for o in item.options]
        if descriptions.count(_norm(icd.get_description(item.gold[0]))) != 1:
            problems.append("two option codes share the gold description")
    return problems


# ------------------------------------------------------------------ manifest


def manifest_for(items: list[EvalItem], seed: int, chapters: Iterable[int]) -> dict:
    return {
        "schema": MANIFEST_SCHEMA,
        "generator_version": GENERATOR_VERSION,
        "source": SOURCE,
        "seed": seed,
        "count": len(items),
        "chapters": sorted(set(chapters)),
        "set_sha256": item_set_sha256(items),
        "items": [[item.id, item.content_sha256()] for item in items],
    }


def committed_manifest() -> dict:
    text = resources.files("medrwr_edge").joinpath("data", MANIFEST_NAME).read_text("utf-8")
    return json.loads(text)


def verify_against_manifest(items: list[EvalItem], manifest: dict) -> None:
    expected = {item_id: digest for item_id, digest in manifest["items"]}
    if [i.id for i in items] != [i for i, _ in manifest["items"]]:
        raise IntegrityError("the generated ICD-10-CM benchmark has different items from the committed manifest "
                             f"(is {SOURCE} installed?)")
    for item in items:
        if item.content_sha256() != expected[item.id]:
            raise IntegrityError(f"ICD-10-CM benchmark item {item.id} differs from the committed manifest "
                                 f"(is {SOURCE} installed?)")


def builtin_items(limit: Optional[int] = None) -> list[EvalItem]:
    """The committed built-in set (verified against the manifest), optionally its first `limit` items."""
    manifest = committed_manifest()
    items = generate_icd10_mcq(manifest["count"], manifest["seed"], manifest["chapters"])
    verify_against_manifest(items, manifest)
    return items[:limit] if limit else items


def write_manifest(path, count: int = DEFAULT_COUNT, seed: int = DEFAULT_SEED,
                   chapters: Iterable[int] = DEFAULT_PACK_CHAPTERS) -> dict:
    """Regenerate the manifest file (a deliberate act: after changing the generator, bump GENERATOR_VERSION).

    One item per line keeps the committed file's diffs readable."""
    from ..paths import atomic_write_text

    manifest = manifest_for(generate_icd10_mcq(count, seed, chapters), seed, chapters)
    head = json.dumps({k: v for k, v in manifest.items() if k != "items"}, indent=1)[:-2]
    rows = ",\n".join("  " + json.dumps(row) for row in manifest["items"])
    atomic_write_text(path, f'{head},\n "items": [\n{rows}\n ]\n}}\n')
    return manifest


if __name__ == "__main__":  # python -m medrwr_edge.eval.icd10_mcq medrwr_edge/data/icd10_mcq_manifest.json
    import sys

    print(write_manifest(sys.argv[1])["set_sha256"])
