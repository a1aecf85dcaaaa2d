"""The proxy: negotiates its keys (steps 2 and 3) and answers requests from its upstream (step 4).

:class:`ProxyService` owns the bus, the negotiation, the keys it holds with each forwarder and
the upstream calls in flight (:mod:`ppbridge.upstream`); when it asks for keys, and the rekey
schedule, are its :class:`~ppbridge.keyrequests.KeyRequests`.
"""

from __future__ import annotations

import os
from typing import Any, cast

from twisted.application.service import MultiService
from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.web.iweb import IAgent

from ppbridge.bus import Bus
from ppbridge.channels import Channels
from ppbridge.config import ProxySettings
from ppbridge.errors import BusLost, BusMessageError, GatewayTimeout, ProtocolFailure, reset_code
from ppbridge.keyrequests import TICK, KeyRequests
from ppbridge.keyring import KeyEntry, Keyring
from ppbridge.metrics import Metrics
from ppbridge.negotiation import ANY_FORWARDER, ProxyNegotiator
from ppbridge.node import SessionNode
from ppbridge.owedresets import Owed, OwedResets
from ppbridge.ratelimit import ANNOUNCE_BURST, ANNOUNCE_RATE, TokenBucket
from ppbridge.rekey import RekeySchedule
from ppbridge.reload import split_settings, warn_held
from ppbridge.streams import Chunk, RecentlyClosed
from ppbridge.timerpool import TimerPool
from ppbridge.timers import Periodic, log_failure, wait_until
from ppbridge.upgradecall import UpgradeCall, is_upgrade
from ppbridge.upstream import UpstreamCall
from ppbridge.upstreamclient import Upstream
from ppbridge.wire import ID_SIZE, LEAVING, OVERHEAD, STREAM_ID_SIZE, MsgType, RequestHead, encode_reset

log = Logger()
NO_STREAM = bytes(STREAM_ID_SIZE)
SILENCE = 3  # announce intervals: a forwarder not heard from is forgotten, one not acknowledging
# our heartbeats is asked for a new key, and /healthz counts only acknowledged forwarders
LEAVE_WAIT = 5.0  # seconds, at most, publishing the LEAVING messages may take on stop
# What a reload cannot change in a running proxy (its identity, its keys, the bus, the admin
# port, the flow-control sizes it negotiated): kept until a restart.
RESTART_ONLY = ("redis", "name", "private_key", "private_key_path", "forwarder_key", "forwarder_key_path",
                "admin_listen", "frame_size", "window", "max_clock_skew")
# What a forwarder is told of a stream this proxy dropped for want of Redis (ppbridge.owedresets).
LOST_MID_REQUEST = encode_reset(reset_code(BusLost), "ppbridge: the proxy lost its Redis connection mid-request")
LOST_BEFORE_CALL = encode_reset(reset_code(BusLost), "ppbridge: the proxy's Redis connection was down when the"
                                " request came; it was not sent to the upstream")


class ProxyService(MultiService):
    """Everything a proxy process does."""

    def __init__(self, settings: ProxySettings, bus: Bus, clock: IReactorTime, reactor: Any = None,
                 agent: IAgent | None = None, instance: bytes | None = None) -> None:
        super().__init__()
        self.settings = settings
        self.bus = bus
        self.clock = clock
        self.instance = instance or os.urandom(ID_SIZE)
        self.channels = Channels(settings.redis.namespace)
        self.metrics = Metrics()
        # Observed per call: the tally of this proxy's name (restart-only) looked up once.
        self.upstream_latency = self.metrics.upstream_latency_of(settings.name)
        self.keyring = Keyring(settings.rekey.grace, clock.seconds)
        self.node = SessionNode(self.keyring, bus, clock, self.metrics, settings.frame_size + OVERHEAD, "proxy")
        self.negotiator = ProxyNegotiator(
            settings.name, self.instance, settings.private_key, settings.forwarder_key, self.channels,
            settings.frame_size, settings.window, settings.max_clock_skew, settings.rekey.key_lifetime,
            settings.rekey.messages_per_key,
        )
        # Signature checks of announcements, a second (a forged one costs as much as a real one).
        self.announce_budget = TokenBucket(ANNOUNCE_RATE, ANNOUNCE_BURST, clock.seconds())
        self.key_requests = KeyRequests(settings.rekey, clock, bus, self.channels, self.negotiator, self.keyring,
                                        self.metrics, self._renew_instance)
        self._reactor = reactor if reactor is not None else clock
        self._agent = agent
        self.upstream = Upstream(settings.upstream, self._reactor, settings.upstream_connect_timeout, agent)
        self.data_channel = self.channels.proxy_data(settings.name, self.instance)
        self.calls: dict[tuple[bytes, bytes], UpstreamCall] = {}
        # The calls' timers: a call's reactor call serves the next call (ppbridge.timerpool).
        self._call_timers = TimerPool(clock)
        self.call_clock = cast(IReactorTime, self._call_timers.pooled_clock)
        self.draining = False  # stopping: forwarders told we are leaving, no heartbeats, keys only for calls
        self.closed = RecentlyClosed()
        self.owed = OwedResets("forwarders")  # RESETs for streams ended while Redis was away, sent once it is back
        self.heard: dict[bytes, float] = {}  # forwarder -> last valid message from it
        self.acked: dict[bytes, float] = {}  # forwarder -> last acknowledgement that it routes to us
        self._beat: dict[bytes, float] = {}  # forwarder -> when we last sent it a heartbeat
        self._tick = Periodic(clock, TICK, self._on_tick, "negotiation and rekey timer")

    @property
    def schedule(self) -> RekeySchedule:
        """The rekey schedule in force (see :class:`KeyRequests`)."""
        return self.key_requests.schedule

    # lifecycle

    def startService(self) -> None:
        super().startService()
        self.node.attach(self._dispatch)
        self.bus.on_state = self._on_state
        for channel in (self.data_channel, self.channels.announce):
            self.bus.subscribe(channel).addErrback(log_failure("subscribing failed"))
        self.bus.start()
        self._tick.start()
        log.info("proxy {name} (instance {instance}) calling {upstream}", name=self.settings.name,
                 instance=self.instance.hex(), upstream=self.settings.upstream)

    def stopService(self) -> Deferred[None]:
        """Drain, then stop (SIGTERM): tell every forwarder we are leaving (a CONFIRM with
        stream id LEAVING, so it routes nothing new to us), let the calls in flight finish for
        up to ``drain_timeout`` seconds, then stop; calls still running then are cancelled."""
        self.draining = True
        self.key_requests.restart_rotations()  # rotations for the calls in flight start afresh
        limit = self.settings.drain_timeout
        if limit <= 0:
            return self._stop_now()
        told = [self.node.send(entry, self.channels.forwarder_control(peer), MsgType.CONFIRM, LEAVING, 0, b"")
                .addErrback(log_failure("telling a forwarder we are leaving failed"))
                for peer, entry in self._current().items()] if self.bus.connected else []
        d: Deferred[Any] = defer.gatherResults(told).addTimeout(min(limit, LEAVE_WAIT), self.clock)
        d.addErrback(lambda f: log.warn("telling the forwarders we are leaving: {error}", error=f.getErrorMessage()))
        d.addCallback(lambda _: self._drain(limit))
        return d.addBoth(lambda _: self._stop_now())

    def _drain(self, limit: float) -> Deferred[None] | None:
        if self.calls:
            log.info("draining {n} requests (up to {limit} s)", n=len(self.calls), limit=limit)

            def done(drained: bool) -> None:
                if drained:
                    log.info("drained")
                else:
                    log.warn("{n} requests still in flight after {limit} s; cancelling them", n=len(self.calls),
                             limit=limit)

            return wait_until(self.clock, lambda: not self.calls, limit).addCallback(done)
        return None

    def _stop_now(self) -> Deferred[None]:
        self._tick.stop()
        for call in list(self.calls.values()):
            call.cancel("proxy stopping")
        self._call_timers.stop()
        d = defer.maybeDeferred(super().stopService)
        d.addBoth(lambda _: self.upstream.close())
        return d.addBoth(lambda _: self.bus.stop())

    def reload(self, settings: ProxySettings) -> None:
        """Run with ``settings`` (SIGHUP): the upstream URL and connect timeout (calls in
        flight finish on the old connection pool, closed once they are done), the rekey
        policy and the timeouts read at use follow; :data:`RESTART_ONLY` keys keep their old
        values (a warning each)."""
        settings, applied, held = split_settings(self.settings, settings, RESTART_ONLY)
        warn_held(settings.source, held)
        upstream = self.upstream
        if (settings.upstream, settings.upstream_connect_timeout) != (self.settings.upstream,
                                                                       self.settings.upstream_connect_timeout):
            upstream = Upstream(settings.upstream, self._reactor, settings.upstream_connect_timeout, self._agent)
        old_upstream, self.upstream = self.upstream, upstream
        self.settings = settings
        self.key_requests.reload(settings.rekey)
        if old_upstream is not upstream:
            # The calls in flight hold the old pool's connections: close it once they are over.
            busy = set(self.calls)
            d = wait_until(self.clock, lambda: not busy.intersection(self.calls), settings.upstream_timeout)
            d.addCallback(lambda _: old_upstream.close()).addErrback(log_failure("closing the old upstream failed"))
        log.info("reloaded {file}: {what}", file=str(settings.source), what=", ".join(applied) or "nothing")

    def _on_state(self, up: bool) -> None:
        self.metrics.redis_up.set(1 if up else 0)
        if up:
            # Renegotiate after every (re)connection: while we were away a forwarder may
            # have dropped us (it evicts instances it cannot reach) or restarted.
            self._negotiate(ANY_FORWARDER)
            self.owed.pay(self.clock.seconds(), self.keyring, self.node)
        else:
            for call in list(self.calls.values()):
                self.owe_reset(call)
                call.cancel("lost the Redis connection")

    def owe_reset(self, call: UpstreamCall, payload: bytes = LOST_MID_REQUEST) -> None:
        """``call``'s forwarder is owed a RESET for it (``payload``), sent once the bus is back."""
        self.owed.owe(Owed(call.forwarder, call.head.reply_channel, call.stream_id, payload,
                           self.clock.seconds() + self.settings.stream_idle_timeout))

    # timers: negotiation retry, rekey, expiry

    def _on_tick(self) -> None:
        now = self.clock.seconds()
        for channel in self.negotiator.expire(now):
            self.bus.unsubscribe(channel).addErrback(log_failure("unsubscribing failed"))
        self.keyring.expire(now)
        self.owed.expire(now)
        self.node.drop_log.flush()
        if self.draining:
            # No heartbeat (it would make a forwarder route to us again); new keys only where
            # calls are in flight, so that no call outlives its key.
            self.key_requests.rekey_in_flight(now, self._busy_forwarders())
            return
        self._forget_silent(now)
        current = self._current()
        for peer, entry in current.items():
            if now - self._beat.get(peer, entry.created) >= entry.session.announce_interval:
                self._heartbeat(peer, entry, now)
        unacked = [p for p, e in current.items()  # not acknowledging our heartbeats: asked for a new key
                   if now - self.acked.get(p, e.created) > SILENCE * e.session.announce_interval]
        self.key_requests.tick(now, self.node.messages, unacked)

    def _renew_instance(self) -> None:
        """Take a new instance id, and the data channel named after it (see :class:`KeyRequests`)."""
        old = self.data_channel
        self.instance = os.urandom(ID_SIZE)
        self.negotiator.instance = self.instance
        self.data_channel = self.channels.proxy_data(self.settings.name, self.instance)
        self.bus.subscribe(self.data_channel).addErrback(log_failure("subscribing failed"))
        self.bus.unsubscribe(old).addErrback(log_failure("unsubscribing failed"))

    def _current(self) -> dict[bytes, KeyEntry]:
        entries = {p: self.keyring.current(p) for p in self.keyring.peers()}
        return {p: e for p, e in entries.items() if e is not None}

    def _forget_silent(self, now: float) -> None:
        """Forget forwarders not heard from for SILENCE announce intervals (a forwarder that
        died), so their keys neither linger nor show in /status."""
        for peer, entry in self._current().items():
            if now - self.heard.get(peer, entry.created) > SILENCE * entry.session.announce_interval:
                log.info("forwarder {id} silent for {n} announce intervals; forgetting its key", id=peer.hex(),
                         n=SILENCE)
                self._forget(peer, "the forwarder went silent")

    def _heartbeat(self, forwarder: bytes, entry: KeyEntry, now: float) -> None:
        """A CONFIRM under our current key, to the forwarder's control channel: a forwarder
        that evicted us on a false report (Redis may lie about subscriber counts) routes to us
        again when it opens this, and it acknowledges every one on our data channel. Sent on
        each of its announcements and, should those not come through (a flood of forged ones
        uses up their budget), once per announce interval anyway."""
        self._beat[forwarder] = now
        self.node.send(entry, self.channels.forwarder_control(forwarder), MsgType.CONFIRM, NO_STREAM, 0,
                       b"").addErrback(log_failure("sending a heartbeat failed"))

    def _forget(self, forwarder: bytes, why: str) -> None:
        self.keyring.drop_peer(forwarder)
        self.heard.pop(forwarder, None)
        self.acked.pop(forwarder, None)
        self._beat.pop(forwarder, None)
        for call in [c for c in self.calls.values() if c.forwarder == forwarder]:
            call.cancel(why)

    def _busy_forwarders(self) -> set[bytes]:
        return {call.forwarder for call in self.calls.values()}

    def _negotiate(self, target: bytes) -> None:
        """Ask ``target`` (or every forwarder) for a key. While draining, only a forwarder we
        have calls in flight with is asked (for them), never every forwarder or a new one."""
        if self.draining and (target == ANY_FORWARDER or target not in self._busy_forwarders()):
            return
        self.key_requests.ask(target, self.draining)

    # bus input

    def _dispatch(self, channel: bytes, data: bytes) -> None:
        if channel == self.data_channel:
            self._on_data(channel, data)
        elif channel == self.channels.announce:
            self._on_announce(data)
        elif self.negotiator.is_pending(channel):
            self._on_grant(channel, data)
        else:
            raise BusMessageError("unexpected-channel", "")

    def _on_announce(self, data: bytes) -> None:
        now = self.clock.seconds()
        if not self.announce_budget.take(now):  # before decoding: a flood must not cost RSA verifies
            raise BusMessageError("rate-limited", "announcements over budget")
        forwarder = self.negotiator.verify_announce(data, now).forwarder
        entry = self.keyring.current(forwarder)
        if self.draining:
            return  # nothing that would make it route to us again
        if entry is not None:
            self.heard[forwarder] = now
            self._heartbeat(forwarder, entry, now)  # at once: it may have just evicted us
        else:
            self.key_requests.announced(forwarder, now)

    def _on_grant(self, channel: bytes, data: bytes) -> None:
        now = self.clock.seconds()
        entry = self.key_requests.take_grant(channel, data, now)
        forwarder = entry.session.forwarder
        self.heard[forwarder] = now
        # A grant for a request made before we began draining: confirm nothing, say we are leaving.
        stream = LEAVING if self.draining else NO_STREAM
        self.node.send(entry, self.channels.forwarder_control(forwarder), MsgType.CONFIRM, stream, 0,
                       b"").addErrback(log_failure("confirming a key failed"))

    def _on_data(self, channel: bytes, data: bytes) -> None:
        entry, header, payload = self.node.open(channel, data)
        forwarder = entry.session.forwarder
        now = self.clock.seconds()
        self.heard[forwarder] = now
        key = (forwarder, header.stream_id)
        if header.type is MsgType.REQ_HEAD:
            if header.seq != 0 or key in self.calls or key in self.closed:
                raise BusMessageError("duplicate-stream", "a second head for one stream")
            head, body = RequestHead.decode(payload)
            if head.reply_channel != self.channels.reply(forwarder):
                raise BusMessageError("bad-reply-channel", "not the reply channel of the forwarder that sealed it")
            new = (UpgradeCall if is_upgrade(head) else UpstreamCall)(self, forwarder, header.stream_id, head)
            self.calls[key] = new
            self.metrics.active_streams.inc()
            # How long until the forwarder's clock passes the deadline, by our most pessimistic
            # estimate of its clock: nothing may start after the client got its 504.
            left = head.deadline_ms / 1000 - (now + entry.session.clock_ahead)
            if left <= 0:
                new.refuse(GatewayTimeout("ppbridge: the request reached the proxy after its deadline"))
                raise BusMessageError("expired", f"request head {-left:.3f} s past its deadline")
            if not self.bus.connected:
                # Read on the subscriber while the publisher is down: its answer could not be
                # published, so the upstream is not called; the forwarder is told once it can be.
                self.owe_reset(new, LOST_BEFORE_CALL)
                new.cancel(BusLost.cause)
                return
            new.start(body, header.end, left)
            return
        if header.type is MsgType.CONFIRM and header.stream_id == NO_STREAM:
            self.acked[forwarder] = now  # the forwarder routes to us
            return
        call = self.calls.get(key)
        if call is None:
            if key in self.closed:
                return  # a frame that crossed the stream's end: expected, not hostile
            raise BusMessageError("unknown-stream", f"{header.type.name} for a stream that is over")
        try:
            call.on_message(header, payload)
        except BusMessageError as err:
            # A stream violation after authentication (a gap, data beyond credit or after END):
            # the upload can no longer be trusted to be whole, so the upstream call stops now.
            self.metrics.aborted.labels(err.reason).inc()
            call.refuse(ProtocolFailure("ppbridge: the request stream broke its rules"))
            raise

    # used by UpstreamCall

    def send(self, forwarder: bytes, channel: bytes, mtype: MsgType, stream_id: bytes, seq: int, payload: Chunk,
             flags: int = 0) -> Deferred[int] | None:
        """Seal under the current key with ``forwarder`` and publish; None without a key."""
        entry = self.keyring.current(forwarder)
        if entry is None:
            return None
        return self.node.send(entry, channel, mtype, stream_id, seq, payload, flags)

    def frame_size(self, forwarder: bytes) -> int:
        entry = self.keyring.current(forwarder)
        return entry.session.frame_size if entry is not None else self.settings.frame_size

    def peer_window(self, forwarder: bytes) -> int:
        entry = self.keyring.current(forwarder)
        return entry.session.peer_window if entry is not None else self.settings.window

    def call_done(self, call: UpstreamCall) -> None:
        key = (call.forwarder, call.stream_id)
        if self.calls.pop(key, None) is not None:
            self.closed.add(key)
            self.metrics.active_streams.dec()

    # admin

    def status(self) -> dict[str, Any]:
        """The JSON document of ``GET /status``: this proxy's key with each forwarder, by
        fingerprint only, and the rekey period in force."""
        now = self.clock.seconds()
        forwarders: dict[str, dict[str, Any]] = {}
        for peer in self.keyring.peers():
            entry, stats = self.keyring.current(peer), self.keyring.stats.get(peer)
            if entry is not None and stats is not None:
                forwarders[peer.hex()] = {
                    "key_fingerprint": entry.session.envelope.fingerprint,
                    "key_age_s": round(now - stats.current_since, 3),
                    "messages": entry.session.envelope.messages,
                    "rotations": stats.rotations,
                    # seconds since this forwarder last confirmed it routes to us (None: never)
                    "acknowledged_s_ago": None if peer not in self.acked else round(now - self.acked[peer], 3),
                }
        newest = min(forwarders.values(), key=lambda f: f["key_age_s"], default={"key_fingerprint": None})
        return {
            "proxy": self.settings.name, "instance": self.instance.hex(), "redis_connected": self.bus.connected,
            **newest, "period_s": round(self.schedule.period(), 3),
            "rekey_mode": self.settings.rekey.mode, "streams": len(self.calls),
            "last_error": self.key_requests.last_error,
            "forwarders": forwarders,
        }

    def healthy(self) -> bool:
        """Connected, not draining, and some forwarder acknowledged (recently) that it routes to us."""
        now = self.clock.seconds()
        return self.bus.connected and not self.draining and any(
            now - self.acked.get(p, float("-inf")) <= SILENCE * e.session.announce_interval
            for p, e in self._current().items()
        )

    # probes (read only; see ppbridge.admin)

    def live(self) -> bool:
        """Started and its timer running: the process works (``/livez``)."""
        return bool(self.running) and self._tick.running

    def ready(self) -> bool:
        """Can serve: connected and acknowledged by a forwarder, as :meth:`healthy` (``/readyz``)."""
        return self.healthy()

    def proxy_health(self, name: str) -> tuple[bool, str]:
        """This proxy's own health under its name (``/healthz?proxy=NAME``); KeyError for
        any other name."""
        if name != self.settings.name:
            raise KeyError(name)
        if not self.bus.connected:
            return False, "not connected to Redis"
        if not self.healthy():
            return False, "no forwarder has acknowledged recently that it routes to this proxy"
        return True, "connected and acknowledged by a forwarder"
