"""Decode speed: LlamaBackend.generate vs raw llama-cpp-python (`llama_cpp.Llama`), same model, same prompt.

Both run greedy for the same number of tokens with the same threads and batch size; runs alternate
(ours, raw, ours, raw, ...) so background load hits both alike; the median of each is compared.
Goal: ours / raw >= 0.97 (our per-token work: one numpy softmax for the token's probability, a stop-string check).

Also the memory-bandwidth roofline: decoding one token reads every weight once, so
tokens/s <= bandwidth / model bytes. Bandwidth is measured here with a numpy copy of a large array.

    python benchmarks/bench_decode.py [--model PATH] [--tokens 128] [--rounds 3] [--threads N]

Model: --model, else the installed default LLM (Qwen2.5-Coder-1.5B Q4_K_M), else the smoke LLM (SmolLM2-135M).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from medrwr_edge.runtime import llama_native  # noqa: E402
from medrwr_edge.runtime.backend import SamplingSettings  # noqa: E402
from medrwr_edge.runtime.llama_backend import LlamaBackend  # noqa: E402

# A continuation prompt without a chat template: the model keeps writing instead of ending its turn early.
PROMPT = (
    "The following is a detailed chapter from a respiratory medicine textbook.\n\n"
    "Chapter 4: Community-acquired pneumonia\n\nCommunity-acquired pneumonia is"
)


def resolve_model(path: str | None) -> Path:
    if path:
        return Path(path)
    from medrwr_edge import assets
    from medrwr_edge.errors import MedrwrError

    for locate in (assets.default_llm_path, assets.smoke_llm_path):
        try:
            return locate()
        except MedrwrError:
            continue
    env = os.environ.get("MEDRWR_TEST_GGUF")
    if env:
        return Path(env)
    sys.exit("no LLM installed: run `medrwr-edge models install` or pass --model")


def memory_bandwidth_gbs(n_bytes: int = 256 << 20, repeats: int = 5) -> float:
    """Best-of-N numpy copy; a copy reads and writes every byte, so it moves 2 x n_bytes."""
    src = np.ones(n_bytes // 8, dtype=np.float64)
    dst = np.empty_like(src)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - t0)
    return 2 * n_bytes / best / 1e9


def ours_tokens_per_s(backend: LlamaBackend, n_tokens: int) -> tuple[float, int, float]:
    """(tokens/s, tokens, seconds per token spent outside llama_decode: sampling, softmax, stop checks)."""
    backend.reset()
    backend.prefill([PROMPT])
    ctx = backend._ctx
    in_decode = [0.0]
    decode_one = ctx.decode_one

    def timed_decode_one(token: int, pos: int) -> None:
        t0 = time.perf_counter()
        decode_one(token, pos)
        in_decode[0] += time.perf_counter() - t0

    ctx.decode_one = timed_decode_one  # instance attribute: shadows the method for this measurement only
    try:
        gen = backend.generate(SamplingSettings(temperature=0.0, max_tokens=n_tokens), stop=["</answer>"])
    finally:
        del ctx.decode_one
    n = len(gen.tokens)
    return n / gen.seconds, n, (gen.seconds - in_decode[0]) / max(n, 1)


def raw_tokens_per_s(llm, n_tokens: int) -> tuple[float, int]:
    """Time from the first sampled token to the (n+1)-th: n decode+sample steps, as in generate() above."""
    llm.reset()
    tokens = llm.tokenize(PROMPT.encode("utf-8"), add_bos=True, special=True)
    count, t_first = 0, 0.0
    for _tok in llm.generate(tokens, temp=0.0, top_k=1, top_p=1.0, min_p=0.0, repeat_penalty=1.0, reset=True):
        if count == 0:
            t_first = time.perf_counter()
        count += 1
        if count > n_tokens:
            break
    return (count - 1) / (time.perf_counter() - t_first), count - 1


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model")
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=llama_native.physical_cores())
    ap.add_argument("--n-ctx", type=int, default=2048)
    args = ap.parse_args()

    from llama_cpp import Llama

    model = resolve_model(args.model)
    print(f"model: {model.name} ({model.stat().st_size / 1e6:.0f} MB), threads={args.threads}, "
          f"tokens={args.tokens}, rounds={args.rounds}, load average {os.getloadavg()[0]:.1f}")
    ours_backend = LlamaBackend(model, n_ctx=args.n_ctx, n_threads=args.threads, sha256="-")
    raw = Llama(str(model), n_ctx=args.n_ctx, n_batch=512, n_threads=args.threads, n_threads_batch=args.threads,
                verbose=False)
    ours_tokens_per_s(ours_backend, 8)  # warm both (page in the weights, build the graphs)
    raw_tokens_per_s(raw, 8)
    ours, theirs, ratios, overheads = [], [], [], []
    for r in range(args.rounds):
        rate, n, overhead = ours_tokens_per_s(ours_backend, args.tokens)
        ours.append(rate)
        overheads.append(overhead)
        rate_raw, n_raw = raw_tokens_per_s(raw, args.tokens)
        theirs.append(rate_raw)
        ratios.append(rate / rate_raw)
        print(f"  round {r}: LlamaBackend {rate:7.2f} tok/s ({n} tokens)   raw Llama {rate_raw:7.2f} tok/s "
              f"({n_raw} tokens)   ratio {rate / rate_raw:.3f}")
    o, t = statistics.median(ours), statistics.median(theirs)
    per_token = statistics.median(overheads)
    print(f"median of per-round ratios: {statistics.median(ratios):.3f}")
    print(f"LlamaBackend time per token outside llama_decode (numpy softmax + sampling + stop check): "
          f"{per_token * 1e3:.3f} ms = {per_token * o * 100:.2f}% of a token")
    bw = memory_bandwidth_gbs()
    weights = ours_backend._model.facts.size_bytes
    roofline = bw * 1e9 / weights
    print(f"decode tok/s (median): LlamaBackend {o:.2f}   raw llama-cpp-python {t:.2f}   ratio {o / t:.3f} "
          f"(goal >= 0.97)")
    print(f"memory bandwidth (numpy copy) {bw:.1f} GB/s; weights {weights / 1e6:.0f} MB -> roofline "
          f"{roofline:.1f} tok/s; LlamaBackend reaches {o / roofline:.2f} of it")
    ours_backend.close()
    raw.close()


if __name__ == "__main__":
    main()
