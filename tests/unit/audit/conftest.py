"""Fixtures for audit tests: a log in a temporary directory with a fresh key."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from audit.checkpoint import Signer, load_or_create_key
from audit.log import AuditLog

ORIGIN = "test.host/ringfence/audit"


@pytest.fixture
def key_path(tmp_path: Path) -> Path:
    path = tmp_path / "state" / "audit.key"
    load_or_create_key(path, ORIGIN)
    return path


@pytest.fixture
def signer(key_path: Path) -> Signer:
    return Signer.parse(key_path.read_text())


@pytest.fixture
def audit_dir(tmp_path: Path) -> Path:
    return tmp_path / "audit"


def make_log(audit_dir: Path, signer: Signer, **kw: Any) -> AuditLog:
    """An AuditLog with test-friendly defaults."""
    kw.setdefault("checkpoint_every_records", 1_000_000)
    kw.setdefault("checkpoint_every_seconds", 3600.0)
    kw.setdefault("batch_max_delay_ms", 1.0)
    return AuditLog(audit_dir, host="test.host", signer=signer, origin=ORIGIN, **kw)


@pytest.fixture
def new_log(audit_dir: Path, signer: Signer) -> Iterator[Any]:
    logs: list[AuditLog] = []

    def factory(**kw: Any) -> AuditLog:
        log = make_log(audit_dir, signer, **kw)
        logs.append(log)
        return log

    yield factory
    for log in logs:
        log.close()


def session_events(log: AuditLog, sid: str, statements: int = 3) -> None:
    """Emit a small session: start, statements with results, end."""
    log.emit("session.start", {"service": "pg", "protocol": "postgres"}, session_id=sid)
    for i in range(statements):
        log.emit("query", {"text": f"select {i}", "protocol": "simple"}, session_id=sid)
        log.emit("result", {"rows": i, "outcome": "success", "duration_ms": 0.5}, session_id=sid)
    log.emit("session.end", {"reason": "client closed", "outcome": "success"}, session_id=sid)


ROOT_DIR = Path(__file__).resolve().parents[3]
