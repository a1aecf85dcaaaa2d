"""The ``[redis]`` table, the same on both sides: where the bus is and how to reach it.

One server (``url``), or a Sentinel group (``sentinels`` + ``master_name``: the master is
asked of the sentinels, ``url`` then gives only the scheme, user and database); TLS with
``rediss://``, a CA bundle (``ca_file``: every certificate in it is trusted) and an optional
client certificate (``cert_file`` + ``key_file``); passwords from private files only.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote

from ppbridge.configfields import MISSING, Key, Reader, check_ca_file, describe, password_from_file, split_url

NAMESPACE_PATTERN = r"[A-Za-z0-9_.-]{1,64}"
REDIS_KEYS = ("url", "password_file", "namespace", "ca_file", "cert_file", "key_file", "sentinels", "master_name",
              "sentinel_password_file")
_DB_RE = re.compile(r"/?|/([0-9]{1,10})")
_SENTINEL_RE = re.compile(r"(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]+):([0-9]{1,5})")
_MASTER_RE = re.compile(r"[A-Za-z0-9_.:-]{1,128}")


@dataclass(frozen=True)
class RedisSettings:
    """Where the bus is: a parsed ``redis://`` / ``rediss://`` URL plus what its files hold."""

    url: str = "redis://127.0.0.1:6379/0"
    host: str = "127.0.0.1"
    port: int = 6379
    db: int = 0
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    tls: bool = False
    ca_file: Path | None = None  # a PEM bundle: every certificate in it is a trusted CA
    cert_file: Path | None = None  # client certificate (mutual TLS), with key_file
    key_file: Path | None = None
    namespace: str = "ppbridge"
    sentinels: tuple[tuple[str, int], ...] = ()  # (host, port): find the master through them
    master_name: str | None = None
    sentinel_password: str | None = field(default=None, repr=False)

    @property
    def where(self) -> str:
        """How to reach Redis, for a log line or ``ppbridge check`` (never a secret)."""
        if self.sentinels:
            hosts = ", ".join(f"{h}:{p}" for h, p in self.sentinels)
            return f"master {self.master_name!r} via sentinels {hosts}"
        return f"{self.host}:{self.port}"


def read_redis(r: Reader, default: RedisSettings = RedisSettings()) -> RedisSettings:
    """The [redis] table, every value checked (files read, certificates and keys parsed)."""
    url = r.string(("redis", "url"), default.url)
    parts, port = split_url(r, ("redis", "url"), url, ("redis", "rediss"), 6379)
    if parts.password is not None:
        r.fail(("redis", "url"), "do not put the password in the URL; use redis.password_file")
    db = _DB_RE.fullmatch(parts.path)
    if db is None or int(db.group(1) or 0) > 2**31 - 1:
        r.fail(("redis", "url"), f"path must be empty or /N with N the database number, got {parts.path!r}")
    namespace = r.string(("redis", "namespace"), default.namespace)
    if not re.fullmatch(NAMESPACE_PATTERN, namespace):
        r.fail(("redis", "namespace"), f"must match {NAMESPACE_PATTERN}, got {describe(namespace)}")
    tls = parts.scheme == "rediss"
    ca_file, cert_file, key_file = _tls_files(r, tls)
    sentinels, master = _sentinels(r)
    return RedisSettings(
        url=url, host=parts.hostname or "", port=port, db=int(db.group(1) or 0),
        username=unquote(parts.username) if parts.username else None,
        password=password_from_file(r, ("redis", "password_file")), tls=tls, ca_file=ca_file, cert_file=cert_file,
        key_file=key_file, namespace=namespace, sentinels=sentinels, master_name=master,
        sentinel_password=password_from_file(r, ("redis", "sentinel_password_file")),
    )


def _tls_files(r: Reader, tls: bool) -> tuple[Path | None, Path | None, Path | None]:
    """ca_file, cert_file and key_file: only with rediss://; the last two together, matching."""
    found = {name: r.optional_path(("redis", name)) for name in ("ca_file", "cert_file", "key_file")}
    for name, path in found.items():
        if path is not None and not tls:
            r.fail(("redis", name), "only used with TLS; redis.url must start with rediss://")
    if found["ca_file"] is not None:
        check_ca_file(r, ("redis", "ca_file"), found["ca_file"])
    cert, key = found["cert_file"], found["key_file"]
    if (cert is None) != (key is None):
        missing = "key_file" if key is None else "cert_file"
        r.fail(("redis", missing), "a client certificate needs both redis.cert_file and redis.key_file")
    if cert is not None and key is not None:
        _check_client_pair(r, cert, key)
    return found["ca_file"], cert, key


def _check_client_pair(r: Reader, cert_path: Path, key_path: Path) -> None:
    """The certificate parses, the key parses (unencrypted, private to its owner), and they match."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    cert_key: Key = ("redis", "cert_file")
    key_key: Key = ("redis", "key_file")
    raw, _ = r.read_file(cert_key, cert_path)
    try:
        cert = x509.load_pem_x509_certificate(raw)
    except ValueError:
        r.fail(cert_key, f"{cert_path}: not a PEM certificate")
    raw, mode = r.read_file(key_key, key_path)
    if mode & 0o077:
        r.fail(key_key, f"{key_path}: permissions {mode:04o} are too open for a private key; chmod 600 it")
    try:
        private = serialization.load_pem_private_key(raw, password=None)
    except (ValueError, TypeError) as e:
        r.fail(key_key, f"{key_path}: not an unencrypted PEM private key ({e})")
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    if (cert.public_key().public_bytes(serialization.Encoding.DER, spki)
            != private.public_key().public_bytes(serialization.Encoding.DER, spki)):
        r.fail(key_key, f"{key_path}: does not belong to the certificate in redis.cert_file")


def _sentinels(r: Reader) -> tuple[tuple[tuple[str, int], ...], str | None]:
    """``sentinels`` (an array of "host:port") and ``master_name``, both or neither."""
    value = r.get(("redis", "sentinels"))
    if value is MISSING:
        if r.get(("redis", "master_name")) is not MISSING:
            r.fail(("redis", "master_name"), "only used with redis.sentinels")
        if r.get(("redis", "sentinel_password_file")) is not MISSING:
            r.fail(("redis", "sentinel_password_file"), "only used with redis.sentinels")
        return (), None
    if not isinstance(value, list) or not value:
        r.fail(("redis", "sentinels"), f'expected a non-empty array of "host:port", got {describe(value)}')
    found: list[tuple[str, int]] = []
    for i, item in enumerate(value, 1):
        match = _SENTINEL_RE.fullmatch(item) if isinstance(item, str) else None
        if match is None or not 1 <= int(match.group(2)) <= 65535:
            r.fail(("redis", "sentinels"), f'item {i}: expected "host:port" (IPv6 in brackets), got {describe(item)}')
        found.append((match.group(1).strip("[]"), int(match.group(2))))
    master = r.string(("redis", "master_name"), "")
    if not _MASTER_RE.fullmatch(master):
        r.fail(("redis", "master_name"), "required with redis.sentinels: the name the sentinels monitor "
                                         f"({_MASTER_RE.pattern}), got {describe(master)}")
    return tuple(found), master
