"""The llama.cpp source tree that matches the installed runtime: the llama-cpp-python==0.3.36 sdist.

Why the sdist: it vendors the exact llama.cpp commit the runtime was compiled from, with that commit's
`convert_hf_to_gguf.py` and its own `gguf-py` (PyPI `gguf` 0.19.0 is older and cannot write what this converter
writes). Converter and runtime therefore always agree on tensor names and metadata keys.

Obtaining it is the one online step of an export (on the connected machine that holds the checkpoint):
`pip download --no-binary :all: --no-deps llama-cpp-python==0.3.36` into a cache under the data directory, or
a path the user gives (`--llama-cpp-src`: the .tar.gz, or an already unpacked tree). The archive's sha256 is
checked against the PyPI release before anything is unpacked.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from ..errors import InputError, IntegrityError, MedrwrError
from ..paths import data_dir, sha256_file

LLAMA_CPP_PYTHON_VERSION = "0.3.36"
SDIST_NAME = f"llama_cpp_python-{LLAMA_CPP_PYTHON_VERSION}.tar.gz"
# sha256 of the PyPI sdist llama_cpp_python-0.3.36.tar.gz (pip verifies it against the index too).
SDIST_SHA256 = "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"


@dataclass
class LlamaCppSource:
    root: Path  # vendor/llama.cpp
    commit: str  # the llama.cpp git commit of this tree
    sdist_sha256: str  # "" when the user gave an unpacked tree

    @property
    def converter(self) -> Path:
        return self.root / "convert_hf_to_gguf.py"

    @property
    def gguf_py(self) -> Path:
        return self.root / "gguf-py"


def cache_dir() -> Path:
    return data_dir() / "cache" / "llama-cpp-src"


def obtain(given: Optional[str | os.PathLike] = None, progress=None) -> LlamaCppSource:
    """The vendored llama.cpp tree: from `given` (sdist file or unpacked dir) or the cache, downloading if needed."""
    say = progress or (lambda msg: None)
    if given is not None:
        p = Path(given)
        if p.is_dir():
            return _from_tree(p, sdist_sha256="")
        if not p.is_file():
            raise InputError(f"--llama-cpp-src {p}: no such file or directory")
        return _unpack(p)
    cache = cache_dir()
    tree = cache / f"llama_cpp_python-{LLAMA_CPP_PYTHON_VERSION}"
    if (tree / "vendor" / "llama.cpp" / "convert_hf_to_gguf.py").is_file():
        return _from_tree(tree, sdist_sha256=SDIST_SHA256)
    sdist = cache / SDIST_NAME
    if not sdist.is_file():
        say(f"downloading the llama-cpp-python {LLAMA_CPP_PYTHON_VERSION} source (llama.cpp converter, ~75 MB)")
        cache.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps",
               f"llama-cpp-python=={LLAMA_CPP_PYTHON_VERSION}", "-d", str(cache)]
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0 or not sdist.is_file():
            last = (r.stderr.strip().splitlines() or ["no output"])[-1]
            raise MedrwrError(
                f"could not download the llama-cpp-python {LLAMA_CPP_PYTHON_VERSION} sdist ({last}); on an offline "
                "machine give the file with --llama-cpp-src PATH"
            )
    return _unpack(sdist)


def _unpack(sdist: Path) -> LlamaCppSource:
    digest = sha256_file(sdist)
    if digest != SDIST_SHA256:
        raise IntegrityError(
            f"{sdist} has sha256 {digest[:16]}…, not the llama-cpp-python {LLAMA_CPP_PYTHON_VERSION} sdist "
            f"({SDIST_SHA256[:16]}…): the converter must match the installed runtime"
        )
    dest = cache_dir()
    tree = dest / f"llama_cpp_python-{LLAMA_CPP_PYTHON_VERSION}"
    if not (tree / "vendor" / "llama.cpp" / "convert_hf_to_gguf.py").is_file():
        dest.mkdir(parents=True, exist_ok=True)
        tmp = dest / f".unpack-{os.getpid()}"
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
        try:
            with tarfile.open(sdist, "r:gz") as tar:
                tar.extractall(tmp, filter="data")  # no absolute paths, links out of the tree or device files
            shutil.rmtree(tree, ignore_errors=True)
            os.replace(tmp / tree.name, tree)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return _from_tree(tree, sdist_sha256=digest)


def _from_tree(tree: Path, sdist_sha256: str) -> LlamaCppSource:
    root = tree / "vendor" / "llama.cpp" if (tree / "vendor" / "llama.cpp").is_dir() else tree
    if not (root / "convert_hf_to_gguf.py").is_file() or not (root / "gguf-py" / "gguf").is_dir():
        raise InputError(f"{tree} is not a llama-cpp-python source tree (no vendor/llama.cpp/convert_hf_to_gguf.py)")
    return LlamaCppSource(root=root, commit=_commit(root), sdist_sha256=sdist_sha256)


def _commit(root: Path) -> str:
    """The llama.cpp commit, read from the submodule's git HEAD that the sdist ships (no git binary needed)."""
    candidates = []
    dot_git = root / ".git"
    if dot_git.is_file():  # "gitdir: ../../.git/modules/vendor/llama.cpp"
        rel = dot_git.read_text().strip().removeprefix("gitdir:").strip()
        candidates.append((root / rel / "HEAD").resolve())
    candidates.append(root / ".git" / "HEAD")
    for head in candidates:
        if head.is_file():
            text = head.read_text().strip()
            if len(text) == 40 and all(c in "0123456789abcdef" for c in text):
                return text
    return "unknown"
