"""The audit store on a tiny tmpfs: a full disk is reported, counted, survived and verified."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from audit.checkpoint import Signer
from audit.errors import AuditUnavailable
from audit.log import AuditLog
from audit.store import Store
from audit.verify import verify
from tests.conftest import require

ORIGIN = "full.host/ringfence/audit"


@pytest.fixture
def small_tmpfs(tmp_path: Path) -> Iterator[Path]:
    require(os.geteuid() == 0, "root (to mount a tmpfs)")
    require(shutil.which("mount") is not None, "mount(8)")
    mnt = tmp_path / "tmpfs"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mnt)], check=True)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def fill(path: Path) -> None:
    with open(path, "wb") as f:
        try:
            while True:
                f.write(b"\0" * 65536)
                f.flush()
        except OSError:
            pass


def thread_cpu_seconds(log: AuditLog) -> float:
    """CPU time used so far by the log's writer thread (Linux /proc)."""
    tid = log._thread.native_id
    fields = Path(f"/proc/self/task/{tid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def wait_for(cond: object, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():  # type: ignore[operator]
            return True
        time.sleep(0.01)
    return False


def test_full_disk_is_reported_counted_and_recovered(small_tmpfs: Path) -> None:
    """A full disk makes the log unhealthy and refuses appends; after space returns it resumes,
    writes an audit.loss record with the count, keeps earlier records, and verifies."""
    signer = Signer.generate(ORIGIN)
    log = AuditLog(
        small_tmpfs / "audit",
        host="full.host",
        signer=signer,
        origin=ORIGIN,
        queue_size=256,
        batch_max_records=64,
        batch_max_delay_ms=1.0,
        retry_interval_ms=20.0,
        checkpoint_every_records=50,
    )
    try:
        for i in range(200):
            log.emit("query", {"text": f"before {i}"}, session_id="s")
        assert log.flush(10)
        with Store(small_tmpfs / "audit") as store:
            committed_before = store.next_seq()
        assert log.healthy

        filler = small_tmpfs / "filler"
        fill(filler)

        accepted = refused = 0
        deadline = time.monotonic() + 30
        while log.healthy and time.monotonic() < deadline:
            try:
                log.emit("query", {"text": "x" * 300}, session_id="s")
                accepted += 1
            except AuditUnavailable:
                refused += 1
        assert not log.healthy, "the store never reported the full disk"
        with pytest.raises(AuditUnavailable):
            log.emit("query", {"text": "refused"}, session_id="s")
        refused += 1

        async def strict() -> int:
            return await log.emit_durable("policy.decision", {"action": "deny"}, session_id="s")

        with pytest.raises(AuditUnavailable):
            asyncio.run(strict())
        refused += 1
        assert log.flush(10)

        with Store(small_tmpfs / "audit") as store:
            kept = list(store.iter_records(0, committed_before))
        assert [r.event["text"] for r in kept if r.type == "query"] == [f"before {i}" for i in range(200)]

        # While failing, the writer waits between retries instead of spinning.
        cpu0 = thread_cpu_seconds(log)
        time.sleep(0.5)
        assert thread_cpu_seconds(log) - cpu0 < 0.25, "the writer spins while the store fails"

        filler.unlink()
        assert wait_for(lambda: log.healthy), "writing did not resume after space returned"
        seq = log.emit_durable_sync("agent.stop", {"reason": "after recovery"})
        assert seq > committed_before
    finally:
        log.close()

    with Store(small_tmpfs / "audit") as store:
        records = list(store.iter_records())
        report = verify(store, signer.verifier, origin=ORIGIN)
    assert report.ok, str(report.problem)
    losses = [r for r in records if r.type == "audit.loss"]
    assert len(losses) == 1
    written_after_fill = sum(1 for r in records if r.type == "query" and r.event["text"] == "x" * 300)
    assert losses[0].event["lost"] == accepted + refused - written_after_fill
    assert losses[0].event["lost"] >= refused
    assert "No space left" in losses[0].event["reason"]
    assert records[-1].type == "checkpoint"
    assert any(r.type == "agent.stop" for r in records)


def test_writing_resumes_only_with_room_to_write(small_tmpfs: Path) -> None:
    """After a full disk, a few kilobytes freed are not enough to resume (the next batches
    would fail and be lost again): the log stays unhealthy, saying it waits for space; with
    the space back it resumes and writes one audit.loss record."""
    signer = Signer.generate(ORIGIN)
    log = AuditLog(small_tmpfs / "audit", host="full.host", signer=signer, origin=ORIGIN,
                   queue_size=256, batch_max_records=64, batch_max_delay_ms=1.0,
                   retry_interval_ms=20.0)
    try:
        filler = small_tmpfs / "filler"
        fill(filler)
        deadline = time.monotonic() + 30
        while log.healthy and time.monotonic() < deadline:
            with contextlib.suppress(AuditUnavailable):
                log.emit("query", {"text": "x" * 300}, session_id="s")
        assert not log.healthy, "the store never reported the full disk"
        os.truncate(filler, filler.stat().st_size - 16 * 1024)  # 16 KiB back: under 1 % of 4 MiB
        time.sleep(0.5)  # some 25 retries
        assert not log.healthy
        assert "waiting for free space" in (log.failure or "")
        filler.unlink()
        assert wait_for(lambda: log.healthy), "writing did not resume after space returned"
    finally:
        log.close()
    with Store(small_tmpfs / "audit") as store:
        records = list(store.iter_records())
        assert verify(store, signer.verifier, origin=ORIGIN).ok
    assert [r.type for r in records].count("audit.loss") == 1
