"""What an access check is given and what it returns (see :mod:`ppbridge.access` for how one
plugs in): :class:`Facts` in; :data:`ALLOW`, an :class:`Allow` carrying headers, a
:class:`~ppbridge.errors.RequestError` or a Deferred of one of those out; :class:`Context`,
what a check is built with.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING, Any, Callable, Protocol, TypeVar, Union

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime

from ppbridge.errors import RequestError
from ppbridge.wire import HeaderList

if TYPE_CHECKING:
    from cryptography.x509 import Certificate

T = TypeVar("T")
Runner = Callable[[Callable[[], T]], "Deferred[T]"]  # runs blocking work off the reactor thread


@dataclass(frozen=True)
class Allow:
    """A check's yes; ``headers`` are set on the upstream request (a check lists their names in
    its ``strips`` too, so a client's own copies never pass)."""

    headers: tuple[tuple[bytes, bytes], ...] = ()


ALLOW = Allow()
Verdict = Union[Allow, RequestError, "Deferred[Allow | RequestError]"]


class Check(Protocol):
    """One access mechanism for one route. ``name`` labels it in logs; ``strips`` are the
    lowercased request header names never forwarded as the client sent them (the credential it
    consumed, the headers it sets itself), whatever the verdict."""

    name: str
    strips: frozenset[bytes]

    def check(self, facts: Facts) -> Verdict:
        """ALLOW (or an Allow with headers), a refusal, or a Deferred of one; never raises."""


class Facts:
    """What the forwarder knows of one request when its route's policy runs. Read only.

    ``client`` is the address checks judge (the TCP peer's, or from X-Forwarded-For when the
    peer is in ``trusted_proxies``: :func:`ppbridge.httpheaders.believed_client`), ``peer``
    the TCP peer's; ``method`` and ``target`` the request line's (``target`` as sent, with the
    route's prefix and any query); ``host`` the authority it was routed by; ``headers`` every
    request header as received, in order per name; ``secure`` whether it came over TLS;
    ``trusted`` whether the TCP peer is one of ``trusted_proxies``.
    """

    def __init__(self, route: str, client: str, peer: str, method: bytes, target: bytes, host: bytes | None,
                 headers: HeaderList, secure: bool, transport: Any = None, trusted: bool = False) -> None:
        self.route, self.client, self.peer = route, client, peer
        self.method, self.target, self.host = method, target, host
        self.headers, self.secure, self.trusted = headers, secure, trusted
        self._transport = transport

    def values(self, name: bytes) -> list[bytes]:
        """Every value of the header ``name`` (lowercase), in the order received."""
        return [value for n, value in self.headers if n.lower() == name]

    @cached_property
    def certificate(self) -> Certificate | None:
        """The TLS client certificate the connection presented, or None (plain HTTP, or no
        certificate). Not verified by the handshake, which takes any: :mod:`ppbridge.clientcert`
        verifies it per route."""
        get = getattr(self._transport, "getPeerCertificate", None)
        peer = get() if get is not None else None
        return peer.to_cryptography() if peer is not None else None

    @cached_property
    def intermediates(self) -> list[Certificate]:
        """The certificates the client sent after its own (intermediate CAs), [] without TLS.
        ``getHandle()`` of Twisted's TLS transport is its pyOpenSSL Connection."""
        handle = getattr(self._transport, "getHandle", lambda: None)()
        get = getattr(handle, "get_peer_cert_chain", None)
        chain: list[Certificate] = (get(as_cryptography=True) if get is not None else None) or []
        return [cert for cert in chain if cert != self.certificate]


@dataclass
class Context:
    """What checks are built with: the clock, the reactor (also for network clients), a
    :data:`Runner` for blocking work, and :meth:`keep`, so state that must outlive a reload
    (a watched file, a failure count) is carried over to the checks built for the new config."""

    clock: IReactorTime
    reactor: Any
    run_blocking: Runner[Any]
    previous: dict[Any, Any] = field(default_factory=dict)
    kept: dict[Any, Any] = field(default_factory=dict)

    def keep(self, key: Any, make: Callable[[], T]) -> T:
        """The object the previous configuration held under ``key`` (hashable, naming what the
        object depends on), else ``make()``; either way held under ``key`` from now on."""
        if key not in self.kept:
            self.kept[key] = self.previous[key] if key in self.previous else make()
        found: T = self.kept[key]
        return found
