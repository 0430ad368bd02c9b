"""The agent's Python work for one ``pgbench -S`` transaction, without sockets or a server.

Run: ``.venv/bin/python bench/pg_path.py`` (options: --transactions, --instructions,
--mode).

It drives the proxy's two protocol callbacks with the bytes of a select-only
transaction through fake transports: with ``--mode simple`` (the default) a simple
Query, then RowDescription, DataRow, CommandComplete and ReadyForQuery; with
``--mode prepared``, as ``pgbench -M prepared`` sends it, Bind, Describe, Execute and
Sync of a statement prepared once, then BindComplete and the same answer; with
``--mode extended`` the same led by a Parse each time, as ``-M extended`` sends it. With the
default policy and a real audit writer process: framing, the shape key and decision,
the session's bookkeeping, both records queued and encoded and sent to the writer.
It prints the event-loop thread's CPU time a transaction. On this shared machine that figure moves with
whatever else runs; ``--instructions`` runs the same under callgrind twice (with
two transaction counts, so start-up cancels out) and prints instructions a
transaction, which do not move. Nothing here asserts a timing.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from agent.config import load_config  # noqa: E402
from agent.pgsession import PostgresSession  # noqa: E402
from agent.protocols import postgres as pg  # noqa: E402
from agent.proxy import ClientSide, Proxy, UpstreamSide  # noqa: E402
from audit.process import AuditProcess  # noqa: E402
from policy import PolicyHolder  # noqa: E402


def message(kind: bytes, body: bytes) -> bytes:
    return kind + struct.pack("!i", len(body) + 4) + body


LOGIN = (message(b"R", struct.pack("!i", 0)) + message(b"K", struct.pack("!ii", 1, 2))
         + message(b"Z", b"I"))
ROWS = (message(b"T", struct.pack("!h", 1) + b"abalance\x00" + struct.pack("!ihihih", 0, 0, 23, 4, -1, 0))
         + message(b"D", struct.pack("!hi", 1, 4) + b"-123")
         + message(b"C", b"SELECT 1\x00") + message(b"Z", b"I"))
REPLY = {"simple": ROWS, "prepared": message(b"2", b"") + ROWS,
         "extended": message(b"1", b"") + message(b"2", b"") + ROWS}
SELECT = "SELECT abalance FROM pgbench_accounts WHERE aid = {};"


def requests(mode: str) -> tuple[bytes, list[bytes]]:
    """What the client sends first (once), and the transactions' requests, for ``mode``."""
    if mode == "simple":
        return b"", [pg.query_message(SELECT.format(n)) for n in range(1, 1001)]
    name = b"P0_1" if mode == "prepared" else b""
    parse = message(b"P", name + b"\x00" + SELECT.format("$1").encode() + b"\x00\x00\x00")
    return parse + message(b"S", b"") if mode == "prepared" else b"", [
        (b"" if mode == "prepared" else parse)
        + message(b"B", b"\x00" + name + b"\x00" + struct.pack("!hhi", 0, 1, len(str(n)))
                  + str(n).encode() + struct.pack("!h", 0))
        + message(b"D", b"P\x00") + message(b"E", b"\x00" + struct.pack("!i", 0))
        + message(b"S", b"")
        for n in range(1, 1001)
    ]


class FakeTransport:
    """Takes writes and flow control calls, sends nothing."""

    def write(self, data: bytes) -> None:
        pass

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def close(self) -> None:
        pass


async def run(transactions: int, work: Path, mode: str) -> float:
    (work / "ringfence.toml").write_text(f"""
[agent]
state_dir = "{work / 'state'}"
run_dir = "{work / 'run'}"
[audit]
path = "{work / 'audit'}"
[policy]
path = "{ROOT / 'packaging' / 'policy.toml'}"
[[protect]]
name = "postgres"
protocol = "postgres"
port = 5432
""")
    config = load_config(work / "ringfence.toml")
    policy = PolicyHolder(config.policy.path)
    audit = AuditProcess.start(config.audit, host="bench.host", state_dir=work / "state")
    try:
        proxy = Proxy(config, audit, None, policy=lambda: policy.current)
        client = ClientSide(proxy, config.protect[0])
        transport: Any = FakeTransport()
        client.transport = transport
        client._early = None  # setup done
        client._loop = asyncio.get_running_loop()  # as connection_made would
        client.session = PostgresSession(client.session_id, {"service": "postgres"},
                                         policy=lambda: policy.current)
        client.upstream = upstream = UpstreamSide(client)
        upstream.transport = transport
        client.upstream_state = "plain"
        client.data_received(pg.startup_message({"user": "postgres", "database": "postgres"}))
        upstream.data_received(LOGIN)
        while client._deferred is not None:
            # The connection's decision is committed before the session goes on (a real
            # client waits for the login's answer meanwhile): not part of the transactions.
            await asyncio.sleep(0.001)
        prepare, queries = requests(mode)
        if prepare:
            client.data_received(prepare)
            upstream.data_received(message(b"1", b"") + message(b"Z", b"I"))
        reply = REPLY[mode]
        started = time.thread_time()
        for n in range(transactions):
            client.data_received(queries[n % 1000])
            upstream.data_received(reply)
            if n % 4 == 3:
                await asyncio.sleep(0)  # a loop turn, as under load (about four a turn)
        return (time.thread_time() - started) / transactions * 1e6
    finally:
        audit.close()


def instructions(transactions: int, mode: str) -> int:
    """Instructions a transaction: two callgrind runs, the difference over the extra ones."""
    counts = []
    for n in (transactions // 4, transactions):
        done = subprocess.run(
            ["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null",
             sys.executable, __file__, "--transactions", str(n), "--mode", mode],
            capture_output=True, text=True, check=True, timeout=3600)
        counts.append(int(re.findall(r"Collected : (\d+)", done.stderr)[-1]))
    return (counts[1] - counts[0]) // (transactions - transactions // 4)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--transactions", type=int, default=30_000)
    parser.add_argument("--instructions", action="store_true",
                        help="count instructions under callgrind (valgrind) instead")
    parser.add_argument("--mode", choices=sorted(REPLY), default="simple",
                        help="the query protocol, as pgbench -M names it")
    args = parser.parse_args()
    if args.instructions:
        if shutil.which("valgrind") is None:
            print("valgrind is missing: apt-get install valgrind", file=sys.stderr)
            return 1
        count = min(args.transactions, 4000)
        print(f"{instructions(count, args.mode):,} instructions a transaction "
              f"(callgrind, {count} {args.mode} transactions)")
        return 0
    import uvloop

    work = Path(tempfile.mkdtemp(prefix="ringfence-path-"))
    try:
        cpu = uvloop.run(run(args.transactions, work, args.mode))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"{cpu:.1f} us of event-loop CPU a transaction ({args.transactions} {args.mode} transactions)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
