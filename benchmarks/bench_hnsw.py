"""hnswlib vs exact search at pack scale: recall@10 and single-query latency for candidate M / ef settings.

Two data sets of N×384 L2-normalised float32 vectors (384 = MiniLM's dim):
  * random:    i.i.d. Gaussian directions — the worst case (no structure for the graph to exploit);
  * clustered: 1,000 Gaussian clusters around random centres — closer to real text embeddings.
Queries are held out (not in the index). Ground truth is exact inner product with numpy.
Latency is per query (k=10, num_threads=1), as the runtime calls it.

    python benchmarks/bench_hnsw.py [--n 100000] [--queries 1000] [--M 16 32]

The pack default (kb_pack.pack.HnswParams) is the cheapest setting with recall@10 ≥ 0.98 and p50 < 1 ms on the
clustered set.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import hnswlib
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from medrwr_edge.kb_pack.pack import HnswParams  # noqa: E402

DIM = 384
CACHE = Path(__file__).resolve().parent / "out" / "hnsw-cache"


def normalise(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def make_random(n: int, q: int, rng) -> tuple[np.ndarray, np.ndarray]:
    return normalise(rng.standard_normal((n, DIM))), normalise(rng.standard_normal((q, DIM)))


def make_clustered(n: int, q: int, rng, clusters: int = 1000, spread: float = 0.75) -> tuple[np.ndarray, np.ndarray]:
    """Noise of norm ~`spread` around unit centres: cos(point, centre) ≈ 0.8, same-cluster pairs ≈ 0.64,
    about what MiniLM gives for passages on one topic."""
    centres = normalise(rng.standard_normal((clusters, DIM)))

    def draw(m):
        ids = rng.integers(0, clusters, m)
        return normalise(centres[ids] + spread * rng.standard_normal((m, DIM)) / np.sqrt(DIM))

    return draw(n), draw(q)


def exact_top(data: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    out = np.empty((len(queries), k), dtype=np.int64)
    for s in range(0, len(queries), 200):
        sims = queries[s : s + 200] @ data.T
        top = np.argpartition(-sims, k, axis=1)[:, :k]
        order = np.argsort(-np.take_along_axis(sims, top, 1), axis=1)
        out[s : s + 200] = np.take_along_axis(top, order, 1)
    return out


def run(name: str, data, queries, truth, M_values, efc: int, efs_values, threads: int) -> list[dict]:
    rows = []
    for M in M_values:
        index = hnswlib.Index(space="ip", dim=DIM)
        # Builds take minutes on 2 cores; cache them (same seed/data -> same index) so reruns only query.
        cached = CACHE / f"{name}-{len(data)}-M{M}-efc{efc}.hnsw"
        t = time.perf_counter()
        if cached.is_file():
            index.load_index(str(cached), max_elements=len(data))
            build = "cached"
        else:
            index.init_index(max_elements=len(data), M=M, ef_construction=efc, random_seed=100)
            index.add_items(data, np.arange(len(data)), num_threads=threads)
            CACHE.mkdir(parents=True, exist_ok=True)
            index.save_index(str(cached))
            build = f"built in {time.perf_counter() - t:.0f} s"
        for ef in efs_values:
            index.set_ef(ef)
            wall, cpu = [], []
            found = np.empty_like(truth)
            for i, qv in enumerate(queries):
                t, c = time.perf_counter(), time.thread_time()
                labels, _ = index.knn_query(qv[None, :], k=10, num_threads=1)
                cpu.append(time.thread_time() - c)
                wall.append(time.perf_counter() - t)
                found[i] = labels[0]
            recall = np.mean([len(set(found[i]) & set(truth[i])) / 10 for i in range(len(truth))])
            w, c = np.array(wall) * 1e3, np.array(cpu) * 1e3
            r = {"data": name, "M": M, "ef_construction": efc, "ef": ef, "recall@10": recall,
                 "p50_ms": float(np.percentile(w, 50)), "p99_ms": float(np.percentile(w, 99)),
                 "cpu_p50_ms": float(np.percentile(c, 50)), "cpu_p99_ms": float(np.percentile(c, 99))}
            rows.append(r)
            # CPU time is what the query costs; wall time also counts waiting for a core on a busy machine.
            print(f"{name:9s} M={M:<3d} efc={efc} ef={ef:<4d} recall@10={recall:.4f} "
                  f"wall p50={r['p50_ms']:.3f} p99={r['p99_ms']:.3f} ms | cpu p50={r['cpu_p50_ms']:.3f} "
                  f"p99={r['cpu_p99_ms']:.3f} ms ({build})", flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--M", type=int, nargs="+", default=[16])
    ap.add_argument("--ef-construction", type=int, default=HnswParams().ef_construction)
    ap.add_argument("--ef", type=int, nargs="+", default=[32, 64, 96, 128, 200])
    ap.add_argument("--threads", type=int, default=2, help="build threads (benchmark only; packs build with 1)")
    ap.add_argument("--data", nargs="+", default=["clustered", "random"])
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    d = HnswParams()
    print(f"pack default: M={d.M} ef_construction={d.ef_construction} ef_search={d.ef_search}; "
          f"N={args.n} dim={DIM} queries={args.queries}")
    for name in args.data:
        maker = make_clustered if name == "clustered" else make_random
        data, queries = maker(args.n, args.queries, rng)
        t = time.perf_counter()
        truth = exact_top(data, queries, 10)
        exact_ms = (time.perf_counter() - t) / len(queries) * 1e3
        print(f"{name:9s} exact numpy (batched 200): {exact_ms:.3f} ms/query amortised")
        run(name, data, queries, truth, args.M, args.ef_construction, args.ef, args.threads)


if __name__ == "__main__":
    main()
