"""Which hybrid fusion to ship (issue 13): hit@3 on ICD-10-CM questions for dense, BM25 and fusion variants.

Builds (cached under benchmarks/out/) a pack of ICD-10-CM chapter-19 injury codes without 7th-character
extensions — thousands of near-identical passages (left/right, displaced/nondisplaced), the hard case for dense
search — with the real MiniLM encoder, then asks three kinds of question per sampled code:
  code:   "What does ICD-10-CM code S42.422 mean?"           (identifier in the query)
  desc:   "Which ICD-10-CM code is <description>?"            (full description, no identifier)
  noisy:  the description with a third of its words dropped and the rest shuffled
Every variant runs on the same candidate lists (50 dense + 50 BM25), side by side in one run.

    python benchmarks/bench_fusion.py [--limit 3000] [--questions 300]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from medrwr_edge.kb_pack import lexical  # noqa: E402
from medrwr_edge.kb_pack.lexical import FusionParams  # noqa: E402

VARIANTS = {
    "hybrid rrf k=60 1:1": FusionParams("rrf", 60, 1.0, 1.0),
    "hybrid rrf k=60 1:2 (lex x2)": FusionParams("rrf", 60, 1.0, 2.0),
    "hybrid rrf k=10 1:1": FusionParams("rrf", 10, 1.0, 1.0),
    "hybrid linear 1:1": FusionParams("linear", 60, 1.0, 1.0),
    "hybrid linear 1:2 (lex x2)": FusionParams("linear", 60, 1.0, 2.0),
    "hybrid linear 1:3 (lex x3)": FusionParams("linear", 60, 1.0, 3.0),
    "hybrid linear 1:4 (lex x4)": FusionParams("linear", 60, 1.0, 4.0),
    "hybrid rrf k=60 1:4 (lex x4)": FusionParams("rrf", 60, 1.0, 4.0),
}


def questions(docs, n: int, rng):
    picks = rng.choice(len(docs), size=min(n, len(docs)), replace=False)
    out = []
    for i in picks:
        d = docs[i]
        desc = d.title.rstrip(".")
        words = desc.split()
        keep = [w for w in words if rng.random() > 1 / 3] or words[:1]
        rng.shuffle(keep)
        out += [("code", f"What does ICD-10-CM code {d.id} mean?", d.id),
                ("desc", f"Which ICD-10-CM code is {desc.lower()}?", d.id),
                ("noisy", " ".join(keep).lower(), d.id)]
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--limit", type=int, default=3000)
    ap.add_argument("--questions", type=int, default=300)
    args = ap.parse_args()

    from medrwr_edge.assets import default_text_encoder_dir
    from medrwr_edge.kb_pack.build import build_text_pack
    from medrwr_edge.kb_pack.encoders import load_encoder
    from medrwr_edge.kb_pack.icd10 import icd10_documents
    from medrwr_edge.kb_pack.pack import Pack

    encoder = load_encoder(default_text_encoder_dir(), prefer_gpu=False)
    docs = [d for d in icd10_documents(chapters=[19], include_extensions=False, limit=args.limit)
            if d.metadata.get("kind") not in ("chapter", "block")]
    pack_dir = ROOT / "benchmarks" / "out" / f"fusion-icd19-{args.limit}"
    if not (pack_dir / "manifest.json").is_file():
        t = time.perf_counter()
        build_text_pack(docs, pack_dir, encoder, name="icd19", version="bench", progress=sys.stderr.isatty(),
                        overwrite=True)
        print(f"built {len(docs)} docs in {time.perf_counter() - t:.0f} s")
    pack = Pack.open(pack_dir, encoder=encoder)
    rng = np.random.default_rng(13)
    qs = questions(docs, args.questions, rng)
    vecs = encoder.embed([q for _, q, _ in qs], is_query=True)
    row_of = {doc_id: i for i, doc_id in enumerate(pack.document_hashes())}

    results: dict[str, dict[str, list[bool]]] = {}

    def record(name, kind, ranked, target):
        results.setdefault(name, {}).setdefault(kind, []).append(row_of[target] in [r for r, _ in ranked[:3]])

    t_fuse = 0.0
    for (kind, text, target), vec in zip(qs, vecs):
        dense = pack._dense(vec, 50)
        lex = lexical.lexical_search(pack._conn, text, 50)
        exact = lexical.exact_matches(pack._conn, text)
        record("dense", kind, dense, target)
        record("lexical (BM25)", kind, lex, target)
        record("lexical + exact-id boost", kind, [(r, 0) for r in exact] + [x for x in lex if x[0] not in exact], target)
        for name, params in VARIANTS.items():
            t = time.perf_counter()
            record(name, kind, lexical.fuse(dense, lex, params, exact=exact), target)
            t_fuse += time.perf_counter() - t
            record(name + " no boost", kind, lexical.fuse(dense, lex, params), target)
    kinds = ["code", "desc", "noisy"]
    print(f"{len(docs)} chapter-19 documents, {args.questions} codes x 3 question kinds; hit@3 (target in top 3)")
    print(f"{'variant':40s}" + "".join(f"{k:>8s}" for k in kinds) + f"{'all':>8s}")
    for name, per in results.items():
        allv = [x for k in kinds for x in per[k]]
        print(f"{name:40s}" + "".join(f"{np.mean(per[k]):8.3f}" for k in kinds) + f"{np.mean(allv):8.3f}")
    print(f"fusion cost: {t_fuse / (len(qs) * len(VARIANTS)) * 1e3:.3f} ms per query")


if __name__ == "__main__":
    main()
