"""`medrwr_edge.ask(...)`: what `medrwr-edge ask` does, as a function returning the evidence record."""

from __future__ import annotations

import datetime as _dt
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence, Union

from .. import __version__
from ..errors import InputError, MedrwrError, ModelError
from .backend import ImageInput
from .loop import EventSink, MedRwRLoop
from .settings import AskSettings, Question
from .steps import EvidenceRecord

__all__ = ["AskSettings", "Question", "Session", "ask", "PreparedImages", "load_backend"]

DEFAULT_TEXT_PACK = "icd10cm-core"
DEFAULT_IMAGE_PACK = "reference-images"

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
        self.text_packs, self.image_pack, self.pack_records = _open_packs(packs, image_pack, self.settings)
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
            self.backend = backend if backend is not None else load_backend(model, self.settings)
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

        from .retrieval import PackImageRetriever

        loop = MedRwRLoop(
            self.backend,
            self.text_retriever(settings),
            PackImageRetriever(self.image_pack) if self.image_pack is not None and settings.cdir else None,
            settings.loop_config(settings.resolved_protocol(self.backend)),
        )
        record = EvidenceRecord(
            question=q.text,
            options=q.option_dicts(),
            images=image_records,
            model=_model_record(self.backend),
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


def _open_packs(packs, image_pack, settings: AskSettings):
    from ..kb_pack.pack import Pack, resolve_pack_path

    opened, records = [], []
    use_default_text = packs is None
    if use_default_text:
        packs = [DEFAULT_TEXT_PACK] if settings.retrieval else []
    text_packs = []
    try:
        for p in packs:
            path = resolve_pack_path(p)
            if use_default_text and not path.exists():
                raise MedrwrError(
                    f"the default knowledge pack '{DEFAULT_TEXT_PACK}' is not installed; run `medrwr-edge setup` "
                    "or give --pack PATH (or --no-retrieval)"
                )
            pack = Pack.open(path)
            opened.append(pack)
            if pack.kind != "text":
                raise InputError(f"--pack {p}: {pack.name} is an image pack; give it with --image-pack")
            text_packs.append(pack)
            records.append(_pack_record(pack, "knowledge"))
        image_pack_obj = None
        if settings.cdir and image_pack is not False:  # False: no image pack, not even the default
            if image_pack is None:
                default = resolve_pack_path(DEFAULT_IMAGE_PACK)
                image_pack = default if default.exists() else None
            if image_pack is not None:
                image_pack_obj = Pack.open(resolve_pack_path(image_pack))
                opened.append(image_pack_obj)
                if image_pack_obj.kind != "image":
                    raise InputError(f"--image-pack {image_pack}: {image_pack_obj.name} is not an image pack")
                records.append(_pack_record(image_pack_obj, "cdir-reference-images"))
    except BaseException:
        for pack in opened:
            pack.close()
        raise
    return text_packs, image_pack_obj, records


def _pack_record(pack, role: str) -> dict:
    return {
        "name": pack.name,
        "version": pack.version,
        "kind": pack.kind,
        "role": role,
        "doc_count": pack.doc_count,
        "encoder_sha256": pack.encoder_sha256,
        "manifest_sha256": pack.manifest.get("manifest_sha256", ""),
        "path": str(Path(pack.path).resolve()),
    }


def load_backend(model: Optional[PathLike], settings: AskSettings):
    """The llama.cpp backend for a GGUF file or an installed model name (default: the default LLM), or the
    inference server at settings.engine."""
    if settings.engine:
        if model is not None:
            raise InputError("--engine generates with the model the server has loaded; --model is for the "
                             "in-process backend: give one or the other")
        from .server_backend import ServerBackend

        return ServerBackend(settings.engine, timeout=settings.engine_timeout, n_ctx=settings.n_ctx,
                             api_key=os.environ.get("MEDRWR_ENGINE_API_KEY") or None)
    from .. import assets
    from ..paths import cached_sha256, data_dir

    if model is None:
        path = assets.default_llm_path()
    else:
        path = Path(model)
        if not path.exists() and os.sep not in str(model):
            path = assets.installed_path(str(model))  # an installed model's name
    from ..export.bundle import is_bundle

    if is_bundle(path):  # an exported Med-RwR bundle: GGUF decoder + ONNX vision encoder, hashes checked
        from .multimodal_backend import load_bundle

        backend = load_bundle(path, n_ctx=settings.n_ctx, gpu_layers=settings.gpu_layers, seed=settings.seed)
        backend.info.declares_protocol = True  # an exported Med-RwR checkpoint: trained on the protocol
        return backend
    if path.is_dir():
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) != 1:
            raise ModelError(f"model directory {path} must hold exactly one .gguf file (found {len(ggufs)})")
        path = ggufs[0]
    assets.check_gguf(path)
    from .llama_backend import LlamaTextBackend
    from .speculative import speculative_args

    return LlamaTextBackend(
        path,
        n_ctx=settings.n_ctx,
        gpu_layers=settings.gpu_layers,
        seed=settings.seed,
        n_threads=settings.n_threads,
        sha256=cached_sha256(path),
        prefix_cache_dir=str(data_dir() / "prefix-cache") if settings.prefix_cache else None,
        **speculative_args(settings.speculative, settings.draft_model),
    )


def _model_record(backend) -> dict:
    info = backend.info
    return {
        "name": Path(info.model_path).name,
        "path": str(Path(info.model_path).resolve()),
        "sha256": info.model_sha256,
        "backend": info.name,
        "has_vision": info.has_vision,
        "device": info.device,
        "gpu_layers": info.gpu_layers,
        "n_ctx": info.n_ctx,
        "build": info.build,
        "compute": dict(info.compute),
        "speculative": backend.speculative_record() if hasattr(backend, "speculative_record") else {"mode": "off"},
    }
