"""Small deterministic stand-in encoders for pack format/logic tests (fast; same interface as kb_pack.encoders).

HashingTextEncoder: feature-hashed word unigrams + character trigrams -> L2-normalised vectors, so texts that
share words are close (real enough for ranking tests). ColorHistogramEncoder: a coarse RGB histogram.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import asdict, dataclass

import numpy as np


@dataclass
class FakeSpec:
    kind: str
    name: str
    dim: int
    salt: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


def _bucket(token: str, dim: int, salt: str) -> tuple[int, float]:
    h = hashlib.blake2b((salt + token).encode("utf-8"), digest_size=8).digest()
    v = int.from_bytes(h, "little")
    return v % dim, 1.0 if (v >> 63) & 1 else -1.0


class HashingTextEncoder:
    kind = "text"

    def __init__(self, dim: int = 128, salt: str = "", fail_after_calls: int | None = None):
        self.spec = FakeSpec("text", "hashing-text" + (f"-{salt}" if salt else ""), dim, salt)
        self.dim = dim
        self.sha256 = hashlib.sha256(f"hashing-text:{dim}:{salt}".encode()).hexdigest()
        self.calls = 0
        self.fail_after_calls = fail_after_calls  # raise KeyboardInterrupt on this call (simulated Ctrl-C)

    def embed(self, texts, *, is_query: bool = False, batch_size: int = 64) -> np.ndarray:
        self.calls += 1
        if self.fail_after_calls is not None and self.calls > self.fail_after_calls:
            raise KeyboardInterrupt
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        for i, text in enumerate(texts):
            words = re.findall(r"\w+", text.lower())
            feats = words + [w[j : j + 3] for w in words for j in range(max(1, len(w) - 2))]
            for tok in feats or ["<empty>"]:
                j, sign = _bucket(tok, self.dim, self.spec.salt)
                out[i, j] += sign
        norms = np.linalg.norm(out, axis=1, keepdims=True)
        out[norms[:, 0] == 0, 0] = 1.0
        return out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)


class ColorHistogramEncoder:
    kind = "image"

    def __init__(self, bins: int = 4):
        self.dim = bins**3
        self.bins = bins
        self.spec = FakeSpec("image", "color-histogram", self.dim)
        self.sha256 = hashlib.sha256(f"color-histogram:{bins}".encode()).hexdigest()

    def embed(self, images, *, batch_size: int = 16) -> np.ndarray:
        out = np.zeros((len(images), self.dim), dtype=np.float32)
        for i, px in enumerate(images):
            q = (np.asarray(px, dtype=np.int64) * self.bins) // 256
            idx = (q[..., 0] * self.bins + q[..., 1]) * self.bins + q[..., 2]
            out[i] = np.bincount(idx.ravel(), minlength=self.dim)
        return out / np.linalg.norm(out, axis=1, keepdims=True)
