"""KV continuation vs re-encoding the whole history each round (Search-R1 style), on a 2-retrieval answer.

Shape of one answer (the Med-RwR loop): prompt (~300 tokens) -> generate N -> splice a ~250-token
<retrieve> block -> generate N -> splice another block -> generate N.

  * continuation: prefill the prompt once; each block is decoded after the current position (append_text).
  * re-encode:    each round clears the cache and prefills prompt + everything generated and spliced so far.

Both use the same backend, model, threads and greedy decoding, and alternate run by run. Reported: tokens
prefilled (batch-decoded prompt/history/blocks) and wall time per answer. Goals: >= 3x fewer prefilled tokens
counting only prompt re-encoding (prefill calls), >= 2x faster.

    python benchmarks/bench_kv_continuation.py [--model PATH] [--gen 48] [--rounds 2] [--threads N]
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
from medrwr_edge.runtime import llama_native  # noqa: E402
from medrwr_edge.runtime.backend import SamplingSettings  # noqa: E402
from medrwr_edge.runtime.llama_backend import LlamaBackend  # noqa: E402

SYSTEM = (
    "You are a medical assistant that reasons step by step and searches a medical knowledge base when it needs "
    "facts. To search, write <query>your search terms</query>; the results come back inside <retrieve> ... "
    "</retrieve>. Think inside <think> ... </think> and give the final answer inside <answer> ... </answer>. "
    "Use the retrieved documents only when they are relevant, cite them by number, and say when the evidence "
    "is insufficient. Do not invent drug doses, laboratory reference ranges or guideline recommendations. "
)
USER = (
    "A 67-year-old man with a 40 pack-year smoking history presents with three days of fever (38.9 C), "
    "productive cough with rusty sputum, right-sided pleuritic chest pain and shortness of breath. He has type 2 "
    "diabetes treated with metformin and hypertension treated with lisinopril. On examination: respiratory rate "
    "28/min, blood pressure 96/60 mmHg, heart rate 112/min, SpO2 89% on room air, confusion to time and place, "
    "bronchial breathing and dullness to percussion over the right lower zone. Blood tests: urea 9.1 mmol/L, "
    "white cell count 18.2 x10^9/L, CRP 240 mg/L. The chest X-ray shows right lower lobe consolidation with a "
    "small effusion. Question: what is his CURB-65 score, where should he be managed, and which empirical "
    "antibiotic regimen is appropriate? Options: A) score 2, outpatient oral amoxicillin; B) score 4, hospital "
    "with ICU assessment, IV co-amoxiclav plus clarithromycin; C) score 1, outpatient doxycycline; D) score 3, "
    "hospital ward, oral amoxicillin alone."
)
DOC = (
    "CURB-65 assigns one point each for confusion, urea above 7 mmol/L, respiratory rate of 30 or more, "
    "systolic blood pressure below 90 mmHg or diastolic 60 mmHg or less, and age 65 or older. Scores of 0-1 "
    "suggest outpatient care, 2 suggests hospital admission, and 3-5 indicates severe pneumonia that needs "
    "hospital care with assessment for intensive care. "
)


def prompt_text() -> str:
    return (f"<|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>user\n{USER}<|im_end|>\n"
            "<|im_start|>assistant\n<think>")


def retrieve_block(i: int, n_tokens: int, backend: LlamaBackend) -> str:
    """A <retrieve> block of about n_tokens tokens (three numbered documents)."""
    words = (DOC * (1 + n_tokens // 40)).split()
    while len(backend.tokenize(" ".join(words))) > n_tokens - 20:  # ~20 tokens of tags and numbering
        words = words[: len(words) - 4]
    third = len(words) // 3
    docs = [" ".join(words[k * third : (k + 1) * third]) for k in range(3)]
    return f"\n<retrieve> (1) [round {i}] {docs[0]} (2) {docs[1]} (3) {docs[2]} </retrieve>\n"


def run_continuation(b: LlamaBackend, prompt: str, blocks: list[str], settings) -> dict:
    t0, c0 = time.perf_counter(), time.process_time()
    b.reset()
    b.prefill([prompt])
    prefill_calls = b.stats.prompt_tokens
    b.generate(settings, stop=[])
    for block in blocks:
        b.append_text(block)
        b.generate(settings, stop=[])
    s = b.stats
    return dict(seconds=time.perf_counter() - t0, cpu_seconds=time.process_time() - c0, prefill_calls=prefill_calls,
                batch_tokens=s.prompt_tokens + s.inserted_tokens, generated=s.generated_tokens)


def run_reencode(b: LlamaBackend, prompt: str, blocks: list[str], settings) -> dict:
    t0, c0 = time.perf_counter(), time.process_time()
    prefilled = generated = 0
    history: list[int] | None = None
    for i in range(len(blocks) + 1):
        b.reset()
        if history is None:
            b.prefill([prompt])
        else:
            b.prefill_tokens(history)  # the whole prompt + generated text + blocks, from scratch
        prefilled += b.stats.prompt_tokens
        generated += len(b.generate(settings, stop=[]).tokens)
        if i < len(blocks):
            history = b.tokens() + b.tokenize(blocks[i])
    return dict(seconds=time.perf_counter() - t0, cpu_seconds=time.process_time() - c0, prefill_calls=prefilled,
                batch_tokens=prefilled, generated=generated)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model")
    ap.add_argument("--gen", type=int, default=48, help="tokens generated per pass")
    ap.add_argument("--block", type=int, default=250, help="tokens per <retrieve> block")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=llama_native.physical_cores())
    args = ap.parse_args()

    model = resolve_model(args.model)
    b = LlamaBackend(model, n_ctx=4096, n_threads=args.threads, sha256="-")
    prompt = prompt_text()
    blocks = [retrieve_block(i + 1, args.block, b) for i in range(2)]
    settings = SamplingSettings(temperature=0.0, max_tokens=args.gen)
    print(f"model: {model.name}, threads={args.threads}, prompt {len(b.tokenize(prompt))} tokens, blocks "
          f"{[len(b.tokenize(x)) for x in blocks]} tokens, {args.gen} generated per pass, "
          f"load average {os.getloadavg()[0]:.1f}")
    run_continuation(b, prompt, blocks, SamplingSettings(max_tokens=2))  # warm-up
    cont, reenc = [], []
    for r in range(args.rounds):
        cont.append(run_continuation(b, prompt, blocks, settings))
        reenc.append(run_reencode(b, prompt, blocks, settings))
        for name, x in (("continuation", cont[-1]), ("re-encode", reenc[-1])):
            print(f"  round {r} {name:12s}: {x['seconds']:7.2f} s wall, {x['cpu_seconds']:7.2f} s CPU, "
                  f"{x['prefill_calls']} prefill tokens, {x['batch_tokens']} batch tokens, {x['generated']} generated")
    c_s = statistics.median(x["seconds"] for x in cont)
    r_s = statistics.median(x["seconds"] for x in reenc)
    c_cpu = statistics.median(x["cpu_seconds"] for x in cont)
    r_cpu = statistics.median(x["cpu_seconds"] for x in reenc)
    c, r = cont[-1], reenc[-1]
    print(f"prompt re-encoding (prefill tokens): continuation {c['prefill_calls']}  re-encode {r['prefill_calls']}  "
          f"-> {r['prefill_calls'] / c['prefill_calls']:.2f}x fewer (goal >= 3x)")
    print(f"all batch-decoded tokens (prefill + spliced blocks): continuation {c['batch_tokens']}  re-encode "
          f"{r['batch_tokens']}  -> {r['batch_tokens'] / c['batch_tokens']:.2f}x fewer")
    print(f"wall time per answer (median): continuation {c_s:.2f} s  re-encode {r_s:.2f} s  -> {r_s / c_s:.2f}x "
          f"faster (goal >= 2x)")
    print(f"CPU seconds per answer (all threads; ~ wall time on idle cores): continuation {c_cpu:.2f}  re-encode "
          f"{r_cpu:.2f}  -> {r_cpu / c_cpu:.2f}x")
    b.close()


if __name__ == "__main__":
    main()
