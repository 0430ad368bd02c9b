"""With the PostgreSQL server down, clients and health checks through the agent learn what
they would learn directly: nothing answers (pg_isready says "no response"), and psql says
why in the agent's words."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from tests.conftest import require
from tests.support.agent import AgentProcess
from tests.support.netns import netns
from tests.support.pgserver import pgserver


def test_a_stopped_server_looks_stopped_through_the_agent() -> None:
    require(os.geteuid() == 0, "root")
    require(Path("/usr/lib/postgresql").is_dir(), "a PostgreSQL server (postgresql package)")
    workdir = Path(tempfile.mkdtemp(prefix="ringfence-down-"))
    try:
        with netns("rfdown") as ns, pgserver(ns) as server:
            agent = AgentProcess(ns, workdir / "agent")
            agent.start()
            try:
                def isready(host: str) -> subprocess.CompletedProcess[str]:
                    return subprocess.run(ns.argv([server.tool("pg_isready"), "-h", host]),
                                          capture_output=True, text=True, timeout=60)

                assert isready("127.0.0.1").returncode == 0
                server.process.terminate()
                server.process.wait(30)
                direct, through = isready(str(server.sockdir)), isready("127.0.0.1")
                assert (direct.returncode, through.returncode) == (2, 2), through.stdout
                assert "no response" in through.stdout
                psql = subprocess.run(ns.argv([server.tool("psql"), "-X", "-h", "127.0.0.1", "-U",
                                               "postgres", "-c", "select 1"]),
                                      capture_output=True, text=True, timeout=60)
                assert psql.returncode == 2
                assert "ringfence: cannot reach 127.0.0.1:5432" in psql.stderr
                assert agent.running
            finally:
                agent.stop()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
