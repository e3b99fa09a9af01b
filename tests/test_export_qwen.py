"""Export of a Qwen2.5-VL checkpoint (tiny, random, generated here) to GGUF + ONNX vision, with parity to torch."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from fixtures_qwen import (
    converter_source,
    make_tiny_qwen25vl,
    require_export_deps,
    tiny_bundle,
    tiny_checkpoint,
    tiny_f32_gguf,
    tiny_image,
)
from medrwr_edge.errors import InputError, IntegrityError
from medrwr_edge.paths import sha256_file

TEXT_ATOL = 1e-2
VISION_ATOL = 1e-4


@pytest.fixture(scope="module")
def ckpt():
    return tiny_checkpoint()


@pytest.fixture(scope="module")
def hf_model(ckpt):
    from medrwr_edge.export.parity import torch_model

    return torch_model(ckpt)


@pytest.fixture(scope="module")
def spec(ckpt):
    from medrwr_edge.runtime.vision import VisionSpec

    return VisionSpec.from_hf(json.loads((ckpt / "config.json").read_text()),
                              json.loads((ckpt / "preprocessor_config.json").read_text()))


def test_tiny_checkpoint_is_a_small_qwen25vl(ckpt, hf_model):
    config = json.loads((ckpt / "config.json").read_text())
    assert config["architectures"] == ["Qwen2_5_VLForConditionalGeneration"]
    assert config["vision_config"]["depth"] >= 3 and config["vision_config"]["fullatt_block_indexes"]
    size = sum(f.stat().st_size for f in ckpt.iterdir())
    assert size < 5_000_000
    assert json.loads((ckpt / "preprocessor_config.json").read_text())["max_pixels"] == 262144


@pytest.mark.parametrize("size", [(300, 220), (1000, 700), (40, 30), (37, 500)])
def test_numpy_preprocessing_equals_the_hf_processor(ckpt, spec, size):
    from transformers import AutoImageProcessor

    from medrwr_edge.runtime.vision import preprocess

    img = tiny_image(*size, seed=size[0])
    ref = AutoImageProcessor.from_pretrained(ckpt, use_fast=False)(images=[img], return_tensors="np")
    patches, grid = preprocess(img, spec)
    assert list(grid) == ref["image_grid_thw"][0].tolist()
    assert patches.shape == ref["pixel_values"].shape
    assert np.abs(patches - ref["pixel_values"]).max() < 1e-6
    assert grid[1] * grid[2] * 14 * 14 <= 262144  # the training pixel budget holds for large images


def test_onnx_vision_matches_torch(tmp_path, ckpt, hf_model, spec):
    from medrwr_edge.export import qwen_vision as QV
    from medrwr_edge.runtime.vision import preprocess

    onnx_path = QV.export_vision_onnx(hf_model, spec, tmp_path / "vision.onnx", tiny_image(224, 168))
    # other sizes than the traced one: the graph is dynamic in the number of patches and windows
    for img in (tiny_image(300, 220, 1), tiny_image(500, 120, 2), tiny_image(56, 56, 3)):
        patches, grid = preprocess(img, spec)
        ref = QV.torch_reference(hf_model, patches, grid)
        out = QV.onnx_embeds(onnx_path, spec, img)
        assert out.shape == ref.shape == (grid[1] * grid[2] // 4, 64)
        assert np.abs(out - ref).max() < VISION_ATOL


def test_pooled_image_encoder_matches_torch_and_loads_as_pack_encoder(tmp_path, hf_model, spec):
    from PIL import Image

    from medrwr_edge.export.qwen_image_encoder import export_image_encoder, torch_pooled_reference
    from medrwr_edge.export.qwen_vision import visual_module
    from medrwr_edge.kb_pack.encoders import load_encoder

    visual = visual_module(hf_model)
    export_image_encoder(visual, spec, tmp_path, name="tiny-qwen-vision", size=224)  # 8x8 merged: 4 windows
    enc = load_encoder(tmp_path, prefer_gpu=False)
    assert enc.kind == "image" and enc.dim == 64
    images = [tiny_image(300, 220, 1), tiny_image(150, 150, 2), tiny_image(64, 200, 3)]
    got = enc.embed(images)
    for img, vec in zip(images, got):
        square = np.asarray(Image.fromarray(img).resize((224, 224), Image.BICUBIC))
        assert np.abs(vec - torch_pooled_reference(visual, spec, square)).max() < 1e-4
    assert abs(float(got[0] @ got[1])) < 0.9999  # different images, different vectors


def test_gguf_f32_text_logits_match_torch(ckpt, hf_model):
    from transformers import AutoTokenizer

    from medrwr_edge.export.parity import TEXT_PROMPT, max_diff, torch_text_logits
    from medrwr_edge.runtime import llama_native

    gguf = tiny_f32_gguf()
    ref, ids = torch_text_logits(hf_model, AutoTokenizer.from_pretrained(ckpt), TEXT_PROMPT)
    model = llama_native.NativeModel(gguf)
    assert model.tokenize(TEXT_PROMPT, add_special=True) == ids  # same tokenizer after conversion
    ctx = llama_native.NativeContext(model, 512, 512, 2)
    ctx.decode_tokens(ids, 0)
    out = np.array(ctx.last_logits())
    ctx.close()
    model.close()
    assert max_diff(out, ref) < TEXT_ATOL
    assert out[: ref.shape[0]].argmax() == ref.argmax()


@pytest.mark.slow
def test_export_writes_a_verified_bundle_with_parity_results():
    bundle = tiny_bundle()
    m = json.loads((bundle / "manifest.json").read_text())
    assert m["format"] == "medrwr-edge/model-bundle/1"
    assert m["text_model"] == "text-q8_0.gguf" and m["quantization"]["text"] == "q8_0"
    assert m["vision_encoder"] == "vision-int8.onnx" and m["mmproj"].startswith("mmproj-")
    assert m["image_encoder"] == "image-encoder" and "image-encoder/encoder.json" in m["files"]
    assert len(m["llama_cpp"]["commit"]) == 40 and m["llama_cpp"]["llama_cpp_python"] == "0.3.36"
    assert set(m["source"]["files"]) >= {"config.json", "model.safetensors", "tokenizer.json",
                                         "preprocessor_config.json"}
    for name, entry in m["files"].items():
        assert sha256_file(bundle / name) == entry["sha256"]
    assert not any(p.name.startswith(".") for p in bundle.parent.iterdir() if p.name.endswith(".partial"))
    p = m["parity"]
    assert p["text_logits_max_abs_diff"] < TEXT_ATOL
    assert p["image_text_logits_max_abs_diff"] < TEXT_ATOL and p["top_token_agrees"]
    # negative control: 1-D positions for the image tokens must fail the same tolerance by a wide margin
    assert p["negative_control_1d_positions_max_abs_diff"] > 10 * TEXT_ATOL
    assert p["quantised_top_token_agrees"] and p["quantised_image_text_logits_max_abs_diff"] < 0.5
    # the gates: which reference ran, on how many probes, and the bounds it was held to (relative to logit scale)
    assert p["method"] == "full" and p["probes"]["text"] == 4 and p["probes"]["image_text"] == 1
    assert p["bounds"]["text_rel"] == 5e-3 and p["text_logits_max_rel_diff"] <= p["bounds"]["text_rel"]
    assert p["negative_control_1d_positions_rel_diff"] >= p["bounds"]["negative_control_min_rel"]
    assert p["quantised_top1_agreement"] == 1.0 and p["bounds"]["quantised_min_top1_agreement"] == 1.0
    from medrwr_edge.export.bundle import parity_summary

    assert parity_summary(m).startswith("parity (full): text ") and "quantised top-1 agreement 100%" in parity_summary(m)
    assert max(r["max_abs_diff"] for r in p["vision_onnx"]["fp32"]) < VISION_ATOL
    assert p["vision_onnx"]["int8"]["min_token_cosine"] >= 0.99 and p["vision_onnx"]["int8"]["kept"]


# ---------------------------------------------------------------------------------------------- bad input


def _copy_ckpt(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_other_architecture_is_refused(tmp_path, ckpt):
    from medrwr_edge.export.qwen import check_checkpoint

    bad = _copy_ckpt(ckpt, tmp_path / "bert")
    cfg = json.loads((bad / "config.json").read_text())
    cfg["architectures"], cfg["model_type"] = ["BertModel"], "bert"
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(InputError, match="BertModel checkpoint, not Qwen2.5-VL"):
        check_checkpoint(bad)


@pytest.mark.parametrize("missing,message", [
    ("tokenizer.json", "no tokenizer"),
    ("preprocessor_config.json", "no preprocessor_config.json"),
    ("model.safetensors", "no \\*.safetensors"),
    ("config.json", "no config.json"),
])
def test_incomplete_checkpoint_is_refused(tmp_path, ckpt, missing, message):
    from medrwr_edge.export.qwen import check_checkpoint

    bad = _copy_ckpt(ckpt, tmp_path / "ck")
    (bad / missing).unlink()
    with pytest.raises(InputError, match=message):
        check_checkpoint(bad)


def test_not_enough_disk_is_refused_before_writing(tmp_path, ckpt, monkeypatch):
    from medrwr_edge.export import qwen

    monkeypatch.setattr(qwen.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**9, 10**9 - 1000, 1000))
    out = tmp_path / "bundle"
    with pytest.raises(InputError, match="not enough disk space"):
        qwen.export_model(ckpt, out, quant="f32")
    assert not out.exists()


def test_interrupted_export_leaves_no_partial_output(tmp_path, ckpt, monkeypatch):
    from medrwr_edge.export import qwen

    converter_source()
    real = qwen.convert_gguf

    def convert_then_interrupt(ck, src, out_file, outtype, mmproj=False):
        real(ck, src, out_file, outtype, mmproj)
        raise KeyboardInterrupt

    monkeypatch.setattr(qwen, "convert_gguf", convert_then_interrupt)
    out = tmp_path / "bundle"
    with pytest.raises(KeyboardInterrupt):
        qwen.export_model(ckpt, out, quant="f32", mmproj=False, parity=False)
    assert list(tmp_path.iterdir()) == []  # neither OUT nor a hidden partial directory


def test_existing_output_and_bad_quant_are_refused(tmp_path, ckpt):
    from medrwr_edge.export.qwen import export_model

    (tmp_path / "out").mkdir()
    with pytest.raises(InputError, match="already exists"):
        export_model(ckpt, tmp_path / "out")
    with pytest.raises(InputError, match="--quant must be one of"):
        export_model(ckpt, tmp_path / "new", quant="q3")


def test_swapped_converter_sdist_is_refused(tmp_path):
    from medrwr_edge.export.llama_cpp_src import obtain

    fake = tmp_path / "llama_cpp_python-0.3.36.tar.gz"
    fake.write_bytes(b"not the sdist")
    with pytest.raises(IntegrityError, match="not the llama-cpp-python 0.3.36 sdist"):
        obtain(fake)


def test_cli_reports_bad_checkpoint_in_one_line(tmp_path, capsys):
    import typer

    from medrwr_edge.export.cli import register

    app = typer.Typer()

    @app.callback()
    def _root() -> None:
        pass

    register(app)
    (tmp_path / "ck").mkdir()
    (tmp_path / "ck" / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    from medrwr_edge.errors import MedrwrError

    with pytest.raises(MedrwrError) as e:
        app(["export", str(tmp_path / "ck"), str(tmp_path / "out")], standalone_mode=False)
    assert "LlamaForCausalLM checkpoint, not Qwen2.5-VL" in str(e.value) and "\n" not in str(e.value)
    assert e.value.exit_code == 2 and not (tmp_path / "out").exists()


def test_runtime_vision_and_backend_do_not_import_torch():
    import subprocess
    import sys

    code = ("import sys, medrwr_edge.runtime.vision, medrwr_edge.runtime.multimodal_backend, "
            "medrwr_edge.export.bundle; bad = [m for m in ('torch', 'transformers') if m in sys.modules]; "
            "print(bad); sys.exit(1 if bad else 0)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_second_tiny_checkpoint_is_different(tmp_path):
    """The generator is seeded: another seed gives other weights (so parity tests are not vacuous)."""
    require_export_deps()
    from safetensors.numpy import load_file

    a = load_file(str(make_tiny_qwen25vl(tmp_path / "a", seed=1) / "model.safetensors"))
    b = load_file(str(tiny_checkpoint() / "model.safetensors"))
    key = next(k for k in a if k.endswith("qkv.weight"))
    assert a[key].shape == b[key].shape and not np.allclose(a[key], b[key])


# ---------------------------------------------------------------------------------------------- parity gates


def _corrupt_gguf_tensor(path: Path, name: str, factor: float) -> None:
    """Scale one f32 tensor of a GGUF in place: what a converter bug (wrong transpose, scale, permutation) does."""
    import subprocess
    import sys

    code = ("import sys; sys.path.insert(0, sys.argv[1]); from gguf import GGUFReader; "
            "t = next(t for t in GGUFReader(sys.argv[2]).tensors if t.name == sys.argv[3]); "
            "print(t.data_offset, t.n_bytes, t.tensor_type.name)")
    r = subprocess.run([sys.executable, "-c", code, str(converter_source().gguf_py), str(path), name],
                       capture_output=True, text=True, check=True)
    offset, n, kind = r.stdout.split()
    assert kind == "F32"
    with open(path, "r+b") as f:
        f.seek(int(offset))
        data = np.frombuffer(f.read(int(n)), dtype=np.float32) * factor
        f.seek(int(offset))
        f.write(data.astype(np.float32).tobytes())


@pytest.mark.slow
def test_a_corrupted_tensor_fails_parity_in_one_line_and_leaves_nothing(tmp_path, ckpt, monkeypatch):
    import typer

    from medrwr_edge.errors import MedrwrError
    from medrwr_edge.export import qwen
    from medrwr_edge.export.cli import register
    from medrwr_edge.export.parity import ParityError

    converter_source()
    real = qwen.convert_gguf

    def convert_then_corrupt(ck, src, out_file, outtype, mmproj=False):
        real(ck, src, out_file, outtype, mmproj)
        if not mmproj:
            _corrupt_gguf_tensor(out_file, "blk.1.ffn_down.weight", 1.5)
        return out_file

    monkeypatch.setattr(qwen, "convert_gguf", convert_then_corrupt)
    out = tmp_path / "out" / "bundle"
    (tmp_path / "out").mkdir()
    with pytest.raises(ParityError) as e:
        qwen.export_model(ckpt, out, quant="f32", mmproj=False, image_encoder=False)
    msg = str(e.value)
    assert msg.startswith("parity check failed: text logits (GGUF vs torch): ") and "bound <= 0.005" in msg
    assert float(msg.split(": ")[2].split()[0]) > 5e-3 and "\n" not in msg
    assert list((tmp_path / "out").iterdir()) == []  # neither the bundle nor a hidden partial directory
    # through the CLI: the same single line, a non-zero exit code
    app = typer.Typer()

    @app.callback()
    def _root() -> None:
        pass

    register(app)
    with pytest.raises(MedrwrError) as e:
        app(["export", str(ckpt), str(out), "--quant", "f32", "--no-mmproj", "--no-image-encoder"],
            standalone_mode=False)
    assert str(e.value).startswith("parity check failed: text logits") and e.value.exit_code == 1
    assert list((tmp_path / "out").iterdir()) == []


def test_layered_reference_equals_the_whole_model(ckpt, hf_model):
    """The >2 GB path's reference (one decoder layer at a time from the safetensors) gives the whole model's
    logits, text and image+text (positions from HF's get_rope_index, image rows from the torch tower)."""
    from transformers import AutoTokenizer

    from medrwr_edge.export.layered_reference import LayeredReference
    from medrwr_edge.export.parity import IMAGE_PROMPT_HEAD, IMAGE_PROMPT_TAIL, TEXT_PROBES, FullReference, image_probe

    tok = AutoTokenizer.from_pretrained(ckpt)
    text_ids = [tok(p)["input_ids"] for p in TEXT_PROBES]
    probe = image_probe(tok, ckpt, [tiny_image(300, 220, 1), tiny_image(120, 260, 2)], IMAGE_PROMPT_HEAD,
                        IMAGE_PROMPT_TAIL)
    full_texts, full_img = FullReference(hf_model).logits(text_ids, probe)
    layered = LayeredReference(ckpt)
    texts, img = layered.logits(text_ids, probe)
    assert len(texts) == len(full_texts) == 4 and len({len(i) for i in text_ids}) > 1  # padding is exercised
    for a, b in zip(texts + [img], full_texts + [full_img]):
        assert np.abs(a - b).max() < 1e-4 * np.abs(b).max()
    assert len(layered.layer_seconds) == 2 and layered.peak_layer_bytes > 0


@pytest.mark.slow
def test_large_checkpoint_path_runs_layered_parity_and_records_it(tmp_path, ckpt, monkeypatch):
    """A checkpoint over the in-RAM limit (mocked: the limit lowered below the tiny model's size) is still checked,
    layer by layer, against an f16 intermediate GGUF, and the manifest says how."""
    from medrwr_edge.export import qwen

    converter_source()
    monkeypatch.setattr(qwen, "AUTO_PARITY_MAX_BYTES", 1000)
    out = qwen.export_model(ckpt, tmp_path / "bundle", quant="q8_0", mmproj=False, image_encoder=False)
    p = json.loads((out / "manifest.json").read_text())["parity"]
    assert p["method"] == "layer-by-layer" and p["unquantised_gguf"] == "text-f16.gguf"
    assert len(p["layer_seconds"]) == 2 and p["peak_layer_bytes_f32"] > 0 and p["seconds"]["torch_reference"] > 0
    assert p["bounds"]["text_rel"] == 2e-2 and p["text_logits_max_rel_diff"] <= 2e-2
    assert p["negative_control_1d_positions_rel_diff"] >= p["bounds"]["negative_control_min_rel"]
    assert p["quantised_gguf"] == "text-q8_0.gguf" and p["quantised_top1_agreement"] == 1.0


def test_no_parity_is_recorded_and_printed_by_verify(tmp_path, ckpt):
    from typer.testing import CliRunner

    import typer

    from medrwr_edge.export import qwen
    from medrwr_edge.export.cli import register

    converter_source()
    out = qwen.export_model(ckpt, tmp_path / "bundle", quant="f32", mmproj=False, image_encoder=False, parity=False)
    p = json.loads((out / "manifest.json").read_text())["parity"]
    assert p["skipped"].startswith("--no-parity") and "text_logits_max_rel_diff" not in p
    app = typer.Typer()

    @app.callback()
    def _root() -> None:
        pass

    register(app)
    r = CliRunner().invoke(app, ["export", "verify", str(out)])
    assert r.exit_code == 0 and "parity: NOT RUN at export (--no-parity" in r.output
