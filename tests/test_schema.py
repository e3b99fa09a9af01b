"""The evidence record's JSON Schema: in step with the dataclasses, and every command's --json output validates."""

from __future__ import annotations

import copy
import dataclasses
import json

import pytest

from evidence_helpers import (  # noqa: F401  (fixtures)
    OPTIONS,
    QUESTION,
    assert_valid,
    evidence_packs,
    fake_encoders,
    input_png,
    run_scripted,
    validator,
)
from medrwr_edge.evidence.record import load_schema, record_from_dict, schema_path
from medrwr_edge.evidence import record as steps
from medrwr_edge.runtime.api import AskSettings
from medrwr_edge.runtime.scripted_backend import ScriptedBackend


def test_schemas_are_valid_draft_2020_12_and_ship_with_the_package():
    from jsonschema import Draft202012Validator

    for name in ("evidence", "answer-log", "replay"):
        schema = load_schema(name)
        Draft202012Validator.check_schema(schema)
        assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
        assert schema_path(name).parent.name == "data"
    assert load_schema()["properties"]["schema"]["const"] == steps.SCHEMA


# Fields added after the first release of schema version 1: documented, but optional (older records lack them).
ADDED_WITHIN_VERSION_1 = {
    "settings": {"prefix_cache", "n_threads", "top_k_diagnoses", "cdir_open_ended", "allow_mixed_modalities",
                 "images_are_studies", "frame", "protocol", "guided_think_tokens", "guided_read_tokens", "guided_exemplar",
                 "guided_doc_words", "guided_excerpt", "engine", "engine_timeout", "speculative", "draft_model"},
    "": {"answer_kind", "differential", "protocol"},
    "query": {"issued_by"},
    "answer": {"answer_kind", "differential"},
    "cdir": {"references", "kept_first"},
}


def _props(schema: dict, ref: str) -> dict:
    return schema["$defs"][ref] if ref else schema


@pytest.mark.parametrize("cls, ref", [
    (steps.EvidenceRecord, ""), (steps.Think, "think"), (steps.Query, "query"), (steps.Retrieve, "retrieve"),
    (steps.RetrievedDoc, "retrieved_doc"), (steps.Answer, "answer"), (steps.CdirRetrieve, "cdir"),
    (steps.PassStats, "pass"), (AskSettings, "settings"),
])
def test_schema_names_exactly_the_dataclass_fields(cls, ref):
    """A field added to evidence/record.py (or AskSettings) without documenting it here fails this test."""
    node = _props(load_schema(), ref)
    fields = {f.name for f in dataclasses.fields(cls)}
    assert set(node["properties"]) == fields
    # to_dict() writes every field; fields added later within schema version 1 stay optional so that older
    # records remain valid (e.g. settings.prefix_cache)
    assert set(node["required"]) == fields - ADDED_WITHIN_VERSION_1.get(ref, set())


def test_schema_names_exactly_the_model_and_pack_keys(evidence_packs):
    from medrwr_edge.kb_pack.pack import Pack
    from medrwr_edge.kb_pack.opening import pack_record
    from medrwr_edge.runtime.backends import model_record

    schema = load_schema()
    # "engine" is added by Session.ask only when an inference server generated the tokens (--engine)
    assert set(model_record(ScriptedBackend([]))) == set(schema["$defs"]["model"]["properties"]) - {"engine"}
    with Pack.open(evidence_packs[0]) as pack:
        assert set(pack_record(pack, "knowledge")) == set(schema["$defs"]["pack"]["properties"])


SCENARIOS = {
    "query, retrieve, answer, CDIR": dict(outputs=None),
    "no answer": dict(outputs=["<think> I am not sure </think>"]),
    "open-ended": dict(outputs=["<think> x </think>\n<answer> a collapsed lung </answer>"], options=[]),
    "query at the pass limit": dict(outputs=["<query> a </query>", "<query> b </query>", "<query> c </query>"]),
    "retrieval off": dict(outputs=["<query> pneumothorax </query>", "<answer> A </answer>"], retrieval=False),
    "text only, no image": dict(outputs=["<answer> D </answer>"], image=False),
}


@pytest.mark.parametrize("name", SCENARIOS)
def test_records_of_every_shape_validate(name, evidence_packs, fake_encoders, input_png, medrwr_home):
    text_pack, image_pack, _ = evidence_packs
    kw = dict(SCENARIOS[name])
    outputs = kw.pop("outputs")
    image = input_png if kw.pop("image", True) else None
    args = {"outputs": outputs} if outputs else {}
    rec = run_scripted(text_pack, image_pack, image, **args, **kw)
    d = rec.to_dict()
    assert_valid(d)
    json.loads(json.dumps(d))  # plain JSON
    # reading it back gives the same record
    assert record_from_dict(d).to_dict() == d


def test_multi_image_differential_and_untagged_records_validate(evidence_packs, fake_encoders, input_png, tmp_path,
                                                              medrwr_home):
    from evidence_helpers import _png

    text_pack, image_pack, _ = evidence_packs
    prior = _png(tmp_path / "prior.png", (60, 190, 60), size=(100, 90), pattern=2)
    two = run_scripted(text_pack, image_pack, [prior, input_png])  # CDIR looks up both studies (text model)
    assert [im["role"] for im in two.images] == ["prior", "current"] and len(two.cdir().references) == 2
    differential = run_scripted(text_pack, None, None, options=[], top_k_diagnoses=2,
                                outputs=["<answer> 1. Pneumothorax\n2. Atelectasis </answer>"])
    assert differential.differential == ["Pneumothorax", "Atelectasis"]
    untagged = run_scripted(text_pack, None, None, outputs=["B. Asthma"])
    assert (untagged.answer_kind, untagged.letter) == ("untagged", "B")
    for rec in (two, differential, untagged):
        d = rec.to_dict()
        assert_valid(d)
        assert record_from_dict(d).to_dict() == d
    d = two.to_dict()
    d["images"][0]["study_date"] = "01/02/2023"  # not ISO
    assert not validator().is_valid(d)


def test_validation_can_fail(evidence_packs, fake_encoders, input_png, medrwr_home):
    good = run_scripted(evidence_packs[0], evidence_packs[1], input_png).to_dict()
    v = validator()
    assert v.is_valid(good)
    broken = []
    for mutate in (
        lambda d: d.pop("steps"),
        lambda d: d.update(confidence=1.5),
        lambda d: d.update(schema="medrwr-edge/evidence/2"),
        lambda d: d["steps"].append({"type": "dream", "text": "x", "pass_index": 0}),
        lambda d: d["images"][0].update(sha256="not-a-hash"),
        lambda d: d["passes"][0].update(stop_reason="bored"),
        lambda d: d["settings"].update(search_mode="psychic"),
        lambda d: d["packs"][0].update(role="decoration"),
        lambda d: d["steps"][2]["docs"][0].update(score="high"),
    ):
        d = copy.deepcopy(good)
        mutate(d)
        broken.append(v.is_valid(d))
    assert broken == [False] * len(broken)


def test_cli_ask_json_validates(evidence_packs, fake_encoders, input_png, medrwr_home, monkeypatch):
    from typer.testing import CliRunner

    from medrwr_edge.cli import app
    from medrwr_edge.runtime import backends
    from evidence_helpers import PROBS, QUERY_THEN_ANSWER

    monkeypatch.setattr(backends, "load_backend", lambda model, settings: ScriptedBackend(QUERY_THEN_ANSWER, probs=PROBS))
    text_pack, image_pack, _ = evidence_packs
    args = ["ask", str(input_png), QUESTION, *sum((["-o", o] for o in OPTIONS), []), "--pack", str(text_pack),
            "--image-pack", str(image_pack), "--json"]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    rec = json.loads(res.stdout)
    assert_valid(rec)
    assert rec["letter"] == "A" and any(s["type"] == "cdir" for s in rec["steps"])


@pytest.mark.real_model
def test_real_model_ask_json_validates(smoke_gguf, small_icd_pack, small_image_pack, ct_png, medrwr_home_with_encoders):
    from typer.testing import CliRunner

    from medrwr_edge.cli import app

    args = ["ask", str(ct_png), QUESTION, "-o", OPTIONS[0], "-o", OPTIONS[1], "--pack", str(small_icd_pack),
            "--image-pack", str(small_image_pack), "--model", str(smoke_gguf), "--max-tokens", "24", "--ctx", "4096",
            "--json"]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    rec = json.loads(res.stdout)
    assert_valid(rec)
    assert rec["model"]["backend"] != "scripted" and rec["tokens"]["generated"] > 0
