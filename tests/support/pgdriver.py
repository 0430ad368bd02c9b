"""A one-connection SQL driver for tests: reads statements, prints one JSON result each.

Run inside a test's network namespace with ``python -m tests.support.pgdriver CONNINFO``;
each line on stdin is one statement; each line on stdout is
``{"ok": true, "rows": [...], "status": "..."}`` or
``{"ok": false, "sqlstate": "...", "message": "..."}``.
"""

from __future__ import annotations

import json
import sys

import psycopg


def main() -> None:
    conn = psycopg.connect(sys.argv[1], autocommit=True)
    for line in sys.stdin:
        sql = line.strip()
        if not sql:
            continue
        try:
            cur = conn.execute(sql)
            rows = cur.fetchall() if cur.description else []
            out = {"ok": True, "rows": [list(map(str, r)) for r in rows],
                   "status": cur.statusmessage, "transaction": conn.info.transaction_status.name}
        except psycopg.Error as e:
            out = {"ok": False, "sqlstate": e.sqlstate, "message": str(e.diag.message_primary),
                   "transaction": conn.info.transaction_status.name}
        print(json.dumps(out), flush=True)
    conn.close()


if __name__ == "__main__":
    main()
