"""Bad input and faults, across the commands: each must give ONE `error: …` line, a non-zero exit, no traceback, no
partial artefact, and leave what existed before intact.

FAULT_CASES run in-process through `medrwr_edge.cli.main` (a traceback there is an exception escaping main, which
fails the test). Each case writes its own bad inputs into its folder; the shared workspace (a data directory with an
answer log, a text pack and an image pack, all real) is snapshotted before and after. Ctrl-C (SIGINT) during
`pack build`, `eval` and `export`, two `ask` processes sharing one data directory, and a full disk during a pack
build are separate tests below. Add a case with one `Fault(...)` line.
"""

from __future__ import annotations

import errno
import json
import re
import shutil
import sqlite3
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import pytest

from cli_harness import (KB_DOCS, OPTIONS, QUESTION, Outcome, assert_one_error_line, installed_models_dir,
                         interrupt_when, private_home, run_cli, snapshot, start_cli, text, write_kb_jsonl, write_mcq,
                         write_phantom_pngs)

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------ the shared, pre-existing state


@dataclass
class FaultWorkspace:
    root: Path
    home: Path
    kb: Path
    ref: Path
    png: Path
    smoke: Path
    text_encoder: Path
    image_encoder: Path
    record: Path  # an evidence record (scripted model) that the log also holds as #1


@pytest.fixture(scope="module")
def fws(tmp_path_factory, text_encoder, image_encoder, smoke_gguf):
    from medrwr_edge import assets
    from medrwr_edge.evidence.log import append_record
    from medrwr_edge.kb_pack.build import build_image_pack, build_text_pack
    from medrwr_edge.kb_pack.documents import Document
    from medrwr_edge.runtime.api import Session
    from medrwr_edge.runtime.scripted_backend import ScriptedBackend

    root = tmp_path_factory.mktemp("faults")
    home = private_home(root, installed_models_dir())
    kb = build_text_pack([Document(id=i, text=f"{i} {t}") for i, t in KB_DOCS], root / "kb", text_encoder,
                         name="kb", version="1", progress=False)
    pngs = write_phantom_pngs(root / "img", 3)
    ref = build_image_pack([Document(id=f"ref-{k}", text="", image_path=str(p), caption=f"Axial head CT {k}")
                            for k, p in enumerate(pngs)], root / "ref", image_encoder, name="ref", version="1",
                           progress=False)
    with Session(packs=[kb], image_pack=ref, backend=ScriptedBackend(["<answer> A </answer>"])) as s:
        record = s.ask(pngs[0], QUESTION, OPTIONS)
    append_record(record, path=home / "answers.sqlite")
    (root / "record.json").write_text(json.dumps(record.to_dict()), encoding="utf-8")
    return FaultWorkspace(root, home, kb, ref, pngs[0], Path(smoke_gguf), Path(assets.default_text_encoder_dir()),
                          Path(assets.default_image_encoder_dir()), root / "record.json")


# ------------------------------------------------------------------ bad inputs, one line per case


@dataclass
class Fault:
    name: str
    argv: Callable[[FaultWorkspace, Path], list]  # (workspace, the case's own folder) -> CLI arguments
    match: str  # regex the error line must match
    code: Optional[int] = None
    loads_model: bool = False  # the fault is in the model file itself, so the model loader must run


def _ask(image, question=QUESTION, *extra):
    return ["ask", image, question, *sum((["-o", o] for o in OPTIONS), []), *extra]


def _w(name: str, data: bytes) -> Callable[[Path], Path]:
    def make(d: Path) -> Path:
        (d / name).write_bytes(data)
        return d / name
    return make


def _cut(src: Path, d: Path, name: str, keep: float) -> Path:
    data = src.read_bytes()
    (d / name).write_bytes(data[: int(len(data) * keep)])
    return d / name


def _bomb_png(d: Path) -> Path:
    import struct
    import zlib

    def chunk(kind, payload):
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    w = h = 40_000  # 1.6 gigapixels declared, about 1 KB on disk
    data = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\x00" * (w + 1) * 4, 9)) + chunk(b"IEND", b""))
    return _w("bomb.png", data)(d)


def _zip_as_jpg(d: Path) -> Path:
    import zipfile

    with zipfile.ZipFile(d / "scan.jpg", "w") as z:
        z.writestr("notes.txt", "not an image")
    return d / "scan.jpg"


def _copy_pack(src: Path, d: Path, name: str) -> Path:
    return Path(shutil.copytree(src, d / name))


def _tampered_manifest(ws, d):
    p = _copy_pack(ws.kb, d, "kb-tampered")
    m = json.loads((p / "manifest.json").read_text())
    m["doc_count"] += 1  # a hand edit: the manifest digest no longer matches
    (p / "manifest.json").write_text(json.dumps(m))
    return p


def _swapped_pack_file(ws, d):
    """docs.sqlite replaced by another pack's docs.sqlite: right name, other contents (and size).

    A swap between two packs whose docs.sqlite happen to have the same size passes the size-only check of a normal
    open; `pack verify` (full sha256) catches that one."""
    from medrwr_edge.kb_pack.build import build_text_pack
    from medrwr_edge.kb_pack.documents import Document
    from pack_fakes import HashingTextEncoder

    other = build_text_pack([Document(id=f"o{i}", text=f"other document {i} " * 20) for i in range(60)],
                            d / "other", HashingTextEncoder(), name="other", version="1", progress=False)
    p = _copy_pack(ws.kb, d, "kb-swapped")
    (p / "docs.sqlite").write_bytes((other / "docs.sqlite").read_bytes())
    return p


def _other_encoder_pack(ws, d):
    from medrwr_edge.kb_pack.build import build_text_pack
    from medrwr_edge.kb_pack.documents import Document
    from pack_fakes import HashingTextEncoder

    return build_text_pack([Document(id=i, text=t) for i, t in KB_DOCS], d / "kb-other", HashingTextEncoder(),
                           name="kb-other", version="1", progress=False)


def _encoder_copy(ws, d, damage: str):
    enc = Path(shutil.copytree(ws.text_encoder, d / "encoder", symlinks=False))
    onnx = enc / json.loads((enc / "encoder.json").read_text()).get("onnx_file", "model.onnx")
    if damage == "truncated":
        onnx.write_bytes(onnx.read_bytes()[: onnx.stat().st_size // 2])
    else:  # swapped: another encoder's ONNX under the right name
        image_spec = json.loads((ws.image_encoder / "encoder.json").read_text())
        onnx.write_bytes((ws.image_encoder / image_spec.get("onnx_file", "model.onnx")).read_bytes())
    return enc


def _tampered_record(ws, d):
    rec = json.loads(ws.record.read_text())
    rec["model"]["path"], rec["model"]["sha256"] = str(ws.smoke), "0" * 64  # not the file that answered
    (d / "tampered.json").write_text(json.dumps(rec))
    return d / "tampered.json"


def _truncated_gguf(ws, d):
    return _cut(ws.smoke, d, "model.gguf", 0.3)


def _swapped_gguf(ws, d):  # an ONNX encoder under a GGUF's name
    return _w("model.gguf", (ws.text_encoder / "model.onnx").read_bytes())(d)


def _kb_jsonl_bad_utf8(ws, d):
    return _w("kb.jsonl", b'{"id": "a", "text": "caf\xff\xfe in the pleural space"}\n')(d)


def _mcq_bad_utf8(ws, d):
    return _w("mcq.jsonl", b'{"id": "q", "question": "caf\xff?", "options": ["A. x", "B. y"], "answer": "A"}\n')(d)


def _damaged_log_home(ws, d):
    home = private_home(d, None)
    (home / "answers.sqlite").write_bytes(b"this is not a database" * 100)
    return home


FAULT_CASES = [
    Fault("0-byte image", lambda ws, d: _ask(_w("empty.png", b"")(d)), r"empty \(0 bytes\)", 2),
    Fault("truncated PNG", lambda ws, d: _ask(_cut(ws.png, d, "cut.png", 0.4)), "corrupt or truncated", 2),
    Fault("truncated JPEG", lambda ws, d: _ask(_w("cut.jpg", b"\xff\xd8\xff\xe0\x00\x10JFIF\x00")(d)),
          "corrupt or truncated|not a recognised image", 2),
    Fault("decompression bomb", lambda ws, d: _ask(_bomb_png(d)), "too large to decode safely", 2),
    Fault("text file named .png", lambda ws, d: _ask(_w("notes.png", b"patient notes\n" * 50)(d)),
          "not a recognised image", 2),
    Fault("zip named .jpg", lambda ws, d: _ask(_zip_as_jpg(d)), "not a recognised image", 2),
    Fault("PDF named .dcm", lambda ws, d: _ask(_w("scan.dcm", b"%PDF-1.4\n" + b"0" * 400)(d)),
          "DICOM", 2),
    Fault("directory as image", lambda ws, d: _ask(d), "not a file", 2),
    Fault("non-UTF-8 prompt", lambda ws, d: _ask(ws.png, "caf\udcff\udcfe which code?"), "not valid Unicode", 2),
    Fault("1 MB prompt", lambda ws, d: _ask(ws.png, "pneumothorax? " * 75_000), "limit is 20,000", 2),
    Fault("empty prompt", lambda ws, d: _ask(ws.png, "   "), "question is empty", 2),
    Fault("option letters that skip B", lambda ws, d: ["ask", ws.png, QUESTION, "-o", "A. CT", "-o", "C. MRI"],
          "option 2 is lettered C, expected B", 2),
    Fault("truncated GGUF", lambda ws, d: _ask(ws.png, QUESTION, "--model", _truncated_gguf(ws, d), "--no-retrieval",
                                               "--no-cdir"), "model|GGUF|gguf", loads_model=True),
    Fault("ONNX file named .gguf", lambda ws, d: _ask(ws.png, QUESTION, "--model", _swapped_gguf(ws, d),
                                                      "--no-retrieval", "--no-cdir"), "not a GGUF model file",
          loads_model=True),
    Fault("truncated ONNX encoder", lambda ws, d: [
        "pack", "build", "text", write_kb_jsonl(d / "kb.jsonl"), "--out", d / "new", "--name", "new", "--version",
        "1", "--encoder", _encoder_copy(ws, d, "truncated"), "-q"], "sha256|size|truncated|bytes"),
    Fault("swapped ONNX encoder", lambda ws, d: [
        "pack", "build", "text", write_kb_jsonl(d / "kb.jsonl"), "--out", d / "new", "--name", "new", "--version",
        "1", "--encoder", _encoder_copy(ws, d, "swapped"), "-q"], "sha256|size"),
    Fault("tampered pack manifest", lambda ws, d: _ask(ws.png, QUESTION, "--pack", _tampered_manifest(ws, d)),
          "manifest"),
    Fault("swapped pack file", lambda ws, d: _ask(ws.png, QUESTION, "--pack", _swapped_pack_file(ws, d)),
          "docs.sqlite"),
    Fault("pack built with another encoder", lambda ws, d: ["pack", "search", _other_encoder_pack(ws, d),
                                                            "pneumothorax"], "encoder"),
    Fault("image encoder for a text pack", lambda ws, d: [
        "pack", "build", "text", write_kb_jsonl(d / "kb.jsonl"), "--out", d / "new", "--name", "new", "--version",
        "1", "--encoder", ws.image_encoder, "-q"], "text encoder"),
    Fault("text pack as image pack", lambda ws, d: _ask(ws.png, QUESTION, "--pack", ws.kb, "--image-pack", ws.kb),
          "not an image pack", 2),
    Fault("non-UTF-8 pack source", lambda ws, d: [
        "pack", "build", "text", _kb_jsonl_bad_utf8(ws, d), "--out", d / "new", "--name", "new", "--version", "1",
        "--encoder", ws.text_encoder, "-q"], "not valid UTF-8", 2),
    Fault("image pack with a bomb", lambda ws, d: [
        "pack", "build", "images", _w("captions.csv", f"image,caption\n{_bomb_png(d)},a bomb\n".encode())(d),
        "--out", d / "new", "--encoder", ws.image_encoder, "-q"], "too large to decode safely", 2),
    Fault("non-UTF-8 eval dataset", lambda ws, d: ["eval", _mcq_bad_utf8(ws, d), "--model", ws.smoke, "--out",
                                                   d / "ev"], "not UTF-8", 2),
    Fault("eval image missing", lambda ws, d: ["eval", write_mcq(d / "mcq.jsonl", [d / "gone.png"]), "--model",
                                               ws.smoke, "--out", d / "ev", "--on-error", "fail"], "not found", 2),
    Fault("truncated record for report", lambda ws, d: [
        "report", _cut(ws.record, d, "rec.json", 0.5), "-o", d / "r.html"], "not valid JSON", 2),
    Fault("replay of a record whose model changed", lambda ws, d: ["replay", _tampered_record(ws, d), "--image",
                                                                   ws.png], "sha256"),
    Fault("damaged answer log", lambda ws, d: ["logs"], "damaged or not a SQLite database"),
    Fault("search a pack with a swapped file", lambda ws, d: ["pack", "search", _swapped_pack_file(ws, d), "x"],
          "docs.sqlite"),
    Fault("missing image", lambda ws, d: _ask(d / "gone.png"), "not found", 2),
    Fault("unknown option", lambda ws, d: ["pack", "verify", ws.kb, "--from", "x"], "No such option: --from", 2),
    Fault("option value of the wrong type", lambda ws, d: _ask(ws.png, QUESTION, "--seed", "seven"),
          "Invalid value for '--seed'", 2),
    Fault("missing argument", lambda ws, d: ["report", "-o", d / "r.html"], "Missing argument", 2),
    Fault("unknown command", lambda ws, d: ["nosuchcommand"], "No such command", 2),
]


def _stable(tree: dict) -> dict:
    """A data directory's allowed side effects: the sha256 cache of model files (a cache, rebuilt at will)."""
    return {k: v for k, v in tree.items() if not k.endswith("sha256-cache.json")}


@pytest.mark.parametrize("case", FAULT_CASES, ids=[c.name for c in FAULT_CASES])
def test_fault_gives_one_error_line_and_leaves_nothing_behind(case: Fault, fws, tmp_path, monkeypatch, capfd):
    from medrwr_edge.cli import main

    home = _damaged_log_home(fws, tmp_path) if case.name == "damaged answer log" else fws.home
    monkeypatch.setenv("MEDRWR_EDGE_HOME", str(home))
    if not case.loads_model:  # the fault must be caught before any model is loaded (and no slow default model runs)
        from medrwr_edge.runtime import backends

        def no_model(*a, **k):
            raise AssertionError("the model was loaded: the fault was not caught before loading it")

        monkeypatch.setattr(backends, "load_backend", no_model)
    args = [str(a) for a in case.argv(fws, tmp_path)]
    shared_before, own_before = snapshot(fws.root), snapshot(tmp_path)
    capfd.readouterr()
    with pytest.raises(SystemExit) as info:  # anything else escaping main() would be a traceback
        main(args)
    out, err = capfd.readouterr()

    line = assert_one_error_line(Outcome(info.value.code, err), case.code, case.match)
    assert "\n" not in line and len(line) < 600
    assert _stable(snapshot(fws.root)) == _stable(shared_before), "a failed command changed the shared workspace"
    own_after = snapshot(tmp_path)
    assert own_after == own_before, f"left behind: {sorted(set(own_after) - set(own_before))}"


def test_non_utf8_bytes_on_a_real_command_line(fws, tmp_path):
    """What a shell really passes: raw bytes that are not UTF-8 (Python sees them as surrogate escapes)."""
    import subprocess

    from cli_harness import cli_argv, cli_env

    argv = [a.encode() if isinstance(a, str) else a for a in cli_argv(["ask", str(fws.png)])]
    proc = subprocess.run(argv + [b"caf\xff\xfe: which code?", b"-o", b"A. I60.9", b"-o", b"B. \xc3"],
                          env=cli_env(fws.home), capture_output=True, cwd=tmp_path, timeout=120)
    assert_one_error_line(proc, 2, "not valid Unicode")
    assert list(tmp_path.iterdir()) == []


def test_shared_workspace_is_still_intact(fws):
    """After every fault: the packs verify in full and the answer log is a sound database with its one entry."""
    from medrwr_edge.kb_pack.pack import Pack

    for p in (fws.kb, fws.ref):
        with Pack.open(p, verify="full"):
            pass
    with sqlite3.connect(fws.home / "answers.sqlite") as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        assert conn.execute("SELECT count(*) FROM answers").fetchone()[0] == 1


def test_verify_commands_exit_non_zero_on_damage(fws, tmp_path):
    """`pack verify` / `models verify` report problems as lines and must exit 1 (they once exited 0: typer returns
    the code of typer.Exit in non-standalone mode, and cli.main dropped it)."""
    damaged = _copy_pack(fws.kb, tmp_path, "kb")
    data = bytearray((damaged / "docs.sqlite").read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte: same size, other sha256
    (damaged / "docs.sqlite").write_bytes(bytes(data))
    proc = run_cli(["pack", "verify", damaged], fws.home)
    assert proc.returncode == 1 and b"modified" in proc.stderr and b"Traceback" not in proc.stderr
    assert run_cli(["pack", "verify", fws.kb], fws.home).returncode == 0

    home = private_home(tmp_path / "h", None)
    src = fws.smoke.parent
    copy = Path(shutil.copytree(src, home / "models" / src.name))
    gguf = copy / fws.smoke.name
    with open(gguf, "r+b") as f:  # same size, other bytes
        f.seek(gguf.stat().st_size - 10)
        f.write(b"\x00" * 10)
    proc = run_cli(["models", "verify", src.name], home)
    assert proc.returncode == 1 and b"Traceback" not in proc.stderr, text(proc.stdout + proc.stderr)


def test_there_are_at_least_twenty_fault_cases():
    assert len(FAULT_CASES) >= 20 and len({c.name for c in FAULT_CASES}) == len(FAULT_CASES)


def test_installed_model_swapped_for_another_gguf_is_refused(tmp_path, monkeypatch, fws):
    """Right name, wrong file: an installed model replaced by another GGUF must be refused, not silently used."""
    from medrwr_edge import assets
    from medrwr_edge.errors import ModelError

    src = fws.smoke.parent
    models = tmp_path / "models"
    shutil.copytree(src, models / src.name, symlinks=False)
    gguf = models / src.name / fws.smoke.name
    data = bytearray(gguf.read_bytes())
    data[-1000:] = bytes(1000)  # same size and header, other weights
    gguf.write_bytes(bytes(data))
    monkeypatch.setenv("MEDRWR_EDGE_HOME", str(tmp_path))
    with pytest.raises(ModelError):
        assets.installed_path(src.name)


# ------------------------------------------------------------------ disk full during a pack build


def test_disk_full_during_pack_build_then_retry(fws, tmp_path, monkeypatch, capfd):
    from medrwr_edge.cli import main
    from medrwr_edge.kb_pack import build

    monkeypatch.setenv("MEDRWR_EDGE_HOME", str(fws.home))
    src = tmp_path / "src.jsonl"
    src.write_text("".join(json.dumps({"id": f"d{i}", "text": f"document {i} about finding {i % 7}"}) + "\n"
                           for i in range(300)))
    out = tmp_path / "pack"
    args = ["pack", "build", "text", str(src), "--out", str(out), "--name", "full", "--version", "1", "--encoder",
            str(fws.text_encoder), "-q"]
    real_write = build.atomic_write_bytes
    calls = {"n": 0}

    def write_until_full(path, data):
        calls["n"] += 1
        if Path(path).name == "batch-000001.npy":  # the second batch of embeddings hits a full disk
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real_write(path, data)

    monkeypatch.setattr(build, "atomic_write_bytes", write_until_full)
    with pytest.raises(SystemExit) as info:
        main(args)

    assert_one_error_line(Outcome(info.value.code, capfd.readouterr().err), 1,
                          "No space left on device.*run the same command again")
    assert not out.exists() and not list(tmp_path.glob(".pack.*.partial"))
    assert (tmp_path / "pack.partial-work" / "batch-000000.npy").is_file()  # the finished batch is kept

    def sqlite_full(*a, **k):  # now the disk fills while the pack itself is written
        raise sqlite3.OperationalError("database or disk is full")

    monkeypatch.setattr(build, "atomic_write_bytes", real_write)
    monkeypatch.setattr(build, "_write_sqlite_rows", sqlite_full)
    with pytest.raises(SystemExit) as info:
        main(args)
    assert_one_error_line(Outcome(info.value.code, capfd.readouterr().err), 1, "disk is full")
    assert not out.exists() and not list(tmp_path.glob(".pack.*.partial"))

    monkeypatch.undo()
    monkeypatch.setenv("MEDRWR_EDGE_HOME", str(fws.home))
    main(args)  # space freed: the same command finishes (reusing the saved batch) and the pack verifies
    from medrwr_edge.kb_pack.pack import Pack

    with Pack.open(out, verify="full") as pack:
        assert pack.doc_count == 300
    assert not (tmp_path / "pack.partial-work").exists()


# ------------------------------------------------------------------ Ctrl-C, resume, concurrency (subprocesses)


def _partials(folder: Path) -> list[str]:
    return [p.name for p in folder.iterdir() if p.name.endswith(".partial") or ".partial." in p.name]


@pytest.mark.slow
def test_sigint_during_pack_build_leaves_no_pack_and_the_rerun_resumes(fws, tmp_path, text_encoder):
    src = tmp_path / "src.jsonl"
    src.write_text("".join(json.dumps({"id": f"d{i}", "text": f"entry {i}: pleural air {i % 13}"}) + "\n"
                           for i in range(1000)))
    out = tmp_path / "pack"
    args = ["pack", "build", "text", src, "--out", out, "--name", "big", "--version", "1", "--encoder",
            fws.text_encoder, "-q"]
    env = {"SOURCE_DATE_EPOCH": "1700000000"}
    proc = start_cli(args, fws.home, extra_env=env)
    first_batch = tmp_path / "pack.partial-work" / "batch-000000.npy"
    assert interrupt_when(proc, first_batch.is_file), "the build finished before it could be interrupted"
    _, err = proc.communicate(timeout=120)

    assert_one_error_line(Outcome(proc.returncode, err), 130, "interrupted")
    assert not out.exists() and not _partials(tmp_path)
    saved = sorted(p.name for p in (tmp_path / "pack.partial-work").glob("batch-*.npy"))
    assert saved and len(saved) < 4  # 1000 documents are 4 batches of 256: it stopped part-way

    done = run_cli(args, fws.home, extra_env=env)
    assert done.returncode == 0, text(done.stderr)
    assert run_cli(["pack", "verify", out], fws.home).returncode == 0
    assert not (tmp_path / "pack.partial-work").exists() and not _partials(tmp_path)
    # the resumed pack is byte-identical to one built in a single go
    import os

    from medrwr_edge.kb_pack.build import build_text_pack
    from medrwr_edge.kb_pack.sources import read_text_source

    os.environ["SOURCE_DATE_EPOCH"] = env["SOURCE_DATE_EPOCH"]
    try:
        clean = build_text_pack(list(read_text_source(src)), tmp_path / "clean", text_encoder, name="big",
                                version="1", source_description=src.name, build_params={"chunk_words": 0},
                                progress=False)
    finally:
        del os.environ["SOURCE_DATE_EPOCH"]
    assert snapshot(out) == snapshot(clean)


@pytest.mark.slow
@pytest.mark.real_model
def test_sigint_during_eval_keeps_whole_records_and_the_rerun_completes(fws, tmp_path):
    mcq = write_mcq(tmp_path / "mcq.jsonl", [fws.png, None, fws.png, None])
    out = tmp_path / "eval"
    args = ["eval", mcq, "--model", fws.smoke, "--pack", fws.kb, "--image-pack", fws.ref, "--modes",
            "plain,retrieval", "--out", out, "--max-tokens", "24", "--ctx", "2048", "--threads", "1", "--no-progress",
            "--json"]
    journal = out / "records.jsonl"
    proc = start_cli(args, fws.home)
    started = interrupt_when(proc, lambda: journal.is_file() and journal.read_bytes().count(b"\n") >= 1)
    assert started, "the eval finished before it could be interrupted"
    _, err = proc.communicate(timeout=120)

    assert_one_error_line(Outcome(proc.returncode, err), 130, "interrupted")
    assert "run the same command again to continue" in text(err)
    assert not (out / "summary.json").exists()
    lines = journal.read_bytes().split(b"\n")
    assert all(json.loads(x) for x in lines[:-1]) and len(lines) - 1 < 8
    done = run_cli(args, fws.home)
    assert done.returncode == 0, text(done.stderr)
    records = [json.loads(x) for x in journal.read_text().splitlines()]
    assert sorted((r["item_id"], r["mode"]) for r in records) == sorted(
        (f"q{k}", m) for k in range(4) for m in ("plain", "retrieval"))
    assert json.loads(done.stdout)["modes"]["plain"]["n"] == 4 and (out / "summary.json").is_file()


@pytest.mark.slow
def test_sigint_during_export_leaves_nothing_and_the_rerun_verifies(fws, tmp_path):
    from fixtures_qwen import converter_source, require_export_deps, tiny_checkpoint

    require_export_deps()
    converter_source()  # skips, saying how to fetch it, when the converter is not cached
    ckpt = tiny_checkpoint()
    out = tmp_path / "bundle"
    args = ["export", "model", ckpt, out, "--quant", "f32", "--no-mmproj", "--no-parity", "--no-image-encoder"]
    proc = start_cli(args, fws.home)
    assert interrupt_when(proc, lambda: bool(_partials(tmp_path))), "the export finished before the interrupt"
    _, err = proc.communicate(timeout=120)

    assert_one_error_line(Outcome(proc.returncode, err), 130, "interrupted")
    assert list(tmp_path.iterdir()) == []  # neither OUT nor a hidden partial directory
    done = run_cli(args, fws.home)
    assert done.returncode == 0, text(done.stderr)
    assert run_cli(["export", "verify", out], fws.home).returncode == 0


@pytest.mark.slow
@pytest.mark.real_model
def test_two_asks_sharing_a_data_directory_both_succeed(fws, tmp_path):
    import subprocess

    home = private_home(tmp_path, installed_models_dir())
    args = _ask(fws.png, QUESTION, "--model", fws.smoke, "--pack", fws.kb, "--image-pack", fws.ref, "--json",
                "--max-tokens", "24", "--ctx", "2048", "--threads", "1")
    procs = [start_cli(args, home) for _ in range(2)]
    results = [p.communicate(timeout=300) for p in procs]
    for p, (out, err) in zip(procs, results):
        assert p.returncode == 0, text(err)
    records = [json.loads(out) for out, _ in results]
    db = home / "answers.sqlite"
    with sqlite3.connect(db) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        logged = [json.loads(r) for (r,) in conn.execute("SELECT record_json FROM answers ORDER BY id")]
    assert len(logged) == 2 and all(r["answer"] == records[0]["answer"] for r in logged)
    def steps(rec):  # without timings (a retrieve step carries its search time)
        return [{k: v for k, v in st.items() if k != "seconds"} for st in rec["steps"]]

    assert steps(records[0]) == steps(records[1])  # greedy: same answer, however the two interleaved
    kv = list((home / "prefix-cache").glob("*.kv"))
    assert kv and not list((home / "prefix-cache").glob(".*.tmp"))
    third = run_cli(args, home)  # a later ask restores the shared prefix cache and still gives the same answer
    assert third.returncode == 0, text(third.stderr)
    rec3 = json.loads(third.stdout)
    assert rec3["tokens"].get("prompt_cached", 0) > 0 and steps(rec3) == steps(records[0])
    assert subprocess.run([sys.executable, "-c", "import sqlite3,sys; c=sqlite3.connect(sys.argv[1]); "
                           "print(c.execute('select count(*) from answers').fetchone()[0])", str(db)],
                          capture_output=True, text=True).stdout.strip() == "3"


@pytest.mark.slow
@pytest.mark.real_model
def test_chat_refuses_bad_messages_one_line_each_and_goes_on(fws, tmp_path):
    """An interactive session is not ended by a bad message: each gets one error line, nothing is logged for it."""
    home = private_home(tmp_path, installed_models_dir())
    stdin = ("pneumothorax? " * 75_000 + "\n").encode() + b"caf\xff\xfe which code?\n/image " + \
        str(tmp_path / "gone.png").encode() + b"\n/quit\n"
    proc = run_cli(["chat", "--model", fws.smoke, "--no-retrieval", "--max-tokens", "8", "--ctx", "2048",
                    "--threads", "1"], home, stdin=stdin)
    err = text(proc.stderr)
    assert "Traceback" not in err and proc.returncode == 0, err
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(lines) == 3, err
    assert "limit is 20,000" in lines[0] and "not valid Unicode" in lines[1] and "not found" in lines[2]
    log = home / "answers.sqlite"
    assert not log.exists() or sqlite3.connect(log).execute("SELECT count(*) FROM answers").fetchone()[0] == 0


# ------------------------------------------------------------------ no pickle / unsafe torch.load anywhere


UNSAFE = [
    (re.compile(r"\bpickle\.loads?\(|\bcPickle\b|\bjoblib\.load\("), "pickle load"),
    (re.compile(r"\bdill\.|cloudpickle"), "pickle variant"),
    (re.compile(r"allow_pickle\s*=\s*True"), "numpy pickle"),
    (re.compile(r"torch\.load\("), "torch.load without weights_only=True"),  # unless its arguments say so
    (re.compile(r"\bpd\.read_pickle\(|\.read_pickle\("), "pandas pickle"),
]


SCANNERS = {"tests/test_faults.py", "tests/test_hygiene.py"}  # they hold the patterns themselves


def _call_arguments(code: str, open_paren: int) -> str:
    """The text between a call's parentheses (nested parentheses balanced)."""
    depth = 0
    for i in range(open_paren, len(code)):
        depth += {"(": 1, ")": -1}.get(code[i], 0)
        if depth == 0:
            return code[open_paren + 1 : i]
    return code[open_paren + 1 :]


def unsafe_uses(code: str) -> list[tuple[int, str]]:
    found = []
    for pattern, what in UNSAFE:
        for m in pattern.finditer(code):
            if what.startswith("torch.load") and re.search(r"weights_only\s*=\s*True",
                                                           _call_arguments(code, m.end() - 1)):
                continue
            found.append((code.count("\n", 0, m.start()) + 1, what))
    return found


def test_no_pickle_or_unsafe_torch_load_in_any_python_file():
    """The whole repository (package, tests, benchmarks, scripts), not only the runtime package."""
    problems = []
    for path in sorted(ROOT.rglob("*.py")):
        rel = path.relative_to(ROOT)
        if rel.parts[0].startswith(".") or rel.parts[0] in ("build", "dist") or rel.as_posix() in SCANNERS:
            continue
        for line, what in unsafe_uses(path.read_text(encoding="utf-8", errors="replace")):
            problems.append(f"{rel}:{line}: {what}")
    assert not problems, "\n".join(problems)


def test_the_scan_is_not_blind():
    sample = ("x = torch.load(f)\ny = torch.load(str(f), map_location='cpu', weights_only=True)\n"
              "np.load(p, allow_pickle=True)\npickle.loads(b)\nz = torch.load(open(f), weights_only=False)\n")
    assert sorted(what for _, what in unsafe_uses(sample)) == [
        "numpy pickle", "pickle load", "torch.load without weights_only=True", "torch.load without weights_only=True"]
