"""The resumable evaluation runner and its summary statistics.

One `Session` (model and packs loaded once) answers every item in every mode; a mode is only a set of
per-question overrides:

    plain           retrieval off (a query is answered "<retrieve> None </retrieve>", as in the paper's
                    no-retrieval ablation), CDIR off
    rag             the baseline a user would script instead: one search on the question, the top entries in the
                    user turn, one answering pass, the letter read as in guided decoding; CDIR off
    retrieval       retrieval on, CDIR off
    retrieval+cdir  retrieval on, CDIR on (threshold from the session's settings, paper: 0.8)

Files in the output folder:

    run.json        what the run is: dataset hash, model sha256, packs, settings (a resume must match it)
    records.jsonl   one line per (item, mode): the score and the full evidence record. Each line is written
                    with one write() then flush + fsync, so an interruption leaves at most one torn last line;
                    a resume ignores it, truncates it away, and redoes that item.
    summary.json    the statistics below, rewritten (atomically) at the end of every run

Accuracy comes with a Wilson score 95% interval. Between modes, paired counts on the same items
(right->wrong, wrong->right) and an exact two-sided McNemar p-value say whether a difference is more than noise.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

from ..errors import InputError, MedrwrError
from ..paths import atomic_write_text
from ..runtime.protocol import answer_letter
from .datasets import EvalItem, item_set_sha256
from .scoring import LlmJudge, option_from_text, score_open

MODES: dict[str, dict] = {
    "plain": {"retrieval": False, "cdir": False},
    "rag": {"retrieval": True, "cdir": False, "protocol": "rag"},
    "retrieval": {"retrieval": True, "cdir": False},
    "retrieval+cdir": {"retrieval": True, "cdir": True},
}
DEFAULT_MODES = ("plain", "retrieval", "retrieval+cdir")  # the API default; `medrwr-edge eval` adds rag
RUN_SCHEMA = "medrwr-edge/eval-run/1"
RECORD_SCHEMA = "medrwr-edge/eval-record/1"
SUMMARY_SCHEMA = "medrwr-edge/eval-summary/1"
Z95 = 1.959963984540054


def parse_modes(text: str | Sequence[str]) -> list[str]:
    names = [m.strip() for m in (text.split(",") if isinstance(text, str) else text) if m.strip()]
    if not names:
        raise InputError("--modes is empty; choose from: " + ", ".join(MODES))
    for name in names:
        if name not in MODES:
            raise InputError(f"unknown mode {name!r}; choose from: {', '.join(MODES)}")
    if len(set(names)) != len(names):
        raise InputError("--modes lists a mode twice")
    return names


# ------------------------------------------------------------------ the JSONL journal


def read_records(path: Path, repair: bool = True) -> list[dict]:
    """Complete records of a journal. A torn last line (no newline, or not JSON) is dropped and, with `repair`,
    cut from the file so the next append starts on a clean line. A broken line before the end is corruption."""
    if not path.exists():
        return []
    data = path.read_bytes()
    records, good_end = [], 0
    lines = data.split(b"\n")
    for i, line in enumerate(lines):
        last = i == len(lines) - 1
        if last and line == b"":
            break
        try:
            if last:
                raise ValueError("no newline")
            records.append(json.loads(line))
            good_end += len(line) + 1
        except ValueError:
            if i >= len(lines) - 2 and (last or lines[-1] == b""):
                break  # the torn tail of an interrupted write
            raise MedrwrError(f"{path} line {i + 1} is not a complete record; the file is damaged "
                              "(move it away to start over)") from None
    if repair and good_end < len(data):
        with open(path, "r+b") as f:
            f.truncate(good_end)
            f.flush()
            os.fsync(f.fileno())
    return records


def append_record(path: Path, record: dict) -> None:
    line = (json.dumps(record, ensure_ascii=False, separators=(",", ":")) + "\n").encode("utf-8")
    with open(path, "ab") as f:
        f.write(line)
        f.flush()
        os.fsync(f.fileno())


# ------------------------------------------------------------------ one answer -> one scored record


def score_record(item: EvalItem, mode: str, evidence, judge: Optional[LlmJudge] = None) -> dict:
    """The journal line for one item answered in one mode (evidence: an EvidenceRecord)."""
    record = {
        "schema": RECORD_SCHEMA,
        "item_id": item.id,
        "item_sha256": item.content_sha256(),
        "mode": mode,
        "kind": item.kind,
        "gold_letter": item.answer,
        "gold": item.gold,
        "options": item.options,
        "error": None,
        "evidence": evidence.to_dict(),
    }
    rescore(record)
    if judge is not None and item.kind == "open" and not record["correct"] and record["candidates"]:
        record["judge_top1"] = judge.same(record["candidates"][0], item.gold)
    return record


def rescore(record: dict) -> dict:
    """(Re)compute a record's scores from its stored evidence, so a journal written by an older version is
    scored by today's rules (judge verdicts, which need a model, are kept as they are)."""
    if record.get("status") == "error" and record.get("evidence") is None:
        return record
    ev = record["evidence"]
    steps = ev.get("steps", [])
    options = record.get("options") or [f"{o['letter']}. {o['text']}" for o in ev.get("options", [])]
    record.update(
        answer=ev.get("answer"),
        status=ev.get("status"),
        confidence=ev.get("confidence"),
        queries=sum(1 for st in steps if st.get("type") == "query"),
        queries_by_runtime=sum(1 for st in steps if st.get("type") == "query" and st.get("issued_by") == "runtime"),
        retrievals_with_docs=sum(1 for st in steps if st.get("type") == "retrieve" and st.get("docs")),
        tokens_generated=ev.get("tokens", {}).get("generated", 0),
        tokens_decoded=ev.get("tokens", {}).get("decoded", 0),
        seconds=ev.get("timings", {}).get("total", 0.0),
        cdir=None,
    )
    if record["kind"] == "mcq":
        # "letter": a leading option letter (the paper's rule: `correct`, the headline); "option-text": the answer
        # gave an option's text, read as its letter by the runtime or, for older records, here (`correct_lenient`).
        letter = ev.get("letter") or (option_from_text(ev["answer"], options) if ev.get("answer") else None)
        strict = answer_letter(ev.get("answer"), [o[0] for o in options])
        source = "letter" if strict else ("option-text" if letter else None)
        record.update(predicted_letter=letter, letter_source=source,
                      correct=strict is not None and strict == record["gold_letter"],
                      correct_lenient=letter is not None and letter == record["gold_letter"])
    else:
        s = score_open(ev.get("answer"), record["gold"])
        record.update(predicted_letter=None, correct=s.top1, top5=s.top5, candidates=s.candidates,
                      matched_rank=s.matched_rank)
    cdir = next((st for st in steps if st.get("type") == "cdir"), None)
    if cdir is not None:
        before = _letter(cdir.get("answer_before"), options)
        record["cdir"] = {
            "confidence_before": cdir.get("confidence_before"),
            "letter_before": before,
            "letter_after": _letter(cdir.get("answer_after"), options),
            "changed": cdir.get("changed", False),
            "correct_before": (before is not None and before == record["gold_letter"]) if options else None,
            "correct_after": record["correct"],
            "reference_doc_id": cdir.get("reference_doc_id"),
        }
    return record


def _letter(answer: Optional[str], options: Sequence[str]) -> Optional[str]:
    if not options or answer is None:
        return None
    return answer_letter(answer, [o[0] for o in options]) or option_from_text(answer, options)


def error_record(item: EvalItem, mode: str, message: str) -> dict:
    return {"schema": RECORD_SCHEMA, "item_id": item.id, "item_sha256": item.content_sha256(), "mode": mode,
            "kind": item.kind, "gold_letter": item.answer, "gold": item.gold, "options": item.options,
            "evidence": None, "answer": None,
            "predicted_letter": None, "status": "error", "error": message, "confidence": None, "queries": 0,
            "retrievals_with_docs": 0, "tokens_generated": 0, "tokens_decoded": 0, "seconds": 0.0, "cdir": None,
            "correct": False, "correct_lenient": False}


# ------------------------------------------------------------------ statistics


def wilson_interval(k: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval for k successes in n trials (sound at 0 and n, unlike the normal approximation)."""
    if n == 0:
        return (0.0, 1.0)
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def mcnemar_exact_p(b: int, c: int) -> float:
    """Two-sided exact McNemar test on the discordant pairs (b right->wrong, c wrong->right)."""
    n = b + c
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(0, min(b, c) + 1)) / 2**n
    return min(1.0, 2 * tail)


def _mean(values: list[float]) -> Optional[float]:
    return round(sum(values) / len(values), 4) if values else None


def summarize(records: Sequence[dict], modes: Sequence[str]) -> dict:
    """Per-mode statistics and paired comparisons between modes, from journal records."""
    by_mode: dict[str, dict[str, dict]] = {m: {} for m in modes}
    for r in records:
        if r["mode"] in by_mode:
            by_mode[r["mode"]][r["item_id"]] = r
    per_mode = {}
    for mode in modes:
        rs = list(by_mode[mode].values())
        mcq = [r for r in rs if r["kind"] == "mcq"]
        open_ = [r for r in rs if r["kind"] == "open"]
        k = sum(1 for r in mcq if r["correct"])
        lenient = sum(1 for r in mcq if r.get("correct_lenient", r["correct"]))
        cdirs = [r["cdir"] for r in rs if r.get("cdir")]
        s = {
            "n": len(rs),
            "mcq_items": len(mcq),
            "correct": k,
            "accuracy": round(k / len(mcq), 4) if mcq else None,
            "accuracy_ci95": [round(x, 4) for x in wilson_interval(k, len(mcq))] if mcq else None,
            # an option's text read as its letter counts too (not the paper's rule; reported beside it)
            "accuracy_lenient": round(lenient / len(mcq), 4) if mcq else None,
            "answered": sum(1 for r in rs if r["status"] == "answered"),
            "no_answer": sum(1 for r in rs if r["status"] == "no-answer"),
            "errors": sum(1 for r in rs if r["status"] == "error"),
            # answers that gave an option's text, not its letter (0 under the paper's strict first-token rule)
            "letters_from_option_text": sum(1 for r in mcq if r.get("letter_source") == "option-text"),
            "correct_by_option_text": sum(1 for r in mcq if r.get("letter_source") == "option-text"
                                          and r.get("correct_lenient", r["correct"])),
            "retrieval_rate": round(sum(1 for r in rs if r["retrievals_with_docs"]) / len(rs), 4) if rs else None,
            "queries_per_question": _mean([r["queries"] for r in rs]),
            "queries_by_runtime": sum(r.get("queries_by_runtime", 0) for r in rs),
            "queries_by_model": sum(r["queries"] - r.get("queries_by_runtime", 0) for r in rs),
            "cdir_triggered": len(cdirs),
            "cdir_trigger_rate": round(len(cdirs) / len(rs), 4) if rs else None,
            "cdir_changed": sum(1 for c in cdirs if c["changed"]),
            "cdir_right_to_wrong": sum(1 for c in cdirs if c["correct_before"] and not c["correct_after"]),
            "cdir_wrong_to_right": sum(1 for c in cdirs if c["correct_before"] is False and c["correct_after"]),
            "tokens_generated_per_question": _mean([r["tokens_generated"] for r in rs if r["status"] != "error"]),
            "tokens_decoded_per_question": _mean([r["tokens_decoded"] for r in rs if r["status"] != "error"]),
            "seconds_per_question": _mean([r["seconds"] for r in rs if r["status"] != "error"]),
        }
        if open_:
            top1 = sum(1 for r in open_ if r["correct"])
            top5 = sum(1 for r in open_ if r.get("top5"))
            s.update(
                open_items=len(open_),
                open_top1=top1,
                open_top1_accuracy=round(top1 / len(open_), 4),
                open_top1_ci95=[round(x, 4) for x in wilson_interval(top1, len(open_))],
                open_top5=top5,
                open_top5_accuracy=round(top5 / len(open_), 4),
                open_top5_ci95=[round(x, 4) for x in wilson_interval(top5, len(open_))],
            )
            judged = [r for r in open_ if "judge_top1" in r]
            if judged:
                jk = top1 + sum(1 for r in judged if r["judge_top1"])
                s.update(open_top1_with_judge=jk, open_top1_with_judge_accuracy=round(jk / len(open_), 4))
        per_mode[mode] = s
    paired = []
    for i, a in enumerate(modes):
        for b in modes[i + 1 :]:
            shared = sorted(set(by_mode[a]) & set(by_mode[b]))
            pairs = [(by_mode[a][x]["correct"], by_mode[b][x]["correct"]) for x in shared]
            r2w = sum(1 for x, y in pairs if x and not y)
            w2r = sum(1 for x, y in pairs if not x and y)
            paired.append({
                "from": a, "to": b, "items": len(pairs),
                "both_right": sum(1 for x, y in pairs if x and y),
                "both_wrong": sum(1 for x, y in pairs if not x and not y),
                "right_to_wrong": r2w, "wrong_to_right": w2r,
                "mcnemar_p": round(mcnemar_exact_p(r2w, w2r), 4),
            })
    return {"schema": SUMMARY_SCHEMA, "modes": per_mode, "paired": paired}


# ------------------------------------------------------------------ the run


def run_header(session, dataset: dict, items: Sequence[EvalItem], modes: Sequence[str]) -> dict:
    from ..runtime.backends import model_record

    model = model_record(session.backend)
    settings = dict(vars(session.settings))
    for per_mode in ("retrieval", "cdir"):
        settings.pop(per_mode, None)  # set per mode, not per run
    return {
        "schema": RUN_SCHEMA,
        "dataset": dataset,
        "items": len(items),
        "item_set_sha256": item_set_sha256(items),
        "modes": list(modes),
        "model": {k: model[k] for k in ("name", "sha256", "backend", "has_vision", "device")},
        "packs": [{k: p.get(k) for k in ("name", "version", "kind", "manifest_sha256")} for p in session.pack_records],
        "settings": settings,
    }


def uses_packs(modes: Sequence[str]) -> bool:
    """Plain mode never searches a pack (queries get "None", no CDIR), so its answers do not depend on them."""
    return any(MODES[m]["retrieval"] or MODES[m]["cdir"] for m in modes if m in MODES)


def _with_defaults(settings: dict) -> dict:
    """A setting added to AskSettings after a run started reads as its default, so that run can still resume."""
    from ..runtime.api import AskSettings

    defaults = {k: v for k, v in vars(AskSettings()).items() if k not in ("retrieval", "cdir")}
    return {**defaults, **settings}


def check_compatible(old: dict, new: dict, where) -> None:
    """Raise unless two run headers answered the same dataset with the same model and settings (and, when both
    used packs, the same packs): only then may their records be mixed."""
    checks = [("dataset", "dataset"), ("model", "model"), ("settings", "settings")]
    if uses_packs(old.get("modes", [])) and uses_packs(new.get("modes", [])):
        checks.append(("packs", "set of packs"))
    for key, what in checks:
        a, b = old.get(key), new.get(key)
        if key == "dataset":
            a, b = (a or {}).get("sha256"), (b or {}).get("sha256")
        if key == "settings":
            a, b = _with_defaults(a or {}), _with_defaults(b or {})
        if a != b:
            raise InputError(f"{where} holds a run with a different {what}; give a new --out folder or "
                             "--restart to discard it")


def run_eval(
    items: Sequence[EvalItem],
    session,
    out_dir: str | os.PathLike,
    modes: Sequence[str] = DEFAULT_MODES,
    *,
    dataset: Optional[dict] = None,
    judge: Optional[LlmJudge] = None,
    restart: bool = False,
    progress: bool = False,
    on_record: Optional[Callable[[dict], None]] = None,
) -> dict:
    """Answer every item in every mode (skipping what `out_dir` already holds), then write and return the summary.

    `dataset`: {"name", "sha256", "layout"} recorded in run.json (default: the hash of the items).
    Interrupting (Ctrl-C) loses at most the item in flight; calling again with the same arguments resumes."""
    modes = parse_modes(modes)
    if not items:
        raise InputError("no items to evaluate")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    run_file, journal, summary_file = out / "run.json", out / "records.jsonl", out / "summary.json"
    header = run_header(session, dataset or {"name": "items", "sha256": item_set_sha256(items)}, items, modes)
    if restart:
        for f in (run_file, journal, summary_file):
            f.unlink(missing_ok=True)
    if run_file.exists():
        try:
            old = json.loads(run_file.read_text("utf-8"))
        except ValueError:
            raise MedrwrError(f"{run_file} is damaged; give --restart to start over") from None
        check_compatible(old, header, out)
        held = set(old.get("modes", [])) | set(modes)
        header["modes"] = [m for m in MODES if m in held]  # canonical order: plain, rag, retrieval, retrieval+cdir
        if not uses_packs(modes):
            header["packs"] = old.get("packs", [])  # a plain-only resume keeps the packs of the earlier run
    atomic_write_text(run_file, json.dumps(header, indent=2, ensure_ascii=False) + "\n")

    existing = [rescore(r) for r in read_records(journal)]
    wanted = {i.id: i.content_sha256() for i in items}
    done = set()
    for r in existing:
        if r["item_id"] in wanted and r.get("item_sha256") != wanted[r["item_id"]]:
            raise InputError(f"{journal}: item {r['item_id']} has changed since it was answered; give a new --out "
                             "folder or --restart")
        done.add((r["item_id"], r["mode"]))
    todo = [(item, mode) for item in items for mode in modes if (item.id, mode) not in done]

    bar = _Progress(len(items) * len(modes), len(items) * len(modes) - len(todo)) if progress else None
    try:
        for item, mode in todo:
            if bar:
                bar.describe(f"{mode} · {item.id}")
            try:
                evidence = session.ask(item.images or None, item.question, item.options or None, **MODES[mode])
                record = score_record(item, mode, evidence, judge)
            except MedrwrError as e:  # one bad item (e.g. too long for the context) does not stop the run
                record = error_record(item, mode, str(e))
            append_record(journal, record)
            existing.append(record)
            if on_record:
                on_record(record)
            if bar:
                bar.advance()
    finally:
        if bar:
            bar.stop()

    current = [r for r in existing if r["item_id"] in wanted]
    summary = summarize(current, header["modes"])  # every mode this folder holds, not only today's
    summary["run"] = {k: header[k] for k in ("dataset", "items", "model", "settings")}
    summary["created"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    atomic_write_text(summary_file, json.dumps(summary, indent=2, ensure_ascii=False) + "\n")
    return summary


class _Progress:
    """A rich progress bar with ETA (on stderr, so --json output on stdout stays clean)."""

    def __init__(self, total: int, completed: int):
        from rich.console import Console
        from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                                   TimeRemainingColumn)

        self.progress = Progress(
            TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
            TextColumn("ETA"), TimeRemainingColumn(), console=Console(stderr=True), transient=False,
        )
        self.progress.start()
        self.task = self.progress.add_task("eval", total=total, completed=completed)

    def describe(self, text: str) -> None:
        self.progress.update(self.task, description=text[:40].ljust(40))

    def advance(self) -> None:
        self.progress.advance(self.task)

    def stop(self) -> None:
        self.progress.stop()
