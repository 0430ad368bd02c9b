"""Network namespaces for integration tests: real hosts on one machine."""

from __future__ import annotations

import ctypes
import itertools
import os
import subprocess
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

_counter = itertools.count()
CLONE_NEWNET = 0x40000000
T = TypeVar("T")


def run(argv: Sequence[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
    """Run a command, failing loudly with its output."""
    kwargs.setdefault("capture_output", True)
    kwargs.setdefault("text", True)
    kwargs.setdefault("timeout", 60)
    done = subprocess.run(list(argv), check=False, **kwargs)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} exited {done.returncode}: {done.stderr}{done.stdout}")
    return done


@dataclass
class NetNS:
    """A network namespace with loopback up; commands run inside it.

    Commands enter only the network namespace (nsenter), not the mount
    namespace that ``ip netns exec`` would make, so /sys/fs/cgroup and /proc
    look as they do on the host, as they do for an agent on a real host.
    """

    name: str

    def argv(self, argv: Sequence[str]) -> list[str]:
        return ["nsenter", f"--net=/run/netns/{self.name}", "--", *argv]

    def run(self, argv: Sequence[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
        return run(self.argv(argv), **kwargs)

    def popen(self, argv: Sequence[str], **kwargs: Any) -> subprocess.Popen[Any]:
        return subprocess.Popen(self.argv(argv), **kwargs)


@contextmanager
def netns(prefix: str = "rf") -> Iterator[NetNS]:
    """A fresh namespace, deleted (with everything in it) afterwards."""
    name = f"{prefix}{os.getpid()}x{next(_counter)}"
    run(["ip", "netns", "add", name])
    ns = NetNS(name)
    try:
        ns.run(["ip", "link", "set", "lo", "up"])
        yield ns
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False, capture_output=True)


def call_in(ns: NetNS, fn: Callable[[], T]) -> T:
    """Run ``fn`` on a thread that entered ``ns``: sockets it creates live in that namespace."""
    result: list[Any] = []

    def target() -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        fd = os.open(f"/run/netns/{ns.name}", os.O_RDONLY)
        try:
            if libc.setns(fd, CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), "setns failed")
            result.append(fn())
        except BaseException as e:  # re-raised in the caller
            result.append(e)
        finally:
            os.close(fd)

    thread = threading.Thread(target=target)
    thread.start()
    thread.join()
    if isinstance(result[0], BaseException):
        raise result[0]
    return result[0]  # type: ignore[no-any-return]


def connect_veth(a: NetNS, a_addr: str, b: NetNS, b_addr: str, prefix_len: int = 24) -> None:
    """Join two namespaces with a veth pair and address both ends."""
    suffix = a.name[-6:]
    left, right = f"rfa{suffix}", f"rfb{suffix}"
    run(["ip", "link", "add", left, "netns", a.name, "type", "veth", "peer", "name", right,
         "netns", b.name])
    a.run(["ip", "addr", "add", f"{a_addr}/{prefix_len}", "dev", left])
    b.run(["ip", "addr", "add", f"{b_addr}/{prefix_len}", "dev", right])
    a.run(["ip", "link", "set", left, "up"])
    b.run(["ip", "link", "set", right, "up"])
