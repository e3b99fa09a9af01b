"""The default CDIR reference images: real PNGs, deterministic bytes, and captions free of identifiers."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pydicom = pytest.importorskip("pydicom")

from medrwr_edge.kb_pack import reference_images as ri  # noqa: E402

REPO = Path(__file__).resolve().parents[1]

# DICOM attributes that identify a patient, a visit, a place or a person (PS3.15 Annex E, abridged).
IDENTIFYING_KEYWORDS = (
    "PatientName", "PatientID", "OtherPatientIDs", "OtherPatientNames", "PatientBirthDate", "PatientAddress",
    "InstitutionName", "InstitutionAddress", "InstitutionalDepartmentName", "StationName",
    "ReferringPhysicianName", "PerformingPhysicianName", "OperatorsName", "PhysiciansOfRecord",
    "AccessionNumber", "StudyID", "StudyDate", "SeriesDate", "AcquisitionDate", "ContentDate",
    "InstanceCreationDate", "StudyTime", "StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID",
    "DeviceSerialNumber",
)


def identifying_values(path: Path) -> set[str]:
    """Every non-trivial identifying value in a DICOM header, incl. nested sequences and name components."""
    dataset = pydicom.dcmread(path, stop_before_pixels=True)
    values: set[str] = set()
    for element in dataset.iterall():
        if element.keyword not in IDENTIFYING_KEYWORDS or element.value in (None, ""):
            continue
        items = element.value if isinstance(element.value, (list, pydicom.multival.MultiValue)) else [element.value]
        for item in items:
            text = str(item).strip()
            values.add(text)
            if element.VR == "PN":  # a person's name components can leak one by one
                values.update(part for part in text.replace("^", " ").split() if len(part) >= 4)
    return {v for v in values if len(v) >= 4}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    work = tmp_path_factory.mktemp("refimg")
    return work, ri.default_reference_documents(work)


def test_builds_real_pngs_with_captions(built):
    work, docs = built
    ids = [d.id for d in docs]
    assert len(ids) == len(set(ids))
    sources = {d.metadata["source_file"].split()[0] for d in docs}
    # pydicom ships with the edge install; scikit-image is installed in the dev environment
    assert {"CT_small.dcm", "J2K_pixelrep_mismatch.dcm", "examples_overlay.dcm", "JPEG2000.dcm"} <= sources
    assert {"skimage/data/retina.jpg", "skimage/data/ihc.png"} <= sources
    for doc in docs:
        path = Path(doc.image_path)
        assert path.parent == work and path.suffix == ".png"
        with Image.open(path) as image:
            image.load()
            assert image.format == "PNG" and max(image.size) <= ri.MAX_SIDE
            assert not {k for k in image.info if k not in ("dpi", "gamma")}, "PNG carries metadata chunks"
            pixels = np.asarray(image)
        assert pixels.std() > 5, f"{doc.id} is nearly blank"
        assert doc.caption and doc.text == doc.caption and doc.title
        assert doc.metadata["modality"] and doc.metadata["licence"]


def test_brain_window_shows_soft_tissue_not_just_bone(built):
    _, docs = built
    head = next(d for d in docs if d.id == "ref-ct-head-axial-posterior-fossa-brain")
    pixels = np.asarray(Image.open(head.image_path).convert("L"))
    mid_grey = np.mean((pixels > 40) & (pixels < 215))
    assert mid_grey > 0.10, "brain window should render brain parenchyma as mid-grey"
    assert "brain window (WL 40 / WW 80)" in head.caption


def test_png_bytes_are_deterministic(built, tmp_path):
    _, first = built
    second = ri.default_reference_documents(tmp_path)
    assert [d.id for d in first] == [d.id for d in second]
    for a, b in zip(first, second):
        assert hashlib.sha256(Path(a.image_path).read_bytes()).digest() == \
            hashlib.sha256(Path(b.image_path).read_bytes()).digest(), a.id


def test_captions_and_metadata_carry_no_dicom_identifiers(built):
    _, docs = built
    used = {d.metadata["source_file"] for d in docs if d.metadata["source_file"].endswith(".dcm")}
    assert used
    identifiers: set[str] = set()
    for name in used:
        identifiers |= identifying_values(ri.pydicom_test_file(name))
    assert {"CompressedSamples^CT1", "JFK IMAGING CENTER", "AKH - WIEN"} <= identifiers  # the scan is real
    published = "\n".join(
        json.dumps([d.caption, d.text, d.title, d.source, d.metadata], ensure_ascii=False).casefold() for d in docs
    )
    leaked = sorted(v for v in identifiers if v.casefold() in published)
    assert not leaked, f"identifying DICOM values in captions/metadata: {leaked}"
    # the InVesalius project name is not a patient identifier, but it has no place in a caption either
    assert "promed" not in published


def test_missing_invesalius_is_skipped_with_a_warning(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(ri, "INVESALIUS_EXAMPLE", tmp_path / "absent.inv3")
    docs = ri.default_reference_documents(tmp_path / "out")
    err = capsys.readouterr().err
    assert "InVesalius head CT not found" in err and "apt-get install -y invesalius-examples" in err
    assert len(err.strip().splitlines()) == 1
    assert docs and not any(d.metadata["dataset"].startswith("InVesalius") for d in docs)


def test_invesalius_slices_when_installed(built):
    if not ri.INVESALIUS_EXAMPLE.is_file():
        pytest.skip(f"invesalius-examples not installed ({ri.INVESALIUS_APT_COMMAND})")
    volume = ri.invesalius_head_ct()
    assert volume.shape == (108, 256, 256) and volume.dtype == np.int16
    assert volume.min() == -1024  # Hounsfield units: air
    _, docs = built
    slices = [d for d in docs if d.metadata["dataset"].startswith("InVesalius")]
    assert len(slices) == 10
    assert any("lateral ventricles" in d.caption for d in slices)


def test_readme_examples(tmp_path):
    png = REPO / "examples" / "ct_head_axial.png"
    assert png.stat().st_size < 200_000
    assert png.read_bytes() == ri.example_head_ct_png()
    dcm = REPO / "examples" / "ct_chest_small.dcm"
    example = pydicom.dcmread(dcm)
    assert example.pixel_array.shape == (128, 128)
    source = pydicom.dcmread(ri.pydicom_test_file("CT_small.dcm"), stop_before_pixels=True)
    removed = {str(source.PatientName), source.PatientID, source.InstitutionName, source.StationName, "ABCD1234"}
    raw = dcm.read_bytes()
    assert not [v for v in removed if v.encode() in raw], "identifiers of the source DICOM left in the example"
    assert not any(element.tag.is_private for element in example)
    assert (REPO / "examples" / "README.md").read_text().count("pydicom") >= 2
