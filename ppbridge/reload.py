"""SIGHUP: re-read the config file and hand the new settings to a running service.

:func:`split_settings` compares old and new settings: the keys a running service can follow
are taken from the new file, the keys that only a restart applies keep their old values (each
one that changed is named in a warning). :class:`ReloadOnHangup` is the small service the taps
add: it installs the SIGHUP handler while running and restores the previous one on stop.
"""

from __future__ import annotations

import dataclasses
import signal
from typing import Any, Callable, TypeVar

from twisted.application.service import Service
from twisted.logger import Logger

from ppbridge.errors import ConfigError

log = Logger()
S = TypeVar("S")


def _comparable(value: Any) -> Any:
    """A value that compares by content: keys by their public numbers, tuples item by item."""
    if hasattr(value, "private_numbers"):
        return ("private", value.public_key().public_numbers())
    if hasattr(value, "public_numbers"):
        return ("public", value.public_numbers())
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return tuple((f.name, _comparable(getattr(value, f.name))) for f in dataclasses.fields(value))
    if isinstance(value, tuple):
        return tuple(_comparable(v) for v in value)
    return value


def changed_keys(old: Any, new: Any) -> list[str]:
    """The names of the fields of two settings objects that differ (``source`` aside)."""
    return [f.name for f in dataclasses.fields(old) if f.name != "source"
            and _comparable(getattr(old, f.name)) != _comparable(getattr(new, f.name))]


def split_settings(old: S, new: S, restart_only: tuple[str, ...]) -> tuple[S, list[str], list[str]]:
    """(the settings to run with, the keys applied now, the restart-only keys that changed and
    keep their old value)."""
    changed = changed_keys(old, new)
    held = [k for k in changed if k in restart_only]
    applied = [k for k in changed if k not in restart_only]
    effective = dataclasses.replace(new, **{k: getattr(old, k) for k in held})  # type: ignore[type-var]
    return effective, applied, held


def warn_held(source: Any, held: list[str]) -> None:
    for key in held:
        log.warn("reloading {file}: {key} changed; it needs a restart and keeps its old value until then",
                 file=str(source), key=key)


class ReloadOnHangup(Service):
    """While running, SIGHUP re-reads ``path`` (with the same command-line overrides) and calls
    ``apply(settings)``; a config error is logged as its one line and nothing changes."""

    def __init__(self, path: str, load: Callable[[], Any], apply: Callable[[Any], None], reactor: Any) -> None:
        self.path = path
        self._load = load
        self._apply = apply
        self._reactor = reactor
        self._previous: Any = None

    def startService(self) -> None:
        super().startService()
        self._previous = signal.signal(signal.SIGHUP, self._on_hangup)

    def stopService(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGHUP, self._previous)
            self._previous = None
        super().stopService()

    def _on_hangup(self, signum: int, frame: Any) -> None:
        self._reactor.callFromThread(self.reload)

    def reload(self) -> None:
        log.info("SIGHUP: re-reading {file}", file=self.path)
        try:
            settings = self._load()
        except ConfigError as err:
            log.error("reload refused, the running config stays: {error}", error=str(err))
            return
        try:
            self._apply(settings)
        except Exception:
            log.failure("reload failed; the running config stays")
