"""PostgreSQL through ringfence against direct connections and HAProxy (a C TCP proxy).

Run as root: ``.venv/bin/python bench/pg_overhead.py`` (options: --seconds, --rows,
--rounds, --mode, --workers, --redirect, --against, --profile-seconds, --out). In a
fresh network namespace it starts a real PostgreSQL server, settles it (VACUUM
ANALYZE, CHECKPOINT, a short warm-up), then measures, in each of ``--rounds`` rounds (3)

* ``pgbench -S`` (select-only) with 1 and 8 clients: TPS, and p50/p99 latency
  from pgbench's per-transaction logs; ``--mode`` is pgbench's ``-M``: ``simple``
  (the default) sends each statement as a Query, ``extended`` as a Parse, Bind and
  Execute, ``prepared`` as a Bind and Execute of a statement prepared once, as
  drivers do;
* a large-result scan (``--rows`` rows of about 110 bytes, read by psql):
  seconds and MB/s of result text;

directly (TCP to 127.0.0.1:5432), through HAProxy in plain TCP mode
(127.0.0.1:6432), through the same HAProxy behind an iptables ``nat`` REDIRECT of
127.0.0.1:5432 (clients dial 5432 as they do with the agent: what the agent's nat
redirect method costs, connection tracking and NAT on every packet), through
``relay_floor.py`` (127.0.0.1:7432: the agent's event loop and shape of code
relaying bytes without reading them, the floor under any Python session) and through
ringfence with full statement recording (127.0.0.1:5432, steered by the agent's
sk_lookup program, or with ``--redirect nat`` redirected by iptables; the nat tables
a setup leaves are deleted after it). The agent is stopped while the others run, since
while it runs every TCP connection to port 5432 in the namespace is redirected to it;
it is started afresh in each round. HAProxy and the agent, whose ratio is the goal, are
measured next to each other, HAProxy first in odd rounds and the agent first in even
ones, so that the host's drift over a round falls on both alike. The table shows
the median of each figure over the rounds, the ratios are taken within each round
(their median and range are printed), and the proxies' CPU time per transaction
(HAProxy's, and the agent's with its session workers and audit writer process; every
thread, user and system) is read from /proc, as is the whole host's CPU per
transaction with PostgreSQL's and pgbench's shares of it, and the host's context
switches per transaction. Then it profiles the agent
with py-spy under ``pgbench -S -c 8`` and prints the functions where its time goes.
Nothing here asserts a timing.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.support.agent import AgentProcess  # noqa: E402
from tests.support.netns import NetNS, netns  # noqa: E402
from tests.support.pgserver import PgServer, pgserver  # noqa: E402

HAPROXY_PORT = 6432
FLOOR_PORT = 7432
CLIENT_COUNTS = (1, 8)
ROWS = ("direct", "haproxy", "haproxy-nat", "pyrelay", "against", "ringfence")  # the table's order


# HAProxy behind a REDIRECT reaches the server from this address, which the rule leaves alone
# (as the agent's upstream mark does for the agent).
HAPROXY_SOURCE = "127.0.0.2"
REDIRECT_RULE = ["OUTPUT", "-p", "tcp", "-d", "127.0.0.1", "--dport", "5432",
                 "!", "-s", HAPROXY_SOURCE, "-j", "REDIRECT", "--to-ports", str(HAPROXY_PORT)]


def haproxy_config(path: Path, source: str | None = None,
                   upstream: str = "127.0.0.1:5432") -> None:
    """HAProxy in plain TCP mode on 127.0.0.1:HAPROXY_PORT, to the server at ``upstream``
    (from ``source``, when given)."""
    server = f"server postgres {upstream}{f' source {source}' if source else ''}"
    path.write_text(f"""global
    maxconn 2000
defaults
    mode tcp
    timeout connect 5s
    timeout client 1h
    timeout server 1h
listen postgres
    bind 127.0.0.1:{HAPROXY_PORT}
    {server}
""")


def prepare(ns: NetNS, server: PgServer) -> None:
    """pgbench's tables at scale 10, settled before timing (statistics, hint bits, a
    checkpoint, a 3 s warm-up), over the server's Unix socket."""
    ns.run([server.tool("pgbench"), "-i", "-s", "10", "-q", "-h", str(server.sockdir),
            "-p", "5432", "-U", "postgres", "postgres"], timeout=600)
    ns.run([server.tool("psql"), "-X", "-q", "-h", str(server.sockdir), "-U", "postgres",
            "-c", "VACUUM ANALYZE", "-c", "CHECKPOINT", "postgres"], timeout=600)
    ns.run([server.tool("pgbench"), "-h", str(server.sockdir), "-U", "postgres", "-S", "-n",
            "-c", "8", "-j", "2", "-T", "3", "postgres"], timeout=120)


def percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    index = min(len(sorted_values) - 1, max(0, round(q * (len(sorted_values) - 1))))
    return sorted_values[index]


def pgbench(ns: NetNS, server: PgServer, port: int, clients: int, seconds: int,
            logdir: Path, mode: str = "simple", host: str = "127.0.0.1") -> dict[str, float]:
    """pgbench -S -M ``mode`` dialling ``host``; TPS from its summary, latencies (ms) from
    its per-transaction log."""
    for old in logdir.glob("pgbench_log*"):
        old.unlink()
    argv = [server.tool("pgbench"), "-h", host, "-p", str(port), "-U", "postgres", "-S",
            "-M", mode, "-n", "-c", str(clients), "-j", str(min(clients, 2)), "-T", str(seconds),
            "--log", f"--log-prefix={logdir}/pgbench_log", "postgres"]
    done = ns.run(argv, timeout=seconds + 120)
    tps = float(re.search(r"tps = ([\d.]+)", done.stdout).group(1))  # type: ignore[union-attr]
    failed = re.search(r"number of failed transactions: (\d+)", done.stdout)
    latencies: list[float] = []
    for log in logdir.glob("pgbench_log*"):
        for line in log.read_text().splitlines():
            fields = line.split()
            if len(fields) >= 3 and fields[2].isdigit():
                latencies.append(int(fields[2]) / 1000.0)
    latencies.sort()
    return {"tps": tps, "p50": percentile(latencies, 0.50), "p99": percentile(latencies, 0.99),
            "failed": float(failed.group(1)) if failed else 0.0}


def scan(ns: NetNS, server: PgServer, port: int, rows: int, repeat: int = 3) -> dict[str, float]:
    """psql reads ``rows`` rows into wc; best of ``repeat`` runs."""
    sql = f"select g, repeat('x', 100) from generate_series(1, {rows}) g"
    psql = [server.tool("psql"), "-X", "-At", "-h", "127.0.0.1", "-p", str(port), "-U", "postgres",
            "-d", "postgres", "-c", sql]
    best = float("inf")
    size = 0
    for _ in range(repeat):
        started = time.perf_counter()
        done = ns.run(["sh", "-c", '"$@" | wc -c', "sh", *psql], timeout=600)
        best = min(best, time.perf_counter() - started)
        size = int(done.stdout.split()[0])
    return {"seconds": best, "mbps": size / best / 1e6}


def cpu_ticks(pid: int | None) -> int:
    """User plus system clock ticks of every thread of ``pid`` and of its child processes (the
    agent's audit writer) so far; 0 without a pid."""
    return sum(cpu_ticks_split(pid))


def cpu_ticks_split(pid: int | None) -> tuple[int, int, int]:
    """Clock ticks of ``pid``'s own threads in user and in system mode (with its session
    workers', the agent's other event loops), and of its other child processes with theirs
    (both: the agent's audit writer)."""
    if pid is None:
        return 0, 0, 0
    user = system = descendants = 0
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
            children = (task / "children").read_text().split()
        except OSError:
            continue  # a thread that just ended
        user += int(fields[11])
        system += int(fields[12])
        for child in children:
            try:
                worker = b"agent.workers" in Path(f"/proc/{child}/cmdline").read_bytes()
            except OSError:
                continue
            if worker:
                u, s, d = cpu_ticks_split(int(child))
                user, system, descendants = user + u, system + s, descendants + d
            else:
                descendants += cpu_ticks(int(child))
    return user, system, descendants


def machine_ticks() -> tuple[list[int], int]:
    """The host's CPU time so far by state (/proc/stat's first line: user, nice, system, idle,
    iowait, irq, softirq, steal, ...), in clock ticks, and its context switches so far, every
    CPU (the ``ctxt`` line), from one reading."""
    with open("/proc/stat") as f:
        ticks = [int(v) for v in f.readline().split()[1:9]]
        for line in f:
            if line.startswith("ctxt "):
                return ticks, int(line.split()[1])
    raise RuntimeError("/proc/stat has no ctxt line")


def busy_ticks(before: list[int], after: list[int]) -> int:
    """The host's CPU time between two :func:`machine_ticks` readings spent running anything
    (user, nice, system, irq, softirq): neither idle nor stolen."""
    return sum(after[i] - before[i] for i in (0, 1, 2, 5, 6))


def postgres_ticks(server: PgServer) -> int:
    """User plus system clock ticks of all of PostgreSQL's processes so far: the postmaster
    and its children alive (or ended, not yet reaped), as :func:`cpu_ticks` counts them,
    and the children it has reaped. The reaped ones are read first: a child reaped in
    between is then missed once rather than counted twice."""
    pid = int((server.datadir / "postmaster.pid").read_text().split()[0])
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    reaped = int(fields[13]) + int(fields[14])
    return reaped + cpu_ticks(pid)


def idle_and_steal(before: list[int], after: list[int]) -> tuple[float, float]:
    """Of all CPU time between two readings, the share (%) left idle (idle and iowait) and the
    share stolen by the hypervisor (steal): a run with much steal says more about the host."""
    spent = [b - a for a, b in zip(before, after, strict=True)]
    total = sum(spent) or 1
    return 100 * (spent[3] + spent[4]) / total, 100 * spent[7] / total


def measure(ns: NetNS, server: PgServer, port: int, args: argparse.Namespace,
            logdir: Path, proxy_pid: int | None = None) -> dict[str, Any]:
    """pgbench at each client count (with the proxy's CPU per transaction), then the scan."""
    result: dict[Any, Any] = {}
    hz = os.sysconf("SC_CLK_TCK")
    for clients in CLIENT_COUNTS:
        postgres, tools = postgres_ticks(server), os.times()
        before, (machine, switches) = cpu_ticks_split(proxy_pid), machine_ticks()
        result[clients] = run = pgbench(ns, server, port, clients, args.seconds, logdir,
                                        args.mode)
        after, (machine_after, switches_after) = cpu_ticks_split(proxy_pid), machine_ticks()
        tools_after = os.times()
        postgres_after = postgres_ticks(server)
        run["idle_pct"], run["steal_pct"] = idle_and_steal(machine, machine_after)
        transactions = run["tps"] * args.seconds
        # Where the host's CPU went, a transaction: all of it, PostgreSQL, pgbench (the only
        # child process this one waits for meanwhile).
        run["host_cpu_us"] = busy_ticks(machine, machine_after) / hz / transactions * 1e6
        run["switches"] = (switches_after - switches) / transactions
        run["postgres_cpu_us"] = (postgres_after - postgres) / hz / transactions * 1e6
        run["pgbench_cpu_us"] = ((tools_after.children_user + tools_after.children_system)
                                 - (tools.children_user + tools.children_system)) / transactions * 1e6
        user, system, children = (
            (a - b) / hz / transactions * 1e6 for a, b in zip(after, before, strict=True))
        run["agent_cpu_us"] = user + system + children if proxy_pid else float("nan")
        run["user_cpu_us"] = user if proxy_pid else float("nan")
        run["system_cpu_us"] = system if proxy_pid else float("nan")
        run["child_cpu_us"] = children if proxy_pid else float("nan")
    result["scan"] = scan(ns, server, port, args.rows)
    return result


def measure_proxy(ns: NetNS, server: PgServer, argv: list[str], port: int,
                  args: argparse.Namespace, logdir: Path) -> dict[str, Any]:
    """Start a proxy listening on ``port``, :func:`measure` through it, stop it."""
    proxy = ns.popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        time.sleep(1)
        return measure(ns, server, port, args, logdir, proxy.pid)
    finally:
        proxy.terminate()
        proxy.wait(30)


def measure_redirected(ns: NetNS, server: PgServer, argv: list[str],
                       args: argparse.Namespace, logdir: Path) -> dict[str, Any]:
    """:func:`measure_proxy` with clients dialling 5432, redirected to the proxy by iptables."""
    ns.run(["iptables", "-w", "-t", "nat", "-A", *REDIRECT_RULE])
    try:
        return measure_proxy(ns, server, argv, 5432, args, logdir)
    finally:
        ns.run(["iptables", "-w", "-t", "nat", "-D", *REDIRECT_RULE])
        drop_nat_tables(ns)


def drop_nat_tables(ns: NetNS) -> None:
    """Delete the namespace's (empty) nat tables. Their chains outlive their last rule, and
    while a nat table exists the kernel tracks every connection in the namespace: the
    setups measured after one would pay for connection tracking they do not use."""
    for family in ("ip", "ip6"):
        ns.run(["sh", "-c", f"nft list table {family} nat >/dev/null 2>&1 || exit 0; "
                            f"nft delete table {family} nat"])


@contextlib.contextmanager
def running_agent(ns: NetNS, args: argparse.Namespace, logdir: Path, workers: str,
                  against: bool = False) -> Iterator[tuple[AgentProcess, int]]:
    """A fresh agent of this tree (of the ``--against`` tree's with ``against``) and its pid,
    stopped afterwards and its nat tables dropped."""
    agent = AgentProcess(ns, logdir / ("against" if against else "agent"),
                         agent_settings=f"workers = {workers}", extra=redirect_settings(args),
                         source=args.against if against else ROOT)
    agent.start()
    try:
        assert agent.process is not None
        yield agent, agent.process.pid
    finally:
        agent.stop()
        drop_nat_tables(ns)


def measure_agent(ns: NetNS, server: PgServer, args: argparse.Namespace, logdir: Path,
                  workers: str) -> dict[str, Any]:
    """:func:`measure` through an agent run from the ``--against`` source tree."""
    with running_agent(ns, args, logdir, workers, against=True) as (_, pid):
        return measure(ns, server, 5432, args, logdir, pid)


def profile(ns: NetNS, server: PgServer, agent: AgentProcess, args: argparse.Namespace) -> str:
    """py-spy samples the agent (its session workers and audit writer too) while pgbench -S -c 8
    runs; returns a summary of the hot functions.

    Two recordings: every sample of a running thread (where wall time goes,
    including waits for the GIL), then only samples of the thread holding the
    GIL (where the CPU goes).
    """
    pyspy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(pyspy).exists():
        return "py-spy not found: .venv/bin/pip install py-spy"
    assert agent.process is not None
    args.out.mkdir(parents=True, exist_ok=True)
    seconds = args.profile_seconds
    load = ns.popen([server.tool("pgbench"), "-h", "127.0.0.1", "-p", "5432", "-U", "postgres",
                     "-S", "-M", args.mode, "-n", "-c", "8", "-j", "2", "-T",
                     str(2 * seconds + 10), "postgres"],
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    pid = str(agent.process.pid)
    summaries = []
    try:
        time.sleep(2)
        for name, extra in (("active threads", []), ("GIL holder", ["--gil"])):
            raw = args.out / f"profile-{'gil' if extra else 'all'}.txt"
            subprocess.run([pyspy, "record", "--pid", pid, "--duration", str(seconds), "--threads",
                            "--subprocesses", "--nonblocking", "--format", "raw", *extra,
                            "-o", str(raw)],
                           check=True, capture_output=True, timeout=seconds + 60)
            summaries.append(f"[{name}] " + summarize(raw))
        subprocess.run([pyspy, "record", "--pid", pid, "--duration", "3", "--nonblocking",
                        "--subprocesses", "-o", str(args.out / "profile.svg")],
                       check=False, capture_output=True, timeout=60)
    finally:
        load.wait(timeout=2 * seconds + 120)
    return "\n".join(summaries)


def summarize(raw: Path, top: int = 12) -> str:
    """Sample shares per thread and per function (own and inclusive) from collapsed stacks."""
    own: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    threads: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = stack.split(";")
        thread = "?"
        if frames and frames[0].startswith(("process ", "thread ")):
            thread = frames.pop(0)
        # "function (path/file.py:line)" -> "function (file.py)": one entry per function.
        frames = [re.sub(r" \((?:.*/)?([^/:]*)(?::\d+)?\)$", r" (\1)", f) for f in frames]
        if not frames:
            continue
        total += count
        threads[re.sub(r"0x[0-9a-f]+ ", "", thread)] += count
        own[frames[-1]] += count
        for frame in set(frames):
            inclusive[frame] += count
    if not total:
        return "no samples"
    lines = [f"{total} samples; threads: "
             + ", ".join(f"{t} {100 * c / total:.0f}%" for t, c in threads.most_common(4))]
    lines.append("  own%  incl%  function")
    for frame, count in own.most_common(top):
        lines.append(f"  {100 * count / total:4.1f}  {100 * inclusive[frame] / total:5.1f}  {frame}")
    return "\n".join(lines)


METRICS = [(1, "tps"), (1, "p50"), (1, "p99"), (8, "tps"), (8, "p50"), (8, "p99"),
           ("scan", "seconds"), ("scan", "mbps"),
           *((c, m) for c in CLIENT_COUNTS
             for m in ("agent_cpu_us", "user_cpu_us", "system_cpu_us", "child_cpu_us",
                       "idle_pct", "steal_pct", "host_cpu_us", "postgres_cpu_us",
                       "pgbench_cpu_us", "switches"))]
RATIOS = [("TPS c1", 1, "tps"), ("TPS c8", 8, "tps"), ("p99 c1", 1, "p99"), ("p99 c8", 8, "p99"),
          ("scan MB/s", "scan", "mbps")]


def median_of(rounds: list[dict[str, dict[Any, Any]]]) -> dict[str, dict[Any, Any]]:
    """Each metric of each setup: the median over the rounds."""
    out: dict[str, dict[Any, Any]] = {}
    for name in rounds[0]:
        out[name] = {}
        for key, metric in METRICS:
            out[name].setdefault(key, {})[metric] = statistics.median(r[name][key][metric] for r in rounds)
    return out


def ratios(rounds: list[dict[str, dict[Any, Any]]], name: str, base: str, key: Any,
           metric: str) -> list[float]:
    """``name``'s figure over ``base``'s, within each round, sorted."""
    return sorted(r[name][key][metric] / r[base][key][metric] for r in rounds)


def table(rounds: list[dict[str, dict[Any, Any]]]) -> str:
    """Medians over the rounds; ratios are taken within each round, then their median (range)."""
    results = median_of(rounds)
    head = (f"{'':<11} {'TPS c1':>9} {'p50 ms':>7} {'p99 ms':>7} {'TPS c8':>9} {'p50 ms':>7} "
            f"{'p99 ms':>7} {'scan s':>7} {'MB/s':>7}")
    lines = [f"median of {len(rounds)} round(s)", head, "-" * len(head)]
    for name, r in results.items():
        c1, c8, sc = r[1], r[8], r["scan"]
        lines.append(f"{name:<11} {c1['tps']:>9.0f} {c1['p50']:>7.3f} {c1['p99']:>7.3f} "
                     f"{c8['tps']:>9.0f} {c8['p50']:>7.3f} {c8['p99']:>7.3f} "
                     f"{sc['seconds']:>7.2f} {sc['mbps']:>7.1f}")
    lines.append("")
    def ratio_line(name: str, base: str, which: list[tuple[str, Any, str]]) -> str:
        parts = []
        for label, key, metric in which:
            values = ratios(rounds, name, base, key, metric)
            spread = f" ({values[0]:.2f}-{values[-1]:.2f})" if len(values) > 1 else ""
            parts.append(f"{label} {statistics.median(values):.2f}x{spread}")
        return f"{name + '/' + base:<21} " + "   ".join(parts)

    for base in ("direct", "haproxy", "haproxy-nat"):
        lines.append(ratio_line("ringfence", base, RATIOS))
    floor = (f"TPS c{c} {statistics.median(ratios(rounds, 'pyrelay', 'haproxy', c, 'tps')):.2f}x"
             for c in CLIENT_COUNTS)
    lines.append("pyrelay/haproxy       " + "   ".join(floor)
                 + "   (bytes relayed by the agent's event loop, nothing read: the Python floor)")
    if "against" in rounds[0]:  # its TPS, as ringfence's are given above
        lines.append(ratio_line("against", "haproxy", RATIOS[:2]) + "   (the --against tree)")
    nat = (f"TPS c{c} {statistics.median(ratios(rounds, 'haproxy-nat', 'haproxy', c, 'tps')):.2f}x"
           for c in CLIENT_COUNTS)
    lines.append("haproxy-nat/haproxy   " + "   ".join(nat)
                 + "   (HAProxy behind a REDIRECT like the agent's nat method: what that costs)")
    cpu = [r["ringfence"][c]["agent_cpu_us"] for r in rounds for c in CLIENT_COUNTS]
    if all(v == v for v in cpu):  # not NaN
        rf, relay, ha = results["ringfence"], results["pyrelay"], results["haproxy"]
        hanat = results["haproxy-nat"]
        def split(r: dict[str, float]) -> str:
            return f"{r['user_cpu_us']:.0f} user + {r['system_cpu_us']:.0f} system"

        lines.append("proxy CPU per transaction (all threads and child processes; the proxy's own "
                     "threads, the agent's session workers included, split into user and system "
                     "time):")
        lines.extend(f"  c{c}  ringfence {rf[c]['agent_cpu_us']:.0f} us ({split(rf[c])} + audit "
                     f"writer {rf[c]['child_cpu_us']:.0f})   pyrelay {relay[c]['agent_cpu_us']:.0f} us "
                     f"({split(relay[c])})   haproxy {ha[c]['agent_cpu_us']:.0f} us ({split(ha[c])})"
                     f"   haproxy-nat {hanat[c]['agent_cpu_us']:.0f} us"
                     + (f"   against {results['against'][c]['agent_cpu_us']:.0f} us "
                        f"({split(results['against'][c])} + audit writer "
                        f"{results['against'][c]['child_cpu_us']:.0f})" if "against" in results
                        else "")
                     for c in CLIENT_COUNTS)
    lines.append("the host's CPU per transaction (every process; neither idle nor stolen), of it "
                 "PostgreSQL + pgbench:")
    lines.extend(f"  c{c}  " + "   ".join(
        f"{name} {r[c]['host_cpu_us']:.0f} us ({r[c]['postgres_cpu_us']:.0f} + "
        f"{r[c]['pgbench_cpu_us']:.0f})" for name, r in results.items())
        for c in CLIENT_COUNTS)
    lines.append("the host's context switches per transaction (every process and CPU):")
    lines.extend(f"  c{c}  " + "   ".join(
        f"{name} {r[c]['switches']:.2f}" for name, r in results.items())
        for c in CLIENT_COUNTS)
    lines.append("the host's CPU during pgbench (median over the rounds), idle / stolen by the "
                 "hypervisor:")
    lines.extend(f"  c{c}  " + "   ".join(
        f"{name} {r[c]['idle_pct']:.0f}% / {r[c]['steal_pct']:.0f}%" for name, r in results.items())
        for c in CLIENT_COUNTS)
    steal = max(r[name][c]["steal_pct"] for r in rounds for name in r for c in CLIENT_COUNTS)
    if steal >= 5:
        lines.append(f"  up to {steal:.0f}% stolen in one run: the host was busy elsewhere, "
                     "and its TPS figures say as much about that as about the proxies")
    lines.append("goals: TPS >= 0.75x HAProxy at 1 and 8 clients; scan >= 0.8x direct")
    lines.extend(
        f"  ringfence/haproxy TPS c{c}, each round in order: " + " ".join(
            f"{r['ringfence'][c]['tps'] / r['haproxy'][c]['tps']:.2f}" for r in rounds)
        for c in CLIENT_COUNTS)
    failed = {f"{name} c{c}": r[name][c]["failed"] for r in rounds for name in r for c in CLIENT_COUNTS
              if r[name][c]["failed"]}
    if failed:
        lines.append(f"failed transactions: {failed}")
    return "\n".join(lines)


def redirect_settings(args: argparse.Namespace) -> str:
    """The agent's [redirect] section for ``--redirect`` (none for its default, which a
    checkout given to ``--against`` may predate)."""
    return "" if args.redirect == "auto" else f'[redirect]\nmethod = "{args.redirect}"\n'


def round_order(number: int) -> tuple[str, str]:
    """Which of HAProxy and the agent a round measures first: HAProxy in odd rounds, the
    agent in even ones, so that the host's drift over a round falls on both alike."""
    return ("haproxy", "ringfence") if number % 2 else ("ringfence", "haproxy")


def measure_ringfence(ns: NetNS, server: PgServer, args: argparse.Namespace, logdir: Path,
                      workers: str, number: int) -> dict[str, dict[Any, Any]]:
    """:func:`measure` through a fresh agent of this tree (row 'ringfence'), and with
    ``--against`` through the other tree's agent too, on the side away from HAProxy (see
    :func:`round_order`), so that HAProxy and ringfence stay next to each other."""
    result: dict[str, dict[Any, Any]] = {}
    haproxy_first = round_order(number)[0] == "haproxy"
    if args.against is not None and not haproxy_first:
        result["against"] = measure_agent(ns, server, args, logdir, workers)
    with running_agent(ns, args, logdir, workers) as (_, pid):
        result["ringfence"] = measure(ns, server, 5432, args, logdir, pid)
    if args.against is not None and haproxy_first:
        result["against"] = measure_agent(ns, server, args, logdir, workers)
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=int, default=10, help="pgbench duration per run")
    parser.add_argument("--rows", type=int, default=1_000_000, help="rows in the large-result scan")
    parser.add_argument("--rounds", type=int, default=3,
                        help="rounds of every setup; the table shows medians")
    parser.add_argument("--mode", choices=["simple", "extended", "prepared"], default="simple",
                        help="pgbench's query protocol (-M)")
    parser.add_argument("--workers", default="auto",
                        help="the agent's [agent] workers (event loops carrying sessions)")
    parser.add_argument("--against", type=Path, default=None,
                        help="another source tree (an earlier commit's checkout, extensions "
                             "built): its agent is measured in each round too, before or after "
                             "this one by turns, as the row 'against'")
    parser.add_argument("--redirect", choices=["auto", "nat", "sk_lookup"], default="auto",
                        help="the agent's [redirect] method (auto, its default: sk_lookup)")
    parser.add_argument("--profile-seconds", type=int, default=10)
    parser.add_argument("--out", type=Path, default=Path(tempfile.gettempdir()) / "ringfence-bench",
                        help="where profile.svg and profile.txt go")
    args = parser.parse_args()
    if shutil.which("haproxy") is None and not Path("/usr/sbin/haproxy").exists():
        print("HAProxy is missing: apt-get install haproxy", file=sys.stderr)
        return 1
    if shutil.which("nft") is None:
        print("nft is missing: apt-get install nftables (to drop the nat tables between "
              "setups)", file=sys.stderr)
        return 1
    haproxy = shutil.which("haproxy") or "/usr/sbin/haproxy"
    work = Path(tempfile.mkdtemp(prefix="ringfence-bench-"))
    rounds: list[dict[str, dict[Any, Any]]] = []
    try:
        with netns("rfbench") as ns, pgserver(ns) as server:
            prepare(ns, server)
            print(f"PostgreSQL {server.bindir.parent.name}, pgbench -S -M {args.mode} "
                  f"-T {args.seconds}, "
                  f"scan of {args.rows} rows, {args.rounds} round(s)", flush=True)
            haproxy_config(work / "haproxy.cfg")
            haproxy_config(work / "haproxy-nat.cfg", source=HAPROXY_SOURCE)
            workers = args.workers if args.workers.isdigit() else f'"{args.workers}"'
            for number in range(1, args.rounds + 1):
                result: dict[str, dict[Any, Any]] = {}
                result["direct"] = measure(ns, server, 5432, args, work)
                # HAProxy and the agent next to each other, in turns which goes first: the
                # goal's ratio is theirs, and the host drifts between setups.
                for name in round_order(number):
                    if name == "haproxy":
                        result["haproxy"] = measure_proxy(
                            ns, server, [haproxy, "-db", "-f", str(work / "haproxy.cfg")],
                            HAPROXY_PORT, args, work)
                    else:
                        result.update(measure_ringfence(ns, server, args, work, workers, number))
                result["haproxy-nat"] = measure_redirected(
                    ns, server, [haproxy, "-db", "-f", str(work / "haproxy-nat.cfg")], args, work)
                result["pyrelay"] = measure_proxy(
                    ns, server, [sys.executable, str(ROOT / "bench" / "relay_floor.py"),
                                 str(FLOOR_PORT), "5432"], FLOOR_PORT, args, work)
                rounds.append({name: result[name] for name in ROWS if name in result})
                print(f"round {number} done", flush=True)
            print()
            print(table(rounds))
            print()
            print(f"py-spy on the agent under pgbench -S -M {args.mode} -c 8 "
                  f"({args.profile_seconds} s):")
            with running_agent(ns, args, work, workers) as (agent, _):
                print(profile(ns, server, agent, args))
            print(f"flame graph: {args.out / 'profile.svg'}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
