"""Writes ``tests/vectors/vectors_v<N>.json``: the known-answer vectors of protocol version
``N = ppbridge.wire.VERSION``, built with the real code from the fixed inputs below.

    python -m tests.vectors.make_vectors            # write the current version's file, or check it
    python -m tests.vectors.make_vectors --force    # overwrite it (only before that version ships)

Everything is deterministic except what RSA makes random: the two RSA key pairs, the PSS
signatures and the OAEP-wrapped secret. Those are generated once and, on later runs, taken
from the existing file as long as they still verify (or unwrap), so a run on an unchanged code
base reproduces the file byte for byte; a new version's file keeps the RSA keys of the newest
older file. An existing file that would change is not overwritten
without ``--force``: the vectors of a released version are frozen, and a change to the wire
format is a new version with a new file (see docs/PROTOCOL.md section 11).

Byte strings are lowercase hex, except text (channel names, the namespace, the proxy name,
methods, targets, header names and values, reasons, labels), which is a JSON string.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from ppbridge import keys, wire
from ppbridge.channels import Channels
from ppbridge.envelope import _LABELS, Envelope, derive_keys
from ppbridge.negotiation import LABEL_ANNOUNCE, LABEL_GRANT, LABEL_REQUEST, _grant_signed_data
from ppbridge.wire import (
    FLAG_END,
    Announce,
    KeyGrant,
    KeyRequest,
    MsgType,
    RequestHead,
    ResponseHead,
    Role,
    encode_reset,
    encode_signed,
    encode_window,
    pack_header,
)

HERE = Path(__file__).resolve().parent
RSA_BITS = 2048  # small test keys: the protocol accepts 2048 and more

# --- the fixed inputs: one negotiation, then one request and its response ------------------
NAMESPACE = "ppbridge"
OTHER_NAMESPACE = "acme.prod-2"
PROXY = "alpha"
INSTANCE = bytes.fromhex("1122334455667788")
FORWARDER = bytes.fromhex("f0e1d2c3b4a59687")
TEMP_TOKEN = "0f1e2d3c4b5a69788796a5b4c3d2e1f0"  # the random part of ns:n:<proxy>:<32 hex>
# RFC 7748 section 6.1: Alice's and Bob's keys, so the shared secret is a published one.
PROXY_X25519 = bytes.fromhex("77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a")
FORWARDER_X25519 = bytes.fromhex("5dab087e624a8a4b79e17f8b83800ee66f3bb1292618b6fd1c2f8b27ff88e0eb")
SECRET = bytes(range(0x40, 0x60))
REQUEST_NONCE = bytes(range(0x10, 0x20))
ANNOUNCE_NONCE = bytes(range(0x30, 0x40))
KEY_ID = bytes.fromhex("a1a2a3a4a5a6a7a8")
STREAM = bytes(range(0xC0, 0xD0))
STREAM_GET = bytes(range(0xE0, 0xF0))
NO_STREAM = bytes(16)
ANNOUNCE_MS = 1_767_225_600_000  # 2026-01-01T00:00:00Z; every timestamp is exact as a float / 1000
REQUEST_MS = ANNOUNCE_MS + 500
GRANT_MS = ANNOUNCE_MS + 750
DEADLINE_MS = GRANT_MS + 30_000
ANNOUNCE_INTERVAL_MS = 20_000
REQUEST_LIMITS = {"frame_size": 262_144, "window": 1_048_576, "lifetime_ms": 3_600_000, "max_messages": 500_000}
GRANT_LIMITS = {"frame_size": 131_072, "window": 2_097_152}
REQUEST_BODY = b'{"report": "q3", "rows": [1, 2, 3]}\n'
RESPONSE_BODY = b"Hello, world!\n"

COMMENT = (
    "Known-answer vectors of ppbridge protocol version {v}, written by `python -m tests.vectors.make_vectors` "
    "with the real code (ppbridge.wire, envelope, negotiation, channels, keys) from the fixed inputs in that "
    "script, and checked both ways by tests/test_vectors.py. Bytes are lowercase hex; text (channel names, "
    "namespace, proxy name, method, target, header names and values, reason, labels) is a JSON string. RSA keys "
    "(RSA-{bits}, test only), PSS signatures and the OAEP-wrapped secret are random: they were generated once "
    "and are checked by verifying / unwrapping, not by comparing bytes. The X25519 keys are those of RFC 7748 "
    "section 6.1. Frozen: a change of the wire format is a new version with its own file."
)


def h(data: bytes | bytearray) -> str:
    return bytes(data).hex()


# --- sections -----------------------------------------------------------------------------------


def constants() -> dict[str, Any]:
    return {
        "version": wire.VERSION,
        "msg_types": {t.name: int(t) for t in MsgType},
        "roles": {r.name: int(r) for r in Role},
        "flag_end": FLAG_END,
        "header_size": wire.HEADER_SIZE,
        "tag_size": wire.TAG_SIZE,
        "unknown_length": wire.UNKNOWN_LENGTH,
    }


def rsa_section(previous: dict[str, Any] | None) -> tuple[dict[str, Any], dict[str, rsa.RSAPrivateKey]]:
    """Both RSA key pairs: the previous file's when there is one, else new ones."""
    out: dict[str, Any] = {"bits": RSA_BITS}
    private: dict[str, rsa.RSAPrivateKey] = {}
    for who in ("proxy", "forwarder"):
        if previous is not None:
            loaded = serialization.load_pem_private_key(previous["rsa"][who]["private_pem"].encode("ascii"), None)
            assert isinstance(loaded, rsa.RSAPrivateKey)
            key = loaded
        else:
            key = keys.generate_private_key(RSA_BITS)
        private[who] = key
        pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
        out[who] = {
            "private_pem": pem.decode("ascii"),
            "public_pem": keys.public_pem(key.public_key()).decode("ascii"),
            "fingerprint": keys.fingerprint(key.public_key()),
        }
    return out, private


def channel_names(namespace: str) -> dict[str, Any]:
    ch = Channels(namespace)
    temp_prefix = b"%s:n:%s:" % (ch.prefix, PROXY.encode("ascii"))
    temp = temp_prefix + TEMP_TOKEN.encode("ascii")
    assert ch.negotiation_owner(temp) == PROXY
    return {
        "namespace": namespace,
        "proxy": PROXY,
        "instance": h(INSTANCE),
        "forwarder": h(FORWARDER),
        "negotiate": ch.negotiate.decode("ascii"),
        "announce": ch.announce.decode("ascii"),
        "proxy_data": ch.proxy_data(PROXY, INSTANCE).decode("ascii"),
        "forwarder_control": ch.forwarder_control(FORWARDER).decode("ascii"),
        "reply": ch.reply(FORWARDER).decode("ascii"),
        "negotiation_temp": {"prefix": temp_prefix.decode("ascii"), "token_hex_digits": 32,
                             "example": temp.decode("ascii")},
        "acl_patterns": {"proxy": [p.decode("ascii") for p in ch.proxy_patterns(PROXY)],
                         "forwarders": ch.forwarders_pattern().decode("ascii"),
                         "namespace": ch.namespace_pattern().decode("ascii")},
    }


def kdf_section() -> dict[str, Any]:
    proxy_eph = X25519PrivateKey.from_private_bytes(PROXY_X25519)
    forwarder_eph = X25519PrivateKey.from_private_bytes(FORWARDER_X25519)
    shared = proxy_eph.exchange(forwarder_eph.public_key())
    salt = REQUEST_NONCE + KEY_ID
    derived = derive_keys(SECRET, shared, salt)
    return {
        "secret": h(SECRET),
        "proxy_ephemeral_private": h(PROXY_X25519),
        "proxy_ephemeral_public": h(proxy_eph.public_key().public_bytes_raw()),
        "forwarder_ephemeral_private": h(FORWARDER_X25519),
        "forwarder_ephemeral_public": h(forwarder_eph.public_key().public_bytes_raw()),
        "shared": h(shared),
        "request_nonce": h(REQUEST_NONCE),
        "key_id": h(KEY_ID),
        "salt": h(salt),
        "info": {role.name: label.decode("ascii") for role, label in _LABELS.items()},
        "keys": {role.name: h(key) for role, key in derived.items()},
        "fingerprint": Envelope(KEY_ID, derived, Role.FORWARDER).fingerprint,
    }


# --- session messages ------------------------------------------------------------------------


def _headers(pairs: list[tuple[bytes, bytes]]) -> list[list[str]]:
    return [[n.decode("ascii"), v.decode("ascii")] for n, v in pairs]


def _request_head(method: bytes, target: bytes, headers: list[tuple[bytes, bytes]], reply: bytes,
                  length: int | None, inline: bytes) -> tuple[dict[str, Any], bytes]:
    head = RequestHead(method, target, headers, reply, length, DEADLINE_MS)
    fields = {"method": method.decode("ascii"), "target": target.decode("ascii"), "headers": _headers(headers),
              "reply_channel": reply.decode("ascii"), "content_length": length, "deadline_ms": DEADLINE_MS,
              "body": h(inline)}
    return fields, head.encode(inline)


def _response_head(status: int, reason: bytes, headers: list[tuple[bytes, bytes]], length: int | None,
                   inline: bytes) -> tuple[dict[str, Any], bytes]:
    fields = {"status": status, "reason": reason.decode("ascii"), "headers": _headers(headers),
              "content_length": length, "body": h(inline)}
    return fields, ResponseHead(status, reason, headers, length).encode(inline)


def _reset(code: int, message: str) -> tuple[dict[str, Any], bytes]:
    return {"code": code, "message": message}, encode_reset(code, message)


def _window(increment: int) -> tuple[dict[str, Any], bytes]:
    return {"increment": increment}, encode_window(increment)


def _data(body: bytes) -> tuple[dict[str, Any], bytes]:
    return {"body": h(body)}, body


def session_specs(names: dict[str, Any]) -> list[tuple[str, MsgType, Role, int, int, bytes, int, str, Any]]:
    """(name, type, sender, flags, counter, stream id, seq, channel, (fields, payload)) of each vector."""
    data, reply, ctl = names["proxy_data"], names["reply"], names["forwarder_control"]
    split = 11
    post = _request_head(b"POST", b"/office/report?year=2025&q=a%20b",
                         [(b"Host", b"intranet.example"), (b"Content-Type", b"application/json"), (b"X-Empty", b"")],
                         reply.encode("ascii"), len(REQUEST_BODY), REQUEST_BODY[:split])
    get = _request_head(b"GET", b"/", [], reply.encode("ascii"), 0, b"")
    resp = _response_head(200, b"OK", [(b"Content-Type", b"text/plain; charset=utf-8"), (b"Set-Cookie", b"a=1"),
                                       (b"Set-Cookie", b"b=2")], None, RESPONSE_BODY[:7])
    F, P = Role.FORWARDER, Role.PROXY
    return [
        ("confirm_forwarder", MsgType.CONFIRM, F, 0, 0, NO_STREAM, 0, data, ({}, b"")),
        ("req_head", MsgType.REQ_HEAD, F, 0, 1, STREAM, 0, data, post),
        ("req_data", MsgType.REQ_DATA, F, FLAG_END, 2, STREAM, 1, data, _data(REQUEST_BODY[split:])),
        ("window_forwarder", MsgType.WINDOW, F, 0, 3, STREAM, 0, data, _window(65_536)),
        ("req_head_end", MsgType.REQ_HEAD, F, FLAG_END, 4, STREAM_GET, 0, data, get),
        ("reset_forwarder", MsgType.RESET, F, 0, 1 << 32, STREAM_GET, 0, data, _reset(6, "client went away")),
        ("confirm_proxy", MsgType.CONFIRM, P, 0, 0, NO_STREAM, 0, ctl, ({}, b"")),
        ("resp_head", MsgType.RESP_HEAD, P, 0, 1, STREAM, 0, reply, resp),
        ("resp_data", MsgType.RESP_DATA, P, FLAG_END, 2, STREAM, 1, reply, _data(RESPONSE_BODY[7:])),
        ("window_proxy", MsgType.WINDOW, P, 0, 3, STREAM, 0, reply, _window(1_048_576)),
        ("reset_proxy", MsgType.RESET, P, 0, 0x0102030405060708, STREAM_GET, 0, reply,
         _reset(8, "zu spät: past the deadline")),
    ]


def session_section(names: dict[str, Any], kdf: dict[str, Any]) -> list[dict[str, Any]]:
    derived = {role: bytes.fromhex(kdf["keys"][role.name]) for role in Role}
    out = []
    for name, mtype, sender, flags, counter, stream, seq, channel, (fields, payload) in session_specs(names):
        envelope = Envelope(KEY_ID, derived, sender)
        envelope.sent = counter
        sealed = envelope.seal(mtype, stream, seq, channel.encode("ascii"), payload, flags)
        out.append({
            "name": name, "type": mtype.name, "sender": sender.name, "flags": flags, "key_id": h(KEY_ID),
            "counter": counter, "stream_id": h(stream), "seq": seq, "channel": channel, "fields": fields,
            "payload": h(payload),
            "header": h(pack_header(mtype, flags, sender, KEY_ID, counter, stream, seq)),
            "nonce": h(bytes((sender, 0, 0, 0)) + counter.to_bytes(8, "big")),
            "sealed": h(sealed),
        })
    return out


# --- negotiation messages ----------------------------------------------------------------------


def _signature(previous: dict[str, Any] | None, name: str, key: rsa.RSAPrivateKey, transcript: bytes) -> bytes:
    """The previous file's signature when it still verifies over ``transcript``, else a new one."""
    if previous is not None:
        old = bytes.fromhex(previous["negotiation"][name]["signature"])
        if keys.verify(key.public_key(), old, transcript):
            return old
    return keys.sign(key, transcript)


def _wrapped(previous: dict[str, Any] | None, key: rsa.RSAPrivateKey) -> bytes:
    if previous is not None:
        old = bytes.fromhex(previous["negotiation"]["key_grant"]["fields"]["wrapped"])
        if keys.unwrap(key, old) == SECRET:
            return old
    return keys.wrap(key.public_key(), SECRET)


def _signed(fields: dict[str, Any], body: bytes, channel: str, transcript: bytes, signer: str,
            signature: bytes) -> dict[str, Any]:
    return {"fields": fields, "channel": channel, "signer": signer, "body": h(body), "transcript": h(transcript),
            "signature": h(signature), "message": h(encode_signed(body, signature))}


def _jsonable(message: KeyRequest | KeyGrant | Announce) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name in message.__dataclass_fields__:
        value = getattr(message, name)
        if isinstance(value, bytes):
            value = value.decode("ascii") if name == "reply_channel" else h(value)
        out[name] = value
    return out


def negotiation_section(previous: dict[str, Any] | None, names: dict[str, Any], kdf: dict[str, Any],
                        private: dict[str, rsa.RSAPrivateKey]) -> dict[str, Any]:
    ch = Channels(NAMESPACE)
    temp = names["negotiation_temp"]["example"]
    request = KeyRequest(PROXY, INSTANCE, temp.encode("ascii"), REQUEST_NONCE, REQUEST_MS,
                         bytes.fromhex(kdf["proxy_ephemeral_public"]), REQUEST_LIMITS["frame_size"],
                         REQUEST_LIMITS["window"], FORWARDER, REQUEST_LIMITS["lifetime_ms"],
                         REQUEST_LIMITS["max_messages"])
    grant = KeyGrant(FORWARDER, REQUEST_NONCE, KEY_ID, _wrapped(previous, private["proxy"]),
                     bytes.fromhex(kdf["forwarder_ephemeral_public"]), GRANT_LIMITS["frame_size"],
                     GRANT_LIMITS["window"], GRANT_MS, REQUEST_LIMITS["lifetime_ms"], REQUEST_LIMITS["max_messages"],
                     ANNOUNCE_INTERVAL_MS)
    announce = Announce(FORWARDER, ANNOUNCE_NONCE, ANNOUNCE_MS, ANNOUNCE_INTERVAL_MS)
    out: dict[str, Any] = {"labels": {"key_request": LABEL_REQUEST.decode("ascii"),
                                      "key_grant": LABEL_GRANT.decode("ascii"),
                                      "announce": LABEL_ANNOUNCE.decode("ascii")}}
    bodies = {"key_request": request.encode_body(), "key_grant": grant.encode_body(),
              "announce": announce.encode_body()}
    transcripts = {
        "key_request": LABEL_REQUEST + ch.negotiate + bodies["key_request"],
        "key_grant": _grant_signed_data(temp.encode("ascii"), request, bodies["key_grant"]),
        "announce": LABEL_ANNOUNCE + ch.announce + bodies["announce"],
    }
    where = {"key_request": (ch.negotiate, "proxy"), "key_grant": (temp.encode("ascii"), "forwarder"),
             "announce": (ch.announce, "forwarder")}
    for name, message in (("key_request", request), ("key_grant", grant), ("announce", announce)):
        channel, signer = where[name]
        signature = _signature(previous, name, private[signer], transcripts[name])
        out[name] = _signed(_jsonable(message), bodies[name], channel.decode("ascii"), transcripts[name],
                            signer, signature)
    return out


# --- the file ------------------------------------------------------------------------------------


def build(previous: dict[str, Any] | None) -> dict[str, Any]:
    """Every vector of the current version, reusing ``previous``'s random RSA material
    (its keys; its signatures and wrapped secret where they still verify or unwrap)."""
    assert all(int(ms / 1000 * 1000) == ms for ms in (ANNOUNCE_MS, REQUEST_MS, GRANT_MS))
    rsa_out, private = rsa_section(previous)
    names = channel_names(NAMESPACE)
    kdf = kdf_section()
    return {
        "version": wire.VERSION,
        "comment": COMMENT.format(v=wire.VERSION, bits=RSA_BITS),
        "constants": constants(),
        "rsa": rsa_out,
        "channels": [names, channel_names(OTHER_NAMESPACE)],
        "kdf": kdf,
        "session": session_section(names, kdf),
        "negotiation": negotiation_section(previous, names, kdf, private),
    }


def path_for(version: int) -> Path:
    return HERE / f"vectors_v{version}.json"


def newest_older(version: int) -> dict[str, Any] | None:
    """The file of the newest earlier version, whose RSA keys a new version's file reuses."""
    for older in range(version - 1, 0, -1):
        if path_for(older).exists():
            loaded: dict[str, Any] = json.loads(path_for(older).read_text("utf-8"))
            return loaded
    return None


def dumps(vectors: dict[str, Any]) -> str:
    return json.dumps(vectors, indent=1) + "\n"


def differences(old: Any, new: Any, where: str = "") -> list[str]:
    """The JSON paths at which two decoded files differ."""
    if isinstance(old, dict) and isinstance(new, dict):
        return [d for k in sorted(set(old) | set(new), key=str)
                for d in differences(old.get(k), new.get(k), f"{where}/{k}")]
    if isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
        return [d for i, (a, b) in enumerate(zip(old, new)) for d in differences(a, b, f"{where}/{i}")]
    return [] if old == new else [where or "/"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--force", action="store_true", help="overwrite a file whose vectors changed")
    args = parser.parse_args(argv)
    path = path_for(wire.VERSION)
    previous = json.loads(path.read_text("utf-8")) if path.exists() else None
    text = dumps(build(previous or newest_older(wire.VERSION)))
    if previous is not None and path.read_text("utf-8") == text:
        print(f"{path}: up to date")
        return 0
    if previous is not None and not args.force:
        changed = differences(previous, json.loads(text))
        print(f"{path}: the code no longer produces these vectors of version {wire.VERSION}; changed:",
              *changed[:40], sep="\n  ", file=sys.stderr)
        print("A released version's vectors are frozen: a new wire format is a new version (see "
              "docs/PROTOCOL.md section 11). Use --force only for a version not yet released.", file=sys.stderr)
        return 1
    path.write_text(text, "utf-8")
    print(f"{path}: written")
    return 0


if __name__ == "__main__":
    sys.exit(main())
