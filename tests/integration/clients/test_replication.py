"""Replication through the agent: pg_basebackup with streamed WAL and logical decoding
(pg_recvlogical) work as they do directly, and their commands and streams are recorded.

Replication clients use the walsender's own commands (IDENTIFY_SYSTEM, BASE_BACKUP,
START_REPLICATION, ...) and CopyBoth streams; a database host's standbys, backup tools and
change-data-capture readers connect this way to the protected port.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.integration.clients.conftest import Host, app_name, serving, wait_sessions
from tests.support.pgserver import pgserver


@pytest.fixture(scope="module")
def replhost() -> Iterator[Host]:
    """A server that allows replication connections and logical decoding, behind the agent."""
    hba = ("host replication all 0.0.0.0/0 trust", "local replication all trust")
    with serving("repl", hba_first=hba, server_settings={"wal_level": "logical"}) as host:
        yield host


def connection(host: Host, direct: bool) -> list[str]:
    return ["-h", str(host.server.sockdir) if direct else "127.0.0.1", "-p", "5432", "-U", "postgres"]


def statements(sessions: list[list[dict[str, Any]]]) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """Each recorded statement with its result, over all the sessions."""
    pairs = []
    for records in sessions:
        queries = [r for r in records if r["type"] == "query"]
        results = [r for r in records if r["type"] == "result"]
        assert len(queries) == len(results)
        pairs += list(zip(queries, results, strict=True))
    return pairs


def test_pg_basebackup_with_streamed_wal(replhost: Host) -> None:
    """A base backup with WAL streamed alongside (CopyBoth) verifies like a direct one, and
    the trail shows both replication connections, their commands and what they carried."""
    app = app_name("basebackup")
    backups = Path(tempfile.mkdtemp(prefix="ringfence-backups-"))
    try:
        for name, direct in (("through", False), ("direct", True)):
            replhost.run_client([replhost.server.tool("pg_basebackup"), *connection(replhost, direct),
                                 "-D", str(backups / name), "-X", "stream", "-c", "fast", "-N"],
                                app, timeout=300)
            replhost.run_client([replhost.server.tool("pg_verifybackup"), str(backups / name)],
                                timeout=300)
        assert sorted(os.listdir(backups / "through")) == sorted(os.listdir(backups / "direct"))
        # The backup's data and the WAL stream each went through the agent.
        through_size = sum(f.stat().st_size for f in (backups / "through").rglob("*") if f.is_file())
    finally:
        shutil.rmtree(backups, ignore_errors=True)
    sessions = wait_sessions(replhost.agent, app, count=2)
    starts = [next(r for r in recs if r["type"] == "session.start") for recs in sessions]
    assert [s["target"]["replication"] for s in starts] == ["physical", "physical"]
    pairs = statements(sessions)
    kinds = {query["text"].split()[0] for query, _ in pairs}
    assert {"IDENTIFY_SYSTEM", "BASE_BACKUP", "START_REPLICATION"} <= kinds
    assert all(query["policy"]["classes"] == ["replication"] for query, _ in pairs)
    assert all(result["outcome"] == "success" for _, result in pairs)
    backup = next(result for query, result in pairs if query["text"].startswith("BASE_BACKUP"))
    stream = next(result for query, result in pairs
                  if query["text"].startswith("START_REPLICATION"))
    assert backup["copy_bytes"] > through_size // 2
    assert stream["copy_bytes"] > 0
    assert all(next(r for r in recs if r["type"] == "session.end")["outcome"] == "success"
               for recs in sessions)


def test_logical_decoding_reads_what_it_reads_directly(replhost: Host) -> None:
    """pg_recvlogical through the agent decodes the same changes as directly, from its own
    slot created through the agent."""
    app = app_name("recvlogical")
    recvlogical = replhost.server.tool("pg_recvlogical")
    slots = {False: "rf_through", True: "rf_direct"}
    for direct, slot in slots.items():
        replhost.run_client([recvlogical, *connection(replhost, direct), "-d", "postgres",
                             "--slot", slot, "--create-slot", "--plugin", "test_decoding"], app)
    replhost.psql("-c", "create table decoded (id int primary key, note text)",
                  "-c", "insert into decoded select g, 'row ' || g from generate_series(1, 3) g",
                  "-c", "update decoded set note = 'changed' where id = 2", direct=True)
    end = replhost.psql("-Atc", "select pg_current_wal_lsn()", direct=True).stdout.strip()
    outputs = {}
    for direct, slot in slots.items():
        _, outputs[direct] = replhost.run_client(
            [recvlogical, *connection(replhost, direct), "-d", "postgres", "--slot", slot,
             "--start", "--endpos", end, "--no-loop", "-f", "-"], app)
        replhost.run_client([recvlogical, *connection(replhost, direct), "-d", "postgres",
                             "--slot", slot, "--drop-slot"], app)
    assert outputs[False] == outputs[True]
    assert "table public.decoded: UPDATE: id[integer]:2 note[text]:'changed'" in outputs[False]
    sessions = wait_sessions(replhost.agent, app, count=3)
    assert all(next(r for r in recs if r["type"] == "session.start")["target"]["replication"]
               == "logical" for recs in sessions)
    pairs = statements(sessions)
    create = next(q for q, _ in pairs if q["text"].startswith("CREATE_REPLICATION_SLOT"))
    assert set(create["policy"]["classes"]) == {"replication"}
    stream = next(r for q, r in pairs if q["text"].startswith("START_REPLICATION"))
    assert stream["outcome"] == "success" and stream["copy_bytes"] > len(outputs[False]) // 2


def test_a_subscription_replicates_through_the_agent(replhost: Host) -> None:
    """A second server subscribes to a publication on the protected one: its initial copy
    and its stream of changes pass through the agent (pgoutput over a logical replication
    connection), and the subscriber ends up with the publisher's rows."""
    app = app_name("subscriber")
    replhost.psql("-v", "ON_ERROR_STOP=1",
                  "-c", "create table published (id int primary key, note text)",
                  "-c", "insert into published select g, 'before ' || g from generate_series(1, 50) g",
                  "-c", "create publication pub for table published", direct=True)
    with pgserver(replhost.ns, port=5433) as subscriber:
        def sub_psql(*args: str) -> str:
            done = replhost.ns.run([subscriber.tool("psql"), "-X", "-At", "-v", "ON_ERROR_STOP=1",
                                    "-h", str(subscriber.sockdir), "-p", "5433", "-U", "postgres",
                                    "-d", "postgres", *args], timeout=120)
            return done.stdout.strip()

        sub_psql("-c", "create table published (id int primary key, note text)")
        sub_psql("-c", "create subscription sub connection 'host=127.0.0.1 port=5432 "
                       f"user=postgres dbname=postgres application_name={app}' publication pub")
        replhost.psql("-c", "insert into published values (51, 'after')",
                      "-c", "update published set note = 'changed' where id = 1", direct=True)
        expected = replhost.psql("-At", "-c", "select count(*), md5(string_agg(note, ',' order by id)) "
                                 "from published", direct=True).stdout.strip()
        deadline = time.monotonic() + 60
        while (got := sub_psql("-c", "select count(*), md5(string_agg(note, ',' order by id)) "
                                     "from published")) != expected:
            assert time.monotonic() < deadline, f"subscriber has {got}, publisher {expected}"
            time.sleep(0.5)
        sub_psql("-c", "drop subscription sub")
    records = [r for recs in wait_sessions(replhost.agent, app) for r in recs]
    starts = [r for r in records if r["type"] == "session.start"]
    assert starts and all(s["target"]["replication"] == "logical" for s in starts)
    texts = [r["text"] for r in records if r["type"] == "query"]
    assert any(t.startswith("START_REPLICATION SLOT \"sub\" LOGICAL") for t in texts)
