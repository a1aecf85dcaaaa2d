"""SO_REUSEPORT for the forwarder's listening ports (``[forwarder] reuse_port = true``).

With SO_REUSEPORT set on every socket, several processes (of one user) can listen on the same
address and port; the kernel spreads new connections across them (Linux: by a hash of the
connection's addresses and ports). Each process stays what it was: its own forwarder id, its
own Redis connections, its own admin port.

Checked against Twisted 26.10. Its endpoint strings (``tcp:``, ``tcp6:``, ``ssl:``) have no
reuse-port option, but its reactor's ``listenTCP`` accepts, in place of the port number, a
:func:`twisted.internet.tcp.makeBinding` object whose ``reusePort=True`` sets SO_REUSEPORT
(added after 26.4, twisted/twisted#9101; documented on ``IReactorTCP2.listenTCP``, which the
reactor does not declare yet; setup.cfg requires 26.10). So this module changes no Twisted
class and reads no private attribute: :class:`ReusePortReactor` is handed to Twisted's own
endpoint parser in place of the reactor, and turns the port number the endpoint passes to
``listenTCP``/``listenSSL`` into such a binding. Every endpoint option (``backlog``,
``interface``, the TLS files) keeps Twisted's meaning; the reactor's ``listenSSL`` wraps the
factory in TLS and hands the binding on to its ``listenTCP``.

The other routes were more private or longer: a ``tcp.Port`` subclass overriding
``createInternetSocket`` must be constructed and started by hand (the reactor has no
``listenWith`` any more) behind an endpoint class of ours, and a socket of ours handed to
``adoptStreamPort`` means parsing the endpoint string ourselves (``ssl:`` options included).
If Twisted changes what an endpoint passes, or stops accepting the binding,
``tests/test_reuseport.py`` fails: it checks SO_REUSEPORT on listening sockets and runs two
forwarder processes on one port.
"""

from __future__ import annotations

import socket
from typing import Any, cast

from twisted.internet.endpoints import SSL4ServerEndpoint, TCP4ServerEndpoint, TCP6ServerEndpoint, serverFromString
from twisted.internet.interfaces import IListeningPort, IReactorTCP2
from twisted.internet.tcp import makeBinding

SHAREABLE_KINDS = "tcp, tcp6 or ssl"
_SHAREABLE = (TCP4ServerEndpoint, TCP6ServerEndpoint, SSL4ServerEndpoint)


def unavailable() -> str | None:
    """Why this system cannot share a port (no SO_REUSEPORT in its socket module), or None."""
    if not hasattr(socket, "SO_REUSEPORT"):
        return "this system has no SO_REUSEPORT (Linux 3.9+, the BSDs and macOS have it)"
    return None


def can_share(description: str) -> bool:
    """Whether ``description`` is an endpoint the stand-in reactor binds with SO_REUSEPORT
    (``tcp:``, ``tcp6:``, ``ssl:``). Parsing only: nothing listens."""
    from twisted.internet.testing import MemoryReactor

    try:
        return isinstance(serverFromString(MemoryReactor(), description), _SHAREABLE)
    except Exception:  # not an endpoint at all: the config's endpoint check says why
        return False


class ReusePortReactor:
    """Stands in for the reactor while Twisted's endpoints listen: ``listenTCP`` and
    ``listenSSL`` are the real reactor's, with the port number replaced by a binding that sets
    SO_REUSEPORT (and SO_REUSEADDR, as Twisted always does for listening ports)."""

    def __init__(self, reactor: Any) -> None:
        self._reactor = reactor

    def listenTCP(self, port: int, factory: Any, backlog: int = 50, interface: str = "") -> IListeningPort:
        binding = makeBinding(interface, port, reuseAddress=True, reusePort=True)
        # ``interface`` again: Twisted picks IPv4 or IPv6 from it, and checks it equals the binding's.
        return cast(IReactorTCP2, self._reactor).listenTCP(binding, factory, backlog, interface)

    def listenSSL(self, port: int, factory: Any, contextFactory: Any, backlog: int = 50,
                  interface: str = "") -> IListeningPort:
        binding = makeBinding(interface, port, reuseAddress=True, reusePort=True)
        # The reactor's listenSSL hands ``port`` unchanged to its own listenTCP (Twisted 26.10).
        listening: IListeningPort = self._reactor.listenSSL(binding, factory, contextFactory, backlog, interface)
        return listening


def listening_reactor(reactor: Any, reuse_port: bool) -> Any:
    """What to give Twisted's endpoint parser (``serverFromString``, ``strports.service``) as
    the reactor: with ``reuse_port`` the :class:`ReusePortReactor` in front of ``reactor``, else
    ``reactor`` itself. The config refuses ``reuse_port`` with an endpoint :func:`can_share`
    rejects, so no other kind of endpoint is ever built on the stand-in."""
    return ReusePortReactor(reactor) if reuse_port else reactor
