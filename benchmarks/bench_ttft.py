"""Time to first token for a typical Med-RwR prompt (system instructions + a clinical question), goal <= 1 s.

Measured from the start of prefill (the model already loaded, as in `medrwr-edge ask` after start-up) to the
first streamed piece; reported for the first question after load (cold: graph allocation, weights paged in)
and for later questions (warm, after reset()). Model load time is printed separately. Then the same after a
fresh model load with the system turn's KV state restored from the on-disk prefix cache (what `ask` does from
its second run on): only the user turn is prefilled.

    python benchmarks/bench_ttft.py [--model PATH] [--questions 3] [--threads N]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench_decode import resolve_model  # noqa: E402
from bench_kv_continuation import prompt_text  # noqa: E402
from medrwr_edge.runtime import llama_native  # noqa: E402
from medrwr_edge.runtime.backend import SamplingSettings  # noqa: E402
from medrwr_edge.runtime.llama_backend import LlamaBackend  # noqa: E402


def time_to_first_token(b: LlamaBackend, prompt: str) -> tuple[float, float, float]:
    """(seconds to the first streamed piece, seconds of which were prefill, CPU seconds of all threads to then).

    CPU seconds / threads estimates the wall time on an otherwise idle machine when other work shares the cores."""
    first: list[float] = []
    cpu: list[float] = []
    b.reset()
    c0 = time.process_time()
    t0 = time.perf_counter()
    b.prefill([prompt])
    t_prefill = time.perf_counter() - t0

    def on_piece(_piece: str) -> None:
        if not first:
            first.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)

    # The first piece may be held back while it could start a stop string; a few tokens make sure one streams.
    b.generate(SamplingSettings(temperature=0.0, max_tokens=4), stop=["</query>", "</answer>"], on_piece=on_piece)
    if not first:
        return float("nan"), t_prefill, float("nan")
    return first[0], t_prefill, cpu[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model")
    ap.add_argument("--questions", type=int, default=3)
    ap.add_argument("--threads", type=int, default=llama_native.physical_cores())
    args = ap.parse_args()

    model = resolve_model(args.model)
    t0 = time.perf_counter()
    b = LlamaBackend(model, n_threads=args.threads, sha256="-")
    load_s = time.perf_counter() - t0
    prompt = prompt_text()
    n_prompt = len(b.tokenize(prompt))
    print(f"model: {model.name}, threads={args.threads}, n_ctx={b.info.n_ctx}, prompt {n_prompt} tokens, "
          f"load average {os.getloadavg()[0]:.1f}")
    print(f"model load: {load_s:.2f} s")
    cold, cold_prefill, cold_cpu = time_to_first_token(b, prompt)
    warm = [time_to_first_token(b, prompt) for _ in range(args.questions)]
    w = statistics.median(x[0] for x in warm)
    wp = statistics.median(x[1] for x in warm)
    wc = statistics.median(x[2] for x in warm)
    print(f"TTFT first question after load: {cold:.3f} s (prefill {cold_prefill:.3f} s, {n_prompt / cold_prefill:.0f} "
          f"tok/s; CPU {cold_cpu:.3f} s over {args.threads} thread(s))")
    print(f"TTFT later questions (median of {args.questions}): {w:.3f} s (prefill {wp:.3f} s, {n_prompt / wp:.0f} "
          f"tok/s; CPU {wc:.3f} s)   goal <= 1 s: {'met' if max(cold, w) <= 1.0 else 'NOT met'}")
    b.close()

    import tempfile

    with tempfile.TemporaryDirectory() as cache:
        filler = LlamaBackend(model, n_threads=args.threads, sha256="bench", prefix_cache_dir=cache)
        time_to_first_token(filler, prompt)  # fills the cache, as a first `ask` does
        filler.close()
        t0 = time.perf_counter()
        b = LlamaBackend(model, n_threads=args.threads, sha256="bench", prefix_cache_dir=cache)
        load_s = time.perf_counter() - t0
        cached, cached_prefill, cached_cpu = time_to_first_token(b, prompt)
        restored = b.stats.cached_prompt_tokens
        b.close()
    print(f"TTFT first question after a fresh load (load {load_s:.2f} s), system turn from the prefix cache "
          f"({restored} of {n_prompt} tokens restored): {cached:.3f} s (CPU {cached_cpu:.3f} s)   goal <= 1 s: "
          f"{'met' if cached <= 1.0 else 'NOT met'}; ratio vs no cache {cold / cached:.1f}x")


if __name__ == "__main__":
    main()
