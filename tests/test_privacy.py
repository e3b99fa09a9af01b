"""DICOM privacy: every command that takes an image runs on DICOMs carrying recognisable fake identifiers
(tests/phi_dicom.py); then stdout, stderr, log records, warnings and every file written under the data directory
and the output folders (SQLite files read as bytes, base64 images in HTML reports decoded) are searched for each
identifier. Also: windowing from the file's own centre/width, multi-frame -> the chosen slice, and error lines for
corrupt identified DICOMs that do not quote them.

The main run is in-process through `medrwr_edge.cli.main` with the scripted backend standing in for the LLM (the
packs and encoders are real); `test_real_model_run_leaks_nothing` repeats ask/replay/logs/report with the real
SmolLM2 in a subprocess; EXTRA_COMMANDS (chat /image, history add of a DICOM SR + ask --history, ask --prior) and
`serve` likewise. Add a command with one `PrivacyCase` line.
"""

from __future__ import annotations

import base64
import json
import logging
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pytest

import phi_dicom
from cli_harness import (OPTIONS, QUESTION, assert_one_error_line, files_under, installed_models_dir, private_home,
                         run_cli, text, write_kb_jsonl, write_mcq, write_phantom_pngs)
from medrwr_edge.errors import InputError
from medrwr_edge.imaging import load_image

QUERY_THEN_ANSWER = [
    "<think> A hyperdense focus on head CT. </think>\n<query> subarachnoid hemorrhage </query>",
    " The entries describe nontraumatic bleeding. </think>\n<answer> B </answer>",
    "<think> The reference slice shows the same level. </think>\n<answer> A </answer>",
]
PROBS = {"B": 0.42, "A": 0.93}  # the first answer is below the CDIR threshold, so CDIR runs too


# ------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def dicoms(tmp_path_factory):
    return phi_dicom.write_all(tmp_path_factory.mktemp("phi-dicoms"))


@pytest.fixture(scope="module")
def encoders():
    from medrwr_edge import assets
    from medrwr_edge.errors import MedrwrError

    try:
        return Path(assets.default_text_encoder_dir()), Path(assets.default_image_encoder_dir())
    except MedrwrError as e:
        pytest.skip(f"{e} (run `medrwr-edge models install --smoke`)")


def _identified_outputs(paths, extra_texts=()) -> dict[str, list[str]]:
    """{where: [identifiers found]} over files (bytes, plus decoded base64 data: URIs) and captured texts."""
    leaks: dict[str, list[str]] = {}
    for label, data in extra_texts:
        found = phi_dicom.find_phi(data)
        if found:
            leaks[label] = found
    for path in paths:
        data = path.read_bytes()
        blobs = [data, str(path).encode()]
        if path.suffix in (".html", ".htm", ".json", ".jsonl"):
            for m in re.finditer(rb"base64,([A-Za-z0-9+/=]+)", data):
                blobs.append(base64.b64decode(m.group(1)))
        found = sorted({s for b in blobs for s in phi_dicom.find_phi(b)})
        if found:
            leaks[str(path)] = found
    return leaks


class CliRun:
    """`medrwr-edge ARGS` in this process (cli.main), collecting everything it printed."""

    def __init__(self, capfd):
        self.capfd = capfd
        self.outputs: list[tuple[str, str]] = []

    def __call__(self, *args, ok: bool = True) -> tuple[int, str, str]:
        from medrwr_edge.cli import main

        argv = [str(a) for a in args]
        try:
            main(argv)
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
        out, err = self.capfd.readouterr()
        label = " ".join(argv[:3])
        self.outputs += [(f"stdout of {label}", out), (f"stderr of {label}", err)]
        if ok:
            assert code == 0, f"{argv}: exit {code}\n{err[-2000:]}"
        else:
            assert code != 0, f"{argv} should have failed"
            lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
            assert len(lines) == 1 and "Traceback" not in err, err
        return code, out, err


# ------------------------------------------------------------------ imaging facts about the identified files


def test_phantom_dicoms_are_windowed_from_their_own_centre_and_width(dicoms):
    lo = phi_dicom.WINDOW_CENTER - phi_dicom.WINDOW_WIDTH / 2
    for key, frame, shift in (("single", None, 0), ("multi", None, 2), ("multi", 0, 0), ("multi", 4, 4)):
        img = load_image(dicoms[key], frame=frame)
        assert img.meta["window"] == {"type": "dicom", "center": phi_dicom.WINDOW_CENTER,
                                      "width": phi_dicom.WINDOW_WIDTH}
        hu = phi_dicom.phantom_hu(shift=shift)
        expected = np.clip(hu - lo, 0, phi_dicom.WINDOW_WIDTH) * 255.0 / phi_dicom.WINDOW_WIDTH
        assert np.abs(img.pixels[:, :, 0].astype(float) - expected).max() <= 0.5 + 1e-6
        assert img.meta["number_of_frames"] == (5 if key == "multi" else 1)
        assert img.meta["frame_index"] == (2 if frame is None and key == "multi" else frame or 0)
        assert not phi_dicom.find_phi(repr(img) + json.dumps(img.meta))


@pytest.mark.parametrize("key,message", [("nopixels", "no pixel data"), ("truncated", "corrupt or truncated")])
def test_identified_dicom_errors_do_not_quote_identifiers(dicoms, key, message, caplog):
    caplog.set_level(logging.DEBUG)
    with pytest.raises(InputError, match=message) as info:
        load_image(dicoms[key])
    assert not phi_dicom.find_phi(str(info.value))
    assert not phi_dicom.find_phi(" ".join(r.getMessage() for r in caplog.records))


def test_cli_error_line_for_a_corrupt_identified_dicom(dicoms, tmp_path):
    """The real CLI in a subprocess: one error line, no identifier, for each command that reads an image."""
    home = private_home(tmp_path, None)
    for args in (["ask", dicoms["truncated"], QUESTION, "--no-retrieval", "--no-cdir"],
                 ["ask", dicoms["nopixels"], QUESTION],
                 ["pack", "search", tmp_path / "no-pack", "--image", dicoms["truncated"]]):
        proc = run_cli(args, home)
        line = assert_one_error_line(proc)
        assert not phi_dicom.find_phi(proc.stdout + proc.stderr), line
    assert not _identified_outputs(files_under(home))


# ------------------------------------------------------------------ every command, scripted model


@pytest.fixture
def scripted(monkeypatch):
    from medrwr_edge.runtime import backends
    from medrwr_edge.runtime.scripted_backend import ScriptedBackend

    monkeypatch.setattr(backends, "load_backend", lambda model, settings: ScriptedBackend(QUERY_THEN_ANSWER, probs=PROBS))


def test_every_command_on_identified_dicoms_leaks_nothing(dicoms, encoders, scripted, tmp_path, monkeypatch, capfd,
                                                         caplog, recwarn):
    text_enc, image_enc = encoders
    home = private_home(tmp_path, installed_models_dir())
    monkeypatch.setenv("MEDRWR_EDGE_HOME", str(home))
    monkeypatch.delenv("MEDRWR_EDGE_NO_LOG", raising=False)
    caplog.set_level(logging.DEBUG)
    out = tmp_path / "out"
    out.mkdir()
    src = tmp_path / "src"
    png = write_phantom_pngs(src, 1)[0]
    captions = src / "captions.csv"
    captions.write_text("image,caption,id\n"
                        f"{dicoms['single']},Axial CT of the head in a soft-tissue window,ref-dicom-single\n"
                        f"{dicoms['multi']},Axial CT of the head: middle slice of a short series,ref-dicom-multi\n"
                        f"{png},Axial CT of the head: rendered phantom,ref-png\n", encoding="utf-8")
    kb_src = write_kb_jsonl(src / "kb.jsonl")
    mcq = write_mcq(src / "mcq.jsonl", [dicoms["single"], dicoms["multi"], dicoms["truncated"]])
    opts = sum((["-o", o] for o in OPTIONS), [])
    run = CliRun(capfd)

    # image pack from identified DICOMs, text pack
    run("pack", "build", "images", captions, "--out", out / "ref", "--name", "ref", "--encoder", image_enc, "-q",
        "--json")
    run("pack", "build", "text", kb_src, "--out", out / "kb", "--name", "kb", "--version", "1", "--encoder", text_enc,
        "-q")
    packs = ["--pack", out / "kb", "--image-pack", out / "ref"]
    # ask: JSON + report, stream view + report, multi-frame
    _, record_json, _ = run("ask", dicoms["single"], QUESTION, *opts, "--model", "scripted", *packs, "--json",
                            "--report", out / "single.html")
    record = json.loads(record_json)
    assert record["images"][0]["format"] == "dicom" and record["steps"]
    assert any(s["type"] == "cdir" for s in record["steps"]), "CDIR should have run on the identified image"
    (out / "record.json").write_text(record_json, encoding="utf-8")
    run("ask", dicoms["multi"], QUESTION, *opts, "--model", "scripted", *packs, "--report", out / "multi.html")
    run("ask", dicoms["multi"], "Describe the finding.", "--model", "scripted", *packs)  # open-ended
    # the log, reports from the log and from a record file, search by image
    run("logs")
    run("logs", "--json", "-n", "0")
    run("logs", "--id", "1")
    run("report", "1", "-o", out / "from-log.html", "--image", dicoms["single"], "--image-pack", out / "ref")
    run("report", out / "record.json", "-o", out / "from-file.html", "--image", dicoms["single"])
    run("pack", "search", out / "ref", "--image", dicoms["multi"], "-k", "2", "--json")
    run("pack", "info", out / "ref", "--json")
    run("pack", "verify", out / "ref")
    # eval on an image MCQ set of identified DICOMs, one of them corrupt (recorded as an item error)
    run("eval", mcq, "--model", "scripted", *packs, "--modes", "plain,retrieval+cdir", "--out", out / "eval",
        "--no-progress", "--json")
    records = [json.loads(line) for line in (out / "eval" / "records.jsonl").read_text().splitlines()]
    assert len(records) == 6 and sum(bool(r["error"]) for r in records) == 2
    run("eval-summary", out / "eval")
    # failures on identified files: one error line each
    run("ask", dicoms["truncated"], QUESTION, *opts, "--model", "scripted", *packs, ok=False)
    run("ask", dicoms["nopixels"], QUESTION, *opts, "--model", "scripted", *packs, "--json", ok=False)
    bad = src / "bad-captions.csv"
    bad.write_text(f"image,caption\n{dicoms['truncated']},a truncated file\n", encoding="utf-8")
    run("pack", "build", "images", bad, "--out", out / "bad", "--encoder", image_enc, "-q", ok=False)
    run("pack", "search", out / "ref", "--image", dicoms["nopixels"], ok=False)

    texts = run.outputs + [("log records", " ".join(r.getMessage() for r in caplog.records)),
                           ("warnings", " ".join(str(w.message) for w in recwarn))]
    written = files_under(home) + files_under(out)
    assert any(p.name == "answers.sqlite" for p in written) and any(p.suffix == ".png" for p in written)
    leaks = _identified_outputs(written, texts)
    assert not leaks, "patient identifiers leaked:\n" + "\n".join(f"{k}: {v}" for k, v in leaks.items())


# ------------------------------------------------------------------ the real model, and commands still to come


@dataclass
class PrivacyCase:
    name: str
    # (identified DICOM paths, workspace with model.gguf, this test's folder) -> [(CLI arguments, stdin or None)]
    commands: Callable[[dict, Path, Path], list]


def pending(command: str, owner: str):
    return pytest.mark.skip(reason=f"enable when `medrwr-edge {command}` lands (helper '{owner}'): remove pending() "
                                   f"from its PrivacyCase in tests/test_privacy.py")


def _small(ws: Path) -> list:
    return ["--model", ws / "model.gguf", "--max-tokens", "16", "--ctx", "2048", "--threads", "1"]


EXTRA_COMMANDS = [
    pytest.param(PrivacyCase("chat /image", lambda d, ws, t: [
        (["chat", *_small(ws), "--no-retrieval", "--save", t / "chat-session.json"],
         f"/image {d['multi']}\nWhat is shown?\n/sources\n/image {d['truncated']}\n/quit\n".encode()),
        (["chat", *_small(ws), "--no-retrieval", "--image", d["single"], "--json"], b"What is shown?\n")]),
        id="chat-image"),
    pytest.param(PrivacyCase("history add SR, ask --history", lambda d, ws, t: [
        (["history", "add", "pt-0001", d["sr"], "--date", "2024-01-02"], None),
        (["history", "list"], None),
        (["history", "show", "pt-0001"], None),
        (["ask", d["single"], QUESTION, *sum((["-o", o] for o in OPTIONS), []), *_small(ws), "--pack", ws / "kb",
          "--history", "pt-0001", "--json", "--report", t / "history.html"], None),
        (["logs", "--json"], None)]), id="history-sr"),
    pytest.param(PrivacyCase("ask --prior", lambda d, ws, t: [
        (["ask", d["single"], QUESTION, "--prior", d["multi"], *_small(ws), "--no-retrieval", "--json", "--report",
          t / "prior.html"], None),
        (["replay", "1", "--image", d["multi"], "--image", d["single"]], None)]), id="ask-prior"),
]


@pytest.fixture(scope="module")
def real_ws(tmp_path_factory, smoke_gguf, text_encoder):
    """ws/model.gguf (SmolLM2, linked) and ws/kb (a small real text pack)."""
    from cli_harness import KB_DOCS
    from medrwr_edge.kb_pack.build import build_text_pack
    from medrwr_edge.kb_pack.documents import Document

    ws = tmp_path_factory.mktemp("real-privacy")
    (ws / "model.gguf").symlink_to(smoke_gguf)
    build_text_pack([Document(id=i, text=f"{i} {t}") for i, t in KB_DOCS], ws / "kb", text_encoder, name="kb",
                    version="1", progress=False)
    return ws


@pytest.mark.slow
@pytest.mark.real_model
def test_real_model_run_leaks_nothing(dicoms, real_ws, tmp_path):
    home = private_home(tmp_path, installed_models_dir())
    model = ["--model", real_ws / "model.gguf", "--max-tokens", "24", "--ctx", "2048", "--threads", "1"]
    procs = [run_cli(["ask", dicoms["multi"], QUESTION, *sum((["-o", o] for o in OPTIONS), []), *model,
                      "--no-retrieval", "--json", "--report", tmp_path / "real.html"], home)]
    assert procs[0].returncode == 0, text(procs[0].stderr)
    record = json.loads(procs[0].stdout)
    assert record["model"]["backend"] != "scripted" and record["images"][0]["meta"]["number_of_frames"] == 5
    procs.append(run_cli(["replay", "1", "--image", dicoms["multi"]], home))
    assert procs[-1].returncode == 0, text(procs[-1].stdout + procs[-1].stderr)
    procs.append(run_cli(["logs", "--json"], home))
    procs.append(run_cli(["report", "1", "-o", tmp_path / "log.html", "--image", dicoms["multi"]], home))
    procs.append(run_cli(["ask", dicoms["truncated"], QUESTION, *model], home))
    assert_one_error_line(procs[-1])
    texts = [(f"output of command {i}", p.stdout + p.stderr) for i, p in enumerate(procs)]
    leaks = _identified_outputs(files_under(home) + files_under(tmp_path), texts)
    assert not leaks, "patient identifiers leaked:\n" + "\n".join(f"{k}: {v}" for k, v in leaks.items())


@pytest.mark.slow
@pytest.mark.real_model
@pytest.mark.parametrize("case", EXTRA_COMMANDS)
def test_other_commands_leak_nothing(case: PrivacyCase, dicoms, real_ws, tmp_path):
    d = dict(dicoms, sr=phi_dicom.write_sr(tmp_path / "inputs" / "report-sr.dcm"))
    home = private_home(tmp_path, installed_models_dir())
    texts = []
    for args, stdin in case.commands(d, real_ws, tmp_path):
        proc = run_cli(args, home, stdin=stdin)
        assert proc.returncode == 0, f"{args[:2]}: {text(proc.stderr)[-2000:]}"
        texts += [(f"stdout of {args[:2]}", proc.stdout), (f"stderr of {args[:2]}", proc.stderr)]
    written = files_under(home) + [p for p in files_under(tmp_path) if "inputs" not in p.parts]
    leaks = _identified_outputs(written, texts)
    assert not leaks, "patient identifiers leaked:\n" + "\n".join(f"{k}: {v}" for k, v in leaks.items())


@pytest.mark.slow
@pytest.mark.real_model
def test_serve_leaks_nothing(dicoms, real_ws, tmp_path):
    """POST identified DICOMs to `medrwr-edge serve`: responses, the HTML report, the server's log output, the data
    directory and the upload temp folder (TMPDIR) must hold no identifier once the server has stopped."""
    import signal
    import socket
    import subprocess

    from cli_harness import cli_env, start_cli

    with socket.socket() as s:  # a free port (bind is local; the test guard refuses only connects)
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    home = private_home(tmp_path, installed_models_dir())
    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir()
    server = start_cli(["serve", "--port", port, "--model", real_ws / "model.gguf", "--no-retrieval", "--ctx", "2048",
                        "--threads", "1"], home, extra_env={"TMPDIR": str(tmpdir)})
    try:
        client = subprocess.run([sys.executable, str(Path(__file__).with_name("serve_client.py")),
                                 f"http://127.0.0.1:{port}", dicoms["multi"],
                                 dicoms["truncated"], tmp_path / "responses.json"], env=cli_env(home),
                                capture_output=True, timeout=600)
    finally:
        server.send_signal(signal.SIGINT)
        out, err = server.communicate(timeout=120)
    assert client.returncode == 0, text(client.stderr)
    responses = json.loads((tmp_path / "responses.json").read_text())
    assert responses[0][0] == 200 and json.loads(responses[0][1])["images"][0]["format"] == "dicom"
    assert 400 <= responses[-1][0] < 500
    texts = [("server stdout", out), ("server stderr", err), ("client output", client.stdout + client.stderr)]
    texts += [(f"response {i}", body) for i, (_, body) in enumerate(responses)]
    leaks = _identified_outputs(files_under(home) + files_under(tmpdir), texts)
    assert not leaks, "patient identifiers leaked:\n" + "\n".join(f"{k}: {v}" for k, v in leaks.items())
    assert not list(tmpdir.rglob("*.dcm")), "an uploaded DICOM was left on disk"


def test_the_search_finds_identifiers_when_they_are_there(dicoms, tmp_path):
    """A control: the grep is not blind (raw DICOM bytes, a SQLite file, a base64 image in HTML)."""
    import sqlite3

    assert set(phi_dicom.find_phi(dicoms["single"].read_bytes())) >= {"ZZTESTPATIENT", "PHI-ID-7731", "ZZSTATION-9"}
    db = tmp_path / "x.sqlite"
    with sqlite3.connect(db) as conn:
        conn.execute("CREATE TABLE t (v TEXT)")
        conn.execute("INSERT INTO t VALUES (?)", (phi_dicom.ACCESSION,))
    page = tmp_path / "x.html"
    page.write_text("<img src='data:image/png;base64," + base64.b64encode(phi_dicom.INSTITUTION.encode()).decode()
                    + "'>")
    leaks = _identified_outputs([db, page])
    assert phi_dicom.ACCESSION in leaks[str(db)] and phi_dicom.INSTITUTION in leaks[str(page)]
    assert sys.modules["phi_dicom"].find_phi("nothing here") == []
