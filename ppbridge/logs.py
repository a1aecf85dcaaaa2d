"""The forwarder's access log, and JSON logs for twistd.

One event per request, in the ``ppbridge.access`` namespace, with its parts as fields (so a
JSON observer carries them as such): client address, method, path (the query only when asked),
status code, cause (the ``X-PPBridge-Error`` value, or ``-``), body bytes in and out,
duration, proxy name and instance, and the whole line as ``access_line``; the event's
``log_time`` is its time. Never a header value
or a body; every text an attacker chooses is shown through :func:`ppbridge.logsafe.escape`.

``twistd --logger ppbridge.logs.json_logger ...`` writes every event as one JSON object per
line to standard output (``twist --log-format=json`` does the same for ``twist``).
"""

from __future__ import annotations

import sys
from functools import lru_cache
from time import time
from typing import Any

from twisted.logger import ILogObserver, Logger, LogLevel, jsonFileLogObserver

from ppbridge.errors import RequestError
from ppbridge.logsafe import escape

NO_CAUSE = "-"
CLIENT_CLOSED = 499  # the client left before any answer (nginx's convention)
PATH_SHOWN = 1024  # bytes of the path (or path and query) shown before "..."
# Fields separated by spaces: none can hold one (twisted.web splits the request line on them).
# client method path code cause in=bytes_in out=bytes_out duration(.3f)s proxy=proxy instance=instance
LINE = "%s %s %s %d %s in=%d out=%d %.3fs proxy=%s instance=%s"
# The access event's log_format: its line, built once (ppbridge.textlog writes it as is).
ACCESS_FORMAT = "{access_line}"
# escape() of the fields with few distinct values (method, cause, proxy, instance, client
# address), remembered: the same few strings on every line. Bounded, as a client picks some.
shown = lru_cache(maxsize=1024)(escape)


def json_logger() -> ILogObserver:
    """The observer factory for ``twistd --logger``: one JSON object per line on standard
    output (no RFC 7464 record separator, so line-based shippers and ``jq`` read it as is)."""
    return jsonFileLogObserver(sys.stdout, recordSeparator="")


def _causes(cls: type[RequestError]) -> dict[str, int]:
    found = {cls.cause: cls.status}
    for sub in cls.__subclasses__():
        found.update(_causes(sub))
    return found


CAUSES = _causes(RequestError)  # every X-PPBridge-Error cause -> its status


def status_of(cause: str) -> int:
    """The HTTP status ppbridge answers with for ``cause``; CLIENT_CLOSED for "client-gone"."""
    if cause == "client-gone":
        return CLIENT_CLOSED
    return CAUSES.get(cause, RequestError.status)


def client_address(request: Any) -> str:
    """The client's address as the access log shows it."""
    return shown(str(getattr(request.getClientAddress(), "host", "-")))


@lru_cache(maxsize=1024)
def instance_of(peer: bytes | None) -> str:
    """The instance part of a proxy process's name (``name:instance``) as the access log
    shows it; ``-`` for none (remembered: a few processes serve every request)."""
    return peer.rsplit(b":", 1)[-1].decode("ascii", "replace") if peer else "-"


class AccessLog:
    """Writes the access log line of each request (when ``enabled``); ``include_query`` adds
    the query string to the path (off by default: queries carry tokens and personal data)."""

    def __init__(self, enabled: bool = True, include_query: bool = False, logger: Logger | None = None) -> None:
        self.enabled = enabled
        self.include_query = include_query
        self.log = logger or Logger(namespace="ppbridge.access")

    def path(self, uri: bytes) -> str:
        return escape(uri if self.include_query else uri.split(b"?", 1)[0], PATH_SHOWN)

    def emit(self, *, client: str, method: bytes, uri: bytes, code: int | str, cause: str, bytes_in: int,
             bytes_out: int, duration: float, proxy: str, instance: str) -> None:
        if not self.enabled:
            return
        log = self.log
        shown_method, path, status = shown(method, 32), self.path(uri), int(code)
        shown_cause = shown(cause or NO_CAUSE)
        size_in, size_out, seconds = int(bytes_in), int(bytes_out), round(max(0.0, duration), 6)
        shown_proxy, shown_instance = shown(proxy), shown(instance)
        # The line is formatted here, once, by %-formatting (half the cost of str.format with ten
        # keywords); the event still carries every field. (Twisted's formatter, run by each text
        # observer, would walk a ten-field format in Python.) The event Logger.info would build
        # (Twisted 26.10, Logger.emit), keys in the same order, built here as one literal: emit's
        # check of the level sorts every LogLevel on each call.
        event: dict[str, Any] = {
            "access_line": LINE % (client, shown_method, path, status, shown_cause, size_in, size_out, seconds,
                                   shown_proxy, shown_instance),
            "client": client, "method": shown_method, "path": path, "code": status, "cause": shown_cause,
            "bytes_in": size_in, "bytes_out": size_out, "duration": seconds, "proxy": shown_proxy,
            "instance": shown_instance, "log_logger": log, "log_level": LogLevel.info, "log_namespace": log.namespace,
            "log_source": log.source, "log_format": ACCESS_FORMAT, "log_time": time(),
        }
        log.observer(event)
