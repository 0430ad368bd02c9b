"""Attaching, detaching and cleaning up after killed runs on the shared cgroup root."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from agent.attribution import (
    STATE_FILE,
    AttributionError,
    Attributor,
    doctor_checks,
    find_cgroup2_mount,
    ringfence_programs,
)
from agent.config import BpfSettings
from tests.conftest import ROOT, require
from tests.integration.attribution.conftest import PORT

# Starts an Attributor, prints its program ids, then waits to be killed.
ABANDONED_RUN = """
import json, sys, time
from pathlib import Path
from agent.attribution import Attributor
from agent.config import BpfSettings
a = Attributor(BpfSettings(mode="required"), [int(sys.argv[2])], Path(sys.argv[1]))
a.start()
print(json.dumps(a.program_ids), flush=True)
time.sleep(600)
"""


@pytest.fixture
def cgroup_root() -> Path:
    require(os.geteuid() == 0, "root")
    return find_cgroup2_mount()


def attached_ids(root: Path) -> set[int]:
    return {prog_id for _, prog_id, _ in ringfence_programs(root)}


def test_stop_detaches_this_runs_programs(cgroup_root: Path, tmp_path: Path) -> None:
    """start() attaches three ringfence_* programs with ALLOW_MULTI; stop() removes them all."""
    attributor = Attributor(BpfSettings(mode="required"), [PORT], tmp_path)
    attributor.start()
    ids = set(attributor.program_ids)
    try:
        assert len(ids) == 3
        names = {name for _, prog_id, name in ringfence_programs(cgroup_root) if prog_id in ids}
        assert names == {"ringfence_c4", "ringfence_c6", "ringfence_sops"}
        state = json.loads((tmp_path / STATE_FILE).read_text())
        assert state["pid"] == os.getpid()
        assert {p["id"] for p in state["programs"]} == ids
    finally:
        attributor.stop()
    assert not ids & attached_ids(cgroup_root)
    assert not (tmp_path / STATE_FILE).exists()
    attributor.stop()  # idempotent
    assert attributor.mode == "off"


def test_killed_run_is_cleaned_up_by_the_next_run(cgroup_root: Path, tmp_path: Path) -> None:
    """Programs left by a SIGKILLed agent are detached by the next start with the same state_dir."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    child = subprocess.Popen(
        [sys.executable, "-c", ABANDONED_RUN, str(tmp_path), str(PORT)],
        stdout=subprocess.PIPE, text=True, env=env,
    )
    try:
        assert child.stdout is not None
        stale = set(json.loads(child.stdout.readline()))
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=10)
    assert len(stale) == 3
    assert stale <= attached_ids(cgroup_root), "a killed run's programs stay attached"

    attributor = Attributor(BpfSettings(mode="required"), [PORT], tmp_path)
    attributor.start()
    fresh = set(attributor.program_ids)
    try:
        attached = attached_ids(cgroup_root)
        assert not stale & attached
        assert fresh <= attached
    finally:
        attributor.stop()
    assert not (stale | fresh) & attached_ids(cgroup_root)


def test_programs_of_other_state_dirs_are_left_alone(cgroup_root: Path, tmp_path: Path) -> None:
    """Agents in other namespaces share the cgroup root: a start or stop touches only its own."""
    first = Attributor(BpfSettings(mode="required"), [PORT], tmp_path / "a")
    second = Attributor(BpfSettings(mode="required"), [PORT], tmp_path / "b")
    first.start()
    try:
        second.start()
        try:
            assert set(first.program_ids) | set(second.program_ids) <= attached_ids(cgroup_root)
        finally:
            second.stop()
        assert set(first.program_ids) <= attached_ids(cgroup_root)
        assert not set(second.program_ids) & attached_ids(cgroup_root)
    finally:
        first.stop()


def test_abandoned_attributor_in_this_process_is_stale(cgroup_root: Path, tmp_path: Path) -> None:
    """A state file naming this very process but no running Attributor is treated as stale."""
    abandoned = Attributor(BpfSettings(mode="required"), [PORT], tmp_path)
    abandoned.start()
    stale = set(abandoned.program_ids)
    abandoned._kernel = None  # forget it without stop(), as a crash would
    from agent import attribution

    attribution._ACTIVE.discard(tmp_path.resolve())
    successor = Attributor(BpfSettings(mode="required"), [PORT], tmp_path)
    successor.start()
    try:
        assert not stale & attached_ids(cgroup_root)
    finally:
        successor.stop()


def test_recorded_program_replaced_under_the_same_id_is_kept(
    cgroup_root: Path, tmp_path: Path
) -> None:
    """A recorded id whose load time differs names another program: it is not detached."""
    from agent import attribution, bpfsys

    abandoned = Attributor(BpfSettings(mode="required"), [PORT], tmp_path)
    abandoned.start()
    kept = set(abandoned.program_ids)
    abandoned._kernel = None
    attribution._ACTIVE.discard(tmp_path.resolve())
    path = tmp_path / STATE_FILE
    state = json.loads(path.read_text())
    for program in state["programs"]:
        program["load_time"] += 1
    path.write_text(json.dumps(state))
    successor = Attributor(BpfSettings(mode="required"), [PORT], tmp_path)
    successor.start()
    try:
        assert kept <= attached_ids(cgroup_root)
    finally:
        successor.stop()
        with bpfsys.open_cgroup(cgroup_root) as cg:
            for attach_type, prog_id, _ in ringfence_programs(cgroup_root):
                if prog_id in kept:
                    bpfsys.prog_detach_by_id(prog_id, cg, attach_type)
    assert not kept & attached_ids(cgroup_root)


def test_missing_headers_fall_back_or_refuse(cgroup_root: Path, tmp_path: Path) -> None:
    """No kernel headers: mode auto degrades to procfs and says why; required refuses to start."""
    bad = str(tmp_path / "no-headers-here")
    auto = Attributor(BpfSettings(mode="auto", kernel_headers=bad), [PORT], tmp_path / "s1")
    auto.start()
    try:
        assert auto.mode == "procfs"
        assert auto.degraded_reason is not None
        assert "kernel_headers" in auto.degraded_reason
        assert "linux-headers" in auto.degraded_reason
    finally:
        auto.stop()
    required = Attributor(BpfSettings(mode="required", kernel_headers=bad), [PORT], tmp_path / "s2")
    with pytest.raises(AttributionError, match="required"):
        required.start()
    assert required.mode == "off"


def test_doctor_checks_pass_on_this_host(cgroup_root: Path, tmp_path: Path) -> None:
    """doctor_checks() runs a real attach/detach and a real compile, and reports what is attached."""
    checks = {c.name: c for c in doctor_checks(BpfSettings(), tmp_path)}
    assert set(checks) >= {
        "kernel headers", "btf", "cgroup v2", "bpf attach", "ringfence programs", "bpf compile"
    }
    for name in ("kernel headers", "cgroup v2", "bpf attach", "bpf compile"):
        assert checks[name].ok, checks[name]
    assert str(cgroup_root) in checks["cgroup v2"].detail
    # The probe programs are gone again.
    assert not any(name == "ringfence_probe" for _, _, name in ringfence_programs(cgroup_root))


def test_doctor_reports_missing_headers(cgroup_root: Path, tmp_path: Path) -> None:
    """A headers path that does not exist is a failed check with an install hint."""
    settings = BpfSettings(kernel_headers=str(tmp_path / "nothing"))
    checks = {c.name: c for c in doctor_checks(settings, tmp_path)}
    assert not checks["kernel headers"].ok
    assert checks["kernel headers"].fix and "linux-headers" in checks["kernel headers"].fix
    assert "bpf compile" not in checks
