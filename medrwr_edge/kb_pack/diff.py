"""What changed between two versions of a pack: documents added, removed, or changed (by id and content sha256)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from .pack import Pack


@dataclass
class PackDiff:
    added: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)
    unchanged: int = 0
    encoder_changed: bool = False  # different encoder lock: every vector differs even if no text did
    old: dict = field(default_factory=dict)  # {"name", "version", "doc_count"}
    new: dict = field(default_factory=dict)

    @property
    def identical(self) -> bool:
        return not (self.added or self.removed or self.changed or self.encoder_changed)

    def to_dict(self) -> dict:
        return {
            "schema": "medrwr-edge/pack-diff/1",
            "old": self.old,
            "new": self.new,
            "encoder_changed": self.encoder_changed,
            "added": self.added,
            "removed": self.removed,
            "changed": self.changed,
            "unchanged": self.unchanged,
        }


def _summary(pack: Pack) -> dict:
    return {"name": pack.name, "version": pack.version, "doc_count": pack.doc_count, "path": str(pack.path)}


def diff_packs(old: Pack | str | os.PathLike, new: Pack | str | os.PathLike) -> PackDiff:
    """Compare two packs document by document. Ids are listed sorted; `changed` = same id, other content."""
    old_pack = old if isinstance(old, Pack) else Pack.open(old)
    new_pack = new if isinstance(new, Pack) else Pack.open(new)
    try:
        a, b = old_pack.document_hashes(), new_pack.document_hashes()
        common = a.keys() & b.keys()
        changed = sorted(i for i in common if a[i] != b[i])
        return PackDiff(
            added=sorted(b.keys() - a.keys()),
            removed=sorted(a.keys() - b.keys()),
            changed=changed,
            unchanged=len(common) - len(changed),
            encoder_changed=old_pack.encoder_sha256 != new_pack.encoder_sha256,
            old=_summary(old_pack),
            new=_summary(new_pack),
        )
    finally:
        if old_pack is not old:
            old_pack.close()
        if new_pack is not new:
            new_pack.close()
