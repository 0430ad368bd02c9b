"""Tokens in a process's environment: the configured variable is looked up in
``/proc/<pid>/environ`` of the connecting process, then of its ancestors
(parent first, bounded, never pid 1). Needs root to read other users' processes.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

PROC = Path("/proc")
MAX_ENVIRON_BYTES = 4 * 1024 * 1024
MAX_DEPTH = 8


@dataclass(frozen=True, slots=True)
class EnvToken:
    """A variable's value and the process it was read from (depth 0: the process itself)."""

    value: str = field(repr=False)
    pid: int
    depth: int

    @property
    def evidence(self) -> str:
        where = "the connecting process" if self.depth == 0 else f"ancestor at depth {self.depth}"
        return f"environment of pid {self.pid} ({where})"


def read_env_var(pid: int, name: str, *, proc: Path = PROC) -> str | None:
    """The value of ``name`` in the initial environment of ``pid``, or None."""
    try:
        with open(proc / str(pid) / "environ", "rb") as f:
            data = f.read(MAX_ENVIRON_BYTES)
    except OSError:
        return None
    wanted = name.encode() + b"="
    for entry in data.split(b"\0"):
        if entry.startswith(wanted):
            try:
                return entry[len(wanted) :].decode("utf-8")
            except UnicodeDecodeError:
                return None
    return None


def _parent(pid: int, proc: Path) -> int | None:
    try:
        status = (proc / str(pid) / "status").read_text()
    except OSError:
        return None
    for line in status.splitlines():
        if line.startswith("PPid:"):
            try:
                return int(line.split()[1])
            except (IndexError, ValueError):
                return None
    return None


def _chain(process: Mapping[str, Any], max_depth: int, proc: Path) -> list[int]:
    pid = process.get("pid")
    if not isinstance(pid, int):
        return []
    pids = [pid]
    ancestry = process.get("ancestry")
    if isinstance(ancestry, list) and ancestry:
        pids += [a["pid"] for a in ancestry if isinstance(a, Mapping) and isinstance(a.get("pid"), int)]
    else:
        current: int | None = pid
        while current is not None and len(pids) <= max_depth:
            current = _parent(current, proc)
            if current is not None:
                pids.append(current)
    return [p for p in pids if p > 1][: max_depth + 1]


def find_env_token(
    process: Mapping[str, Any] | None,
    name: str,
    *,
    max_depth: int = MAX_DEPTH,
    proc: Path = PROC,
) -> EnvToken | None:
    """The first non-empty ``name`` along the process and its ancestors."""
    if process is None or not name:
        return None
    comm = process.get("comm")
    for depth, pid in enumerate(_chain(process, max_depth, proc)):
        if depth == 0 and isinstance(comm, str) and comm:
            # The pid may have been reused since attribution: same name or skip it.
            try:
                if (proc / str(pid) / "comm").read_text().rstrip("\n") != comm:
                    continue
            except OSError:
                continue
        value = read_env_var(pid, name, proc=proc)
        if value:
            return EnvToken(value, pid, depth)
    return None
