"""The per-install history secret, opaque history ids, and AES-256-GCM sealing of stored history files.

One random 32-byte secret per install, in `data_dir()/history/secret.key` (mode 0600; or the file named by
`$MEDRWR_EDGE_HISTORY_SECRET`, e.g. on removable media or a secrets mount). Two keys are derived from it with
HMAC-SHA256 and fixed labels, so neither use can stand in for the other:

* the **history id**: HMAC(id-key, patient key)[:32 hex]. It names the directory and appears in records and logs;
  it cannot be turned back into the patient key without the secret, and the same key always finds the same
  history.
* the **sealing key**: AES-256-GCM over every stored history file. The associated data binds each ciphertext to
  its history id and file role, so a file copied into another patient's directory fails to open (isolation
  holds even against a misplaced file), and any modified byte fails authentication (integrity).

What this protects: history files read without the secret (a copied directory, a backup that leaves out
secret.key, a disk image of another volume when the secret lives elsewhere). What it does not: anyone who can
read both the history and the secret, i.e. the same OS account (or root); for that, file permissions (0700/0600)
and the OS account are the protection, as for every other file medrwr-edge keeps.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from pathlib import Path

from ..errors import IntegrityError, MedrwrError
from ..paths import data_dir

SECRET_ENV = "MEDRWR_EDGE_HISTORY_SECRET"
SECRET_BYTES = 32
NONCE_BYTES = 12  # AES-GCM's standard nonce; random per write (a 96-bit random nonce is safe for ~2^32 writes)
FORMAT = b"medrwr-edge-history/1"


def history_root() -> Path:
    return data_dir() / "history"


def ensure_private_dir(path: Path) -> Path:
    """Create `path` (and parents) and make it 0700: only this OS account may list or enter it."""
    path.mkdir(parents=True, exist_ok=True)
    os.chmod(path, 0o700)
    return path


def stored_history_ids() -> list[str]:
    root = history_root()
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


def secret_path() -> Path:
    env = os.environ.get(SECRET_ENV)
    return Path(env).expanduser() if env else history_root() / "secret.key"


def load_secret(create: bool) -> bytes:
    """The install's history secret; created (0600, atomically) on first use when `create`."""
    path = secret_path()
    if not path.exists():
        if stored_history_ids():  # a new secret would orphan them: every stored history would stop opening
            raise MedrwrError(
                f"the patient history secret {path} is missing, so the stored histories cannot be opened (restore "
                f"it, or point ${SECRET_ENV} at it)")
        if not create:
            raise MedrwrError(f"no patient history secret at {path}: no history has been stored on this install")
        if path.parent == history_root():
            ensure_private_dir(path.parent)
        else:  # a directory the user named: created private if missing, an existing one is left as it is
            path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        _write_new_secret(path)
    try:
        secret = path.read_bytes()
    except OSError as e:
        raise MedrwrError(f"cannot read the patient history secret {path}: {e.strerror}") from None
    if len(secret) != SECRET_BYTES:
        raise IntegrityError(
            f"the patient history secret {path} is damaged ({len(secret)} bytes, expected {SECRET_BYTES})")
    return secret


def _write_new_secret(path: Path) -> None:
    # O_EXCL: two first `history add`s at once must not write two different secrets.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, secrets.token_bytes(SECRET_BYTES))
        os.fsync(fd)
    finally:
        os.close(fd)
    try:
        os.link(tmp, path)  # fails if another process won the race; its secret then stands
    except FileExistsError:
        pass
    finally:
        os.unlink(tmp)


def _derived(secret: bytes, label: bytes) -> bytes:
    return hmac.new(secret, FORMAT + b"|" + label, hashlib.sha256).digest()


def history_id(secret: bytes, key: str) -> str:
    """The opaque id of a patient key (32 hex characters = 128 bits)."""
    return hmac.new(_derived(secret, b"id"), key.encode("utf-8"), hashlib.sha256).hexdigest()[:32]


def _aad(hid: str, role: str) -> bytes:
    return FORMAT + b"|" + hid.encode("ascii") + b"|" + role.encode("ascii")


def seal(secret: bytes, hid: str, role: str, plaintext: bytes) -> bytes:
    """nonce || AES-256-GCM(plaintext) with the history id and file role as associated data."""
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    nonce = secrets.token_bytes(NONCE_BYTES)
    return nonce + AESGCM(_derived(secret, b"seal")).encrypt(nonce, plaintext, _aad(hid, role))


def unseal(secret: bytes, hid: str, role: str, blob: bytes) -> bytes:
    from cryptography.exceptions import InvalidTag
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    if len(blob) < NONCE_BYTES + 16:
        raise IntegrityError(f"history {hid}: {role} is truncated")
    try:
        return AESGCM(_derived(secret, b"seal")).decrypt(blob[:NONCE_BYTES], blob[NONCE_BYTES:], _aad(hid, role))
    except InvalidTag:
        raise IntegrityError(
            f"history {hid}: {role} fails authentication (modified, damaged, copied from another history, or "
            "sealed with another install's secret)"
        ) from None
