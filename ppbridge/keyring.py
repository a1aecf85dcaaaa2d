"""Which session keys are live, without I/O.

A peer is the other process: a proxy instance (on the forwarder) or a forwarder (on a proxy).
Each peer has at most one *current* key, used to seal; when a newer key is confirmed the old
one keeps opening messages for a grace window, so requests and streams that span a rotation
complete (step 3). Unconfirmed keys open messages (a proxy may answer under a key before its
confirmation is processed) but are never chosen to seal.

Every key also has a hard limit, agreed in the negotiation: past its lifetime or its message
budget it neither seals nor opens anything, current or not, so traffic fails closed when a
rotation cannot complete.

On the forwarder a peer is ``name:instance`` (:func:`~ppbridge.negotiation.proxy_peer`): keys,
routes and replies are bound to the name that negotiated them, never to an instance id alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from ppbridge.negotiation import PENDING_LIFETIME, NewSession
from ppbridge.wire import Role


@dataclass
class KeyEntry:
    """A session key and its life."""

    session: NewSession
    created: float
    confirmed: bool = False
    retire_at: float | None = None

    @property
    def key_id(self) -> bytes:
        return self.session.envelope.key_id

    def expired(self, now: float) -> bool:
        """Past its hard lifetime or message budget: it may neither seal nor open."""
        s = self.session
        return now >= self.created + s.lifetime or s.envelope.messages >= s.max_messages


@dataclass
class PeerStats:
    """What /status shows about one peer."""

    rotations: int = 0
    current_since: float = 0.0
    period: float | None = None  # seconds between the last two keys


class Keyring:
    """Session keys by key id, the current one per peer, and retirement."""

    def __init__(self, grace: float, now: Callable[[], float]) -> None:
        self.grace = grace
        self._now = now
        self._by_id: dict[bytes, KeyEntry] = {}
        self._current: dict[bytes, KeyEntry] = {}
        self.stats: dict[bytes, PeerStats] = {}

    def add(self, session: NewSession, peer: bytes, now: float, confirmed: bool) -> KeyEntry:
        """Register a freshly negotiated key; confirmed keys become current at once."""
        entry = KeyEntry(session, now)
        self._by_id[entry.key_id] = entry
        if confirmed:
            self._make_current(entry, peer, now)
        return entry

    def confirm(self, key_id: bytes, peer: bytes, now: float) -> bool:
        """Mark a key confirmed and current for ``peer``; False when it is unknown, already
        done, or its confirmation came later than PENDING_LIFETIME after the grant."""
        entry = self._by_id.get(key_id)
        if entry is None or entry.confirmed or entry.created + PENDING_LIFETIME < now:
            return False
        self._make_current(entry, peer, now)
        return True

    def _make_current(self, entry: KeyEntry, peer: bytes, now: float) -> None:
        entry.confirmed = True
        old = self._current.get(peer)
        if old is not None and old is not entry:
            old.retire_at = now + self.grace
        self._current[peer] = entry
        stats = self.stats.setdefault(peer, PeerStats())
        if old is not None:
            stats.rotations += 1
            stats.period = now - stats.current_since
        stats.current_since = now

    def get(self, key_id: bytes, now: float) -> KeyEntry | None:
        """The entry that may open a message under ``key_id`` now, if any."""
        entry = self._by_id.get(key_id)
        if entry is None:
            return None
        if entry.retire_at is not None and entry.retire_at <= now:
            del self._by_id[key_id]
            return None
        return entry

    def current(self, peer: bytes) -> KeyEntry | None:
        """The key to seal with for ``peer``: confirmed, newest, within its hard limits."""
        entry = self._current.get(peer)
        if entry is None or entry.expired(self._now()):
            return None
        return entry

    def peers(self) -> list[bytes]:
        """Peers holding a usable current key."""
        now = self._now()
        return [p for p, e in self._current.items() if not e.expired(now)]

    def drop_peer(self, peer: bytes) -> None:
        """Forget every key of a peer that is gone (a proxy instance that no longer listens)."""
        self._current.pop(peer, None)
        self.stats.pop(peer, None)
        for key_id in [k for k, e in self._by_id.items() if self._peer_of(e) == peer]:
            del self._by_id[key_id]

    @staticmethod
    def _peer_of(entry: KeyEntry) -> bytes:
        s = entry.session
        return s.proxy_peer if s.envelope.role is Role.FORWARDER else s.forwarder

    def expire(self, now: float) -> int:
        """Drop retired keys, keys past their hard limits and confirmations that never came;
        how many were dropped."""
        dead = [
            k for k, e in self._by_id.items()
            if (e.retire_at is not None and e.retire_at <= now) or e.expired(now)
            or (not e.confirmed and e.created + PENDING_LIFETIME < now)
        ]
        for key_id in dead:
            del self._by_id[key_id]
        for peer in [p for p, e in self._current.items() if e.expired(now)]:
            del self._current[peer]
        return len(dead)

    def __len__(self) -> int:
        return len(self._by_id)
