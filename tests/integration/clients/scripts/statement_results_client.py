"""Statements whose row counts say which they are, in every way psycopg sends them: simple
and extended protocol, a pipeline, errors between them. Prints how many rows each gave."""

from __future__ import annotations

import json
import sys
from typing import Any

import psycopg

COUNTS = [3, 0, 7, 1, 2, 5, 4, 6, 9, 8]


def main(base: str, app: str) -> list[Any]:
    out: list[Any] = []
    with psycopg.connect(f"{base} application_name={app}", autocommit=True) as conn:
        extended, simple = conn.cursor(), psycopg.ClientCursor(conn)
        for round_ in range(3):
            for n in COUNTS:
                cur = simple if (n + round_) % 2 else extended
                out.append(len(cur.execute(f"select generate_series(1, {n})").fetchall()))
                if n == 7:
                    try:
                        cur.execute("select 1/0")
                    except psycopg.errors.DivisionByZero:
                        out.append("22012")
            with conn.pipeline():
                cursors = [conn.execute(f"select generate_series(1, {n})") for n in COUNTS[:4]]
            out.extend(len(c.fetchall()) for c in cursors)
    return out


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1], sys.argv[2])))
