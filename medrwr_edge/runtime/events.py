"""What a front end is told while a question is answered: one typed object per event, in the order it happens.

A sink (`EventSink`) is called with one object per event. The steps of the evidence record are their own events
(the object streamed is the one the record keeps); the rest are the small classes below. Every event names what it
is by `type`, the word the record's steps and serve's server-sent events already use:

    Piece         "piece"     text joining the assistant turn as it streams: generated, or written by the runtime
    Query         "query"     a search the turn makes (evidence/record.py)
    Retrieve      "retrieve"  the entries found for it, as spliced into the turn
    Answer        "answer"    an answer read from the turn
    CdirRetrieve  "cdir"      the CDIR step, before its regeneration
    Distil        "distil"    chat: the search query distilled from the dialogue
    Reencoded     "context"   chat: the conversation was re-encoded (compaction, or an unusable cache), and why
    ChatTurn      "turn"      chat: the finished turn (runtime/chat.py)

The loop keeps its Think steps in the record without streaming them (the pieces carry that text); serve derives
"think" events (`Think`) from the pieces for its HTTP clients.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, ClassVar, Union

from ..evidence.record import Answer, CdirRetrieve, Query, Retrieve, Think

if TYPE_CHECKING:  # chat imports the loop, which imports this module
    from .chat import ChatTurn


@dataclass(frozen=True)
class Piece:
    """A piece of the assistant turn, as it is generated (or as the runtime writes a tag into it)."""

    text: str
    type: ClassVar[str] = "piece"


@dataclass(frozen=True)
class Distil:
    """Chat: the query distilled for this turn; the same facts as the turn record's "distil" entry."""

    raw: str  # what the model wrote after "<query>"
    query: str  # what is searched ("" when nothing is)
    source: str  # "model" | "user-message" (the message itself) | "none"
    prompt_tokens: int
    generated_tokens: int
    stop_reason: str
    seconds: float
    reason: str  # why the model's query was not used, or why nothing was searched
    type: ClassVar[str] = "distil"


@dataclass(frozen=True)
class Reencoded:
    """Chat: the conversation was re-encoded before this turn (only told after the session's start)."""

    reason: str
    type: ClassVar[str] = "context"


Event = Union[Piece, Think, Query, Retrieve, Answer, CdirRetrieve, Distil, Reencoded, "ChatTurn"]
EventSink = Callable[[Event], None]


def ignore(event: Event) -> None:
    """The sink of a caller that wants no events."""
