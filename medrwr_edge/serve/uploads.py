"""Uploaded images: written to a private temp dir under neutral names, decoded by the same code as `ask`.

The client's file name is never used or logged (it may be a patient's name); only a known extension is kept, so a
DICOM without its preamble is still read as DICOM. Error messages name the upload by position, not by path.
"""

from __future__ import annotations

import base64
import binascii
import os
import re
import tempfile
from pathlib import Path
from typing import Optional, Sequence

from ..errors import InputError

MAX_IMAGES = 8
_KNOWN_SUFFIXES = {".png", ".jpg", ".jpeg", ".dcm", ".dicom", ".dic", ".tif", ".tiff", ".bmp", ".webp", ".gif"}
_MIME_SUFFIX = {"image/png": ".png", "image/jpeg": ".jpg", "image/jpg": ".jpg", "application/dicom": ".dcm",
                "image/webp": ".webp", "image/gif": ".gif", "image/bmp": ".bmp", "image/tiff": ".tif"}
_DATA_URL = re.compile(r"^data:([\w.+-]+/[\w.+-]+)?((?:;[\w-]+=[^;,]*)*)(;base64)?,(.*)$", re.S)


def private_workdir() -> Path:
    """A temp dir only this process's user can read (mkdtemp creates it 0700)."""
    return Path(tempfile.mkdtemp(prefix="medrwr-serve-"))


def upload_name(index: int, client_name: Optional[str], content_type: Optional[str]) -> str:
    suffix = Path(client_name or "").suffix.lower()
    if suffix not in _KNOWN_SUFFIXES:
        suffix = _MIME_SUFFIX.get((content_type or "").lower(), "")
    return f"image-{index + 1}{suffix}"


def write_private(workdir: Path, name: str, data: bytes) -> Path:
    path = workdir / name
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    return path


def decode_data_url(url: str, index: int) -> tuple[bytes, str]:
    """(bytes, suffix) of a `data:image/png;base64,...` URL. Remote URLs are refused: the service is offline."""
    if not isinstance(url, str):
        raise InputError(f"image {index + 1}: image_url.url must be a string")
    m = _DATA_URL.match(url.strip())
    if m is None:
        if url.startswith(("http://", "https://", "file:")):
            raise InputError(f"image {index + 1}: only base64 data URLs are accepted (this service never fetches URLs)")
        raise InputError(f"image {index + 1}: not a data URL (expected data:image/png;base64,...)")
    mime, _params, is_b64, payload = m.groups()
    if not is_b64:
        raise InputError(f"image {index + 1}: the data URL must be base64-encoded")
    try:
        data = base64.b64decode(payload, validate=False)
    except (binascii.Error, ValueError):
        raise InputError(f"image {index + 1}: the data URL's base64 is invalid") from None
    if not data:
        raise InputError(f"image {index + 1}: the data URL is empty")
    return data, _MIME_SUFFIX.get((mime or "").lower(), "")


def load_prepared(paths: Sequence[Path], workdir: Path, settings):
    """PreparedImages for the uploads, as the request's settings ask; a decoding error names the upload, never the
    server's temp path."""
    from ..runtime.api import PreparedImages

    try:
        return PreparedImages.for_settings(list(paths), settings)
    except InputError as e:
        raise InputError(str(e).replace(str(workdir) + os.sep, "").replace(str(workdir), "upload")) from None
