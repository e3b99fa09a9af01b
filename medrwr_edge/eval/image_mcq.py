"""A small image MCQ set ("which modality / body region is shown?") that exercises the image path and CDIR.

Query images come from the same installed sources as the default reference image pack
(`kb_pack.reference_images`), but are, where possible, NOT the pack's images:

* held out: InVesalius head-CT slices at levels the pack does not hold (when `invesalius-examples` is installed),
  and pydicom's MR_small (a brain MR crop; modality question only: its anatomy is too small to name honestly);
* near duplicates (marked `meta.held_out = false`): the pack's bone scan mirrored left-right,
  and crops of the pack's fundus photograph and micrograph. CDIR will find their source image; scores on these
  measure the pipeline, not generalisation.

Each image gives one modality question and, when the region is known, one body-region question, four options
each (gold + three others in a seeded order). Images are rendered to PNG under `workdir`; deterministic.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Optional

import numpy as np
from PIL import Image

from ..kb_pack import reference_images as ref
from .datasets import EvalItem

SEED = 11
MODALITIES = ["CT", "MR", "Nuclear medicine bone scintigraphy", "Colour fundus photography",
              "Histopathology light micrograph", "Plain radiograph", "Ultrasound"]
REGIONS = ["Head", "Chest", "Abdomen", "Whole body", "Eye (retina)", "Colon", "Knee"]
MODALITY_QUESTION = "Which imaging modality produced this image?"
REGION_QUESTION = "Which body region is shown in this image?"

# (slice index, window name, window) at levels between the reference pack's slices (22, 32, 42, 50, ...)
_HELD_OUT_SLICES = [(27, "brain", ref.BRAIN_WINDOW), (37, "brain", ref.BRAIN_WINDOW), (46, "brain", ref.BRAIN_WINDOW),
                    (54, "brain", ref.BRAIN_WINDOW), (62, "brain", ref.BRAIN_WINDOW), (71, "brain", ref.BRAIN_WINDOW),
                    (82, "brain", ref.BRAIN_WINDOW), (27, "bone", ref.BONE_WINDOW), (37, "bone", ref.BONE_WINDOW)]


def _save(workdir: Path, name: str, pixels) -> str:
    path = workdir / f"{name}.png"
    ref.atomic_write_bytes(path, ref.png_bytes(pixels))
    return str(path)


def _sources(workdir: Path) -> list[tuple[str, str, Optional[str], bool]]:
    """(image path, modality, region or None, held out) for every available query image."""
    out = []
    volume = ref.invesalius_head_ct()
    if volume is not None:
        for index, window_name, window in _HELD_OUT_SLICES:
            path = _save(workdir, f"img-ct-head-s{index:03d}-{window_name}", ref._window(volume[index], *window))
            out.append((path, "CT", "Head", True))
    mr = ref.pydicom_test_file("MR_small.dcm")
    if mr is not None:
        out.append((_save(workdir, "img-mr-small", ref._render_percentile(mr)), "MR", None, True))
    nm = ref.pydicom_test_file("JPEG2000.dcm")
    if nm is not None:
        try:
            mirrored = np.ascontiguousarray(ref._render_percentile(nm)[:, ::-1])
            out.append((_save(workdir, "img-nm-bone-scan-mirrored", mirrored),
                        "Nuclear medicine bone scintigraphy", "Whole body", False))
        except Exception:  # no JPEG 2000 decoder: skip, as the pack builder does
            pass
    for name, stem, modality, region, box in (
        ("retina.jpg", "img-fundus-crop", "Colour fundus photography", "Eye (retina)", (0.15, 0.15, 0.85, 0.85)),
        ("ihc.png", "img-ihc-crop", "Histopathology light micrograph", "Colon", (0.0, 0.0, 0.6, 0.6)),
    ):
        src = ref.skimage_data_file(name)
        if src is None:
            continue
        with Image.open(src) as im:
            im = im.convert("RGB")
            w, h = im.size
            crop = im.crop((int(box[0] * w), int(box[1] * h), int(box[2] * w), int(box[3] * h)))
            out.append((_save(workdir, stem, np.asarray(crop)), modality, region, False))
    return out


def _item(item_id: str, question: str, gold: str, pool: list[str], image: str, held_out: bool,
          rng: random.Random) -> EvalItem:
    others = [p for p in pool if p != gold]
    rng.shuffle(others)
    texts = others[:3]
    at = rng.randrange(4)
    texts.insert(at, gold)
    options = [f"{chr(65 + i)}. {t}" for i, t in enumerate(texts)]
    return EvalItem(item_id, question, options, chr(65 + at), [gold], [image],
                    meta={"kind": "image", "held_out": held_out})


def image_mcq_items(workdir: str | Path) -> list[EvalItem]:
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    rng = random.Random(SEED)
    items = []
    for path, modality, region, held_out in _sources(workdir):
        stem = Path(path).stem
        items.append(_item(f"{stem}-modality", MODALITY_QUESTION, modality, MODALITIES, path, held_out, rng))
        if region is not None:
            items.append(_item(f"{stem}-region", REGION_QUESTION, region, REGIONS, path, held_out, rng))
    return items
