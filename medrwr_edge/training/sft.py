"""Stage 0a: supervised fine-tuning on reasoning traces (MedE²'s text-only reasoning SFT, before DPO/GRPO).

Each row is a conversation whose last message is the assistant's trace, e.g.
`<think> … </think>\n<query> … </query>\n<retrieve> (1) … </retrieve>\n<think> … </think>\n<answer> B </answer>`.
The loss is the mean negative log-likelihood of the assistant's tokens only: the system prompt, the question and
any `<retrieve>` block (written by the search engine, not by the model) get none. Prompts are the runtime's
(`modeling.prompt_text`), so what the model learns here is what `medrwr-edge ask` will show it.
"""

from __future__ import annotations

import time
from pathlib import Path

from ..errors import InputError
from .config import SFTConfig
from .data import SftExample, load_sft_jsonl
from .engine import TrainEngine
from .modeling import Encoded, LoadedModel, collate, encode, load_model, model_inputs, token_logprobs


def sft_loss(model, batch: dict, device=None):
    """Mean NLL over the loss-masked tokens of the batch, and the number of those tokens."""
    device = device if device is not None else batch["input_ids"].device
    inputs = model_inputs(batch, device)
    logp, mask = token_logprobs(model, labels_mask=batch["loss_mask"].to(device), **inputs)
    n = mask.sum()
    return -logp.sum() / n.clamp(min=1), int(n.item())


def encode_sft(lm: LoadedModel, row: SftExample, config: SFTConfig) -> Encoded:
    try:
        return encode(lm, row.prompt_messages, row.response, row.images, max_length=config.max_length,
                      mask_retrieved=config.mask_retrieved)
    except InputError as e:  # name the row: the file may have thousands
        raise InputError(f"{Path(config.train_file).name}:{row.line}: {e}") from None


def train_sft(config: SFTConfig, *, resume: bool = True, force_resume: bool = False, quiet: bool = False) -> Path:
    """Train; returns the last checkpoint directory (a Hugging Face model dir that `export model` takes)."""
    rows = load_sft_jsonl(config.train_file).rows
    engine = TrainEngine(config, stage="sft", quiet=quiet)
    try:
        lm = load_model(config.model)
        model, optimizer, scheduler, step = engine.start(lm.model, resume=resume, force_resume=force_resume)
        last = engine.latest_checkpoint() if step else None
        if step >= config.max_steps:
            engine.print(f"already at step {step} of {config.max_steps}: nothing to do")
            return last
        engine.print(f"sft: {len(rows)} rows, {engine.world_size} process(es), {engine.strategy}, "
                     f"precision {engine.mixed_precision}, starting at step {step}")
        with engine.progress(step, config.max_steps):
            while step < config.max_steps:
                started = time.perf_counter()
                losses, trained_tokens, all_tokens, truncated, grad_norm = [], 0, 0, 0, None
                for micro in range(config.grad_accumulation):
                    encoded = [encode_sft(lm, rows[i], config) for i in engine.batch_indices(len(rows), step, micro)]
                    batch = collate(encoded, lm.pad_id)
                    with engine.accumulate(model), engine.autocast():
                        loss, n = sft_loss(model, batch, engine.device)
                    engine.backward(loss)
                    grad_norm = engine.step(optimizer, model, scheduler)
                    losses.append(float(loss.detach()))
                    trained_tokens += n
                    all_tokens += int(batch["attention_mask"].sum())
                    truncated += sum(e.truncated for e in encoded)
                step += 1
                elapsed = time.perf_counter() - started
                if step % config.log_every == 0 or step == config.max_steps:
                    engine.log(step, {
                        "loss": sum(losses) / len(losses), "grad_norm": grad_norm,
                        "lr": scheduler.get_last_lr()[0], "response_tokens": trained_tokens,
                        "tokens": all_tokens, "tokens_per_s": all_tokens / elapsed if elapsed > 0 else 0.0,
                        "truncated": truncated,
                    })
                if engine.should_save(step):
                    last = engine.save_checkpoint(step, model, optimizer, scheduler)
        engine.print(f"done: {last}  (export: medrwr-edge export model {last} OUT)")
        return last
    finally:
        engine.close()
