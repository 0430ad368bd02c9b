"""Which process is behind an accepted connection.

Two sources, chosen once at :meth:`Attributor.start`:

``bpf``
    ``bpf/attribution.bpf.c`` (cgroup connect4/connect6 + sock_ops), compiled
    with BCC and attached to the cgroup v2 root alongside other programs,
    fills an LRU map keyed by (netns cookie, family, client address, client
    port) while the client is still inside ``connect()``. A lookup is one map
    read plus a few /proc reads.
``procfs``
    When BPF cannot load (or ``[bpf] mode = "off"``): a sock_diag request finds
    the client socket's inode from its 4-tuple, then ``/proc/*/fd`` is scanned
    for ``socket:[inode]``. Slower, racy with short-lived clients, and said so
    in every record.

Peers whose address does not belong to the agent's network namespace are
``remote``: no process on this host can be named.

The programs are attached through BPF links (Linux 5.7 and later): the kernel
releases a link when the last descriptor of it closes, so the programs of an
agent that dies, even by SIGKILL, stop running with it. On older kernels the
programs themselves are attached (``BPF_F_ALLOW_MULTI``) and stay after a
kill. Either way the program ids are recorded in
``<state_dir>/bpf-attachments.json`` before they are attached (the link ids once
the links exist), so whatever a run
stopped without :meth:`Attributor.stop` left is detached by the next run with
the same state directory (or ``ringfence cleanup``), without touching the
programs of other agents sharing the cgroup root.
"""

from __future__ import annotations

import errno
import ipaddress
import json
import logging
import os
import socket
import struct
import subprocess
import sys
import threading
from collections.abc import Callable, Iterable
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent import bpfsys, kheaders
from agent.bpf_loader import BPF_SOURCE, PROGRAMS
from agent.config import BpfSettings
from agent.procinfo import ProcessInfo, ProcReader, process_dict
from bpf import source_path

log = logging.getLogger(__name__)

PROGRAM_PREFIX = "ringfence_"
STATE_FILE = "bpf-attachments.json"
SO_NETNS_COOKIE = 71

# struct rf_key / struct rf_value in bpf/attribution.bpf.c
KEY_FORMAT = struct.Struct("=QIHH16s")
VALUE_FORMAT = struct.Struct("=QQQIIII16sIHH16s")

# A process started this long after the connect cannot have made it (pid reuse).
PID_REUSE_SLACK_NS = 1_000_000_000


class AttributionError(Exception):
    """Attribution cannot run as configured (BPF required but unavailable)."""


# --------------------------------------------------------------------------- records


@dataclass(frozen=True, slots=True)
class AttributionRecord:
    """What attribution found out about one accepted connection."""

    source: str  # "bpf" | "procfs" | "remote" | "unknown"
    verified: bool  # the BPF entry's destination equals SO_ORIGINAL_DST
    process: dict[str, Any] | None
    reason: str | None = None
    netns_cookie: int | None = None
    socket_cookie: int | None = None
    cgroup_id: int | None = None

    def to_record(self) -> tuple[dict[str, Any] | None, dict[str, Any]]:
        """The ``process`` and ``attribution`` fields of the session.start event."""
        attribution: dict[str, Any] = {"source": self.source, "verified": self.verified}
        optional = {
            "reason": self.reason,
            "netns_cookie": self.netns_cookie,
            "socket_cookie": self.socket_cookie,
            "cgroup_id": self.cgroup_id,
        }
        attribution.update((k, v) for k, v in optional.items() if v is not None)
        return self.process, attribution


@dataclass(frozen=True, slots=True)
class KernelEntry:
    """One entry of the BPF attribution map."""

    socket_cookie: int
    ktime_ns: int
    cgroup_id: int
    pid: int
    tid: int
    uid: int
    gid: int
    comm: str
    destination: tuple[str, int]

    @classmethod
    def unpack(cls, raw: bytes) -> KernelEntry:
        (cookie, ktime, cgroup_id, pid, tid, uid, gid, comm, family, port, _, addr) = (
            VALUE_FORMAT.unpack(raw[: VALUE_FORMAT.size])
        )
        return cls(
            cookie,
            ktime,
            cgroup_id,
            pid,
            tid,
            uid,
            gid,
            comm.split(b"\0", 1)[0].decode("utf-8", "replace"),
            (_address_text(family, addr), port),
        )


def _address_text(family: int, raw: bytes) -> str:
    if family == socket.AF_INET:
        return socket.inet_ntop(socket.AF_INET, raw[:4])
    return socket.inet_ntop(socket.AF_INET6, raw[:16])


def normalize_address(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """An address as the map stores it: IPv4-mapped IPv6 becomes IPv4, no scope."""
    address = ipaddress.ip_address(host.split("%", 1)[0])
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def map_key(netns_cookie: int, host: str, port: int) -> bytes:
    """The attribution map key for a client at ``host``:``port`` in a network namespace."""
    address = normalize_address(host)
    family = socket.AF_INET if address.version == 4 else socket.AF_INET6
    return KEY_FORMAT.pack(netns_cookie, family, port, 0, address.packed.ljust(16, b"\0"))


def netns_cookie(sock: socket.socket) -> int:
    """The cookie of the network namespace ``sock`` lives in."""
    raw = sock.getsockopt(socket.SOL_SOCKET, SO_NETNS_COOKIE, 8)
    return int(struct.unpack("=Q", raw)[0])


def same_endpoint(a: tuple[str, int], b: tuple[str, int]) -> bool:
    """Whether two (address, port) pairs name the same endpoint."""
    try:
        return a[1] == b[1] and normalize_address(a[0]) == normalize_address(b[0])
    except ValueError:
        return False


def is_local_address(host: str) -> bool:
    """Whether ``host`` belongs to the calling thread's network namespace."""
    address = normalize_address(host)
    if address.is_loopback:
        return True
    family = socket.AF_INET if address.version == 4 else socket.AF_INET6
    with socket.socket(family, socket.SOCK_DGRAM) as probe:
        try:
            probe.bind((str(address), 0))
        except OSError as e:
            if e.errno == errno.EADDRNOTAVAIL:
                return False
            raise
    return True


# --------------------------------------------------------------------------- cgroup root


def find_cgroup2_mount(mounts: str | None = None) -> Path:
    """The cgroup v2 mount point from /proc/mounts (``/sys/fs/cgroup`` preferred)."""
    if mounts is None:
        mounts = Path("/proc/mounts").read_text()
    found: list[Path] = []
    for line in mounts.splitlines():
        fields = line.split()
        if len(fields) >= 3 and fields[2] == "cgroup2":
            found.append(Path(fields[1].replace("\\040", " ")))
    if not found:
        raise AttributionError(
            "no cgroup v2 mount in /proc/mounts; mount one "
            "(mount -t cgroup2 none /sys/fs/cgroup) or set [bpf] cgroup_root"
        )
    for path in found:
        if path == Path("/sys/fs/cgroup"):
            return path
    return found[0]


def resolve_cgroup_root(setting: str) -> Path:
    return find_cgroup2_mount() if setting in ("", "auto") else Path(setting)


# --------------------------------------------------------------------------- cleanup


def ringfence_programs(cgroup_root: Path) -> list[tuple[int, int, str]]:
    """(attach type, program id, name) of every ``ringfence_*`` program on ``cgroup_root``."""
    found: list[tuple[int, int, str]] = []
    with bpfsys.open_cgroup(cgroup_root) as cg:
        for attach_type in bpfsys.ATTRIBUTION_ATTACH_TYPES:
            for prog_id in bpfsys.prog_query(cg, attach_type):
                try:
                    info = bpfsys.prog_info_by_id(prog_id)
                except OSError:
                    continue  # detached and freed meanwhile
                if info.name.startswith(PROGRAM_PREFIX):
                    found.append((attach_type, prog_id, info.name))
    return found


def _ours(prog: bpfsys.ProgInfo, load_time: int | None) -> bool:
    """A ``ringfence_*`` program, and the recorded one: ``load_time`` (from the
    attachment record) tells it apart from a later one given the same id."""
    return prog.name.startswith(PROGRAM_PREFIX) and load_time in (None, prog.load_time)


def _with_object(get_fd: Callable[[], int], act: Callable[[int], bool]) -> bool:
    """``act`` on a new descriptor from ``get_fd`` (closed after); False when the
    object is gone (ENOENT) before or meanwhile."""
    try:
        fd = get_fd()
    except OSError as e:
        if e.errno == errno.ENOENT:
            return False
        raise
    try:
        return act(fd)
    except OSError as e:
        if e.errno == errno.ENOENT:
            return False
        raise
    finally:
        os.close(fd)


def _detach(cg: int, prog_id: int, attach_type: int, load_time: int | None = None) -> bool:
    """Detach one attached ``ringfence_*`` program; False when it is gone or not the one meant."""

    def detach(fd: int) -> bool:
        if not _ours(bpfsys.prog_info(fd), load_time):
            return False
        bpfsys.prog_detach(fd, cg, attach_type)
        return True

    return _with_object(lambda: bpfsys.prog_get_fd_by_id(prog_id), detach)


def _detach_link(link_id: int, prog_id: int, load_time: int | None) -> bool:
    """Detach one link to a ``ringfence_*`` program; False when it is gone or not the
    one meant (another link or program given the same id since)."""

    def detach(fd: int) -> bool:
        if bpfsys.link_info(fd).prog_id != prog_id:
            return False
        if not _ours(bpfsys.prog_info_by_id(prog_id), load_time):
            return False
        try:
            bpfsys.link_detach(fd)
        except OSError as e:
            if e.errno != errno.EINVAL:
                raise
            # Linux 5.7 and 5.8 have links but no BPF_LINK_DETACH: it goes when its
            # holder closes it.
            log.warning("cannot detach BPF link %d on this kernel: %s", link_id, e.strerror)
            return False
        return True

    return _with_object(lambda: bpfsys.link_get_fd_by_id(link_id), detach)


def _ringfence_links(prog_ids: set[int]) -> list[tuple[int, int]]:
    """(link id, program id) of every link that attaches one of ``prog_ids``."""
    found: list[tuple[int, int]] = []
    try:
        ids = bpfsys.link_ids()
    except OSError as e:
        if e.errno == errno.EINVAL:
            return found  # before Linux 5.8 links cannot be listed (they go with their holders)
        raise
    for link_id in ids:
        try:
            with bpfsys.closing(bpfsys.link_get_fd_by_id(link_id)) as fd:
                info = bpfsys.link_info(fd)
        except OSError:
            continue  # released meanwhile
        if info.prog_id in prog_ids:
            found.append((link_id, info.prog_id))
    return found


def detach_all_ringfence_programs(cgroup_root: Path | str) -> int:
    """Detach every ``ringfence_*`` program from ``cgroup_root``; how many were detached.

    For an explicit full cleanup: this also removes the programs of other
    agents running on this host.
    """
    root = Path(cgroup_root)
    count = 0
    attached = ringfence_programs(root)
    for link_id, prog_id in _ringfence_links({prog_id for _, prog_id, _ in attached}):
        count += _detach_link(link_id, prog_id, None)
    with bpfsys.open_cgroup(root) as cg:
        for attach_type, prog_id, _ in attached:
            count += _detach(cg, prog_id, attach_type)  # False for those the links held
    return count


def boot_id() -> str:
    """This boot's random id: attachments never outlive a reboot."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def _pid_start_ticks(pid: int) -> int | None:
    stat = ProcReader().stat(pid)
    return stat.start_ticks if stat else None


# State dirs whose Attributor is running in this process; a state file naming
# this process but absent here was left by an Attributor that was never stopped.
_ACTIVE: set[Path] = set()
_ACTIVE_LOCK = threading.Lock()


def detach_stale(state_dir: Path) -> int:
    """Detach what a dead previous run of ``state_dir`` left attached; how many."""
    path = state_dir / STATE_FILE
    try:
        state = json.loads(path.read_text())
        pid, start = int(state["pid"]), state.get("pid_start")
        cgroup_root = Path(state["cgroup_root"])
        programs = [
            (int(p["id"]), int(p["attach_type"]), p.get("load_time")) for p in state["programs"]
        ]
        links = [(int(link["id"]), int(link["prog_id"])) for link in state.get("links", [])]
        recorded_boot = str(state.get("boot_id", ""))
    except FileNotFoundError:
        return 0
    except (OSError, ValueError, KeyError, TypeError) as e:
        log.warning("ignoring unreadable %s: %s", path, e)
        path.unlink(missing_ok=True)
        return 0
    if recorded_boot != boot_id():
        path.unlink(missing_ok=True)  # written before a reboot: nothing of it is attached
        return 0
    alive = _pid_start_ticks(pid) == start and start is not None
    if pid == os.getpid():
        with _ACTIVE_LOCK:
            alive = state_dir.resolve() in _ACTIVE
    if alive:
        log.warning(
            "agent pid %d is still running with state_dir %s; leaving its BPF programs alone",
            pid,
            state_dir,
        )
        return 0
    count = 0
    load_times = {prog_id: load_time for prog_id, _, load_time in programs}
    for link_id, prog_id in links:
        # Gone with the process that held it, unless that was this very process.
        count += _detach_link(link_id, prog_id, load_times.get(prog_id))
    try:
        with bpfsys.open_cgroup(cgroup_root) as cg:
            for prog_id, attach_type, load_time in programs:
                count += _detach(cg, prog_id, attach_type, load_time)
    except OSError as e:
        log.warning("cannot detach stale programs from %s: %s", cgroup_root, e)
        return 0
    if count:
        log.info("detached %d BPF programs left by agent pid %d", count, pid)
    path.unlink(missing_ok=True)
    return count


# --------------------------------------------------------------------------- BPF loader


# What BPF_LINK_CREATE fails with where cgroup links do not exist (before Linux 5.7).
_NO_CGROUP_LINKS = frozenset({errno.EINVAL, errno.EOPNOTSUPP, 524})  # 524: ENOTSUPP


class _KernelAttribution:
    """The compiled, attached attribution programs and their map."""

    def __init__(self, settings: BpfSettings, ports: Iterable[int], state_dir: Path) -> None:
        self.settings = settings
        self.ports = sorted(set(ports))
        self.state_dir = state_dir
        self.cgroup_root = resolve_cgroup_root(settings.cgroup_root)
        self.headers: kheaders.KernelHeaders | None = None
        self._fds: list[int] = []  # the map's and the programs' descriptors
        self._attached: list[tuple[int, int]] = []  # (prog fd, attach type)
        self._links: list[int] = []  # with attach_mode "link": closing them detaches
        self.attach_mode = ""  # "link", or "program" on kernels without cgroup links
        self._map_fd = -1
        self._lock = threading.Lock()

    def load(self) -> None:
        self.headers = kheaders.prepare_for_bcc(self.settings.kernel_headers, self.state_dir)
        reply, fds = _load_in_child(self.settings.map_entries, self.ports)
        self._fds = fds
        if not reply.get("ok"):
            self.close()
            raise AttributionError(str(reply.get("error", "the BPF loader failed")))
        key_size, value_size = int(reply["key_size"]), int(reply["value_size"])
        if (key_size, value_size) != (KEY_FORMAT.size, VALUE_FORMAT.size):
            self.close()
            raise AttributionError(
                f"map layout mismatch: key {key_size}/{KEY_FORMAT.size}, "
                f"value {value_size}/{VALUE_FORMAT.size}"
            )
        self._map_fd = fds[0]
        functions = [(fd, int(attach_type)) for fd, (_, attach_type)
                     in zip(fds[1:], reply["programs"], strict=True)]
        self._record(functions)
        with bpfsys.open_cgroup(self.cgroup_root) as cg:
            try:
                self._attach(cg, functions)
                self._record(functions)  # now with the mode, and the links' ids
            except OSError as e:
                self._detach_all(cg)
                self.close()
                (self.state_dir / STATE_FILE).unlink(missing_ok=True)
                raise AttributionError(
                    f"cannot attach to cgroup {self.cgroup_root}: {e.strerror or e}"
                ) from None

    def _attach(self, cg: int, functions: list[tuple[int, int]]) -> None:
        """Attach through BPF links (Linux 5.7 and later): the kernel detaches them when
        this process ends, so even a killed agent leaves nothing running on every
        connection of the host. Older kernels get the programs attached themselves,
        which the state file, the next start and ``ringfence cleanup`` take care of."""
        for fd, attach_type in functions:
            try:
                link = bpfsys.link_create(fd, cg, attach_type)
            except OSError as e:
                if self._links or e.errno not in _NO_CGROUP_LINKS:
                    raise
                log.info("no BPF links for cgroups on this kernel (%s): attaching the "
                         "programs themselves", e.strerror)
                break
            self._links.append(link)
            self._attached.append((fd, attach_type))
        else:
            self.attach_mode = "link"
            return
        for fd, attach_type in functions:
            bpfsys.prog_attach(fd, cg, attach_type, bpfsys.BPF_F_ALLOW_MULTI)
            self._attached.append((fd, attach_type))
        self.attach_mode = "program"

    def _record(self, functions: list[tuple[int, int]]) -> None:
        """Write the ids about to be attached (and the links, once made), so that what
        a run left attached can be found and detached after it."""
        programs = []
        for fd, attach_type in functions:
            info = bpfsys.prog_info(fd)
            programs.append(
                {
                    "id": info.id,
                    "name": info.name,
                    "attach_type": attach_type,
                    "load_time": info.load_time,
                }
            )
        links = []
        for fd in self._links:
            link = bpfsys.link_info(fd)
            links.append({"id": link.id, "prog_id": link.prog_id})
        state = {
            "boot_id": boot_id(),
            "pid": os.getpid(),
            "pid_start": _pid_start_ticks(os.getpid()),
            "cgroup_root": str(self.cgroup_root),
            "attach": self.attach_mode or "pending",
            "programs": programs,
            "links": links,
        }
        self.state_dir.mkdir(parents=True, exist_ok=True)
        path = self.state_dir / STATE_FILE
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(state, indent=1))
        tmp.replace(path)

    @property
    def program_ids(self) -> list[int]:
        return [bpfsys.prog_info(fd).id for fd, _ in self._attached]

    def lookup(self, key: bytes) -> KernelEntry | None:
        with self._lock:
            if self._map_fd < 0:
                return None
            raw = bpfsys.map_lookup(self._map_fd, key, VALUE_FORMAT.size)
        return KernelEntry.unpack(raw) if raw is not None else None

    def _close_links(self) -> None:
        """Closing the links detaches their programs; no cgroup descriptor is needed."""
        links, self._links = self._links, []
        for fd in links:
            with suppress(OSError):
                os.close(fd)
        self._attached = []

    def _detach_all(self, cg: int) -> None:
        if self._links:
            self._close_links()
            return
        while self._attached:
            fd, attach_type = self._attached.pop()
            try:
                bpfsys.prog_detach(fd, cg, attach_type)
            except OSError as e:
                log.warning("cannot detach BPF program (attach type %d): %s", attach_type, e)

    def stop(self) -> None:
        with self._lock:
            if self._links:
                self._close_links()
            elif self._attached:
                try:
                    with bpfsys.open_cgroup(self.cgroup_root) as cg:
                        self._detach_all(cg)
                except OSError as e:
                    log.warning("cannot open cgroup %s to detach: %s", self.cgroup_root, e)
            self._map_fd = -1
            self.close()
        (self.state_dir / STATE_FILE).unlink(missing_ok=True)

    def close(self) -> None:
        fds, self._fds = self._fds, []
        for fd in fds:
            with suppress(OSError):
                os.close(fd)


LOADER_TIMEOUT = 120.0


def _load_in_child(map_entries: int, ports: list[int]) -> tuple[dict[str, Any], list[int]]:
    """Run agent.bpf_loader in a child process; returns its reply and the descriptors it sent."""
    parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        with parent, child:
            proc = subprocess.Popen(
                [sys.executable, "-m", "agent.bpf_loader", str(child.fileno())],
                stdin=subprocess.PIPE, pass_fds=[child.fileno()], text=True,
            )
            child.close()
            assert proc.stdin is not None
            proc.stdin.write(json.dumps({"map_entries": map_entries, "ports": ports}))
            proc.stdin.close()
            parent.settimeout(LOADER_TIMEOUT)
            try:
                data, fds, _, _ = socket.recv_fds(parent, 65536, 16)
            except TimeoutError:
                proc.kill()
                raise AttributionError(
                    f"the BPF loader did not answer within {LOADER_TIMEOUT:.0f} s"
                ) from None
            code = proc.wait(LOADER_TIMEOUT)
    except OSError as e:
        raise AttributionError(f"cannot run the BPF loader: {e}") from None
    if not data:
        raise AttributionError(f"the BPF loader exited with status {code} without an answer")
    return json.loads(data), list(fds)


# --------------------------------------------------------------------------- sock_diag


SOCK_DIAG_BY_FAMILY = 20
NETLINK_SOCK_DIAG = 4
NLMSG_ERROR = 2
INET_DIAG_NOCOOKIE = 0xFFFFFFFFFFFFFFFF


@dataclass(frozen=True, slots=True)
class DiagSocketInfo:
    inode: int
    uid: int


def sock_diag_lookup(src: tuple[str, int], dst: tuple[str, int]) -> DiagSocketInfo | None:
    """The inode and owner uid of the TCP socket ``src`` → ``dst`` in this network namespace.

    One exact ``SOCK_DIAG_BY_FAMILY`` request (no dump), encoded with
    pyroute2's inet_diag schema.
    """
    from pyroute2.netlink import NLM_F_REQUEST
    from pyroute2.netlink.diag import inet_diag_msg, inet_diag_req

    s_addr, d_addr = normalize_address(src[0]), normalize_address(dst[0])
    if s_addr.version != d_addr.version:
        return None
    family = socket.AF_INET if s_addr.version == 4 else socket.AF_INET6
    req = inet_diag_req()
    req["header"]["type"] = SOCK_DIAG_BY_FAMILY
    req["header"]["flags"] = NLM_F_REQUEST
    req["header"]["sequence_number"] = 1
    req["header"]["pid"] = 0
    req["sdiag_family"] = family
    req["sdiag_protocol"] = socket.IPPROTO_TCP
    req["idiag_states"] = 0xFFFFFFFF
    req["idiag_sport"] = src[1]
    req["idiag_dport"] = dst[1]
    req["idiag_src"] = struct.unpack(">4I", s_addr.packed.ljust(16, b"\0"))
    req["idiag_dst"] = struct.unpack(">4I", d_addr.packed.ljust(16, b"\0"))
    req["idiag_cookie"] = INET_DIAG_NOCOOKIE
    req.encode()
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_SOCK_DIAG) as nl:
        nl.settimeout(2.0)
        nl.send(req.data)
        data = nl.recv(65536)
    if len(data) < 16:
        return None
    (msg_type,) = struct.unpack_from("=H", data, 4)
    if msg_type != SOCK_DIAG_BY_FAMILY:
        return None  # NLMSG_ERROR: no such socket (ENOENT) or not permitted
    msg = inet_diag_msg(data)
    msg.decode()
    return DiagSocketInfo(int(msg["idiag_inode"]), int(msg["idiag_uid"]))


# --------------------------------------------------------------------------- Attributor


class Attributor:
    """Attributes accepted connections to local processes."""

    def __init__(self, settings: BpfSettings, ports: Iterable[int], state_dir: Path) -> None:
        self.settings = settings
        self.ports = tuple(sorted(set(ports)))
        self.state_dir = Path(state_dir)
        self._mode = "off"
        self._degraded: str | None = None
        self._kernel: _KernelAttribution | None = None
        self._proc = ProcReader()
        self._lock = threading.Lock()

    # -- lifecycle

    def start(self) -> None:
        """Load and attach the BPF programs, or fall back to procfs as configured."""
        with self._lock:
            if self._mode != "off":
                return
            if self.settings.mode == "off":
                self._mode = "procfs"
                self._degraded = 'BPF attribution is disabled ([bpf] mode = "off")'
                log.info("attribution: procfs (%s)", self._degraded)
                return
            state_dir = self.state_dir.resolve()
            try:
                detach_stale(self.state_dir)
                kernel = _KernelAttribution(self.settings, self.ports, self.state_dir)
                kernel.load()
            except (AttributionError, kheaders.KernelHeadersError, OSError) as e:
                if self.settings.mode == "required":
                    raise AttributionError(
                        f'BPF attribution is required ([bpf] mode = "required") '
                        f"but cannot start: {e}"
                    ) from None
                self._mode = "procfs"
                self._degraded = f"BPF attribution unavailable ({e}); using procfs and sock_diag"
                log.warning("attribution: %s", self._degraded)
                return
            self._kernel = kernel
            self._mode = "bpf"
            with _ACTIVE_LOCK:
                _ACTIVE.add(state_dir)
            log.info(
                "attribution: bpf, programs %s attached to %s (%s) for ports %s",
                kernel.program_ids,
                kernel.cgroup_root,
                "through links" if kernel.attach_mode == "link" else "without links",
                ",".join(map(str, self.ports)),
            )

    def stop(self) -> None:
        """Detach the programs and close the map; safe to call more than once."""
        with self._lock:
            kernel, self._kernel = self._kernel, None
            self._mode = "off"
            if kernel is not None:
                kernel.stop()
                with _ACTIVE_LOCK:
                    _ACTIVE.discard(self.state_dir.resolve())

    def __enter__(self) -> Attributor:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def mode(self) -> str:
        return self._mode

    @property
    def degraded_reason(self) -> str | None:
        return self._degraded

    @property
    def program_ids(self) -> list[int]:
        """Ids of the attached programs (empty unless mode is "bpf")."""
        kernel = self._kernel
        return kernel.program_ids if kernel is not None else []

    @property
    def cgroup_root(self) -> Path | None:
        kernel = self._kernel
        return kernel.cgroup_root if kernel is not None else None

    # -- lookups

    def kernel_entry(self, netns: int, peer: tuple[str, int]) -> KernelEntry | None:
        """The BPF map entry of the client at ``peer`` in the network namespace ``netns``."""
        kernel = self._kernel
        if kernel is None:
            return None
        return kernel.lookup(map_key(netns, peer[0], peer[1]))

    def lookup(self, conn: socket.socket, original_dst: tuple[str, int]) -> AttributionRecord:
        """Attribute the accepted connection ``conn`` whose client dialled ``original_dst``.

        Call from a thread in ``conn``'s network namespace. Never raises for a
        client or process that is gone: the record says what is missing.
        """
        try:
            peer_raw = conn.getpeername()
            peer = (str(peer_raw[0]), int(peer_raw[1]))
            cookie = netns_cookie(conn)
        except OSError as e:
            return AttributionRecord("unknown", False, None, f"connection is gone: {e}")
        try:
            return self._lookup(conn, peer, cookie, original_dst)
        except Exception as e:  # attribution must never take a session down
            log.exception("attribution of %s failed", peer)
            return AttributionRecord(
                "unknown", False, None, f"attribution failed: {e}", netns_cookie=cookie
            )

    def _lookup(
        self,
        conn: socket.socket,
        peer: tuple[str, int],
        cookie: int,
        original_dst: tuple[str, int],
    ) -> AttributionRecord:
        reason = self._degraded
        if self._kernel is not None:
            entry = self._kernel.lookup(map_key(cookie, peer[0], peer[1]))
            if entry is not None:
                return self._from_kernel(entry, cookie, original_dst)
            reason = "no BPF map entry for this client (connected before attach, or untracked)"
        if not is_local_address(peer[0]):
            return AttributionRecord(
                "remote",
                False,
                None,
                f"client {peer[0]} is on another host or network namespace",
                netns_cookie=cookie,
            )
        return self._from_procfs(conn, peer, cookie, original_dst, reason)

    def _from_kernel(
        self, entry: KernelEntry, cookie: int, original_dst: tuple[str, int]
    ) -> AttributionRecord:
        verified = same_endpoint(entry.destination, original_dst)
        reasons: list[str] = []
        if not verified:
            reasons.append(
                f"BPF entry destination {entry.destination[0]}:{entry.destination[1]} "
                f"differs from the original destination {original_dst[0]}:{original_dst[1]}"
            )
        info = self._proc.process(entry.pid)
        if info is not None and _started_after(info, entry.ktime_ns):
            reasons.append(f"pid {entry.pid} was reused after the connect")
            info = None
        if info is None:
            if not reasons or "reused" not in reasons[-1]:
                reasons.append(f"process {entry.pid} exited before it could be read")
            process = _kernel_process(entry)
        else:
            process = process_dict(info, entry.tid)
            # The kernel's facts were taken inside connect(); they win over /proc's.
            process["uid"], process["gid"] = entry.uid, entry.gid
        return AttributionRecord(
            "bpf",
            verified,
            process,
            "; ".join(reasons) or None,
            netns_cookie=cookie,
            socket_cookie=entry.socket_cookie,
            cgroup_id=entry.cgroup_id,
        )

    def _from_procfs(
        self,
        conn: socket.socket,
        peer: tuple[str, int],
        cookie: int,
        original_dst: tuple[str, int],
        reason: str | None,
    ) -> AttributionRecord:
        verified = True
        found = sock_diag_lookup(peer, original_dst)
        if found is None:
            local = conn.getsockname()
            found = sock_diag_lookup(peer, (str(local[0]), int(local[1])))
            verified = False
        if found is None:
            return AttributionRecord(
                "unknown", False, None, _join(reason, "client socket not found by sock_diag"),
                netns_cookie=cookie,
            )
        pid = self._proc.find_socket_owner(found.inode, found.uid)
        info = self._proc.process(pid) if pid is not None else None
        if info is None:
            return AttributionRecord(
                "unknown",
                False,
                None,
                _join(reason, f"no process holds socket inode {found.inode} (uid {found.uid})"),
                netns_cookie=cookie,
            )
        return AttributionRecord(
            "procfs", verified, process_dict(info), reason, netns_cookie=cookie
        )


def _join(*parts: str | None) -> str:
    return "; ".join(p for p in parts if p)


def _started_after(info: ProcessInfo, ktime_ns: int) -> bool:
    start = info.start_boot_ns
    return start is not None and start > ktime_ns + PID_REUSE_SLACK_NS


def _kernel_process(entry: KernelEntry) -> dict[str, Any]:
    """The process facts the kernel recorded, for a process /proc no longer shows."""
    return {
        "pid": entry.pid,
        "tid": entry.tid,
        "uid": entry.uid,
        "gid": entry.gid,
        "euid": None,
        "egid": None,
        "loginuid": None,
        "audit_session": None,
        "comm": entry.comm,
        "exe": None,
        "cmdline": None,
        "tty": None,
        "cgroup": None,
        "unit": None,
        "container_id": None,
        "start_time": None,
        "ancestry": [],
    }


# --------------------------------------------------------------------------- doctor


@dataclass(frozen=True, slots=True)
class Check:
    """One line of ``ringfence doctor``."""

    name: str
    ok: bool
    detail: str
    fix: str | None = None


def doctor_checks(settings: BpfSettings, state_dir: Path) -> list[Check]:
    """Whether BPF attribution can run here, and how to fix what is missing."""
    checks = [_check_headers(settings), _check_btf()]
    cgroup = _check_cgroup(settings)
    checks.append(cgroup)
    if cgroup.ok:
        root = resolve_cgroup_root(settings.cgroup_root)
        checks.append(_check_attach(root))
        checks.append(_check_attached(root))
    if checks[0].ok:
        checks.append(_check_compile(settings, state_dir))
    return checks


def _check_headers(settings: BpfSettings) -> Check:
    try:
        headers = kheaders.resolve_kernel_headers(settings.kernel_headers)
    except kheaders.KernelHeadersError as e:
        return Check("kernel headers", False, str(e), kheaders.install_hint())
    where = str(headers.build) if not headers.split else f"{headers.build} + {headers.source}"
    detail = f"{headers.release or 'unknown release'} at {where}"
    if not headers.exact:
        detail += (
            f"; not the running kernel {headers.running}, which is safe: "
            "only UAPI contexts are read"
        )
    return Check("kernel headers", True, detail)


def _check_btf() -> Check:
    path = Path("/sys/kernel/btf/vmlinux")
    if path.exists():
        return Check("btf", True, f"{path} present")
    return Check(
        "btf",
        False,
        f"{path} missing (optional: ringfence's programs read UAPI contexts only)",
        "use a kernel built with CONFIG_DEBUG_INFO_BTF=y",
    )


def _check_cgroup(settings: BpfSettings) -> Check:
    try:
        root = resolve_cgroup_root(settings.cgroup_root)
    except (AttributionError, OSError) as e:
        return Check("cgroup v2", False, str(e), "mount -t cgroup2 none /sys/fs/cgroup")
    try:
        fs_type = _mount_type(root)
    except OSError as e:
        return Check("cgroup v2", False, f"{root}: {e}", "set [bpf] cgroup_root to a cgroup2 mount")
    if fs_type != "cgroup2":
        return Check(
            "cgroup v2", False, f"{root} is not a cgroup2 mount", "set [bpf] cgroup_root = \"auto\""
        )
    return Check("cgroup v2", True, f"mounted at {root}")


def _mount_type(path: Path) -> str | None:
    resolved = str(path.resolve())
    for line in Path("/proc/mounts").read_text().splitlines():
        fields = line.split()
        if len(fields) >= 3 and fields[1].replace("\\040", " ") == resolved:
            return fields[2]
    return None


def _check_attach(root: Path) -> Check:
    """Load, attach and detach a trivial program of each type the agent uses, through a
    link and without one (the agent's fallback on kernels without cgroup links)."""
    done: list[str] = []
    links = True
    try:
        with bpfsys.open_cgroup(root) as cg:
            for _, prog_type, attach_type in PROGRAMS:
                expected = attach_type if prog_type == bpfsys.BPF_PROG_TYPE_CGROUP_SOCK_ADDR else 0
                fd = bpfsys.prog_load(prog_type, bpfsys.RETURN_ONE, "ringfence_probe", expected)
                try:
                    bpfsys.prog_attach(fd, cg, attach_type, bpfsys.BPF_F_ALLOW_MULTI)
                    bpfsys.prog_detach(fd, cg, attach_type)
                    try:
                        os.close(bpfsys.link_create(fd, cg, attach_type))
                    except OSError as e:
                        if e.errno not in _NO_CGROUP_LINKS:
                            raise
                        links = False
                finally:
                    os.close(fd)
                done.append(bpfsys.ATTRIBUTION_ATTACH_TYPES[attach_type])
    except OSError as e:
        return Check(
            "bpf attach",
            False,
            f"bpf(2) failed after {done or 'nothing'}: {e.strerror or e}",
            "run the agent as root (or with CAP_BPF, CAP_NET_ADMIN and CAP_SYS_ADMIN); "
            "check kernel.unprivileged_bpf_disabled and lockdown",
        )
    how = ("through links too: a killed agent's programs go with it" if links else
           "no cgroup links (Linux before 5.7): a killed agent's programs stay attached "
           "until `ringfence cleanup` or its next start")
    return Check("bpf attach", True,
                 f"test programs attached and detached on {root}: {', '.join(done)}; {how}")


def _check_attached(root: Path) -> Check:
    try:
        found = ringfence_programs(root)
    except OSError as e:
        return Check("ringfence programs", False, f"cannot query {root}: {e.strerror or e}")
    if not found:
        return Check("ringfence programs", True, f"none attached to {root}")
    shown = ", ".join(f"{name} (id {pid})" for _, pid, name in found)
    return Check("ringfence programs", True, f"{len(found)} attached to {root}: {shown}")


def _check_compile(settings: BpfSettings, state_dir: Path) -> Check:
    try:
        from bcc import BPF
    except ImportError as e:
        return Check("bpf compile", False, f"BCC not importable: {e}", "apt-get install python3-bpfcc")
    try:
        kheaders.prepare_for_bcc(settings.kernel_headers, state_dir)
        bcc = BPF(src_file=str(source_path(BPF_SOURCE)).encode(), cflags=["-w"])
        try:
            for name, prog_type, attach_type in PROGRAMS:
                bcc.load_func(name.encode(), prog_type, attach_type=attach_type)
        finally:
            bcc.cleanup()
    except Exception as e:
        return Check("bpf compile", False, f"{BPF_SOURCE}: {e}", kheaders.install_hint())
    return Check("bpf compile", True, f"{BPF_SOURCE} compiles and loads")

