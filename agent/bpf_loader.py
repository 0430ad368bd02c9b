"""Compile and load the attribution programs in a short-lived child process.

BCC compiles with LLVM, which leaves well over 100 MB in the process that
did it. The agent therefore runs this module as a child: it compiles
``bpf/attribution.bpf.c``, loads the programs, fills the ports map, and
hands the map and program file descriptors back over a Unix socket
(SCM_RIGHTS) before it exits. The agent attaches the programs and reads the
map through those descriptors, never importing BCC itself.

Run as ``python -m agent.bpf_loader FD`` with a JSON request on stdin:
``{"map_entries": N, "ports": [...]}``; ``BCC_KERNEL_SOURCE`` set as
:mod:`agent.kheaders` prepared it. The reply on the socket is JSON
(``{"ok": true, "key_size", "value_size", "programs": [[name, attach_type]…]}``
with the descriptors: the map's first, then the programs', or
``{"ok": false, "error": "…"}`` without any).
"""

from __future__ import annotations

import ctypes
import json
import socket
import sys
from typing import Any

from agent import bpfsys
from bpf import source_path

BPF_SOURCE = "attribution.bpf.c"
# (function in the C source, program type, attach type)
PROGRAMS = (
    ("ringfence_sops", bpfsys.BPF_PROG_TYPE_SOCK_OPS, bpfsys.BPF_CGROUP_SOCK_OPS),
    ("ringfence_c4", bpfsys.BPF_PROG_TYPE_CGROUP_SOCK_ADDR, bpfsys.BPF_CGROUP_INET4_CONNECT),
    ("ringfence_c6", bpfsys.BPF_PROG_TYPE_CGROUP_SOCK_ADDR, bpfsys.BPF_CGROUP_INET6_CONNECT),
)


def load(request: dict[str, Any]) -> tuple[dict[str, Any], list[int]]:
    """Compile and load; returns the reply and the descriptors to send."""
    try:
        from bcc import BPF
    except ImportError as e:
        return {"ok": False, "error": (
            f"the BCC Python module is not installed ({e}); install python3-bpfcc "
            "(Debian/Ubuntu) or python3-bcc (Fedora/RHEL)")}, []
    entries = int(request["map_entries"])
    cflags = [f"-DRF_MAP_ENTRIES={entries}", f"-DRF_PENDING_ENTRIES={max(1024, entries // 8)}", "-w"]
    try:
        bcc = BPF(src_file=str(source_path(BPF_SOURCE)).encode(), cflags=cflags)
        functions = [
            (bcc.load_func(name.encode(), prog_type, attach_type=attach_type), name, attach_type)
            for name, prog_type, attach_type in PROGRAMS
        ]
    except Exception as e:  # BCC raises bare Exception for compile and load errors
        return {"ok": False, "error": f"cannot compile or load {BPF_SOURCE}: {e}"}, []
    table = bcc[b"rf_attrib"]
    ports = bcc[b"rf_ports"]
    for port in request["ports"]:
        ports[ctypes.c_uint16(int(port))] = ctypes.c_uint8(1)
    reply = {
        "ok": True,
        "key_size": ctypes.sizeof(table.Key),
        "value_size": ctypes.sizeof(table.Leaf),
        "programs": [[name, attach_type] for _, name, attach_type in functions],
    }
    return reply, [int(table.map_fd), *(int(fn.fd) for fn, _, _ in functions)]


def main() -> None:
    sock = socket.socket(fileno=int(sys.argv[1]))
    reply, fds = load(json.loads(sys.stdin.read()))
    socket.send_fds(sock, [json.dumps(reply).encode()], fds)
    sock.close()


if __name__ == "__main__":
    main()
