"""The login registry: tokens registered with ``ringfence login``, keyed by the
caller's uid and audit session, each until its token expires.

A connection whose process has the same uid and audit session speaks for the
registered token's subject. Bounded per uid and in total, since any local user
may register (for themselves only).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from agent.identity import IdentityError
from agent.identity.tokens import VerifiedToken

MAX_PER_UID = 16
MAX_TOTAL = 4096


class RegistryFull(IdentityError):
    """Too many registrations (for this uid or in total)."""


@dataclass(frozen=True, slots=True)
class Registration:
    """A token registered by a uid from an audit session (None: the caller had none)."""

    uid: int
    audit_session: int | None
    pid: int
    token: VerifiedToken
    registered_at: float

    @property
    def key(self) -> tuple[int, int | None]:
        return (self.uid, self.audit_session)

    def to_record(self) -> dict[str, Any]:
        return {
            "uid": self.uid,
            "audit_session": self.audit_session,
            "pid": self.pid,
            "registered_at": self.registered_at,
            **self.token.to_record(),
        }


class LoginRegistry:
    """Registrations by (uid, audit session); expired ones vanish on access. Thread-safe."""

    def __init__(
        self,
        *,
        clock: Callable[[], float] = time.time,
        max_per_uid: int = MAX_PER_UID,
        max_total: int = MAX_TOTAL,
    ) -> None:
        self._clock = clock
        self._max_per_uid = max_per_uid
        self._max_total = max_total
        self._lock = threading.Lock()
        self._entries: dict[tuple[int, int | None], Registration] = {}

    def __len__(self) -> int:
        with self._lock:
            self._purge_locked()
            return len(self._entries)

    def _purge_locked(self) -> int:
        now = self._clock()
        stale = [k for k, r in self._entries.items() if r.token.exp <= now]
        for k in stale:
            del self._entries[k]
        return len(stale)

    def purge_expired(self) -> int:
        """Drop expired registrations; how many were dropped."""
        with self._lock:
            return self._purge_locked()

    def register(self, uid: int, audit_session: int | None, pid: int, token: VerifiedToken) -> Registration:
        """Register (or replace) the token for this uid and audit session."""
        with self._lock:
            self._purge_locked()
            key = (uid, audit_session)
            if key not in self._entries:
                if sum(1 for k in self._entries if k[0] == uid) >= self._max_per_uid:
                    raise RegistryFull(
                        f"uid {uid} has {self._max_per_uid} logins registered; "
                        "run `ringfence logout` in a session you no longer use"
                    )
                if len(self._entries) >= self._max_total:
                    raise RegistryFull("the agent's login registry is full; try again later")
            registration = Registration(uid, audit_session, pid, token, self._clock())
            self._entries[key] = registration
            return registration

    def lookup(self, uid: int, audit_session: int | None) -> Registration | None:
        """The live registration for exactly this uid and audit session."""
        with self._lock:
            registration = self._entries.get((uid, audit_session))
            if registration is None:
                return None
            if registration.token.exp <= self._clock():
                del self._entries[(uid, audit_session)]
                return None
            return registration

    def remove(self, uid: int, audit_session: int | None) -> Registration | None:
        """Forget the registration of this uid and audit session; the removed one, if any."""
        with self._lock:
            return self._entries.pop((uid, audit_session), None)

    def registrations_of(self, token: VerifiedToken) -> tuple[Registration, ...]:
        """Live registrations of the same token (same hash, or same issuer and jti)."""
        with self._lock:
            self._purge_locked()
            return tuple(
                r
                for r in self._entries.values()
                if r.token.token_sha256 == token.token_sha256
                or (token.jti is not None and r.token.jti == token.jti and r.token.issuer == token.issuer)
            )
