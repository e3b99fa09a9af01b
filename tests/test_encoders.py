"""Encoders with the real installed models (MiniLM int8 ONNX, EfficientNet-Lite0 ONNX) on small real data."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
from skimage import data as skdata

from medrwr_edge import assets
from medrwr_edge.errors import InputError, IntegrityError, ModelError
from medrwr_edge.kb_pack import encoders
from medrwr_edge.kb_pack.encoders import EncoderSpec, ImageEncoder, TextEncoder, load_encoder, make_session, read_spec

NOT_INSTALLED = "encoder not installed; run `medrwr-edge models install --smoke` first"


def _installed_dir(name):
    try:
        return assets.installed_path(name)
    except ModelError:
        pytest.skip(f"{name}: {NOT_INSTALLED}")


@pytest.fixture(scope="module")
def text_dir():
    return _installed_dir(assets.MINILM)


@pytest.fixture(scope="module")
def image_dir():
    return _installed_dir(assets.EFFICIENTNET)


@pytest.fixture(scope="module")
def text_encoder(text_dir):
    return load_encoder(text_dir, prefer_gpu=False)


@pytest.fixture(scope="module")
def image_encoder(image_dir):
    return load_encoder(image_dir, prefer_gpu=False)


@pytest.fixture
def text_copy(text_dir, tmp_path):
    dest = tmp_path / "enc"
    shutil.copytree(text_dir, dest)
    return dest


def _rewrite_spec(folder, **changes):
    spec = json.loads((folder / "encoder.json").read_text())
    spec.update(changes)
    (folder / "encoder.json").write_text(json.dumps(spec))


# ---------------------------------------------------------------- text


def test_text_encoder_identity(text_encoder):
    assert isinstance(text_encoder, TextEncoder)
    assert text_encoder.kind == "text" and text_encoder.dim == 384
    assert text_encoder.sha256 == assets.MINILM_ONNX.sha256
    assert text_encoder.provider == "CPUExecutionProvider"


def test_text_vectors_are_normalised_float32(text_encoder):
    vectors = text_encoder.embed(["Type 2 diabetes mellitus without complications", "Essential hypertension", ""])
    assert vectors.shape == (3, 384) and vectors.dtype == np.float32
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)


def test_text_similarity_is_meaningful(text_encoder):
    a, b, c = text_encoder.embed(["heart attack", "acute myocardial infarction", "fracture of the left femur"])
    assert a @ b > a @ c + 0.15


def test_bucketed_batches_keep_input_order(text_encoder):
    texts = ["short", "a considerably longer description of chronic obstructive pulmonary disease with exacerbation",
             "medium length sentence about asthma", "x", "Malignant neoplasm of upper lobe, right bronchus or lung"] * 7
    together = text_encoder.embed(texts, batch_size=4)
    alone = np.stack([text_encoder.embed([t])[0] for t in texts[:5]])
    # int8 dynamic quantisation scales per batch, so padding/batch-mates shift values slightly, never the meaning.
    assert np.all(np.sum(together[:5] * alone, axis=1) > 0.995)
    plain = text_encoder.embed(texts, batch_size=4, bucketed=False)
    assert np.all(np.sum(together * plain, axis=1) > 0.995)
    assert np.all(np.sum(together[:5] * together[5:10], axis=1) > 0.999)  # repeats land back in their own slots


def test_tokenize_slices_keep_input_order(text_encoder, monkeypatch):
    texts = [f"patient {i} with " + "fever " * (i % 13) for i in range(50)]
    whole = text_encoder.embed(texts)
    monkeypatch.setattr(encoders, "TOKENIZE_SLICE", 7)  # 8 slices, the last one partial
    sliced = text_encoder.embed(texts)
    assert np.all(np.sum(whole * sliced, axis=1) > 0.999)
    assert np.argmax(sliced @ whole[17]) == 17


def test_long_text_is_truncated_not_rejected(text_encoder):
    long = " ".join(["pneumonia"] * 3000)
    vec = text_encoder.embed([long])
    assert vec.shape == (1, 384) and np.isfinite(vec).all()
    assert len(text_encoder.tokenizer.encode(long).ids) == 256


def test_empty_list_and_bad_input(text_encoder):
    assert text_encoder.embed([]).shape == (0, 384)
    with pytest.raises(InputError):
        text_encoder.embed("not a list")
    with pytest.raises(InputError):
        text_encoder.embed(["ok", 3])


def test_query_prefix_is_applied(text_copy, text_encoder):
    _rewrite_spec(text_copy, query_prefix="query: ", document_prefix="passage: ")
    prefixed = load_encoder(text_copy, prefer_gpu=False)
    q = prefixed.embed(["chest pain"], is_query=True)
    d = prefixed.embed(["chest pain"])
    assert np.allclose(q, text_encoder.embed(["query: chest pain"]), atol=1e-5)
    assert np.allclose(d, text_encoder.embed(["passage: chest pain"]), atol=1e-5)
    assert not np.allclose(q, d, atol=1e-3)


# ---------------------------------------------------------------- spec and integrity


def test_spec_round_trip(text_dir):
    spec = read_spec(text_dir)
    assert EncoderSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec


def test_spec_unknown_or_missing_field_is_integrity_error(text_dir):
    data = read_spec(text_dir).to_dict()
    with pytest.raises(IntegrityError, match="unknown fields: colour"):
        EncoderSpec.from_dict({**data, "colour": "red"})
    del data["max_length"]
    with pytest.raises(IntegrityError, match="missing fields: max_length"):
        EncoderSpec.from_dict(data)


def test_flipped_byte_in_onnx_is_caught_before_loading(text_copy, monkeypatch):
    model = text_copy / "model.onnx"
    raw = bytearray(model.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    model.write_bytes(bytes(raw))
    monkeypatch.setattr(encoders, "make_session", lambda *a, **k: pytest.fail("loaded a tampered model"))
    with pytest.raises(IntegrityError) as info:
        load_encoder(text_copy)
    message = str(info.value)
    assert "model.onnx" in message and assets.MINILM_ONNX.sha256 in message


def test_tampered_tokenizer_is_integrity_error(text_copy):
    tok = text_copy / "tokenizer.json"
    tok.write_text(tok.read_text().replace('"[UNK]"', '"[UNKNOWN]"', 1))
    with pytest.raises(IntegrityError, match="tokenizer.json"):
        load_encoder(text_copy)


def test_missing_files_are_model_errors(text_copy, tmp_path):
    (text_copy / "tokenizer.json").unlink()
    with pytest.raises(ModelError, match="missing"):
        load_encoder(text_copy)
    with pytest.raises(ModelError, match="no encoder.json"):
        load_encoder(tmp_path)
    with pytest.raises(ModelError, match="not found"):
        load_encoder(tmp_path / "nowhere")


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_broken_onnx_with_matching_hash_is_one_line_model_error(text_copy, damage):
    model = text_copy / "model.onnx"
    if damage == "garbage":
        model.write_bytes(b"this is not a protobuf at all \x00\x01\x02" * 100)
    else:
        model.write_bytes(model.read_bytes()[:100_000])
    from medrwr_edge.paths import sha256_file

    _rewrite_spec(text_copy, onnx_sha256=sha256_file(model))
    with pytest.raises(ModelError) as info:
        load_encoder(text_copy)
    assert "\n" not in str(info.value) and "model.onnx" in str(info.value)


# ---------------------------------------------------------------- sessions / providers


def test_make_session_cpu_when_gpu_not_wanted(text_dir):
    session, provider, note = make_session(text_dir / "model.onnx", prefer_gpu=False)
    assert provider == "CPUExecutionProvider" and note == ""
    assert {i.name for i in session.get_inputs()} == {"input_ids", "attention_mask", "token_type_ids"}


def test_make_session_says_when_gpu_is_unavailable(text_dir, monkeypatch):
    import onnxruntime as ort

    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CPUExecutionProvider"])
    _, provider, note = make_session(text_dir / "model.onnx", prefer_gpu=True)
    assert provider == "CPUExecutionProvider" and "GPU requested" in note


@pytest.mark.filterwarnings("ignore:Specified provider 'CUDAExecutionProvider'")
def test_make_session_falls_back_when_cuda_cannot_start(text_dir, monkeypatch):
    import onnxruntime as ort

    real = ort.get_available_providers()
    if "CUDAExecutionProvider" in real:
        pytest.skip("a real CUDA provider is present; fallback cannot be simulated")
    # Pretend CUDA is offered; the CPU-only build then cannot create it and ORT falls back to CPU.
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    _, provider, note = make_session(text_dir / "model.onnx", prefer_gpu=True)
    assert provider == "CPUExecutionProvider" and "CUDAExecutionProvider" in note


def test_physical_cores_is_sane():
    import os

    assert 1 <= encoders.physical_cores() <= (os.cpu_count() or 1)


# ---------------------------------------------------------------- image


def test_image_encoder_vectors(image_encoder):
    assert isinstance(image_encoder, ImageEncoder) and image_encoder.dim == 1280 and image_encoder.kind == "image"
    cat, coffee = skdata.chelsea(), skdata.coffee()
    vectors = image_encoder.embed([cat, coffee, cat[:, ::-1].copy()])
    assert vectors.shape == (3, 1280) and vectors.dtype == np.float32
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    # a mirrored cat is much closer to the cat than coffee is
    assert vectors[0] @ vectors[2] > vectors[0] @ vectors[1] + 0.2


def test_image_embedding_is_batch_independent(image_encoder):
    imgs = [skdata.chelsea(), skdata.astronaut(), np.repeat(skdata.camera()[:, :, None], 3, axis=2)]
    batched = image_encoder.embed(imgs, batch_size=3)
    single = np.concatenate([image_encoder.embed([im]) for im in imgs])
    assert np.allclose(batched, single, atol=1e-5)


def test_image_preprocess_matches_spec(image_encoder):
    spec = image_encoder.spec
    x = image_encoder.preprocess(skdata.astronaut())
    assert x.shape == (3, spec.image_size, spec.image_size) and x.dtype == np.float32
    assert x.min() >= (0 - 127) / 128 - 1e-6 and x.max() <= (255 - 127) / 128 + 1e-6
    white = image_encoder.preprocess(np.full((50, 80, 3), 255, dtype=np.uint8))
    assert np.allclose(white, (255 - 127) / 128)


@pytest.mark.parametrize("bad", [np.zeros((10, 10), np.uint8), np.zeros((10, 10, 3), np.float32),
                                 np.zeros((10, 10, 4), np.uint8), "image.png"])
def test_image_encoder_rejects_wrong_arrays(image_encoder, bad):
    with pytest.raises(InputError):
        image_encoder.embed([bad])


def test_image_encoder_dir_hash_matches_installed_record(image_dir):
    record = json.loads((image_dir / "installed.json").read_text())
    assert read_spec(image_dir).onnx_sha256 == record["sha256"] == record["files"]["model.onnx"]["sha256"]


def test_export_without_torch_says_how_to_install(monkeypatch):
    from medrwr_edge.export import image_encoder as exporter

    monkeypatch.setitem(sys.modules, "torch", None)  # makes `import torch` raise ImportError
    with pytest.raises(ModelError, match=r"pip install 'medrwr-edge\[export\]'"):
        exporter._require_torch()


def test_runtime_modules_do_not_import_torch():
    import subprocess

    code = ("import sys, medrwr_edge.kb_pack.encoders, medrwr_edge.imaging, medrwr_edge.assets; "
            "bad = [m for m in ('torch', 'transformers') if m in sys.modules]; print(bad); sys.exit(1 if bad else 0)")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True).returncode == 0


def test_export_reproduces_installed_encoder(image_dir, tmp_path):
    """Re-export from the cached PyPI archives: ORT/torch parity holds and the bytes match the installed hash."""
    import os

    pytest.importorskip("torch")
    cache = os.environ.get(assets.CACHE_ENV)
    if not cache:
        pytest.skip(f"set {assets.CACHE_ENV} to the install download cache to re-run the export")
    from medrwr_edge.export.image_encoder import PARITY_FAIL, export_image_encoder

    weights_archive = assets._cached_archive(Path(cache), assets.EFFICIENTNET_WEIGHTS)
    arch_archive = assets._cached_archive(Path(cache), assets.EFFICIENTNET_ARCH)
    if weights_archive is None or arch_archive is None:
        pytest.skip("EfficientNet archives not in the download cache")
    weights = tmp_path / "w.pth"
    assets._extract_checked(weights_archive, assets.EFFICIENTNET_WEIGHTS, weights)
    import zipfile

    with zipfile.ZipFile(arch_archive) as zf:
        zf.extractall(tmp_path / "arch")
    spec, diff = export_image_encoder(tmp_path / "out", weights, tmp_path / "arch")
    assert diff < PARITY_FAIL / 10
    assert spec.onnx_sha256 == read_spec(image_dir).onnx_sha256  # deterministic with this torch version
