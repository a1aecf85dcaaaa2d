"""Every Redis channel name ppbridge uses, in one place.

With namespace ``ns`` (default ``ppbridge``):

====================================  =====================================================
``ns:negotiate``                      key requests; every forwarder subscribes
``ns:announce``                       signed forwarder announcements; every proxy subscribes
``ns:n:<32 hex>``                     a proxy's temporary channel for the grants of one request
``ns:p:<proxy name>:<instance hex>``  one proxy process's data channel (requests, frames)
``ns:f:<forwarder hex>:ctl``          key confirmations to one forwarder process
``ns:f:<forwarder hex>:r<32 hex>``    one request's reply channel (unguessable, per request)
====================================  =====================================================

A forwarder pattern-subscribes to ``ns:f:<its id>:*`` once, so a new reply channel costs no
SUBSCRIBE round trip. Random parts come from :mod:`secrets`.
"""

from __future__ import annotations

import secrets


class Channels:
    """Channel names under one namespace, as bytes (what goes on the wire)."""

    def __init__(self, namespace: str) -> None:
        self.prefix = namespace.encode("ascii")
        self.negotiate = self.prefix + b":negotiate"
        self.announce = self.prefix + b":announce"

    def negotiation_temp(self) -> bytes:
        """A fresh, unguessable channel for the grants answering one key request."""
        return self.prefix + b":n:" + secrets.token_hex(16).encode("ascii")

    def is_negotiation_temp(self, channel: bytes) -> bool:
        return channel.startswith(self.prefix + b":n:") and len(channel) == len(self.prefix) + 3 + 32

    def proxy_data(self, name: str, instance: bytes) -> bytes:
        """The data channel of one proxy process."""
        return b"%s:p:%s:%s" % (self.prefix, name.encode("ascii"), instance.hex().encode("ascii"))

    def forwarder_pattern(self, forwarder: bytes) -> bytes:
        """The one pattern a forwarder subscribes to for everything addressed to it."""
        return b"%s:f:%s:*" % (self.prefix, forwarder.hex().encode("ascii"))

    def forwarder_control(self, forwarder: bytes) -> bytes:
        return b"%s:f:%s:ctl" % (self.prefix, forwarder.hex().encode("ascii"))

    def reply(self, forwarder: bytes) -> bytes:
        """A fresh, unguessable reply channel for one request, covered by the forwarder's pattern."""
        return b"%s:f:%s:r%s" % (self.prefix, forwarder.hex().encode("ascii"), secrets.token_hex(16).encode("ascii"))

    def is_reply_of(self, forwarder: bytes, channel: bytes) -> bool:
        """True for a reply channel under this forwarder's pattern."""
        head = b"%s:f:%s:r" % (self.prefix, forwarder.hex().encode("ascii"))
        return channel.startswith(head) and len(channel) == len(head) + 32
