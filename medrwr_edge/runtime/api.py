"""`medrwr_edge.ask(...)`: what `medrwr-edge ask` does, as a function returning the evidence record."""

from __future__ import annotations

import datetime as _dt
import os
import time
from dataclasses import dataclass, field
from typing import Optional, Sequence, Union

from .. import __version__
from ..errors import InputError
from ..evidence.record import EvidenceRecord
from ..kb_pack.opening import open_packs
from . import backends
from .backend import ImageInput
from .events import EventSink
from .loop import MedRwRLoop
from .settings import AskSettings, Question

__all__ = ["AskSettings", "Question", "Session", "ask", "PreparedImages"]

PathLike = Union[str, os.PathLike]


class Session:
    """A loaded model and opened packs, reused across questions (eval, chat, serve).

    `medrwr_edge.ask()` is a Session used once. Not thread-safe: one question at a time per Session.
    """

    def __init__(
        self,
        *,
        packs: Optional[Sequence[PathLike]] = None,
        image_pack: Optional[PathLike] = None,
        model: Optional[PathLike] = None,
        settings: Optional[AskSettings] = None,
        backend=None,
        history: Optional[str] = None,
    ):
        self.settings = settings or AskSettings()  # checked when it was made
        t0 = time.perf_counter()
        self.text_packs, self.image_pack, self.pack_records = open_packs(
            packs, image_pack, retrieval=self.settings.retrieval, cdir=self.settings.cdir)
        self.history_pack = None  # a patient's history (history/store.py), searched beside the text packs
        if history is not None:
            try:
                from ..history.store import open_history_pack

                self.history_pack, history_record = open_history_pack(history)
            except BaseException:
                self._close_packs()
                raise
            self.pack_records.insert(len(self.text_packs), history_record)
        self._owns_backend = backend is None
        try:
            self.backend = backend if backend is not None else backends.load_backend(model, self.settings)
        except BaseException:
            self._close_packs()
            raise
        self.load_seconds = {"open_packs": round(time.perf_counter() - t0, 4)}
        self.load_seconds["load_model"] = round(time.perf_counter() - t0 - self.load_seconds["open_packs"], 4)

    def ask(
        self,
        image: Union[None, PathLike, Sequence[PathLike], "PreparedImages"],
        question: Union[str, Question],
        options: Optional[Sequence[str]] = None,
        on_event: Optional[EventSink] = None,
        *,
        settings: Optional[AskSettings] = None,
        **changes,
    ) -> EvidenceRecord:
        """Answer one question. settings: this question's settings (default: the Session's), with `changes` (any
        AskSettings field) on top. A `Question` or `PreparedImages` was checked by the caller and is used as is."""
        settings = (settings or self.settings).replace(**changes)
        protocol = settings.resolved_protocol(self.backend)
        settings = settings.for_protocol(protocol)
        if isinstance(question, Question):
            if options:
                raise TypeError("a checked Question carries its options: give them to Question.check")
            q = question
        else:
            q = Question.check(question, options, settings)
        t0 = time.perf_counter()
        prepared = (image if isinstance(image, PreparedImages)
                    else PreparedImages.for_settings(image, settings))
        images, image_records = prepared.images, prepared.records
        if images and getattr(self.backend, "image_refusal", None):  # an inference server that cannot see them
            raise InputError(self.backend.image_refusal, names=("engine",))

        from .retrieval import PackImageRetriever

        loop = MedRwRLoop(
            self.backend,
            self.text_retriever(settings),
            PackImageRetriever(self.image_pack) if self.image_pack is not None and settings.cdir else None,
            settings.loop_config(protocol),
        )
        record = EvidenceRecord(
            question=q.text,
            options=q.option_dicts(),
            images=image_records,
            model=backends.model_record(self.backend),
            packs=list(self.pack_records),
            settings=dict(vars(settings)),
            created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            medrwr_edge_version=__version__,
        )
        record.notes.extend(self.backend.info.notes)
        record.notes.extend(prepared.notes)
        if self.history_pack is not None and not settings.retrieval:
            record.notes.append("the patient history was opened but not searched: retrieval is off (--no-retrieval)")
        if settings.cdir and images and self.image_pack is None:
            record.notes.append("CDIR unavailable: no image pack installed or given")
        loop.run(record, q.text, q.options, images, on_event)
        if hasattr(self.backend, "engine_record"):  # an inference server: which one, and its cache counters
            record.model["engine"] = self.backend.engine_record()
        record.timings.update(self.load_seconds)
        record.timings["total"] = round(time.perf_counter() - t0, 4)
        return record

    def text_retriever(self, settings: AskSettings):
        """What `<query>` searches: the knowledge packs, and the patient history when one was opened."""
        from .retrieval import PackTextRetriever

        knowledge = PackTextRetriever(self.text_packs, settings.search_mode) if self.text_packs else None
        if self.history_pack is None:
            return knowledge
        from ..history.retrieval import HistoryAwareRetriever

        return HistoryAwareRetriever(knowledge, self.history_pack, settings.search_mode)

    def _close_packs(self) -> None:
        for p in self.text_packs + ([self.image_pack] if self.image_pack is not None else []):
            p.close()
        if getattr(self, "history_pack", None) is not None:
            self.history_pack.close()

    def close(self) -> None:
        self._close_packs()
        if self._owns_backend:
            self.backend.close()

    def __enter__(self) -> "Session":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def ask(
    image: Union[None, PathLike, Sequence[PathLike]],
    question: str,
    options: Optional[Sequence[str]] = None,
    *,
    packs: Optional[Sequence[PathLike]] = None,
    image_pack: Optional[PathLike] = None,
    model: Optional[PathLike] = None,
    settings: Optional[AskSettings] = None,
    on_event: Optional[EventSink] = None,
    backend=None,
    history: Optional[str] = None,
    **changes,
) -> EvidenceRecord:
    """Answer `question` about `image` with Med-RwR reasoning-with-retrieval; return the evidence record.

    packs: text packs (names under the data directory or paths); default: the ICD-10-CM core pack.
    image_pack: the CDIR reference image pack; None: the default reference images (if installed); False: none.
    model: a GGUF file, an installed model name, or None for the default model.
    changes: any AskSettings field (e.g. seed=1, cdir=False), on top of `settings`.
    history: a patient key: that patient's history (`medrwr-edge history add`) is searched beside the packs.
    """
    settings = (settings or AskSettings()).replace(**changes)
    # Fail on bad input before loading anything heavy; checked here once, used as is by Session.ask.
    q = Question.check(question, options, settings)
    prepared = PreparedImages.for_settings(image, settings)
    with Session(packs=packs, image_pack=image_pack, model=model, settings=settings, backend=backend,
                 history=history) as session:
        return session.ask(prepared, q, on_event=on_event)


@dataclass
class PreparedImages:
    """Input images decoded once: pixels for the model/encoders, non-identifying facts for the record.

    With several images, the last is the current study and the others are priors, oldest first
    (runtime/studies.py: sorted by StudyDate when every prior has one, else in the order given)."""

    images: list[ImageInput] = field(default_factory=list)
    records: list[dict] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @classmethod
    def load(cls, image: Union[None, PathLike, Sequence[PathLike]], allow_mixed_modalities: bool = False,
             images_are_studies: bool = True, frame: Optional[int] = None) -> "PreparedImages":
        paths = [] if image is None else [image] if isinstance(image, (str, os.PathLike)) else list(image)
        from .studies import prepare_studies

        return cls(*prepare_studies(paths, allow_mixed_modalities, images_are_studies, frame))

    @classmethod
    def for_settings(cls, image, settings: "AskSettings") -> "PreparedImages":
        return cls.load(image, settings.allow_mixed_modalities, settings.images_are_studies, settings.frame)
