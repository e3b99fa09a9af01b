"""The export's torch reference for checkpoints too large to hold in RAM: the decoder one layer at a time.

Each decoder layer's weights are read from the safetensors (float32), applied to every probe at once and freed,
so peak memory is one layer + the vision tower + activations (a 7B layer: ~0.9 GB float32, where the whole model
needs ~32 GB). Embedding rows and the LM head are read in slices. Image rows come from the torch vision tower,
positions from HF's own `get_rope_index`, so the image+text probe is checked as independently as with the whole
model. Same interface as `parity.FullReference`: `logits(text_ids, image_probe)`.
"""

from __future__ import annotations

import time
import types
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from ..errors import ModelError
from .parity import ImageProbe


class LayeredReference:
    """The decoder one layer at a time from the safetensors (see the module docstring); float32 compute."""

    method = "layer-by-layer"
    LM_HEAD_ROWS = 16384  # rows of the LM head read at once

    def __init__(self, checkpoint: str | Path, tower=None):
        from safetensors import safe_open
        from transformers import Qwen2_5_VLConfig

        self.path = Path(checkpoint)
        self.config = Qwen2_5_VLConfig.from_pretrained(self.path)
        self.text_config = getattr(self.config, "text_config", self.config)
        self.text_config._attn_implementation = "eager"  # with an explicit causal mask: unambiguous
        self._tower = tower
        self._where: dict[str, Path] = {}
        for f in sorted(self.path.glob("*.safetensors")):
            with safe_open(str(f), framework="pt") as sf:
                for key in sf.keys():
                    self._where[key] = f
        embed = next((k for k in self._where if k.endswith("embed_tokens.weight") and "visual" not in k), None)
        if embed is None:
            raise ModelError(f"{self.path}: no embed_tokens.weight in the safetensors")
        self.prefix = embed[: -len("embed_tokens.weight")]  # "model." or "model.language_model."
        self.lm_head = "lm_head.weight" if "lm_head.weight" in self._where else embed  # tied embeddings
        self.layer_seconds: list[float] = []  # load + forward time of each layer, all probes together
        self.peak_layer_bytes = 0

    def _tensors(self, prefix: str) -> dict:
        """Every tensor whose name starts with `prefix`, as float32, keyed by the rest of its name."""
        from safetensors import safe_open

        keys = [k for k in self._where if k.startswith(prefix)]
        out = {}
        for f in sorted({self._where[k] for k in keys}):
            with safe_open(str(f), framework="pt") as sf:
                out.update({k[len(prefix):]: sf.get_tensor(k).float() for k in keys if self._where[k] == f})
        return out

    def _rows(self, key: str, ids: Sequence[int]):
        """Rows `ids` of a 2-D tensor without reading the rest of it."""
        import torch
        from safetensors import safe_open

        with safe_open(str(self._where[key]), framework="pt") as sf:
            sl = sf.get_slice(key)
            return torch.stack([sl[i : i + 1][0].float() for i in ids])

    def _embeddings(self, ids: list[int], probe: Optional[ImageProbe]):
        import torch

        uniq = sorted(set(ids))
        table = dict(zip(uniq, self._rows(self.prefix + "embed_tokens.weight", uniq)))
        emb = torch.stack([table[i] for i in ids])
        if probe is not None:
            if self._tower is None:
                from .qwen import check_checkpoint, load_vision_tower

                self._tower = load_vision_tower(check_checkpoint(self.path))
            with torch.no_grad():
                image_rows = self._tower(probe.pixel_values.float(), grid_thw=probe.grid_thw)
            mask = torch.tensor(ids) == self.config.image_token_id
            if int(mask.sum()) != image_rows.shape[0]:
                raise ModelError("image probe: placeholder count does not match the vision tower's output")
            emb[mask] = image_rows.float()
        return emb

    def _positions(self, ids: list[int], probe: Optional[ImageProbe]):
        import torch
        from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLModel

        if probe is None:
            return torch.arange(len(ids)).view(1, 1, -1).expand(3, 1, -1)
        holder = types.SimpleNamespace(config=self.config)  # get_rope_index reads only self.config
        pos, _ = Qwen2_5_VLModel.get_rope_index(holder, torch.tensor([ids]), probe.grid_thw, None, None, None)
        return pos

    def logits(self, text_ids: Sequence[list[int]], probe: Optional[ImageProbe]) -> tuple[list[np.ndarray], Optional[np.ndarray]]:
        import torch
        from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import (
            Qwen2_5_VLDecoderLayer,
            Qwen2_5_VLRotaryEmbedding,
            Qwen2RMSNorm,
        )

        tc = self.text_config
        # Each sequence (the text probes as one right-padded batch, the image probe alone) keeps its hidden states
        # between layers; a layer's weights are read once and used on all of them.
        groups = []
        if text_ids:
            n = max(len(ids) for ids in text_ids)
            pad = [ids + [ids[-1]] * (n - len(ids)) for ids in text_ids]  # right padding: causal rows never see it
            h = torch.stack([self._embeddings(ids, None) for ids in pad])
            pos = torch.arange(n).view(1, 1, -1).expand(3, len(pad), -1)
            groups.append({"h": h, "pos": pos, "last": [len(ids) - 1 for ids in text_ids]})
        if probe is not None:
            h = self._embeddings(probe.ids, probe)[None]
            groups.append({"h": h, "pos": self._positions(probe.ids, probe), "last": [len(probe.ids) - 1]})
        with torch.device("cpu"):
            rotary = Qwen2_5_VLRotaryEmbedding(config=tc)
        for g in groups:
            n = g["h"].shape[1]
            g["rope"] = rotary(g["h"], g["pos"])
            g["mask"] = torch.full((n, n), float("-inf")).triu(1)[None, None]
        with torch.no_grad():
            for i in range(tc.num_hidden_layers):
                t0 = time.perf_counter()
                state = self._tensors(f"{self.prefix}layers.{i}.")
                self.peak_layer_bytes = max(self.peak_layer_bytes, sum(t.numel() * 4 for t in state.values()))
                with torch.device("meta"):
                    layer = Qwen2_5_VLDecoderLayer(tc, i)
                missing, unexpected = layer.load_state_dict(state, strict=False, assign=True)
                missing = [m for m in missing if not m.endswith("inv_freq")]
                if missing or unexpected:
                    raise ModelError(f"layer {i} weights do not match the config: missing {missing[:3]}, "
                                     f"unexpected {unexpected[:3]}")
                layer.eval()
                for g in groups:
                    out = layer(g["h"], attention_mask=g["mask"], position_embeddings=g["rope"])
                    g["h"] = out[0] if isinstance(out, tuple) else out
                del layer, state
                self.layer_seconds.append(time.perf_counter() - t0)
            norm = Qwen2RMSNorm(tc.hidden_size, eps=tc.rms_norm_eps)
            norm.weight.data = self._tensors(self.prefix + "norm.weight")[""]
            last = [norm(g["h"][b, j]) for g in groups for b, j in enumerate(g["last"])]
            logits = self._lm_head(torch.stack(last))
        out = [logits[i].numpy() for i in range(logits.shape[0])]
        image = out.pop() if probe is not None else None
        return out, image

    def _lm_head(self, hidden):
        import torch
        from safetensors import safe_open

        with safe_open(str(self._where[self.lm_head]), framework="pt") as sf:
            sl = sf.get_slice(self.lm_head)
            rows = sl.get_shape()[0]
            chunks = [hidden @ sl[a : min(a + self.LM_HEAD_ROWS, rows)].float().T
                      for a in range(0, rows, self.LM_HEAD_ROWS)]
        return torch.cat(chunks, dim=1)
