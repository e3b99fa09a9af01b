"""The Med-RwR loop, in one place.

    prefill(system + user turn)                       -- the prompt is encoded exactly once
    run_passes():                                     -- the pass loop every front end shares (ask, chat, GRPO)
        native (the paper, byte-exact): for pass in 1..3:
            generate until </query>, </answer>, end of turn or the token limit
            if the pass ended in a query (and a pass is left):
                search the packs, append "\n<retrieve> (1) ..\n(2) ..\n(3) ..\n </retrieve>\n" to the SAME turn
                and keep decoding from the KV cache
            else: stop
        guided (models never trained on the protocol): the runtime writes the tags, the model writes inside them
            <think> model </think>\n<query> model's query, or the runtime's from the question </query>\n
            <retrieve> ... </retrieve>\n<think> model </think>\n<answer> the option letter the model rates highest </answer>
    confidence = p(first token after <answer>)      -- the option letter, as the model tokenises it (" C")
    if confidence < threshold (CDIR): take the most similar reference image + caption, roll the KV cache back
        to where the answering pass began, splice the CDIR step, and generate once more.

`run_passes` returns a `PassTrace` (steps, passes, the turn text, the answer, notes); `run` wraps it, with the
prompt, CDIR and token counts, into an `EvidenceRecord`. Events to a UI are typed objects (runtime/events.py): a
`Piece` of streamed text, and the steps themselves.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import Optional, Protocol, Sequence

import numpy as np

from ..errors import InputError
from ..evidence.record import (Answer, CdirRetrieve, EvidenceRecord, PassStats, Query, RetrievedDoc, Retrieve,
                               Think)
from . import protocol as P
from .backend import Backend, Generation, GeneratedToken, ImageInput, SamplingSettings
from .events import EventSink, Piece, ignore
from .excerpt import WORD_RE, focus_excerpt, focus_terms, terms
from .settings import TOP_K_DOCS, AskSettings as _D  # the one owner of defaults


@dataclass
class ReferenceImage:
    """CDIR's top-1 hit from an image pack."""

    pack: str
    pack_version: str
    doc_id: str
    caption: str
    score: float
    image_sha256: str
    image: Optional[ImageInput] = None  # the pack's copy of the image (None: the pack keeps none): shown to a vision
    # backend in the CDIR step, as in the paper; a text-only model gets the caption alone


class TextRetriever(Protocol):
    def search(self, query: str, k: int) -> list[RetrievedDoc]: ...


class ImageRetriever(Protocol):
    def nearest(self, image: ImageInput) -> Optional[ReferenceImage]: ...


PROTOCOLS = ("native", "guided", "rag")


@dataclass
class LoopConfig:
    """How the loop runs; built by `AskSettings.loop_config()`, whose defaults these are (runtime/settings.py)."""

    max_passes: int = _D.max_passes  # generation passes; so at most max_passes - 1 retrievals are served
    top_k_docs: int = TOP_K_DOCS["native"]  # documents per search
    retrieval: bool = _D.retrieval
    cdir: bool = _D.cdir
    cdir_threshold: float = _D.cdir_threshold
    cdir_open_ended: bool = _D.cdir_open_ended  # open-ended answers have no letter confidence; CDIR off unless asked
    top_k_diagnoses: Optional[int] = _D.top_k_diagnoses  # open-ended only: ask for a ranked differential of N
    sampling: SamplingSettings = field(default_factory=lambda: SamplingSettings(max_tokens=_D.max_tokens))
    # Room kept free in the context for the next generation pass when splicing documents.
    generation_reserve_tokens: int = 512
    # "native": the paper's protocol; "guided": scaffold tags, a query always served, the letter read at the answer
    # position; "rag": the baseline (one search on the question, entries in the user turn, one guided answer pass)
    protocol: str = "native"
    guided_think_tokens: int = _D.guided_think_tokens  # guided: tokens the model may think before query and answer
    guided_read_tokens: int = _D.guided_read_tokens  # guided: the model's note on the entries the loop spliced
    guided_query_tokens: int = 40  # guided: tokens of the model's query
    guided_exemplar: bool = _D.guided_exemplar  # guided, multiple choice: one worked example in the system turn
    guided_doc_words: int = _D.guided_doc_words  # guided/rag: each spliced entry cut to about N words (0: whole)
    guided_excerpt: str = _D.guided_excerpt  # guided/rag: which N words, "focus" or "head" (AskSettings)


_PASS_STOPS = [P.QUERY_CLOSE, P.ANSWER_CLOSE]
# Guided thinking ends at </think>; any other tag, or the start of the system prompt's format lines (which untrained
# models copy), ends it too and is cut from the turn: the runtime writes the tags itself.
_ECHO_STARTS = ("If you need more information", "If you can directly reach a conclusion")
_THINK_STOPS = [P.THINK_CLOSE, P.QUERY_OPEN, P.QUERY_CLOSE, P.ANSWER_OPEN, P.ANSWER_CLOSE, P.RETRIEVE_OPEN,
                P.THINK_OPEN, *_ECHO_STARTS]
_QUERY_STOPS = [P.QUERY_CLOSE, "\n", P.THINK_OPEN, P.THINK_CLOSE, P.QUERY_OPEN, P.RETRIEVE_OPEN, P.ANSWER_OPEN,
                P.ANSWER_CLOSE]
MAX_RUNTIME_QUERY_WORDS = 64


@dataclass
class PassTrace:
    """What the pass loop produced; `ask`, `chat` and GRPO rollouts each wrap it into their record."""

    steps: list = field(default_factory=list)
    passes: list[PassStats] = field(default_factory=list)
    turn: str = ""  # the assistant turn as it sits in the KV cache
    answer: Optional[Answer] = None
    notes: list[str] = field(default_factory=list)
    answer_start: tuple[int, int] = (0, 0)  # (cache length, len(turn)) where the answering pass began


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
        if self.config.protocol not in PROTOCOLS:
            raise ValueError(f"protocol must be one of {', '.join(PROTOCOLS)} (got {self.config.protocol!r})")

    # ------------------------------------------------------------------ one question
    def run(
        self,
        record: EvidenceRecord,
        question: str,
        options: Sequence[P.Option],
        images: Sequence[ImageInput] = (),
        on_event: Optional[EventSink] = None,
    ) -> EvidenceRecord:
        cfg, be = self.config, self.backend
        emit = on_event or ignore
        t_start = time.perf_counter()
        vision = be.info.has_vision
        open_ended = not options
        record.protocol = cfg.protocol
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
        rag_steps: list = []
        if cfg.protocol == "rag":
            user, rag_steps = self._rag_user_turn(question, options, user, emit)
        system = P.system_prompt(has_image=bool(images) and vision, open_ended=open_ended)
        if cfg.protocol != "native" and cfg.guided_exemplar and options:
            system += P.GUIDED_EXEMPLAR
        parts = P.chatml_prompt(
            system,
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

        trace = self.run_passes(options, emit, question=question, query_served=cfg.protocol == "rag")
        record.steps.extend(rag_steps + trace.steps)
        record.passes.extend(trace.passes)
        record.notes.extend(trace.notes)
        if cfg.protocol == "native" and be.info.declares_protocol:
            record.notes.extend(_protocol_lapses(trace))
        answer, turn = trace.answer, trace.turn
        if answer is not None and self._cdir_due(answer, open_ended, images):
            if answer.answer_kind == "untagged":
                # CDIR's spliced step is written in the protocol's tags; a model that never uses them would be
                # asked to continue a format it does not know, so its plain answer stands.
                record.notes.append("CDIR skipped: the answer was given without the Med-RwR tags")
            else:
                turn = self._cdir(record, answer, trace.answer_start, turn, images, options, emit)

        final = next((s for s in reversed(record.steps) if isinstance(s, Answer)), None)
        cdir = record.cdir()
        if cdir is not None and (cdir.answer_after is None or cdir.kept_first):
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

    # ------------------------------------------------------------------ the pass loop
    def run_passes(
        self,
        options: Sequence[P.Option],
        on_event: Optional[EventSink] = None,
        *,
        question: str = "",
        query_served: bool = False,
        served: Optional[set] = None,
        untagged_answers: bool = True,
    ) -> PassTrace:
        """Generate the rest of the assistant turn the cache holds (prompt, plus whatever the caller spliced).

        question: what a runtime-issued query searches for (guided). query_served: the caller already served this
        turn's search (chat's distilled query, rag's entries): guided goes straight to the answer. served: queries
        searched earlier in this turn, not searched again (chat). untagged_answers: a first pass without any tag
        that ends the turn is read as a plain answer (SFT-only models)."""
        emit = on_event or ignore
        trace = PassTrace()
        if self.config.protocol == "native":
            self._native_passes(trace, options, emit, served, untagged_answers)
        else:
            pass_index = 0
            if not query_served and self.config.retrieval and self.text_retriever is not None \
                    and self.config.max_passes > 1:
                self._guided_query_pass(trace, question, options, emit)
                pass_index = 1
            self._guided_answer_pass(trace, pass_index, options, emit)
        return trace

    def _native_passes(self, t: PassTrace, options, emit: EventSink, served: Optional[set],
                       untagged_answers: bool) -> None:
        cfg, be = self.config, self.backend
        for pass_index in range(cfg.max_passes):
            t.answer_start = (be.n_tokens(), len(t.turn))
            gen = be.generate(cfg.sampling, _PASS_STOPS, on_piece=lambda piece: emit(Piece(piece)))
            t.turn += gen.text
            stats = PassStats(pass_index, "reasoning", len(gen.tokens), 0, gen.stop_reason, round(gen.seconds, 4))
            t.passes.append(stats)

            if gen.stop_string == P.QUERY_CLOSE:
                q_start = max(gen.text.rfind(P.QUERY_OPEN), 0)
                if gen.text[:q_start].strip():
                    t.steps.append(Think(gen.text[:q_start].strip(), pass_index))
                raw = gen.text[q_start:-len(P.QUERY_CLOSE)].replace(P.QUERY_OPEN, "", 1).strip()
                step = Query(P.extract_query(P.QUERY_OPEN + raw + P.QUERY_CLOSE) or "", raw, pass_index)
                t.steps.append(step)
                emit(step)
                if pass_index == cfg.max_passes - 1:
                    step.served, step.reason = False, f"pass limit ({cfg.max_passes} generation passes) reached"
                    t.notes.append("the model was still querying at the pass limit; no answer was given")
                    break
                retrieve = self.search_and_splice(step.text, pass_index, step, served)
                t.steps.append(retrieve)
                stats.inserted_tokens = retrieve.tokens_inserted
                t.turn += retrieve.block
                emit(retrieve)
                if served is not None and step.text:
                    served.add(step.text)
                continue

            # The pass ended with an answer, end of turn, or a limit: this is the answering pass.
            answer = self._read_answer(gen, pass_index, options, t.notes, t.answer_start[0],
                                       whole_turn=untagged_answers and pass_index == 0)
            think_text = gen.text.split(P.ANSWER_OPEN)[0].strip()
            if answer.answer_kind == "untagged":
                think_text = gen.text[: gen.text.rfind(answer.text)].strip() if answer.text else ""
            if think_text:
                t.steps.append(Think(think_text, pass_index))
            t.steps.append(answer)
            t.answer = answer
            emit(answer)
            if gen.stop_reason in ("length", "context") and answer.text is None:
                t.notes.append(f"generation stopped ({gen.stop_reason}) before an answer was given")
            break

    # ------------------------------------------------------------------ guided decoding
    def _guided_query_pass(self, t: PassTrace, question: str, options, emit: EventSink) -> None:
        """<think> the model </think>\n<query> the model's query, or the runtime's </query>, then the retrieve block."""
        be, cfg = self.backend, self.config
        stats = PassStats(0, "reasoning", 0, 0, "stop", 0.0)  # "stop": the runtime closed it
        t.passes.append(stats)
        self._guided_think(t, stats, 0, emit, cfg.guided_think_tokens)
        self._write(t, stats, P.QUERY_OPEN, emit)
        n_query = be.n_tokens()
        # Not streamed: what the turn holds (and the UI shows) is the query as served, written below.
        gen = self._generate_into(t, stats, _QUERY_STOPS, cfg.guided_query_tokens, ignore,
                                  keep_in_turn=False)
        raw = (gen.text[: -len(P.QUERY_CLOSE)] if gen.stop_string == P.QUERY_CLOSE else gen.text).strip()
        model_query = P.extract_query(P.QUERY_OPEN + _without_partial_close(raw) + P.QUERY_CLOSE) or ""
        t0 = time.perf_counter()
        reason = _unusable_query(model_query, question + "\n" + "\n".join(o.text for o in options))
        docs: list[RetrievedDoc] = []
        if not reason:
            docs = self.text_retriever.search(model_query, cfg.top_k_docs)[: cfg.top_k_docs]
            if not docs:
                reason = "the model's query found nothing in the packs"
        query, issued_by = model_query, "model"
        if reason:
            query, issued_by = runtime_query(question), "runtime"
            docs = self.text_retriever.search(query, cfg.top_k_docs)[: cfg.top_k_docs] if query else []
        search_seconds = time.perf_counter() - t0
        self._excerpt(docs, query, question, options)
        # The cache holds exactly "<query> {query} </query>": the model's words as searched, or the runtime's.
        be.rollback(n_query)
        self._write(t, stats, f" {query} {P.QUERY_CLOSE}", emit)
        step = Query(query, raw, 0, served=bool(docs), reason=reason + ("; searched the question instead"
                                                                          if reason else ""), issued_by=issued_by)
        if not docs:
            step.reason = (step.reason + "; " if step.reason else "") + "nothing found"
        t.steps.append(step)
        emit(step)
        retrieve = self._splice(query, docs, 0, search_seconds)
        t.steps.append(retrieve)
        stats.inserted_tokens += retrieve.tokens_inserted
        t.turn += retrieve.block
        emit(retrieve)

    def _guided_answer_pass(self, t: PassTrace, pass_index: int, options, emit: EventSink,
                            kind: str = "reasoning") -> Answer:
        """<think> the model </think>\n<answer> the letter the model rates highest (or its free text) </answer>"""
        be, cfg = self.backend, self.config
        t.answer_start = (be.n_tokens(), len(t.turn))
        stats = PassStats(pass_index, kind, 0, 0, "stop", 0.0)  # until a generation says otherwise
        t.passes.append(stats)
        # After the entries this loop spliced, the think is the model's reading of them (as in the worked example)
        self._guided_think(t, stats, pass_index, emit,
                           cfg.guided_read_tokens if pass_index > 0 else cfg.guided_think_tokens)
        self._write(t, stats, P.ANSWER_OPEN, emit)
        answer = self._guided_letter(t, stats, pass_index, options, emit) if options else None
        if answer is None:  # open-ended, or a backend that cannot read the letters: the model writes the answer
            n_answer = be.n_tokens()
            gen = self._generate_into(t, stats, [P.ANSWER_CLOSE], cfg.sampling.max_tokens, emit)
            text = P.ANSWER_OPEN + gen.text
            read = Generation(text, [GeneratedToken(-1, P.ANSWER_OPEN, 1.0)] + gen.tokens, gen.stop_reason,
                              gen.stop_string)
            # `read` counts "<answer>" as one token: it ends at cache length n_answer, so the pass "began" one earlier
            answer = self._read_answer(read, pass_index, options, t.notes, n_answer - 1)
            if answer.text is None and gen.stop_reason in ("length", "context"):
                t.notes.append(f"generation stopped ({gen.stop_reason}) before the answer was closed")
        t.steps.append(answer)
        t.answer = answer
        emit(answer)
        return answer

    def _guided_letter(self, t: PassTrace, stats: PassStats, pass_index: int, options, emit) -> Optional[Answer]:
        """The option letter read where the model would write it (right after "<answer>", as " C": one token),
        from the model's own, unconstrained distribution; its probability is the confidence, as in native."""
        from .letters import letter_probs

        letters = [o.letter for o in options]
        probs = letter_probs(self.backend, letters)
        if probs is None:
            t.notes.append("this backend cannot read the option letters' probabilities; the model wrote the answer")
            return None
        s = self.config.sampling
        if s.temperature == 0:
            letter = max(letters, key=lambda x: probs[x])  # ties: the first option
        else:  # the model's distribution restricted to the letters, at the sampling temperature
            w = np.array([probs[x] for x in letters], dtype=np.float64) ** (1.0 / s.temperature)
            w = w / w.sum() if w.sum() > 0 else np.full(len(letters), 1.0 / len(letters))
            letter = letters[int(np.random.default_rng([s.seed, pass_index]).choice(len(letters), p=w))]
        self._write(t, stats, f" {letter} {P.ANSWER_CLOSE}", emit)
        mass = sum(probs.values())
        if mass < 0.5:
            t.notes.append(f"the option letters held {mass:.0%} of the model's probability at the answer position; "
                           f"the letter it rated highest was read")
        return Answer(letter, letter, probs[letter], "first-answer-token", f" {letter}", pass_index)

    def _guided_think(self, t: PassTrace, stats: PassStats, pass_index: int, emit: EventSink, budget: int) -> None:
        """<think> what the model writes (at most `budget` tokens), cut at </think>, any other tag or an echoed
        format line </think>\n"""
        if budget <= 0:
            return
        self._write(t, stats, P.THINK_OPEN, emit)
        gen = self._generate_into(t, stats, _THINK_STOPS, budget, emit)
        body = gen.text
        if gen.stop_string == P.THINK_CLOSE:
            body = body[: -len(P.THINK_CLOSE)]
            self._write(t, stats, "\n", emit)
        else:
            if gen.stop_string in _ECHO_STARTS:
                t.notes.append("guided: the model began to copy the system prompt's format line; it was cut")
            self._write(t, stats, " " + P.THINK_CLOSE + "\n", emit)
        body = body.strip()
        if body:
            t.steps.append(Think(body, pass_index))

    def _generate_into(self, t: PassTrace, stats: PassStats, stop: list[str], max_tokens: int, emit: EventSink,
                       keep_in_turn: bool = True) -> Generation:
        """Generate with `stop`; a stop string other than the first ("</think>", "</query>", "</answer>") is cut
        from the cache and from the returned text (its `stop_string` still says which one ended the pass). The kept
        text joins the turn unless keep_in_turn is False (the caller rewrites it)."""
        be = self.backend
        n0 = be.n_tokens()
        settings = dataclasses.replace(self.config.sampling, max_tokens=max_tokens)
        gen = be.generate(settings, stop, on_piece=lambda piece: emit(Piece(piece)))
        stats.generated_tokens += len(gen.tokens)
        stats.seconds = round(stats.seconds + gen.seconds, 4)
        stats.stop_reason = gen.stop_reason
        if gen.stop_string is not None and gen.stop_string != stop[0]:
            gen = dataclasses.replace(gen, text=_cut_generation(be, n0, gen, len(gen.text) - len(gen.stop_string)))
        if keep_in_turn:
            t.turn += gen.text
        return gen

    def _write(self, t: PassTrace, stats: PassStats, text: str, emit: EventSink) -> None:
        """Text the runtime writes into the turn (guided scaffold tags)."""
        stats.inserted_tokens += self.backend.append_text(text)
        t.turn += text
        emit(Piece(text))

    def _excerpt(self, docs: list[RetrievedDoc], query: str, question: str, options) -> None:
        """Guided/rag: what of each entry the model reads (its snippet is what is spliced, so the record shows it)."""
        cfg = self.config
        focus = focus_terms(query + "\n" + question, "\n".join(o.text for o in options)) \
            if cfg.guided_excerpt == "focus" else {}
        for d in docs:
            d.snippet = focus_excerpt(d.snippet, focus, cfg.guided_doc_words)

    def _rag_user_turn(self, question: str, options, user: str, emit: EventSink) -> tuple[str, list]:
        """The baseline a user would script: one search on the question, the top entries before it in the user turn."""
        query = runtime_query(question)
        step = Query(query, "", 0, issued_by="runtime", reason="rag baseline: one search on the question")
        t0 = time.perf_counter()
        docs = self.text_retriever.search(query, self.config.top_k_docs)[: self.config.top_k_docs] \
            if (self.text_retriever is not None and self.config.retrieval and query) else []
        step.served = bool(docs)
        self._excerpt(docs, query, question, options)
        block = P.rag_entries(d.snippet for d in docs)
        retrieve = Retrieve(query, docs, block, 0, 0, False, round(time.perf_counter() - t0, 4))
        emit(step)
        emit(retrieve)
        return block + user, [step, retrieve]

    # ------------------------------------------------------------------ steps
    def search_and_splice(self, query: str, pass_index: int, step: Query,
                          already_served: Optional[set] = None) -> Retrieve:
        """Search the packs for `query` and splice the retrieve block into the turn (the KV cache).
        `already_served`: queries searched earlier in this turn (chat): not searched again."""
        cfg = self.config
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
            docs = self.text_retriever.search(query, cfg.top_k_docs)[: cfg.top_k_docs]
        step.served = bool(docs) or not step.reason
        return self._splice(query, docs, pass_index, time.perf_counter() - t0)

    def _splice(self, query: str, docs: list[RetrievedDoc], pass_index: int, search_seconds: float) -> Retrieve:
        # The cache ends exactly at "</query>": a newline, then the block, as in the reference's layout.
        block, truncated = self._fit_block(docs)
        inserted = self.backend.append_text("\n" + block)
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
                     n_start: int, whole_turn: bool = False) -> Answer:
        """The answer of a pass that began at cache length `n_start`. `whole_turn`: this pass is the whole assistant
        turn (no earlier query), so a turn without any Med-RwR tag that ended at end of turn is read as a plain
        answer (SFT-only models)."""
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
        from_option_text = False
        if letters and letter is None:
            letter = P.letter_from_option_text(text, options)
            note = (f"the answer {text!r} repeats option {letter}'s text; read as {letter} "
                    "(the paper reads only a leading letter)")
            from_option_text = letter is not None
            if from_option_text and note not in notes:
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
            if letters and from_option_text:
                # The model wrote the option's text: its first token's probability is not the letter's, so read
                # the letter's own probability at the answer position (one teacher-forced read, rolled back).
                conf, conf_token, kind = self._letter_probability_at(gen, answer_from, n_start, letter, letters)
            elif letters:
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

    def _letter_probability_at(self, gen: Generation, char_pos: int, n_start: int, letter: str,
                               letters: Sequence[str]) -> tuple[Optional[float], Optional[str], str]:
        """p(" {letter}") where the answer begins (gen.text[char_pos:], decoded from cache length n_start): the
        cache is cut there, the letter tokens' probabilities read, and the answer decoded back. "not-comparable"
        when the answer does not begin on a token boundary or the backend cannot read next-token probabilities."""
        from .letters import letter_probs, letter_token_ids

        be = self.backend
        if not hasattr(be, "next_token_probs") or letter_token_ids(be, letters) is None:
            return None, None, "not-comparable"
        pos, count = 0, 0
        for tok in gen.tokens:
            if pos >= char_pos:
                break
            pos, count = pos + len(tok.piece), count + 1
        if pos != char_pos or n_start + count > be.n_tokens():
            return None, None, "not-comparable"
        be.rollback(n_start + count)
        try:
            probs = letter_probs(be, letters)
        finally:
            be.append_text(gen.text[char_pos:])
        if probs is None:
            return None, None, "not-comparable"
        return probs[letter], f" {letter}", "answer-letter"

    def _cdir_due(self, answer: Answer, open_ended: bool, images: Sequence[ImageInput]) -> bool:
        cfg = self.config
        if not cfg.cdir or not images or self.image_retriever is None or answer.confidence is None:
            return False
        if answer.confidence_kind == "not-comparable":
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
        emit(step)
        pass_index = len(record.passes)
        # One regeneration. The turn is not re-opened for more queries: a query here is left unserved.
        second: Optional[Answer] = None
        if cfg.protocol == "native":
            n_start = be.n_tokens()
            gen = be.generate(cfg.sampling, _PASS_STOPS, on_piece=lambda piece: emit(Piece(piece)))
            turn += gen.text
            record.passes.append(PassStats(pass_index, "cdir", len(gen.tokens), inserted, gen.stop_reason,
                                           round(gen.seconds, 4)))
            if gen.stop_string == P.QUERY_CLOSE:
                record.notes.append("CDIR regeneration asked another query; it was not served and the first answer "
                                    "stands")
            else:
                second = self._read_answer(gen, pass_index, options, record.notes, n_start)
        else:  # guided: think, then the letter, as in the first answering pass
            regen = PassTrace()
            second = self._guided_answer_pass(regen, pass_index, options, emit, kind="cdir")
            regen.passes[0].inserted_tokens += inserted
            turn += regen.turn
            record.passes.extend(regen.passes)
            record.notes.extend(regen.notes)
            record.steps.extend(s for s in regen.steps if not isinstance(s, Answer))
        if second is not None:
            if second.text is not None:
                record.steps.append(second)
                step.answer_after, step.confidence_after = second.text, second.confidence
                step.changed = (second.letter or second.text) != (first.letter or first.text)
                if cfg.protocol != "native" and step.changed and first.confidence is not None \
                        and (second.confidence or 0.0) < first.confidence:
                    # Ours (guided only): CDIR is there to raise a low confidence; a regeneration the model is
                    # less sure of than its first answer does not replace it.
                    step.kept_first = True
                    record.notes.append(f"guided CDIR: the regenerated answer ({second.text}, {second.confidence:.2f}) "
                                        f"was less confident than the first ({first.text}, "
                                        f"{first.confidence:.2f}); the first stands")
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


def _protocol_lapses(trace: PassTrace) -> list[str]:
    """A model that declares the Med-RwR protocol (and so runs native) but did not follow it in this turn."""
    lapses = []
    if any(isinstance(s, Query) and not s.text for s in trace.steps):
        lapses.append("an empty or punctuation-only query (e.g. the format line's '...')")
    if trace.answer is None or trace.answer.answer_kind != "tagged":
        lapses.append("no <answer> </answer> tags")
    if not lapses:
        return []
    return ["the model declares the Med-RwR protocol (run native) but did not follow it here: " + "; ".join(lapses)
            + " (--protocol guided guides it)"]


def _cut_generation(be, n_start: int, gen: Generation, keep_chars: int) -> str:
    """Cut a pass decoded from cache length n_start back to its first keep_chars characters (a stop string the
    runtime does not keep): whole tokens up to there stay, the rest of the kept text is decoded anew."""
    keep = gen.text[:keep_chars]
    pos, count = 0, 0
    for tok in gen.tokens:
        if pos + len(tok.piece) > keep_chars:
            break
        pos, count = pos + len(tok.piece), count + 1
    while count and not gen.tokens[count - 1].piece:  # never end on half a UTF-8 character
        count -= 1
    be.rollback(n_start + count)
    if keep[pos:]:
        be.append_text(keep[pos:])
    return keep


def _without_partial_close(raw: str) -> str:
    """The model's query without a close tag it began but did not finish ("… note </query" then a newline, or the
    token limit): those characters are not words to search for."""
    for k in range(len(P.QUERY_CLOSE) - 1, 1, -1):
        if raw.endswith(P.QUERY_CLOSE[:k]):
            return raw[:-k].rstrip()
    return raw


def runtime_query(question: str) -> str:
    """The query guided decoding issues when the model's is unusable: the question itself, on one line."""
    words = P._one_line(question.replace('"', "")).split()
    return " ".join(words[:MAX_RUNTIME_QUERY_WORDS])


_FORMAT_WORDS = frozenset(w.lower() for w in WORD_RE.findall(P.SYSTEM_PROMPT_TEXT + P.SYSTEM_PROMPT_IMAGE))


def _unusable_query(query: str, question_and_options: str) -> str:
    """Why a model's query cannot be served as it is ("" when it can): empty, a copy of the system prompt's
    instructions, or about nothing the question mentions."""
    if not query:
        return "the model wrote no query (empty or punctuation only)"
    words = [w.lower() for w in WORD_RE.findall(query)]
    asked = terms(question_and_options)
    if words and all(w in _FORMAT_WORDS for w in words) and not (terms(query) & asked):
        return "the model's query copies the system prompt's instructions"
    if not terms(query) & asked:
        return "the model's query shares no term with the question"
    return ""
