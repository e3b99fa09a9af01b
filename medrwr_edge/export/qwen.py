"""`medrwr-edge export CHECKPOINT OUT`: a trained Med-RwR (Qwen2.5-VL) checkpoint -> an edge model bundle.

Steps (each reported through `progress`), all written into a temp directory renamed to OUT only at the end:

1. check the checkpoint (architecture, tokenizer, preprocessor config, weights) and the free disk space;
2. text decoder -> GGUF with llama.cpp's own converter and gguf-py (the llama-cpp-python 0.3.36 sdist, the same
   llama.cpp commit as the runtime), then `llama_model_quantize` to --quant;
3. vision tower + merger -> ONNX (`export.qwen_vision`), checked against the HF torch forward on real images;
   with --vision-int8 a dynamically quantised copy is kept only if its cosine to fp32 is >= 0.99;
4. the mmproj GGUF (llama.cpp's own vision path, for mtmd / Qwen25VLChatHandler), unless --no-mmproj;
5. parity gates (`export.parity`): the unquantised GGUF and the ONNX-embeds path against torch on a probe set,
   the negative control and the quantised top-1 agreement; the whole HF model is the reference up to 2 GB of
   weights, above that the decoder is run layer by layer (--parity forces the whole model); any check out of
   bounds fails the export and nothing is written; --no-parity skips them and the manifest says so;
6. manifest.json: source file hashes, llama.cpp commit, quantisation, sha256 of every output, parity results.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from ..errors import InputError, ModelError
from ..paths import atomic_directory, atomic_write_text, sha256_file
from ..runtime.vision import VisionSpec
from . import bundle as B

QUANTS = ("q4_k_m", "q5_k_m", "q8_0", "f16", "f32")
ARCHITECTURE = "Qwen2_5_VLForConditionalGeneration"
EXPORT_HINT = "install the exporter extras: pip install 'medrwr-edge[export]'"
VISION_PARITY_ATOL = 1e-4  # on the tests' tiny models; real models are judged relative to their magnitude
VISION_PARITY_RTOL = 1e-4
INT8_MIN_COSINE = 0.99
AUTO_PARITY_MAX_BYTES = 2 << 30  # up to 2 GB of weights the whole torch model is the reference; above, layer by layer
DRIVER = Path(__file__).with_name("_gguf_convert_driver.py")

Progress = Callable[[str], None]


@dataclass
class Checkpoint:
    path: Path
    config: dict
    preprocessor: dict
    weight_files: list[Path]
    weight_bytes: int
    source_files: dict[str, str] = field(default_factory=dict)  # name -> sha256 (filled by hash_sources)

    @property
    def vision_config(self) -> dict:
        return self.config["vision_config"]


def check_checkpoint(path: str | Path) -> Checkpoint:
    """Refuse anything that is not a complete Qwen2.5-VL checkpoint, with the reason in one line."""
    p = Path(path)
    if not p.is_dir():
        raise InputError(f"checkpoint directory not found: {p}")
    cfg_path = p / "config.json"
    if not cfg_path.is_file():
        raise InputError(f"{p} has no config.json: not a Hugging Face checkpoint")
    try:
        config = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(f"{cfg_path} is not valid JSON: {e}") from None
    arch = (config.get("architectures") or [config.get("model_type", "unknown")])[0]
    if arch != ARCHITECTURE and config.get("model_type") != "qwen2_5_vl":
        raise InputError(f"{p} is a {arch} checkpoint, not Qwen2.5-VL ({ARCHITECTURE}); Med-RwR is Qwen2.5-VL")
    if "vision_config" not in config:
        raise InputError(f"{cfg_path} has no vision_config: not a Qwen2.5-VL checkpoint")
    if not (p / "tokenizer.json").is_file() and not (p / "vocab.json").is_file():
        raise InputError(f"{p} has no tokenizer (tokenizer.json or vocab.json + merges.txt): copy the tokenizer files")
    if not (p / "tokenizer_config.json").is_file():
        raise InputError(f"{p} has no tokenizer_config.json: copy the tokenizer files")
    pre_path = p / "preprocessor_config.json"
    if not pre_path.is_file():
        raise InputError(f"{p} has no preprocessor_config.json: the image preprocessing would be unknown")
    try:
        preprocessor = json.loads(pre_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(f"{pre_path} is not valid JSON: {e}") from None
    weights = sorted(p.glob("*.safetensors"))
    if not weights:
        raise InputError(f"{p} has no *.safetensors weights (pickled .bin checkpoints are not loaded)")
    return Checkpoint(p, config, preprocessor, weights, sum(w.stat().st_size for w in weights))


def hash_sources(ck: Checkpoint) -> None:
    names = [f.name for f in ck.weight_files] + [
        n for n in ("config.json", "tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt",
                    "preprocessor_config.json", "generation_config.json", "chat_template.json")
        if (ck.path / n).is_file()
    ]
    ck.source_files = {n: sha256_file(ck.path / n) for n in names}


def needed_bytes(ck: Checkpoint, quant: str, vision_int8: bool, mmproj: bool) -> int:
    """A safe upper bound of the disk the export needs (temp f16/f32 GGUF + outputs)."""
    vision_params = _vision_param_estimate(ck.vision_config)
    # the unquantised intermediate GGUF: f32 (2x bf16 weights) for small models and --quant f32, else f16 (1x)
    text = ck.weight_bytes * (2 if quant == "f32" or ck.weight_bytes < AUTO_PARITY_MAX_BYTES // 4 else 1)
    out = ck.weight_bytes * {"f32": 2, "f16": 1}.get(quant, 0.6)
    vision = vision_params * 4 * (1.3 if vision_int8 else 1) + (vision_params * 2 if mmproj else 0)
    return int(text + out + vision + (64 << 20))


def _vision_param_estimate(v: dict) -> int:
    d, depth = int(v.get("hidden_size", 1280)), int(v.get("depth", 32))
    inter = int(v.get("intermediate_size", 4 * d))
    out = int(v.get("out_hidden_size", d))
    merge = d * int(v.get("spatial_merge_size", 2)) ** 2
    return depth * (4 * d * d + 3 * d * inter) + merge * merge + merge * out


def parity_method(parity: Optional[bool], weight_bytes: int) -> Optional[str]:
    """None (--no-parity), "full" (--parity, or a checkpoint small enough to hold in torch) or "layer-by-layer"."""
    if parity is False:
        return None
    return "full" if parity or weight_bytes <= AUTO_PARITY_MAX_BYTES else "layer-by-layer"


def check_disk(out: Path, need: int) -> None:
    probe = out.parent if out.parent.exists() else Path(".")
    free = shutil.disk_usage(probe).free
    if free < need:
        raise InputError(f"not enough disk space in {probe}: the export needs about {need / 1e9:.1f} GB, "
                         f"{free / 1e9:.1f} GB free")


def convert_gguf(ck: Checkpoint, src, out_file: Path, outtype: str, mmproj: bool = False) -> Path:
    """Run the vendored convert_hf_to_gguf.py (through the driver) in a subprocess."""
    cmd = [sys.executable, str(DRIVER), str(src.root), "--", str(ck.path), "--outtype", outtype,
           "--outfile", str(out_file)]
    if mmproj:
        cmd.append("--mmproj")
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0 or not out_file.is_file():
        lines = [ln for ln in r.stderr.strip().splitlines() if ln.strip()]
        raise ModelError(f"llama.cpp's converter failed on {ck.path.name}: {lines[-1] if lines else 'no output'}")
    return out_file


def load_vision_tower(ck: Checkpoint):
    """Only the vision tower + merger, in float32, from the checkpoint's safetensors (not the 7B decoder)."""
    try:
        import torch
        from safetensors import safe_open
        from transformers import Qwen2_5_VLConfig
        from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionTransformerPretrainedModel
    except ImportError:
        raise ModelError(f"exporting the vision encoder needs torch and transformers; {EXPORT_HINT}") from None
    config = Qwen2_5_VLConfig.from_pretrained(ck.path)
    vc = config.vision_config
    vc._attn_implementation = "eager"
    tower = Qwen2_5_VisionTransformerPretrainedModel._from_config(vc, dtype=torch.float32).eval()
    state = {}
    for f in ck.weight_files:
        with safe_open(str(f), framework="pt") as sf:
            for key in sf.keys():
                for prefix in ("model.visual.", "visual."):
                    if key.startswith(prefix):
                        state[key[len(prefix):]] = sf.get_tensor(key).float()
    missing, unexpected = tower.load_state_dict(state, strict=False)
    missing = [m for m in missing if not m.endswith("inv_freq")]
    if missing or unexpected:
        raise ModelError(f"vision weights do not match the config: missing {missing[:3]}, unexpected {unexpected[:3]}")
    return tower


class _TowerHolder:
    """Lets export.qwen_vision take a bare tower where it expects a model with `.visual`."""

    def __init__(self, tower):
        self.visual = tower


def sample_images() -> list[np.ndarray]:
    """Real photographs for parity and the int8 gate, read from the files scikit-image ships in its wheel (never
    its downloader): a fundus photograph (retina), the Shepp-Logan phantom, and two natural images."""
    from PIL import Image

    images = []
    try:
        import skimage

        data_dir = Path(skimage.__file__).parent / "data"
    except ImportError:
        data_dir = None
    if data_dir is not None:
        for name in ("retina.jpg", "phantom.png", "astronaut.png", "camera.png"):
            path = data_dir / name
            if path.is_file():
                with Image.open(path) as im:
                    images.append(np.asarray(im.convert("RGB")))
    if not images:  # no scikit-image: deterministic smooth synthetic images
        rng = np.random.default_rng(0)
        y, x = np.mgrid[0:256, 0:320].astype(np.float32)
        images.append(np.clip(np.stack([x, y, x + y], -1) * 0.4 + rng.normal(0, 10, (256, 320, 3)), 0, 255).astype(np.uint8))
    return images


def export_vision(ck: Checkpoint, tower, spec: VisionSpec, out_dir: Path, vision_int8: bool, say: Progress) -> dict:
    from . import qwen_vision as QV
    from ..runtime.vision import preprocess

    holder = _TowerHolder(tower)
    images = sample_images()
    onnx_path = out_dir / B.VISION_ONNX
    QV.export_vision_onnx(holder, spec, onnx_path, images[0])
    results: dict = {"images": len(images), "fp32": [], "int8": None}
    worst_rel = 0.0
    fp32_outputs = []
    for img in images:
        patches, grid = preprocess(img, spec)
        ref = QV.torch_reference(holder, patches, grid)
        out = QV.onnx_embeds(onnx_path, spec, img)
        diff = float(np.abs(ref - out).max())
        scale = float(np.abs(ref).max())
        worst_rel = max(worst_rel, diff / max(scale, 1e-9))
        results["fp32"].append({"grid": list(grid), "max_abs_diff": diff, "max_abs_ref": scale})
        fp32_outputs.append(out)
    results["fp32_max_rel_diff"] = worst_rel
    if worst_rel > VISION_PARITY_RTOL and max(r["max_abs_diff"] for r in results["fp32"]) > VISION_PARITY_ATOL:
        raise ModelError(f"ONNX vision encoder differs from torch by {worst_rel:.2e} (relative): export is wrong")
    say(f"vision ONNX parity vs torch: max relative diff {worst_rel:.1e} on {len(images)} images")
    if vision_int8:
        int8_path = out_dir / B.VISION_INT8_ONNX
        QV.quantize_int8(onnx_path, int8_path)
        cosines = [QV.cosine_rows(QV.onnx_embeds(int8_path, spec, img), ref) for img, ref in zip(images, fp32_outputs)]
        ok = min(cosines) >= INT8_MIN_COSINE
        results["int8"] = {"min_token_cosine": min(cosines), "threshold": INT8_MIN_COSINE, "kept": ok}
        if not ok:
            int8_path.unlink()
            say(f"int8 vision encoder rejected: token cosine {min(cosines):.4f} < {INT8_MIN_COSINE}; keeping fp32")
        else:
            say(f"int8 vision encoder kept: min token cosine {min(cosines):.4f}")
    return results


def export_model(
    checkpoint: str | Path,
    out: str | Path,
    *,
    quant: str = "q4_k_m",
    vision_int8: bool = False,
    mmproj: bool = True,
    image_encoder: bool = True,
    parity: Optional[bool] = None,
    llama_cpp_src: Optional[str | Path] = None,
    max_pixels: Optional[int] = None,
    overwrite: bool = False,
    progress: Optional[Progress] = None,
) -> Path:
    """Export a Qwen2.5-VL checkpoint to an edge model bundle at `out`; returns `out`."""
    say = progress or (lambda msg: None)
    if quant not in QUANTS:
        raise InputError(f"--quant must be one of {', '.join(QUANTS)} (got {quant!r})")
    out = Path(out)
    if out.exists() and not overwrite:
        raise InputError(f"{out} already exists (give --overwrite to replace it)")
    ck = check_checkpoint(checkpoint)
    check_disk(out, needed_bytes(ck, quant, vision_int8, mmproj))
    spec = VisionSpec.from_hf(ck.config, ck.preprocessor, max_pixels=max_pixels or 262144)
    from . import llama_cpp_src as LS
    from ..runtime import llama_native

    t_start = time.perf_counter()
    src = LS.obtain(llama_cpp_src, progress=say)
    say(f"llama.cpp {src.commit[:12]} converter from {src.root}")
    hash_sources(ck)
    timings: dict = {}
    with atomic_directory(out, overwrite=overwrite) as tmp:
        t0 = time.perf_counter()
        base_type = "f32" if quant == "f32" or ck.weight_bytes < AUTO_PARITY_MAX_BYTES // 4 else "f16"
        say(f"text decoder -> GGUF ({base_type})")
        base = convert_gguf(ck, src, tmp / f"text-{base_type}.gguf", base_type)
        timings["convert_text"] = round(time.perf_counter() - t0, 3)
        text_file = base
        if quant != base_type:
            t0 = time.perf_counter()
            say(f"quantising -> {quant}")
            text_file = tmp / f"text-{quant}.gguf"
            llama_native.quantize_model(base, text_file, quant)
            timings["quantize"] = round(time.perf_counter() - t0, 3)
        mmproj_file = None
        if mmproj:
            t0 = time.perf_counter()
            say("vision tower -> mmproj GGUF (llama.cpp mtmd path)")
            mmproj_file = convert_gguf(ck, src, tmp / f"mmproj-{'f32' if base_type == 'f32' else 'f16'}.gguf",
                                       "f32" if base_type == "f32" else "f16", mmproj=True)
            timings["convert_mmproj"] = round(time.perf_counter() - t0, 3)
        t0 = time.perf_counter()
        say("vision tower + merger -> ONNX")
        atomic_write_text(tmp / B.VISION_SPEC, spec.to_json() + "\n")
        tower = load_vision_tower(ck)
        vision_results = export_vision(ck, tower, spec, tmp, vision_int8, say)
        timings["export_vision"] = round(time.perf_counter() - t0, 3)
        if image_encoder:
            t0 = time.perf_counter()
            say("image-pack encoder: vision tower mean-pooled, L2-normalised (for CDIR reference packs)")
            from .qwen_image_encoder import export_image_encoder

            (tmp / B.IMAGE_ENCODER_DIR).mkdir()
            export_image_encoder(tower, spec, tmp / B.IMAGE_ENCODER_DIR, name=f"{ck.path.name}-vision-pooled")
            timings["export_image_encoder"] = round(time.perf_counter() - t0, 3)
        method = parity_method(parity, ck.weight_bytes)
        parity_results: dict = {"vision_onnx": vision_results}
        if method is None:
            parity_results["skipped"] = ("--no-parity: the text decoder and the image+text path were NOT checked "
                                         "against torch")
            say("parity: SKIPPED (--no-parity); recorded in the manifest")
        else:
            t0 = time.perf_counter()
            from .parity import bundle_parity, check_gates

            parity_results.update(bundle_parity(
                ck.path, base, tmp / B.VISION_ONNX, spec, quantised=text_file if text_file != base else None,
                quant=quant, base_type=base_type, method=method, tower=tower, progress=say))
            timings["parity"] = round(time.perf_counter() - t0, 3)
            check_gates(parity_results)  # raises before the bundle is published: a failed export leaves nothing
            say(f"parity ({method}) within bounds: text {parity_results['text_logits_max_rel_diff']:.1e}, "
                f"image+text {parity_results['image_text_logits_max_rel_diff']:.1e} of the logit scale; negative "
                f"control {parity_results['negative_control_1d_positions_rel_diff']:.1e}")
        del tower
        if text_file != base:
            base.unlink()  # the unquantised intermediate is not part of the bundle
        timings["total"] = round(time.perf_counter() - t_start, 3)
        B.write_manifest(
            tmp,
            text_model=text_file.name,
            vision_encoder=(B.VISION_INT8_ONNX if (tmp / B.VISION_INT8_ONNX).exists() else B.VISION_ONNX),
            mmproj=mmproj_file.name if mmproj_file else None,
            extra={
                "image_encoder": B.IMAGE_ENCODER_DIR if image_encoder else None,
                "source": {"checkpoint": str(ck.path), "architecture": ARCHITECTURE, "files": ck.source_files},
                "llama_cpp": {"commit": src.commit, "sdist_sha256": src.sdist_sha256,
                              "llama_cpp_python": LS.LLAMA_CPP_PYTHON_VERSION},
                "quantization": {"text": quant, "vision": "int8-dynamic" if (tmp / B.VISION_INT8_ONNX).exists()
                                 else "fp32", "mmproj": mmproj_file.name.split("-")[-1][:-5] if mmproj_file else None},
                "max_pixels": spec.max_pixels,
                "parity": parity_results,
                "timings_s": timings,
            },
        )
        say(f"bundle written: {out}")
    return out
