"""asyncpg exercises printed as JSON; run directly and through the agent, then compared."""

from __future__ import annotations

import asyncio
import json
import sys
from typing import Any

import asyncpg


async def main(host: str, app: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    conn = await asyncpg.connect(host=host, port=5432, user="postgres", database="postgres",
                                 server_settings={"application_name": app})
    try:
        await conn.execute("create temp table readings (id int, sensor text, value float8, "
                           "at timestamptz, raw bytea)")
        # Binary extended protocol with parameters.
        out["types"] = [list(r.values()) for r in await conn.fetch(
            "select $1::int + 1, $2::text || '!', $3::numeric * 2, $4::int[], $5::jsonb",
            41, "hi", 1.5, [1, 2, 3], '{"a": 1}',
        )]
        # Prepared statements, executed many times.
        insert = await conn.prepare("insert into readings values ($1, $2, $3, "
                                    "'2024-01-01'::timestamptz + $1::int * interval '1 minute', $4)")
        for i in range(50):
            await insert.fetch(i, f"s{i % 3}", i / 3, bytes([i % 256]) * 8)
        await conn.executemany("insert into readings (id, sensor, value) values ($1, $2, $3)",
                               [(1000 + i, "many", float(i)) for i in range(200)])
        select = await conn.prepare("select id, sensor, value, at, raw from readings where id = $1")
        out["prepared"] = [list((await select.fetchrow(i)).values()) for i in (0, 7, 49)]
        # COPY in and out.
        await conn.copy_records_to_table(
            "readings", records=[(5000 + i, "copy", i * 0.5, None, b"\x00\xff") for i in range(3000)],
            columns=["id", "sensor", "value", "at", "raw"],
        )
        chunks: list[bytes] = []

        async def sink(data: bytes) -> None:
            chunks.append(data)

        status = await conn.copy_from_query(
            "select id, sensor, value from readings where sensor = $1 order by id", "copy",
            output=sink, format="csv",
        )
        text = b"".join(chunks).decode()
        out["copy_out"] = [status, len(text.splitlines()), text.splitlines()[-1]]
        out["counts"] = [list(r.values()) for r in await conn.fetch(
            "select sensor, count(*), sum(value) from readings group by sensor order by sensor")]
        # A cursor in a transaction.
        async with conn.transaction():
            rows = [r["g"] async for r in conn.cursor(
                "select g from generate_series(1, 2000) g", prefetch=300)]
        out["cursor"] = [len(rows), sum(rows)]
        # Cancel via timeout: asyncpg sends a CancelRequest on a new connection.
        try:
            await conn.fetch("select pg_sleep(30)", timeout=0.5)
        except TimeoutError:
            out["timeout"] = "cancelled"
        out["after_timeout"] = await conn.fetchval("select 'still usable'")
        try:
            await conn.fetch("select 1/0")
        except asyncpg.DivisionByZeroError as e:
            out["error"] = e.sqlstate
    finally:
        await conn.close()
    return out


if __name__ == "__main__":
    print(json.dumps(asyncio.run(main(sys.argv[1], sys.argv[2])), default=str, sort_keys=True))
