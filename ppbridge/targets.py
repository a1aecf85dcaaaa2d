"""Is a request target confined to the service's base path? No I/O.

The proxy calls ``[proxy] upstream`` + the target, so a target that climbs (``/../admin``)
reaches whatever lies beside the upstream's base path on any server that removes dot-segments
(RFC 3986 section 5.2.4) or merges empty ones, and an empty segment can make ``//host/x``
read as a network-path reference. ppbridge rejects such targets rather than normalising them:
a normalised path would be a different request from the one the client sent.

Encoded variants count as what they decode to: ``%2e`` is ``.``, ``%2f`` is ``/``, ``%5c``
(and ``\\``) is ``/`` as Windows servers read it, in any case and however often encoded
(``%252e``), so an upstream that decodes before normalising cannot be climbed either. Also
caught: path parameters on a dot-segment (``..;x``, which Tomcat and Jetty take for ``..``),
segments of dots and blanks (``...``, ``.. ``, which Windows servers trim to ``..``), a NUL
(``..%00``) and the overlong UTF-8 forms of ``.`` and ``/`` that old servers decode. An
encoded slash that cannot climb (``/projects/group%2Fproject``) passes; so do dots inside a
name (``/a..b``).
"""

from __future__ import annotations

import re
from urllib.parse import unquote_to_bytes

# A path every check below lets through, recognised at once (most paths are like it): no "%",
# "\\", ";", NUL or non-ASCII byte, and every segment but a single trailing empty one holds a
# byte other than a dot or a blank. Anything else takes the full walk.
_SEGMENT = rb"[. \t]*[^/%\\;\x00\x80-\xff. \t][^/%\\;\x00\x80-\xff]*"  # one way to match: linear
_PLAIN = re.compile(rb"/(?:%s(?:/%s)*/?)?" % (_SEGMENT, _SEGMENT))
MAX_DECODE_ROUNDS = 4  # a path still changing after this many percent-decodings is refused
_DOTS = b". \t"  # a segment of only these is a dot-segment to some server (Windows trims the rest)
_OVERLONG = ((b"\xc0\xae", b"."), (b"\xe0\x80\xae", b"."), (b"\xc0\xaf", b"/"), (b"\xe0\x80\xaf", b"/"))


def _decoded(path: bytes) -> bytes | None:
    """``path`` percent-decoded until stable, or None when it is still changing."""
    for _ in range(MAX_DECODE_ROUNDS + 1):
        decoded = unquote_to_bytes(path)
        if decoded == path:
            return path
        path = decoded
    return None


def confined(target: bytes) -> bool:
    """True when an origin-form ``target`` stays under any base path it is appended to.

    Only the path (before the first ``?``) is checked; the query is the upstream's business.
    False for a target that does not start with ``/``, or whose decoded path holds a NUL, a
    segment made only of dots (``.``, ``..``, ``...``, also with trailing blanks), or an empty
    segment other than the leading one and a single trailing one (path parameters, ``;...``,
    are left off a segment before these checks).
    """
    path = target.split(b"?", 1)[0]
    return _PLAIN.fullmatch(path) is not None or _walk(path)


def _walk(path: bytes) -> bool:
    """The checks of :func:`confined`, one by one, on the path of a target."""
    if not path.startswith(b"/"):
        return False
    decoded = _decoded(path)
    if decoded is None:
        return False
    for overlong, plain in _OVERLONG:
        decoded = decoded.replace(overlong, plain)
    if b"\0" in decoded:  # a C string ends there: "..%00" can be ".."
        return False
    segments = decoded.replace(b"\\", b"/").split(b"/")[1:]
    for i, segment in enumerate(segments):
        name = segment.split(b";", 1)[0]  # "..;x" is ".." to Tomcat and Jetty
        if name and not name.strip(_DOTS):  # ".", "..", and what Windows trims to them
            return False
        if not name and i != len(segments) - 1:
            return False
    return True
