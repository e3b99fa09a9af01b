"""`medrwr-edge` command line: a thin layer over the importable API.

Sub-command groups live beside the code they drive (kb_pack/cli.py, assets.py, ...) and are mounted here.
Every `MedrwrError` becomes one line on stderr and a non-zero exit; tracebacks are for bugs only.
"""

from __future__ import annotations

import sys

import typer

from .errors import MedrwrError, SettingError
from .offline import apply_offline_defaults

apply_offline_defaults()  # before any sub-command imports a library that could reach a network

app = typer.Typer(
    name="medrwr-edge",
    help="Offline Med-RwR: medical reasoning with retrieval on a workstation CPU or GPU.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _mount() -> None:
    # Each command's module imports only typer at load time; torch, FastAPI etc. load when a command runs.
    from . import setup_cmd
    from .assets import models_app
    from .deploy import cli as deploy_cli
    from .eval import cli as eval_cli
    from .evidence import cli as evidence_cli
    from .export import cli as export_cli
    from .history import cli as history_cli
    from .kb_pack.cli import pack_app
    from .runtime import chat_cli
    from .runtime import cli as runtime_cli
    from .serve import cli as serve_cli
    from .training import cli as training_cli

    app.add_typer(pack_app, name="pack", help="Build, verify, inspect, search and diff knowledge packs.")
    app.add_typer(models_app, name="models", help="Install and verify the default models and encoders.")
    for module in (runtime_cli, setup_cmd, evidence_cli, export_cli, eval_cli, history_cli, chat_cli, serve_cli,
                   training_cli, deploy_cli):
        module.register(app)


_mount()


def main(argv: list[str] | None = None) -> None:
    try:
        # Without standalone mode, typer RETURNS the code of a `typer.Exit(code)` and turns Ctrl-C into a returned
        # 130 instead of raising; dropping that value made `pack verify` of a damaged pack, and Ctrl-C, exit 0.
        code = app(args=argv, standalone_mode=False)
        if code == 130:
            print("error: interrupted", file=sys.stderr)
        if isinstance(code, int) and not isinstance(code, bool) and code:
            sys.exit(code)
    except MedrwrError as e:
        print(f"error: {_worded(e)}", file=sys.stderr)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        sys.exit(130)
    except SystemExit:
        raise
    except OSError as e:  # the machine, not a bug: disk full, permission denied, a file gone; never a traceback
        where = f" ({e.filename})" if getattr(e, "filename", None) else ""
        print(f"error: {' '.join(str(e.strerror or e).split())}{where}", file=sys.stderr)
        sys.exit(1)
    except Exception as e:  # click usage errors and the like
        aborts, usage_errors = _click_exception_types()
        if isinstance(e, aborts):
            print("error: aborted", file=sys.stderr)
            sys.exit(130)
        if isinstance(e, usage_errors):
            if type(e).__name__ == "NoArgsIsHelpError":  # `medrwr-edge ask` alone: the help text, as click does
                e.show()
            else:
                print(f"error: {' '.join(e.format_message().split())}", file=sys.stderr)
            sys.exit(e.exit_code)
        raise


def _worded(error: MedrwrError) -> str:
    """The error in the command line's words: a setting is named by its flag (--threshold, not cdir_threshold)."""
    if isinstance(error, SettingError):
        from .runtime.cli_options import flag

        return error.worded(flag)
    return str(error)


def _click_exception_types() -> tuple[tuple, tuple]:
    """(Abort, ClickException) classes of click and of the copy of click that newer typer releases vendor: their
    usage errors do not derive from click's, so a mistyped option printed a traceback."""
    import importlib

    aborts, usage_errors = [], []
    for module_name, abort_name, error_name in (("click.exceptions", "Abort", "ClickException"),
                                                ("typer", "Abort", None),
                                                ("typer._click.exceptions", None, "ClickException")):
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            continue
        if abort_name and hasattr(module, abort_name):
            aborts.append(getattr(module, abort_name))
        if error_name and hasattr(module, error_name):
            usage_errors.append(getattr(module, error_name))
    return tuple(aborts), tuple(usage_errors)


if __name__ == "__main__":
    main()
