"""Fixtures for real clients through the agent: one namespace, server and agent per module.

Every client runs inside the namespace twice: once through the agent
(TCP to 127.0.0.1:5432, caught by the redirect) and once directly (the
server's Unix socket, which the redirect never sees), and the outputs are
compared.
"""

from __future__ import annotations

import itertools
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import require
from tests.support.agent import AgentProcess, sessions
from tests.support.netns import NetNS, netns
from tests.support.pgserver import PgServer, pgserver

HERE = Path(__file__).resolve().parent
PYTHON = sys.executable
_apps = itertools.count()


def app_name(label: str) -> str:
    """A unique application_name: how a test finds its own sessions in the audit trail."""
    return f"rf-{label}-{os.getpid()}-{next(_apps)}"


@dataclass
class Host:
    """The database host: a namespace, its PostgreSQL server and the agent in front of it."""

    ns: NetNS
    server: PgServer
    agent: AgentProcess

    def psql(self, *args: str, direct: bool = False, **kwargs: Any) -> subprocess.CompletedProcess[str]:
        """Run psql in the namespace as postgres, through the agent or directly."""
        return self.ns.run(self.psql_argv(*args, direct=direct), **kwargs)

    def psql_argv(self, *args: str, direct: bool = False) -> list[str]:
        host = str(self.server.sockdir) if direct else "127.0.0.1"
        return [self.server.tool("psql"), "-X", "-h", host, "-p", "5432", "-U", "postgres",
                "-d", "postgres", *args]

    def dsn(self, direct: bool = False) -> str:
        host = str(self.server.sockdir) if direct else "127.0.0.1"
        return f"host={host} port=5432 user=postgres dbname=postgres"

    def popen(self, argv: Sequence[str], app: str | None = None, **kwargs: Any) -> subprocess.Popen[Any]:
        """Start a client in the namespace; libpq clients get ``app`` as application_name."""
        env = dict(os.environ, **kwargs.pop("env", {}))
        if app is not None:
            env["PGAPPNAME"] = app
        return self.ns.popen(argv, env=env, **kwargs)

    def run_client(self, argv: Sequence[str], app: str | None = None, timeout: float = 120,
                   env: dict[str, str] | None = None) -> tuple[int, str]:
        """Run a client in the namespace; returns its pid and stdout (it must exit 0)."""
        proc = self.popen(argv, app, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          env=env or {})
        out, err = proc.communicate(timeout=timeout)
        assert proc.returncode == 0, f"{argv[0]} exited {proc.returncode}: {err}"
        return proc.pid, out


def require_capabilities() -> None:
    require(os.geteuid() == 0, "root")
    for tool in ("ip", "iptables-save", "runuser", "bpftool"):
        require(shutil.which(tool) is not None, f"the {tool} command")
    require(Path("/usr/lib/postgresql").is_dir(), "a PostgreSQL server (postgresql package)")


@contextmanager
def serving(name: str, **server: Any) -> Iterator[Host]:
    """A namespace, a PostgreSQL server (``server``: pgserver's options) and the agent."""
    require_capabilities()
    workdir = Path(tempfile.mkdtemp(prefix=f"ringfence-{name}-"))
    workdir.chmod(0o755)
    try:
        with netns(f"rf{name[:6]}") as ns, pgserver(ns, **server) as pg:
            agent = AgentProcess(ns, workdir / "agent")
            agent.start()
            try:
                yield Host(ns, pg, agent)
            finally:
                if agent.running:
                    agent.stop()
    finally:
        if not os.environ.get("RINGFENCE_KEEP_WORKDIR"):
            shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture(scope="module")
def pghost() -> Iterator[Host]:
    with serving("clients") as host:
        yield host


def sessions_of_app(records: list[dict[str, Any]], app: str) -> list[list[dict[str, Any]]]:
    """Every ended session whose client named itself ``app``, plus cancel requests aimed at them."""
    grouped = sessions(records)
    mine = []
    for sid, recs in grouped.items():
        start = next((r for r in recs if r["type"] == "session.start"), None)
        if start and (start.get("target") or {}).get("application_name") == app:
            mine.append(sid)
    cancels = [sid for sid, recs in grouped.items()
               if any((r.get("cancel") or {}).get("target_session_id") in mine for r in recs)]
    return [grouped[sid] for sid in mine + cancels
            if any(r["type"] == "session.end" for r in grouped[sid])]


def wait_sessions(agent: AgentProcess, app: str, count: int = 1,
                  timeout: float = 30) -> list[list[dict[str, Any]]]:
    """Wait until ``count`` sessions of application ``app`` have ended in the audit trail."""
    return agent.wait_for(
        lambda rs: (found := sessions_of_app(rs, app)) and len(found) >= count and found,
        timeout=timeout,
    )


def texts(recs: list[dict[str, Any]]) -> list[str]:
    """Statement texts recorded in these records, in order."""
    return [r.get("text", "") for r in recs if r["type"] == "query"]
