"""agent/claim.py: one agent a network namespace, claimed by an abstract Unix socket."""

from __future__ import annotations

import os

import pytest

from agent.claim import Claimed, answer, claim, holder, refusal


@pytest.fixture
def name() -> bytes:
    return f"\0ringfence-test/{os.getpid()}/{id(object())}".encode()


def test_a_second_claim_is_refused_naming_the_holder(name: bytes) -> None:
    first = claim(name)
    try:
        with pytest.raises(Claimed) as refused:
            claim(name)
        assert f"another ringfence agent (pid {os.getpid()}) is running in this network " \
               "namespace" in str(refused.value)
        assert "stop it first" in str(refused.value)
    finally:
        first.close()
    claim(name).close()  # released with its socket: nothing left to go stale


def test_holder_names_the_running_agent_until_it_ends(name: bytes) -> None:
    assert holder(name) is None
    assert refusal("remove its redirect rules", name) is None
    claimed = claim(name)
    try:
        for _ in range(50):  # more askers than the listener's queue holds, each answered
            assert holder(name) == os.getpid()
            answer(claimed)
        why = refusal("remove its redirect rules", name)
        assert why is not None
        assert f"(pid {os.getpid()})" in why and "stop it before you remove its redirect rules" in why
    finally:
        claimed.close()
    assert holder(name) is None
