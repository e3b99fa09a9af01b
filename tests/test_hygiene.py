"""Project-wide guarantees: the edge runtime never imports torch/transformers; no pickle loads anywhere."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_runtime_import_path_has_no_torch_or_transformers():
    code = (
        "import sys\n"
        "import medrwr_edge, medrwr_edge.cli\n"
        "from medrwr_edge.runtime import api, loop, llama_backend, multimodal_backend, vision, retrieval\n"
        "from medrwr_edge.kb_pack import pack, build, encoders\n"
        "from medrwr_edge import imaging, assets\n"
        "from medrwr_edge.evidence import report, log, replay\n"
        "from medrwr_edge.export import bundle\n"
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers', 'optimum'))\n"
        "print(heavy)\n"
        "assert not heavy, heavy\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr


UNSAFE = [
    (re.compile(r"\bpickle\.loads?\("), "pickle load"),
    (re.compile(r"\bdill\.|cloudpickle"), "pickle variant"),
    (re.compile(r"allow_pickle\s*=\s*True"), "numpy pickle"),
    (re.compile(r"torch\.load\((?!.*weights_only\s*=\s*True).*$", re.M), "torch.load without weights_only=True"),
    (re.compile(r"(?<![.\w])(eval|exec)\("), "eval/exec"),
]


def test_no_pickle_or_eval_in_the_code():
    problems = []
    for path in sorted((ROOT / "medrwr_edge").rglob("*.py")):
        text = path.read_text(encoding="utf-8")
        for pattern, what in UNSAFE:
            for m in pattern.finditer(text):
                line = text.count("\n", 0, m.start()) + 1
                problems.append(f"{path.relative_to(ROOT)}:{line}: {what}")
    assert not problems, "\n".join(problems)
