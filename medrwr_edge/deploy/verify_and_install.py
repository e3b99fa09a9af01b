#!/usr/bin/env python3
"""Verify a medrwr-edge deployment bundle, then install it offline. Python standard library only.

This file travels inside every deployment bundle. On the offline workstation medrwr-edge is not installed yet,
so nothing that pip would install can check the bundle: this script does, before pip runs.

    python3 verify_and_install.py --trusted-key medrwr-deploy.pub            # verify, then install
    python3 verify_and_install.py --trusted-key medrwr-deploy.pub --verify-only

1. The ed25519 signature over manifest.json's exact bytes is checked against the TRUSTED public key (a PEM file
   that reaches the workstation by another channel than the bundle itself).
2. Every file in the bundle must be listed in the signed manifest with its size and sha256 (missing, added,
   changed or linked files are refused). Only then is anything installed.
3. `python -m pip install --no-index --find-links wheels --only-binary :all: --require-hashes -r REQS`, where
   REQS pins every bundled wheel to its version and to the sha256 in the signed manifest (pip re-checks each file
   as it installs it: no gap between check and use), with pip's configuration files and PIP_* variables ignored,
   so nothing but the bundled wheels can be used.
4. `python -m medrwr_edge.cli bundle install --from BUNDLE --trusted-key KEY` verifies again with the same
   code (imported from the installed package) and copies models and packs into the data directory.

`medrwr-edge bundle verify` imports this module, so both paths run the same checks. The Ed25519 verifier below
is written from RFC 8032 (section 5.1) in plain integer arithmetic; it is slow by C standards (~10 ms per
signature) and needs no third-party package. It does not sign: signing needs the private key, which never
leaves the connected machine (`medrwr-edge bundle create` signs with the `cryptography` package).
"""

from __future__ import annotations

import argparse
import base64
import binascii
import hashlib
import json
import os
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

BUNDLE_FORMAT = "medrwr-edge/deployment-bundle/1"
MANIFEST = "manifest.json"
SIGNATURE = "manifest.sig"
WHEELS_DIR = "wheels"


class BundleRejected(Exception):
    """The bundle (or the key) fails a check; the message is one line naming what failed."""


# ------------------------------------------------------------------------------------------------ Ed25519
# RFC 8032, 5.1: the twisted Edwards curve -x^2 + y^2 = 1 + d x^2 y^2 over GF(p), points in extended
# homogeneous coordinates (X, Y, Z, T) with x = X/Z, y = Y/Z, x*y = T/Z.

_P = 2**255 - 19
_L = 2**252 + 27742317777372353535851937790883648493  # order of the base point
_D = -121665 * pow(121666, _P - 2, _P) % _P
_SQRT_M1 = pow(2, (_P - 1) // 4, _P)


def _inverse(x: int) -> int:
    return pow(x, _P - 2, _P)


def _recover_x(y: int, sign: int):
    """x from y and the sign bit (RFC 8032 5.1.3, steps 2-4); None when no such point exists."""
    if y >= _P:
        return None
    x2 = (y * y - 1) * _inverse(_D * y * y + 1) % _P
    if x2 == 0:
        return None if sign else 0
    x = pow(x2, (_P + 3) // 8, _P)
    if (x * x - x2) % _P != 0:
        x = x * _SQRT_M1 % _P
    if (x * x - x2) % _P != 0:
        return None
    if (x & 1) != sign:
        x = _P - x
    return x


_BASE_Y = 4 * _inverse(5) % _P
_BASE_X = _recover_x(_BASE_Y, 0)
_BASE = (_BASE_X, _BASE_Y, 1, _BASE_X * _BASE_Y % _P)
_IDENTITY = (0, 1, 1, 0)


def _add(a, b):
    """Point addition (RFC 8032 5.1.4); complete, so it also doubles."""
    x1, y1, z1, t1 = a
    x2, y2, z2, t2 = b
    aa = (y1 - x1) * (y2 - x2) % _P
    bb = (y1 + x1) * (y2 + x2) % _P
    cc = 2 * t1 * t2 * _D % _P
    dd = 2 * z1 * z2 % _P
    e, f, g, h = bb - aa, dd - cc, dd + cc, bb + aa
    return (e * f % _P, g * h % _P, f * g % _P, e * h % _P)


def _multiply(scalar: int, point):
    result = _IDENTITY
    while scalar > 0:
        if scalar & 1:
            result = _add(result, point)
        point = _add(point, point)
        scalar >>= 1
    return result


def _same_point(a, b) -> bool:
    x1, y1, z1, _ = a
    x2, y2, z2, _ = b
    return (x1 * z2 - x2 * z1) % _P == 0 and (y1 * z2 - y2 * z1) % _P == 0


def _decode_point(data: bytes):
    """RFC 8032 5.1.3: 255 bits of y, little-endian, and the sign of x in the top bit."""
    if len(data) != 32:
        return None
    y = int.from_bytes(data, "little")
    sign = y >> 255
    y &= (1 << 255) - 1
    x = _recover_x(y, sign)
    if x is None:
        return None
    return (x, y, 1, x * y % _P)


def ed25519_verify(public_key: bytes, message: bytes, signature: bytes) -> bool:
    """RFC 8032 5.1.7: accept iff [S]B == R + [SHA-512(R || A || M)]A (the cofactorless check)."""
    if len(public_key) != 32 or len(signature) != 64:
        return False
    a = _decode_point(public_key)
    r = _decode_point(signature[:32])
    if a is None or r is None:
        return False
    s = int.from_bytes(signature[32:], "little")
    if s >= _L:  # a non-canonical S would make signatures malleable
        return False
    k = int.from_bytes(hashlib.sha512(signature[:32] + public_key + message).digest(), "little") % _L
    return _same_point(_multiply(s, _BASE), _add(r, _multiply(k, a)))


# ------------------------------------------------------------------------------------------------ keys

# DER SubjectPublicKeyInfo of an Ed25519 key (RFC 8410): this fixed 12-byte header, then the 32 key bytes.
_SPKI_ED25519_PREFIX = bytes.fromhex("302a300506032b6570032100")


def load_public_key(pem: bytes) -> bytes:
    """The 32 raw key bytes of a PEM 'PUBLIC KEY' holding an Ed25519 key (as `bundle keygen` or openssl write)."""
    text = pem.decode("ascii", errors="replace").strip().splitlines()
    if not text or text[0].strip() != "-----BEGIN PUBLIC KEY-----" or text[-1].strip() != "-----END PUBLIC KEY-----":
        raise BundleRejected("the trusted key is not a PEM public key (-----BEGIN PUBLIC KEY-----)")
    try:
        der = base64.b64decode("".join(line.strip() for line in text[1:-1]), validate=True)
    except (binascii.Error, ValueError):
        raise BundleRejected("the trusted key's PEM body is not valid base64") from None
    if len(der) != 44 or not der.startswith(_SPKI_ED25519_PREFIX):
        raise BundleRejected("the trusted key is not an Ed25519 public key")
    return der[len(_SPKI_ED25519_PREFIX):]


def fingerprint(raw_public_key: bytes) -> str:
    return "sha256:" + hashlib.sha256(raw_public_key).hexdigest()


# ------------------------------------------------------------------------------------------------ bundle


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _safe_relative(rel: str) -> bool:
    parts = rel.split("/")
    return bool(rel) and not rel.startswith("/") and "\\" not in rel and all(p not in ("", ".", "..") for p in parts)


def verify_bundle(bundle_dir, trusted_key_pem: bytes) -> dict:
    """The bundle's manifest, once the signature and every file check out; BundleRejected otherwise.

    Order matters: the signature is checked over the manifest's raw bytes before the JSON is even parsed, so
    nothing from an unsigned manifest is trusted (not even which files to hash).
    """
    root = Path(bundle_dir)
    if not root.is_dir():
        hint = " (unpack the .tar first: tar xf)" if root.suffix == ".tar" else ""
        raise BundleRejected(f"{root} is not a directory{hint}")
    public_key = load_public_key(trusted_key_pem)
    for name in (MANIFEST, SIGNATURE):
        if not (root / name).is_file() or (root / name).is_symlink():
            raise BundleRejected(f"{name} is missing: this is not a signed deployment bundle")
    manifest_bytes = (root / MANIFEST).read_bytes()
    try:
        signature = base64.b64decode((root / SIGNATURE).read_bytes().strip(), validate=True)
    except (binascii.Error, ValueError):
        raise BundleRejected(f"{SIGNATURE} is not base64") from None
    if not ed25519_verify(public_key, manifest_bytes, signature):
        raise BundleRejected(
            f"the signature of {MANIFEST} does not verify with the trusted key {fingerprint(public_key)}: "
            "the manifest or its signature was modified, or another key signed it")
    try:
        manifest = json.loads(manifest_bytes.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise BundleRejected(f"{MANIFEST} is signed but is not valid JSON") from None
    if not isinstance(manifest, dict) or manifest.get("format") != BUNDLE_FORMAT:
        raise BundleRejected(f"{MANIFEST} is not a {BUNDLE_FORMAT} manifest")
    if manifest.get("signing_key", {}).get("fingerprint") != fingerprint(public_key):
        raise BundleRejected("the manifest names a different signing key than the trusted one")
    files = manifest.get("files")
    if not isinstance(files, dict) or not files:
        raise BundleRejected(f"{MANIFEST} lists no files")
    for rel, entry in files.items():
        if not _safe_relative(rel) or rel in (MANIFEST, SIGNATURE):
            raise BundleRejected(f"{MANIFEST} lists an unsafe path {rel!r}")
        if not isinstance(entry, dict) or not isinstance(entry.get("size"), int) or not isinstance(entry.get("sha256"), str):
            raise BundleRejected(f"{MANIFEST} entry for {rel} lacks size or sha256")
    # Everything on disk must be listed: an added file (an extra wheel pip could pick) is refused too.
    present = set()
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            mode = path.lstat().st_mode
            rel = path.relative_to(root).as_posix()
            if stat.S_ISLNK(mode):
                raise BundleRejected(f"{rel} is a symbolic link; bundles hold plain files only")
            if stat.S_ISDIR(mode):
                continue
            if not stat.S_ISREG(mode):
                raise BundleRejected(f"{rel} is not a regular file")
            if rel not in (MANIFEST, SIGNATURE):
                present.add(rel)
    extra = sorted(present - set(files))
    if extra:
        raise BundleRejected(f"{extra[0]} is not listed in the signed manifest (added after signing)"
                             + (f" (+{len(extra) - 1} more)" if len(extra) > 1 else ""))
    missing = sorted(set(files) - present)
    if missing:
        raise BundleRejected(f"{missing[0]} is listed in the manifest but missing"
                             + (f" (+{len(missing) - 1} more)" if len(missing) > 1 else ""))
    for rel in sorted(files):  # sizes first: a truncated copy is named without hashing gigabytes
        size = (root / rel).stat().st_size
        if size != files[rel]["size"]:
            raise BundleRejected(f"{rel} has {size} bytes, the signed manifest says {files[rel]['size']}")
    for rel in sorted(files):
        if sha256_file(root / rel) != files[rel]["sha256"]:
            raise BundleRejected(f"{rel} does not match its sha256 in the signed manifest (modified)")
    return manifest


def extract_archive(archive, dest) -> Path:
    """Unpack a `bundle create OUT.tar` archive into dest, refusing anything but plain files and folders with
    safe relative names (no links, devices, absolute paths or '..'). Verification of the contents follows."""
    import tarfile

    dest = Path(dest)
    try:
        with tarfile.open(archive, "r:") as tar:
            for member in tar.getmembers():
                if not _safe_relative(member.name):
                    raise BundleRejected(f"the archive holds an unsafe path {member.name!r}")
                if member.isdir():
                    (dest / member.name).mkdir(parents=True, exist_ok=True)
                elif member.isfile():
                    (dest / member.name).parent.mkdir(parents=True, exist_ok=True)
                    with tar.extractfile(member) as src, open(dest / member.name, "xb") as out:
                        for block in iter(lambda: src.read(1 << 20), b""):
                            out.write(block)
                else:
                    raise BundleRejected(f"the archive holds {member.name}, which is not a plain file")
    except (tarfile.TarError, OSError) as e:
        raise BundleRejected(f"cannot read the archive {Path(archive).name}: {e}") from None
    return dest


def check_python(manifest: dict, python: str) -> None:
    """Compiled wheels (numpy, hnswlib, ...) are for one Python minor version: refuse another before pip runs."""
    target = manifest.get("target", {}).get("python")
    probe = subprocess.run([python, "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
                           capture_output=True, text=True)
    if probe.returncode != 0:
        raise BundleRejected(f"cannot run {python}")
    here = probe.stdout.strip()
    if target and target != here:
        raise BundleRejected(f"the bundle's wheels are for Python {target}; {python} is Python {here}")


def offline_pip_env() -> dict:
    """The environment for pip: no configuration files and no PIP_* variables (which could name an index)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    env["PIP_CONFIG_FILE"] = os.devnull
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    env["PIP_NO_INPUT"] = "1"
    return env


def _wheel_name_version(filename: str) -> tuple:
    """(normalised project name, version) from a wheel file name (PEP 427: NAME-VERSION[-BUILD]-PY-ABI-PLAT.whl)."""
    parts = filename[: -len(".whl")].split("-")
    if not filename.endswith(".whl") or len(parts) not in (5, 6):
        raise BundleRejected(f"{filename} is not a wheel file name")
    return _normalise(parts[0]), parts[1]


def _normalise(name: str) -> str:
    return "-".join(p for p in name.lower().replace("_", "-").replace(".", "-").split("-") if p)


def hashed_requirements(manifest: dict) -> str:
    """A pip requirements file: every bundled wheel, pinned by version AND by the sha256 the signed manifest lists.

    pip (`--require-hashes`) then re-checks each wheel as it installs it, so the files installed are the files
    verified above, even if the bundle were changed between the check and the install (on a shared drive)."""
    pins: dict = {}
    for rel, entry in sorted(manifest["files"].items()):
        if rel.startswith(WHEELS_DIR + "/") and rel.endswith(".whl"):
            name, version = _wheel_name_version(rel.rsplit("/", 1)[1])
            known = pins.setdefault(name, (version, []))
            if known[0] != version:
                raise BundleRejected(f"the bundle holds two versions of {name} ({known[0]}, {version})")
            known[1].append(entry["sha256"])
    wanted = _normalise(manifest["install"]["requirement"].split("==")[0].split("[")[0])
    if wanted not in pins:
        raise BundleRejected(f"the bundle's wheels do not include {manifest['install']['requirement']}")
    return "".join(f"{name}=={version} " + " ".join(f"--hash=sha256:{h}" for h in hashes) + "\n"
                   for name, (version, hashes) in sorted(pins.items()))


def pip_install_command(python: str, bundle_dir: Path, requirements_file: Path) -> list:
    return [python, "-m", "pip", "install", "--no-index", "--find-links", str(bundle_dir / WHEELS_DIR),
            "--only-binary", ":all:", "--no-cache-dir", "--force-reinstall", "--require-hashes",
            "-r", str(requirements_file)]
    # --force-reinstall: a same-version medrwr-edge (or dependency) already there is replaced by the bundled,
    # verified wheel, so what runs is what was signed


def main(argv=None) -> int:
    here = Path(__file__).resolve().parent
    ap = argparse.ArgumentParser(description="Verify a medrwr-edge deployment bundle, then install it offline.")
    ap.add_argument("bundle", nargs="?", default=str(here), help="the bundle directory (default: this script's)")
    ap.add_argument("--trusted-key", required=True, help="the signer's Ed25519 public key (PEM)")
    ap.add_argument("--verify-only", action="store_true", help="check the bundle, install nothing")
    ap.add_argument("--python", default=sys.executable,
                    help="the Python (e.g. a virtualenv's) to install into (default: the one running this)")
    ap.add_argument("--force", action="store_true", help="replace installed models/packs that differ")
    args = ap.parse_args(argv)
    bundle = Path(args.bundle).resolve()
    try:
        try:
            key_pem = Path(args.trusted_key).read_bytes()
        except OSError as e:
            raise BundleRejected(f"cannot read the trusted key {args.trusted_key}: {e.strerror}") from None
        manifest = verify_bundle(bundle, key_pem)
        print(f"verified: {len(manifest['files'])} files match the manifest signed by "
              f"{manifest['signing_key']['fingerprint']}")
        if args.verify_only:
            return 0
        install = manifest.get("install")
        if install:
            check_python(manifest, args.python)
            with tempfile.TemporaryDirectory(prefix="medrwr-bundle-") as tmp:  # the bundle may be read-only
                requirements = Path(tmp) / "requirements.txt"
                requirements.write_text(hashed_requirements(manifest), encoding="utf-8")
                cmd = pip_install_command(args.python, bundle, requirements)
                print("installing the bundled wheels, each pinned to its signed sha256: " + " ".join(cmd[2:]),
                      flush=True)
                if subprocess.run(cmd, env=offline_pip_env(), cwd=str(bundle)).returncode != 0:
                    raise BundleRejected("pip could not install the bundled wheels (see pip's message above)")
        cmd = [args.python, "-m", "medrwr_edge.cli", "bundle", "install", "--from", str(bundle),
               "--trusted-key", str(Path(args.trusted_key).resolve())] + (["--force"] if args.force else [])
        # cwd: the bundle, so `-m` cannot pick up a medrwr_edge/ folder from wherever the operator stands
        return subprocess.run(cmd, cwd=str(bundle)).returncode
    except BundleRejected as e:
        print(f"error: deployment bundle refused: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
