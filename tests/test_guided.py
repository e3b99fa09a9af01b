"""Guided decoding (issue 22) and the rag baseline: the runtime writes the tags, a query is always served, the answer
is an option letter read where the model writes it, and its confidence is the letter's unconstrained probability."""

from __future__ import annotations

import pytest

from medrwr_edge.runtime import protocol as P
from medrwr_edge.runtime.backend import ImageInput, SamplingSettings
from medrwr_edge.runtime.loop import LoopConfig, MedRwRLoop, ReferenceImage
from medrwr_edge.runtime.scripted_backend import ScriptedBackend
from medrwr_edge.evidence.record import EvidenceRecord, RetrievedDoc

OPTIONS = P.parse_options(["A. Pneumonia", "B. Pneumothorax", "C. Effusion", "D. Normal"])
QUESTION = "Which finding explains absent breath sounds and a hyperlucent hemithorax?"
LETTERS = {" A": 0.05, " B": 0.62, " C": 0.2, " D": 0.03}


class FakeTexts:
    def __init__(self, found=True):
        self.queries = []
        self.found = found

    def search(self, query, k):
        self.queries.append(query)
        if not self.found:
            return []
        return [RetrievedDoc("kb", "1", f"doc{i}", 1.0 - i / 10, f"passage {i} about {query}") for i in range(k)]


class FakeImages:
    def nearest(self, image):
        return ReferenceImage("refs", "1", "ct-7", "Axial CT of the chest, lung window", 0.93, "ab" * 32)


def guided(outputs, *, next_probs=LETTERS, protocol="guided", texts=None, images=(), options=OPTIONS, **cfg):
    be = ScriptedBackend(outputs, next_probs=next_probs)
    be.info.declares_protocol = False
    texts = texts if texts is not None else FakeTexts()
    # these scripts think (before the query and reading the entries), and entries stay whole
    cfg = {"guided_think_tokens": 96, "guided_read_tokens": 96, "guided_doc_words": 0, **cfg}
    config = LoopConfig(protocol=protocol, sampling=SamplingSettings(max_tokens=200), generation_reserve_tokens=64,
                        **cfg)
    rec = EvidenceRecord(question=QUESTION, options=[], images=[], model={}, packs=[], settings={})
    MedRwRLoop(be, texts, FakeImages(), config).run(rec, QUESTION, options, list(images))
    return rec, be, texts


def test_the_models_usable_query_is_served_and_the_letter_is_read_from_its_distribution():
    rec, be, texts = guided([" The lung looks collapsed. </think>", " pneumothorax breath sounds </query>",
                             " Passage 0 fits option B. </think>"])
    assert rec.protocol == "guided" and rec.status == "answered"
    (query,) = rec.queries()
    assert (query.issued_by, query.text, query.served) == ("model", "pneumothorax breath sounds", True)
    assert texts.queries == ["pneumothorax breath sounds"]
    assert rec.letter == rec.answer == "B"
    assert rec.confidence == pytest.approx(0.62) and rec.confidence_kind == "first-answer-token"
    # the turn is the Med-RwR layout, written by the runtime around the model's words, and it is what the cache holds
    assert rec.assistant_text.startswith("<think> The lung looks collapsed. </think>\n<query> pneumothorax breath "
                                         "sounds </query>\n<retrieve> (1) passage 0")
    assert rec.assistant_text.endswith("<think> Passage 0 fits option B. </think>\n<answer> B </answer>")
    assert be.cache_text().endswith(rec.assistant_text)
    assert [p.kind for p in rec.passes] == ["reasoning", "reasoning"]
    t = rec.tokens
    assert t["decoded"] == t["prompt"] + t["generated"] + t["inserted"]


def test_an_echoed_format_line_is_cut_and_never_served_as_a_query():
    rec, be, texts = guided(["1. If you need more information, output <think> ... </think>", " ... </query>",
                             " ok </think>"])
    (query,) = rec.queries()
    assert query.issued_by == "runtime" and query.raw == "..."
    assert query.text == QUESTION and texts.queries == [QUESTION]  # the runtime searched the question
    assert "no query" in query.reason
    assert any("format line" in n for n in rec.notes)
    assert "If you need more information" not in rec.assistant_text
    assert "If you need more information" not in be.cache_text().split("<|im_start|>assistant")[-1]
    assert rec.letter in "ABCD"


def test_a_close_tag_the_model_began_but_did_not_finish_is_not_searched_for():
    rec, be, texts = guided([" x </think>", " pneumothorax breath sounds </query\n", " x </think>"])
    (query,) = rec.queries()
    assert (query.issued_by, query.text) == ("model", "pneumothorax breath sounds")
    assert query.raw == "pneumothorax breath sounds </query" and texts.queries == ["pneumothorax breath sounds"]
    assert "<query> pneumothorax breath sounds </query>\n<retrieve>" in rec.assistant_text


def test_a_query_about_something_else_or_finding_nothing_is_replaced_by_the_question():
    rec, _, texts = guided([" hmm </think>", " python list comprehension </query>", " ok </think>"])
    (query,) = rec.queries()
    assert query.issued_by == "runtime" and "shares no term" in query.reason
    assert query.raw == "python list comprehension" and texts.queries == [QUESTION]
    rec, _, texts = guided([" hmm </think>", " pneumothorax </query>", " ok </think>"], texts=FakeTexts(found=False))
    (query,) = rec.queries()
    assert query.issued_by == "runtime" and "found nothing" in query.reason and not query.served
    assert texts.queries == ["pneumothorax", QUESTION]
    assert rec.retrievals()[0].block == "\n<retrieve> None </retrieve>\n"


def test_the_answer_is_always_a_valid_letter_whatever_the_model_would_write():
    # the model would continue with an option's text: the letters' own probabilities decide
    rec, _, _ = guided([" x </think>", " effusion </query>", " x </think>"],
                       next_probs={" A": 0.01, " B": 0.002, " C": 0.03, " D": 0.004, " Eff": 0.9})
    assert rec.letter == "C" and rec.confidence == pytest.approx(0.03)
    assert any("held 5% of the model's probability" in n for n in rec.notes)


def test_without_a_next_token_distribution_the_model_writes_its_answer():
    rec, _, _ = guided([" x </think>", " pneumothorax </query>", " x </think>", " B </answer>"], next_probs=None)
    assert rec.letter == "B" and any("cannot read the option letters" in n for n in rec.notes)


def test_no_retrieval_skips_the_query_and_zero_tokens_skip_thinking():
    rec, _, texts = guided([" thinking </think>"], retrieval=False)
    assert rec.queries() == [] and texts.queries == [] and rec.letter == "B"
    assert rec.assistant_text == "<think> thinking </think>\n<answer> B </answer>"
    rec, _, _ = guided([" pneumothorax </query>"], guided_think_tokens=0, guided_read_tokens=0)
    assert rec.assistant_text.startswith("<query> pneumothorax </query>\n<retrieve>")
    assert rec.assistant_text.endswith("</retrieve>\n<answer> B </answer>")


def test_doc_words_cuts_each_spliced_entry_and_the_record_shows_what_was_spliced():
    rec, _, _ = guided([" x </think>", " pneumothorax </query>", " x </think>"], guided_doc_words=3)
    docs = rec.retrievals()[0].docs
    assert [d.snippet for d in docs] == [f"passage {i} about …" for i in range(3)]
    assert "(1) passage 0 about …\n(2)" in rec.assistant_text
    rec, _, _ = guided([" x </think>"], protocol="rag", guided_doc_words=3)
    assert "Knowledge base entries:\n(1) passage 0 about …\n" in rec.prompt


def test_the_exemplar_is_in_the_guided_system_turn_only():
    rec, _, _ = guided([" x </think>", " pneumothorax </query>", " x </think>"])
    assert P.GUIDED_EXEMPLAR in rec.prompt
    assert rec.prompt.startswith("<|im_start|>system\n" + P.SYSTEM_PROMPT_TEXT + P.GUIDED_EXEMPLAR + "<|im_end|>")
    rec, _, _ = guided([" x </think>", " pneumothorax </query>", " x </think>"], guided_exemplar=False)
    assert P.GUIDED_EXEMPLAR not in rec.prompt
    native = ScriptedBackend(["<think> a </think>\n<answer> B </answer>"])
    nrec = EvidenceRecord(question=QUESTION, options=[], images=[], model={}, packs=[], settings={})
    MedRwRLoop(native, FakeTexts(), None, LoopConfig()).run(nrec, QUESTION, OPTIONS)
    assert nrec.protocol == "native" and P.GUIDED_EXEMPLAR not in nrec.prompt


def test_cdir_regenerates_with_the_same_guidance():
    image = ImageInput(pixels=None, sha256="cd" * 32)
    rec, _, _ = guided([" x </think>", " pneumothorax </query>", " x </think>", " looked again </think>"],
                       next_probs={" A": 0.1, " B": 0.5, " C": 0.3, " D": 0.1}, images=[image])
    cdir = rec.cdir()
    assert cdir is not None and cdir.confidence_before == pytest.approx(0.5)
    assert [p.kind for p in rec.passes] == ["reasoning", "reasoning", "cdir"]
    assert rec.assistant_text.endswith("<think> looked again </think>\n<answer> B </answer>")
    assert rec.letter == "B"


def test_rag_puts_one_search_on_the_question_in_the_user_turn():
    rec, be, texts = guided([" passage 0 says B </think>"], protocol="rag")
    assert rec.protocol == "rag" and texts.queries == [QUESTION]
    query, retrieve = rec.steps[0], rec.steps[1]
    assert query.issued_by == "runtime" and retrieve.tokens_inserted == 0 and len(retrieve.docs) == 3
    assert "Knowledge base entries:\n(1) passage 0 about" in rec.prompt
    assert rec.prompt.index("Knowledge base entries") < rec.prompt.index(QUESTION)
    assert rec.assistant_text == "<think> passage 0 says B </think>\n<answer> B </answer>"
    assert rec.letter == "B"


def test_native_letter_confidence_for_an_answer_that_repeats_an_options_text():
    be = ScriptedBackend(["<think> a </think>\n<answer> Pneumothorax </answer>"],
                         next_probs={" A": 0.1, " B": 0.35, " C": 0.05, " D": 0.05})
    rec = EvidenceRecord(question=QUESTION, options=[], images=[], model={}, packs=[], settings={})
    MedRwRLoop(be, FakeTexts(), None, LoopConfig()).run(rec, QUESTION, OPTIONS)
    assert rec.letter == "B" and rec.confidence == pytest.approx(0.35) and rec.confidence_kind == "answer-letter"
    assert be.cache_text().endswith("<answer> Pneumothorax </answer>")  # the read was rolled back
    # a backend that cannot read the letter: not comparable, and CDIR is not triggered by it
    be = ScriptedBackend(["<think> a </think>\n<answer> Pneumothorax </answer>"])
    rec = EvidenceRecord(question=QUESTION, options=[], images=[], model={}, packs=[], settings={})
    MedRwRLoop(be, FakeTexts(), FakeImages(), LoopConfig()).run(rec, QUESTION, OPTIONS,
                                                                [ImageInput(pixels=None, sha256="cd" * 32)])
    assert rec.letter == "B" and rec.confidence_kind == "not-comparable" and rec.cdir() is None


@pytest.mark.real_model
def test_guided_on_a_real_model_serves_a_query_and_reads_the_letter_probability(smoke_gguf, small_icd_pack):
    """SmolLM2-135M, never trained on the protocol: a query is always served, the answer is a letter, and the
    confidence equals a direct read of the letter token's probability at the answer position."""
    import numpy as np

    from medrwr_edge.kb_pack.pack import Pack
    from medrwr_edge.runtime.llama_backend import LlamaBackend
    from medrwr_edge.runtime.retrieval import PackTextRetriever

    question = "Which ICD-10-CM code is spontaneous tension pneumothorax?"
    options = P.parse_options(["A. J93.0", "B. J93.11", "C. J94.2", "D. J98.4"])
    with LlamaBackend(smoke_gguf, n_ctx=4096) as be, Pack.open(small_icd_pack) as pack:
        assert be.info.declares_protocol is False
        cfg = LoopConfig(protocol="guided", sampling=SamplingSettings(max_tokens=64), generation_reserve_tokens=128,
                         guided_think_tokens=24, guided_read_tokens=24)
        rec = EvidenceRecord(question=question, options=[], images=[], model={}, packs=[], settings={})
        MedRwRLoop(be, PackTextRetriever([pack]), None, cfg).run(rec, question, options)
        (query,) = rec.queries()
        assert query.served and query.text and rec.retrievals()[0].docs
        assert query.issued_by in ("model", "runtime")
        assert rec.letter in "ABCD" and rec.answer == rec.letter
        assert "If you need more information" not in rec.assistant_text
        # the cache holds exactly the turn; cut it right before "<answer>", decode "<answer>" again (the same batch
        # as the runtime wrote it: a batch of one would round differently) and read the logits directly
        answer_at = rec.assistant_text.rindex(P.ANSWER_OPEN)
        tail = len(be.tokenize(rec.assistant_text[answer_at:]))
        be.rollback(be.n_tokens() - tail)
        be.append_text(P.ANSWER_OPEN)
        logits = be.last_logits().astype(np.float64)
        p = np.exp(logits - logits.max())
        p /= p.sum()
        (letter_token,) = be.tokenize(" " + rec.letter)
        assert rec.confidence == pytest.approx(float(p[letter_token]), rel=1e-5)


# ------------------------------------------------------------------ every front end takes the same path
from evidence_helpers import assert_valid, evidence_packs, fake_encoders  # noqa: E402,F401  (fixtures)

GUIDED_SCRIPT = [" pneumothorax </query>"]  # the default guided turn: the model's query, then the letter read


def untrained(outputs, **kw):
    """A scripted model that does not declare the protocol: `protocol="auto"` runs it guided."""
    be = ScriptedBackend(outputs, next_probs=LETTERS, **kw)
    be.info.declares_protocol = False
    return be


def test_ask_api_runs_guided_for_an_untrained_model_and_native_when_asked(evidence_packs, fake_encoders, medrwr_home):
    from medrwr_edge.runtime.api import Session

    text_pack, _, _ = evidence_packs
    with Session(packs=[text_pack], image_pack=False, backend=untrained(GUIDED_SCRIPT)) as s:
        rec = s.ask(None, QUESTION, [f"{o.letter}. {o.text}" for o in OPTIONS])
    assert rec.protocol == "guided" and rec.settings["protocol"] == "auto" and rec.letter == "B"
    assert rec.retrievals()[0].docs and rec.queries()[0].issued_by == "model"
    assert_valid(rec.to_dict())
    native = ScriptedBackend(["<think> a </think>\n<answer> C </answer>"])
    native.info.declares_protocol = False
    with Session(packs=[text_pack], image_pack=False, backend=native) as s:
        rec = s.ask(None, QUESTION, [f"{o.letter}. {o.text}" for o in OPTIONS], protocol="native")
    assert rec.protocol == "native" and rec.letter == "C"


class ScriptPerQuestion(ScriptedBackend):
    """An untrained scripted model whose script is chosen by a key in the prompt (one session, many questions)."""

    def __init__(self, scripts: dict):
        super().__init__([], next_probs=LETTERS)
        self.info.declares_protocol = False
        self.scripts = scripts

    def prefill(self, prompt):
        n = super().prefill(prompt)
        self.outputs = next(v for k, v in self.scripts.items() if k in self.cache_text())
        return n


def test_eval_runs_every_item_guided_and_reports_runtime_queries(evidence_packs, fake_encoders, tmp_path,
                                                                medrwr_home):
    from medrwr_edge.eval.datasets import EvalItem
    from medrwr_edge.eval.runner import run_eval
    from medrwr_edge.runtime.api import Session

    text_pack, _, _ = evidence_packs
    opts = [f"{o.letter}. {o.text}" for o in OPTIONS]
    items = [EvalItem("q1", "First: " + QUESTION, opts, "B", ["Pneumothorax"]),
             EvalItem("q2", "Second: " + QUESTION, opts, "B", ["Pneumothorax"])]
    # q1: a usable query; q2: the echoed "..." query, replaced by the question; rag (the entries are in the user
    # turn, "Knowledge base entries"): one answering pass
    scripts = {"Knowledge base entries": [], "First:": GUIDED_SCRIPT, "Second:": [" ... </query>"]}
    with Session(packs=[text_pack], image_pack=False, backend=ScriptPerQuestion(scripts)) as s:
        summary = run_eval(items, s, tmp_path / "ev", ["retrieval", "rag"])
    ret, rag = summary["modes"]["retrieval"], summary["modes"]["rag"]
    assert (ret["accuracy"], ret["retrieval_rate"], ret["queries_by_model"], ret["queries_by_runtime"]) == (1, 1, 1, 1)
    assert (rag["accuracy"], rag["retrieval_rate"], rag["queries_by_runtime"]) == (1, 1, 2)


def test_chat_turns_are_guided_too(evidence_packs, fake_encoders, medrwr_home):
    from medrwr_edge.runtime.chat import Chat

    text_pack, _, _ = evidence_packs
    # distil writes the query; the guided answer pass: the runtime opens <answer>, the model writes its free answer
    be = untrained([" pneumothorax", " a pneumothorax </answer>"])
    with Chat(packs=[text_pack], backend=be) as chat:
        turn = chat.send("What explains a hyperlucent hemithorax?")
    assert turn.evidence.protocol == "guided" and turn.answer == "a pneumothorax"
    assert "</retrieve>\n<answer> a pneumothorax </answer>" in be.cache_text()


def test_serve_answers_guided(evidence_packs, fake_encoders, medrwr_home):
    pytest.importorskip("fastapi", reason="the serve extra is not installed")
    from fastapi.testclient import TestClient

    from medrwr_edge.runtime.api import Session
    from medrwr_edge.serve import ServeConfig, create_app

    text_pack, _, _ = evidence_packs
    factory = lambda: Session(packs=[text_pack], image_pack=False, backend=untrained(GUIDED_SCRIPT))  # noqa: E731
    with TestClient(create_app(factory, ServeConfig())) as client:
        res = client.post("/v1/ask", data={"question": QUESTION, "options": [f"{o.letter}. {o.text}" for o in OPTIONS]})
    assert res.status_code == 200, res.text
    rec = res.json()["record"] if "record" in res.json() else res.json()
    assert rec["protocol"] == "guided" and rec["letter"] == "B"
    assert [s["issued_by"] for s in rec["steps"] if s["type"] == "query"] == ["model"]


def test_guided_cdir_keeps_the_first_answer_when_the_regeneration_is_less_sure():
    class TwoReads(ScriptedBackend):
        """The letters' distribution changes after the CDIR splice: first B (0.5), then C (0.3)."""

        def next_token_probs(self, token_ids):
            self.next_probs = {" A": 0.1, " B": 0.5, " C": 0.2, " D": 0.1} if "CDIR" not in self.cache_text() and \
                "consultation" not in self.cache_text() else {" A": 0.1, " B": 0.2, " C": 0.3, " D": 0.1}
            return super().next_token_probs(token_ids)

    be = TwoReads([" pneumothorax </query>"], next_probs={})
    be.info.declares_protocol = False
    rec = EvidenceRecord(question=QUESTION, options=[], images=[], model={}, packs=[], settings={})
    MedRwRLoop(be, FakeTexts(), FakeImages(), LoopConfig(protocol="guided")).run(
        rec, QUESTION, OPTIONS, [ImageInput(pixels=None, sha256="cd" * 32)])
    cdir = rec.cdir()
    assert (cdir.answer_before, cdir.answer_after, cdir.changed, cdir.kept_first) == ("B", "C", True, True)
    assert rec.letter == "B" and rec.confidence == pytest.approx(0.5)
    assert any("less confident than the first" in n for n in rec.notes)


def test_a_model_that_declares_the_protocol_but_does_not_follow_it_is_reported():
    be = ScriptedBackend(["1. If you need more information, output <think> ... </think>\n<query> ... </query>",
                          "I think it is B."])
    rec = EvidenceRecord(question=QUESTION, options=[], images=[], model={}, packs=[], settings={})
    MedRwRLoop(be, FakeTexts(), None, LoopConfig()).run(rec, QUESTION, OPTIONS)
    (note,) = [n for n in rec.notes if "declares the Med-RwR protocol" in n]
    assert "punctuation-only query" in note and "no <answer>" in note
    ok = ScriptedBackend(["<think> a </think>\n<answer> B </answer>"])
    rec = EvidenceRecord(question=QUESTION, options=[], images=[], model={}, packs=[], settings={})
    MedRwRLoop(ok, FakeTexts(), None, LoopConfig()).run(rec, QUESTION, OPTIONS)
    assert not [n for n in rec.notes if "declares the Med-RwR protocol" in n]


def test_read_tokens_govern_only_the_think_after_the_spliced_entries():
    # no think before the query; the model's reading note after the entries; then the letter
    rec, _, _ = guided([" pneumothorax </query>", " Passage 0 fits option B. </think>"], guided_think_tokens=0,
                       guided_read_tokens=32)
    assert rec.assistant_text.startswith("<query> pneumothorax </query>\n<retrieve>")
    assert rec.assistant_text.endswith("</retrieve>\n<think> Passage 0 fits option B. </think>\n<answer> B </answer>")
    # without retrieval there are no entries to read: the answer pass thinks with --think-tokens (0: not at all)
    rec, _, _ = guided([], retrieval=False, guided_think_tokens=0, guided_read_tokens=32)
    assert rec.assistant_text == "<answer> B </answer>"
