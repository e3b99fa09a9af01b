"""`medrwr-edge` command line: a thin layer over the importable API.

Sub-command groups live beside the code they drive (`<package>/cli.py` with `register(app)`) and are mounted here.
Every `MedrwrError` becomes one line on stderr and a non-zero exit; tracebacks are for bugs only.
"""

from __future__ import annotations

import sys

import typer

from .errors import MedrwrError
from .offline import apply_offline_defaults

apply_offline_defaults()  # before any sub-command imports a library that could reach a network

app = typer.Typer(
    name="medrwr-edge",
    help="Offline Med-RwR: medical reasoning with retrieval on a workstation CPU or GPU.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


# Every command group lives beside the code it drives, in `<package>/cli.py`, and mounts itself with `register(app)`.
COMMAND_PACKAGES = ("kb_pack", "install", "runtime", "evidence", "export", "eval", "history", "serve", "training",
                    "deploy")


def _mount() -> None:
    import importlib

    # Each command's module imports only typer at load time; torch, FastAPI etc. load when a command runs.
    for package in COMMAND_PACKAGES:
        importlib.import_module(f".{package}.cli", __package__).register(app)


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
    if not error.names:
        return str(error)
    from .runtime.cli_options import worded

    return worded(error)


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
