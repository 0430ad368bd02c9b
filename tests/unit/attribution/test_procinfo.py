"""Reading processes from /proc: parsing edge cases on a fake proc root, and
real processes spawned by the test."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from agent.procinfo import (
    ProcReader,
    cgroup_container_id,
    cgroup_unit,
    parse_cgroup,
    parse_stat,
    process_dict,
    tty_name,
)

DOCKER_ID = "3f4e" * 16
STAT_TAIL = "S {ppid} {ppid} {ppid} {tty} -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 {start} 1000 10"


def stat_line(pid: int, comm: str, ppid: int, tty: int = 0, start: int = 5000) -> str:
    return f"{pid} ({comm}) " + STAT_TAIL.format(ppid=ppid, tty=tty, start=start) + "\n"


def make_process(
    proc: Path,
    pid: int,
    *,
    comm: str = "sh",
    ppid: int = 1,
    uid: tuple[int, int] = (1000, 1000),
    gid: tuple[int, int] = (1000, 1000),
    tty: int = 0,
    loginuid: str = "1000",
    sessionid: str = "7",
    cgroup: str = "0::/user.slice/user-1000.slice/session-7.scope\n",
    cmdline: bytes = b"sh\0-c\0true\0",
    exe: str | None = "/usr/bin/dash",
) -> None:
    base = proc / str(pid)
    base.mkdir(parents=True)
    (base / "stat").write_text(stat_line(pid, comm, ppid, tty))
    (base / "status").write_text(
        f"Name:\t{comm}\nPPid:\t{ppid}\n"
        f"Uid:\t{uid[0]}\t{uid[1]}\t{uid[1]}\t{uid[1]}\n"
        f"Gid:\t{gid[0]}\t{gid[1]}\t{gid[1]}\t{gid[1]}\n"
    )
    (base / "loginuid").write_text(loginuid)
    (base / "sessionid").write_text(sessionid)
    (base / "cgroup").write_text(cgroup)
    (base / "cmdline").write_bytes(cmdline)
    if exe is not None:
        (base / "exe").symlink_to(exe)


@pytest.fixture
def proc(tmp_path: Path) -> Path:
    root = tmp_path / "proc"
    root.mkdir()
    (root / "stat").write_text("cpu 1 2 3\nbtime 1700000000\n")
    return root


def test_stat_comm_with_spaces_and_parentheses() -> None:
    """comm is taken up to the last ')' so names like 'a) (b' survive."""
    stat = parse_stat(stat_line(42, "evil) (name", 7, tty=34816, start=123))
    assert (stat.comm, stat.ppid, stat.tty_nr, stat.start_ticks) == ("evil) (name", 7, 34816, 123)


@pytest.mark.parametrize(
    ("tty_nr", "name"),
    [
        (0, None),
        (136 << 8 | 3, "pts/3"),
        ((136 << 8) | (300 & 0xFF) | ((300 & 0xFFF00) << 12), "pts/300"),
        (137 << 8 | 1, "pts/257"),
        (4 << 8 | 1, "tty1"),
        (4 << 8 | 64, "ttyS0"),
        (5 << 8 | 1, "console"),
        (204 << 8 | 64, "204:64"),
    ],
)
def test_tty_names(tty_nr: int, name: str | None) -> None:
    """stat's tty_nr decodes to the terminal's device name."""
    assert tty_name(tty_nr) == name


def test_cgroup_v2_line_wins_over_v1() -> None:
    """The unified hierarchy's 0:: line is the cgroup path; v1 name=systemd is the fallback."""
    text = "4:memory:/x\n1:name=systemd:/v1/path.scope\n0::/system.slice/postgresql.service\n"
    assert parse_cgroup(text) == "/system.slice/postgresql.service"
    assert parse_cgroup("1:name=systemd:/v1/path.scope\n") == "/v1/path.scope"
    assert parse_cgroup("") is None


@pytest.mark.parametrize(
    ("path", "unit", "container"),
    [
        ("/system.slice/sshd.service", "sshd.service", None),
        ("/user.slice/user-1000.slice/session-4.scope", "session-4.scope", None),
        (f"/system.slice/docker-{DOCKER_ID}.scope", f"docker-{DOCKER_ID}.scope", DOCKER_ID),
        (
            f"/kubepods.slice/kubepods-pod1.slice/cri-containerd-{DOCKER_ID}.scope",
            f"cri-containerd-{DOCKER_ID}.scope",
            DOCKER_ID,
        ),
        (f"/docker/{DOCKER_ID}", None, DOCKER_ID),
        (f"/machine.slice/libpod-{DOCKER_ID}.scope/container", f"libpod-{DOCKER_ID}.scope", DOCKER_ID),
        ("/", None, None),
        (None, None, None),
    ],
)
def test_unit_and_container_from_cgroup(path: str | None, unit: str | None, container: str | None
                                        ) -> None:
    """The innermost .service/.scope is the unit; a 64-hex component is the container id."""
    assert cgroup_unit(path) == unit
    assert cgroup_container_id(path) == container


def test_fake_process_is_read_fully(proc: Path) -> None:
    """Every field comes from its /proc file; ancestry follows PPid to pid 1."""
    make_process(proc, 1, comm="systemd", ppid=0, uid=(0, 0), gid=(0, 0), exe="/usr/lib/systemd")
    make_process(proc, 100, comm="sshd", ppid=1, uid=(0, 0), exe="/usr/sbin/sshd")
    make_process(
        proc, 200, comm="psql", ppid=100, uid=(1000, 0), gid=(1000, 1000), tty=136 << 8 | 2,
        cmdline=b"psql\0-h\0db\0", exe="/usr/bin/psql",
        cgroup=f"0::/system.slice/docker-{DOCKER_ID}.scope\n",
    )
    info = ProcReader(proc).process(200)
    assert info is not None
    assert (info.pid, info.ppid, info.comm, info.exe) == (200, 100, "psql", "/usr/bin/psql")
    assert info.cmdline == ("psql", "-h", "db")
    assert (info.uid, info.euid, info.gid, info.egid) == (1000, 0, 1000, 1000)
    assert (info.loginuid, info.audit_session, info.tty) == (1000, 7, "pts/2")
    assert info.container_id == DOCKER_ID
    assert info.start_ticks == 5000
    assert info.start_time == pytest.approx(1700000000 + 5000 / os.sysconf("SC_CLK_TCK"))
    assert [(a.pid, a.comm, a.exe, a.uid) for a in info.ancestry] == [
        (100, "sshd", "/usr/sbin/sshd", 0),
        (1, "systemd", "/usr/lib/systemd", 0),
    ]
    record = process_dict(info, tid=201)
    assert record["tid"] == 201 and record["cmdline"] == ["psql", "-h", "db"]
    assert record["ancestry"][0] == {"pid": 100, "comm": "sshd", "exe": "/usr/sbin/sshd", "uid": 0}


def test_unset_audit_ids_are_none(proc: Path) -> None:
    """loginuid/sessionid of 4294967295 (never set) read as None, as do missing files."""
    make_process(proc, 10, loginuid="4294967295", sessionid="4294967295", exe=None)
    info = ProcReader(proc).process(10, with_ancestry=False)
    assert info is not None
    assert (info.loginuid, info.audit_session, info.exe) == (None, None, None)


def test_vanished_ancestor_ends_the_walk(proc: Path) -> None:
    """A parent that exited mid-walk ends the ancestry instead of failing the lookup."""
    make_process(proc, 30, ppid=20)
    make_process(proc, 40, ppid=30)
    info = ProcReader(proc).process(40)
    assert info is not None
    assert [a.pid for a in info.ancestry] == [30]


def test_ancestry_is_bounded_and_cycle_safe(proc: Path) -> None:
    """A PPid cycle (impossible, but the files are untrusted) and deep chains stop."""
    make_process(proc, 50, ppid=51)
    make_process(proc, 51, ppid=50)
    info = ProcReader(proc).process(50)
    assert info is not None and [a.pid for a in info.ancestry] == [51, 50]
    for pid in range(1000, 1100):
        make_process(proc, pid, ppid=pid + 1)
    deep = ProcReader(proc, max_ancestry=8).process(1000)
    assert deep is not None and len(deep.ancestry) == 8


def test_ancestor_cache_is_keyed_by_start_time(proc: Path) -> None:
    """Ancestors are reused within the cache window, but never across pid reuse."""
    make_process(proc, 60, comm="sshd", ppid=0, uid=(0, 0), exe="/usr/sbin/sshd")
    make_process(proc, 61, ppid=60)
    reader = ProcReader(proc, cache_seconds=60)
    first = reader.process(61)
    assert first is not None and first.ancestry[0].exe == "/usr/sbin/sshd"
    (proc / "60" / "exe").unlink()
    (proc / "60" / "exe").symlink_to("/usr/bin/other")
    cached = reader.process(61)
    assert cached is not None and cached.ancestry[0].exe == "/usr/sbin/sshd"
    # pid 60 exits and the pid is reused by a process started later.
    (proc / "60" / "stat").write_text(stat_line(60, "other", 0, start=9999))
    reused = reader.process(61)
    assert reused is not None
    assert (reused.ancestry[0].comm, reused.ancestry[0].exe) == ("other", "/usr/bin/other")


def test_gone_process_is_none(proc: Path) -> None:
    """A pid without /proc entry (or with a truncated stat) gives None, not an exception."""
    assert ProcReader(proc).process(999) is None
    (proc / "998").mkdir()
    (proc / "998" / "stat").write_text("998 (x")
    assert ProcReader(proc).process(998) is None


def test_real_child_process() -> None:
    """A process spawned by the test is read from the real /proc with the test as its parent."""
    code = "import time; print('up', flush=True); time.sleep(30)"
    child = subprocess.Popen([sys.executable, "-c", code, "marker"], stdout=subprocess.PIPE)
    try:
        # Read once it runs: in the middle of its exec, a process's cmdline reads empty.
        assert child.stdout is not None and child.stdout.readline() == b"up\n"
        info = ProcReader().process(child.pid)
        assert info is not None
        assert info.cmdline == (sys.executable, "-c", code, "marker")
        assert info.exe == os.path.realpath(sys.executable)
        assert info.uid == os.getuid() and info.euid == os.geteuid()
        assert info.ppid == os.getpid()
        assert info.ancestry[0].pid == os.getpid()
        assert info.ancestry[-1].pid == 1 or len(info.ancestry) == 64
        assert info.start_time is not None and abs(info.start_time - time.time()) < 60
    finally:
        child.kill()
        child.wait()


def test_socket_owner_found_by_inode() -> None:
    """The /proc fd scan finds the process holding a socket inode."""
    import socket

    with socket.socket() as s:
        inode = os.fstat(s.fileno()).st_ino
        assert ProcReader().find_socket_owner(inode, os.geteuid()) == os.getpid()
        assert ProcReader().find_socket_owner(inode) == os.getpid()
    assert ProcReader().find_socket_owner(inode) is None
