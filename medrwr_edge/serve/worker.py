"""One loaded model, many clients: a bounded queue in front of worker threads that each own a Session.

`Session` answers one question at a time, and one llama.cpp context decodes one sequence, so requests wait in an
asyncio queue (bounded: a full queue is refused at once with a Retry-After estimate, never silently delayed) and
one thread answers them in order. The loop's events travel back to the request's handler through the event loop.

With the model on an inference server (`--engine`) nothing here holds a decoding context, so N workers
(`--engine-parallel`, default: the server's slots, else 1) answer N questions at once, each with its own
`ServerBackend` sequence (and, on a llama.cpp server, its own slot, so its prefix stays cached there) over the
same open packs. In-process there is exactly one worker, as before.

Sharing: the packs (and, through kb_pack.pack, their encoders) are opened once, by the main Session; a request
for a subset of them gets a view over the same open Pack objects and the same model, never a second copy.

Uploads: a job's private folder is removed when nothing can read it any more: by the worker thread once the answer
(and its HTML report) is done, or, for a job that never ran, when it is dropped from the queue.

Cancelling: every loop event passes through `_Sink`, which raises `RequestCancelled` once the client has gone.
The exception unwinds `Session.ask` between two tokens, so the backend is left consistent (every sampled token is
decoded before its piece is streamed), and the next `Session.ask` starts with `backend.reset()` anyway.
"""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import logging
import math
import shutil
import threading
import time
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from ..errors import InputError, MedrwrError, SettingError
from ..evidence.record import Answer, Query, Think
from ..runtime.engine_dialects import EngineError
from ..runtime.events import Piece

log = logging.getLogger("medrwr_edge.serve")

# Settings a request may change for its own question (AskSettings names); everything else is fixed when the model
# is loaded. Types and ranges are AskSettings' own checks; the limits below are the server's.
REQUEST_SETTINGS = frozenset({
    "temperature", "top_p", "top_k_sampling", "seed", "max_tokens", "top_k_docs", "retrieval", "cdir",
    "cdir_threshold", "search_mode", "top_k_diagnoses", "cdir_open_ended", "allow_mixed_modalities", "protocol",
    "guided_think_tokens", "guided_read_tokens",
})
MAX_TOP_K_DOCS = 10


class RequestCancelled(Exception):
    """The client disconnected or the server is shutting down: stop generating for this request."""


class QueueFull(Exception):
    def __init__(self, retry_after: int):
        super().__init__(f"the server is busy: {retry_after} s estimated wait")
        self.retry_after = retry_after


class InternalFault(MedrwrError):
    """A bug or an unexpected failure while answering: reported as 500 without the original text."""


class NotAccepting(Exception):
    """The server is shutting down."""


@dataclass
class AskJob:
    request_id: str
    question: Any  # a runtime.settings.Question checked by the handler (or a str, checked by Session.ask)
    options: list[str]  # option strings, when `question` is a str
    settings: Any = None  # the request's AskSettings, checked by the handler (None: the Session's)
    images: Any = None  # PreparedImages, decoded before queueing so a bad image fails at once
    image_paths: list[Path] = field(default_factory=list)  # the uploads, for the HTML report
    workdir: Optional[Path] = None  # private temp dir holding the uploads; removed when the job ends
    packs: Optional[list[str]] = None  # names of loaded text packs to search (None: all)
    want_report: bool = False
    events: Optional[asyncio.Queue] = None  # (kind, payload) as JSON-ready dicts, then ("end", None)
    future: Optional[asyncio.Future] = None  # -> (record dict, report html or None)
    cancelled: threading.Event = field(default_factory=threading.Event)
    enqueued_at: float = field(default_factory=time.monotonic)
    started_at: Optional[float] = None

    def cancel(self) -> None:
        self.cancelled.set()


@dataclass
class Counters:
    accepted: int = 0
    completed: int = 0
    failed: int = 0
    cancelled: int = 0
    rejected_queue_full: int = 0
    service_seconds_ewma: Optional[float] = None  # for Retry-After


class AskWorker:
    """Owns the Session (built by `session_factory` in the worker thread) and answers queued jobs in order."""

    def __init__(self, session_factory: Callable[[], Any], max_queue: int = 8, keep_reports: int = 32,
                 log_answers: bool = False, engine_parallel: Optional[int] = None):
        self._factory = session_factory
        self.log_answers = log_answers
        self.max_queue = max_queue
        self._keep_reports = keep_reports
        self._engine_parallel = engine_parallel  # None: what the inference server says (its slots), else 1
        self._executors = [ThreadPoolExecutor(max_workers=1, thread_name_prefix="medrwr-serve-worker")]
        self._queue: Optional[asyncio.Queue] = None
        self._tasks: list[asyncio.Task] = []
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self.session = None  # the main Session: loaded model info and packs; worker 0's unless the workers are copies
        self._sessions: list = []  # one per worker
        self.running: list[AskJob] = []  # being answered (AskJob is unhashable: a list, removed by identity)
        self.accepting = False
        self.counters = Counters()
        self.reports: OrderedDict[str, str] = OrderedDict()

    # ------------------------------------------------------------------ lifetime
    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._queue = asyncio.Queue()
        self.session = await self._loop.run_in_executor(self._executors[0], self._factory)
        self._sessions = await self._loop.run_in_executor(self._executors[0], self._worker_sessions)
        self._executors += [ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"medrwr-serve-worker-{i}")
                            for i in range(1, len(self._sessions))]
        self._tasks = [asyncio.create_task(self._run(i), name=f"medrwr-serve-worker-{i}")
                       for i in range(len(self._sessions))]
        self.accepting = True

    def _worker_sessions(self) -> list:
        """The main Session alone (in-process, or one engine worker); else one copy per worker over the same open
        packs, each with its own sequence on the server (a llama.cpp server: worker i on slot i mod slots)."""
        backend = self.session.backend
        if not hasattr(backend, "sibling"):
            return [self.session]
        n = self._engine_parallel or backend.default_parallel()
        if n == 1:
            return [self.session]
        slots = backend.default_parallel()
        sessions = []
        try:
            for i in range(n):
                view = copy.copy(self.session)
                view.backend = backend.sibling(slot=i % slots)
                sessions.append(view)
        except BaseException:
            for view in sessions:
                view.backend.close()
            raise
        return sessions

    @property
    def parallel(self) -> int:
        return max(1, len(self._sessions))

    @property
    def current(self) -> Optional[AskJob]:
        """A job being answered (in-process: the one), or None."""
        return next(iter(self.running), None)

    async def stop(self, timeout: float) -> None:
        """Stop taking requests; let queued and running ones finish for `timeout` seconds, then abort the rest."""
        self.accepting = False
        deadline = time.monotonic() + max(0.0, timeout)
        while (self.running or (self._queue and not self._queue.empty())) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        aborted = 0
        while self._queue is not None and not self._queue.empty():
            job = self._queue.get_nowait()
            job.cancel()
            self._finish(job, error=RequestCancelled("the server shut down before this request ran"))
            aborted += 1
        for job in list(self.running):
            job.cancel()
            aborted += 1
        for task in self._tasks:
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass
        # Each waits for its running answer to reach its next event (it raises RequestCancelled there), then closes
        # its own server sequence; the main Session (packs, model) goes last, when no worker can read it.
        loop = asyncio.get_running_loop()
        await asyncio.gather(*(loop.run_in_executor(ex, self._close_copy, i) for i, ex in enumerate(self._executors)))
        await loop.run_in_executor(self._executors[0], self._close_main)
        for ex in self._executors:
            ex.shutdown(wait=True)
        if aborted:
            log.info("shutdown: %d request(s) aborted after %.0f s", aborted, timeout)

    def _close_copy(self, i: int) -> None:
        if i < len(self._sessions) and self._sessions[i] is not self.session:
            self._sessions[i].backend.close()  # a copy owns only its own server sequence

    def _close_main(self) -> None:
        if self.session is not None:
            self.session.close()
            self.session = None

    # ------------------------------------------------------------------ facts for the endpoints
    def text_pack_names(self) -> list[str]:
        return [p["name"] for p in self.session.pack_records if p.get("role") == "knowledge"]

    def queue_depth(self) -> int:
        return self._queue.qsize() if self._queue is not None else 0

    def retry_after(self) -> int:
        per = self.counters.service_seconds_ewma or 5.0
        return max(1, min(600, math.ceil(per * math.ceil((self.queue_depth() + 1) / self.parallel))))

    # ------------------------------------------------------------------ submitting
    def submit(self, job: AskJob, streaming: bool = False) -> int:
        """Queue `job`; return how many requests are ahead of it. Raises QueueFull or NotAccepting.
        Only a streaming job gets an event queue (a plain request waits for the record alone)."""
        if not self.accepting:
            raise NotAccepting()
        # max_queue waiting plus the `parallel` being answered
        if self.queue_depth() + len(self.running) >= self.max_queue + self.parallel:
            self.counters.rejected_queue_full += 1
            raise QueueFull(self.retry_after())
        ahead = self.queue_depth() + (len(self.running) if len(self.running) >= self.parallel else 0)
        job.events = asyncio.Queue() if streaming else None
        job.future = self._loop.create_future()
        self.counters.accepted += 1
        self._queue.put_nowait(job)
        return ahead

    # ------------------------------------------------------------------ the worker
    async def _run(self, i: int) -> None:
        """Worker i: takes the next queued job and answers it with its own Session, in its own thread."""
        while True:
            job = await self._queue.get()
            if job.cancelled.is_set():
                self._finish(job, error=RequestCancelled("cancelled while queued"))
                continue
            self.running.append(job)
            job.started_at = time.monotonic()
            self._emit(job, "started", {"type": "started", "request_id": job.request_id})
            running: Future = self._executors[i].submit(self._answer, job, self._sessions[i])
            # Done (answered, failed, or never run because the executor shut down): only then can nothing read
            # the uploads any more, whatever happened to this task meanwhile.
            running.add_done_callback(lambda _f, job=job: _remove_uploads(job))
            try:
                result = await asyncio.shield(asyncio.wrap_future(running))
            except asyncio.CancelledError:
                job.cancel()  # the worker task itself is being stopped (shutdown)
                self._done_running(job)
                self._finish(job, error=RequestCancelled("the server shut down"))
                raise
            except BaseException as e:  # noqa: BLE001 - reported to the client as an error
                self._done_running(job)
                self._finish(job, error=e)
                continue
            self._done_running(job)
            seconds = time.monotonic() - job.started_at
            c = self.counters
            c.service_seconds_ewma = seconds if c.service_seconds_ewma is None else 0.7 * c.service_seconds_ewma + 0.3 * seconds
            self._finish(job, result=result)

    def _done_running(self, job: AskJob) -> None:
        self.running = [j for j in self.running if j is not job]

    def _answer(self, job: AskJob, worker_session):
        """In a worker's thread: answer one question; render its report while the uploads still exist."""
        if job.cancelled.is_set():
            raise RequestCancelled("cancelled")
        session = self._session_for(worker_session, job.packs)
        sink = _Sink(job, self._emit)
        record = session.ask(job.images, job.question, job.options or None, on_event=sink, settings=job.settings)
        if self.log_answers:
            _log(record)
        report = None
        if job.want_report:
            from ..evidence.report import render_report

            report = render_report(record, images=job.image_paths)
        return record.to_dict(), report

    def _session_for(self, session, packs: Optional[list[str]]):
        if packs is None or list(packs) == self.text_pack_names():
            return session
        return _pack_subset(session, packs)

    def _emit(self, job: AskJob, kind: str, payload) -> None:
        """Thread-safe: hand an event to the request's handler on the event loop."""
        if job.events is None:
            return
        self._loop.call_soon_threadsafe(job.events.put_nowait, (kind, payload))

    def _finish(self, job: AskJob, result=None, error: Optional[BaseException] = None) -> None:
        c = self.counters
        if error is None:
            c.completed += 1
            record, report = result
            if report is not None and self._keep_reports > 0:
                self.reports[job.request_id] = report
                while len(self.reports) > self._keep_reports:
                    self.reports.popitem(last=False)
        elif isinstance(error, RequestCancelled) or job.cancelled.is_set():
            c.cancelled += 1
            error = RequestCancelled(str(error) if isinstance(error, RequestCancelled) else "cancelled")
        else:
            c.failed += 1
            if isinstance(error, EngineError):  # the operator's clue to a 502/504 (the type only, no content)
                log.warning("request %s: inference server fault (%s)", job.request_id, type(error).__name__)
            elif not isinstance(error, MedrwrError):
                # Only the type: an exception's text could quote the question or a DICOM tag.
                log.error("request %s failed: %s", job.request_id, type(error).__name__)
                error = InternalFault("internal error (see the server log)")
        if job.future is not None and not job.future.done():
            if error is None:
                job.future.set_result(result)
            else:
                job.future.set_exception(error)
                job.future.exception()  # mark retrieved: a client that left will never read it
        if job.events is not None:
            job.events.put_nowait(("end", None))
        if job.started_at is None:  # never handed to the worker thread: nothing else will read its uploads
            _remove_uploads(job)


def _remove_uploads(job: AskJob) -> None:
    if job.workdir is not None:
        shutil.rmtree(job.workdir, ignore_errors=True)


def _pack_subset(main, names: list[str]):
    """A view of the main Session searching only `names`: the same open Pack objects (with their loaded encoders)
    and the same model, so no request re-opens a pack. Never closed: the main Session owns everything."""
    by_name = {p.name: p for p in main.text_packs}
    records = {r["name"]: r for r in main.pack_records if r.get("role") == "knowledge"}
    view = copy.copy(main)
    view.text_packs = [by_name[n] for n in names]
    view.pack_records = [records[n] for n in names] + [r for r in main.pack_records if r.get("role") != "knowledge"]
    return view


class _Sink:
    """The loop's sink: forwards its typed events as JSON-ready dicts, synthesises "think" steps from the pieces,
    and is where a cancelled request stops (the exception unwinds generation between two tokens)."""

    def __init__(self, job: AskJob, emit):
        self.job, self.emit = job, emit
        self.pending = ""  # pieces since the last query/retrieve/answer/cdir event

    def __call__(self, event) -> None:
        if self.job.cancelled.is_set():
            raise RequestCancelled("the client went away")
        if isinstance(event, Piece):
            self.pending += event.text
            self._send(event)
            return
        if isinstance(event, (Query, Answer)):
            tag = "<query>" if isinstance(event, Query) else "<answer>"
            think = self.pending.rsplit(tag, 1)[0].strip() if tag in self.pending else self.pending.strip()
            if think:
                self._send(Think(think, event.pass_index))
        self.pending = ""
        self._send(event)

    def _send(self, event) -> None:
        self.emit(self.job, event.type, sse_body(event))


def sse_body(event) -> dict:
    """An event as its server-sent JSON (a public schema: keep it byte for byte). Steps are sent as the record
    keeps them ("type" last); "piece" and "think" have always led with their "type"."""
    body = dataclasses.asdict(event)
    if isinstance(event, (Piece, Think)):
        body = {"type": event.type, **{k: v for k, v in body.items() if k != "type"}}
    return body


def _log(record) -> None:
    """Append to the answer log like `ask` does (scrubbed: image hashes, years of study dates). An unwritable log
    must not cost the client its answer: one warning line in the server log instead (no content in it)."""
    from ..evidence.log import finish_answer

    logged = finish_answer(record, "api")
    if logged.error is not None:
        logging.getLogger("medrwr_edge.serve").warning("answer not logged: %s", type(logged.error).__name__)


def request_settings(base, raw: Optional[dict], max_tokens_limit: int):
    """The AskSettings of one request: `base` (the Session's) with the request's JSON changes, which must be
    REQUEST_SETTINGS and within the server's limits (one-line InputError otherwise)."""
    if raw is None:
        return base
    if not isinstance(raw, dict):
        raise InputError("settings must be a JSON object")
    for key in raw:
        if key not in REQUEST_SETTINGS:
            raise InputError(f"unknown setting {key!r}; allowed: {', '.join(sorted(REQUEST_SETTINGS))}")
    settings = base.replace(**raw)
    if "max_tokens" in raw and settings.max_tokens > max_tokens_limit:
        raise SettingError("max_tokens", f"must be between 1 and {max_tokens_limit}")
    if "top_k_docs" in raw and settings.top_k_docs > MAX_TOP_K_DOCS:
        raise SettingError("top_k_docs", f"must be between 1 and {MAX_TOP_K_DOCS}")
    for key in ("guided_think_tokens", "guided_read_tokens"):  # generated tokens too: the same limit as max_tokens
        if key in raw and getattr(settings, key) > max_tokens_limit:
            raise SettingError(key, f"must be between 0 and {max_tokens_limit}")
    return settings
