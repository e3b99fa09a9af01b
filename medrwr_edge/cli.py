"""`medrwr-edge` command line: a thin layer over the importable API.

Sub-command groups live beside the code they drive (kb_pack/cli.py, assets.py, ...) and are mounted here.
Every `MedrwrError` becomes one line on stderr and a non-zero exit; tracebacks are for bugs only.
"""

from __future__ import annotations

import sys

import typer

from .errors import MedrwrError

app = typer.Typer(
    name="medrwr-edge",
    help="Offline Med-RwR: medical reasoning with retrieval on a workstation CPU or GPU.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _mount() -> None:
    from .kb_pack.cli import pack_app
    from .assets import models_app

    app.add_typer(pack_app, name="pack", help="Build, verify, inspect, search and diff knowledge packs.")
    app.add_typer(models_app, name="models", help="Install and verify the default models and encoders.")
    from .runtime import cli as runtime_cli  # registers `ask`

    runtime_cli.register(app)
    from . import setup_cmd
    from .evidence import cli as evidence_cli
    from .eval import cli as eval_cli
    from .export import cli as export_cli

    setup_cmd.register(app)
    evidence_cli.register(app)
    export_cli.register(app)
    eval_cli.register(app)


_mount()


def main(argv: list[str] | None = None) -> None:
    try:
        app(args=argv, standalone_mode=False)
    except MedrwrError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        sys.exit(130)
    except SystemExit:
        raise
    except Exception as e:  # click usage errors and the like
        import click

        if isinstance(e, click.exceptions.Abort):
            print("error: aborted", file=sys.stderr)
            sys.exit(130)
        if isinstance(e, click.ClickException):
            print(f"error: {e.format_message()}", file=sys.stderr)
            sys.exit(e.exit_code)
        raise


if __name__ == "__main__":
    main()
