"""DICOM files carrying recognisable FAKE patient identifiers, for the privacy tests.

Every identifier below is invented and distinctive enough that finding it in any output (stdout, stderr, a log
line, an evidence record, an HTML report, a SQLite file read as bytes) can only mean it leaked from the DICOM.
`PHI_STRINGS` is what the tests grep for; name components are listed separately because a leak may reformat
"FAMILY^GIVEN" as "FAMILY GIVEN".

The files are built from scratch with pydicom (no bundled test file needed), as Explicit VR Little Endian:
a single-frame CT with rescale slope/intercept and a window centre/width, a multi-frame CT whose frames differ,
one without pixel data, and a truncated one whose header (identifiers included) is intact.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

PATIENT_NAME = "ZZTESTPATIENT^JOHN"
PATIENT_ID = "PHI-ID-7731"
BIRTH_DATE = "19230415"
ACCESSION = "ACC-PHI-5521"
INSTITUTION = "ZZ Phantom General Hospital"
INSTITUTION_ADDRESS = "42 Phantom Lane, Nowhere"
REFERRING = "ZZDOCTOR^JANE"
OPERATOR = "ZZOPERATOR^MAX"
STATION = "ZZSTATION-9"
OTHER_IDS = "PHI-OTHER-3344"
STUDY_ID = "PHISTUDY88"
PATIENT_ADDRESS = "17 Secretive Road"
PRIVATE_CREATOR = "ZZPHI PRIVATE"
PRIVATE_VALUE = "PHI-PRIVATE-9911"
UID_ROOT = "1.2.826.0.1.3680043.10.7731"  # study/series/SOP instance UIDs identify a study too

PHI_STRINGS = (
    PATIENT_NAME, "ZZTESTPATIENT", PATIENT_ID, BIRTH_DATE, "1923-04-15", ACCESSION, INSTITUTION, "Phantom General",
    INSTITUTION_ADDRESS, "Phantom Lane", REFERRING, "ZZDOCTOR", OPERATOR, "ZZOPERATOR", STATION, OTHER_IDS,
    STUDY_ID, PATIENT_ADDRESS, PRIVATE_CREATOR, PRIVATE_VALUE, UID_ROOT,
)

WINDOW_CENTER, WINDOW_WIDTH = 40.0, 400.0  # a CT soft-tissue window
RESCALE_SLOPE, RESCALE_INTERCEPT = 1.0, -1024.0


def find_phi(data: bytes | str) -> list[str]:
    """The fake identifiers present in `data` (case-insensitive; bytes are searched as UTF-8 and UTF-16)."""
    if isinstance(data, str):
        data = data.encode("utf-8", "surrogateescape")
    lowered = data.lower()
    found = []
    for s in PHI_STRINGS:
        needle = s.lower()
        if needle.encode("utf-8") in lowered or needle.encode("utf-16-le") in lowered:
            found.append(s)
    return found


def phantom_hu(rows: int = 64, cols: int = 64, shift: int = 0) -> np.ndarray:
    """A head-phantom-like slice in Hounsfield units: air, a bright skull ring, soft tissue, a dense blob."""
    y, x = np.mgrid[0:rows, 0:cols]
    cy, cx = rows / 2, cols / 2
    r = np.hypot((y - cy) / (rows * 0.42), (x - cx) / (cols * 0.36))
    hu = np.full((rows, cols), -1000.0)
    hu[r < 1.0] = 700.0  # bone
    hu[r < 0.88] = 35.0  # brain
    blob = np.hypot(y - cy - rows * 0.1 - shift, x - cx + cols * 0.12) < rows * 0.08
    hu[blob] = 70.0 + 10 * shift  # a hyperdense lesion that moves between frames
    return hu


def _identified_dataset(rows: int, cols: int, frames: int, modality: str):
    import pydicom
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = f"{UID_ROOT}.3.{frames}"
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = f"{UID_ROOT}.99"
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = f"{UID_ROOT}.1"
    ds.SeriesInstanceUID = f"{UID_ROOT}.2"
    ds.PatientName = PATIENT_NAME
    ds.PatientID = PATIENT_ID
    ds.PatientBirthDate = BIRTH_DATE
    ds.PatientSex = "O"
    ds.PatientAddress = PATIENT_ADDRESS
    ds.OtherPatientIDs = OTHER_IDS
    ds.AccessionNumber = ACCESSION
    ds.InstitutionName = INSTITUTION
    ds.InstitutionAddress = INSTITUTION_ADDRESS
    ds.ReferringPhysicianName = REFERRING
    ds.OperatorsName = OPERATOR
    ds.StationName = STATION
    ds.StudyID = STUDY_ID
    ds.StudyDate = "20200101"
    ds.Modality = modality
    ds.BodyPartExamined = "HEAD"
    block = ds.private_block(0x0099, PRIVATE_CREATOR, create=True)
    block.add_new(0x01, "LO", PRIVATE_VALUE)
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = rows, cols
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.RescaleSlope, ds.RescaleIntercept = str(RESCALE_SLOPE), str(RESCALE_INTERCEPT)
    ds.WindowCenter, ds.WindowWidth = str(WINDOW_CENTER), str(WINDOW_WIDTH)
    if frames > 1:
        ds.NumberOfFrames = frames
    assert pydicom  # imported for its side effect of registering the dictionaries
    return ds


def stored_values(hu: np.ndarray) -> np.ndarray:
    return np.rint((hu - RESCALE_INTERCEPT) / RESCALE_SLOPE).astype(np.uint16)


def write_dicom(path: str | Path, *, frames: int = 1, rows: int = 64, cols: int = 64, pixels: bool = True,
                modality: str = "CT") -> Path:
    """An identified CT DICOM at `path`: one frame, several (frame k's lesion is shifted by k), or no pixels."""
    path = Path(path)
    ds = _identified_dataset(rows, cols, frames, modality)
    if pixels:
        stack = np.stack([stored_values(phantom_hu(rows, cols, shift=k)) for k in range(frames)])
        ds.PixelData = (stack[0] if frames == 1 else stack).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def write_truncated_dicom(path: str | Path) -> Path:
    """A CT DICOM cut inside its pixel data: the header with every identifier is intact, the pixels are not."""
    path = Path(path)
    full = write_dicom(path.with_name(path.stem + ".full.dcm"), rows=128, cols=128)
    data = full.read_bytes()
    full.unlink()
    path.write_bytes(data[: len(data) - 9000])
    return path


def write_all(folder: str | Path) -> dict[str, Path]:
    """Every kind of identified DICOM the privacy tests use, with neutral file names."""
    folder = Path(folder)
    return {
        "single": write_dicom(folder / "ct-single.dcm"),
        "multi": write_dicom(folder / "ct-multi.dcm", frames=5),
        "nopixels": write_dicom(folder / "ct-nopixels.dcm", pixels=False),
        "truncated": write_truncated_dicom(folder / "ct-truncated.dcm"),
    }


def write_sr(path: str | Path, finding: str = "Hyperdense focus in the left frontal lobe, likely haemorrhage.") -> Path:
    """An identified Basic Text SR (a radiology report as DICOM): the same identifiers, plus a text finding."""
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence
    from pydicom.uid import BasicTextSRStorage

    path = Path(path)
    ds = _identified_dataset(1, 1, 1, "SR")
    for keyword in ("SamplesPerPixel", "PhotometricInterpretation", "Rows", "Columns", "BitsAllocated", "BitsStored",
                    "HighBit", "PixelRepresentation", "RescaleSlope", "RescaleIntercept", "WindowCenter",
                    "WindowWidth"):
        delattr(ds, keyword)
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = BasicTextSRStorage
    ds.ValueType, ds.ContinuityOfContent = "CONTAINER", "SEPARATE"
    title = Dataset()
    title.CodeValue, title.CodingSchemeDesignator, title.CodeMeaning = "18748-4", "LN", "Diagnostic imaging report"
    ds.ConceptNameCodeSequence = Sequence([title])
    item = Dataset()
    item.RelationshipType, item.ValueType, item.TextValue = "CONTAINS", "TEXT", finding
    name = Dataset()
    name.CodeValue, name.CodingSchemeDesignator, name.CodeMeaning = "121071", "DCM", "Finding"
    item.ConceptNameCodeSequence = Sequence([name])
    ds.ContentSequence = Sequence([item])
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path
