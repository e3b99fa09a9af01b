"""Dataset loaders: each layout on small hand-made files, and every kind of bad line."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from medrwr_edge.errors import InputError
from medrwr_edge.eval.datasets import detect_layout, load_dataset, write_items_jsonl
from medrwr_edge.eval.scoring import LlmJudge, names_match, score_open, split_candidates
from medrwr_edge.runtime.scripted_backend import ScriptedBackend


def _jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), "utf-8")
    return path


@pytest.fixture
def png(tmp_path):
    p = tmp_path / "x.png"
    Image.new("RGB", (8, 8), (200, 10, 10)).save(p)
    return p


def test_mcq_layout_options_as_list_dict_and_plain(tmp_path, png):
    f = _jsonl(tmp_path / "d.jsonl", [
        {"id": "a", "question": "Which?", "options": ["A. Asthma", "B. Influenza"], "answer": "B", "image": "x.png"},
        {"id": "b", "question": "Which?", "options": {"A": "Asthma", "B": "Influenza", "C": "Croup"}, "answer": "(c)"},
        {"question": "Which?", "options": ["Asthma", "Influenza"], "answer": "Influenza"},
        {"id": 7, "question": "Which?", "options": ["A) Asthma", "B) Influenza"], "answer": "A. Asthma"},
    ])
    ds = load_dataset(f)
    assert ds.layout == "mcq" and not ds.problems and len(ds.sha256) == 64
    a, b, c, d = ds.items
    assert a.options == ["A. Asthma", "B. Influenza"] and a.answer == "B" and a.images == [str(png.resolve())]
    assert b.answer == "C" and b.options[2] == "C. Croup" and b.kind == "mcq"
    assert c.id == "line-3" and c.options == ["A. Asthma", "B. Influenza"] and c.answer == "B"
    assert d.id == "7" and d.answer == "A" and d.gold == ["Asthma"]


def test_open_ended_mcq_layout_with_synonyms(tmp_path):
    f = _jsonl(tmp_path / "o.jsonl", [{"id": "o1", "question": "Diagnosis?", "diagnosis": "Appendicitis",
                                       "synonyms": ["acute appendicitis"]}])
    (item,) = load_dataset(f).items
    assert item.kind == "open" and item.gold == ["Appendicitis", "acute appendicitis"] and item.answer is None


def test_bad_lines_are_reported_by_line_number_and_skipped(tmp_path, png):
    f = _jsonl(tmp_path / "bad.jsonl", [
        {"id": "ok", "question": "Q?", "options": ["A. x", "B. y"], "answer": "A"},
        "{not json",
        {"id": "letters", "question": "Q?", "options": ["A. x", "C. y"], "answer": "A"},
        {"id": "outside", "question": "Q?", "options": ["A. x", "B. y"], "answer": "E"},
        {"id": "noimg", "question": "Q?", "options": ["A. x", "B. y"], "answer": "A", "image": "missing.png"},
        {"id": "ok", "question": "Q?", "options": ["A. x", "B. y"], "answer": "B"},
        {"id": "noq", "options": ["A. x", "B. y"], "answer": "A"},
        {"id": "dupopt", "question": "Q?", "options": ["A. x", "B. X"], "answer": "A"},
        {"id": "oneopt", "question": "Q?", "options": ["A. x"], "answer": "A"},
        "[1, 2]",
    ])
    ds = load_dataset(f)
    assert [i.id for i in ds.items] == ["ok"]
    text = "\n".join(ds.problems)
    assert len(ds.problems) == 9
    for fragment in ("line 2: not valid JSON", "line 3: option letters A, C do not match",
                     "line 4: answer 'E' is not one of the options A-B", "line 5: image file not found: missing.png",
                     "line 6: id 'ok' repeats", "line 7: missing 'question'", "line 8: two options have the same",
                     "line 9: a multiple-choice item needs at least 2 options", "line 10: expected a JSON object"):
        assert fragment in text, fragment
    with pytest.raises(InputError, match="bad.jsonl line 2: not valid JSON"):
        load_dataset(f, on_error="fail")


def test_zero_valid_items_and_missing_file_are_errors(tmp_path):
    f = _jsonl(tmp_path / "none.jsonl", [{"id": "x", "question": "Q?", "options": ["A. x", "B. y"], "answer": "Z"}])
    with pytest.raises(InputError, match="no valid items .*1 bad line.*answer 'Z'"):
        load_dataset(f)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n", "utf-8")
    with pytest.raises(InputError, match="no valid items"):
        load_dataset(empty)
    with pytest.raises(InputError, match="not found"):
        load_dataset(tmp_path / "nope.jsonl")
    with pytest.raises(InputError, match="unknown dataset layout"):
        load_dataset(f, layout="vqa-rad")


def test_medxpertqa_layout_strips_inline_choices_and_finds_images_folder(tmp_path):
    (tmp_path / "images").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "images" / "MM-1-a.jpeg")
    row = {"id": "MM-1", "question": "A 40-year-old man has chest pain. What is seen?\nAnswer Choices: (A) Pneumothorax "
           "(B) Effusion (C) Consolidation (D) Normal (E) Mass", "options": {"A": "Pneumothorax", "B": "Effusion",
           "C": "Consolidation", "D": "Normal", "E": "Mass"}, "label": "C", "images": ["MM-1-a.jpeg"],
           "medical_task": "Diagnosis", "body_system": "Respiratory", "question_type": "Reasoning"}
    f = _jsonl(tmp_path / "mm_test.jsonl", [row])
    ds = load_dataset(f)
    (item,) = ds.items
    assert ds.layout == "medxpertqa"
    assert item.question == "A 40-year-old man has chest pain. What is seen?"
    assert item.options[4] == "E. Mass" and item.answer == "C" and item.meta["body_system"] == "Respiratory"
    assert item.images[0].endswith("images/MM-1-a.jpeg")


def test_mmmu_layout_list_literal_options_and_numbered_images(tmp_path, png):
    rows = [
        {"id": "validation_Clinical_Medicine_1", "question": "<image 1> Which organ is shown?",
         "options": "['Liver', 'Spleen', 'Kidney', \"Pancreas\"]", "answer": "B", "image_1": "x.png",
         "image_2": None, "question_type": "multiple-choice", "subfield": "Anatomy"},
        {"id": "validation_Clinical_Medicine_2", "question": "Name the sign.", "options": "[]",
         "answer": "Murphy sign", "question_type": "open"},
        {"id": "validation_Clinical_Medicine_3", "question": "?", "options": "['a', __import__('os')]",
         "answer": "A", "image_1": "x.png"},
    ]
    ds = load_dataset(_jsonl(tmp_path / "mmmu.jsonl", rows))
    assert ds.layout == "mmmu"
    mcq, open_ = ds.items
    assert mcq.options == ["A. Liver", "B. Spleen", "C. Kidney", "D. Pancreas"] and len(mcq.images) == 1
    assert open_.kind == "open" and open_.gold == ["Murphy sign"]
    assert "line 3: 'options' is not a list literal" in ds.problems[0]  # never evaluated as code


def test_ecbench_json_array_with_options_in_the_question(tmp_path, png):
    rows = [{"images": ["x.png"], "question": "What does the image show?\nA. Mitral stenosis\nB. Aortic stenosis\n"
             "C. Normal heart", "answer": "B"},
            {"images": ["x.png"], "question": "No options here", "answer": "A"}]
    f = tmp_path / "ecb.json"
    f.write_text(json.dumps(rows), "utf-8")
    assert detect_layout(rows[0]) == "ecbench"
    ds = load_dataset(f)
    (item,) = ds.items
    assert item.question == "What does the image show?" and item.options[1] == "B. Aortic stenosis"
    assert item.answer == "B" and item.id == "line-1"
    ds2 = load_dataset(f, layout="ecbench")
    assert "line 2: no options found" in ds2.problems[0]


def test_diagnosisarena_open_and_as_mcq(tmp_path):
    row = {"id": 12, "Case Information": "A 24-year-old woman with right lower quadrant pain.",
           "Physical Examination": "Rebound tenderness at McBurney point.", "Diagnostic Tests": "WBC 15,000.",
           "Final Diagnosis": "Acute appendicitis", "Options": {"A": "Acute appendicitis", "B": "Ovarian torsion",
           "C": "Ectopic pregnancy", "D": "Mesenteric adenitis"}, "Right Option": "A"}
    f = _jsonl(tmp_path / "da.jsonl", [row])
    (item,) = load_dataset(f).items
    assert item.kind == "open" and item.gold == ["Acute appendicitis"]
    assert "Physical Examination:\nRebound" in item.question and "most likely diagnosis" in item.question
    (mcq,) = load_dataset(f, diagnosis_as_mcq=True).items
    assert mcq.answer == "A" and mcq.options[3] == "D. Mesenteric adenitis"


def test_limit_and_jsonl_round_trip(tmp_path):
    rows = [{"id": f"q{i}", "question": f"Q{i}?", "options": ["A. x", "B. y"], "answer": "AB"[i % 2]}
            for i in range(5)]
    ds = load_dataset(_jsonl(tmp_path / "r.jsonl", rows), limit=3)
    assert [i.id for i in ds.items] == ["q0", "q1", "q2"]
    write_items_jsonl(ds.items, tmp_path / "again.jsonl")
    again = load_dataset(tmp_path / "again.jsonl").items
    assert [i.content_sha256() for i in again] == [i.content_sha256() for i in ds.items]


# ------------------------------------------------------------------ open-ended scoring


def test_candidates_and_normalised_matching():
    assert split_candidates("1. Mesenteric adenitis\n2. Acute appendicitis.") == ["Mesenteric adenitis",
                                                                                 "Acute appendicitis"]
    assert split_candidates("Final diagnosis: Crohn's disease; ulcerative colitis") == ["Crohn's disease",
                                                                                       "ulcerative colitis"]
    assert split_candidates("1) a 2) b 3) c 4) d 5) e 6) f") == ["a", "b", "c", "d", "e"]
    assert names_match("Crohn disease", "Crohn's disease")
    assert names_match("acute appendicitis", "Appendicitis")
    assert names_match("Sjögren syndrome", "Sjogren syndrome")
    assert not names_match("not appendicitis", "appendicitis")
    assert not names_match("appendicitis excluded, likely mesenteric adenitis with reactive nodes", "appendicitis")
    assert not names_match("appendix", "appendicitis")
    s = score_open("1. Mesenteric adenitis\n2. Acute appendicitis", ["Appendicitis"])
    assert (s.top1, s.top5, s.matched_rank) == (False, True, 2)
    assert score_open(None, ["x"]).top5 is False


def test_llm_judge_reads_yes_or_no_from_a_backend():
    judge = LlmJudge(ScriptedBackend(["yes, same condition"]))
    assert judge.same("Appendiceal inflammation", ["Appendicitis"]) is True
    judge = LlmJudge(ScriptedBackend(["No."]))
    assert judge.same("Ovarian torsion", ["Appendicitis", "acute appendicitis"]) is False
    assert "Candidate diagnosis: Ovarian torsion" in judge.backend.cache_text()


def test_an_answer_giving_the_option_text_is_read_as_its_letter():
    from medrwr_edge.eval.scoring import option_from_text

    opts = ["A. Malignant neoplasm of pituitary gland", "B. Malignant neoplasm of endocrine gland, unspecified",
            "C. D07.6", "D. D07.69"]
    assert option_from_text("C75.9 denotes Malignant neoplasm of endocrine gland, unspecified", opts) == "B"
    assert option_from_text("D07.69", opts) == "D"  # "D07.6" is not a whole-word part of "D07.69"
    assert option_from_text("D07.6", opts) == "C"
    assert option_from_text("not malignant neoplasm of pituitary gland", opts) is None
    assert option_from_text("pituitary or endocrine", opts) is None
    both = "Malignant neoplasm of pituitary gland or Malignant neoplasm of endocrine gland, unspecified"
    assert option_from_text(both, opts) is None  # two options named: no letter
