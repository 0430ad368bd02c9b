"""Hot reload: a changed file takes effect, a broken one leaves the old policy."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from policy import PolicyError, PolicyHolder, Resource, Subject

WHO = Subject(subject="bob", identified=True)
PG = Resource("postgres")
ALLOW_ALL = '[[rule]]\nid = "all"\neffect = "allow"\n'
BLOCK_SELECT = ALLOW_ALL + '[[rule]]\nid = "no-select"\neffect = "block"\nkinds = ["SELECT"]\n'


def _write(path: Path, text: str, bump: int) -> None:
    path.write_text(text)
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + bump * 1_000_000_000))


def test_change_is_picked_up_by_maybe_reload(tmp_path: Path) -> None:
    """After the file changes, the next statement is judged by the new policy."""
    f = tmp_path / "policy.toml"
    _write(f, ALLOW_ALL, 0)
    holder = PolicyHolder(f)
    assert holder.maybe_reload() is None
    assert holder.current.statement(WHO, PG, "SELECT 1").allowed
    _write(f, BLOCK_SELECT, 1)
    ok, message = holder.maybe_reload() or (False, "")
    assert ok and "reloaded" in message
    assert holder.current.statement(WHO, PG, "SELECT 1").rule_id == "no-select"


def test_broken_file_keeps_old_policy(tmp_path: Path) -> None:
    """A syntax error is reported with its line and the previous policy stays in force."""
    f = tmp_path / "policy.toml"
    _write(f, BLOCK_SELECT, 0)
    holder = PolicyHolder(f)
    version = holder.version
    _write(f, ALLOW_ALL + "[[rule]\n", 1)
    ok, message = holder.reload()
    assert not ok and f"{f}:4:" in message and holder.last_error
    assert holder.version == version
    assert holder.current.statement(WHO, PG, "SELECT 1").blocked


def test_missing_file_keeps_old_policy(tmp_path: Path) -> None:
    """A deleted policy file is an error on reload, not an empty policy."""
    f = tmp_path / "policy.toml"
    _write(f, BLOCK_SELECT, 0)
    holder = PolicyHolder(f)
    f.unlink()
    result = holder.maybe_reload()
    assert result is not None and not result[0]
    assert holder.current.statement(WHO, PG, "SELECT 1").blocked


def test_first_load_failure_raises(tmp_path: Path) -> None:
    """The agent cannot start on a broken policy (fail closed)."""
    f = tmp_path / "policy.toml"
    f.write_text('[[rule]]\nid = "x"\neffect = "maybe"\n')
    with pytest.raises(PolicyError):
        PolicyHolder(f)
