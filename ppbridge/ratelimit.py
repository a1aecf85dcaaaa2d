"""Budgets for expensive work that anyone on the bus can ask for, without I/O.

A forged KEY_REQUEST with a known proxy name, a fresh timestamp and a new nonce passes every
check before the RSA signature, so each one costs the forwarder a verification (tens of
microseconds). :class:`NegotiationGate` sits in front of the negotiator: it looks at the raw
message (the proxy name is at a fixed offset) and admits at most a few requests per second
per configured proxy name, and a bounded number per second overall. A message over budget
is refused before it is decoded, for the price of a slice and a dict lookup.

A forged ANNOUNCE costs a proxy the same (decode, time check, RSA verify); the proxy takes a
token from one :class:`TokenBucket` (``ANNOUNCE_RATE``/``ANNOUNCE_BURST``) before decoding.

Memory is bounded: one bucket per configured proxy name and one shared by everything else
(unknown names, malformed messages). Callers pass ``now`` in seconds; a clock stepping back
mints no tokens.

What a gate cannot do: tell a proxy's genuine request from a forgery under its name (so a
flood under one name also holds back that name's own negotiations until it stops; keys in
use keep working), or make the process read the bus faster than it can (a flood beyond that
makes Redis drop the subscriber connection for its output buffer: the bus reads ``ns:negotiate``
and ``ns:announce`` on a connection of their own, so that costs only their messages).
"""

from __future__ import annotations

from typing import Iterable

from ppbridge.errors import BusMessageError
from ppbridge.wire import VERSION, MsgType

# A proxy negotiates when its Redis link comes up, on each rekey and when a new forwarder
# announces itself: a handful per minute. These budgets leave plenty of room for that, and
# for several instances of one proxy restarting together, while bounding the signature
# checks a flood can cause to GLOBAL_RATE a second (~13 ms of CPU at RSA-3072).
PER_NAME_RATE = 5.0
PER_NAME_BURST = 20.0
GLOBAL_RATE = 200.0
GLOBAL_BURST = 400.0
# Each forwarder announces itself every announce_interval (15 s by default) and at most once a
# second more on an eviction: 10 a second with a burst of 20 leave room for many forwarders and
# bound a flood of forged announcements to ten signature checks a second per proxy process.
ANNOUNCE_RATE = 10.0
ANNOUNCE_BURST = 20.0
_NAME_OFFSET = 4  # u8 version, u8 type, u16 name length


class TokenBucket:
    """``rate`` tokens a second, holding at most ``burst``; starts full.

    Time only moves forward as far as the bucket is concerned: a ``now`` earlier than the
    last one seen adds nothing (a clock stepping back cannot mint tokens).
    """

    __slots__ = ("rate", "burst", "_tokens", "_last")

    def __init__(self, rate: float, burst: float, now: float) -> None:
        if rate <= 0 or burst < 1:
            raise ValueError("a token bucket needs rate > 0 and burst >= 1")
        self.rate = rate
        self.burst = burst
        self._tokens = burst
        self._last = now

    def tokens(self, now: float) -> float:
        """The tokens available at ``now`` (refilling up to ``burst``)."""
        if now > self._last:
            self._tokens = min(self.burst, self._tokens + (now - self._last) * self.rate)
            self._last = now
        return self._tokens

    def ready(self, now: float) -> bool:
        """Whether one token is available at ``now`` (takes nothing)."""
        return self.tokens(now) >= 1.0

    def take(self, now: float) -> bool:
        """Take one token if there is one; whether it was taken."""
        if self.tokens(now) >= 1.0:
            self._tokens -= 1.0
            return True
        return False


def peek_proxy_name(data: bytes) -> bytes | None:
    """The raw proxy-name bytes of a KEY_REQUEST (version, type and length checked, nothing
    else), or None when the message is not laid out like one."""
    if len(data) < _NAME_OFFSET or data[0] != VERSION or data[1] != MsgType.KEY_REQUEST:
        return None
    end = _NAME_OFFSET + ((data[2] << 8) | data[3])
    if end > len(data):
        return None
    return data[_NAME_OFFSET:end]


class NegotiationGate:
    """Decides, before any decoding, whether a KEY_REQUEST may cost a signature check.

    Owns one :class:`TokenBucket` per configured proxy name, one shared by every other name
    (and by messages that are not KEY_REQUESTs at all), and one global bucket. A request is
    admitted when both its name's bucket and the global one hold a token, and then takes one
    from each; a flood under one name therefore spends that name's budget only, not the
    other proxies' nor the global one.
    """

    def __init__(
        self,
        names: Iterable[str],
        now: float,
        per_name_rate: float = PER_NAME_RATE,
        per_name_burst: float = PER_NAME_BURST,
        global_rate: float = GLOBAL_RATE,
        global_burst: float = GLOBAL_BURST,
    ) -> None:
        self._named = {
            n.encode("ascii"): (TokenBucket(per_name_rate, per_name_burst, now), f"key requests for proxy {n!r} over budget")
            for n in names
        }
        self._other = (TokenBucket(per_name_rate, per_name_burst, now), "key requests for unknown proxy names over budget")
        self._global = TokenBucket(global_rate, global_burst, now)

    def check(self, data: bytes, now: float) -> None:
        """Take a token for ``data`` or raise ``BusMessageError("rate-limited")``."""
        name = peek_proxy_name(data)
        bucket, refusal = self._other if name is None else self._named.get(name, self._other)
        if not bucket.ready(now):
            raise BusMessageError("rate-limited", refusal)
        if not self._global.take(now):
            raise BusMessageError("rate-limited", "key requests over the global budget")
        bucket.take(now)
