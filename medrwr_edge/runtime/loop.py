"""The Med-RwR loop, in one place.

    prefill(system + user turn)                       -- the prompt is encoded exactly once
    for pass in 1..3:
        generate until </query>, </answer>, end of turn or the token limit
        if the pass ended in a query (and a pass is left):
            search the packs, append "\n<retrieve> (1) ..\n(2) ..\n(3) ..\n </retrieve>\n" to the SAME turn
            and keep decoding from the KV cache
        else: stop
    confidence = p(first token after <answer>)
    if confidence < threshold (CDIR): take the most similar reference image + caption, roll the KV cache back
        to where the answering pass began, splice the CDIR step, and generate once more.

Every step is appended to an `EvidenceRecord` as it happens.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Optional, Protocol, Sequence

from ..errors import InputError
from . import protocol as P
from .backend import Backend, Generation, ImageInput, SamplingSettings
from .steps import Answer, CdirRetrieve, EvidenceRecord, PassStats, Query, RetrievedDoc, Retrieve, Think


@dataclass
class ReferenceImage:
    """CDIR's top-1 hit from an image pack."""

    pack: str
    pack_version: str
    doc_id: str
    caption: str
    score: float
    image_sha256: str
    image: Optional[ImageInput] = None  # pixels, for a backend that can see them


class TextRetriever(Protocol):
    def search(self, query: str, k: int) -> list[RetrievedDoc]: ...


class ImageRetriever(Protocol):
    def nearest(self, image: ImageInput) -> Optional[ReferenceImage]: ...


@dataclass
class LoopConfig:
    max_passes: int = 3  # generation passes; so at most max_passes - 1 retrievals are served
    top_k: int = 3
    retrieval: bool = True
    cdir: bool = True
    cdir_threshold: float = 0.8  # the paper's value
    cdir_open_ended: bool = False  # open-ended answers have no letter confidence; CDIR off unless asked
    top_k_diagnoses: Optional[int] = None  # open-ended only: ask for a ranked differential of N diagnoses
    sampling: SamplingSettings = field(default_factory=lambda: SamplingSettings(max_tokens=512))
    # Room kept free in the context for the next generation pass when splicing documents.
    generation_reserve_tokens: int = 512


# Events streamed to a UI while the loop runs: ("piece", text), ("retrieve", Retrieve), ("cdir", CdirRetrieve)...
EventSink = Callable[[str, object], None]


class MedRwRLoop:
    def __init__(
        self,
        backend: Backend,
        text_retriever: Optional[TextRetriever] = None,
        image_retriever: Optional[ImageRetriever] = None,
        config: Optional[LoopConfig] = None,
    ):
        self.backend = backend
        self.text_retriever = text_retriever
        self.image_retriever = image_retriever
        self.config = config or LoopConfig()

    # ------------------------------------------------------------------ the loop
    def run(
        self,
        record: EvidenceRecord,
        question: str,
        options: Sequence[P.Option],
        images: Sequence[ImageInput] = (),
        on_event: Optional[EventSink] = None,
    ) -> EvidenceRecord:
        cfg, be = self.config, self.backend
        emit = on_event or (lambda kind, payload: None)
        t_start = time.perf_counter()
        vision = be.info.has_vision
        open_ended = not options
        if cfg.top_k_diagnoses is not None and options:
            raise InputError("--top-k-diagnoses asks for a ranked differential of an open-ended question; "
                             "it cannot be combined with options (-o)")
        if images and not vision:
            record.notes.append(
                "model has no vision input: the image was not shown to the model; it was used only to retrieve "
                "similar reference images (CDIR)" if len(images) == 1 else
                f"model has no vision input: the {len(images)} images were not shown to the model (the prompt "
                "names each study); they were used only to retrieve similar reference images (CDIR: one per study)"
            )
        if open_ended:
            record.notes.append(
                "open-ended question (no options): the answer is free text; confidence is the mean token "
                "probability of the answer span, not comparable to the letter confidence; "
                + ("CDIR compares it with the threshold (--cdir-open-ended)" if cfg.cdir_open_ended else
                   "CDIR is off for open-ended answers (the default; --cdir-open-ended turns it on)")
            )
        user = P.user_text(question, options)
        if cfg.top_k_diagnoses is not None:
            user += "\n" + P.differential_request(cfg.top_k_diagnoses)  # ours: the system prompt stays the paper's
        parts = P.chatml_prompt(
            P.system_prompt(has_image=bool(images) and vision, open_ended=open_ended),
            user,
            images,
            vision=vision,
            labels=P.study_labels(images),
        )
        record.prompt = P.prompt_text(parts)

        be.reset()
        prompt_tokens = be.prefill(parts)
        if prompt_tokens + cfg.generation_reserve_tokens > be.info.n_ctx:
            raise InputError(
                f"the question needs {prompt_tokens} tokens, too many for the model's context of {be.info.n_ctx} "
                f"tokens (with {cfg.generation_reserve_tokens} kept for the answer)"
            )

        turn = ""  # the assistant turn so far, exactly as it sits in the KV cache
        answer_pass_start = (be.n_tokens(), 0)  # (cache length, len(turn)) where the answering pass began
        answer: Optional[Answer] = None

        for pass_index in range(cfg.max_passes):
            answer_pass_start = (be.n_tokens(), len(turn))
            gen = self._generate(["</query>", "</answer>"], emit)
            turn += gen.text
            stats = PassStats(pass_index, "reasoning", len(gen.tokens), 0, gen.stop_reason, gen.seconds)
            record.passes.append(stats)

            if gen.stop_string == P.QUERY_CLOSE:
                q_start = gen.text.rfind(P.QUERY_OPEN)
                record.steps.append(Think(gen.text[:q_start].strip(), pass_index))
                raw_query = gen.text[q_start + len(P.QUERY_OPEN) : -len(P.QUERY_CLOSE)]
                query = P.extract_query(gen.text[q_start:]) or ""
                step = Query(query, raw_query.strip(), pass_index)
                record.steps.append(step)
                emit("query", step)
                if pass_index == cfg.max_passes - 1:
                    step.served, step.reason = False, f"pass limit ({cfg.max_passes} generation passes) reached"
                    record.notes.append("the model was still querying at the pass limit; no answer was given")
                    break
                retrieve = self._retrieve(query, pass_index, step)
                record.steps.append(retrieve)
                stats.inserted_tokens = retrieve.tokens_inserted
                turn += retrieve.block
                emit("retrieve", retrieve)
                continue

            # The pass ended with an answer, end of turn, or a limit: this is the answering pass.
            answer = self._read_answer(gen, pass_index, options, record.notes, whole_turn=pass_index == 0)
            think_text = gen.text.split(P.ANSWER_OPEN)[0].strip()
            if answer.answer_kind == "untagged":
                think_text = gen.text[: gen.text.rfind(answer.text)].strip() if answer.text else ""
            if think_text:
                record.steps.append(Think(think_text, pass_index))
            record.steps.append(answer)
            emit("answer", answer)
            if gen.stop_reason in ("length", "context") and answer.text is None:
                record.notes.append(f"generation stopped ({gen.stop_reason}) before an answer was given")
            break

        if answer is not None and self._cdir_due(answer, open_ended, images):
            if answer.answer_kind == "untagged":
                # CDIR's spliced step is written in the protocol's tags; a model that never uses them would be
                # asked to continue a format it does not know, so its plain answer stands.
                record.notes.append("CDIR skipped: the answer was given without the Med-RwR tags")
            else:
                turn = self._cdir(record, answer, answer_pass_start, turn, images, options, emit)

        final = next((s for s in reversed(record.steps) if isinstance(s, Answer)), None)
        cdir = record.cdir()
        if cdir is not None and cdir.answer_after is None:
            final = answer  # the regeneration gave no answer: keep the first one (noted in _cdir)
        record.assistant_text = turn
        if final is not None and final.text is not None:
            record.answer, record.letter = final.text, final.letter
            record.confidence, record.confidence_kind = final.confidence, final.confidence_kind
            record.answer_kind, record.differential = final.answer_kind, list(final.differential)
            record.status = "answered"
        else:
            record.status = "no-answer"
        st = be.stats
        record.tokens = {
            "prompt": st.prompt_tokens,
            "prompt_cached": st.cached_prompt_tokens,  # system prompt restored from the prefix cache
            "generated": st.generated_tokens,
            "inserted": st.inserted_tokens,
            "decoded": st.decoded_tokens,
            "rolled_back": st.rolled_back_tokens,
            "in_cache_at_end": be.n_tokens(),
        }
        record.timings.update(
            prefill=round(st.prefill_seconds, 4),
            generate=round(st.generate_seconds, 4),
            retrieval=round(sum(r.seconds for r in record.retrievals()), 4),
            cdir=round(cdir.seconds, 4) if cdir else 0.0,
            loop_total=round(time.perf_counter() - t_start, 4),
        )
        return record

    # ------------------------------------------------------------------ steps
    def _generate(self, stop: list[str], emit: EventSink) -> Generation:
        return self.backend.generate(self.config.sampling, stop, on_piece=lambda piece: emit("piece", piece))

    def _retrieve(self, query: str, pass_index: int, step: Query, already_served: Optional[set] = None) -> Retrieve:
        """Search and splice the block. `already_served`: queries searched earlier in this turn (chat skips them)."""
        cfg, be = self.config, self.backend
        t0 = time.perf_counter()
        docs: list[RetrievedDoc] = []
        if not cfg.retrieval:
            step.reason = "retrieval disabled (--no-retrieval): answered with <retrieve> None </retrieve>"
        elif not query:
            step.reason = "empty query"
        elif self.text_retriever is None:
            step.reason = "no knowledge pack loaded"
        elif already_served is not None and query in already_served:
            step.reason = "the same query was already served in this turn: not searched again"
        else:
            docs = self.text_retriever.search(query, cfg.top_k)[: cfg.top_k]
        step.served = bool(docs) or not step.reason
        search_seconds = time.perf_counter() - t0

        # The cache ends exactly at "</query>": a newline, then the block, as in the reference's layout.
        block, truncated = self._fit_block(docs)
        inserted = be.append_text("\n" + block)
        return Retrieve(query, docs, "\n" + block, inserted, pass_index, truncated, round(search_seconds, 4))

    def _fit_block(self, docs: list[RetrievedDoc]) -> tuple[str, bool]:
        """Shorten documents (longest first, by words) until the block leaves room for the next pass.

        Each cut keeps at most len-2 words so a document always gets shorter (a 9-word one used to stay at 9 words
        with the "…" and loop forever)."""
        be = self.backend
        budget = be.info.n_ctx - be.n_tokens() - self.config.generation_reserve_tokens
        block = P.retrieve_block([d.snippet for d in docs])
        truncated = False
        while docs and len(be.tokenize("\n" + block)) > budget:
            longest = max(docs, key=lambda d: len(d.snippet))
            words = longest.snippet.split()
            keep = min(len(words) - 2, len(words) * 2 // 3)  # strictly shorter, even with the "…" added
            if keep < 8:
                docs.remove(longest)  # nothing left worth keeping of this one
            else:
                longest.snippet = " ".join(words[:keep]) + " …"
            truncated = True
            block = P.retrieve_block([d.snippet for d in docs])
        return block, truncated

    def _read_answer(self, gen: Generation, pass_index: int, options: Sequence[P.Option], notes: list[str],
                     whole_turn: bool = False) -> Answer:
        """The answer of a pass. `whole_turn`: this pass is the whole assistant turn (no earlier query), so a
        turn without any Med-RwR tag that ended at end of turn is read as a plain answer (SFT-only models)."""
        text = P.parse_answer(gen.text)
        letters = [o.letter for o in options]
        answer_kind, span = "tagged", None
        start = gen.text.rfind(P.ANSWER_OPEN)
        if text is not None and start >= 0:
            answer_from = start + len(P.ANSWER_OPEN)
            span = (answer_from, gen.text.find(P.ANSWER_CLOSE, answer_from))
        elif text is None and whole_turn and gen.stop_reason == "eos":
            span = P.untagged_answer_span(gen.text)  # None unless the turn has no protocol tags at all
            if span is not None:
                text, answer_kind = gen.text[span[0] : span[1]], "untagged"
        letter = P.answer_letter(text, letters) if letters else None
        if letters and letter is None:
            letter = P.letter_from_option_text(text, options)
            note = (f"the answer {text!r} repeats option {letter}'s text; read as {letter} "
                    "(the paper reads only a leading letter)")
            if letter is not None and note not in notes:
                notes.append(note)
        if answer_kind == "untagged":
            if letters and letter is None:
                # A multiple-choice answer must name an option; free text without one is not read as an answer.
                notes.append("no Med-RwR tags and no option letter at the start of the output: no answer")
                return Answer(None, None, None, "none", None, pass_index, answer_kind="none")
            notes.append("no Med-RwR tags: answered without the retrieval protocol (e.g. an SFT-only model); "
                         "the answer is the model's output" + (" after </think>" if P.THINK_CLOSE in gen.text else ""))
        conf, conf_token, kind = None, None, "none"
        if span is not None:
            answer_from, answer_to = span
            answer_tokens = _tokens_in_span(gen, answer_from, answer_to)
            if letters:
                # The paper's confidence: the probability of the first answer token (the option letter).
                first = next((t for t in answer_tokens if t.piece.strip()), None)
                if first is not None:
                    conf, conf_token, kind = first.prob, first.piece, "first-answer-token"
            elif answer_tokens:
                # Open-ended: mean token probability of the answer span. NOT comparable to the letter confidence.
                probs = [t.prob for t in answer_tokens if t.piece.strip()]
                if probs:
                    conf, kind = sum(probs) / len(probs), "mean-answer-token"
        differential: list[str] = []
        n = self.config.top_k_diagnoses
        if n is not None and text is not None:
            given = P.parse_differential(text)
            differential = given[:n]
            note = (f"the model listed {len(given)} diagnoses, {n} were asked"
                    + (f"; the first {n} are kept" if len(given) > n else ""))
            if len(given) != n and note not in notes:
                notes.append(note)
        return Answer(text, letter, conf, kind, conf_token, pass_index,
                      answer_kind=answer_kind if text is not None else "none", differential=differential)

    def _cdir_due(self, answer: Answer, open_ended: bool, images: Sequence[ImageInput]) -> bool:
        cfg = self.config
        if not cfg.cdir or not images or self.image_retriever is None or answer.confidence is None:
            return False
        if open_ended and not cfg.cdir_open_ended:
            return False
        return answer.confidence < cfg.cdir_threshold

    def _cdir(
        self,
        record: EvidenceRecord,
        first: Answer,
        answer_pass_start: tuple[int, int],
        turn: str,
        images: Sequence[ImageInput],
        options: Sequence[P.Option],
        emit: EventSink,
    ) -> str:
        be, cfg = self.backend, self.config
        t0 = time.perf_counter()
        current_index = next((i for i, im in enumerate(images) if im.role == "current"), len(images) - 1)
        ref = self.image_retriever.nearest(images[current_index])
        if ref is None:
            record.notes.append("CDIR was due but the image pack returned no reference image")
            return turn
        labels = P.study_labels(images)
        # The paper's CDIR looks up the (current) image. A vision model sees the priors itself; a text-only model
        # sees no image at all, so it also gets each prior's nearest reference, labelled with the study it
        # stands for: the only way it learns anything about the studies it is asked to compare.
        consulted = [(current_index, ref)]
        if labels and not be.info.has_vision:
            consulted = [(i, ref if i == current_index else self.image_retriever.nearest(im))
                         for i, im in enumerate(images)]
            missing = [labels[i].rstrip(":") for i, r in consulted if r is None]
            if missing:
                record.notes.append(f"CDIR: no reference image found for {', '.join(missing)}")
            consulted = [(i, r) for i, r in consulted if r is not None]
        # Back to where the answering pass began: the prompt and earlier think/query/retrieve cycles stay in
        # the KV cache; only the low-confidence answer is dropped (the reference re-ran the whole prompt).
        n_keep, turn_keep = answer_pass_start
        be.rollback(n_keep)
        turn = turn[:turn_keep]
        # A vision model is shown the similar case's image with its caption, as the paper's CDIR does; a model
        # without vision input (or a reference without an image file) reads the caption only, and the record says so.
        shown = be.info.has_vision and ref.image is not None  # (a vision model consults the current study only)
        if len(consulted) > 1:
            block = P.cdir_block_per_study([(labels[i], r.caption) for i, r in consulted])
        elif shown:
            parts = P.cdir_parts(ref.caption, ref.image)
            block = P.prompt_text(parts)
        else:
            block = P.cdir_block(ref.caption)  # one study: the reference's exact layout
        if not shown:
            record.notes.append("CDIR: the reference image was given as its caption only ("
                                + ("the model has no vision input)" if not be.info.has_vision else
                                   "the image pack has no image file for it)"))
        inserted = be.append_parts(parts) if shown else be.append_text(block)
        turn += block
        step = CdirRetrieve(
            threshold=cfg.cdir_threshold,
            confidence_before=first.confidence,
            answer_before=first.text,
            reference_pack=ref.pack,
            reference_pack_version=ref.pack_version,
            reference_doc_id=ref.doc_id,
            reference_caption=ref.caption,
            reference_score=ref.score,
            reference_image_sha256=ref.image_sha256,
            block=block,
            model_saw_reference_image=shown,  # which image: reference_doc_id, reference_image_sha256
            references=[{
                "index": i,
                "role": images[i].role,  # the study's date is in record.images[index], not repeated here
                "reference_pack": r.pack,
                "reference_doc_id": r.doc_id,
                "reference_caption": r.caption,
                "reference_score": r.score,
                "reference_image_sha256": r.image_sha256,
            } for i, r in consulted],
        )
        record.steps.append(step)
        emit("cdir", step)
        pass_index = len(record.passes)
        # One regeneration. The turn is not re-opened for more queries: a query here is left unserved.
        gen = self._generate(["</query>", "</answer>"], emit)
        turn += gen.text
        record.passes.append(PassStats(pass_index, "cdir", len(gen.tokens), inserted, gen.stop_reason, gen.seconds))
        if gen.stop_string == P.QUERY_CLOSE:
            record.notes.append("CDIR regeneration asked another query; it was not served and the first answer stands")
        else:
            second = self._read_answer(gen, pass_index, options, record.notes)
            if second.text is not None:
                record.steps.append(second)
                step.answer_after, step.confidence_after = second.text, second.confidence
                step.changed = (second.letter or second.text) != (first.letter or first.text)
            else:
                record.notes.append("CDIR regeneration gave no answer; the first answer stands")
        step.seconds = round(time.perf_counter() - t0, 4)
        return turn


def _tokens_in_span(gen: Generation, start: int, end: int):
    """Tokens of `gen` whose text overlaps [start, end) of gen.text (end < 0: to the end)."""
    end = len(gen.text) if end < 0 else end
    out, pos = [], 0
    for tok in gen.tokens:
        nxt = pos + len(tok.piece)
        if nxt > start and pos < end:
            out.append(tok)
        pos = nxt
    return out
