"""The ringfence agent as a real process inside a test's network namespace."""

from __future__ import annotations

import contextlib
import json
import os
import resource
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tests.support.netns import NetNS

REPO = Path(__file__).resolve().parents[2]
RINGFENCE = [sys.executable, "-m", "agent.cli"]


def ringfence(*args: str, config: Path | None = None, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    """Run a ringfence CLI command on this host (outside any namespace)."""
    env = dict(os.environ, PYTHONPATH=str(REPO))
    if config is not None:
        env["RINGFENCE_CONFIG"] = str(config)
    kwargs.setdefault("capture_output", True)
    kwargs.setdefault("text", True)
    kwargs.setdefault("timeout", 120)
    return subprocess.run([*RINGFENCE, *args], env=env, check=False, **kwargs)


# Every agent a test started, so that one a failing test left running is stopped when the
# test run ends (see stop_leftovers).
STARTED: list[AgentProcess] = []


def stop_leftovers() -> None:
    """Stop the agents still running (a test that failed before stopping its own)."""
    for agent in STARTED:
        if agent.running:
            with contextlib.suppress(RuntimeError):  # (stop kills one that would not end)
                agent.stop(timeout=30)
    STARTED.clear()


class AgentProcess:
    """Writes a config, starts ``ringfence run`` in ``ns``, waits for READY=1."""

    def __init__(self, ns: NetNS, workdir: Path, *, bpf_mode: str = "required",
                 extra: str = "", services: str | None = None, policy: Path | None = None,
                 agent_settings: str = "", source: Path = REPO) -> None:
        """``source``: the source tree the agent runs from (another checkout, its extensions
        built, to measure one build against another)."""
        self.ns = ns
        self.source = source
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.config = workdir / "ringfence.toml"
        self.log = workdir / "agent.log"
        self.process: subprocess.Popen[bytes] | None = None
        services = services or '[[protect]]\nname = "postgres"\nprotocol = "postgres"\nport = 5432\n'
        self.config.write_text(
            f"""
[agent]
state_dir = "{workdir / 'state'}"
run_dir = "{workdir / 'run'}"
log_format = "text"
log_level = "debug"
{agent_settings}

[bpf]
mode = "{bpf_mode}"

[audit]
path = "{workdir / 'audit'}"

[policy]
path = "{policy or REPO / 'packaging' / 'policy.toml'}"

{extra}

{services}
"""
        )

    def start(self, timeout: float = 180, open_files: tuple[int, int] | None = None) -> None:
        """Start and wait until ready; ``open_files`` (soft, hard) limits it as a shell would."""
        notify_path = self.workdir / "notify.sock"
        if notify_path.exists():
            notify_path.unlink()
        notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        notify.bind(str(notify_path))
        notify.settimeout(0.5)
        env = dict(os.environ, NOTIFY_SOCKET=str(notify_path), PYTHONPATH=str(self.source))
        with open(self.log, "ab") as log:
            self.process = self.ns.popen(
                [*RINGFENCE, "run", "--config", str(self.config)],
                env=env, stdout=log, stderr=log, cwd=str(self.source),
                preexec_fn=None if open_files is None else
                (lambda: resource.setrlimit(resource.RLIMIT_NOFILE, open_files)),
            )
        if self not in STARTED:
            STARTED.append(self)
        deadline = time.monotonic() + timeout
        try:
            while True:
                try:
                    if b"READY=1" in notify.recv(4096):
                        return
                except TimeoutError:
                    pass
                if self.process.poll() is not None:
                    raise RuntimeError(f"agent exited {self.process.returncode}:\n{self.log_text()}")
                if time.monotonic() > deadline:
                    raise RuntimeError(f"agent not ready after {timeout}s:\n{self.log_text()}")
        finally:
            notify.close()

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")[-8000:]

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> int:
        assert self.process is not None
        self.process.send_signal(sig)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise RuntimeError(f"agent did not stop within {timeout}s:\n{self.log_text()}") from None

    def kill(self) -> None:
        assert self.process is not None
        self.process.kill()
        self.process.wait()

    def session_pids(self) -> list[int]:
        """The processes that carry sessions: the agent and its session workers."""
        assert self.process is not None
        pids = [self.process.pid]
        for task in Path(f"/proc/{self.process.pid}/task").iterdir():
            for child in (task / "children").read_text().split():
                cmdline = Path(f"/proc/{child}/cmdline").read_bytes().split(b"\0")
                if b"agent.workers" in cmdline:
                    pids.append(int(child))
        return pids

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def records(self, *, joined: bool = False) -> list[dict[str, Any]]:
        """Every audit record so far, via ``ringfence audit tail --json``. A query record
        that carries its result (audit/SCHEMA.md) is given as the query and then its result,
        as when the two are stored apart, so that tests read both forms alike; ``joined``:
        the records as they are stored."""
        done = ringfence("audit", "tail", "--json", "--lines", "1000000000", config=self.config)
        if done.returncode != 0:
            raise RuntimeError(f"audit tail failed: {done.stderr}")
        records = [json.loads(line) for line in done.stdout.splitlines() if line.strip()]
        return records if joined else results_apart(records)

    def wait_for(self, predicate: Callable[[list[dict[str, Any]]], Any], timeout: float = 20) -> Any:
        """Poll the audit trail until ``predicate(records)`` is truthy; return its value."""
        deadline = time.monotonic() + timeout
        while True:
            records = self.records()
            value = predicate(records)
            if value:
                return value
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"audit trail never matched; last records: {json.dumps(records[-10:], indent=1)}"
                )
            time.sleep(0.1)


def results_apart(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``records`` (JSON form) with each result a query record carries as a ``result``
    record of its own right after it (same seq, session and time)."""
    out: list[dict[str, Any]] = []
    for r in records:
        result = r.get("result") if r["type"] == "query" else None
        if isinstance(result, dict):
            r = dict(r)
            del r["result"]
            out.append(r)
            out.append({key: r[key] for key in ("seq", "ts", "host", "session_id", "index")}
                       | {"type": "result"} | result)
        else:
            out.append(r)
    return out


def sessions(records: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """Records grouped by session id, in order."""
    out: dict[str, list[dict[str, Any]]] = {}
    for r in records:
        if r.get("session_id"):
            out.setdefault(r["session_id"], []).append(r)
    return out


def session_of_pid(
    records: list[dict[str, Any]], pid: int, parent: bool = False
) -> list[dict[str, Any]] | None:
    """The finished session of process ``pid`` (or, with ``parent``, of a child of ``pid``)."""
    for recs in sessions(records).values():
        start = next((r for r in recs if r["type"] == "session.start"), None)
        process = (start or {}).get("process") or {}
        ancestry = process.get("ancestry") or [{}]
        found = ancestry[0].get("pid") == pid if parent else process.get("pid") == pid
        if found and any(r["type"] == "session.end" for r in recs):
            return recs
    return None
