"""Ed25519 keys for deployment bundles: generate and sign with `cryptography`, verify with the stdlib code.

Signing happens on the connected machine that builds bundles (the `deploy` extra installs `cryptography`);
verification happens on the offline workstation, where only the pure-Python verifier in
`verify_and_install.py` is guaranteed to exist, so every verification here goes through that one function.

    KEYDIR/medrwr-deploy.key   PKCS#8 PEM private key, mode 0600 (keep it on the build machine)
    KEYDIR/medrwr-deploy.pub   SubjectPublicKeyInfo PEM public key (give it to the workstation's IT)
"""

from __future__ import annotations

import base64
import os
from pathlib import Path

from ..errors import InputError, MedrwrError
from ..paths import atomic_write_bytes
from .verify_and_install import BundleRejected, fingerprint, load_public_key

PRIVATE_KEY_FILE = "medrwr-deploy.key"
PUBLIC_KEY_FILE = "medrwr-deploy.pub"


def _crypto():
    try:
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    except ImportError:
        raise MedrwrError("signing needs the `cryptography` package: pip install 'medrwr-edge[deploy]'") from None
    return serialization, Ed25519PrivateKey


def keygen(key_dir: str | os.PathLike, force: bool = False) -> tuple[Path, Path]:
    """Write a new key pair into key_dir; refuse to overwrite an existing one unless force."""
    serialization, Ed25519PrivateKey = _crypto()
    key_dir = Path(key_dir)
    private_path, public_path = key_dir / PRIVATE_KEY_FILE, key_dir / PUBLIC_KEY_FILE
    if not force and (private_path.exists() or public_path.exists()):
        raise InputError(f"{private_path} already exists; use --force to replace the key pair "
                         "(bundles signed with the old key will no longer verify with the new public key)")
    key = Ed25519PrivateKey.generate()
    private_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption())
    public_pem = key.public_key().public_bytes(serialization.Encoding.PEM,
                                               serialization.PublicFormat.SubjectPublicKeyInfo)
    key_dir.mkdir(parents=True, exist_ok=True)
    old_umask = os.umask(0o077)  # the private key is never readable by others, not even for an instant
    try:
        atomic_write_bytes(private_path, private_pem)
    finally:
        os.umask(old_umask)
    os.chmod(private_path, 0o600)
    atomic_write_bytes(public_path, public_pem)
    os.chmod(public_path, 0o644)
    return private_path, public_path


class Signer:
    """A loaded private key: sign(message) -> 64 bytes; public_pem and fingerprint for the manifest."""

    def __init__(self, private_key_path: str | os.PathLike):
        serialization, Ed25519PrivateKey = _crypto()
        path = Path(private_key_path)
        if path.is_dir():
            path = path / PRIVATE_KEY_FILE
        try:
            data = path.read_bytes()
        except OSError as e:
            raise InputError(f"cannot read the signing key {path}: {e.strerror}") from None
        if path.stat().st_mode & 0o077:
            raise InputError(f"the signing key {path} is readable by other users; chmod 600 it first")
        try:
            key = serialization.load_pem_private_key(data, password=None)
        except (ValueError, TypeError):
            raise InputError(f"{path} is not an unencrypted PEM private key") from None
        if not isinstance(key, Ed25519PrivateKey):
            raise InputError(f"{path} is not an Ed25519 private key")
        self._key = key
        self.public_pem = key.public_key().public_bytes(serialization.Encoding.PEM,
                                                        serialization.PublicFormat.SubjectPublicKeyInfo)
        self.fingerprint = fingerprint(load_public_key(self.public_pem))

    def sign(self, message: bytes) -> bytes:
        return self._key.sign(message)


def signature_text(signature: bytes) -> bytes:
    return base64.b64encode(signature) + b"\n"


def read_public_key(path: str | os.PathLike) -> bytes:
    """The PEM bytes of a trusted public key file (or KEYDIR/medrwr-deploy.pub)."""
    path = Path(path)
    if path.is_dir():
        path = path / PUBLIC_KEY_FILE
    try:
        pem = path.read_bytes()
    except OSError as e:
        raise InputError(f"cannot read the trusted key {path}: {e.strerror}") from None
    try:
        load_public_key(pem)
    except BundleRejected as e:
        raise InputError(f"{path}: {e}") from None
    return pem

