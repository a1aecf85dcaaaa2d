"""Step 2 of the method, both sides, without I/O: key negotiation over pub/sub.

1. The proxy makes an ephemeral X25519 key and a temporary channel, subscribes to it, and
   publishes a :class:`~ppbridge.wire.KeyRequest` on ``ns:negotiate``, signed with its RSA key.
2. Each forwarder verifies the signature against that proxy's pinned public key, the clock
   skew and that the nonce is new; it makes a random 32-byte secret, wraps it with the proxy's
   public key (RSA-OAEP-SHA256), makes its own ephemeral X25519 key and publishes a
   :class:`~ppbridge.wire.KeyGrant` on the temporary channel, signed with its signing key over
   the request's nonce, channel, proxy identity and ephemeral key (so a grant cannot be
   replayed to another request or proxy).
3. The proxy verifies the grant with the pinned forwarder key, unwraps the secret and derives
   the two direction keys with HKDF over secret || X25519 shared secret (forward secrecy:
   the ephemeral private keys are forgotten when the request expires). It then sends an AEAD
   ``CONFIRM`` under the new key, and only a confirmed key is used by the forwarder to send
   requests.

Both sides hold keys in memory only. Callers pass ``now`` (seconds since the epoch).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from functools import cached_property
from typing import Mapping

from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey

from ppbridge import keys
from ppbridge.channels import Channels
from ppbridge.envelope import Envelope, derive_keys
from ppbridge.errors import BusMessageError
from ppbridge.wire import (
    ID_SIZE,
    NONCE_SIZE,
    Announce,
    KeyGrant,
    KeyRequest,
    Role,
    decode_signed,
    encode_signed,
)

LABEL_REQUEST = b"ppbridge v3 key-request\0"
LABEL_GRANT = b"ppbridge v3 key-grant\0"
LABEL_ANNOUNCE = b"ppbridge v3 announce\0"
ANY_FORWARDER = bytes(ID_SIZE)
SECRET_SIZE = 32
PENDING_LIFETIME = 10.0  # how long a request accepts grants (several forwarders may answer)
ANSWER_WAIT = 3.0  # how long an unanswered request holds back the same request again
MIN_LIFETIME_MS = 1000  # a key lives at least this long, whatever a request asks


def _raw_public(key: X25519PrivateKey) -> bytes:
    return key.public_key().public_bytes_raw()


def _ms(now: float) -> int:
    return int(now * 1000)


def _check_skew(timestamp_ms: int, now: float, skew: float) -> None:
    if abs(timestamp_ms - _ms(now)) > skew * 1000:
        raise BusMessageError("stale", "timestamp outside max_clock_skew")


def _grant_signed_data(channel: bytes, request: KeyRequest, body: bytes) -> bytes:
    return LABEL_GRANT + channel + b"\0" + request.proxy.encode("ascii") + request.instance + request.ephemeral + body


@dataclass(frozen=True)
class NewSession:
    """A negotiated key, ready for use by the side that produced it."""

    proxy: str
    instance: bytes  # the proxy process
    forwarder: bytes  # the forwarder process
    envelope: Envelope
    frame_size: int  # largest bus message either side sends: the smaller of the two limits
    peer_window: int  # bytes per stream the peer lets us send before it grants more
    lifetime: float = 86400.0  # hard limit: seconds after which neither side seals or opens under it
    max_messages: int = 1_000_000  # hard limit: messages (both directions) it may protect
    # On a proxy: an upper bound of (forwarder clock - our clock), from the grant's signed
    # timestamp and the time we sent the request; request deadlines are checked with it.
    clock_ahead: float = 0.0
    announce_interval: float = 15.0  # how often the forwarder announces itself

    @cached_property
    def proxy_peer(self) -> bytes:
        """The forwarder's name for the proxy process of this key: its name *and* instance
        (an instance id is bound to the name that negotiated it; see Keyring). Formatted once
        per session: the forwarder asks it about twice per request."""
        return proxy_peer(self.proxy, self.instance)


def proxy_peer(name: str, instance: bytes) -> bytes:
    """``name:instance-hex``: one proxy process, as the forwarder files its keys."""
    return b"%s:%s" % (name.encode("ascii"), instance.hex().encode("ascii"))


@dataclass
class _Pending:
    request: KeyRequest
    ephemeral: X25519PrivateKey
    sent: float
    granted_by: set[bytes] = field(default_factory=set)

    @property
    def expires(self) -> float:
        return self.sent + PENDING_LIFETIME


class ProxyNegotiator:
    """The proxy's half: signed requests out, verified grants in, announcements checked."""

    def __init__(
        self,
        name: str,
        instance: bytes,
        private_key: rsa.RSAPrivateKey,
        forwarder_key: rsa.RSAPublicKey,
        channels: Channels,
        frame_size: int,
        window: int,
        max_clock_skew: float,
        lifetime: float = 86400.0,
        max_messages: int = 1_000_000,
    ) -> None:
        self.name = name
        self._lifetime = lifetime
        self._max_messages = max_messages
        self.instance = instance
        self._private = private_key
        self._forwarder_key = forwarder_key
        self._channels = channels
        self._frame_size = frame_size
        self._window = window
        self._skew = max_clock_skew
        self._pending: dict[bytes, _Pending] = {}

    def set_limits(self, lifetime: float, max_messages: int) -> None:
        """The lifetime and message budget asked for from the next key request on (a reload)."""
        self._lifetime = lifetime
        self._max_messages = max_messages

    def make_request(self, now: float, target: bytes = ANY_FORWARDER) -> tuple[bytes, bytes]:
        """(temporary channel to subscribe to *before* publishing, signed request to publish)."""
        ephemeral = X25519PrivateKey.generate()
        channel = self._channels.negotiation_temp(self.name)
        request = KeyRequest(
            self.name, self.instance, channel, os.urandom(NONCE_SIZE), _ms(now), _raw_public(ephemeral),
            self._frame_size, self._window, target, int(self._lifetime * 1000), self._max_messages,
        )
        body = request.encode_body()
        signature = keys.sign(self._private, LABEL_REQUEST + self._channels.negotiate + body)
        self._pending[channel] = _Pending(request, ephemeral, now)
        return channel, encode_signed(body, signature)

    def handle_grant(self, channel: bytes, data: bytes, now: float) -> NewSession:
        """Verify a grant that arrived on ``channel`` and derive the session it carries."""
        pending = self._pending.get(channel)
        if pending is None or pending.expires < now:
            raise BusMessageError("unexpected-grant", "no pending request on this channel")
        grant, body, signature = decode_signed(data, KeyGrant)
        if grant.request_nonce != pending.request.nonce:
            raise BusMessageError("unexpected-grant", "grant for another request")
        if not keys.verify(self._forwarder_key, signature, _grant_signed_data(channel, pending.request, body)):
            raise BusMessageError("bad-signature", "grant not signed by the pinned forwarder key")
        if grant.forwarder in pending.granted_by:
            raise BusMessageError("replay", "second grant from one forwarder")
        secret = keys.unwrap(self._private, grant.wrapped)
        if secret is None or len(secret) != SECRET_SIZE:
            raise BusMessageError("bad-wrap", "wrapped secret does not open with our key")
        try:
            shared = pending.ephemeral.exchange(X25519PublicKey.from_public_bytes(grant.ephemeral))
        except ValueError:
            raise BusMessageError("bad-ephemeral", "unusable X25519 key") from None
        pending.granted_by.add(grant.forwarder)
        envelope = Envelope(grant.key_id, derive_keys(secret, shared, pending.request.nonce + grant.key_id), Role.PROXY)
        frame = min(self._frame_size, grant.frame_size)
        # The forwarder signed its timestamp after we sent the request, so its clock is at
        # most this far ahead of ours (the +1 ms covers the timestamp's truncation).
        ahead = grant.timestamp_ms / 1000 + 0.001 - pending.sent
        lifetime = min(self._lifetime, grant.lifetime_ms / 1000)
        messages = min(self._max_messages, grant.max_messages)
        return NewSession(self.name, self.instance, grant.forwarder, envelope, frame, grant.window, lifetime,
                          messages, ahead, grant.announce_ms / 1000)

    def expire(self, now: float) -> list[bytes]:
        """Forget requests past their lifetime (and their ephemeral keys); their channels."""
        gone = [ch for ch, p in self._pending.items() if p.expires < now]
        for ch in gone:
            del self._pending[ch]
        return gone

    def is_pending(self, channel: bytes) -> bool:
        return channel in self._pending

    def unanswered_targets(self, now: float) -> set[bytes]:
        """Forwarder ids (or ANY_FORWARDER) with a request out for less than ANSWER_WAIT
        seconds and no grant yet: asking them again now would only duplicate it."""
        return {
            p.request.target for p in self._pending.values()
            if not p.granted_by and now - p.sent < ANSWER_WAIT
        }

    def verify_announce(self, data: bytes, now: float) -> Announce:
        """A valid, fresh announcement."""
        announce, body, signature = decode_signed(data, Announce)
        _check_skew(announce.timestamp_ms, now, self._skew)
        if not keys.verify(self._forwarder_key, signature, LABEL_ANNOUNCE + self._channels.announce + body):
            raise BusMessageError("bad-signature", "announcement not signed by the pinned forwarder key")
        return announce


class ForwarderNegotiator:
    """The forwarder's half: verified requests in, signed grants out, announcements made."""

    def __init__(
        self,
        forwarder: bytes,
        signing_key: rsa.RSAPrivateKey,
        proxy_keys: Mapping[str, rsa.RSAPublicKey],
        channels: Channels,
        frame_size: int,
        window: int,
        max_clock_skew: float,
        max_lifetime: float = 86400.0,
        announce_interval: float = 15.0,
    ) -> None:
        self.forwarder = forwarder
        self._max_lifetime = max_lifetime
        self._announce_interval = announce_interval
        self._signing_key = signing_key
        self._proxy_keys = proxy_keys
        self._channels = channels
        self._frame_size = frame_size
        self._window = window
        self._skew = max_clock_skew
        self._seen: dict[bytes, float] = {}

    def set_proxy_keys(self, proxy_keys: Mapping[str, rsa.RSAPublicKey]) -> None:
        """Replace the proxy names and public keys key requests are checked against (a reload)."""
        self._proxy_keys = dict(proxy_keys)

    def handle_request(self, data: bytes, now: float) -> tuple[bytes, bytes, NewSession] | None:
        """Verify a key request; (channel to publish on, signed grant, the new session), or
        None for a request addressed to another forwarder."""
        request, body, signature = decode_signed(data, KeyRequest)
        if request.target not in (ANY_FORWARDER, self.forwarder):
            return None
        public = self._proxy_keys.get(request.proxy)
        if public is None:
            raise BusMessageError("unknown-proxy", f"no public key for proxy {request.proxy!r}")
        owner = self._channels.negotiation_owner(request.reply_channel)
        if owner is None:
            raise BusMessageError("malformed", "reply channel outside the negotiation namespace")
        if owner != request.proxy:
            # A grant there would land on another proxy's channel (and its ACL user's only).
            raise BusMessageError("bad-reply-channel", f"proxy {request.proxy!r} asked for a grant on a channel "
                                                       f"of proxy {owner!r}")
        _check_skew(request.timestamp_ms, now, self._skew)
        if request.nonce in self._seen:  # before the (costlier) signature check
            raise BusMessageError("replay", "key request seen before")
        if not keys.verify(public, signature, LABEL_REQUEST + self._channels.negotiate + body):
            raise BusMessageError("bad-signature", f"key request not signed by proxy {request.proxy!r}")
        self._remember(request.nonce, now)
        return self._grant(request, public, now)

    def _remember(self, nonce: bytes, now: float) -> None:
        for old in [n for n, t in self._seen.items() if t < now - 2 * self._skew]:
            del self._seen[old]
        self._seen[nonce] = now

    def _grant(self, request: KeyRequest, public: rsa.RSAPublicKey, now: float) -> tuple[bytes, bytes, NewSession]:
        secret = os.urandom(SECRET_SIZE)
        ephemeral = X25519PrivateKey.generate()
        try:
            shared = ephemeral.exchange(X25519PublicKey.from_public_bytes(request.ephemeral))
        except ValueError:
            raise BusMessageError("bad-ephemeral", "unusable X25519 key") from None
        key_id = os.urandom(ID_SIZE)
        lifetime_ms = max(MIN_LIFETIME_MS, min(request.lifetime_ms, int(self._max_lifetime * 1000)))
        messages = max(1, request.max_messages)
        grant = KeyGrant(
            self.forwarder, request.nonce, key_id, keys.wrap(public, secret), _raw_public(ephemeral),
            self._frame_size, self._window, _ms(now), lifetime_ms, messages, int(self._announce_interval * 1000),
        )
        body = grant.encode_body()
        signature = keys.sign(self._signing_key, _grant_signed_data(request.reply_channel, request, body))
        envelope = Envelope(key_id, derive_keys(secret, shared, request.nonce + key_id), Role.FORWARDER)
        frame = min(self._frame_size, request.frame_size)
        session = NewSession(request.proxy, request.instance, self.forwarder, envelope, frame, request.window,
                             lifetime_ms / 1000, messages, 0.0, self._announce_interval)
        return request.reply_channel, encode_signed(body, signature), session

    def announce(self, now: float) -> bytes:
        """A signed announcement of this forwarder, for ``ns:announce``."""
        body = Announce(self.forwarder, os.urandom(NONCE_SIZE), _ms(now),
                        int(self._announce_interval * 1000)).encode_body()
        return encode_signed(body, keys.sign(self._signing_key, LABEL_ANNOUNCE + self._channels.announce + body))
