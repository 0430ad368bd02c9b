"""The PostgreSQL JDBC driver (Debian's libpostgresql-jdbc-java) through the agent: the same
output as against a server nobody stands in front of, and every statement recorded."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import require
from tests.integration.clients.conftest import HERE, Host, app_name
from tests.support.agent import sessions
from tests.support.pgserver import pgserver

DRIVER = Path("/usr/share/java/postgresql.jar")
SOURCE = HERE / "java" / "JdbcClient.java"


@pytest.fixture(scope="module")
def jdbc_client() -> Iterator[str]:
    """The client compiled against the driver; yields its class path."""
    require(shutil.which("javac") is not None and shutil.which("java") is not None,
            "a Java compiler and runtime (default-jdk-headless)")
    require(DRIVER.exists(), f"the JDBC driver at {DRIVER} (libpostgresql-jdbc-java)")
    classes = Path(tempfile.mkdtemp(prefix="ringfence-jdbc-"))
    try:
        subprocess.run(["javac", "-d", str(classes), "-cp", str(DRIVER), str(SOURCE)],
                       check=True, capture_output=True, timeout=300)
        classes.chmod(0o755)
        yield f"{DRIVER}:{classes}"
    finally:
        shutil.rmtree(classes, ignore_errors=True)


def test_jdbc_identical_and_recorded(pghost: Host, jdbc_client: str) -> None:
    app = app_name("jdbc")
    run = ["java", "-cp", jdbc_client, "JdbcClient"]
    with pgserver(pghost.ns, port=5433):  # a second server on a port the agent leaves alone
        _, direct = pghost.run_client([*run, "127.0.0.1", "5433", app + "-direct"], timeout=300)
    _, through = pghost.run_client([*run, "127.0.0.1", "5432", app], timeout=300)
    assert through == direct
    lines = through.splitlines()
    assert lines[0] == "batch 200" and "fetched 200 20100" in lines
    assert "error 23505" in lines and "cancelled 57014" in lines and lines[-1] == "count 202"
    # The driver names itself with a SET after the login (it does not assume a server version
    # that takes application_name in the startup packet): find the session by that SET.
    def mine(records: list[dict[str, Any]]) -> list[dict[str, Any]] | None:
        for recs in sessions(records).values():
            if any(r["type"] == "session.end" for r in recs) and any(
                    r["type"] == "query" and app in (r.get("text") or "") for r in recs):
                return recs
        return None

    recs = pghost.agent.wait_for(mine, timeout=30)
    inserts = [r for r in recs if r["type"] == "query"
               and r.get("text") == "insert into items values ($1, $2, $3, $4, $5)"]
    assert len(inserts) == 200 and inserts[6]["parameters"][:2] == [7, "item 7"]  # binary int4, decoded
    results = [r for r in recs if r["type"] == "result"]
    assert any(r.get("error", {}).get("sqlstate") == "57014" for r in results)
    assert any(r["command_tag"] == "COPY 2" and r["copy_bytes"] > 0 for r in results)
    # The driver's cancel came over a connection of its own, matched to this session.
    session_id = recs[0]["session_id"]
    cancels = [r for r in pghost.agent.records() if r["type"] == "session.start"
               and (r.get("cancel") or {}).get("target_session_id") == session_id]
    assert len(cancels) == 1
