"""Which confidence-gain scale guard to default to: a short measured run on the tiny fixture.

GRPO rollouts of the tiny random Qwen2 LM (tests/grpo_fixtures.py) through the real runtime loop with a real
6-document pack: each group of G rollouts mixes the four cases training sees (query + right answer, query + wrong
answer, direct right, direct wrong; the scripted text varies per rollout so the model's probabilities vary). The
confidence probes log π(gold | with retrieval) and log π(gold | y′) are read from the UNBIASED model. Then every
rollout is scored with stage 2's rewards under each guard setting, and per setting we report:

- the raw log-ratio's range and the weighted confidence term's largest |value| next to accuracy's weight (5);
- accuracy inversions: within a group, the share of (right, wrong) rollout pairs where the WRONG one gets the
  higher total reward — the confidence term outvoting correctness, the failure the guard exists to prevent;
- the share of groups where the confidence term changes some rollout's advantage sign (it still carries signal).

    python benchmarks/bench_reward_scale.py [--groups 6] [--group-size 8]
"""

from __future__ import annotations

import argparse
import math
import random
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

SETTINGS = {  # name -> (scale, clip)
    "paper (scale 1, no clip)": (1.0, None),
    "reference code (x0.1)": (0.1, None),
    "x0.1, clip +-0.5": (0.1, 0.5),
    "x1, clip +-0.5 (default)": (1.0, 0.5),
    "x1, clip +-1": (1.0, 1.0),
}
# Not measured, for scale: the issue's case, a y' that all but excluded the gold letter.
EXTREME = (math.log(0.9), -20.0)
WORDS = ["fluid", "air", "opacity", "lobe", "angle", "margin", "density", "shadow", "line", "volume", "shift",
         "cardiac", "pleural", "basal", "silhouette", "collapse"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--groups", type=int, default=6)
    ap.add_argument("--group-size", type=int, default=8)
    ap.add_argument("--model", choices=["qwen2", "qwen25vl"], default="qwen25vl",
                    help="qwen2: tests' tiny Qwen2 LM (HF init, near-flat logits); qwen25vl: the tiny Qwen2.5-VL "
                         "fixture (init 5x HF's, context-dependent logits)")
    args = ap.parse_args()
    import torch
    from grpo_fixtures import ScriptedLM, load_tiny, make_text_pack, make_tiny_qwen2_lm

    from medrwr_edge.kb_pack.pack import Pack
    from medrwr_edge.runtime.protocol import Option
    from medrwr_edge.runtime.retrieval import PackTextRetriever
    from medrwr_edge.training import rewards as R
    from medrwr_edge.training.data import McqExample
    from medrwr_edge.training.grpo import group_advantages
    from medrwr_edge.training.rollout import RolloutRunner, RolloutSettings

    torch.set_num_threads(1)
    rng = random.Random(0)
    load = open("/proc/loadavg").read().split()[:3]
    with tempfile.TemporaryDirectory() as tmp:
        if args.model == "qwen2":
            model, tok = load_tiny(make_tiny_qwen2_lm(Path(tmp) / "lm"))
        else:
            from fixtures_qwen import make_tiny_qwen25vl

            from medrwr_edge.training.modeling import load_model

            loaded = load_model(make_tiny_qwen25vl(Path(tmp) / "vl"), for_training=False)
            model, tok = loaded.model, loaded.tokenizer
        pack_path, enc = make_text_pack(Path(tmp) / "pack")
        pack = Pack.open(pack_path, encoder=enc)
        options = [Option("A", "Pneumothorax"), Option("B", "Pleural effusion"), Option("C", "Atelectasis"),
                   Option("D", "Cardiomegaly")]
        rows = []  # (group, RewardInputs)
        for g in range(args.groups):
            gold = "ABCD"[g % 4]
            ex = McqExample(f"q{g}", "Which finding fits the radiograph?", options, gold)
            for i in range(args.group_size):
                think = " ".join(rng.sample(WORDS, 4))
                letter = gold if i % 2 == 0 else rng.choice([c for c in "ABCD" if c != gold])
                if i % 4 < 2:  # query first, then answer
                    script = [f"<think> {think} </think>\n<query> {' '.join(rng.sample(WORDS, 2))} </query>",
                              f"<think> {' '.join(rng.sample(WORDS, 3))} </think>\n<answer> {letter} </answer>"]
                else:
                    script = [f"<think> {think} </think>\n<answer> {letter} </answer>"]
                runner = RolloutRunner(ScriptedLM(model, tok, script), tok, text_retriever=PackTextRetriever([pack]),
                                       settings=RolloutSettings(max_completion_tokens=400))
                runner.model = model  # the confidence probes read the unbiased model, not the script's forcing
                ro = runner.rollout(ex)
                rows.append((g, R.RewardInputs(ro.completion_text, gold, ex.letters, gold_text=ex.answer_text,
                                               retrieval_used=ro.retrieval_used, logp_gold_with=ro.logp_gold_with,
                                               logp_gold_without=ro.logp_gold_without)))
        pack.close()
    ratios = [r.logp_gold_with - r.logp_gold_without for _, r in rows if r.retrieval_used
              and r.logp_gold_with is not None and r.logp_gold_without is not None]
    w = R.RewardWeights()
    print(f"model: tiny {args.model}; machine loadavg {' '.join(load)} (2 cores shared); {args.groups} groups x "
          f"{args.group_size} rollouts, {len(ratios)} with retrieval")
    print(f"raw log-ratio log p(gold|with) - log p(gold|y'): min {min(ratios):.2f}, max {max(ratios):.2f}, "
          f"mean |.| {sum(abs(x) for x in ratios) / len(ratios):.2f}")
    print(f"{'setting':28s} {'max |w_conf*term|':>18s} {'vs w_acc':>8s} {'acc. inversions':>16s} "
          f"{'groups: conf moves an advantage sign':>37s} {'w_conf*term at log p -20 -> 0.9':>32s}")
    for name, (scale, clip) in SETTINGS.items():
        opts = R.RewardOptions(confidence_gain_scale=scale, confidence_gain_clip=clip)
        scored = [(g, R.compute_reward(inp, stage=2, options=opts)) for g, inp in rows]
        worst = max(abs(w.confidence_gain * b.confidence_gain) for _, b in scored)
        pairs = inversions = moved = 0
        for g in range(args.groups):
            group = [b for gg, b in scored if gg == g]
            right = [b.total for b in group if b.accuracy == 1.0]
            wrong = [b.total for b in group if b.accuracy == 0.0]
            pairs += len(right) * len(wrong)
            inversions += sum(1 for r in right for x in wrong if x > r)
            adv = group_advantages(torch.tensor([b.total for b in group]), len(group)).tolist()
            adv0 = group_advantages(torch.tensor([b.total - w.confidence_gain * b.confidence_gain for b in group]),
                                    len(group)).tolist()
            moved += any((a > 0) != (a0 > 0) for a, a0 in zip(adv, adv0))
        extreme = w.confidence_gain * R.confidence_gain_reward(*EXTREME, True, scale=scale, clip=clip)
        print(f"{name:28s} {worst:18.2f} {w.accuracy:8.1f} {inversions / max(pairs, 1):16.1%} "
              f"{f'{moved}/{args.groups}':>37s} {extreme:32.1f}")


if __name__ == "__main__":
    main()
