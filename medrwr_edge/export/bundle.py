"""The model bundle directory that `medrwr-edge ask --model DIR` accepts (no torch: read at run time too).

    DIR/
      manifest.json        format "medrwr-edge/model-bundle/1": which file is which role, sha256 + size of every
                           file, the source checkpoint's hashes, llama.cpp commit, quantisation, parity results
      text-q4_k_m.gguf     the Qwen2.5-VL decoder (llama.cpp, arch qwen2vl, M-RoPE)
      vision.onnx          vision tower + merger, fp32 (and/or vision-int8.onnx when --vision-int8 passed its gate)
      vision.json          `runtime.vision.VisionSpec`: patch/merge sizes, max_pixels, mean/std, window size
      mmproj-f16.gguf      optional: the same vision tower for llama.cpp's own mtmd path
      image-encoder/       optional: the tower mean-pooled + L2-normalised as a pack image encoder
                           (`pack build images --encoder DIR/image-encoder`), so CDIR searches in the model's space

Every file is checked (size, then sha256) before it is loaded, so a truncated or swapped file is refused with
one line naming it. Copy the whole directory to the air-gapped workstation (it is self-contained).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from ..errors import IntegrityError, ModelError
from ..paths import atomic_write_text, cached_sha256, sha256_file

FORMAT = "medrwr-edge/model-bundle/1"
MANIFEST = "manifest.json"
VISION_ONNX = "vision.onnx"
VISION_INT8_ONNX = "vision-int8.onnx"
VISION_SPEC = "vision.json"
IMAGE_ENCODER_DIR = "image-encoder"  # kb_pack encoder (encoder.json + model.onnx) for CDIR reference packs


def write_manifest(directory: Path, *, text_model: str, vision_encoder: Optional[str], mmproj: Optional[str],
                   extra: dict) -> Path:
    files = {}
    for f in sorted(directory.rglob("*")):
        if f.is_file() and f.name != MANIFEST:
            rel = f.relative_to(directory).as_posix()
            files[rel] = {"sha256": sha256_file(f), "bytes": f.stat().st_size}
    manifest = {
        "format": FORMAT,
        "text_model": text_model,
        "vision_encoder": vision_encoder,
        "vision_spec": VISION_SPEC if vision_encoder else None,
        "mmproj": mmproj,
        "files": files,
        **extra,
    }
    path = directory / MANIFEST
    atomic_write_text(path, json.dumps(manifest, indent=2, sort_keys=False) + "\n")
    return path


def is_bundle(path: str | Path) -> bool:
    p = Path(path)
    return p.is_dir() and (p / MANIFEST).is_file()


def read_manifest(directory: str | Path) -> dict:
    path = Path(directory) / MANIFEST
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ModelError(f"{directory} is not a model bundle (no {MANIFEST})") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise IntegrityError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise IntegrityError(f"{path} is not a {FORMAT} manifest")
    if not isinstance(manifest.get("files"), dict) or not manifest.get("text_model"):
        raise IntegrityError(f"{path} lists no files or no text model")
    return manifest


def verify_file(directory: str | Path, manifest: dict, name: str, full_hash: bool = False) -> Path:
    """The bundle file `name`, after checking it against the manifest (size first: a truncated copy is caught
    without hashing gigabytes). sha256 uses the (path, size, mtime) cache unless full_hash."""
    entry = manifest["files"].get(name)
    if entry is None:
        raise IntegrityError(f"bundle manifest does not list {name}")
    path = Path(directory) / name
    if not path.is_file():
        raise ModelError(f"bundle file missing: {path}")
    size = path.stat().st_size
    if size != entry["bytes"]:
        raise IntegrityError(f"{path} is {size} bytes, the manifest says {entry['bytes']}: truncated or replaced")
    digest = sha256_file(path) if full_hash else cached_sha256(path)
    if digest != entry["sha256"]:
        raise IntegrityError(f"{path} does not match its sha256 in the manifest: the file was modified or swapped")
    return path


def parity_summary(manifest: dict) -> str:
    """One line for `export verify`: whether the export's parity gates ran, how, and their figures."""
    p = manifest.get("parity") or {}
    if "skipped" in p:
        return f"parity: NOT RUN at export ({p['skipped']})"
    if "text_logits_max_rel_diff" not in p:
        return "parity: not recorded in this manifest (exported before the parity gates)"
    line = (f"parity ({p.get('method', 'full')}): text {p['text_logits_max_rel_diff']:.1e}, image+text "
            f"{p['image_text_logits_max_rel_diff']:.1e} of the logit scale (bound {p['bounds']['text_rel']:.0e}); "
            f"negative control {p['negative_control_1d_positions_rel_diff']:.1e}")
    if "quantised_top1_agreement" in p:
        line += f"; quantised top-1 agreement {p['quantised_top1_agreement']:.0%}"
    return line


def verify_bundle(directory: str | Path) -> dict:
    """Re-hash every file in full (`medrwr-edge export verify DIR`)."""
    manifest = read_manifest(directory)
    for name in manifest["files"]:
        verify_file(directory, manifest, name, full_hash=True)
    return manifest
