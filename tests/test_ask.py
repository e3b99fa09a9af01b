"""`ask` end to end: the API and the CLI, on real packs and the real SmolLM2-135M model."""

from __future__ import annotations

import json

import pytest

from medrwr_edge.errors import InputError, MedrwrError, ModelError
from medrwr_edge.paths import sha256_file
from medrwr_edge.runtime.api import AskSettings, ask
from medrwr_edge.runtime.scripted_backend import ScriptedBackend

from forcing import ForcedPasses

OPTIONS = ["A. Pneumothorax", "B. Asthma", "C. Bronchiectasis", "D. Influenza"]


def _real_backend(gguf, **kw):
    from medrwr_edge.runtime.llama_backend import LlamaBackend

    return LlamaBackend(str(gguf), n_ctx=4096, sha256=sha256_file(gguf), **kw)


# ----------------------------------------------------------------------------- real packs, scripted model


def test_query_searches_a_real_pack_and_splices_its_entries(small_icd_pack, ct_png):
    be = ScriptedBackend(["<think> air in the pleural space </think>\n<query> pneumothorax </query>",
                          "<answer> A </answer>"])
    rec = ask(ct_png, "Which diagnosis?", OPTIONS, packs=[small_icd_pack], backend=be, cdir=False)
    r = rec.retrievals()[0]
    assert r.query == "pneumothorax" and len(r.docs) == 3
    assert any("pneumothorax" in d.snippet.lower() for d in r.docs)
    assert all(d.pack == "icd-small" and d.doc_id for d in r.docs)
    assert rec.letter == "A"
    assert rec.packs[0]["name"] == "icd-small" and len(rec.packs[0]["encoder_sha256"]) == 64
    assert rec.images[0]["sha256"] == sha256_file(ct_png)


def test_exact_code_in_query_is_found(small_icd_pack):
    be = ScriptedBackend(["<query> J93.0 </query>", "<answer> A </answer>"])
    rec = ask(None, "Which code?", OPTIONS, packs=[small_icd_pack], backend=be)
    assert rec.retrievals()[0].docs[0].doc_id == "J93.0"


def test_cdir_uses_the_real_image_pack(small_icd_pack, small_image_pack, ct_png):
    be = ScriptedBackend(["<answer> B </answer>", "<answer> A </answer>"], probs={"B": 0.3, "A": 0.9})
    rec = ask(ct_png, "Which diagnosis?", OPTIONS, packs=[small_icd_pack], image_pack=small_image_pack, backend=be)
    cdir = rec.cdir()
    assert cdir is not None and cdir.reference_pack == "ref-small"
    assert cdir.reference_caption and len(cdir.reference_image_sha256) == 64
    assert cdir.changed and rec.letter == "A"


def test_cdir_never_returns_the_input_image_itself(small_image_pack):
    from medrwr_edge.imaging import load_image
    from medrwr_edge.kb_pack.pack import Pack
    from medrwr_edge.runtime.backend import ImageInput
    from medrwr_edge.runtime.retrieval import PackImageRetriever

    with Pack.open(small_image_pack) as pack:
        # a reference image given as the question's image: CDIR must bring a different case
        own = pack.search("head", k=1)[0]
        loaded = load_image(own.image_path)
        ref = PackImageRetriever(pack).nearest(ImageInput(loaded.pixels, loaded.sha256))
        assert ref is not None and ref.doc_id != own.doc_id and ref.score < 0.999


# ----------------------------------------------------------------------------- bad input


def test_bad_inputs_raise_one_line_errors(tmp_path, small_icd_pack):
    be = ScriptedBackend(["<answer> A </answer>"])
    with pytest.raises(InputError, match="empty"):
        ask(None, "   ", OPTIONS, packs=[small_icd_pack], backend=be)
    with pytest.raises(MedrwrError):
        ask(tmp_path / "missing.png", "q?", OPTIONS, packs=[small_icd_pack], backend=be)
    with pytest.raises(InputError, match="threshold"):
        ask(None, "q?", OPTIONS, packs=[small_icd_pack], backend=be, cdir_threshold=1.5)
    with pytest.raises(InputError, match="repeat"):
        ask(None, "q?", ["A. x", "A. y"], packs=[small_icd_pack], backend=be)
    with pytest.raises(InputError, match="limit"):
        ask(None, "x" * 1_000_000, OPTIONS, packs=[small_icd_pack], backend=be)


def test_corrupt_model_files_are_refused_before_loading(tmp_path):
    from medrwr_edge.runtime.backends import load_backend

    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"NOTGGUF" + b"\0" * 4096)
    with pytest.raises(ModelError):
        load_backend(bad, AskSettings())
    empty = tmp_path / "empty.gguf"
    empty.write_bytes(b"")
    with pytest.raises(ModelError):
        load_backend(empty, AskSettings())
    with pytest.raises(ModelError):
        load_backend(tmp_path / "nope.gguf", AskSettings())


@pytest.mark.real_model
def test_truncated_real_gguf_is_refused(tmp_path, smoke_gguf):
    from medrwr_edge.runtime.backends import load_backend

    cut = tmp_path / "cut.gguf"
    with open(smoke_gguf, "rb") as f:
        cut.write_bytes(f.read(5_000_000))
    with pytest.raises(ModelError):
        load_backend(cut, AskSettings())


# ----------------------------------------------------------------------------- real model


@pytest.mark.real_model
def test_real_model_end_to_end_with_kv_continuation(smoke_gguf, small_icd_pack, small_image_pack, ct_png):
    be = ForcedPasses(_real_backend(smoke_gguf), {
        0: "<think> The film suggests air in the pleural space. </think>\n<query> \"pneumothorax\" </query>",
        1: " The retrieved entries describe it. </think>\n<answer> A </answer>",
    })
    rec = ask(ct_png, "Which diagnosis fits the image?", OPTIONS, packs=[small_icd_pack],
              image_pack=small_image_pack, backend=be, max_tokens=48, cdir_threshold=1.0)
    r = rec.retrievals()[0]
    assert r.query == "pneumothorax" and len(r.docs) == 3 and r.tokens_inserted > 20
    # the retrieved block sits in the same assistant turn, and the prompt was decoded once
    t = rec.tokens
    assert t["decoded"] == t["prompt"] + t["generated"] + t["inserted"]
    inner = be.inner
    assert inner.n_tokens() == t["decoded"] + t["prompt_cached"] - t["rolled_back"]  # nothing decoded twice
    # the forced answer letter carries the real model's probability; threshold 1.0 forces CDIR, after which
    # the real model regenerates on its own from the rolled-back cache
    cdir = rec.cdir()
    assert cdir is not None and 0.0 < cdir.confidence_before < 1.0 and cdir.answer_before == "A"
    assert rec.passes[-1].kind == "cdir" and rec.passes[-1].generated_tokens > 0
    assert cdir.reference_pack == "ref-small" and t["rolled_back"] > 0
    assert rec.model["sha256"] == sha256_file(smoke_gguf) and rec.model["device"] == "cpu"
    assert any("no vision input" in n for n in rec.notes)
    json.dumps(rec.to_dict())
    inner.close()


@pytest.mark.real_model
def test_real_model_is_deterministic_at_temperature_zero(smoke_gguf, small_icd_pack, small_image_pack, ct_png,
                                                         medrwr_home_with_encoders):
    def once():
        rec = ask(ct_png, "Which diagnosis fits the image?", OPTIONS, packs=[small_icd_pack],
                  image_pack=small_image_pack, model=smoke_gguf, max_tokens=64, n_ctx=4096)
        d = rec.to_dict()
        for volatile in ("timings", "created"):
            d.pop(volatile)
        for p in d["passes"]:
            p.pop("seconds")
        for s in d["steps"]:
            s.pop("seconds", None)
        return d

    first, second = once(), once()  # the first run fills the system-prompt prefix cache, the second restores it
    assert first["tokens"]["prompt_cached"] == 0 and second["tokens"]["prompt_cached"] > 0
    for d in (first, second):
        for key in ("prompt_cached", "prompt", "decoded"):
            d["tokens"].pop(key)
    assert first == second
    assert first["passes"] and first["tokens"]["generated"] > 0


@pytest.mark.real_model
def test_cli_ask_json_and_stream(smoke_gguf, small_icd_pack, small_image_pack, ct_png, medrwr_home_with_encoders):
    from typer.testing import CliRunner

    from medrwr_edge.cli import app

    args = ["ask", str(ct_png), "Which diagnosis fits the image?", "-o", OPTIONS[0], "-o", OPTIONS[1],
            "--pack", str(small_icd_pack), "--image-pack", str(small_image_pack), "--model", str(smoke_gguf),
            "--max-tokens", "32", "--ctx", "4096"]
    res = CliRunner().invoke(app, args + ["--json"])
    assert res.exit_code == 0, res.output
    rec = json.loads(res.stdout)
    assert rec["schema"] == "medrwr-edge/evidence/1"
    assert rec["options"] == [{"letter": "A", "text": "Pneumothorax"}, {"letter": "B", "text": "Asthma"}]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    assert "tokens generated" in res.stdout


def test_cli_bad_input_is_one_line_and_nonzero(tmp_path):
    import subprocess
    import sys

    bad = tmp_path / "x.png"
    bad.write_bytes(b"not an image at all")
    proc = subprocess.run(
        [sys.executable, "-m", "medrwr_edge.cli", "ask", str(bad), "q?", "--no-retrieval", "--no-cdir"],
        capture_output=True, text=True, env={"MEDRWR_EDGE_HOME": str(tmp_path / "h"), "PATH": "/usr/bin:/bin"},
    )
    assert proc.returncode != 0
    lines = [l for l in proc.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert "Traceback" not in proc.stderr
