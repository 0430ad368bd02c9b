"""Pure parts of attribution: map keys and values, addresses, cgroup mounts, records."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest

from agent.attribution import (
    KEY_FORMAT,
    VALUE_FORMAT,
    AttributionError,
    AttributionRecord,
    Attributor,
    KernelEntry,
    detach_stale,
    find_cgroup2_mount,
    is_local_address,
    map_key,
    normalize_address,
    same_endpoint,
)
from agent.config import BpfSettings


def test_layouts_match_the_c_structs() -> None:
    """struct rf_key is 32 bytes and struct rf_value 80 (the loader also checks against BCC)."""
    assert (KEY_FORMAT.size, VALUE_FORMAT.size) == (32, 80)


def test_ipv4_mapped_peers_use_ipv4_keys() -> None:
    """::ffff:127.0.0.1 and 127.0.0.1 give the same key; IPv6 keeps family 10 and scope is dropped."""
    assert map_key(7, "::ffff:127.0.0.1", 5000) == map_key(7, "127.0.0.1", 5000)
    cookie, family, port, _, addr = KEY_FORMAT.unpack(map_key(7, "127.0.0.1", 5000))
    assert (cookie, family, port, addr) == (7, socket.AF_INET, 5000, bytes([127, 0, 0, 1]) + bytes(12))
    _, family6, _, _, addr6 = KEY_FORMAT.unpack(map_key(7, "fe80::1%eth0", 5000))
    assert family6 == socket.AF_INET6 and addr6 == socket.inet_pton(socket.AF_INET6, "fe80::1")
    assert str(normalize_address("::ffff:10.0.0.5")) == "10.0.0.5"


def test_kernel_entry_unpacks() -> None:
    """A raw map value decodes into process facts and the dialled destination."""
    raw = VALUE_FORMAT.pack(
        11, 22, 33, 100, 101, 1000, 1001, b"psql\0\0", socket.AF_INET6, 5432, 0,
        socket.inet_pton(socket.AF_INET6, "::1"),
    )
    entry = KernelEntry.unpack(raw)
    assert (entry.socket_cookie, entry.ktime_ns, entry.cgroup_id) == (11, 22, 33)
    assert (entry.pid, entry.tid, entry.uid, entry.gid, entry.comm) == (100, 101, 1000, 1001, "psql")
    assert entry.destination == ("::1", 5432)


def test_same_endpoint() -> None:
    """Destinations compare as addresses, IPv4-mapped equal to IPv4; ports must match."""
    assert same_endpoint(("::ffff:10.1.2.3", 5432), ("10.1.2.3", 5432))
    assert not same_endpoint(("10.1.2.3", 5432), ("10.1.2.3", 5433))
    assert not same_endpoint(("10.1.2.3", 5432), ("not-an-ip", 5432))


def test_loopback_is_local_and_documentation_range_is_not() -> None:
    """is_local_address checks the calling thread's namespace by binding."""
    assert is_local_address("127.0.0.5")
    assert is_local_address("::ffff:127.0.0.1")
    assert not is_local_address("192.0.2.77")


def test_cgroup2_mount_from_proc_mounts() -> None:
    """The cgroup2 mount is found wherever it is; /sys/fs/cgroup wins; none is an error."""
    hybrid = (
        "tmpfs /sys/fs/cgroup tmpfs rw 0 0\n"
        "cgroup /sys/fs/cgroup/cpu cgroup rw,cpu 0 0\n"
        "cgroup2 /sys/fs/cgroup/unified cgroup2 rw 0 0\n"
    )
    assert find_cgroup2_mount(hybrid) == Path("/sys/fs/cgroup/unified")
    both = "cgroup2 /mnt/cg cgroup2 rw 0 0\ncgroup2 /sys/fs/cgroup cgroup2 rw 0 0\n"
    assert find_cgroup2_mount(both) == Path("/sys/fs/cgroup")
    with pytest.raises(AttributionError, match="cgroup_root"):
        find_cgroup2_mount("proc /proc proc rw 0 0\n")


def test_record_fields() -> None:
    """to_record() gives session.start's process and attribution fields; None values are left out."""
    record = AttributionRecord("bpf", True, {"pid": 1}, None, netns_cookie=3, socket_cookie=9,
                               cgroup_id=1)
    process, attribution = record.to_record()
    assert process == {"pid": 1}
    assert attribution == {
        "source": "bpf", "verified": True, "netns_cookie": 3, "socket_cookie": 9, "cgroup_id": 1,
    }
    _, unknown = AttributionRecord("unknown", False, None, "client gone").to_record()
    assert unknown == {"source": "unknown", "verified": False, "reason": "client gone"}


def test_unreadable_state_file_is_dropped(tmp_path: Path) -> None:
    """A corrupt attachment record is removed, not trusted."""
    (tmp_path / "bpf-attachments.json").write_text("{not json")
    assert detach_stale(tmp_path) == 0
    assert not (tmp_path / "bpf-attachments.json").exists()
    assert detach_stale(tmp_path) == 0


def test_state_file_from_before_a_reboot_is_dropped(tmp_path: Path) -> None:
    """Attachments never survive a reboot, so a record with another boot id is just removed."""
    state = {
        "boot_id": "00000000-0000-0000-0000-000000000000",
        "pid": 1,
        "pid_start": 0,
        "cgroup_root": "/nonexistent",
        "programs": [{"id": 1, "attach_type": 3, "load_time": 5}],
    }
    (tmp_path / "bpf-attachments.json").write_text(json.dumps(state))
    assert detach_stale(tmp_path) == 0
    assert not (tmp_path / "bpf-attachments.json").exists()


def test_mode_off_needs_no_privileges(tmp_path: Path) -> None:
    """mode off starts as procfs without touching BPF, and says why in degraded_reason."""
    attributor = Attributor(BpfSettings(mode="off"), [5432], tmp_path)
    assert attributor.mode == "off"
    attributor.start()
    assert attributor.mode == "procfs"
    assert attributor.degraded_reason == 'BPF attribution is disabled ([bpf] mode = "off")'
    assert attributor.program_ids == []
    attributor.stop()
    attributor.stop()


def test_lookup_of_a_dead_connection_is_unknown(tmp_path: Path) -> None:
    """A socket that is no longer connected yields source unknown with a reason, no exception."""
    attributor = Attributor(BpfSettings(mode="off"), [5432], tmp_path)
    attributor.start()
    with socket.socket() as s:
        record = attributor.lookup(s, ("127.0.0.1", 5432))
    assert record.source == "unknown" and not record.verified
    assert record.reason and "gone" in record.reason
