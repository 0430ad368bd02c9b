"""What the packages rely on: doctor's state and key checks, and `ringfence cleanup`."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.config import AgentSettings, AuditSettings, Config
from agent.doctor import _audit_key_check, _state_dir_check, collect_checks
from tests.conftest import ROOT, require
from tests.support.netns import NetNS, netns


@pytest.fixture(autouse=True)
def _root() -> None:
    require(os.geteuid() == 0, "root")


def _config(state: Path, key_path: Path | None = None) -> Config:
    return Config(
        agent=AgentSettings(state_dir=state),
        audit=AuditSettings(path=state / "audit", key_path=key_path),
    )


def test_state_dir_missing_is_fine_and_0755_fails_with_the_fix(tmp_path: Path) -> None:
    """A missing state directory passes; 0755 fails and says chmod 0700."""
    state = tmp_path / "state"
    assert _state_dir_check(_config(state)).ok
    state.mkdir(mode=0o755)
    state.chmod(0o755)
    check = _state_dir_check(_config(state))
    assert not check.ok and "0755" in check.detail
    assert check.fix is not None and f"chmod 0700 {state}" in check.fix
    state.chmod(0o700)
    assert _state_dir_check(_config(state)).ok


def test_audit_key_must_be_root_only(tmp_path: Path) -> None:
    """<state_dir>/audit.key, or [audit] key_path, must be 0600: missing passes, 0644 fails."""
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    key = state / "audit.key"
    assert _audit_key_check(_config(state)).ok
    key.write_bytes(b"k")
    key.chmod(0o644)
    check = _audit_key_check(_config(state))
    assert not check.ok and "0644" in check.detail and check.fix and "chmod 0600" in check.fix
    key.chmod(0o600)
    assert _audit_key_check(_config(state)).ok
    elsewhere = tmp_path / "elsewhere.key"
    elsewhere.write_bytes(b"k")
    elsewhere.chmod(0o640)
    assert not _audit_key_check(_config(state, key_path=elsewhere)).ok


def test_doctor_never_creates_the_state_directory(tmp_path: Path) -> None:
    """The BPF compile check merges headers in a scratch directory, not in a missing state dir."""
    state = tmp_path / "state"
    toml = tmp_path / "ringfence.toml"
    toml.write_text(f'[agent]\nstate_dir = "{state}"\n[audit]\npath = "{state / "audit"}"\n'
                    f'[bpf]\nmode = "auto"\n[policy]\npath = "{ROOT / "packaging" / "policy.toml"}"\n')
    names = [check.name for check, _ in collect_checks(str(toml))]
    assert "state directory" in names and "audit key" in names
    assert not state.exists()


@pytest.fixture
def ns() -> Iterator[NetNS]:
    with netns("rfclean") as n:
        yield n


def _cleanup(ns: NetNS, config: Path) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run(ns.argv([sys.executable, "-m", "agent.cli", "cleanup", "--config", str(config)]),
                          env=env, capture_output=True, text=True, timeout=120, check=False)


def _chains(ns: NetNS) -> str:
    return ns.run(["iptables-save", "-t", "nat"]).stdout


@pytest.mark.parametrize("fail_closed", [False, True])
def test_cleanup_honours_fail_closed(ns: NetNS, tmp_path: Path, fail_closed: bool) -> None:
    """`ringfence cleanup` (the unit's ExecStopPost) removes a dead agent's rules unless fail_closed."""
    ns.run(["iptables-restore", "-w", "--noflush"], input=(
        "*nat\n:RINGFENCE_OUTPUT - [0:0]\n-I OUTPUT 1 -j RINGFENCE_OUTPUT\n"
        "-A RINGFENCE_OUTPUT -p tcp --dport 5432 -j REDIRECT --to-ports 15432\nCOMMIT\n"))
    config = tmp_path / "ringfence.toml"
    flag = str(fail_closed).lower()
    config.write_text(f'[agent]\nstate_dir = "{tmp_path / "state"}"\nfail_closed = {flag}\n')
    done = _cleanup(ns, config)
    assert done.returncode == 0, done.stderr
    if fail_closed:
        assert "RINGFENCE_OUTPUT" in _chains(ns)
        assert "redirect rules kept" in done.stdout
    else:
        assert "RINGFENCE" not in _chains(ns)
        assert "removed 1 ringfence chain(s)" in done.stdout
    assert "detached 0 ringfence BPF program(s)" in done.stdout
