"""The ``ppbridge`` command: keygen, fingerprint, check, acl, example-config, demo, --version."""

from __future__ import annotations

import argparse
import sys
import tomllib
from importlib import resources
from pathlib import Path

import ppbridge
from ppbridge import keys
from ppbridge.config import load_forwarder_config, load_proxy_config
from ppbridge.errors import ConfigError, KeyFileError

KINDS = ("forwarder", "proxy")


def example_config(kind: str) -> str:
    """The text of ``conf/KIND.example.toml``: installed as ``ppbridge/examples/`` (setup.cfg
    maps the package ``ppbridge.examples`` to the folder ``conf``, so there is one copy), or
    read from ``conf/`` next to the package in a source checkout."""
    name = f"{kind}.example.toml"
    shipped = resources.files(ppbridge).joinpath("examples", name)
    if shipped.is_file():
        return shipped.read_text(encoding="utf-8")
    return (Path(ppbridge.__file__).resolve().parent.parent / "conf" / name).read_text(encoding="utf-8")


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


def config_kind(path: Path, given: str | None) -> str:
    """Which loader checks ``path``: ``given`` (``--kind``), else the one table of [forwarder]
    and [proxy] the file has. A file that cannot be read or parsed is the forwarder loader's
    to report (both loaders read files the same way)."""
    if given:
        return given
    try:
        with path.open("rb") as f:
            data = tomllib.load(f)
        tables = [kind for kind in KINDS if kind in data]
    except (OSError, ValueError):  # tomllib.TOMLDecodeError is a ValueError
        return "forwarder"
    if len(tables) != 1:
        has = "both [forwarder] and [proxy] tables" if tables else "neither a [forwarder] nor a [proxy] table"
        raise ConfigError(f"{path}: has {has}; pass --kind forwarder or --kind proxy")
    return tables[0]


def _check(args: argparse.Namespace) -> int:
    path = Path(args.config)
    if config_kind(path, args.kind) == "proxy":
        p = load_proxy_config(path)
        print(f"{path}: ok: proxy {p.name!r} -> {p.upstream}, key {keys.fingerprint(p.private_key)}")
    else:
        fw = load_forwarder_config(path)
        routes = ", ".join(f"{r.name} ({r.path_prefix or '/'}{' ' + ','.join(r.hosts) if r.hosts else ''})"
                           for r in fw.proxies)
        shared = " with SO_REUSEPORT (reuse_port = true)" if fw.reuse_port else ""
        print(f"{path}: ok: forwarder on {', '.join(fw.listen)}{shared}; routes: {routes}")
        if fw.reuse_port and fw.admin_listen:
            print(f"{path}: note: admin.listen {fw.admin_listen!r} serves one process; give each forwarder "
                  "sharing the port an admin endpoint of its own (twistd ppforwarder --admin ...)")
    return 0


def _acl(args: argparse.Namespace) -> int:
    """The ACL SETUSER lines on stdout (ready for redis-cli, also through a pipe); what the
    operator must still do, as ``#`` comments, on stderr."""
    from ppbridge import acl

    path = Path(args.config)
    lines, comments = acl.render(acl.users(path, config_kind(path, args.kind)))
    for line, notes in zip(lines, comments):
        print("\n".join(notes), file=sys.stderr, flush=True)
        print(line, flush=True)
    return 0


def _example_config(args: argparse.Namespace) -> int:
    sys.stdout.write(example_config(args.kind))
    return 0


def _demo(args: argparse.Namespace) -> int:
    from ppbridge import demo

    return demo.run(args.port)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ppbridge", description="ppbridge: HTTP into private networks over Redis.")
    p.add_argument("--version", action="version", version=f"ppbridge {ppbridge.__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    k = sub.add_parser("keygen", help="make an RSA key pair (NAME.key mode 0600, NAME.pub)")
    k.add_argument("name", help='a proxy name, or "forwarder" (letters, digits, "_", ".", "-"; no "/")')
    k.add_argument("--out", default=".", help="folder for the two files (default: .)")
    k.add_argument("--bits", type=int, default=keys.DEFAULT_BITS)
    k.set_defaults(func=_keygen)
    f = sub.add_parser("fingerprint", help="print the fingerprint of a key file")
    f.add_argument("file")
    f.set_defaults(func=_fingerprint)
    c = sub.add_parser("check", help="validate a forwarder or proxy config")
    c.add_argument("config")
    c.add_argument("--kind", choices=KINDS,
                   help="which service the file is for (needed when it has not exactly one of "
                        "the [forwarder] and [proxy] tables)")
    c.set_defaults(func=_check)
    a = sub.add_parser("acl", help="print the Redis ACL SETUSER lines for a forwarder and its proxies (or one proxy)")
    a.add_argument("config", help="a forwarder config (its user and every proxy's), or a proxy config (its user)")
    a.add_argument("--kind", choices=KINDS, help="which service the file is for (as for check)")
    a.set_defaults(func=_acl)
    e = sub.add_parser("example-config", help="print the example config for a forwarder or a proxy")
    e.add_argument("kind", choices=KINDS)
    e.set_defaults(func=_example_config)
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
