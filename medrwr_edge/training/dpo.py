"""Stage 0b: direct preference optimisation (MedE²'s second stage: preference pairs, images allowed).

For a prompt x with a preferred response y_w and a dispreferred y_l, DPO (Rafailov et al., 2023) minimises

    -log σ( β · [ (log π(y_w|x) - log π_ref(y_w|x)) - (log π(y_l|x) - log π_ref(y_l|x)) ] )

where π_ref is a frozen copy of the starting model (or `reference_model`). log π(y|x) is the sum over the
response tokens (`modeling.sequence_logprobs`), with `<retrieve>` blocks left out as in SFT. `sft_weight` adds
the chosen response's mean NLL (RPO-style) to keep its likelihood from sinking with the rejected one.
"""

from __future__ import annotations

import time
from pathlib import Path

from ..errors import InputError
from .config import DPOConfig
from .data import DpoExample, load_dpo_jsonl
from .engine import TrainEngine
from .modeling import LoadedModel, collate, encode, load_model, model_inputs, token_logprobs


def dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta: float):
    """Per-pair DPO loss and the implicit rewards β·(log π - log π_ref) of chosen and rejected: three (B,) tensors."""
    import torch.nn.functional as F

    chosen_reward = beta * (policy_chosen - ref_chosen)
    rejected_reward = beta * (policy_rejected - ref_rejected)
    loss = -F.logsigmoid(chosen_reward - rejected_reward)
    return loss, chosen_reward.detach(), rejected_reward.detach()


def pair_batch(lm: LoadedModel, rows: list[DpoExample], config: DPOConfig) -> dict:
    """One batch of 2B sequences: the B chosen responses, then the B rejected ones (same prompts and images)."""
    chosen, rejected = [], []
    for row in rows:
        messages = [{"role": "user", "content": row.prompt}]
        for response, out in ((row.chosen, chosen), (row.rejected, rejected)):
            try:
                out.append(encode(lm, messages, response, row.images, max_length=config.max_length,
                                  mask_retrieved=config.mask_retrieved))
            except InputError as e:  # name the row: the file may have thousands
                raise InputError(f"{Path(config.train_file).name}:{row.line}: {e}") from None
    return collate(chosen + rejected, lm.pad_id)


def pair_logprobs(model, batch: dict, device):
    """(sum log p of chosen, of rejected, mean NLL of chosen): the first two (B,), the last a scalar."""
    inputs = model_inputs(batch, device)
    logp, mask = token_logprobs(model, labels_mask=batch["loss_mask"].to(device), **inputs)
    seq = logp.sum(-1)
    half = seq.shape[0] // 2
    chosen_nll = -logp[:half].sum() / mask[:half].sum().clamp(min=1)
    return seq[:half], seq[half:], chosen_nll


def train_dpo(config: DPOConfig, *, resume: bool = True, force_resume: bool = False, quiet: bool = False) -> Path:
    """Train; returns the last checkpoint directory (a Hugging Face model dir that `export model` takes)."""
    import torch

    rows = load_dpo_jsonl(config.train_file).rows
    engine = TrainEngine(config, stage="dpo", quiet=quiet)
    try:
        lm = load_model(config.model)
        reference = engine.prepare_frozen(load_model(config.reference_model or config.model,
                                                     for_training=False).model)
        model, optimizer, scheduler, step = engine.start(lm.model, resume=resume, force_resume=force_resume)
        last = engine.latest_checkpoint() if step else None
        if step >= config.max_steps:
            engine.print(f"already at step {step} of {config.max_steps}: nothing to do")
            return last
        engine.print(f"dpo: {len(rows)} pairs, beta {config.beta}, {engine.world_size} process(es), "
                     f"{engine.strategy}, precision {engine.mixed_precision}, starting at step {step}")
        with engine.progress(step, config.max_steps):
            while step < config.max_steps:
                started = time.perf_counter()
                sums = {"loss": 0.0, "chosen_reward": 0.0, "rejected_reward": 0.0, "accuracy": 0.0, "chosen_nll": 0.0}
                tokens, grad_norm = 0, None
                for micro in range(config.grad_accumulation):
                    pairs = [rows[i] for i in engine.batch_indices(len(rows), step, micro)]
                    batch = pair_batch(lm, pairs, config)
                    with torch.no_grad(), engine.autocast():
                        ref_chosen, ref_rejected, _ = pair_logprobs(reference, batch, engine.device)
                    with engine.accumulate(model), engine.autocast():
                        pol_chosen, pol_rejected, chosen_nll = pair_logprobs(model, batch, engine.device)
                        losses, r_chosen, r_rejected = dpo_loss(pol_chosen, pol_rejected, ref_chosen.float(),
                                                                ref_rejected.float(), config.beta)
                        loss = losses.mean() + config.sft_weight * chosen_nll
                    engine.backward(loss)
                    grad_norm = engine.step(optimizer, model, scheduler)
                    sums["loss"] += float(loss.detach())
                    sums["chosen_reward"] += float(r_chosen.mean())
                    sums["rejected_reward"] += float(r_rejected.mean())
                    sums["accuracy"] += float((r_chosen > r_rejected).float().mean())
                    sums["chosen_nll"] += float(chosen_nll.detach())
                    tokens += int(batch["attention_mask"].sum())
                step += 1
                elapsed = time.perf_counter() - started
                if step % config.log_every == 0 or step == config.max_steps:
                    metrics = {k: v / config.grad_accumulation for k, v in sums.items()}
                    metrics["reward_margin"] = metrics["chosen_reward"] - metrics["rejected_reward"]
                    engine.log(step, {**metrics, "grad_norm": grad_norm, "lr": scheduler.get_last_lr()[0],
                                      "tokens": tokens, "tokens_per_s": tokens / elapsed if elapsed > 0 else 0.0})
                if engine.should_save(step):
                    last = engine.save_checkpoint(step, model, optimizer, scheduler)
        engine.print(f"done: {last}  (export: medrwr-edge export model {last} OUT)")
        return last
    finally:
        engine.close()
