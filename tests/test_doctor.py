"""`medrwr-edge doctor`: report structure (JSON schema), verification status, and the prediction's arithmetic.

Speed itself is not tested (the machine is shared); the real-model test checks that the measured rates and a
real run agree within a loose factor.
"""

from __future__ import annotations

import json
import shutil
from importlib import resources
from itertools import islice

import pytest

from medrwr_edge import assets
from medrwr_edge.deploy import doctor

jsonschema = pytest.importorskip("jsonschema")

LLM = {"prompt_tokens_per_s": 100.0, "decode_tokens_per_s": 10.0, "prompt_tokens_real": 300,
       "retrieve_template_tokens": 20, "cdir_template_tokens": 60}


def _schema() -> dict:
    return json.loads(resources.files("medrwr_edge").joinpath("data/doctor.schema.json").read_text("utf-8"))


def test_prediction_formula_by_hand():
    t = doctor.Typical(generated_tokens=200, retrievals=2, docs_per_retrieval=3, tokens_per_doc=120, cdir=True,
                       cdir_caption_tokens=40, cdir_regenerated_tokens=80)
    p = doctor.predict_seconds(LLM, image_encode_ms=50.0, search_ms=30.0, typical=t)
    terms = p["terms_s"]
    assert terms["prompt"] == pytest.approx(300 / 100)
    assert terms["generate"] == pytest.approx(200 / 10)
    assert terms["retrieval_splices"] == pytest.approx(2 * (3 * 120 + 20) / 100)
    assert terms["cdir"] == pytest.approx((40 + 60) / 100 + 80 / 10)
    assert terms["search_and_encode"] == pytest.approx(2 * 0.030 + 0.050)
    assert p["seconds_per_answer"] == pytest.approx(3 + 20 + 7.6 + 9 + 0.11, abs=1e-3)
    no_cdir = doctor.predict_seconds(LLM, 50.0, 30.0, doctor.Typical(cdir=False))
    assert no_cdir["terms_s"]["cdir"] == 0 and no_cdir["terms_s"]["search_and_encode"] == pytest.approx(0.06)


def test_prediction_for_a_runs_own_counts():
    tokens = {"prompt": 250, "inserted": 150, "generated": 40}
    assert doctor.predict_for_counts(LLM, tokens, 1, False, 50.0, 30.0) == pytest.approx(4 + 4 + 0.03)
    assert doctor.predict_for_counts(LLM, tokens, 0, True, 50.0, None) == pytest.approx(8 + 0.05)


def test_machine_facts():
    cpu, mem = doctor.cpu_info(), doctor.memory_info()
    assert 1 <= cpu["physical_cores"] <= cpu["logical_cores"]
    assert set(doctor.INTERESTING_FLAGS) == set(cpu["flags"])
    if shutil.os.path.exists("/proc/meminfo"):
        assert mem["total_bytes"] > mem["available_bytes"] > 0


def test_nvidia_smi_rows_are_parsed():
    text = "NVIDIA H100 80GB HBM3, 81559, 1024\nNVIDIA RTX A2000, 12GB, 6138, [N/A]\nNo devices were found\n"
    assert doctor.parse_nvidia_smi(text) == [
        {"name": "NVIDIA H100 80GB HBM3", "memory_total_mib": 81559, "memory_used_mib": 1024},
        {"name": "NVIDIA RTX A2000, 12GB", "memory_total_mib": 6138, "memory_used_mib": None},
    ]


def test_inventory_json_without_measuring(capsys):
    from medrwr_edge.cli import main

    main(["doctor", "--json", "--no-measure"])
    report = json.loads(capsys.readouterr().out)
    jsonschema.validate(report, _schema())
    assert report["measurements"] is None and report["prediction"] is None
    assert {m["name"] for m in report["models"]} >= set(assets.REGISTRY)


@pytest.fixture(scope="module")
def minilm_dir():
    """The installed MiniLM folder, looked up before a test points MEDRWR_EDGE_HOME elsewhere."""
    from medrwr_edge.errors import MedrwrError

    try:
        return assets.default_text_encoder_dir()
    except MedrwrError as e:
        pytest.skip(f"{e} (run `medrwr-edge models install --smoke`)")


def test_damaged_model_is_reported(minilm_dir, medrwr_home):
    copy = medrwr_home / "models" / assets.MINILM
    shutil.copytree(minilm_dir, copy)
    entry = next(m for m in doctor.installed_models() if m["name"] == assets.MINILM)
    assert entry["installed"] and entry["verified"] == "ok"
    tok = copy / "tokenizer.json"
    tok.write_bytes(tok.read_bytes()[:-1] + b" ")  # same size, different bytes
    for full in (False, True):  # a changed mtime re-hashes even in the fast (cached) mode
        entry = next(m for m in doctor.installed_models(full) if m["name"] == assets.MINILM)
        assert entry["verified"].startswith("failed: tokenizer.json"), entry


@pytest.fixture(scope="module")
def tiny_pack(tmp_path_factory, text_encoder):
    from medrwr_edge.kb_pack import icd10
    from medrwr_edge.kb_pack.build import build_text_pack

    out = tmp_path_factory.mktemp("doctor-packs") / "icd-tiny"
    docs = list(islice(icd10.icd10_documents(chapters=[10]), 40))
    return build_text_pack(docs, out, text_encoder, name="icd-tiny", version="test", progress=False)


@pytest.mark.slow  # ~20 s on an idle machine, over a minute on the shared one
@pytest.mark.real_model
def test_doctor_on_smollm2_json_and_check(smoke_gguf, tiny_pack, capsys):
    from medrwr_edge.cli import main

    main(["doctor", "--json", "--model", str(smoke_gguf), "--quick", "--threads", "1", "--pack", str(tiny_pack),
          "--check-prediction", "--max-tokens", "16"])
    report = json.loads(capsys.readouterr().out)
    jsonschema.validate(report, _schema())
    llm = report["measurements"]["llm"]
    assert llm["model"] == smoke_gguf.name and llm["threads"] == 1
    assert llm["prompt_tokens_real"] > 100  # the reference system prompt alone is longer than that
    assert report["measurements"]["search"]["pack"] == "icd-tiny"
    p = report["prediction"]
    assert p["seconds_per_answer"] == pytest.approx(sum(p["terms_s"].values()), abs=0.01)
    assert p["terms_s"]["generate"] == pytest.approx(doctor.TYPICAL.generated_tokens / llm["decode_tokens_per_s"],
                                                     rel=0.01)
    check = report["check"]
    assert check["packs"] == ["icd-tiny"] and check["tokens"]["generated"] > 0
    same = doctor.predict_for_counts(llm, check["tokens"], check["retrievals"], check["cdir"],
                                     report["measurements"]["image_encode_ms"],
                                     report["measurements"]["search"]["search_ms"])
    assert check["predicted_same_counts_s"] == pytest.approx(same, abs=0.002)
    assert check["relative_error_same_counts"] == pytest.approx((same - check["actual_s"]) / check["actual_s"],
                                                                abs=0.01)
    # the throughput model must be in the right ballpark for the run it describes (a loose factor: shared CPU)
    assert 0.2 < check["predicted_same_counts_s"] / check["actual_s"] < 5
    text = doctor.format_report(report)
    assert "predicted:" in text and "check: a real ask took" in text
