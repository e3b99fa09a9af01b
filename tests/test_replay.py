"""`replay`: hashes verified first, then the answer re-run and compared token for token (scripted and real model)."""

from __future__ import annotations

import copy
import json
import shutil

import pytest

from evidence_helpers import (  # noqa: F401  (fixtures)
    OPTIONS,
    PROBS,
    QUERY_THEN_ANSWER,
    QUESTION,
    assert_valid,
    evidence_packs,
    fake_encoders,
    input_png,
    record_json,
    run_scripted,
)
from medrwr_edge.errors import InputError, IntegrityError, ModelError
from medrwr_edge.evidence.replay import compare, load_source, replay
from medrwr_edge.kb_pack.build import build_text_pack
from medrwr_edge.paths import sha256_file
from medrwr_edge.runtime.backend import BackendInfo
from medrwr_edge.runtime.scripted_backend import ScriptedBackend


@pytest.fixture
def recorded(evidence_packs, fake_encoders, input_png, medrwr_home):
    text_pack, image_pack, _ = evidence_packs
    rec = run_scripted(text_pack, image_pack, input_png)
    assert rec.retrievals() and rec.cdir() is not None and rec.cdir().changed
    return rec


def _backend(outputs=QUERY_THEN_ANSWER, probs=PROBS, model_file=None):
    be = ScriptedBackend(list(outputs), probs=probs)
    if model_file is not None:  # a scripted backend that says it runs this file (for CLI tests)
        be.info = BackendInfo("scripted", str(model_file), sha256_file(model_file), False, 8192, "cpu")
    return be


def test_identical_replay(recorded, input_png):
    result = replay(recorded, [input_png], backend=_backend())
    assert result.identical and result.divergence is None and result.differences == []
    assert result.recorded_pass_tokens == result.replayed_pass_tokens == [p.generated_tokens for p in recorded.passes]
    assert len(result.recorded_pass_tokens) == 3  # query pass, answering pass, CDIR regeneration
    v = "\n".join(result.verified)
    assert "model scripted sha256" in v and "image 1 (current) sha256" in v
    assert "pack icd-fake t1: all files and manifest" in v and "pack ref-fake t1" in v and "encoder" in v
    assert result.replayed.assistant_text == recorded.assistant_text
    assert_valid(result.to_dict(), "replay")


def test_a_record_from_another_device_or_build_is_not_claimed_identical(recorded, input_png, capsys):
    from medrwr_edge.evidence.cli import _print_result

    elsewhere = recorded.to_dict()
    elsewhere["model"].update(device="cuda", gpu_layers=-1, build="llama-cpp-python 0.3.36; CUDA : ARCHS = 890")
    result = replay(elsewhere, [input_png], backend=_backend())
    assert result.identical and not result.same_setup  # same tokens, but not the same computation
    notes = "\n".join(result.notes)
    assert "device was 'cuda', now 'cpu'" in notes and "gpu_layers was -1, now 0" in notes and "build was" in notes
    assert result.to_dict()["same_setup"] is False
    assert_valid(result.to_dict(), "replay")
    _print_result(result)
    out = capsys.readouterr().out
    assert "SAME TOKENS ON ANOTHER SETUP" in out and "not a bit-identical reproduction" in out
    assert "IDENTICAL" not in out
    older = recorded.to_dict()
    del older["model"]["build"]  # a record made before the build was recorded cannot claim the same setup
    again = replay(older, [input_png], backend=_backend())
    assert not again.same_setup and any("does not name its build" in n for n in again.notes)
    assert replay(recorded, [input_png], backend=_backend()).same_setup


def test_divergence_in_the_second_pass_is_located(recorded, input_png):
    changed = list(QUERY_THEN_ANSWER)
    changed[1] = " The entries describe a collapsed lung, so pneumothorax. </think>\n<answer> B </answer>"
    result = replay(recorded, [input_png], backend=_backend(changed))
    assert not result.identical
    d = result.divergence
    # the answering pass was rolled back by CDIR in both runs, so the final turns are equal: the difference is
    # found in that pass's think step, which the record keeps
    assert result.replayed.assistant_text == recorded.assistant_text
    assert (d.where, d.pass_index) == ("think step of pass 1, rolled back by CDIR", 1)
    assert d.offset == len("The entries describe a collapsed lung")
    assert d.replayed.startswith("The entries describe a collapsed lung, so pneumothorax.")
    assert d.recorded.startswith("The entries describe a collapsed lung. </think>")


def test_divergence_without_cdir_points_at_the_pass_and_offset(evidence_packs, fake_encoders, input_png, medrwr_home):
    text_pack = evidence_packs[0]
    rec = run_scripted(text_pack, None, input_png)
    assert rec.cdir() is None and len(rec.passes) == 2
    changed = list(QUERY_THEN_ANSWER)
    changed[1] = " The entries describe a dilated airway. </think>\n<answer> C </answer>"
    result = replay(rec, [input_png], backend=_backend(changed))
    d = result.divergence
    start = len(QUERY_THEN_ANSWER[0]) + len(rec.retrievals()[0].block)
    assert (d.where, d.pass_index) == ("pass 1 (reasoning)", 1)
    assert d.offset == start + len(" The entries describe a ")
    assert d.recorded.endswith("describe a collapsed lung. </think>\n<answer> B </answer>")
    assert "dilated airway" in d.replayed
    assert any(x.startswith("answer: recorded 'B', replayed 'C'") for x in result.differences)


def test_divergence_in_the_query_changes_what_is_retrieved(evidence_packs, fake_encoders, input_png, medrwr_home):
    rec = run_scripted(evidence_packs[0], None, input_png)
    changed = list(QUERY_THEN_ANSWER)
    changed[0] = changed[0].replace("pneumothorax", "bronchiectasis")
    result = replay(rec, [input_png], backend=_backend(changed))
    assert (result.divergence.where, result.divergence.pass_index) == ("pass 0 (reasoning)", 0)
    assert any(x.startswith("retrieved documents") for x in result.differences)


def test_same_text_with_different_token_counts_is_a_divergence(recorded):
    other = copy.deepcopy(recorded)
    other.passes[1].generated_tokens += 1
    identical, d, _ = compare(recorded, other)
    assert not identical and d.pass_index == 1 and "generated" in d.detail
    other = copy.deepcopy(recorded)
    other.prompt = other.prompt.replace("experienced", "seasoned")
    identical, d, _ = compare(recorded, other)
    assert not identical and d.where == "prompt"
    assert compare(recorded, copy.deepcopy(recorded))[0]


# ------------------------------------------------------------------------------------------- refusals


def test_wrong_or_missing_image_is_refused(recorded, tmp_path):
    from PIL import Image

    other = tmp_path / "other.png"
    Image.new("RGB", (40, 40), (9, 9, 9)).save(other)
    with pytest.raises(IntegrityError, match="not the same image"):
        replay(recorded, [other], backend=_backend())
    with pytest.raises(InputError, match="give them again with --image"):
        replay(recorded, [], backend=_backend())
    with pytest.raises(InputError, match="2 given"):
        replay(recorded, [other, other], backend=_backend())


def test_other_model_is_refused(recorded, input_png, tmp_path):
    rec = recorded.to_dict()
    rec["model"]["sha256"] = "1" * 64
    with pytest.raises(IntegrityError, match="not the same model"):
        replay(rec, [input_png], backend=_backend())
    # without an injected backend the model FILE is hashed in full
    model = tmp_path / "m.gguf"
    model.write_bytes(b"GGUF" + b"\0" * 1000)
    rec["model"]["path"] = str(model)
    with pytest.raises(IntegrityError, match="not the same model file"):
        replay(rec, [input_png])
    rec["model"]["path"] = str(tmp_path / "gone.gguf")
    with pytest.raises(ModelError, match="give its location with --model"):
        replay(rec, [input_png])


def test_tampered_or_rebuilt_pack_is_refused(recorded, evidence_packs, input_png, tmp_path):
    from pack_fakes import HashingTextEncoder

    text_pack = evidence_packs[0]
    copy_dir = tmp_path / "icd-copy"
    shutil.copytree(text_pack, copy_dir)
    # an exact copy elsewhere is fine (the pack moved)
    assert replay(recorded, [input_png], packs={"icd-fake": copy_dir}, backend=_backend()).identical
    # one flipped byte in the document store
    docs = copy_dir / "docs.sqlite"
    data = bytearray(docs.read_bytes())
    data[len(data) // 2] ^= 0xFF
    docs.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match="modified"):
        replay(recorded, [input_png], packs={"icd-fake": copy_dir}, backend=_backend())
    # a different build under the same name: intact, but not the pack the answer used
    from evidence_helpers import TEXT_DOCS
    from medrwr_edge.kb_pack.documents import Document

    rebuilt = build_text_pack([Document(id=i, text=t) for i, t in TEXT_DOCS[:5]], tmp_path / "icd-rebuilt",
                              HashingTextEncoder(), name="icd-fake", version="t1", progress=False)
    with pytest.raises(IntegrityError, match="not the same pack"):
        replay(recorded, [input_png], packs={"icd-fake": rebuilt}, backend=_backend())
    with pytest.raises(InputError, match="no pack of that name"):
        replay(recorded, [input_png], packs={"other": copy_dir}, backend=_backend())


def test_missing_locked_encoder_is_refused(recorded, input_png, monkeypatch):
    from medrwr_edge.kb_pack import pack as pack_module

    def missing(manifest, pack_dir):
        raise ModelError(f"pack {pack_dir.name} needs an encoder that is not installed")

    monkeypatch.setattr(pack_module, "_load_locked_encoder", missing)
    with pytest.raises(ModelError, match="not installed"):
        replay(recorded, [input_png], backend=_backend())


def test_sources(recorded, tmp_path, medrwr_home):
    from medrwr_edge.evidence.log import append_record

    path = record_json(tmp_path, recorded)
    data, label = load_source(str(path))
    assert data["assistant_text"] == recorded.assistant_text and label == str(path)
    log_id = append_record(recorded)
    data, label = load_source(str(log_id))
    assert data["assistant_text"] == recorded.assistant_text and label == f"log id {log_id}"
    for bad in ("nope", str(tmp_path / "missing.json")):
        with pytest.raises(InputError):
            load_source(bad)
    (tmp_path / "bad.json").write_text("{not json", "utf-8")
    with pytest.raises(InputError, match="not valid JSON"):
        load_source(str(tmp_path / "bad.json"))
    (tmp_path / "v9.json").write_text(json.dumps({"schema": "medrwr-edge/evidence/9"}), "utf-8")
    with pytest.raises(InputError, match="upgrade"):
        load_source(str(tmp_path / "v9.json"))


# ------------------------------------------------------------------------------------------------- CLI


def test_cli_replay_identical_and_diverged(evidence_packs, fake_encoders, input_png, medrwr_home, tmp_path,
                                           monkeypatch):
    from typer.testing import CliRunner

    from medrwr_edge.cli import app
    from medrwr_edge.evidence.log import append_record
    from medrwr_edge.runtime import backends

    model = tmp_path / "scripted-model.gguf"
    model.write_bytes(b"GGUF scripted stand-in")
    text_pack, image_pack, _ = evidence_packs
    rec = run_scripted(text_pack, image_pack, input_png, backend=_backend(model_file=model))
    assert rec.model["path"] == str(model)
    path = record_json(tmp_path, rec)

    script = {"outputs": QUERY_THEN_ANSWER}
    monkeypatch.setattr(backends, "load_backend", lambda m, settings: _backend(script["outputs"], model_file=m))
    runner = CliRunner()
    res = runner.invoke(app, ["replay", str(path), "--image", str(input_png), "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert_valid(out, "replay")
    assert out["identical"] and out["divergence"] is None
    assert any(line.startswith(f"model {model.name} sha256 {sha256_file(model)[:16]}") for line in out["verified"])

    log_id = append_record(rec)
    res = runner.invoke(app, ["replay", str(log_id), "-i", str(input_png)])
    assert res.exit_code == 0 and f"IDENTICAL: log id {log_id}" in res.output, res.output

    script["outputs"] = [QUERY_THEN_ANSWER[0], " Something else entirely. </think>\n<answer> D </answer>"]
    res = runner.invoke(app, ["replay", str(path), "--image", str(input_png)])
    assert res.exit_code == 3, res.output
    assert "DIVERGED" in res.output and "recorded:" in res.output and "replayed:" in res.output
    res = runner.invoke(app, ["replay", str(path), "--image", str(input_png), "--json"])
    assert res.exit_code == 3
    from medrwr_edge.cli import main

    with pytest.raises(SystemExit) as exited:  # what the console script does: the status reaches the shell
        main(["replay", str(path), "--image", str(input_png)])
    assert exited.value.code == 3
    out = json.loads(res.stdout)
    assert_valid(out, "replay")
    assert not out["identical"] and out["divergence"]["offset"] > 0

    res = runner.invoke(app, ["replay", str(path), "--image", str(input_png), "--pack", "nonsense"])
    assert res.exit_code != 0 and "NAME=PATH" in str(res.exception or res.output)


# ------------------------------------------------------------------------------------------ real model


@pytest.mark.real_model
def test_real_model_replay_is_identical(smoke_gguf, small_icd_pack, small_image_pack, ct_png, tmp_path):
    from typer.testing import CliRunner

    from medrwr_edge.cli import app
    from medrwr_edge.runtime.api import ask

    rec = ask(ct_png, QUESTION, OPTIONS, packs=[small_icd_pack], image_pack=small_image_pack, model=smoke_gguf,
              max_tokens=48, n_ctx=4096, cdir_threshold=1.0)
    assert rec.tokens["generated"] > 0
    result = replay(rec, [ct_png])
    assert result.identical, (result.divergence, result.differences)
    assert result.replayed.assistant_text == rec.assistant_text
    path = record_json(tmp_path, rec)
    res = CliRunner().invoke(app, ["replay", str(path), "--image", str(ct_png), "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert_valid(out, "replay")
    assert out["identical"] and out["same_setup"] and any(str(smoke_gguf.name) in v for v in out["verified"])
    assert out["replayed_record"]["model"]["build"].startswith("llama-cpp-python ")
    # a record whose text was altered: the console script exits 3 and says where
    import os
    import subprocess
    import sys

    altered = rec.to_dict()
    altered["assistant_text"] = altered["assistant_text"][:5] + "#" + altered["assistant_text"][6:]
    path.write_text(json.dumps(altered), "utf-8")
    proc = subprocess.run([sys.executable, "-c", "from medrwr_edge.cli import main; main()", "replay", str(path),
                           "--image", str(ct_png)], capture_output=True, text=True, env=dict(os.environ))
    assert proc.returncode == 3, proc.stderr
    assert "DIVERGED" in proc.stdout and "character 5" in proc.stdout


@pytest.mark.real_model
def test_real_model_replay_through_retrieval(smoke_gguf, small_icd_pack, small_image_pack, ct_png):
    """The real model reads a spliced retrieve block from its KV cache (forced query and answer, as in
    test_ask.py), CDIR is taken (threshold 1.0 > the model's real probability of the forced letter) and the model
    writes the CDIR pass itself; a second run with the same forcing is identical token for token. (Divergence on
    the real model: test_real_model_replay_is_identical; located divergences: the scripted tests above.)"""
    from medrwr_edge.runtime.api import ask
    from forcing import ForcedPasses
    from test_ask import _real_backend

    forced = {0: "<think> Air in the pleural space? </think>\n<query> \"pneumothorax\" </query>",
              1: " The retrieved entries describe it. </think>\n<answer> A </answer>"}
    first = ForcedPasses(_real_backend(smoke_gguf), forced)
    rec = ask(ct_png, QUESTION, OPTIONS, packs=[small_icd_pack], image_pack=small_image_pack, backend=first,
              max_tokens=24, n_ctx=4096, cdir_threshold=1.0)
    first.inner.close()
    cdir = rec.cdir()
    assert rec.retrievals() and cdir is not None and 0.0 < cdir.confidence_before < 1.0
    assert rec.passes[-1].kind == "cdir" and rec.passes[-1].generated_tokens > 0  # the model's own tokens
    again = ForcedPasses(_real_backend(smoke_gguf), forced)
    result = replay(rec, [ct_png], backend=again)
    again.inner.close()
    assert result.identical, (result.divergence, result.differences)

