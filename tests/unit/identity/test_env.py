"""Tokens read from real processes' /proc/<pid>/environ, the process's own and its ancestors'."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.identity.env import find_env_token, read_env_var
from tests.support.procs import wait_until_running


def children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(x) for x in path.read_text().split()]


@pytest.fixture
def shell_with_child() -> Iterator[tuple[int, int]]:
    """A sh holding RINGFENCE_TOKEN whose child sleep runs without it."""
    env = {**os.environ, "RINGFENCE_TOKEN": "tok-from-parent", "OTHER": "x"}
    sh = subprocess.Popen(["sh", "-c", "env -u RINGFENCE_TOKEN sleep 30; true"], env=env)
    kids: list[int] = []
    try:
        for _ in range(200):
            kids = children(sh.pid)
            if kids and Path(f"/proc/{kids[0]}/comm").read_text().strip() == "sleep":
                break
            time.sleep(0.01)
        yield sh.pid, kids[0]
    finally:
        for pid in kids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        sh.kill()
        sh.wait()


def test_reads_the_process_environment() -> None:
    """The variable is read from a live child's /proc/<pid>/environ."""
    child = subprocess.Popen(["sleep", "30"], env={"RINGFENCE_TOKEN": "tok-own", "A": "1"})
    try:
        wait_until_running(child.pid, ["sleep", "30"])
        assert read_env_var(child.pid, "RINGFENCE_TOKEN") == "tok-own"
        assert read_env_var(child.pid, "MISSING") is None
        found = find_env_token({"pid": child.pid, "comm": "sleep"}, "RINGFENCE_TOKEN")
        assert found is not None and (found.value, found.pid, found.depth) == (
            "tok-own",
            child.pid,
            0,
        )
        assert "tok-own" not in repr(found)
    finally:
        child.kill()
        child.wait()


def test_walks_to_the_parent_through_proc(shell_with_child: tuple[int, int]) -> None:
    """Without an ancestry list the parent is found through /proc/<pid>/status."""
    sh, sleep = shell_with_child
    assert read_env_var(sleep, "RINGFENCE_TOKEN") is None
    found = find_env_token({"pid": sleep, "comm": "sleep"}, "RINGFENCE_TOKEN")
    assert found is not None and (found.value, found.pid, found.depth) == ("tok-from-parent", sh, 1)
    assert found.evidence == f"environment of pid {sh} (ancestor at depth 1)"


def test_uses_the_attribution_ancestry(shell_with_child: tuple[int, int]) -> None:
    """An ancestry list in the record is followed instead of /proc, and bounded by depth."""
    sh, sleep = shell_with_child
    record = {"pid": sleep, "comm": "sleep", "ancestry": [{"pid": os.getpid()}, {"pid": sh}]}
    found = find_env_token(record, "RINGFENCE_TOKEN")
    assert found is not None and found.pid == sh and found.depth == 2
    assert find_env_token(record, "RINGFENCE_TOKEN", max_depth=1) is None


def test_reused_pid_is_not_read(shell_with_child: tuple[int, int]) -> None:
    """If the pid now runs another program, its environment is not taken for the connection."""
    sh, _ = shell_with_child
    assert find_env_token({"pid": sh, "comm": "psql", "ancestry": []}, "RINGFENCE_TOKEN") is None


def test_nothing_found() -> None:
    """No record, no variable name, or a pid that is gone give nothing."""
    assert find_env_token(None, "RINGFENCE_TOKEN") is None
    assert find_env_token({"pid": os.getpid()}, "") is None
    assert read_env_var(2**22 + 12345, "RINGFENCE_TOKEN") is None
