"""GRPO as in Med-RwR: G rollouts per question with retrieval in the loop, group-normalised advantages, a clipped
ratio, KL to a frozen reference, token-level loss normalisation, and retrieved tokens out of both.

For each question, G = 8 rollouts (training/rollout.py: the runtime's loop, temperature 1.0, up to 4096
completion tokens, 3 passes) are scored (training/rewards.py); the advantage of rollout i is

    A_i = (r_i - mean(r)) / (std(r) + eps)          (std over the group, unbiased, as TRL / ms-swift)

and every policy token t of every rollout in the micro-batch gets

    L_t = -min(ρ_t A_i, clip(ρ_t, 1-ε, 1+ε) A_i) + β KL_t,    ρ_t = π(y_t) / π_old(y_t),
    KL_t = exp(ref_t - logp_t) - (ref_t - logp_t) - 1            (the k3 estimator, ≥ 0)

    loss = Σ_t mask_t L_t / Σ_t mask_t                            (token-level: each token counts the same)

with ε = 0.2, β = 1e-3. mask_t = 0 on every token the trainer inserted: the `<retrieve> … </retrieve>` blocks
(and their surrounding newlines) and the prompt. One optimisation pass per batch of rollouts (the reference's
num_iterations = 1), so π_old = π detached and ρ = 1 in value, while its gradient is the policy gradient.

Stage 1: text MCQ (MedQA / MedMCQA JSONL), rewards accuracy + format. Stage 2: multimodal MCQ (an image per
row), all four rewards. `train_grpo(config)` drives the shared TrainEngine (devices, DDP, checkpoints, resume,
metrics) exactly as SFT and DPO do.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Optional, Sequence

from ..errors import InputError
from .config import RunConfig
from .rewards import RewardBreakdown, RewardInputs, RewardOptions, RewardWeights, compute_reward, format_ok


@dataclass(kw_only=True)
class GRPOConfig(RunConfig):
    """One GRPO stage. `batch_size` = questions per process per micro-step (each gives `num_generations`
    rollouts); `max_length` is not used (the prompt is whole, the completion is capped by max_completion_length)."""

    train_file: str  # MCQ JSONL (MedQA / MedMCQA / ours); stage 2 rows need an "image"
    stage: int = 1  # 1: text MCQ, accuracy + format; 2: multimodal MCQ, all rewards
    num_generations: int = 8  # G
    epsilon: float = 0.2  # ratio clip
    beta: float = 1e-3  # KL weight; 0 = no reference model is loaded
    temperature: float = 1.0
    top_p: float = 1.0
    max_completion_length: int = 4096  # completion tokens, retrieve blocks included
    max_passes: int = 3
    top_k_docs: int = 3  # documents per search (AskSettings' name; `retrieval_top_k` before)
    packs: list[str] = field(default_factory=list)  # knowledge packs searched in process (none: <retrieve> None)
    search_mode: Optional[str] = None  # dense | lexical | hybrid (default: each pack's own)
    reward_weights: RewardWeights = field(default_factory=RewardWeights)
    reward_options: RewardOptions = field(default_factory=RewardOptions)
    reference_model: Optional[str] = None  # default: the starting model
    advantage_eps: float = 1e-4
    logprob_batch_size: int = 8  # rollouts per forward/backward chunk (memory: chunk x length x vocab logits)
    medmcqa_cop_base: int = 1

    RENAMED: ClassVar[dict[str, str]] = {"retrieval_top_k": "top_k_docs"}  # old config key -> field

    def data_files(self) -> list[str]:
        # A changed pack changes what rollouts retrieve: resume refuses it like a changed data file.
        return [self.train_file] + [str(Path(p) / "manifest.json") for p in self.packs]

    def validate(self) -> None:
        super().validate()
        if self.stage not in (1, 2):
            raise InputError(f"config: stage must be 1 or 2 (got {self.stage})")
        if self.num_generations < 2:
            raise InputError(f"config: num_generations must be >= 2 for group advantages (got {self.num_generations})")
        for name in ("max_completion_length", "max_passes", "top_k_docs", "logprob_batch_size"):
            if getattr(self, name) < 1:
                raise InputError(f"config: {name} must be >= 1 (got {getattr(self, name)})")
        if not 0 < self.epsilon < 1:
            raise InputError(f"config: epsilon must be in (0, 1) (got {self.epsilon})")
        if self.beta < 0 or self.temperature <= 0 or not 0 < self.top_p <= 1:
            raise InputError("config: beta must be >= 0, temperature > 0 and top_p in (0, 1]")


# ------------------------------------------------------------------ the loss (pure tensor functions)


def group_advantages(rewards, group_size: int, eps: float = 1e-4):
    """(r - group mean) / (group std + eps) for consecutive groups of `group_size` rewards (a 1-D tensor)."""
    grouped = rewards.view(-1, group_size)
    mean = grouped.mean(-1, keepdim=True)
    std = grouped.std(-1, keepdim=True)  # unbiased, as TRL / ms-swift
    centred = grouped - mean
    # A group of equal rewards carries no signal: its advantages are exactly 0 (whatever eps is).
    return (centred / (std + eps)).masked_fill(std == 0, 0.0).view(-1)


def grpo_token_loss(logp, old_logp, ref_logp, advantages, mask, *, epsilon: float = 0.2, beta: float = 1e-3,
                    normaliser=None):
    """The GRPO loss over (B, T) token log-probs. `advantages`: (B,). `mask`: (B, T), 1 = a policy token.

    Returns (loss, stats). loss = Σ mask·L / normaliser (default Σ mask): pass the whole micro-batch's token count
    when the batch is processed in chunks, so the chunks' losses add up to the micro-batch's."""
    import torch

    mask = mask.to(logp.dtype)
    adv = advantages.to(logp.dtype).unsqueeze(-1)
    ratio = torch.exp(logp - old_logp)
    unclipped = ratio * adv
    clipped = torch.clamp(ratio, 1 - epsilon, 1 + epsilon) * adv
    per_token = -torch.min(unclipped, clipped)
    kl = torch.zeros_like(logp)
    if ref_logp is not None and beta > 0:
        diff = ref_logp - logp
        kl = torch.exp(diff) - diff - 1
        per_token = per_token + beta * kl
    n = mask.sum() if normaliser is None else torch.as_tensor(normaliser, dtype=logp.dtype)
    n = n.clamp(min=1)
    loss = (per_token * mask).sum() / n
    with torch.no_grad():
        was_clipped = ((ratio < 1 - epsilon) & (adv < 0)) | ((ratio > 1 + epsilon) & (adv > 0))
        stats = {"kl_sum": float((kl * mask).sum()), "clipped": float((was_clipped.to(mask.dtype) * mask).sum()),
                 "tokens": float(mask.sum())}
    return loss, stats


def completion_logprobs(model, batch: dict, temperature: float = 1.0):
    """log π(token | prefix) / temperature-scaled, for every position 1..T-1: (B, T-1), and the loss mask (B, T-1)."""
    import torch

    from .modeling import vision_anchor

    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values", "image_grid_thw") if k in batch}
    _reset_rope_state(model)
    logp, mask = logits_to_logprobs(model(**inputs, use_cache=False).logits, batch, temperature)
    # A vision model's text-only batch (stage 1) under DDP: every rank must run the vision tower so that gradient
    # reductions line up (training/modeling.py explains); the anchor is 0 x the tower's output.
    anchor = vision_anchor(model, inputs) if torch.is_grad_enabled() else None
    return (logp + anchor if anchor is not None else logp), mask


def logits_to_logprobs(logits, batch: dict, temperature: float = 1.0):
    """(B, T, V) logits -> per-token log-probs of the next tokens (B, T-1), zeroed outside the loss mask."""
    import torch

    logits = logits[:, :-1].float()
    if temperature != 1.0:
        logits = logits / temperature
    targets = batch["input_ids"][:, 1:]
    picked = torch.gather(logits, -1, targets.unsqueeze(-1)).squeeze(-1)
    logp = picked - torch.logsumexp(logits, dim=-1)
    mask = (batch["loss_mask"][:, 1:] * batch["attention_mask"][:, 1:]).to(logp.dtype)
    return logp * mask, mask


def _reset_rope_state(model) -> None:
    inner = getattr(getattr(model, "module", model), "model", None)
    if inner is not None and hasattr(inner, "rope_deltas"):
        inner.rope_deltas = None  # Qwen2.5-VL: a full forward recomputes M-RoPE from the prompt


def rollout_batch(rollouts: Sequence, pad_id: int, device) -> dict:
    """Right-padded tensors for a chunk of rollouts: input_ids, attention_mask, loss_mask (prompt = 0, inserted
    retrieve tokens = 0, sampled tokens = 1), plus the images' pixel_values / image_grid_thw."""
    import torch

    width = max(len(r.input_ids) for r in rollouts)
    ids = torch.full((len(rollouts), width), pad_id, dtype=torch.long)
    attn = torch.zeros_like(ids)
    loss = torch.zeros_like(ids)
    for i, r in enumerate(rollouts):
        n = len(r.input_ids)
        ids[i, :n] = torch.tensor(r.input_ids)
        attn[i, :n] = 1
        loss[i, len(r.prompt_ids):n] = torch.tensor(r.loss_mask, dtype=torch.long)
    batch = {"input_ids": ids.to(device), "attention_mask": attn.to(device), "loss_mask": loss.to(device)}
    with_images = [r for r in rollouts if r.vision_inputs]
    if with_images:
        batch["pixel_values"] = torch.cat([r.vision_inputs["pixel_values"] for r in with_images]).to(device)
        batch["image_grid_thw"] = torch.cat([r.vision_inputs["image_grid_thw"] for r in with_images]).to(device)
    return batch


# ------------------------------------------------------------------ one micro-step


@dataclass
class MicroStepResult:
    loss: float
    rewards: list[RewardBreakdown]
    rollouts: list
    kl: float  # mean per policy token
    clip_fraction: float
    policy_tokens: int
    rollout_seconds: float
    optimise_seconds: float


def score_rollouts(rollouts: Sequence, examples: Sequence, config: GRPOConfig, vocabulary=None,
                   image_text_scorer=None) -> list[RewardBreakdown]:
    """Rewards for `rollouts`; examples[i] is the question of rollouts[i]."""
    out = []
    for ro, ex in zip(rollouts, examples):
        inputs = RewardInputs(
            completion=ro.completion_text, gold_letter=ex.answer, letters=ex.letters, gold_text=ex.answer_text,
            retrieval_used=ro.retrieval_used, logp_gold_with=ro.logp_gold_with,
            logp_gold_without=ro.logp_gold_without, image=ex.image)
        out.append(compute_reward(inputs, stage=config.stage, weights=config.reward_weights,
                                  options=config.reward_options, vocabulary=vocabulary,
                                  image_text_scorer=image_text_scorer))
    return out


def grpo_micro_step(policy, reference, runner, examples: Sequence, config: GRPOConfig, *, pad_id: int,
                    device, backward, sync_context=None, vocabulary=None, image_text_scorer=None,
                    images_for=None, reward_fn=None) -> MicroStepResult:
    """Roll out G per question, score, compute advantages, then forward/backward the loss in chunks.

    `backward(loss)` is the engine's; `sync_context(last_chunk)` returns the context a chunk's forward/backward
    runs in (DDP's no_sync for all but the last); `images_for(example)` gives a stage-2 row's ImageInputs.
    `reward_fn(rollout, example) -> float` replaces Med-RwR's rewards (synthetic tasks in tests)."""
    import torch

    G = config.num_generations
    t0 = time.perf_counter()
    was_training = policy.training
    policy.eval()
    rollouts, owners = [], []
    for ex in examples:
        images = images_for(ex) if images_for is not None else ()
        rollouts += runner.group(ex, G, images)  # forgets the previous step's cached prompt (stale weights)
        owners += [ex] * G
    policy.train(was_training)
    rollout_seconds = time.perf_counter() - t0

    if reward_fn is not None:
        rewards = [RewardBreakdown(0.0, 0.0, 0.0, 0.0, 0.0, float(reward_fn(ro, ex))) for ro, ex in zip(rollouts, owners)]
    else:
        rewards = score_rollouts(rollouts, owners, config, vocabulary, image_text_scorer)
    advantages = group_advantages(torch.tensor([r.total for r in rewards], dtype=torch.float32), G,
                                  config.advantage_eps)
    total_tokens = sum(sum(r.loss_mask) for r in rollouts)

    t1 = time.perf_counter()
    chunk = config.logprob_batch_size
    loss_sum, kl_sum, clipped = 0.0, 0.0, 0.0
    starts = list(range(0, len(rollouts), chunk))
    for n_chunk, start in enumerate(starts):
        part = rollouts[start : start + chunk]
        batch = rollout_batch(part, pad_id, device)
        adv = advantages[start : start + chunk].to(device)
        last = n_chunk == len(starts) - 1
        ctx = sync_context(last) if sync_context is not None else contextlib.nullcontext()
        with ctx:
            ref_logp = None
            if reference is not None and config.beta > 0:
                with torch.no_grad():
                    ref_logp, _ = completion_logprobs(reference, batch, config.temperature)
            logp, mask = completion_logprobs(policy, batch, config.temperature)
            loss, stats = grpo_token_loss(logp, logp.detach(), ref_logp, adv, mask, epsilon=config.epsilon,
                                          beta=config.beta, normaliser=max(total_tokens, 1))
            backward(loss)
        loss_sum += float(loss.detach())
        kl_sum += stats["kl_sum"]
        clipped += stats["clipped"]
    denom = max(total_tokens, 1)
    return MicroStepResult(loss_sum, rewards, rollouts, kl_sum / denom, clipped / denom, total_tokens,
                           rollout_seconds, time.perf_counter() - t1)


# ------------------------------------------------------------------ the trainer


def train_grpo(config: GRPOConfig, *, resume: bool = True, force_resume: bool = False, quiet: bool = False,
               image_text_scorer=None, reward_fn=None) -> Optional[Path]:
    """Train one GRPO stage; returns the last checkpoint directory (a HF model dir `export model` takes).

    `image_text_scorer(image_path, text) -> cosine` (a joint image-text encoder) adds the image-query similarity
    to stage 2's query-semantic reward; without one that part is omitted and the metrics say so. `reward_fn`
    (rollout, example) -> float replaces the Med-RwR rewards (synthetic tasks)."""
    from ..kb_pack.pack import Pack
    from ..runtime.retrieval import PackTextRetriever
    from .data import load_mcq_jsonl
    from .engine import TrainEngine
    from .modeling import load_model
    from .rollout import RolloutRunner, RolloutSettings, example_images

    rows = load_mcq_jsonl(config.train_file, require_image=config.stage == 2,
                          medmcqa_cop_base=config.medmcqa_cop_base).rows
    packs: list = []
    if config.distributed == "auto":  # the engine's auto picks FSDP on GPUs; rollouts need the whole model per rank
        config = dataclasses.replace(config, distributed="ddp")
    engine = TrainEngine(config, stage="grpo", quiet=quiet)
    try:
        for path in config.packs:
            packs.append(Pack.open(path))
        if engine.strategy == "fsdp":
            raise InputError("GRPO rollouts need the whole model on every process: use distributed: ddp "
                             "(FSDP would need every rank to generate in lock-step)")
        lm = load_model(config.model)
        if config.stage == 2 and not lm.vision:
            engine.print("note: stage 2 with a text-only model: images are not shown to the model (rewards still "
                          "use them where they can)")
        reference = None
        if config.beta > 0:
            reference = engine.prepare_frozen(load_model(config.reference_model or config.model,
                                                         for_training=False).model)
        model, optimizer, scheduler, step = engine.start(lm.model, resume=resume, force_resume=force_resume)
        last = engine.latest_checkpoint() if step else None
        if step >= config.max_steps:
            engine.print(f"already at step {step} of {config.max_steps}: nothing to do")
            return last
        policy = engine.unwrap(model)  # rollouts run the plain module (DDP's wrapper is for the backward)
        runner = RolloutRunner(
            policy, lm.tokenizer, vision_spec=lm.vision_spec if lm.vision else None,
            text_retriever=PackTextRetriever(packs, config.search_mode) if packs else None,
            settings=RolloutSettings(max_completion_tokens=config.max_completion_length,
                                     max_passes=config.max_passes, top_k_docs=config.top_k_docs,
                                     temperature=config.temperature, top_p=config.top_p,
                                     confidence_probes=config.stage == 2))
        vocabulary = None
        if config.stage == 2:
            from .entities import default_vocabulary

            vocabulary = default_vocabulary()
        engine.print(f"grpo stage {config.stage}: {len(rows)} questions, G={config.num_generations}, "
                     f"{len(packs)} pack(s), {engine.world_size} process(es), {engine.strategy}, starting at "
                     f"step {step}")

        def sync_context(last_chunk: bool):
            if engine.world_size > 1 and not last_chunk:
                return engine.accelerator.no_sync(model)
            return engine.accumulate(model)

        with engine.progress(step, config.max_steps):
            while step < config.max_steps:
                started = time.perf_counter()
                results, grad_norm = [], None
                for micro in range(config.grad_accumulation):
                    examples = [rows[i] for i in engine.batch_indices(len(rows), step, micro)]
                    with engine.autocast():
                        result = grpo_micro_step(
                            model, reference, runner, examples, config, pad_id=lm.pad_id, device=engine.device,
                            backward=engine.backward, sync_context=sync_context, vocabulary=vocabulary,
                            image_text_scorer=image_text_scorer,
                            images_for=example_images if config.stage == 2 and lm.vision else None,
                            reward_fn=reward_fn)
                    grad_norm = engine.step(optimizer, model, scheduler)
                    results.append(result)
                step += 1
                if step % config.log_every == 0 or step == config.max_steps:
                    engine.log(step, step_metrics(results, time.perf_counter() - started, grad_norm,
                                                  scheduler.get_last_lr()[0]))
                if engine.should_save(step):
                    last = engine.save_checkpoint(step, model, optimizer, scheduler)
        engine.print(f"done: {last}  (export: medrwr-edge export model {last} OUT)")
        return last
    finally:
        for p in packs:
            p.close()
        engine.close()


def step_metrics(results: Sequence[MicroStepResult], seconds: float, grad_norm, lr: float) -> dict:
    rewards = [r for res in results for r in res.rewards]
    rollouts = [ro for res in results for ro in res.rollouts]
    n = max(len(rewards), 1)
    mean = lambda xs: sum(xs) / max(len(xs), 1)  # noqa: E731
    totals = [r.total for r in rewards]
    sampled = sum(ro.sampled_tokens for ro in rollouts)
    rollout_s = sum(res.rollout_seconds for res in results)
    optimise_s = sum(res.optimise_seconds for res in results)
    policy_tokens = sum(res.policy_tokens for res in results)
    metrics = {
        "loss": mean([res.loss for res in results]),
        "reward": mean(totals),
        "reward_std": math.sqrt(mean([(t - mean(totals)) ** 2 for t in totals])),
        "kl": mean([res.kl for res in results]),
        "clip_fraction": mean([res.clip_fraction for res in results]),
        "grad_norm": grad_norm,
        "lr": lr,
        "accuracy": sum(r.accuracy for r in rewards) / n,
        "format_ok": sum(format_ok(ro.completion_text) for ro in rollouts) / n,
        "retrieval_rate": sum(ro.retrieval_used for ro in rollouts) / n,
        "completion_tokens": mean([len(ro.completion_ids) for ro in rollouts]),
        "rollout_tokens_per_s": sampled / rollout_s if rollout_s > 0 else 0.0,
        "optimise_tokens_per_s": policy_tokens / optimise_s if optimise_s > 0 else 0.0,
        "step_seconds": seconds,
    }
    for key in ("format", "accuracy", "query_semantic", "confidence_gain", "penalties"):
        metrics[f"reward_{key}"] = sum(getattr(r, key) for r in rewards) / n
    omitted = any("image-query similarity omitted" in note for r in rewards for note in r.notes)
    if omitted:
        metrics["image_query_similarity"] = "omitted: no joint image-text encoder"
    return metrics
