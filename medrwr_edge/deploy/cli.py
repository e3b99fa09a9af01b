"""`medrwr-edge bundle keygen|create|verify|install` (deployment bundles) and `medrwr-edge doctor`."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import List, Optional

import typer

from ..runtime import cli_options as O

bundle_app = typer.Typer(no_args_is_help=True, help="Signed deployment bundles for offline workstations.")


def register(app: typer.Typer) -> None:
    app.add_typer(bundle_app, name="bundle",
                  help="Create, verify and install signed deployment bundles (software + models + packs).")
    app.command("doctor", help=DOCTOR_HELP)(doctor_command)


def _err(line: str) -> None:
    print(line, file=sys.stderr)


@bundle_app.command("keygen", help="Write a new Ed25519 signing key pair (private 0600 + public PEM).")
def keygen_command(
    key_dir: Path = typer.Argument(..., help="folder for medrwr-deploy.key (0600) and medrwr-deploy.pub"),
    force: bool = typer.Option(False, "--force", help="replace an existing key pair"),
) -> None:
    from .signing import keygen
    from .verify_and_install import fingerprint, load_public_key

    private, public = keygen(key_dir, force=force)
    typer.echo(f"private key: {private} (mode 600; keep it on this machine)")
    typer.echo(f"public key:  {public} (give it to the workstation, separately from the bundles)")
    typer.echo(f"fingerprint: {fingerprint(load_public_key(public.read_bytes()))}")


@bundle_app.command("create", help="Build a signed deployment bundle: wheels, models, encoders, packs, manifest.")
def create_command(
    out: Path = typer.Argument(..., help="the bundle directory to create (a name ending in .tar: one archive)"),
    key: Path = typer.Option(..., "--key", help="signing key (medrwr-deploy.key, or the keygen folder)"),
    model: Optional[List[str]] = typer.Option(None, "--model", "-m",
                                              help="installed model name, GGUF file or model bundle (repeat); "
                                                   "default: the installed default LLM"),
    encoder: Optional[List[str]] = typer.Option(None, "--encoder",
                                                help="installed encoder name (repeat); default: installed encoders"),
    pack: Optional[List[str]] = typer.Option(None, "--pack", "-p",
                                             help="pack name or path (repeat); default: the installed default packs"),
    no_models: bool = typer.Option(False, "--no-models", help="carry no models or encoders"),
    no_packs: bool = typer.Option(False, "--no-packs", help="carry no packs"),
    no_wheels: bool = typer.Option(False, "--no-wheels", help="data only: the workstation already has medrwr-edge"),
    find_links: Optional[List[Path]] = typer.Option(None, "--find-links",
                                                    help="extra folder of wheels (e.g. a GPU llama-cpp-python build)"),
    target_platform: Optional[str] = typer.Option(None, "--platform",
                                                  help="wheel platform tag of the workstation, e.g. "
                                                       "manylinux2014_x86_64 (default: this machine's)"),
    pin_installed: bool = typer.Option(False, "--pin-installed",
                                       help="bundle the dependency versions installed here (the tested ones), "
                                            "not the newest"),
    force: bool = typer.Option(False, "--force", help="replace an existing OUT"),
) -> None:
    from .bundle import create

    path = create(out, key, models=[] if no_models else (model or None),
                  encoders=[] if no_models else (encoder or None), packs=[] if no_packs else (pack or None),
                  wheels=not no_wheels, find_links=find_links or [], platform=target_platform, force=force,
                  pin_installed=pin_installed, log=_err)
    if path.is_dir():
        manifest = json.loads((path / "manifest.json").read_text("utf-8"))
    else:
        import tarfile

        with tarfile.open(path, "r:") as tar, tar.extractfile("manifest.json") as f:
            manifest = json.loads(f.read().decode("utf-8"))
    size = sum(e["size"] for e in manifest["files"].values())
    typer.echo(f"deployment bundle written to {path}: {len(manifest['files'])} files, {size / 1e6:,.1f} MB, "
               f"signed by {manifest['signing_key']['fingerprint']}")
    typer.echo(f"verify_and_install.py sha256 {manifest['files']['verify_and_install.py']['sha256']} "
               "(compare it on the workstation before running it)")


@bundle_app.command("verify", help="Check the signature and every file of a deployment bundle against a trusted key.")
def verify_command(
    bundle_dir: Path = typer.Argument(..., help="the deployment bundle (directory or .tar)"),
    trusted_key: Path = typer.Option(..., "--trusted-key", help="the signer's public key (PEM)"),
) -> None:
    from .bundle import verify
    from .signing import read_public_key

    manifest = verify(bundle_dir, read_public_key(trusted_key))
    typer.echo(f"ok: signature and all {len(manifest['files'])} files verify "
               f"(signed by {manifest['signing_key']['fingerprint']}, created {manifest['created']}, "
               f"medrwr-edge {manifest['tool']['version']})")


@bundle_app.command("install")
def install_command(
    source: Path = typer.Option(..., "--from", help="the deployment bundle (directory or .tar)"),
    trusted_key: Path = typer.Option(..., "--trusted-key", help="the signer's public key (PEM)"),
    force: bool = typer.Option(False, "--force", help="replace installed models/packs that differ"),
) -> None:
    """The data part: verify, then copy models and packs into the data directory (the wheels are installed by
    verify_and_install.py, which then calls this)."""
    from ..paths import data_dir
    from .bundle import install_data
    from .signing import read_public_key

    done = install_data(source, read_public_key(trusted_key), force=force, log=typer.echo)
    typer.echo(f"{len(done)} item(s) in {data_dir()}")


DOCTOR_HELP = """Check this workstation: CPU features, cores, RAM/VRAM, GPU support, installed models and packs
(and whether they verify), measured prompt/decode speed and image-encode time, and the predicted seconds per
typical Med-RwR answer (2 retrievals + CDIR)."""


def doctor_command(
    as_json: bool = typer.Option(False, "--json", help="print the report as JSON (schema medrwr-edge/doctor/1)"),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="GGUF or installed model to measure"),
    full: bool = typer.Option(False, "--full", help="re-hash every model and pack file (slower)"),
    no_measure: bool = typer.Option(False, "--no-measure", help="inventory only, no speed measurements"),
    check_prediction: bool = typer.Option(False, "--check-prediction",
                                          help="run one real ask and compare its time with the prediction"),
    pack: Optional[List[str]] = typer.Option(None, "--pack", "-p", help="text pack for search timing and the check"),
    threads: Optional[int] = O.THREADS,
    max_tokens: Optional[int] = O.MAX_TOKENS,
    quick: bool = typer.Option(False, "--quick", help="shorter speed measurement (32 prompt / 8 decoded tokens)"),
) -> None:
    from .doctor import format_report, run_doctor

    report = run_doctor(model=model, full=full, measure=not no_measure, check=check_prediction,
                        packs=pack or None, n_threads=threads, max_tokens=max_tokens, quick=quick)
    if as_json:
        sys.stdout.write(json.dumps(report, indent=2) + "\n")
    else:
        typer.echo(format_report(report))
