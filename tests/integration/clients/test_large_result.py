"""A 5-million-row result streams through the agent in bounded memory."""

from __future__ import annotations

from pathlib import Path

from tests.integration.clients.conftest import Host, app_name, wait_sessions

ROWS = 5_000_000
QUERY = f"select g, repeat('x', 20) from generate_series(1, {ROWS}) g"
PEAK_RSS_LIMIT_KB = 150 * 1024
# What streaming may add to the agent's resident set (buffers are bounded at a few hundred KiB).
STREAM_GROWTH_LIMIT_KB = 32 * 1024


def peak_rss_kb(pid: int) -> int:
    """VmHWM (peak resident set) of a process, in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmHWM for pid {pid}")


def stream(pghost: Host, app: str, direct: bool) -> list[str]:
    """psql fetches the rows a million at a time (FETCH_COUNT) into cksum; returns its output."""
    psql = pghost.psql_argv("-At", "-v", "FETCH_COUNT=1000000", "-c", QUERY, direct=direct)
    _, out = pghost.run_client(["sh", "-c", '"$@" | cksum', "sh", *psql], app, timeout=600)
    return out.split()


def reset_peak_rss(pid: int) -> int:
    """Reset VmHWM to the current RSS (clear_refs 5); returns that RSS in KiB."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")
    return peak_rss_kb(pid)


def test_five_million_rows_stream_in_bounded_memory(pghost: Host) -> None:
    """Every row reaches psql byte-identical to a direct run, streaming them adds under 32 MB to
    the agent's peak RSS, and the agent's lifetime peak stays under 150 MB."""
    app = app_name("large")
    assert pghost.agent.process is not None
    agent_pid = pghost.agent.process.pid  # nsenter exec()s the agent: this pid is the agent's
    direct = stream(pghost, app, direct=True)
    startup_peak = peak_rss_kb(agent_pid)  # BPF compiled in a child: no LLVM in the agent
    before = reset_peak_rss(agent_pid)
    through = stream(pghost, app, direct=False)
    assert through == direct
    assert int(through[1]) == sum(len(f"{g}|{'x' * 20}\n") for g in range(1, ROWS + 1))
    assert peak_rss_kb(agent_pid) - before < STREAM_GROWTH_LIMIT_KB
    assert max(startup_peak, peak_rss_kb(agent_pid)) < PEAK_RSS_LIMIT_KB
    recs = wait_sessions(pghost.agent, app)[0]
    fetched = [r for r in recs if r["type"] == "result" and (r["command_tag"] or "").startswith("FETCH")]
    assert sum(r["rows"] for r in fetched) == ROWS
