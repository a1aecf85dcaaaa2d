"""Which proxy serves a request: by Host, by path prefix, or both. No I/O."""

from __future__ import annotations

from typing import Sequence

from ppbridge.config import Route


def _host_matches(route: Route, host: bytes | None) -> bool:
    if not route.hosts:
        return True
    if host is None:
        return False
    name = host.decode("latin-1").lower()
    bare = name.rsplit(":", 1)[0] if not name.endswith("]") else name
    return name in route.hosts or bare in route.hosts


def _strip(prefix: str, path: bytes) -> bytes | None:
    """The path with ``prefix`` removed at a segment boundary, or None when it doesn't match."""
    if not prefix:
        return path
    p = prefix.encode("latin-1")
    if path == p:
        return b"/"
    if path.startswith(p) and path[len(p) : len(p) + 1] in (b"/", b"?"):
        rest = path[len(p) :]
        return rest if rest.startswith(b"/") else b"/" + rest
    return None


def origin_form(uri: bytes) -> bytes | None:
    """``/path?query`` from a request target; absolute-form is reduced; anything else is None."""
    if uri.startswith(b"/"):
        return uri
    for scheme in (b"http://", b"https://"):
        if uri[: len(scheme)].lower() == scheme:
            rest = uri[len(scheme) :]
            ends = [i for i in (rest.find(b"/"), rest.find(b"?"), rest.find(b"#")) if i >= 0]
            tail = rest[min(ends) :] if ends else b""  # the authority ends at / ? or #
            tail = tail.split(b"#", 1)[0]
            return tail if tail.startswith(b"/") else b"/" + tail
    return None


class Router:
    """Routes in precedence order: a Host match beats none, then the longest path prefix."""

    def __init__(self, routes: Sequence[Route]) -> None:
        self._routes = sorted(routes, key=lambda r: (not r.hosts, -len(r.path_prefix)))

    def match(self, host: bytes | None, target: bytes) -> tuple[Route, bytes] | None:
        """(route, target with the prefix stripped) for an origin-form target, or None."""
        for route in self._routes:
            if _host_matches(route, host):
                stripped = _strip(route.path_prefix, target)
                if stripped is not None:
                    return route, stripped
        return None
