"""`medrwr-edge report`, `medrwr-edge logs`, `medrwr-edge replay`."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import List, Optional

import typer

from ..errors import InputError

EXIT_DIVERGED = 3  # replay ran and the output differs (errors exit 1/2)


def register(app: typer.Typer) -> None:
    app.command("report", help=REPORT_HELP, no_args_is_help=True)(report_command)
    app.command("logs", help=LOGS_HELP)(logs_command)
    app.command("replay", help=REPLAY_HELP, no_args_is_help=True)(replay_command)


REPORT_HELP = """Write a self-contained HTML evidence report for an answer.

RECORD is an evidence record (`ask --json` output; '-' reads stdin) or a log id (see `medrwr-edge logs`).
Give the input image(s) again with --image to show thumbnails (each is checked against the record's sha256)."""


def report_command(
    record: str = typer.Argument(..., help="evidence record JSON file, '-' for stdin, or a log id"),
    out: Path = typer.Option(..., "--output", "-o", help="the HTML file to write"),
    image: Optional[List[Path]] = typer.Option(None, "--image", "-i", help="an input image of the record (repeat)"),
    image_pack: Optional[Path] = typer.Option(None, "--image-pack", help="where the CDIR image pack is now"),
) -> None:
    from .replay import load_source
    from .report import write_report

    data, _ = load_source(record)
    path = write_report(data, out, images=image or [], image_pack=image_pack)
    typer.echo(f"wrote {path}")


LOGS_HELP = """Show answers from the local answer log (newest first).

Every ask/chat/eval answer is logged to answers.sqlite in the data directory unless MEDRWR_EDGE_NO_LOG=1 or
--no-log is given. The log keeps questions, answers and reasoning, and input images only by sha256."""


def logs_command(
    n: int = typer.Option(20, "-n", help="how many entries (0: all)"),
    query: Optional[str] = typer.Option(None, "--query", "-q", help="only entries whose question, answer, "
                                        "model queries or image sha256 contain this text"),
    log_id: Optional[int] = typer.Option(None, "--id", help="print the full evidence record of this entry (JSON)"),
    as_json: bool = typer.Option(False, "--json", help="print the entries as JSON"),
) -> None:
    from .log import SCHEMA_VERSION, AnswerLog, log_path, read_logged_record

    if n < 0:
        raise InputError("-n must be 0 (all) or more")
    if log_id is not None:
        sys.stdout.write(json.dumps(read_logged_record(log_id), indent=2, ensure_ascii=False) + "\n")
        return
    path = log_path()
    entries = []
    version = SCHEMA_VERSION
    if path.exists():  # reading never creates a log
        with AnswerLog(path) as log:
            entries = log.entries(n or None, query)
            version = log.schema_version()
    if as_json:
        doc = {"schema": "medrwr-edge/answer-log/1", "log": str(path), "log_schema_version": version,
               "entries": [en.to_dict() for en in entries]}
        sys.stdout.write(json.dumps(doc, indent=2, ensure_ascii=False) + "\n")
        return
    if not entries:
        typer.echo("no matching answers in the log" if path.exists() else f"no answers logged yet ({path})")
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(show_lines=False, pad_edge=False, expand=True)
    for col in ("id", "when (UTC)", "cmd", "answer", "conf"):
        table.add_column(col, no_wrap=True)
    table.add_column("question", ratio=3, overflow="fold")
    table.add_column("queries", ratio=2, overflow="fold")
    table.add_column("model", ratio=1, no_wrap=True, overflow="ellipsis")
    for en in entries:
        answer = en.letter or en.answer or "—"
        answer = answer if len(answer) <= 16 else answer[:15] + "…"
        conf = "" if en.confidence is None else f"{en.confidence:.2f}"
        if en.cdir_changed:
            conf += " (CDIR)"
        table.add_row(str(en.id), en.logged.replace("T", " ")[:16], en.command, answer, conf, en.question,
                      "; ".join(en.queries), en.model_name.removesuffix(".gguf"))
    Console(highlight=False, soft_wrap=False).print(table)


REPLAY_HELP = """Re-run a recorded answer and check it is reproduced token for token.

RECORD is an evidence record JSON file ('-' for stdin) or a log id. The model file, every pack (all files,
manifest, encoder lock) and the input images (--image, same order) are verified against the record's sha256
first; any mismatch is refused. Exit status: 0 identical, 3 diverged, 1/2 an error."""


def replay_command(
    record: str = typer.Argument(..., help="evidence record JSON file, '-' for stdin, or a log id"),
    image: Optional[List[Path]] = typer.Option(None, "--image", "-i", help="the record's input image (repeat, in order)"),
    model: Optional[Path] = typer.Option(None, "--model", "-m", help="where the model file is now (default: the "
                                         "recorded path)"),
    pack: Optional[List[str]] = typer.Option(None, "--pack", "-p", help="NAME=PATH: where a recorded pack is now"),
    as_json: bool = typer.Option(False, "--json", help="print the replay result as JSON"),
    history: Optional[str] = typer.Option(None, "--history", help="the patient key, when the answer searched a "
                                          "patient history (medrwr-edge history)"),
    engine: Optional[str] = typer.Option(None, "--engine", help="inference server URL to replay on (default: the "
                                         "recorded one, if the record was made through a server)"),
) -> None:
    from .replay import load_source, replay

    overrides = {}
    for item in pack or []:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise InputError(f"--pack {item}: give NAME=PATH (the pack's name as recorded, and its location)")
        overrides[name] = path
    data, label = load_source(record)
    result = replay(data, image or [], model=model, packs=overrides, source=label, history=history,
                    engine=engine)
    if as_json:
        sys.stdout.write(json.dumps(result.to_dict(), indent=2, ensure_ascii=False) + "\n")
    else:
        _print_result(result)
    if not result.identical:
        sys.exit(EXIT_DIVERGED)  # SystemExit passes through cli.main(); typer.Exit would be swallowed there


def _print_result(result) -> None:
    for line in result.verified:
        typer.echo(f"verified: {line}")
    passes = ", ".join(str(t) for t in result.replayed_pass_tokens)
    if result.identical and not result.same_setup:  # same tokens, but not the same computation: no identity claim
        typer.echo(f"SAME TOKENS ON ANOTHER SETUP: {result.source} gave the same tokens "
                   f"({len(result.replayed_pass_tokens)} pass(es): {passes}), but it was recorded on another device "
                   "or build (see the notes): not a bit-identical reproduction")
    elif result.identical:
        typer.echo(f"IDENTICAL: {result.source} was reproduced token for token "
                   f"({len(result.replayed_pass_tokens)} pass(es): {passes} tokens)")
    else:
        d = result.divergence
        typer.echo(f"DIVERGED: {result.source} at {d.where}, character {d.offset}"
                   + (f" ({d.detail})" if d.detail else ""))
        typer.echo(f"  recorded: {d.recorded!r}")
        typer.echo(f"  replayed: {d.replayed!r}")
        typer.echo(f"  tokens per pass: recorded {result.recorded_pass_tokens}, replayed {result.replayed_pass_tokens}")
    for diff in result.differences:
        typer.echo(f"differs: {diff}")
    for note in result.notes:
        typer.echo(f"note: {note}")
