"""node-postgres (pg from npm) through the agent: same JSON as a direct run, statements recorded."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.conftest import require
from tests.integration.clients.conftest import HERE, Host, app_name, texts, wait_sessions
from tests.support.agent import REPO

PACKAGE = HERE / "node"
CACHE = REPO / ".cache" / "node-clients"


@pytest.fixture(scope="module")
def node_modules() -> Path:
    """pg installed from npm into .cache/ (once; later runs reuse it)."""
    require(shutil.which("node") is not None, "node (nodejs package)")
    require(shutil.which("npm") is not None, "npm (npm package)")
    CACHE.mkdir(parents=True, exist_ok=True)
    manifest = (PACKAGE / "package.json").read_text()
    if (CACHE / "package.json").exists() and (CACHE / "package.json").read_text() != manifest:
        shutil.rmtree(CACHE / "node_modules", ignore_errors=True)
    (CACHE / "package.json").write_text(manifest)
    if not (CACHE / "node_modules" / "pg").is_dir():
        done = subprocess.run(["npm", "install", "--no-audit", "--no-fund", "--no-package-lock"],
                              cwd=CACHE, capture_output=True, text=True, timeout=300)
        require(done.returncode == 0, f"npm install of pg: {done.stderr[-2000:]}")
    return CACHE / "node_modules"


def test_node_postgres_identical_and_recorded(pghost: Host, node_modules: Path) -> None:
    """Simple, parameterized and named queries, a transaction and an error return the same rows
    as directly; every statement is in the audit trail."""
    app = app_name("node")
    env = {"NODE_PATH": str(node_modules)}
    script = str(PACKAGE / "client.js")
    _, direct = pghost.run_client(["node", script, str(pghost.server.sockdir), app], env=env)
    _, through = pghost.run_client(["node", script, "127.0.0.1", app], env=env)
    assert json.loads(through) == json.loads(direct)
    out = json.loads(through)
    assert len(out["rows"]) == 50 and out["inserted"] == ["INSERT", 25]
    assert out["error"][0] == "22012"
    recs = wait_sessions(pghost.agent, app)[0]
    recorded = texts(recs)
    assert recorded.count("select $1::text || $2::text as joined") == 3
    params = [r for r in recs if r["type"] == "query"
              and r.get("text") == "select $1::text || $2::text as joined"]
    assert [p["parameters"] for p in params] == [["a", "b"], ["c", "d"], ["e", "f"]]
    results = [r for r in recs if r["type"] == "result"]
    assert any(r["command_tag"] == "INSERT 0 25" for r in results)
    assert any(r.get("error", {}).get("sqlstate") == "22012" for r in results)
