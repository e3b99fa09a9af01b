"""Training data loaders: MedQA / MedMCQA / multimodal MCQ, SFT and DPO rows, validation by file:line."""

from __future__ import annotations

import json

import pytest

from medrwr_edge.errors import InputError
from medrwr_edge.training.data import load_dpo_jsonl, load_mcq_jsonl, load_sft_jsonl


def write(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


MEDQA = {"question": "Fluid blunting the costophrenic angle?", "options": {"A": "Pneumothorax", "B": "Pleural effusion",
         "C": "Atelectasis", "D": "Cardiomegaly"}, "answer_idx": "B", "answer": "Pleural effusion"}
MEDMCQA = {"id": "m1", "question": "Air in the pleural space?", "opa": "Pneumothorax", "opb": "Pleural effusion",
           "opc": "Atelectasis", "opd": "Cardiomegaly", "cop": 1}


def test_medqa_and_medmcqa_rows(tmp_path):
    data = load_mcq_jsonl(write(tmp_path / "d.jsonl", [MEDQA, MEDMCQA,
                                                       {"question": "Q?", "options": ["A. xray", "B. yoga"], "answer": "yoga"}]))
    first, second, third = data.rows
    assert (first.answer, first.answer_text, first.letters) == ("B", "Pleural effusion", ["A", "B", "C", "D"])
    assert (second.id, second.answer, second.answer_text) == ("m1", "A", "Pneumothorax")
    assert (third.answer, third.line) == ("B", 3)
    assert first.id == "line-1" and first.images == [] and first.image is None
    assert len(data.sha256) == 64 and data.problems == []


def test_medmcqa_cop_base(tmp_path):
    path = write(tmp_path / "d.jsonl", [dict(MEDMCQA, cop=0)])
    with pytest.raises(InputError, match=r"d\.jsonl:1: 'cop' 0 is outside 1\.\.4 .*medmcqa_cop_base=0"):
        load_mcq_jsonl(path)
    assert load_mcq_jsonl(path, medmcqa_cop_base=0)[0].answer == "A"
    assert load_mcq_jsonl(write(tmp_path / "e.jsonl", [dict(MEDMCQA, cop="c")]))[0].answer == "C"


def test_bad_rows_are_named_by_file_and_line(tmp_path):
    path = write(tmp_path / "bad.jsonl", [
        MEDQA,
        "{not json",
        {"options": {"A": "x", "B": "y"}, "answer_idx": "A"},  # no question
        dict(MEDQA, answer_idx="E"),  # answer outside the options
        dict(MEDQA, answer="Atelectasis"),  # letter and text disagree
        {"question": "Q?", "options": ["A. x", "C. y"], "answer": "A"},  # letters skip
    ])
    with pytest.raises(InputError) as err:
        load_mcq_jsonl(path)
    message = str(err.value)
    assert message.startswith(f"5 bad row(s) in {path}")
    for line in (2, 3, 4, 5, 6):
        assert f"bad.jsonl:{line}:" in message
    assert "disagrees" in message and "missing 'question'" in message
    skipped = load_mcq_jsonl(path, on_error="skip")
    assert len(skipped) == 1 and len(skipped.problems) == 5 and skipped.problems[0].startswith("bad.jsonl:2:")


def test_multimodal_rows_resolve_images_beside_the_jsonl(tmp_path):
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "x.png").write_bytes(b"png")
    path = write(tmp_path / "mm.jsonl", [dict(MEDQA, image="img/x.png"), dict(MEDQA, id="2")])
    with pytest.raises(InputError, match=r"mm\.jsonl:2: no 'image': multimodal"):
        load_mcq_jsonl(path, require_image=True)
    rows = load_mcq_jsonl(path, require_image=True, on_error="skip")
    assert rows[0].image == str((tmp_path / "img" / "x.png").resolve())
    missing = write(tmp_path / "m2.jsonl", [dict(MEDQA, image="nope.png")])
    with pytest.raises(InputError, match=r"m2\.jsonl:1: image file not found: nope\.png"):
        load_mcq_jsonl(missing)


def test_repeated_ids_and_empty_files(tmp_path):
    with pytest.raises(InputError, match="repeats an earlier row"):
        load_mcq_jsonl(write(tmp_path / "r.jsonl", [dict(MEDQA, id=1), dict(MEDQA, id=1)]))
    with pytest.raises(InputError, match="no valid rows"):
        load_mcq_jsonl(write(tmp_path / "e.jsonl", []))
    with pytest.raises(InputError, match="not found"):
        load_mcq_jsonl(tmp_path / "absent.jsonl")


def test_sft_rows(tmp_path):
    path = write(tmp_path / "s.jsonl", [
        {"messages": [{"role": "user", "content": "Q?"}, {"role": "assistant", "content": "<answer> A </answer>"}]},
        {"prompt": "Q2?", "response": "R2"},
        {"messages": [{"role": "user", "content": "Q?"}]},
        {"messages": [{"role": "doctor", "content": "x"}, {"role": "assistant", "content": "y"}]},
        {"text": "neither"},
    ])
    with pytest.raises(InputError) as err:
        load_sft_jsonl(path)
    assert "s.jsonl:3: the last message must be the assistant's" in str(err.value)
    assert "s.jsonl:4: message 1 has role 'doctor'" in str(err.value)
    assert "s.jsonl:5: expected 'messages' or 'prompt' and 'response'" in str(err.value)
    rows = load_sft_jsonl(path, on_error="skip").rows
    assert rows[0].response == "<answer> A </answer>" and rows[0].prompt_messages == [{"role": "user", "content": "Q?"}]
    assert rows[1].messages == [{"role": "user", "content": "Q2?"}, {"role": "assistant", "content": "R2"}]


def test_dpo_rows(tmp_path):
    (tmp_path / "x.png").write_bytes(b"png")
    path = write(tmp_path / "p.jsonl", [
        {"prompt": "Q?", "chosen": "good", "rejected": "bad", "image": "x.png"},
        {"prompt": "Q?", "chosen": "same", "rejected": "same"},
        {"prompt": "Q?", "chosen": "good"},
    ])
    with pytest.raises(InputError) as err:
        load_dpo_jsonl(path)
    assert "p.jsonl:2: 'chosen' and 'rejected' are the same" in str(err.value)
    assert "p.jsonl:3: missing 'rejected'" in str(err.value)
    row = load_dpo_jsonl(path, on_error="skip")[0]
    assert (row.prompt, row.chosen, row.rejected, row.line) == ("Q?", "good", "bad", 1)
    assert row.images == [str((tmp_path / "x.png").resolve())]
