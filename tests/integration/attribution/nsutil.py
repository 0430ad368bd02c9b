"""Small helpers for the attribution tests: a throwaway network namespace and
clients started inside it as an unprivileged user."""

from __future__ import annotations

import ctypes
import os
import subprocess
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

CLONE_NEWNET = 0x40000000
NOBODY = 65534
# The interpreter the clients run with: the system one, readable by any uid.
CLIENT_PYTHON = "/usr/bin/python3"

_libc = ctypes.CDLL("libc.so.6", use_errno=True)

# Connects, reports its pid and local address, then waits for a line on stdin
# before closing, so the test decides when the client socket ends.
CLIENT = r"""
import os, socket, sys
family = socket.AF_INET6 if ":" in sys.argv[1] else socket.AF_INET
s = socket.socket(family, socket.SOCK_STREAM)
s.connect((sys.argv[1], int(sys.argv[2])))
host, port = s.getsockname()[:2]
print(os.getpid(), host, port, flush=True)
sys.stdin.readline()
s.close()
print("closed", flush=True)
sys.stdin.readline()
"""


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


@dataclass
class NetNS:
    name: str

    @property
    def path(self) -> Path:
        return Path("/run/netns") / self.name

    @contextmanager
    def entered(self) -> Iterator[None]:
        """Run the calling thread inside the namespace (sockets made here live there)."""
        home = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
        target = os.open(self.path, os.O_RDONLY)
        try:
            _setns(target)
            try:
                yield
            finally:
                _setns(home)
        finally:
            os.close(target)
            os.close(home)

    def run(self, *args: str) -> None:
        subprocess.run(["ip", "netns", "exec", self.name, *args], check=True)


@contextmanager
def network_namespace(prefix: str = "rfattr") -> Iterator[NetNS]:
    ns = NetNS(f"{prefix}-{uuid.uuid4().hex[:8]}")
    subprocess.run(["ip", "netns", "add", ns.name], check=True)
    try:
        ns.run("ip", "link", "set", "lo", "up")
        yield ns
    finally:
        subprocess.run(["ip", "netns", "delete", ns.name], check=False)


class Client:
    """A TCP client process in ``ns`` running as ``uid`` (via setpriv)."""

    def __init__(self, ns: NetNS, host: str, port: int, uid: int = NOBODY) -> None:
        ids = [f"--reuid={uid}", f"--regid={uid}", "--clear-groups"]
        self.process = subprocess.Popen(
            ["ip", "netns", "exec", ns.name, "setpriv", *ids, CLIENT_PYTHON, "-c", CLIENT,
             host, str(port)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            cwd="/",
        )
        assert self.process.stdout is not None
        line = self.process.stdout.readline().split()
        if len(line) != 3:
            self.process.kill()
            raise RuntimeError(f"client did not connect: {line!r}")
        self.pid = int(line[0])
        self.address = (line[1], int(line[2]))

    def close_socket(self) -> None:
        assert self.process.stdin is not None and self.process.stdout is not None
        self.process.stdin.write("\n")
        self.process.stdin.flush()
        assert self.process.stdout.readline().strip() == "closed"

    def finish(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(timeout=10)

