"""Training throughput on CPU: tokens/s of full optimisation steps (forward + backward + AdamW) for a small
random Qwen2.5-VL, measured side by side in one run.

    python benchmarks/bench_training_step.py [--hidden 256] [--layers 4] [--seq 256] [--reps 3]

Rows: a plain torch loop vs the same step through `TrainEngine` (what the engine costs), batch 1 vs 4, gradient
checkpointing off vs on (memory for time), an SFT step vs a DPO step (2 sequences per pair + the frozen
reference's forward), and one image in the prompt. Tokens/s counts every token of every sequence in the batch.

Scaling from 1 to N GPUs needs GPUs (none here); the command, for the record:

    for n in 1 2 4 8; do
      torchrun --nproc_per_node $n -m medrwr_edge.training sft examples/train/sft-8gpu.yaml --max-steps 20 --quiet
    done   # then compare tokens_per_s x world size in OUTPUT/metrics.jsonl
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

from fixtures_qwen import make_tiny_qwen25vl, tiny_image  # noqa: E402


def median_time(fn, reps: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()

    import torch

    from medrwr_edge.training.config import RunConfig
    from medrwr_edge.training.dpo import dpo_loss
    from medrwr_edge.training.engine import TrainEngine, build_optimizer
    from medrwr_edge.training.modeling import collate, encode, load_model, model_inputs, token_logprobs

    work = Path(tempfile.mkdtemp(prefix="bench-train-"))
    ckpt = make_tiny_qwen25vl(work / "model", text_hidden=args.hidden, text_layers=args.layers,
                              initializer_range=0.02)
    # the fixture's M-RoPE sections fit a 64-wide decoder (head_dim 16); scale them to head_dim / 2 = hidden / 8
    cfg_file = ckpt / "config.json"
    cfg = json.loads(cfg_file.read_text())

    def scale_sections(node):
        if isinstance(node, dict):
            for key, value in node.items():
                if key == "mrope_section":
                    node[key] = [k * args.hidden // 64 for k in (2, 3, 3)]
                else:
                    scale_sections(value)
    scale_sections(cfg)
    cfg_file.write_text(json.dumps(cfg, indent=2))
    params = sum(p.numel() for p in load_model(ckpt).model.parameters())
    print(f"model: Qwen2.5-VL, decoder {args.hidden} wide x {args.layers} layers, {params / 1e6:.1f} M parameters; "
          f"sequences of {args.seq} tokens; torch {torch.__version__}, {torch.get_num_threads()} threads")

    def batch_of(n: int, seq: int = args.seq):
        ids = torch.randint(10, 400, (n, seq), generator=torch.Generator().manual_seed(n))
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "loss_mask": torch.ones_like(ids)}

    def sft_loss(model, batch):
        logp, mask = token_logprobs(model, labels_mask=batch["loss_mask"], **model_inputs(batch, "cpu"))
        return -logp.sum() / mask.sum()

    def engine_step_fn(batch, **cfg):
        config = RunConfig(model=str(ckpt), output_dir=str(work / "run"), learning_rate=1e-4, **cfg)
        engine = TrainEngine(config, stage="bench", quiet=True)
        lm = load_model(ckpt)
        model, opt, sched = engine.prepare(lm.model, build_optimizer(lm.model, config))

        def step():
            with engine.autocast():
                loss = sft_loss(model, batch)
            engine.backward(loss)
            engine.step(opt, model, sched)
        return step

    def plain_step_fn(batch):
        lm = load_model(ckpt)
        model = lm.model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

        def step():
            loss = sft_loss(model, batch)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
        return step

    rows = []

    def measure(name: str, fn, tokens: int):
        t = median_time(fn, args.reps)
        rows.append((name, tokens / t, t))
        print(f"  {name:<44} {tokens / t:9.0f} tokens/s   {t * 1000:7.0f} ms/step", flush=True)
        return tokens / t

    print("full optimisation steps (median of reps):")
    b1, b4 = batch_of(1), batch_of(4)
    plain = measure("plain torch loop, batch 1", plain_step_fn(b1), args.seq)
    engine1 = measure("TrainEngine, batch 1", engine_step_fn(b1), args.seq)
    engine4 = measure("TrainEngine, batch 4", engine_step_fn(b4, batch_size=4), 4 * args.seq)
    ckpt4 = measure("TrainEngine, batch 4, gradient checkpointing", engine_step_fn(b4, batch_size=4,
                                                                                  gradient_checkpointing=True),
                    4 * args.seq)

    # DPO: 2 pairs = 4 sequences through the policy (with grad) and the frozen reference (no grad)
    config = RunConfig(model=str(ckpt), output_dir=str(work / "dpo"), learning_rate=1e-4)
    engine = TrainEngine(config, stage="bench", quiet=True)
    lm = load_model(ckpt)
    ref = engine.prepare_frozen(load_model(ckpt, for_training=False).model)
    model, opt, sched = engine.prepare(lm.model, build_optimizer(lm.model, config))

    def dpo_step():
        with torch.no_grad():
            rl, _ = token_logprobs(ref, labels_mask=b4["loss_mask"], **model_inputs(b4, "cpu"))
        pl, _ = token_logprobs(model, labels_mask=b4["loss_mask"], **model_inputs(b4, "cpu"))
        seq, ref_seq = pl.sum(-1), rl.sum(-1)
        loss = dpo_loss(seq[:2], seq[2:], ref_seq[:2], ref_seq[2:], 0.1)[0].mean()
        engine.backward(loss)
        engine.step(opt, model, sched)
    dpo = measure("DPO step, 2 pairs (4 sequences + reference)", dpo_step, 4 * args.seq)

    # one 448x448 image (256 image tokens after the 2x2 merge) + a question + a short answer
    from PIL import Image

    Image.fromarray(tiny_image(448, 448)).save(work / "img.png")
    enc = encode(lm, [{"role": "user", "content": "Which finding? A. mass B. effusion"}],
                 "<think> The image shows a mass. </think>\n<answer> A </answer>", [str(work / "img.png")],
                 max_length=4096)
    image_batch = collate([enc], lm.pad_id)
    image_tokens = len(enc.input_ids)
    image_rate = measure(f"SFT step, 1 image ({image_tokens} tokens incl. image)", engine_step_fn(image_batch),
                         image_tokens)

    print(f"engine / plain loop (batch 1): {engine1 / plain:.2f}x")
    print(f"batch 4 / batch 1 tokens/s: {engine4 / engine1:.2f}x")
    print(f"gradient checkpointing / off (batch 4): {ckpt4 / engine4:.2f}x")
    print(f"DPO / SFT tokens/s (batch 4): {dpo / engine4:.2f}x")
    figures = [{"name": name, "value": round(rate, 1), "unit": "tokens/s"} for name, rate, _ in rows]
    figures += [{"name": "engine / plain loop", "value": round(engine1 / plain, 3), "unit": "x"},
                {"name": "batch 4 / batch 1", "value": round(engine4 / engine1, 3), "unit": "x"},
                {"name": "gradient checkpointing / off", "value": round(ckpt4 / engine4, 3), "unit": "x"},
                {"name": "DPO / SFT", "value": round(dpo / engine4, 3), "unit": "x"},
                {"name": "SFT with image", "value": round(image_rate, 1), "unit": "tokens/s"}]
    print("BENCH_JSON " + json.dumps({"figures": figures}))


if __name__ == "__main__":
    main()
