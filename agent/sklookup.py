"""Protected ports steered to the agent's listeners by the kernel's socket lookup
(``[redirect] method = "sk_lookup"``, and ``"auto"``, the default, unless
``fail_closed = true`` or the kernel refuses the program).

The ``nat`` method (:mod:`agent.redirect`) rewrites each redirected connection's
destination with an iptables ``REDIRECT``, which needs connection tracking: once a
``nat`` table exists, the kernel tracks every packet of every connection in the network
namespace, the agent's own connections to the server and the server's replies included,
and translates the redirected ones. On a busy database host that is a cost a packet the
server's backends pay as well as the agent (bench/README.md measures it).

With ``sk_lookup`` nothing is rewritten and nothing tracked. A small program attached to
the network namespace (``BPF_PROG_TYPE_SK_LOOKUP``, Linux 5.9) runs when the kernel looks
for the listening socket of a new TCP connection to a local address, its first packet
only. For a protected port it hands the connection to the agent's listener of the
connection's family, so the accepted socket keeps the addresses the client dialled
(``getsockname()`` is the original destination) and the client sees nothing but its own
connection. Connections the program does not take (other ports, the agent's own) go to
the socket the kernel would have chosen anyway.

* **The agent's own upstream connections** are let through by their source: before
  connecting, the agent binds its socket to the server's address and a free port and
  puts that address and port in the program's exemption map, removing them once the
  connection is made or has failed (:class:`Exemptions`). A bound port is the socket's
  own, so no other process on the host can connect from it meanwhile, and another host
  cannot send from this host's addresses (the kernel drops such packets as martians).
* **Local and remote clients** are told apart by the interface the connection came in
  on: the loopback device (every connection from this host, to any of its addresses)
  or another (``[redirect] local`` and ``remote``).
* **Lifetime.** The program is attached through a link held only by the agent, so it goes
  with the agent's process, however that ends: nothing is left behind to clean up, and
  a protected port is reached directly while the agent is down, as with the ``nat``
  method and ``fail_closed = false``. ``fail_closed = true`` therefore needs ``nat``.
* **A listener gone** (the agent stopping) makes the program refuse the connection
  rather than give it to the server unrecorded; so does a connection another program
  has already given a socket to (a second agent in the same namespace).
* **Event loops.** With session workers (``[agent] workers``) each protected port has
  one listener an event loop, and the program gives a new connection to the loop
  carrying the fewest sessions, reading the session counts of :mod:`agent.balance`
  (whose own program cannot be used here: a socket in its ``REUSEPORT_SOCKARRAY``
  cannot also be in the ``SOCKMAP`` that ``bpf_sk_assign`` takes sockets from).

The program is assembled here from a few dozen instructions: no compiler, no kernel
headers.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from agent import bpfsys
from agent.balance import least_loaded
from agent.bpfsys import (
    ADD,
    ALU,
    ALU64,
    CALL,
    EXIT,
    HELPER_MAP_LOOKUP_ELEM,
    JA,
    JEQ,
    JMP,
    JNE,
    LDX,
    MEM,
    MOD,
    MOV,
    MUL,
    STX,
    H,
    K,
    W,
    X,
    insn,
    load_map,
)

log = logging.getLogger("ringfence.sklookup")

BPF_MAP_TYPE_HASH = 1
BPF_MAP_TYPE_SOCKMAP = 15
BPF_PROG_TYPE_SK_LOOKUP = 30
BPF_SK_LOOKUP = 36
PROGRAM_NAME = "ringfence_sk"

_HELPER_GET_PRANDOM_U32 = 7
_HELPER_SK_RELEASE = 86
_HELPER_SK_ASSIGN = 124
_NO_REUSEPORT = 1 << 1  # BPF_SK_LOOKUP_F_NO_REUSEPORT
_SK_DROP, _SK_PASS = 0, 1
_LOOPBACK_IFINDEX = 1  # the loopback device's index in every network namespace

# struct bpf_sk_lookup (uapi/linux/bpf.h)
_FAMILY, _PROTOCOL, _REMOTE_IP4, _REMOTE_IP6, _REMOTE_PORT = 8, 12, 16, 20, 36
_LOCAL_PORT, _INGRESS_IFINDEX = 60, 64

MAX_EXEMPTIONS = 65536  # upstream connections being made at once


class SkLookupError(Exception):
    """The kernel refused the maps, program or link; the message says which and why."""


def exemption_key(family: int, address: str, port: int) -> bytes:
    """The exemption map's key for a connection from ``address``:``port``: the family (u32),
    the port as the packet carries it (two bytes, network order, then two zero bytes) and
    the address (16 bytes; an IPv4 address in the first four)."""
    raw = socket.inet_pton(family, address)
    return struct.pack("=I", family) + struct.pack("!H", port) + b"\0\0" + raw.ljust(16, b"\0")


def service_key(family: int, port: int) -> bytes:
    """The services map's key: the protected port (u32, host order) and the family (u32)."""
    return struct.pack("=II", port, family)


def program(services_fd: int, exempt_fd: int, sockets_fd: int, *, local: bool,
            remote: bool, loops: int = 1, counts_fd: int | None = None) -> list[int]:
    """The lookup program.

    r6 = the context, r7 = the family, r8 = the protected port's group of listeners. A
    TCP connection (from the loopback device when only ``local``, from another when only
    ``remote``) to a port in the services map, from an address and port not in the
    exemption map, goes to a listener of that group; if it is gone (the agent's listeners
    closed) the connection is refused. Anything else is left to the kernel.

    The sockets map holds each group's ``loops`` listeners (one an event loop, the same
    ``SO_REUSEPORT`` group) from slot ``group * loops``. With ``counts_fd`` (the session
    counts of :mod:`agent.balance`) the program chooses the loop carrying the fewest
    sessions, starting the scan at a random one; without, it gives the group's first
    socket and the kernel picks one of the group by its hash."""
    pass_ = "pass"
    drop = "drop"
    code: list[int | str | tuple[int, str]] = [
        insn(ALU64 | MOV | X, 6, 1),                         # r6 = ctx
        insn(LDX | MEM | W, 2, 6, _PROTOCOL),
        (insn(JMP | JNE | K, 2, 0, 0, socket.IPPROTO_TCP), pass_),
    ]
    if local != remote:
        code += [
            insn(LDX | MEM | W, 2, 6, _INGRESS_IFINDEX),
            (insn(JMP | (JNE if local else JEQ) | K, 2, 0, 0, _LOOPBACK_IFINDEX), pass_),
        ]
    code += [
        insn(LDX | MEM | W, 7, 6, _FAMILY),
        insn(LDX | MEM | W, 2, 6, _LOCAL_PORT),
        insn(STX | MEM | W, 10, 2, -8),                      # services key at fp-8
        insn(STX | MEM | W, 10, 7, -4),
        *load_map(1, services_fd),
        insn(ALU64 | MOV | X, 2, 10),
        insn(ALU64 | ADD | K, 2, 0, 0, -8),
        insn(JMP | CALL, imm=HELPER_MAP_LOOKUP_ELEM),
        (insn(JMP | JEQ | K, 0, 0, 0, 0), pass_),           # not a protected port
        insn(LDX | MEM | W, 8, 0, 0),                        # r8 = group
        # The exemption key at fp-32: family, port, address.
        insn(STX | MEM | W, 10, 7, -32),
        insn(LDX | MEM | H, 2, 6, _REMOTE_PORT),
        insn(STX | MEM | W, 10, 2, -28),
        (insn(JMP | JNE | K, 7, 0, 0, socket.AF_INET), "ipv6"),
        insn(LDX | MEM | W, 2, 6, _REMOTE_IP4),
        insn(STX | MEM | W, 10, 2, -24),
        insn(ALU64 | MOV | K, 2, 0, 0, 0),
        insn(STX | MEM | W, 10, 2, -20),
        insn(STX | MEM | W, 10, 2, -16),
        insn(STX | MEM | W, 10, 2, -12),
        (insn(JMP | JA), "exempt"),
        "ipv6",
    ]
    for word in range(4):
        code += [
            insn(LDX | MEM | W, 2, 6, _REMOTE_IP6 + 4 * word),
            insn(STX | MEM | W, 10, 2, -24 + 4 * word),
        ]
    code += [
        "exempt",
        *load_map(1, exempt_fd),
        insn(ALU64 | MOV | X, 2, 10),
        insn(ALU64 | ADD | K, 2, 0, 0, -32),
        insn(JMP | CALL, imm=HELPER_MAP_LOOKUP_ELEM),
        (insn(JMP | JNE | K, 0, 0, 0, 0), pass_),           # the agent's own connection
        insn(ALU | MUL | K, 8, 0, 0, loops),                 # w8 = the group's first slot
    ]
    flags = 0
    if counts_fd is not None:
        flags = _NO_REUSEPORT  # the loop is chosen here
        code += [
            insn(STX | MEM | W, 10, 8, -40),
            insn(JMP | CALL, imm=_HELPER_GET_PRANDOM_U32),
            insn(ALU64 | MOV | X, 9, 0),
            insn(ALU | MOD | K, 9, 0, 0, loops),             # w9 = where the scan starts
            *least_loaded(loops, counts_fd),                 # r7 = the loop
            insn(LDX | MEM | W, 8, 10, -40),
            insn(ALU | ADD | X, 8, 7),
        ]
    code += [
        insn(STX | MEM | W, 10, 8, -36),                     # sockets key at fp-36
        *load_map(1, sockets_fd),
        insn(ALU64 | MOV | X, 2, 10),
        insn(ALU64 | ADD | K, 2, 0, 0, -36),
        insn(JMP | CALL, imm=HELPER_MAP_LOOKUP_ELEM),
        (insn(JMP | JEQ | K, 0, 0, 0, 0), drop),            # the listener is gone
        insn(ALU64 | MOV | X, 7, 0),
        insn(ALU64 | MOV | X, 1, 6),
        insn(ALU64 | MOV | X, 2, 7),
        insn(ALU64 | MOV | K, 3, 0, 0, flags),
        insn(JMP | CALL, imm=_HELPER_SK_ASSIGN),
        insn(ALU64 | MOV | X, 8, 0),
        insn(ALU64 | MOV | X, 1, 7),
        insn(JMP | CALL, imm=_HELPER_SK_RELEASE),
        (insn(JMP | JNE | K, 8, 0, 0, 0), drop),            # not assigned: refuse
        pass_,
        insn(ALU64 | MOV | K, 0, 0, 0, _SK_PASS),
        insn(JMP | EXIT),
        drop,
        insn(ALU64 | MOV | K, 0, 0, 0, _SK_DROP),
        insn(JMP | EXIT),
    ]
    return _resolve(code)


def _resolve(code: Sequence[int | str | tuple[int, str]]) -> list[int]:
    """Instructions with jumps to labels (``(insn, label)``, labels as strings) turned into
    jumps by offset."""
    labels: dict[str, int] = {}
    position = 0
    for item in code:
        if isinstance(item, str):
            labels[item] = position
        else:
            position += 1
    out: list[int] = []
    for item in code:
        if isinstance(item, str):
            continue
        if isinstance(item, tuple):
            word, label = item
            offset = labels[label] - (len(out) + 1)
            word = (word & ~(0xFFFF << 16)) | (offset & 0xFFFF) << 16
            out.append(word)
        else:
            out.append(item)
    return out


@dataclass(frozen=True, slots=True)
class Listener:
    """A protected port and the agent's listening sockets of one family that take its
    connections: one an event loop, the agent's own first."""

    port: int
    socks: tuple[socket.socket, ...]

    @property
    def family(self) -> int:
        return int(self.socks[0].family)


class Exemptions:
    """The agent's own upstream connections, let through while they are being made.

    Shared by the agent and its session workers (the map's descriptor is passed on)."""

    def __init__(self, map_fd: int) -> None:
        self.map_fd = map_fd

    @contextlib.contextmanager
    def connecting(self, sock: socket.socket, destination: tuple[str, int]) -> Iterator[None]:
        """Bind ``sock`` to ``destination``'s address and a free port, and let connections
        from there through while the body connects it. Raises OSError."""
        # (Never SO_REUSEADDR: another process could then bind the same address and port
        # and connect from it, exempted, while this socket connects.)
        sock.bind((destination[0], 0))
        address, port = sock.getsockname()[:2]
        key = exemption_key(sock.family, address, port)
        bpfsys.map_update(self.map_fd, key, b"\1")
        try:
            yield
        finally:
            with contextlib.suppress(OSError):
                bpfsys.map_delete(self.map_fd, key)


class SkLookup:
    """The lookup program attached to the agent's network namespace, and its maps.

    :meth:`add` the listeners while this process holds every event loop's copy (before
    the session workers take theirs), then :meth:`attach`."""

    def __init__(self, *, local: bool, remote: bool) -> None:
        self.local = local
        self.remote = remote
        self._fds: list[int] = []
        self._link: int | None = None
        self._loops = 1
        self._counts_fd: int | None = None
        try:
            self.services_fd = self._map(BPF_MAP_TYPE_HASH, 8, 4, 1024, "rf_sk_services")
            self.exempt_fd = self._map(BPF_MAP_TYPE_HASH, 24, 1, MAX_EXEMPTIONS,
                                       "rf_sk_exempt")
            self.sockets_fd = self._map(BPF_MAP_TYPE_SOCKMAP, 4, 8, 4096, "rf_sk_listen")
        except BaseException:
            self.close()
            raise
        self.exemptions = Exemptions(self.exempt_fd)

    def _map(self, kind: int, key: int, value: int, entries: int, name: str) -> int:
        try:
            fd = bpfsys.map_create(kind, key, value, entries, name)
        except OSError as e:
            raise SkLookupError(f"cannot create the {name} map: {e.strerror}") from None
        self._fds.append(fd)
        return fd

    def add(self, listeners: Sequence[Listener], counts_fd: int | None = None) -> None:
        """Take new connections to each listener's port and family to its sockets; with
        ``counts_fd`` (agent.balance's session counts) to the loop carrying the fewest."""
        self._loops = max((len(listener.socks) for listener in listeners), default=1)
        self._counts_fd = counts_fd if self._loops > 1 else None
        for group, listener in enumerate(listeners):
            try:
                for loop, sock in enumerate(listener.socks):
                    bpfsys.map_update(self.sockets_fd,
                                      struct.pack("=I", group * self._loops + loop),
                                      struct.pack("=Q", sock.fileno()))
                bpfsys.map_update(self.services_fd, service_key(listener.family, listener.port),
                                  struct.pack("=I", group))
            except OSError as e:
                raise SkLookupError(f"cannot add the listeners for port {listener.port} to "
                                    f"the sk_lookup maps: {e.strerror}") from None

    def _load(self) -> int:
        try:
            return bpfsys.prog_load(
                BPF_PROG_TYPE_SK_LOOKUP,
                program(self.services_fd, self.exempt_fd, self.sockets_fd,
                        local=self.local, remote=self.remote, loops=self._loops,
                        counts_fd=self._counts_fd),
                PROGRAM_NAME, BPF_SK_LOOKUP, verifier_log=True)
        except OSError as e:
            raise SkLookupError(f"the kernel refused the sk_lookup program (Linux "
                                f"{kernel_needed(self.local, self.remote)} or later is "
                                f"needed): {e.strerror}") from None

    def probe(self) -> None:
        """Load the program and drop it: raises SkLookupError when this kernel refuses it."""
        os.close(self._load())

    def attach(self) -> None:
        """Attach the program to this process's network namespace."""
        if self._link is not None:
            raise RuntimeError("sk_lookup program already attached")
        prog = self._load()
        with bpfsys.closing(prog):
            netns = os.open("/proc/self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
            with bpfsys.closing(netns):
                try:
                    self._link = bpfsys.link_create(prog, netns, BPF_SK_LOOKUP)
                except OSError as e:
                    raise SkLookupError(f"cannot attach the sk_lookup program to the "
                                        f"network namespace: {e.strerror}") from None

    def remove(self) -> None:
        """Detach the program: new connections reach the protected ports directly."""
        if self._link is not None:
            with contextlib.suppress(OSError):
                os.close(self._link)
            self._link = None

    def close(self) -> None:
        self.remove()
        for fd in self._fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        self._fds = []


def kernel_needed(local: bool, remote: bool) -> str:
    """The Linux release the program needs: 5.9, or 5.17 when it tells local clients from
    remote ones (``local`` or ``remote`` alone: it reads ``ingress_ifindex``)."""
    return "5.9" if local == remote else "5.17"


def listeners_for(services: Sequence[tuple[int, Sequence[Sequence[socket.socket]]]],
                  ipv6: bool) -> list[Listener]:
    """For each protected port, the first of its groups of listeners of each family (IPv6
    only when ``ipv6``); a group is one listen address's sockets, one an event loop."""
    out: list[Listener] = []
    for port, groups in services:
        seen: set[int] = set()
        for socks in groups:
            family = socks[0].family
            if family in seen or (family == socket.AF_INET6 and not ipv6):
                continue
            seen.add(family)
            out.append(Listener(port, tuple(socks)))
    return out


@dataclass(frozen=True, slots=True)
class Attached:
    """An sk_lookup program of ringfence's found attached (``redirect status``)."""

    link_id: int
    prog_id: int
    netns_inode: int


def attached() -> list[Attached]:
    """Every ringfence sk_lookup program attached to a network namespace on the host."""
    found: list[Attached] = []
    for link_id in bpfsys.link_ids():
        try:
            with bpfsys.closing(bpfsys.link_get_fd_by_id(link_id)) as fd:
                info = bpfsys.netns_link_info(fd)
        except OSError:
            continue  # gone meanwhile, or not ours to read
        if info is None or info.attach_type != BPF_SK_LOOKUP:
            continue
        try:
            name = bpfsys.prog_info_by_id(info.prog_id).name
        except OSError:
            continue
        if name == PROGRAM_NAME:
            found.append(Attached(link_id, info.prog_id, info.netns_inode))
    return found
