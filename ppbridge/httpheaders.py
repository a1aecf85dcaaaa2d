"""HTTP header handling shared by both sides: what is hop-by-hop, what is added on the way."""

from __future__ import annotations

import ipaddress
from typing import Iterable, Mapping, Sequence

from twisted.web.http_headers import Headers, _nameEncoder

from ppbridge.wire import HeaderList

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

# RFC 9110 section 7.6.1, plus the legacy ones every proxy drops.
HOP_BY_HOP = frozenset(
    name.lower()
    for name in (
        b"Connection", b"Keep-Alive", b"Proxy-Authenticate", b"Proxy-Authorization", b"Proxy-Connection",
        b"TE", b"Trailer", b"Trailers", b"Transfer-Encoding", b"Upgrade",
    )
)


# HOP_BY_HOP as twisted.web's Headers spells names (``Te`` -> ``TE``): what getAllRawHeaders gives.
HOP_BY_HOP_CANONICAL = frozenset(name for name, _ in Headers({name: [b""] for name in HOP_BY_HOP}).getAllRawHeaders())
_HOST = frozenset((b"host",))

# What a client says about the hops before us: believed only from a trusted proxy.
FORWARDING = frozenset((b"x-forwarded-for", b"forwarded", b"x-forwarded-host", b"x-forwarded-proto"))


# Drop sets made per request from the same few inputs, remembered (bounded: see _with_connection).
_CONNECTION_DROPS: dict[tuple[frozenset[bytes], bytes], frozenset[bytes]] = {}
_UPSTREAM_DROPS: dict[frozenset[bytes], frozenset[bytes]] = {}
_REMEMBER = 64  # drop sets remembered at most, each for a Connection value of at most this many bytes


def _with_connection(drop: frozenset[bytes], values: Sequence[bytes]) -> frozenset[bytes]:
    """``drop`` and the names a Connection header's ``values`` list (lower-case); the few
    values upstreams send (``keep-alive``, ``close``) are answered from memory."""
    key = (drop, values[0]) if len(values) == 1 and len(values[0]) <= _REMEMBER else None
    known = None if key is None else _CONNECTION_DROPS.get(key)
    if known is not None:
        return known
    made = drop | {token.strip().lower() for value in values for token in value.split(b",")}
    if made == drop:
        made = drop  # nothing new (``keep-alive``): the same set, so callers can tell by identity
    if key is not None and len(_CONNECTION_DROPS) < _REMEMBER:
        _CONNECTION_DROPS[key] = made
    return made


def hop_names(headers: HeaderList, base: frozenset[bytes] = HOP_BY_HOP) -> frozenset[bytes]:
    """The lower-case names :func:`end_to_end` drops: ``base`` (the hop-by-hop ones) and those
    named in Connection."""
    drop = base
    for name, value in headers:
        if len(name) == 10 and name.lower() == b"connection":  # the length first: this runs per header
            drop = _with_connection(drop, (value,))
    return drop


def end_to_end(headers: HeaderList) -> HeaderList:
    """The headers without hop-by-hop ones, including those named in Connection."""
    drop = hop_names(headers)
    return [pair for pair in headers if pair[0].lower() not in drop]


def end_to_end_of(grouped: Iterable[tuple[bytes, Sequence[bytes]]]) -> HeaderList:
    """:func:`end_to_end` of headers grouped by name (``Headers.getAllRawHeaders()``): a name's
    values stay together, in their order; each name is looked at once."""
    groups = list(grouped)
    drop = HOP_BY_HOP
    for name, values in groups:
        if len(name) == 10 and name.lower() == b"connection":
            drop = _with_connection(drop, values)
    return [(name, value) for name, values in groups if name.lower() not in drop for value in values]


def end_to_end_of_raw(raw: Mapping[bytes, Sequence[bytes]]) -> HeaderList:
    """:func:`end_to_end_of` of a twisted.web ``Headers`` as ``dict(headers.getAllRawHeaders())``,
    whose names are in Twisted's canonical capitalization: the hop-by-hop names are looked up as
    Twisted spells them, no name lowered, unless a Connection header names one more."""
    connection = raw.get(b"Connection")
    if connection is None or _with_connection(HOP_BY_HOP, connection) is HOP_BY_HOP:
        return [(name, value) for name, values in raw.items() if name not in HOP_BY_HOP_CANONICAL for value in values]
    return end_to_end_of(raw.items())


def trusted_peer(client_ip: bytes, networks: Sequence[Network]) -> bool:
    """True when the TCP peer's address lies in one of ``networks`` (an IPv4-mapped IPv6
    address counts as its IPv4 address); False for anything that is not an IP address."""
    if not networks:
        return False  # no proxy trusted (the default): no address to parse, per request
    try:
        address: IPAddress = ipaddress.ip_address(client_ip.decode("ascii"))
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return any(address in network for network in networks)


def believed_client(peer_ip: bytes, headers: HeaderList, trusted_proxies: Sequence[Network] = ()) -> bytes:
    """The client address ppbridge believes: the TCP peer's, unless the peer is in
    ``trusted_proxies``; then X-Forwarded-For is walked from its right end (the entry the
    peer itself added) past every trusted proxy to the first address that is not one. An
    entry that is not an IP address stops the walk at the hop that added it (as does an
    absent header: the trusted peer is then the client); all trusted: the leftmost."""
    current = peer_ip
    if not trusted_peer(current, trusted_proxies):
        return current
    chain = [entry.strip() for name, value in headers if name.lower() == b"x-forwarded-for"
             for entry in value.split(b",")]
    for entry in reversed(chain):
        try:
            ipaddress.ip_address(entry.decode("ascii"))
        except (UnicodeDecodeError, ValueError):
            break
        current = entry
        if not trusted_peer(current, trusted_proxies):
            break
    return current


def forwarded_request_headers(headers: HeaderList, client_ip: bytes, host: bytes | None, proto: bytes,
                              trusted_proxies: Sequence[Network] = ()) -> HeaderList:
    """What the forwarder sends on: end-to-end headers plus X-Forwarded-For/-Host/-Proto.

    ``host`` is the request's authority (absolute-form) or its Host header: a Host header is
    passed on as that, once. A client is believed only when its address ``client_ip`` lies in
    ``trusted_proxies`` (a proxy in front of the forwarder): then its X-Forwarded-For chain
    is extended with ``client_ip``, and its Forwarded, X-Forwarded-Host and
    X-Forwarded-Proto are kept as they came (the last two set by us only when absent).
    Anyone else's X-Forwarded-For, Forwarded, X-Forwarded-Host and X-Forwarded-Proto are
    dropped: the upstream sees ``client_ip`` and the host and proto the forwarder received.
    """
    trusted = trusted_peer(client_ip, trusted_proxies)
    out: HeaderList = []
    chain: list[bytes] = []
    kept: set[bytes] = set()
    host_set = False
    drop = hop_names(headers)
    for name, value in headers:
        lower = name.lower()
        if lower in drop:
            continue
        if lower == b"host":
            if not host_set:
                out.append((name, value if host is None else host))
                host_set = True
        elif lower not in FORWARDING:
            out.append((name, value))
        elif trusted and lower == b"x-forwarded-for":
            chain.append(value)
        elif trusted:
            out.append((name, value))
            kept.add(lower)
    chain.append(client_ip)
    out.append((b"X-Forwarded-For", b", ".join(chain)))
    if host is not None and b"x-forwarded-host" not in kept:
        out.append((b"X-Forwarded-Host", host))
    if b"x-forwarded-proto" not in kept:
        out.append((b"X-Forwarded-Proto", proto))
    return out


def upstream_request_headers(headers: HeaderList, upstream_host: bytes,
                             also_drop: frozenset[bytes] = frozenset()) -> HeaderList:
    """What the proxy sends upstream: end-to-end headers with Host set to the upstream's
    (and without those named in ``also_drop``, lower-case)."""
    base = _UPSTREAM_DROPS.get(also_drop)
    if base is None:  # one set per also_drop (a constant of the caller's)
        base = _UPSTREAM_DROPS[also_drop] = HOP_BY_HOP | _HOST | also_drop
    drop = hop_names(headers, base)
    out = [pair for pair in headers if pair[0].lower() not in drop]
    out.append((b"Host", upstream_host))
    return out


def twisted_headers(headers: HeaderList) -> Headers:
    """A twisted.web ``Headers`` of ``headers``, equal to one filled by ``addRawHeader`` per
    pair (names in Twisted's canonical spelling, a name's values together in their order,
    line breaks in a value made spaces; a name that is not a token raises
    ``InvalidHeaderName``), filed in one pass: ``addRawHeader`` costs two Python calls more
    per header.

    Twisted's private ``Headers._rawHeaders`` (name -> values) is filled with the names spelled
    by its private ``_nameEncoder`` (what ``addRawHeader`` uses: it checks, and remembers up to
    a bound, each name), both checked against Twisted 26.10 and also used by
    ``ppbridge.webrequest.response_headers``; tests/test_httpheaders.py fails if they go."""
    made = Headers()
    raw: dict[bytes, list[bytes]] = made._rawHeaders
    spell = _nameEncoder.encode
    for name, value in headers:
        raw.setdefault(spell(name), []).append(b" ".join(value.splitlines()))
    return made


def upgrade_token(headers: HeaderList) -> bytes | None:
    """The protocol a request asks to switch to (``Connection: upgrade`` plus one ``Upgrade``
    header), or None. ``h2c`` is None too: RFC 9110 §7.8 lets a server ignore an Upgrade, so
    such a request goes on as plain HTTP/1.1 (ppbridge carries HTTP/1.1 semantics)."""
    values = [v.strip() for n, v in headers if len(n) == 7 and n.lower() == b"upgrade"]
    if len(values) != 1 or not values[0]:  # most requests: no Upgrade header, nothing more to look at
        return None
    connection = {t.strip().lower() for n, v in headers if n.lower() == b"connection" for t in v.split(b",")}
    if b"upgrade" not in connection:
        return None
    if values[0].lower().startswith(b"h2c"):
        return None
    return values[0]


def upgrade_headers(token: bytes) -> HeaderList:
    """The two hop-by-hop headers an upgrade request or its 101 answer carries on each hop."""
    return [(b"Connection", b"Upgrade"), (b"Upgrade", token)]
