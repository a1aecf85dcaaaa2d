"""RSA key files and the operations ppbridge does with them.

Step 1 of the method (preset keys): every proxy has its own RSA private key, the forwarder
holds each proxy's public key plus its own signing key, whose public half every proxy pins.
This module owns PEM loading and writing, fingerprints (the only form in which a key is ever
logged), RSA-OAEP-SHA256 wrapping and RSA-PSS-SHA256 signatures.
"""

from __future__ import annotations

import base64
import hashlib
import os
import stat
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from ppbridge.errors import KeyFileError
from ppbridge.wire import NAME_PATTERN, NAME_RE

DEFAULT_BITS = 3072
MIN_BITS = 2048

_OAEP = padding.OAEP(mgf=padding.MGF1(hashes.SHA256()), algorithm=hashes.SHA256(), label=None)
_PSS = padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=padding.PSS.DIGEST_LENGTH)


def generate_private_key(bits: int = DEFAULT_BITS) -> rsa.RSAPrivateKey:
    """A fresh RSA private key (public exponent 65537)."""
    if bits < MIN_BITS:
        raise ValueError(f"RSA keys must have at least {MIN_BITS} bits")
    return rsa.generate_private_key(public_exponent=65537, key_size=bits)


def public_pem(key: rsa.RSAPublicKey) -> bytes:
    """SubjectPublicKeyInfo PEM of a public key."""
    return key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def fingerprint(key: rsa.RSAPublicKey | rsa.RSAPrivateKey) -> str:
    """``SHA256:<base64>`` of the public key's DER form, the way OpenSSH prints fingerprints."""
    if isinstance(key, rsa.RSAPrivateKey):
        key = key.public_key()
    der = key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    digest = hashlib.sha256(der).digest()
    return "SHA256:" + base64.b64encode(digest).decode("ascii").rstrip("=")


def write_key_pair(name: str, out_dir: Path, bits: int = DEFAULT_BITS) -> tuple[Path, Path, str]:
    """Write ``out_dir/name.key`` (PKCS8 PEM, mode 0600) and ``out_dir/name.pub``.

    ``name`` must be a proxy name (:data:`ppbridge.wire.NAME_RE`; "forwarder" is one), so the
    files land in ``out_dir`` and nowhere else: no "/", no leading ".", nothing to climb out
    with. Refuses to overwrite an existing private key. Returns both paths and the fingerprint.
    """
    if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name):
        raise KeyFileError(f"{name!r}: not a valid name; use a proxy name ({NAME_RE}) or \"forwarder\"")
    out_dir.mkdir(parents=True, exist_ok=True)
    key = generate_private_key(bits)
    key_path = out_dir / f"{name}.key"
    pub_path = out_dir / f"{name}.pub"
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    try:
        fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise KeyFileError(f"{key_path}: already exists; refusing to overwrite a private key") from None
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    pub_path.write_bytes(public_pem(key.public_key()))
    return key_path, pub_path, fingerprint(key)


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise KeyFileError(f"{path}: no such file") from None
    except OSError as e:
        raise KeyFileError(f"{path}: cannot read ({e.strerror})") from None


def _check_size(path: Path, key: rsa.RSAPublicKey | rsa.RSAPrivateKey) -> None:
    if key.key_size < MIN_BITS:
        raise KeyFileError(f"{path}: RSA key of {key.key_size} bits; at least {MIN_BITS} are required")


def load_private_key(path: Path) -> rsa.RSAPrivateKey:
    """Load an unencrypted RSA private key; refuse files others can read, like ssh does."""
    data = _read(path)
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        raise KeyFileError(f"{path}: permissions {mode:04o} are too open for a private key; chmod 600 it")
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError):
        raise KeyFileError(f"{path}: not a PEM private key (or it is encrypted)") from None
    if not isinstance(key, rsa.RSAPrivateKey):
        raise KeyFileError(f"{path}: not an RSA private key")
    _check_size(path, key)
    return key


def load_public_key(path: Path) -> rsa.RSAPublicKey:
    """Load an RSA public key (SubjectPublicKeyInfo PEM)."""
    data = _read(path)
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, TypeError):
        raise KeyFileError(f"{path}: not a PEM public key") from None
    if not isinstance(key, rsa.RSAPublicKey):
        raise KeyFileError(f"{path}: not an RSA public key")
    _check_size(path, key)
    return key


def sign(key: rsa.RSAPrivateKey, data: bytes) -> bytes:
    """RSA-PSS-SHA256 signature."""
    return key.sign(data, _PSS, hashes.SHA256())


def verify(key: rsa.RSAPublicKey, signature: bytes, data: bytes) -> bool:
    """True when ``signature`` is a valid RSA-PSS-SHA256 signature of ``data`` by ``key``."""
    try:
        key.verify(signature, data, _PSS, hashes.SHA256())
    except InvalidSignature:
        return False
    return True


def wrap(key: rsa.RSAPublicKey, secret: bytes) -> bytes:
    """Encrypt a short secret to the holder of the private key (RSA-OAEP-SHA256)."""
    return key.encrypt(secret, _OAEP)


def unwrap(key: rsa.RSAPrivateKey, blob: bytes) -> bytes | None:
    """Decrypt what :func:`wrap` made; None when it was not made for this key."""
    try:
        return key.decrypt(blob, _OAEP)
    except ValueError:
        return None
