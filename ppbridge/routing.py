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


def request_target(uri: bytes) -> tuple[bytes | None, bytes] | None:
    """(authority, ``/path?query``) of a request target, or None for anything but these two forms.

    Origin-form gives no authority. Absolute-form (``http(s)://host[:port]/path``) gives its
    ``host[:port]`` without user info: RFC 9112 section 3.2.2 has a server route such a
    request by this authority and ignore the Host header. An empty host is invalid
    (RFC 9110 section 4.2.1) and gives None. A fragment is left off.
    """
    if uri.startswith(b"/"):
        return None, uri
    for scheme in (b"http://", b"https://"):
        if uri[: len(scheme)].lower() == scheme:
            rest = uri[len(scheme) :]
            ends = [i for i in (rest.find(b"/"), rest.find(b"?"), rest.find(b"#")) if i >= 0]
            end = min(ends) if ends else len(rest)  # the authority ends at / ? or #
            authority = rest[:end].rpartition(b"@")[2]
            if not authority or authority.startswith(b":"):
                return None
            tail = rest[end:].split(b"#", 1)[0]
            return authority, tail if tail.startswith(b"/") else b"/" + tail
    return None


def origin_form(uri: bytes) -> bytes | None:
    """``/path?query`` from a request target; absolute-form is reduced; anything else is None."""
    parsed = request_target(uri)
    return None if parsed is None else parsed[1]


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
