"""Shared fixtures: a test issuer on loopback and process records as attribution builds them."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from tests.support.oidc import TestIssuer


@pytest.fixture(scope="session")
def idp() -> Iterator[TestIssuer]:
    with TestIssuer() as issuer:
        yield issuer


def process(**overrides: Any) -> dict[str, Any]:
    """An interactive psql of uid 1000 over ssh; override fields to make other actors."""
    record: dict[str, Any] = {
        "pid": 4242,
        "tid": 4242,
        "uid": 1000,
        "gid": 1000,
        "euid": 1000,
        "egid": 1000,
        "loginuid": 1000,
        "audit_session": 7,
        "comm": "psql",
        "exe": "/usr/lib/postgresql/15/bin/psql",
        "cmdline": ["psql", "-h", "db"],
        "tty": "pts/3",
        "cgroup": "/user.slice/user-1000.slice/session-7.scope",
        "unit": "session-7.scope",
        "container_id": None,
        "start_time": 123456,
        "ancestry": [
            {"pid": 4200, "comm": "bash", "exe": "/usr/bin/bash", "uid": 1000},
            {"pid": 4199, "comm": "sshd", "exe": "/usr/sbin/sshd", "uid": 1000},
            {"pid": 800, "comm": "sshd", "exe": "/usr/sbin/sshd", "uid": 0},
            {"pid": 1, "comm": "systemd", "exe": "/usr/lib/systemd/systemd", "uid": 0},
        ],
    }
    record.update(overrides)
    return record


def service_process(**overrides: Any) -> dict[str, Any]:
    """A process started by a systemd service: no tty, loginuid and audit session unset."""
    fields: dict[str, Any] = {
        "loginuid": None,
        "audit_session": None,
        "tty": None,
        "unit": "etl.service",
        "cgroup": "/system.slice/etl.service",
        "exe": "/usr/bin/python3.11",
        "comm": "python3",
        "ancestry": [{"pid": 1, "comm": "systemd", "exe": "/usr/lib/systemd/systemd", "uid": 0}],
    }
    fields.update(overrides)
    return process(**fields)
