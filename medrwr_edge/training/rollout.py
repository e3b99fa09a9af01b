"""GRPO rollouts that run the runtime's own Med-RwR loop on a Hugging Face model.

`HFRolloutBackend` implements the runtime `Backend` interface (runtime/backend.py) over a transformers model and
its KV cache (`past_key_values`), so a training rollout is `runtime.loop.MedRwRLoop.run` — the same prompts
(`protocol.chatml_prompt`, `system_prompt`, `user_text`), the same stop at `</query>` with the cache cut exactly
there, the same `extract_query`, the same in-process pack search (`runtime.retrieval.PackTextRetriever` over
`kb_pack.Pack.search`), the same `retrieve_block` spliced into the same assistant turn and decoded from the
cache, the same 3-pass limit. CDIR is off (it is a test-time method, not part of training).

While the loop runs, the backend records every completion token and whether the policy produced it: sampled tokens
get loss-mask 1; text the trainer inserted (`append_text`: the `\\n<retrieve> ... </retrieve>\\n` blocks) gets 0,
so retrieved documents never receive gradient or KL. When a stop string ends inside a sampled token, that token
is replaced by the tokens of the text up to the stop (the runtime's rollback): those are still the model's text
and keep mask 1; the GRPO loss is computed on the sequence as it ends up in the cache.

After the loop, for the confidence-gain reward, two teacher-forced forwards give
  log π(gold letter | prompt, completion up to `<answer>`)                (with retrieval), and
  log π(gold letter | prompt, y′ `<answer>`), y′ = the text generated before the first `<query>`,
continued straight into an answer without retrieval (what the model believed when it chose to search).
"Gold letter" = the first answer token spelling the letter, upper-case, with or without a leading space.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

from ..evidence.record import EvidenceRecord, Retrieve
from ..runtime import protocol as P
from ..runtime.backend import (BackendInfo, BackendStats, GeneratedToken, Generation, ImageInput, PromptPart,
                               SamplingSettings)
from ..runtime.loop import LoopConfig, MedRwRLoop
from .data import McqExample

GENERATION_RESERVE_MAX = 512
IMAGE_PAD = "<|image_pad|>"  # room kept for the next pass when a retrieve block is fitted (as the runtime)


@dataclass
class RolloutSettings:
    max_completion_tokens: int = 4096  # all completion tokens, retrieve blocks included (the reference's limit)
    max_passes: int = 3
    top_k_docs: int = 3  # documents per search
    temperature: float = 1.0
    top_p: float = 1.0
    top_k_sampling: int = 0
    search_mode: Optional[str] = None  # pack default
    confidence_probes: bool = True  # compute log π(gold | with / without retrieval)


@dataclass
class Rollout:
    example_id: str
    prompt_ids: list[int]
    completion_ids: list[int]
    loss_mask: list[int]  # per completion token: 1 = sampled by the policy, 0 = inserted (retrieve blocks)
    completion_text: str  # the assistant turn as the model saw it (retrieve blocks included)
    letter: Optional[str]
    retrieval_used: bool  # at least one retrieve block with documents
    queries: list[str]
    y_prime: Optional[str]  # text before the first <query> (None without a query)
    logp_gold_with: Optional[float] = None
    logp_gold_without: Optional[float] = None
    status: str = "answered"
    seconds: float = 0.0
    sampled_tokens: int = 0
    inserted_tokens: int = 0
    vision_inputs: dict = field(default_factory=dict)  # pixel_values / image_grid_thw for the training forward
    record: Optional[EvidenceRecord] = None

    @property
    def input_ids(self) -> list[int]:
        return self.prompt_ids + self.completion_ids


# ------------------------------------------------------------------ the backend


class HFRolloutBackend:
    """The runtime Backend protocol over a transformers causal LM / Qwen2.5-VL, one sequence, with a KV cache."""

    def __init__(self, model, tokenizer, *, vision_spec=None, max_completion_tokens: int = 4096,
                 eos_token_ids: Optional[Sequence[int]] = None, model_path: str = ""):
        self.model = model
        self.tokenizer = tokenizer
        self.vision_spec = vision_spec  # runtime.vision.VisionSpec: a Qwen2.5-VL model that sees images
        self.max_completion_tokens = max_completion_tokens
        self.info = BackendInfo("transformers", model_path, "", vision_spec is not None, 0, str(_device(model)))
        self.eos_ids = set(eos_token_ids if eos_token_ids is not None else _eos_ids(tokenizer))
        self._prefix = None  # (prompt key, KV cache, next-token logits, rope deltas) of the last prompt
        self.stats = BackendStats()
        self.reset()

    # -- Backend protocol
    def tokenize(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def reset(self) -> None:
        self.stats = BackendStats()
        self.cache = None
        self.fed: list[int] = []  # token ids in the KV cache, in order
        self.prompt_len = 0
        self.completion_ids: list[int] = []
        self.loss_mask: list[int] = []
        self.vision_inputs: dict = {}
        self._next_logits = None

    def prefill(self, prompt: Sequence[PromptPart]) -> int:
        import torch

        t0 = time.perf_counter()
        self.reset()
        images = [p for p in prompt if isinstance(p, ImageInput)]
        text = P.prompt_text(prompt)  # images as one <|image_pad|> each, expanded below to their patch counts
        if images and self.info.has_vision:
            # The runtime's Qwen2.5-VL preprocessing (equal to HF's image processor, pinned by the export tests),
            # as training/modeling.encode uses: one <|image_pad|> per merged patch.
            from ..runtime.vision import n_image_tokens, preprocess

            patches, grids = zip(*(preprocess(im.pixels, self.vision_spec) for im in images))
            pieces = text.split(IMAGE_PAD)
            text = pieces[0] + "".join(IMAGE_PAD * n_image_tokens(tuple(g), self.vision_spec) + rest
                                       for g, rest in zip(grids, pieces[1:]))
            ids = self.tokenize(text)
            self.vision_inputs = {"pixel_values": torch.cat([torch.from_numpy(p) for p in patches]).float(),
                                  "image_grid_thw": torch.tensor([list(g) for g in grids], dtype=torch.long)}
        else:
            ids = self.tokenize(text)
        self.prompt_len = len(ids)
        self.info.n_ctx = len(ids) + self.max_completion_tokens
        key = (tuple(ids), _vision_key(self.vision_inputs))
        if self._prefix is not None and self._prefix[0] == key:
            # The G rollouts of a question share the prompt: restore its KV cache instead of re-encoding it.
            _, cache, logits, rope_deltas = self._prefix
            self.cache, self._next_logits, self.fed = copy.deepcopy(cache), logits, list(ids)
            self._set_rope_state(rope_deltas)
            self.stats.cached_prompt_tokens = len(ids)
        else:
            self._set_rope_state(None)
            with torch.no_grad():
                self._feed(ids, vision=True)
            self.stats.prompt_tokens = len(ids)
            self._prefix = (key, copy.deepcopy(self.cache), self._next_logits, self._rope_state())
        self.stats.prefill_seconds = time.perf_counter() - t0
        return len(ids)

    def append_text(self, text: str) -> int:
        import torch

        ids = self.tokenize(text)
        with torch.no_grad():
            self._feed(ids)
        self.completion_ids += ids
        self.loss_mask += [0] * len(ids)  # inserted by the trainer, not sampled: no loss, no KL
        self.stats.inserted_tokens += len(ids)
        return len(ids)

    def generate(self, settings: SamplingSettings, stop: Sequence[str],
                 on_piece: Optional[Callable[[str], None]] = None) -> Generation:
        import torch

        t0 = time.perf_counter()
        tokens: list[GeneratedToken] = []
        pass_ids: list[int] = []
        text = ""
        stop_reason, stop_string, overshoot = "length", None, 0
        longest_stop = max((len(s) for s in stop), default=0)
        with torch.no_grad():
            while True:
                if len(pass_ids) >= settings.max_tokens:
                    stop_reason = "length"
                    break
                if len(self.fed) >= self.info.n_ctx:
                    stop_reason = "context"
                    break
                logits = self._next_logits.float()
                token = _sample(logits, settings)
                prob = float(torch.softmax(logits, -1)[token])
                if token in self.eos_ids:
                    # End of turn: kept in the completion (the policy chose to stop), never fed.
                    self._keep([token], [1])
                    tokens.append(GeneratedToken(token, "", prob))
                    stop_reason = "eos"
                    break
                new_text = self.tokenizer.decode(pass_ids + [token], skip_special_tokens=False)
                hit = _find_stop(new_text, stop, max(0, len(text) - longest_stop))
                if hit is None:
                    self._feed([token])
                    self._keep([token], [1])
                    tokens.append(GeneratedToken(token, new_text[len(text):], prob))
                    pass_ids.append(token)
                    text = new_text
                    if on_piece:
                        on_piece(tokens[-1].piece)
                    continue
                stop_string, cut = hit
                if cut == len(new_text):
                    replaced = [token]
                else:
                    # The token ran past the stop string: keep the text up to it (the runtime's rollback).
                    overshoot = len(new_text) - cut
                    replaced = self.tokenize(new_text[len(text):cut])
                probs = self._feed_scored(replaced, first_prob=prob if replaced == [token] else None)
                self._keep(replaced, [1] * len(replaced))
                pos = len(text)
                for tid, p in zip(replaced, probs):
                    piece = self.tokenizer.decode(pass_ids + [tid], skip_special_tokens=False)[pos:]
                    tokens.append(GeneratedToken(tid, piece, p))
                    pass_ids.append(tid)
                    pos += len(piece)
                    if on_piece:
                        on_piece(piece)
                text = new_text[:cut]
                stop_reason = "stop"
                break
        self.stats.generated_tokens += len(tokens)
        self.stats.generate_seconds += time.perf_counter() - t0
        return Generation(text, tokens, stop_reason, stop_string, overshoot, time.perf_counter() - t0)

    def n_tokens(self) -> int:
        return len(self.fed)

    def rollback(self, n_keep: int) -> None:
        import torch

        drop = len(self.fed) - n_keep
        if drop <= 0:
            return
        if n_keep < 1:
            raise ValueError("rollback must keep at least one token (the prompt is never dropped)")
        keep_completion = max(0, n_keep - self.prompt_len)
        self.completion_ids = self.completion_ids[:keep_completion]
        self.loss_mask = self.loss_mask[:keep_completion]
        self.stats.rolled_back_tokens += drop
        # The next token's logits come from the last kept position: drop it too and re-feed it.
        last = self.fed[n_keep - 1]
        self.cache.crop(n_keep - 1)
        self.fed = self.fed[: n_keep - 1]
        with torch.no_grad():
            self._feed([last])

    def close(self) -> None:
        self.cache = None

    # -- internals
    def _keep(self, ids: list[int], mask: list[int]) -> None:
        self.completion_ids += ids
        self.loss_mask += mask

    def forget_prefix(self) -> None:
        """Drop the cached prompt (call after the weights change: the cached keys/values are stale)."""
        self._prefix = None

    def _rope_state(self):
        inner = getattr(self.model, "model", None)
        return getattr(inner, "rope_deltas", None)

    def _set_rope_state(self, value) -> None:
        inner = getattr(self.model, "model", None)
        if inner is not None and hasattr(inner, "rope_deltas"):
            inner.rope_deltas = value  # Qwen2.5-VL keeps the M-RoPE deltas of the last prefill here

    def _forward(self, ids: list[int], vision: bool = False):
        import torch

        device = _device(self.model)
        start = len(self.fed)
        kwargs = {}
        if vision and self.vision_inputs:
            kwargs = {k: v.to(device) for k, v in self.vision_inputs.items()}
        out = self.model(
            input_ids=torch.tensor([ids], device=device),
            past_key_values=self.cache,
            cache_position=torch.arange(start, start + len(ids), device=device),
            use_cache=True,
            **kwargs,
        )
        self.cache = out.past_key_values
        self.fed += ids
        self.stats.decode_calls += 1
        return out.logits[0]

    def _feed(self, ids: list[int], vision: bool = False) -> None:
        if ids:
            self._next_logits = self._forward(ids, vision)[-1]

    def _feed_scored(self, ids: list[int], first_prob: Optional[float]) -> list[float]:
        """Feed `ids`; return each one's probability under the model (the first from the current logits)."""
        import torch

        first = self._next_logits.float()
        logits = self._forward(ids).float()
        probs = [first_prob if first_prob is not None else float(torch.softmax(first, -1)[ids[0]])]
        for i in range(1, len(ids)):
            probs.append(float(torch.softmax(logits[i - 1], -1)[ids[i]]))
        self._next_logits = logits[-1]
        return probs


def _vision_key(vision_inputs: dict):
    if not vision_inputs:
        return None
    import hashlib

    pixels = vision_inputs["pixel_values"]
    return hashlib.sha256(pixels.numpy().tobytes()).hexdigest(), tuple(vision_inputs["image_grid_thw"].flatten().tolist())


def _device(model):
    try:
        return next(model.parameters()).device
    except StopIteration:  # pragma: no cover - a model without parameters
        import torch

        return torch.device("cpu")


def _eos_ids(tokenizer) -> list[int]:
    ids = set()
    for tok in ("<|im_end|>", "<|endoftext|>"):
        tid = tokenizer.convert_tokens_to_ids(tok)
        if isinstance(tid, int) and tid != getattr(tokenizer, "unk_token_id", None) and tid >= 0:
            ids.add(tid)
    if getattr(tokenizer, "eos_token_id", None) is not None:
        ids.add(tokenizer.eos_token_id)
    return sorted(ids)


def _find_stop(text: str, stops: Sequence[str], search_from: int) -> Optional[tuple[str, int]]:
    """(stop string, end offset) of the earliest stop string in text[search_from:], or None."""
    best = None
    for s in stops:
        i = text.find(s, search_from)
        if i >= 0 and (best is None or i < best[1] - len(best[0])):
            best = (s, i + len(s))
    return best


def _sample(logits, settings: SamplingSettings) -> int:
    """Greedy at temperature 0; else softmax(logits / T) with optional top-k / top-p (uses torch's global RNG, so
    a seeded or resumed run samples the same tokens)."""
    import torch

    if settings.temperature <= 0:
        return int(torch.argmax(logits))
    scaled = logits / settings.temperature
    if settings.top_k and settings.top_k > 0:
        kth = torch.topk(scaled, min(settings.top_k, scaled.numel())).values[-1]
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    probs = torch.softmax(scaled, -1)
    if settings.top_p < 1.0:
        sorted_p, order = torch.sort(probs, descending=True)
        keep = torch.cumsum(sorted_p, 0) - sorted_p < settings.top_p
        filtered = torch.zeros_like(probs)
        filtered[order[keep]] = probs[order[keep]]
        probs = filtered / filtered.sum()
    return int(torch.multinomial(probs, 1))


# ------------------------------------------------------------------ rollouts


def letter_token_ids(tokenizer, letter: str) -> list[int]:
    """Token ids that spell the (upper-case) option letter as the first answer token: "A" and " A"."""
    letter = letter.strip().strip(".").upper()
    ids = []
    for spelling in (letter, " " + letter):
        enc = tokenizer.encode(spelling, add_special_tokens=False)
        if len(enc) == 1 and enc[0] not in ids:
            ids.append(enc[0])
    return ids


def gold_logprob_at(model, prefix_ids: list[int], letter_ids: list[int], vision_inputs: dict) -> Optional[float]:
    """log Σ p(token | prefix) over the tokens spelling the gold letter (teacher-forced, no cache)."""
    import torch

    if not letter_ids:
        return None
    device = _device(model)
    inner = getattr(model, "model", None)
    if inner is not None and hasattr(inner, "rope_deltas"):
        inner.rope_deltas = None
    with torch.no_grad():
        kwargs = {k: v.to(device) for k, v in vision_inputs.items()}
        logits = model(input_ids=torch.tensor([prefix_ids], device=device), use_cache=False, **kwargs).logits
        logp = torch.log_softmax(logits[0, -1].float(), -1)
        return float(torch.logsumexp(logp[letter_ids], 0))


class RolloutRunner:
    """Runs G rollouts of an MCQ example with the runtime loop. `text_retriever` is a runtime TextRetriever
    (`PackTextRetriever([Pack.open(...)])`), or None: queries then get `<retrieve> None </retrieve>`.
    `vision_spec` (training.modeling.LoadedModel.vision_spec) makes a Qwen2.5-VL model see the images."""

    def __init__(self, model, tokenizer, *, vision_spec=None, text_retriever=None,
                 settings: Optional[RolloutSettings] = None):
        self.settings = settings or RolloutSettings()
        self.backend = HFRolloutBackend(model, tokenizer, vision_spec=vision_spec,
                                        max_completion_tokens=self.settings.max_completion_tokens)
        self.model, self.tokenizer = model, tokenizer
        self.text_retriever = text_retriever
        s = self.settings
        reserve = min(GENERATION_RESERVE_MAX, max(1, s.max_completion_tokens // 4))
        self.loop_config = LoopConfig(
            max_passes=s.max_passes, top_k_docs=s.top_k_docs, retrieval=text_retriever is not None, cdir=False,
            sampling=SamplingSettings(temperature=s.temperature, top_p=s.top_p, top_k=s.top_k_sampling,
                                      max_tokens=s.max_completion_tokens),
            generation_reserve_tokens=reserve)

    def rollout(self, example: McqExample, images: Sequence[ImageInput] = ()) -> Rollout:
        t0 = time.perf_counter()
        be = self.backend
        record = EvidenceRecord(question=example.question,
                                options=[{"letter": o.letter, "text": o.text} for o in example.options],
                                images=[], model={"backend": "transformers"}, packs=[], settings={})
        loop = MedRwRLoop(be, self.text_retriever, None, self.loop_config)
        loop.run(record, example.question, example.options, images)
        turn = record.assistant_text
        retrieves = [s for s in record.steps if isinstance(s, Retrieve)]
        first_query = turn.find(P.QUERY_OPEN)
        y_prime = turn[:first_query] if first_query >= 0 else None
        rollout = Rollout(
            example_id=example.id,
            prompt_ids=list(be.fed[: be.prompt_len]),
            completion_ids=list(be.completion_ids),
            loss_mask=list(be.loss_mask),
            completion_text=turn,
            letter=record.letter,
            retrieval_used=any(r.docs for r in retrieves),
            queries=[q.text for q in record.queries() if q.text],
            y_prime=y_prime,
            status=record.status,
            sampled_tokens=be.stats.generated_tokens,
            inserted_tokens=be.stats.inserted_tokens,
            vision_inputs=dict(be.vision_inputs),
            record=record,
        )
        if self.settings.confidence_probes and rollout.retrieval_used:
            self._probe_confidence(rollout, example.answer)
        rollout.seconds = time.perf_counter() - t0
        return rollout

    def _probe_confidence(self, rollout: Rollout, gold_letter: str) -> None:
        letter_ids = letter_token_ids(self.tokenizer, gold_letter)
        turn = rollout.completion_text
        at = turn.find(P.ANSWER_OPEN)
        with_text = turn[: at + len(P.ANSWER_OPEN)] if at >= 0 else turn.rstrip() + "\n" + P.ANSWER_OPEN
        without_text = (rollout.y_prime or "") + P.ANSWER_OPEN
        tok = self.backend.tokenize
        rollout.logp_gold_with = gold_logprob_at(self.model, rollout.prompt_ids + tok(with_text), letter_ids,
                                                 rollout.vision_inputs)
        rollout.logp_gold_without = gold_logprob_at(self.model, rollout.prompt_ids + tok(without_text), letter_ids,
                                                    rollout.vision_inputs)

    def group(self, example: McqExample, n: int, images: Sequence[ImageInput] = ()) -> list[Rollout]:
        self.backend.forget_prefix()
        return [self.rollout(example, images) for _ in range(n)]


def example_images(example: McqExample) -> list[ImageInput]:
    """The example's images as runtime ImageInputs (the last is the current image)."""
    from ..imaging import load_image

    out = []
    for i, path in enumerate(example.images):
        loaded = load_image(path)
        out.append(ImageInput(loaded.pixels, loaded.sha256, "current" if i == len(example.images) - 1 else "prior"))
    return out
