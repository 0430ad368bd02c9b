"""One agent a network namespace.

Two agents in one namespace would fight over the same ports: the later one's iptables
rules replace the earlier one's, their sk_lookup programs refuse each other's
connections, and whichever stops first removes what the other relies on, leaving its
ports unprotected while it still runs. So the agent claims its namespace when it starts:
it binds an abstract Unix socket, whose names are scoped by network namespace, and the
kernel releases the name however the agent ends (a crash or ``kill -9`` included), so
there is no lock file to go stale. Commands that remove what a running agent installed
(``ringfence redirect clean``, ``ringfence cleanup``) ask the same socket first.
"""

from __future__ import annotations

import errno
import socket
import struct

NAME = b"\0ringfence/agent"
_PEER = struct.Struct("3i")  # struct ucred: pid, uid, gid


class Claimed(Exception):
    """Another agent holds this network namespace; the message names it."""


def claim(name: bytes = NAME) -> socket.socket:
    """This namespace's claim, for as long as the returned socket is open (it listens: each
    connection is one asking whether an agent runs here, see :func:`holder`)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(name)
    except OSError as e:
        sock.close()
        if e.errno != errno.EADDRINUSE:
            raise
        raise Claimed(f"another ringfence agent{pid_text(holder(name))} is running in this "
                      "network namespace: one agent protects a host (stop it first, e.g. "
                      "systemctl stop ringfence)") from None
    sock.listen(16)
    sock.setblocking(False)
    return sock


def answer(sock: socket.socket) -> None:
    """Accept and close whatever connections asked (the listening socket is readable)."""
    while True:
        try:
            conn, _ = sock.accept()
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            return  # (the asker gave up meanwhile)
        conn.close()


def holder(name: bytes = NAME) -> int | None:
    """The pid of the agent running in this network namespace, 0 when one runs but its pid
    cannot be read, or None when none runs."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(2.0)
    try:
        probe.connect(name)
    except (ConnectionRefusedError, FileNotFoundError):
        return None
    except OSError:
        return 0  # (named, but not answering: its listener's queue is full)
    try:
        pid: int = _PEER.unpack(probe.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                 _PEER.size))[0]
        return pid
    except OSError:
        return 0
    finally:
        probe.close()


def refusal(action: str, name: bytes = NAME) -> str | None:
    """Why ``action`` must wait for the agent running in this namespace, or None when none
    runs."""
    pid = holder(name)
    if pid is None:
        return None
    return (f"a ringfence agent{pid_text(pid)} is running in this network namespace; "
            f"stop it before you {action} (it removes them itself when it stops)")


def pid_text(pid: int | None) -> str:
    """`` (pid N)`` for :func:`holder`'s answer, when it knows the pid."""
    return f" (pid {pid})" if pid else ""
