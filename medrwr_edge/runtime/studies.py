"""Several input images for one question: a current study and its priors, in time order, checked together.

`ask IMAGE --prior OLD [--prior OLDER ...]` (API: `ask([prior, ..., current], ...)`): the LAST image is the current
study, the others are priors. Priors are put oldest first:

- when every prior has a DICOM StudyDate, they are sorted by it (stable; the record notes a reordering);
- otherwise they stay in the order given, which must then be oldest first (a date we cannot read is not guessed).

Dates come only from the allow-listed StudyDate (imaging.DICOM_META_ALLOWLIST); names and IDs are never read.

Different sizes are normal (a prior from another scanner or an older protocol): each image is resized and
embedded on its own. Different modalities are refused unless asked for: a prior/current comparison of a CT with an
MR (or a greyscale film with a colour photograph) is almost always a wrong file, and the model would be asked to
describe "change" between studies that cannot be compared. `allow_mixed_modalities=True`
(`--allow-mixed-modalities`) accepts them and says so in the record's notes.

Not every multi-image question is about studies over time: MMMU's "<image 1>", "<image 2>" are independent
figures. `as_studies=False` (AskSettings.images_are_studies) gives every image the role "image", keeps the
order given, labels them "Image 1:", "Image 2:" and applies no modality rule.
"""

from __future__ import annotations

import os
from typing import Optional, Sequence, Union

from ..errors import InputError
from .backend import ImageInput

PathLike = Union[str, os.PathLike]


def prepare_studies(paths: Sequence[PathLike], allow_mixed_modalities: bool = False, as_studies: bool = True,
                    frame: Optional[int] = None):
    """Load the images (last = current) -> (ImageInputs in prompt order, record entries, notes).

    frame: which frame of a multi-frame current image (e.g. one slice of a CT series); None = its middle frame.
    Priors always use their middle frame."""
    from ..imaging import image_modality, load_image, study_date_iso

    loaded = [load_image(p, frame=frame if i == len(paths) - 1 else None) for i, p in enumerate(paths)]
    if not loaded:
        return [], [], []
    if not as_studies and len(loaded) > 1:
        return _entries(loaded, ["image"] * len(loaded)) + ([],)
    notes: list[str] = []
    priors, current = loaded[:-1], loaded[-1]
    dates = [study_date_iso(im.meta) for im in priors]
    order = list(range(len(priors)))
    if len(priors) > 1 and all(dates):
        order = sorted(order, key=lambda i: dates[i])  # stable: equal dates keep the order given
        if order != list(range(len(priors))):
            notes.append(f"the {len(priors)} prior studies were put in StudyDate order, oldest first")
    ordered = [priors[i] for i in order] + [current]
    current_date = study_date_iso(current.meta)
    if current_date and any(d and d > current_date for d in dates):
        notes.append(f"a prior study is dated after the current study ({current_date}); check which file is current")

    kinds = [image_modality(im) for im in ordered]
    mixed = _mixed_modalities(kinds)
    if mixed:
        if not allow_mixed_modalities:
            raise InputError(
                f"images of different modalities given together ({mixed}); a prior must be the same kind of study "
                "as the current one ({allow_mixed_modalities} to compare them anyway)",
                names=("allow_mixed_modalities",),
            )
        notes.append(f"images of different modalities were compared ({mixed}; --allow-mixed-modalities)")

    roles = ["prior"] * (len(ordered) - 1) + ["current"]
    return _entries(ordered, roles) + (notes,)


def _entries(ordered, roles):
    from ..imaging import study_date_iso

    images, records = [], []
    for index, (im, role) in enumerate(zip(ordered, roles)):
        date = study_date_iso(im.meta)
        images.append(ImageInput(im.pixels, im.sha256, role, date))
        records.append({
            "sha256": im.sha256,
            "role": role,
            "index": index,  # position in the prompt (priors oldest first, the current study last)
            "study_date": date,
            "format": im.format,
            "width": im.width,
            "height": im.height,
            "meta": dict(im.meta),  # imaging keeps an allow-list of non-identifying tags only
        })
    return images, records


def _mixed_modalities(kinds: list[tuple]) -> str:
    """'' when the images can be compared; else a short description of the mismatch.

    Two DICOM modalities that are both known decide (a colour Doppler US and a greyscale US are the same
    modality); otherwise greyscale vs colour is the only evidence there is."""
    known = {m for m, _ in kinds if m}
    if len(known) > 1:
        return " vs ".join(sorted(known))
    if len(known) == 1 and all(m for m, _ in kinds):
        return ""
    colours = {c for _, c in kinds}
    if len(colours) > 1:
        return "greyscale vs colour images"
    return ""
