"""Failed log-ins per client address: how many one client may get wrong before it must wait.

:class:`FailureLimiter` gives each client address a budget of ``max_failures`` attempts that
refills at ``max_failures / window`` tokens a second (a token bucket, as in
:mod:`ppbridge.ratelimit`). An attempt takes a token *before* its password is checked, so
concurrent guesses count too, and a right password gives it back: only failures stay spent.
With no token left an attempt is refused at once (429 ``too-many-attempts`` with
``Retry-After``, the whole seconds until a token is back), before any hash is computed, so a
guesser costs no bcrypt work either.

Memory is bounded: at most ``max_clients`` addresses are remembered (least recently seen
forgotten first; an address not seen for a while has its whole budget back anyway). IPv6
addresses count per /64, the block one host or one customer usually holds. No I/O: the
caller passes ``now`` (seconds); a clock stepping back mints nothing.
"""

from __future__ import annotations

import ipaddress
import math
from collections import OrderedDict

MAX_CLIENTS = 10000  # addresses remembered, about 200 bytes each


def client_key(address: str) -> str:
    """The key an address counts under: IPv4 as is, IPv6 by its /64 (an IPv4-mapped IPv6
    address as its IPv4), anything else as given."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return address
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)


class FailureLimiter:
    """Per client address, a budget of ``max_failures`` log-in attempts refilled over ``window`` s."""

    def __init__(self, max_failures: int, window: float, max_clients: int = MAX_CLIENTS) -> None:
        if max_failures < 1 or window <= 0 or max_clients < 1:
            raise ValueError("a failure limiter needs max_failures >= 1, window > 0 and max_clients >= 1")
        self.burst = float(max_failures)
        self.rate = max_failures / window
        self.max_clients = max_clients
        self._clients: OrderedDict[str, list[float]] = OrderedDict()  # key -> [tokens, last]

    def __len__(self) -> int:
        return len(self._clients)

    def take(self, address: str, now: float) -> float | None:
        """Take a token for an attempt from ``address``: None when taken, else the seconds
        (whole, at least 1) until one is back."""
        key = client_key(address)
        state = self._clients.get(key)
        if state is None:
            while len(self._clients) >= self.max_clients:
                self._clients.popitem(last=False)
            state = self._clients[key] = [self.burst, now]
        else:
            self._clients.move_to_end(key)
            if now > state[1]:
                state[0] = min(self.burst, state[0] + (now - state[1]) * self.rate)
                state[1] = now
        if state[0] >= 1.0:
            state[0] -= 1.0
            return None
        return float(max(1, math.ceil((1.0 - state[0]) / self.rate)))

    def refund(self, address: str) -> None:
        """The attempt from ``address`` succeeded: its token comes back."""
        state = self._clients.get(client_key(address))
        if state is not None:
            state[0] = min(self.burst, state[0] + 1.0)
