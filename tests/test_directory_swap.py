"""paths.replace_directory: a pack being replaced is, at every instant, the complete old or the complete new one.

A writer subprocess installs two real packs (3 and 5 documents) in turn at one path with `atomic_directory`; it is
killed (SIGKILL) between the steps of the swap -- after the fsync, right after the exchange, before the old copy is
removed -- and at random moments, with the renameat2 exchange and with the symlink-flip fallback. Meanwhile a reader
thread opens the pack again and again with `Pack.open`: every open must succeed and give one consistent version
(manifest, index and database of the same build). Afterwards the path holds a complete pack and the next install
cleans up what the killed one left.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from medrwr_edge import paths

ROOT = Path(__file__).resolve().parents[1]

# Installs SRC_A, SRC_B, SRC_A, ... at FINAL; prints each count; with DIE=[before|after]:NAME:K it SIGKILLs itself
# on the K-th call of paths.NAME (before or after the call runs).
WRITER = r"""
import os, shutil, signal, sys
from pathlib import Path
from medrwr_edge import paths
final, a, b, mode, die, n = Path(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5], int(sys.argv[6])
if mode == "fallback":
    paths._renameat2 = lambda *args: False
if die != "never":
    when, name, k = die.split(":")
    real, calls = getattr(paths, name), [0]
    def wrapped(*args, **kw):
        calls[0] += 1
        if when == "before" and calls[0] == int(k):
            os.kill(os.getpid(), signal.SIGKILL)
        out = real(*args, **kw)
        if when == "after" and calls[0] == int(k):
            os.kill(os.getpid(), signal.SIGKILL)
        return out
    setattr(paths, name, wrapped)
i = 0
while n < 0 or i < n:
    with paths.atomic_directory(final, overwrite=True) as tmp:
        src = (a, b)[i % 2]
        for f in os.listdir(src):
            shutil.copy2(os.path.join(src, f), tmp / f)
    i += 1
    print(i, flush=True)
"""


@pytest.fixture(scope="module")
def two_packs(tmp_path_factory, text_encoder):
    from medrwr_edge.kb_pack.build import build_text_pack
    from medrwr_edge.kb_pack.documents import Document

    root = tmp_path_factory.mktemp("versions")
    out = []
    for n in (3, 5):
        docs = [Document(id=f"d{i}", text=f"pleural effusion note {i} of {n}") for i in range(n)]
        out.append(build_text_pack(docs, root / f"v{n}", text_encoder, name="swap", version=str(n), progress=False))
    return out


def _writer(final: Path, packs, mode: str, die: str = "never", n: int = -1) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    return subprocess.Popen([sys.executable, "-c", WRITER, str(final), str(packs[0]), str(packs[1]), mode, die,
                             str(n)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


class Reader(threading.Thread):
    """Opens the pack in a loop; collects every failure and every inconsistent open."""

    def __init__(self, final: Path):
        super().__init__(daemon=True)
        self.final, self.stop, self.problems, self.opens = final, threading.Event(), [], 0

    def run(self):
        from medrwr_edge.kb_pack.pack import Pack

        while not self.stop.is_set():
            try:
                with Pack.open(self.final) as pack:
                    rows = pack._conn.execute("SELECT count(*) FROM documents").fetchone()[0]
                    sizes = {pack.doc_count, rows, pack._index.get_current_count(), int(pack.version)}
                    if len(sizes) != 1:
                        self.problems.append(f"mixed versions: {sizes}")
                self.opens += 1
            except Exception as e:  # noqa: BLE001 -- any failure to open is what this test looks for
                self.problems.append(f"{type(e).__name__}: {e}")


def _install_first(final: Path, packs, mode: str) -> None:
    first = _writer(final, packs, mode, n=1)
    assert first.wait(timeout=120) == 0, first.stderr.read().decode()


def _assert_complete_and_clean_after_next_install(final: Path, packs, mode: str) -> None:
    from medrwr_edge.kb_pack.pack import Pack

    with Pack.open(final, verify="full") as pack:  # what the killed writer left is a whole pack
        assert pack.doc_count in (3, 5)
    again = _writer(final, packs, mode, n=2)
    assert again.wait(timeout=120) == 0, again.stderr.read().decode()
    with Pack.open(final, verify="full") as pack:
        assert pack.doc_count == 5
    current = os.readlink(final) if final.is_symlink() else None  # the fallback's live version directory
    left = sorted(p.name for p in final.parent.iterdir() if p.name not in (final.name, current))
    # no retired copies stay behind; only a build killed before its swap leaves its own (unique) partial folder
    assert all(name.endswith(".partial") for name in left), left
    if mode == "exchange":
        assert final.is_dir() and current is None
    else:
        assert current.startswith(f".{final.name}.") and current.endswith(".v")


STEPS = {
    "exchange": ["after:fsync_tree:3", "after:_renameat2:3", "before:_retire:2"],
    "fallback": ["after:fsync_tree:3", "before:_retire:2", "after:_unique_name:4"],
}


@pytest.mark.slow
@pytest.mark.parametrize("mode,die", [(m, d) for m, ds in STEPS.items() for d in ds])
def test_a_writer_killed_between_swap_steps_never_shows_a_reader_a_partial_pack(two_packs, tmp_path, mode, die):
    final = tmp_path / "packs" / "swap"
    _install_first(final, two_packs, mode)
    reader = Reader(final)
    reader.start()
    try:
        writer = _writer(final, two_packs, mode, die=die)
        assert writer.wait(timeout=120) == -signal.SIGKILL, writer.stderr.read().decode()
        time.sleep(0.2)
    finally:
        reader.stop.set()
        reader.join(timeout=60)
    assert reader.opens > 0 and reader.problems == []
    _assert_complete_and_clean_after_next_install(final, two_packs, mode)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["exchange", "fallback"])
def test_a_writer_killed_at_random_moments_never_shows_a_reader_a_partial_pack(two_packs, tmp_path, mode):
    final = tmp_path / "packs" / "swap"
    _install_first(final, two_packs, mode)
    reader = Reader(final)
    reader.start()
    rng = random.Random(20)
    swaps = 0
    try:
        for _ in range(5):
            writer = _writer(final, two_packs, mode)
            assert writer.stdout.readline()  # it has swapped at least once (the next swap is under way)
            time.sleep(rng.uniform(0.0, 0.3))
            writer.kill()
            writer.wait(timeout=60)
            swaps += 1
    finally:
        reader.stop.set()
        reader.join(timeout=60)
    assert swaps == 5 and reader.opens > 0 and reader.problems == []
    _assert_complete_and_clean_after_next_install(final, two_packs, mode)


# ------------------------------------------------------------------ the swap itself, without subprocesses


def _dir(path: Path, content: str) -> Path:
    path.mkdir(parents=True)
    (path / "f.txt").write_text(content)
    return path


@pytest.mark.parametrize("exchange", [True, False])
def test_a_held_version_stays_whole_and_is_removed_by_the_next_swap(tmp_path, monkeypatch, exchange):
    if not exchange:
        monkeypatch.setattr(paths, "_renameat2", lambda *a: False)
    final = tmp_path / "d"
    paths.replace_directory(_dir(tmp_path / "new1", "1"), final)
    with paths.reading_directory(final) as held:
        paths.replace_directory(_dir(tmp_path / "new2", "2"), final)
        assert (final / "f.txt").read_text() == "2" and (held / "f.txt").read_text() == "1"
        assert len(list(tmp_path.glob(".d.*.old"))) == 1  # held by the reader: kept, under a unique name
    paths.replace_directory(_dir(tmp_path / "new3", "3"), final)
    assert (final / "f.txt").read_text() == "3"
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith(".v")) == ["d"]


def test_a_real_directory_moves_to_the_symlink_layout_where_there_is_no_exchange(tmp_path, monkeypatch):
    final = _dir(tmp_path / "d", "old")
    monkeypatch.setattr(paths, "_renameat2", lambda *a: False)
    for k in range(3):
        paths.replace_directory(_dir(tmp_path / f"n{k}", str(k)), final)
        assert (final / "f.txt").read_text() == str(k) and final.is_symlink()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([os.readlink(final), "d"])
    monkeypatch.undo()  # renameat2 available again: the symlink is exchanged for a real directory
    paths.replace_directory(_dir(tmp_path / "n9", "9"), final)
    assert not final.is_symlink() and (final / "f.txt").read_text() == "9"
    assert [p.name for p in tmp_path.iterdir()] == ["d"]


def test_two_swaps_of_one_name_use_distinct_temporary_names(tmp_path):
    final = _dir(tmp_path / "d", "0")
    with paths.reading_directory(final), paths.reading_directory(final):
        paths.replace_directory(_dir(tmp_path / "a", "a"), final)
        with paths.reading_directory(final):
            paths.replace_directory(_dir(tmp_path / "b", "b"), final)
        assert len(list(tmp_path.glob(".d.*.old"))) == 2  # no fixed `.d.old` that the second would collide with
    shutil.rmtree(final)
