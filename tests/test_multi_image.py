"""Several images for one question: a current study and its priors (labels, order, modalities, CDIR per study,
the record, the report and the CLI), on the scripted backend, the real SmolLM2-135M and the tiny Qwen2.5-VL."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from evidence_helpers import (  # noqa: F401  (fixtures)
    PROBS,
    QUERY_THEN_ANSWER,
    QUESTION,
    OPTIONS,
    assert_valid,
    evidence_packs,
    fake_encoders,
    input_png,
    run_scripted,
)
from medrwr_edge.errors import InputError
from medrwr_edge.runtime import protocol as P
from medrwr_edge.runtime.backend import ImageInput, SamplingSettings
from medrwr_edge.runtime.loop import LoopConfig, MedRwRLoop, ReferenceImage
from medrwr_edge.runtime.scripted_backend import ScriptedBackend
from medrwr_edge.evidence.record import EvidenceRecord
from medrwr_edge.runtime.studies import prepare_studies

PRIOR = ImageInput(pixels=None, sha256="aa" * 32, role="prior", study_date="2023-04-01")
CURRENT = ImageInput(pixels=None, sha256="cc" * 32, role="current", study_date="2024-01-10")
MCQ = P.parse_options(["A. Larger", "B. Smaller", "C. Unchanged"])


class RefPerImage:
    """An image retriever whose reference depends on the study (by sha256), so the CDIR block shows which is which."""

    def __init__(self):
        self.looked_up = []

    def nearest(self, image):
        self.looked_up.append(image.sha256)
        tag = image.sha256[:2]
        return ReferenceImage("refs", "1", f"ref-{tag}", f"caption for {tag}", 0.9, "ee" * 32)


def _run(outputs, images, *, vision=False, probs=None, cfg=None):
    be = ScriptedBackend(outputs, probs=probs, has_vision=vision)
    imgs = RefPerImage()
    cfg = cfg or LoopConfig(sampling=SamplingSettings(max_tokens=400), generation_reserve_tokens=64)
    rec = EvidenceRecord(question="q", options=[], images=[], model={}, packs=[], settings={})
    MedRwRLoop(be, None, imgs, cfg).run(rec, "Has the effusion grown?", MCQ, list(images))
    return rec, be, imgs


# ------------------------------------------------------------------------------------------------ prompt


def test_vision_prompt_labels_each_study_with_its_date_and_keeps_the_system_prompt():
    rec, be, _ = _run(["<answer> A </answer>"], [PRIOR, CURRENT], vision=True)
    assert rec.prompt.startswith("<|im_start|>system\n" + P.SYSTEM_PROMPT_IMAGE + "<|im_end|>\n")
    assert ("<|im_start|>user\nPrior study (2023-04-01):\n<|vision_start|><|image_pad|><|vision_end|>\n"
            "Current study (2024-01-10):\n<|vision_start|><|image_pad|><|vision_end|>\nHas the effusion grown?\n"
            "A. Larger\n") in rec.prompt
    assert be.cache_text().count("<image>") == 2  # each image went to the backend as its own part


def test_single_image_prompt_is_unchanged_and_several_priors_are_numbered():
    rec, *_ = _run(["<answer> A </answer>"], [CURRENT], vision=True)
    assert "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>Has the effusion grown?" in rec.prompt
    older = ImageInput(None, "bb" * 32, "prior", None)
    labels = P.study_labels([older, PRIOR, ImageInput(None, "cc" * 32, "current")])
    assert labels == ["Prior study 1:", "Prior study 2 (2023-04-01):", "Current study:"]


def test_text_model_gets_the_labels_as_text_and_cdir_looks_up_every_study():
    rec, be, imgs = _run(["<answer> A </answer>", "<answer> B </answer>"], [PRIOR, CURRENT],
                         probs={"A": 0.3, "B": 0.9})
    assert "<|image_pad|>" not in rec.prompt and "<image>" not in be.cache_text()
    assert (f"user\nPrior study (2023-04-01): {P.IMAGE_NOT_VISIBLE}\nCurrent study (2024-01-10): "
            f"{P.IMAGE_NOT_VISIBLE}\nHas the effusion grown?") in rec.prompt
    assert any("the 2 images were not shown" in n for n in rec.notes)
    cdir = rec.cdir()
    assert sorted(imgs.looked_up) == sorted([PRIOR.sha256, CURRENT.sha256])
    assert ("<retrieve> (1) Prior study (2023-04-01): caption for aa\n(2) Current study (2024-01-10): caption for cc\n"
            " </retrieve>\n") in cdir.block
    assert cdir.reference_doc_id == "ref-cc"  # the top-level reference is still the current study's
    assert [(r["index"], r["role"], r["reference_doc_id"]) for r in cdir.references] == [
        (0, "prior", "ref-aa"), (1, "current", "ref-cc")]
    assert rec.letter == "B" and be.cache_text().endswith(rec.assistant_text)


def test_vision_model_cdir_consults_the_current_study_only():
    rec, _, imgs = _run(["<answer> A </answer>", "<answer> B </answer>"], [PRIOR, CURRENT], vision=True,
                        probs={"A": 0.3})
    assert imgs.looked_up == [CURRENT.sha256]  # it sees the prior itself
    assert rec.cdir().block == P.cdir_block("caption for cc")  # the reference's single-image layout
    assert [r["role"] for r in rec.cdir().references] == ["current"]


# -------------------------------------------------------------------------------------- files: order, checks


PATIENT_NAME, PATIENT_ID, ACCESSION = "ZZPRIORTEST^ANNA", "PRIOR-ID-5531", "ACC-PRIOR-8812"


def _dicom(path, date, modality="CT", rows=64):
    """A small identified DICOM (fake name, ID and accession number that must never leak)."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
    ds.PatientName, ds.PatientID, ds.AccessionNumber = PATIENT_NAME, PATIENT_ID, ACCESSION
    if date is not None:
        ds.StudyDate = date
    ds.Modality = modality
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.Rows = ds.Columns = rows
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    y, x = np.mgrid[0:rows, 0:rows]
    ds.PixelData = ((x * 37 + y * 11) % 4096).astype(np.uint16).tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


def test_priors_are_sorted_by_study_date_when_all_are_dated(tmp_path):
    newer = _dicom(tmp_path / "a.dcm", "20230401", rows=64)
    older = _dicom(tmp_path / "b.dcm", "20210615", rows=80)  # another size: normal for a prior
    current = _dicom(tmp_path / "c.dcm", "20240110", rows=96)
    images, records, notes = prepare_studies([newer, older, current])
    assert [(r["role"], r["index"], r["study_date"]) for r in records] == [
        ("prior", 0, "2021-06-15"), ("prior", 1, "2023-04-01"), ("current", 2, "2024-01-10")]
    assert [r["width"] for r in records] == [80, 64, 96]
    assert [im.study_date for im in images] == ["2021-06-15", "2023-04-01", "2024-01-10"]
    assert any("StudyDate order" in n for n in notes)
    # one undated prior: the order given is kept (a date is never guessed)
    _dicom(tmp_path / "u.dcm", None)
    _, records, notes = prepare_studies([newer, tmp_path / "u.dcm", current])
    assert [r["study_date"] for r in records] == ["2023-04-01", None, "2024-01-10"] and not notes
    # a "prior" dated after the current study is kept but flagged
    _, _, notes = prepare_studies([current, newer])
    assert any("dated after the current study" in n for n in notes)


def test_mixed_modalities_are_refused_unless_allowed(tmp_path):
    ct = _dicom(tmp_path / "ct.dcm", "20230401", "CT")
    mr = _dicom(tmp_path / "mr.dcm", "20240101", "MR")
    from medrwr_edge.runtime.cli_options import worded

    with pytest.raises(InputError, match="different modalities given together \\(CT vs MR\\).*allow_mixed") as info:
        prepare_studies([mr, ct])
    assert "(--allow-mixed-modalities to compare them anyway)" in worded(info.value)  # the CLI words the field
    _, records, notes = prepare_studies([mr, ct], allow_mixed_modalities=True)
    assert len(records) == 2 and any("different modalities were compared (CT vs MR" in n for n in notes)
    # CR and DX are both radiographs
    cr, dx = _dicom(tmp_path / "cr.dcm", None, "CR"), _dicom(tmp_path / "dx.dcm", None, "DX")
    assert len(prepare_studies([cr, dx])[0]) == 2
    # no DICOM modality: greyscale vs a colour photograph
    grey, colour = tmp_path / "grey.png", tmp_path / "colour.png"
    Image.fromarray(np.full((40, 60), 90, np.uint8)).save(grey)
    Image.fromarray(np.dstack([np.full((50, 50), v, np.uint8) for v in (200, 60, 30)])).save(colour)
    with pytest.raises(InputError, match="greyscale vs colour"):
        prepare_studies([colour, grey])
    assert len(prepare_studies([ct, grey])[0]) == 2  # a CT and a greyscale PNG may well be the same modality


def test_independent_figures_are_numbered_and_not_held_to_study_rules(evidence_packs, fake_encoders, tmp_path,
                                                                      medrwr_home):
    """images_are_studies=False (e.g. an MMMU item's <image 1>, <image 2>): no prior/current, no modality rule."""
    ct = _dicom(tmp_path / "ct.dcm", "20240110", "CT")
    mr = _dicom(tmp_path / "mr.dcm", "20230401", "MR")
    images, records, notes = prepare_studies([ct, mr], as_studies=False)
    assert [(r["role"], r["index"]) for r in records] == [("image", 0), ("image", 1)] and not notes
    assert P.study_labels(images) == ["Image 1:", "Image 2:"]
    rec = run_scripted(evidence_packs[0], None, [ct, mr], outputs=["<answer> A </answer>"], images_are_studies=False)
    assert f"Image 1: {P.IMAGE_NOT_VISIBLE}\nImage 2: {P.IMAGE_NOT_VISIBLE}\n" in rec.prompt
    assert_valid(rec.to_dict())


def test_record_report_and_prompt_carry_dates_but_no_identifiers(evidence_packs, fake_encoders, tmp_path, medrwr_home):
    from medrwr_edge.evidence.report import render_report

    prior = _dicom(tmp_path / "p.dcm", "20230401")
    current = _dicom(tmp_path / "c.dcm", "20240110")
    text_pack, image_pack, _ = evidence_packs
    rec = run_scripted(text_pack, image_pack, [prior, current])
    d = rec.to_dict()
    assert_valid(d)
    assert [(im["role"], im["index"], im["study_date"]) for im in d["images"]] == [
        ("prior", 0, "2023-04-01"), ("current", 1, "2024-01-10")]
    assert "Prior study (2023-04-01):" in rec.prompt and "Current study (2024-01-10):" in rec.prompt
    page = render_report(rec, images=[current, prior])  # any order: matched by sha256
    assert "Prior study (2023-04-01)" in page and "Current study (2024-01-10)" in page
    assert page.count('<figure class="input prior"') == 1 and page.count('<figure class="input current"') == 1
    for identifier in (PATIENT_NAME, "ZZPRIORTEST", PATIENT_ID, ACCESSION):
        assert identifier not in json.dumps(d) and identifier not in page


# ------------------------------------------------------------------------------------------------ the CLI


def _cli(args, home, env_extra=None):
    import os

    env = {**os.environ, "MEDRWR_EDGE_HOME": str(home)}
    return subprocess.run([sys.executable, "-c", "from medrwr_edge.cli import main; main()", *args],
                          capture_output=True, text=True, env=env)


def test_cli_prior_json_and_report(evidence_packs, fake_encoders, input_png, tmp_path, medrwr_home, monkeypatch):
    from typer.testing import CliRunner

    from evidence_helpers import _png
    from medrwr_edge.cli import app
    from medrwr_edge.runtime import backends

    monkeypatch.setattr(backends, "load_backend", lambda model, settings: ScriptedBackend(QUERY_THEN_ANSWER, probs=PROBS))
    prior = _png(tmp_path / "prior.png", (60, 190, 60), size=(100, 90), pattern=2)
    text_pack, image_pack, _ = evidence_packs
    report = tmp_path / "r.html"
    args = ["ask", str(input_png), QUESTION, *sum((["-o", o] for o in OPTIONS), []), "--prior", str(prior),
            "--pack", str(text_pack), "--image-pack", str(image_pack), "--json", "--no-log", "--report", str(report)]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    rec = json.loads(res.stdout)
    assert_valid(rec)
    assert [im["role"] for im in rec["images"]] == ["prior", "current"]
    assert len(next(s for s in rec["steps"] if s["type"] == "cdir")["references"]) == 2
    page = report.read_text()
    assert page.count("data:image/png;base64,") >= 2 and "Prior study" in page and "Current study" in page


def test_cli_bad_multi_image_input_is_one_line(tmp_path):
    ct = _dicom(tmp_path / "ct.dcm", "20240110", "CT")
    mr = _dicom(tmp_path / "mr.dcm", "20230401", "MR")
    for args, expect in (
        (["ask", str(ct), "Changed?", "--prior", str(mr), "--no-retrieval", "--no-cdir"], "different modalities"),
        (["ask", "-", "Changed?", "--prior", str(mr), "--no-retrieval"], "--prior needs a current image"),
        (["ask", str(ct), "Changed?", "--prior", str(tmp_path / "missing.png"), "--no-retrieval"], "not found"),
    ):
        proc = _cli(args, tmp_path / "home")
        lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
        assert proc.returncode != 0 and len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
        assert expect in lines[0] and "Traceback" not in proc.stderr


# ------------------------------------------------------------------------------------- real small models


@pytest.mark.real_model
def test_real_model_two_image_ask_through_the_cli(smoke_gguf, small_icd_pack, small_image_pack, ct_png, tmp_path,
                                                  monkeypatch):
    # (no private data dir: the packs' locked encoders are the installed ones; --no-log writes nothing there)
    """SmolLM2-135M (text-only) with a prior and a current study: the labels reach the real model as text, it is
    forced to query and answer, its own probability for the answer is below a 1.0 threshold, so CDIR looks up
    the nearest reference of BOTH studies and the real model regenerates after them."""
    from typer.testing import CliRunner

    from forcing import ForcedPasses
    from medrwr_edge.cli import app
    from medrwr_edge.paths import sha256_file
    from medrwr_edge.runtime import backends
    from medrwr_edge.runtime.llama_backend import LlamaBackend

    from medrwr_edge.imaging import load_image

    prior = tmp_path / "prior.png"  # the same slice, flipped and smaller: another size, same modality
    Image.fromarray(load_image(ct_png).pixels[::-1, :, :]).resize((100, 100)).save(prior)
    made = []

    def real(model, settings):
        be = LlamaBackend(str(smoke_gguf), n_ctx=4096, sha256=sha256_file(smoke_gguf), n_threads=1)
        made.append(be)
        return ForcedPasses(be, {0: "<think> compare the studies </think>\n<query> pneumothorax </query>",
                                 1: " </think>\n<answer> A </answer>"})

    monkeypatch.setattr(backends, "load_backend", real)
    args = ["ask", str(ct_png), "Is the finding new?", "-o", "A. Pneumothorax", "-o", "B. Asthma", "--prior",
            str(prior), "--pack", str(small_icd_pack), "--image-pack", str(small_image_pack), "--threshold", "1.0",
            "--max-tokens", "12", "--json", "--no-log"]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    rec = json.loads(res.stdout)
    assert_valid(rec)
    assert [im["role"] for im in rec["images"]] == ["prior", "current"]
    assert [im["sha256"] for im in rec["images"]] == [sha256_file(prior), sha256_file(ct_png)]
    assert "Prior study:" in rec["prompt"] and "Current study:" in rec["prompt"]
    cdir = next(s for s in rec["steps"] if s["type"] == "cdir")
    assert 0 < cdir["confidence_before"] < 1.0 and [r["role"] for r in cdir["references"]] == ["prior", "current"]
    assert "(1) Prior study:" in cdir["block"] and "(2) Current study:" in cdir["block"]
    assert rec["model"]["backend"] == "llama.cpp" and rec["tokens"]["generated"] > 0  # the CDIR pass is the model's
    t = rec["tokens"]
    assert t["decoded"] == t["prompt"] + t["generated"] + t["inserted"]


def _hf_logits(images, labels, tail):
    """Transformers reference for the loop's labelled layout: text between the images, HF's own rope index."""
    import torch
    from transformers import AutoImageProcessor, AutoTokenizer

    from fixtures_qwen import tiny_checkpoint, tiny_torch_model

    ck = tiny_checkpoint()
    tok = AutoTokenizer.from_pretrained(ck)
    proc = AutoImageProcessor.from_pretrained(ck, use_fast=False)
    config = json.loads((ck / "config.json").read_text())
    batch = proc(images=list(images), return_tensors="pt")
    ids = tok("<|im_start|>user\n")["input_ids"]
    for grid, label in zip(batch["image_grid_thw"], labels):
        ids += tok(label + "\n")["input_ids"] + tok("<|vision_start|>")["input_ids"]
        ids += [config["image_token_id"]] * (int(grid.prod()) // proc.merge_size**2)
        ids += tok("<|vision_end|>")["input_ids"] + tok("\n")["input_ids"]
    ids += tok(tail)["input_ids"]
    with torch.no_grad():
        out = tiny_torch_model()(input_ids=torch.tensor([ids]), pixel_values=batch["pixel_values"],
                                 image_grid_thw=batch["image_grid_thw"])
    return out.logits[0, -1].float().numpy()


@pytest.mark.slow
def test_tiny_qwen25vl_embeds_each_labelled_study_with_the_right_positions():
    """The multimodal backend on the loop's own multi-image layout (labels between the images, two sizes) gives
    the logits transformers gives; each image takes max(merged h, w) positions and text resumes after it."""
    from fixtures_qwen import tiny_f32_gguf, tiny_image, tiny_spec, tiny_vision_onnx
    from medrwr_edge.runtime.multimodal_backend import QwenVLBackend

    pixels = [tiny_image(300, 220, 1), tiny_image(196, 252, 2)]
    images = [ImageInput(pixels[0], "aa" * 32, "prior", "2023-04-01"), ImageInput(pixels[1], "cc" * 32, "current")]
    labels = P.study_labels(images)
    tail = "Has it grown? A. yes B. no<|im_end|>\n<|im_start|>assistant\n"
    parts = P.chatml_prompt("S", tail[: -len("<|im_end|>\n<|im_start|>assistant\n")], images, vision=True,
                            labels=labels)
    parts[0] = parts[0][parts[0].index("<|im_start|>user"):]  # the reference below has no system turn
    ref = _hf_logits(pixels, labels, tail)
    with QwenVLBackend(tiny_f32_gguf(), tiny_vision_onnx(), tiny_spec(), n_ctx=2048) as be:
        be.prefill(parts)
        out = be.last_logits()[: ref.shape[0]]
        assert be.images_seen == 2
        pos, toks = be.positions(), be.tokens()
        image_runs = [i for i, t in enumerate(toks) if t == be.image_pad_token]
        first_run_end = next(i for i in image_runs if i + 1 not in image_runs)
        # 300x220 -> 308x224 -> merged grid 8 x 11: the text after it starts 11 positions after the image's start
        assert pos[first_run_end + 1] == pos[image_runs[0]] + 11
    assert np.abs(out - ref).max() < 1e-2 and out.argmax() == ref.argmax()


@pytest.mark.slow
def test_tiny_qwen25vl_bundle_answers_about_a_prior_and_a_current_study(small_icd_pack, small_image_pack, ct_png,
                                                                        tmp_path):
    """The whole loop on the exported bundle with two studies of different sizes: both go through the ONNX vision
    encoder with their labels, the forced answer carries the real vision model's probability, and CDIR (forced by
    a threshold of 1.0) consults the current study only, since this model sees the prior itself."""
    from fixtures_qwen import tiny_bundle
    from forcing import ForcedPasses
    from medrwr_edge.imaging import load_image
    from medrwr_edge.runtime.api import ask
    from medrwr_edge.runtime.multimodal_backend import load_bundle

    prior = tmp_path / "prior.png"
    Image.fromarray(load_image(ct_png).pixels[:, ::-1, :]).resize((140, 112)).save(prior)
    be = load_bundle(tiny_bundle(), n_ctx=4096)
    try:
        forced = ForcedPasses(be, {0: "<think> compare </think>\n<answer> A </answer>",
                                   1: "<think> same </think>\n<answer> A </answer>"})
        rec = ask([prior, ct_png], "Is the finding new?", ["A. Yes", "B. No"], packs=[small_icd_pack],
                  image_pack=small_image_pack, backend=forced, max_tokens=8, cdir_threshold=1.0)
        assert be.images_seen == 3  # prior, current, and CDIR's reference image (issue 18)
        assert ("Prior study:\n<|vision_start|><|image_pad|><|vision_end|>\nCurrent study:\n<|vision_start|>"
                in rec.prompt)
        assert [im["role"] for im in rec.images] == ["prior", "current"]
        assert [(im["width"], im["height"]) for im in rec.images][0] == (140, 112)
        cdir = rec.cdir()
        assert cdir is not None and 0 < cdir.confidence_before < 1
        assert [r["role"] for r in cdir.references] == ["current"] and cdir.block.startswith(P.CDIR_THINK)
        t = rec.tokens
        assert t["decoded"] == t["prompt"] + t["generated"] + t["inserted"]
        assert be.n_tokens() == t["decoded"] - t["rolled_back"]
        assert_valid(rec.to_dict())
    finally:
        be.close()


def test_the_answer_log_keeps_only_the_year_of_study_dates_and_replay_still_matches(evidence_packs, fake_encoders,
                                                                                     tmp_path, medrwr_home):
    """The record keeps full dates (the model compares intervals); the log cuts them to the year everywhere,
    and replaying the logged answer cuts the new run's dates the same way before comparing."""
    from medrwr_edge.evidence.log import AnswerLog, log_if_enabled
    from medrwr_edge.evidence.replay import replay
    from evidence_helpers import PROBS, QUERY_THEN_ANSWER

    prior = _dicom(tmp_path / "p.dcm", "20230401")
    current = _dicom(tmp_path / "c.dcm", "20240110")
    text_pack, image_pack, _ = evidence_packs
    rec = run_scripted(text_pack, image_pack, [prior, current])
    assert "2023-04-01" in rec.prompt
    log_id = log_if_enabled(rec, "ask")
    with AnswerLog() as log:
        logged = log.record(log_id)
    text = json.dumps(logged)
    assert "2023-04-01" not in text and "2024-01-10" not in text and "20230401" not in text
    assert "Prior study (2023):" in logged["prompt"]
    result = replay(logged, [prior, current], backend=ScriptedBackend(QUERY_THEN_ANSWER, probs=PROBS))
    assert result.identical, result.differences


def test_frame_picks_a_slice_of_a_multi_frame_current_image_and_is_replayed(evidence_packs, fake_encoders, tmp_path,
                                                                            medrwr_home, capsys):
    """--frame N: the chosen slice of a multi-frame DICOM is used, recorded in the settings and reused by replay."""
    from medrwr_edge.cli import main
    from medrwr_edge.evidence.replay import replay
    from evidence_helpers import PROBS, QUERY_THEN_ANSWER
    from phi_dicom import write_dicom

    series = write_dicom(tmp_path / "series.dcm", frames=5)
    text_pack, image_pack, _ = evidence_packs
    middle = run_scripted(text_pack, image_pack, series)
    chosen = run_scripted(text_pack, image_pack, series, frame=1)
    assert middle.images[0]["meta"]["frame_index"] == 2 and chosen.images[0]["meta"]["frame_index"] == 1
    assert chosen.settings["frame"] == 1
    again = replay(chosen.to_dict(), [series], backend=ScriptedBackend(QUERY_THEN_ANSWER, probs=PROBS))
    assert again.identical and again.replayed.images[0]["meta"]["frame_index"] == 1
    with pytest.raises(SystemExit) as e:
        main(["ask", str(series), "Which finding?", "--frame", "9", "--no-retrieval", "--no-log"])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code != 0 and len(err) == 1 and err[0].startswith("error: frame 9 out of range")
