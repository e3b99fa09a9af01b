"""The HTML evidence report: content, escaping, privacy, atomic writes, and rendering in a real headless Chromium."""

from __future__ import annotations

import base64
import io
import json
import os
import re
import shutil
import subprocess

import pytest
from PIL import Image

from evidence_helpers import (  # noqa: F401  (fixtures)
    QUESTION,
    evidence_packs,
    fake_encoders,
    input_png,
    record_json,
    run_scripted,
)
from medrwr_edge.errors import InputError

CLI_MAIN = "from medrwr_edge.cli import main; main()"  # what the `medrwr-edge` console script runs
from medrwr_edge.evidence.report import render_report, write_report


@pytest.fixture
def cdir_record(evidence_packs, fake_encoders, input_png, medrwr_home):
    text_pack, image_pack, _ = evidence_packs
    rec = run_scripted(text_pack, image_pack, input_png)
    assert rec.cdir() is not None and rec.cdir().changed  # the scenario this file is about
    return rec


def _data_uris(page: str) -> list[bytes]:
    return [base64.b64decode(m) for m in re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)]


def test_report_shows_queries_passages_answer_gauge_and_cdir(cdir_record, input_png, evidence_packs):
    rec = cdir_record
    page = render_report(rec, images=[input_png])
    # the question, every option, the final answer and the first (pre-CDIR) answer marked
    assert QUESTION in page and "Pneumothorax" in page and "Bronchiectasis" in page
    assert re.search(r'<li class="chosen" data-letter="A">', page)
    assert re.search(r'<li class="before" data-letter="B">', page)
    # the query highlighted, each retrieved passage expandable with pack, doc id and score
    assert '<mark class="q">&lt;query&gt; &quot;pneumothorax&quot; &lt;/query&gt;</mark>' in page
    docs = rec.retrievals()[0].docs
    assert len(docs) == 3
    for d in docs:
        assert f'data-doc-id="{d.doc_id}"' in page and f'data-score="{d.score:.6f}"' in page
        assert f"score {d.score:.3f}" in page
    assert page.count('<details class="passage" data-pack="icd-fake"') == 3
    # confidence gauges against the threshold: the first answer below, the answer after CDIR above
    cdir = rec.cdir()
    assert re.search(r'id="gauge-before".*?class="gauge below".*?data-confidence="0\.4200" data-threshold="0\.8000"',
                     page, re.S)
    assert re.search(r'id="confidence-gauge".*?class="gauge above".*?data-confidence="0\.9300"', page, re.S)
    # CDIR: input and reference side by side, the caption, whether the answer changed
    # the input image is a copy of ref-0, so CDIR brings the next most similar case instead of itself
    assert cdir.reference_caption in page and cdir.reference_doc_id != "ref-0"
    assert 'id="cdir-verdict"' in page and "CDIR changed the answer: B → A" in page
    assert f'<figure class="reference" data-sha256="{cdir.reference_image_sha256}"><img src="data:image/png' in page
    pngs = _data_uris(page)
    assert len(pngs) == 3  # input (inputs section), input again (CDIR, side by side), reference
    for png in pngs:
        im = Image.open(io.BytesIO(png))
        assert im.format == "PNG" and max(im.size) <= 320
    # provenance for replay
    for p in rec.packs:
        assert p["manifest_sha256"] in page
    assert rec.model["sha256"] in page


def test_report_is_self_contained(cdir_record, input_png):
    page = render_report(cdir_record, images=[input_png])
    assert "Content-Security-Policy" in page and "default-src 'none'" in page
    # nothing is fetched: every src/href is a data: URI, and there are no scripts, links, iframes or @imports
    for attr in re.findall(r'\b(?:src|href)="([^"]*)"', page):
        assert attr.startswith("data:"), attr
    for bad in ("<script", "<link", "<iframe", "@import", "url(", "http://", "https://"):
        assert bad not in page.lower(), bad


def test_all_text_is_escaped(evidence_packs, fake_encoders, input_png, medrwr_home):
    text_pack, image_pack, _ = evidence_packs
    evil = '<script>alert(1)</script>"><img src=x onerror=alert(2)>'
    outputs = [f"<think> {evil} </think>\n<query> {evil} </query>", f"<answer> A {evil} </answer>"]
    rec = run_scripted(text_pack, None, input_png, outputs=outputs)
    rec.question = "Q " + evil
    rec.notes.append(evil)
    page = render_report(rec, images=[input_png])
    assert "<script" not in page and "onerror=alert" not in page.replace("onerror=alert(2)&gt;", "")
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "<img src=x" not in page


def test_dicom_input_becomes_an_anonymous_thumbnail(evidence_packs, fake_encoders, medrwr_home, tmp_path):
    import pydicom
    import pydicom.data

    dcm = pydicom.data.get_testdata_file("CT_small.dcm")
    patient = str(pydicom.dcmread(dcm).PatientName)
    assert patient
    rec = run_scripted(evidence_packs[0], None, dcm)
    page = render_report(rec, images=[dcm])
    assert patient not in page and patient.replace("^", " ") not in page
    (png,) = _data_uris(page)
    im = Image.open(io.BytesIO(png))
    assert im.format == "PNG" and not im.text  # no text chunks: nothing from the DICOM header rides along
    assert b"DICM" not in png


def test_wrong_image_is_refused_and_nothing_is_written(cdir_record, tmp_path):
    other = tmp_path / "other.png"
    Image.new("RGB", (32, 32), (1, 2, 3)).save(other)
    out = tmp_path / "r.html"
    with pytest.raises(InputError, match="not an input of this record"):
        write_report(cdir_record, out, images=[other])
    assert list(tmp_path.glob("r.html*")) == [] and not list(tmp_path.glob(".r.html*"))


def test_missing_images_and_pack_still_render_with_a_reason(cdir_record, tmp_path):
    rec = cdir_record.to_dict()
    for p in rec["packs"]:
        p["path"] = str(tmp_path / "moved-away")
    page = render_report(rec)
    assert "give the image file with --image" in page
    assert "reference image not shown" in page and "<img" not in page


def test_tampered_reference_image_is_not_shown(cdir_record, evidence_packs, tmp_path):
    image_pack = evidence_packs[1]
    copy = tmp_path / "ref-copy"
    shutil.copytree(image_pack, copy)
    for png in (copy / "images").glob("*.png"):
        Image.new("RGB", (8, 8), (0, 0, 0)).save(png)
    page = render_report(cdir_record, image_pack=copy)
    assert "the pack&#x27;s copy differs from the one used" in page


def test_write_report_is_atomic(cdir_record, tmp_path, input_png):
    out = tmp_path / "report.html"
    assert write_report(cdir_record, out, images=[input_png]) == out
    assert out.read_text("utf-8").startswith("<!DOCTYPE html>")
    with pytest.raises(InputError, match="directory"):
        write_report(cdir_record, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["report.html", "input.png"])


def test_open_ended_answer_gauge_has_no_threshold(evidence_packs, fake_encoders, medrwr_home):
    rec = run_scripted(evidence_packs[0], None, None, outputs=["<answer> a collapsed lung </answer>"], options=[])
    assert rec.confidence_kind == "mean-answer-token"
    page = render_report(rec)
    assert re.search(r'id="confidence-gauge".*?class="gauge neutral"', page, re.S)
    assert "data-threshold" not in page and "no CDIR threshold applies" in page


def test_open_ended_and_no_answer_records(evidence_packs, fake_encoders, medrwr_home):
    rec = run_scripted(evidence_packs[0], None, None, outputs=["<think> unsure </think>"], options=[])
    assert rec.status == "no-answer"
    page = render_report(rec)
    assert "No answer" in page and "Open-ended question" in page and "No image" in page


def test_cli_report_from_file_stdin_and_log_id(cdir_record, tmp_path, input_png, medrwr_home):
    from typer.testing import CliRunner

    from medrwr_edge.cli import app
    from medrwr_edge.evidence.log import append_record

    path = record_json(tmp_path, cdir_record)
    runner = CliRunner()
    res = runner.invoke(app, ["report", str(path), "-o", str(tmp_path / "a.html"), "--image", str(input_png)])
    assert res.exit_code == 0, res.output
    assert "data:image/png" in (tmp_path / "a.html").read_text("utf-8")
    res = runner.invoke(app, ["report", "-", "-o", str(tmp_path / "b.html")], input=path.read_text("utf-8"))
    assert res.exit_code == 0, res.output
    log_id = append_record(cdir_record)
    res = runner.invoke(app, ["report", str(log_id), "-o", str(tmp_path / "c.html")])
    assert res.exit_code == 0, res.output
    assert "CDIR changed the answer" in (tmp_path / "c.html").read_text("utf-8")


def test_cli_report_bad_record_is_one_line(tmp_path, medrwr_home):
    import subprocess
    import sys

    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"schema": "something-else"}), "utf-8")
    for arg in (str(bad), str(tmp_path / "missing.json"), "not-a-record"):
        proc = subprocess.run([sys.executable, "-c", CLI_MAIN, "report", arg, "-o", str(tmp_path / "x.html")],
                              capture_output=True, text=True, env={**os.environ, "MEDRWR_EDGE_HOME": str(medrwr_home)})
        lines = [l for l in proc.stderr.splitlines() if l.strip()]
        assert proc.returncode != 0 and len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert not (tmp_path / "x.html").exists()


# ------------------------------------------------------------------------------------ a real headless browser


def _chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    pytest.skip("Chromium is not installed (apt-get install -y chromium; .ci/run installs it)")


def _run_chromium(tmp_path, *args) -> subprocess.CompletedProcess:
    cmd = [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
           "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-extensions",
           "--disable-dev-shm-usage", f"--user-data-dir={tmp_path / 'chromium-profile'}", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


def test_report_renders_in_headless_chromium(cdir_record, input_png, tmp_path):
    rec = cdir_record
    rec.question = "Which diagnosis fits? <script>document.title='pwned'</script>"
    out = write_report(rec, tmp_path / "report.html", images=[input_png])
    url = out.resolve().as_uri()

    proc = _run_chromium(tmp_path, "--dump-dom", url)
    dom = proc.stdout
    assert proc.returncode == 0 and "<body>" in dom, proc.stderr[-2000:]
    # the browser parsed the page into the elements a reader needs
    for element_id in ("question", "answer", "inputs", "cdir", "reasoning", "provenance", "final-answer",
                       "confidence-gauge", "gauge-before", "cdir-verdict"):
        assert f'id="{element_id}"' in dom, element_id
    assert dom.count('<details class="passage"') == 3
    assert len(re.findall(r'<mark class="q">', dom)) >= 2  # the query step and the whole-turn view
    assert re.search(r'<figure class="reference"[^>]*><img src="data:image/png;base64,', dom)
    assert re.search(r'<figure class="input"[^>]*><img src="data:image/png;base64,', dom)
    # the question's <script> stayed text: no script element exists, and it did not run (it would retitle the page)
    assert "<script" not in dom and "<title>pwned</title>" not in dom
    assert "&lt;script&gt;document.title='pwned'&lt;/script&gt;" in dom
    assert "CDIR changed the answer" in dom

    shot = tmp_path / "report.png"
    proc = _run_chromium(tmp_path, f"--screenshot={shot}", "--window-size=1200,1800", "--hide-scrollbars", url)
    assert proc.returncode == 0 and shot.is_file(), proc.stderr[-2000:]
    im = Image.open(shot).convert("RGB")
    assert im.size == (1200, 1800)
    # not a blank page: text, the gauges and the thumbnails give many distinct colours
    colours = im.getcolors(maxcolors=1 << 20)
    assert colours is not None and len(colours) > 50
