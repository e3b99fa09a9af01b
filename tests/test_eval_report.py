"""benchmarks/run_all.py: runs bench scripts in fresh processes, pulls paired ratios out of their output, and
writes the markdown report (with plots when matplotlib is installed)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def run_all(tmp_path, monkeypatch):
    spec = importlib.util.spec_from_file_location("run_all_under_test", ROOT / "benchmarks" / "run_all.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setattr(module, "HERE", tmp_path)
    monkeypatch.setattr(module, "OUT", tmp_path / "out")
    return module


def test_ratios_are_parsed_from_the_shapes_benchmarks_print(run_all):
    text = ("decode tok/s (median): LlamaBackend 10.22   raw llama-cpp-python 10.41   ratio 0.982 (goal >= 0.97)\n"
            "wall time per answer (median): continuation 3.10 s  re-encode 6.50 s  -> 2.10x faster\n"
            "bucketed / plain                       1.23x\n"
            "image (224x224, EfficientNet-L0)       45.1\n"
            "fusion cost: 0.123 ms per query\n")
    figures = {f["name"]: f for f in run_all.parsed_figures(text)}
    assert figures["decode tok/s (median)"]["value"] == 0.982 and figures["decode tok/s (median)"]["ratio"]
    assert figures["wall time per answer (median)"]["value"] == 2.1
    assert figures["bucketed / plain"]["value"] == 1.23
    assert figures["fusion cost"] == {"name": "fusion cost", "value": 0.123, "unit": "ms", "goal": None,
                                      "ratio": False}
    assert len(figures) == 4  # "224x224" is not a ratio


def test_runner_writes_the_report(run_all, tmp_path):
    (tmp_path / "bench_fast.py").write_text(
        "import json, os\n"
        "print('ours vs raw: ratio 0.99')\n"
        "json.dump({'figures': [{'name': 'kv speed-up', 'value': 3.5, 'unit': 'x', 'goal': '>= 2'}]},"
        " open(os.environ['MEDRWR_BENCH_JSON'], 'w'))\n", "utf-8")
    (tmp_path / "bench_broken.py").write_text("raise SystemExit(3)\n", "utf-8")
    eval_dir = tmp_path / "ev"
    eval_dir.mkdir()
    summary = {"modes": {"plain": {"n": 5, "accuracy": 0.4, "accuracy_ci95": [0.1176, 0.7693], "retrieval_rate": 0.0,
                                   "queries_per_question": 0.2, "cdir_trigger_rate": 0.0, "cdir_right_to_wrong": 0,
                                   "cdir_wrong_to_right": 0, "tokens_generated_per_question": 12.0,
                                   "seconds_per_question": 0.5}},
               "paired": [], "run": {"model": {"name": "m.gguf"}, "dataset": {"name": "builtin:icd10"}}}
    (eval_dir / "summary.json").write_text(json.dumps(summary), "utf-8")
    assert run_all.main(["--eval", str(eval_dir)]) == 1  # one script failed
    report = (tmp_path / "out" / "report.md").read_text("utf-8")
    assert "| `bench_fast` | ok |" in report and "kv speed-up = 3.5x" in report
    assert "| `bench_broken` | exit 3 |" in report
    assert "| m.gguf · builtin:icd10 | plain | 5 | 40.0% (11.8–76.9) |" in report
    if importlib.util.find_spec("matplotlib"):
        assert (tmp_path / "out" / "bench_fast.png").stat().st_size > 1000
        assert (tmp_path / "out" / "eval_accuracy.png").is_file()
    # the report can be rebuilt from the saved results without rerunning anything
    (tmp_path / "out" / "report.md").unlink()
    assert run_all.main(["--report-only"]) == 1
    assert "bench_fast" in (tmp_path / "out" / "report.md").read_text("utf-8")
