"""Where medrwr-edge keeps its models, packs and logs, and how it writes files safely.

The data directory is `$MEDRWR_EDGE_HOME`, else `$XDG_DATA_HOME/medrwr-edge`, else
`~/.local/share/medrwr-edge`. Layout:

    models/<name>/...      LLM GGUFs and ONNX encoders, each with the sha256 recorded at install
    packs/<name>/          knowledge packs (text and image)
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator


def data_dir() -> Path:
    env = os.environ.get("MEDRWR_EDGE_HOME")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_DATA_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".local" / "share"
    return base / "medrwr-edge"


def models_dir() -> Path:
    return data_dir() / "models"


def packs_dir() -> Path:
    return data_dir() / "packs"


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            block = f.read(chunk)
            if not block:
                break
            h.update(block)
    return h.hexdigest()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `path` via a temp file in the same directory and an atomic rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


@contextlib.contextmanager
def atomic_directory(final: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temp directory beside `final`; on success rename it into place, on any error remove it.

    Ctrl-C (KeyboardInterrupt) is a BaseException, so an interrupted build leaves nothing behind.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".partial", dir=final.parent))
    try:
        yield tmp
        if final.exists() and not overwrite:
            raise FileExistsError(f"{final} already exists")
        replace_directory(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def replace_directory(new: Path, final: Path) -> None:
    """Move the finished directory `new` to `final`, replacing what is there: the old one is renamed aside first,
    so `final` is always either the complete old or the complete new directory."""
    if final.exists():
        old = final.with_name(f".{final.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        os.replace(new, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(new, final)


def cached_sha256(path: str | os.PathLike) -> str:
    """sha256 of a large file (a GGUF), remembered by (path, size, mtime) in the data directory.

    Hashing a 1.1 GB model takes seconds; the record needs its hash on every answer. A changed file has a new
    size or mtime and is hashed again; `models verify` / `pack verify` always re-hash in full.
    """
    import json

    path = Path(path).resolve()
    st = path.stat()
    key = f"{path}|{st.st_size}|{st.st_mtime_ns}"
    cache_file = data_dir() / "sha256-cache.json"
    try:
        cache = json.loads(cache_file.read_text("utf-8"))
        if not isinstance(cache, dict):
            cache = {}
    except (OSError, ValueError):
        cache = {}
    if key in cache:
        return cache[key]
    digest = sha256_file(path)
    cache = {k: v for k, v in cache.items() if not k.startswith(f"{path}|")}
    cache[key] = digest
    try:
        atomic_write_text(cache_file, json.dumps(cache, indent=1, sort_keys=True))
    except OSError:
        pass  # a read-only data directory only costs the re-hash next time
    return digest
