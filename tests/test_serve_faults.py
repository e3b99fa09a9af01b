"""`serve` under faults: keepalives while queued (both streams), uploads kept until their worker is done, packs and
encoders opened once and shared, and the OpenAI-compatible endpoint driven by the official `openai` client.

The server is a real uvicorn on 127.0.0.1 (test_serve.running_server) with the scripted backend, except where a
real pack is the point.
"""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import pytest

pytest.importorskip("fastapi", reason="the serve extra is not installed (pip install -e '.[serve]')")
httpx = pytest.importorskip("httpx", reason="the serve extra is not installed (pip install -e '.[serve]')")
openai = pytest.importorskip("openai", reason="the dev extra is not installed (pip install -e '.[dev]')")

from test_serve import (OPTIONS, SCRIPT, SlowScriptedBackend, loopback_network, png_bytes,  # noqa: E402,F401
                        running_server, scripted_factory)

from medrwr_edge.serve import ServeConfig, create_app  # noqa: E402

QUESTION = "Which code fits?\n" + "\n".join(OPTIONS)


def _client(url: str):
    return openai.OpenAI(base_url=url + "/v1", api_key="not-needed-on-loopback", max_retries=0, timeout=60)


# ------------------------------------------------------------------ the official OpenAI client


def test_the_openai_client_gets_an_answer_with_its_evidence(loopback_network):
    app = create_app(scripted_factory(), ServeConfig())
    with running_server(app) as (url, _, _):
        client = _client(url)
        model = client.models.list().data[0].id
        done = client.chat.completions.create(model=model, messages=[
            {"role": "system", "content": "ignored"},
            {"role": "user", "content": [
                {"type": "text", "text": QUESTION},
                {"type": "image_url", "image_url": {"url": "data:image/png;base64," + _b64(png_bytes())}}]}])
    assert done.object == "chat.completion" and done.choices[0].message.content == "A"
    assert done.choices[0].finish_reason == "stop" and done.usage.total_tokens > 0
    evidence = done.model_extra["medrwr_evidence"]
    assert evidence["letter"] == "A" and evidence["images"][0]["format"] == "png" and len(evidence["options"]) == 4


def test_the_openai_client_streams_reasoning_then_the_answer(loopback_network):
    app = create_app(scripted_factory(), ServeConfig())
    with running_server(app) as (url, _, _):
        stream = _client(url).chat.completions.create(model="scripted", stream=True,
                                                      messages=[{"role": "user", "content": QUESTION}])
        chunks = list(stream)
    content = "".join(c.choices[0].delta.content or "" for c in chunks)
    reasoning = "".join((c.choices[0].delta.model_extra or {}).get("reasoning_content", "") for c in chunks)
    assert content == "A" and "<query> pneumothorax code </query>" in reasoning
    assert chunks[-1].choices[0].finish_reason == "stop" and chunks[-1].usage.completion_tokens > 0
    assert chunks[-1].model_extra["medrwr_evidence"]["letter"] == "A"


def test_the_openai_client_sees_a_full_queue_as_429(loopback_network):
    backend = SlowScriptedBackend(["<think> " + "word " * 100 + "</think>\n<answer> A </answer>"], delay=0.01)
    app = create_app(scripted_factory(backend), ServeConfig(max_queue=0))
    with running_server(app) as (url, _, _):
        first = threading.Thread(target=lambda: _client(url).chat.completions.create(
            model="scripted", messages=[{"role": "user", "content": QUESTION}]))
        first.start()
        while app.state.worker.current is None:
            time.sleep(0.01)
        with pytest.raises(openai.RateLimitError) as info:
            _client(url).chat.completions.create(model="scripted", messages=[{"role": "user", "content": QUESTION}])
        first.join(60)
    assert info.value.status_code == 429 and int(info.value.response.headers["retry-after"]) >= 1


# ------------------------------------------------------------------ keepalives while queued


def _lines_until_first_piece(url: str, path: str, payload: dict, as_json: bool) -> list[str]:
    lines = []
    with httpx.Client(base_url=url, timeout=60) as c:
        kw = {"json": payload} if as_json else {"data": payload}
        with c.stream("POST", path, **kw) as r:
            assert r.status_code == 200
            for line in r.iter_lines():
                lines.append(line)
                if "piece" in line or "reasoning_content" in line:
                    return lines
    return lines


@pytest.mark.parametrize("path,payload,as_json", [
    ("/v1/ask", {"question": "q", "options": OPTIONS, "stream": "true"}, False),
    ("/v1/chat/completions", {"stream": True, "messages": [{"role": "user", "content": QUESTION}]}, True),
])
def test_a_queued_stream_gets_keepalives_until_its_turn(loopback_network, path, payload, as_json):
    backend = SlowScriptedBackend(["<think> " + "word " * 60 + "</think>\n<answer> A </answer>"], delay=0.01)
    app = create_app(scripted_factory(backend), ServeConfig(keepalive_seconds=0.05))
    with running_server(app) as (url, _, _):
        busy = threading.Thread(target=lambda: httpx.post(url + "/v1/ask", data={"question": "q", "options": OPTIONS},
                                                          timeout=60))
        busy.start()
        while app.state.worker.current is None:  # the first question holds the model for ~0.6 s
            time.sleep(0.01)
        lines = _lines_until_first_piece(url, path, payload, as_json)
        busy.join(60)
    keepalives = [line for line in lines if line == ": keepalive"]
    assert len(keepalives) >= 3, lines[:20]  # several, while it waited its turn


# ------------------------------------------------------------------ uploads outlive nothing that reads them


def test_uploads_stay_until_the_worker_has_finished_even_at_shutdown(tmp_path, monkeypatch):
    """Shutdown aborts the running request while its worker thread is still rendering the report from the
    uploads: the folder must still be there for it, and gone once it is done."""
    from medrwr_edge.evidence import report as report_mod
    from medrwr_edge.serve.worker import AskJob, AskWorker
    from medrwr_edge.serve.uploads import private_workdir, write_private

    seen = {}

    def slow_render(record, images=()):
        time.sleep(0.5)  # the shutdown below lands here
        seen["read"] = [Path(p).read_bytes()[:8] for p in images]  # raises if the folder was removed
        return "<html></html>"

    monkeypatch.setattr(report_mod, "render_report", slow_render)
    worker = AskWorker(scripted_factory(), max_queue=4)
    workdir = private_workdir()
    job = AskJob("r1", "q", OPTIONS, image_paths=[write_private(workdir, "image-1.png", png_bytes())],
                 workdir=workdir, want_report=True)

    async def scenario():
        await worker.start()
        worker.submit(job)
        while worker.current is None:
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.1)
        await worker.stop(timeout=0.05)

    asyncio.run(scenario())
    assert seen["read"] == [b"\x89PNG\r\n\x1a\n"]  # the report was rendered from the real upload
    assert not workdir.exists()  # and removed after that


def test_a_request_dropped_from_the_queue_removes_its_uploads():
    from medrwr_edge.serve.worker import AskJob, AskWorker
    from medrwr_edge.serve.uploads import private_workdir, write_private

    backend = SlowScriptedBackend(["<think> " + "word " * 100 + "</think>"], delay=0.01)
    worker = AskWorker(scripted_factory(backend), max_queue=4)
    workdir = private_workdir()
    queued = AskJob("r2", "q", [], image_paths=[write_private(workdir, "image-1.png", b"x")], workdir=workdir)

    async def scenario():
        await worker.start()
        worker.submit(AskJob("r1", "q", []))
        worker.submit(queued)
        while worker.current is None:
            await asyncio.sleep(0.01)
        await worker.stop(timeout=0.05)

    asyncio.run(scenario())
    assert queued.started_at is None and not workdir.exists()


# ------------------------------------------------------------------ packs and encoders opened once


@pytest.fixture(scope="module")
def second_pack(tmp_path_factory, text_encoder):
    from medrwr_edge.kb_pack.build import build_text_pack
    from medrwr_edge.kb_pack.documents import Document

    docs = [Document(id=f"n{i}", text=f"pneumothorax note {i}: air in the pleural space") for i in range(5)]
    return build_text_pack(docs, tmp_path_factory.mktemp("packs") / "notes", text_encoder, name="notes",
                           version="1", progress=False)


def test_pack_subsets_share_the_open_packs_and_one_encoder(loopback_network, small_icd_pack, second_pack,
                                                           monkeypatch):
    from medrwr_edge.kb_pack import encoders, pack as pack_mod
    from medrwr_edge.runtime.api import Session
    from medrwr_edge.runtime.scripted_backend import ScriptedBackend

    opened, loaded = [], []
    real_open, real_load = pack_mod.Pack.open.__func__, encoders.load_encoder
    monkeypatch.setattr(pack_mod.Pack, "open", classmethod(lambda cls, p, *a, **k: opened.append(Path(p).name)
                                                           or real_open(cls, p, *a, **k)))
    monkeypatch.setattr(encoders, "load_encoder", lambda *a, **k: loaded.append(a[0]) or real_load(*a, **k))
    monkeypatch.setattr(pack_mod, "_SHARED_ENCODERS", {})

    def factory():
        return Session(packs=[small_icd_pack, second_pack], image_pack=False,
                       backend=ScriptedBackend(SCRIPT * 8))

    app = create_app(factory, ServeConfig())
    with running_server(app) as (url, _, _):
        at_start = list(opened)
        records = []
        for packs in (["notes"], ["icd-small"], ["notes", "icd-small"], None, ["notes"]):
            data = {"question": "Which code fits?", "options": OPTIONS, **({"packs": packs} if packs else {})}
            r = httpx.post(url + "/v1/ask", data=data, timeout=120)
            assert r.status_code == 200, r.text
            records.append(r.json())
    assert sorted(at_start) == ["icd-small", "notes"] and opened == at_start  # no request opened a pack again
    assert len(loaded) == 1  # both packs were built with MiniLM: one ONNX session serves them
    assert [[p["name"] for p in rec["packs"]] for rec in records] == [
        ["notes"], ["icd-small"], ["notes", "icd-small"], ["icd-small", "notes"], ["notes"]]
    searched = [{d["pack"] for s in rec["steps"] if s["type"] == "retrieve" for d in s["docs"]} for rec in records]
    assert searched[0] == {"notes"} and searched[1] == {"icd-small"}


def _b64(data: bytes) -> str:
    import base64

    return base64.b64encode(data).decode()
