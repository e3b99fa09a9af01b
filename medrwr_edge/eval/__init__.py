"""Evaluation: dataset loaders, the built-in ICD-10-CM benchmark, and a resumable runner with summary statistics.

    from medrwr_edge.eval import load_dataset, run_eval
    items = load_dataset("cases.jsonl").items
    summary = run_eval(items, session, "out/", modes=["plain", "retrieval", "retrieval+cdir"])

Imports are lazy so that `medrwr-edge --help` does not load the runner.
"""

from __future__ import annotations

__all__ = ["EvalItem", "LoadedDataset", "load_dataset", "MODES", "run_eval", "summarize"]


def __getattr__(name):
    if name in ("EvalItem", "LoadedDataset", "load_dataset"):
        from . import datasets

        return getattr(datasets, name)
    if name in ("MODES", "run_eval", "summarize"):
        from . import runner

        return getattr(runner, name)
    raise AttributeError(name)
