"""`--engine URL`: the Med-RwR loop against a real inference server (llama-cpp-python's `llama_cpp.server` with
SmolLM2-135M on 127.0.0.1, started here), compared with the in-process backend at temperature 0.

Tested dialect: OpenAI-style /v1/completions as llama-cpp-python serves it (text prompts, /extras/tokenize,
streamed logprobs). The C++ llama.cpp server dialect is implemented from its documented API but has no server here.
"""

from __future__ import annotations

import json
import threading
import time

import pytest

from medrwr_edge.runtime.backend import SamplingSettings

from engine_server import FaultProxy, LlamaCppPythonServer, allow_loopback_only, free_port, missing_server_deps

pytestmark = pytest.mark.real_model

OPTIONS = ["A. Pneumothorax", "B. Asthma", "C. Bronchiectasis"]
QUESTION = "Which diagnosis fits a patient with wheezing and reversible airflow obstruction?"
GREEDY = SamplingSettings(temperature=0.0, max_tokens=40)


@pytest.fixture(scope="module")
def engine(smoke_gguf, tmp_path_factory):
    missing = missing_server_deps()
    if missing:
        pytest.skip(f"llama_cpp.server needs the server extra ({', '.join(missing)} missing): "
                    "pip install -e \".[server]\"")
    server = LlamaCppPythonServer(smoke_gguf, tmp_path_factory.mktemp("engine") / "server.log")
    yield server
    server.stop()


@pytest.fixture(autouse=True)
def loopback(monkeypatch):
    allow_loopback_only(monkeypatch)


def _server_backend(url, **kw):
    from medrwr_edge.runtime.server_backend import ServerBackend

    return ServerBackend(url, n_ctx=4096, **kw)


def _local_backend(gguf):
    from medrwr_edge.paths import sha256_file
    from medrwr_edge.runtime.llama_backend import LlamaBackend

    return LlamaBackend(str(gguf), n_ctx=4096, n_threads=1, sha256=sha256_file(gguf))


def _prompt():
    from medrwr_edge.runtime import protocol as P

    opts = P.parse_options(OPTIONS)
    return P.chatml_prompt(P.system_prompt(has_image=False, open_ended=False), P.user_text(QUESTION, opts), [],
                           vision=False, labels=[])


def _comparable(rec: dict) -> dict:
    keep = ("prompt", "assistant_text", "answer", "letter", "status", "answer_kind")
    steps = [{k: v for k, v in s.items() if k not in ("seconds",)} for s in rec["steps"]]
    for s in steps:
        s.pop("confidence", None)
    passes = [(p["kind"], p["generated_tokens"], p["inserted_tokens"], p["stop_reason"]) for p in rec["passes"]]
    return {**{k: rec[k] for k in keep}, "steps": steps, "passes": passes}


# ------------------------------------------------------------------------------------------------ the backend


def test_probe_names_the_server_and_its_limits(engine, smoke_gguf):
    with _server_backend(engine.url) as be:
        assert be.info.dialect == "openai" and be.info.server == "llama-cpp-python"
        assert be.info.model_id.endswith(smoke_gguf.name) and len(be.info.model_sha256) == 64
        assert not be.info.token_prompts  # its /v1/completions takes text prompts only
        assert any("text prompts only" in n for n in be.info.notes)
        assert any("does not report prompt tokens served from its cache" in n for n in be.info.notes)


def test_tokenizer_matches_the_in_process_one(engine, smoke_gguf):
    local = _local_backend(smoke_gguf)
    with _server_backend(engine.url) as be:
        for text in ("</query>\n<retrieve> (1) J45.909 Unspecified asthma </retrieve>\n", "é ü 中文", "<|im_end|>"):
            assert be.tokenize(text) == local.tokenize(text)
    local.close()


def test_generation_rollback_and_exact_stop_cut_match_in_process(engine, smoke_gguf):
    local = _local_backend(smoke_gguf)
    local.reset()
    local.prefill(_prompt())
    free = local.generate(GREEDY, [])
    assert len(free.tokens) > 8
    # A stop string that ends INSIDE a token: both backends must cut the text and the sequence at the same place.
    full_piece = free.tokens[5].piece
    assert len(full_piece) > 1, "the chosen token must span more than one character"
    stop = "".join(t.piece for t in free.tokens[3:5]) + full_piece[:-1]
    with _server_backend(engine.url) as be:
        for backend in (local, be):
            backend.reset()
            backend.prefill(_prompt())
        n0 = be.n_tokens()
        assert n0 == local.n_tokens()
        a, b = local.generate(GREEDY, [stop]), be.generate(GREEDY, [stop])
        assert (a.text, a.stop_reason, a.overshoot_chars) == (b.text, b.stop_reason, b.overshoot_chars)
        assert b.stop_reason == "stop" and b.overshoot_chars == 1 and b.text.endswith(stop)
        assert [t.piece for t in a.tokens] == [t.piece for t in b.tokens]
        assert [t.prob for t in a.tokens] == pytest.approx([t.prob for t in b.tokens], rel=1e-3, abs=1e-5)
        assert local.n_tokens() == be.n_tokens() and be.text().endswith(stop)
        # Roll back (as CDIR does) and generate again without a stop string: the server gets a shorter prompt.
        local.rollback(n0)
        be.rollback(n0)
        a, b = local.generate(GREEDY, []), be.generate(GREEDY, [])
        assert a.text == b.text == free.text and b.stop_reason == a.stop_reason
        assert be.stats.rolled_back_tokens == local.stats.rolled_back_tokens > 0
        assert [r["server_prompt_tokens"] for r in be.requests] == [r["prompt_tokens"] for r in be.requests]
    assert "prefix-match hit" in engine.log_text()  # the server reused its cache for the shorter prompt
    local.close()


def test_next_token_probs_from_top_logprobs(engine, smoke_gguf):
    import numpy as np

    local = _local_backend(smoke_gguf)
    local.reset()
    local.prefill(_prompt())
    logits = local.last_logits().astype(np.float64)
    p = np.exp(logits - logits.max())
    p /= p.sum()
    order = np.argsort(-p)
    top, outside = [int(t) for t in order[:3]], int(order[500])
    with _server_backend(engine.url) as be:
        be.prefill(_prompt())
        got = be.next_token_probs(top + [outside])
        assert got[:3] == pytest.approx([float(p[t]) for t in top], rel=1e-3)
        assert be.last_probs_bounded == [False, False, False, True]
        # Outside the top-k the server says nothing more: an upper bound, never below the true value.
        assert float(p[outside]) <= got[3] <= float(p[order[19]]) + 1e-6
        assert be.n_tokens() == local.n_tokens()  # nothing was added to the sequence
    local.close()


# ------------------------------------------------------------------------------------------- ask, eval, serve


def _ask_cli(args, tmp_path):
    """The real CLI in a subprocess (its own error handling: one `error: …` line)."""
    from cli_harness import installed_models_dir, private_home, run_cli, text

    res = run_cli(["ask", "-", QUESTION, *sum((["-o", o] for o in OPTIONS), []), *args],
                  private_home(tmp_path, installed_models_dir()))
    return res.returncode, text(res.stdout), text(res.stderr)


# The identity checks run the native protocol: guided decoding reads the letters in a request of their own, whose
# batch split differs from the in-process decode, so its letter probability can differ in the last digits.
def test_ask_through_the_server_equals_in_process(engine, smoke_gguf, small_icd_pack, tmp_path):
    common = ["-p", str(small_icd_pack), "--max-tokens", "64", "--ctx", "4096", "--json", "--no-log",
              "--protocol", "native"]
    rc_local, out_local, err_local = _ask_cli([*common, "-m", str(smoke_gguf), "--threads", "1"], tmp_path)
    rc_server, out_server, err_server = _ask_cli([*common, "--engine", engine.url], tmp_path)
    assert rc_local == 0 and rc_server == 0, err_local + err_server
    local, server = json.loads(out_local), json.loads(out_server)
    assert _comparable(server) == _comparable(local)
    assert server["confidence"] == pytest.approx(local["confidence"], rel=1e-3)
    eng = server["model"]["engine"]
    assert eng["server"] == "llama-cpp-python" and eng["url"] == engine.url and eng["model_id"].endswith(".gguf")
    assert len(eng["requests"]) == len(server["passes"])
    assert all(r["server_prompt_tokens"] == r["prompt_tokens"] for r in eng["requests"])
    assert server["settings"]["engine"] == engine.url
    from evidence_helpers import assert_valid

    assert_valid(server)  # the record, engine block included, matches the published schema


def test_forced_retrieval_through_the_server_equals_in_process(engine, smoke_gguf, small_icd_pack):
    """A real retrieve block spliced into the turn, then the real model continues: same text both ways, and the
    server is sent the previous prompt + query + block (its log shows a prefix-cache hit, not a re-encode)."""
    from medrwr_edge.runtime.api import ask

    from forcing import ForcedPasses

    forced = {0: "<think> Wheezing suggests airway disease. </think>\n<query> asthma </query>"}
    recs = []
    for be in (_local_backend(smoke_gguf), _server_backend(engine.url)):
        rec = ask(None, QUESTION, OPTIONS, packs=[small_icd_pack], backend=ForcedPasses(be, dict(forced)),
                  max_tokens=48, cdir=False)
        recs.append(rec)
        be.close()
    local, server = (r.to_dict() for r in recs)
    assert _comparable(server) == _comparable(local)
    assert len(recs[1].retrievals()) == 1 and recs[1].retrievals()[0].tokens_inserted > 20
    req = server["model"]["engine"]["requests"]
    assert len(req) == 1 and req[0]["prompt_tokens"] == server["tokens"]["prompt"] + server["tokens"]["inserted"]
    assert req[0]["server_prompt_tokens"] == req[0]["prompt_tokens"]  # the server's tokens are the loop's


def test_eval_through_the_server_equals_in_process(engine, smoke_gguf, small_icd_pack, tmp_path, medrwr_home):
    """One mode only: with "plain,retrieval" the second mode sends the server a prompt it holds in full, and
    llama-cpp-python then re-decodes the prompt's last token alone to refresh its logits ("replay one token" in
    Llama.generate). Those logits differ in the last bits from the batched decode the in-process backend did, and
    on builtin:icd10 item 2 a near-tie (D 0.157 vs C 0.150) flips the greedy answer. Found by this test; it is why
    replay on a server says exact identity cannot be promised."""
    import typer
    from typer.testing import CliRunner

    from medrwr_edge.eval.cli import register
    from medrwr_edge.eval.runner import read_records

    app = typer.Typer()
    register(app)
    app.command("noop")(lambda: None)
    base = ["eval", "builtin:icd10", "--limit", "2", "--modes", "retrieval", "--pack", str(small_icd_pack),
            "--max-tokens", "24", "--ctx", "4096", "--json", "--no-progress", "--protocol", "native"]
    runs = {}
    for name, extra in (("local", ["--model", str(smoke_gguf), "--threads", "1"]),
                        ("server", ["--engine", engine.url])):
        res = CliRunner().invoke(app, [*base, *extra, "--out", str(tmp_path / name)])
        assert res.exit_code == 0, res.output
        runs[name] = read_records(tmp_path / name / "records.jsonl")
    assert len(runs["server"]) == 2
    for a, b in zip(runs["local"], runs["server"]):
        assert _comparable(b["evidence"]) == _comparable(a["evidence"])
        assert b["evidence"]["model"]["engine"]["server"] == "llama-cpp-python"


def test_serve_in_front_of_the_server(engine, small_icd_pack, smoke_gguf, medrwr_home):
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from medrwr_edge.runtime.api import AskSettings, Session
    from medrwr_edge.serve import ServeConfig, create_app

    settings = AskSettings(engine=engine.url, max_tokens=48, n_ctx=4096, protocol="native")
    with TestClient(create_app(lambda: Session(packs=[str(small_icd_pack)], image_pack=False, settings=settings),
                               ServeConfig())) as c:
        r = c.post("/v1/ask", data={"question": QUESTION, "options": OPTIONS, "max_tokens": "48"})
        assert r.status_code == 200, r.text
        served = r.json()
    local = _local_backend(smoke_gguf)
    from medrwr_edge.runtime.api import ask

    direct = ask(None, QUESTION, OPTIONS, packs=[small_icd_pack], image_pack=False, backend=local, max_tokens=48,
                 n_ctx=4096, protocol="native")
    local.close()
    assert _comparable(served) == _comparable(direct.to_dict())
    assert served["model"]["engine"]["server"] == "llama-cpp-python"


# ---------------------------------------------------------------------------------------------------- faults


def test_server_down_at_start_is_one_clear_error(tmp_path, small_icd_pack):
    url = f"http://127.0.0.1:{free_port()}"
    rc, out, err = _ask_cli(["-p", str(small_icd_pack), "--engine", url], tmp_path)
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert rc == 1 and not out
    assert len(lines) == 1 and lines[0].startswith("error: cannot reach the inference server at " + url), err


def test_not_an_engine_url_is_refused(tmp_path, small_icd_pack):
    rc, out, err = _ask_cli(["-p", str(small_icd_pack), "--engine", "ftp://x"], tmp_path)
    assert rc == 2 and err.strip().startswith("error: --engine 'ftp://x' is not an http(s):// URL"), err


def test_connection_dropped_mid_generation_ends_the_question_and_logs_nothing(engine, small_icd_pack, tmp_path):
    from cli_harness import snapshot

    proxy = FaultProxy(engine.port, cut_after=1500)  # headers and a few streamed tokens, then the line goes dead
    home = tmp_path / "home"
    try:
        rc, out, err = _ask_cli(["-p", str(small_icd_pack), "--engine", proxy.url, "--max-tokens", "64"], tmp_path)
    finally:
        proxy.close()
    assert proxy.cuts >= 1
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert rc == 1 and len(lines) == 1, err
    assert lines[0].startswith("error: the inference server at " + proxy.url) and "connection" in lines[0]
    # Nothing half-logged: the answer log was never written (logging is on by default for ask).
    assert not any("log" in p for p in snapshot(home)), snapshot(home)


def test_slow_server_times_out_with_a_message_that_says_so(engine, small_icd_pack, tmp_path):
    proxy = FaultProxy(engine.port, delay_s=1.5)
    try:
        rc, out, err = _ask_cli(["-p", str(small_icd_pack), "--engine", proxy.url, "--engine-timeout", "0.5"],
                                tmp_path)
    finally:
        proxy.close()
    assert rc == 1 and "did not answer in time" in err and "--engine-timeout" in err, err


def test_a_server_that_keeps_no_cache_between_passes_still_gives_the_same_answer(engine, smoke_gguf,
                                                                                  small_icd_pack):
    """Another client's request between our passes evicts llama-cpp-python's single cache (as a server that
    ignores `cache_prompt` would): every pass is recomputed, and the answer is the same."""
    from medrwr_edge.runtime.api import ask

    from forcing import ForcedPasses

    other = _server_backend(engine.url)
    other.prefill("<|im_start|>user\nSomething else entirely.<|im_end|>\n<|im_start|>assistant\n")

    class Interleaved(ForcedPasses):
        def generate(self, settings, stop, on_piece=None):
            other.generate(SamplingSettings(max_tokens=2), [])  # evicts our prefix from the server's cache
            return super().generate(settings, stop, on_piece)

    forced = {0: "<think> Wheezing. </think>\n<query> asthma </query>"}
    recs = []
    for wrap in (ForcedPasses, Interleaved):
        be = _server_backend(engine.url)
        recs.append(ask(None, QUESTION, OPTIONS, packs=[small_icd_pack], backend=wrap(be, dict(forced)),
                        max_tokens=32, cdir=False).to_dict())
        be.close()
    other.close()
    assert _comparable(recs[1]) == _comparable(recs[0])
    # llama-cpp-python reports no cache counters: the record says so rather than inventing a number.
    assert recs[1]["model"]["engine"]["prompt_tokens_computed"] is None
    assert "cached_tokens" not in recs[1]["model"]["engine"]["requests"][0]
    assert any("does not report prompt tokens served from its cache" in n for n in recs[1]["notes"])


def test_replay_through_the_server_compares_like_with_like(engine, smoke_gguf, small_icd_pack, tmp_path,
                                                           monkeypatch):
    from cli_harness import installed_models_dir, private_home

    from medrwr_edge.errors import IntegrityError
    from medrwr_edge.evidence.replay import replay
    from medrwr_edge.runtime.api import ask

    # replay verifies each pack's encoder against the installed models: a private home that links to them
    monkeypatch.setenv("MEDRWR_EDGE_HOME", str(private_home(tmp_path, installed_models_dir())))
    rec = ask(None, QUESTION, OPTIONS, packs=[small_icd_pack], image_pack=False, engine=engine.url,
              max_tokens=32, n_ctx=4096).to_dict()
    assert rec["model"]["engine"]["model_id"].endswith(".gguf")
    result = replay(rec)  # the record names its server: replayed there, model checked by the id it serves
    assert result.identical, result.divergence
    assert any("checked by the id the server reports" in v for v in result.verified)
    assert any("exact identity cannot be promised" in n and "text prompts only" in n for n in result.notes)
    # An in-process record replayed on the server: it runs, and says it is not like with like.
    local = ask(None, QUESTION, OPTIONS, packs=[small_icd_pack], image_pack=False, model=smoke_gguf,
                max_tokens=32, n_ctx=4096, n_threads=1).to_dict()
    crossed = replay(local, engine=engine.url)
    assert any("not like with like" in n for n in crossed.notes)
    # A server that serves another model id is refused before anything is compared.
    rec["model"]["engine"]["model_id"] = "some-other-model"
    with pytest.raises(IntegrityError, match="not the same model"):
        replay(rec)


def test_serve_maps_engine_faults_to_504_and_502_and_logs_nothing(engine, small_icd_pack, medrwr_home):
    """Through `serve`: an engine that hangs -> 504 naming the timeout; an engine whose port went dead -> 502
    naming the server; one JSON line each, the same in a stream's error event, and nothing in the answer log."""
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from cli_harness import snapshot
    from medrwr_edge.runtime.api import AskSettings, Session
    from medrwr_edge.serve import ServeConfig, create_app

    proxy = FaultProxy(engine.port)
    settings = AskSettings(engine=proxy.url, engine_timeout=1.0, max_tokens=16, n_ctx=4096, protocol="native")
    ask_form = {"question": QUESTION, "options": OPTIONS}
    try:
        with TestClient(create_app(lambda: Session(packs=[str(small_icd_pack)], image_pack=False,
                                                   settings=settings), ServeConfig(log_answers=True))) as c:
            proxy.hang = True  # the server accepts and never answers
            r = c.post("/v1/ask", data=ask_form)
            assert r.status_code == 504, r.text
            err = r.json()["error"]
            assert err["type"] == "engine_timeout" and "did not answer in time" in err["message"]
            assert proxy.url in err["message"] and "\n" not in err["message"]
            with c.stream("POST", "/v1/ask", data={**ask_form, "stream": "true"}) as s:
                events = [json.loads(line[5:]) for line in s.iter_lines() if line.startswith("data:")]
            assert events[-1]["error"]["type"] == "engine_timeout" and events[-1]["error"]["status"] == 504
            proxy.kill()  # the port is dead now: nothing listens, open connections are gone
            r = c.post("/v1/ask", data=ask_form)
            assert r.status_code == 502, r.text
            err = r.json()["error"]
            assert err["type"] == "engine_error" and proxy.url in err["message"], err
            health = c.get("/v1/health").json()
            assert health["failed"] == 3 and health["completed"] == 0
    finally:
        proxy.kill()
    assert not any("log" in p for p in snapshot(medrwr_home)), snapshot(medrwr_home)


QUESTIONS = [QUESTION, "Which diagnosis fits sudden pleuritic chest pain with absent breath sounds on one side?",
             "Which diagnosis fits a chronic cough with daily purulent sputum and dilated bronchi on CT?"]


def test_serve_engine_parallel_answers_at_once_and_keeps_records_apart(engine, small_icd_pack, medrwr_home):
    """`engine_parallel=3`: three workers, each its own ServerBackend sequence. Three different questions sent at
    once are all answered (none lost), each record is its own question's, and equals the answer one worker gives
    to the same question alone (temperature 0). llama-cpp-python's server decodes one request at a time and keeps
    one cache, so here the workers interleave on it (the benchmark measures what that costs)."""
    pytest.importorskip("fastapi")
    from concurrent.futures import ThreadPoolExecutor

    from fastapi.testclient import TestClient

    from medrwr_edge.runtime.api import AskSettings, Session
    from medrwr_edge.serve import ServeConfig, create_app

    settings = AskSettings(engine=engine.url, max_tokens=24, n_ctx=4096, protocol="native")

    def factory():
        return Session(packs=[str(small_icd_pack)], image_pack=False, settings=settings)

    def ask(c, q):
        r = c.post("/v1/ask", data={"question": q, "options": OPTIONS})
        assert r.status_code == 200, r.text
        return r.json()

    with TestClient(create_app(factory, ServeConfig())) as c:
        assert c.get("/v1/health").json()["parallel"] == 1  # llama-cpp-python names no slots: 1 by default
        alone = [ask(c, q) for q in QUESTIONS]
    with TestClient(create_app(factory, ServeConfig(engine_parallel=3))) as c:
        assert c.get("/v1/health").json()["parallel"] == 3
        peak, done = [0], threading.Event()

        def watch():  # how many questions serve had in flight at once
            while not done.is_set():
                peak[0] = max(peak[0], c.get("/v1/health").json()["in_flight"])
                time.sleep(0.05)

        watcher = threading.Thread(target=watch)
        watcher.start()
        with ThreadPoolExecutor(3) as pool:
            together = list(pool.map(lambda q: ask(c, q), QUESTIONS))
        done.set()
        watcher.join()
        health = c.get("/v1/health").json()
    assert peak[0] == 3 and health["completed"] == 3 and health["failed"] == 0
    for q, a, b in zip(QUESTIONS, alone, together):
        assert b["question"] == q
        assert _comparable(b) == _comparable(a)
        assert len(b["model"]["engine"]["requests"]) == len(b["passes"])  # its own requests only


def test_an_image_question_through_the_server_is_refused_in_one_line(engine, small_icd_pack, tmp_path):
    """The model on the server should see the image; llama-cpp-python's /v1/completions cannot carry one, so the
    question is refused (one `error:` line naming what the server lacks, exit 2, nothing logged), not answered
    blind."""
    from cli_harness import installed_models_dir, private_home, run_cli, snapshot, text, write_phantom_pngs

    image = write_phantom_pngs(tmp_path / "img", 1)[0]
    home = private_home(tmp_path, installed_models_dir())
    res = run_cli(["ask", str(image), QUESTION, *sum((["-o", o] for o in OPTIONS), []), "-p", str(small_icd_pack),
                   "--engine", engine.url], home)
    err = [ln for ln in text(res.stderr).splitlines() if ln.strip()]
    assert res.returncode == 2 and not text(res.stdout).strip() and len(err) == 1, err
    assert err[0].startswith(f"error: the inference server at {engine.url} (llama-cpp-python) cannot be shown images")
    assert "/v1/completions has no image input" in err[0] and "Traceback" not in text(res.stderr)
    assert not any("log" in p for p in snapshot(home)), snapshot(home)
