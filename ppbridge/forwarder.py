"""The forwarder: public HTTP in, encrypted pub/sub out (step 4), keys granted (step 2).

:class:`ForwarderService` owns the bus, the negotiation, the keys of every proxy instance and
the streams in flight; the HTTP face (a twisted.web resource and its request class) lives in
:mod:`ppbridge.webface` and calls in here.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from twisted.application.service import MultiService
from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from ppbridge.bus import Bus
from ppbridge.channels import Channels
from ppbridge.config import ForwarderSettings, Route
from ppbridge.errors import BusMessageError, NoRoute
from ppbridge.keyring import KeyEntry, Keyring
from ppbridge.metrics import Metrics
from ppbridge.negotiation import ForwarderNegotiator
from ppbridge.node import SessionNode
from ppbridge.routing import Router
from ppbridge.streams import RecentlyClosed
from ppbridge.timers import Periodic, log_failure
from ppbridge.wire import ID_SIZE, OVERHEAD, MsgType

if TYPE_CHECKING:
    from ppbridge.webface import ClientStream

log = Logger()
TIDY_INTERVAL = 1.0


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
        self.keyring = Keyring(settings.key_grace)
        self.node = SessionNode(self.keyring, bus, clock, self.metrics, settings.frame_size + OVERHEAD, "forwarder")
        self.negotiator = ForwarderNegotiator(
            self.id, settings.signing_key, {r.name: r.public_key for r in settings.proxies}, self.channels,
            settings.frame_size, settings.window, settings.max_clock_skew,
        )
        self.router = Router(settings.proxies)
        self.instances: dict[str, list[bytes]] = {r.name: [] for r in settings.proxies}
        self.last_error: dict[str, str] = {}
        self.streams: dict[bytes, ClientStream] = {}
        self.closed = RecentlyClosed()
        self._turns: dict[str, int] = {}
        self._waiters: dict[str, list[Deferred[None]]] = {}
        self._control = self.channels.forwarder_control(self.id)
        self._loops = [
            Periodic(clock, settings.announce_interval, self._announce, "announcing"),
            Periodic(clock, TIDY_INTERVAL, self._tidy, "housekeeping"),
        ]

    # lifecycle

    def startService(self) -> None:
        super().startService()
        self.bus.on_message = self._on_message
        self.bus.on_state = self._on_state
        self.bus.subscribe(self.channels.negotiate).addErrback(log_failure("subscribing failed"))
        self.bus.psubscribe(self.channels.forwarder_pattern(self.id)).addErrback(log_failure("subscribing failed"))
        self.bus.start()
        for loop in self._loops:
            loop.start()
        log.info("forwarder {id} serving proxies {names}", id=self.id.hex(), names=", ".join(self.instances))

    def stopService(self) -> Deferred[None]:
        for loop in self._loops:
            loop.stop()
        for stream in list(self.streams.values()):
            stream.shutdown()
        d = defer.maybeDeferred(super().stopService)
        return d.addBoth(lambda _: self.bus.stop())

    def _on_state(self, up: bool) -> None:
        self.metrics.redis_up.set(1 if up else 0)
        if up:
            self._announce()
        else:
            for stream in list(self.streams.values()):
                stream.bus_lost()

    def _announce(self) -> None:
        if self.bus.connected:
            message = self.negotiator.announce(self.clock.seconds())
            self.bus.publish(self.channels.announce, message).addErrback(log_failure("announcing failed"))

    def _tidy(self) -> Deferred[None] | None:
        self.keyring.expire(self.clock.seconds())
        for name, instances in self.instances.items():
            instances[:] = [i for i in instances if self.keyring.current(i) is not None]
        return self._check_liveness()

    def _check_liveness(self) -> Deferred[None] | None:
        """Evict proxy instances whose data channel has no subscriber.

        PUBLISH counts reaching no one evict at once, but a pattern subscriber makes them
        lie; this finds a restarted proxy's old instance (checked every second, and at once
        when a new instance appears) before requests are sent there. Evicting a live proxy
        that is just resubscribing is harmless: it renegotiates whenever it reconnects.
        """
        entries = {i: self.keyring.current(i) for names in self.instances.values() for i in names}
        channels = {self.data_channel(e): i for i, e in entries.items() if e is not None}
        if not channels or not self.bus.connected:
            return None

        def check(counts: dict[bytes, int]) -> None:
            for channel, instance in channels.items():
                if counts.get(channel, 1) == 0:
                    self.evict(instance, "its data channel has no subscriber")

        return self.bus.numsub(list(channels)).addCallback(check)

    # bus input

    def _on_message(self, channel: bytes, data: bytes) -> None:
        self.node.receive(self._dispatch, channel, data)

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
        result = self.negotiator.handle_request(data, self.clock.seconds())
        if result is None:
            return  # addressed to another forwarder
        channel, grant, session = result
        self.keyring.add(session, session.instance, self.clock.seconds(), confirmed=False)
        self.metrics.negotiations.labels("granted").inc()
        log.info("granted key {fp} to proxy {proxy} (instance {instance})", fp=session.envelope.fingerprint,
                 proxy=session.proxy, instance=session.instance.hex())
        self.bus.publish(channel, grant).addErrback(log_failure("publishing a grant failed"))

    def _on_confirm(self, channel: bytes, data: bytes) -> None:
        entry, header, _ = self.node.open(channel, data)
        if header.type is not MsgType.CONFIRM:
            raise BusMessageError("unexpected-type", f"{header.type.name} on the control channel")
        session = entry.session
        if self.keyring.confirm(entry.key_id, session.instance, self.clock.seconds()):
            instances = self.instances.setdefault(session.proxy, [])
            if session.instance not in instances:
                instances.append(session.instance)
                if len(instances) > 1:  # a restart, most likely: is the old instance still there?
                    d = self._check_liveness()
                    if d is not None:
                        d.addErrback(log_failure("checking proxy instances failed"))
            self.last_error.pop(session.proxy, None)
            for waiter in self._waiters.pop(session.proxy, []):
                waiter.callback(None)
            log.info("proxy {proxy} (instance {instance}) confirmed key {fp}", proxy=session.proxy,
                     instance=session.instance.hex(), fp=session.envelope.fingerprint)

    def _on_reply(self, channel: bytes, data: bytes) -> None:
        entry, header, plaintext = self.node.open(channel, data)
        stream = self.streams.get(header.stream_id)
        if stream is None:
            if header.stream_id in self.closed:
                return  # a frame that crossed the stream's end: expected, not hostile
            raise BusMessageError("unknown-stream", "reply for a stream that is over")
        if stream.reply_channel != channel or stream.instance != entry.session.instance:
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

    def evict(self, instance: bytes, reason: str) -> None:
        """Forget a proxy instance that no longer listens (PUBLISH reached nobody)."""
        for name, instances in self.instances.items():
            if instance in instances:
                instances.remove(instance)
                self.last_error[name] = reason
                log.info("proxy {proxy} instance {instance} is gone: {reason}", proxy=name,
                         instance=instance.hex(), reason=reason)
        self.keyring.drop_peer(instance)
        for stream in [s for s in self.streams.values() if s.instance == instance]:
            stream.instance_gone()

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

    def _instance_status(self, instance: bytes, now: float) -> dict[str, Any]:
        entry, stats = self.keyring.current(instance), self.keyring.stats.get(instance)
        if entry is None or stats is None:
            return {"instance": instance.hex(), "key_fingerprint": None, "key_age_s": float("inf")}
        env = entry.session.envelope
        return {
            "instance": instance.hex(),
            "key_fingerprint": env.fingerprint,
            "key_age_s": round(now - stats.current_since, 3),
            "messages": env.messages,
            "rotations": stats.rotations,
            "period_s": None if stats.period is None else round(stats.period, 3),
        }

    def healthy(self) -> bool:
        """Connected to Redis and holding at least one confirmed key."""
        return self.bus.connected and any(self.instances.values())
