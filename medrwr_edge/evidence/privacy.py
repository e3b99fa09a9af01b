"""What an answer keeps of its patient when it leaves the process: the answer log, a saved chat, a replay comparison.

The log stores the question, the answer, the reasoning and the hashes of the input images. It never stores pixels
or patient identifiers: image entries keep the sha256, size, format and an allow-list of technical DICOM facts; a
DICOM study date is cut to its year, in the image entries and in every text (prompt labels, reasoning) (HIPAA Safe
Harbor treats full dates as identifiers).
"""

from __future__ import annotations

from typing import Union

from .record import EvidenceRecord, as_dict

# Image meta keys that may be logged (technical, non-identifying). Everything else is dropped.
LOGGED_IMAGE_META = ("modality", "body_part", "view_position", "laterality", "photometric_interpretation",
                     "window", "inverted")


def scrub_study_dates(data: dict) -> dict:
    """`data` with each input image's full study date cut to its year in every text the model saw or wrote.

    With priors the prompt labels each study with its date ("Prior study (2023-04-01):") and the reasoning may echo
    it; the record keeps those (the model needs the interval), the log keeps only the year. Replay of a logged
    answer applies the same cut to the new run before comparing. Timestamps of the run itself are left alone."""
    from ..imaging import study_date_iso

    dates = set()
    for im in data.get("images") or []:
        date = im.get("study_date") or study_date_iso(im.get("meta") or {})
        if date:
            dates.update({date, date.replace("-", "")})  # ISO as labelled, and DICOM's YYYYMMDD if echoed
    if not dates:
        return data

    def cut(value):
        if isinstance(value, str):
            for date in sorted(dates, key=len, reverse=True):
                value = value.replace(date, date[:4])
            return value
        if isinstance(value, list):
            return [cut(v) for v in value]
        if isinstance(value, dict):
            return {k: cut(v) for k, v in value.items()}
        return value

    return {k: (v if k in ("images", "created", "timings", "settings", "model", "packs") else cut(v))
            for k, v in data.items()}


def scrub_record(record: Union[EvidenceRecord, dict]) -> dict:
    """The record as logged: image entries reduced to hashes, size, format and technical meta; study dates cut to
    the year everywhere."""
    data = scrub_study_dates(as_dict(record))
    images = []
    for im in data.get("images") or []:
        meta = im.get("meta") or {}
        kept = {k: meta[k] for k in LOGGED_IMAGE_META if k in meta}
        date = str(meta.get("study_date") or "")
        if len(date) >= 4 and date[:4].isdigit():
            kept["study_year"] = date[:4]
        images.append({k: im.get(k) for k in ("sha256", "role", "format", "width", "height")} | {"meta": kept})
    data["images"] = images
    return data
