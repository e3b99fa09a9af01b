"""`medrwr-edge chat`: a multi-round consultation in the terminal, one line per message (stdin may be a pipe)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import List, Optional

import typer

from . import cli_options as O

CHAT_HELP = """A multi-round consultation: each message is distilled (by the model) into one search query, the packs
are searched, and the model answers with the passages; earlier turns stay in the KV cache.

Reads one message per line from stdin (interactive or piped) until end of input or /quit.
Commands: /sources, /image FILE, /save FILE, /help, /quit. Start a message with // to send a literal '/'."""

COMMANDS_HELP = """/sources      the passages retrieved for the last reply (pack, document id, score)
/image FILE   attach an image (PNG/JPEG/DICOM) to the next message
/save FILE    write the session record (JSON, schema medrwr-edge/chat/1)
/help         this list
/quit         end the session (so does end of input)"""


def register(app: typer.Typer) -> None:
    app.command("chat", help=CHAT_HELP)(chat_command)


def chat_command(
    model: Optional[str] = O.MODEL,
    pack: Optional[List[str]] = O.PACKS,
    image: Optional[Path] = typer.Option(None, "--image", help="an image for the first message"),
    save: Optional[Path] = typer.Option(None, "--save", help="write the session record here after every turn"),
    as_json: bool = typer.Option(False, "--json", help="no streaming; print the session record as JSON at the end"),
    no_retrieval: bool = typer.Option(False, "--no-retrieval", help="no distil step, no search"),
    mode: Optional[str] = O.MODE,
    seed: Optional[int] = O.SEED,
    temperature: Optional[float] = O.TEMPERATURE,
    max_tokens: Optional[int] = O.MAX_TOKENS,
    n_ctx: Optional[int] = O.CTX,
    gpu_layers: Optional[int] = O.GPU_LAYERS,
    threads: Optional[int] = O.THREADS,
    no_log: bool = typer.Option(False, "--no-log", help="do not append the turns to the local answer log"),
    history: Optional[str] = typer.Option(None, "--history", help="patient key: also search that patient's history"),
) -> None:
    from .api import AskSettings, PreparedImages
    from .chat import Chat

    settings = AskSettings.from_options(
        temperature=temperature, seed=seed, max_tokens=max_tokens, retrieval=O.switched(no_retrieval, "retrieval"),
        search_mode=mode, n_ctx=n_ctx, gpu_layers=gpu_layers, n_threads=threads,
    )  # CDIR: off for chat (Chat turns it off)
    pending = PreparedImages.load(image) if image is not None else None  # a bad image fails before the model loads
    view = ChatView(quiet=as_json)
    with Chat(model=model, packs=pack or None, settings=settings, history=history) as chat:
        ChatLoop(chat, view, save, no_log, pending).run(sys.stdin)
        if as_json:
            sys.stdout.write(json.dumps(chat.record(), indent=2, ensure_ascii=False) + "\n")


class ChatLoop:
    """Reads messages and slash commands; a bad message or command costs one error line, never the session."""

    def __init__(self, chat, view: "ChatView", save: Optional[Path], no_log: bool, pending=None):
        self.chat, self.view, self.save_path, self.no_log, self.pending = chat, view, save, no_log, pending

    def run(self, stream) -> None:
        interactive = stream.isatty()
        while True:
            if interactive:
                self.view.console.print("[bold]you>[/bold] ", end="")
            line = stream.readline()
            if not line:  # end of input
                break
            line = line.strip()
            if not line:
                continue
            if line.startswith("/") and not line.startswith("//"):
                if not self.command(line):
                    break
                continue
            self.message(line[1:] if line.startswith("//") else line)

    def command(self, line: str) -> bool:
        """Run a slash command; False ends the session."""
        from ..errors import MedrwrError

        name, _, arg = line.partition(" ")
        arg = arg.strip()
        try:
            if name in ("/quit", "/exit"):
                return False
            if name == "/help":
                self.view.info(COMMANDS_HELP)
            elif name == "/sources":
                self.view.sources(self.chat.sources(), bool(self.chat.turns))
            elif name == "/image":
                if not arg:
                    raise _usage("/image FILE")
                from .api import PreparedImages

                self.pending = PreparedImages.load(arg)
                sha = self.pending.records[0]["sha256"][:12]
                self.view.info(f"image attached to the next message (sha256 {sha}…)")
            elif name == "/save":
                if not arg:
                    raise _usage("/save FILE")
                path = self.chat.save(arg)
                self.view.info(f"saved {len(self.chat.turns)} turn(s) to {path}")
            else:
                self.view.error(f"unknown command {name} (try /help)")
        except MedrwrError as e:
            self.view.error(O.worded(e))
        return True

    def message(self, text: str) -> None:
        from ..errors import MedrwrError

        try:
            turn = self.chat.send(text, self.pending, on_event=self.view.on_event)
        except MedrwrError as e:
            self.view.error(O.worded(e))  # the session goes on; the failed turn left no trace in the cache
            return
        self.pending = None
        from ..evidence.log import finish_answer

        notes = []
        logged = finish_answer(turn.evidence, "chat", self.no_log)
        if logged.log_id is not None:
            notes.append(f"logged as #{logged.log_id}")
        if logged.error is not None:  # a reply must not be lost because the log is unwritable
            notes.append(f"warning: not logged: {O.worded(logged.error)}")
        if self.save_path is not None:
            try:
                self.chat.save(self.save_path)
            except MedrwrError as e:
                notes.append(f"warning: not saved: {e}")
        self.view.turn(turn, notes)


def _usage(usage: str):
    from ..errors import InputError

    return InputError(f"usage: {usage}")


class ChatView:
    """Streams replies like `ask` (retrieved passages boxed); quiet: only errors, on stderr."""

    def __init__(self, quiet: bool = False):
        from rich.console import Console

        from .cli import StreamView

        self.quiet = quiet
        self.console = Console(highlight=False, soft_wrap=True, stderr=quiet)
        self.err = Console(highlight=False, soft_wrap=True, stderr=True)
        self.stream = StreamView()
        self.stream.console = self.console

    def on_event(self, event) -> None:
        """Chat's sink (runtime/events.py): the distilled query, context notes, and the turn streamed like `ask`."""
        if self.quiet:
            return
        kind = event.type
        if kind == "distil":
            how = {"model": "distilled query", "user-message": "query (the message itself)"}.get(event.source)
            if how:
                self.console.print(f"{how}: {event.query}", style="cyan", markup=False)
        elif kind == "context":
            self.console.print(f"note: {event.reason}", style="yellow", markup=False)
        elif kind in ("piece", "retrieve", "cdir"):
            self.stream.on_event(event)

    def turn(self, turn, notes: list[str]) -> None:
        if self.quiet:
            return
        from rich.text import Text

        c = self.console
        c.print()
        line = Text("Reply: ", style="bold")
        line.append(turn.reply or "(empty)", style="bold green")
        if turn.confidence is not None:
            line.append(f"   mean token probability {turn.confidence:.2f}")
        c.print(line)
        t = turn.evidence.tokens
        c.print(Text(
            f"turn {turn.index} · {len(turn.sources())} passage(s) · {t['decoded'] - t['distil']} new tokens decoded "
            f"({turn.context['reused_tokens']} reused from the cache; {t['distil']} for the query, rolled back) · "
            f"{turn.evidence.timings.get('total', 0):.1f} s", style="dim"))
        for note in turn.notes[:-1] + notes:  # the last note is for replay, not for the reader
            c.print(Text(f"note: {note}", style="yellow"))

    def sources(self, docs, any_turn: bool) -> None:
        from rich.text import Text

        if not docs:
            self.info("no passages yet" if not any_turn else "the last reply retrieved no passages")
            return
        for i, d in enumerate(docs, 1):
            line = Text(f"({i}) ", style="bold")
            line.append(f"{d.pack} · {d.doc_id} · score {d.score:.3f}  ", style="cyan")
            line.append(d.snippet if len(d.snippet) < 200 else d.snippet[:200] + " …")
            self.console.print(line)

    def info(self, text: str) -> None:
        self.console.print(text, markup=False, highlight=False)

    def error(self, text: str) -> None:
        self.err.print(f"error: {text}", markup=False, highlight=False, style="red")
