"""New connections to the event loop carrying the fewest sessions (``[agent] balance``).

With ``[agent] workers`` above 1 every listener is bound once per event loop with
``SO_REUSEPORT`` (see :mod:`agent.workers`). Left to itself, the kernel picks a loop's
socket by a hash of the connection's addresses. With a few long-lived sessions (a pool of
8 or 20 connections) that often gives one loop twice the sessions of another, and that
loop's sessions wait while the other has CPU to spare: 8 ``pgbench`` clients on two loops
split 6/2 or worse about one time in five, and in nine runs by hand the two 6/2 splits ran
10–25 % below the 4/4 ones (bench/README.md).

So, by default (``balance = "least-sessions"``), the agent attaches a small
``SK_REUSEPORT`` program to each group of listening sockets. For every new connection it
reads each loop's live session count from an array map and selects the socket of the
loop with the fewest from a ``REUSEPORT_SOCKARRAY`` map. Each loop keeps its own slot
current (one writer a slot: the loop's process, as its sessions start and end). The scan
starts at a slot chosen by the connection's hash, so ties (a burst of connections before
any loop has counted them) spread as the kernel's hash would. If the program selects
nothing, the kernel falls back to its hash.

The program is assembled here: a few instructions a loop, no compiler and no kernel
headers. If the kernel refuses the maps or the program, the agent says why and keeps
the kernel's hash: balancing is about speed, never about what is recorded or allowed.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import struct
from collections.abc import Sequence

from agent import bpfsys
from agent.bpfsys import (
    ADD,
    ALU,
    ALU64,
    CALL,
    DW,
    EXIT,
    HELPER_MAP_LOOKUP_ELEM,
    JEQ,
    JGE,
    JLT,
    JMP,
    LDX,
    MEM,
    MOD,
    MOV,
    STX,
    K,
    W,
    X,
    insn,
    load_map,
)

log = logging.getLogger("ringfence.balance")

BPF_MAP_TYPE_ARRAY = 2
BPF_MAP_TYPE_REUSEPORT_SOCKARRAY = 20
BPF_PROG_TYPE_SK_REUSEPORT = 21
BPF_SK_REUSEPORT_SELECT = 39
SO_ATTACH_REUSEPORT_EBPF = 52  # asm-generic/socket.h

_HELPER_SK_SELECT_REUSEPORT = 82
_SK_PASS = 1
_MD_HASH = 32  # offsetof(struct sk_reuseport_md, hash)


class BalanceError(Exception):
    """The kernel refused the balancing maps or program; the message says which and why."""


def off_reason(balance: str, bpf_mode: str) -> str | None:
    """The setting that leaves new sessions to the kernel's hash, or None when balancing is
    asked for (``[agent] balance``, ``[bpf] mode``)."""
    if balance == "hash":
        return '[agent] balance = "hash"'
    if bpf_mode == "off":
        return '[bpf] mode = "off"'
    return None


def least_loaded(loops: int, counts_fd: int) -> list[int]:
    """Instructions that choose the event loop carrying the fewest sessions.

    On entry r9 is the first slot to look at; on exit r7 is the choice. For each slot from
    r9 on, wrapping around, a count (r2) below the least so far (r8) makes that slot the
    choice. Uses r1-r5, r8 and the stack at fp-4. Shared with agent.sklookup."""
    insns = [
        insn(ALU64 | MOV | X, 7, 9),                # r7 = r9 (choice)
        insn(ALU64 | MOV | K, 8, 0, 0, -1),         # r8 = U64_MAX (least count)
    ]
    for step in range(loops):
        insns += [
            insn(ALU64 | MOV | X, 1, 9),            # r1 = (r9 + step) % loops
            insn(ALU64 | ADD | K, 1, 0, 0, step),
            insn(JMP | JLT | K, 1, 0, 1, loops),
            insn(ALU64 | ADD | K, 1, 0, 0, -loops),
            insn(STX | MEM | W, 10, 1, -4),         # key at fp-4
            *load_map(1, counts_fd),
            insn(ALU64 | MOV | X, 2, 10),
            insn(ALU64 | ADD | K, 2, 0, 0, -4),
            insn(JMP | CALL, imm=HELPER_MAP_LOOKUP_ELEM),
            insn(JMP | JEQ | K, 0, 0, 4, 0),        # no value: next slot
            insn(LDX | MEM | DW, 2, 0, 0),          # r2 = count
            insn(JMP | JGE | X, 2, 8, 2),           # not fewer: next slot
            insn(ALU64 | MOV | X, 8, 2),
            insn(LDX | MEM | W, 7, 10, -4),         # r7 = this slot
        ]
    return insns


def program(loops: int, counts_fd: int, sockets_fd: int) -> list[int]:
    """The selection program for ``loops`` event loops: the loop with the fewest sessions
    (:func:`least_loaded`, starting at the connection's hash modulo ``loops``), then its
    socket selected, and pass."""
    insns = [
        insn(ALU64 | MOV | X, 6, 1),                # r6 = ctx
        insn(LDX | MEM | W, 9, 6, _MD_HASH),        # w9 = ctx->hash
        insn(ALU | MOD | K, 9, 0, 0, loops),        # w9 %= loops
        *least_loaded(loops, counts_fd),
    ]
    insns += [
        insn(STX | MEM | W, 10, 7, -8),             # key at fp-8
        insn(ALU64 | MOV | X, 1, 6),
        *load_map(2, sockets_fd),
        insn(ALU64 | MOV | X, 3, 10),
        insn(ALU64 | ADD | K, 3, 0, 0, -8),
        insn(ALU64 | MOV | K, 4, 0, 0, 0),
        insn(JMP | CALL, imm=_HELPER_SK_SELECT_REUSEPORT),
        insn(ALU64 | MOV | K, 0, 0, 0, _SK_PASS),   # pass even when nothing was
        insn(JMP | EXIT),                            # selected: the kernel's hash
    ]
    return insns


class Balancer:
    """The session counts map and the programs attached to the listener groups (in the
    agent's main process; the counts map's fd goes to each session worker)."""

    def __init__(self, loops: int) -> None:
        if loops < 2:
            raise ValueError("balancing needs at least two event loops")
        self.loops = loops
        try:
            self.counts_fd = bpfsys.map_create(BPF_MAP_TYPE_ARRAY, 4, 8, loops, "rf_sessions")
        except OSError as e:
            raise BalanceError(f"cannot create the session counts map: {e.strerror}") from None

    def attach(self, group: Sequence[socket.socket]) -> None:
        """Balance new connections over ``group``: the sockets bound to one address and
        port, the one at index i served by event loop i."""
        if len(group) != self.loops:
            raise ValueError(f"{len(group)} sockets for {self.loops} event loops")
        try:
            sockets_fd = bpfsys.map_create(BPF_MAP_TYPE_REUSEPORT_SOCKARRAY, 4, 8, self.loops,
                                           "rf_listeners")
        except OSError as e:
            raise BalanceError(f"cannot create the listeners map: {e.strerror}") from None
        with bpfsys.closing(sockets_fd):
            for index, sock in enumerate(group):
                try:
                    bpfsys.map_update(sockets_fd, struct.pack("=I", index),
                                      struct.pack("=Q", sock.fileno()))
                except OSError as e:
                    raise BalanceError(f"cannot add a listening socket to the listeners map: "
                                       f"{e.strerror}") from None
            try:
                prog_fd = bpfsys.prog_load(
                    BPF_PROG_TYPE_SK_REUSEPORT, program(self.loops, self.counts_fd, sockets_fd),
                    "ringfence_lb", BPF_SK_REUSEPORT_SELECT, verifier_log=True)
            except OSError as e:
                raise BalanceError(f"the kernel refused the balancing program: "
                                   f"{e.strerror}") from None
            with bpfsys.closing(prog_fd):
                try:
                    group[0].setsockopt(socket.SOL_SOCKET, SO_ATTACH_REUSEPORT_EBPF, prog_fd)
                except OSError as e:
                    raise BalanceError(f"cannot attach the balancing program to the "
                                       f"listeners: {e.strerror}") from None

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self.counts_fd)


class SessionCount:
    """One event loop's slot in the session counts map, written as its sessions start and end."""

    def __init__(self, counts_fd: int, slot: int) -> None:
        self.counts_fd = counts_fd
        self._key = struct.pack("=I", slot)
        self._failed = False

    def set(self, sessions: int) -> None:
        if self._failed:
            return
        try:
            bpfsys.map_update(self.counts_fd, self._key, struct.pack("=Q", sessions))
        except OSError as e:
            # Balancing then works from a stale count; the sessions themselves go on.
            self._failed = True
            log.warning("cannot update this event loop's session count for balancing: %s",
                        e.strerror, extra={"event": "agent.balance_failed"})
