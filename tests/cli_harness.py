"""Run the real `medrwr-edge` CLI in a subprocess (optionally network-guarded) and check what it left behind.

Used by test_privacy.py, test_no_network.py and test_faults.py:

* `run_cli(args, home)`: `python -m medrwr_edge.cli ARGS` with MEDRWR_EDGE_HOME=home; with `netlog` the
  tests/netguard/sitecustomize.py tripwire is loaded (every socket connect / DNS lookup is logged and refused);
  with `netns=True` the command also runs in a network namespace without interfaces (`unshare -rn`).
* `private_home(tmp)`: an empty data directory whose models/ links to the installed models (so packs find their
  locked encoders) -- nothing is written through the link.
* `error_lines(stderr)` / `assert_one_error_line`: the "one `error: …` line, no traceback" contract.
* `snapshot(root)`: {relative path: sha256} of every file under root (links not followed), to prove that a failed
  command changed nothing that existed before and left nothing half-written.
* `command_available(name)`: whether `medrwr-edge NAME` is registered (for commands other helpers add).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

TESTS = Path(__file__).resolve().parent
NETGUARD_DIR = TESTS / "netguard"


def installed_models_dir() -> Optional[Path]:
    """The data directory's models/ folder as installed (before a test points MEDRWR_EDGE_HOME elsewhere)."""
    from medrwr_edge.paths import models_dir

    d = models_dir()
    return d if d.is_dir() else None


def private_home(tmp: Path, models: Optional[Path]) -> Path:
    home = Path(tmp) / "home"
    home.mkdir(parents=True, exist_ok=True)
    if models is not None and not (home / "models").exists():
        (home / "models").symlink_to(models, target_is_directory=True)
    return home


def cli_env(home: Path, netlog: Optional[Path] = None, extra: Optional[dict] = None) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MEDRWR_", "COLUMNS", "LINES"))}
    env.update(MEDRWR_EDGE_HOME=str(home), PYTHONUNBUFFERED="1", COLUMNS="200", NO_COLOR="1")
    if netlog is not None:
        env["MEDRWR_NETGUARD_LOG"] = str(netlog)
        env["PYTHONPATH"] = os.pathsep.join([str(NETGUARD_DIR)] + [p for p in [env.get("PYTHONPATH")] if p])
    env.update(extra or {})
    return env


@functools.lru_cache(maxsize=1)
def netns_available() -> bool:
    """True when `unshare -rn` can make a network namespace here (root, or unprivileged user namespaces)."""
    if not shutil.which("unshare"):
        return False
    try:
        return subprocess.run(["unshare", "-rn", "true"], capture_output=True, timeout=20).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


def cli_argv(args: Sequence[str], netns: bool = False) -> list[str]:
    argv = [sys.executable, "-m", "medrwr_edge.cli", *map(str, args)]
    return ["unshare", "-rn", *argv] if netns else argv


def run_cli(args: Sequence[str], home: Path, *, netlog: Optional[Path] = None, netns: bool = False,
            stdin: Optional[bytes] = None, cwd: Optional[Path] = None, timeout: float = 300,
            extra_env: Optional[dict] = None) -> subprocess.CompletedProcess:
    """Run the CLI; stdout/stderr come back as bytes (grep them as bytes, decode for messages)."""
    return subprocess.run(cli_argv(args, netns), env=cli_env(home, netlog, extra_env), input=stdin,
                          capture_output=True, cwd=cwd or home.parent, timeout=timeout)


def _sigint_as_in_a_terminal() -> None:
    # Runs in the child between fork and exec. A shell starts background jobs (`nohup ... &`, many CI runners) with
    # SIGINT *ignored*, exec keeps an ignored disposition, and Python then installs no KeyboardInterrupt handler: the
    # interrupt_when() below would do nothing. The child gets the default disposition a terminal gives it instead.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def start_cli(args: Sequence[str], home: Path, *, cwd: Optional[Path] = None, extra_env: Optional[dict] = None,
              stdin=subprocess.DEVNULL) -> subprocess.Popen:
    """Start the CLI in the background; SIGINT acts on it as Ctrl-C, however the test run itself was launched."""
    return subprocess.Popen(cli_argv(args), env=cli_env(home, None, extra_env), stdin=stdin,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=cwd or home.parent,
                            preexec_fn=_sigint_as_in_a_terminal)


def interrupt_when(proc: subprocess.Popen, ready: Callable[[], bool], timeout: float = 240) -> bool:
    """Send SIGINT (Ctrl-C) as soon as `ready()` holds; False if the process ended first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        if ready():
            proc.send_signal(signal.SIGINT)
            return True
        time.sleep(0.02)
    proc.kill()
    raise AssertionError("the command never reached the point where it was to be interrupted")


def text(data: bytes) -> str:
    return data.decode("utf-8", "replace")


def error_lines(stderr: bytes | str) -> list[str]:
    s = stderr if isinstance(stderr, str) else text(stderr)
    return [line for line in s.splitlines() if line.startswith("error:")]


@dataclasses.dataclass
class Outcome:
    """What assert_one_error_line needs from a run that was not a subprocess (cli.main called in-process)."""

    returncode: int
    stderr: str


def assert_one_error_line(proc, expect_code: Optional[int] = None, match: Optional[str] = None) -> str:
    """Non-zero exit, exactly one `error: …` line on stderr, no traceback; returns the line."""
    import re

    err = proc.stderr if isinstance(proc.stderr, str) else text(proc.stderr)
    assert proc.returncode != 0, f"exit 0 for a failing command; stderr:\n{err}"
    if expect_code is not None:
        assert proc.returncode == expect_code, f"exit {proc.returncode}, expected {expect_code}; stderr:\n{err}"
    assert "Traceback" not in err, err
    lines = error_lines(err)
    assert len(lines) == 1, f"expected one error line, got {len(lines)}:\n{err}"
    if match is not None:
        assert re.search(match, lines[0]), f"{lines[0]!r} does not match {match!r}"
    return lines[0]


def snapshot(root: Path) -> dict[str, str]:
    """{path relative to root: sha256 or '<dir>'} for everything under root; symlinks are recorded, not followed."""
    root = Path(root)
    out: dict[str, str] = {}
    if not root.exists():
        return out
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        d = Path(dirpath)
        for name in dirnames:
            p = d / name
            out[str(p.relative_to(root))] = "<link>" if p.is_symlink() else "<dir>"
        for name in filenames:
            p = d / name
            rel = str(p.relative_to(root))
            out[rel] = "<link>" if p.is_symlink() else hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def files_under(root: Path) -> list[Path]:
    """Every regular file under root, not following symlinks (the models/ link is the installed models)."""
    found = []
    for dirpath, _dirnames, filenames in os.walk(root, followlinks=False):
        for name in filenames:
            p = Path(dirpath) / name
            if p.is_file() and not p.is_symlink():
                found.append(p)
    return found


@functools.lru_cache(maxsize=None)
def command_available(name: str) -> bool:
    """Whether `medrwr-edge NAME` exists (a command or a group), asked of the real app."""
    import typer.main

    from medrwr_edge.cli import app

    return name in typer.main.get_command(app).commands


# ------------------------------------------------------------------ small real inputs the three suites share

KB_DOCS = [
    ("J93.0", "Spontaneous tension pneumothorax: air in the pleural space under pressure with a collapsed lung"),
    ("J93.1", "Other spontaneous pneumothorax: air in the pleural space without tension"),
    ("I60.9", "Nontraumatic subarachnoid hemorrhage, unspecified: blood in the subarachnoid space on head CT"),
    ("I61.9", "Nontraumatic intracerebral hemorrhage, unspecified: a hyperdense focus in the brain parenchyma"),
    ("I63.9", "Cerebral infarction, unspecified: a hypodense vascular territory on CT"),
    ("S06.6X0A", "Traumatic subarachnoid hemorrhage without loss of consciousness, initial encounter"),
    ("G43.909", "Migraine, unspecified, not intractable, without status migrainosus"),
    ("J18.9", "Pneumonia, unspecified organism: consolidation of the lung parenchyma"),
    ("J90", "Pleural effusion, not elsewhere classified: fluid in the pleural space"),
    ("C71.9", "Malignant neoplasm of brain, unspecified: an enhancing intracranial mass"),
]
QUESTION = "A patient with a sudden severe headache has this head CT. Which ICD-10-CM code fits best?"
OPTIONS = ["A. I60.9", "B. I63.9", "C. S06.6X0A", "D. G43.909"]


def write_kb_jsonl(path: Path) -> Path:
    import json

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"id": i, "text": f"{i} {t}", "title": i}) + "\n" for i, t in KB_DOCS),
                    encoding="utf-8")
    return path


def write_phantom_pngs(folder: Path, n: int = 3) -> list[Path]:
    """Windowed renders of the phantom CT (different lesion positions) as PNG: reference / input images."""
    import numpy as np
    from PIL import Image

    from phi_dicom import WINDOW_CENTER, WINDOW_WIDTH, phantom_hu

    folder.mkdir(parents=True, exist_ok=True)
    lo, hi = WINDOW_CENTER - WINDOW_WIDTH / 2, WINDOW_CENTER + WINDOW_WIDTH / 2
    out = []
    for k in range(n):
        grey = np.rint((np.clip(phantom_hu(96, 96, shift=2 * k), lo, hi) - lo) * 255 / (hi - lo)).astype(np.uint8)
        path = folder / f"phantom-{k}.png"
        Image.fromarray(grey).convert("RGB").save(path)
        out.append(path)
    return out


def write_captions(path: Path, images: Sequence[Path]) -> Path:
    import csv

    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["image", "caption", "id"])
        for k, img in enumerate(images):
            w.writerow([os.path.relpath(img, path.parent), f"Axial CT of the head, soft-tissue window, level {k}",
                        f"ref-{k}"])
    return path


def write_mcq(path: Path, images: Sequence[Optional[Path]], n: Optional[int] = None) -> Path:
    """An image MCQ dataset in the eval `mcq` layout, one item per image (None: a text-only item)."""
    import json

    rows = []
    for k, img in enumerate(images if n is None else list(images) * n):
        row = {"id": f"q{k}", "question": QUESTION, "options": OPTIONS, "answer": "A"}
        if img is not None:
            row["image"] = str(img)
        rows.append(json.dumps(row))
    path.write_text("\n".join(rows) + "\n", encoding="utf-8")
    return path
