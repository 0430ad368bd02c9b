"""Attaching, detaching and cleaning up after killed runs on the shared cgroup root."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
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

# Starts an Attributor, prints its program ids, then waits to be killed. With
# "program" it runs as on a kernel without cgroup links (before Linux 5.7).
ABANDONED_RUN = """
import errno, json, sys, time
from pathlib import Path
from agent import bpfsys
from agent.attribution import Attributor
from agent.config import BpfSettings
if sys.argv[3] == "program":
    def no_cgroup_links(*args):
        raise OSError(errno.EINVAL, "Invalid argument")
    bpfsys.link_create = no_cgroup_links
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
        assert state["attach"] == "link", "this kernel has cgroup links"
        assert {link["prog_id"] for link in state["links"]} == ids
    finally:
        attributor.stop()
    assert not ids & attached_ids(cgroup_root)
    assert not (tmp_path / STATE_FILE).exists()
    attributor.stop()  # idempotent
    assert attributor.mode == "off"


def kill_run(cgroup_root: Path, state_dir: Path, mode: str) -> set[int]:
    """Start ABANDONED_RUN, SIGKILL it once attached; the ids of its programs."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    child = subprocess.Popen(
        [sys.executable, "-c", ABANDONED_RUN, str(state_dir), str(PORT), mode],
        stdout=subprocess.PIPE, text=True, env=env,
    )
    try:
        assert child.stdout is not None
        ids = set(json.loads(child.stdout.readline()))
        assert len(ids) == 3 and ids <= attached_ids(cgroup_root)
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=10)
    return ids


def test_killed_run_leaves_no_program_attached(cgroup_root: Path, tmp_path: Path) -> None:
    """Attached through links, a SIGKILLed agent's programs go with its process: nothing
    keeps running on the host's connections until someone cleans up."""
    killed = kill_run(cgroup_root, tmp_path, "link")
    deadline = time.monotonic() + 5
    while killed & attached_ids(cgroup_root) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not killed & attached_ids(cgroup_root)
    attributor = Attributor(BpfSettings(mode="required"), [PORT], tmp_path)
    attributor.start()
    try:
        assert set(attributor.program_ids) <= attached_ids(cgroup_root)
    finally:
        attributor.stop()


def test_killed_run_without_links_is_cleaned_up_by_the_next_run(
    cgroup_root: Path, tmp_path: Path
) -> None:
    """Without cgroup links (kernels before 5.7) the programs themselves are attached: a
    SIGKILLed agent leaves them, and the next start with the same state_dir detaches them."""
    stale = kill_run(cgroup_root, tmp_path, "program")
    assert json.loads((tmp_path / STATE_FILE).read_text())["attach"] == "program"
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


def test_clean_all_detaches_running_and_left_programs(cgroup_root: Path, tmp_path: Path) -> None:
    """`ringfence bpf clean --all` (what package removal runs) detaches every ringfence
    program: a running agent's links and a killed link-less run's programs alike."""
    left = kill_run(cgroup_root, tmp_path / "left", "program")
    running = Attributor(BpfSettings(mode="required"), [PORT], tmp_path / "running")
    running.start()
    try:
        held = set(running.program_ids)
        assert left | held <= attached_ids(cgroup_root)
        done = subprocess.run([sys.executable, "-m", "agent.cli", "bpf", "clean", "--all"],
                              capture_output=True, text=True, timeout=120,
                              env=dict(os.environ, PYTHONPATH=str(ROOT)))
        assert done.returncode == 0, done.stderr
        assert not (left | held) & attached_ids(cgroup_root)
        assert "detached" in done.stdout and int(done.stdout.split()[1]) >= 6, done.stdout
    finally:
        running.stop()


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
    # Forget it without stop(), as a crash would; its links stay open in this process.
    kernel, abandoned._kernel = abandoned._kernel, None
    assert kernel is not None and kernel.attach_mode == "link"
    from agent import attribution

    attribution._ACTIVE.discard(tmp_path.resolve())
    successor = Attributor(BpfSettings(mode="required"), [PORT], tmp_path)
    successor.start()
    try:
        assert not stale & attached_ids(cgroup_root)
    finally:
        successor.stop()
        kernel.stop()


def test_recorded_program_replaced_under_the_same_id_is_kept(
    cgroup_root: Path, tmp_path: Path
) -> None:
    """A recorded id whose load time differs names another program: it is not detached."""
    from agent import attribution

    abandoned = Attributor(BpfSettings(mode="required"), [PORT], tmp_path)
    abandoned.start()
    kept = set(abandoned.program_ids)
    kernel, abandoned._kernel = abandoned._kernel, None
    assert kernel is not None
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
        kernel.stop()  # closes its links
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
    assert "through links too" in checks["bpf attach"].detail
    # The probe programs are gone again.
    assert not any(name == "ringfence_probe" for _, _, name in ringfence_programs(cgroup_root))


def test_doctor_reports_missing_headers(cgroup_root: Path, tmp_path: Path) -> None:
    """A headers path that does not exist is a failed check with an install hint."""
    settings = BpfSettings(kernel_headers=str(tmp_path / "nothing"))
    checks = {c.name: c for c in doctor_checks(settings, tmp_path)}
    assert not checks["kernel headers"].ok
    assert checks["kernel headers"].fix and "linux-headers" in checks["kernel headers"].fix
    assert "bpf compile" not in checks
