"""pg_dump, pg_restore and a plain dump replayed by psql through the agent: the dumps are
the ones taken directly, and a restore through the agent rebuilds the same database."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from tests.integration.clients.conftest import Host, app_name, wait_sessions

SCHEMA = """
create table items (id serial primary key, name text not null, price numeric(10,2),
                    tags text[], doc jsonb, body bytea);
insert into items (name, price, tags, doc, body)
  select 'item ' || g, g * 1.5, array['a', 'b'], jsonb_build_object('g', g), sha256(g::text::bytea)
  from generate_series(1, 2000) g;
create view cheap as select id, name from items where price < 10;
create function total() returns numeric language sql as 'select sum(price) from items';
create index items_name on items (name);
comment on table items is 'what is for sale';
select lo_from_bytea(0, 'a large object');
"""


def without_restrict_keys(dump: str) -> str:
    """A plain dump minus its random restrict key (a new one each run, by design)."""
    return "\n".join(line.split(" ")[0] if line.startswith(("\\restrict ", "\\unrestrict "))
                     else line for line in dump.split("\n"))


def dump(host: Host, database: str, app: str, direct: bool) -> str:
    where = str(host.server.sockdir) if direct else "127.0.0.1"
    _, out = host.run_client([host.server.tool("pg_dump"), "-h", where, "-U", "postgres",
                              database], app, timeout=300)
    return without_restrict_keys(out)


def test_pg_dump_and_restores_through_the_agent(pghost: Host) -> None:
    app = app_name("pgdump")
    for database in ("dumped", "restored_plain", "restored_custom"):
        pghost.psql("-c", f"create database {database}", direct=True)
    pghost.psql("-d", "dumped", "-v", "ON_ERROR_STOP=1", "-c", SCHEMA, direct=True)
    original = dump(pghost, "dumped", app, direct=True)
    assert "COPY public.items" in original and "SELECT pg_catalog.lo_create" in original
    assert dump(pghost, "dumped", app, direct=False) == original
    work = Path(tempfile.mkdtemp(prefix="ringfence-dump-"))
    try:
        work.chmod(0o755)
        plain, custom = work / "plain.sql", work / "dump.custom"
        _, text = pghost.run_client([pghost.server.tool("pg_dump"), "-h", "127.0.0.1", "-U",
                                     "postgres", "dumped"], app, timeout=300)
        plain.write_text(text)
        pghost.run_client(pghost.psql_argv("-v", "ON_ERROR_STOP=1", "-q", "-d", "restored_plain",
                                           "-f", str(plain)), app, timeout=300)
        pghost.run_client([pghost.server.tool("pg_dump"), "-Fc", "-f", str(custom), "-h",
                           "127.0.0.1", "-U", "postgres", "dumped"], app, timeout=300)
        pghost.run_client([pghost.server.tool("pg_restore"), "-h", "127.0.0.1", "-U", "postgres",
                           "--exit-on-error", "-d", "restored_custom", str(custom)], app,
                          timeout=300)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    for restored in ("restored_plain", "restored_custom"):
        assert dump(pghost, restored, app, direct=True) == original
    sessions = wait_sessions(pghost.agent, app, count=5)  # the runs through the agent
    copies = [r for recs in sessions for r in recs
              if r["type"] == "result" and (r["command_tag"] or "").startswith("COPY")]
    assert any(r["copy_bytes"] > 100_000 and r["rows"] == 2000 for r in copies)  # dumped
    assert all(r["outcome"] == "success" for recs in sessions for r in recs if r["type"] == "result")
