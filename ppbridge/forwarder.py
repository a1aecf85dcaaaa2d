"""The forwarder: public HTTP in, encrypted pub/sub out (step 4), keys granted (step 2).

:class:`ForwarderService` owns the bus, the negotiation, the keys of every proxy instance and
the streams in flight; the HTTP face (a twisted.web resource and its request class) lives in
:mod:`ppbridge.webface` and calls in here.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from twisted.application.service import IService, MultiService
from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

from ppbridge.bus import Bus
from ppbridge.channels import Channels
from ppbridge.config import ForwarderSettings, Route
from ppbridge.errors import BusMessageError, KeyExpired, NoRoute, ProxyUnavailable, RequestError
from ppbridge.keyring import KeyEntry, Keyring
from ppbridge.logsafe import Throttle
from ppbridge.metrics import Metrics
from ppbridge.negotiation import ForwarderNegotiator, proxy_peer
from ppbridge.node import SessionNode
from ppbridge.ratelimit import NegotiationGate
from ppbridge.reload import split_settings, warn_held
from ppbridge.routing import Router
from ppbridge.streams import RecentlyClosed
from ppbridge.timers import Periodic, log_failure, wait_until
from ppbridge.wire import ID_SIZE, LEAVING, OVERHEAD, MsgType

if TYPE_CHECKING:
    from ppbridge.clientstream import ClientStream
    from ppbridge.webface import BridgeSite

log = Logger()
TIDY_INTERVAL = 1.0
EVICTED_KEEP = 3  # announce intervals an evicted instance's keys are kept, so a live one can come back
REANNOUNCE_MIN = 1.0  # seconds between announcements made at once on an eviction
# What a reload cannot change in a running forwarder (built into ports, the bus, the
# negotiation, the keyring, the timers or the HTTP site): kept until a restart.
RESTART_ONLY = ("listen", "admin_listen", "redis", "signing_key", "signing_key_path", "frame_size", "window",
                "max_clock_skew", "max_key_age", "announce_interval", "key_grace")


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
        # Live proxy processes per name, as peers (``name:instance``; see Keyring).
        self.instances: dict[str, list[bytes]] = {r.name: [] for r in settings.proxies}
        self.owners: dict[bytes, str] = {}  # instance id -> the one name that may use it
        self.evicted: dict[bytes, tuple[str, float]] = {}  # peer -> (name, when), keys kept a while
        self.key_expired: set[str] = set()  # names whose every key passed its hard limits
        self._announced = 0.0
        self._reannounce: IDelayedCall | None = None  # an announcement an eviction asked for
        self.refusals = Throttle()  # log lines for refused client requests (bad-target)
        self.last_error: dict[str, str] = {}
        self.streams: dict[bytes, ClientStream] = {}
        self.listeners: list[IService] = []  # the HTTP ports (children): closed first on stop
        self.sites: list[BridgeSite] = []  # their sites (each registers itself): drained on stop, reloaded
        self.draining = False
        self.closed = RecentlyClosed()
        self._turns: dict[str, int] = {}
        self._waiters: dict[str, list[Deferred[None]]] = {}
        self._control = self.channels.forwarder_control(self.id)
        self._loops = [
            Periodic(clock, settings.announce_interval, self._announce, "announcing"),
            Periodic(clock, TIDY_INTERVAL, self._tidy, "housekeeping"),
        ]
        self.metrics.watch_forwarder(self)  # per-proxy gauges: instances, key age, last negotiation

    # lifecycle

    def startService(self) -> None:
        super().startService()
        self.node.attach(self._dispatch)
        # Key requests sent while our negotiate subscription was down were lost: ask again.
        self.bus.on_public = self._announce_soon
        self.bus.on_state = self._on_state
        self.bus.subscribe(self.channels.negotiate).addErrback(log_failure("subscribing failed"))
        self.bus.psubscribe(self.channels.forwarder_pattern(self.id)).addErrback(log_failure("subscribing failed"))
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
        d = defer.maybeDeferred(super().stopService)
        return d.addBoth(lambda _: self.bus.stop())

    def reload(self, settings: ForwarderSettings) -> None:
        """Run with ``settings`` (SIGHUP): routes, proxy keys and the timeouts read at use
        follow; :data:`RESTART_ONLY` keys keep their old values (a warning each). A proxy no
        longer configured is routed nothing new (404 no-route); its streams in flight finish
        under the keys kept as for an evicted instance."""
        settings, applied, held = split_settings(self.settings, settings, RESTART_ONLY)
        warn_held(settings.source, held)
        names = [r.name for r in settings.proxies]
        router, gate = Router(settings.proxies), NegotiationGate(names, self.clock.seconds())
        now = self.clock.seconds()
        self.settings, self.router, self.gate = settings, router, gate
        for site in self.sites:
            site.apply(settings)
        self.negotiator.set_proxy_keys({r.name: r.public_key for r in settings.proxies})
        removed = [n for n in self.instances if n not in names]
        for name in removed:
            for peer in self.instances.pop(name):
                self.evicted[peer] = (name, now)
            for waiter in self._waiters.pop(name, []):
                waiter.errback(NoRoute())
            self.last_error.pop(name, None)
            self.key_expired.discard(name)
            self._turns.pop(name, None)
        added = [n for n in names if n not in self.instances]
        for name in added:
            self.instances[name] = []
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
        else:
            for stream in list(self.streams.values()):
                stream.bus_lost()

    def _announce(self) -> None:
        if self.bus.connected:
            self._announced = self.clock.seconds()
            message = self.negotiator.announce(self._announced)
            self.bus.publish(self.channels.announce, message).addErrback(log_failure("announcing failed"))

    def _tidy(self) -> Deferred[None] | None:
        now = self.clock.seconds()
        self.keyring.expire(now)
        self.node.drop_log.flush()
        for name, instances in self.instances.items():
            live = [i for i in instances if self.keyring.current(i) is not None]
            if len(live) < len(instances):
                log.warn("proxy {proxy}: a session key passed its hard lifetime or message budget before it "
                         "was rotated; failing closed until the proxy negotiates again", proxy=name)
                self.last_error[name] = "session key expired before rotation (is the proxy negotiating?)"
                if not live:
                    self.key_expired.add(name)
                # Their answers would come under that key and be dropped: fail them now.
                for stream in [s for s in self.streams.values() if s.peer in instances and s.peer not in live]:
                    stream.instance_gone(KeyExpired("ppbridge: the proxy's session key expired mid-request"))
            instances[:] = live
        keep = EVICTED_KEEP * self.settings.announce_interval
        busy = {s.peer for s in self.streams.values()}  # a leaving instance still answering
        for peer in [p for p, (_, when) in self.evicted.items() if when + keep < now and p not in busy]:
            del self.evicted[peer]
            self.keyring.drop_peer(peer)
        for instance in [i for i, name in self.owners.items() if not self._holds_keys(name, i)]:
            del self.owners[instance]
        return self._check_liveness()

    def _check_liveness(self) -> Deferred[None] | None:
        """Evict proxy instances whose data channel has no subscriber.

        PUBLISH counts reaching no one evict at once, but a pattern subscriber makes them
        lie; this finds a restarted proxy's old instance (checked every second, and at once
        when a new instance appears) before requests are sent there. Evicting a live proxy
        that is just resubscribing is harmless: it renegotiates whenever it reconnects.
        """
        entries = {p: self.keyring.current(p) for peers in self.instances.values() for p in peers}
        channels = {self.data_channel(e): p for p, e in entries.items() if e is not None}
        if not channels or not self.bus.connected:
            return None

        def check(counts: dict[bytes, int]) -> None:
            for channel, instance in channels.items():
                if counts.get(channel, 1) == 0:
                    self.evict(instance, "its data channel has no subscriber")

        return self.bus.numsub(list(channels)).addCallback(check)

    # bus input

    def _dispatch(self, channel: bytes, data: bytes) -> None:
        if channel == self.channels.negotiate:
            self._on_key_request(data)
        elif channel == self._control:
            self._on_confirm(channel, data)
        elif self.channels.is_reply_of(self.id, channel):
            self._on_reply(channel, data)
        else:
            raise BusMessageError("unexpected-channel", "")

    def _on_key_request(self, data: bytes) -> None:
        self.gate.check(data, self.clock.seconds())  # before decoding: a flood must not cost RSA verifies
        result = self.negotiator.handle_request(data, self.clock.seconds())
        if result is None:
            return  # addressed to another forwarder
        channel, grant, session = result
        owner = self.owners.get(session.instance)
        if owner is not None and owner != session.proxy and self._holds_keys(owner, session.instance):
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
        owner = self.owners.get(session.instance)
        if owner is not None and owner != session.proxy and self._holds_keys(owner, session.instance):
            raise BusMessageError("instance-claimed", f"confirmation from proxy {session.proxy} for an instance "
                                                      f"of proxy {owner}")
        now = self.clock.seconds()
        if header.stream_id == LEAVING:
            # Draining; under a key just granted (it rekeys for its calls in flight) that key seals
            # those streams now, but routes nothing new: no _serve, no acknowledgement, kept evicted.
            if self.keyring.confirm(entry.key_id, peer, now):
                self.owners[session.instance] = session.proxy
                self.evicted.setdefault(peer, (session.proxy, now))
                log.info("proxy instance {peer} is leaving; key {fp} now seals its requests in flight",
                         peer=peer.decode("ascii"), fp=session.envelope.fingerprint)
            self._leaving(session.proxy, peer)
            return
        if self.keyring.confirm(entry.key_id, peer, now):
            self.owners[session.instance] = session.proxy
            self._serve(session.proxy, peer)
            log.info("proxy {proxy} (instance {instance}) confirmed key {fp}", proxy=session.proxy,
                     instance=session.instance.hex(), fp=session.envelope.fingerprint)
        elif peer in self.evicted and self.keyring.current(peer) is entry and session.proxy in self.instances:
            # A heartbeat under the current key of an instance we evicted: it is alive (Redis
            # lied, or it was resubscribing). Route to it again.
            del self.evicted[peer]
            self._serve(session.proxy, peer)
            log.info("proxy {proxy} (instance {instance}) is back", proxy=session.proxy,
                     instance=session.instance.hex())
        if self.keyring.current(peer) is entry and session.proxy in self.instances:
            # Acknowledge, so the proxy knows this forwarder routes to it (its /healthz).
            self.node.send(entry, self.data_channel(entry), MsgType.CONFIRM, bytes(16), 0, b"").addErrback(
                log_failure("acknowledging a proxy failed"))

    def _serve(self, name: str, peer: bytes) -> None:
        """Route requests for ``name`` to ``peer`` (it holds a confirmed key); nothing for a
        name no longer configured (removed by a reload while it held a key)."""
        instances = self.instances.get(name)
        if instances is None:
            return
        if peer not in instances:
            instances.append(peer)
            if len(instances) > 1:  # a restart, most likely: is the old instance still there?
                d = self._check_liveness()
                if d is not None:
                    d.addErrback(log_failure("checking proxy instances failed"))
        self.last_error.pop(name, None)
        self.key_expired.discard(name)
        for waiter in self._waiters.pop(name, []):
            waiter.callback(None)

    def _leaving(self, name: str, peer: bytes) -> None:
        """The proxy instance is draining: route nothing new to it. Unlike :meth:`evict`, its
        requests in flight go on (its answers come under the keys kept, see :meth:`_tidy`)
        and nothing is announced; it stops heartbeating, so it is not routed to again."""
        instances = self.instances.get(name, [])
        if peer in instances:
            instances.remove(peer)
            self.evicted[peer] = (name, self.clock.seconds())
            log.info("proxy instance {peer} is leaving; routing nothing new to it", peer=peer.decode("ascii"))

    def _holds_keys(self, name: str, instance: bytes) -> bool:
        """Whether ``name`` still has a key (live or evicted) for ``instance``."""
        peer = proxy_peer(name, instance)
        return self.keyring.current(peer) is not None or peer in self.evicted

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
        entries = [self.keyring.current(i) for i in self.instances.get(proxy, [])]
        return [e for e in entries if e is not None]

    def pick(self, proxy: str) -> list[KeyEntry]:
        """The candidates in the order to try them: round robin, one step per call."""
        entries = self.candidates(proxy)
        if len(entries) > 1:
            turn = self._turns.get(proxy, 0)
            self._turns[proxy] = turn + 1
            start = turn % len(entries)
            entries = entries[start:] + entries[:start]
        return entries

    def unavailable(self, name: str) -> RequestError:
        """Why ``name`` cannot take a request now."""
        if name in self.key_expired:
            return KeyExpired(f"ppbridge: proxy {name!r} has no session key within its hard lifetime "
                              f"(rotation overdue)")
        return ProxyUnavailable(f"ppbridge: proxy {name!r} is not connected or has no key yet")

    def evict(self, peer: bytes, reason: str) -> None:
        """Stop routing to a proxy process that seems gone (its data channel reached nobody).

        Redis says so, and Redis may lie: its keys are kept for a few announce intervals and
        an announcement goes out at once; a live proxy answers it with a heartbeat under its
        key and is routed to again (see :meth:`_on_confirm`).
        """
        now = self.clock.seconds()
        for name, instances in self.instances.items():
            if peer in instances:
                instances.remove(peer)
                self.evicted[peer] = (name, now)
                self.last_error[name] = reason
                log.info("proxy instance {peer} is gone: {reason}", peer=peer.decode("ascii"), reason=reason)
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
        if self.candidates(name):
            return defer.succeed(None)
        d: Deferred[None] = Deferred()
        self._waiters.setdefault(name, []).append(d)
        return d

    def data_channel(self, entry: KeyEntry) -> bytes:
        return self.channels.proxy_data(entry.session.proxy, entry.session.instance)

    def status(self) -> dict[str, Any]:
        """The JSON document of ``GET /status``: per proxy, its newest instance's key (by
        fingerprint only) and every live instance."""
        now = self.clock.seconds()
        proxies = {}
        for name, instances in self.instances.items():
            live = [self._instance_status(i, now) for i in instances]
            newest = min(live, key=lambda s: s["key_age_s"], default={"key_fingerprint": None})
            proxies[name] = {**newest, "instances": live, "last_error": self.last_error.get(name)}
        return {"forwarder": self.id.hex(), "redis_connected": self.bus.connected,
                "streams": len(self.streams), "proxies": proxies}

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
        live = len(self.candidates(name))
        if live:
            return True, f"{live} live instance{'s' if live > 1 else ''} with a key"
        if name in self.key_expired:
            return False, "no session key within its hard lifetime (rotation overdue)"
        why = self.last_error.get(name)
        return False, "no live instance with a key" + (f" ({why})" if why else " (not connected, or no key yet)")
