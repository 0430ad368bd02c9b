"""Audit store throughput: batched records/s, strict commits/s, and ``tail --follow`` lag.

Run: ``.venv/bin/python bench/audit_throughput.py`` (options: --records, --seconds, --dir).
Everything is printed in one run; nothing here asserts a timing.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from audit.checkpoint import Signer  # noqa: E402
from audit.log import AuditLog  # noqa: E402
from audit.store import Store  # noqa: E402

ORIGIN = "bench.host/ringfence/audit"


def query_event(i: int) -> dict[str, Any]:
    """A query event whose stored record is about 300 bytes."""
    return {
        "text": f"SELECT abalance FROM pgbench_accounts WHERE aid = {i:08d}; -- {'x' * 30}",
        "length": 180,
        "sha256": "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08",
        "truncated": False,
        "protocol": "simple",
    }


def new_log(path: Path, **kw: Any) -> AuditLog:
    return AuditLog(path, host="bench.host", signer=Signer.generate(ORIGIN), origin=ORIGIN, **kw)


def bench_batched(base: Path, n: int) -> tuple[float, int]:
    log = new_log(base / "batched")
    events = [query_event(i) for i in range(1000)]
    emit = log.emit
    t0 = time.perf_counter()
    for i in range(n):
        emit("query", events[i % 1000], session_id="bench-session")
    log.close()
    elapsed = time.perf_counter() - t0
    with Store(base / "batched") as store:
        raw = store.get_raw(n // 2)
        size = len(raw) if raw else 0
    return n / elapsed, size


def bench_strict(base: Path, seconds: float, concurrency: int) -> float:
    log = new_log(base / f"strict-{concurrency}", batch_max_delay_ms=0.0)
    done = 0

    async def worker(stop: float) -> None:
        nonlocal done
        i = 0
        while time.perf_counter() < stop:
            await log.emit_durable("policy.decision", {"action": "allow", "i": i}, session_id="s")
            done += 1
            i += 1

    async def main() -> None:
        stop = time.perf_counter() + seconds
        await asyncio.gather(*(worker(stop) for _ in range(concurrency)))

    t0 = time.perf_counter()
    asyncio.run(main())
    elapsed = time.perf_counter() - t0
    log.close()
    return done / elapsed


def bench_tail_lag(base: Path, seconds: float, rate: int) -> tuple[float, float, int]:
    path = base / "tail"
    log = new_log(path)
    log.emit("agent.start", {"version": "bench"})
    log.flush(5)
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "agent.cli",
            "audit",
            "--path",
            str(path),
            "tail",
            "--follow",
            "--json",
            "-n",
            "0",
            "--type",
            "query",
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
        bufsize=1,
    )
    lags: list[float] = []
    ready = threading.Event()

    def reader() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            now = time.time_ns()
            rec = json.loads(line)
            if rec.get("probe"):
                lags.append((now - rec["sent_ns"]) / 1e6)
                ready.set()

    th = threading.Thread(target=reader, daemon=True)
    th.start()
    # Wait until the follower is running.
    deadline = time.monotonic() + 10
    while not ready.is_set() and time.monotonic() < deadline:
        log.emit("query", {"text": "warmup", "probe": True, "sent_ns": time.time_ns()})
        time.sleep(0.05)
    lags.clear()
    events = [query_event(i) for i in range(1000)]
    t0 = time.perf_counter()
    sent = 0
    probes = 0
    while time.perf_counter() - t0 < seconds:
        # Background load at `rate` records/s, with a probe record every 10 ms.
        target = int((time.perf_counter() - t0) * rate)
        while sent < target:
            log.emit(
                "result",
                {"rows": 1, "outcome": "success", "duration_ms": 0.1, "filler": events[sent % 1000]["text"]},
                session_id="load",
            )
            sent += 1
        log.emit("query", {"text": "probe", "probe": True, "sent_ns": time.time_ns()}, session_id="probe")
        probes += 1
        time.sleep(0.01)
    log.flush(10)
    time.sleep(0.3)
    proc.terminate()
    proc.wait(5)
    log.close()
    lags.sort()
    if not lags:
        return float("nan"), float("nan"), 0
    p50 = statistics.median(lags)
    p99 = lags[min(len(lags) - 1, int(len(lags) * 0.99))]
    return p50, p99, len(lags)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--records", type=int, default=300_000, help="records for the batched run")
    ap.add_argument("--seconds", type=float, default=3.0, help="length of strict and tail runs")
    ap.add_argument("--tail-rate", type=int, default=20_000, help="background records/s under tail")
    ap.add_argument("--dir", type=Path, default=None, help="where to put the stores (default: tmp)")
    args = ap.parse_args()
    base = Path(tempfile.mkdtemp(prefix="ringfence-bench-", dir=args.dir))
    try:
        print(f"audit throughput on {os.cpu_count()} CPU(s), stores under {base}")
        rate, size = bench_batched(base, args.records)
        print(
            f"batched: {rate:,.0f} records/s ({args.records:,} records of {size} bytes, "
            "including the final drain, commit and checkpoint)"
        )
        for c in (1, 64):
            print(
                f"strict:  {bench_strict(base, args.seconds, c):,.0f} durable records/s "
                f"with {c} concurrent waiter(s) (each returns after its fsync'd commit)"
            )
        p50, p99, n = bench_tail_lag(base, args.seconds, args.tail_rate)
        print(
            f"tail --follow lag under {args.tail_rate:,} records/s: p50 {p50:.1f} ms, "
            f"p99 {p99:.1f} ms ({n} probes)"
        )
    finally:
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
