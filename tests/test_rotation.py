"""Key rotation through a real Redis and real HTTP: fixed-period rekeying under load, with two
forwarders, forward secrecy of recorded traffic, and what /status and /healthz tell about keys.

Rotations are read from the services themselves (``status()``, the same document the admin
endpoint serves); every wait is an awaited Deferred or a short reactor-delay poll with a
hard deadline.
"""

from __future__ import annotations

import base64
import hashlib
import json
import random
from typing import Any, Callable

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from twisted.internet import defer, reactor
from twisted.logger import Logger
from twisted.trial.unittest import TestCase

from ppbridge import keys, negotiation
from ppbridge.admin import admin_site
from ppbridge.envelope import Envelope
from ppbridge.errors import BusMessageError
from ppbridge.negotiation import proxy_peer
from ppbridge.pattern import pattern_sha256
from ppbridge.wire import HEADER_SIZE, KeyGrant, KeyRequest, MsgType, Role, decode_signed, unpack_header
from tests.support import Client, Stack, error_of, listen, poll
from tests.test_security import drain, of_type, spy

FAST_REKEY = {"mode": "fixed", "period": 1.0, "grace": 10.0}
ROUTES = {"alpha": {"path_prefix": "/"}}
STREAMED = 100_000  # over the 64 KiB a body may travel inline: streamed in frames
REQUEST_LIMIT = 30.0  # no single request of these tests may take longer
SOAK_ROTATIONS = 40  # the soak runs until the forwarder has counted this many rotations
SOAK_GIVE_UP = 600.0 - 60.0  # ... or gives up (40 rotations at period=1 take about 40 s)
log = Logger()  # figures go to the test log (_trial_temp/test.log under trial)


def rotations(forwarder: Any, proxy: str = "alpha") -> int:
    """Rotations of ``proxy``'s key as a forwarder's /status reports them."""
    return forwarder.status()["proxies"][proxy].get("rotations") or 0


def diagnosis(stack: Stack) -> str:
    """What a failed rotation test needs to be explained: each forwarder's view of proxy alpha
    (live instances, last error) and every service's non-zero drop and abort counters."""
    lines = [f"forwarder {f.id.hex()[:8]}: alpha {f.status()['proxies']['alpha']}" for f in stack.forwarders]
    services: list[Any] = [*stack.forwarders, *stack.proxies.values()]
    for service in services:
        counts = {f"{m.name}{{{','.join(s.labels.values())}}}": s.value
                  for m in service.metrics.registry.collect() if m.name in ("ppbridge_bus_dropped",
                                                                            "ppbridge_streams_aborted")
                  for s in m.samples if s.name.endswith("_total") and s.value}
        lines.append(f"{type(service).__name__}: {counts or 'nothing dropped or aborted'}")
    return "\n".join(lines)


class Traffic:
    """Client loops of mixed requests, each checked for a 200 and its exact body.

    Kinds: GET /echo, POST /echo with a small body, a streamed download (/bytes, 100 kB) and a
    streamed upload (/upload, 100 kB). Failures are recorded (never raised), so one bad answer
    does not stop the load and the test can list them all. With ``mark``, the value it returns
    when each request has completed is recorded in ``marks``.
    """

    def __init__(self, case: TestCase, urls: list[str], seed: int = 1,
                 mark: Callable[[], Any] | None = None) -> None:
        self.client = Client(case)
        self.urls = urls
        self.rng = random.Random(seed)
        self.done = 0
        self.per_url = {url: 0 for url in urls}
        self.failures: list[str] = []
        self.mark = mark
        self.marks: list[Any] = []

    @defer.inlineCallbacks
    def one(self, url: str, loop: int, i: int):  # type: ignore[no-untyped-def]
        kind = (loop + i) % 4
        tag = f"l={loop}&i={i}"
        if kind == 0:
            response, data = yield self.client.fetch(b"GET", f"{url}/echo?{tag}")
            ok = response.code == 200 and json.loads(data)["uri"] == f"/echo?{tag}"
        elif kind in (1, 3):
            size = self.rng.randint(0, 4000) if kind == 1 else STREAMED
            body = self.rng.randbytes(size)
            path = "/echo" if kind == 1 else "/upload"
            response, data = yield self.client.fetch(b"POST", f"{url}{path}?{tag}", body=body)
            ok = response.code == 200 and json.loads(data)["body_sha256"] == hashlib.sha256(body).hexdigest()
        else:
            seed = loop * 100_000 + i
            response, digest, n = yield self.client.digest(f"{url}/bytes?n={STREAMED}&seed={seed}")
            ok = response.code == 200 and (n, digest) == (STREAMED, pattern_sha256(seed, STREAMED))
        if not ok:
            self.failures.append(f"{url} kind {kind} {tag}: {response.code} {error_of(response)!r}")

    @defer.inlineCallbacks
    def loop(self, loop: int, url: str, until: Callable[[], bool], max_requests: int):  # type: ignore[no-untyped-def]
        for i in range(max_requests):
            if until():
                return
            try:
                yield self.one(url, loop, i).addTimeout(REQUEST_LIMIT, reactor)
            except Exception as err:  # a timeout, a reset connection, a bad JSON body
                self.failures.append(f"{url} loop {loop} request {i}: {err!r}")
            self.done += 1
            self.per_url[url] += 1
            if self.mark is not None:
                self.marks.append(self.mark())

    def run(self, loops: int, until: Callable[[], bool], max_requests: int) -> defer.Deferred[Any]:
        """``loops`` concurrent loops, spread over the URLs, until ``until()`` or the cap."""
        return defer.gatherResults(
            [self.loop(n, self.urls[n % len(self.urls)], until, max_requests) for n in range(loops)],
            consumeErrors=True,
        )


class Soak(TestCase):
    timeout = 600

    @defer.inlineCallbacks
    def test_traffic_across_forty_rotations_with_a_one_second_key_period(self):
        """With ``[rekey] mode="fixed", period=1``, 8 concurrent client loops of small and
        streamed (>64 KiB) GETs and POSTs run until the forwarder's /status has counted 40
        rotations of the proxy's key. Every request gets 200 with the right body, and between
        each two consecutive of those 40 rotations some request completed (the forwarder's
        count when each request completed takes every value from 1 to 39): the load ran
        across every rotation, not only before or after them. The run gives up after SOAK_GIVE_UP (40 rotations take about 40 s;
        that is more than ten times as long); how many rotations a second the bridge manages
        under load is a benchmark figure, not asserted (it is logged)."""
        stack = yield Stack(self).start(rekey=FAST_REKEY)
        forwarder = stack.forwarder
        before = rotations(forwarder)
        traffic = Traffic(self, [stack.url], mark=lambda: rotations(forwarder) - before)
        start = reactor.seconds()
        yield traffic.run(8, lambda: rotations(forwarder) - before >= SOAK_ROTATIONS
                          or reactor.seconds() - start >= SOAK_GIVE_UP, max_requests=1_000_000)
        elapsed = reactor.seconds() - start
        seen = rotations(forwarder) - before
        log.info("{n} rotations and {r} requests in {s:.1f} s under load", n=seen, r=traffic.done, s=elapsed)
        self.assertEqual(traffic.failures[:20], [], f"{len(traffic.failures)} of {traffic.done} requests failed;\n"
                         f"{diagnosis(stack)}")
        self.assertGreaterEqual(seen, SOAK_ROTATIONS, f"only {seen} rotations before the give-up ({elapsed:.1f} s,"
                                f" {traffic.done} requests); proxy status: {stack.proxies['alpha'].status()}")
        unserved = sorted(set(range(1, SOAK_ROTATIONS)) - set(traffic.marks))
        self.assertEqual(unserved, [], "rotation counts during which no request completed")


class TwoForwarders(TestCase):
    timeout = 120

    @defer.inlineCallbacks
    def test_both_forwarders_serve_across_rotations(self):
        """Two forwarders with the same routes and one proxy rekeying every second: requests
        through both forwarders all succeed while each forwarder sees at least 3 rotations."""
        stack = Stack(self)
        yield stack.start(rekey=FAST_REKEY)
        yield stack.add_forwarder(ROUTES)
        yield stack.ready("alpha")
        first, second = stack.forwarders
        base = {id(f): rotations(f) for f in stack.forwarders}

        def enough() -> bool:
            return all(rotations(f) - base[id(f)] >= 3 for f in stack.forwarders)

        start = reactor.seconds()
        traffic = Traffic(self, stack.forwarder_urls, seed=2)
        yield traffic.run(4, lambda: enough() or reactor.seconds() - start > 60.0, max_requests=10_000)
        self.assertEqual(traffic.failures[:20], [], f"{len(traffic.failures)} of {traffic.done} requests failed;\n"
                         f"{diagnosis(stack)}")
        for forwarder, url in zip(stack.forwarders, stack.forwarder_urls):
            self.assertGreaterEqual(rotations(forwarder) - base[id(forwarder)], 3,
                                    f"{url}: {forwarder.status()['proxies']['alpha']}")
            self.assertGreater(traffic.per_url[url], 10, f"hardly any request went through {url}")


def aes_ctr_attempt(key: bytes, data: bytes, sender: Role) -> bytes:
    """Decrypt a sealed message's ciphertext without checking its tag (AES-GCM is AES-CTR from
    counter block IV||2): what an attacker gets out of a guessed key, authentic or not."""
    header = unpack_header(data)
    iv = bytes((sender, 0, 0, 0)) + header.counter.to_bytes(8, "big")
    decryptor = Cipher(algorithms.AES(key), modes.CTR(iv + b"\x00\x00\x00\x02")).decryptor()
    return decryptor.update(data[HEADER_SIZE:-16]) + decryptor.finalize()


class ForwardSecrecy(TestCase):
    @defer.inlineCallbacks
    def test_both_rsa_keys_do_not_open_recorded_traffic(self):
        """A recorder of every channel who later steals BOTH RSA private keys recovers the
        negotiated ``secret`` from the recorded grant (the proxy's key unwraps it; the
        forwarder's key only signs) and still cannot open the recorded request, because the
        X25519 shared secret is missing.

        Asserted: the unwrapped secret is the one both sides derived their keys from; the
        real ``derive_keys`` with that secret, the real salt (request nonce || key id, both in
        clear) and as ``shared`` each value a recorder can form without an ephemeral private
        key (nothing, 32 zero bytes, either public ephemeral key, both in either order, the
        secret itself) gives keys under which the recorded request fails with bad-tag and
        whose keystream shows no trace of the known body, and none of those values is the
        true shared secret; with the true shared secret (taken from inside the processes,
        never on the bus) the same call opens the same recording and yields the body, so
        ``shared`` is the only piece the recorder lacks."""
        derived: list[tuple[bytes, bytes, bytes, dict[Role, bytes]]] = []
        original = negotiation.derive_keys

        def recording(secret: bytes, shared: bytes, salt: bytes) -> dict[Role, bytes]:
            result = original(secret, shared, salt)
            derived.append((secret, shared, salt, dict(result)))
            return result

        self.patch(negotiation, "derive_keys", recording)
        stack = Stack(self)
        recorder = spy(stack, self, b"*")
        yield stack.start()
        body = b"KNOWN-BODY-" + bytes(range(48, 58)) * 8
        response, data = yield Client(self).fetch(b"POST", stack.url + "/echo?fs", body=body)
        self.assertEqual(response.code, 200, data)
        self.assertEqual(json.loads(data)["body_sha256"], hashlib.sha256(body).hexdigest())
        recorded = drain(recorder)

        # What the recording holds: the request carrying the body, and the negotiation of its key.
        heads = of_type(recorded, MsgType.REQ_HEAD)
        self.assertEqual(len(heads), 1, "expected exactly the one request on the bus")
        channel, sealed = heads[0]
        self.assertNotIn(body, sealed)
        header = unpack_header(sealed)
        key_id = header.key_id
        requests = [decode_signed(m, KeyRequest)[0] for ch, m in recorded if ch == b"ppbridge:negotiate"]
        grants = [decode_signed(m, KeyGrant)[0] for ch, m in recorded if ch.startswith(b"ppbridge:n:")]
        grant = next((g for g in grants if g.key_id == key_id), None)
        self.assertIsNotNone(grant, "the grant of the request's key was not recorded")
        request = next(r for r in requests if r.nonce == grant.request_nonce)
        salt = request.nonce + grant.key_id  # public: both travel in clear

        # The stolen long-term keys: the proxy's RSA key unwraps the recorded secret.
        folder = stack.folder / "keys"
        proxy_key = keys.load_private_key(folder / "alpha.key")
        keys.load_private_key(folder / "forwarder.key")  # stolen too; it signs, it decrypts nothing recorded
        secret = keys.unwrap(proxy_key, grant.wrapped)
        self.assertIsNotNone(secret, "the proxy's RSA key should unwrap the recorded secret")
        real = [d for d in derived if d[2] == salt]
        self.assertEqual(len(real), 2, "both sides derive the session keys once")
        self.assertEqual({d[0] for d in real}, {secret}, "the unwrapped secret is not the one the keys came from")
        self.assertEqual(len({d[1] for d in real}), 1, "both sides computed the same X25519 shared secret")
        true_shared = real[0][1]

        # Every "shared" a recorder can form from what it holds, without an ephemeral private key.
        guesses: dict[str, bytes] = {
            "nothing (the secret alone)": b"",
            "32 zero bytes": bytes(32),
            "the proxy's public ephemeral key": request.ephemeral,
            "the forwarder's public ephemeral key": grant.ephemeral,
            "both public ephemeral keys": request.ephemeral + grant.ephemeral,
            "both public ephemeral keys, reversed": grant.ephemeral + request.ephemeral,
            "the secret again": secret,
        }
        for name, shared in guesses.items():
            self.assertNotEqual(shared, true_shared, name)
            attempt = original(secret, shared, salt)
            with self.assertRaises(BusMessageError, msg=name) as caught:
                Envelope(key_id, attempt, Role.PROXY).open(header, sealed, channel)
            self.assertEqual(caught.exception.reason, "bad-tag", name)
            self.assertNotIn(b"KNOWN-BODY", aes_ctr_attempt(attempt[Role.FORWARDER], sealed, Role.FORWARDER), name)

        # Control: the same call with the true shared secret opens the same recording.
        true_keys = original(secret, true_shared, salt)
        self.assertEqual(true_keys, real[0][3])
        plaintext = Envelope(key_id, true_keys, Role.PROXY).open(header, sealed, channel)
        self.assertIn(body, plaintext)
        self.assertIn(body, aes_ctr_attempt(true_keys[Role.FORWARDER], sealed, Role.FORWARDER))


def key_material(derived: list[bytes]) -> list[bytes]:
    """Each secret as raw bytes, hex and base64: any way a key could leak into JSON."""
    out = []
    for value in derived:
        if len(value) >= 16:
            out += [value, value.hex().encode(), base64.b64encode(value), base64.urlsafe_b64encode(value)]
    return out


def field_names(doc: Any) -> set[str]:
    """Every field name in a JSON document, at any depth."""
    if isinstance(doc, dict):
        return set(doc).union(*(field_names(v) for v in doc.values()))
    if isinstance(doc, list):
        return set().union(*(field_names(v) for v in doc))
    return set()


class AdminEndpoints(TestCase):
    timeout = 120

    def setUp(self) -> None:
        self.derived: list[bytes] = []
        original = negotiation.derive_keys

        def recording(secret: bytes, shared: bytes, salt: bytes) -> dict[Role, bytes]:
            result = original(secret, shared, salt)
            self.derived.extend([secret, shared, *result.values()])
            return result

        self.patch(negotiation, "derive_keys", recording)
        self.client = Client(self)

    @defer.inlineCallbacks
    def get(self, url: str):  # type: ignore[no-untyped-def]
        response, data = yield self.client.fetch(b"GET", url).addTimeout(10, reactor)
        return response.code, data

    @defer.inlineCallbacks
    def status(self, url: str):  # type: ignore[no-untyped-def]
        code, data = yield self.get(url + "/status")
        self.assertEqual(code, 200, data)
        for secret in key_material(self.derived):
            self.assertNotIn(secret, data, "key bytes in /status")
        return json.loads(data)

    @defer.inlineCallbacks
    def health(self, url: str):  # type: ignore[no-untyped-def]
        code, _ = yield self.get(url + "/healthz")
        return code

    def assert_key_fields(self, doc: dict, rotated: bool, where: str) -> None:
        for field in ("key_fingerprint", "key_age_s", "messages", "rotations", "period_s", "last_error"):
            self.assertIn(field, doc, where)
        self.assertRegex(doc["key_fingerprint"], r"^[0-9a-f]{16}$", where)
        self.assertIsInstance(doc["key_age_s"], (int, float), where)
        self.assertGreaterEqual(doc["key_age_s"], 0, where)
        self.assertIsInstance(doc["messages"], int, where)
        self.assertGreaterEqual(doc["messages"], 1, where)  # the CONFIRM, at least
        self.assertIsInstance(doc["rotations"], int, where)
        if rotated:
            self.assertGreaterEqual(doc["rotations"], 1, where)
            self.assertIsInstance(doc["period_s"], (int, float), where)
            self.assertGreater(doc["period_s"], 0, where)
        self.assertIsNone(doc["last_error"], where)
        leaked = {n for n in field_names(doc) if "key" in n.lower()} - {"key_fingerprint", "key_age_s", "rekey_mode"}
        self.assertEqual(leaked, set(), f"{where}: fields named like keys besides the fingerprint")

    @defer.inlineCallbacks
    def test_status_lists_each_key_by_fingerprint_only(self):
        """Over real HTTP, the forwarder's /status lists for proxy alpha its key fingerprint, key
        age, message count, rotations, period and last error, and the proxy's /status the same for
        its own key: the same fingerprint on both sides, the configured period on the proxy, and
        no key bytes (raw, hex or base64) anywhere."""
        stack = yield Stack(self).start(rekey=FAST_REKEY)
        forwarder, proxy = stack.forwarder, stack.proxies["alpha"]
        f_url = yield listen(self, admin_site(forwarder))
        p_url = yield listen(self, admin_site(proxy))
        response, _ = yield self.client.fetch(b"GET", stack.url + "/echo")
        self.assertEqual(response.code, 200)
        base = rotations(forwarder)  # start-up may already have made a spare key
        yield poll(lambda: rotations(forwarder) > base, 20, "a rotation by the rekey period")
        yield poll(lambda: (forwarder.status()["proxies"]["alpha"]["key_fingerprint"]
                            == proxy.status()["key_fingerprint"]), 5, "both sides on the same key")
        f_doc = yield self.status(f_url)
        p_doc = yield self.status(p_url)
        alpha = f_doc["proxies"]["alpha"]
        self.assert_key_fields(alpha, True, "forwarder /status proxies.alpha")
        self.assert_key_fields(p_doc, True, "proxy /status")
        self.assertTrue(f_doc["redis_connected"])
        self.assertTrue(p_doc["redis_connected"])
        self.assertEqual(alpha["key_fingerprint"], p_doc["key_fingerprint"])
        self.assertEqual(p_doc["period_s"], 1.0)
        current = forwarder.keyring.current(proxy_peer("alpha", proxy.instance))
        self.assertEqual(alpha["key_fingerprint"], current.session.envelope.fingerprint)

    @defer.inlineCallbacks
    def test_healthz_is_503_before_any_key_and_200_once_keyed(self):
        """A forwarder connected to Redis with no proxy keyed, and a connected proxy that no
        forwarder grants a key (one the forwarder does not know), answer /healthz 503; once proxy
        alpha has negotiated, the forwarder and alpha answer 200 and the keyless proxy still 503."""
        stack = Stack(self)
        yield stack.start(without=("alpha",))
        forwarder = stack.forwarder
        f_url = yield listen(self, admin_site(forwarder))
        yield poll(lambda: forwarder.bus.connected, 10, "the forwarder connected to Redis")
        self.assertEqual((yield self.health(f_url)), 503)
        doc = yield self.status(f_url)
        self.assertIsNone(doc["proxies"]["alpha"]["key_fingerprint"])

        stranger = stack.add_proxy("stranger", stack.upstream)  # the forwarder has no key for it
        s_url = yield listen(self, admin_site(stranger))
        yield poll(lambda: stranger.bus.connected, 10, "the keyless proxy connected to Redis")
        self.assertEqual((yield self.health(s_url)), 503)

        alpha = stack.add_proxy("alpha", stack.upstream)
        a_url = yield listen(self, admin_site(alpha))
        yield stack.ready("alpha")
        yield poll(lambda: alpha.healthy(), 5, "alpha holding its key")
        self.assertEqual((yield self.health(f_url)), 200)
        self.assertEqual((yield self.health(a_url)), 200)
        self.assertEqual((yield self.health(s_url)), 503)
        self.assertFalse(stranger.keyring.peers())

    @defer.inlineCallbacks
    def test_healthz_is_503_while_redis_is_down(self):
        """With both services keyed, /healthz is 200 on both; once their Redis is killed it is 503
        on both (and /status says redis_connected false); after Redis is back it is 200 again."""
        stack = yield Stack(self).start()
        forwarder, proxy = stack.forwarder, stack.proxies["alpha"]
        urls = yield defer.gatherResults([listen(self, admin_site(s)) for s in (forwarder, proxy)])
        for url in urls:
            self.assertEqual((yield self.health(url)), 200, url)
        stack.redis.kill()
        yield poll(lambda: not forwarder.bus.connected and not proxy.bus.connected, 10, "both see Redis gone")
        for url in urls:
            self.assertEqual((yield self.health(url)), 503, url)
            self.assertFalse((yield self.status(url))["redis_connected"], url)
        stack.redis.restart()
        yield poll(lambda: forwarder.healthy() and proxy.healthy(), 15, "both healthy again")
        for url in urls:
            self.assertEqual((yield self.health(url)), 200, url)
