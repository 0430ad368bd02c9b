"""The login registry: keyed by uid and audit session, expiring with the token, bounded."""

from __future__ import annotations

import pytest

from agent.identity.registry import LoginRegistry, RegistryFull
from tests.unit.identity.test_findings import token


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def test_lookup_is_exact_on_uid_and_session() -> None:
    """A registration answers only its own uid and audit session."""
    registry = LoginRegistry()
    t = token()
    registry.register(1000, 7, 55, t)
    found = registry.lookup(1000, 7)
    assert found is not None and found.token == t and found.pid == 55
    assert registry.lookup(1000, 8) is None
    assert registry.lookup(1001, 7) is None
    assert registry.lookup(1000, None) is None


def test_expiry() -> None:
    """A registration disappears when its token expires."""
    clock = Clock()
    registry = LoginRegistry(clock=clock)
    registry.register(1000, 7, 55, token(exp=int(clock.now) + 60))
    assert registry.lookup(1000, 7) is not None
    clock.now += 61
    assert registry.lookup(1000, 7) is None
    assert len(registry) == 0


def test_purge_and_relogin() -> None:
    """purge_expired drops only expired entries; a new login replaces the old one."""
    clock = Clock()
    registry = LoginRegistry(clock=clock)
    registry.register(1000, 1, 1, token(exp=int(clock.now) + 10))
    registry.register(1000, 2, 2, token(exp=int(clock.now) + 100))
    clock.now += 20
    assert registry.purge_expired() == 1
    registry.register(1000, 2, 3, token("bob", exp=int(clock.now) + 100))
    found = registry.lookup(1000, 2)
    assert found is not None and found.token.subject == "bob" and len(registry) == 1


def test_remove() -> None:
    """remove forgets one session's registration and returns it."""
    registry = LoginRegistry()
    registry.register(1000, 7, 55, token())
    assert registry.remove(1000, 7) is not None
    assert registry.remove(1000, 7) is None
    assert registry.lookup(1000, 7) is None


def test_bounded_per_uid_and_in_total() -> None:
    """One uid cannot fill the registry; the total is capped too."""
    registry = LoginRegistry(max_per_uid=2, max_total=3)
    registry.register(1000, 1, 1, token())
    registry.register(1000, 2, 1, token())
    registry.register(1000, 2, 1, token())  # replacing is always allowed
    with pytest.raises(RegistryFull, match="uid 1000 has 2 logins"):
        registry.register(1000, 3, 1, token())
    registry.register(1001, 1, 1, token())
    with pytest.raises(RegistryFull, match="full"):
        registry.register(1002, 1, 1, token())


def test_registrations_of_a_token() -> None:
    """The same token (by hash, or by issuer and jti) is found wherever it was registered."""
    registry = LoginRegistry()
    t = token()
    registry.register(1000, 7, 55, t)
    registry.register(1001, 9, 56, token("bob", jti="other", token_sha256="cd" * 32))
    assert [r.uid for r in registry.registrations_of(t)] == [1000]
    same_jti = token(token_sha256="ef" * 32)
    assert [r.uid for r in registry.registrations_of(same_jti)] == [1000]
    assert registry.registrations_of(token(jti=None, token_sha256="00" * 32)) == ()
