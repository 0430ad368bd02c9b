"""ringfence against HAProxy in short slices taken in turns, both running all the while.

Run as root: ``.venv/bin/python bench/pg_pairs.py`` (options: --pairs, --seconds,
--clients, --mode).

``pg_overhead.py`` measures each setup for ten seconds in turn, starting each proxy
afresh; on a shared host whose pace drifts by a quarter over tens of seconds, one
round's ratio carries that drift, and a run of five rounds resolves the ratio to about
a tenth. Here both proxies run at once, so that the two can be measured in turns a few
seconds apart, many times:

* the agent steers IPv4 connections to 5432 only (``[redirect] ipv6 = false``), with
  its default settings otherwise (every statement recorded);
* HAProxy, in plain TCP mode, listens on 127.0.0.1:6432 and connects to the server
  over ``[::1]:5432``, which the agent leaves alone;
* ``pgbench -S`` dials 127.0.0.1:5432 (the agent) and 127.0.0.1:6432 (HAProxy) in
  turns, ``--seconds`` each, HAProxy first in every other pair, ``--pairs`` pairs at
  each client count; each pair's ratio is taken within the pair.

HAProxy's leg to the server is IPv6 and the agent's IPv4, so before the agent starts,
direct connections over both are measured the same way: their ratio says what the
families' difference is worth. Printed: each client count's median ratio with its
quartiles, the medians of TPS and of the host's CPU a transaction, and the proxies' own
CPU a transaction. Nothing here asserts a timing.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from pg_overhead import (  # noqa: E402
    HAPROXY_PORT,
    busy_ticks,
    cpu_ticks_split,
    haproxy_config,
    machine_ticks,
    pgbench,
    prepare,
)

from tests.support.agent import AgentProcess  # noqa: E402
from tests.support.netns import NetNS, netns  # noqa: E402
from tests.support.pgserver import PgServer, pgserver  # noqa: E402

Slice = dict[str, float]


def one_slice(ns: NetNS, server: PgServer, host: str, port: int, clients: int,
              args: argparse.Namespace, logdir: Path, pid: int | None = None,
              other: int | None = None) -> Slice:
    """pgbench for ``--seconds``: TPS, the host's CPU a transaction (µs), the proxy's
    (``pid`` with its threads, session workers and writer) and the other proxy's (``other``,
    idle meanwhile unless it is in the way); nan for either not given."""
    hz = os.sysconf("SC_CLK_TCK")
    before, idle, (machine, _) = cpu_ticks_split(pid), cpu_ticks_split(other), machine_ticks()
    run = pgbench(ns, server, port, clients, args.seconds, logdir, args.mode, host=host)
    after, idle_after, (machine_after, _) = (cpu_ticks_split(pid), cpu_ticks_split(other),
                                              machine_ticks())
    per_transaction = 1e6 / hz / (run["tps"] * args.seconds)
    return {"tps": run["tps"], "failed": run["failed"],
            "host_us": busy_ticks(machine, machine_after) * per_transaction,
            "proxy_us": (sum(after) - sum(before)) * per_transaction if pid else float("nan"),
            "other_us": (sum(idle_after) - sum(idle)) * per_transaction if other else float("nan")}


def in_turns(first: Callable[[], Slice], second: Callable[[], Slice],
             pairs: int) -> list[tuple[Slice, Slice]]:
    """``pairs`` pairs of slices, ``first``'s before ``second``'s in every other pair."""
    taken = []
    for number in range(pairs):
        if number % 2 == 0:
            a = first()
            b = second()
        else:
            b = second()
            a = first()
        taken.append((a, b))
    return taken


def summary(name: str, pairs: list[tuple[Slice, Slice]], over: str, goal: bool = True) -> str:
    """The pairs' ratios (the first's TPS over the second's): median, quartiles, range and,
    with ``goal``, how many pairs are at 0.75x or above."""
    ratios = sorted(a["tps"] / b["tps"] for a, b in pairs)
    quartiles = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else [ratios[0]] * 3
    at_goal = sum(r >= 0.75 for r in ratios)
    return (f"{name}/{over} {quartiles[1]:.2f}x (quartiles {quartiles[0]:.2f}-"
            f"{quartiles[2]:.2f}x, all {ratios[0]:.2f}-{ratios[-1]:.2f}x"
            + (f"; {at_goal} of {len(ratios)} pairs at 0.75x or above)" if goal else ")"))


def medians(pairs: list[tuple[Slice, Slice]], index: int, key: str) -> float:
    return statistics.median(pair[index][key] for pair in pairs)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, default=20, help="pairs of slices a client count")
    parser.add_argument("--seconds", type=int, default=3, help="pgbench duration of a slice")
    parser.add_argument("--clients", default="1,8", help="client counts, comma-separated")
    parser.add_argument("--mode", default="simple", choices=("simple", "extended", "prepared"),
                        help="pgbench's -M")
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("run as root (network namespace, BPF)", file=sys.stderr)
        return 1
    haproxy = shutil.which("haproxy") or "/usr/sbin/haproxy"
    if not Path(haproxy).exists():
        print("haproxy is missing: apt-get install haproxy", file=sys.stderr)
        return 1
    counts = [int(c) for c in args.clients.split(",")]
    work = Path(tempfile.mkdtemp(prefix="ringfence-pairs-"))
    try:
        with netns("rfpairs") as ns, pgserver(ns) as server:
            prepare(ns, server)
            print(f"PostgreSQL {server.bindir.parent.name}, pgbench -S -M {args.mode}, "
                  f"{args.seconds} s slices, {args.pairs} pairs a client count", flush=True)

            def direct(host: str, clients: int) -> Callable[[], Slice]:
                return lambda: one_slice(ns, server, host, 5432, clients, args, work, None)

            print("direct over 127.0.0.1 against direct over ::1 (the legs' families):")
            for clients in counts:
                pairs = in_turns(direct("127.0.0.1", clients), direct("::1", clients),
                                 max(4, args.pairs // 4))
                print(f"  c{clients}  {summary('ipv4', pairs, 'ipv6', goal=False)}", flush=True)

            # To the server over IPv6 loopback, which the agent below leaves alone.
            haproxy_config(work / "haproxy.cfg", upstream="ipv6@::1:5432")
            proxy = ns.popen([haproxy, "-db", "-f", str(work / "haproxy.cfg")],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            agent = AgentProcess(ns, work / "agent", agent_settings='workers = "auto"',
                                 extra="[redirect]\nipv6 = false\n")
            agent.start()
            try:
                time.sleep(1)
                assert agent.process is not None
                agent_pid = agent.process.pid
                results: dict[int, list[tuple[Slice, Slice]]] = {}
                for clients in counts:
                    results[clients] = in_turns(
                        lambda c=clients: one_slice(ns, server, "127.0.0.1", 5432, c, args,
                                                    work, agent_pid, proxy.pid),
                        lambda c=clients: one_slice(ns, server, "127.0.0.1", HAPROXY_PORT, c,
                                                    args, work, proxy.pid, agent_pid),
                        args.pairs)
            finally:
                agent.stop()
                proxy.terminate()
                proxy.wait(30)
            print("ringfence (127.0.0.1:5432) against HAProxy (127.0.0.1:6432), in turns:")
            for clients, pairs in results.items():
                print(f"  c{clients}  {summary('ringfence', pairs, 'haproxy')}")
                print(f"       TPS ringfence {medians(pairs, 0, 'tps'):,.0f}  haproxy "
                      f"{medians(pairs, 1, 'tps'):,.0f};  host CPU a transaction "
                      f"{medians(pairs, 0, 'host_us'):.0f} us against "
                      f"{medians(pairs, 1, 'host_us'):.0f};  the proxy's own "
                      f"{medians(pairs, 0, 'proxy_us'):.0f} us against "
                      f"{medians(pairs, 1, 'proxy_us'):.0f} (idle beside the other: the "
                      f"agent {medians(pairs, 1, 'other_us'):.1f}, HAProxy "
                      f"{medians(pairs, 0, 'other_us'):.1f})")
                failed = sum(a["failed"] + b["failed"] for a, b in pairs)
                if failed:
                    print(f"       {failed:.0f} failed transactions")
            print("the goal: ringfence at 0.75x HAProxy or above at every client count")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
