"""How long a built pack takes to open, and how much memory it holds (goal: ≲ 0.3 s for the full ICD-10-CM pack).

Builds (once, cached under benchmarks/out/) a pack the size of the full ICD-10-CM pack — the real ICD-10-CM
passages when simple-icd-10-cm is installed, with random unit vectors standing in for MiniLM (opening cost
does not depend on what the vectors mean) — then, in fresh subprocesses, measures:
  * Pack.open(verify="fast") wall time and the process's RSS growth,
  * Pack.open(verify="full") (sha256 of every file),
  * first-query latencies for a vector (dense), a text (lexical) and an exact-code query.

    python benchmarks/bench_pack_open.py [--n 98466] [--trials 5]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


@dataclass
class _Spec:
    name: str = "random-unit-384"

    def to_dict(self):
        return {"name": self.name, "dim": 384}


class RandomVectors:
    """Stand-in encoder: a fixed random unit vector per text (seeded by its hash)."""

    kind = "text"
    dim = 384
    spec = _Spec()
    sha256 = hashlib.sha256(b"random-unit-384").hexdigest()

    def embed(self, texts, *, is_query=False, batch_size=256):
        out = np.empty((len(texts), self.dim), dtype=np.float32)
        for i, t in enumerate(texts):
            rng = np.random.default_rng(int.from_bytes(hashlib.blake2b(t.encode(), digest_size=8).digest(), "little"))
            v = rng.standard_normal(self.dim)
            out[i] = v / np.linalg.norm(v)
        return out


def documents(n: int):
    from medrwr_edge.kb_pack.documents import Document

    try:
        from medrwr_edge.kb_pack.icd10 import icd10_documents

        docs = list(icd10_documents(limit=n))
        source = "ICD-10-CM passages"
    except Exception as e:  # simple-icd-10-cm missing: synthetic passages of similar length
        print(f"(ICD-10-CM unavailable: {e}; using synthetic passages)")
        docs, source = [], "synthetic"
    rng = np.random.default_rng(0)
    words = [f"term{i}" for i in range(20000)]
    while len(docs) < n:
        i = len(docs)
        docs.append(Document(id=f"X{i:06d}", text=" ".join(rng.choice(words, 60)), title=f"synthetic {i}"))
    return docs[:n], source


def measure(pack_dir: str, verify: str) -> dict:
    """Run in a fresh process: open, then the first queries."""
    from medrwr_edge.kb_pack.pack import Pack

    def rss_mb():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

    def hwm_mb():  # VmHWM resets at exec, unlike ru_maxrss (which a forked child inherits from its parent)
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
        return float("nan")

    def timed(fn):
        """(wall ms, CPU ms): on a busy machine wall time includes waiting for a core; CPU time does not."""
        t, c = time.perf_counter(), time.process_time()
        out = fn()
        return out, (time.perf_counter() - t) * 1e3, (time.process_time() - c) * 1e3

    before = rss_mb()
    pack, open_ms, open_cpu_ms = timed(lambda: Pack.open(pack_dir, encoder=RandomVectors(), verify=verify))
    after = rss_mb()
    q = RandomVectors().embed(["a query"])[0]
    _, dense_ms, dense_cpu = timed(lambda: pack.search(q, k=3))
    _, lex_ms, lex_cpu = timed(lambda: pack.search("fracture of left humerus", k=3, mode="lexical"))
    _, code_ms, code_cpu = timed(lambda: pack.search("what is S42.422G", k=3, mode="lexical"))
    return {"open_s": open_ms / 1e3, "open_cpu_s": open_cpu_ms / 1e3, "rss_before_mb": before,
            "rss_growth_mb": after - before, "peak_rss_mb": hwm_mb(),
            "dense_ms": dense_ms, "lexical_ms": lex_ms, "code_ms": code_ms,
            "dense_cpu_ms": dense_cpu, "lexical_cpu_ms": lex_cpu, "code_cpu_ms": code_cpu}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=98_466)
    ap.add_argument("--trials", type=int, default=5)
    ap.add_argument("--measure", nargs=2, metavar=("PACK", "VERIFY"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.measure:
        print(json.dumps(measure(*args.measure)))
        return

    from medrwr_edge.kb_pack.build import build_text_pack

    pack_dir = ROOT / "benchmarks" / "out" / f"open-bench-{args.n}"
    if not (pack_dir / "manifest.json").is_file():
        docs, source = documents(args.n)
        t = time.perf_counter()
        build_text_pack(docs, pack_dir, RandomVectors(), name="open-bench", version="1", source_description=source,
                        progress=sys.stderr.isatty(), overwrite=True)
        print(f"built {len(docs)} docs ({source}) in {time.perf_counter() - t:.0f} s")
    sizes = {p.name: p.stat().st_size for p in pack_dir.iterdir()}
    print(f"pack {pack_dir}: " + ", ".join(f"{k} {v / 1e6:.1f} MB" for k, v in sorted(sizes.items())))
    for verify in ("fast", "full"):
        runs = []
        for _ in range(args.trials if verify == "fast" else 1):
            out = subprocess.run([sys.executable, __file__, "--measure", str(pack_dir), verify],
                                 capture_output=True, text=True, check=True)
            runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
        opens = sorted(r["open_s"] for r in runs)
        cpus = sorted(r["open_cpu_s"] for r in runs)
        r = runs[-1]
        print(f"open verify={verify}: wall median {opens[len(opens) // 2]:.3f} s (min {opens[0]:.3f}, max {opens[-1]:.3f}), "
              f"CPU median {cpus[len(cpus) // 2]:.3f} s; RSS +{r['rss_growth_mb']:.0f} MB (process peak "
              f"{r['peak_rss_mb']:.0f} MB); first queries wall/CPU ms: dense {r['dense_ms']:.1f}/{r['dense_cpu_ms']:.1f}, "
              f"lexical {r['lexical_ms']:.1f}/{r['lexical_cpu_ms']:.1f}, exact-code {r['code_ms']:.1f}/{r['code_cpu_ms']:.1f}")


if __name__ == "__main__":
    main()
