"""HTTP header handling shared by both sides: what is hop-by-hop, what is added on the way."""

from __future__ import annotations

from ppbridge.wire import HeaderList

# RFC 9110 section 7.6.1, plus the legacy ones every proxy drops.
HOP_BY_HOP = frozenset(
    name.lower()
    for name in (
        b"Connection", b"Keep-Alive", b"Proxy-Authenticate", b"Proxy-Authorization", b"Proxy-Connection",
        b"TE", b"Trailer", b"Trailers", b"Transfer-Encoding", b"Upgrade",
    )
)


def end_to_end(headers: HeaderList) -> HeaderList:
    """The headers without hop-by-hop ones, including those named in Connection."""
    named = {
        token.strip().lower()
        for name, value in headers
        if name.lower() == b"connection"
        for token in value.split(b",")
    }
    return [(n, v) for n, v in headers if n.lower() not in HOP_BY_HOP and n.lower() not in named]


def forwarded_request_headers(headers: HeaderList, client_ip: bytes, host: bytes | None, proto: bytes) -> HeaderList:
    """What the forwarder sends on: end-to-end headers plus X-Forwarded-For/-Host/-Proto.

    An existing X-Forwarded-For chain is extended; X-Forwarded-Host and -Proto describe the
    hop the forwarder itself received.
    """
    out: HeaderList = []
    chain: list[bytes] = []
    for name, value in end_to_end(headers):
        lower = name.lower()
        if lower == b"x-forwarded-for":
            chain.append(value)
        elif lower not in (b"x-forwarded-host", b"x-forwarded-proto"):
            out.append((name, value))
    chain.append(client_ip)
    out.append((b"X-Forwarded-For", b", ".join(chain)))
    if host is not None:
        out.append((b"X-Forwarded-Host", host))
    out.append((b"X-Forwarded-Proto", proto))
    return out


def upstream_request_headers(headers: HeaderList, upstream_host: bytes) -> HeaderList:
    """What the proxy sends upstream: end-to-end headers with Host set to the upstream's."""
    out = [(n, v) for n, v in end_to_end(headers) if n.lower() != b"host"]
    out.append((b"Host", upstream_host))
    return out
