"""Read any input image (PNG, JPEG, other Pillow formats, DICOM) into RGB uint8 pixels, safely.

Safety rules:
- a pixel limit (default 64 MP) is checked from the header BEFORE decoding, so a small "decompression bomb" file
  cannot allocate gigabytes; Pillow's own bomb warning/error become `InputError` too;
- every unreadable, truncated, empty or mislabelled file becomes ONE `InputError` line;
- DICOM patient identifiers never leave this module: only the tags in `DICOM_META_ALLOWLIST` are copied to
  `meta`, and error messages are built from our own words plus the transfer syntax name, never from tag values.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np

from .errors import InputError

MAX_PIXELS = 64_000_000
MAX_FILE_BYTES = 2 << 30  # 2 GiB: larger inputs are refused before being read into memory
DICOM_EXTENSIONS = (".dcm", ".dicom", ".dic")

# DICOM keyword -> meta key. Nothing outside this list is ever copied out of a DICOM file.
DICOM_META_ALLOWLIST = {
    "Modality": "modality",
    "BodyPartExamined": "body_part",
    "StudyDate": "study_date",
    "PhotometricInterpretation": "photometric_interpretation",
    "ViewPosition": "view_position",
    "ImageLaterality": "laterality",
}


@dataclass(frozen=True)
class LoadedImage:
    pixels: np.ndarray = field(repr=False)  # RGB uint8, (height, width, 3)
    sha256: str  # of the file's bytes: identifies the input without storing it
    format: str  # "png", "jpeg", "dicom", "tiff", ...
    width: int
    height: int
    meta: dict = field(default_factory=dict)  # non-identifying facts only

    def __repr__(self) -> str:
        return (
            f"LoadedImage(format={self.format!r}, width={self.width}, height={self.height}, "
            f"sha256={self.sha256[:12]}..., meta={self.meta!r})"
        )

    __str__ = __repr__


def is_dicom_bytes(data: bytes) -> bool:
    """A DICOM Part 10 file has a 128-byte preamble followed by b"DICM"."""
    return len(data) >= 132 and data[128:132] == b"DICM"


def load_image(path: str | os.PathLike, *, frame: Optional[int] = None, max_pixels: int = MAX_PIXELS) -> LoadedImage:
    """Read `path` into RGB uint8 pixels. `frame` picks a frame of a multi-frame file (None = middle frame)."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"image file not found: {path}")
    if not path.is_file():
        raise InputError(f"not a file: {path}")
    size = path.stat().st_size
    if size > MAX_FILE_BYTES:
        raise InputError(f"image file {path} is too large ({size:,} bytes; limit {MAX_FILE_BYTES:,})")
    try:
        data = path.read_bytes()
    except OSError as e:
        raise InputError(f"cannot read image file {path}: {e.strerror}") from None
    if not data:
        raise InputError(f"image file is empty (0 bytes): {path}")
    digest = hashlib.sha256(data).hexdigest()
    if is_dicom_bytes(data) or path.suffix.lower() in DICOM_EXTENSIONS:
        pixels, meta = _decode_dicom(data, path, frame, max_pixels, has_preamble=is_dicom_bytes(data))
        fmt = "dicom"
    else:
        pixels, fmt, meta = _decode_pillow(data, path, frame, max_pixels)
    pixels = np.ascontiguousarray(pixels, dtype=np.uint8)
    return LoadedImage(pixels=pixels, sha256=digest, format=fmt, width=pixels.shape[1], height=pixels.shape[0], meta=meta)


# ---------------------------------------------------------------- Pillow formats


def _decode_pillow(data: bytes, path: Path, frame: Optional[int], max_pixels: int):
    from PIL import Image, ImageOps, UnidentifiedImageError

    bomb = f"image {path} is too large to decode safely (limit {max_pixels:,} pixels)"
    with warnings.catch_warnings():
        # Pillow warns (not raises) between MAX_IMAGE_PIXELS and 2x that; we want a clean refusal either way.
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            img = Image.open(io.BytesIO(data))
            width, height = img.size  # from the header; nothing is decoded yet
            if width * height > max_pixels:
                raise InputError(f"{bomb}: declared {width}x{height}")
            n_frames = getattr(img, "n_frames", 1)
            meta: dict = {}
            if n_frames > 1:
                index = n_frames // 2 if frame is None else frame
                if not 0 <= index < n_frames:
                    raise InputError(f"frame {frame} out of range: {path} has {n_frames} frames")
                img.seek(index)
                meta.update(frame_index=index, number_of_frames=n_frames)
            elif frame not in (None, 0):
                raise InputError(f"frame {frame} out of range: {path} has 1 frame")
            img.load()
            fmt = (img.format or path.suffix.lstrip(".") or "unknown").lower()
            img = ImageOps.exif_transpose(img)  # phone photos store rotation in EXIF
            pixels = _pil_to_rgb(img, meta)
        except InputError:
            raise
        except (Image.DecompressionBombError, Image.DecompressionBombWarning):
            raise InputError(bomb) from None
        except UnidentifiedImageError:
            raise InputError(f"not a recognised image file: {path}") from None
        except (OSError, SyntaxError, ValueError, EOFError, IndexError, MemoryError) as e:
            reason = (str(e).splitlines() or [type(e).__name__])[0][:120]
            raise InputError(f"image file {path} is corrupt or truncated ({reason})") from None
    return pixels, fmt, meta


def _pil_to_rgb(img, meta: dict) -> np.ndarray:
    """Any Pillow mode -> RGB uint8. Transparent areas become black; high-bit-depth grey is min/max scaled."""
    from PIL import Image

    mode = img.mode
    if mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        grey = np.asarray(img, dtype=np.float64)
        lo, hi = float(grey.min()), float(grey.max())
        meta["window"] = {"min": lo, "max": hi}
        return np.repeat(_scale_to_uint8(grey, lo, hi)[:, :, None], 3, axis=2)
    if mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
        mode = img.mode
    if mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        img = Image.alpha_composite(background, rgba)
    return np.asarray(img.convert("RGB"), dtype=np.uint8)


def _scale_to_uint8(values: np.ndarray, lo: float, hi: float) -> np.ndarray:
    if not np.isfinite(lo) or not np.isfinite(hi) or hi <= lo:
        return np.zeros(values.shape, dtype=np.uint8)
    scaled = (np.clip(values, lo, hi) - lo) * (255.0 / (hi - lo))
    return np.rint(scaled).astype(np.uint8)


# ---------------------------------------------------------------- DICOM


@contextlib.contextmanager
def _quiet_pydicom():
    """pydicom's validation warnings and log lines can quote tag values (a patient's name); keep them in."""
    logger = logging.getLogger("pydicom")
    level = logger.level
    logger.setLevel(logging.CRITICAL + 1)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


def _decode_dicom(data: bytes, path: Path, frame: Optional[int], max_pixels: int, has_preamble: bool):
    with _quiet_pydicom():
        return _decode_dicom_quietly(data, path, frame, max_pixels, has_preamble)


def _decode_dicom_quietly(data: bytes, path: Path, frame: Optional[int], max_pixels: int, has_preamble: bool):
    import pydicom

    try:
        ds = pydicom.dcmread(io.BytesIO(data), force=not has_preamble)
    except Exception as e:  # pydicom raises many types; their text may quote tag values, so it is not shown
        raise InputError(f"not a readable DICOM file: {path} ({type(e).__name__})") from None
    if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
        raise InputError(f"DICOM file has no pixel data: {path}")
    syntax = _transfer_syntax_name(ds)
    try:
        rows, cols = int(ds.Rows), int(ds.Columns)
        n_frames = int(ds.get("NumberOfFrames", 1) or 1)
        photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip().upper()
    except Exception:
        raise InputError(f"DICOM file has invalid image attributes: {path}") from None
    if rows * cols > max_pixels or rows * cols * n_frames > 8 * max_pixels:
        raise InputError(f"DICOM image {path} is too large to decode safely ({cols}x{rows}, {n_frames} frames)")
    index = n_frames // 2 if frame is None else frame
    if not 0 <= index < n_frames:
        raise InputError(f"frame {frame} out of range: {path} has {n_frames} frame{'s' if n_frames != 1 else ''}")

    try:
        array = ds.pixel_array
    except Exception as e:
        if _is_missing_handler(e):
            raise InputError(
                f"cannot decode DICOM pixel data in {path}: no decoder installed for transfer syntax {syntax}"
            ) from None
        raise InputError(f"DICOM pixel data in {path} is corrupt or truncated (transfer syntax {syntax})") from None

    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    if n_frames > 1:
        array = array[index]
    meta = _dicom_meta(ds)
    meta.update(frame_index=index, number_of_frames=n_frames, transfer_syntax=syntax)

    if samples == 3 or photometric.startswith(("RGB", "YBR")):
        rgb = _dicom_colour(array, ds, photometric)
        meta["window"] = {"type": "none"}
        return rgb, meta
    if photometric == "PALETTE COLOR":
        from pydicom.pixels import apply_color_lut

        rgb = apply_color_lut(array, ds)
        bits = 8 if rgb.dtype == np.uint8 else 16
        return _colour_to_uint8(rgb, bits), {**meta, "window": {"type": "palette"}}

    values = array.astype(np.float64)
    slope = _first_float(ds.get("RescaleSlope"), 1.0)
    intercept = _first_float(ds.get("RescaleIntercept"), 0.0)
    values = values * slope + intercept  # stored values -> modality units (e.g. Hounsfield for CT)
    center = _first_float(ds.get("WindowCenter"), None)
    width = _first_float(ds.get("WindowWidth"), None)
    if center is not None and width is not None and width > 0:
        lo, hi = center - width / 2.0, center + width / 2.0
        meta["window"] = {"type": "dicom", "center": center, "width": width}
    else:
        lo, hi = float(values.min()), float(values.max())
        meta["window"] = {"type": "min_max", "min": lo, "max": hi}
    grey = _scale_to_uint8(values, lo, hi)
    if photometric == "MONOCHROME1":  # MONOCHROME1: high values are dark
        grey = 255 - grey
        meta["inverted"] = True
    return np.repeat(grey[:, :, None], 3, axis=2), meta


def _dicom_colour(array: np.ndarray, ds, photometric: str) -> np.ndarray:
    from pydicom.pixels import convert_color_space

    if array.ndim == 2:
        array = np.repeat(array[:, :, None], 3, axis=2)
    if photometric.startswith("YBR") and not _pydicom_converted_ybr(ds):
        space = "YBR_FULL_422" if photometric == "YBR_FULL_422" else "YBR_FULL"
        if photometric in ("YBR_FULL", "YBR_FULL_422"):
            array = convert_color_space(array, space, "RGB")
    bits = int(ds.get("BitsStored", ds.get("BitsAllocated", 8)) or 8)
    return _colour_to_uint8(array, bits)


def _pydicom_converted_ybr(ds) -> bool:
    """pydicom >= 3 returns RGB from `pixel_array` for every YBR file; 2.x only did so for JPEG-compressed ones."""
    import pydicom

    if int(pydicom.__version__.split(".")[0]) >= 3:
        return True
    syntax = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
    return bool(syntax is not None and syntax.is_compressed)


def _colour_to_uint8(array: np.ndarray, bits: int) -> np.ndarray:
    if array.dtype == np.uint8:
        return array
    maximum = float(2 ** min(max(bits, 1), 32) - 1)
    return _scale_to_uint8(array.astype(np.float64), 0.0, maximum)


def _first_float(value, default):
    """WindowCenter etc. may be multi-valued; the first value is the primary window."""
    if value is None:
        return default
    try:
        if not isinstance(value, (str, bytes)) and hasattr(value, "__len__"):
            if len(value) == 0:
                return default
            value = value[0]
        return float(value)
    except (TypeError, ValueError):
        return default


def _dicom_meta(ds) -> dict:
    meta = {}
    for keyword, key in DICOM_META_ALLOWLIST.items():
        value = ds.get(keyword)
        if value is not None and str(value).strip():
            meta[key] = str(value).strip()
    return meta


def _transfer_syntax_name(ds) -> str:
    syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    if syntax is None:
        return "unknown (no transfer syntax in file meta)"
    return f"{syntax.name} ({syntax})" if syntax.name != str(syntax) else str(syntax)


def _is_missing_handler(error: Exception) -> bool:
    text = str(error).lower()
    return any(w in text for w in ("no pixel data handler", "unable to decode", "plugin", "missing required", "not installed", "no decoders", "is not supported"))


# ---------------------------------------------------------------- facts used to label and compare studies


def study_date_iso(meta: dict) -> Optional[str]:
    """The allow-listed DICOM StudyDate ("YYYYMMDD", DA) as "YYYY-MM-DD"; None when absent or not a real date.

    Only this allow-listed date is ever used to label a study; nothing else in a header is read for it."""
    import datetime as _dt

    raw = str(meta.get("study_date") or "").strip().replace("-", "").replace(".", "")  # ACR-NEMA wrote 2004.01.19
    if len(raw) != 8 or not raw.isdigit():
        return None
    try:
        return _dt.date(int(raw[:4]), int(raw[4:6]), int(raw[6:])).isoformat()
    except ValueError:
        return None


# DICOM Modality codes that are the same kind of study for comparing a prior with a current image.
_MODALITY_FAMILY = {"CR": "XR", "DX": "XR", "DR": "XR", "RG": "XR", "PX": "XR", "IO": "XR"}
# Codes that say nothing about what was imaged (secondary capture, other): treated as unknown.
_UNINFORMATIVE_MODALITIES = {"", "OT", "SC", "DOC"}


def image_modality(image: LoadedImage) -> tuple[Optional[str], str]:
    """(DICOM modality family or None, "greyscale" | "colour") of a loaded image.

    The modality comes only from the allow-listed DICOM Modality tag (CR/DX/DR are all radiographs, "XR");
    for other files it is unknown and only the colour kind, read from the pixels, is available."""
    code = str(image.meta.get("modality") or "").strip().upper()
    family = None if code in _UNINFORMATIVE_MODALITIES else _MODALITY_FAMILY.get(code, code)
    px = image.pixels
    step = max(1, int(max(px.shape[0], px.shape[1]) // 256))  # a subsample is enough to tell grey from colour
    sample = px[::step, ::step].astype(np.int16)
    spread = np.maximum(np.abs(sample[..., 0] - sample[..., 1]), np.abs(sample[..., 1] - sample[..., 2]))
    grey = bool(np.percentile(spread, 99) <= 6)  # JPEG chroma noise on a grey image stays within a few levels
    return family, "greyscale" if grey else "colour"
