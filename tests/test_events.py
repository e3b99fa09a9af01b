"""The event contract (runtime/events.py): a sink gets one typed object per event, in order, through `Session.ask`;
serve turns them into its public server-sent JSON unchanged."""

from __future__ import annotations

import dataclasses
import json

from medrwr_edge.evidence.record import Answer, CdirRetrieve, Query, Retrieve, RetrievedDoc, Think
from medrwr_edge.runtime.api import AskSettings, Session
from medrwr_edge.runtime.events import Distil, Piece, Reencoded
from medrwr_edge.runtime.scripted_backend import ScriptedBackend
from evidence_helpers import (OPTIONS, PROBS, QUERY_THEN_ANSWER, QUESTION, evidence_packs,  # noqa: F401 (fixtures)
                              fake_encoders, input_png)


def test_a_sink_receives_typed_objects_in_order_through_session_ask(evidence_packs, fake_encoders, input_png):
    text_pack, image_pack, _ = evidence_packs
    events = []
    with Session(packs=[text_pack], image_pack=image_pack, backend=ScriptedBackend(QUERY_THEN_ANSWER, probs=PROBS),
                 settings=AskSettings(cdir=True)) as s:
        record = s.ask(input_png, QUESTION, OPTIONS, on_event=events.append)

    # query, its retrieval, the first answer (confidence 0.42 < 0.8), CDIR; pieces stream each pass's text between
    steps = [e for e in events if not isinstance(e, Piece)]
    assert [type(e) for e in steps] == [Query, Retrieve, Answer, CdirRetrieve]
    assert [e.type for e in steps] == ["query", "retrieve", "answer", "cdir"]
    assert all(e.type == "piece" for e in events if isinstance(e, Piece))
    # the objects streamed are the record's own steps (not copies), in the record's order
    kept = [s for s in record.steps if not isinstance(s, Think)]
    assert all(e is k for e, k in zip(steps, kept))
    assert kept[-1].text == "A"  # the regenerated answer: in the record; native CDIR streams it as pieces
    assert steps[2].letter == "B" and steps[3].answer_after == "A"

    # each pass's streamed text, between the steps it led to
    runs, text = [], ""
    for e in events:
        if isinstance(e, Piece):
            text += e.text
        else:
            runs.append(text)
            text = ""
    runs.append(text)
    assert runs == [QUERY_THEN_ANSWER[0], "", QUERY_THEN_ANSWER[1], "", QUERY_THEN_ANSWER[2]]


def test_every_event_class_names_its_kind():
    assert [c.type for c in (Piece, Think, Query, Retrieve, Answer, CdirRetrieve, Distil, Reencoded)] == \
           ["piece", "think", "query", "retrieve", "answer", "cdir", "distil", "context"]
    from medrwr_edge.runtime.chat import ChatTurn

    assert ChatTurn.type == "turn"
    assert "type" not in {f.name for f in dataclasses.fields(ChatTurn)}  # not part of the saved chat


def test_serve_sends_events_in_its_published_json():
    from medrwr_edge.serve.worker import sse_body

    # piece and think lead with "type"; steps are the record's JSON ("type" last): byte for byte as before
    assert json.dumps(sse_body(Piece("<query>"))) == '{"type": "piece", "text": "<query>"}'
    assert json.dumps(sse_body(Think("air", 0))) == '{"type": "think", "text": "air", "pass_index": 0}'
    retrieve = Retrieve("q", [RetrievedDoc("kb", "1", "d", 0.5, "s")], "block", 3, 1)
    assert sse_body(retrieve) == dataclasses.asdict(retrieve)
    assert list(sse_body(Query("q", "q", 0)))[-2:] == ["type", "issued_by"]
