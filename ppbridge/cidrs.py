"""``allow_cidrs`` / ``deny_cidrs``: who may come in, by client address.

An address in ``deny_cidrs`` is refused; otherwise, when ``allow_cidrs`` is not empty, only
addresses in it pass. The address judged is :attr:`Facts.client
<ppbridge.accesscheck.Facts>`: the TCP peer's, or the one X-Forwarded-For names when the peer
is a ``trusted_proxies`` hop (an untrusted client cannot choose it). An IPv4-mapped IPv6
address counts as its IPv4 address. A refusal is 403 ``forbidden``, reason
``address-denied`` or ``address-not-allowed``; the answer does not say which.
"""

from __future__ import annotations

import ipaddress
from typing import Sequence

from ppbridge.accesscheck import ALLOW, Facts, Verdict
from ppbridge.errors import Forbidden

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class AddressCheck:
    """The allow and deny lists of one route."""

    name = "allow_cidrs/deny_cidrs"
    strips: frozenset[bytes] = frozenset()

    def __init__(self, allow: Sequence[Network], deny: Sequence[Network]) -> None:
        self.allow = tuple(allow)
        self.deny = tuple(deny)

    def check(self, facts: Facts) -> Verdict:
        try:
            address = ipaddress.ip_address(facts.client)
        except ValueError:
            return Forbidden("address-not-allowed", note="the client address is not an IP address")
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        if any(address in network for network in self.deny):
            return Forbidden("address-denied", note="the address is in deny_cidrs")
        if self.allow and not any(address in network for network in self.allow):
            return Forbidden("address-not-allowed", note="the address is not in allow_cidrs")
        return ALLOW
