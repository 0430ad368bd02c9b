"""Facts about a process read from ``/proc/<pid>``.

Everything here tolerates the process (or any ancestor) exiting while it is
read: a missing file gives ``None`` for that fact, a process gone before its
first file is read gives no :class:`ProcessInfo` at all.
"""

from __future__ import annotations

import os
import re
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

PROC = Path("/proc")
# loginuid and sessionid hold this when never set (the audit subsystem's -1).
AUDIT_UNSET = 4294967295
MAX_ANCESTRY = 64
# Ancestors (shells, sshd, systemd) are shared by many connections; their
# entries are reused for a few seconds, keyed by (pid, start time) so that a
# reused pid is never mistaken for the old process.
ANCESTOR_CACHE_SIZE = 1024
ANCESTOR_CACHE_SECONDS = 5.0

_CLK_TCK = os.sysconf("SC_CLK_TCK")
_HEX64 = re.compile(r"(?:^|[-_:])([0-9a-f]{64})(?:\.scope)?$")
_UNIT = re.compile(r"\.(?:service|scope)$")


@dataclass(frozen=True, slots=True)
class Ancestor:
    pid: int
    comm: str | None
    exe: str | None
    uid: int | None

    def to_dict(self) -> dict[str, Any]:
        return {"pid": self.pid, "comm": self.comm, "exe": self.exe, "uid": self.uid}


@dataclass(frozen=True, slots=True)
class ProcessInfo:
    """One process as /proc shows it."""

    pid: int
    ppid: int | None
    comm: str | None
    exe: str | None
    cmdline: tuple[str, ...] | None
    uid: int | None
    gid: int | None
    euid: int | None
    egid: int | None
    loginuid: int | None
    audit_session: int | None
    tty: str | None
    cgroup: str | None
    unit: str | None
    container_id: str | None
    start_ticks: int | None  # clock ticks after boot (stat field 22)
    start_time: float | None  # the same as Unix time
    ancestry: tuple[Ancestor, ...] = field(default=())

    @property
    def start_boot_ns(self) -> int | None:
        """Start time in nanoseconds after boot, comparable with BPF's ktime."""
        if self.start_ticks is None:
            return None
        return self.start_ticks * 1_000_000_000 // _CLK_TCK


@dataclass(frozen=True, slots=True)
class Stat:
    """The fields of /proc/<pid>/stat that attribution uses."""

    comm: str
    state: str
    ppid: int
    tty_nr: int
    start_ticks: int


def parse_stat(text: str) -> Stat:
    """Parse /proc/<pid>/stat; comm may hold spaces and parentheses."""
    open_paren, close_paren = text.index("("), text.rindex(")")
    comm = text[open_paren + 1 : close_paren]
    rest = text[close_paren + 2 :].split()
    # rest[0] is field 3 (state); field n is rest[n - 3].
    return Stat(comm, rest[0], int(rest[1]), int(rest[4]), int(rest[19]))


def parse_status(text: str) -> dict[str, str]:
    """/proc/<pid>/status as a name → value mapping."""
    out: dict[str, str] = {}
    for line in text.splitlines():
        name, sep, value = line.partition(":")
        if sep:
            out[name] = value.strip()
    return out


def _ids(status: dict[str, str], name: str) -> tuple[int | None, int | None]:
    """(real, effective) from a ``Uid:``/``Gid:`` line."""
    parts = status.get(name, "").split()
    if len(parts) < 2:
        return None, None
    return int(parts[0]), int(parts[1])


def tty_name(tty_nr: int) -> str | None:
    """The controlling terminal's name from stat's tty_nr, None without one."""
    if tty_nr == 0:
        return None
    major = (tty_nr >> 8) & 0xFFF
    minor = (tty_nr & 0xFF) | ((tty_nr >> 12) & 0xFFF00)
    if 136 <= major <= 143:
        return f"pts/{(major - 136) * 256 + minor}"
    if major == 4:
        return f"tty{minor}" if minor < 64 else f"ttyS{minor - 64}"
    if major == 5:
        return {0: "tty", 1: "console", 2: "ptmx"}.get(minor, f"5:{minor}")
    return f"{major}:{minor}"


def parse_cgroup(text: str) -> str | None:
    """The cgroup v2 path (the ``0::`` line), else the systemd v1 hierarchy's path."""
    fallback = None
    for line in text.splitlines():
        hierarchy, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        if hierarchy == "0" and controllers == "":
            return path
        if controllers == "name=systemd":
            fallback = path
    return fallback


def cgroup_unit(path: str | None) -> str | None:
    """The innermost systemd unit (``*.service`` / ``*.scope``) in a cgroup path."""
    if not path:
        return None
    for part in reversed(path.split("/")):
        if _UNIT.search(part):
            return part
    return None


def cgroup_container_id(path: str | None) -> str | None:
    """A 64-hex container id in a cgroup path (docker, containerd, CRI-O, podman)."""
    if not path:
        return None
    for part in reversed(path.split("/")):
        m = _HEX64.search(part)
        if m:
            return m.group(1)
    return None


def _read(path: Path) -> str | None:
    """A small /proc file's text, or None when it (or its process) is gone."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        chunks = []
        while True:
            chunk = os.read(fd, 65536)
            if not chunk:
                break
            chunks.append(chunk)
    except OSError:
        return None
    finally:
        os.close(fd)
    return b"".join(chunks).decode("utf-8", "replace")


def _readlink(path: Path) -> str | None:
    try:
        return os.readlink(path)
    except OSError:
        return None


def _audit_id(text: str | None) -> int | None:
    if text is None:
        return None
    try:
        value = int(text.strip())
    except ValueError:
        return None
    return None if value == AUDIT_UNSET else value


def _boot_time(proc: Path) -> float | None:
    text = _read(proc / "stat")
    if text:
        for line in text.splitlines():
            if line.startswith("btime "):
                return float(line.split()[1])
    return None


class ProcReader:
    """Reads processes from one proc root (``/proc``, or a fake tree in tests)."""

    def __init__(
        self,
        proc: Path = PROC,
        max_ancestry: int = MAX_ANCESTRY,
        cache_seconds: float = ANCESTOR_CACHE_SECONDS,
    ) -> None:
        self.proc = proc
        self.max_ancestry = max_ancestry
        self.boot_time = _boot_time(proc)
        self.cache_seconds = cache_seconds
        self._cache: OrderedDict[tuple[int, int], tuple[float, Ancestor]] = OrderedDict()
        self._cache_lock = threading.Lock()

    def stat(self, pid: int) -> Stat | None:
        text = _read(self.proc / str(pid) / "stat")
        if not text:
            return None
        try:
            return parse_stat(text)
        except (ValueError, IndexError):
            return None

    def ancestor(self, pid: int) -> tuple[Ancestor, int | None] | None:
        """One ancestry entry and its parent's pid; None once the process is gone."""
        base = self.proc / str(pid)
        stat = self.stat(pid)
        if stat is None:
            return None
        key, now = (pid, stat.start_ticks), time.monotonic()
        with self._cache_lock:
            cached = self._cache.get(key)
            if cached is not None and now - cached[0] < self.cache_seconds:
                self._cache.move_to_end(key)
                exe, uid = cached[1].exe, cached[1].uid
                return Ancestor(pid, stat.comm, exe, uid), stat.ppid
        status = parse_status(_read(base / "status") or "")
        uid, _ = _ids(status, "Uid")
        entry = Ancestor(pid, stat.comm, _readlink(base / "exe"), uid)
        if self.cache_seconds > 0:
            with self._cache_lock:
                self._cache[key] = (now, entry)
                self._cache.move_to_end(key)
                while len(self._cache) > ANCESTOR_CACHE_SIZE:
                    self._cache.popitem(last=False)
        return entry, stat.ppid

    def ancestry(self, ppid: int | None) -> tuple[Ancestor, ...]:
        """The parent chain from ``ppid`` up to pid 1, bounded and cycle-safe."""
        chain: list[Ancestor] = []
        seen: set[int] = set()
        pid = ppid
        while pid and pid not in seen and len(chain) < self.max_ancestry:
            seen.add(pid)
            found = self.ancestor(pid)
            if found is None:
                break
            entry, pid = found
            chain.append(entry)
            if entry.pid == 1:
                break
        return tuple(chain)

    def process(self, pid: int, *, with_ancestry: bool = True) -> ProcessInfo | None:
        """Everything attribution records about ``pid``; None when it is gone."""
        base = self.proc / str(pid)
        stat = self.stat(pid)
        if stat is None:
            return None
        status = parse_status(_read(base / "status") or "")
        uid, euid = _ids(status, "Uid")
        gid, egid = _ids(status, "Gid")
        raw_cmdline = _read(base / "cmdline")
        cmdline = tuple(raw_cmdline.split("\0")[:-1]) if raw_cmdline else None
        cgroup = parse_cgroup(_read(base / "cgroup") or "")
        start_time = None
        if self.boot_time is not None:
            start_time = self.boot_time + stat.start_ticks / _CLK_TCK
        return ProcessInfo(
            pid=pid,
            ppid=stat.ppid,
            comm=stat.comm,
            exe=_readlink(base / "exe"),
            cmdline=cmdline,
            uid=uid,
            gid=gid,
            euid=euid,
            egid=egid,
            loginuid=_audit_id(_read(base / "loginuid")),
            audit_session=_audit_id(_read(base / "sessionid")),
            tty=tty_name(stat.tty_nr),
            cgroup=cgroup,
            unit=cgroup_unit(cgroup),
            container_id=cgroup_container_id(cgroup),
            start_ticks=stat.start_ticks,
            start_time=start_time,
            ancestry=self.ancestry(stat.ppid) if with_ancestry else (),
        )

    def pids(self) -> list[int]:
        """Pids of the processes currently visible."""
        try:
            return [int(name) for name in os.listdir(self.proc) if name.isdigit()]
        except OSError:
            return []

    def find_socket_owner(self, inode: int, uid: int | None = None) -> int | None:
        """The pid of a process holding the socket ``inode`` (an fd ``socket:[inode]``).

        Processes owned by ``uid`` are searched first: sock_diag reports the
        socket's owner, so the holder is nearly always among them.
        """
        target = f"socket:[{inode}]"
        pids = self.pids()
        if uid is not None:
            owned: list[int] = []
            others: list[int] = []
            for pid in pids:
                try:
                    (owned if os.stat(self.proc / str(pid)).st_uid == uid else others).append(pid)
                except OSError:
                    continue
            pids = owned + others
        for pid in pids:
            fd_dir = self.proc / str(pid) / "fd"
            try:
                names = os.listdir(fd_dir)
            except OSError:
                continue
            for name in names:
                if _readlink(fd_dir / name) == target:
                    return pid
        return None


def process_dict(info: ProcessInfo, tid: int | None = None) -> dict[str, Any]:
    """The ``process`` field of an audit record."""
    return {
        "pid": info.pid,
        "tid": tid,
        "uid": info.uid,
        "gid": info.gid,
        "euid": info.euid,
        "egid": info.egid,
        "loginuid": info.loginuid,
        "audit_session": info.audit_session,
        "comm": info.comm,
        "exe": info.exe,
        "cmdline": list(info.cmdline) if info.cmdline is not None else None,
        "tty": info.tty,
        "cgroup": info.cgroup,
        "unit": info.unit,
        "container_id": info.container_id,
        "start_time": info.start_time,
        "ancestry": [a.to_dict() for a in info.ancestry],
    }
