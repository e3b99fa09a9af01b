"""`--engine`: the Med-RwR loop against an inference server on loopback (llama-cpp-python's `llama_cpp.server`,
SmolLM2-135M), measured side by side in one run.

1. Prompt tokens the SERVER recomputes per 2-retrieval answer, with its prefix cache vs without (another client's
   request between our passes evicts llama-cpp-python's single cache, as a server without prefix caching would
   recompute everything). Counted from the server's own log lines ("N prefix-match hit, remaining M prompt
   tokens to eval"; no such line = the whole prompt). Goal: >= 3x fewer with caching.
   Shape of an answer: the loop's prompt -> the model generates G tokens -> "<query> .. </query>" -> a real
   <retrieve> block from the pack -> generates G -> query -> block -> generates G (the answering pass).
   The queries are appended (SmolLM2 knows no Med-RwR protocol), the generation is real.
2. Seconds per answer of that shape, in-process vs through the server (same model, 1 thread each), alternating.
3. `medrwr-edge serve --engine URL` with 8 concurrent clients: answers/s, p95 latency, requests lost.

    nice -n 10 python benchmarks/bench_engine.py [--gen 32] [--rounds 3] [--clients 8]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE.parent / "tests"))
from engine_server import LlamaCppPythonServer, free_port, missing_server_deps  # noqa: E402
from medrwr_edge.runtime import protocol as P  # noqa: E402
from medrwr_edge.runtime.backend import SamplingSettings  # noqa: E402

QUESTION = ("A 67-year-old smoker has fever, productive cough with rusty sputum, right pleuritic chest pain, "
            "confusion, respiratory rate 28/min, blood pressure 96/60 mmHg, urea 9.1 mmol/L and right lower lobe "
            "consolidation on the chest X-ray. Which ICD-10-CM code fits the diagnosis?")
OPTIONS = ["A. J18.1 Lobar pneumonia, unspecified organism", "B. J45.909 Unspecified asthma, uncomplicated",
           "C. J93.9 Pneumothorax, unspecified", "D. J47.9 Bronchiectasis, uncomplicated"]
QUERIES = ["lobar pneumonia", "pneumonia with sepsis and confusion"]
HIT_RE = re.compile(r"Llama\.generate: (\d+) prefix-match hit, remaining (\d+) prompt tokens to eval")


def loop_prompt():
    opts = P.parse_options(OPTIONS)
    return P.chatml_prompt(P.system_prompt(has_image=False, open_ended=False), P.user_text(QUESTION, opts), [],
                           vision=False, labels=[])


def blocks(pack_path) -> list[str]:
    from medrwr_edge.kb_pack.pack import Pack
    from medrwr_edge.runtime.retrieval import PackTextRetriever

    pack = Pack.open(pack_path)
    try:
        retriever = PackTextRetriever([pack], None)
        return ["\n" + P.retrieve_block([d.snippet for d in retriever.search(q, 3)]) for q in QUERIES]
    finally:
        pack.close()


def answer(be, gen: int, retrieve_blocks, between=None) -> tuple[list[int], int]:
    """One 2-retrieval answer; returns the prompt length of each generation request, and how many of those
    prompt tokens were new to the server (the first prompt and the appended query/retrieve text)."""
    greedy = SamplingSettings(temperature=0.0, max_tokens=gen)
    be.reset()
    be.prefill(loop_prompt())
    lengths, new = [], be.n_tokens()
    for i in range(3):
        if between is not None:
            between()
        lengths.append(be.n_tokens())
        be.generate(greedy, ["</query>", "</answer>"])
        if i < 2:
            new += be.append_text(f"\n<query> {QUERIES[i]} </query>")
            new += be.append_text(retrieve_blocks[i])
    return lengths, new


def recomputed(log_segment: str, prompt_len: int) -> int:
    """Prompt tokens the server evaluated for our request, from its own log line (none: the whole prompt). Our
    request's line comes first in the segment; an evicting client's request may follow it."""
    m = HIT_RE.search(log_segment)
    full = log_segment.find("full prompt already cached")
    if full >= 0 and (m is None or full < m.start()):
        return 0
    return int(m.group(2)) if m else prompt_len


def measure_recompute(server, url, gen, retrieve_blocks, evict: bool) -> tuple[int, int, int]:
    from medrwr_edge.runtime.server_backend import ServerBackend

    be, other = ServerBackend(url, n_ctx=4096), ServerBackend(url, n_ctx=4096)
    other.prefill("<|im_start|>user\nAn unrelated question from another workstation.<|im_end|>\n"
                  "<|im_start|>assistant\n")
    marks = []

    def between():
        if evict:
            other.generate(SamplingSettings(max_tokens=1), [])
        marks.append(len(server.log_text()))

    lengths, new = answer(be, gen, retrieve_blocks, between)
    marks.append(len(server.log_text()))
    log = server.log_text()
    total = sum(recomputed(log[marks[i]:marks[i + 1]], lengths[i]) for i in range(3))
    be.close()
    other.close()
    return total, sum(lengths), new


def bench_serve(url, pack, clients: int, gen: int) -> dict:
    import httpx

    port = free_port()
    env = {**os.environ, "MEDRWR_EDGE_HOME": os.environ.get("MEDRWR_EDGE_HOME", "")}
    env = {k: v for k, v in env.items() if v}
    proc = subprocess.Popen([sys.executable, "-m", "medrwr_edge.cli", "serve", "--port", str(port), "--engine", url,
                             "-p", str(pack), "--no-log", "--max-queue", str(clients), "--ctx", "4096"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    base = f"http://127.0.0.1:{port}"
    try:
        with httpx.Client(trust_env=False, timeout=600) as c:
            for _ in range(600):
                try:
                    if c.get(base + "/v1/health").status_code == 200:
                        break
                except httpx.HTTPError:
                    time.sleep(0.2)
            results: list = [None] * clients

            def one(i):
                t0 = time.perf_counter()
                r = c.post(base + "/v1/ask", data={"question": QUESTION, "options": OPTIONS, "max_tokens": str(gen),
                                                   "cdir": "false"})
                results[i] = (r.status_code, time.perf_counter() - t0,
                              r.json().get("answer") if r.status_code == 200 else r.text[:200])

            t0 = time.perf_counter()
            threads = [threading.Thread(target=one, args=(i,)) for i in range(clients)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            wall = time.perf_counter() - t0
    finally:
        proc.terminate()
        proc.wait(30)
    ok = [r for r in results if r and r[0] == 200]
    lat = sorted(r[1] for r in ok)
    p95 = lat[min(len(lat) - 1, int(round(0.95 * (len(lat) - 1))))] if lat else float("nan")
    return {"answers": len(ok), "lost": clients - len(ok), "wall": wall, "per_s": len(ok) / wall, "p95": p95,
            "same_answer": len({r[2] for r in ok}) == 1, "errors": [r for r in results if not r or r[0] != 200]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--gen", type=int, default=32, help="tokens generated per pass")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--clients", type=int, default=8)
    args = ap.parse_args()
    missing = missing_server_deps()
    if missing:
        print(f"skipped: llama_cpp.server needs the server extra ({', '.join(missing)} missing)")
        return
    from medrwr_edge import assets
    from medrwr_edge.kb_pack import icd10
    from medrwr_edge.kb_pack.build import build_text_pack
    from medrwr_edge.kb_pack.encoders import load_encoder
    from medrwr_edge.paths import sha256_file
    from medrwr_edge.runtime.llama_backend import LlamaBackend
    from medrwr_edge.runtime.server_backend import ServerBackend

    model = assets.smoke_llm_path()
    work = Path(tempfile.mkdtemp(prefix="bench-engine-"))
    pack = build_text_pack(icd10.icd10_documents(chapters=[10]), work / "icd-resp",
                           load_encoder(assets.default_text_encoder_dir()), name="icd-resp", version="bench",
                           progress=False)
    retrieve_blocks = blocks(pack)
    print(f"machine load before: {open('/proc/loadavg').read().split()[:3]} (shared 2-core machine)")
    server = LlamaCppPythonServer(model, work / "server.log", n_ctx=4096, threads=1)
    try:
        url = server.url
        with_cache, total_prompt, new = measure_recompute(server, url, args.gen, retrieve_blocks, evict=False)
        without_cache, _, _ = measure_recompute(server, url, args.gen, retrieve_blocks, evict=True)
        reenc_with, reenc_without = max(0, with_cache - new), max(0, without_cache - new)
        print(f"prompt tokens sent per 2-retrieval answer (3 requests): {total_prompt}")
        print(f"of which new to the server (first prompt + queries + retrieve blocks): {new}")
        print(f"prompt tokens recomputed by the server, prefix cache: {with_cache}")
        print(f"prompt tokens recomputed by the server, cache evicted between passes: {without_cache}")
        print(f"recompute ratio without/with prefix cache: {without_cache / max(1, with_cache):.2f}x (goal >= 3x)")
        print(f"re-encoded tokens (recomputed minus new), prefix cache: {reenc_with}")
        print(f"re-encoded tokens (recomputed minus new), cache evicted: {reenc_without}")

        local = LlamaBackend(str(model), n_ctx=4096, n_threads=1, sha256=sha256_file(model))
        remote = ServerBackend(url, n_ctx=4096)
        times = {"in-process": [], "server": []}
        for _ in range(args.rounds):
            for name, be in (("in-process", local), ("server", remote)):
                t0 = time.perf_counter()
                answer(be, args.gen, retrieve_blocks)
                times[name].append(time.perf_counter() - t0)
        local.close()
        remote.close()
        a, b = statistics.median(times["in-process"]), statistics.median(times["server"])
        print(f"seconds per answer in-process: {a:.2f} s")
        print(f"seconds per answer through the server: {b:.2f} s")
        print(f"server/in-process time ratio: {b / a:.2f}x (HTTP hops, re-tokenization, SSE; same machine)")
        print(f"machine load after part 2: {open('/proc/loadavg').read().split()[:3]}")

        s = bench_serve(url, pack, args.clients, args.gen)
        print(f"serve with {args.clients} concurrent clients: answers {s['answers']}, lost {s['lost']}, "
              f"wall {s['wall']:.1f} s")
        print(f"serve answers per second: {s['per_s']:.3f} answers/s")
        print(f"serve p95 latency: {s['p95']:.1f} s")
        print(f"serve same answer for every client: {s['same_answer']}")
        if s["errors"]:
            print(f"serve errors: {s['errors']}")
        print(f"machine load after: {open('/proc/loadavg').read().split()[:3]}")
        print("BENCH_JSON " + json.dumps({"figures": [
            {"name": "server prompt tokens recomputed, without/with prefix cache", "value":
             round(without_cache / max(1, with_cache), 2), "unit": "x", "goal": ">= 3"},
            {"name": "server re-encoded tokens per answer, with prefix cache", "value": reenc_with, "unit": "tokens"},
            {"name": "server re-encoded tokens per answer, cache evicted", "value": reenc_without, "unit": "tokens"},
            {"name": "seconds per answer, server/in-process", "value": round(b / a, 2), "unit": "x"},
            {"name": f"serve answers/s, {args.clients} clients", "value": round(s["per_s"], 3), "unit": "answers/s"},
            {"name": f"serve p95, {args.clients} clients", "value": round(s["p95"], 1), "unit": "s"},
            {"name": "serve requests lost", "value": s["lost"], "unit": ""},
        ]}))
    finally:
        server.stop()


if __name__ == "__main__":
    main()
