"""The forwarder: public HTTP in, encrypted pub/sub out (step 4), keys granted (step 2).

:class:`ForwarderService` owns the bus, the negotiation, the keys of every proxy instance and
the streams in flight; which instances it routes to is its :mod:`ppbridge.instances` table. The
HTTP face (a twisted.web resource and its request class), :mod:`ppbridge.webface`, calls in here.
"""

from __future__ import annotations

import functools
import os
from typing import TYPE_CHECKING, Any

from twisted.application.service import IService, MultiService
from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from ppbridge.access import AccessControl
from ppbridge.bus import Bus
from ppbridge.channels import Channels
from ppbridge.config import ForwarderSettings, Route
from ppbridge.errors import CANCEL_CODE, BusLost, BusMessageError, KeyExpired, NoRoute, RedisPermission, RequestError
from ppbridge.instances import InstanceTable
from ppbridge.keyring import KeyEntry, Keyring
from ppbridge.logsafe import Throttle
from ppbridge.metrics import Metrics
from ppbridge.negotiation import ForwarderNegotiator
from ppbridge.node import SessionNode
from ppbridge.owedresets import Owed, OwedResets
from ppbridge.ratelimit import NegotiationGate
from ppbridge.reload import split_settings, warn_held
from ppbridge.routing import Router
from ppbridge.streams import RecentlyClosed
from ppbridge.timerpool import TimerPool
from ppbridge.timers import Periodic, log_failure, wait_until
from ppbridge.wire import ID_SIZE, LEAVING, OVERHEAD, MsgType, encode_reset

if TYPE_CHECKING:
    from ppbridge.clientstream import ClientStream
    from ppbridge.webface import BridgeSite

log = Logger()
TIDY_INTERVAL = 1.0
LOST_CANCEL = encode_reset(CANCEL_CODE, BusLost.cause)  # to a proxy, for a stream ended for want of Redis
REANNOUNCE_MIN = 1.0  # seconds between announcements made at once on an eviction
# What a reload cannot change in a running forwarder (built into ports, the bus, the
# negotiation, the keyring, the timers or the HTTP site): kept until a restart.
RESTART_ONLY = ("listen", "reuse_port", "admin_listen", "redis", "signing_key", "signing_key_path", "frame_size",
                "window", "max_clock_skew", "max_key_age", "announce_interval", "key_grace")


def _refused(failure: Failure) -> None:
    """Swallow a command Redis refused for want of a permission: the bus has logged what to
    fix, once per backoff step, so a periodic job must not add a line every tick."""
    failure.trap(RedisPermission)


class ForwarderService(MultiService):
    """Everything a forwarder process does except speaking HTTP."""

    def __init__(self, settings: ForwarderSettings, bus: Bus, clock: IReactorTime, forwarder_id: bytes | None = None):
        super().__init__()
        self.settings = settings
        self.bus = bus
        self.clock = clock
        self.id = forwarder_id or os.urandom(ID_SIZE)
        self.channels = Channels(settings.redis.namespace)
        self.metrics = Metrics()
        self.keyring = Keyring(settings.key_grace, clock.seconds)
        self.node = SessionNode(self.keyring, bus, clock, self.metrics, settings.frame_size + OVERHEAD, "forwarder")
        self.negotiator = ForwarderNegotiator(
            self.id, settings.signing_key, {r.name: r.public_key for r in settings.proxies}, self.channels,
            settings.frame_size, settings.window, settings.max_clock_skew, settings.max_key_age,
            settings.announce_interval,
        )
        self.gate = NegotiationGate([r.name for r in settings.proxies], clock.seconds())
        self.router = Router(settings.proxies)
        self.access = AccessControl(settings, clock, self.metrics)  # who may reach each route
        self.table = InstanceTable([r.name for r in settings.proxies], self.keyring, settings.announce_interval)
        self._announced = 0.0
        self._reannounce: IDelayedCall | None = None  # an announcement an eviction asked for
        self.refusals = Throttle()  # log lines for refused client requests (bad-target)
        self.streams: dict[bytes, ClientStream] = {}
        self.upgraded: dict[str, int] = {}  # upgraded connections open (after their 101), per proxy
        self.listeners: list[IService] = []  # the HTTP ports (children): closed first on stop
        self.sites: list[BridgeSite] = []  # their sites (each registers itself): drained on stop, reloaded
        self.draining = False
        self.closed = RecentlyClosed()
        self.owed = OwedResets("proxies")  # cancels for streams ended while Redis was away, sent once it is back
        self.timers = TimerPool(clock)  # the streams' timers (ppbridge.timerpool)
        self._control = self.channels.forwarder_control(self.id)
        self.reply_channel = self.channels.reply(self.id)  # every stream's answers come here
        # A proxy instance's data channel, formatted once per (name, instance), not per message.
        self._data_channel = functools.lru_cache(maxsize=1024)(self.channels.proxy_data)
        self._loops = [
            Periodic(clock, settings.announce_interval, self._announce, "announcing"),
            Periodic(clock, TIDY_INTERVAL, self._tidy, "housekeeping"),
        ]
        self.metrics.watch_forwarder(self)  # per-proxy gauges: instances, key age, last negotiation

    @property
    def instances(self) -> dict[str, list[bytes]]:
        """Live proxy processes per name, as peers (``name:instance``): see :class:`InstanceTable`."""
        return self.table.instances

    @property
    def owners(self) -> dict[bytes, str]:
        """Instance id -> the one proxy name that may use it."""
        return self.table.owners

    @property
    def _turns(self) -> dict[str, int]:
        return self.table.turns

    # lifecycle

    def startService(self) -> None:
        super().startService()
        self.node.attach(self._dispatch)
        # Key requests sent while our negotiate subscription was down were lost: ask again.
        self.bus.on_public = self._announce_soon
        self.bus.on_state = self._on_state
        # Plain subscriptions only (no pattern): an ACL user limited to the namespace can make them.
        for channel in (self.channels.negotiate, self._control, self.reply_channel):
            self.bus.subscribe(channel).addErrback(log_failure("subscribing failed"))
        self.bus.start()
        for loop in self._loops:
            loop.start()
        log.info("forwarder {id} serving proxies {names}", id=self.id.hex(), names=", ".join(self.instances))

    def stopService(self) -> Deferred[None]:
        """Drain, then stop (SIGTERM): close the listening ports (new connections are
        refused) and the idle keep-alive connections, let the requests in flight finish
        (answered with ``Connection: close``) for up to ``drain_timeout`` seconds, then stop
        everything; requests and streams still open then are ended as :meth:`_stop_now` does."""
        self.draining = True
        closing = [defer.maybeDeferred(s.disownServiceParent) for s in self.listeners if s.parent is self]
        d: Deferred[Any] = defer.gatherResults(closing, consumeErrors=True)
        d.addErrback(log_failure("closing a listening port failed"))
        d.addCallback(lambda _: self._drain())
        return d.addBoth(lambda _: self._stop_now())

    def _connections(self) -> int:
        return sum(len(site.edge.open) for site in self.sites)

    def _drain(self) -> Deferred[None] | None:
        """Wait (up to ``drain_timeout``) until every stream has ended and every client
        connection has closed, so the last responses are written out, not cut off."""
        limit = self.settings.drain_timeout
        for site in self.sites:
            site.edge.drain()
        if limit <= 0:
            return None
        had_requests = bool(self.streams)
        if had_requests:
            log.info("draining {n} requests (up to {limit} s)", n=len(self.streams), limit=limit)

        def done(drained: bool) -> None:
            if not drained:
                log.warn("{n} requests and {c} client connections still open after {limit} s; ending them",
                         n=len(self.streams), c=self._connections(), limit=limit)
            elif had_requests:
                log.info("drained")

        return wait_until(self.clock, lambda: not self.streams and not self._connections(), limit).addCallback(done)

    def _stop_now(self) -> Deferred[None]:
        for loop in self._loops:
            loop.stop()
        if self._reannounce is not None and self._reannounce.active():
            self._reannounce.cancel()
        for stream in list(self.streams.values()):
            stream.shutdown()
        self.timers.stop()
        d = defer.maybeDeferred(super().stopService)
        d.addBoth(lambda _: self.access.stop())  # forward_auth's connection pool
        return d.addBoth(lambda _: self.bus.stop())

    def reload(self, settings: ForwarderSettings) -> None:
        """Run with ``settings`` (SIGHUP): routes, proxy keys and the timeouts read at use
        follow; :data:`RESTART_ONLY` keys keep their old values (a warning each). A proxy no
        longer configured is routed nothing new (404 no-route); its streams in flight finish
        under the keys kept as for an evicted instance."""
        settings, applied, held = split_settings(self.settings, settings, RESTART_ONLY)
        warn_held(settings.source, held)
        self.access.configure(settings)  # first: it may refuse the new settings (a file gone)
        names = [r.name for r in settings.proxies]
        router, gate = Router(settings.proxies), NegotiationGate(names, self.clock.seconds())
        now = self.clock.seconds()
        self.settings, self.router, self.gate = settings, router, gate
        for site in self.sites:
            site.apply(settings)
        self.negotiator.set_proxy_keys({r.name: r.public_key for r in settings.proxies})
        added, removed = self.table.configure(names, now)
        what = ", ".join(applied) or "nothing"
        if added or removed:
            what += f" (proxies added: {', '.join(added) or 'none'}; removed: {', '.join(removed) or 'none'})"
        log.info("reloaded {file}: {what}", file=str(settings.source), what=what)
        if added:
            self._announce_soon()  # the new proxies may be waiting for an announcement

    def _on_state(self, up: bool) -> None:
        self.metrics.redis_up.set(1 if up else 0)
        if up:
            self._announce()
            self.owed.pay(self.clock.seconds(), self.keyring, self.node)
        else:
            for stream in list(self.streams.values()):
                stream.bus_lost()

    def owe_cancel(self, peer: bytes, stream_id: bytes) -> None:
        """Proxy instance ``peer`` may still be working on ``stream_id``, which this process
        ended for want of Redis: it is sent a RESET (cancel) once the bus is back."""
        entry = self.keyring.current(peer)
        if entry is not None:
            self.owed.owe(Owed(peer, self.data_channel(entry), stream_id, LOST_CANCEL,
                               self.clock.seconds() + self.settings.stream_idle_timeout))

    def _announce(self) -> None:
        if self.bus.connected:
            self._announced = self.clock.seconds()
            message = self.negotiator.announce(self._announced)
            self.bus.publish(self.channels.announce, message).addErrback(log_failure("announcing failed"))

    def _tidy(self) -> Deferred[None] | None:
        now = self.clock.seconds()
        self.keyring.expire(now)
        self.owed.expire(now)
        self.node.drop_log.flush()
        expired = self.table.drop_expired()
        # Their answers would come under that key and be dropped: fail them now.
        for stream in [s for s in self.streams.values() if s.peer in expired]:
            stream.instance_gone(KeyExpired("ppbridge: the proxy's session key expired mid-request"))
        self.table.forget(now, {s.peer for s in self.streams.values()})  # a leaving instance still answering
        return self._check_liveness()

    def _check_liveness(self) -> Deferred[None] | None:
        """Evict proxy instances whose data channel has no subscriber.

        PUBLISH counts reaching no one evict at once, but a pattern subscriber makes them
        lie; this finds a restarted proxy's old instance (checked every second, and at once
        when a new instance appears) before requests are sent there. Evicting a live proxy
        that is just resubscribing is harmless: it renegotiates whenever it reconnects.
        """
        channels = {self.data_channel(e): p for p, e in self.table.keyed().items()}
        if not channels or not self.bus.connected:
            return None

        def check(counts: dict[bytes, int]) -> None:
            for channel, instance in channels.items():
                if counts.get(channel, 1) == 0:
                    self.evict(instance, "its data channel has no subscriber")

        return self.bus.numsub(list(channels)).addCallback(check).addErrback(_refused)

    # bus input

    def _dispatch(self, channel: bytes, data: bytes) -> None:
        if channel == self.reply_channel:  # first: nearly every message is a reply
            self._on_reply(channel, data)
        elif channel == self.channels.negotiate:
            self._on_key_request(data)
        elif channel == self._control:
            self._on_confirm(channel, data)
        else:
            raise BusMessageError("unexpected-channel", "")

    def _on_key_request(self, data: bytes) -> None:
        self.gate.check(data, self.clock.seconds())  # before decoding: a flood must not cost RSA verifies
        result = self.negotiator.handle_request(data, self.clock.seconds())
        if result is None:
            return  # addressed to another forwarder
        channel, grant, session = result
        owner = self.table.claimed(session.proxy, session.instance)
        if owner is not None:
            self.metrics.negotiations.labels("refused").inc()
            raise BusMessageError("instance-claimed", f"proxy {session.proxy} asked for a key for an instance "
                                                      f"of proxy {owner}")
        self.keyring.add(session, session.proxy_peer, self.clock.seconds(), confirmed=False)
        self.metrics.negotiations.labels("granted").inc()
        log.info("granted key {fp} to proxy {proxy} (instance {instance})", fp=session.envelope.fingerprint,
                 proxy=session.proxy, instance=session.instance.hex())
        self.bus.publish(channel, grant).addErrback(log_failure("publishing a grant failed"))

    def _on_confirm(self, channel: bytes, data: bytes) -> None:
        entry, header, _ = self.node.open(channel, data)
        if header.type is not MsgType.CONFIRM:
            raise BusMessageError("unexpected-type", f"{header.type.name} on the control channel")
        session = entry.session
        peer = session.proxy_peer
        owner = self.table.claimed(session.proxy, session.instance)
        if owner is not None:
            raise BusMessageError("instance-claimed", f"confirmation from proxy {session.proxy} for an instance "
                                                      f"of proxy {owner}")
        now = self.clock.seconds()
        if header.stream_id == LEAVING:
            # Draining; under a key just granted (it rekeys for its calls in flight) that key seals
            # those streams now, but routes nothing new: no _serve, no acknowledgement, kept evicted.
            if self.keyring.confirm(entry.key_id, peer, now):
                self.table.claim(session.proxy, session.instance, leaving_since=now)
                log.info("proxy instance {peer} is leaving; key {fp} now seals its requests in flight",
                         peer=peer.decode("ascii"), fp=session.envelope.fingerprint)
            self.table.leaving(session.proxy, peer, now)
            return
        if self.keyring.confirm(entry.key_id, peer, now):
            self.table.claim(session.proxy, session.instance)
            self._serve(session.proxy, peer)
            log.info("proxy {proxy} (instance {instance}) confirmed key {fp}", proxy=session.proxy,
                     instance=session.instance.hex(), fp=session.envelope.fingerprint)
        elif self.table.reinstate(session.proxy, peer, entry):
            # A heartbeat under the current key of an instance we evicted: it is alive (Redis
            # lied, or it was resubscribing). Route to it again.
            self._serve(session.proxy, peer)
            log.info("proxy {proxy} (instance {instance}) is back", proxy=session.proxy,
                     instance=session.instance.hex())
        if self.keyring.current(peer) is entry and session.proxy in self.instances:
            # Acknowledge, so the proxy knows this forwarder routes to it (its /healthz).
            self.node.send(entry, self.data_channel(entry), MsgType.CONFIRM, bytes(16), 0, b"").addErrback(
                log_failure("acknowledging a proxy failed"))

    def _serve(self, name: str, peer: bytes) -> None:
        """Route requests for ``name`` to ``peer`` (see :meth:`InstanceTable.serve`); when it
        joins another instance, check at once whether that one is still there."""

        def check_others() -> None:
            d = self._check_liveness()
            if d is not None:
                d.addErrback(log_failure("checking proxy instances failed"))

        self.table.serve(name, peer, check_others)

    def _on_reply(self, channel: bytes, data: bytes) -> None:
        entry, header, plaintext = self.node.open(channel, data)
        stream = self.streams.get(header.stream_id)
        if stream is None:
            if header.stream_id in self.closed:
                return  # a frame that crossed the stream's end: expected, not hostile
            raise BusMessageError("unknown-stream", "reply for a stream that is over")
        if stream.reply_channel != channel or stream.peer != entry.session.proxy_peer:
            raise BusMessageError("wrong-stream", "reply from another proxy or on another channel")
        stream.on_message(header, plaintext)

    # used by the HTTP face

    def route(self, host: bytes | None, target: bytes) -> tuple[Route, bytes]:
        """The route for a request and its target with the prefix stripped; NoRoute otherwise."""
        found = self.router.match(host, target)
        if found is None:
            raise NoRoute()
        return found

    def candidates(self, proxy: str) -> list[KeyEntry]:
        """Current keys of the live instances of ``proxy``."""
        return self.table.candidates(proxy)

    def pick(self, proxy: str) -> list[KeyEntry]:
        """The candidates in the order to try them: round robin, one step per call."""
        return self.table.pick(proxy)

    def unavailable(self, name: str) -> RequestError:
        """Why ``name`` cannot take a request now."""
        return self.table.unavailable(name)

    def evict(self, peer: bytes, reason: str) -> None:
        """Stop routing to a proxy process that seems gone (its data channel reached nobody).

        Redis says so, and Redis may lie: its keys are kept for a few announce intervals and
        an announcement goes out at once; a live proxy answers it with a heartbeat under its
        key and is routed to again (see :meth:`_on_confirm`).
        """
        self.table.evict(peer, reason, self.clock.seconds())
        for stream in [s for s in self.streams.values() if s.peer == peer]:
            stream.instance_gone()
        self._announce_soon()

    def _announce_soon(self) -> None:
        """Announce now, or at the end of the second since the last announcement (never
        skipped, never more than once a second)."""
        wait = self._announced + REANNOUNCE_MIN - self.clock.seconds()
        if wait <= 0:
            self._announce()
        elif self._reannounce is None or not self._reannounce.active():
            self._reannounce = self.clock.callLater(wait, self._announce)

    def wait_for_proxy(self, name: str) -> Deferred[None]:
        """Fires once ``name`` has a confirmed key (at once if it has one now)."""
        return self.table.wait_for(name)

    def data_channel(self, entry: KeyEntry) -> bytes:
        return self._data_channel(entry.session.proxy, entry.session.instance)

    def status(self) -> dict[str, Any]:
        """The JSON document of ``GET /status``: per proxy, its newest instance's key (by
        fingerprint only) and every live instance."""
        proxies = self.table.status(self.clock.seconds())
        for name, proxy in proxies.items():
            proxy["upgraded"] = self.upgraded.get(name, 0)
        return {"forwarder": self.id.hex(), "redis_connected": self.bus.connected,
                "streams": len(self.streams), "proxies": proxies}

    def count_upgraded(self, name: str, delta: int) -> None:
        """An upgraded connection of proxy ``name`` opened (+1) or closed (-1)."""
        self.upgraded[name] = self.upgraded.get(name, 0) + delta
        self.metrics.upgraded_open.labels(name).inc(delta)

    def healthy(self) -> bool:
        """Connected to Redis and holding at least one confirmed key."""
        return self.bus.connected and any(self.instances.values())

    # probes (read only; see ppbridge.admin)

    def live(self) -> bool:
        """Started and its timers running: the process works (``/livez``)."""
        return bool(self.running) and all(loop.running for loop in self._loops)

    def ready(self) -> bool:
        """Can serve: connected to Redis, whether or not any proxy is up (``/readyz``). A
        proxy that is down is answered 503 ``proxy-unavailable`` per request; it must not
        make a load balancer pull every forwarder. Not ready while draining."""
        return self.bus.connected and not self.draining

    def proxy_health(self, name: str) -> tuple[bool, str]:
        """Whether proxy ``name`` can take a request now, and why (``/healthz?proxy=NAME``);
        KeyError for a name this forwarder does not route to."""
        if name not in self.instances:
            raise KeyError(name)
        if not self.bus.connected:
            return False, "the forwarder is not connected to Redis"
        return self.table.health(name)
