"""How long the export's layer-by-layer parity reference takes for a 7B: measured on one decoder layer, estimated.

`export.layered_reference.LayeredReference` is the torch reference for checkpoints too large to hold in RAM (> 2 GB of
weights). Its cost is, per decoder layer: read the layer from the safetensors (bf16 -> float32) + one forward of
every probe (the 4 text probes as one right-padded batch, the image+text probe alone). This script writes ONE
decoder layer with Qwen2.5-VL-7B's real dimensions (hidden 3584, MLP 18944, 28 heads, 4 KV heads; random bf16
weights), runs the reference on probe shapes equal to the export's (4 x 114 text tokens; 540 image + 35 text
tokens, as the tiny fixture's parity probes measure with the same vision spec), and prints the per-layer time and
the 7B decoder estimate = 28 x that. Not included, and said so: the vision tower's torch forward, the LM head
read (1 GB bf16), and llama.cpp's own runs of the GGUFs.

    python benchmarks/bench_export_parity_layered.py [--layers-7b 28] [--rounds 2]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

QWEN25VL_7B_TEXT = {
    "hidden_size": 3584, "intermediate_size": 18944, "num_attention_heads": 28, "num_key_value_heads": 4,
    "num_hidden_layers": 28, "rope_theta": 1_000_000.0, "rms_norm_eps": 1e-6, "max_position_embeddings": 128000,
    "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
}
TEXT_PROBE_TOKENS = [60, 80, 90, 114]  # the longest of the export's 4 text probes is 114 tokens
IMAGE_PROBE_TOKENS = 540 + 35  # two parity images at the 262144-pixel budget + the prompt text


def write_one_layer_checkpoint(out: Path, vocab: int = 1024) -> Path:
    """config.json (7B text dims, 1 layer, small vocab: the vocabulary does not change the per-layer cost) +
    model.safetensors in bf16."""
    import torch
    from safetensors.torch import save_file
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    cfg = Qwen2_5_VLConfig(vocab_size=vocab, **{**QWEN25VL_7B_TEXT, "num_hidden_layers": 1},
                           vision_config={"depth": 1, "hidden_size": 32, "out_hidden_size": 3584, "num_heads": 2,
                                          "intermediate_size": 64, "fullatt_block_indexes": [0]})
    with torch.device("meta"):
        model = Qwen2_5_VLForConditionalGeneration(cfg)
    state = {k: (torch.randn(v.shape, dtype=torch.bfloat16) * 0.02) for k, v in model.state_dict().items()
             if "visual" not in k}
    out.mkdir(parents=True, exist_ok=True)
    save_file(state, str(out / "model.safetensors"))
    d = cfg.to_dict()
    d["architectures"] = ["Qwen2_5_VLForConditionalGeneration"]
    (out / "config.json").write_text(json.dumps(d))
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers-7b", type=int, default=28)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    import numpy as np
    import torch

    from medrwr_edge.export.layered_reference import LayeredReference
    from medrwr_edge.export.parity import ImageProbe

    class ShapesOnly(LayeredReference):
        """The image probe's rows without a vision tower (random rows, 1-D positions): same compute shapes."""

        def _embeddings(self, ids, probe):
            if probe is None:
                return super()._embeddings(ids, None)
            return torch.randn(len(ids), self.text_config.hidden_size) * 0.02

        def _positions(self, ids, probe):
            return torch.arange(len(ids)).view(1, 1, -1).expand(3, 1, -1)

    load = open("/proc/loadavg").read().split()[:3]
    with tempfile.TemporaryDirectory() as tmp:
        ck = write_one_layer_checkpoint(Path(tmp) / "ck")
        rng = np.random.default_rng(0)
        texts = [rng.integers(0, 1024, n).tolist() for n in TEXT_PROBE_TOKENS]
        probe = ImageProbe(rng.integers(0, 1024, IMAGE_PROBE_TOKENS).tolist(), None, None)
        times = []
        for _ in range(args.rounds):
            ref = ShapesOnly(ck)
            ref.logits(texts, probe)
            times.append(ref.layer_seconds[0])
        per_layer = min(times)
        print(f"machine: {os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}, loadavg {' '.join(load)} "
              "(shared with other jobs)")
        print(f"one Qwen2.5-VL-7B decoder layer (bf16 read -> float32, {len(texts)} text probes padded to "
              f"{max(TEXT_PROBE_TOKENS)} tokens + {IMAGE_PROBE_TOKENS} image-probe tokens): {per_layer:.1f} s (best of {args.rounds}: "
              f"{', '.join(f'{t:.1f}' for t in times)}); peak layer {ref.peak_layer_bytes / 1e9:.2f} GB float32")
        print(f"ESTIMATE, 7B decoder reference: {args.layers_7b} x {per_layer:.1f} s = "
              f"{args.layers_7b * per_layer / 60:.1f} min (plus vision tower, LM head read, llama.cpp runs)")


if __name__ == "__main__":
    main()
