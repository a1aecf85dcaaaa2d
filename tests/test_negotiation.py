"""Tests for ppbridge.negotiation: the key exchange driven directly, and both services over an in-memory bus."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric import rsa
from treq.testing import RequestTraversalAgent
from twisted.internet.task import Clock
from twisted.trial.unittest import TestCase
from twisted.web.resource import Resource

from ppbridge import keys
from ppbridge.memorybus import MemoryBroker
from ppbridge.channels import Channels
from ppbridge.config import ForwarderSettings, ProxySettings, RedisSettings, RekeySettings, Route
from ppbridge.errors import BusMessageError
from ppbridge.forwarder import ForwarderService
from ppbridge.metrics import Metrics
from ppbridge.negotiation import (
    ANY_FORWARDER,
    LABEL_REQUEST,
    PENDING_LIFETIME,
    ForwarderNegotiator,
    NewSession,
    ProxyNegotiator,
    _grant_signed_data,
    proxy_peer,
)
from ppbridge.keyrequests import RETRY_MAX
from ppbridge.proxy import ProxyService
from ppbridge.wire import (
    FLAG_END,
    KeyGrant,
    KeyRequest,
    MsgType,
    RequestHead,
    Role,
    decode_signed,
    encode_signed,
    unpack_header,
)

T0 = 1_700_000_000.0
SKEW = 300.0
FRAME, WINDOW = 262144, 1048576
CHANNELS = Channels("ppbridge")
FORWARDER_ID = b"F" * 8
INSTANCE = b"I" * 8

_KEYS: dict[str, rsa.RSAPrivateKey] = {}


def private(name: str) -> rsa.RSAPrivateKey:
    """One 2048-bit key per name for the whole module (generating keys is slow)."""
    if name not in _KEYS:
        _KEYS[name] = keys.generate_private_key(2048)
    return _KEYS[name]


def public(name: str) -> rsa.RSAPublicKey:
    return private(name).public_key()


def proxy_negotiator(name: str = "alpha", key: str | None = None, forwarder: str = "forwarder",
                     instance: bytes = INSTANCE, channels: Channels = CHANNELS, frame: int = FRAME,
                     window: int = WINDOW) -> ProxyNegotiator:
    return ProxyNegotiator(name, instance, private(key or name), public(forwarder), channels, frame, window, SKEW)


def forwarder_negotiator(signing: str = "forwarder", proxies: tuple[str, ...] = ("alpha", "beta"),
                         forwarder_id: bytes = FORWARDER_ID, channels: Channels = CHANNELS, frame: int = FRAME,
                         window: int = WINDOW) -> ForwarderNegotiator:
    return ForwarderNegotiator(forwarder_id, private(signing), {n: public(n) for n in proxies}, channels, frame,
                               window, SKEW)


def reason(case: TestCase, f: Any, *args: Any) -> str:
    """The reason of the BusMessageError that ``f(*args)`` must raise."""
    return case.assertRaises(BusMessageError, f, *args).reason


def check_pair(case: TestCase, forwarder_side: NewSession, proxy_side: NewSession) -> None:
    """The two halves of a session seal and open each other's messages."""
    channel = b"ppbridge:p:alpha:" + INSTANCE.hex().encode()
    data = forwarder_side.envelope.seal(MsgType.REQ_HEAD, b"s" * 16, 0, channel, b"ping")
    case.assertEqual(proxy_side.envelope.open(unpack_header(data), data, channel), b"ping")
    data = proxy_side.envelope.seal(MsgType.RESP_HEAD, b"s" * 16, 0, channel, b"pong")
    case.assertEqual(forwarder_side.envelope.open(unpack_header(data), data, channel), b"pong")


class NegotiatorTests(TestCase):
    """Both halves of the exchange, called directly with explicit times."""

    def setUp(self) -> None:
        self.proxy = proxy_negotiator()
        self.forwarder = forwarder_negotiator()

    def exchange(self, now: float = T0) -> tuple[bytes, bytes, NewSession, NewSession]:
        channel, request = self.proxy.make_request(now)
        result = self.forwarder.handle_request(request, now)
        assert result is not None
        grant_channel, grant, forwarder_side = result
        self.assertEqual(grant_channel, channel)
        return channel, grant, forwarder_side, self.proxy.handle_grant(channel, grant, now)

    def test_handshake(self) -> None:
        """A verified request and grant give both sides the same session, for the right parties."""
        channel, _, fwd, prx = self.exchange()
        self.assertEqual(CHANNELS.negotiation_owner(channel), "alpha")
        self.assertEqual(fwd.envelope.fingerprint, prx.envelope.fingerprint)
        self.assertEqual(fwd.envelope.key_id, prx.envelope.key_id)
        self.assertEqual((fwd.envelope.role, prx.envelope.role), (Role.FORWARDER, Role.PROXY))
        for session in (fwd, prx):
            self.assertEqual((session.proxy, session.instance, session.forwarder), ("alpha", INSTANCE, FORWARDER_ID))
        check_pair(self, fwd, prx)

    def test_each_exchange_gives_a_new_key(self) -> None:
        """Two negotiations give two different keys and key ids."""
        _, _, one, _ = self.exchange()
        _, _, two, _ = self.exchange()
        self.assertNotEqual(one.envelope.key_id, two.envelope.key_id)
        self.assertNotEqual(one.envelope.fingerprint, two.envelope.fingerprint)

    def test_flow_limits_agreed(self) -> None:
        """The frame size is the smaller of both limits; each side learns the window the other grants."""
        self.proxy = proxy_negotiator(frame=65536, window=200000)
        self.forwarder = forwarder_negotiator(frame=131072, window=300000)
        _, _, fwd, prx = self.exchange()
        self.assertEqual((fwd.frame_size, prx.frame_size), (65536, 65536))
        self.assertEqual((fwd.peer_window, prx.peer_window), (200000, 300000))

    def test_secret_wrapped_for_requesting_proxy_only(self) -> None:
        """The grant's secret opens with the requesting proxy's private key and with no other key."""
        _, grant, _, _ = self.exchange()
        decoded, _, _ = decode_signed(grant, KeyGrant)
        self.assertIsNone(keys.unwrap(private("beta"), decoded.wrapped))
        self.assertIsNone(keys.unwrap(private("forwarder"), decoded.wrapped))
        secret = keys.unwrap(private("alpha"), decoded.wrapped)
        self.assertEqual(len(secret or b""), 32)

    def test_grant_signed_by_wrong_forwarder(self) -> None:
        """A grant signed by any key but the pinned forwarder key is rejected as bad-signature."""
        rogue = forwarder_negotiator(signing="rogue")
        channel, request = self.proxy.make_request(T0)
        result = rogue.handle_request(request, T0)
        assert result is not None
        self.assertEqual(reason(self, self.proxy.handle_grant, channel, result[1], T0), "bad-signature")

    def test_tampered_grant(self) -> None:
        """Changing a signed field of a grant (here the frame size) breaks its signature."""
        channel, request = self.proxy.make_request(T0)
        result = self.forwarder.handle_request(request, T0)
        assert result is not None
        grant, body, signature = decode_signed(result[1], KeyGrant)
        tampered = KeyGrant(grant.forwarder, grant.request_nonce, grant.key_id, grant.wrapped, grant.ephemeral,
                            grant.frame_size * 2, grant.window, grant.timestamp_ms)
        data = encode_signed(tampered.encode_body(), signature)
        self.assertEqual(reason(self, self.proxy.handle_grant, channel, data, T0), "bad-signature")

    def test_validly_signed_grant_with_foreign_wrap(self) -> None:
        """A grant the forwarder signed but whose secret was wrapped for another key does not open."""
        channel, request_data = self.proxy.make_request(T0)
        request, _, _ = decode_signed(request_data, KeyRequest)
        grant = KeyGrant(FORWARDER_ID, request.nonce, b"k" * 8, keys.wrap(public("beta"), b"s" * 32),
                         os.urandom(32), FRAME, WINDOW, int(T0 * 1000))
        body = grant.encode_body()
        signature = keys.sign(private("forwarder"), _grant_signed_data(channel, request, body))
        data = encode_signed(body, signature)
        self.assertEqual(reason(self, self.proxy.handle_grant, channel, data, T0), "bad-wrap")

    def test_replayed_request(self) -> None:
        """A key request seen before is rejected as a replay, and gets no second grant."""
        _, request = self.proxy.make_request(T0)
        self.assertIsNotNone(self.forwarder.handle_request(request, T0))
        self.assertEqual(reason(self, self.forwarder.handle_request, request, T0 + 1), "replay")
        self.assertEqual(reason(self, self.forwarder.handle_request, request, T0 + SKEW), "replay")

    def test_unknown_proxy(self) -> None:
        """A request from a proxy name the forwarder has no key for is rejected."""
        stranger = proxy_negotiator(name="gamma", key="beta")
        _, request = stranger.make_request(T0)
        self.assertEqual(reason(self, self.forwarder.handle_request, request, T0), "unknown-proxy")

    def test_request_signed_by_another_proxy(self) -> None:
        """A request naming proxy alpha but signed with proxy beta's key is rejected."""
        impostor = proxy_negotiator(name="alpha", key="beta")
        _, request = impostor.make_request(T0)
        self.assertEqual(reason(self, self.forwarder.handle_request, request, T0), "bad-signature")

    def test_tampered_request(self) -> None:
        """Changing a signed field of a request (here the window) breaks its signature."""
        _, data = self.proxy.make_request(T0)
        request, _, signature = decode_signed(data, KeyRequest)
        tampered = KeyRequest(request.proxy, request.instance, request.reply_channel, request.nonce,
                              request.timestamp_ms, request.ephemeral, request.frame_size, request.window * 2,
                              request.target)
        forged = encode_signed(tampered.encode_body(), signature)
        self.assertEqual(reason(self, self.forwarder.handle_request, forged, T0), "bad-signature")

    def test_clock_skew(self) -> None:
        """Requests timestamped further than max_clock_skew in the past or future are stale; within, fine."""
        for offset in (SKEW + 1, -(SKEW + 1), 10 * SKEW):
            _, request = self.proxy.make_request(T0)
            self.assertEqual(reason(self, self.forwarder.handle_request, request, T0 + offset), "stale")
        for offset in (SKEW - 1, -(SKEW - 1)):
            _, request = self.proxy.make_request(T0)
            self.assertIsNotNone(self.forwarder.handle_request(request, T0 + offset))

    def test_reply_channel_outside_namespace(self) -> None:
        """A validly signed request whose reply channel is not a negotiation channel gets no grant."""
        request = KeyRequest("alpha", INSTANCE, b"ppbridge:p:beta:0000000000000000", os.urandom(16),
                             int(T0 * 1000), os.urandom(32), FRAME, WINDOW, ANY_FORWARDER)
        body = request.encode_body()
        data = encode_signed(body, keys.sign(private("alpha"), LABEL_REQUEST + CHANNELS.negotiate + body))
        self.assertEqual(reason(self, self.forwarder.handle_request, data, T0), "malformed")

    def test_reply_channel_of_another_proxy(self) -> None:
        """A request validly signed by alpha whose grant channel is beta's (``ns:n:beta:...``:
        a grant there would land where only beta's ACL user may subscribe) gets no grant:
        ``bad-reply-channel``; the same request on a channel of alpha's own is granted."""

        def request(channel: bytes) -> bytes:
            body = KeyRequest("alpha", INSTANCE, channel, os.urandom(16), int(T0 * 1000), os.urandom(32), FRAME,
                              WINDOW, ANY_FORWARDER).encode_body()
            return encode_signed(body, keys.sign(private("alpha"), LABEL_REQUEST + CHANNELS.negotiate + body))

        self.assertEqual(reason(self, self.forwarder.handle_request, request(CHANNELS.negotiation_temp("beta")), T0),
                         "bad-reply-channel")
        _, good = self.proxy.make_request(T0)
        self.assertIsNotNone(self.forwarder.handle_request(good, T0))

    def test_request_for_another_forwarder(self) -> None:
        """A request addressed to another forwarder id is ignored; one addressed to us is granted."""
        _, request = self.proxy.make_request(T0, target=b"X" * 8)
        self.assertIsNone(self.forwarder.handle_request(request, T0))
        _, request = self.proxy.make_request(T0, target=FORWARDER_ID)
        self.assertIsNotNone(self.forwarder.handle_request(request, T0))

    def test_grant_replayed_to_later_request(self) -> None:
        """A captured grant published on a later request's channel is rejected."""
        _, old_grant, _, _ = self.exchange()
        channel, request = self.proxy.make_request(T0 + 5)
        self.assertEqual(reason(self, self.proxy.handle_grant, channel, old_grant, T0 + 5), "unexpected-grant")
        result = self.forwarder.handle_request(request, T0 + 5)
        assert result is not None
        self.proxy.handle_grant(channel, result[1], T0 + 5)

    def test_grant_replayed_on_its_channel(self) -> None:
        """A grant delivered twice on its own channel is accepted only once."""
        channel, grant, _, _ = self.exchange()
        self.assertEqual(reason(self, self.proxy.handle_grant, channel, grant, T0 + 1), "replay")

    def test_grant_after_request_expired(self) -> None:
        """A grant arriving after the request's lifetime is rejected, and the channel is forgotten."""
        channel, request = self.proxy.make_request(T0)
        result = self.forwarder.handle_request(request, T0)
        assert result is not None
        self.assertEqual(self.proxy.expire(T0 + PENDING_LIFETIME + 1), [channel])
        self.assertFalse(self.proxy.is_pending(channel))
        self.assertEqual(reason(self, self.proxy.handle_grant, channel, result[1], T0 + PENDING_LIFETIME + 1),
                         "unexpected-grant")

    def test_grant_on_unknown_channel(self) -> None:
        """A grant on a channel with no pending request is rejected."""
        _, grant, _, _ = self.exchange()
        self.assertEqual(reason(self, self.proxy.handle_grant, CHANNELS.negotiation_temp("alpha"), grant, T0),
                         "unexpected-grant")

    def test_grant_for_another_proxy(self) -> None:
        """Proxy beta cannot use a grant made for alpha, even on its own pending channel."""
        _, alpha_grant, _, _ = self.exchange()
        beta = proxy_negotiator(name="beta")
        channel, _ = beta.make_request(T0)
        self.assertEqual(reason(self, beta.handle_grant, channel, alpha_grant, T0), "unexpected-grant")

    def test_several_forwarders_grant_one_request(self) -> None:
        """Forwarder instances sharing the signing key each grant once; the proxy gets one key per forwarder."""
        other = forwarder_negotiator(forwarder_id=b"G" * 8)
        channel, request = self.proxy.make_request(T0)
        sessions = []
        for forwarder in (self.forwarder, other):
            result = forwarder.handle_request(request, T0)
            assert result is not None
            sessions.append((result[2], self.proxy.handle_grant(channel, result[1], T0)))
        self.assertEqual({p.forwarder for _, p in sessions}, {FORWARDER_ID, b"G" * 8})
        for fwd, prx in sessions:
            check_pair(self, fwd, prx)
        self.assertNotEqual(sessions[0][1].envelope.fingerprint, sessions[1][1].envelope.fingerprint)

    def test_other_proxy_cannot_open_traffic(self) -> None:
        """A session negotiated by proxy beta opens nothing sealed for proxy alpha."""
        _, _, alpha_fwd, alpha_prx = self.exchange()
        beta = proxy_negotiator(name="beta", instance=b"J" * 8)
        channel, request = beta.make_request(T0)
        result = self.forwarder.handle_request(request, T0)
        assert result is not None
        beta_prx = beta.handle_grant(channel, result[1], T0)
        data_channel = CHANNELS.proxy_data("alpha", INSTANCE)
        data = alpha_fwd.envelope.seal(MsgType.REQ_HEAD, b"s" * 16, 0, data_channel, b"for alpha")
        forged = data[:4] + beta_prx.envelope.key_id + data[12:]  # even relabelled with beta's key id
        self.assertEqual(reason(self, beta_prx.envelope.open, unpack_header(data), data, data_channel), "bad-tag")
        self.assertEqual(reason(self, beta_prx.envelope.open, unpack_header(forged), forged, data_channel), "bad-tag")
        self.assertEqual(alpha_prx.envelope.open(unpack_header(data), data, data_channel), b"for alpha")

    def test_announce(self) -> None:
        """A fresh announcement signed with the pinned key yields the forwarder id."""
        self.assertEqual(self.proxy.verify_announce(self.forwarder.announce(T0), T0 + 1).forwarder, FORWARDER_ID)

    def test_announce_rejections(self) -> None:
        """Announcements from a rogue key, out of skew, or made for another namespace are rejected."""
        rogue = forwarder_negotiator(signing="rogue")
        self.assertEqual(reason(self, self.proxy.verify_announce, rogue.announce(T0), T0), "bad-signature")
        self.assertEqual(reason(self, self.proxy.verify_announce, self.forwarder.announce(T0), T0 + SKEW + 1),
                         "stale")
        elsewhere = forwarder_negotiator(channels=Channels("staging"))
        self.assertEqual(reason(self, self.proxy.verify_announce, elsewhere.announce(T0), T0), "bad-signature")


# --- both services over the in-memory bus ------------------------------------------------


def forwarder_settings(proxies: tuple[str, ...] = ("alpha", "beta"), signing: str = "forwarder",
                       **overrides: Any) -> ForwarderSettings:
    routes = tuple(Route(n, public(n), Path(f"/keys/{n}.pub"), path_prefix=f"/{n}") for n in proxies)
    return ForwarderSettings(source=Path("/etc/ppbridge/forwarder.toml"), redis=RedisSettings(),
                             signing_key=private(signing), signing_key_path=Path(f"/keys/{signing}.key"),
                             proxies=routes, admin_listen=None, **{"drain_timeout": 0.0, **overrides})


def proxy_settings(name: str = "alpha", key: str | None = None, forwarder: str = "forwarder",
                   **overrides: Any) -> ProxySettings:
    return ProxySettings(source=Path("/etc/ppbridge/proxy.toml"), redis=RedisSettings(), name=name,
                         private_key=private(key or name), private_key_path=Path(f"/keys/{key or name}.key"),
                         forwarder_key=public(forwarder), forwarder_key_path=Path(f"/keys/{forwarder}.pub"),
                         upstream="http://intranet.example:8000", admin_listen=None, **{"drain_timeout": 0.0, **overrides})


class Intranet(Resource):
    """The proxy's upstream, served in memory by RequestTraversalAgent (no socket)."""

    isLeaf = True

    def render_GET(self, request: Any) -> bytes:
        return b"intranet says hi"


def dropped(metrics: Metrics, why: str) -> float:
    return metrics.registry.get_sample_value("ppbridge_bus_dropped_total", {"reason": why}) or 0.0


class Bridge:
    """Services on one MemoryBroker, driven by a Clock; stopped when the test ends."""

    def __init__(self, case: TestCase) -> None:
        self.case = case
        self.clock = Clock()
        self.clock.advance(T0)
        self.broker = MemoryBroker()

    def forwarder(self, settings: ForwarderSettings | None = None, clock: Clock | None = None) -> ForwarderService:
        service = ForwarderService(settings or forwarder_settings(), self.broker.client(), clock or self.clock)
        self._run(service)
        return service

    def proxy(self, settings: ProxySettings | None = None, clock: Clock | None = None) -> ProxyService:
        clock = clock or self.clock
        agent = RequestTraversalAgent(Intranet())
        service = ProxyService(settings or proxy_settings(), self.broker.client(), clock, reactor=clock, agent=agent)
        self._run(service)
        return service

    def _run(self, service: Any) -> None:
        service.startService()
        self.case.addCleanup(lambda: service.stopService() if service.running else None)

    def published(self, mtype: MsgType, channel: bytes | None = None) -> list[tuple[bytes, bytes]]:
        """What an eavesdropper saw of one message type (optionally on one channel)."""
        return [(ch, m) for ch, m in self.broker.published
                if len(m) > 1 and m[1] == mtype and (channel is None or ch == channel)]

    def advance(self, seconds: float, step: float = 1.0) -> None:
        for _ in range(int(seconds / step)):
            self.clock.advance(step)


def fingerprint_on_proxy(proxy: ProxyService, forwarder: ForwarderService) -> str:
    entry = proxy.keyring.current(forwarder.id)
    assert entry is not None, "the proxy holds no key for this forwarder"
    return entry.session.envelope.fingerprint


class ServiceNegotiationTests(TestCase):
    """ForwarderService and ProxyService negotiating through a MemoryBroker."""

    def setUp(self) -> None:
        self.bridge = Bridge(self)

    def test_handshake(self) -> None:
        """Request, grant, confirm: then the forwarder's candidate for the proxy holds the proxy's key."""
        forwarder = self.bridge.forwarder()
        waiting = forwarder.wait_for_proxy("alpha")
        self.assertNoResult(waiting)
        proxy = self.bridge.proxy()
        self.assertEqual(len(self.bridge.published(MsgType.KEY_REQUEST, CHANNELS.negotiate)), 1)
        grants = self.bridge.published(MsgType.KEY_GRANT)
        self.assertEqual(len(grants), 1)
        self.assertEqual(CHANNELS.negotiation_owner(grants[0][0]), "alpha")
        self.assertEqual(len(self.bridge.published(MsgType.CONFIRM, CHANNELS.forwarder_control(forwarder.id))), 1)
        self.successResultOf(waiting)
        candidates = forwarder.candidates("alpha")
        self.assertEqual(len(candidates), 1)
        self.assertEqual(candidates[0].session.instance, proxy.instance)
        self.assertEqual(candidates[0].session.envelope.fingerprint, fingerprint_on_proxy(proxy, forwarder))
        self.assertEqual(forwarder.candidates("beta"), [])
        self.assertTrue(proxy.healthy())
        self.assertTrue(forwarder.healthy())

    def test_proxy_started_first(self) -> None:
        """A proxy that started before any forwarder is keyed within seconds of the forwarder starting."""
        proxy = self.bridge.proxy()
        self.assertEqual(proxy.keyring.peers(), [])
        forwarder = self.bridge.forwarder()
        self.bridge.advance(3)
        self.assertEqual(forwarder.candidates("alpha")[0].session.envelope.fingerprint,
                         fingerprint_on_proxy(proxy, forwarder))

    def test_unconfirmed_key_unused_and_expires(self) -> None:
        """Without the proxy's confirmation the forwarder never offers the key, and forgets it."""
        self.bridge.broker.drop = lambda channel, message: message[1] == MsgType.CONFIRM
        forwarder = self.bridge.forwarder()
        self.bridge.proxy()
        self.assertEqual(len(self.bridge.published(MsgType.KEY_GRANT)), 1)
        self.assertEqual(forwarder.candidates("alpha"), [])
        self.assertEqual(len(forwarder.keyring), 1)
        self.bridge.advance(PENDING_LIFETIME + 2)
        self.assertEqual(len(forwarder.keyring), 0)
        self.assertEqual(forwarder.candidates("alpha"), [])

    def test_grant_from_wrong_forwarder_key(self) -> None:
        """A grant signed by a forwarder key the proxy does not pin is dropped as bad-signature."""
        rogue = self.bridge.forwarder(forwarder_settings(signing="rogue"))
        proxy = self.bridge.proxy()
        self.assertEqual(len(self.bridge.published(MsgType.KEY_GRANT)), 1)
        self.assertEqual(dropped(proxy.metrics, "bad-signature"), 1)
        self.assertEqual(proxy.keyring.peers(), [])
        self.assertEqual(self.bridge.published(MsgType.CONFIRM), [])
        self.assertEqual(rogue.candidates("alpha"), [])
        self.assertFalse(proxy.healthy())
        # The genuine forwarder is still accepted afterwards.
        forwarder = self.bridge.forwarder()
        self.bridge.advance(3)
        self.assertEqual(proxy.keyring.peers(), [forwarder.id])

    def test_replayed_key_request(self) -> None:
        """A captured key request published again gets no second grant."""
        forwarder = self.bridge.forwarder()
        self.bridge.proxy()
        [(channel, request)] = self.bridge.published(MsgType.KEY_REQUEST)
        self.bridge.clock.advance(5)
        self.bridge.broker.publish(channel, request)
        self.assertEqual(dropped(forwarder.metrics, "replay"), 1)
        self.assertEqual(len(self.bridge.published(MsgType.KEY_GRANT)), 1)
        self.assertEqual(len(forwarder.keyring), 1)

    def test_unknown_proxy(self) -> None:
        """A proxy name the forwarder has no route for gets no grant."""
        forwarder = self.bridge.forwarder(forwarder_settings(proxies=("alpha",)))
        proxy = self.bridge.proxy(proxy_settings(name="beta"))
        self.assertEqual(dropped(forwarder.metrics, "unknown-proxy"), 1)
        self.assertEqual(self.bridge.published(MsgType.KEY_GRANT), [])
        self.assertEqual(proxy.keyring.peers(), [])
        self.assertEqual(forwarder.candidates("beta"), [])

    def test_request_signed_by_another_proxy(self) -> None:
        """A proxy claiming to be alpha but holding beta's key gets no grant."""
        forwarder = self.bridge.forwarder()
        impostor = self.bridge.proxy(proxy_settings(name="alpha", key="beta"))
        self.assertEqual(dropped(forwarder.metrics, "bad-signature"), 1)
        self.assertEqual(self.bridge.published(MsgType.KEY_GRANT), [])
        self.assertEqual(impostor.keyring.peers(), [])
        self.assertEqual(forwarder.candidates("alpha"), [])

    def test_clock_skew(self) -> None:
        """A proxy whose clock is off by more than max_clock_skew gets no grant; within it, it does."""
        forwarder = self.bridge.forwarder()
        late = Clock()
        late.advance(T0 + SKEW + 1)
        proxy = self.bridge.proxy(clock=late)
        self.assertEqual(dropped(forwarder.metrics, "stale"), 1)
        self.assertEqual(proxy.keyring.peers(), [])
        close = Clock()
        close.advance(T0 + SKEW - 1)
        good = self.bridge.proxy(proxy_settings(name="beta"), clock=close)
        self.assertEqual(good.keyring.peers(), [forwarder.id])

    def test_grant_replayed_to_later_request(self) -> None:
        """During a rekey, an old grant published on the new request's channel is rejected; the real one works."""
        bridge = self.bridge
        forwarder = bridge.forwarder()
        proxy = bridge.proxy(proxy_settings(rekey=RekeySettings(period=60.0)))
        [(_, old_grant)] = bridge.published(MsgType.KEY_GRANT)
        old_fp = fingerprint_on_proxy(proxy, forwarder)
        bridge.broker.drop = lambda channel, message: message[1] == MsgType.KEY_GRANT  # hold back new grants
        bridge.advance(61)
        requests = bridge.published(MsgType.KEY_REQUEST)
        self.assertEqual(len(requests), 2)
        new_channel, new_grant = bridge.published(MsgType.KEY_GRANT)[-1]
        bridge.broker.drop = None
        bridge.broker.publish(new_channel, old_grant)
        self.assertEqual(dropped(proxy.metrics, "unexpected-grant"), 1)
        self.assertEqual(fingerprint_on_proxy(proxy, forwarder), old_fp)
        bridge.broker.publish(new_channel, new_grant)
        new_fp = fingerprint_on_proxy(proxy, forwarder)
        self.assertNotEqual(new_fp, old_fp)
        self.assertEqual(forwarder.candidates("alpha")[0].session.envelope.fingerprint, new_fp)

    def test_periodic_rekey(self) -> None:
        """After the rekey period the proxy negotiates a new key and both sides move to it."""
        bridge = self.bridge
        forwarder = bridge.forwarder()
        proxy = bridge.proxy(proxy_settings(rekey=RekeySettings(period=120.0, grace=30.0)))
        first = fingerprint_on_proxy(proxy, forwarder)
        bridge.advance(100)
        self.assertEqual(fingerprint_on_proxy(proxy, forwarder), first)
        bridge.advance(25)
        second = fingerprint_on_proxy(proxy, forwarder)
        self.assertNotEqual(second, first)
        self.assertEqual(forwarder.candidates("alpha")[0].session.envelope.fingerprint, second)
        self.assertEqual(forwarder.keyring.stats[proxy_peer("alpha", proxy.instance)].rotations, 1)

    def test_backoff_without_forwarder(self) -> None:
        """With no forwarder listening the proxy keeps asking, ever less often, up to a bounded delay."""
        bridge = self.bridge
        proxy = bridge.proxy()
        times = []
        seen = 0
        for _ in range(900):
            requests = len(bridge.published(MsgType.KEY_REQUEST))
            times.extend([bridge.clock.seconds()] * (requests - seen))
            seen = requests
            bridge.clock.advance(1)
        gaps = [b - a for a, b in zip(times, times[1:])]
        self.assertGreaterEqual(len(gaps), 8, gaps)
        self.assertLess(len(gaps), 60, gaps)  # not hammering the bus once a second
        self.assertEqual(gaps[:5], sorted(gaps[:5]), gaps)
        self.assertGreater(gaps[4], 4 * gaps[0], gaps)
        self.assertLessEqual(max(gaps), RETRY_MAX * 1.5, gaps)
        self.assertGreater(times[-1], T0 + 900 - RETRY_MAX * 1.5, "the proxy stopped retrying")
        self.assertEqual(proxy.keyring.peers(), [])
        self.assertIsNotNone(proxy.status()["last_error"])

    def _advance_to_next_request(self) -> None:
        """Advance the clock second by second until the proxy publishes another key request."""
        seen = len(self.bridge.published(MsgType.KEY_REQUEST))
        for _ in range(100):
            self.bridge.clock.advance(1)
            if len(self.bridge.published(MsgType.KEY_REQUEST)) > seen:
                return
        self.fail("the proxy stopped asking for a key")

    def test_forwarder_appearing_during_backoff(self) -> None:
        """After a long wait, a forwarder that starts between two retries is used at once (its
        announcement triggers a negotiation; the proxy does not sit out its backoff delay)."""
        bridge = self.bridge
        proxy = bridge.proxy()
        bridge.advance(300)
        self._advance_to_next_request()  # a request is out that the new forwarder can never see
        bridge.clock.advance(1)
        forwarder = bridge.forwarder()
        bridge.advance(2)
        self.assertEqual(proxy.keyring.peers(), [forwarder.id])
        self.assertEqual(forwarder.candidates("alpha")[0].session.envelope.fingerprint,
                         fingerprint_on_proxy(proxy, forwarder))
        self.assertIsNone(proxy.status()["last_error"])

    def test_announce_from_new_forwarder(self) -> None:
        """A keyed proxy negotiates with a forwarder that announces itself, and keeps the first key."""
        bridge = self.bridge
        first = bridge.forwarder()
        proxy = bridge.proxy()
        first_fp = fingerprint_on_proxy(proxy, first)
        bridge.advance(60)
        second = bridge.forwarder()
        bridge.advance(2)
        self.assertEqual(set(proxy.keyring.peers()), {first.id, second.id})
        self.assertEqual(fingerprint_on_proxy(proxy, first), first_fp)
        second_fp = fingerprint_on_proxy(proxy, second)
        self.assertNotEqual(first_fp, second_fp)
        self.assertEqual(first.candidates("alpha")[0].session.envelope.fingerprint, first_fp)
        self.assertEqual(second.candidates("alpha")[0].session.envelope.fingerprint, second_fp)
        requests = bridge.published(MsgType.KEY_REQUEST)
        self.assertEqual(len(requests), 2)
        targeted, _, _ = decode_signed(requests[1][1], KeyRequest)
        self.assertEqual(targeted.target, second.id)
        self.assertEqual(len(bridge.published(MsgType.KEY_GRANT)), 2)  # the first forwarder did not grant again

    def test_announce_from_new_forwarder_soon_after_keying(self) -> None:
        """A forwarder starting a few seconds after the proxy got its key is keyed at once too,
        although the proxy's earlier request (which that forwarder never saw) is still within its lifetime."""
        bridge = self.bridge
        first = bridge.forwarder()
        proxy = bridge.proxy()
        bridge.advance(10)
        second = bridge.forwarder()
        bridge.advance(2)
        self.assertEqual(set(proxy.keyring.peers()), {first.id, second.id})
        self.assertEqual(len(second.candidates("alpha")), 1)

    def test_announce_from_known_forwarder_ignored(self) -> None:
        """Periodic announcements from a forwarder the proxy already has a key with start no negotiation."""
        bridge = self.bridge
        bridge.forwarder(forwarder_settings(announce_interval=10.0))
        bridge.proxy()
        bridge.advance(100)
        self.assertGreaterEqual(len(bridge.published(MsgType.ANNOUNCE)), 10)
        self.assertEqual(len(bridge.published(MsgType.KEY_REQUEST)), 1)

    def test_other_proxy_cannot_open_traffic(self) -> None:
        """Traffic the forwarder seals for proxy alpha cannot be opened by proxy beta, even on beta's channel."""
        bridge = self.bridge
        forwarder = bridge.forwarder()
        alpha = bridge.proxy(proxy_settings(name="alpha"))
        beta = bridge.proxy(proxy_settings(name="beta"))
        [alpha_entry] = forwarder.candidates("alpha")
        alpha_channel = forwarder.data_channel(alpha_entry)
        bridge.broker.drop = lambda channel, message: channel == alpha_channel  # captured, not delivered
        forwarder.node.send(alpha_entry, alpha_channel, MsgType.RESET, b"s" * 16, 1, b"\x00\x06\x00\x00")
        bridge.broker.drop = None
        [(_, data)] = bridge.published(MsgType.RESET)
        beta_entry = beta.keyring.current(forwarder.id)
        assert beta_entry is not None
        self.assertEqual(reason(self, beta_entry.session.envelope.open, unpack_header(data), data, alpha_channel),
                         "bad-tag")
        before = sum(dropped(beta.metrics, r) for r in ("unknown-key", "bad-tag"))
        bridge.broker.publish(beta.data_channel, data)
        self.assertEqual(sum(dropped(beta.metrics, r) for r in ("unknown-key", "bad-tag")), before + 1)
        self.assertEqual(beta.calls, {})
        entry, header, payload = alpha.node.open(alpha_channel, data)
        self.assertEqual((header.type, payload), (MsgType.RESET, b"\x00\x06\x00\x00"))


class KeyLifeTests(TestCase):
    """Each key's own rotation schedule and hard lifetime, both services over the in-memory bus."""

    def setUp(self) -> None:
        self.bridge = Bridge(self)

    def test_targeted_negotiation_does_not_postpone_other_keys(self) -> None:
        """A proxy rotating every 100 s holds keys with two forwarders from t=0. At t=60 a third
        forwarder starts and announces itself, and the proxy negotiates a key with it alone.
        That negotiation must not restart the others' clocks: the keys with the first two
        forwarders are still unchanged at t=99, rotated (on both sides) by t=101, not at
        t=160, while the third forwarder's key, 40 s old, stays as it is."""
        bridge = self.bridge
        first, second = bridge.forwarder(), bridge.forwarder()
        proxy = bridge.proxy(proxy_settings(rekey=RekeySettings(period=100.0)))
        before = {f.id: fingerprint_on_proxy(proxy, f) for f in (first, second)}
        bridge.advance(60, step=0.25)
        third = bridge.forwarder()
        bridge.advance(1, step=0.25)
        third_key = fingerprint_on_proxy(proxy, third)
        targeted, _, _ = decode_signed(bridge.published(MsgType.KEY_REQUEST)[-1][1], KeyRequest)
        self.assertEqual(targeted.target, third.id)
        bridge.advance(38, step=0.25)  # t = 99
        self.assertEqual({f.id: fingerprint_on_proxy(proxy, f) for f in (first, second)}, before)
        bridge.advance(2, step=0.25)  # t = 101
        for forwarder in (first, second):
            rotated = fingerprint_on_proxy(proxy, forwarder)
            self.assertNotEqual(rotated, before[forwarder.id], "a key was not rotated at its period")
            self.assertEqual(forwarder.candidates("alpha")[0].session.envelope.fingerprint, rotated)
        self.assertEqual(fingerprint_on_proxy(proxy, third), third_key)

    def test_keys_stop_at_their_hard_lifetime_on_both_sides(self) -> None:
        """A proxy whose keys may live 100 s (``max_key_age``) gets its first key at t=0; from
        then on the broker loses every KEY_REQUEST, so no rotation completes. Until t=99 both
        sides keep using that key; past t=100 neither can seal with it (the forwarder has no
        candidate for the proxy and answers ``key-expired``, the proxy holds no peer and
        sends nothing), and a message sealed under it afterwards is refused on opening, on
        each side, as ``key-expired`` or ``unknown-key`` (the key is forgotten)."""
        from ppbridge.errors import KeyExpired
        from ppbridge.wire import encode_window

        bridge = self.bridge
        forwarder = bridge.forwarder()
        proxy = bridge.proxy(proxy_settings(rekey=RekeySettings(period=60.0, max_key_age=100.0)))
        [forwarder_side] = forwarder.candidates("alpha")
        proxy_side = proxy.keyring.current(forwarder.id)
        assert proxy_side is not None
        bridge.broker.drop = lambda channel, message: message[1] == MsgType.KEY_REQUEST
        bridge.advance(99, step=0.25)
        self.assertEqual(forwarder.candidates("alpha"), [forwarder_side])
        self.assertIs(proxy.keyring.current(forwarder.id), proxy_side)
        self.assertGreater(len(bridge.published(MsgType.KEY_REQUEST)), 1, "the proxy never tried to rotate")

        bridge.advance(2, step=0.25)
        self.assertEqual(forwarder.candidates("alpha"), [])
        self.assertIsInstance(forwarder.unavailable("alpha"), KeyExpired)
        self.assertEqual(proxy.keyring.peers(), [])
        self.assertIsNone(proxy.send(forwarder.id, forwarder.channels.reply(forwarder.id), MsgType.WINDOW,
                                     b"s" * 16, 0, encode_window(1)))

        def refused(service: Any) -> float:
            return dropped(service.metrics, "key-expired") + dropped(service.metrics, "unknown-key")

        before = refused(proxy), refused(forwarder)
        late = forwarder_side.session.envelope.seal(MsgType.WINDOW, b"s" * 16, 0, proxy.data_channel,
                                                    encode_window(1))
        bridge.broker.publish(proxy.data_channel, bytes(late))
        reply_channel = forwarder.channels.reply(forwarder.id)
        late = proxy_side.session.envelope.seal(MsgType.WINDOW, b"s" * 16, 0, reply_channel, encode_window(1))
        bridge.broker.publish(reply_channel, bytes(late))
        self.assertEqual((refused(proxy), refused(forwarder)), (before[0] + 1, before[1] + 1))


class ReplyChannelTests(TestCase):
    """The proxy answers a request only on the reply channel of the forwarder that sealed it."""

    def test_head_naming_another_reply_channel_is_dropped(self) -> None:
        """A REQ_HEAD sealed under the forwarder's real key whose reply channel is another
        forwarder's (``ns:f:<other id>:r``), the forwarder's control channel, or a version 2
        per-request channel (``ns:f:<id>:r<32 hex>``) is dropped by the proxy as
        ``bad-reply-channel`` and is never answered; the same head naming ``ns:f:<id>:r`` is
        answered there (a RESP_HEAD for its stream, the only one published)."""
        bridge = Bridge(self)
        forwarder, proxy = bridge.forwarder(), bridge.proxy()
        [entry] = forwarder.candidates("alpha")
        own = CHANNELS.reply(forwarder.id)
        wrong = [CHANNELS.reply(b"\x01" * 8), CHANNELS.forwarder_control(forwarder.id), own + b"0" * 32]
        for i, reply in enumerate([*wrong, own]):
            head = RequestHead(b"GET", b"/", [(b"Host", b"public.example")], reply, None,
                               int((bridge.clock.seconds() + 30) * 1000))
            forwarder.node.send(entry, forwarder.data_channel(entry), MsgType.REQ_HEAD, bytes([i + 1]) * 16, 0,
                                head.encode(), FLAG_END)
            self.assertEqual(dropped(proxy.metrics, "bad-reply-channel"), min(i + 1, len(wrong)), reply)
        answered = [(ch, unpack_header(m).stream_id) for ch, m in bridge.published(MsgType.RESP_HEAD)]
        self.assertEqual(answered, [(own, bytes([len(wrong) + 1]) * 16)])


class ClaimedInstanceTests(TestCase):
    """A compromised proxy host cannot lock another proxy out by claiming its instance id."""

    def test_claimed_instance_is_abandoned_for_a_new_one(self) -> None:
        """Proxy alpha is keyed, then cut off from Redis for 60 s: the forwarder evicts it and,
        three announce intervals later, forgets its keys. Meanwhile the owner of proxy host
        beta, holding beta's valid key, negotiates under alpha's instance id (public: it is in
        alpha's data channel name), so the forwarder files that id as beta's and refuses it to
        alpha (instance-claimed) when alpha comes back. Alpha must not stay locked out: after a
        few requests heard but never granted it takes a new instance id, gets a key under it,
        and the forwarder routes alpha's requests to that new instance (never to beta)."""
        bridge = Bridge(self)
        forwarder = bridge.forwarder(forwarder_settings(proxies=("alpha", "beta")))
        alpha = bridge.proxy()
        claimed = alpha.instance
        alpha.bus.set_connected(False)
        bridge.advance(60, step=0.25)
        self.assertEqual(forwarder.candidates("alpha"), [])
        clock = bridge.clock
        impostor = ProxyService(proxy_settings(name="beta"), bridge.broker.client(), clock, reactor=clock,
                                agent=RequestTraversalAgent(Intranet()), instance=claimed)
        bridge._run(impostor)
        bridge.advance(2, step=0.25)
        self.assertEqual(forwarder.owners.get(claimed), "beta")
        alpha.bus.set_connected(True)
        bridge.advance(60, step=0.25)
        self.assertGreater(dropped(forwarder.metrics, "instance-claimed"), 0)
        self.assertNotEqual(alpha.instance, claimed)
        [entry] = forwarder.candidates("alpha")
        self.assertEqual((entry.session.proxy, entry.session.instance), ("alpha", alpha.instance))


class PublicSubscriptionTests(TestCase):
    """What the forwarder does when its subscription to the public channels comes back."""

    def test_forwarder_announces_again_when_its_negotiate_subscription_is_back(self) -> None:
        """Key requests sent while the forwarder's negotiate subscription was down are lost, so
        when the bus says it is back the forwarder announces itself again (proxies then ask
        again): at once if its last announcement is a second old, else at the end of that
        second, and only once for several such reports within the second."""
        bridge = Bridge(self)
        forwarder = bridge.forwarder()
        announced = len(bridge.published(MsgType.ANNOUNCE))
        bridge.advance(5)
        forwarder.bus.on_public()
        self.assertEqual(len(bridge.published(MsgType.ANNOUNCE)), announced + 1)
        bridge.clock.advance(0.2)
        forwarder.bus.on_public()
        forwarder.bus.on_public()
        self.assertEqual(len(bridge.published(MsgType.ANNOUNCE)), announced + 1)
        bridge.clock.advance(0.8)
        self.assertEqual(len(bridge.published(MsgType.ANNOUNCE)), announced + 2)
