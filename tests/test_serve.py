"""`medrwr-edge serve`: every endpoint, bad requests, auth, the bounded queue, cancellation, shutdown, logs.

Most tests drive the app in-process (Starlette's TestClient: no sockets) with the scripted backend. Those that
need a real server (concurrency, disconnects, the browser page, the real model) start uvicorn in a thread on a
127.0.0.1 socket and use `loopback_network`, which re-allows connections to loopback only; the autouse guard
still refuses every other address.
"""

from __future__ import annotations

import base64
import io
import json
import logging
import re
import shutil
import socket
import subprocess
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import pytest

pytest.importorskip("fastapi", reason="the serve extra is not installed (pip install -e '.[serve]')")
httpx = pytest.importorskip("httpx", reason="the serve extra is not installed (pip install -e '.[serve]')")
uvicorn = pytest.importorskip("uvicorn", reason="the serve extra is not installed (pip install -e '.[serve]')")

from conftest import NetworkAccessError  # noqa: E402
from fastapi.testclient import TestClient  # noqa: E402

from medrwr_edge.errors import InputError  # noqa: E402
from medrwr_edge.runtime.api import AskSettings, Session  # noqa: E402
from medrwr_edge.runtime.scripted_backend import ScriptedBackend  # noqa: E402
from medrwr_edge.serve import ServeConfig, create_app  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ["<think> Air in the pleural space. </think>\n<query> pneumothorax code </query>",
          "<think> The entries agree. </think>\n<answer> A </answer>"]
OPTIONS = ["A. J93.9", "B. J18.9", "C. J45.909", "D. J06.9"]
# Captured before the autouse guard patches them (this module is imported at collection time).
_REAL_SOCKET = (socket.socket.connect, socket.socket.connect_ex, socket.getaddrinfo, socket.create_connection)
_LOOPBACK = {"127.0.0.1", "::1", "localhost"}


class SlowScriptedBackend(ScriptedBackend):
    """The scripted model, `delay` seconds per token: long enough to fill a queue or disconnect mid-answer."""

    def __init__(self, outputs, delay: float = 0.02, **kw):
        super().__init__(outputs, **kw)
        self.delay = delay
        self.pieces_streamed = 0

    def generate(self, settings, stop, on_piece=None):
        def slow_piece(piece):
            time.sleep(self.delay)
            self.pieces_streamed += 1
            if on_piece:
                on_piece(piece)

        return super().generate(settings, stop, slow_piece)


def scripted_factory(backend=None, packs=(), image_pack=False):
    def factory():
        return Session(packs=list(packs), image_pack=image_pack, backend=backend or ScriptedBackend(SCRIPT))

    return factory


@pytest.fixture
def client():
    with TestClient(create_app(scripted_factory(), ServeConfig())) as c:
        yield c


def png_bytes(size=32) -> bytes:
    import numpy as np
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray((np.arange(size * size, dtype=np.uint8).reshape(size, size) * 7)).save(buf, format="PNG")
    return buf.getvalue()


def parse_sse(text: str) -> list[tuple[str, object]]:
    events = []
    for block in text.split("\n\n"):
        kind, data = "message", ""
        for line in block.splitlines():
            if line.startswith("event: "):
                kind = line[7:]
            elif line.startswith("data: "):
                data += line[6:]
        if data:
            events.append((kind, data if data == "[DONE]" else json.loads(data)))
    return events


def schema_validator():
    jsonschema = pytest.importorskip("jsonschema")
    schema = json.loads((ROOT / "medrwr_edge/data/evidence.schema.json").read_text())
    return jsonschema.Draft202012Validator(schema)


# ------------------------------------------------------------------------------------------- endpoints


def test_ask_returns_a_schema_valid_evidence_record(client):
    r = client.post("/v1/ask", data={"question": "Which code fits?", "options": OPTIONS},
                    files=[("image", ("scan.png", png_bytes(), "image/png"))])
    assert r.status_code == 200, r.text
    assert re.fullmatch(r"[0-9a-f]{16}", r.headers["x-request-id"])
    rec = r.json()
    schema_validator().validate(rec)
    assert rec["letter"] == "A" and rec["status"] == "answered"
    assert [o["letter"] for o in rec["options"]] == ["A", "B", "C", "D"]
    assert rec["images"][0]["format"] == "png" and len(rec["images"][0]["sha256"]) == 64
    assert [s["type"] for s in rec["steps"]] == ["think", "query", "retrieve", "think", "answer"]


def test_answers_are_logged_like_ask_when_asked_to(medrwr_home):
    """The CLI serves with the answer log on (command "api"); the record is logged scrubbed, as `ask` logs it."""
    from medrwr_edge.evidence.log import AnswerLog

    with TestClient(create_app(scripted_factory(), ServeConfig(log_answers=True))) as c:
        r = c.post("/v1/ask", data={"question": "Which code fits?", "options": OPTIONS},
                   files=[("image", ("scan.png", png_bytes(), "image/png"))])
    assert r.status_code == 200, r.text
    with AnswerLog() as log:
        [entry] = log.entries()
        assert entry.command == "api" and log.record(entry.id)["letter"] == "A"


def test_options_may_come_as_one_multiline_field(client):
    r = client.post("/v1/ask", data={"question": "Which code fits?", "options": "\n".join(OPTIONS)})
    assert r.status_code == 200 and len(r.json()["options"]) == 4


def test_ask_streams_the_steps_then_the_record(client):
    r = client.post("/v1/ask", data={"question": "Which code fits?", "options": OPTIONS, "stream": "true"})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = parse_sse(r.text)
    kinds = [k for k, _ in events]
    assert kinds[:2] == ["queued", "started"]
    steps = [k for k in kinds if k not in ("piece", "queued", "started")]
    assert steps == ["think", "query", "retrieve", "think", "answer", "record", "done"]
    pieces = "".join(p["text"] for k, p in events if k == "piece")
    record = dict(events)["record"]
    assert pieces == record["assistant_text"].replace(record["steps"][2]["block"], "")  # retrieve is not a piece
    assert dict(events)["query"]["text"] == "pneumothorax code"
    # the Accept header alone also selects the stream
    r2 = client.post("/v1/ask", data={"question": "Which code fits?"}, headers={"Accept": "text/event-stream"})
    assert parse_sse(r2.text)[-1][0] == "done"


def test_chat_completions_openai_shape_with_image_and_evidence(client):
    url = "data:image/png;base64," + base64.b64encode(png_bytes()).decode()
    body = {"model": "anything", "messages": [
        {"role": "system", "content": "ignored: Med-RwR's system prompt is fixed"},
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                     {"type": "text", "text": "Which code fits?\n" + "\n".join(OPTIONS)}]}]}
    r = client.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["object"] == "chat.completion" and out["id"].startswith("chatcmpl-")
    assert out["choices"][0]["message"] == {"role": "assistant", "content": "A",
                                            "reasoning_content": out["medrwr_evidence"]["assistant_text"]}
    ev = out["medrwr_evidence"]
    assert ev["question"] == "Which code fits?" and len(ev["options"]) == 4 and ev["images"][0]["format"] == "png"
    assert out["usage"]["total_tokens"] == out["usage"]["prompt_tokens"] + out["usage"]["completion_tokens"] > 0
    # explicit options win over parsing the text
    r = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "Which code fits?"}],
                                                  "medrwr_options": ["A. J93.9", "B. J18.9"]})
    assert len(r.json()["medrwr_evidence"]["options"]) == 2


def test_chat_completions_stream_is_openai_chunks(client):
    r = client.post("/v1/chat/completions", json={"stream": True, "messages": [
        {"role": "user", "content": "Which code fits?\n" + "\n".join(OPTIONS)}]})
    events = parse_sse(r.text)
    assert events[-1][1] == "[DONE]"
    chunks = [d for _, d in events[:-1]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    content = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert content == "A"
    reasoning = "".join(c["choices"][0]["delta"].get("reasoning_content", "") for c in chunks)
    assert "<query> pneumothorax code </query>" in reasoning
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop" and chunks[-1]["medrwr_evidence"]["letter"] == "A"


def test_models_health_openapi_and_page(client):
    models = client.get("/v1/models").json()
    assert models["object"] == "list" and models["data"][0]["id"] == "scripted"
    health = client.get("/v1/health").json()
    assert health["status"] == "ok" and health["queue_depth"] == 0 and health["max_queue"] == 8
    spec = client.get("/openapi.json").json()
    for path in ("/v1/ask", "/v1/chat/completions", "/v1/packs", "/v1/models", "/v1/health"):
        assert path in spec["paths"], path
    assert "question" in json.dumps(spec["components"])
    page = client.get("/")
    assert page.status_code == 200 and "<script>" in page.text
    csp = page.headers["content-security-policy"]
    assert "script-src 'sha256-" in csp and "default-src 'none'" in csp and "http" not in page.text.split("<body")[1]


def test_in_process_model_is_one_worker_whatever_engine_parallel_says():
    """--engine-parallel is for a model on an inference server; in-process one context decodes one question."""
    with TestClient(create_app(scripted_factory(), ServeConfig(engine_parallel=4))) as c:
        assert c.get("/v1/health").json()["parallel"] == 1
        assert c.post("/v1/ask", data={"question": "Which code?", "options": OPTIONS}).status_code == 200
    with pytest.raises(InputError, match="--engine-parallel must be between 1 and 64"):
        ServeConfig(engine_parallel=0).check()


def test_packs_endpoint_and_pack_selection(small_icd_pack):
    factory = scripted_factory(packs=[small_icd_pack])
    with TestClient(create_app(factory, ServeConfig())) as c:
        packs = c.get("/v1/packs").json()["packs"]
        assert [p["name"] for p in packs] == ["icd-small"] and packs[0]["doc_count"] == 482
        assert "path" not in packs[0]
        r = c.post("/v1/ask", data={"question": "Which code?", "options": OPTIONS, "packs": ["icd-small"]})
        assert r.status_code == 200 and len(r.json()["steps"][2]["docs"]) == 3  # real retrieval happened
        r = c.post("/v1/ask", data={"question": "Which code?", "packs": ["no-such-pack"]})
        assert r.status_code == 404 and r.json()["error"]["type"] == "unknown_pack"


def test_settings_are_applied_per_request(client):
    r = client.post("/v1/ask", data={"question": "Which code?", "options": OPTIONS,
                                     "settings": json.dumps({"retrieval": False, "seed": 7})})
    rec = r.json()
    assert rec["settings"]["seed"] == 7 and rec["settings"]["retrieval"] is False
    assert rec["steps"][2]["docs"] == [] and "retrieval disabled" in rec["steps"][1]["reason"]
    # the next request is back to the server's defaults
    assert client.post("/v1/ask", data={"question": "Which code?"}).json()["settings"]["seed"] == 0


# ------------------------------------------------------------------------------------------- bad requests


@pytest.mark.parametrize("data, files, status, words", [
    ({}, None, 400, "missing field 'question'"),
    ({"question": "   "}, None, 400, "question is empty"),
    ({"question": "q", "settings": "{not json"}, None, 400, "not valid JSON"),
    ({"question": "q", "settings": '{"n_ctx": 99}'}, None, 400, "unknown setting 'n_ctx'"),
    ({"question": "q", "settings": '{"max_tokens": 0}'}, None, 400, "max_tokens"),
    ({"question": "q", "settings": '{"cdir_threshold": 2}'}, None, 400, "threshold"),
    ({"question": "q", "options": ["A. x", "A. y"]}, None, 400, ""),
    ({"question": "q"}, [("image", ("x.png", b"not an image at all", "image/png"))], 400, "image-1.png"),
    ({"question": "q"}, [("image", ("x.dcm", b"\0" * 128 + b"DICM" + b"\1" * 40, "application/dicom"))], 400,
     "DICOM"),
])
def test_bad_ask_requests_get_one_line_json_errors(client, data, files, status, words):
    r = client.post("/v1/ask", data=data, files=files)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert words in err["message"] and "\n" not in err["message"] and err["type"]
    assert "/tmp" not in err["message"] and "medrwr-serve-" not in err["message"]  # no server paths
    assert client.get("/v1/health").json()["status"] == "ok"  # still up


@pytest.mark.parametrize("body, words", [
    ({"messages": []}, "non-empty"),
    ({"messages": [{"role": "system", "content": "x"}]}, "no user message"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "https://x.org/a.png"}},
                                                {"type": "text", "text": "q"}]}]}, "never fetches"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,"
                                                                                           "AAAA"}},
                                                {"type": "text", "text": "q"}]}]}, "image-1"),
    ({"messages": [{"role": "user", "content": "q"}], "n": 2}, "n=1"),
    ({"messages": [{"role": "user", "content": "q"}], "medrwr_packs": ["nope"]}, "unknown pack"),
])
def test_bad_chat_requests(client, body, words):
    r = client.post("/v1/chat/completions", json=body)
    assert 400 <= r.status_code < 500 and words in r.json()["error"]["message"], r.text


def test_malformed_json_unknown_route_and_wrong_method(client):
    r = client.post("/v1/chat/completions", content=b"{broken", headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    assert client.get("/v1/nothing").json()["error"]["type"] == "not_found"
    assert client.get("/v1/ask").status_code == 405
    assert client.get("/v1/reports/0123456789abcdef").status_code == 404


def test_oversized_bodies_are_refused_before_being_read():
    config = ServeConfig(max_body_bytes=64 * 1024)
    with TestClient(create_app(scripted_factory(), config)) as c:
        big = b"\0" * (200 * 1024)
        r = c.post("/v1/ask", data={"question": "q"}, files=[("image", ("a.png", big, "image/png"))])
        assert r.status_code == 413 and r.json()["error"]["type"] == "request_too_large"

        def chunks():  # no Content-Length: counted as it arrives
            for _ in range(10):
                yield b"x" * 32 * 1024

        r = c.post("/v1/chat/completions", content=chunks(), headers={"content-type": "application/json"})
        assert r.status_code == 413, r.text
        assert c.post("/v1/ask", data={"question": "q"}).status_code == 200  # still serving


def test_several_images_are_priors_then_the_current_study(client):
    files = [("image", ("old.png", png_bytes(16), "image/png")), ("image", ("new.png", png_bytes(24), "image/png"))]
    rec = client.post("/v1/ask", data={"question": "Has it changed?"}, files=files).json()
    assert [im["role"] for im in rec["images"]] == ["prior", "current"]
    assert [im["width"] for im in rec["images"]] == [16, 24]


class ExplodingBackend(ScriptedBackend):
    def generate(self, settings, stop, on_piece=None):
        raise RuntimeError("Fakename^Zebulon leaked into an exception")


def test_errors_inside_the_worker_are_reported_and_the_server_goes_on(caplog, monkeypatch):
    caplog.set_level(logging.DEBUG)
    # a context too small for the prompt: the loop's own one-line InputError, raised in the worker thread
    with TestClient(create_app(scripted_factory(ScriptedBackend(SCRIPT, n_ctx=600)), ServeConfig())) as c:
        r = c.post("/v1/ask", data={"question": "Which code fits?"})
        assert r.status_code == 400 and "too many for the model's context" in r.json()["error"]["message"]
        events = parse_sse(c.post("/v1/ask", data={"question": "Which code fits?", "stream": "true"}).text)
        assert events[-1][0] == "error" and events[-1][1]["error"]["type"] == "invalid_request_error"
        assert c.get("/v1/health").json()["failed"] == 2
    # a bug: 500 with a generic message; the log names the exception type only, never its text
    with TestClient(create_app(scripted_factory(ExplodingBackend(SCRIPT)), ServeConfig())) as c:
        r = c.post("/v1/ask", data={"question": "Which code fits?"})
        assert r.status_code == 500 and r.json()["error"]["message"] == "internal error (see the server log)"
        assert c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "q"}]}).status_code == 500
        assert c.get("/v1/health").json()["status"] == "ok"
        # a bug in a handler itself: the same, and no traceback is re-raised to the server's log
        from medrwr_edge.serve import openai_compat

        def broken(body):
            raise KeyError("Fakename^Zebulon")

        monkeypatch.setattr(openai_compat, "parse_chat_request", broken)
        r = c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "q"}]})
        assert r.status_code == 500 and r.json()["error"]["type"] == "server_error"
    assert "RuntimeError" in caplog.text and "KeyError" in caplog.text and "Fakename" not in caplog.text


# ------------------------------------------------------------------------------------------- auth and binding


def test_api_key_is_required_when_configured():
    key = "k" * 24
    with TestClient(create_app(scripted_factory(), ServeConfig(api_key=key))) as c:
        assert c.get("/v1/models").status_code == 401
        wrong = c.get("/v1/models", headers={"Authorization": "Bearer " + "x" * 24})
        assert wrong.status_code == 401 and wrong.json()["error"]["type"] == "authentication_error"
        assert wrong.headers["www-authenticate"] == "Bearer"
        assert c.post("/v1/ask", data={"question": "q"}).status_code == 401
        ok = c.post("/v1/ask", data={"question": "q"}, headers={"Authorization": f"Bearer {key}"})
        assert ok.status_code == 200
        assert c.get("/v1/health").status_code == 200 and c.get("/").status_code == 200  # no data in either


def test_cors_is_off_unless_an_origin_is_named():
    with TestClient(create_app(scripted_factory(), ServeConfig())) as c:
        r = c.get("/v1/models", headers={"Origin": "https://evil.example"})
        assert "access-control-allow-origin" not in r.headers
    config = ServeConfig(cors_origins=["https://ehr.hospital.local"])
    with TestClient(create_app(scripted_factory(), config)) as c:
        r = c.get("/v1/models", headers={"Origin": "https://ehr.hospital.local"})
        assert r.headers["access-control-allow-origin"] == "https://ehr.hospital.local"
        assert "access-control-allow-origin" not in c.get("/v1/models", headers={"Origin": "https://x.org"}).headers


def run_cli(*args) -> subprocess.CompletedProcess:
    import sys

    return subprocess.run([sys.executable, "-m", "medrwr_edge.cli", "serve", *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=60)


def test_cli_refuses_non_loopback_without_a_key(tmp_path):
    proc = run_cli("--host", "0.0.0.0", "--model", str(tmp_path / "none.gguf"))
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.strip().count("\n") == 0 and proc.stderr.startswith("error: refusing to listen on 0.0.0.0")
    short = tmp_path / "key"
    short.write_text("short\n")
    proc = run_cli("--host", "0.0.0.0", "--api-key-file", str(short))
    assert proc.returncode == 2 and "shorter than 16" in proc.stderr and proc.stderr.count("\n") == 1
    # with a good key the bind is allowed, and the next failure is the (missing) model, still one line
    short.write_text("a-long-enough-api-key-123\n")
    proc = run_cli("--host", "0.0.0.0", "--api-key-file", str(short), "--model", str(tmp_path / "none.gguf"))
    assert proc.returncode != 0 and "refusing" not in proc.stderr and proc.stderr.count("\n") == 1


def test_loopback_detection():
    from medrwr_edge.serve.config import is_loopback

    assert is_loopback("127.0.0.1") and is_loopback("127.1.2.3") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("10.0.0.5") and not is_loopback("myhost.local")


# ------------------------------------------------------------------------------------------- a real server


@pytest.fixture
def loopback_network(no_network, monkeypatch):
    """Undo the autouse network guard for loopback addresses only (a real uvicorn and its clients)."""
    connect, connect_ex, getaddrinfo, create_connection = _REAL_SOCKET

    def check(host):
        if str(host) not in _LOOPBACK:
            raise NetworkAccessError(f"non-loopback network access attempted: {host!r}")

    monkeypatch.setattr(socket.socket, "connect", lambda self, addr: (check(addr[0]), connect(self, addr))[1])
    monkeypatch.setattr(socket.socket, "connect_ex", lambda self, addr: (check(addr[0]), connect_ex(self, addr))[1])
    monkeypatch.setattr(socket, "getaddrinfo", lambda host, *a, **k: (check(host), getaddrinfo(host, *a, **k))[1])
    monkeypatch.setattr(socket, "create_connection",
                        lambda addr, *a, **k: (check(addr[0]), create_connection(addr, *a, **k))[1])


@contextmanager
def running_server(app, shutdown_timeout: float = 10.0):
    """uvicorn in a thread on a free 127.0.0.1 port; stopped (graceful shutdown) on exit."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, access_log=False, log_config=None, lifespan="on",
                                           timeout_graceful_shutdown=max(1, int(shutdown_timeout))))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started and time.monotonic() < deadline and thread.is_alive():
        time.sleep(0.02)
    assert server.started, "uvicorn did not start"
    try:
        yield f"http://127.0.0.1:{port}", server, thread
    finally:
        server.should_exit = True
        thread.join(60)
        sock.close()


def test_bounded_queue_under_concurrent_clients_loses_nothing(loopback_network):
    backend = SlowScriptedBackend(SCRIPT, delay=0.01)  # ~0.3 s per question
    app = create_app(scripted_factory(backend), ServeConfig(max_queue=2))
    results = []
    with running_server(app) as (url, _, _):
        def client(n):
            with httpx.Client(base_url=url, timeout=60) as c:
                for _ in range(n):
                    r = c.post("/v1/ask", data={"question": "Which code fits?", "options": OPTIONS})
                    results.append((r.status_code, r.json(), r.headers.get("retry-after")))

        threads = [threading.Thread(target=client, args=(3,)) for _ in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        health = httpx.get(url + "/v1/health").json()
    assert len(results) == 18
    ok = [rec for status, rec, _ in results if status == 200]
    rejected = [(rec, ra) for status, rec, ra in results if status == 429]
    assert len(ok) + len(rejected) == 18 and rejected, "6 clients against a queue of 2 must see 429s"
    assert all(rec["status"] == "answered" and rec["letter"] == "A" for rec in ok)  # every accepted one complete
    assert all(rec["error"]["type"] == "queue_full" and int(ra) >= 1 for rec, ra in rejected)
    assert health["completed"] == len(ok) == health["accepted"] and health["rejected_queue_full"] == len(rejected)
    assert health["failed"] == health["cancelled"] == 0


def test_disconnect_mid_stream_cancels_generation_and_the_server_goes_on(loopback_network):
    script = ["<think> " + "word " * 150 + "</think>\n<answer> A </answer>"]
    backend = SlowScriptedBackend(script, delay=0.01)  # 300+ pieces: about 3 s if not cancelled
    app = create_app(scripted_factory(backend), ServeConfig())
    with running_server(app) as (url, _, _):
        with httpx.Client(base_url=url, timeout=30) as c:
            with c.stream("POST", "/v1/ask", data={"question": "q", "options": OPTIONS, "stream": "true"}) as r:
                seen = 0
                for line in r.iter_lines():
                    seen += line.startswith("event: piece")
                    if seen >= 5:
                        break  # leave mid-answer: closing the response drops the connection
        deadline = time.monotonic() + 10
        while httpx.get(url + "/v1/health").json()["cancelled"] < 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        health = httpx.get(url + "/v1/health").json()
        assert health["cancelled"] == 1 and health["in_flight"] == 0
        assert backend.pieces_streamed < 150  # generation stopped, it did not run to the end
        # the backend is reusable: the next question is answered in full
        t0 = time.monotonic()
        r = httpx.post(url + "/v1/ask", data={"question": "q", "options": OPTIONS}, timeout=30)
        assert r.status_code == 200 and r.json()["letter"] == "A" and time.monotonic() - t0 < 20


def test_non_streaming_client_that_leaves_cancels_its_request(loopback_network):
    script = ["<think> " + "word " * 200 + "</think>\n<answer> A </answer>"]
    backend = SlowScriptedBackend(script, delay=0.01)
    app = create_app(scripted_factory(backend), ServeConfig())
    with running_server(app) as (url, _, _):
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(url + "/v1/ask", data={"question": "q", "options": OPTIONS}, timeout=0.5)
        deadline = time.monotonic() + 10
        while httpx.get(url + "/v1/health").json()["cancelled"] < 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert httpx.get(url + "/v1/health").json()["cancelled"] == 1
        assert backend.pieces_streamed < 300


def test_graceful_shutdown_finishes_in_flight_requests(loopback_network):
    backend = SlowScriptedBackend(SCRIPT, delay=0.02)  # ~0.6 s
    app = create_app(scripted_factory(backend), ServeConfig(shutdown_timeout=10))
    results = []
    with running_server(app, shutdown_timeout=10) as (url, server, thread):
        def ask():
            results.append(httpx.post(url + "/v1/ask", data={"question": "q", "options": OPTIONS}, timeout=30))

        t = threading.Thread(target=ask)
        t.start()
        deadline = time.monotonic() + 10
        while app.state.worker.current is None and time.monotonic() < deadline:
            time.sleep(0.01)
        server.should_exit = True  # what SIGTERM does
        t.join(30)
        thread.join(30)
        assert not thread.is_alive()
    assert results and results[0].status_code == 200 and results[0].json()["letter"] == "A"
    assert app.state.worker.session is None  # the model was closed after the last answer


def test_shutdown_timeout_aborts_what_cannot_finish():
    import asyncio

    from medrwr_edge.serve.worker import AskJob, AskWorker, RequestCancelled

    backend = SlowScriptedBackend(["<think> " + "word " * 500 + "</think>"], delay=0.01)  # ~10 s
    worker = AskWorker(scripted_factory(backend), max_queue=4)

    async def scenario():
        await worker.start()
        running, queued = AskJob("r1", "q", []), AskJob("r2", "q", [])
        worker.submit(running, streaming=True)
        worker.submit(queued)
        while worker.current is None:
            await asyncio.sleep(0.01)
        t0 = time.monotonic()
        await worker.stop(timeout=0.2)
        return running, queued, time.monotonic() - t0

    running, queued, took = asyncio.run(scenario())
    assert took < 5 and backend.pieces_streamed < 500
    for job in (running, queued):
        assert isinstance(job.future.exception(), RequestCancelled)
    assert worker.counters.cancelled == 2 and worker.session is None


def fake_patient_dicom() -> bytes:
    import pydicom
    import pydicom.data

    ds = pydicom.dcmread(pydicom.data.get_testdata_file("CT_small.dcm"))
    ds.PatientName = "Fakename^Zebulon"
    ds.PatientID = "FAKEID-98765"
    ds.PatientBirthDate = "19010203"
    buf = io.BytesIO()
    ds.save_as(buf)
    return buf.getvalue()


def test_no_patient_identifiers_in_server_logs(loopback_network, caplog):
    caplog.set_level(logging.DEBUG)
    backend = SlowScriptedBackend(SCRIPT, delay=0.0)
    app = create_app(scripted_factory(backend), ServeConfig(keep_reports=4))
    identifiers = ["Fakename", "Zebulon", "FAKEID-98765", "19010203"]
    with running_server(app) as (url, _, _):
        dicom = fake_patient_dicom()
        question = "Fakename Zebulon FAKEID-98765: which code fits this CT?"
        files = [("image", ("Fakename_Zebulon.dcm", dicom, "application/dicom"))]
        r = httpx.post(url + "/v1/ask", data={"question": question, "options": OPTIONS, "report": "true"},
                       files=files, timeout=30)
        assert r.status_code == 200, r.text
        rec = r.json()
        assert rec["images"][0]["format"] == "dicom" and rec["images"][0]["meta"]["modality"] == "CT"
        assert not any(s in json.dumps(rec["images"]) for s in identifiers)  # only allow-listed DICOM facts
        report = httpx.get(url + r.headers["x-report-url"]).text
        assert "FAKEID-98765" not in report.replace(question, "")  # the question is the user's own text
        # errors that involve the DICOM and the question
        bad = httpx.post(url + "/v1/ask", data={"question": question, "settings": '{"nope": 1}'}, files=files)
        assert bad.status_code == 400
        broken = dicom[:400]
        httpx.post(url + "/v1/ask", data={"question": question}, files=[("image", ("Fakename.dcm", broken, "x"))])
        httpx.post(url + "/v1/chat/completions", json={"messages": [{"role": "user", "content": question}]})
    logs = caplog.text
    assert "/v1/ask 200" in logs and "/v1/ask 400" in logs  # the request log is there...
    for s in identifiers:
        assert s not in logs  # ...with no identifier in it
    assert "which code" not in logs.lower()


# ------------------------------------------------------------------------------------------- the web page


def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    pytest.skip("Chromium is not installed (apt-get install -y chromium; .ci/run installs it)")


class Chromium:
    """Headless Chromium driven over the DevTools protocol on a pipe (--remote-debugging-pipe: fd 3 in, fd 4 out;
    no port, no websocket library). Enough to wait for a page's state and read its DOM."""

    def __init__(self, browser: str, url: str, profile: Path):
        import os

        to_browser_r, self._to_browser = os.pipe()
        self._from_browser, from_browser_w = os.pipe()

        def wire_fds():  # in the child, before exec: the protocol's fixed descriptors
            os.dup2(to_browser_r, 3)
            os.dup2(from_browser_w, 4)

        self.proc = subprocess.Popen(
            [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-extensions",
             "--disable-dev-shm-usage", f"--user-data-dir={profile}", "--remote-debugging-pipe", url],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, preexec_fn=wire_fds, pass_fds=(3, 4))
        os.close(to_browser_r)
        os.close(from_browser_w)
        self._buf, self._next_id, self.session = b"", 0, None

    def call(self, method: str, session: bool = True, timeout: float = 30, **params) -> dict:
        import os
        import select

        self._next_id += 1
        msg = {"id": self._next_id, "method": method, "params": params}
        if session and self.session:
            msg["sessionId"] = self.session
        os.write(self._to_browser, json.dumps(msg).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            while b"\0" in self._buf:
                raw, self._buf = self._buf.split(b"\0", 1)
                reply = json.loads(raw)
                if reply.get("id") == self._next_id:
                    assert "error" not in reply, reply
                    return reply["result"]
            ready, _, _ = select.select([self._from_browser], [], [], max(0.0, deadline - time.monotonic()))
            assert ready, f"no DevTools reply to {method}"
            chunk = os.read(self._from_browser, 1 << 16)
            assert chunk, "Chromium closed the DevTools pipe: " + self.proc.stderr.read().decode()[-1500:]
            self._buf += chunk

    def attach_to_page(self) -> None:
        deadline = time.monotonic() + 30
        while True:
            pages = [t for t in self.call("Target.getTargets", session=False)["targetInfos"] if t["type"] == "page"]
            if pages or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        self.session = self.call("Target.attachToTarget", session=False, targetId=pages[0]["targetId"],
                                 flatten=True)["sessionId"]

    def evaluate(self, expression: str):
        return self.call("Runtime.evaluate", expression=expression, returnByValue=True)["result"].get("value")

    def frame_html(self) -> str:
        """The rendered document of the page's (sandboxed, so cross-origin and out-of-process) iframe: attach to
        its own target and read its DOM there."""
        deadline = time.monotonic() + 15
        while True:
            frames = [t for t in self.call("Target.getTargets", session=False)["targetInfos"] if t["type"] == "iframe"]
            if frames or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert frames, "the page has no out-of-process frame"
        page_session = self.session
        self.session = self.call("Target.attachToTarget", session=False, targetId=frames[0]["targetId"],
                                 flatten=True)["sessionId"]
        try:
            return self.evaluate("document.documentElement.outerHTML")
        finally:
            self.session = page_session

    def close(self) -> None:
        import os

        try:
            self.call("Browser.close", session=False, timeout=5)
        except (AssertionError, OSError):
            pass
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        os.close(self._to_browser)
        os.close(self._from_browser)


def test_web_page_streams_and_renders_the_report_in_headless_chromium(loopback_network, tmp_path):
    browser = chromium()
    backend = SlowScriptedBackend(SCRIPT, delay=0.01)
    app = create_app(scripted_factory(backend), ServeConfig())
    with running_server(app) as (url, _, _):
        page = Chromium(browser, url + "/?demo=1", tmp_path / "profile")
        try:
            page.attach_to_page()
            states = set()
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                state = page.evaluate("document.body ? document.body.dataset.state : 'loading'")
                states.add(state)
                if state in ("done", "error"):
                    break
                time.sleep(0.05)
            dom = page.evaluate("document.documentElement.outerHTML")
            report_dom = page.frame_html()
        finally:
            page.close()
        health = httpx.get(url + "/v1/health").json()
    assert health["completed"] == 1, health  # the page's request reached the model
    assert 'data-state="done"' in dom, dom[:3000]
    assert "running" in states  # it was seen streaming, before it was done
    # the live steps, rendered as the events arrived
    for step in ("query", "retrieve", "answer"):
        assert f'data-step="{step}"' in dom, step
    assert "query: pneumothorax code" in dom and "Answer: A" in dom
    # the final report is report.py's page, rendered in a sandboxed frame
    assert re.search(r'<iframe id="report"[^>]*sandbox=""[^>]*srcdoc=', dom), dom[-3000:]
    for element_id in ("question", "answer", "inputs", "reasoning", "provenance", "final-answer"):
        assert f'id="{element_id}"' in report_dom, element_id
    assert re.search(r'<figure class="input[^"]*"[^>]*><img src="data:image/png;base64,', report_dom)


# ------------------------------------------------------------------------------------------- the real model


@pytest.mark.real_model
def test_real_smollm2_through_a_real_server(loopback_network, smoke_gguf, small_icd_pack, ct_png, tmp_path):
    from forcing import ForcedPasses

    class ForcedEachQuestion(ForcedPasses):
        """Force the first pass of every question (a query), then let the real model go on by itself."""

        def reset(self):
            self.calls = 0
            self.inner.reset()

    def factory():
        from medrwr_edge.runtime.llama_backend import LlamaBackend

        # The prefix cache restores the system prompt's KV state after the first question (a busy CPU is slow).
        inner = LlamaBackend(smoke_gguf, n_ctx=2048, n_threads=1, prefix_cache_dir=str(tmp_path / "kv"))
        be = ForcedEachQuestion(inner, {0: "<think> Air around the lung. </think>\n<query> pneumothorax </query>"})
        return Session(packs=[small_icd_pack], image_pack=False, backend=be,
                       settings=AskSettings(max_tokens=16, n_ctx=2048, top_k_docs=1, max_passes=2))  # a busy CPU

    app = create_app(factory, ServeConfig())
    with running_server(app) as (url, _, _):
        with httpx.Client(base_url=url, timeout=120) as c:
            png = Path(ct_png).read_bytes()
            r = c.post("/v1/ask", data={"question": "Which code fits?", "options": OPTIONS},
                       files=[("image", ("ct.png", png, "image/png"))])
            assert r.status_code == 200, r.text
            rec = r.json()
            schema_validator().validate(rec)
            retrieve = next(s for s in rec["steps"] if s["type"] == "retrieve")
            assert retrieve["query"] == "pneumothorax" and len(retrieve["docs"]) == 1
            assert all(d["pack"] == "icd-small" for d in retrieve["docs"])
            assert rec["passes"][1]["generated_tokens"] > 0  # the real model continued after the splice
            t = rec["tokens"]
            assert t["decoded"] == t["prompt"] + t["generated"] + t["inserted"]

            r = c.post("/v1/ask", data={"question": "Which code fits?", "options": OPTIONS, "stream": "true"})
            events = parse_sse(r.text)
            kinds = [k for k, _ in events]
            assert "piece" in kinds and "retrieve" in kinds and kinds[-2:] == ["record", "done"]
            streamed = dict(events)["record"]
            assert streamed["assistant_text"] == rec["assistant_text"]  # greedy: the same answer both ways

            r = c.post("/v1/chat/completions", json={"messages": [
                {"role": "user", "content": "Which code fits?\n" + "\n".join(OPTIONS)}]})
            out = r.json()
            assert r.status_code == 200 and out["model"] == Path(smoke_gguf).name
            assert out["medrwr_evidence"]["assistant_text"] == rec["assistant_text"]
            assert c.get("/v1/models").json()["data"][0]["medrwr"]["backend"] == "llama.cpp"
