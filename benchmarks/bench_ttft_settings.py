"""Time to first token with the prefix cache warm, per llama.cpp batch and thread setting, and where it goes.

For each (threads, n_ubatch) a fresh backend restores the system turn from a warm on-disk prefix cache (what
`ask` does from its second run on), prefills the user turn and samples the first token. Printed: the median
wall time of a few questions split into restore / user-turn prefill / first token, the CPU seconds (÷ threads
≈ the wall time on idle cores), and the same for a cold start (no cache: the whole prompt prefilled).

    nice -n 10 python benchmarks/bench_ttft_settings.py [--model PATH] [--questions 3]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench_decode import resolve_model  # noqa: E402
from bench_kv_continuation import prompt_text  # noqa: E402
from medrwr_edge.runtime.backend import SamplingSettings  # noqa: E402
from medrwr_edge.runtime.llama_backend import LlamaBackend  # noqa: E402


def one_question(b: LlamaBackend, prompt: str) -> dict:
    b.reset()
    c0, t0 = time.process_time(), time.perf_counter()
    b.prefill([prompt])
    t_prefill = time.perf_counter() - t0
    b.generate(SamplingSettings(temperature=0.0, max_tokens=1), [])
    total = time.perf_counter() - t0
    st = b.stats
    return {"total": total, "prefill": t_prefill, "first": total - t_prefill, "cpu": time.process_time() - c0,
            "cached": st.cached_prompt_tokens, "decoded": st.prompt_tokens}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model")
    ap.add_argument("--questions", type=int, default=3)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--ubatch", type=int, nargs="+", default=[64, 128, 256, 512])
    args = ap.parse_args()
    model = resolve_model(args.model)
    prompt = prompt_text()
    print(f"model {model.name}; load {open('/proc/loadavg').read().split()[:3]} (shared machine)")
    with tempfile.TemporaryDirectory() as cache:
        for threads in args.threads:
            for ub in args.ubatch:
                b = LlamaBackend(model, n_threads=threads, n_ubatch=ub, sha256="bench", prefix_cache_dir=cache)
                cold = one_question(b, prompt)  # fills the cache on the first configuration
                runs = [one_question(b, prompt) for _ in range(args.questions)]
                b.close()
                med = {k: statistics.median(r[k] for r in runs) for k in ("total", "prefill", "first", "cpu")}
                print(f"threads {threads} n_ubatch {ub:4}: warm TTFT {med['total']:.3f} s (prefill of "
                      f"{runs[0]['decoded']} user-turn tokens after restoring {runs[0]['cached']}: {med['prefill']:.3f} s;"
                      f" first token {med['first']:.3f} s); CPU {med['cpu']:.3f} s ≈ {med['cpu'] / threads:.3f} s on "
                      f"idle cores | first question after load {cold['total']:.3f} s "
                      f"({cold['cached']} restored, {cold['decoded']} decoded)", flush=True)
    with tempfile.TemporaryDirectory() as empty:
        b = LlamaBackend(model, n_threads=args.threads[-1], sha256="bench", prefix_cache_dir=empty)
        cold = one_question(b, prompt)
        b.close()
    print(f"cold (no prefix cache, whole prompt of {cold['decoded']} tokens, threads {args.threads[-1]}): "
          f"{cold['total']:.3f} s, CPU {cold['cpu']:.3f} s; load {open('/proc/loadavg').read().split()[:3]}")


if __name__ == "__main__":
    main()
