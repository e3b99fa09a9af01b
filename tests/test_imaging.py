"""load_image on real PNG/JPEG/DICOM files and on hostile ones: one InputError, never a traceback or a leak."""

from __future__ import annotations

import hashlib
import struct
import zlib

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.data import get_testdata_file
from skimage import data as skdata

from medrwr_edge.errors import InputError
from medrwr_edge.imaging import DICOM_META_ALLOWLIST, LoadedImage, load_image

SECRETS = ("ZZTEST^SECRET", "SECRET-ID-4711", "19010101", "ACC-SECRET-99", "Secret Hospital", "Dr^Secretary",
           "OTHER-SECRET-ID", "STUDY-SECRET", "1 Secret Street")


def _fixture_dicom(name: str):
    path = get_testdata_file(name)
    if path is None:
        pytest.skip(f"pydicom test file {name} is not bundled with this pydicom")
    return path


# ---------------------------------------------------------------- PNG / JPEG


def test_png_rgb_round_trip_is_exact(tmp_path):
    pixels = skdata.astronaut()
    path = tmp_path / "astronaut.png"
    Image.fromarray(pixels).save(path)
    img = load_image(path)
    assert img.format == "png" and (img.width, img.height) == (512, 512)
    assert img.pixels.dtype == np.uint8 and img.pixels.shape == (512, 512, 3)
    assert np.array_equal(img.pixels, pixels)
    assert img.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()


def test_jpeg_is_decoded_close_to_source(tmp_path):
    pixels = skdata.chelsea()
    path = tmp_path / "cat.jpg"
    Image.fromarray(pixels).save(path, quality=95)
    img = load_image(path)
    assert img.format == "jpeg" and img.pixels.shape == pixels.shape
    assert np.abs(img.pixels.astype(int) - pixels.astype(int)).mean() < 3


def test_grey_and_16bit_png_become_rgb(tmp_path):
    grey = skdata.camera()
    Image.fromarray(grey).save(tmp_path / "grey.png")
    img = load_image(tmp_path / "grey.png")
    assert img.pixels.shape == grey.shape + (3,)
    assert np.array_equal(img.pixels[:, :, 0], grey) and np.array_equal(img.pixels[:, :, 2], grey)

    deep = (grey.astype(np.uint16) * 200 + 1000)  # 1000 .. 52000, a 16-bit grey image
    Image.fromarray(deep).save(tmp_path / "deep.png")
    img16 = load_image(tmp_path / "deep.png")
    assert img16.pixels.dtype == np.uint8 and img16.pixels.shape == grey.shape + (3,)
    assert img16.pixels.min() == 0 and img16.pixels.max() == 255  # min/max window over the real range
    assert img16.meta["window"]["min"] == float(deep.min())
    # monotone mapping: brighter input stays brighter
    flat_in, flat_out = deep.ravel(), img16.pixels[:, :, 0].ravel()
    order = np.argsort(flat_in, kind="stable")
    assert np.all(np.diff(flat_out[order].astype(int)) >= 0)


def test_rgba_is_composited_on_black(tmp_path):
    rgba = np.zeros((8, 8, 4), dtype=np.uint8)
    rgba[..., 0] = 200
    rgba[:4, :, 3] = 255  # top half opaque red, bottom half fully transparent
    Image.fromarray(rgba, "RGBA").save(tmp_path / "alpha.png")
    img = load_image(tmp_path / "alpha.png")
    assert img.pixels[0, 0].tolist() == [200, 0, 0]
    assert img.pixels[7, 7].tolist() == [0, 0, 0]


def test_empty_file_is_input_error(tmp_path):
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(InputError, match="empty"):
        load_image(tmp_path / "empty.png")


def test_missing_file_is_input_error(tmp_path):
    with pytest.raises(InputError, match="not found"):
        load_image(tmp_path / "nope.png")


def test_text_file_named_png_is_input_error(tmp_path):
    (tmp_path / "notes.png").write_text("this is not an image\n" * 20)
    with pytest.raises(InputError, match="not a recognised image"):
        load_image(tmp_path / "notes.png")


def test_truncated_png_is_input_error(tmp_path):
    path = tmp_path / "full.png"
    Image.fromarray(skdata.astronaut()).save(path)
    data = path.read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 3])
    with pytest.raises(InputError, match="corrupt or truncated"):
        load_image(tmp_path / "cut.png")


def test_truncated_jpeg_is_input_error(tmp_path):
    path = tmp_path / "full.jpg"
    Image.fromarray(skdata.chelsea()).save(path)
    (tmp_path / "cut.jpg").write_bytes(path.read_bytes()[:2000])
    with pytest.raises(InputError):
        load_image(tmp_path / "cut.jpg")


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def _bomb_png(width: int, height: int) -> bytes:
    """A tiny file whose header declares a huge greyscale image (the payload is a few compressed zero rows)."""
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    rows = zlib.compress(b"\x00" * (width + 1) * 4, 9)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", rows) + _png_chunk(b"IEND", b"")


def test_decompression_bomb_is_refused_before_decoding(tmp_path):
    path = tmp_path / "bomb.png"
    path.write_bytes(_bomb_png(30_000, 30_000))  # 900 MP declared, ~1 KB on disk
    assert path.stat().st_size < 10_000
    with pytest.raises(InputError, match="too large"):
        load_image(path)


def test_pillow_bomb_guard_also_becomes_input_error(tmp_path):
    # With our own limit lifted, Pillow's DecompressionBombError (>2x its MAX_IMAGE_PIXELS) must still be caught.
    path = tmp_path / "bomb.png"
    path.write_bytes(_bomb_png(20_000, 20_000))
    with pytest.raises(InputError, match="too large"):
        load_image(path, max_pixels=10**12)


def test_multiframe_gif_picks_middle_frame(tmp_path):
    frames = [Image.new("RGB", (4, 4), (v, v, v)) for v in (10, 120, 240)]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:])
    img = load_image(tmp_path / "anim.gif")
    assert img.meta["number_of_frames"] == 3 and img.meta["frame_index"] == 1
    assert abs(int(img.pixels[0, 0, 0]) - 120) <= 2
    with pytest.raises(InputError, match="out of range"):
        load_image(tmp_path / "anim.gif", frame=3)


# ---------------------------------------------------------------- DICOM


def test_ct_small_rescaled_and_windowed():
    path = _fixture_dicom("CT_small.dcm")
    img = load_image(path)
    ds = pydicom.dcmread(path)
    assert img.format == "dicom" and img.pixels.shape == (128, 128, 3)
    assert img.meta["modality"] == "CT" and img.meta["study_date"] == str(ds.StudyDate)
    # CT_small has no window: min/max over Hounsfield units (stored * slope + intercept).
    hu = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    assert img.meta["window"] == {"type": "min_max", "min": float(hu.min()), "max": float(hu.max())}
    expected = (hu - hu.min()) * 255.0 / (hu.max() - hu.min())
    assert np.abs(img.pixels[:, :, 0] - expected).max() <= 0.5 + 1e-6  # rounding only


def test_mr_small_uses_dicom_window():
    path = _fixture_dicom("MR_small.dcm")
    ds = pydicom.dcmread(path)
    img = load_image(path)
    center, width = float(ds.WindowCenter), float(ds.WindowWidth)
    assert img.meta["window"] == {"type": "dicom", "center": center, "width": width}
    values = ds.pixel_array.astype(float) * float(ds.get("RescaleSlope", 1)) + float(ds.get("RescaleIntercept", 0))
    lo, hi = center - width / 2, center + width / 2
    expected = (np.clip(values, lo, hi) - lo) * 255.0 / (hi - lo)
    assert np.abs(img.pixels[:, :, 1] - expected).max() <= 0.5 + 1e-6  # rounding only


def test_dicom_detected_by_preamble_not_extension(tmp_path):
    path = tmp_path / "scan.png"  # misnamed, but carries the DICM preamble
    path.write_bytes(open(_fixture_dicom("MR_small.dcm"), "rb").read())
    assert load_image(path).format == "dicom"


def test_multiframe_dicom_middle_and_chosen_frame():
    path = _fixture_dicom("rtdose.dcm")
    frames = pydicom.dcmread(path).pixel_array
    n = frames.shape[0]
    middle = load_image(path)
    assert middle.meta["number_of_frames"] == n and middle.meta["frame_index"] == n // 2
    first = load_image(path, frame=0)
    assert first.meta["frame_index"] == 0
    assert not np.array_equal(first.pixels, middle.pixels)
    with pytest.raises(InputError, match="out of range"):
        load_image(path, frame=n)


def test_monochrome1_is_inverted():
    import os

    base = os.path.dirname(_fixture_dicom("CT_small.dcm"))
    path = os.path.join(base, "dicomdirtests", "77654033", "CR1", "6154")
    if not os.path.exists(path):
        pytest.skip("MONOCHROME1 test file not bundled")
    ds = pydicom.dcmread(path)
    assert ds.PhotometricInterpretation == "MONOCHROME1"
    img = load_image(path)
    assert img.meta.get("inverted") is True
    raw = ds.pixel_array.astype(float)
    # the brightest stored value must come out darkest
    assert img.pixels[..., 0][raw == raw.max()].mean() < img.pixels[..., 0][raw == raw.min()].mean()


@pytest.mark.parametrize("name", ["examples_rgb_color.dcm", "SC_ybr_full_422_uncompressed.dcm", "SC_rgb_rle.dcm"])
def test_colour_dicom_is_rgb(name):
    img = load_image(_fixture_dicom(name))
    assert img.pixels.ndim == 3 and img.pixels.shape[2] == 3 and img.pixels.dtype == np.uint8
    assert img.meta["window"] == {"type": "none"}


def test_ybr_and_rgb_versions_of_the_same_picture_agree():
    rgb = load_image(_fixture_dicom("SC_rgb_rle.dcm")).pixels.astype(int)
    ybr = load_image(_fixture_dicom("SC_ybr_full_422_uncompressed.dcm")).pixels.astype(int)
    assert rgb.shape == ybr.shape
    assert np.abs(rgb - ybr).mean() < 4  # colour conversion rounding only; an unconverted YBR image is far off


def test_compressed_dicom_without_decoder_names_transfer_syntax():
    try:
        from pydicom.pixels.decoders import JPEGLSLosslessDecoder

        if JPEGLSLosslessDecoder.is_available:
            pytest.skip("a JPEG-LS decoder is installed here")
    except ImportError:  # pydicom 2.x
        pass
    with pytest.raises(InputError, match="JPEG-LS"):
        load_image(_fixture_dicom("MR_small_jpeg_ls_lossless.dcm"))


def test_truncated_dicom_is_input_error(tmp_path):
    data = open(_fixture_dicom("MR_small.dcm"), "rb").read()
    path = tmp_path / "cut.dcm"
    path.write_bytes(data[: len(data) - 3000])
    with pytest.raises(InputError):
        load_image(path)


def _identified_dicom(tmp_path):
    ds = pydicom.dcmread(_fixture_dicom("CT_small.dcm"))
    ds.PatientName = SECRETS[0]
    ds.PatientID = SECRETS[1]
    ds.PatientBirthDate = SECRETS[2]
    ds.AccessionNumber = SECRETS[3]
    ds.InstitutionName = SECRETS[4]
    ds.ReferringPhysicianName = SECRETS[5]
    ds.OtherPatientIDs = SECRETS[6]
    ds.StudyID = SECRETS[7]
    ds.PatientAddress = SECRETS[8]
    ds.BodyPartExamined = "CHEST"
    path = tmp_path / "identified.dcm"
    ds.save_as(path)
    return path, ds


def test_patient_identifiers_never_leave_load_image(tmp_path):
    path, _ = _identified_dicom(tmp_path)
    img = load_image(path)
    assert img.meta["body_part"] == "CHEST"
    exposed = " ".join([repr(img), str(img), repr(img.meta), str(img.meta)])
    for secret in SECRETS:
        assert secret not in exposed and secret.split("^")[0] not in exposed
    assert set(img.meta) <= set(DICOM_META_ALLOWLIST.values()) | {
        "window", "frame_index", "number_of_frames", "transfer_syntax", "inverted"}


def test_patient_identifiers_never_in_error_messages(tmp_path):
    path, ds = _identified_dicom(tmp_path)
    data = path.read_bytes()
    bad_paths = []
    cut = tmp_path / "cut.dcm"
    cut.write_bytes(data[: len(data) - 5000])  # pixel data truncated, header with identifiers intact
    bad_paths.append(cut)
    del ds.PixelData
    nopix = tmp_path / "nopix.dcm"
    ds.save_as(nopix)
    bad_paths.append(nopix)
    for bad in bad_paths:
        with pytest.raises(InputError) as info:
            load_image(bad)
        message = str(info.value)
        assert "\n" not in message
        for secret in SECRETS:
            assert secret not in message


def test_loaded_image_is_plain_dataclass():
    img = load_image(_fixture_dicom("MR_small.dcm"))
    assert isinstance(img, LoadedImage) and img.width == 64 and img.height == 64


def test_patient_identifiers_never_in_logs_or_warnings(tmp_path, caplog, recwarn):
    import logging

    path, ds = _identified_dicom(tmp_path)
    ds.PatientID = SECRETS[1] * 8  # longer than VR LO allows: pydicom's validator would quote it
    ds.AccessionNumber = SECRETS[3] + "!" * 20
    ds.save_as(path)
    caplog.set_level(logging.DEBUG)
    load_image(path)
    cut = tmp_path / "cut.dcm"
    cut.write_bytes(path.read_bytes()[:-5000])
    with pytest.raises(InputError):
        load_image(cut)
    emitted = " ".join([r.getMessage() for r in caplog.records] + [str(w.message) for w in recwarn])
    for secret in SECRETS:
        assert secret not in emitted

