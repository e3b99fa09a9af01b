"""Speculative decoding: decode tokens/s with prompt lookup and with a draft model ÷ plain decoding.

Same model, same prompts, greedy: each prompt is prefilled once and its KV state restored before each mode, so
every mode continues exactly the same sequence. Prompts of two kinds:

* guided ICD-10-CM answers: a built-in ICD-10-CM question with its options, the assistant's query and the
  retrieved entries already in the turn (as after a search), the model then reasons and answers — text that
  copies codes and descriptions from its context;
* free-text reasoning: a clinical question answered in prose, little to copy.

Printed per kind and mode: tokens/s (wall, and per CPU-second ÷ threads, which is steadier on a shared machine),
the ratio to plain decoding, whether the output equals plain decoding's token for token, the acceptance rate
(accepted ÷ drafted) and the mean accepted length (accepted drafts per verification batch); and the ratio ÷ the
bandwidth bound of plain decoding (measured read bandwidth ÷ model bytes; > 1 is faster than any plain decoder).

    nice -n 10 python benchmarks/bench_speculative.py [--model PATH] [--draft PATH] [--tokens 96] [--items 4]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench_decode import memory_bandwidth_gbs, resolve_model  # noqa: E402
from medrwr_edge.runtime import protocol  # noqa: E402
from medrwr_edge.runtime.backend import SamplingSettings  # noqa: E402
from medrwr_edge.runtime.llama_backend import LlamaBackend  # noqa: E402

FREE_TEXT = [
    "A 67-year-old smoker has had a productive cough for three months in each of the last two years and "
    "progressive breathlessness. Explain step by step which diagnoses you consider and which tests decide.",
    "Explain the pathophysiology of diabetic ketoacidosis and why insulin and fluids are given first.",
]


def guided_prompts(n: int) -> list[str]:
    """Built-in ICD-10-CM questions, the turn continued after a search that returned the options' entries."""
    from medrwr_edge.eval.icd10_mcq import builtin_items

    out = []
    for item in builtin_items(limit=n):
        options = protocol.parse_options(item.options)
        prompt = protocol.prompt_text(
            protocol.chatml_prompt(protocol.system_prompt(False), protocol.user_text(item.question, options)))
        docs = [o.text for o in options]
        out.append(
            prompt
            + f"<think> I should look up the codes in the options. </think>\n<query> {item.question[:80]} </query>"
            + protocol.retrieve_block(docs)
        )
    return out


def free_prompts() -> list[str]:
    return [protocol.prompt_text(protocol.chatml_prompt(protocol.system_prompt(False, open_ended=True), q)) for q in FREE_TEXT]


def run_mode(b: LlamaBackend, state: bytes, mode: str, settings: SamplingSettings) -> dict:
    b.reset()
    b.restore_state(state)
    b.speculative = mode
    c0, t0 = time.process_time(), time.perf_counter()
    gen = b.generate(settings, ["</answer>"])
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    st = b.stats
    return {"ids": [t.token_id for t in gen.tokens], "n": len(gen.tokens), "wall": wall, "cpu": cpu,
            "drafted": st.drafted_tokens, "accepted": st.accepted_tokens, "batches": st.verify_batches}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model")
    ap.add_argument("--draft", help="draft GGUF (default: the installed Qwen2.5-Coder-0.5B if present)")
    ap.add_argument("--tokens", type=int, default=96)
    ap.add_argument("--items", type=int, default=4, help="guided ICD-10-CM questions")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--flash-attn", action="store_true")
    ap.add_argument("--n-draft", type=int, default=8, help="most draft tokens per verification batch")
    args = ap.parse_args()
    model = resolve_model(args.model)
    draft = args.draft
    if draft is None:
        from medrwr_edge import assets

        if assets.is_installed(assets.QWEN_0_5B) and "1.5b" in model.name:
            draft = str(assets.installed_path(assets.QWEN_0_5B))
    modes = ["off", "lookup"] + (["draft"] if draft else [])
    print(f"model {model.name}; draft {Path(draft).name if draft else '(none)'}; load {open('/proc/loadavg').read().split()[:3]} "
          "(shared machine: other jobs run on the same 2 cores)")
    b = LlamaBackend(model, n_ctx=4096, n_threads=args.threads, sha256="-", flash_attn=args.flash_attn,
                         speculative="draft" if draft else "lookup", draft_model=draft,
                         n_draft=args.n_draft)
    threads = b.n_threads
    settings = SamplingSettings(temperature=0.0, max_tokens=args.tokens)
    kinds = {"guided ICD-10-CM": guided_prompts(args.items), "free-text reasoning": free_prompts()}
    totals: dict = {}
    for kind, prompts in kinds.items():
        for i, prompt in enumerate(prompts):
            b.reset()
            b.prefill([prompt])
            state = b.save_state()
            order = modes if i % 2 == 0 else modes[::-1]  # alternate so drifting load hits every mode alike
            res = {m: run_mode(b, state, m, settings) for m in order}
            for m in modes:
                r, t = res[m], totals.setdefault((kind, m), {"n": 0, "wall": 0.0, "cpu": 0.0, "drafted": 0,
                                                             "accepted": 0, "batches": 0, "same": 0, "prompts": 0})
                for key in ("n", "wall", "cpu", "drafted", "accepted", "batches"):
                    t[key] += r[key]
                t["same"] += r["ids"] == res["off"]["ids"]
                t["prompts"] += 1
            print(f"  {kind} #{i}: " + ", ".join(f"{m} {res[m]['n'] / res[m]['wall']:.1f} tok/s" for m in modes),
                  flush=True)
    bw = memory_bandwidth_gbs()
    bound = bw * 1e9 / b._model.facts.size_bytes
    print(f"\nn_draft {args.n_draft}; flash attention {'on' if args.flash_attn else 'off'}")
    print(f"read bandwidth {bw:.1f} GB/s; weights {b._model.facts.size_bytes / 1e6:.0f} MB -> plain-decoding bound "
          f"{bound:.1f} tok/s; threads {threads}; load {open('/proc/loadavg').read().split()[:3]}")
    print(f"{'kind':22} {'mode':7} {'tok/s':>6} {'x plain':>7} {'tok/cpu-s':>9} {'x plain':>7} {'÷bound':>6} "
          f"{'same':>5} {'accept':>6} {'mean acc':>8}")
    for (kind, m), t in totals.items():
        base = totals[(kind, "off")]
        tps, base_tps = t["n"] / t["wall"], base["n"] / base["wall"]
        cps, base_cps = t["n"] / t["cpu"] * threads, base["n"] / base["cpu"] * threads
        acc = f"{t['accepted'] / t['drafted']:.2f}" if t["drafted"] else "-"
        mean = f"{t['accepted'] / t['batches']:.2f}" if t["batches"] else "-"
        print(f"{kind:22} {m:7} {tps:6.1f} {tps / base_tps:7.2f} {cps:9.1f} {cps / base_cps:7.2f} "
              f"{cps / bound:6.2f} {t['same']}/{t['prompts']:<3} {acc:>6} {mean:>8}")
    b.close()


if __name__ == "__main__":
    main()
