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
    """Yield a temp directory beside `final`; on success swap it into place, on any error remove it.

    Ctrl-C (KeyboardInterrupt) is a BaseException, so an interrupted build leaves nothing behind.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".partial", dir=final.parent))
    try:
        yield tmp
        if os.path.lexists(final) and not overwrite:
            raise FileExistsError(f"{final} already exists")
        replace_directory(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# ---------------------------------------------------------------------------------- the directory swap
#
# `final` is at every instant either the complete old or the complete new directory, never missing:
#   1. every file and directory of `new` is fsynced (a power cut after the swap cannot leave renamed-but-empty files);
#   2. renameat2(RENAME_EXCHANGE) swaps the two names in one step (Linux >= 3.15, glibc >= 2.28). Where the call or
#      the file system lacks it, `new` becomes a versioned directory `.NAME.<unique>.v` and `final` a symlink to it,
#      flipped by one rename(2) of a fresh symlink (the first switch of an existing real directory to that layout
#      cannot be atomic: it is renamed aside first);
#   3. the parent directory is fsynced, so the swap itself survives a power cut;
#   4. the old directory is renamed to `.NAME.<unique>.old` and removed -- unless a reader holds it (a shared flock,
#      see `reading_directory`); then the next swap of the same NAME removes it.
# Every temporary name is unique (mkdtemp), so two installs of the same NAME never collide.

_AT_FDCWD = -100
_RENAME_NOREPLACE, _RENAME_EXCHANGE = 1, 2


def _renameat2(src: Path, dst: Path, flags: int) -> bool:
    """renameat2(2) through ctypes; False where libc or the file system does not have it (caller falls back)."""
    import ctypes
    import errno

    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if fn(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), flags) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(src), None, str(dst))


def fsync_tree(root: Path) -> None:
    """fsync every file and directory under `root` (inclusive), children before their directory."""
    for dirpath, dirnames, filenames in os.walk(root, topdown=False):
        for name in filenames:
            p = os.path.join(dirpath, name)
            if not os.path.islink(p):
                fsync_path(p)
        fsync_path(dirpath)


def fsync_path(path: str | os.PathLike) -> None:
    import errno

    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as e:
        if e.errno not in (errno.EINVAL, errno.ENOTSUP):  # file systems that cannot fsync (a directory): nothing to do
            raise
    finally:
        os.close(fd)


def _unique_name(final: Path, suffix: str) -> Path:
    """A fresh, unused name beside `final` (created then removed: mkdtemp's uniqueness, no fixed name)."""
    tmp = tempfile.mkdtemp(prefix=f".{final.name}.", suffix=suffix, dir=final.parent)
    os.rmdir(tmp)
    return Path(tmp)


def replace_directory(new: Path, final: Path) -> None:
    """Put the finished directory `new` at `final`, replacing what is there atomically (see the steps above)."""
    new, final = Path(new), Path(final)
    parent = final.parent
    fsync_tree(new)
    _sweep_retired(final)
    try:
        if not os.path.lexists(final) and _renameat2(new, final, _RENAME_NOREPLACE):
            fsync_path(parent)
            return
    except FileExistsError:
        pass  # another install put one there in the meantime: exchange with it
    if os.path.lexists(final) and _renameat2(new, final, _RENAME_EXCHANGE):
        fsync_path(parent)
        old = _unique_name(final, ".old")
        os.rename(new, old)  # after the exchange `new` names the previous directory (or the previous symlink)
        _retire(old, final)
        return
    _flip_symlink(new, final)


def _flip_symlink(new: Path, final: Path) -> None:
    """The fallback: `final` is a symlink to a versioned directory; one rename(2) of a fresh link flips it."""
    import fcntl

    fd = os.open(new, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # until the flip: a sweep must not take it for one a killed writer left
        version = _unique_name(final, ".v")
        os.rename(new, version)
        link = _unique_name(final, ".link")
        os.symlink(version.name, link)  # relative: the pair can be moved together
        previous = None
        if os.path.isdir(final) and not os.path.islink(final):  # a real directory: the one non-atomic switch
            previous = _unique_name(final, ".old")
            os.rename(final, previous)
        elif os.path.islink(final):
            previous = final.parent / os.readlink(final)  # the version directory it pointed to
        os.replace(link, final)
        fsync_path(final.parent)
    finally:
        os.close(fd)
    if previous is not None and previous.name.startswith(f".{final.name}."):
        _retire(previous, final)


def _retire(old: Path, final: Path) -> None:
    """Remove a replaced directory now, unless a reader holds it: then it stays as `.NAME.<unique>.old` for the
    next swap of NAME. A replaced symlink (the versioned layout) is unlinked and its version directory retired."""
    import fcntl

    if os.path.islink(old):
        target = old.parent / os.readlink(old)
        os.unlink(old)
        if target.name.startswith(f".{final.name}.") and target.parent == final.parent:
            _retire(target, final)
        return
    fd = os.open(old, os.O_RDONLY | os.O_DIRECTORY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:  # a reader is opening it
            if not old.name.endswith(".old"):
                os.rename(old, _unique_name(final, ".old"))
            return
        shutil.rmtree(old, ignore_errors=True)  # readers that lock it from now on see it is no longer `final`
    finally:
        os.close(fd)


def _sweep_retired(final: Path) -> None:
    """Remove what earlier swaps of `final` left: copies readers held, and versions or links a killed writer left."""
    import fcntl

    for left in final.parent.glob(f".{final.name}.*.old"):
        with contextlib.suppress(OSError):
            _retire(left, final)
    for version in final.parent.glob(f".{final.name}.*.v"):
        with contextlib.suppress(OSError):
            fd = os.open(version, os.O_RDONLY | os.O_DIRECTORY)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # held: read now, or a live writer's before its flip
                if not (os.path.islink(final) and os.readlink(final) == version.name):
                    shutil.rmtree(version, ignore_errors=True)
            finally:
                os.close(fd)
    for link in final.parent.glob(f".{final.name}.*.link"):
        if not link.exists():  # dangling: its version was never flipped in (a live writer's link has its version)
            with contextlib.suppress(OSError):
                os.unlink(link)


@contextlib.contextmanager
def reading_directory(final: str | os.PathLike) -> Iterator[Path]:
    """Yield a path to the directory `final` names now, kept complete while the block runs, whatever swaps happen.

    For readers that open several files (a pack: manifest, index, database): a swap between two of those opens
    would otherwise mix two versions. The directory is held by a shared flock that `replace_directory` respects;
    the yielded path goes through the held descriptor (/proc/self/fd/N), so it names that version, not `final`.
    Files opened in the block stay readable after it (an unlinked file lives on while open).
    """
    import fcntl

    final = Path(final)
    proc = Path("/proc/self/fd")
    for _ in range(100):
        fd = os.open(final, os.O_RDONLY | os.O_DIRECTORY)
        try:
            fcntl.flock(fd, fcntl.LOCK_SH)
            if os.path.samestat(os.stat(final), os.fstat(fd)):  # still current: swapped-out ones are not reused
                yield (proc / str(fd)) if proc.is_dir() else final
                return
        finally:
            os.close(fd)
    raise OSError(f"{final} kept changing while it was being opened")


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
