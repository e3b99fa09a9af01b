"""Run every `benchmarks/bench_*.py`, then write `benchmarks/out/report.md` with tables and matplotlib plots.

    python benchmarks/run_all.py                       # all benchmarks
    python benchmarks/run_all.py --only decode,kv      # names containing these words
    python benchmarks/run_all.py --eval eval-icd10-smollm --eval eval-icd10-qwen   # add eval summaries
    python benchmarks/run_all.py --report-only         # rebuild the report from benchmarks/out/results.json
    python benchmarks/run_all.py --only decode --args "decode=--tokens 32 --rounds 1"   # per-script arguments

Needs matplotlib (the `bench` extra: `pip install -e ".[bench]"`); without it the report has tables only.

Each script runs in its own process (a cold interpreter: no warm caches carried from one benchmark to the next).
For each, the runner records wall time and the child's peak resident memory (ru_maxrss from wait4), keeps its
printed output verbatim, and pulls numbers out of it:

* structured: a line `BENCH_JSON {"figures": [{"name": ..., "value": ..., "unit": ..., "goal": ...}]}`, or the
  same JSON written to the file named by $MEDRWR_BENCH_JSON;
* otherwise every printed `label: number [unit]` / `label = number [unit]` line. Figures whose label says
  "ratio"/"speed-up"/"x" or whose unit is "x"/"×" are ratios measured side by side in the same run; they are
  plotted per benchmark against the 1.0 line.

Nothing is averaged across runs or machines: every number in the report comes from this one run.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
OUT = HERE / "out"
FIGURE_RE = re.compile(
    r"^\s*(?P<label>[A-Za-z][^:=\n]{0,80}?)\s*[:=]\s*(?P<value>[-+]?\d[\d,]*(?:\.\d+)?(?:[eE][-+]?\d+)?)"
    r"(?:\s*(?P<unit>[A-Za-z%µ]+(?:/[A-Za-z]+)?))?(?![\w.])"
)
# "ratio 0.97" / "ratio: 0.97" / "2.10x" / "3.4×" (a number followed by x, not part of a word like 224x224)
RATIO_INLINE_RE = re.compile(r"\bratio\s*[:=]?\s*(\d+(?:\.\d+)?)|(?<![\w.])(\d+(?:\.\d+)?)\s?[x×](?![\w\d])")
RATIO_WORDS = ("ratio", "speed-up", "speedup", "×", " x ", "fewer", "faster", "vs")


def discover(only: list[str]) -> list[Path]:
    scripts = sorted(HERE.glob("bench_*.py"))
    if only:
        scripts = [s for s in scripts if any(word in s.stem for word in only)]
    return scripts


def run_script(script: Path, timeout: float, extra_args: list[str] = ()) -> dict:
    """Run one benchmark in a fresh interpreter; return its output, status, wall time and peak RSS."""
    json_path = OUT / f"{script.stem}.figures.json"
    json_path.unlink(missing_ok=True)
    env = dict(os.environ, MEDRWR_BENCH_JSON=str(json_path), PYTHONUNBUFFERED="1")
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, str(script), *extra_args], cwd=HERE.parent, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
        status = "ok" if proc.returncode == 0 else f"exit {proc.returncode}"
    except subprocess.TimeoutExpired:
        proc.kill()
        stdout, stderr = proc.communicate()
        status = f"timeout after {timeout:.0f} s"
    wall = time.perf_counter() - t0
    # wait4 already happened inside communicate(); RUSAGE_CHILDREN's max RSS is the largest child so far, so
    # it is exact for the first script and an upper bound after; record it with that caveat.
    import resource

    max_rss_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    figures = structured_figures(stdout, json_path) or parsed_figures(stdout)
    return {"name": script.stem, "args": list(extra_args), "status": status, "seconds": round(wall, 2), "children_max_rss_mb": round(max_rss_mb),
            "figures": figures, "stdout": stdout[-20000:], "stderr_tail": stderr[-3000:]}


def structured_figures(stdout: str, json_path: Path) -> list[dict]:
    blobs = []
    if json_path.is_file():
        blobs.append(json_path.read_text("utf-8"))
    blobs += [line[len("BENCH_JSON "):] for line in stdout.splitlines() if line.startswith("BENCH_JSON ")]
    figures = []
    for blob in blobs:
        try:
            data = json.loads(blob)
        except ValueError:
            continue
        for f in data.get("figures", []):
            if isinstance(f, dict) and isinstance(f.get("value"), (int, float)) and f.get("name"):
                figures.append({"name": str(f["name"]), "value": float(f["value"]), "unit": str(f.get("unit", "")),
                                "goal": f.get("goal"), "ratio": _is_ratio(str(f["name"]), str(f.get("unit", "")))})
    return figures


def parsed_figures(stdout: str) -> list[dict]:
    figures = []
    for line in stdout.splitlines():
        text = " ".join(line.split())
        ratios = RATIO_INLINE_RE.findall(text)
        if ratios:
            # "decode tok/s (median): A 10.2 B 10.5 ratio 0.971" / "bucketed / plain 1.23x" / "... -> 2.10x"
            head = text.split(":", 1)[0] if ":" in text else RATIO_INLINE_RE.split(text)[0]
            head = re.sub(r"(?:\s|->|[.,])+$", "", head).strip() or text[:40]
            for i, (after_word, before_x) in enumerate(ratios):
                name = head if len(ratios) == 1 else f"{head} ({i + 1})"
                figures.append({"name": name[:70], "value": float(after_word or before_x), "unit": "x",
                                "goal": None, "ratio": True})
            continue
        m = FIGURE_RE.match(line)
        if not m:
            continue
        try:
            value = float(m.group("value").replace(",", ""))
        except ValueError:
            continue
        label, unit = " ".join(m.group("label").split()), m.group("unit") or ""
        figures.append({"name": label, "value": value, "unit": unit, "goal": None, "ratio": _is_ratio(label, unit)})
    return figures


def _is_ratio(label: str, unit: str) -> bool:
    text = f" {label.lower()} "
    return unit in ("x", "×") or any(word in text for word in RATIO_WORDS)


# ------------------------------------------------------------------ machine and plots


def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_gb = None
    try:
        mem_gb = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError, AttributeError):
        pass
    versions = {}
    for pkg in ("llama_cpp", "onnxruntime", "hnswlib", "numpy"):
        try:
            versions[pkg] = __import__(pkg).__version__
        except Exception:  # not installed: say so in the report
            versions[pkg] = "not installed"
    return {"cpu": cpu, "cores": os.cpu_count(), "memory_gb": mem_gb, "python": platform.python_version(),
            "platform": platform.platform(), "load_average_at_start": os.getloadavg(), **versions}


def _plt():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        return plt
    except ImportError:
        return None


def plot_ratios(result: dict, plt) -> str | None:
    ratios = [f for f in result["figures"] if f["ratio"]]
    if not ratios or plt is None:
        return None
    fig, ax = plt.subplots(figsize=(10, 0.9 + 0.45 * len(ratios)))
    names = [f["name"][:60] for f in ratios][::-1]
    values = [f["value"] for f in ratios][::-1]
    ax.barh(names, values, color="#4C72B0")
    ax.axvline(1.0, color="black", linewidth=0.8, linestyle="--")
    for y, v in enumerate(values):
        ax.text(v, y, f" {v:.3g}", va="center", fontsize=8)
    ax.set_title(f"{result['name']}: paired ratios from one run", fontsize=10, loc="left")
    ax.set_xlim(0, max(values) * 1.15)
    fig.tight_layout()
    name = f"{result['name']}.png"
    fig.savefig(OUT / name, dpi=110)
    plt.close(fig)
    return name


def plot_eval(evals: list[dict], plt) -> str | None:
    if not evals or plt is None:
        return None
    fig, ax = plt.subplots(figsize=(7, 3.5))
    width = 0.8 / max(1, len(evals))
    modes = list(dict.fromkeys(m for e in evals for m in e["summary"]["modes"]))
    for i, e in enumerate(evals):
        accs, lo, hi = [], [], []
        for m in modes:
            s = e["summary"]["modes"].get(m, {})
            a = s.get("accuracy") or 0.0
            ci = s.get("accuracy_ci95") or [a, a]
            accs.append(100 * a)
            lo.append(100 * (a - ci[0]))
            hi.append(100 * (ci[1] - a))
        xs = [j + i * width for j in range(len(modes))]
        ax.bar(xs, accs, width, yerr=[lo, hi], capsize=3, label=e["label"])
    ax.set_xticks([j + width * (len(evals) - 1) / 2 for j in range(len(modes))], modes)
    ax.set_ylabel("accuracy (%) with Wilson 95% CI")
    ax.set_title("Eval accuracy by mode")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(OUT / "eval_accuracy.png", dpi=110)
    plt.close(fig)
    return "eval_accuracy.png"


# ------------------------------------------------------------------ report


def _fmt(v: float) -> str:
    return f"{v:.4g}" if abs(v) < 1e5 else f"{v:,.0f}"


def load_eval(folder: Path) -> dict:
    summary = json.loads((folder / "summary.json").read_text("utf-8"))
    model = summary.get("run", {}).get("model", {}).get("name", "?")
    dataset = summary.get("run", {}).get("dataset", {}).get("name", "?")
    return {"label": f"{model} · {dataset}", "folder": str(folder), "summary": summary}


def write_report(results: list[dict], evals: list[dict], info: dict) -> Path:
    plt = _plt()
    lines = [
        "# medrwr-edge benchmark report",
        "",
        f"Generated {info['generated']} by `python benchmarks/run_all.py`. One run; every ratio compares two things "
        "measured side by side in the same process.",
        "",
        f"Machine: {info['machine']['cpu']}, {info['machine']['cores']} cores, {info['machine']['memory_gb']} GiB, "
        f"Python {info['machine']['python']}, llama-cpp-python {info['machine']['llama_cpp']}, onnxruntime "
        f"{info['machine']['onnxruntime']}. Load average at start: "
        f"{', '.join(f'{x:.1f}' for x in info['machine']['load_average_at_start'])} "
        "(other work on the machine slows absolute figures; ratios are less affected).",
        "",
    ]
    if evals:
        lines += ["## Evaluation (`medrwr-edge eval`)", "",
                  "| run | mode | n | accuracy (95% CI) | retrieval rate | queries/q | CDIR rate | CDIR r→w / w→r | "
                  "tokens/q | s/q |", "|---|---|---|---|---|---|---|---|---|---|"]
        for e in evals:
            for mode, s in e["summary"]["modes"].items():
                acc = "–" if s["accuracy"] is None else \
                    f"{100 * s['accuracy']:.1f}% ({100 * s['accuracy_ci95'][0]:.1f}–{100 * s['accuracy_ci95'][1]:.1f})"
                lines.append(
                    f"| {e['label']} | {mode} | {s['n']} | {acc} | {100 * (s['retrieval_rate'] or 0):.0f}% | "
                    f"{s['queries_per_question'] or 0:.2f} | {100 * (s['cdir_trigger_rate'] or 0):.0f}% | "
                    f"{s['cdir_right_to_wrong']} / {s['cdir_wrong_to_right']} | "
                    f"{s['tokens_generated_per_question'] or 0:.0f} | {s['seconds_per_question'] or 0:.2f} |")
            for p in e["summary"].get("paired", []):
                lines.append(f"| {e['label']} | {p['from']} → {p['to']} | {p['items']} | {p['wrong_to_right']} "
                             f"wrong→right, {p['right_to_wrong']} right→wrong (McNemar p={p['mcnemar_p']:.3f}) "
                             "| | | | | | |")
        png = plot_eval(evals, plt)
        if png:
            lines += ["", f"![eval accuracy]({png})"]
        lines.append("")
    if results:
        lines += ["## Benchmarks", "", "| benchmark | status | wall s | max child RSS MB | paired ratios |",
                  "|---|---|---|---|---|"]
        for r in results:
            ratios = "; ".join(f"{f['name']} = {_fmt(f['value'])}{f['unit'] if f['unit'] in ('x', '×') else ''}"
                               for f in r["figures"] if f["ratio"]) or "–"
            lines.append(f"| `{r['name']}` | {r['status']} | {r['seconds']} | {r['children_max_rss_mb']} | {ratios} |")
        lines += ["", "Max child RSS is the largest resident set of any benchmark process so far in this run "
                  "(exact for the first script, an upper bound for later ones).", ""]
        for r in results:
            lines += [f"### {r['name']}", ""]
            if r.get("args"):
                lines += [f"Arguments: `{' '.join(r['args'])}`", ""]
            if r["figures"]:
                lines += ["| figure | value | unit | goal |", "|---|---|---|---|"]
                lines += [f"| {f['name']} | {_fmt(f['value'])} | {f['unit']} | {f['goal'] if f['goal'] is not None else ''} |"
                          for f in r["figures"]]
            png = plot_ratios(r, plt)
            if png:
                lines += ["", f"![{r['name']}]({png})"]
            lines += ["", "<details><summary>output</summary>", "", "```", r["stdout"].rstrip(), "```", "",
                      "</details>", ""]
            if r["status"] != "ok" and r["stderr_tail"].strip():
                lines += ["stderr (tail):", "", "```", r["stderr_tail"].rstrip(), "```", ""]
    if plt is None:
        lines += ["_matplotlib is not installed (`pip install -e \".[bench]\"`): plots were skipped._", ""]
    report = OUT / "report.md"
    tmp = report.with_suffix(".md.tmp")
    tmp.write_text("\n".join(lines) + "\n", "utf-8")
    os.replace(tmp, report)
    return report


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--only", default="", help="comma-separated words: run only scripts whose name contains one")
    ap.add_argument("--timeout", type=float, default=900, help="seconds per benchmark script")
    ap.add_argument("--eval", action="append", default=[], help="an eval output folder to include (repeat)")
    ap.add_argument("--report-only", action="store_true", help="rebuild the report from saved results")
    ap.add_argument("--args", action="append", default=[], metavar="NAME=ARGS",
                    help='extra arguments for one script, e.g. --args "decode=--tokens 32 --rounds 1" (repeat)')
    args = ap.parse_args(argv)
    import shlex

    script_args: dict[str, list[str]] = {}
    for spec in args.args:
        name, sep, rest = spec.partition("=")
        if not sep:
            print(f"error: --args wants NAME=ARGS, got {spec!r}", file=sys.stderr)
            return 2
        script_args[name.strip().removeprefix("bench_")] = shlex.split(rest)
    OUT.mkdir(parents=True, exist_ok=True)
    results_file = OUT / "results.json"
    if args.report_only:
        if not results_file.is_file():
            print(f"error: no saved results in {results_file}; run without --report-only first", file=sys.stderr)
            return 2
        saved = json.loads(results_file.read_text("utf-8"))
        results, info = saved["results"], saved["info"]
    else:
        info = {"generated": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "machine": machine()}
        results = []
        scripts = discover([w for w in args.only.split(",") if w])
        if not scripts:
            print("note: no benchmarks/bench_*.py scripts matched", file=sys.stderr)
        for script in scripts:
            print(f"running {script.name} ...", file=sys.stderr, flush=True)
            r = run_script(script, args.timeout, script_args.get(script.stem.removeprefix("bench_"), []))
            print(f"  {r['status']} in {r['seconds']} s, {sum(f['ratio'] for f in r['figures'])} ratio(s)",
                  file=sys.stderr, flush=True)
            results.append(r)
        tmp = results_file.with_suffix(".json.tmp")
        tmp.write_text(json.dumps({"info": info, "results": results}, indent=1), "utf-8")
        os.replace(tmp, results_file)
    evals = []
    for folder in args.eval:
        path = Path(folder)
        if not (path / "summary.json").is_file():
            print(f"error: {path} has no summary.json (run `medrwr-edge eval ... --out {path}` first)",
                  file=sys.stderr)
            return 2
        evals.append(load_eval(path))
    report = write_report(results, evals, info)
    print(f"wrote {report}")
    return 0 if all(r["status"] == "ok" for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
