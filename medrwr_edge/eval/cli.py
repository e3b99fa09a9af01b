"""`medrwr-edge eval`: run a dataset through the runtime in several modes; `eval-summary`, `eval-export`."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import List, Optional

import typer

from ..errors import InputError
from ..runtime import cli_options as O

BUILTIN = {
    "builtin:icd10": "the ICD-10-CM multiple-choice benchmark (300 items, committed manifest)",
    "builtin:images": "the image MCQ set (modality / body region) from the reference image sources",
}

EVAL_HELP = """Evaluate the runtime on a dataset, in each mode (plain, rag, retrieval, retrieval+cdir).

DATASET is a JSONL/JSON file (layouts: mcq, medxpertqa, mmmu, ecbench, diagnosisarena; detected from the first
record) or a built-in set: builtin:icd10, builtin:images. Per-item records go to OUT/records.jsonl, the summary
to OUT/summary.json. An interrupted run continues where it stopped when given the same command again."""

WORKERS_REFUSAL = (
    "--workers {n} is refused: one llama.cpp model already uses every CPU core, so {n} worker processes would "
    "each load their own copy of the model ({n}x the memory) and share the same cores, for no speed-up. Run one "
    "process; to spread a large run over several machines give each one --shard K/N and its own --out, then "
    "merge them with `medrwr-edge eval-summary OUT1 OUT2 ...`"
)


def register(app: typer.Typer) -> None:
    app.command("eval", help=EVAL_HELP, no_args_is_help=True)(eval_command)
    app.command("eval-summary", help="Merge and summarise the records of one or more eval output folders.",
                no_args_is_help=True)(summary_command)
    app.command("eval-export", help="Write a built-in evaluation set as JSONL (our mcq layout).",
                no_args_is_help=True)(export_command)


def load_items(dataset: str, layout: str = "auto", on_error: str = "skip", limit: Optional[int] = None,
               image_root: Optional[str] = None, diagnosis_as_mcq: bool = False):
    """(items, dataset description, problems) for a file or a built-in name."""
    if dataset == "builtin:icd10":
        from .icd10_mcq import builtin_items, committed_manifest

        items = builtin_items(limit)
        return items, {"name": dataset, "sha256": committed_manifest()["set_sha256"], "layout": "mcq"}, []
    if dataset == "builtin:images":
        from ..paths import data_dir
        from .image_mcq import image_mcq_items
        from .datasets import item_set_sha256

        items = image_mcq_items(data_dir() / "eval" / "image-mcq")
        items = items[:limit] if limit else items
        return items, {"name": dataset, "sha256": item_set_sha256(items), "layout": "mcq"}, []
    if dataset.startswith("builtin:"):
        raise InputError(f"unknown built-in set {dataset!r}; choose one of: {', '.join(BUILTIN)}")
    from .datasets import load_dataset

    loaded = load_dataset(dataset, layout, on_error, limit, image_root, diagnosis_as_mcq)
    desc = {"name": str(Path(dataset).name), "sha256": loaded.sha256, "layout": loaded.layout}
    return loaded.items, desc, loaded.problems


def parse_shard(shard: Optional[str]) -> Optional[tuple[int, int]]:
    if shard is None:
        return None
    try:
        k, n = (int(x) for x in shard.split("/"))
    except ValueError:
        raise InputError(f"--shard must look like K/N, e.g. 1/4 (got {shard!r})") from None
    if not (n >= 1 and 1 <= k <= n):
        raise InputError(f"--shard {shard}: K must be between 1 and N")
    return k, n


def eval_command(
    dataset: str = typer.Argument(..., help="JSONL/JSON dataset file, or builtin:icd10 / builtin:images"),
    model: Optional[str] = O.MODEL,
    pack: Optional[List[str]] = O.PACKS,
    image_pack: Optional[str] = typer.Option(None, "--image-pack", help="CDIR reference image pack"),
    modes: str = typer.Option("plain,rag,retrieval,retrieval+cdir", "--modes", help="comma-separated modes"),
    protocol: Optional[str] = typer.Option(None, "--protocol", show_default="auto", help="auto, native or guided "
                                           "(auto: native for Med-RwR models, guided for models never trained on "
                                           "the protocol); rag mode is its own"),
    think_tokens: Optional[int] = O.THINK_TOKENS,
    read_tokens: Optional[int] = O.READ_TOKENS,
    top_k_docs: Optional[int] = O.TOP_K_DOCS,
    no_exemplar: bool = O.NO_EXEMPLAR,
    doc_words: Optional[int] = O.DOC_WORDS,
    excerpt: Optional[str] = O.EXCERPT,
    limit: Optional[int] = typer.Option(None, "--limit", help="only the first N valid items"),
    workers: int = typer.Option(1, "--workers", help="worker processes (only 1 is useful on one CPU model)"),
    shard: Optional[str] = typer.Option(None, "--shard", help="K/N: evaluate every N-th item starting at K"),
    out: Optional[Path] = typer.Option(None, "--out", "-O", help="output folder (default: eval-<dataset>-<model>)"),
    layout: str = typer.Option("auto", "--layout", help="auto, mcq, medxpertqa, mmmu, ecbench, diagnosisarena"),
    on_error: str = typer.Option("skip", "--on-error", help="bad dataset lines: skip (reported) or fail"),
    image_root: Optional[str] = typer.Option(None, "--image-root", help="folder relative image paths are in"),
    diagnosis_as_mcq: bool = typer.Option(False, "--diagnosis-as-mcq", help="DiagnosisArena: use its 4 options"),
    judge_model: Optional[str] = typer.Option(None, "--judge-model", help="GGUF used as LLM judge (open-ended)"),
    threshold: Optional[float] = O.THRESHOLD,
    max_tokens: Optional[int] = O.MAX_TOKENS,
    n_ctx: Optional[int] = O.CTX,
    seed: Optional[int] = O.SEED,
    gpu_layers: Optional[int] = O.GPU_LAYERS,
    threads: Optional[int] = O.THREADS,
    restart: bool = typer.Option(False, "--restart", help="discard what OUT already holds"),
    no_progress: bool = typer.Option(False, "--no-progress", help="no progress bar"),
    as_json: bool = typer.Option(False, "--json", help="print the summary as JSON"),
    engine: Optional[str] = O.ENGINE,
    engine_timeout: Optional[float] = O.ENGINE_TIMEOUT,
) -> None:
    from ..runtime.api import AskSettings, Session
    from .runner import MODES, parse_modes, run_eval

    if workers < 1:
        raise InputError("--workers must be at least 1")
    if workers > 1:
        raise InputError(WORKERS_REFUSAL.format(n=workers))
    mode_list = parse_modes(modes)
    shard_kn = parse_shard(shard)
    items, desc, problems = load_items(dataset, layout, on_error, limit, image_root, diagnosis_as_mcq)
    for p in problems[:20]:
        print(f"warning: skipped {p}", file=sys.stderr)
    if len(problems) > 20:
        print(f"warning: ... and {len(problems) - 20} more bad lines", file=sys.stderr)
    if shard_kn:
        k, n = shard_kn
        total = len(items)
        items = items[k - 1 :: n]
        desc = {**desc, "shard": f"{k}/{n}"}
        if not items:
            raise InputError(f"shard {k}/{n} of {total} items is empty")
    needs_cdir = any(MODES[m]["cdir"] for m in mode_list)
    needs_retrieval = any(MODES[m]["retrieval"] for m in mode_list)
    settings = AskSettings.from_options(
        seed=seed, max_tokens=max_tokens, n_ctx=n_ctx, gpu_layers=gpu_layers, cdir_threshold=threshold,
        retrieval=needs_retrieval, cdir=needs_cdir, n_threads=threads, protocol=protocol,
        guided_exemplar=O.switched(no_exemplar, "guided_exemplar"), engine=engine, engine_timeout=engine_timeout,
        guided_think_tokens=think_tokens, guided_read_tokens=read_tokens, top_k_docs=top_k_docs,
        guided_doc_words=doc_words, guided_excerpt=excerpt,
    )
    if out is None:
        stem = Path(dataset).stem if not dataset.startswith("builtin:") else dataset.split(":", 1)[1]
        out = Path(f"eval-{stem}-{Path(model).stem if model else 'default'}")
    with Session(packs=pack or None, image_pack=image_pack, model=model, settings=settings) as session:
        judge = _judge(judge_model, settings) if judge_model else None
        try:
            try:
                summary = run_eval(items, session, out, mode_list, dataset=desc, judge=judge, restart=restart,
                                   progress=not no_progress and sys.stderr.isatty())
            except KeyboardInterrupt:
                print(f"interrupted: the answers so far are in {out}/records.jsonl; run the same command again "
                      "to continue", file=sys.stderr)
                raise
        finally:
            if judge is not None:
                judge.backend.close()
    if as_json:
        sys.stdout.write(json.dumps(summary, indent=2, ensure_ascii=False) + "\n")
    else:
        print_summary(summary, out)


def _judge(path: str, settings):
    from ..runtime.api import AskSettings
    from ..runtime.backends import load_backend
    from .scoring import LlmJudge

    return LlmJudge(load_backend(path, AskSettings(n_ctx=2048, gpu_layers=settings.gpu_layers)))


def summary_command(
    folders: List[Path] = typer.Argument(..., help="eval output folders (e.g. one per --shard)"),
    as_json: bool = typer.Option(False, "--json", help="print the summary as JSON"),
) -> None:
    from .runner import read_records, rescore, summarize

    records, headers = [], []
    for folder in folders:
        run_file = folder / "run.json"
        if not run_file.is_file():
            raise InputError(f"{folder} is not an eval output folder (no run.json)")
        headers.append(json.loads(run_file.read_text("utf-8")))
        records += [rescore(r) for r in read_records(folder / "records.jsonl", repair=False)]
    from .runner import check_compatible

    first = headers[0]
    for h, folder in zip(headers[1:], folders[1:]):
        check_compatible(first, h, folder)
    modes = list(dict.fromkeys(m for h in headers for m in h["modes"]))
    summary = summarize(records, modes)
    summary["run"] = {k: first[k] for k in ("dataset", "model", "settings")}
    if as_json:
        sys.stdout.write(json.dumps(summary, indent=2, ensure_ascii=False) + "\n")
    else:
        print_summary(summary, None)


def export_command(
    name: str = typer.Argument(..., help="builtin:icd10 or builtin:images"),
    out: Path = typer.Argument(..., help="JSONL file to write"),
) -> None:
    from .datasets import write_items_jsonl

    if not name.startswith("builtin:"):
        raise InputError(f"eval-export writes a built-in set; choose one of: {', '.join(BUILTIN)}")
    items, _, _ = load_items(name)
    write_items_jsonl(items, out)
    print(f"wrote {len(items)} items to {out}")


def _pct(x: Optional[float]) -> str:
    return "–" if x is None else f"{100 * x:.1f}%"


def print_summary(summary: dict, out: Optional[os.PathLike]) -> None:
    from rich.console import Console
    from rich.table import Table

    # Piped output (CI logs, files) gets a wide table instead of rich's 80-column default.
    console = Console(highlight=False, width=None if sys.stdout.isatty() else 160)
    table = Table(title="medrwr-edge eval", title_justify="left")
    for col in ("mode", "n", "strict accuracy (95% CI)", "lenient", "answered", "retrieval rate", "queries/q",
                "runtime queries", "CDIR rate", "CDIR r→w / w→r", "tokens/q", "s/q"):
        table.add_column(col, justify="left" if col == "mode" else "right")
    for mode, s in summary["modes"].items():
        acc = "–" if s["accuracy"] is None else f"{_pct(s['accuracy'])} ({_pct(s['accuracy_ci95'][0])}–" \
                                                  f"{_pct(s['accuracy_ci95'][1])})"
        if s.get("open_items"):
            acc += f" · open top-1 {_pct(s['open_top1_accuracy'])}, top-5 {_pct(s['open_top5_accuracy'])}"
        table.add_row(
            mode, str(s["n"]), acc, _pct(s.get("accuracy_lenient")), f"{s['answered']}/{s['n']}",
            _pct(s["retrieval_rate"]), f"{s['queries_per_question'] or 0:.2f}", str(s.get("queries_by_runtime", 0)),
            _pct(s["cdir_trigger_rate"]),
            f"{s['cdir_right_to_wrong']} / {s['cdir_wrong_to_right']}",
            f"{s['tokens_generated_per_question'] or 0:.0f}", f"{s['seconds_per_question'] or 0:.2f}",
        )
    console.print(table)
    for p in summary["paired"]:
        console.print(f"{p['from']} → {p['to']} on {p['items']} items: {p['wrong_to_right']} wrong→right, "
                      f"{p['right_to_wrong']} right→wrong (exact McNemar p = {p['mcnemar_p']:.3f})")
    if out is not None:
        console.print(f"records: {out}/records.jsonl · summary: {out}/summary.json", style="dim")
