"""`--engine`: the Med-RwR loop against an inference server on loopback (llama-cpp-python's `llama_cpp.server`,
SmolLM2-135M, 1 thread), measured side by side in one run.

1. Prompt tokens the SERVER computes per answer, with its prefix cache vs without (another client's request
   between our requests evicts llama-cpp-python's single cache, as a server without prefix caching would recompute
   everything). Counted from the server's own log lines ("N prefix-match hit, remaining M prompt tokens to eval";
   no such line = the whole prompt). Goal: >= 3x fewer with caching, "like the in-process KV continuation".
   Three shapes:
   * kv: EXACTLY the shape benchmarks/bench_kv_continuation.py measures in-process (its prompt, two ~250-token
     <retrieve> blocks, 48 generated tokens per pass, no stop strings), and in the same run the in-process
     continuation vs re-encode on it, so the comparison is like with like. Two ratios each: all prompt tokens
     computed (spliced blocks included: they are new either way), and the in-process figure's own metric, prompt
     RE-ENCODING (spliced text not counted for the cached/continuation side; bench_kv_continuation's "prefill").
   * guided: the product's default answer for a model without the protocol (guided, 3 entries cut to 40 words,
     `--doc-words 40`), a real `ask` through the server: query pass, one retrieval, the letter read.
   * entries: the earlier shape of this script: two retrievals of 3 whole ICD-10-CM entries (~880 tokens each).
2. Seconds per answer of the kv shape, in-process vs through the server (same model, 1 thread each), alternating.
3. `medrwr-edge serve --engine URL` with 8 concurrent clients, `--engine-parallel 1` vs N: answers/s, p95, lost.

    nice -n 10 python benchmarks/bench_engine.py [--rounds 2] [--clients 8] [--parallel 1,8]
        [--shapes kv,guided,entries] [--skip timing,serve]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE.parent / "tests"))
import bench_kv_continuation as kv  # noqa: E402 - the in-process shape, measured here on the server too
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
EVICTOR_PROMPT = "<|im_start|>user\nAn unrelated question from another workstation.<|im_end|>\n<|im_start|>assistant\n"


def load() -> str:
    return " ".join(open("/proc/loadavg").read().split()[:3])


# ------------------------------------------------------------------------------------------------- shapes


class Shape:
    """One answer's shape: a prompt, then passes of `gen` tokens with text spliced in between."""

    def __init__(self, name: str, prompt: str, splices: list[str], gen: int, stops: list[str]):
        self.name, self.prompt, self.splices, self.gen, self.stops = name, prompt, splices, gen, stops

    def run(self, be, before_request=None) -> int:
        """One answer on backend `be`; returns the tokens spliced in (appended text)."""
        greedy = SamplingSettings(temperature=0.0, max_tokens=self.gen)
        be.reset()
        be.prefill([self.prompt])
        spliced = 0
        for i in range(len(self.splices) + 1):
            if before_request is not None:
                before_request(be.n_tokens())
            be.generate(greedy, self.stops)
            if i < len(self.splices):
                spliced += be.append_text(self.splices[i])
        return spliced


def kv_shape(local) -> Shape:
    """bench_kv_continuation.py's shape, built by its own functions with the in-process tokenizer."""
    return Shape("kv", kv.prompt_text(), [kv.retrieve_block(i + 1, 250, local) for i in range(2)], 48, [])


def entries_shape(pack_path) -> Shape:
    from medrwr_edge.kb_pack.pack import Pack
    from medrwr_edge.runtime.retrieval import PackTextRetriever

    opts = P.parse_options(OPTIONS)
    prompt = P.chatml_prompt(P.system_prompt(has_image=False, open_ended=False), P.user_text(QUESTION, opts), [],
                             vision=False, labels=[])
    pack = Pack.open(pack_path)
    try:
        retriever = PackTextRetriever([pack], None)
        splices = [f"\n<query> {q} </query>\n" + P.retrieve_block([d.snippet for d in retriever.search(q, 3)])
                   for q in QUERIES]
    finally:
        pack.close()
    return Shape("entries", prompt, splices, 32, ["</query>", "</answer>"])


# ------------------------------------------------------------------------------ counting on the server side


def recomputed(log_segment: str, prompt_len: int) -> int:
    """Prompt tokens the server evaluated for our request, from its own log line (none: the whole prompt). Our
    request's line comes first in the segment; an evicting client's request may follow it."""
    m = HIT_RE.search(log_segment)
    full = log_segment.find("full prompt already cached")
    if full >= 0 and (m is None or full < m.start()):
        return 0
    return int(m.group(2)) if m else prompt_len


class ServerCounter:
    """Marks the server log before each of our requests (after evicting its cache when asked) and sums, per
    request, the prompt tokens the server computed for it."""

    def __init__(self, server, url: str, evict: bool):
        from medrwr_edge.runtime.server_backend import ServerBackend

        self.server, self.evict = server, evict
        self.other = ServerBackend(url, n_ctx=4096) if evict else None
        if self.other is not None:
            self.other.prefill(EVICTOR_PROMPT)
        self.marks: list[int] = []
        self.lengths: list[int] = []

    def before_request(self, prompt_len: int) -> None:
        if self.other is not None:
            self.other.generate(SamplingSettings(max_tokens=1), [])
        self.marks.append(len(self.server.log_text()))
        self.lengths.append(prompt_len)

    def total(self) -> int:
        log = self.server.log_text()
        ends = self.marks[1:] + [len(log)]
        return sum(recomputed(log[a:b], n) for a, b, n in zip(self.marks, ends, self.lengths))

    def close(self) -> None:
        if self.other is not None:
            self.other.close()


class Counted:
    """A ServerBackend whose every request (generation pass or letter read) goes through a ServerCounter."""

    def __init__(self, inner, counter: ServerCounter):
        self.inner, self.counter = inner, counter

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def generate(self, settings, stop, on_piece=None):
        self.counter.before_request(self.inner.n_tokens())
        return self.inner.generate(settings, stop, on_piece)

    def next_token_probs(self, token_ids):
        self.counter.before_request(self.inner.n_tokens())
        return self.inner.next_token_probs(token_ids)


def server_shape(server, url, shape: Shape, evict: bool) -> dict:
    from medrwr_edge.runtime.server_backend import ServerBackend

    counter = ServerCounter(server, url, evict)
    be = ServerBackend(url, n_ctx=4096)
    try:
        spliced = shape.run(be, counter.before_request)
        return {"computed": counter.total(), "sent": sum(counter.lengths), "spliced": spliced,
                "first_prompt": counter.lengths[0], "requests": len(counter.lengths)}
    finally:
        be.close()
        counter.close()


def server_guided(server, url, pack, evict: bool) -> dict:
    """A real `ask` with the product's defaults for this model (guided, 3 entries of at most 40 words)."""
    from medrwr_edge.runtime.api import ask
    from medrwr_edge.runtime.server_backend import ServerBackend

    counter = ServerCounter(server, url, evict)
    be = ServerBackend(url, n_ctx=4096)
    try:
        rec = ask(None, QUESTION, OPTIONS, packs=[pack], image_pack=False, backend=Counted(be, counter),
                  protocol="guided", cdir=False, n_ctx=4096)
        return {"computed": counter.total(), "sent": sum(counter.lengths), "spliced": rec.tokens.get("inserted", 0),
                "first_prompt": counter.lengths[0], "requests": len(counter.lengths), "answer": rec.answer,
                "retrievals": len(rec.retrievals())}
    finally:
        be.close()
        counter.close()


def local_guided(model, pack) -> dict:
    """The same guided answer in-process: what its KV continuation decodes in batches (prompt + spliced text)."""
    from medrwr_edge.runtime.api import ask

    rec = ask(None, QUESTION, OPTIONS, packs=[pack], image_pack=False, model=model, protocol="guided", cdir=False,
              n_ctx=4096, n_threads=1, prefix_cache=False)
    return {"batch": rec.tokens.get("prompt", 0) + rec.tokens.get("inserted", 0), "answer": rec.answer}


def report_shape(name: str, cached: dict, evicted: dict, figures: list, local: dict | None = None) -> None:
    a = evicted["computed"] / max(1, cached["computed"])
    reenc_cached = max(0, cached["computed"] - cached["spliced"])  # the first prompt + anything computed twice
    b = evicted["computed"] / max(1, reenc_cached)
    print(f"[{name}] requests per answer: {cached['requests']}; prompt tokens sent (sum over requests): "
          f"{cached['sent']}; first prompt {cached['first_prompt']}; spliced in: {cached['spliced']}")
    print(f"[{name}] prompt tokens the server computed: prefix cache {cached['computed']}, cache evicted "
          f"{evicted['computed']} -> {a:.2f}x fewer (spliced text included)")
    print(f"[{name}] prompt re-encoding (spliced text not counted on the cached side): {reenc_cached} vs "
          f"{evicted['computed']} -> {b:.2f}x fewer")
    figures.append({"name": f"{name}: server prompt tokens computed, evicted/cached", "value": round(a, 2),
                    "unit": "x", "goal": ">= 3"})
    figures.append({"name": f"{name}: server prompt re-encoding, evicted/cached", "value": round(b, 2), "unit": "x"})
    if local:
        for key, value in local.items():
            print(f"[{name}] in-process, same shape: {key} = {value}")


def local_kv(local, shape: Shape) -> dict:
    """bench_kv_continuation's own measurement of this shape (same functions), in this run."""
    settings = SamplingSettings(temperature=0.0, max_tokens=shape.gen)
    cont = kv.run_continuation(local, shape.prompt, shape.splices, settings)
    reenc = kv.run_reencode(local, shape.prompt, shape.splices, settings)
    return {"continuation prefill/batch tokens": f"{cont['prefill_calls']}/{cont['batch_tokens']}",
            "re-encode prefill tokens": reenc["prefill_calls"],
            "prefill ratio (README's metric)": f"{reenc['prefill_calls'] / cont['prefill_calls']:.2f}x",
            "batch-token ratio (spliced blocks included)": f"{reenc['batch_tokens'] / cont['batch_tokens']:.2f}x"}


# ---------------------------------------------------------------------------------------------- serve


def bench_serve(url, pack, clients: int, parallel: int, max_tokens: int) -> dict:
    import httpx

    port = free_port()
    env = {k: v for k, v in os.environ.items() if v}
    proc = subprocess.Popen([sys.executable, "-m", "medrwr_edge.cli", "serve", "--port", str(port), "--engine", url,
                             "--engine-parallel", str(parallel), "-p", str(pack), "--no-log",
                             "--max-queue", str(clients), "--ctx", "4096"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    base = f"http://127.0.0.1:{port}"
    try:
        with httpx.Client(trust_env=False, timeout=900) as c:
            for _ in range(600):
                try:
                    if c.get(base + "/v1/health").status_code == 200:
                        break
                except httpx.HTTPError:
                    time.sleep(0.2)
            results: list = [None] * clients
            settings = json.dumps({"max_tokens": max_tokens, "cdir": False})

            def one(i):
                t0 = time.perf_counter()
                r = c.post(base + "/v1/ask", data={"question": QUESTION, "options": OPTIONS, "settings": settings})
                results[i] = (r.status_code, time.perf_counter() - t0,
                              r.json().get("answer") if r.status_code == 200 else r.text[:200])

            t0 = time.perf_counter()
            threads = [threading.Thread(target=one, args=(i,)) for i in range(clients)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            wall = time.perf_counter() - t0
            health = c.get(base + "/v1/health").json()
    finally:
        proc.terminate()
        proc.wait(30)
    ok = [r for r in results if r and r[0] == 200]
    lat = sorted(r[1] for r in ok)
    p95 = lat[min(len(lat) - 1, int(round(0.95 * (len(lat) - 1))))] if lat else float("nan")
    return {"answers": len(ok), "lost": clients - len(ok), "wall": wall, "per_s": len(ok) / wall, "p95": p95,
            "answers_given": sorted({str(r[2]) for r in ok}), "parallel": health.get("parallel"),
            "errors": [r for r in results if not r or r[0] != 200]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--parallel", default="1,8", help="serve --engine-parallel values to compare")
    ap.add_argument("--shapes", default="kv,guided,entries")
    ap.add_argument("--skip", default="", help="parts to skip: timing,serve")
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

    shapes = args.shapes.split(",")
    model = assets.smoke_llm_path()
    work = Path(tempfile.mkdtemp(prefix="bench-engine-"))
    pack = build_text_pack(icd10.icd10_documents(chapters=[10]), work / "icd-resp",
                           load_encoder(assets.default_text_encoder_dir()), name="icd-resp", version="bench",
                           progress=False)
    print(f"machine load before: {load()} (shared 2-core machine)")
    local = LlamaBackend(str(model), n_ctx=4096, n_threads=1, sha256=sha256_file(model))
    server = LlamaCppPythonServer(model, work / "server.log", n_ctx=4096, threads=1)
    figures: list = []
    try:
        url = server.url
        kv_s = kv_shape(local)
        print(f"kv shape: prompt {len(local.tokenize(kv_s.prompt))} tokens, blocks "
              f"{[len(local.tokenize(b)) for b in kv_s.splices]} tokens, {kv_s.gen} generated per pass")
        if "kv" in shapes:
            report_shape("kv", server_shape(server, url, kv_s, False), server_shape(server, url, kv_s, True),
                         figures, local_kv(local, kv_s))
        if "guided" in shapes:
            cached, evicted = server_guided(server, url, pack, False), server_guided(server, url, pack, True)
            mine = local_guided(model, pack)
            print(f"[guided] answers: server {cached['answer']} / {evicted['answer']}, in-process {mine['answer']}; "
                  f"retrievals {cached['retrievals']}")
            report_shape("guided", cached, evicted, figures,
                         {"batch-decoded tokens (prompt + spliced), KV continuation": mine["batch"]})
        if "entries" in shapes:
            e = entries_shape(pack)
            report_shape("entries", server_shape(server, url, e, False), server_shape(server, url, e, True), figures)
        print(f"machine load after part 1: {load()}")

        if "timing" not in args.skip:
            remote = ServerBackend(url, n_ctx=4096)
            times = {"in-process": [], "server": []}
            for _ in range(args.rounds):
                for name, be in (("in-process", local), ("server", remote)):
                    t0 = time.perf_counter()
                    kv_s.run(be)
                    times[name].append(time.perf_counter() - t0)
            remote.close()
            a, b = statistics.median(times["in-process"]), statistics.median(times["server"])
            print(f"seconds per answer (kv shape) in-process: {a:.2f} s, through the server: {b:.2f} s "
                  f"-> {b / a:.2f}x (HTTP hops, re-tokenization, SSE; same machine); load {load()}")
            figures.append({"name": "seconds per answer, server/in-process", "value": round(b / a, 2), "unit": "x"})
        local.close()

        if "serve" not in args.skip:
            for n in (int(x) for x in args.parallel.split(",")):
                s = bench_serve(url, pack, args.clients, n, 64)
                print(f"serve --engine-parallel {n} (health says {s['parallel']}), {args.clients} concurrent clients: "
                      f"answers {s['answers']}, lost {s['lost']}, wall {s['wall']:.1f} s, {s['per_s']:.3f} answers/s, "
                      f"p95 {s['p95']:.1f} s, answers given {s['answers_given']}; load {load()}")
                if s["errors"]:
                    print(f"serve errors: {s['errors']}")
                figures += [
                    {"name": f"serve answers/s, {args.clients} clients, --engine-parallel {n}",
                     "value": round(s["per_s"], 3), "unit": "answers/s"},
                    {"name": f"serve p95, {args.clients} clients, --engine-parallel {n}", "value": round(s["p95"], 1),
                     "unit": "s"},
                    {"name": f"serve requests lost, --engine-parallel {n}", "value": s["lost"], "unit": ""},
                ]
        print(f"machine load after: {load()}")
        print("BENCH_JSON " + json.dumps({"figures": figures}))
    finally:
        server.stop()


if __name__ == "__main__":
    main()
