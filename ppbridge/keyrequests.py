"""When a proxy asks the forwarders for keys (steps 2 and 3), and the asking.

:class:`KeyRequests` holds the proxy's rekey schedule (:mod:`ppbridge.rekey`) and its
backoffs. Without a key it asks every forwarder, retrying after 1 s doubling to 30 s (±20 %)
until one grants, and takes a new instance id when forwarders hear its requests but never
grant. With keys, it asks for a new one each forwarder whose key is due, or that stopped
acknowledging our heartbeats (a broadcast when every key is due), with the same backoff while
rotations do not complete; while draining, only the forwarders with calls in flight. It
publishes the requests; the grants, heartbeats and the drain are the proxy's
(:mod:`ppbridge.proxy`), which tells it what it needs at each tick.
"""

from __future__ import annotations

import random
from typing import Callable

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from ppbridge.bus import Bus
from ppbridge.channels import Channels
from ppbridge.config import RekeySettings
from ppbridge.keyring import KeyEntry, Keyring
from ppbridge.metrics import Metrics
from ppbridge.negotiation import ANY_FORWARDER, ProxyNegotiator
from ppbridge.rekey import RekeySchedule, make_policy
from ppbridge.timers import log_failure

log = Logger()
TICK = 0.25  # the proxy's negotiation, rekey and expiry timer
RETRY_FIRST, RETRY_MAX = 1.0, 30.0
RENEW_AFTER = 4  # key requests heard by a forwarder but never granted before we take a new instance id


def schedule_for(rekey: RekeySettings) -> RekeySchedule:
    """The rekey schedule the ``[rekey]`` settings ask for."""
    return RekeySchedule(make_policy(rekey), rekey.messages_per_key, rekey.key_lifetime)


class KeyRequests:
    """The proxy's key requests: whom to ask and when, and the last reason none was heard."""

    def __init__(self, rekey: RekeySettings, clock: IReactorTime, bus: Bus, channels: Channels,
                 negotiator: ProxyNegotiator, keyring: Keyring, metrics: Metrics,
                 renew_instance: Callable[[], None]) -> None:
        self.rekey = rekey
        self.schedule = schedule_for(rekey)
        self.clock = clock
        self.bus = bus
        self.channels = channels
        self.negotiator = negotiator
        self.keyring = keyring
        self.metrics = metrics
        self.renew_instance = renew_instance  # takes a new instance id (see ProxyService._renew_instance)
        self.last_error: str | None = None
        self._retry_at = 0.0
        self._retry_delay = RETRY_FIRST
        self._ungranted = 0  # key requests in a row, made without a key, that forwarders heard but did not grant
        self._rekey_at = 0.0
        self._rekey_delay = RETRY_FIRST

    def reload(self, rekey: RekeySettings) -> None:
        """Follow new ``[rekey]`` settings: the policy (a new schedule only if they changed),
        the limits asked for in key requests and the grace of keys rotated out."""
        if rekey != self.rekey:
            self.schedule = schedule_for(rekey)
        self.rekey = rekey
        self.negotiator.set_limits(rekey.key_lifetime, rekey.messages_per_key)
        self.keyring.grace = rekey.grace

    def tick(self, now: float, messages: int, unacked: list[bytes]) -> None:
        """Feed the policy the running message count; without a key, ask every forwarder
        (with backoff); with keys, rotate those due and those of the ``unacked`` forwarders."""
        self.schedule.policy.observe(now, messages)
        if not self.keyring.peers():
            if now >= self._retry_at:
                self.ask(ANY_FORWARDER)
            return
        self._rekey(now, unacked)

    def rekey_in_flight(self, now: float, busy: set[bytes]) -> None:
        """While draining: rotate, when due, only the keys of forwarders we have calls in flight
        with (``busy``: a request addressed to each, never a broadcast), so a call longer than
        a key's hard lifetime is still answered. A key already past its limits is overdue too."""
        entries = {p: self.keyring.current(p) for p in busy}
        self._rotate(now, sorted(p for p, e in entries.items() if e is None or self._due(now, e)), draining=True)

    def announced(self, forwarder: bytes, now: float) -> None:
        """A forwarder we hold no key with announced itself: ask it for one."""
        # A broadcast request still pending may predate this forwarder, so only a request
        # addressed to it counts (at worst one spare key when both arrive).
        if forwarder not in self.negotiator.unanswered_targets(now):
            log.info("forwarder {id} announced itself; negotiating a key", id=forwarder.hex())
            self.ask(forwarder)

    def ask(self, target: bytes, draining: bool = False) -> None:
        """Publish a key request to ``target`` (or every forwarder). Without a key, this is a
        first negotiation: the next one backs off, and after :data:`RENEW_AFTER` heard but
        not granted the proxy takes a new instance id first (not while ``draining``: its
        calls in flight use the id)."""
        if not self.bus.connected:
            return
        now = self.clock.seconds()
        if not self.keyring.peers() and not draining:
            self._retry_at = now + self._retry_delay * random.uniform(0.8, 1.2)
            self._retry_delay = min(RETRY_MAX, self._retry_delay * 2)
            if self._ungranted >= RENEW_AFTER:
                # Forwarders hear our requests and grant nothing: our id (it is public, in our data
                # channel's name) may have been claimed at a forwarder by another proxy name while
                # we were away, which makes that forwarder refuse it to us.
                self.renew_instance()
                self._ungranted = 0
                log.warn("proxy {name}: {n} key requests were heard but not granted; now instance {instance}",
                         name=self.negotiator.name, n=RENEW_AFTER, instance=self.negotiator.instance.hex())
        channel, message = self.negotiator.make_request(now, target)

        def publish(_: object) -> Deferred[int]:
            return self.bus.publish(self.channels.negotiate, message)

        d = self.bus.subscribe(channel).addCallback(publish)
        d.addCallback(self._request_published).addErrback(log_failure("publishing a key request failed"))

    def take_grant(self, channel: bytes, data: bytes, now: float) -> KeyEntry:
        """The key of a grant on ``channel`` (for one of our requests), held and confirmed on
        our side; the next first negotiation starts its backoff afresh. The proxy confirms it."""
        session = self.negotiator.handle_grant(channel, data, now)
        entry = self.keyring.add(session, session.forwarder, now, confirmed=True)
        self._retry_delay = RETRY_FIRST
        self._ungranted = 0
        self.last_error = None
        self.metrics.negotiations.labels("granted").inc()
        log.info("key {fp} from forwarder {id}", fp=session.envelope.fingerprint, id=session.forwarder.hex())
        return entry

    def restart_rotations(self) -> None:
        """Rotations start afresh (no backoff), as when the proxy begins draining."""
        self._rekey_at, self._rekey_delay = 0.0, RETRY_FIRST

    # the decisions

    def _rekey(self, now: float, unacked: list[bytes]) -> None:
        """Rotate each key due (half its lifetime or message budget, or the policy's period),
        retrying with backoff while a rotation does not complete; ask a forwarder that stopped
        acknowledging our heartbeats for a new key."""
        current = self._current()
        due = [p for p, e in current.items() if self._due(now, e)]
        self._rotate(now, [ANY_FORWARDER] if due and len(due) == len(current) else sorted(set(due) | set(unacked)))

    def _rotate(self, now: float, targets: list[bytes], draining: bool = False) -> None:
        """Ask ``targets`` for new keys, with backoff while rotations do not complete."""
        if not targets:
            self.restart_rotations()
            return
        if now < self._rekey_at:
            return
        waiting = self.negotiator.unanswered_targets(now)
        for target in targets:
            if target not in waiting:
                log.debug("rekeying with {target}", target=target.hex())
                self.ask(target, draining)
        self._rekey_at = now + self._rekey_delay * random.uniform(0.8, 1.2)
        self._rekey_delay = min(RETRY_MAX, self._rekey_delay * 2)

    def _due(self, now: float, entry: KeyEntry) -> bool:
        # A rotation due within half a tick is done now, or a 1 s period would slip a tick.
        return self.schedule.due(now + TICK / 2, entry.created, entry.session.envelope.messages) is not None

    def _current(self) -> dict[bytes, KeyEntry]:
        entries = {p: self.keyring.current(p) for p in self.keyring.peers()}
        return {p: e for p, e in entries.items() if e is not None}

    def _request_published(self, receivers: int) -> None:
        self.metrics.negotiations.labels("requested").inc()
        if receivers and not self.keyring.peers():
            self._ungranted += 1
        if receivers == 0:
            self.last_error = "no forwarder is listening on the negotiation channel"
            log.warn("key request reached no forwarder; retrying")
