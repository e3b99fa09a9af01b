"""`medrwr-edge serve` under faults, on loopback, against the real SmolLM2-135M and a real (MiniLM) knowledge pack.

All at once: N clients (default 64) stream questions (`/v1/ask`, SSE); a fraction of them (default 10%) drop the
connection mid-stream; a 429 makes a client wait Retry-After (capped at 1 s) and try again; meanwhile the pack
the server answers from is swapped under it again and again (`paths.atomic_directory`, as `pack build
--overwrite` and `bundle install` do) while this process keeps opening it; at the end a SIGTERM arrives while an
answer is being generated. Printed: answers completed, lost (accepted, not dropped by its client, and not answered
in full: must be 0), 429s, p50/p95 latency of completed answers, pack opens during the swaps (failed: must be 0),
what the in-flight request got at SIGTERM, the server's exit status, and its RSS at start and end.

    nice -n 10 python benchmarks/bench_serve_faults.py [--clients 64] [--requests 2] [--drop 0.1] [--swaps 5]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import httpx  # noqa: E402  (the serve extra)
from bench_serve import QUESTION, rss_mb, start_server  # noqa: E402


def build_packs(work: Path, text_encoder) -> tuple[Path, Path]:
    """Two versions of one pack (different documents): the one served, and the one swapped in and out."""
    from medrwr_edge.kb_pack.build import build_text_pack
    from medrwr_edge.kb_pack.documents import Document

    out = []
    for version, n in (("1", 40), ("2", 60)):
        docs = [Document(id=f"d{i}", text=f"J18.{i % 10} pneumonia note {i}, version {version}") for i in range(n)]
        out.append(build_text_pack(docs, work / f"v{version}", text_encoder, name="kb", version=version,
                                   progress=False))
    return out[0], out[1]


def stream_one(c: httpx.Client, drop_after: int | None) -> tuple[str, float]:
    """One streamed question: ("completed" | "dropped" | "429:<retry-after>" | "lost:<why>", seconds)."""
    t0 = time.perf_counter()
    pieces = 0
    data = dict(QUESTION, stream="true")
    try:
        with c.stream("POST", "/v1/ask", data=data) as r:
            if r.status_code == 429:
                return f"429:{r.headers.get('retry-after', '1')}", 0.0
            if r.status_code != 200:
                return f"lost:http {r.status_code}", 0.0
            event = None
            for line in r.iter_lines():
                if line.startswith("event: "):
                    event = line[7:]
                    pieces += event == "piece"
                    if drop_after is not None and pieces >= drop_after:
                        return "dropped", 0.0  # leaving the block closes the connection mid-answer
                elif line.startswith("data: ") and event == "record":
                    rec = json.loads(line[6:])  # whole: the model may still have given no answer in max_tokens
                    ok = bool(rec.get("passes")) and "assistant_text" in rec
                    return ("completed" if ok else "lost:incomplete record"), time.perf_counter() - t0
                elif line.startswith("data: ") and event == "error":
                    return f"lost:{json.loads(line[6:])['error']['type']}", 0.0
    except httpx.HTTPError as e:
        return f"lost:{type(e).__name__}", 0.0
    return "lost:stream ended without a record", 0.0


def run_clients(url: str, n_clients: int, requests: int, drop: float, seed: int = 0) -> dict:
    rng = random.Random(seed)
    droppers = set(rng.sample(range(n_clients), max(1, round(n_clients * drop)))) if drop > 0 else set()
    outcomes, latencies, rejections = [], [], [0]
    lock = threading.Lock()

    def client(k: int):
        with httpx.Client(base_url=url, timeout=600) as c:
            done = 0
            while done < requests:
                outcome, seconds = stream_one(c, 3 if k in droppers else None)
                if outcome.startswith("429:"):
                    with lock:
                        rejections[0] += 1
                    time.sleep(min(1.0, float(outcome[4:])))
                    continue
                done += 1
                with lock:
                    outcomes.append(outcome)
                    if outcome == "completed":
                        latencies.append(seconds)

    threads = [threading.Thread(target=client, args=(k,)) for k in range(n_clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    lat = sorted(latencies)
    return {
        "clients": n_clients, "droppers": len(droppers), "requests": len(outcomes),
        "completed": outcomes.count("completed"), "dropped": outcomes.count("dropped"),
        "lost": [o for o in outcomes if o.startswith("lost")], "429s": rejections[0],
        "seconds": time.perf_counter() - t0,
        "p50": statistics.median(lat) if lat else float("nan"),
        "p95": lat[min(len(lat) - 1, int(round(0.95 * (len(lat) - 1))))] if lat else float("nan"),
    }


def swap_pack_repeatedly(final: Path, versions: tuple[Path, Path], swaps: int, stop: threading.Event) -> dict:
    """Swap the served pack between its two versions while this process keeps opening it (as a second `serve`, a
    `pack verify` or an install would)."""
    from medrwr_edge.kb_pack.pack import Pack
    from medrwr_edge.paths import atomic_directory

    opens, failures = [0], []

    def reader():
        while not stop.is_set():
            try:
                with Pack.open(final) as p:
                    assert p.doc_count in (40, 60)
                opens[0] += 1
            except Exception as e:  # noqa: BLE001 -- counted
                failures.append(f"{type(e).__name__}: {e}")

    t = threading.Thread(target=reader, daemon=True)
    t.start()
    for i in range(swaps):
        time.sleep(1.0)
        with atomic_directory(final, overwrite=True) as tmp:
            src = versions[(i + 1) % 2]
            for f in src.iterdir():
                shutil.copy2(f, tmp / f.name)
    time.sleep(0.5)
    stop.set()
    t.join(30)
    return {"swaps": swaps, "opens": opens[0], "failed_opens": failures[:3], "failed_count": len(failures)}


def sigterm_mid_answer(proc: subprocess.Popen, url: str) -> dict:
    """Start a streamed answer; SIGTERM the server at its first piece; the answer should still arrive whole."""
    result = {}

    def ask():
        with httpx.Client(base_url=url, timeout=120) as c:
            result["outcome"], _ = stream_one(c, None)

    t = threading.Thread(target=ask)
    t.start()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if httpx.get(url + "/v1/health", timeout=5).json().get("in_flight"):
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    t.join(120)
    try:
        code = proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()
        code = "killed after 60 s"
    return {"in_flight_request": result.get("outcome", "no outcome"), "exit": code}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m-instruct-q4_1")
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--requests", type=int, default=2, help="questions per client")
    ap.add_argument("--drop", type=float, default=0.1, help="fraction of clients that drop mid-stream")
    ap.add_argument("--swaps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--max-queue", type=int, default=8)
    args = ap.parse_args()

    from medrwr_edge import assets
    from medrwr_edge.kb_pack.encoders import load_encoder

    model = str(assets.installed_path(args.model))
    work = Path(tempfile.mkdtemp(prefix="medrwr-serve-faults-"))
    try:
        v1, v2 = build_packs(work / "versions", load_encoder(assets.default_text_encoder_dir()))
        final = work / "served" / "kb"
        shutil.copytree(v1, final)
        load_start = os.getloadavg()
        proc, url = start_server(model, args.threads, args.max_queue, work / "server.log",
                                 serve_args=("--pack", str(final), "--no-log"))
        try:
            httpx.post(url + "/v1/ask", data=QUESTION, timeout=300)  # warm: model, pack, encoder, prefix cache
            rss_start = rss_mb(proc.pid)
            stop = threading.Event()
            swapped = {}
            swapper = threading.Thread(target=lambda: swapped.update(
                swap_pack_repeatedly(final, (v1, v2), args.swaps, stop)))
            swapper.start()
            load = run_clients(url, args.clients, args.requests, args.drop)
            swapper.join(120)
            health = httpx.get(url + "/v1/health").json()
            rss_end = rss_mb(proc.pid)
            term = sigterm_mid_answer(proc, url)
        finally:
            if proc.poll() is None:
                proc.kill()
        log_text = (work / "server.log").read_text(errors="replace")
    finally:
        shutil.rmtree(work, ignore_errors=True)

    print(f"machine: {os.cpu_count()} CPUs, load average {load_start[0]:.2f} at start, {os.getloadavg()[0]:.2f} at "
          f"end (shared machine: other jobs run beside this one); model {Path(model).name}, {args.threads} thread(s), "
          f"queue {args.max_queue}")
    print(f"clients: {load['clients']} x {args.requests} questions, {load['droppers']} of them drop mid-stream; "
          f"{load['seconds']:.0f} s")
    print(f"completed {load['completed']}, dropped by their client {load['dropped']}, lost {len(load['lost'])}"
          + (f" ({', '.join(sorted(set(load['lost'])))})" if load["lost"] else "") + f", 429s {load['429s']}")
    print(f"latency of completed answers (queueing included): p50 {load['p50']:.2f} s, p95 {load['p95']:.2f} s")
    print(f"server counters: accepted {health['accepted']}, completed {health['completed']}, cancelled "
          f"{health['cancelled']}, failed {health['failed']}, rejected {health['rejected_queue_full']}")
    print(f"pack swapped {swapped.get('swaps')} times under the server; opened {swapped.get('opens')} times meanwhile, "
          f"failed {swapped.get('failed_count')}" + (f": {swapped['failed_opens']}" if swapped.get("failed_count")
                                                     else ""))
    # uvicorn re-raises the signal after its graceful shutdown, so the exit status is -15 (killed by SIGTERM) by design
    print(f"SIGTERM mid-answer: the in-flight request got {term['in_flight_request']}; server exit {term['exit']}; "
          f"tracebacks in its log: {log_text.count('Traceback')}")
    print(f"server RSS: {rss_start:.0f} MB after warm-up, {rss_end:.0f} MB after the run "
          f"({rss_end - rss_start:+.0f} MB)")


if __name__ == "__main__":
    main()
