"""Thin ctypes wrappers around the bpf(2) commands the agent needs without BCC.

BCC compiles the attribution programs; these helpers cover the rest:
attaching them to a cgroup through BPF links, which the kernel releases when
the agent's process ends however it ends (``BPF_LINK_CREATE``), or on kernels
without cgroup links attaching the programs themselves (``BPF_PROG_ATTACH``);
finding what is attached to a cgroup (``BPF_PROG_QUERY``), naming a program or
link by id (``BPF_*_GET_FD_BY_ID`` + ``BPF_OBJ_GET_INFO_BY_FD``), detaching
what a run left behind (``BPF_PROG_DETACH``, ``BPF_LINK_DETACH``), loading a
two-instruction probe program for ``ringfence doctor`` (``BPF_PROG_LOAD``),
reading the attribution map by file descriptor (``BPF_MAP_LOOKUP_ELEM``), and the
maps and programs assembled by hand that balance sessions over the agent's event loops
and steer protected ports to its listeners (``BPF_MAP_CREATE``, ``BPF_MAP_UPDATE_ELEM``,
``BPF_MAP_DELETE_ELEM``; see :mod:`agent.balance` and :mod:`agent.sklookup`).

Every call raises :class:`OSError` with the kernel's errno on failure.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform
import struct
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

# enum bpf_cmd (uapi/linux/bpf.h)
BPF_MAP_CREATE = 0
BPF_MAP_LOOKUP_ELEM = 1
BPF_MAP_UPDATE_ELEM = 2
BPF_MAP_DELETE_ELEM = 3
BPF_PROG_LOAD = 5
BPF_PROG_ATTACH = 8
BPF_PROG_DETACH = 9
BPF_PROG_GET_FD_BY_ID = 13
BPF_OBJ_GET_INFO_BY_FD = 15
BPF_PROG_QUERY = 16
BPF_LINK_CREATE = 28
BPF_LINK_GET_FD_BY_ID = 30
BPF_LINK_GET_NEXT_ID = 31
BPF_LINK_DETACH = 34

# enum bpf_prog_type
BPF_PROG_TYPE_SOCK_OPS = 13
BPF_PROG_TYPE_CGROUP_SOCK_ADDR = 18

# enum bpf_attach_type
BPF_CGROUP_SOCK_OPS = 3
BPF_CGROUP_INET4_CONNECT = 10
BPF_CGROUP_INET6_CONNECT = 11

BPF_F_ALLOW_MULTI = 1 << 1

# The attach types the attribution programs use, with a readable name each.
ATTRIBUTION_ATTACH_TYPES: dict[int, str] = {
    BPF_CGROUP_INET4_CONNECT: "cgroup_inet4_connect",
    BPF_CGROUP_INET6_CONNECT: "cgroup_inet6_connect",
    BPF_CGROUP_SOCK_OPS: "cgroup_sock_ops",
}

_SYSCALL_NUMBERS = {"x86_64": 321, "aarch64": 280, "ppc64le": 361, "s390x": 351, "riscv64": 280}
# union bpf_attr is larger than any command we use; the kernel requires the
# bytes it does not know about to be zero, which a zeroed buffer guarantees.
_ATTR_SIZE = 160
_PROG_INFO_SIZE = 96  # covers bpf_prog_info up to and including name[16]

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.syscall.restype = ctypes.c_long


def _nr() -> int:
    machine = platform.machine()
    try:
        return _SYSCALL_NUMBERS[machine]
    except KeyError:
        raise OSError(f"bpf(2): unsupported architecture {machine}") from None


def _bpf(cmd: int, attr: ctypes.Array[ctypes.c_char]) -> int:
    ret = int(_libc.syscall(_nr(), cmd, attr, len(attr)))
    if ret < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"bpf(cmd={cmd}): {os.strerror(err)}")
    return ret


def _attr() -> ctypes.Array[ctypes.c_char]:
    return ctypes.create_string_buffer(_ATTR_SIZE)


def _addr(buf: ctypes.Array[ctypes.c_char]) -> int:
    return ctypes.addressof(buf)


@dataclass(frozen=True, slots=True)
class ProgInfo:
    """What the kernel says about a loaded program."""

    id: int
    type: int
    name: str
    load_time: int  # ns after boot; with the id, names one program across id reuse


def prog_query(target_fd: int, attach_type: int) -> list[int]:
    """Ids of the programs attached to ``target_fd`` (a cgroup) for ``attach_type``."""
    count = 64
    while True:
        ids = (ctypes.c_uint32 * count)()
        attr = _attr()
        # target_fd u32, attach_type u32, query_flags u32, attach_flags u32,
        # prog_ids u64, prog_cnt u32
        struct.pack_into("=IIIIQI", attr, 0, target_fd, attach_type, 0, 0, ctypes.addressof(ids), count)
        try:
            _bpf(BPF_PROG_QUERY, attr)
        except OSError as e:
            if e.errno == 28 and count < 65536:  # ENOSPC: more programs than room
                count *= 4
                continue
            raise
        (found,) = struct.unpack_from("=I", attr, 24)
        return [ids[i] for i in range(min(found, count))]


def prog_get_fd_by_id(prog_id: int) -> int:
    """A new file descriptor for the program ``prog_id``; the caller closes it."""
    attr = _attr()
    struct.pack_into("=I", attr, 0, prog_id)
    return _bpf(BPF_PROG_GET_FD_BY_ID, attr)


def prog_info(prog_fd: int) -> ProgInfo:
    """Id, type and name of the program behind ``prog_fd``."""
    info = ctypes.create_string_buffer(_PROG_INFO_SIZE)
    attr = _attr()
    struct.pack_into("=IIQ", attr, 0, prog_fd, _PROG_INFO_SIZE, _addr(info))
    _bpf(BPF_OBJ_GET_INFO_BY_FD, attr)
    prog_type, prog_id = struct.unpack_from("=II", info, 0)
    (load_time,) = struct.unpack_from("=Q", info, 40)
    name = bytes(info.raw[64:80]).split(b"\0", 1)[0].decode("ascii", "replace")
    return ProgInfo(prog_id, prog_type, name, load_time)


def prog_info_by_id(prog_id: int) -> ProgInfo:
    """Id, type and name of the program ``prog_id``."""
    with closing(prog_get_fd_by_id(prog_id)) as fd:
        return prog_info(fd)


def prog_attach(prog_fd: int, target_fd: int, attach_type: int, flags: int = 0) -> None:
    """Attach ``prog_fd`` to the cgroup ``target_fd``."""
    attr = _attr()
    struct.pack_into("=IIII", attr, 0, target_fd, prog_fd, attach_type, flags)
    _bpf(BPF_PROG_ATTACH, attr)


def prog_detach(prog_fd: int, target_fd: int, attach_type: int) -> None:
    """Detach exactly ``prog_fd`` from the cgroup ``target_fd``."""
    attr = _attr()
    struct.pack_into("=III", attr, 0, target_fd, prog_fd, attach_type)
    _bpf(BPF_PROG_DETACH, attr)


def prog_detach_by_id(prog_id: int, target_fd: int, attach_type: int) -> None:
    """Detach the program ``prog_id`` from the cgroup ``target_fd``."""
    with closing(prog_get_fd_by_id(prog_id)) as fd:
        prog_detach(fd, target_fd, attach_type)


def link_create(prog_fd: int, target_fd: int, attach_type: int) -> int:
    """Attach ``prog_fd`` to the cgroup ``target_fd`` through a new link; returns the
    link's descriptor. The attachment lasts as long as the link is open: closing the
    last descriptor (also the kernel's closing it when the process dies) detaches it.
    Other multi-attached programs on the cgroup are unaffected."""
    attr = _attr()
    # prog_fd u32, target_fd u32, attach_type u32, flags u32
    struct.pack_into("=IIII", attr, 0, prog_fd, target_fd, attach_type, 0)
    return _bpf(BPF_LINK_CREATE, attr)


@dataclass(frozen=True, slots=True)
class LinkInfo:
    id: int
    prog_id: int


_LINK_INFO_SIZE = 64


def link_info(link_fd: int) -> LinkInfo:
    """The link's id and the id of the program it attaches."""
    info = ctypes.create_string_buffer(_LINK_INFO_SIZE)
    attr = _attr()
    struct.pack_into("=IIQ", attr, 0, link_fd, _LINK_INFO_SIZE, _addr(info))
    _bpf(BPF_OBJ_GET_INFO_BY_FD, attr)
    _type, link_id, prog_id = struct.unpack_from("=III", info, 0)
    return LinkInfo(link_id, prog_id)


@dataclass(frozen=True, slots=True)
class NetnsLinkInfo:
    prog_id: int
    netns_inode: int
    attach_type: int


_BPF_LINK_TYPE_NETNS = 5


def netns_link_info(link_fd: int) -> NetnsLinkInfo | None:
    """The program, network namespace (its inode) and attach type of a link to a network
    namespace (``sk_lookup``, flow dissector); None for any other kind of link."""
    info = ctypes.create_string_buffer(_LINK_INFO_SIZE)
    attr = _attr()
    struct.pack_into("=IIQ", attr, 0, link_fd, _LINK_INFO_SIZE, _addr(info))
    _bpf(BPF_OBJ_GET_INFO_BY_FD, attr)
    link_type, _id, prog_id = struct.unpack_from("=III", info, 0)
    if link_type != _BPF_LINK_TYPE_NETNS:
        return None
    netns_inode, attach_type = struct.unpack_from("=II", info, 16)
    return NetnsLinkInfo(prog_id, netns_inode, attach_type)


def link_get_fd_by_id(link_id: int) -> int:
    """A new file descriptor for the link ``link_id``; the caller closes it."""
    attr = _attr()
    struct.pack_into("=I", attr, 0, link_id)
    return _bpf(BPF_LINK_GET_FD_BY_ID, attr)


def link_ids() -> list[int]:
    """Ids of every BPF link on the host."""
    ids: list[int] = []
    start = 0
    while True:
        attr = _attr()
        struct.pack_into("=I", attr, 0, start)
        try:
            _bpf(BPF_LINK_GET_NEXT_ID, attr)
        except OSError as e:
            if e.errno == 2:  # ENOENT: no more
                return ids
            raise
        (start,) = struct.unpack_from("=I", attr, 4)
        ids.append(start)


def link_detach(link_fd: int) -> None:
    """Detach the link's program now, while descriptors of the link stay open elsewhere."""
    attr = _attr()
    struct.pack_into("=I", attr, 0, link_fd)
    _bpf(BPF_LINK_DETACH, attr)


def prog_load(
    prog_type: int, insns: Sequence[int], name: str, expected_attach_type: int = 0,
    *, verifier_log: bool = False,
) -> int:
    """Load raw instructions (each a little-endian u64) and return the program fd.

    ``verifier_log``: when the kernel refuses the program, load it again with the
    verifier's log and put the log's end in the error."""
    code = (ctypes.c_uint64 * len(insns))(*insns)
    license = ctypes.create_string_buffer(b"GPL")

    def load(log: ctypes.Array[ctypes.c_char] | None) -> int:
        attr = _attr()
        # prog_type u32, insn_cnt u32, insns u64, license u64, log_level u32,
        # log_size u32, log_buf u64, kern_version u32, prog_flags u32,
        # prog_name[16], prog_ifindex u32, expected_attach_type u32
        struct.pack_into("=IIQQ", attr, 0, prog_type, len(insns), ctypes.addressof(code),
                         _addr(license))
        if log is not None:
            struct.pack_into("=IIQ", attr, 24, 1, len(log), _addr(log))
        struct.pack_into("=16s", attr, 48, name.encode("ascii")[:15])
        struct.pack_into("=I", attr, 68, expected_attach_type)
        return _bpf(BPF_PROG_LOAD, attr)

    try:
        return load(None)
    except OSError as e:
        if not verifier_log or e.errno not in (13, 22):  # EACCES, EINVAL: the verifier
            raise
        log = ctypes.create_string_buffer(1 << 16)
        try:
            return load(log)
        except OSError as again:
            text = log.value.decode(errors="replace").strip().splitlines()[-6:]
            raise OSError(again.errno, f"{again.strerror}; verifier: {' | '.join(text)}") from None


def map_create(map_type: int, key_size: int, value_size: int, max_entries: int,
               name: str) -> int:
    """Create a map and return its fd."""
    attr = _attr()
    # map_type, key_size, value_size, max_entries, map_flags, inner_map_fd, numa_node
    # (u32 each), map_name[16]
    struct.pack_into("=IIIII", attr, 0, map_type, key_size, value_size, max_entries, 0)
    struct.pack_into("=16s", attr, 28, name.encode("ascii")[:15])
    return _bpf(BPF_MAP_CREATE, attr)


def map_update(map_fd: int, key: bytes, value: bytes) -> None:
    """Store ``value`` under ``key`` in the map ``map_fd`` (created or replaced)."""
    k = ctypes.create_string_buffer(key, len(key))
    v = ctypes.create_string_buffer(value, len(value))
    attr = _attr()
    # map_fd u32, pad u32, key u64, value u64, flags u64 (BPF_ANY)
    struct.pack_into("=IIQQQ", attr, 0, map_fd, 0, _addr(k), _addr(v), 0)
    _bpf(BPF_MAP_UPDATE_ELEM, attr)


# Instruction classes, sizes, modes, sources and operations (uapi/linux/bpf_common.h,
# bpf.h), for the small programs assembled by hand (agent.balance, agent.sklookup).
LD, LDX, STX, ALU, JMP, ALU64 = 0x00, 0x01, 0x03, 0x04, 0x05, 0x07
W, H, DW, MEM, IMM = 0x00, 0x08, 0x18, 0x60, 0x00
K, X = 0x00, 0x08
ADD, MUL, MOD, MOV = 0x00, 0x20, 0x90, 0xB0
JA, JEQ, JGE, JNE, JLT, CALL, EXIT = 0x00, 0x10, 0x30, 0x50, 0xA0, 0x80, 0x90
HELPER_MAP_LOOKUP_ELEM = 1
_PSEUDO_MAP_FD = 1


def insn(code: int, dst: int = 0, src: int = 0, off: int = 0, imm: int = 0) -> int:
    """One instruction as the little-endian u64 the kernel reads (code, dst:4 src:4,
    off s16, imm s32)."""
    return (code | (dst & 0xF) << 8 | (src & 0xF) << 12 | (off & 0xFFFF) << 16
            | (imm & 0xFFFFFFFF) << 32)


def load_map(dst: int, fd: int) -> list[int]:
    """``dst = map`` (a 64-bit immediate naming the map by fd: two instructions)."""
    return [insn(LD | DW | IMM, dst, _PSEUDO_MAP_FD, 0, fd), insn(0)]


# "r0 = 1; exit": the smallest valid program; returning 1 allows the operation.
RETURN_ONE = (0x00000001_000000B7, 0x00000000_00000095)


def map_delete(map_fd: int, key: bytes) -> None:
    """Remove ``key`` from the map ``map_fd``; OSError ENOENT when it is not there."""
    k = ctypes.create_string_buffer(key, len(key))
    attr = _attr()
    # map_fd u32, pad u32, key u64
    struct.pack_into("=IIQ", attr, 0, map_fd, 0, _addr(k))
    _bpf(BPF_MAP_DELETE_ELEM, attr)


def map_lookup(map_fd: int, key: bytes, value_size: int) -> bytes | None:
    """The value stored under ``key`` in the map ``map_fd``, or None."""
    k = ctypes.create_string_buffer(key, len(key))
    v = ctypes.create_string_buffer(value_size)
    attr = _attr()
    # map_fd u32, pad u32, key u64, value u64
    struct.pack_into("=IIQQ", attr, 0, map_fd, 0, _addr(k), _addr(v))
    try:
        _bpf(BPF_MAP_LOOKUP_ELEM, attr)
    except OSError as e:
        if e.errno == 2:  # ENOENT
            return None
        raise
    return v.raw


@contextmanager
def closing(fd: int) -> Iterator[int]:
    try:
        yield fd
    finally:
        os.close(fd)


@contextmanager
def open_cgroup(path: str | os.PathLike[str]) -> Iterator[int]:
    """A read-only directory fd for a cgroup v2 directory, closed on exit."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    with closing(fd):
        yield fd
