"""Isolation between proxy names, and the hard life of session keys, tried against the real thing.

In the first tests the attacker owns one proxy host, "beta": its private key, its process and
its Redis connection (so it can also publish anything on Redis). It must not be able to take
over, answer or negotiate for another proxy's ("alpha") traffic. The last tests starve or kill
one side and check that keys die on time and traffic fails closed, then recovers.
"""

from __future__ import annotations

import os
import struct
from typing import Any, Mapping

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from twisted.internet import defer, reactor
from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase

from ppbridge import keys
from ppbridge.bus import RedisBus
from ppbridge.config import load_proxy_config
from ppbridge.keyring import KeyEntry
from ppbridge.negotiation import ANY_FORWARDER, LABEL_REQUEST
from ppbridge.proxy import ProxyService
from ppbridge.sampleapp import make_site
from ppbridge.scaffold import TomlValue, write_proxy_config
from ppbridge.wire import (
    FLAG_END,
    KeyRequest,
    MsgType,
    ResponseHead,
    decode_signed,
    encode_reset,
    encode_signed,
    encode_window,
    unpack_header,
)
from tests.hostile import DROP, PASS, HostileRedis
from tests.redisclient import RawRedisClient
from tests.support import Client, Stack, error_of, key_pair, listen, poll
from tests.test_security import DropWatcher, drain, of_type, spy, when_published, when_sent

ROUTES: Mapping[str, Mapping[str, TomlValue]] = {"alpha": {"path_prefix": "/a"}, "beta": {"path_prefix": "/b"}}
NEGOTIATE = b"ppbridge:negotiate"
FORGED = b"FORGED BY BETA"
WAIT = 10.0  # seconds for anything that happens within a second or so (10x margin)


@defer.inlineCallbacks
def upstream(case: TestCase):  # type: ignore[no-untyped-def]
    """A sample app of its own on loopback: (base URL, app), so hits can be told apart."""
    site, app = make_site()
    url = yield listen(case, site)
    return url, app


def proxy_process(stack: Stack, name: str, redis_url: str, upstream_url: str, instance: bytes | None = None,
                  rekey: Mapping[str, TomlValue] | None = None) -> ProxyService:
    """A real proxy process for ``name`` (that name's config and private key) on ``redis_url``,
    with the instance id the caller chooses; stopped at cleanup."""
    key_pair(stack.folder, name)
    settings = load_proxy_config(write_proxy_config(stack.folder, name, redis_url, upstream_url, rekey=rekey))
    service = ProxyService(settings, RedisBus(settings.redis, reactor), reactor, reactor, instance=instance)
    stack.run(service)
    return service


def seals_under_dead_keys(service: Any) -> list[bool]:
    """For each message ``service`` seals from now on, whether its key was past its hard
    lifetime or message budget at that moment (a spy on the node's send)."""
    late: list[bool] = []
    original = service.node.send

    def send(entry: KeyEntry, *args: Any, **kwargs: Any) -> Any:
        late.append(entry.expired(service.clock.seconds()))
        return original(entry, *args, **kwargs)

    service.node.send = send
    return late


def signed_request(private_key: Any, name: str, instance: bytes, reply_channel: bytes) -> bytes:
    """A KEY_REQUEST as a proxy makes it, with every field chosen by the caller, signed with
    ``private_key``."""
    ephemeral = X25519PrivateKey.generate().public_key().public_bytes_raw()
    body = KeyRequest(name, instance, reply_channel, os.urandom(16), int(reactor.seconds() * 1000), ephemeral,
                      262144, 1 << 20, ANY_FORWARDER).encode_body()
    return encode_signed(body, keys.sign(private_key, LABEL_REQUEST + NEGOTIATE + body))


class CompromisedProxyHost(TestCase):
    """The owner of proxy host beta against proxy alpha."""

    @defer.inlineCallbacks
    def test_takeover_by_instance_id(self):
        """Beta's owner reads alpha's instance id off alpha's data channel name
        (``ppbridge:p:alpha:<instance hex>``) and starts a real proxy process named beta, with
        beta's genuine config and private key, claiming alpha's instance id; it negotiates and
        confirms keys exactly as the real code does. The forwarder refuses the claim (a drop
        counted as ``instance-claimed``); alpha's requests through /a keep reaching alpha's
        upstream only, beta's upstream gets none of them, nothing at all is published on the
        impostor's channel ``ppbridge:p:beta:<alpha's instance hex>``, the impostor holds no
        key, and the forwarder's only candidate for alpha is still alpha's own process. (On
        the code before instance ids were bound to names, the impostor's key replaced alpha's
        and alpha's requests were sent to the impostor.)"""
        alpha_url, alpha_app = yield upstream(self)
        beta_url, beta_app = yield upstream(self)
        stack = Stack(self)
        yield stack.start(routes=ROUTES, upstreams={"alpha": alpha_url, "beta": beta_url})
        forwarder, alpha = stack.forwarder, stack.proxies["alpha"]
        hijacked = forwarder.channels.proxy_data("beta", alpha.instance)
        eavesdropper = spy(stack, self, hijacked)
        drops = DropWatcher(forwarder)

        impostor = proxy_process(stack, "beta", stack.redis.url, beta_url, instance=alpha.instance)
        yield poll(lambda: drops.reasons["instance-claimed"] > 0
                   or any(e.session.proxy != "alpha" for e in forwarder.candidates("alpha")),
                   WAIT, "the forwarder refused or accepted the impostor's claim")
        client = Client(self)
        for i in range(3):
            response, _ = yield client.fetch(b"GET", stack.url + f"/a/echo?n={i}")
            self.assertEqual(response.code, 200)
        self.assertEqual((alpha_app.hits["/echo"], beta_app.hits["/echo"]), (3, 0),
                         "(alpha's upstream, beta's upstream) hits for alpha's requests")
        self.assertEqual(drain(eavesdropper), [], "the forwarder published on the impostor's channel")
        self.assertEqual([(e.session.proxy, e.session.instance) for e in forwarder.candidates("alpha")],
                         [("alpha", alpha.instance)])
        self.assertEqual(impostor.keyring.peers(), [])
        self.assertGreaterEqual(drops.reasons["instance-claimed"], 1)

    @defer.inlineCallbacks
    def test_compromised_proxy_cannot_answer_another_names_request(self):
        """While a client waits on alpha's upstream (``/a/hang`` never answers), beta's owner
        answers in alpha's place. It reads alpha's stream id and key id off the cleartext
        header of the request head on alpha's data channel, and it knows the forwarder's reply
        channel (``ppbridge:f:<forwarder id>:r``, one for all its streams; its ACL user may
        publish there). It holds two keys it can seal with: the current key of beta's process
        and that of a second beta process it starts (another instance id); with each it seals
        and publishes, for alpha's stream:

        * on the reply channel: RESP_HEAD "200 OK" with a body, RESP_DATA with END, RESET
          (upstream unreachable), WINDOW and CONFIRM: each dropped as ``wrong-stream`` (the key
          is beta's, the stream was sent to alpha);
        * a RESP_HEAD sealed with beta's key but relabelled with alpha's key id (and a counter
          far ahead), so the forwarder tries alpha's key: ``bad-tag``;
        * a RESP_HEAD on the forwarder's control channel: ``unexpected-type``;
        * a CONFIRM on the control channel carrying alpha's stream id: a valid heartbeat of
          beta's own process, which the forwarder acknowledges to beta and which changes
          nothing for alpha (not a drop: it is exactly what beta may send).

        A key for alpha's instance id, or one negotiated under alpha's name, beta cannot get
        (see test_takeover_by_instance_id and
        test_compromised_proxy_cannot_negotiate_as_another_name). Must hold: every forged
        answer is dropped, alpha's route is unchanged, and the client gets the forwarder's 504
        ``timeout`` (alpha's real answer never comes), never the forged one."""
        stack = Stack(self)
        requests = spy(stack, self, b"ppbridge:p:alpha:*")
        yield stack.start(routes=ROUTES, forwarder={"request_timeout": 5.0})
        forwarder = stack.forwarder
        alpha, beta = stack.proxies["alpha"], stack.proxies["beta"]
        second_beta = stack.add_proxy("beta", stack.upstream)
        yield poll(lambda: len(forwarder.candidates("beta")) == 2 and second_beta.keyring.peers(), WAIT,
                   "the second beta process is keyed")
        beta_keys = [p.keyring.current(forwarder.id) for p in (beta, second_beta)]
        drops = DropWatcher(forwarder)
        attacker = RawRedisClient("127.0.0.1", stack.redis.port)
        self.addCleanup(attacker.close)

        sent = when_sent(forwarder, MsgType.REQ_HEAD)
        pending = Client(self).fetch(b"GET", stack.url + "/a/hang")
        yield sent
        (_, head), = of_type(drain(requests), MsgType.REQ_HEAD)
        victim = unpack_header(head)
        reply = forwarder.streams[victim.stream_id].reply_channel
        self.assertEqual(reply, forwarder.channels.reply(forwarder.id))
        control = forwarder.channels.forwarder_control(forwarder.id)
        answer = ResponseHead(200, b"OK", [(b"Content-Type", b"text/plain")], len(FORGED)).encode(FORGED)

        def forge(entry: KeyEntry | None, channel: bytes, mtype: MsgType, seq: int, payload: bytes,
                  flags: int = FLAG_END) -> bytes:
            assert entry is not None
            return bytes(entry.session.envelope.seal(mtype, victim.stream_id, seq, channel, payload, flags))

        for entry in beta_keys:
            for mtype, seq, payload, flags in [
                (MsgType.RESP_HEAD, 0, answer, FLAG_END), (MsgType.RESP_DATA, 1, FORGED, FLAG_END),
                (MsgType.RESET, 0, encode_reset(1, "forged"), 0), (MsgType.WINDOW, 0, encode_window(1 << 20), 0),
                (MsgType.CONFIRM, 0, b"", 0),
            ]:
                attacker.publish(reply, forge(entry, reply, mtype, seq, payload, flags))
        yield drops.wait("wrong-stream", 2 * 5)

        sealed = forge(beta_keys[0], reply, MsgType.RESP_HEAD, 0, answer)
        relabelled = sealed[:4] + victim.key_id + struct.pack(">Q", 1 << 40) + sealed[20:]
        attacker.publish(reply, relabelled)
        yield drops.wait("bad-tag")
        attacker.publish(control, forge(beta_keys[0], control, MsgType.RESP_HEAD, 0, answer))
        yield drops.wait("unexpected-type")

        acknowledged = when_sent(forwarder, MsgType.CONFIRM)
        attacker.publish(control, forge(beta_keys[1], control, MsgType.CONFIRM, 0, b"", 0))
        yield acknowledged
        self.assertEqual(dict(drops.reasons), {"wrong-stream": 10, "bad-tag": 1, "unexpected-type": 1})
        self.assertEqual([(e.session.proxy, e.session.instance) for e in forwarder.candidates("alpha")],
                         [("alpha", alpha.instance)])
        self.assertIn(victim.stream_id, forwarder.streams)

        response, body = yield pending
        self.assertEqual((response.code, error_of(response)), (504, b"timeout"))
        self.assertNotIn(FORGED, body)
        self.assertEqual(stack.app.hits["/hang"], 1)

    @defer.inlineCallbacks
    def test_compromised_proxy_cannot_negotiate_as_another_name(self):
        """Beta's owner, with beta's private key, watches ``ppbridge:negotiate`` while a second
        alpha process starts, and publishes its own signed KEY_REQUESTs while alpha's request
        is pending, one for each of what it could vary:

        * name "alpha" (any instance): the forwarder drops it as ``bad-signature`` (beta's key
          signs only for beta);
        * name "beta" with alpha's instance id (read in alpha's cleartext request): dropped as
          ``instance-claimed``;
        * name "beta", beta's own instance, and as temporary channel the one alpha is waiting
          on (also in alpha's cleartext request): the forwarder drops it as
          ``bad-reply-channel`` (a grant channel carries the name of the proxy that asks:
          ``ppbridge:n:alpha:...`` is not beta's), so no grant reaches alpha's channel.

        Must hold: those three drops, alpha never drops an ``unexpected-grant``, and alpha's
        processes keep their own keys, which the forwarder routes to."""
        stack = Stack(self)
        negotiation = spy(stack, self, NEGOTIATE)
        yield stack.start(routes=ROUTES)
        forwarder, beta = stack.forwarder, stack.proxies["beta"]
        forwarder_drops = DropWatcher(forwarder)
        drain(negotiation)

        alpha = stack.add_proxy("alpha", stack.upstream)  # a second alpha process starting
        yield when_published(alpha, NEGOTIATE)
        alpha_drops = DropWatcher(alpha)
        captured = [decode_signed(m, KeyRequest)[0] for _, m in drain(negotiation)]
        request = next(r for r in captured if r.instance == alpha.instance)
        self.assertTrue(alpha.negotiator.is_pending(request.reply_channel))
        yield poll(lambda: alpha.keyring.peers() == [forwarder.id], WAIT, "the second alpha process is keyed")
        alpha_fingerprint = alpha.keyring.current(forwarder.id).session.envelope.fingerprint

        attacker = RawRedisClient("127.0.0.1", stack.redis.port)
        self.addCleanup(attacker.close)
        private = beta.settings.private_key
        attacker.publish(NEGOTIATE, signed_request(private, "alpha", os.urandom(8),
                                                   forwarder.channels.negotiation_temp("alpha")))
        yield forwarder_drops.wait("bad-signature")
        attacker.publish(NEGOTIATE, signed_request(private, "beta", alpha.instance,
                                                   forwarder.channels.negotiation_temp("beta")))
        yield forwarder_drops.wait("instance-claimed")
        self.assertTrue(alpha.negotiator.is_pending(request.reply_channel))
        attacker.publish(NEGOTIATE, signed_request(private, "beta", beta.instance, request.reply_channel))
        yield forwarder_drops.wait("bad-reply-channel")
        self.assertNotIn("unexpected-grant", alpha_drops.reasons)

        self.assertEqual(alpha.keyring.peers(), [forwarder.id])
        self.assertEqual(alpha.keyring.current(forwarder.id).session.envelope.fingerprint, alpha_fingerprint)
        routed = {(e.session.proxy, e.session.instance, e.session.envelope.fingerprint)
                  for e in forwarder.candidates("alpha")}
        self.assertIn(("alpha", alpha.instance, alpha_fingerprint), routed)
        self.assertEqual({name for name, _, _ in routed}, {"alpha"})
        self.assertEqual(len(forwarder.candidates("beta")), 1)


class HardKeyLifetime(TestCase):
    """Keys die on time when their peer dies or their rotation is held back."""

    @defer.inlineCallbacks
    def test_dead_forwarder_is_forgotten(self):
        """A forwarder announcing itself every second dies abruptly after the proxy got its
        key: its service is stopped, which publishes nothing on the way out (no goodbye; a
        killed process sends none either). The proxy forgets it, key included, once it has
        not been heard from for three announce intervals: within 10 s its keyring holds no
        peer and its /status lists no forwarder (before, such a key was kept forever)."""
        stack = Stack(self)
        yield stack.start(forwarder={"announce_interval": 1.0})
        forwarder, proxy = stack.forwarder, stack.proxies["alpha"]
        self.assertEqual(proxy.keyring.peers(), [forwarder.id])
        self.assertEqual(list(proxy.status()["forwarders"]), [forwarder.id.hex()])
        yield forwarder.stopService()
        yield poll(lambda: proxy.keyring.peers() == [] and proxy.status()["forwarders"] == {}, WAIT,
                   "the proxy forgot the dead forwarder")

    @defer.inlineCallbacks
    def test_rotation_blocked_fails_closed_then_recovers(self):
        """A proxy rotates its key every second, keys live at most 2 s (``[rekey] period = 1``,
        ``max_key_age = 2``), and its Redis connection runs through a hostile Redis. Once the
        first key is confirmed, the attacker drops every KEY_REQUEST the proxy publishes on
        ``ppbridge:negotiate``, so no rotation can complete. Within 10 s of the drops starting
        requests fail with 503 and ``X-PPBridge-Error: key-expired``, and once one has, none
        succeeds while the drops go on; the proxy holds no usable key either. Neither side
        ever seals a message under a key past its hard lifetime. The attacker stops dropping:
        requests succeed again within 40 s (the proxy keeps retrying, with backoff)."""
        stack = Stack(self)
        yield stack.start(without=("alpha",))
        hostile = yield HostileRedis(stack.redis.host, stack.redis.port).start()
        self.addCleanup(hostile.stop)
        proxy = proxy_process(stack, "alpha", hostile.url, stack.upstream,
                              rekey={"period": 1.0, "max_key_age": 2.0})
        yield stack.ready("alpha")
        forwarder_late, proxy_late = seals_under_dead_keys(stack.forwarder), seals_under_dead_keys(proxy)
        client = Client(self)
        response, _ = yield client.fetch(b"GET", stack.url + "/echo")
        self.assertEqual(response.code, 200)

        hostile.on_publish = lambda channel, message: DROP if channel == NEGOTIATE else PASS
        outcomes = yield self.fetch_until(client, stack.url + "/echo", b"key-expired", WAIT)
        first_failure = next(i for i, o in enumerate(outcomes) if o[0] != 200)
        self.assertEqual([o for o in outcomes[first_failure:] if o[0] == 200], [], outcomes)
        self.assertLessEqual({o for o in outcomes if o[0] != 200}, {(503, b"proxy-unavailable"),
                                                                     (503, b"key-expired")}, outcomes)
        self.assertEqual(proxy.keyring.peers(), [])
        response, _ = yield client.fetch(b"GET", stack.url + "/echo")
        self.assertEqual((response.code, error_of(response)), (503, b"key-expired"))

        hostile.on_publish = None
        yield self.fetch_until(client, stack.url + "/echo", None, 40.0)
        self.assertTrue(forwarder_late and proxy_late)
        self.assertNotIn(True, forwarder_late, "the forwarder sealed under a dead key")
        self.assertNotIn(True, proxy_late, "the proxy sealed under a dead key")

    @defer.inlineCallbacks
    def fetch_until(self, client: Client, url: str, error: bytes | None,
                    timeout: float):  # type: ignore[no-untyped-def]
        """GET ``url`` one request after another (0.1 s apart) until one answers with
        ``X-PPBridge-Error: error`` (None: a 200); every (status, error) seen. Fails after
        ``timeout`` seconds."""
        deadline = reactor.seconds() + timeout
        outcomes: list[tuple[int, bytes | None]] = []
        while True:
            response, _ = yield client.fetch(b"GET", url)
            outcomes.append((response.code, error_of(response)))
            if (error is None and response.code == 200) or (error is not None and error_of(response) == error):
                return outcomes
            if reactor.seconds() >= deadline:
                self.fail(f"not within {timeout} s: {error!r}; got {outcomes[-5:]}")
            yield deferLater(reactor, 0.1, lambda: None)
