"""Network namespaces for integration tests: real hosts on one machine."""

from __future__ import annotations

import itertools
import os
import subprocess
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

_counter = itertools.count()


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
