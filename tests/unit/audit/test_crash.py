"""A writer killed with SIGKILL mid-stream: the store reopens, verifies and continues the chain."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

from audit.checkpoint import Signer
from audit.merkle import leaf_hash
from audit.store import Store
from audit.verify import verify
from tests.unit.audit.conftest import ORIGIN, ROOT_DIR, make_log

CHILD = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from audit.checkpoint import Signer
    from audit.log import AuditLog
    log = AuditLog(Path(sys.argv[1]), host="test.host", origin=sys.argv[3],
                   signer=Signer.parse(Path(sys.argv[2]).read_text()),
                   checkpoint_every_records=500, batch_max_records=256)
    i = 0
    while True:
        for _ in range(200):
            log.emit("query", {"text": f"select {i}"}, session_id="load")
            i += 1
        seq = log.emit_durable_sync("policy.decision", {"action": "allow", "i": i},
                                    session_id="load")
        print(seq, flush=True)
    """
)


def test_sigkill_loses_nothing_durable_and_restart_continues(
    audit_dir: Path, signer: Signer, key_path: Path
) -> None:
    """Every seq a strict emit returned survives SIGKILL; the reopened log verifies and extends."""
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(audit_dir), str(key_path), ORIGIN],
        cwd=ROOT_DIR,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT_DIR)},
    )
    assert child.stdout is not None
    durable = [int(child.stdout.readline()) for _ in range(20)]
    os.kill(child.pid, signal.SIGKILL)
    child.wait(10)
    with Store(audit_dir) as store:
        n = store.next_seq()
        assert n > durable[-1]
        last = store.get(durable[-1])
        assert last is not None and last.type == "policy.decision"
        report = verify(store, signer.verifier, origin=ORIGIN)
        assert report.ok, str(report.problem)
        tail_raw = store.get_raw(n - 1)
    assert tail_raw is not None
    log = make_log(audit_dir, signer)
    seq = log.emit_durable_sync("agent.start", {"version": "restarted"})
    log.close()
    # The reopened log first checkpoints what survived the crash, then continues.
    assert seq == n + 1
    with Store(audit_dir) as store:
        rec = store.get(n)
        assert rec is not None and rec.prev == leaf_hash(tail_raw)
        assert rec.type == "checkpoint" and rec.event["size"] == n
        report = verify(store, signer.verifier, origin=ORIGIN)
    assert report.ok, str(report.problem)
    assert report.records > n
