"""The forwarder's table of proxy instances: whom it routes to, and whom it remembers.

An instance is a peer ``name:instance`` (:func:`~ppbridge.negotiation.proxy_peer`), one proxy
process. :class:`InstanceTable` keeps, per configured proxy name, the live instances (those
with a confirmed key, taken in turn), and of the others what taking them back or refusing them
needs: evicted and leaving instances (their keys kept a few announce intervals, since Redis
may have lied and their requests in flight still answer), the name that owns each instance
id, why a name has no instance (its 503s, ``/healthz`` and ``/status``), and the requests
waiting for one. No bus and no clock: the forwarder (:mod:`ppbridge.forwarder`) passes the
time and does the publishing.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable

from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.logger import Logger

from ppbridge.errors import KeyExpired, NoRoute, ProxyUnavailable, RequestError
from ppbridge.keyring import KeyEntry, Keyring
from ppbridge.negotiation import proxy_peer

log = Logger()
EVICTED_KEEP = 3  # announce intervals an evicted instance's keys are kept, so a live one can come back


class InstanceTable:
    """The instances of each proxy name, live or remembered, and the requests waiting for one."""

    def __init__(self, names: Iterable[str], keyring: Keyring, announce_interval: float) -> None:
        self.keyring = keyring
        self.keep = EVICTED_KEEP * announce_interval  # seconds an evicted instance's keys are kept
        # Live proxy processes per name, as peers (``name:instance``; see Keyring).
        self.instances: dict[str, list[bytes]] = {name: [] for name in names}
        self.owners: dict[bytes, str] = {}  # instance id -> the one name that may use it
        self.evicted: dict[bytes, tuple[str, float]] = {}  # peer -> (name, when), keys kept a while
        self.key_expired: set[str] = set()  # names whose every key passed its hard limits
        self.last_error: dict[str, str] = {}  # name -> why it last lost an instance (cleared when served)
        self.turns: dict[str, int] = {}  # name -> its round robin position (see pick)
        self.waiters: dict[str, list[Deferred[None]]] = {}  # name -> wait_for calls not yet answered

    def configure(self, names: list[str], now: float) -> tuple[list[str], list[str]]:
        """Route to the proxies ``names`` from now on; the names ``(added, removed)``. A removed
        name's instances are kept as evicted ones (their requests in flight finish under the
        keys kept) and its waiters fail with NoRoute."""
        removed = [n for n in self.instances if n not in names]
        for name in removed:
            for peer in self.instances.pop(name):
                self.evicted[peer] = (name, now)
            for waiter in self.waiters.pop(name, []):
                waiter.errback(NoRoute())
            self.last_error.pop(name, None)
            self.key_expired.discard(name)
            self.turns.pop(name, None)
        added = [n for n in names if n not in self.instances]
        for name in added:
            self.instances[name] = []
        return added, removed

    # what the forwarder hears

    def claimed(self, name: str, instance: bytes) -> str | None:
        """The other proxy name that owns ``instance`` and still holds keys for it, if any:
        an instance id is bound to the name that confirmed it first."""
        owner = self.owners.get(instance)
        if owner is not None and owner != name and self.holds_keys(owner, instance):
            return owner
        return None

    def holds_keys(self, name: str, instance: bytes) -> bool:
        """Whether ``name`` still has a key (live or evicted) for ``instance``."""
        peer = proxy_peer(name, instance)
        return self.keyring.current(peer) is not None or peer in self.evicted

    def claim(self, name: str, instance: bytes, leaving_since: float | None = None) -> None:
        """``name`` confirmed a key for ``instance``: the id is its own while it holds keys. A
        leaving instance's keys are kept as an evicted one's (from ``leaving_since``, unless
        they already are)."""
        self.owners[instance] = name
        if leaving_since is not None:
            self.evicted.setdefault(proxy_peer(name, instance), (name, leaving_since))

    def serve(self, name: str, peer: bytes, check_others: Callable[[], object]) -> None:
        """Route requests for ``name`` to ``peer`` (it holds a confirmed key) and wake the
        requests waiting for it; nothing for a name no longer configured (removed by a reload
        while it held a key). ``check_others`` is called when ``peer`` joins another instance
        of ``name`` (a restart, most likely: is the old instance still there?)."""
        instances = self.instances.get(name)
        if instances is None:
            return
        if peer not in instances:
            instances.append(peer)
            if len(instances) > 1:
                check_others()
        self.last_error.pop(name, None)
        self.key_expired.discard(name)
        for waiter in self.waiters.pop(name, []):
            waiter.callback(None)

    def reinstate(self, name: str, peer: bytes, entry: KeyEntry) -> bool:
        """A heartbeat came under ``entry``: if it is the current key of an instance we
        evicted, that instance is alive (Redis lied, or it was resubscribing) and no longer
        counts as evicted; the caller routes to it again."""
        if peer in self.evicted and self.keyring.current(peer) is entry and name in self.instances:
            del self.evicted[peer]
            return True
        return False

    def leaving(self, name: str, peer: bytes, now: float) -> None:
        """The proxy instance is draining: route nothing new to it. Unlike :meth:`evict`, its
        requests in flight go on (its answers come under the keys kept, see :meth:`forget`)
        and nothing is announced; it stops heartbeating, so it is not routed to again."""
        instances = self.instances.get(name, [])
        if peer in instances:
            instances.remove(peer)
            self.evicted[peer] = (name, now)
            log.info("proxy instance {peer} is leaving; routing nothing new to it", peer=peer.decode("ascii"))

    def evict(self, peer: bytes, reason: str, now: float) -> None:
        """Stop routing to a proxy process that seems gone; its keys are kept (see :meth:`forget`)."""
        for name, instances in self.instances.items():
            if peer in instances:
                instances.remove(peer)
                self.evicted[peer] = (name, now)
                self.last_error[name] = reason
                log.info("proxy instance {peer} is gone: {reason}", peer=peer.decode("ascii"), reason=reason)

    # housekeeping

    def drop_expired(self) -> set[bytes]:
        """Stop routing to the instances whose keys passed their hard limits (failing closed
        until the proxy negotiates again); returns them: their answers would be dropped."""
        expired: set[bytes] = set()
        for name, instances in self.instances.items():
            live = [i for i in instances if self.keyring.current(i) is not None]
            if len(live) < len(instances):
                log.warn("proxy {proxy}: a session key passed its hard lifetime or message budget before it "
                         "was rotated; failing closed until the proxy negotiates again", proxy=name)
                self.last_error[name] = "session key expired before rotation (is the proxy negotiating?)"
                if not live:
                    self.key_expired.add(name)
                expired.update(i for i in instances if i not in live)
            instances[:] = live
        return expired

    def forget(self, now: float, busy: set[bytes | None]) -> None:
        """Drop the keys of instances evicted more than :data:`EVICTED_KEEP` announce intervals
        ago, unless ``busy`` (a leaving instance still answering), and the owners of instance
        ids no longer keyed."""
        for peer in [p for p, (_, when) in self.evicted.items() if when + self.keep < now and p not in busy]:
            del self.evicted[peer]
            self.keyring.drop_peer(peer)
        for instance in [i for i, name in self.owners.items() if not self.holds_keys(name, i)]:
            del self.owners[instance]

    # where requests go

    def keyed(self) -> dict[bytes, KeyEntry]:
        """The current key of every live instance that has one."""
        entries = {p: self.keyring.current(p) for peers in self.instances.values() for p in peers}
        return {p: e for p, e in entries.items() if e is not None}

    def candidates(self, proxy: str) -> list[KeyEntry]:
        """Current keys of the live instances of ``proxy``."""
        current, found = self.keyring.current, []
        for peer in self.instances.get(proxy, ()):  # a loop: twice per request, one instance or a few
            entry = current(peer)
            if entry is not None:
                found.append(entry)
        return found

    def pick(self, proxy: str) -> list[KeyEntry]:
        """The candidates in the order to try them: round robin, one step per call."""
        entries = self.candidates(proxy)
        if len(entries) > 1:
            turn = self.turns.get(proxy, 0)
            self.turns[proxy] = turn + 1
            start = turn % len(entries)
            entries = entries[start:] + entries[:start]
        return entries

    def unavailable(self, name: str) -> RequestError:
        """Why ``name`` cannot take a request now."""
        if name in self.key_expired:
            return KeyExpired(f"ppbridge: proxy {name!r} has no session key within its hard lifetime "
                              f"(rotation overdue)")
        return ProxyUnavailable(f"ppbridge: proxy {name!r} is not connected or has no key yet")

    def wait_for(self, name: str) -> Deferred[None]:
        """Fires once ``name`` has a confirmed key (at once if it has one now)."""
        if self.candidates(name):
            return defer.succeed(None)
        d: Deferred[None] = Deferred()
        self.waiters.setdefault(name, []).append(d)
        return d

    # read only: the forwarder's /healthz and /status (see ppbridge.admin)

    def health(self, name: str) -> tuple[bool, str]:
        """Whether ``name`` has a live instance with a key, and why not."""
        live = len(self.candidates(name))
        if live:
            return True, f"{live} live instance{'s' if live > 1 else ''} with a key"
        if name in self.key_expired:
            return False, "no session key within its hard lifetime (rotation overdue)"
        why = self.last_error.get(name)
        return False, "no live instance with a key" + (f" ({why})" if why else " (not connected, or no key yet)")

    def status(self, now: float) -> dict[str, dict[str, Any]]:
        """Per proxy name: its newest instance's key (by fingerprint only), every live
        instance and the last error."""
        proxies = {}
        for name, instances in self.instances.items():
            live = [self._instance_status(i, now) for i in instances]
            newest = min(live, key=lambda s: s["key_age_s"], default={"key_fingerprint": None})
            proxies[name] = {**newest, "instances": live, "last_error": self.last_error.get(name)}
        return proxies

    def _instance_status(self, peer: bytes, now: float) -> dict[str, Any]:
        instance = peer.rsplit(b":", 1)[1].decode("ascii")
        entry, stats = self.keyring.current(peer), self.keyring.stats.get(peer)
        if entry is None or stats is None:
            return {"instance": instance, "key_fingerprint": None, "key_age_s": float("inf")}
        env = entry.session.envelope
        return {
            "instance": instance,
            "key_fingerprint": env.fingerprint,
            "key_age_s": round(now - stats.current_since, 3),
            "messages": env.messages,
            "rotations": stats.rotations,
            "period_s": None if stats.period is None else round(stats.period, 3),
        }
