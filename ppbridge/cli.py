"""The ``ppbridge`` command: keygen, fingerprint, check, demo."""

from __future__ import annotations

import argparse
import sys
import tomllib
from pathlib import Path

from ppbridge import keys
from ppbridge.config import load_forwarder_config, load_proxy_config
from ppbridge.errors import ConfigError, KeyFileError


def _keygen(args: argparse.Namespace) -> int:
    key_path, pub_path, fp = keys.write_key_pair(args.name, Path(args.out), args.bits)
    print(f"private key: {key_path} (mode 0600; keep it on this host only)")
    print(f"public key:  {pub_path}")
    print(f"fingerprint: {fp}")
    return 0


def _fingerprint(args: argparse.Namespace) -> int:
    path = Path(args.file)
    text = path.read_bytes() if path.exists() else b""
    key = keys.load_private_key(path) if b"PRIVATE KEY" in text else keys.load_public_key(path)
    print(keys.fingerprint(key))
    return 0


def _check(args: argparse.Namespace) -> int:
    path = Path(args.config)
    try:
        with path.open("rb") as f:
            kind = "proxy" if "proxy" in tomllib.load(f) else "forwarder"
    except (OSError, tomllib.TOMLDecodeError):
        kind = "forwarder"  # let the loader produce the precise message
    if kind == "proxy":
        p = load_proxy_config(path)
        print(f"{path}: ok: proxy {p.name!r} -> {p.upstream}, key {keys.fingerprint(p.private_key)}")
    else:
        fw = load_forwarder_config(path)
        routes = ", ".join(f"{r.name} ({r.path_prefix or '/'}{' ' + ','.join(r.hosts) if r.hosts else ''})"
                           for r in fw.proxies)
        print(f"{path}: ok: forwarder on {', '.join(fw.listen)}; routes: {routes}")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from ppbridge import demo

    return demo.run(args.port)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ppbridge", description="ppbridge: HTTP into private networks over Redis.")
    sub = p.add_subparsers(dest="command", required=True)
    k = sub.add_parser("keygen", help="make an RSA key pair (NAME.key mode 0600, NAME.pub)")
    k.add_argument("name")
    k.add_argument("--out", default=".", help="folder for the two files (default: .)")
    k.add_argument("--bits", type=int, default=keys.DEFAULT_BITS)
    k.set_defaults(func=_keygen)
    f = sub.add_parser("fingerprint", help="print the fingerprint of a key file")
    f.add_argument("file")
    f.set_defaults(func=_fingerprint)
    c = sub.add_parser("check", help="validate a forwarder or proxy config")
    c.add_argument("config")
    c.set_defaults(func=_check)
    d = sub.add_parser("demo", help="run Redis, keys, forwarder, proxy and a sample service on this machine")
    d.add_argument("--port", type=int, default=8080, help="forwarder port on 127.0.0.1 (default 8080)")
    d.set_defaults(func=_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return int(args.func(args))
    except (ConfigError, KeyFileError, ValueError) as err:
        print(f"ppbridge {args.command}: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
