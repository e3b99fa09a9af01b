"""Speculative decoding (runtime/speculative.py + LlamaBackend.generate): drafts from prompt lookup and from a
draft model, the acceptance rule, and — on a real model — output identical to plain decoding at temperature 0
through stop strings, retrieved-text splices, rollbacks and the stop-string cut."""

from __future__ import annotations

import numpy as np
import pytest

from medrwr_edge.errors import InputError
from medrwr_edge.runtime.backend import SamplingSettings
from medrwr_edge.runtime.llama_backend import LlamaBackend
from medrwr_edge.runtime.speculative import DraftLength, lookup_draft

# ---- prompt lookup -----------------------------------------------------------------------------------------


def test_lookup_takes_what_followed_the_longest_recent_match():
    seq = [7, 1, 2, 3, 4, 5, 9, 8, 1, 2, 3]
    assert lookup_draft(seq, 3) == [4, 5, 9]
    assert lookup_draft(seq, 10) == [4, 5, 9, 8, 1, 2, 3]  # up to the end of the sequence
    # The most recent occurrence wins: [2, 3] followed by 6 the second time.
    assert lookup_draft([2, 3, 4, 0, 2, 3, 6, 0, 2, 3], 1) == [6]
    # A 4-gram match beats a more recent 2-gram one.
    assert lookup_draft([5, 1, 2, 3, 4, 5, 0, 3, 4, 9, 1, 2, 3, 4], 2, ngram_max=4) == [5, 0]


def test_lookup_without_a_match_drafts_nothing():
    assert lookup_draft([1, 2, 3, 4, 5], 4) == []
    assert lookup_draft([1, 2, 1], 4) == []  # a 1-token match is below ngram_min
    assert lookup_draft([1, 2, 1, 2], 0) == []
    assert lookup_draft([], 4) == []


def _chi2(freq: np.ndarray, p: np.ndarray, n_draws: int) -> float:
    mask = p > 0
    return float(n_draws * np.sum((freq[mask] - p[mask]) ** 2 / p[mask]) + n_draws * freq[~mask].sum())


CHI2_LIMIT = 20.0  # chi-square with 3 degrees of freedom: P(> 20) ~ 2e-4


def test_draft_length_follows_measured_costs_and_acceptance():
    cheap = DraftLength(8, prior_cost=0.05)
    for _ in range(20):
        cheap.batch(4, 4, verify_seconds=0.0, draft_seconds=0.0)  # everything accepted
    assert cheap.choose(8) >= 6 and cheap.choose(2) == 2
    dear = DraftLength(8)
    dear.single(0.05)
    for _ in range(20):
        dear.batch(4, 0, verify_seconds=0.25, draft_seconds=0.0)  # a batch costs 5 single decodes, all rejected
    assert [dear.choose(8) for _ in range(DraftLength.PROBE_EVERY - 1)] == [0] * (DraftLength.PROBE_EVERY - 1)
    assert dear.choose(8) == 1  # a probe now and then notices when drafting starts to pay
    assert DraftLength(8).choose(0) == 0
    assert DraftLength(5, adaptive=False).choose(8) == 5 and DraftLength(5, adaptive=False).choose(3) == 3


# ---- a real model ------------------------------------------------------------------------------------------

THREADS = 1
SYSTEM = (
    "<|im_start|>system\nYou answer medical coding questions. Search with <query>...</query>, then answer with "
    "<answer>CODE description</answer>.<|im_end|>\n"
)
PROMPTS = [
    "Which ICD-10-CM code is 'Pneumonia, unspecified organism'? Options: A) J18.9 Pneumonia, unspecified "
    "organism B) J15.9 Unspecified bacterial pneumonia C) J12.9 Viral pneumonia, unspecified",
    "Repeat exactly: <query>acute bronchitis due to rhinovirus</query> then J20.6 Acute bronchitis due to "
    "rhinovirus, J20.6 Acute bronchitis due to rhinovirus.",
    "List the codes: E11.9 Type 2 diabetes mellitus without complications; I10 Essential (primary) "
    "hypertension; E11.9 Type 2 diabetes mellitus without complications; I10",
    "Explain step by step why a patient with fever, cough and a lobar consolidation on the chest X-ray most "
    "likely has pneumonia.",
]
RETRIEVED = (
    "\n<retrieve> (1) J18.9 Pneumonia, unspecified organism. (2) J15.9 Unspecified bacterial pneumonia. "
    "(3) J12.9 Viral pneumonia, unspecified. </retrieve>\n"
)
STOPS = ["</query>", "</answer>"]


def _prompt(question: str) -> str:
    return f"{SYSTEM}<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n"


@pytest.fixture(scope="module")
def gguf():
    from tests.test_llama_backend import _smoke_gguf

    return _smoke_gguf()


def _backend(gguf, mode: str, flash_attn: bool) -> LlamaBackend:
    return LlamaBackend(
        str(gguf), n_threads=THREADS, n_ctx=2048, sha256="0" * 64, speculative=mode,
        draft_model=str(gguf) if mode == "draft" else None, flash_attn=flash_attn, n_draft=4, adaptive_draft=False,
    )


# With flash attention, llama.cpp's CPU build computes each row of a verification batch exactly as a one-token
# decode of this model (measured: max |logit difference| 0.0 for batches of 2..12). Without it the attention
# product of a batch is tiled differently and some rows differ by up to ~0.5 in a logit, so there the greedy
# tokens agree on these prompts but the probabilities only approximately (README: speculative decoding).
@pytest.fixture(scope="module", params=[True, False], ids=["flash-attn", "default-attn"])
def backends(gguf, request):
    made = {mode: _backend(gguf, mode, request.param) for mode in ("off", "lookup", "draft")}
    made["bit_identical"] = request.param
    yield made
    for mode in ("off", "lookup", "draft"):
        made[mode].close()


def _turn(b: LlamaBackend, question: str, settings: SamplingSettings) -> list:
    """A Med-RwR-like turn: a pass to a stop, a retrieved splice, a second pass, a rollback and a regeneration.
    Returns everything observable: texts, token ids, probabilities, stop data, and the token list after each step."""
    out = []
    b.reset()
    b.prefill(_prompt(question))
    start = b.n_tokens()
    for step in range(3):
        gen = b.generate(settings, STOPS)
        out.append((gen.text, [t.token_id for t in gen.tokens], [t.prob for t in gen.tokens], gen.stop_reason,
                    gen.stop_string, gen.overshoot_chars, b.tokens()))
        assert b._ctx.kv_positions() == b.n_tokens()  # rejected drafts are not left in the KV cache
        if step == 0:
            b.append_text(RETRIEVED)
        elif step == 1:
            b.rollback(start + 3)  # drop most of the turn, as CDIR drops an answer
    return out


@pytest.mark.real_model
@pytest.mark.parametrize("question", PROMPTS)
def test_greedy_output_is_identical_to_plain_decoding(backends, question):
    settings = SamplingSettings(temperature=0.0, max_tokens=48)
    if not backends["bit_identical"]:
        return _diverges_only_at_near_ties(backends, question, settings)
    plain = _turn(backends["off"], question, settings)
    for mode in ("lookup", "draft"):
        got = _turn(backends[mode], question, settings)
        assert got == plain, mode  # texts, token ids, probabilities, stops, token lists: all bit-identical
    assert backends["draft"].stats.drafted_tokens > 0


NEAR_TIE = 1.0  # twice the largest batched-vs-single logit difference measured on this build (0.47)


def _diverges_only_at_near_ties(backends, question, settings):
    """Without bit-identical batches the speculative output may leave plain decoding's, but only where plain
    decoding's top two logits were within the measured numeric difference of each other."""
    plain_b = backends["off"]
    plain_b.reset()
    plain_b.prefill(_prompt(question))
    n0 = plain_b.n_tokens()
    plain = [t.token_id for t in plain_b.generate(settings, STOPS).tokens]
    for mode in ("lookup", "draft"):
        b = backends[mode]
        b.reset()
        b.prefill(_prompt(question))
        got = [t.token_id for t in b.generate(settings, STOPS).tokens]
        j = next((i for i, (x, y) in enumerate(zip(got, plain)) if x != y), None)
        if j is None:
            assert got == plain, mode
            continue
        plain_b.rollback(n0)
        if j:  # plain decoding up to the divergence: its own logits there
            plain_b.generate(SamplingSettings(temperature=0.0, max_tokens=j), [])
        top2 = np.sort(plain_b.last_logits())[-2:]
        assert top2[1] - top2[0] < NEAR_TIE, (mode, j)


@pytest.mark.real_model
def test_lookup_drafts_are_accepted_when_the_answer_copies_the_context(backends):
    b = backends["lookup"]
    _turn(b, PROMPTS[1], SamplingSettings(temperature=0.0, max_tokens=48))
    assert b.stats.drafted_tokens > 0 and b.stats.accepted_tokens > 0
    rec = b.speculative_record()
    assert rec["mode"] == "lookup" and rec["requested"] == "lookup" and "draft_model" not in rec
    assert rec["acceptance_rate"] == round(b.stats.accepted_tokens / b.stats.drafted_tokens, 4)


@pytest.mark.real_model
def test_a_model_drafting_for_itself_is_always_accepted_at_temperature_0(backends):
    if not backends["bit_identical"]:
        pytest.skip("without flash attention batched logits differ slightly from one-token decoding: a near-tie may flip")
    b = backends["draft"]
    for question in PROMPTS:
        _turn(b, question, SamplingSettings(temperature=0.0, max_tokens=48))
        assert b.stats.drafted_tokens > 0
        assert b.stats.accepted_tokens == b.stats.drafted_tokens


@pytest.mark.real_model
@pytest.mark.parametrize("max_tokens", [1, 2, 5])
def test_max_tokens_is_exact_with_drafts(backends, max_tokens):
    b = backends["draft"]
    b.reset()
    b.prefill(_prompt(PROMPTS[2]))
    n0 = b.n_tokens()
    gen = b.generate(SamplingSettings(temperature=0.0, max_tokens=max_tokens), [])
    assert len(gen.tokens) == max_tokens and gen.stop_reason == "length"
    assert b.n_tokens() == n0 + max_tokens == b._ctx.kv_positions()
    # The next pass continues from the right logits: same as plain decoding of the whole.
    rest = b.generate(SamplingSettings(temperature=0.0, max_tokens=8), [])
    p = backends["off"]
    p.reset()
    p.prefill(_prompt(PROMPTS[2]))
    whole = p.generate(SamplingSettings(temperature=0.0, max_tokens=max_tokens + 8), [])
    assert [t.token_id for t in gen.tokens + rest.tokens] == [t.token_id for t in whole.tokens]


@pytest.mark.real_model
def test_sampling_with_drafts_follows_the_target_distribution(backends):
    """At temperature > 0 with top-k a draft is kept with the probability plain sampling gives it, and otherwise
    replaced by a token from the rest of the distribution (synthetic logits through the real _sample)."""
    b = backends["lookup"]
    b.reset()
    rng = np.random.default_rng(5)
    logits = rng.normal(size=b._model.facts.n_vocab).astype(np.float32)
    top = np.argsort(-logits)[:4]
    logits[top] += np.array([4.0, 3.5, 3.0, 2.0], dtype=np.float32)
    settings = SamplingSettings(temperature=0.8, top_k=4, seed=11)
    cand, p = b._target_distribution(logits, float(logits.max()), settings)
    n = 12_000
    draft = int(top[2])
    kept = [b._sample(logits, settings)[0] for _ in range(n)]  # the verification: keep the draft iff equal
    freq = np.array([kept.count(int(t)) for t in cand]) / n
    assert sum(freq) == 1.0
    assert _chi2(freq, p, n) < CHI2_LIMIT
    accepted = np.mean([t == draft for t in kept])
    assert abs(accepted - p[list(cand).index(draft)]) < 4 * np.sqrt(p[list(cand).index(draft)] / n)


@pytest.mark.real_model
def test_sampled_turns_equal_plain_sampling(backends):
    """Temperature > 0: one random number per position, drafted or not, so with bit-identical logits the
    output is plain sampling's for the same seed (and never depends on how many tokens were drafted)."""
    if not backends["bit_identical"]:
        pytest.skip("needs bit-identical batched logits (flash attention on this build)")
    settings = SamplingSettings(temperature=0.7, top_p=0.9, seed=3, max_tokens=40)
    plain = _turn(backends["off"], PROMPTS[1], settings)
    for mode in ("lookup", "draft"):
        assert _turn(backends[mode], PROMPTS[1], settings) == plain, mode


def test_bad_modes_are_refused(gguf):
    with pytest.raises(InputError, match="speculative must be one of"):
        LlamaBackend(str(gguf), n_ctx=256, n_threads=1, sha256="0" * 64, speculative="fast")
    with pytest.raises(InputError, match="needs a draft model"):
        LlamaBackend(str(gguf), n_ctx=256, n_threads=1, sha256="0" * 64, speculative="draft")


def test_settings_resolve_to_backend_arguments():
    from medrwr_edge.runtime.speculative import speculative_args

    assert speculative_args("lookup") == {"speculative": "lookup"}
    assert speculative_args("draft", "/x/d.gguf") == {"speculative": "draft", "draft_model": "/x/d.gguf"}
    from medrwr_edge.runtime.cli_options import worded

    with pytest.raises(InputError, match="speculative must be one of") as info:
        speculative_args("fast")
    assert worded(info.value).startswith("--speculative must be one of")  # the field, worded by the CLI


@pytest.mark.real_model
def test_auto_is_plain_decoding_on_cpu_and_the_record_says_so(gguf):
    from medrwr_edge.runtime.backends import model_record

    with LlamaBackend(str(gguf), n_ctx=256, n_threads=1, sha256="0" * 64, speculative="auto") as b:
        assert b.speculative == "off"
        assert model_record(b)["speculative"] == {"mode": "off", "requested": "auto"}


@pytest.mark.real_model
def test_guided_turns_are_the_same_with_speculation(gguf, small_icd_pack):
    """Guided decoding composes with speculation: the runtime's scaffold writes, the query cut, the splice and the
    letter read at the answer position see the same cache, so the whole record is plain decoding's (flash attention:
    bit-identical batches)."""
    import dataclasses

    from medrwr_edge.kb_pack.pack import Pack
    from medrwr_edge.runtime import protocol as P
    from medrwr_edge.runtime.loop import LoopConfig, MedRwRLoop
    from medrwr_edge.runtime.retrieval import PackTextRetriever
    from medrwr_edge.evidence.record import EvidenceRecord

    question = "Which ICD-10-CM code is spontaneous tension pneumothorax?"
    options = P.parse_options(["A. J93.0", "B. J93.11", "C. J94.2", "D. J98.4"])
    cfg = LoopConfig(protocol="guided", sampling=SamplingSettings(max_tokens=64), generation_reserve_tokens=128,
                     guided_think_tokens=24, guided_read_tokens=24)
    seen = {}
    with Pack.open(small_icd_pack) as pack:
        for mode in ("off", "lookup", "draft"):
            with _backend(gguf, mode, flash_attn=True) as be:
                rec = EvidenceRecord(question=question, options=[], images=[], model={}, packs=[], settings={})
                MedRwRLoop(be, PackTextRetriever([pack]), None, cfg).run(rec, question, options)
                steps = [{k: v for k, v in dataclasses.asdict(s).items() if "seconds" not in k} for s in rec.steps]
                seen[mode] = (rec.assistant_text, steps, rec.letter, rec.confidence)
                if mode == "draft":
                    assert be.stats.drafted_tokens > 0
    assert seen["lookup"] == seen["off"] and seen["draft"] == seen["off"]
    assert seen["off"][2] in "ABCD"
