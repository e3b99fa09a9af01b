"""`medrwr_edge.Chat`: a multi-round consultation on one KV cache, with Distill-Retrieve-Read on every turn.

The whole conversation lives in the backend's one sequence, in Qwen ChatML:

    <|im_start|>system\n{open-ended Med-RwR prompt + one chat line}<|im_end|>\n      -- prefilled once
    <|im_start|>user\n{message 1}<|im_end|>\n<|im_start|>assistant\n
    <query> {distilled query} </query>\n<retrieve> (1) ..\n(2) ..\n(3) ..\n </retrieve>\n
    <think> .. </think>\n<answer> .. </answer><|im_end|>\n
    <|im_start|>user\n{message 2}<|im_end|>\n ...                                     -- only this is decoded

Each turn (MedicineQA's Distill-Retrieve-Read, with Med-RwR's tags as the tool call):

1. Distil: a bounded prompt (an instruction, the dialogue so far capped by tokens with the most recent turns kept
   first, and the new message, also capped) is decoded *after* the conversation, the model writes ONE search query
   after an opened `<query>` (greedy, a few tokens, stop at `</query>`), and the cache is rolled back to where the
   conversation ends: the conversation's KV prefix is untouched. A query with no letters or digits falls back to
   the message itself (recorded as such).
2. Retrieve: the query searches the packs (top-k, as `ask` does).
3. Read: the user turn is appended, and the assistant turn is opened with `<query> q </query>` and the
   `<retrieve>` block, exactly the layout the Med-RwR protocol puts retrieved passages in (a retrieve block follows
   the model's own query inside its turn). The model continues from there; it may query again (served as in
   `ask`, up to `max_passes` generation passes), and the turn is closed with `<|im_end|>`.

Only the new turn's tokens are decoded: earlier turns are never re-encoded while the context has room. When the
next turn would not fit (room for the message, retrieved passages and the reply), older turns are condensed to
their question and answer (retrieved passages and reasoning dropped) and the oldest dropped until it fits; that
changes the prefix, so the kept conversation is re-encoded once, and the turn record and the user are told.
A message that alone cannot fit the context is refused with one error line; the session stays usable.

Images: a vision backend gets the image in the user turn (the backend appends text only, so that turn re-encodes
the conversation once with the image in place). A text-only model never sees it: as in `ask` for open-ended
questions, CDIR is off for chat answers, and the record says the image was not shown.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Optional, Sequence, Union

from .. import __version__
from ..errors import InputError, MedrwrError
from ..evidence.record import Answer, EvidenceRecord, Query, RetrievedDoc, Retrieve, Step
from . import protocol as P
from .api import PreparedImages, Session
from .backends import model_record
from .backend import BackendStats, ImageInput, PromptPart, SamplingSettings
from .events import Distil, EventSink, Reencoded, ignore
from .loop import MedRwRLoop, TextRetriever
from .settings import AskSettings, check_text

CHAT_SCHEMA = "medrwr-edge/chat/1"
PathLike = Union[str, os.PathLike]

# Ours, not the paper's: one line telling the model that earlier turns are part of the conversation.
CHAT_LINE = ("\nThis is a multi-round consultation: earlier questions and answers are above, and a new question "
             "may follow up on them.")
DISTIL_INSTRUCTION = (
    "Before answering, write ONE search query for the medical knowledge base: a few keywords that would find the "
    "facts needed to answer the latest message of this consultation. Reply with the query only, inside "
    "<query> </query> tags."
)
END_OF_TURN = "<|im_end|>\n"
MAX_QUERY_WORDS = 32
# Room for what a turn adds besides the message, passages and reply: "<query> … </query>", tags, end of turn.
TURN_OVERHEAD_TOKENS = 64
_PROTOCOL_TAG_RE = re.compile(r"</?(think|query|retrieve|answer)>", re.I)
_TAGS_RE = re.compile(r"<query>.*?</query>|<retrieve>.*?</retrieve>|</?(think|answer|query|retrieve)>", re.S)


@dataclass
class ChatLimits:
    """Token budgets of the chat machinery (recorded in the session header)."""

    distil_max_tokens: int = 32  # the query the model writes
    distil_history_tokens: int = 256  # dialogue shown to the distil prompt, most recent turns first
    distil_message_tokens: int = 256  # the new message, as shown to the distil prompt
    retrieval_room_tokens: int = 384  # room kept for retrieved passages when planning a turn


@dataclass
class _ContextTurn:
    """A turn as it sits in the KV cache (or is re-encoded after a compaction)."""

    index: int
    user_parts: list  # "<|im_start|>user\n...<|im_end|>\n<|im_start|>assistant\n", images in place for vision
    assistant: str  # the assistant turn as decoded, closed with <|im_end|>
    short: str  # question-and-answer form kept after a compaction
    condensed: bool = False

    def parts(self) -> list:
        return list(self.user_parts) + [self.short if self.condensed else self.assistant]


@dataclass
class ChatTurn:
    """One round: what was asked, the distilled query, what was retrieved, the reply, and how the context fared."""

    index: int  # 1-based
    user: str
    reply: str  # what the user is shown: the <answer> text, or the model's text when it gave no answer tags
    distil: dict  # raw, query, source ("model" | "user-message" | "none"), tokens, seconds
    context: dict  # reused tokens, re-encoding and its reason, dropped / condensed turns, turns in context
    evidence: EvidenceRecord  # this turn as an evidence record (steps, passes, tokens, timings, notes)
    type: ClassVar[str] = "turn"  # as the last event of a turn (runtime/events.py)

    @property
    def answer(self) -> Optional[str]:
        return self.evidence.answer

    @property
    def confidence(self) -> Optional[float]:
        return self.evidence.confidence

    @property
    def notes(self) -> list[str]:
        return self.evidence.notes

    def sources(self) -> list[RetrievedDoc]:
        return [d for r in self.evidence.retrievals() for d in r.docs]

    def to_dict(self) -> dict:
        from ..evidence.privacy import scrub_record

        first = next(iter(self.evidence.retrievals()), None)
        return {
            "index": self.index,
            "user": self.user,
            "reply": self.reply,
            "answer": self.evidence.answer,
            "confidence": self.evidence.confidence,
            "confidence_kind": self.evidence.confidence_kind,
            "status": self.evidence.status,
            "distil": dict(self.distil),
            "retrieve": dataclasses.asdict(first) if first is not None else None,
            "context": dict(self.context),
            "evidence": scrub_record(self.evidence),  # images: hashes and technical facts only
        }


class Chat:
    """A multi-round consultation: `chat.send(text)` per turn; `record()` / `save(path)` for the whole session.

    model, packs, settings, backend: as for `Session` (packs default to the ICD-10-CM core pack).
    retriever: any object with `search(query, k) -> list[RetrievedDoc]`, used instead of packs.
    history: a patient key: that patient's history (`medrwr-edge history add`) is searched beside the packs.
    Not thread-safe: one turn at a time.
    """

    def __init__(
        self,
        model: Optional[PathLike] = None,
        packs: Optional[Sequence[PathLike]] = None,
        settings: Optional[AskSettings] = None,
        backend=None,
        *,
        retriever: Optional[TextRetriever] = None,
        limits: Optional[ChatLimits] = None,
        history: Optional[str] = None,
    ):
        # chat answers are open-ended; ask keeps CDIR off for those too
        settings = (settings or AskSettings()).replace(cdir=False)
        if retriever is not None and packs is None:
            packs = []
        self.session = Session(packs=packs, image_pack=False, model=model, settings=settings, backend=backend,
                               history=history)
        self.backend = self.session.backend
        self.protocol = self.session.settings.resolved_protocol(self.backend)
        self.settings = self.session.settings.for_protocol(self.protocol)
        self.limits = limits or ChatLimits()
        if retriever is None:  # the packs, and the patient's history when a key was given (as `ask` searches)
            retriever = self.session.text_retriever(self.settings)
        self.retriever = retriever
        self._loop = MedRwRLoop(self.backend, retriever, None, self.settings.loop_config(self.protocol))
        self.system = P.system_prompt(has_image=self.backend.info.has_vision, open_ended=True) + CHAT_LINE
        self.turns: list[ChatTurn] = []
        self._context: list[_ContextTurn] = []  # the turns the KV cache holds, oldest first
        self._dropped = 0  # turns dropped from the context so far
        self._primed = False  # does the KV cache hold exactly system + self._context?
        self._carried = BackendStats()  # backend stats from before a re-encoding (reset() zeroes them)
        self._reencodings = 0
        self.created = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
        self.notes: list[str] = list(self.backend.info.notes)

    # ------------------------------------------------------------------ a turn
    def send(self, text: str, image=None, on_event: Optional[EventSink] = None) -> ChatTurn:
        """Distil the dialogue into a query, retrieve, append the message and generate the reply."""
        emit = on_event or ignore
        text = check_text(text)
        prepared = image if isinstance(image, PreparedImages) else PreparedImages.load(image)
        be, cfg = self.backend, self._loop.config
        t0 = time.perf_counter()
        index = len(self.turns) + 1
        notes: list[str] = []
        shown = prepared.images if be.info.has_vision else []
        if prepared.images and not shown:
            notes.append("model has no vision input: the image was not shown to the model; CDIR is off for "
                         "open-ended chat answers, so the image is recorded by its sha256 only")
        user_parts = _user_parts(P.neutralise_control_tokens(text), shown)
        user_tokens = self._count(user_parts)
        self._check_message_fits(user_tokens)

        before = self._totals()
        need = user_tokens + self._retrieval_room() + cfg.generation_reserve_tokens + TURN_OVERHEAD_TOKENS
        context = self._make_room(need, emit)
        base = be.n_tokens()
        prompt = P.prompt_text(self._system_parts() + [p for t in self._context for p in t.parts()] + user_parts)
        reencoded_here = False
        try:
            distil = self._distil(text, emit)
            if shown:  # the backend appends text only: re-encode the conversation with the image in its turn
                self._prefill_context(extra=user_parts)
                reencoded_here = True
                context.update(reencoded=True, reason="an image in this turn: the conversation was re-encoded "
                                                       "with the image in place (the backend appends text only)")
                head = ""
            else:
                head = P.prompt_text(user_parts)
            steps, passes, assistant, generated, answer = self._read(head, distil, notes, emit)
            closed = self._close_turn(notes)
        except BaseException:
            self._recover(base, reencoded_here)
            raise

        reply = answer.text if answer.text is not None else _plain(generated)
        if answer.text is None and reply:
            notes.append("the model gave no <answer> tags; the reply is its whole text")
        short = (f"{P.ANSWER_OPEN} {P.neutralise_control_tokens(reply)} {P.ANSWER_CLOSE}" if answer.text is not None
                 else P.neutralise_control_tokens(reply)) + END_OF_TURN
        self._context.append(_ContextTurn(index, user_parts, assistant + (END_OF_TURN if closed else ""), short))
        context["turns_in_context"] = [t.index for t in self._context]
        record = self._evidence(text, prepared, prompt, steps, passes, assistant, answer, notes, before, t0, distil)
        record.tokens["reused"] = context["reused_tokens"]
        turn = ChatTurn(index, text, reply, distil, context, record)
        self.turns.append(turn)
        emit(turn)
        return turn

    def _read(self, head: str, distil: dict, notes: list[str], emit: EventSink):
        """Append the user turn and the distilled query's retrieve block; generate the reply (the loop's passes)."""
        be, loop = self.backend, self._loop
        steps: list[Step] = []
        assistant = ""
        if distil["query"]:
            prefix = f"{P.QUERY_OPEN} {distil['query']} {P.QUERY_CLOSE}"
            be.append_text(head + prefix)
            step = Query(distil["query"], distil["raw"], 0, issued_by="model" if distil["source"] == "model"
                         else "runtime")
            steps.append(step)
            emit(step)
            retrieve = loop.search_and_splice(distil["query"], 0, step)
            steps.append(retrieve)
            emit(retrieve)
            assistant = prefix + retrieve.block
        elif head:
            be.append_text(head)
        trace = loop.run_passes([], emit, query_served=True, served={r.query for r in steps if isinstance(r, Retrieve)},
                                untagged_answers=False)
        steps += trace.steps
        notes += trace.notes
        answer = trace.answer or Answer(None, None, None, "none", None, len(trace.passes) - 1)
        return steps, trace.passes, assistant + trace.turn, trace.turn, answer

    def _close_turn(self, notes: list[str]) -> bool:
        """End the assistant turn in the cache (the end-of-turn token is never kept by generate())."""
        try:
            self.backend.append_text(END_OF_TURN)
            return True
        except MedrwrError:
            notes.append("the context is full: the turn could not be closed; the next turn re-encodes a shorter "
                         "conversation")
            self._primed = False
            return False

    def _recover(self, base: int, reencoded: bool) -> None:
        """A failed turn leaves no trace: drop what it decoded (or re-encode the conversation next turn)."""
        be = self.backend
        try:
            if not reencoded and self._primed and be.n_tokens() >= base:
                be.rollback(base)
                return
        except Exception:
            pass
        self._primed = False

    # ------------------------------------------------------------------ distil
    def _distil(self, text: str, emit: EventSink) -> dict:
        """One search query for the dialogue so far, written by the model on a scratch tail that is rolled back."""
        be, lim = self.backend, self.limits
        out = {"raw": "", "query": "", "source": "none", "prompt_tokens": 0, "generated_tokens": 0,
               "stop_reason": "", "seconds": 0.0, "reason": ""}
        if not self.settings.retrieval:
            out["reason"] = "retrieval disabled"
            return out
        if self.retriever is None:
            out["reason"] = "no knowledge pack loaded"
            return out
        t0 = time.perf_counter()
        history = self._history(lim.distil_history_tokens)
        prompt = (f"<|im_start|>user\n{DISTIL_INSTRUCTION}\n"
                  + (f"The consultation so far:\n{history}\n" if history else "")
                  + f"Latest message: {_cap_tokens(be, P.neutralise_control_tokens(text), lim.distil_message_tokens)}"
                  + f"{END_OF_TURN}<|im_start|>assistant\n{P.QUERY_OPEN}")
        base = be.n_tokens()
        try:
            out["prompt_tokens"] = be.append_text(prompt)
            sampling = SamplingSettings(0.0, 1.0, 0, self.settings.seed, lim.distil_max_tokens)  # greedy: stable
            gen = be.generate(sampling, [P.QUERY_CLOSE])
            out.update(generated_tokens=len(gen.tokens), stop_reason=gen.stop_reason)
            raw = gen.text[: -len(P.QUERY_CLOSE)] if gen.stop_string else gen.text
            untagged = _PROTOCOL_TAG_RE.sub("\n", raw)  # a tag alone (the model echoing the format) is no query
            line = next((ln for ln in untagged.split("\n") if ln.strip()), "")
            out["raw"] = raw.strip()
            query = P.extract_query(P.QUERY_OPEN + line + P.QUERY_CLOSE)
            if query:
                out["query"], out["source"] = " ".join(query.split()[:MAX_QUERY_WORDS]), "model"
        except MedrwrError as e:  # no room for the scratch prompt: retrieve with the message itself
            out["reason"] = f"distil skipped: {e}"
        finally:
            be.rollback(base)  # the conversation's KV prefix is exactly what it was
        if not out["query"]:  # Retrieve-then-Read's query: the message itself
            fallback = " ".join(text.replace('"', "").split()[:MAX_QUERY_WORDS])
            if any(ch.isalnum() for ch in fallback):
                out["query"], out["source"] = fallback, "user-message"
            out["reason"] = out["reason"] or "the model wrote no usable query; searched with the message itself"
        out["query"] = P._one_line(out["query"])  # it is spliced into the turn: no tags, no control tokens
        out["seconds"] = round(time.perf_counter() - t0, 4)
        emit(Distil(**out))
        return out

    def _history(self, budget: int) -> str:
        """The dialogue so far as short lines, most recent turns kept first, in chronological order."""
        be = self.backend
        lines: list[str] = []
        used = 0
        for turn in reversed(self.turns):
            remaining = budget - used
            if remaining < 24:
                break
            pair = [f"Assistant: {_cap_tokens(be, P.neutralise_control_tokens(turn.reply), min(64, remaining // 3))}",
                    f"User: {_cap_tokens(be, P.neutralise_control_tokens(turn.user), min(96, remaining // 2))}"]
            cost = sum(len(be.tokenize(s + "\n")) for s in pair)
            if used + cost > budget:
                break
            lines.extend(pair)
            used += cost
        return "\n".join(reversed(lines))

    # ------------------------------------------------------------------ the context window
    def _retrieval_room(self) -> int:
        return self.limits.retrieval_room_tokens if self.settings.retrieval and self.retriever is not None else 0

    def _check_message_fits(self, user_tokens: int) -> None:
        n_ctx, reserve = self.backend.info.n_ctx, self._loop.config.generation_reserve_tokens
        system = self._count(self._system_parts(dropped=0))
        if system + user_tokens + reserve > n_ctx:
            raise InputError(
                f"the message is {user_tokens} tokens; with the system prompt ({system}) and {reserve} tokens kept "
                f"for the reply it does not fit the model's context of {n_ctx} tokens: shorten it"
            )

    def _make_room(self, need: int, emit: EventSink) -> dict:
        """Make sure the cache holds the conversation with `need` tokens free; compact it if it does not fit."""
        be = self.backend
        n_ctx = be.info.n_ctx
        info = {"reused_tokens": 0, "reencoded": False, "reason": "", "dropped_turns": [], "condensed_turns": [],
                "turns_in_context": []}
        if self._primed and be.n_tokens() + need <= n_ctx:
            info["reused_tokens"] = be.n_tokens()
            return info
        fits = self._count(self._all_parts()) + need <= n_ctx
        if not fits:
            for turn in self._context:  # retrieved passages and reasoning of older turns go first
                if not turn.condensed:
                    turn.condensed = True
                    info["condensed_turns"].append(turn.index)
            # Then the oldest turns, down to three quarters of the context, so that the next few turns fit
            # without another re-encoding.
            while self._context and self._count(self._all_parts()) + need > n_ctx * 3 // 4:
                info["dropped_turns"].append(self._context.pop(0).index)
                self._dropped += 1
            parts = []
            if info["dropped_turns"]:
                parts.append(f"turn(s) {_span(info['dropped_turns'])} dropped")
            if info["condensed_turns"]:
                parts.append(f"turn(s) {_span(info['condensed_turns'])} kept as question and answer only")
            info["reason"] = ("the context was full (" + "; ".join(parts or ["nothing to drop"])
                              + "): the kept conversation was re-encoded once")
        else:
            info["reason"] = "start of the session" if not self.turns else "the previous turn left the cache unusable"
        self._prefill_context()
        info["reencoded"] = True
        if self.turns:  # anything but the session's start is news to the user
            emit(Reencoded(info["reason"]))
        return info

    def _system_parts(self, dropped: Optional[int] = None) -> list[PromptPart]:
        dropped = self._dropped if dropped is None else dropped
        note = (f"\n({dropped} earlier turn(s) of this consultation were dropped to fit the model's context.)"
                if dropped else "")
        return [f"<|im_start|>system\n{self.system}{note}{END_OF_TURN}"]

    def _all_parts(self) -> list[PromptPart]:
        return self._system_parts() + [p for t in self._context for p in t.parts()]

    def _prefill_context(self, extra: Sequence[PromptPart] = ()) -> None:
        """Re-encode system + context (+ extra): the only prefill of a session, apart from compactions."""
        be = self.backend
        self._carry_stats()
        be.reset()
        self._primed = False
        be.prefill(P._merge_text(self._all_parts() + list(extra)))
        self._primed = True
        self._reencodings += 1

    def _count(self, parts: Sequence[PromptPart]) -> int:
        be = self.backend
        n = len(be.tokenize("".join(p for p in parts if isinstance(p, str))))
        count_image = getattr(be, "image_token_count", None)
        for p in parts:
            if isinstance(p, ImageInput):
                n += count_image(p.pixels) if count_image else 1
        return n

    # ------------------------------------------------------------------ records
    def _carry_stats(self) -> None:
        for f in dataclasses.fields(BackendStats):
            setattr(self._carried, f.name, getattr(self._carried, f.name) + getattr(self.backend.stats, f.name))

    def _totals(self) -> dict:
        st = self.backend.stats
        return {f.name: getattr(self._carried, f.name) + getattr(st, f.name) for f in dataclasses.fields(BackendStats)}

    def _evidence(self, text, prepared, prompt, steps, passes, assistant, answer, notes, before, t0, distil):
        after = self._totals()
        d = {k: after[k] - before[k] for k in after}
        record = EvidenceRecord(
            question=text,
            options=[],
            images=prepared.records,
            model=model_record(self.backend),
            packs=list(self.session.pack_records),
            settings=dict(vars(self.settings)),
            steps=steps,
            passes=passes,
            assistant_text=assistant,
            prompt=prompt,
            created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            medrwr_edge_version=__version__,
            protocol=self.protocol,
        )
        record.answer, record.confidence, record.confidence_kind = answer.text, answer.confidence, answer.confidence_kind
        record.status = "answered" if answer.text is not None else "no-answer"
        record.tokens = {
            "prompt": int(d["prompt_tokens"]),
            "prompt_cached": int(d["cached_prompt_tokens"]),
            "generated": int(d["generated_tokens"]),
            "inserted": int(d["inserted_tokens"]),
            "decoded": int(d["prompt_tokens"] + d["generated_tokens"] + d["inserted_tokens"]),
            "rolled_back": int(d["rolled_back_tokens"]),
            "distil": int(distil["prompt_tokens"] + distil["generated_tokens"]),
            "in_cache_at_end": self.backend.n_tokens(),
        }
        record.timings = {
            "distil": distil["seconds"],
            "prefill": round(d["prefill_seconds"], 4),
            "generate": round(d["generate_seconds"], 4),
            "retrieval": round(sum(r.seconds for r in record.retrievals()), 4),
            "total": round(time.perf_counter() - t0, 4),
        }
        record.notes = list(self.backend.info.notes) + notes + [
            f"chat turn {len(self.turns) + 1}: the prompt holds the earlier dialogue; `replay` re-asks the question "
            "alone, so it will not reproduce this turn"
        ]
        return record

    def sources(self) -> list[RetrievedDoc]:
        """The passages retrieved in the last turn (empty before the first)."""
        return self.turns[-1].sources() if self.turns else []

    def record(self) -> dict:
        """The whole session as one record (schema medrwr-edge/chat/1)."""
        t = self._totals()
        return {
            "schema": CHAT_SCHEMA,
            "created": self.created,
            "medrwr_edge_version": __version__,
            "model": model_record(self.backend),
            "packs": list(self.session.pack_records),
            "settings": dict(vars(self.settings)),
            "limits": dataclasses.asdict(self.limits),
            "system_prompt": self.system,
            "turns": [turn.to_dict() for turn in self.turns],
            "tokens": {
                "prompt": int(t["prompt_tokens"]),
                "prompt_cached": int(t["cached_prompt_tokens"]),
                "generated": int(t["generated_tokens"]),
                "inserted": int(t["inserted_tokens"]),
                "decoded": int(t["prompt_tokens"] + t["generated_tokens"] + t["inserted_tokens"]),
                "rolled_back": int(t["rolled_back_tokens"]),
                "in_cache": self.backend.n_tokens(),
            },
            "reencodings": self._reencodings,
            "dropped_turns": self._dropped,
            "notes": list(self.notes),
        }

    def save(self, path: PathLike) -> Path:
        """Write the session record as JSON, atomically (temp file + rename)."""
        from ..paths import atomic_write_text

        path = Path(path)
        if path.is_dir():
            raise InputError(f"{path} is a directory; give the file name to save the session to")
        try:
            atomic_write_text(path, json.dumps(self.record(), indent=2, ensure_ascii=False) + "\n")
        except OSError as e:
            raise InputError(f"cannot write {path}: {e.strerror or e}") from None
        return path

    def close(self) -> None:
        self.session.close()

    def __enter__(self) -> "Chat":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _user_parts(text: str, images: Sequence[ImageInput]) -> list[PromptPart]:
    parts: list[PromptPart] = ["<|im_start|>user\n"]
    for img in images:
        parts += [P.VISION_START, img, P.VISION_END]
    parts.append(f"{text}{END_OF_TURN}<|im_start|>assistant\n")
    return P._merge_text(parts)


def _cap_tokens(be, text: str, limit: int) -> str:
    """`text` cut (at a word) to at most `limit` tokens, marked with "…" when cut."""
    if len(be.tokenize(text)) <= limit:
        return text
    words = text.split()
    lo, hi = 0, len(words)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if len(be.tokenize(" ".join(words[:mid]) + " …")) <= limit:
            lo = mid
        else:
            hi = mid - 1
    return " ".join(words[:lo]) + " …"


def _plain(text: str) -> str:
    """The model's text without protocol tags, queries or retrieve blocks (for a reply given without tags)."""
    return " ".join(_TAGS_RE.sub(" ", text).split())


def _span(indices: list[int]) -> str:
    if len(indices) > 2 and indices == list(range(indices[0], indices[-1] + 1)):
        return f"{indices[0]}–{indices[-1]}"
    return ", ".join(map(str, indices))
