"""The packs a question searches, opened together: the knowledge packs, the CDIR reference images, their records.

`Session` (runtime/api.py) opens them once per model load; every pack is closed again if any one fails to open.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import InputError, MedrwrError

DEFAULT_TEXT_PACK = "icd10cm-core"  # built by `medrwr-edge setup`
DEFAULT_IMAGE_PACK = "reference-images"


def open_packs(packs, image_pack, *, retrieval: bool, cdir: bool):
    """(text packs, image pack or None, their evidence records).

    packs: names or paths; None: the default knowledge pack (none without retrieval). image_pack: a name or path;
    None: the default reference images when installed; False: none. No image pack without CDIR."""
    from .pack import Pack, resolve_pack_path

    opened, records = [], []
    use_default_text = packs is None
    if use_default_text:
        packs = [DEFAULT_TEXT_PACK] if retrieval else []
    text_packs = []
    try:
        for p in packs:
            path = resolve_pack_path(p)
            if use_default_text and not path.exists():
                raise MedrwrError(
                    f"the default knowledge pack '{DEFAULT_TEXT_PACK}' is not installed; run `medrwr-edge setup` "
                    "or give {packs} PATH (or ask without retrieval)", names=("packs",)
                )
            pack = Pack.open(path)
            opened.append(pack)
            if pack.kind != "text":
                raise InputError(f"{{packs}} {p}: {pack.name} is an image pack; give it with {{image_pack}}",
                                 names=("packs", "image_pack"))
            text_packs.append(pack)
            records.append(pack_record(pack, "knowledge"))
        image_pack_obj = None
        if cdir and image_pack is not False:  # False: no image pack, not even the default
            if image_pack is None:
                default = resolve_pack_path(DEFAULT_IMAGE_PACK)
                image_pack = default if default.exists() else None
            if image_pack is not None:
                image_pack_obj = Pack.open(resolve_pack_path(image_pack))
                opened.append(image_pack_obj)
                if image_pack_obj.kind != "image":
                    raise InputError(f"{{image_pack}} {image_pack}: {image_pack_obj.name} is not an image pack",
                                     names=("image_pack",))
                records.append(pack_record(image_pack_obj, "cdir-reference-images"))
    except BaseException:
        for pack in opened:
            pack.close()
        raise
    return text_packs, image_pack_obj, records


def pack_record(pack, role: str) -> dict:
    """The evidence record's entry for an open pack: which pack, built how, used as what."""
    return {
        "name": pack.name,
        "version": pack.version,
        "kind": pack.kind,
        "role": role,
        "doc_count": pack.doc_count,
        "encoder_sha256": pack.encoder_sha256,
        "manifest_sha256": pack.manifest.get("manifest_sha256", ""),
        "path": str(Path(pack.path).resolve()),
    }
