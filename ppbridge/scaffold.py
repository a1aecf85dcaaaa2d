"""Key pairs and configuration files for a whole bridge in one folder.

Used by ``ppbridge demo``, the integration tests and the benchmark, so all three run exactly
the configuration format users write.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

from ppbridge import keys

TomlValue = str | int | float | bool | list[str]


def _toml_value(value: TomlValue) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    escaped = value.replace("\\", "\\\\").replace('"', '\\"')
    return f'"{escaped}"'


def toml_text(tables: Mapping[str, Mapping[str, TomlValue]]) -> str:
    """A TOML document from ``{"table.name": {key: value}}``."""
    lines: list[str] = []
    for table, values in tables.items():
        lines.append(f"[{table}]")
        lines += [f"{key} = {_toml_value(value)}" for key, value in values.items()]
        lines.append("")
    return "\n".join(lines)


def make_keys(folder: Path, names: list[str], bits: int = keys.DEFAULT_BITS) -> dict[str, str]:
    """``folder/keys/NAME.key`` and ``.pub`` for each name; their fingerprints."""
    return {name: keys.write_key_pair(name, folder / "keys", bits)[2] for name in names}


def write_forwarder_config(
    folder: Path,
    redis_url: str,
    listen: str,
    routes: Mapping[str, Mapping[str, TomlValue]],
    admin: str = "",
    forwarder: Mapping[str, TomlValue] | None = None,
    name: str = "forwarder.toml",
) -> Path:
    """A forwarder config whose keys are ``keys/forwarder.key`` and ``keys/<proxy>.pub``."""
    tables: dict[str, Mapping[str, TomlValue]] = {
        "redis": {"url": redis_url},
        "forwarder": {"listen": listen, "signing_key": "keys/forwarder.key", **(forwarder or {})},
        "admin": {"listen": admin},
    }
    for proxy, route in routes.items():
        tables[f"proxies.{proxy}"] = {"public_key": f"keys/{proxy}.pub", **route}
    path = folder / name
    path.write_text(toml_text(tables))
    return path


def write_proxy_config(
    folder: Path,
    proxy: str,
    redis_url: str,
    upstream: str,
    admin: str = "",
    settings: Mapping[str, TomlValue] | None = None,
    rekey: Mapping[str, TomlValue] | None = None,
) -> Path:
    """A proxy config whose keys are ``keys/<proxy>.key`` and ``keys/forwarder.pub``."""
    tables: dict[str, Mapping[str, TomlValue]] = {
        "redis": {"url": redis_url},
        "proxy": {
            "name": proxy, "private_key": f"keys/{proxy}.key", "forwarder_key": "keys/forwarder.pub",
            "upstream": upstream, **(settings or {}),
        },
        "admin": {"listen": admin},
    }
    if rekey:
        tables["rekey"] = rekey
    path = folder / f"{proxy}.toml"
    path.write_text(toml_text(tables))
    return path
