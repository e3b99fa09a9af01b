"""`medrwr-edge serve` under load, on loopback, against the real SmolLM2-135M: 1, 4 and 16 concurrent clients.

For each client count, for a bounded time: throughput (answers/s), p50/p95 latency of accepted requests, 429
rejections (a client that gets one waits Retry-After, capped at 1 s, and tries again), and "lost" requests
(accepted but not answered in full: must be 0). Then a soak of a few hundred requests with the server's RSS before
and after, a client that disconnects mid-stream (the server must cancel it and answer the next request), and
the measurement that decides queue vs parallel sequences: how much cheaper one B-token llama.cpp batch is than B
one-token decodes (the most that decoding B sequences in parallel in one context could gain).

    python benchmarks/bench_serve.py [--model smollm2-135m-instruct-q4_1] [--seconds 20] [--soak 300] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402  (the serve extra)

QUESTION = {"question": "Which ICD-10-CM code is pneumonia, unspecified organism?",
            "options": ["A. J18.9", "B. J45.909", "C. J44.1", "D. J06.9"],
            "settings": json.dumps({"max_tokens": 16})}
FIGURES: list[dict] = []


def figure(name: str, value: float, unit: str = "") -> None:
    FIGURES.append({"name": name, "value": value, "unit": unit})


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def start_server(model: str, threads: int, max_queue: int, log_path: Path,
                 serve_args: tuple = ("--no-retrieval",)) -> tuple[subprocess.Popen, str]:
    port = free_port()
    log_file = open(log_path, "w")  # a file, not a pipe: an unread pipe would fill and stall the server's logging
    proc = subprocess.Popen(
        [sys.executable, "-m", "medrwr_edge.cli", "serve", "--port", str(port), "--model", model, *serve_args,
         "--max-queue", str(max_queue), "--threads", str(threads), "--ctx", "2048", "--shutdown-timeout", "10"],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=log_file, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit("server failed to start: " + log_path.read_text()[-2000:])
        try:
            if httpx.get(url + "/v1/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            time.sleep(0.2)
    proc.kill()
    raise SystemExit("server did not answer within 120 s")


def run_clients(url: str, n_clients: int, seconds: float, max_requests: int | None = None) -> dict:
    latencies, rejections, lost, errors = [], [0], [0], []
    stop_at = time.monotonic() + seconds
    lock = threading.Lock()

    def client():
        with httpx.Client(base_url=url, timeout=300) as c:
            while time.monotonic() < stop_at:
                with lock:
                    if max_requests is not None and len(latencies) >= max_requests:
                        return
                t0 = time.perf_counter()
                try:
                    r = c.post("/v1/ask", data=QUESTION)
                except httpx.HTTPError as e:
                    with lock:
                        errors.append(type(e).__name__)
                    continue
                if r.status_code == 429:
                    with lock:
                        rejections[0] += 1
                    time.sleep(min(1.0, float(r.headers.get("retry-after", "1"))))
                    continue
                rec = r.json() if r.status_code == 200 else {}
                with lock:
                    if r.status_code != 200 or "assistant_text" not in rec or not rec.get("passes"):
                        lost[0] += 1
                    else:
                        latencies.append(time.perf_counter() - t0)

    t_start = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(n_clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t_start
    lat = sorted(latencies)
    return {
        "clients": n_clients, "answered": len(lat), "seconds": round(wall, 1),
        "throughput": len(lat) / wall if wall else 0.0,
        "p50": statistics.median(lat) if lat else float("nan"),
        "p95": lat[min(len(lat) - 1, int(round(0.95 * (len(lat) - 1))))] if lat else float("nan"),
        "rejected": rejections[0], "lost": lost[0], "errors": len(errors),
    }


def disconnect_mid_stream(url: str) -> dict:
    before = httpx.get(url + "/v1/health").json()
    data = dict(QUESTION, stream="true", settings=json.dumps({"max_tokens": 256}))
    pieces = 0
    with httpx.Client(base_url=url, timeout=300) as c:
        with c.stream("POST", "/v1/ask", data=data) as r:
            for line in r.iter_lines():
                pieces += line.startswith("event: piece")
                if pieces >= 3:
                    break
    t0 = time.perf_counter()
    while httpx.get(url + "/v1/health").json()["in_flight"] and time.perf_counter() - t0 < 60:
        time.sleep(0.05)
    freed = time.perf_counter() - t0
    after = httpx.get(url + "/v1/health").json()
    t1 = time.perf_counter()
    nxt = httpx.post(url + "/v1/ask", data=QUESTION, timeout=300)
    return {"cancelled": after["cancelled"] - before["cancelled"], "worker_free_after_s": freed,
            "next_status": nxt.status_code, "next_complete": "assistant_text" in nxt.json(),
            "next_seconds": time.perf_counter() - t1}


def batch_headroom(model_path: str, threads: int) -> list[tuple[int, float, float]]:
    """(B, seconds for B one-token decodes, seconds for one B-token batch) after a 64-token context."""
    from medrwr_edge.runtime.llama_backend import LlamaBackend

    be = LlamaBackend(model_path, n_ctx=2048, n_threads=threads)
    base = be.tokenize("The patient presents with fever and a productive cough. " * 8)[:64]
    rows = []
    for b in (1, 4, 16):
        singles, batches = [], []
        for _ in range(5):
            be.reset()
            be.prefill_tokens(base)
            t0 = time.perf_counter()
            for i in range(b):
                be._ctx.decode_one(base[i % len(base)], len(base) + i)
            singles.append(time.perf_counter() - t0)
            be.reset()
            be.prefill_tokens(base)
            t0 = time.perf_counter()
            be._ctx.decode_tokens([base[i % len(base)] for i in range(b)], len(base), True)
            batches.append(time.perf_counter() - t0)
        rows.append((b, statistics.median(singles), statistics.median(batches)))
    be.close()
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m-instruct-q4_1")
    ap.add_argument("--seconds", type=float, default=20.0, help="per client count")
    ap.add_argument("--soak", type=int, default=300, help="requests in the memory soak")
    ap.add_argument("--soak-seconds", type=float, default=240.0, help="upper bound on the soak")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--max-queue", type=int, default=8)
    args = ap.parse_args()
    from medrwr_edge import assets

    model_path = str(assets.installed_path(args.model)) if os.sep not in args.model else args.model
    print(f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}; model {Path(model_path).name}, "
          f"{args.threads} llama.cpp thread(s), queue {args.max_queue}, 16 tokens per answer, loopback")

    import tempfile

    log_path = Path(tempfile.mkdtemp(prefix="bench-serve-")) / "server.log"
    proc, url = start_server(model_path, args.threads, args.max_queue, log_path)
    try:
        run_clients(url, 1, 60, max_requests=3)  # warm-up: graph allocation, prefix cache
        rss0 = rss_mb(proc.pid)
        print("\nclients  answered  answers/s  p50 s   p95 s   429s  lost")
        for n in (1, 4, 16):
            r = run_clients(url, n, args.seconds)
            print(f"{n:7d}  {r['answered']:8d}  {r['throughput']:9.2f}  {r['p50']:6.2f}  {r['p95']:6.2f}  "
                  f"{r['rejected']:4d}  {r['lost'] + r['errors']:4d}")
            figure(f"throughput, {n} clients", round(r["throughput"], 3), "answers/s")
            figure(f"p50 latency, {n} clients", round(r["p50"], 3), "s")
            figure(f"p95 latency, {n} clients", round(r["p95"], 3), "s")
            figure(f"queue rejections, {n} clients", r["rejected"], "")
            figure(f"lost requests, {n} clients", r["lost"] + r["errors"], "")
        soak = run_clients(url, 4, args.soak_seconds, max_requests=args.soak)
        rss1 = rss_mb(proc.pid)
        health = httpx.get(url + "/v1/health").json()
        print(f"\nsoak: {soak['answered']} answers in {soak['seconds']} s (4 clients), lost {soak['lost']}, "
              f"429s {soak['rejected']}; server totals: accepted {health['accepted']}, completed "
              f"{health['completed']}, failed {health['failed']}, cancelled {health['cancelled']}")
        print(f"server RSS: {rss0:.1f} MB after warm-up, {rss1:.1f} MB after the load runs and the soak "
              f"(+{rss1 - rss0:.1f} MB over {health['completed']} answers)")
        figure("server RSS growth over the run", round(rss1 - rss0, 1), "MB")
        d = disconnect_mid_stream(url)
        print(f"mid-stream disconnect: cancelled {d['cancelled']}, worker free {d['worker_free_after_s']:.2f} s "
              f"later; next request {d['next_status']} complete={d['next_complete']} in {d['next_seconds']:.2f} s")
        figure("worker freed after a disconnect", round(d["worker_free_after_s"], 3), "s")
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
    log_lines = log_path.read_text().splitlines()
    print(f"server log: {len(log_lines)} lines, exit code {proc.returncode} after SIGTERM; last: {log_lines[-1:]}")

    print("\nparallel sequences? one B-token batch vs B one-token decodes (the most batching B sequences could gain)")
    for b, single, batch in batch_headroom(model_path, args.threads):
        print(f"B={b:2d}: {b} single decodes {single * 1000:7.1f} ms, one batch {batch * 1000:7.1f} ms, "
              f"ratio {single / batch:.2f}")
        figure(f"batched decode speed-up, B={b}", round(single / batch, 2), "x")
    out = os.environ.get("MEDRWR_BENCH_JSON")
    if out:
        Path(out).write_text(json.dumps({"figures": FIGURES}))


if __name__ == "__main__":
    main()
