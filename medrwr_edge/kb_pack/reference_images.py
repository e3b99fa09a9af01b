"""The default CDIR reference-image pack, built from real medical images that installed packages ship.

Nothing is downloaded. Sources, their provenance and licences:

* pydicom test data (`pydicom/data/test_files`, shipped in the pydicom wheel; pydicom is MIT-licensed and
  its test files are distributed under that licence):
  - `CT_small.dcm`: contrast-enhanced axial chest CT, downsized to 128x128 from NEMA WG04 sample "CT1_UNC".
  - `J2K_pixelrep_mismatch.dcm`: axial head CT (JPEG 2000 lossless, decoded by Pillow's OpenJPEG),
    contributed to pydicom for issue #1149.
  - `examples_overlay.dcm`: axial contrast-enhanced T1 fat-suppressed MR of the upper abdomen (Siemens
    sample "MR-SIEMENS-DICOM-WithOverlays", cropped).
  - `JPEG2000.dcm`: whole-body bone scintigraphy, edited from NEMA WG04 sample "NM1_J2KI".
  Left out on purpose: the ultrasound examples (burned-in institution names and dates in the pixels),
  MR_small (a 64x64 crop whose anatomy cannot be named honestly), 693_J2KI (lossy to the point of
  artefact), and the synthetic/colour-test files.
* InVesalius example head CT, Debian package `invesalius-examples` (GPL-2, (c) CTI Renato Archer):
  `/usr/share/doc/invesalius-examples/examples/Cranium.inv3`, a gzipped tar holding a 108x256x256 int16
  Hounsfield volume (0.957 x 0.957 x 1.5 mm). Install with
  `sudo apt-get update && sudo apt-get install -y invesalius-examples`; when it is absent these images
  are skipped with a warning. Slices are rendered axially with brain and bone windows.
* scikit-image sample images (files inside the scikit-image wheel, read directly without importing
  skimage; skipped with a warning when scikit-image is not installed):
  - `retina.jpg`: fundus photograph of a normal left eye (Mikael Haggstrom, CC0).
  - `microaneurysms.png`: green-channel detail of a fundus image with diabetic retinopathy from the HRF
    database (CC0, A. Maier).
  - `ihc.png`: colonic glands, FHL2 immunohistochemistry (DAB) with hematoxylin counterstain
    (CMMI; "no known copyright restrictions").

Captions describe modality, body region, plane/level and window in general terms. They never carry a
file's patient name/ID, dates, institution or station (tests scan the DICOM headers to make sure).
PNG bytes are deterministic (no text chunks, fixed compression), so the pack's hashes are reproducible.
"""

from __future__ import annotations

import importlib.util
import io
import plistlib
import sys
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np
from PIL import Image

from medrwr_edge.kb_pack.documents import Document
from medrwr_edge.paths import atomic_write_bytes

INVESALIUS_EXAMPLE = Path("/usr/share/doc/invesalius-examples/examples/Cranium.inv3")
INVESALIUS_APT_COMMAND = "sudo apt-get update && sudo apt-get install -y invesalius-examples"
MAX_SIDE = 512  # reference images are stored at most this large: enough for the encoder and for display

# (center, width) in Hounsfield units
BRAIN_WINDOW = (40, 80)
BONE_WINDOW = (500, 2000)
SOFT_TISSUE_WINDOW = (40, 400)

_PYDICOM_LICENCE = "MIT (pydicom test data)"
_INVESALIUS_LICENCE = "GPL-2 (InVesalius example data, CTI Renato Archer)"


@dataclass(frozen=True)
class _Source:
    id: str
    caption: str
    modality: str
    body_region: str
    plane: str
    window: str
    dataset: str
    licence: str
    source_file: str


def _warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


def _window(values: np.ndarray, center: float, width: float) -> np.ndarray:
    low = center - width / 2.0
    scaled = (values.astype(np.float64) - low) / float(width)
    return np.round(np.clip(scaled, 0.0, 1.0) * 255.0).astype(np.uint8)


def _window_label(name: str, window: tuple[int, int]) -> str:
    return f"{name} window (WL {window[0]} / WW {window[1]})"


def _fit(image: Image.Image) -> Image.Image:
    if max(image.size) <= MAX_SIDE:
        return image
    scale = MAX_SIDE / max(image.size)
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    return image.resize(size, Image.Resampling.LANCZOS)


def png_bytes(pixels: np.ndarray | Image.Image) -> bytes:
    """Deterministic PNG encoding: no metadata chunks, fixed zlib level."""
    image = pixels if isinstance(pixels, Image.Image) else Image.fromarray(pixels)
    image = _fit(image.convert("L") if image.mode in ("I", "I;16", "F") else image)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=False, compress_level=9)
    return buffer.getvalue()


# --- pydicom test files -------------------------------------------------------------------------------


def pydicom_test_file(name: str) -> Optional[Path]:
    """A file shipped inside the pydicom wheel (never the downloadable extras: no network)."""
    spec = importlib.util.find_spec("pydicom")
    if spec is None or not spec.origin:
        return None
    path = Path(spec.origin).parent / "data" / "test_files" / name
    return path if path.is_file() else None


def _dicom_hu(path: Path) -> np.ndarray:
    import pydicom
    from pydicom.pixels import apply_modality_lut

    dataset = pydicom.dcmread(path)
    return np.asarray(apply_modality_lut(dataset.pixel_array, dataset), dtype=np.float64)


def _render_ct_small(path: Path) -> np.ndarray:
    return _window(_dicom_hu(path), *SOFT_TISSUE_WINDOW)


def _render_head_ct_brain(path: Path) -> np.ndarray:
    return _window(_dicom_hu(path), *BRAIN_WINDOW)


def _render_head_ct_bone(path: Path) -> np.ndarray:
    return _window(_dicom_hu(path), *BONE_WINDOW)


def _render_percentile(path: Path) -> np.ndarray:
    # MR and scintigraphy have no Hounsfield scale: stretch between the 1st and 99.5th percentiles.
    values = _dicom_hu(path)
    low, high = np.percentile(values, [1.0, 99.5])
    return _window(values, (low + high) / 2.0, max(high - low, 1.0))


_PYDICOM_IMAGES: list[tuple[str, Callable[[Path], np.ndarray], _Source]] = [
    (
        "CT_small.dcm",
        _render_ct_small,
        _Source(
            id="ref-ct-chest-axial-thoracic-vertebra",
            caption=(
                "Axial contrast-enhanced CT of the chest, small field of view centred on a thoracic "
                "vertebra: vertebral body, spinal canal, posterior elements and rib heads, with the "
                "descending aorta and posterior lung; soft-tissue window (WL 40 / WW 400)."
            ),
            modality="CT",
            body_region="chest",
            plane="axial",
            window=_window_label("soft-tissue", SOFT_TISSUE_WINDOW),
            dataset="pydicom test data (NEMA WG04 sample CT1, downsized)",
            licence=_PYDICOM_LICENCE,
            source_file="CT_small.dcm",
        ),
    ),
    (
        "J2K_pixelrep_mismatch.dcm",
        _render_head_ct_brain,
        _Source(
            id="ref-ct-head-axial-posterior-fossa-brain",
            caption=(
                "Axial CT of the head at the level of the posterior cranial fossa: cerebellum, "
                "temporal lobes, petrous temporal bones and sphenoid sinus; brain window (WL 40 / WW 80)."
            ),
            modality="CT",
            body_region="head",
            plane="axial",
            window=_window_label("brain", BRAIN_WINDOW),
            dataset="pydicom test data (issue 1149 head CT)",
            licence=_PYDICOM_LICENCE,
            source_file="J2K_pixelrep_mismatch.dcm",
        ),
    ),
    (
        "J2K_pixelrep_mismatch.dcm",
        _render_head_ct_bone,
        _Source(
            id="ref-ct-head-axial-skull-base-bone",
            caption=(
                "Axial CT of the head at the level of the skull base: petrous temporal bones with "
                "mastoid air cells, sphenoid sinus and occipital bone; bone window (WL 500 / WW 2000)."
            ),
            modality="CT",
            body_region="head",
            plane="axial",
            window=_window_label("bone", BONE_WINDOW),
            dataset="pydicom test data (issue 1149 head CT)",
            licence=_PYDICOM_LICENCE,
            source_file="J2K_pixelrep_mismatch.dcm",
        ),
    ),
    (
        "examples_overlay.dcm",
        _render_percentile,
        _Source(
            id="ref-mr-abdomen-axial-t1-contrast",
            caption=(
                "Axial contrast-enhanced T1-weighted fat-suppressed MR (3D gradient echo) of the upper "
                "abdomen at the level of the kidneys: liver with a focal lesion, kidneys, pancreas, "
                "spleen and bowel."
            ),
            modality="MR",
            body_region="abdomen",
            plane="axial",
            window="percentile stretch (1st-99.5th)",
            dataset="pydicom test data (Siemens MR sample with overlays, cropped)",
            licence=_PYDICOM_LICENCE,
            source_file="examples_overlay.dcm",
        ),
    ),
    (
        "JPEG2000.dcm",
        _render_percentile,
        _Source(
            id="ref-nm-whole-body-bone-scan",
            caption=(
                "Whole-body bone scintigraphy (nuclear medicine), single planar view, low resolution: "
                "skeletal tracer uptake from skull to feet, with tracer in the urinary bladder."
            ),
            modality="NM",
            body_region="whole body",
            plane="planar",
            window="percentile stretch (1st-99.5th)",
            dataset="pydicom test data (NEMA WG04 sample NM1, edited)",
            licence=_PYDICOM_LICENCE,
            source_file="JPEG2000.dcm",
        ),
    ),
]


def example_head_ct_png() -> bytes:
    """The README quick-start image (`examples/ct_head_axial.png`): pydicom's head CT, brain window."""
    path = pydicom_test_file("J2K_pixelrep_mismatch.dcm")
    if path is None:
        raise FileNotFoundError("pydicom test file J2K_pixelrep_mismatch.dcm is not installed")
    return png_bytes(_render_head_ct_brain(path))


# --- InVesalius head CT ---------------------------------------------------------------------------------

# (slice index from the inferior end, level description, window name, window)
_INVESALIUS_SLICES: list[tuple[int, str, str, tuple[int, int]]] = [
    (22, "posterior cranial fossa: cerebellar hemispheres, petrous temporal bones, nasal cavity and "
         "maxillary sinuses", "brain", BRAIN_WINDOW),
    (22, "skull base: petrous temporal bones with mastoid air cells, nasal cavity and maxillary "
         "sinuses", "bone", BONE_WINDOW),
    (32, "pons and temporal lobes, with the ethmoid air cells anteriorly", "brain", BRAIN_WINDOW),
    (42, "orbits and midbrain: globes, temporal lobes and suprasellar region", "brain", BRAIN_WINDOW),
    (42, "orbits and anterior skull base", "bone", BONE_WINDOW),
    (50, "third ventricle and basal ganglia, frontal sinus anteriorly", "brain", BRAIN_WINDOW),
    (58, "lateral ventricles (frontal horns and atria)", "brain", BRAIN_WINDOW),
    (66, "bodies of the lateral ventricles", "brain", BRAIN_WINDOW),
    (76, "centrum semiovale, above the lateral ventricles", "brain", BRAIN_WINDOW),
    (88, "high convexity near the vertex", "brain", BRAIN_WINDOW),
]


def invesalius_head_ct(path: Optional[Path] = None) -> Optional[np.ndarray]:
    """The example volume as int16 HU, shape (slices, rows, cols), slice 0 inferior, anterior at top."""
    path = Path(path) if path is not None else INVESALIUS_EXAMPLE
    if not path.is_file():
        return None
    with tarfile.open(path, "r:gz") as archive:
        members = {Path(m.name).name: m for m in archive.getmembers() if m.isfile()}
        # plistlib parses XML plists into plain types (no code execution, unlike pickle).
        main = plistlib.loads(archive.extractfile(members["main.plist"]).read())
        matrix = main["matrix"]
        raw = archive.extractfile(members[matrix["filename"]]).read()
    volume = np.frombuffer(raw, dtype=np.dtype(matrix["dtype"]).newbyteorder("<"))
    volume = volume.reshape(tuple(matrix["shape"]))
    # Stored with anterior at the bottom of each slice; flip to the radiological convention.
    return np.ascontiguousarray(volume[:, ::-1, :])


def _invesalius_documents(workdir: Path) -> list[Document]:
    volume = invesalius_head_ct()
    if volume is None:
        _warn(
            f"InVesalius head CT not found ({INVESALIUS_EXAMPLE}); skipping its 10 slices. "
            f"Install it with: {INVESALIUS_APT_COMMAND}"
        )
        return []
    documents = []
    for index, level, window_name, window in _INVESALIUS_SLICES:
        slug = f"ref-invesalius-ct-head-s{index:03d}-{window_name}"
        caption = f"Axial CT of the head at the level of the {level}; {_window_label(window_name, window)}."
        source = _Source(
            id=slug,
            caption=caption,
            modality="CT",
            body_region="head",
            plane="axial",
            window=_window_label(window_name, window),
            dataset="InVesalius example head CT (Debian invesalius-examples)",
            licence=_INVESALIUS_LICENCE,
            source_file=f"Cranium.inv3 slice {index}",
        )
        documents.append(_write(workdir, source, png_bytes(_window(volume[index], *window))))
    return documents


# --- scikit-image sample images ---------------------------------------------------------------------------

_SKIMAGE_IMAGES: list[tuple[str, _Source]] = [
    (
        "retina.jpg",
        _Source(
            id="ref-fundus-photo-normal-left-eye",
            caption=(
                "Colour fundus photograph of a normal left eye: optic disc, macula and retinal "
                "arteries and veins."
            ),
            modality="fundus photography",
            body_region="eye (retina)",
            plane="en face",
            window="none (colour photograph)",
            dataset="scikit-image sample data (Wikimedia Commons, M. Haggstrom)",
            licence="CC0 1.0",
            source_file="skimage/data/retina.jpg",
        ),
    ),
    (
        "microaneurysms.png",
        _Source(
            id="ref-fundus-detail-microaneurysms",
            caption=(
                "Green-channel detail of a retinal fundus image in diabetic retinopathy showing "
                "microaneurysms as small dark dots beside retinal vessels."
            ),
            modality="fundus photography",
            body_region="eye (retina)",
            plane="en face",
            window="none (green channel)",
            dataset="scikit-image sample data (HRF fundus database, image 07_dr)",
            licence="CC0 1.0",
            source_file="skimage/data/microaneurysms.png",
        ),
    ),
    (
        "ihc.png",
        _Source(
            id="ref-histology-colon-ihc",
            caption=(
                "Light micrograph of colonic glands: immunohistochemistry for FHL2 (brown DAB) with "
                "hematoxylin counterstain (blue nuclei)."
            ),
            modality="histopathology (immunohistochemistry)",
            body_region="colon",
            plane="section",
            window="none (colour micrograph)",
            dataset="scikit-image sample data (Center for Microscopy and Molecular Imaging)",
            licence="no known copyright restrictions",
            source_file="skimage/data/ihc.png",
        ),
    ),
]


def skimage_data_file(name: str) -> Optional[Path]:
    """A sample image inside the scikit-image wheel, located without importing skimage."""
    spec = importlib.util.find_spec("skimage")
    if spec is None or not spec.origin:
        return None
    path = Path(spec.origin).parent / "data" / name
    return path if path.is_file() else None


def _skimage_documents(workdir: Path) -> list[Document]:
    documents = []
    for name, source in _SKIMAGE_IMAGES:
        path = skimage_data_file(name)
        if path is None:
            _warn(f"scikit-image sample {name} not found; skipping it (pip install scikit-image)")
            continue
        with Image.open(path) as image:
            image.load()
            documents.append(_write(workdir, source, png_bytes(image.convert("RGB"))))
    return documents


# --- assembly -------------------------------------------------------------------------------------------


def _write(workdir: Path, source: _Source, data: bytes) -> Document:
    path = workdir / f"{source.id}.png"
    atomic_write_bytes(path, data)
    return Document(
        id=source.id,
        text=source.caption,
        source=f"{source.dataset}; licence: {source.licence}",
        title=source.caption.split(":")[0].split(";")[0].rstrip("."),
        image_path=str(path),
        caption=source.caption,
        metadata={
            "modality": source.modality,
            "body_region": source.body_region,
            "plane": source.plane,
            "window": source.window,
            "dataset": source.dataset,
            "licence": source.licence,
            "source_file": source.source_file,
        },
    )


def _pydicom_documents(workdir: Path) -> list[Document]:
    documents = []
    for name, render, source in _PYDICOM_IMAGES:
        path = pydicom_test_file(name)
        if path is None:
            _warn(f"pydicom test file {name} not found; skipping it")
            continue
        try:
            pixels = render(path)
        except Exception as exc:  # a missing JPEG 2000 decoder must not stop the pack build
            _warn(f"cannot decode pydicom test file {name} ({type(exc).__name__}); skipping it")
            continue
        documents.append(_write(workdir, source, png_bytes(pixels)))
    return documents


def default_reference_documents(workdir: str | Path) -> list[Document]:
    """Render every available reference image into `workdir` as PNG and return one Document each.

    Order is fixed (pydicom, InVesalius, scikit-image). Sources that are not installed are skipped with
    a warning line on stderr; the rest still build.
    """
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    return _pydicom_documents(workdir) + _invesalius_documents(workdir) + _skimage_documents(workdir)
