"""`medrwr-edge ask`: stream the reasoning, show retrieved evidence distinctly, or print the record as JSON."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import List, Optional

import typer

from . import cli_options as O


def register(app: typer.Typer) -> None:
    from . import chat_cli

    app.command("ask", help=ASK_HELP, no_args_is_help=True)(ask_command)
    chat_cli.register(app)


ASK_HELP = """Answer a question about a medical image with reasoning-with-retrieval.

IMAGE is a PNG/JPEG or DICOM file ('-' for a text-only question); add earlier studies with --prior FILE (IMAGE is
then the current study). Give options with -o "A. ..." -o "B. ..." (without options the question is answered
open-ended; --top-k-diagnoses N asks for a ranked differential)."""


def ask_command(
    image: str = typer.Argument(..., help="PNG/JPEG/DICOM image, or '-' for none"),
    question: str = typer.Argument(..., help="the question"),
    options: Optional[List[str]] = typer.Option(None, "--options", "-o", help='an option, e.g. "A. Pneumonia" (repeat)'),
    pack: Optional[List[str]] = O.PACKS,
    image_pack: Optional[str] = typer.Option(None, "--image-pack", help="CDIR reference image pack"),
    model: Optional[str] = O.MODEL,
    no_retrieval: bool = O.NO_RETRIEVAL,
    no_cdir: bool = O.NO_CDIR,
    threshold: Optional[float] = O.THRESHOLD,
    mode: Optional[str] = O.MODE,
    seed: Optional[int] = O.SEED,
    temperature: Optional[float] = O.TEMPERATURE,
    max_tokens: Optional[int] = O.MAX_TOKENS,
    n_ctx: Optional[int] = O.CTX,
    gpu_layers: Optional[int] = O.GPU_LAYERS,
    threads: Optional[int] = O.THREADS,
    speculative: Optional[str] = O.SPECULATIVE,
    frame: Optional[int] = O.FRAME,
    as_json: bool = typer.Option(False, "--json", help="print the evidence record as JSON"),
    report: Optional[Path] = typer.Option(None, "--report", help="also write a self-contained HTML report here"),
    no_log: bool = typer.Option(False, "--no-log", help="do not append this answer to the local answer log"),
    prior: Optional[List[Path]] = typer.Option(
        None, "--prior", help="an earlier study of the same patient (repeat; oldest first, or any order when every "
        "file has a DICOM StudyDate: then sorted by it); IMAGE is the current study"),
    top_k_diagnoses: Optional[int] = O.TOP_K_DIAGNOSES,
    cdir_open_ended: bool = O.CDIR_OPEN_ENDED,
    allow_mixed_modalities: bool = O.ALLOW_MIXED_MODALITIES,
    history: Optional[str] = typer.Option(None, "--history", help="patient key: also search that patient's history"),
    protocol: Optional[str] = O.PROTOCOL,
    top_k_docs: Optional[int] = O.TOP_K_DOCS,
    engine: Optional[str] = O.ENGINE,
    engine_timeout: Optional[float] = O.ENGINE_TIMEOUT,
) -> None:
    from ..errors import InputError
    from .api import AskSettings, ask

    settings = AskSettings.from_options(
        temperature=temperature, seed=seed, max_tokens=max_tokens, retrieval=O.switched(no_retrieval, "retrieval"),
        cdir=O.switched(no_cdir, "cdir"), cdir_threshold=threshold, search_mode=mode, n_ctx=n_ctx,
        gpu_layers=gpu_layers, n_threads=threads, top_k_diagnoses=top_k_diagnoses,
        cdir_open_ended=O.switched(cdir_open_ended, "cdir_open_ended"),
        allow_mixed_modalities=O.switched(allow_mixed_modalities, "allow_mixed_modalities"), frame=frame,
        protocol=protocol, engine=engine, engine_timeout=engine_timeout, speculative=speculative,
        top_k_docs=top_k_docs,
    )
    if prior and image == "-":
        raise InputError("--prior needs a current image: give IMAGE (not '-')")
    image_paths = [] if image == "-" else [*(prior or []), Path(image)]  # the last is the current study
    view = None if as_json else StreamView()
    record = ask(
        image_paths or None,
        question,
        options,
        packs=pack or None,
        image_pack=image_pack,
        model=model,
        settings=settings,
        on_event=view.on_event if view else None,
        history=history,
    )
    from ..evidence.log import finish_answer

    notes = []
    logged = finish_answer(record, "ask", no_log)
    if logged.log_id is not None:
        notes.append(f"logged as #{logged.log_id} (medrwr-edge logs; medrwr-edge replay {logged.log_id})")
    if logged.error is not None:  # an answer must not be lost because the log is unwritable
        notes.append(f"warning: not logged: {O.worded(logged.error)}")
    if report is not None:
        from ..evidence.report import write_report

        write_report(record, report, images=image_paths)  # each is matched to its record entry by sha256
        notes.append(f"report written to {report}")
    if as_json:
        sys.stdout.write(json.dumps(record.to_dict(), indent=2, ensure_ascii=False) + "\n")
        for note in notes:
            print(note, file=sys.stderr)
    else:
        view.summary(record)
        for note in notes:
            view.console.print(note, style="dim")


class StreamView:
    """Reasoning streams as plain text; retrieved evidence and CDIR appear as boxed panels between it."""

    def __init__(self):
        from rich.console import Console

        self.console = Console(highlight=False, soft_wrap=True)

    def on_event(self, event) -> None:
        """The loop's sink (runtime/events.py): pieces as text, searches and CDIR as panels."""
        from rich.panel import Panel
        from rich.text import Text

        kind = event.type
        if kind == "piece":
            text = event.text
            self.console.print(Text(text, style="dim" if text.strip().startswith("<") else ""), end="")
        elif kind == "query" and event.issued_by == "runtime":
            self.console.print()
            self.console.print(Text(f"(runtime query from the question: {event.reason})", style="yellow"))
        elif kind == "retrieve":
            body = Text()
            if not event.docs:
                body.append("no documents (retrieve None)", style="italic")
            for i, d in enumerate(event.docs, 1):
                body.append(f"({i}) ", style="bold")
                body.append(f"{d.pack} · {d.doc_id} · score {d.score:.3f}\n", style="cyan")
                snippet = d.snippet if len(d.snippet) < 400 else d.snippet[:400] + " …"
                body.append(snippet + ("\n" if i < len(event.docs) else ""))
            title = (f"retrieved for “{event.query}”" if event.query else "empty query: nothing searched") + (
                " (shortened to fit)" if event.truncated else "")
            self.console.print()
            self.console.print(Panel(body, title=title, border_style="cyan", title_align="left"))
        elif kind == "cdir":
            body = Text()
            body.append(f"confidence {event.confidence_before:.2f} < threshold {event.threshold:.2f}: ")
            body.append("looked up the most similar reference image\n")
            body.append(f"{event.reference_pack} · {event.reference_doc_id} · score {event.reference_score:.3f}\n",
                        style="magenta")
            body.append(event.reference_caption)
            if len(event.references) > 1:  # a text-only model given priors: one reference per study
                for ref in event.references:
                    body.append(f"\nstudy {ref['index'] + 1} ({ref['role']}): {ref['reference_doc_id']} · "
                                f"{ref['reference_caption']}", style="dim")
            self.console.print()
            self.console.print(Panel(body, title="CDIR", border_style="magenta", title_align="left"))

    def summary(self, record) -> None:
        from rich.text import Text

        c = self.console
        c.print()
        if record.status != "answered":
            c.print(Text("No answer.", style="bold red"))
        else:
            differential = getattr(record, "differential", None) or []
            line = Text("Differential (most likely first):" if differential else "Answer: ", style="bold")
            if not differential:  # a ranked differential is listed below, one diagnosis a line
                line.append(record.letter or record.answer, style="bold green")
            if record.letter and record.answer and record.answer.strip() != record.letter:
                line.append(f"  ({record.answer})")
            if record.confidence is not None:
                label = ("confidence" if record.confidence_kind in ("first-answer-token", "answer-letter")
                         else "mean token probability")
                line.append(f"   {label} {record.confidence:.2f}")
                if record.confidence_kind == "mean-answer-token":
                    line.append(" (not comparable to a letter confidence)", style="dim")
            c.print(line)
            for rank, diagnosis in enumerate(differential, 1):
                c.print(Text(f"  {rank}. {diagnosis}", style="green"))
        cdir = record.cdir()
        if cdir is not None:
            if cdir.answer_after is None:
                c.print(f"CDIR: the regeneration gave no answer; the first answer ({cdir.answer_before}) stands")
            elif cdir.kept_first:
                c.print(f"CDIR: the regeneration ({cdir.answer_after}, {cdir.confidence_after:.2f}) was less confident "
                        f"than the first answer ({cdir.answer_before}), which stands")
            else:
                changed = "changed the answer" if cdir.changed else "did not change the answer"
                c.print(f"CDIR: {changed} ({cdir.answer_before} → {cdir.answer_after})")
        t = record.tokens
        c.print(
            Text(
                f"{len(record.retrievals())} retrieval(s) · {t.get('generated', 0)} tokens generated · "
                f"{t.get('prompt', 0) + t.get('prompt_cached', 0)} prompt tokens (encoded once"
                + (f"; {t['prompt_cached']} restored from the prefix cache" if t.get("prompt_cached") else "")
                + f") · {record.timings.get('total', 0):.1f} s · "
                f"{record.model.get('name')} on {record.model.get('device')}",
                style="dim",
            )
        )
        for note in record.notes:
            c.print(Text(f"note: {note}", style="yellow"))
