"""The interface between the Med-RwR loop and a language-model engine.

A backend holds ONE sequence (KV cache) for one assistant turn. The loop:

    backend.reset()
    backend.prefill(prompt)                 # system + user turn (+ images) + assistant header, decoded once
    out = backend.generate(settings, stop=["</query>", "</answer>"], on_piece=...)
    backend.rollback(n_keep)                # drop KV entries past n_keep tokens (discarded text, CDIR)
    backend.append_text("\n<retrieve> ... </retrieve>\n")   # spliced into the same turn, decoded from the KV cache
    out = backend.generate(...)             # continues; nothing before is re-encoded

`stats` counts every token that went through the model (prefill + sampled + appended), so tests can prove
there was no re-prefill: decoded == prompt + generated + inserted (+ re-decoded after a rollback).
The multimodal backend implements the same interface; `PromptPart` carries images for it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional, Protocol, Sequence, Union, runtime_checkable


@dataclass
class ImageInput:
    """An image given to the model. `pixels` is an RGB uint8 array (H, W, 3); `sha256` is of the source file."""

    pixels: object
    sha256: str
    role: str = "current"  # "current", "prior", "image" (one of independent figures), "reference" (CDIR)
    study_date: Optional[str] = None  # ISO date from the DICOM StudyDate (allow-listed), for the prompt's labels


# A prompt is text and images in order, already rendered in the model's chat format.
PromptPart = Union[str, ImageInput]


@dataclass
class SamplingSettings:
    temperature: float = 0.0  # 0 = greedy, reproducible
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    seed: int = 0
    max_tokens: int = 1024  # per generation pass


@dataclass
class GeneratedToken:
    token_id: int
    piece: str  # text this token added (may be "" for partial UTF-8 until completed)
    prob: float  # softmax probability (temperature 1, raw logits) the model gave this token


@dataclass
class Generation:
    text: str  # decoded text of this pass, cut right after the stop string if one was hit
    tokens: list[GeneratedToken]  # every token sampled AND kept in the KV cache this pass
    stop_reason: str  # "stop" (a stop string), "eos" (end of turn), "length" (max_tokens), "context" (ctx full)
    stop_string: Optional[str] = None
    # If the stop string ended inside a token, text after it was generated too; it is cut from `text`,
    # and `overshoot_chars` says how many characters were dropped (the backend already re-cut the cache to `text`).
    overshoot_chars: int = 0
    seconds: float = 0.0


@dataclass
class BackendStats:
    prompt_tokens: int = 0  # tokens decoded by prefill()
    cached_prompt_tokens: int = 0  # prompt tokens restored from a saved KV state instead of decoded
    generated_tokens: int = 0  # tokens sampled and decoded by generate()
    inserted_tokens: int = 0  # tokens decoded by append_text()
    rolled_back_tokens: int = 0  # KV entries dropped by rollback()
    decode_calls: int = 0
    # Speculative decoding: draft tokens decoded in verification batches, and those kept (counted in
    # generated_tokens too; the rejected ones were removed from the KV cache and are counted nowhere else).
    drafted_tokens: int = 0
    accepted_tokens: int = 0
    verify_batches: int = 0  # batches of a kept token + its drafts
    prefill_seconds: float = 0.0
    generate_seconds: float = 0.0

    @property
    def decoded_tokens(self) -> int:
        return self.prompt_tokens + self.generated_tokens + self.inserted_tokens


@dataclass
class BackendInfo:
    name: str  # "llama.cpp", "llama.cpp+onnx-vision", "scripted"
    model_path: str
    model_sha256: str
    has_vision: bool
    n_ctx: int
    device: str  # "cpu", "cuda", "metal", ... what actually runs the model
    gpu_layers: int = 0
    notes: list[str] = field(default_factory=list)  # e.g. "GPU requested but this build is CPU-only: ran on CPU"
    # The model was trained on the Med-RwR protocol (an exported Med-RwR bundle, or a GGUF whose metadata says
    # `medrwr.protocol = native`): `protocol="auto"` runs it native; any other model runs guided.
    declares_protocol: bool = False
    # What else decides the computed numbers, so a replay can tell "same setup" from "same model elsewhere":
    build: str = ""  # the inference library's version and compiled features (llama.cpp: CPU flags, GPU backend)
    compute: dict = field(default_factory=dict)  # settings that change the KV bytes (batch sizes, attention, KV type)


@runtime_checkable
class Backend(Protocol):
    info: BackendInfo
    stats: BackendStats

    def tokenize(self, text: str) -> list[int]: ...

    def reset(self) -> None:
        """Clear the sequence (KV cache) and zero `stats`."""

    def prefill(self, prompt: Sequence[PromptPart]) -> int:
        """Decode the prompt into an empty sequence; return the number of positions used."""

    def append_text(self, text: str) -> int:
        """Tokenize `text` and decode it after what is in the cache; return the tokens added."""

    def generate(
        self,
        settings: SamplingSettings,
        stop: Sequence[str],
        on_piece: Optional[Callable[[str], None]] = None,
    ) -> Generation:
        """Sample until a stop string, end of turn, max_tokens or a full context; stream text to on_piece."""

    def n_tokens(self) -> int:
        """Tokens currently in the sequence."""

    def rollback(self, n_keep: int) -> None:
        """Keep the first n_keep tokens of the sequence, drop the rest from the KV cache."""

    def close(self) -> None: ...


# Optional, used by guided decoding and the letter confidence (runtime/answers.py); a backend without it gets
# `confidence_kind: "not-comparable"` for letters the model did not write itself:
#
#     def next_token_probs(self, token_ids: Sequence[int]) -> list[float]:
#         """The probability (softmax at temperature 1 on the raw logits, as GeneratedToken.prob) of each given
#         token at the next position of the sequence. Decodes nothing; the sequence is unchanged."""
