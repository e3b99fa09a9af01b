"""Open-ended answers, --top-k-diagnoses, CDIR for open answers, and SFT-only models (no Med-RwR tags): on the
scripted backend and on the real SmolLM2-135M through the CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest

from medrwr_edge.errors import InputError
from medrwr_edge.runtime import protocol as P
from medrwr_edge.runtime.api import ask
from medrwr_edge.runtime.backend import GeneratedToken, Generation, ImageInput, SamplingSettings
from medrwr_edge.runtime.loop import LoopConfig, MedRwRLoop, ReferenceImage
from medrwr_edge.runtime.scripted_backend import ScriptedBackend
from medrwr_edge.evidence.record import EvidenceRecord

MCQ = P.parse_options(["A. Pneumonia", "B. Asthma", "C. Effusion"])
IMAGE = ImageInput(pixels=None, sha256="cd" * 32)


class OneRef:
    calls = 0

    def nearest(self, image):
        self.calls += 1
        return ReferenceImage("refs", "1", "ref-1", "Chest radiograph: right pneumothorax", 0.9, "ab" * 32)


def _run(outputs, options=(), *, probs=None, images=(IMAGE,), max_tokens=400, **cfg):
    be = ScriptedBackend(outputs, probs=probs)
    refs = OneRef()
    config = LoopConfig(sampling=SamplingSettings(max_tokens=max_tokens), generation_reserve_tokens=64, **cfg)
    rec = EvidenceRecord(question="q", options=[], images=[], model={}, packs=[], settings={})
    MedRwRLoop(be, None, refs, config).run(rec, "Chest pain and absent breath sounds: diagnosis?", list(options),
                                           list(images))
    return rec, be, refs


# ------------------------------------------------------------------------------------------ top-k differential


def test_top_k_asks_in_the_user_turn_and_parses_a_ranked_list():
    rec, _, refs = _run(["<think> air </think>\n<answer> 1. Pneumothorax\n2. Pleural effusion\n3. Rib fracture"
                         " </answer>"], probs={"Pneumothorax": 0.6, "Pleural": 0.3}, top_k_diagnoses=3)
    assert rec.differential == ["Pneumothorax", "Pleural effusion", "Rib fracture"]
    assert rec.answer_kind == "tagged" and rec.letter is None
    # system prompt untouched (the open variant); the request sits in the user turn
    system = P.system_prompt(has_image=False, open_ended=True)
    assert rec.prompt.startswith(f"<|im_start|>system\n{system}<|im_end|>\n")
    assert "diagnosis?\n" + P.differential_request(3) + "<|im_end|>" in rec.prompt
    # confidence: mean probability of the answer's non-space tokens (here 1. / Pneumothorax / ... / fracture)
    pieces = [t for t in ("1", ".", "Pneumothorax", "2", ".", "Pleural", "effusion", "3", ".", "Rib", "fracture")]
    expected = np.mean([{"Pneumothorax": 0.6, "Pleural": 0.3}.get(t, 0.9) for t in pieces])
    assert rec.confidence_kind == "mean-answer-token" and rec.confidence == pytest.approx(expected)
    assert any("not comparable to the letter confidence" in n for n in rec.notes)
    assert any("CDIR is off for open-ended answers (the default" in n for n in rec.notes) and refs.calls == 0


def test_top_k_keeps_n_and_says_when_the_count_differs():
    rec, *_ = _run(["<answer> 1. A 2. B 3. C 4. D </answer>"], top_k_diagnoses=2)
    assert rec.differential == ["A", "B"] and any("listed 4 diagnoses, 2 were asked" in n for n in rec.notes)
    rec, *_ = _run(["<answer> Pneumothorax; effusion </answer>"], top_k_diagnoses=3)
    assert rec.differential == ["Pneumothorax", "effusion"] and any("listed 2" in n for n in rec.notes)


def test_top_k_bad_values_and_options_are_one_line_errors():
    for bad in (0, 11, -1):
        with pytest.raises(InputError, match="between 1 and 10"):
            ask(None, "q?", backend=ScriptedBackend([]), packs=[], image_pack=False, top_k_diagnoses=bad)
    with pytest.raises(InputError, match="cannot be combined with options"):
        ask(None, "q?", ["A. x", "B. y"], backend=ScriptedBackend([]), packs=[], image_pack=False, top_k_diagnoses=3)


def test_cdir_for_open_answers_only_when_asked():
    out = ["<answer> pneumothorax </answer>", "<answer> tension pneumothorax </answer>"]
    rec, _, refs = _run(out, probs={"pneumothorax": 0.4})
    assert rec.cdir() is None and refs.calls == 0 and rec.answer == "pneumothorax"
    rec, _, refs = _run(out, probs={"pneumothorax": 0.4}, cdir_open_ended=True)
    cdir = rec.cdir()
    assert refs.calls == 1 and cdir.confidence_before == pytest.approx(0.4) and cdir.changed
    assert rec.answer == "tension pneumothorax" and any("--cdir-open-ended" in n for n in rec.notes)


# ---------------------------------------------------------------------------------- SFT-only (no Med-RwR tags)

UNTAGGED_NOTE = "no Med-RwR tags: answered without the retrieval protocol (e.g. an SFT-only model)"


def test_untagged_multiple_choice_reads_a_leading_letter():
    rec, _, refs = _run(["B. Asthma, given the wheeze."], MCQ, probs={"B": 0.35})
    assert (rec.status, rec.letter, rec.answer_kind) == ("answered", "B", "untagged")
    assert rec.answer == "B. Asthma, given the wheeze." and rec.confidence == pytest.approx(0.35)
    assert any(UNTAGGED_NOTE in n for n in rec.notes)
    # below the threshold, but CDIR's step is written in tags the model does not use: skipped, and said so
    assert refs.calls == 0 and rec.cdir() is None and any("CDIR skipped" in n for n in rec.notes)


def test_untagged_without_a_letter_is_no_answer_for_multiple_choice():
    rec, *_ = _run(["I am not sure."], MCQ)
    assert rec.status == "no-answer" and rec.answer is None and rec.answer_kind == "none"
    assert any("no option letter" in n for n in rec.notes)


def test_untagged_open_answer_after_think_and_what_is_not_untagged():
    rec, *_ = _run(["<think> air in the pleura </think>\nTension pneumothorax."], probs={"Tension": 0.5})
    assert (rec.answer, rec.answer_kind, rec.confidence_kind) == ("Tension pneumothorax.", "untagged",
                                                                  "mean-answer-token")
    assert rec.steps[0].type == "think" and "air in the pleura" in rec.steps[0].text
    for outputs, why in (
        (["<think> still thinking"], "an open <think>"),
        (["Tension pneumothorax " * 200], "cut by the token limit"),
        (["<query> x </query>", "Pneumothorax."], "a protocol model that forgot <answer> after a query"),
    ):
        rec, *_ = _run(outputs, max_tokens=50)
        assert rec.status == "no-answer" and rec.answer_kind == "none", why


def test_tagged_answers_are_unchanged():
    rec, *_ = _run(["<think> x </think>\n<answer> B </answer>"], MCQ)
    assert (rec.letter, rec.answer_kind) == ("B", "tagged") and not any(UNTAGGED_NOTE in n for n in rec.notes)


# ------------------------------------------------------------------------------------------ the real model


class ForcedSpan:
    """Teacher forcing with the real model's own probabilities for EVERY forced token: pass k decodes `text`
    token by token through the real backend, each token carrying the softmax probability the model gave it, and
    ends the turn there (as if the model emitted end of turn). Other passes are the model's own."""

    def __init__(self, backend, forced: dict[int, str]):
        self.inner, self.forced, self.calls, self.probs = backend, forced, 0, []

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def generate(self, settings, stop, on_piece=None):
        text = self.forced.get(self.calls)
        self.calls += 1
        if text is None:
            return self.inner.generate(settings, stop, on_piece)
        be, tokens = self.inner, []
        for tid in be.tokenize(text):
            logits = be.last_logits().astype(np.float64)
            prob = float(np.exp(logits[tid] - logits.max()) / np.exp(logits - logits.max()).sum())
            be._decode_tokens([tid])
            be.stats.generated_tokens += 1
            tokens.append(GeneratedToken(tid, be.detokenize([tid]), prob))
            self.probs.append((tokens[-1].piece, prob))
        assert "".join(t.piece for t in tokens) == text  # ASCII text: pieces map back onto the text exactly
        stop_string = next((s for s in stop if text.endswith(s)), None)
        return Generation(text, tokens, "stop" if stop_string else "eos", stop_string)


def _real(smoke_gguf, forced, made):
    from medrwr_edge.paths import sha256_file
    from medrwr_edge.runtime.llama_backend import LlamaBackend

    def load(model, settings):
        inner = LlamaBackend(str(smoke_gguf), n_ctx=4096, sha256=sha256_file(smoke_gguf), n_threads=1)
        inner.info.declares_protocol = True  # forced into the protocol's text: `auto` runs it native
        be = ForcedSpan(inner, forced)
        made.append(be)
        return be

    return load


@pytest.mark.real_model
def test_real_model_top_k_differential_through_the_cli(smoke_gguf, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from medrwr_edge.cli import app
    from medrwr_edge.runtime import backends

    answer = " 1. Pneumothorax\n2. Pleural effusion\n3. Rib fracture "
    made = []
    monkeypatch.setattr(backends, "load_backend", _real(smoke_gguf, {0: "<think> no breath sounds </think>\n<answer>"
                                                                   + answer + "</answer>"}, made))
    args = ["ask", "-", "Sudden chest pain and absent breath sounds on one side: what are the likely diagnoses?",
            "--top-k-diagnoses", "3", "--no-retrieval", "--max-tokens", "16", "--no-log"]
    res = CliRunner().invoke(app, args + ["--json"])
    assert res.exit_code == 0, res.output
    rec = json.loads(res.stdout)
    assert rec["differential"] == ["Pneumothorax", "Pleural effusion", "Rib fracture"]
    assert P.differential_request(3) in rec["prompt"] and rec["settings"]["top_k_diagnoses"] == 3
    # the confidence is the mean of the real model's probabilities of the answer's non-space tokens
    text = "".join(piece for piece, _ in made[0].probs)
    start = text.index("<answer>") + len("<answer>")
    end = text.index("</answer>")
    in_answer, pos = [], 0
    for piece, p in made[0].probs:  # tokens overlapping the answer span, whitespace-only ones left out
        if pos + len(piece) > start and pos < end and piece.strip():
            in_answer.append(p)
        pos += len(piece)
    assert rec["confidence_kind"] == "mean-answer-token" and 0 < rec["confidence"] < 1
    assert rec["confidence"] == pytest.approx(float(np.mean(in_answer)))
    assert any("not comparable to the letter confidence" in n for n in rec["notes"])
    res = CliRunner().invoke(app, args)  # the streamed view lists the ranking and labels the confidence
    assert res.exit_code == 0, res.output
    assert "2. Pleural effusion" in res.stdout and "not comparable to a letter confidence" in res.stdout


@pytest.mark.real_model
def test_real_model_untagged_answer_through_the_cli(smoke_gguf, monkeypatch):
    """An SFT-only stand-in: the real model writes a plain "B. Asthma" (no tags) and ends its turn."""
    from typer.testing import CliRunner

    from medrwr_edge.cli import app
    from medrwr_edge.runtime import backends

    made = []
    monkeypatch.setattr(backends, "load_backend", _real(smoke_gguf, {0: "B. Asthma"}, made))
    res = CliRunner().invoke(app, ["ask", "-", "Wheeze that reverses with a bronchodilator?", "-o", "A. Pneumonia",
                                   "-o", "B. Asthma", "--no-retrieval", "--json", "--no-log"])
    assert res.exit_code == 0, res.output
    rec = json.loads(res.stdout)
    assert (rec["status"], rec["letter"], rec["answer_kind"]) == ("answered", "B", "untagged")
    first = made[0].probs[0]
    assert first[0].strip() == "B" and rec["confidence"] == pytest.approx(first[1])  # the real p("B")
    assert any(UNTAGGED_NOTE in n for n in rec["notes"])
