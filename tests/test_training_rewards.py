"""Med-RwR rewards on hand-made completions: each term, each weight, the offline entity extractor, and the three
reference bugs we do not copy."""

from __future__ import annotations

import math

import pytest

from medrwr_edge.training import rewards as R
from medrwr_edge.training.entities import build_vocabulary, default_vocabulary, extract_entities

LETTERS = ["A", "B", "C", "D"]
DIRECT = "<think> Fluid in the pleural space. </think>\n<answer> B </answer>"
RETRIEVED = (
    "<think> Blunted angle. </think>\n<query> blunted costophrenic angle </query>\n"
    "<retrieve> (1) Pleural effusion is fluid in the pleural space.\n </retrieve>\n"
    "<think> It is an effusion. </think>\n<answer> B </answer>"
)
# A vocabulary built here, so the expected values below are computed by hand and do not move with ICD-10-CM.
VOCAB = build_vocabulary(["Pleural effusion, not elsewhere classified", "Malignant pleural effusion",
                          "Costophrenic angle blunting"], ["pneumothorax"])


def test_accuracy_reads_the_letter_like_the_runtime():
    assert R.accuracy_reward(DIRECT, "B", LETTERS) == 1.0
    assert R.accuracy_reward("<think> x </think>\n<answer> b. effusion </answer>", "B", LETTERS) == 1.0
    assert R.accuracy_reward("<think> x </think>\n<answer> (B) </answer>", "b", LETTERS) == 1.0
    assert R.accuracy_reward("<think> x </think>\n<answer> C </answer>", "B", LETTERS) == 0.0
    assert R.accuracy_reward("<think> x </think> B", "B", LETTERS) == 0.0  # no <answer>: nothing to read


def test_format_reward():
    assert R.format_reward(DIRECT, retrieval_used=False, correct=True) == 1.0
    assert R.format_reward(RETRIEVED, retrieval_used=True, correct=True) == 2.0  # retrieval that led to the answer
    assert R.format_reward(RETRIEVED, retrieval_used=True, correct=False) == 1.0
    broken = [
        "<answer> B </answer>",  # no thinking
        "<think> </think>\n<answer> B </answer>",  # empty thinking
        "<think> x </think>\n<query> q </query>\n<answer> B </answer>",  # a query nobody answered
        "<think> x </think>\n<answer> B </answer> and more",  # text after the answer
        "<think> x </think>\n<answer> B </answer><answer> C </answer>",  # two answers
        "<think> x </think>\n<retrieve> doc </retrieve>\n<answer> B </answer>",  # retrieve without a query
        "<think> x </think>\n<answer> </answer>",
    ]
    for text in broken:
        assert R.format_reward(text, retrieval_used=True, correct=True) == 0.0, text


def test_weights_and_stages():
    inputs = R.RewardInputs(RETRIEVED, "B", LETTERS, gold_text="Pleural effusion", retrieval_used=True,
                            logp_gold_with=math.log(0.8), logp_gold_without=math.log(0.2))
    one = R.compute_reward(inputs, stage=1, vocabulary=VOCAB)
    assert (one.format, one.accuracy, one.query_semantic, one.confidence_gain) == (2.0, 1.0, 0.0, 0.0)
    assert one.total == pytest.approx(1 * 2.0 + 5 * 1.0)
    two = R.compute_reward(inputs, stage=2, vocabulary=VOCAB, options=PAPER)  # the paper's unscaled term
    assert two.confidence_gain == pytest.approx(math.log(4))
    assert two.total == pytest.approx(2.0 + 5 * 1.0 + 0.4 * two.query_semantic + 5 * math.log(4))
    custom = R.compute_reward(inputs, stage=2, vocabulary=VOCAB,
                              weights=R.RewardWeights(format=0, accuracy=1, query_semantic=2, confidence_gain=0))
    assert custom.total == pytest.approx(1.0 + 2 * two.query_semantic)
    assert R.RewardWeights() == R.RewardWeights(format=1.0, accuracy=5.0, query_semantic=0.4, confidence_gain=5.0)
    with pytest.raises(ValueError):
        R.compute_reward(inputs, stage=3)


def test_query_semantic_by_hand():
    # gold "Pleural effusion" -> entity "pleural effusion" -> words [pleural, effusion]
    # query "blunted costophrenic angle": no gold word (0/2); entities "costophrenic angle" (2 of 3 words)
    # retrieved "Pleural effusion is fluid ...": both gold words (2/2)
    value = R.query_semantic_reward(RETRIEVED, "Pleural effusion", vocabulary=VOCAB)
    assert value == pytest.approx(0.0 + 1.0 + 2 / 3)
    assert R.query_semantic_reward(DIRECT, "Pleural effusion", vocabulary=VOCAB) == 0.0  # no query: 0
    on_target = RETRIEVED.replace("blunted costophrenic angle", "pleural effusion")
    assert R.query_semantic_reward(on_target, "Pleural effusion", vocabulary=VOCAB) == pytest.approx(1 + 1 + 1)


def test_reference_bug_gold_entities_come_from_the_answer_text_not_the_letter():
    on_target = RETRIEVED.replace("blunted costophrenic angle", "pleural effusion")
    from_text = R.compute_reward(R.RewardInputs(on_target, "B", LETTERS, gold_text="Pleural effusion"), stage=2,
                                 vocabulary=VOCAB)
    from_letter = R.compute_reward(R.RewardInputs(on_target, "B", LETTERS, gold_text="B"), stage=2,
                                   vocabulary=VOCAB)
    assert from_text.query_semantic == pytest.approx(3.0)
    assert from_letter.query_semantic == pytest.approx(1.0)  # only the query's own entity density is left
    assert any("no medical entity" in n for n in from_letter.notes)


def test_reference_bug_retrieved_text_is_read_from_the_completion():
    # The reference searched the prompt for <retrieve> blocks; the blocks live in the completion.
    assert R.retrieved_text_in(RETRIEVED) == "(1) Pleural effusion is fluid in the pleural space."
    assert R.retrieved_text_in(DIRECT) == ""
    assert R.retrieved_text_in("<retrieve> None </retrieve>") == ""
    without_docs = RETRIEVED.replace("Pleural effusion is fluid in the pleural space.", "Unrelated text.")
    with_docs = R.query_semantic_reward(RETRIEVED, "Pleural effusion", vocabulary=VOCAB)
    assert with_docs - R.query_semantic_reward(without_docs, "Pleural effusion", vocabulary=VOCAB) == pytest.approx(1.0)


def test_letter_token_ids_are_upper_case_tokens():
    pytest.importorskip("transformers")
    from fixtures_qwen import train_tokenizer
    from transformers import PreTrainedTokenizerFast

    from medrwr_edge.training.rollout import letter_token_ids

    tok = PreTrainedTokenizerFast(tokenizer_object=train_tokenizer())
    ids = letter_token_ids(tok, "b")
    assert ids and all(tok.decode([i]).strip() == "B" for i in ids)


PAPER = R.RewardOptions(confidence_gain_scale=1.0, confidence_gain_clip=None)


def test_confidence_gain_scale_guard():
    inputs = R.RewardInputs(RETRIEVED, "B", LETTERS, gold_text="Pleural effusion", retrieval_used=True,
                            logp_gold_with=math.log(0.9), logp_gold_without=-20.0)  # a y' that all but excluded B
    paper = R.compute_reward(inputs, stage=2, vocabulary=VOCAB, options=PAPER)
    assert paper.confidence_gain == pytest.approx(20 + math.log(0.9))  # x5: ~100 against accuracy's 5
    reference = R.compute_reward(inputs, stage=2, vocabulary=VOCAB,
                                 options=R.RewardOptions(confidence_gain_scale=0.1, confidence_gain_clip=None))
    assert reference.confidence_gain == pytest.approx(0.1 * (20 + math.log(0.9)))
    default = R.compute_reward(inputs, stage=2, vocabulary=VOCAB)
    assert default.confidence_gain == 0.5  # clipped to +-0.5: x5 = half of accuracy's weight
    assert default.total == pytest.approx(paper.total - 5 * paper.confidence_gain + 5 * 0.5)
    small = R.RewardInputs(RETRIEVED, "B", LETTERS, retrieval_used=True, logp_gold_with=math.log(0.6),
                           logp_gold_without=math.log(0.5))
    assert R.compute_reward(small, stage=2, vocabulary=VOCAB).confidence_gain == pytest.approx(math.log(1.2))
    assert R.confidence_gain_reward(-30.0, -0.1, True, scale=0.1, clip=1.0) == -1.0


def test_confidence_gain():
    assert R.confidence_gain_reward(-0.1, -2.0, retrieval_used=True) == pytest.approx(1.9)
    assert R.confidence_gain_reward(-2.0, -0.1, retrieval_used=True) == pytest.approx(-1.9)
    assert R.confidence_gain_reward(-0.1, -2.0, retrieval_used=False) == 0.0  # no retrieval, no gain
    assert R.confidence_gain_reward(None, -2.0, retrieval_used=True) == 0.0
    assert R.confidence_gain_reward(-math.inf, -2.0, retrieval_used=True) == 0.0


def test_reference_penalties_are_options_off_by_default():
    messy = "<think> </think>\n\n\n<answer> B </answer>"  # empty block, 3 newlines, short
    assert R.penalties(messy, R.RewardOptions()) == 0.0
    assert R.compute_reward(R.RewardInputs(messy, "B", LETTERS), stage=1).penalties == 0.0
    assert R.penalties(messy, R.RewardOptions(length_penalty=True)) == -1.0
    assert R.penalties(messy, R.RewardOptions(empty_block_penalty=True)) == -1.0
    assert R.penalties(messy, R.RewardOptions(newline_penalty=True)) == -1.0
    # the length limit counts characters without the retrieved documents
    long_docs = DIRECT.replace("<answer>", "<query> q </query>\n<retrieve> " + "x" * 600 + " </retrieve>\n<answer>")
    assert R.penalties(long_docs, R.RewardOptions(length_penalty=True, length_min_chars=10,
                                                  length_max_chars=200)) == 0.0
    many = RETRIEVED.replace("blunted costophrenic angle", "pleural effusion pneumothorax costophrenic angle")
    base = R.query_semantic_reward(many, "Pleural effusion", vocabulary=VOCAB)
    capped = R.query_semantic_reward(many, "Pleural effusion", vocabulary=VOCAB,
                                     options=R.RewardOptions(query_entity_limit=2))
    assert capped == pytest.approx(base - 1.0)


def test_image_query_similarity_when_a_joint_encoder_is_given():
    notes: list[str] = []
    plain = R.query_semantic_reward(RETRIEVED, "Pleural effusion", vocabulary=VOCAB, image="/x.png", notes=notes)
    assert any("image-query similarity omitted" in n for n in notes)
    seen = []

    def scorer(image, text):
        seen.append((image, text))
        return 0.25

    scored = R.query_semantic_reward(RETRIEVED, "Pleural effusion", vocabulary=VOCAB, image="/x.png",
                                     image_text_scorer=scorer)
    assert scored == pytest.approx(plain + 0.25)
    assert seen == [("/x.png", "blunted costophrenic angle")]


def test_entity_extraction_with_the_default_vocabulary():
    vocab = default_vocabulary()
    assert vocab.sources[0].startswith("simple_icd_10_cm") and len(vocab.terms) > 5000 and len(vocab.phrases) > 5000
    found = extract_entities("Sudden headache; CT shows subarachnoid hemorrhage (I60.9) and pleural effusions", vocab)
    assert found == ["i60.9", "headache", "ct", "subarachnoid hemorrhage", "pleural effusion"]
    assert extract_entities("B", vocab) == [] and extract_entities("the patient has a", vocab) == []
