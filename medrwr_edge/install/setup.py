"""The one-time install step on a connected machine (`medrwr-edge setup`): models, encoders, default packs.

After it, everything runs offline. It is idempotent: what is installed and verifies is kept.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from ..kb_pack.opening import DEFAULT_IMAGE_PACK, DEFAULT_TEXT_PACK
from ..paths import packs_dir

FULL_TEXT_PACK = "icd10cm-full"
PACK_VERSION = "2026.11.1"


def setup(smoke: bool = False, full_icd: bool = False, rebuild: bool = False, progress: bool = True) -> dict:
    """Install models (default LLM or, with smoke, SmolLM2-135M) and both encoders, then build the default packs."""
    from .. import assets

    wanted = assets.SMOKE_SET if smoke else assets.DEFAULT_SET
    assets.install(wanted, progress=progress)
    built = {}
    built[DEFAULT_TEXT_PACK] = _ensure_text_pack(DEFAULT_TEXT_PACK, full=False, rebuild=rebuild, progress=progress)
    if full_icd:
        built[FULL_TEXT_PACK] = _ensure_text_pack(FULL_TEXT_PACK, full=True, rebuild=rebuild, progress=progress)
    built[DEFAULT_IMAGE_PACK] = _ensure_image_pack(rebuild=rebuild, progress=progress)
    return built


def _usable(path: Path) -> bool:
    from ..errors import MedrwrError
    from ..kb_pack.pack import Pack

    if not path.exists():
        return False
    try:
        with Pack.open(path) as pack:
            return not pack.verify()
    except MedrwrError:
        return False


def _ensure_text_pack(name: str, full: bool, rebuild: bool, progress: bool) -> str:
    from .. import assets
    from ..kb_pack import icd10
    from ..kb_pack.build import build_text_pack
    from ..kb_pack.encoders import load_encoder

    out = packs_dir() / name
    if not rebuild and _usable(out):
        return f"{out} (kept)"
    encoder = load_encoder(assets.default_text_encoder_dir())
    docs = icd10.icd10_documents() if full else icd10.default_pack_documents()
    what = "all of ICD-10-CM" if full else (
        "ICD-10-CM chapters " + ", ".join(str(c) for c in icd10.DEFAULT_PACK_CHAPTERS if c != 19)
        + " and chapter 19 categories " + ", ".join(sorted(icd10.DEFAULT_PACK_CHAPTER19_CATEGORIES))
        + " (no 7th-character variants)"
    )
    build_text_pack(
        docs, out, encoder, name=name, version=PACK_VERSION, source_description=f"{what} (simple-icd-10-cm 1.5.0)",
        overwrite=True, progress=progress,
    )
    return f"{out} (built)"


def _ensure_image_pack(rebuild: bool, progress: bool) -> str:
    import tempfile

    from .. import assets
    from ..kb_pack.build import build_image_pack
    from ..kb_pack.encoders import load_encoder
    from ..kb_pack.reference_images import default_reference_documents

    out = packs_dir() / DEFAULT_IMAGE_PACK
    if not rebuild and _usable(out):
        return f"{out} (kept)"
    encoder = load_encoder(assets.default_image_encoder_dir())
    work = Path(tempfile.mkdtemp(prefix="medrwr-refimages-"))
    try:
        docs = default_reference_documents(work)
        build_image_pack(
            docs, out, encoder, name=DEFAULT_IMAGE_PACK, version=PACK_VERSION,
            source_description="pydicom test DICOMs, Debian invesalius-examples head CT, scikit-image retina",
            overwrite=True, progress=progress,
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return f"{out} (built)"
