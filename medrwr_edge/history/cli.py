"""`medrwr-edge history add | list | show | delete`: a patient's private history pack.

KEY is an opaque patient key chosen by the user (a pseudonym or study code is better than a record number: it is
typed on the command line). It is never stored, printed or logged; the store keeps HMAC(secret, KEY) instead.
"""

from __future__ import annotations

import json
from typing import List, Optional

import typer

history_app = typer.Typer(no_args_is_help=True, add_completion=False)

HELP = "A patient's private history (notes, reports as text, DICOM SR), searched by `ask --history KEY`."


def register(app: typer.Typer) -> None:
    app.add_typer(history_app, name="history", help=HELP)


@history_app.command("add")
def add_command(
    key: str = typer.Argument(..., help="opaque patient key (never stored; prefer a pseudonym to a record number)"),
    files: List[str] = typer.Argument(..., help="notes .txt/.md (UTF-8), a PDF report extracted to .txt, DICOM SR"),
    date: Optional[str] = typer.Option(None, "--date", help="date of these documents, YYYY-MM-DD"),
    label: Optional[str] = typer.Option(None, "--label", help="a short note to yourself (stored encrypted)"),
) -> None:
    """Add files to a patient's history (created on first use; a file already in it is left unchanged)."""
    from .store import add

    result = add(key, files, date=date, label=label)
    for position, n in result.added:
        typer.echo(f"file {position}: added {n} passage(s)")
    for position in result.unchanged:
        typer.echo(f"file {position}: already in this history (same sha256): unchanged")
    state = "created" if result.created else ("updated" if result.added else "unchanged")
    typer.echo(f"history {result.history_id} {state}: {result.passage_count} passage(s), revision {result.revision}")


@history_app.command("list")
def list_command(as_json: bool = typer.Option(False, "--json", help="print JSON")) -> None:
    """Every stored history by opaque id (patient keys are not stored, so they are never shown)."""
    from .store import list_histories

    histories = list_histories()
    if as_json:
        typer.echo(json.dumps([h.to_dict() for h in histories], indent=2))
        return
    if not histories:
        typer.echo("no patient histories stored")
        return
    for h in histories:
        if h.damaged:
            typer.echo(f"{h.history_id}  DAMAGED: does not decrypt or authenticate (history delete KEY removes it)")
            continue
        dates = ", ".join(h.dates) if h.dates else "undated"
        typer.echo(f"{h.history_id}  {h.passage_count} passage(s)  revision {h.revision}  updated {h.updated}  "
                   f"dates: {dates}")


@history_app.command("show")
def show_command(
    key: str = typer.Argument(..., help="the patient key"),
    as_json: bool = typer.Option(False, "--json", help="print JSON"),
) -> None:
    """One history's files (kind, date, label, passages, sha256 prefix); never the passages' text."""
    from .store import show

    h = show(key)
    if as_json:
        typer.echo(json.dumps(h.to_dict(), indent=2, ensure_ascii=False))
        return
    typer.echo(f"history {h.history_id}: {h.passage_count} passage(s), revision {h.revision}, "
               f"created {h.created}, updated {h.updated}")
    for e in h.entries:
        label = f"  “{e['label']}”" if e.get("label") else ""
        typer.echo(f"  {e['n']}. {e['kind']}  {e.get('date') or 'undated'}  {e['passages']} passage(s)  "
                   f"sha256 {e['sha256']}…  added {e['added']}{label}")


@history_app.command("delete")
def delete_command(
    key: str = typer.Argument(..., help="the patient key"),
    yes: bool = typer.Option(False, "--yes", "-y", help="do not ask for confirmation"),
) -> None:
    """Remove a patient's history completely, and every logged answer that searched it."""
    from ..errors import MedrwrError
    from .store import delete, resolve

    resolve(key)  # an unknown key fails here, before any prompt
    if not yes and not typer.confirm("Delete this patient's history and every logged answer that used it?"):
        raise MedrwrError("not deleted")
    result = delete(key)
    typer.echo(f"deleted history {result.history_id} ({result.passages} passage(s)) and "
               f"{result.log_entries_removed} logged answer(s) that used it")
