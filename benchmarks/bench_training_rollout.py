"""GRPO throughput on CPU for a tiny random Qwen2 LM: rollouts (the runtime loop over a HF model and its KV
cache) and optimisation steps (policy forward + backward, with and without the frozen reference), side by side.

    python benchmarks/bench_training_rollout.py [--hidden 64] [--layers 2] [--completion 32] [--g 8] [--reps 3]

Rows:
  * rollout tokens/s: G rollouts of one question, sampled tokens per second, with the question's prompt KV cache
    shared across the group (what train_grpo does) vs re-encoding the prompt for every rollout;
  * rollout with one retrieval: a scripted pass that queries, the pack search, the block splice, a second pass;
  * optimisation tokens/s: policy tokens (loss-mask 1) per second of forward + backward + AdamW over the group,
    beta = 1e-3 (reference forward too) vs beta = 0.
The prompt is the runtime's text-variant system prompt + a 2-option question (~500 tokens with the tiny
tokenizer), so rollouts are prompt-heavy as in the paper's stage 1.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--completion", type=int, default=32)
    ap.add_argument("--g", type=int, default=8)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)

    import torch
    from grpo_fixtures import ScriptedLM, load_tiny, make_text_pack, make_tiny_qwen2_lm

    from medrwr_edge.kb_pack.pack import Pack
    from medrwr_edge.runtime.protocol import Option
    from medrwr_edge.runtime.retrieval import PackTextRetriever
    from medrwr_edge.training.data import McqExample
    from medrwr_edge.training.grpo import completion_logprobs, group_advantages, grpo_token_loss, rollout_batch
    from medrwr_edge.training.rollout import RolloutRunner, RolloutSettings

    torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="bench-grpo-"))
    lm_dir = make_tiny_qwen2_lm(work / "lm", hidden=args.hidden, layers=args.layers)
    model, tok = load_tiny(lm_dir)
    reference, _ = load_tiny(lm_dir)
    reference.requires_grad_(False)
    params = sum(p.numel() for p in model.parameters())
    example = McqExample("q", "Fluid blunting the costophrenic angle?",
                         [Option("A", "Pneumothorax"), Option("B", "Pleural effusion")], "B")
    settings = RolloutSettings(max_completion_tokens=args.completion)
    runner = RolloutRunner(model, tok, settings=settings)
    print(f"model: Qwen2, {args.hidden} wide x {args.layers} layers, {params / 1e6:.2f} M parameters; "
          f"G={args.g}, completion {args.completion} tokens, {args.threads} thread(s)")

    def rollouts(shared_prompt: bool):
        torch.manual_seed(0)
        t0 = time.perf_counter()
        if shared_prompt:
            group = runner.group(example, args.g)
        else:
            group = []
            for _ in range(args.g):
                runner.backend.forget_prefix()
                group.append(runner.rollout(example))
        seconds = time.perf_counter() - t0
        return group, sum(r.sampled_tokens for r in group) / seconds

    shared, fresh = [], []
    group = None
    for _ in range(args.reps):  # alternate, so machine load hits both alike
        group, tps = rollouts(True)
        shared.append(tps)
        fresh.append(rollouts(False)[1])
    prompt_tokens = len(group[0].prompt_ids)
    print(f"rollout prompt: {prompt_tokens} tokens")
    print(f"rollout tokens/s (median): shared prompt cache {statistics.median(shared):.1f}  "
          f"re-encoded prompt {statistics.median(fresh):.1f}  ratio {statistics.median(shared) / statistics.median(fresh):.2f}")

    pack_path, enc = make_text_pack(work / "pack")
    with Pack.open(pack_path, encoder=enc) as pack:
        script = ["<think> fluid </think>\n<query> pleural effusion </query>",
                  "<think> so B </think>\n<answer> B </answer>"]
        scripted = RolloutRunner(ScriptedLM(model, tok, script), tok, text_retriever=PackTextRetriever([pack]),
                                 settings=RolloutSettings(max_completion_tokens=512))
        times = []
        for _ in range(args.reps):
            t0 = time.perf_counter()
            ro = scripted.rollout(example)
            times.append(time.perf_counter() - t0)
        print(f"rollout with one retrieval: {statistics.median(times) * 1000:.0f} ms "
              f"({ro.sampled_tokens} sampled + {ro.inserted_tokens} spliced tokens, 2 confidence probes)")

    batch = rollout_batch(group, tok.pad_token_id, "cpu")
    advantages = group_advantages(torch.tensor([float(len(r.completion_text)) for r in group]), args.g)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    policy_tokens = int(sum(sum(r.loss_mask) for r in group))
    all_tokens = int(batch["attention_mask"].sum())

    def optimise(beta: float) -> float:
        t0 = time.perf_counter()
        ref = None
        if beta > 0:
            with torch.no_grad():
                ref, _ = completion_logprobs(reference, batch)
        logp, mask = completion_logprobs(model, batch)
        loss, _ = grpo_token_loss(logp, logp.detach(), ref, advantages, mask, beta=beta)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return policy_tokens / (time.perf_counter() - t0)

    with_ref, without_ref = [], []
    for _ in range(args.reps):
        with_ref.append(optimise(1e-3))
        without_ref.append(optimise(0.0))
    print(f"optimisation step: {args.g} sequences, {all_tokens} tokens, {policy_tokens} policy tokens")
    print(f"optimisation policy tokens/s (median): beta 1e-3 {statistics.median(with_ref):.1f}  beta 0 "
          f"{statistics.median(without_ref):.1f}  ratio {statistics.median(with_ref) / statistics.median(without_ref):.2f}")
    figures = [
        {"name": "rollout tokens/s (shared prompt cache)", "value": statistics.median(shared), "unit": "tok/s"},
        {"name": "rollout tokens/s (prompt re-encoded)", "value": statistics.median(fresh), "unit": "tok/s"},
        {"name": "rollout shared-prompt speed-up", "value": statistics.median(shared) / statistics.median(fresh),
         "unit": "x"},
        {"name": "rollout with one retrieval", "value": statistics.median(times) * 1000, "unit": "ms"},
        {"name": "optimisation policy tokens/s (beta 1e-3)", "value": statistics.median(with_ref), "unit": "tok/s"},
        {"name": "optimisation policy tokens/s (beta 0)", "value": statistics.median(without_ref), "unit": "tok/s"},
    ]
    print("BENCH_JSON " + json.dumps({"figures": figures}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
