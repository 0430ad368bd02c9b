"""An agent started from a shell (soft limit of open files far below the hard one) still
serves hundreds of sessions at once: it takes the hard limit, as servers do."""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
from pathlib import Path

from agent.protocols import postgres as pg
from tests.conftest import require
from tests.support.agent import AgentProcess
from tests.support.netns import call_in, netns
from tests.support.pgserver import pgserver
from tests.support.pgwire import until_ready

SESSIONS = 200  # 400 descriptors in the agent, over the soft limit it was started with
SOFT, HARD = 256, 8192


def open_files_limits(pid: int) -> tuple[int, int]:
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            soft, hard = line.split()[3:5]
            return int(soft), int(hard)
    raise AssertionError("no open files limit")


def logins(count: int) -> list[bytes]:
    """``count`` sessions logged in at once through the agent; each one's answer to a query."""
    socks = []
    try:
        for _ in range(count):
            sock = socket.create_connection(("127.0.0.1", 5432), timeout=60)
            socks.append(sock)
            sock.sendall(pg.startup_message({"user": "postgres", "database": "postgres",
                                             "application_name": "many"}))
        for sock in socks:
            until_ready(sock)
        answers = []
        for n, sock in enumerate(socks):
            sock.sendall(pg.query_message(f"select {n}"))
            answers.append(until_ready(sock))
        return answers
    finally:
        for sock in socks:
            sock.close()


def test_hundreds_of_sessions_from_a_shell_started_agent() -> None:
    require(os.geteuid() == 0, "root")
    require(Path("/usr/lib/postgresql").is_dir(), "a PostgreSQL server (postgresql package)")
    workdir = Path(tempfile.mkdtemp(prefix="ringfence-many-"))
    try:
        with netns("rfmany") as ns, pgserver(ns, server_settings={"max_connections": "250"}):
            agent = AgentProcess(ns, workdir / "agent")
            agent.start(open_files=(SOFT, HARD))
            try:
                assert agent.process is not None
                assert open_files_limits(agent.process.pid) == (HARD, HARD)
                answers = call_in(ns, lambda: logins(SESSIONS))
                bad = [(n, a[-200:]) for n, a in enumerate(answers) if b"SELECT 1\x00" not in a]
                assert not bad, (len(bad), bad[:3], agent.log_text()[-3000:])
                assert [pg.BackendScanner().feed(a)[-2] for a in answers] == \
                    [pg.CommandComplete("SELECT 1")] * SESSIONS
            finally:
                agent.stop()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
