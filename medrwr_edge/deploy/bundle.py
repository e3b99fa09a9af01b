"""Deployment bundles: software, models, encoders and packs for an offline workstation, signed with Ed25519.

(Not to be confused with the *model bundle* of `medrwr_edge/export/bundle.py` -- a GGUF + ONNX vision
directory -- which a deployment bundle can carry under models/.)

    OUT/
      manifest.json            format medrwr-edge/deployment-bundle/1: sha256 + size of every other file, the
                               tool version, creation time, target Python/platform, the signing key's fingerprint,
                               what to install (requirement, models, packs)
      manifest.sig             base64 Ed25519 signature over manifest.json's exact bytes
      verify_and_install.py    stdlib-only verifier + installer (run it first on the workstation)
      INSTALL.txt              the commands, for the person carrying the drive
      wheels/*.whl             medrwr-edge and every dependency as wheels (llama-cpp-python and hnswlib built
                               here, so the workstation needs no compiler)
      models/<name>/           installed models and encoders (installed.json included) or model bundles
      packs/<name>/            knowledge packs (manifest.json + the files it lists)

`create` runs on the connected machine; `verify` and `install_data` on the workstation (the same verification
code as verify_and_install.py, which they import).
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional

from .. import __version__, assets
from ..errors import InputError, IntegrityError, MedrwrError, ModelError
from ..paths import atomic_directory, models_dir, packs_dir, replace_directory, sha256_file
from . import verify_and_install as standalone
from .signing import Signer, signature_text

BUNDLE_FORMAT = standalone.BUNDLE_FORMAT
MANIFEST = standalone.MANIFEST
SIGNATURE = standalone.SIGNATURE
WHEELS_DIR = standalone.WHEELS_DIR
SCRIPT = "verify_and_install.py"
INSTALL_TXT = "INSTALL.txt"
# PyPI publishes these dependencies as source only: their wheels are compiled on the machine running `create`.
SOURCE_ONLY = ("llama-cpp-python", "hnswlib")

Log = Callable[[str], None]
SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")  # an item's folder name, in the bundle and the data dir


@dataclass
class Item:
    """One model, encoder or pack to carry: where its files are now and where they go in the bundle."""

    kind: str  # "llm" | "text-encoder" | "image-encoder" | "model-bundle" | "pack"
    name: str
    files: dict[str, Path]  # path inside the item's folder -> source file
    sha256: dict[str, str] = field(default_factory=dict)  # expected hashes, checked again on the copies
    extra_json: dict[str, dict] = field(default_factory=dict)  # files written by create (a synthesised record)
    info: dict = field(default_factory=dict)  # goes into the manifest

    @property
    def folder(self) -> str:
        return f"{'packs' if self.kind == 'pack' else 'models'}/{self.name}"


# ------------------------------------------------------------------------------------------------ planning


def _registry_item(name: str) -> Item:
    """An installed registry model/encoder, re-hashed against installed.json and the registry first."""
    art = assets.get_artefact(name)
    if not assets.is_installed(name):
        raise ModelError(f"model {name} is not installed; run `medrwr-edge models install {name}`")
    problems = assets.verify([name])
    if problems:
        raise IntegrityError(f"installed model {problems[0]}; reinstall it before bundling")
    folder = models_dir() / name
    record = json.loads((folder / assets.INSTALLED_JSON).read_text("utf-8"))
    files = {rel: folder / rel for rel in record["files"]}
    files[assets.INSTALLED_JSON] = folder / assets.INSTALLED_JSON
    sha = {rel: info["sha256"] for rel, info in record["files"].items()}
    return Item(art.kind, name, files, sha, info={"main_file": art.main_file, "sha256": record["sha256"],
                                                  "registry": True})


def _gguf_item(path: Path) -> Item:
    """A GGUF file: the registry artefact it is (by sha256), else a custom model named after the file."""
    assets.check_gguf(path)
    digest = sha256_file(path)
    for art in assets.REGISTRY.values():
        if art.kind == "llm" and art.sha256 == digest:
            name, main = art.name, art.main_file
            break
    else:
        name = re.sub(r"[^A-Za-z0-9._-]+", "-", path.stem).strip(".-") or "model"
        if name in assets.REGISTRY:  # a different file under a registry name would fail the registry check
            name += "-custom"
        main = f"{name}.gguf"
    record = {"name": name, "kind": "llm", "main_file": main, "sha256": digest,
              "files": {main: {"sha256": digest, "size": path.stat().st_size}},
              "sources": [f"deployment bundle (from {path.name})"]}
    return Item("llm", name, {main: path}, {main: digest}, {assets.INSTALLED_JSON: record},
                info={"main_file": main, "sha256": digest, "registry": name in assets.REGISTRY})


def _model_bundle_item(path: Path) -> Item:
    from ..export import bundle as model_bundle

    manifest = model_bundle.verify_bundle(path)  # full re-hash of every file
    files = {rel: path / rel for rel in manifest["files"]}
    files[model_bundle.MANIFEST] = path / model_bundle.MANIFEST
    sha = {rel: e["sha256"] for rel, e in manifest["files"].items()}
    return Item("model-bundle", path.name, files, sha, info={"main_file": manifest["text_model"], "registry": False})


def plan_model(arg: str) -> Item:
    """--model / --encoder: an installed registry name, a GGUF file, a model bundle or an installed model folder."""
    from ..export import bundle as model_bundle

    path = Path(arg)
    if not path.exists():
        if os.sep in arg or arg.endswith(".gguf"):
            raise InputError(f"model not found: {arg}")
        return _registry_item(arg)
    if model_bundle.is_bundle(path):
        return _model_bundle_item(path)
    folder = path if path.is_dir() else path.parent
    if folder.name in assets.REGISTRY and folder.resolve() == (models_dir() / folder.name).resolve():
        return _registry_item(folder.name)  # an installed model, with its installed.json
    return _gguf_or_fail(path) if path.is_dir() else _gguf_item(path)


def _gguf_or_fail(folder: Path) -> Item:
    ggufs = sorted(folder.glob("*.gguf"))
    if len(ggufs) != 1:
        raise InputError(f"{folder} is neither a model bundle nor a folder with exactly one .gguf file")
    return _gguf_item(ggufs[0])


def plan_pack(arg: str) -> Item:
    """A pack (name or path), fully verified; only manifest.json and the files it lists are carried."""
    from ..kb_pack.pack import MANIFEST_FILE, Pack, resolve_pack_path

    path = resolve_pack_path(arg)
    if not path.is_dir():
        raise InputError(f"pack not found: {arg}")
    with Pack.open(path) as pack:
        problems = pack.verify()  # every file's sha256 and the contents
        if problems:
            raise IntegrityError(f"pack {arg}: {problems[0]}")
        manifest = pack.manifest
        files = {rel: path / rel for rel in manifest["files"]}
        files[MANIFEST_FILE] = path / MANIFEST_FILE
        sha = {rel: e["sha256"] for rel, e in manifest["files"].items()}
        return Item("pack", pack.name, files, sha, info={
            "version": pack.version, "pack_kind": pack.kind, "doc_count": pack.doc_count,
            "encoder_sha256": pack.encoder_sha256, "manifest_sha256": manifest.get("manifest_sha256", "")})


def _encoder_sha(item: Item) -> set[str]:
    from ..kb_pack.encoders import ENCODER_JSON, read_spec

    found = set()
    for rel, src in item.files.items():
        if Path(rel).name == ENCODER_JSON:
            found.add(read_spec(src.parent).onnx_sha256)
    return found


def default_selection() -> tuple[list[str], list[str], list[str]]:
    """(models, encoders, packs) used when none are named: whatever of the defaults is installed."""
    from ..kb_pack.opening import DEFAULT_IMAGE_PACK, DEFAULT_TEXT_PACK

    models = [assets.QWEN_1_5B] if assets.is_installed(assets.QWEN_1_5B) else []
    encoders = [n for n in (assets.MINILM, assets.EFFICIENTNET) if assets.is_installed(n)]
    packs = [p for p in (DEFAULT_TEXT_PACK, DEFAULT_IMAGE_PACK) if (packs_dir() / p).is_dir()]
    return models, encoders, packs


# ------------------------------------------------------------------------------------------------ wheels


def local_platform() -> str:
    return sysconfig.get_platform().replace("-", "_").replace(".", "_")


def platform_runs_here_built_wheels(tag: str) -> bool:
    """Can wheels compiled on this machine serve `tag`? Only the same OS and CPU (glibc Linux for manylinux)."""
    here = local_platform()
    if tag == here:
        return True
    if here.startswith("linux_"):
        arch = here[len("linux_"):]
        return bool(re.fullmatch(rf"manylinux(1|2010|2014|_\d+_\d+)_{re.escape(arch)}", tag))
    return False


def _project_source() -> Path:
    root = Path(__file__).resolve().parents[2]
    if not (root / "pyproject.toml").is_file() or not (root / "medrwr_edge").is_dir():
        raise MedrwrError("bundle create needs the medrwr-edge source tree (pyproject.toml beside medrwr_edge/); "
                          "it runs where medrwr-edge was installed with `pip install -e .`")
    return root


def _run_pip(args: list[str], what: str, log: Log) -> None:
    cmd = [sys.executable, "-m", "pip", *args]
    log(f"  pip {' '.join(args[:2])} ... ({what})")
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        lines = [ln.strip() for ln in (proc.stderr + "\n" + proc.stdout).splitlines()
                 if ln.strip().startswith("ERROR") or "No matching distribution" in ln]
        raise MedrwrError(f"pip could not {what}: {lines[-1] if lines else f'exit {proc.returncode}'}")


def installed_constraints() -> list[str]:
    """`name==version` for every distribution installed here (not medrwr-edge, not local `+` builds)."""
    from importlib import metadata

    pins = set()
    for dist in metadata.distributions():
        name, version = dist.metadata.get("Name"), dist.version
        if name and version and "+" not in version and name.lower().replace("_", "-") != "medrwr-edge":
            pins.add(f"{name}=={version}")
    return sorted(pins, key=str.lower)


def build_wheels(dest: Path, find_links: Iterable[Path] = (), platform: Optional[str] = None,
                 log: Log = print, pin_installed: bool = False) -> dict:
    """medrwr-edge's wheel and every dependency's wheel into dest; returns what the manifest records.

    pin_installed: take each dependency at the version installed on this machine (the versions that were
    tested here) instead of the newest the index offers."""
    find_links = [Path(p).resolve() for p in find_links]
    if platform and not platform_runs_here_built_wheels(platform) and not find_links:
        raise InputError(
            f"cannot bundle for platform {platform} on this {local_platform()} machine: "
            f"{' and '.join(SOURCE_ONLY)} are published as source only and must be compiled for the target; run "
            f"`medrwr-edge bundle create` on a {platform} machine, or pass --find-links DIR holding their "
            f"{platform} wheels")
    dest.mkdir(parents=True, exist_ok=True)
    src = _project_source()
    links = sum((["--find-links", str(p)] for p in find_links), [])
    with tempfile.TemporaryDirectory(prefix="medrwr-bundle-build-") as tmp:
        # Build from a copy: setuptools writes build/ and *.egg-info beside the sources.
        copy = Path(tmp) / "src"
        copy.mkdir()
        for name in ("pyproject.toml", "README.md", "LICENSE"):
            if (src / name).is_file():
                shutil.copy2(src / name, copy / name)
        shutil.copytree(src / "medrwr_edge", copy / "medrwr_edge",
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info"))
        local = Path(tmp) / "wheels"
        # With setuptools and wheel installed here the build needs no download; otherwise pip isolates it.
        isolation = ["--no-build-isolation"] if _has_build_tools() else []
        _run_pip(["wheel", "--no-deps", "--disable-pip-version-check", "-q", "-w", str(local), *isolation,
                  str(copy)], "build the medrwr-edge wheel", log)
        project = sorted(local.glob("medrwr_edge-*.whl"))
        if len(project) != 1:
            raise MedrwrError("building the medrwr-edge wheel produced no wheel")
        # Resolve and fetch/build every dependency for this machine (pip's wheel cache keeps the llama.cpp build).
        pins = []
        if pin_installed:
            constraints = Path(tmp) / "installed-versions.txt"
            constraints.write_text("\n".join(installed_constraints()) + "\n", encoding="utf-8")
            pins = ["--constraint", str(constraints)]
        _run_pip(["wheel", "--disable-pip-version-check", "-q", "-w", str(local), "--find-links", str(local),
                  *links, *pins, str(project[0])], "collect the dependency wheels", log)
        built_here = sorted(p.name for p in local.glob("*.whl") if p.name.endswith(f"-{local_platform()}.whl"))
        if platform and platform != local_platform():
            # Pure downloads for the target tag; the wheels compiled here (tag linux_<arch>) are offered beside.
            py = f"{sys.version_info[0]}{sys.version_info[1]}"
            _run_pip(["download", "--disable-pip-version-check", "-q", "--only-binary", ":all:", "-d", str(dest),
                      "--platform", platform, "--platform", local_platform(), "--python-version", py,
                      "--implementation", "cp", "--find-links", str(local), *links, *pins, str(project[0])],
                     f"download the wheels for {platform}", log)
        else:
            for whl in sorted(local.glob("*.whl")):
                shutil.copy2(whl, dest / whl.name)
    names = sorted(p.name for p in dest.glob("*.whl"))
    return {"requirement": f"medrwr-edge=={__version__}", "wheels": names, "built_here": built_here,
            "pinned_to_installed_versions": pin_installed}


def _has_build_tools() -> bool:
    import importlib.util

    return all(importlib.util.find_spec(m) is not None for m in ("setuptools", "wheel"))


# ------------------------------------------------------------------------------------------------ create


def _copy_item(item: Item, root: Path) -> None:
    target = root / item.folder
    for rel, src in sorted(item.files.items()):
        out = target / rel
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, out)
    for rel, data in item.extra_json.items():
        (target / rel).write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _hash_tree(root: Path) -> dict:
    files = {}
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).as_posix()
        if path.is_file() and rel not in (MANIFEST, SIGNATURE):
            files[rel] = {"sha256": sha256_file(path), "size": path.stat().st_size}
    return files


def _created() -> str:
    epoch = os.environ.get("SOURCE_DATE_EPOCH")  # reproducible builds
    when = (_dt.datetime.fromtimestamp(int(epoch), _dt.timezone.utc) if epoch and epoch.isdigit()
            else _dt.datetime.now(_dt.timezone.utc))
    return when.isoformat(timespec="seconds")


def canonical_manifest_bytes(manifest: dict) -> bytes:
    """The exact bytes that are signed (and written): sorted keys, 2-space indent, UTF-8, final newline."""
    return (json.dumps(manifest, indent=2, sort_keys=True, ensure_ascii=False) + "\n").encode("utf-8")


def create(out: str | os.PathLike, signing_key: str | os.PathLike, *, models: Optional[list[str]] = None,
           encoders: Optional[list[str]] = None, packs: Optional[list[str]] = None, wheels: bool = True,
           find_links: Iterable[str | os.PathLike] = (), platform: Optional[str] = None, force: bool = False,
           pin_installed: bool = False, log: Log = print) -> Path:
    """Build a signed deployment bundle at `out` (built in OUT.partial and renamed: never half-written).

    models/encoders/packs: None = the installed defaults; [] = none. An `out` ending in .tar writes the bundle
    as one uncompressed, reproducible tar archive (GGUF and wheels do not compress) instead of a directory.
    """
    out = Path(out)
    archive = out.suffix == ".tar"
    if out.exists() and not force:
        raise InputError(f"{out} already exists; use --force to replace it")
    signer = Signer(signing_key)
    d_models, d_encoders, d_packs = default_selection()
    models = d_models if models is None else models
    encoders = d_encoders if encoders is None else encoders
    packs = d_packs if packs is None else packs
    if platform and not wheels:
        raise InputError("--platform only applies to wheels; drop --no-wheels or --platform")

    log("verifying what goes in ...")
    items = [plan_model(m) for m in models] + [plan_model(e) for e in encoders] + [plan_pack(p) for p in packs]
    seen = {}
    for item in items:
        if not SAFE_NAME.fullmatch(item.name):
            raise InputError(f"{item.folder}: use a name of letters, digits, '.', '_' and '-' (rename the folder)")
        if item.folder in seen:
            raise InputError(f"two items would both be {item.folder} in the bundle")
        seen[item.folder] = item
    encoder_hashes = set().union(*(_encoder_sha(i) for i in items if i.kind != "pack")) if items else set()
    for item in items:
        if item.kind == "pack" and item.info["encoder_sha256"] not in encoder_hashes:
            raise InputError(f"pack {item.name} needs the encoder with sha256 {item.info['encoder_sha256'][:12]}…, "
                             "which is not in the bundle; add it with --encoder NAME")
    if not items and not wheels:
        raise InputError("nothing to bundle: no wheels, models or packs")

    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)  # a stale partial from an interrupted run
    partial.mkdir(parents=True)
    try:
        install = None
        if wheels:
            log("collecting wheels ...")
            install = build_wheels(partial / WHEELS_DIR, find_links, platform, log, pin_installed)
        for item in items:
            log(f"copying {item.folder} ...")
            _copy_item(item, partial)
        shutil.copyfile(Path(standalone.__file__), partial / SCRIPT)
        (partial / INSTALL_TXT).write_text(_install_text(install is not None), encoding="utf-8")
        log("hashing ...")
        files = _hash_tree(partial)
        for item in items:  # the copies must be the verified sources, byte for byte
            for rel, digest in item.sha256.items():
                if files[f"{item.folder}/{rel}"]["sha256"] != digest:
                    raise IntegrityError(f"{item.folder}/{rel} changed while it was copied into the bundle")
        manifest = {
            "format": BUNDLE_FORMAT,
            "tool": {"name": "medrwr-edge", "version": __version__},
            "created": _created(),
            "signing_key": {"algorithm": "ed25519", "fingerprint": signer.fingerprint},
            "target": {"python": f"{sys.version_info[0]}.{sys.version_info[1]}",
                       "platform": platform or local_platform()},
            "install": install,
            "models": [{"name": i.name, "kind": i.kind, "path": i.folder, **i.info} for i in items if i.kind != "pack"],
            "packs": [{"name": i.name, "path": i.folder, **i.info} for i in items if i.kind == "pack"],
            "files": files,
        }
        body = canonical_manifest_bytes(manifest)
        (partial / MANIFEST).write_bytes(body)
        (partial / SIGNATURE).write_bytes(signature_text(signer.sign(body)))
        standalone.verify_bundle(partial, signer.public_pem)  # the bundle as the workstation will see it
        if archive:
            _write_tar(partial, out)
            shutil.rmtree(partial, ignore_errors=True)
        else:
            replace_directory(partial, out)  # an existing OUT was refused above unless --force
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return out


def _write_tar(folder: Path, out: Path) -> None:
    """A reproducible tar of folder (sorted names, owner 0, fixed mode and time), written beside out and renamed."""
    import tarfile

    mtime = int(_dt.datetime.fromisoformat(json.loads((folder / MANIFEST).read_text("utf-8"))["created"]).timestamp())
    tmp = out.with_name(out.name + ".partial-tar")
    try:
        with tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as tar:
            for path in sorted(folder.rglob("*")):
                info = tar.gettarinfo(str(path), arcname=path.relative_to(folder).as_posix())
                info.uid = info.gid = 0
                info.uname = info.gname = ""
                info.mtime = mtime
                info.mode = 0o755 if path.is_dir() or path.name == SCRIPT else 0o644
                if path.is_file():
                    with open(path, "rb") as f:
                        tar.addfile(info, f)
                else:
                    tar.addfile(info)
        os.replace(tmp, out)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def opened(bundle: str | os.PathLike) -> Iterator[Path]:
    """The bundle as a directory: itself, or a `.tar` bundle unpacked (safely) into a temp folder for the call."""
    bundle = Path(bundle)
    if bundle.is_dir() or bundle.suffix != ".tar":
        yield bundle
        return
    if not bundle.is_file():
        raise InputError(f"deployment bundle not found: {bundle}")
    tmp = Path(tempfile.mkdtemp(prefix="medrwr-bundle-"))
    try:
        try:
            standalone.extract_archive(bundle, tmp)
        except standalone.BundleRejected as e:
            raise IntegrityError(f"deployment bundle refused: {e}") from None
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _install_text(with_wheels: bool) -> str:
    steps = [
        "medrwr-edge deployment bundle",
        "",
        "On the offline workstation, with the signer's public key (medrwr-deploy.pub) received separately:",
        "",
        "  python3 -m venv /opt/medrwr-edge && . /opt/medrwr-edge/bin/activate",
        "  python verify_and_install.py --trusted-key /path/to/medrwr-deploy.pub",
        "",
        "It checks the Ed25519 signature and every file's sha256 BEFORE installing anything, then runs",
        "`pip install --no-index --find-links wheels medrwr-edge` (no network) and copies models and packs into",
        "the data directory ($MEDRWR_EDGE_HOME, default ~/.local/share/medrwr-edge).",
    ]
    if not with_wheels:
        steps += ["", "This bundle carries no wheels: medrwr-edge must already be installed."]
    return "\n".join(steps) + "\n"


# ------------------------------------------------------------------------------------------------ verify / install


def verify(bundle: str | os.PathLike, trusted_key_pem: bytes) -> dict:
    """The signed manifest after the full check (signature, file list, sizes, sha256); IntegrityError otherwise.
    `bundle` is a bundle directory or a .tar bundle."""
    with opened(bundle) as folder:
        return _verify_dir(folder, trusted_key_pem)


def _verify_dir(folder: Path, trusted_key_pem: bytes) -> dict:
    try:
        return standalone.verify_bundle(folder, trusted_key_pem)
    except standalone.BundleRejected as e:
        raise IntegrityError(f"deployment bundle refused: {e}") from None


def _destination(entry: dict) -> Path:
    name = entry["name"]
    if not SAFE_NAME.fullmatch(name) or entry.get("path") not in (f"models/{name}", f"packs/{name}"):
        raise IntegrityError(f"deployment bundle names an unsafe item {name!r}")
    return (packs_dir() if entry["path"].startswith("packs/") else models_dir()) / name


def _item_files(manifest: dict, entry: dict) -> dict[str, dict]:
    prefix = entry["path"].rstrip("/") + "/"
    return {rel[len(prefix):]: info for rel, info in manifest["files"].items() if rel.startswith(prefix)}


def _unchanged(dest: Path, files: dict[str, dict]) -> bool:
    if not dest.is_dir():
        return False
    present = {p.relative_to(dest).as_posix() for p in dest.rglob("*") if p.is_file()}
    if present != set(files):
        return False
    return all((dest / rel).stat().st_size == info["size"] and sha256_file(dest / rel) == info["sha256"]
               for rel, info in files.items())


def _check_installed_copy(entry: dict, folder: Path) -> None:
    """The project's own checks on a copied item, in its temp folder, before it is renamed into place."""
    if entry["path"].startswith("packs/"):
        from ..kb_pack.pack import Pack

        with Pack.open(folder) as pack:
            problems = pack.verify()
        if problems:
            raise IntegrityError(f"pack {entry['name']}: {problems[0]}")
    elif entry["kind"] == "model-bundle":
        from ..export import bundle as model_bundle

        model_bundle.verify_bundle(folder)
    else:
        record = json.loads((folder / assets.INSTALLED_JSON).read_text("utf-8"))
        art = assets.REGISTRY.get(entry["name"])
        if art is not None and art.sha256 is not None and record.get("sha256") != art.sha256:
            raise IntegrityError(f"{entry['name']}: sha256 {record.get('sha256')} is not the registry's {art.sha256}")
        for rel, info in record.get("files", {}).items():
            if sha256_file(folder / rel) != info["sha256"]:
                raise IntegrityError(f"{entry['name']}: {rel} does not match installed.json")


def install_data(bundle: str | os.PathLike, trusted_key_pem: bytes, force: bool = False,
                 log: Log = print) -> list[tuple[str, str]]:
    """Verify, then copy the bundle's models and packs (a bundle directory or .tar) into the data directory."""
    with opened(bundle) as folder:
        return _install_dir(folder, trusted_key_pem, force, log)


def _install_dir(bundle_dir: Path, trusted_key_pem: bytes, force: bool, log: Log) -> list[tuple[str, str]]:
    """Verify, then copy the bundle's models and packs into the data directory. Returns [(path, what happened)].

    Every conflict is found before anything is copied; each item lands by an atomic rename after its copy is
    re-hashed against the signed manifest and passes the model/pack checks, so a failure installs nothing more.
    """
    manifest = _verify_dir(bundle_dir, trusted_key_pem)
    entries = list(manifest.get("models", [])) + list(manifest.get("packs", []))
    plan = []
    for entry in entries:
        dest = _destination(entry)
        files = _item_files(manifest, entry)
        if _unchanged(dest, files):
            plan.append((entry, dest, files, "unchanged"))
        elif dest.exists() and not force:
            raise InputError(f"{dest} is already installed and differs from the bundle's {entry['name']}; "
                             "use --force to replace it")
        else:
            plan.append((entry, dest, files, "replaced" if dest.exists() else "installed"))
    done = []
    for entry, dest, files, action in plan:
        if action != "unchanged":
            with atomic_directory(dest, overwrite=True) as tmp:
                for rel, info in sorted(files.items()):
                    out = tmp / rel
                    out.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copyfile(bundle_dir / entry["path"] / rel, out)
                    if sha256_file(out) != info["sha256"]:
                        raise IntegrityError(f"{out.name} changed while it was copied (disk or drive error?)")
                _check_installed_copy(entry, tmp)
        log(f"{action}: {dest}")
        done.append((str(dest), action))
    return done
