"""Every Redis channel name ppbridge uses, in one place.

With namespace ``ns`` (default ``ppbridge``):

====================================  =====================================================
``ns:negotiate``                      key requests; every forwarder subscribes
``ns:announce``                       signed forwarder announcements; every proxy subscribes
``ns:n:<proxy name>:<32 hex>``        a proxy's temporary channel for the grants of one request
``ns:p:<proxy name>:<instance hex>``  one proxy process's data channel (requests, frames)
``ns:f:<forwarder hex>:ctl``          key confirmations to one forwarder process
``ns:f:<forwarder hex>:r``            the replies to one forwarder process (all its streams)
====================================  =====================================================

Every subscription is a plain SUBSCRIBE to one of these names, never a pattern: Redis checks
a PSUBSCRIBE pattern literally against an ACL user's channel rules, while SUBSCRIBE and
PUBLISH are glob-matched against them. The names are laid out so that each side can run
under an ACL user of its own (see :mod:`ppbridge.acl`): a proxy's channels all carry its
name (``ns:p:<name>:*``, ``ns:n:<name>:*``), a forwarder's start with ``ns:f:``. The
namespace and proxy names hold no glob character and no ``:`` (see
:mod:`ppbridge.redisconfig` and :data:`ppbridge.wire.NAME_RE`), so those patterns match
exactly these channels. Random parts come from :mod:`secrets`.
"""

from __future__ import annotations

import re
import secrets

from ppbridge.wire import NAME_RE

TOKEN_HEX = 32  # hex digits of the random part of a grant channel


class Channels:
    """Channel names under one namespace, as bytes (what goes on the wire)."""

    def __init__(self, namespace: str) -> None:
        self.prefix = namespace.encode("ascii")
        self.negotiate = self.prefix + b":negotiate"
        self.announce = self.prefix + b":announce"
        self._temp = re.compile(re.escape(self.prefix) + b":n:(" + NAME_RE.encode("ascii")
                                + b"):[0-9a-f]{%d}" % TOKEN_HEX)

    def negotiation_temp(self, proxy: str) -> bytes:
        """A fresh, unguessable channel for the grants answering one key request of ``proxy``."""
        return b"%s:n:%s:%s" % (self.prefix, proxy.encode("ascii"), secrets.token_hex(TOKEN_HEX // 2).encode("ascii"))

    def negotiation_owner(self, channel: bytes) -> str | None:
        """The proxy name in a well-formed grant channel (``ns:n:<name>:<32 hex>``), else None."""
        match = self._temp.fullmatch(channel)
        return match.group(1).decode("ascii") if match else None

    def proxy_data(self, name: str, instance: bytes) -> bytes:
        """The data channel of one proxy process."""
        return b"%s:p:%s:%s" % (self.prefix, name.encode("ascii"), instance.hex().encode("ascii"))

    def forwarder_control(self, forwarder: bytes) -> bytes:
        return b"%s:f:%s:ctl" % (self.prefix, forwarder.hex().encode("ascii"))

    def reply(self, forwarder: bytes) -> bytes:
        """The one reply channel of a forwarder process: every stream's answers, told apart
        by the stream id in their authenticated header."""
        return b"%s:f:%s:r" % (self.prefix, forwarder.hex().encode("ascii"))

    def is_reply_of(self, forwarder: bytes, channel: bytes) -> bool:
        """True for exactly this forwarder's reply channel."""
        return channel == self.reply(forwarder)

    # ACL patterns (ppbridge.acl): what each side may subscribe or publish to

    def proxy_patterns(self, name: str) -> tuple[bytes, bytes]:
        """Every data channel and every grant channel of proxy ``name``."""
        encoded = name.encode("ascii")
        return b"%s:p:%s:*" % (self.prefix, encoded), b"%s:n:%s:*" % (self.prefix, encoded)

    def forwarders_pattern(self) -> bytes:
        """Every forwarder's control and reply channel."""
        return self.prefix + b":f:*"

    def namespace_pattern(self) -> bytes:
        return self.prefix + b":*"
