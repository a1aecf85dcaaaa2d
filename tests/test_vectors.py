"""Known-answer vectors: the exact bytes of protocol version ``wire.VERSION`` (now 3).

``tests/vectors/vectors_v<N>.json`` (written by ``python -m tests.vectors.make_vectors``) holds
fixed inputs and the bytes the code made from them when the version was frozen. Each test
rebuilds those bytes with the real code and compares them, and decodes the stored bytes with
the real decoders and compares the fields, so an accidental change of the wire format, the KDF,
a label or a channel name fails here, naming the vector that moved. Where RSA makes bytes
random (PSS signatures, OAEP wrapping) the tests check that the stored ones verify or unwrap
with the stored keys, and pin the exact bytes that are signed.
"""

from __future__ import annotations

import base64
import fnmatch
import hashlib
import hmac
import json
import re
import shutil
import tempfile
from functools import cache
from pathlib import Path
from typing import Any, Callable

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from twisted.trial.unittest import SynchronousTestCase

from ppbridge import keys, negotiation, wire
from ppbridge.channels import Channels
from ppbridge.envelope import Envelope, derive_keys
from ppbridge.negotiation import LABEL_ANNOUNCE, LABEL_GRANT, LABEL_REQUEST, ForwarderNegotiator, ProxyNegotiator
from ppbridge.wire import (
    SESSION_TYPES,
    Announce,
    Header,
    KeyGrant,
    KeyRequest,
    MsgType,
    RequestHead,
    ResponseHead,
    Role,
    decode_reset,
    decode_signed,
    decode_window,
    encode_reset,
    encode_signed,
    encode_window,
    pack_header,
    unpack_header,
)

VECTORS = Path(__file__).resolve().parent / "vectors"
VERSION = wire.VERSION  # the version the code speaks when this module is imported
RFC7748_SHARED = "4a5d9d5ba4ce2de1728e3bf480350f25e07e21c947d19e3376f09b3c1e161742"  # RFC 7748, section 6.1
SIGNED_KINDS: dict[str, Any] = {  # name in the file: KeyRequest, KeyGrant or Announce
    "key_request": KeyRequest, "key_grant": KeyGrant, "announce": Announce}


@cache
def vectors() -> dict[str, Any]:
    path = VECTORS / f"vectors_v{VERSION}.json"
    if not path.exists():
        raise AssertionError(
            f"no known-answer vectors for protocol version {VERSION} ({path.name}): if wire.VERSION changed on "
            "purpose, run `python -m tests.vectors.make_vectors` and keep the older files; if not, undo it")
    loaded: dict[str, Any] = json.loads(path.read_text("utf-8"))
    return loaded


def b(hex_text: str) -> bytes:
    return bytes.fromhex(hex_text)


def a(text: str) -> bytes:
    return text.encode("ascii")


def private_key(who: str) -> rsa.RSAPrivateKey:
    key = serialization.load_pem_private_key(a(vectors()["rsa"][who]["private_pem"]), None)
    assert isinstance(key, rsa.RSAPrivateKey)
    return key


def public_key(who: str) -> rsa.RSAPublicKey:
    key = serialization.load_pem_public_key(a(vectors()["rsa"][who]["public_pem"]))
    assert isinstance(key, rsa.RSAPublicKey)
    return key


def derived() -> dict[Role, bytes]:
    return {role: b(vectors()["kdf"]["keys"][role.name]) for role in Role}


def names() -> dict[str, Any]:
    """The channel names of the default namespace, which the session vectors use."""
    first: dict[str, Any] = vectors()["channels"][0]
    return first


def hkdf_sha256(ikm: bytes, salt: bytes, info: bytes, length: int = 32) -> bytes:
    """RFC 5869 written out, independent of the ``cryptography`` HKDF the code uses."""
    prk = hmac.new(salt, ikm, hashlib.sha256).digest()
    out, block, counter = b"", b"", 1
    while len(out) < length:
        block = hmac.new(prk, block + info + bytes((counter,)), hashlib.sha256).digest()
        out, counter = out + block, counter + 1
    return out[:length]


class VectorTestCase(SynchronousTestCase):
    """Compares every vector of a list and fails once, naming each one that differs."""

    def setUp(self) -> None:
        self.v = vectors()

    def assertAllEqual(self, cases: list[tuple[str, Any, Any]]) -> None:
        """``cases`` are (vector name, what the code gives now, what the file holds)."""
        wrong = [f"{name}:\n    now    {got!r}\n    stored {want!r}" for name, got, want in cases if got != want]
        if wrong:
            self.fail(f"{len(wrong)} of {len(cases)} vectors of version {VERSION} changed:\n  " + "\n  ".join(wrong))


class FileTests(VectorTestCase):
    """The vector files themselves."""

    def test_current_version(self) -> None:
        """The file of the version the code speaks says it is that version, and the code
        still has the message types, roles, flag and sizes that version had."""
        c = self.v["constants"]
        self.assertEqual(self.v["version"], wire.VERSION)
        self.assertIn("make_vectors", self.v["comment"])
        self.assertAllEqual([
            ("version", wire.VERSION, c["version"]),
            ("msg_types", {t.name: int(t) for t in MsgType}, c["msg_types"]),
            ("roles", {r.name: int(r) for r in Role}, c["roles"]),
            ("flag_end", wire.FLAG_END, c["flag_end"]),
            ("header_size", wire.HEADER_SIZE, c["header_size"]),
            ("tag_size", wire.TAG_SIZE, c["tag_size"]),
            ("unknown_length", wire.UNKNOWN_LENGTH, c["unknown_length"]),
        ])

    def test_every_file_names_its_version(self) -> None:
        """Each ``vectors_v<N>.json`` kept in the folder (older versions stay as the record of
        what they put on the wire) says version N, and its session headers start with N."""
        files = sorted(VECTORS.glob("vectors_v*.json"))
        self.assertIn(VECTORS / f"vectors_v{VERSION}.json", files)
        for path in files:
            data = json.loads(path.read_text("utf-8"))
            number = int(re.fullmatch(r"vectors_v(\d+)\.json", path.name).group(1))  # type: ignore[union-attr]
            self.assertEqual(data["version"], number, path.name)
            self.assertEqual({b(s["sealed"])[0] for s in data["session"]}, {number}, path.name)


class RsaKeyTests(VectorTestCase):
    """The two stored RSA test keys and the fingerprint format."""

    def test_keys_load_and_match(self) -> None:
        """Each stored private key loads with ppbridge.keys (PKCS8 PEM, 0600), has the stored
        size, and its public half is the stored public PEM."""
        folder = Path(tempfile.mkdtemp(prefix="ppbridge-vectors-test-"))  # not mktemp(): that is under the cwd
        self.addCleanup(shutil.rmtree, folder, ignore_errors=True)
        for who in ("proxy", "forwarder"):
            path = folder / f"{who}.key"
            path.write_text(self.v["rsa"][who]["private_pem"], "ascii")
            path.chmod(0o600)
            key = keys.load_private_key(path)
            self.assertEqual(key.key_size, self.v["rsa"]["bits"])
            self.assertEqual(keys.public_pem(key.public_key()), a(self.v["rsa"][who]["public_pem"]))

    def test_fingerprint_format(self) -> None:
        """keys.fingerprint gives the stored ``SHA256:<base64, unpadded>`` string, which is
        the SHA-256 of the public key's DER form, as OpenSSH prints it."""
        cases = []
        for who in ("proxy", "forwarder"):
            stored = self.v["rsa"][who]["fingerprint"]
            self.assertRegex(stored, r"^SHA256:[A-Za-z0-9+/]{43}$")
            der = public_key(who).public_bytes(serialization.Encoding.DER,
                                               serialization.PublicFormat.SubjectPublicKeyInfo)
            by_hand = "SHA256:" + base64.b64encode(hashlib.sha256(der).digest()).decode("ascii").rstrip("=")
            cases += [(who, keys.fingerprint(public_key(who)), stored), (f"{who} by hand", by_hand, stored),
                      (f"{who} private", keys.fingerprint(private_key(who)), stored)]
        self.assertAllEqual(cases)


class KdfTests(VectorTestCase):
    """X25519, HKDF and the session fingerprint."""

    def test_x25519(self) -> None:
        """The fixed X25519 private keys (RFC 7748's) give the stored public keys and, both
        ways round, the stored shared secret, which is RFC 7748's."""
        k = self.v["kdf"]
        proxy = X25519PrivateKey.from_private_bytes(b(k["proxy_ephemeral_private"]))
        forwarder = X25519PrivateKey.from_private_bytes(b(k["forwarder_ephemeral_private"]))
        self.assertEqual(k["shared"], RFC7748_SHARED)
        self.assertAllEqual([
            ("proxy public", proxy.public_key().public_bytes_raw().hex(), k["proxy_ephemeral_public"]),
            ("forwarder public", forwarder.public_key().public_bytes_raw().hex(), k["forwarder_ephemeral_public"]),
            ("shared (proxy)", proxy.exchange(X25519PublicKey.from_public_bytes(
                b(k["forwarder_ephemeral_public"]))).hex(), k["shared"]),
            ("shared (forwarder)", forwarder.exchange(proxy.public_key()).hex(), k["shared"]),
        ])

    def test_derive_keys(self) -> None:
        """derive_keys(secret, shared, salt = request nonce || key id) gives the two stored
        direction keys."""
        k = self.v["kdf"]
        self.assertEqual(k["salt"], k["request_nonce"] + k["key_id"])
        got = derive_keys(b(k["secret"]), b(k["shared"]), b(k["salt"]))
        self.assertAllEqual([(role.name, got[role].hex(), k["keys"][role.name]) for role in Role])

    def test_hkdf_as_documented(self) -> None:
        """The stored keys are HKDF-SHA256 over secret || shared with the stored salt and the
        documented per-direction ``info`` labels, which carry the version."""
        k = self.v["kdf"]
        self.assertEqual(k["info"], {"FORWARDER": f"ppbridge v{VERSION} forwarder->proxy",
                                     "PROXY": f"ppbridge v{VERSION} proxy->forwarder"})
        ikm = b(k["secret"]) + b(k["shared"])
        self.assertAllEqual([(role, hkdf_sha256(ikm, b(k["salt"]), a(info)).hex(), k["keys"][role])
                             for role, info in k["info"].items()])

    def test_session_fingerprint(self) -> None:
        """Envelope.fingerprint of the stored keys is the stored 16 hex digits, on both sides:
        the first 64 bits of SHA-256("ppbridge fingerprint" || forwarder key || proxy key)."""
        k = self.v["kdf"]
        by_hand = hashlib.sha256(b"ppbridge fingerprint" + b(k["keys"]["FORWARDER"]) + b(k["keys"]["PROXY"]))
        self.assertAllEqual(
            [(role.name, Envelope(b(k["key_id"]), derived(), role).fingerprint, k["fingerprint"]) for role in Role]
            + [("by hand", by_hand.hexdigest()[:16], k["fingerprint"])])


class ChannelTests(VectorTestCase):
    """Channel names: fixed ones exactly, random ones by their documented shape."""

    def test_fixed_names(self) -> None:
        """Channels(namespace) gives the stored negotiate, announce, proxy data, forwarder
        control and forwarder reply names and the stored ACL patterns (a proxy's two, the
        forwarders', the namespace's), in the default and in another namespace."""
        cases = []
        for c in self.v["channels"]:
            ch, ns = Channels(c["namespace"]), c["namespace"]
            instance, forwarder, acl = b(c["instance"]), b(c["forwarder"]), c["acl_patterns"]
            cases += [(f"{ns} negotiate", ch.negotiate, a(c["negotiate"])),
                      (f"{ns} announce", ch.announce, a(c["announce"])),
                      (f"{ns} proxy_data", ch.proxy_data(c["proxy"], instance), a(c["proxy_data"])),
                      (f"{ns} forwarder_control", ch.forwarder_control(forwarder), a(c["forwarder_control"])),
                      (f"{ns} reply", ch.reply(forwarder), a(c["reply"])),
                      (f"{ns} acl proxy", list(ch.proxy_patterns(c["proxy"])), [a(p) for p in acl["proxy"]]),
                      (f"{ns} acl forwarders", ch.forwarders_pattern(), a(acl["forwarders"])),
                      (f"{ns} acl namespace", ch.namespace_pattern(), a(acl["namespace"]))]
        self.assertEqual(self.v["channels"][0]["namespace"], "ppbridge")
        self.assertAllEqual(cases)

    def test_random_names_shape(self) -> None:
        """negotiation_temp(proxy) is the stored prefix (namespace, ``:n:``, the proxy's name,
        ``:``) and 32 lowercase hex digits, and names that proxy as its owner, as does the stored
        example."""
        for c in self.v["channels"]:
            ch, spec = Channels(c["namespace"]), c["negotiation_temp"]
            shape = re.compile(re.escape(a(spec["prefix"])) + b"[0-9a-f]{%d}" % spec["token_hex_digits"])
            for name in (ch.negotiation_temp(c["proxy"]), ch.negotiation_temp(c["proxy"]), a(spec["example"])):
                self.assertTrue(shape.fullmatch(name), name)
                self.assertEqual(ch.negotiation_owner(name), c["proxy"], name)

    def test_acl_patterns_cover_exactly_their_channels(self) -> None:
        """Redis matches SUBSCRIBE and PUBLISH channels against ACL patterns as globs: the proxy's
        two patterns cover its data and grant channels and none of the forwarder's; the
        forwarders' pattern covers the control and reply channels and none of the proxy's; the
        namespace pattern covers all of them."""
        for c in self.v["channels"]:
            acl = c["acl_patterns"]
            proxy = [c["proxy_data"], c["negotiation_temp"]["example"]]
            forwarder = [c["forwarder_control"], c["reply"]]

            def covered(name: str, patterns: list[str]) -> bool:
                return any(fnmatch.fnmatchcase(name, p) for p in patterns)

            wrong = ([f"{name}: proxy's patterns" for name in proxy + forwarder
                      if covered(name, acl["proxy"]) != (name in proxy)]
                     + [f"{name}: forwarders' pattern" for name in proxy + forwarder
                        if covered(name, [acl["forwarders"]]) != (name in forwarder)]
                     + [f"{name}: namespace pattern" for name in proxy + forwarder + [c["negotiate"], c["announce"]]
                        if not covered(name, [acl["namespace"]])])
            self.assertEqual(wrong, [])


def header_of(s: dict[str, Any]) -> Header:
    return Header(VERSION, MsgType[s["type"]], s["flags"], Role[s["sender"]], b(s["key_id"]), s["counter"],
                  b(s["stream_id"]), s["seq"])


def _head_headers(f: dict[str, Any]) -> list[tuple[bytes, bytes]]:
    return [(a(n), a(v)) for n, v in f["headers"]]


def encode_payload(mtype: MsgType, f: dict[str, Any]) -> bytes:
    """A session payload from the stored fields, with the real encoders."""
    if mtype is MsgType.REQ_HEAD:
        return RequestHead(a(f["method"]), a(f["target"]), _head_headers(f), a(f["reply_channel"]),
                           f["content_length"], f["deadline_ms"]).encode(b(f["body"]))
    if mtype is MsgType.RESP_HEAD:
        return ResponseHead(f["status"], a(f["reason"]), _head_headers(f), f["content_length"]).encode(b(f["body"]))
    if mtype in (MsgType.REQ_DATA, MsgType.RESP_DATA):
        return b(f["body"])
    if mtype is MsgType.WINDOW:
        return encode_window(f["increment"])
    if mtype is MsgType.RESET:
        return encode_reset(f["code"], f["message"])
    return b""


def decode_payload(mtype: MsgType, payload: bytes) -> dict[str, Any]:
    """The stored fields' form of a session payload, with the real decoders."""
    if mtype in (MsgType.REQ_HEAD, MsgType.RESP_HEAD):
        head, body = (RequestHead if mtype is MsgType.REQ_HEAD else ResponseHead).decode(payload)
        fields = {name: getattr(head, name) for name in head.__dataclass_fields__}
        fields = {k: v.decode("ascii") if isinstance(v, bytes) else v for k, v in fields.items()}
        fields["headers"] = [[n.decode("ascii"), v.decode("ascii")] for n, v in head.headers]
        return fields | {"body": body.hex()}
    if mtype in (MsgType.REQ_DATA, MsgType.RESP_DATA):
        return {"body": payload.hex()}
    if mtype is MsgType.WINDOW:
        return {"increment": decode_window(payload)}
    if mtype is MsgType.RESET:
        code, message = decode_reset(payload)
        return {"code": code, "message": message}
    if payload:
        raise AssertionError("a CONFIRM with a payload")
    return {}


class SessionMessageTests(VectorTestCase):
    """Every session message type: header, payload and sealed bytes, both ways."""

    def each(self, compute: Callable[[dict[str, Any]], Any], stored: Callable[[dict[str, Any]], Any]) -> None:
        self.assertAllEqual([(s["name"], compute(s), stored(s)) for s in self.v["session"]])

    def test_every_type_and_sender(self) -> None:
        """There is a vector for every session message type, and sealed by each role (a new
        type without vectors fails here)."""
        self.assertEqual({MsgType[s["type"]] for s in self.v["session"]}, set(SESSION_TYPES))
        self.assertEqual({Role[s["sender"]] for s in self.v["session"]}, set(Role))

    def test_header_encoding(self) -> None:
        """pack_header of the stored fields gives the stored header, which is the first
        HEADER_SIZE bytes of the sealed message."""
        self.each(lambda s: pack_header(MsgType[s["type"]], s["flags"], Role[s["sender"]], b(s["key_id"]),
                                        s["counter"], b(s["stream_id"]), s["seq"]).hex(), lambda s: s["header"])
        self.each(lambda s: s["sealed"][: 2 * wire.HEADER_SIZE], lambda s: s["header"])

    def test_header_decoding(self) -> None:
        """unpack_header of each stored sealed message gives the stored fields."""
        self.each(lambda s: unpack_header(b(s["sealed"])), header_of)

    def test_payload_encoding(self) -> None:
        """RequestHead.encode, ResponseHead.encode, encode_window, encode_reset (and the raw
        body and empty CONFIRM payloads) of the stored fields give the stored payloads."""
        self.each(lambda s: encode_payload(MsgType[s["type"]], s["fields"]).hex(), lambda s: s["payload"])

    def test_payload_decoding(self) -> None:
        """The real decoders turn each stored payload back into the stored fields."""
        self.each(lambda s: decode_payload(MsgType[s["type"]], b(s["payload"])), lambda s: s["fields"])

    def seal(self, s: dict[str, Any]) -> str:
        envelope = Envelope(b(s["key_id"]), derived(), Role[s["sender"]])
        envelope.sent = s["counter"]
        sealed = envelope.seal(MsgType[s["type"]], b(s["stream_id"]), s["seq"], a(s["channel"]), b(s["payload"]),
                               s["flags"])
        self.assertEqual(envelope.sent, s["counter"] + 1)
        return bytes(sealed).hex()

    def test_seal(self) -> None:
        """Envelope.seal with the stored keys, counter, stream, seq, flags, channel and payload
        gives the stored message byte for byte (AES-GCM under a counter nonce is deterministic)."""
        self.each(self.seal, lambda s: s["sealed"])

    def test_open(self) -> None:
        """The peer's Envelope.open of each stored message, on its stored channel, gives the
        stored payload."""
        def open_(s: dict[str, Any]) -> str:
            peer = Role.PROXY if s["sender"] == "FORWARDER" else Role.FORWARDER
            data = b(s["sealed"])
            return Envelope(b(s["key_id"]), derived(), peer).open(unpack_header(data), data, a(s["channel"])).hex()
        self.each(open_, lambda s: s["payload"])

    def test_aead_as_documented(self) -> None:
        """Each stored message opens with plain AES-256-GCM under the sender's key, nonce =
        sender byte, three zeros, 8-byte counter, associated data = header || channel."""
        def by_hand(s: dict[str, Any]) -> str:
            nonce = bytes((Role[s["sender"]], 0, 0, 0)) + s["counter"].to_bytes(8, "big")
            self.assertEqual(nonce.hex(), s["nonce"], s["name"])
            data, key = b(s["sealed"]), derived()[Role[s["sender"]]]
            aad = data[: wire.HEADER_SIZE] + a(s["channel"])
            return AESGCM(key).decrypt(nonce, data[wire.HEADER_SIZE:], aad).hex()
        self.each(by_hand, lambda s: s["payload"])


class SignedVectorTestCase(VectorTestCase):
    """Rebuilds the stored negotiation messages from their fields."""

    def message(self, name: str) -> KeyRequest | KeyGrant | Announce:
        fields = dict(self.v["negotiation"][name]["fields"])
        for key, value in fields.items():
            if isinstance(value, str) and key != "proxy":
                fields[key] = a(value) if key == "reply_channel" else b(value)
        return SIGNED_KINDS[name](**fields)


class NegotiationMessageTests(SignedVectorTestCase):
    """KEY_REQUEST, KEY_GRANT and ANNOUNCE: bodies, signed transcripts and whole messages."""

    def each(self, compute: Callable[[str, dict[str, Any]], Any], field: str) -> None:
        self.assertAllEqual([(name, compute(name, self.v["negotiation"][name]), self.v["negotiation"][name][field])
                             for name in SIGNED_KINDS])

    def test_labels(self) -> None:
        """The three signature labels, which carry the version, are the stored ones."""
        self.assertAllEqual([("key_request", LABEL_REQUEST, a(self.v["negotiation"]["labels"]["key_request"])),
                             ("key_grant", LABEL_GRANT, a(self.v["negotiation"]["labels"]["key_grant"])),
                             ("announce", LABEL_ANNOUNCE, a(self.v["negotiation"]["labels"]["announce"]))])
        self.assertTrue(LABEL_REQUEST.startswith(b"ppbridge v%d " % VERSION))

    def test_body_encoding(self) -> None:
        """encode_body of the stored fields gives the stored body bytes."""
        self.each(lambda name, n: self.message(name).encode_body().hex(), "body")

    def test_message_encoding(self) -> None:
        """encode_signed(stored body, stored signature) gives the stored message."""
        self.each(lambda name, n: encode_signed(b(n["body"]), b(n["signature"])).hex(), "message")

    def test_decoding(self) -> None:
        """decode_signed of each stored message gives the stored fields, body and signature."""
        def decode(name: str, n: dict[str, Any]) -> tuple[Any, str, str]:
            message, body, signature = decode_signed(b(n["message"]), SIGNED_KINDS[name])
            return message, body.hex(), signature.hex()
        self.each(lambda name, n: decode(name, n)[1], "body")
        self.each(lambda name, n: decode(name, n)[2], "signature")
        self.assertAllEqual([(name, decode(name, self.v["negotiation"][name])[0], self.message(name))
                             for name in SIGNED_KINDS])

    def test_transcripts(self) -> None:
        """The signed bytes are label || channel || body (request, announce) and label ||
        temporary channel || NUL || proxy name || instance || request's X25519 key || body
        (grant); the grant's is also what negotiation._grant_signed_data builds."""
        n = self.v["negotiation"]
        request = self.message("key_request")
        assert isinstance(request, KeyRequest)
        grant_channel = a(n["key_grant"]["channel"])
        self.assertEqual(grant_channel, request.reply_channel)
        by_hand = {
            "key_request": LABEL_REQUEST + a(n["key_request"]["channel"]) + b(n["key_request"]["body"]),
            "key_grant": LABEL_GRANT + grant_channel + b"\0" + a(request.proxy) + request.instance
            + request.ephemeral + b(n["key_grant"]["body"]),
            "announce": LABEL_ANNOUNCE + a(n["announce"]["channel"]) + b(n["announce"]["body"]),
        }
        self.each(lambda name, _: by_hand[name].hex(), "transcript")
        code = negotiation._grant_signed_data(grant_channel, request, b(n["key_grant"]["body"]))
        self.assertEqual(code.hex(), n["key_grant"]["transcript"])
        ch = Channels(names()["namespace"])
        self.assertEqual((n["key_request"]["channel"], n["announce"]["channel"]),
                         (ch.negotiate.decode(), ch.announce.decode()))

    def test_signatures_verify(self) -> None:
        """Each stored signature verifies with the stored public key of its signer over the
        stored transcript, and not over a transcript with one byte changed."""
        for name in SIGNED_KINDS:
            n = self.v["negotiation"][name]
            transcript, signer = b(n["transcript"]), public_key(n["signer"])
            self.assertTrue(keys.verify(signer, b(n["signature"]), transcript), name)
            self.assertFalse(keys.verify(signer, b(n["signature"]), transcript[:-1] + b"\xff"), name)

    def test_wrapped_secret(self) -> None:
        """The grant's stored wrapped secret unwraps, with the stored proxy private key, to the
        stored session secret."""
        wrapped = b(self.v["negotiation"]["key_grant"]["fields"]["wrapped"])
        self.assertEqual(keys.unwrap(private_key("proxy"), wrapped), b(self.v["kdf"]["secret"]))


class FixedRandomness:
    """Stands in for ``os`` in ppbridge.negotiation: the stored bytes, by size; records the sizes asked."""

    def __init__(self, by_size: dict[int, bytes]) -> None:
        self.by_size = by_size
        self.asked: list[int] = []

    def urandom(self, n: int) -> bytes:
        self.asked.append(n)
        return self.by_size[n]


class FixedX25519:
    """Stands in for ``X25519PrivateKey`` in ppbridge.negotiation: generate() gives the stored key."""

    def __init__(self, private: bytes) -> None:
        self.key = X25519PrivateKey.from_private_bytes(private)

    def generate(self) -> X25519PrivateKey:
        return self.key


class FixedChannels(Channels):
    """Channels whose next temporary negotiation channel is the stored example."""

    def __init__(self, namespace: str, temp: bytes) -> None:
        super().__init__(namespace)
        self.temp = temp

    def negotiation_temp(self, proxy: str) -> bytes:
        return self.temp


class NegotiatorTests(SignedVectorTestCase):
    """The real negotiators, with their random choices fixed to the stored ones, produce and
    accept exactly the stored messages: the vectors are one negotiation as the code runs it."""

    def test_proxy_side(self) -> None:
        """ProxyNegotiator requests with the stored body (signed over the stored transcript);
        given the stored grant it derives the stored keys (fingerprint) and its session opens
        the forwarder's stored session messages; it accepts the stored announcement."""
        n, k, c = self.v["negotiation"], self.v["kdf"], names()
        request, grant = self.message("key_request"), self.message("key_grant")
        assert isinstance(request, KeyRequest) and isinstance(grant, KeyGrant)
        randomness = FixedRandomness({16: request.nonce})
        self.patch(negotiation, "os", randomness)
        self.patch(negotiation, "X25519PrivateKey", FixedX25519(b(k["proxy_ephemeral_private"])))
        proxy = ProxyNegotiator(request.proxy, request.instance, private_key("proxy"), public_key("forwarder"),
                                FixedChannels(c["namespace"], request.reply_channel), request.frame_size,
                                request.window, 300.0, request.lifetime_ms / 1000, request.max_messages)
        channel, message = proxy.make_request(request.timestamp_ms / 1000, request.target)
        _, body, signature = decode_signed(message, KeyRequest)
        self.assertEqual((channel, body.hex(), randomness.asked),
                         (request.reply_channel, n["key_request"]["body"], [16]))
        self.assertTrue(keys.verify(public_key("proxy"), signature, b(n["key_request"]["transcript"])))
        session = proxy.handle_grant(channel, b(n["key_grant"]["message"]), grant.timestamp_ms / 1000)
        self.assertEqual((session.envelope.fingerprint, session.envelope.key_id, session.forwarder),
                         (k["fingerprint"], b(k["key_id"]), grant.forwarder))
        for s in self.v["session"]:
            if s["sender"] == "FORWARDER":
                data = b(s["sealed"])
                self.assertEqual(session.envelope.open(unpack_header(data), data, a(s["channel"])).hex(),
                                 s["payload"], s["name"])
        announce = self.message("announce")
        assert isinstance(announce, Announce)
        self.assertEqual(proxy.verify_announce(b(n["announce"]["message"]), announce.timestamp_ms / 1000), announce)

    def test_forwarder_side(self) -> None:
        """ForwarderNegotiator accepts the stored request and answers on the stored channel
        with the stored grant body (signed over the stored transcript, the stored secret
        wrapped for the stored proxy key); its session seals the stored messages byte for
        byte; it announces with the stored body."""
        n, k = self.v["negotiation"], self.v["kdf"]
        request, grant, announce = self.message("key_request"), self.message("key_grant"), self.message("announce")
        assert isinstance(request, KeyRequest) and isinstance(grant, KeyGrant) and isinstance(announce, Announce)
        randomness = FixedRandomness({32: b(k["secret"]), 8: grant.key_id, 16: announce.nonce})
        self.patch(negotiation, "os", randomness)
        self.patch(negotiation, "X25519PrivateKey", FixedX25519(b(k["forwarder_ephemeral_private"])))
        wrapped_for: list[tuple[str, bytes]] = []

        def wrap(key: rsa.RSAPublicKey, secret: bytes) -> bytes:  # OAEP is random: the stored result
            wrapped_for.append((keys.fingerprint(key), secret))
            return grant.wrapped

        self.patch(keys, "wrap", wrap)
        forwarder = ForwarderNegotiator(grant.forwarder, private_key("forwarder"), {request.proxy: public_key("proxy")},
                                        Channels(names()["namespace"]), grant.frame_size, grant.window, 300.0,
                                        86400.0, grant.announce_ms / 1000)
        answer = forwarder.handle_request(b(n["key_request"]["message"]), grant.timestamp_ms / 1000)
        assert answer is not None
        channel, message, session = answer
        _, body, signature = decode_signed(message, KeyGrant)
        self.assertEqual((channel, body.hex()), (request.reply_channel, n["key_grant"]["body"]))
        self.assertTrue(keys.verify(public_key("forwarder"), signature, b(n["key_grant"]["transcript"])))
        self.assertEqual(wrapped_for, [(self.v["rsa"]["proxy"]["fingerprint"], b(k["secret"]))])
        self.assertEqual(session.envelope.fingerprint, k["fingerprint"])
        for s in self.v["session"]:
            if s["sender"] == "FORWARDER":
                session.envelope.sent = s["counter"]
                sealed = session.envelope.seal(MsgType[s["type"]], b(s["stream_id"]), s["seq"], a(s["channel"]),
                                               b(s["payload"]), s["flags"])
                self.assertEqual(bytes(sealed).hex(), s["sealed"], s["name"])
        _, body, signature = decode_signed(forwarder.announce(announce.timestamp_ms / 1000), Announce)
        self.assertEqual(body.hex(), n["announce"]["body"])
        self.assertTrue(keys.verify(public_key("forwarder"), signature, b(n["announce"]["transcript"])))
        self.assertEqual(randomness.asked, [32, 8, 16])
