"""AES-256-GCM envelopes for every session message.

A session (one negotiated key id) has two keys, one per direction, derived with HKDF from the
RSA-wrapped secret and the ephemeral X25519 secret (so a message reflected back to its sender
fails to open, and later theft of the RSA keys opens nothing recorded).

Each sealed message is ``header || AES-GCM(ciphertext || tag)`` where the associated data is
the 40-byte cleartext header *and the channel it is published on*, so a message moved to
another channel fails to open. The nonce is the sender's message counter (never repeated
under one key; keys are never persisted, so a counter never restarts under a live key). The
receiver accepts only strictly increasing counters: Redis delivers one publisher's messages to
one subscriber in order, so anything else is a replay. Counters are also the message count that
the rekey policy caps.
"""

from __future__ import annotations

import hashlib

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from ppbridge.errors import BusMessageError
from ppbridge.freshbuf import AVAILABLE, FRESH_MIN, filled, fresh_bytearray, fresh_bytes
from ppbridge.wire import COUNTER_BYTES, HEADER_SIZE, OVERHEAD, TAG_SIZE, Header, MsgType, Role, pack_header

KEY_SIZE = 32
_LABELS = {Role.FORWARDER: b"ppbridge v3 forwarder->proxy", Role.PROXY: b"ppbridge v3 proxy->forwarder"}
MAX_COUNTER = (1 << 64) - 1


def derive_keys(secret: bytes, shared: bytes, salt: bytes) -> dict[Role, bytes]:
    """One AES-256 key per sending role, from the wrapped secret and the X25519 shared secret."""
    return {
        role: HKDF(algorithm=hashes.SHA256(), length=KEY_SIZE, salt=salt, info=label).derive(secret + shared)
        for role, label in _LABELS.items()
    }


def _nonce_prefix(role: Role) -> bytes:
    """A nonce is the sender's role byte, three zero bytes, then its counter as 8 big-endian
    bytes: those are in the header already (``COUNTER_BYTES``), so they are sliced from it."""
    return bytes((role, 0, 0, 0))


class Envelope:
    """Seals and opens the session messages of one key id, as seen by ``role``.

    Owns the per-direction counters: ``sent`` (the next counter to use) and ``last_received``.
    """

    __slots__ = ("key_id", "role", "peer_role", "fingerprint", "_seal", "_open", "_seal_prefix", "_open_prefix", "sent",
                 "last_received", "received")

    def __init__(self, key_id: bytes, keys: dict[Role, bytes], role: Role) -> None:
        self.key_id = key_id
        self.role = role
        self.peer_role = Role.PROXY if role is Role.FORWARDER else Role.FORWARDER
        # Safe to show: a hash of both keys identifies the session without revealing them.
        self.fingerprint = hashlib.sha256(b"ppbridge fingerprint" + keys[Role.FORWARDER] + keys[Role.PROXY]).hexdigest()[:16]
        self._seal = AESGCM(keys[role])
        self._open = AESGCM(keys[self.peer_role])
        self._seal_prefix, self._open_prefix = _nonce_prefix(role), _nonce_prefix(self.peer_role)
        self.sent = 0
        self.last_received = -1
        self.received = 0

    def seal(self, mtype: MsgType, stream_id: bytes, seq: int, channel: bytes, payload: bytes | memoryview,
             flags: int = 0) -> bytes | bytearray:
        """Encrypt ``payload`` for publication on ``channel``."""
        counter = self.sent
        if counter >= MAX_COUNTER:
            raise RuntimeError("message counter exhausted; the key must be rotated")
        self.sent = counter + 1
        header = pack_header(mtype, flags, self.role, self.key_id, counter, stream_id, seq)
        nonce, aad = self._seal_prefix + header[COUNTER_BYTES], header + channel
        if len(payload) < FRESH_MIN:  # a small message: the header joined to the cipher's own bytes
            return header + self._seal.encrypt(nonce, payload, aad)
        # Header and ciphertext in one buffer: a 256 KiB frame is not copied to prepend 40 bytes.
        # Not zero-filled first: the header and the cipher write every byte (ppbridge.freshbuf).
        message = fresh_bytearray(HEADER_SIZE + len(payload) + TAG_SIZE)
        message[:HEADER_SIZE] = header
        self._seal.encrypt_into(nonce, payload, aad, memoryview(message)[HEADER_SIZE:])
        return message

    def open(self, header: Header, data: bytes, channel: bytes) -> bytes:
        """Authenticate and decrypt a message whose header was parsed from ``data``.

        Raises BusMessageError for a message from the wrong role, a replayed or reordered
        counter, or any failed authentication (tampering, wrong key, wrong channel).
        """
        if header.sender is not self.peer_role:
            raise BusMessageError("wrong-direction", "message sealed by our own role")
        if header.counter <= self.last_received:
            raise BusMessageError("replay", f"counter {header.counter} after {self.last_received}")
        view = memoryview(data)
        nonce, aad = self._open_prefix + data[COUNTER_BYTES], data[:HEADER_SIZE] + channel
        try:
            if AVAILABLE and len(data) - OVERHEAD >= FRESH_MIN:
                plaintext = self._open_frame(nonce, view[HEADER_SIZE:], aad, len(data) - OVERHEAD)
            else:  # a small message (or one too short to hold a tag: it fails to authenticate),
                # or no freshbuf here (its fallback would decrypt into a bytearray and copy it)
                plaintext = self._open.decrypt(nonce, view[HEADER_SIZE:], aad)
        except InvalidTag:
            raise BusMessageError("bad-tag", "authentication failed") from None
        self.last_received = header.counter
        self.received += 1
        return plaintext

    def _open_frame(self, nonce: bytes, ciphertext: memoryview, aad: bytes, size: int) -> bytes:
        """Decrypt a frame into a buffer that is not zero-filled first (ppbridge.freshbuf); on
        a bad tag the buffer is dropped unread."""
        made, out = fresh_bytes(size)
        try:
            self._open.decrypt_into(nonce, ciphertext, aad, out)
        except BaseException:
            out.release()
            raise
        return filled(made, out)

    @property
    def messages(self) -> int:
        """Messages protected by this key so far, both directions."""
        return self.sent + self.received
