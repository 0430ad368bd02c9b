"""psycopg 3 exercises printed as JSON; run directly and through the agent, then compared."""

from __future__ import annotations

import json
import sys
import threading
import time
from typing import Any

import psycopg
from psycopg import sql


def main(base: str, app: str) -> dict[str, Any]:
    dsn = f"{base} application_name={app}"
    out: dict[str, Any] = {}
    with psycopg.connect(dsn, autocommit=True) as conn:
        cur = conn.cursor()
        cur.execute("create temp table items (id int primary key, name text, price numeric, "
                    "tags text[], data bytea)")

        # Prepared statements: prepare=True makes psycopg Parse once, then Bind/Execute.
        for i in range(1, 6):
            cur.execute("insert into items values (%s, %s, %s, %s, %s)",
                        (i, f"item {i}", i * 1.25, [f"t{i}", "x"], bytes([i]) * i), prepare=True)
        out["prepared"] = [
            cur.execute("select name, price from items where id = %s", (i,), prepare=True).fetchone()
            for i in range(1, 6)
        ]

        # Pipeline mode: many Bind/Execute before one Sync.
        with conn.pipeline():
            cursors = [conn.execute("select %s::int * 2, %s::text", (i, f"p{i}")) for i in range(10)]
            conn.execute("update items set price = price + 1 where id = %s", (1,))
        out["pipeline"] = [c.fetchone() for c in cursors]

        # COPY in (text and binary) and out.
        with cur.copy("copy items (id, name, price) from stdin") as copy:
            for i in range(100, 1100):
                copy.write_row((i, f"copied {i}", i / 4))
        with cur.copy("copy items (id, name) to stdout") as copy:
            out["copy_out"] = sum(1 for _ in copy.rows())
        cur.execute("create temp table pairs (a int, b text)")
        with cur.copy("copy pairs from stdin (format binary)") as copy:
            copy.set_types(["int4", "text"])
            for i in range(500):
                copy.write_row((i, str(i) * 3))
        with cur.copy("copy (select * from pairs order by a) to stdout (format binary)") as copy:
            copy.set_types(["int4", "text"])
            out["copy_binary"] = list(copy.rows())[-3:]

        # Binary results.
        out["binary"] = cur.execute(
            "select id, name, price, tags, data from items where id <= 5 order by id", binary=True
        ).fetchall()

        # Errors keep the connection usable.
        try:
            cur.execute("select 1/0")
        except psycopg.errors.DivisionByZero as e:
            out["error"] = e.sqlstate
        out["after_error"] = cur.execute("select count(*) from items").fetchone()

    # Server-side cursor inside a transaction, fetched in batches.
    with psycopg.connect(dsn) as conn, conn.cursor(name="big") as named:
        named.itersize = 700
        named.execute("select g, md5(g::text) from generate_series(1, 5000) g")
        total = 0
        first = None
        for row in named:
            first = first or row
            total += 1
        out["server_cursor"] = [total, first]

    # LISTEN / NOTIFY between two connections.
    with psycopg.connect(dsn, autocommit=True) as listener, \
            psycopg.connect(dsn, autocommit=True) as sender:
        listener.execute("listen ringfence_events")
        sender.execute(sql.SQL("notify ringfence_events, {}").format("hello from psycopg"))
        sender.execute("select pg_notify('ringfence_events', 'second')")
        got = [(n.channel, n.payload) for n in listener.notifies(timeout=10, stop_after=2)]
        out["notify"] = got

    # Cancel a running statement from another thread.
    with psycopg.connect(dsn, autocommit=True) as conn:
        timer = threading.Timer(0.5, conn.cancel_safe)
        timer.start()
        started = time.monotonic()
        try:
            conn.execute("select pg_sleep(30)")
        except psycopg.errors.QueryCanceled as e:
            out["cancel"] = [e.sqlstate, time.monotonic() - started < 20]
        timer.join()
        out["after_cancel"] = conn.execute("select 'still usable'").fetchone()
    return out


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1], sys.argv[2]), default=str, sort_keys=True))
