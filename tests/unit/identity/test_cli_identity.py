"""`ringfence login/whoami/logout` against a control server running in a thread."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

from agent.cli import main
from agent.config import IssuerConfig
from agent.identity.control import ControlServer
from agent.identity.registry import LoginRegistry
from agent.identity.tokens import TokenVerifier
from tests.support.oidc import TestIssuer


@pytest.fixture
def control_socket(idp: TestIssuer, tmp_path: Path) -> Iterator[Path]:
    loop = asyncio.new_event_loop()
    verifier = TokenVerifier([IssuerConfig(idp.url, "ringfence", discovery=True)])
    server = ControlServer(tmp_path / "control.sock", LoginRegistry(), verifier)
    loop.run_until_complete(server.start())
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    yield server.path
    asyncio.run_coroutine_threadsafe(server.close(), loop).result(5)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(5)
    loop.close()


def test_login_whoami_logout(idp: TestIssuer, control_socket: Path, tmp_path: Path) -> None:
    """A token from stdin or a file registers; whoami shows the subject; logout forgets it."""
    runner = CliRunner()
    sock = ["--socket", str(control_socket)]
    result = runner.invoke(main, ["login", "--token", "-", *sock], input=idp.mint("dave") + "\n")
    assert result.exit_code == 0, result.output
    assert "subject  dave" in result.output
    assert "subject  dave" in runner.invoke(main, ["whoami", *sock]).output
    assert runner.invoke(main, ["logout", *sock]).output.strip() == "logged out"
    assert "no login registered" in runner.invoke(main, ["whoami", *sock]).output
    token_file = tmp_path / "token"
    token_file.write_text(idp.mint("erin"))
    result = runner.invoke(main, ["login", "--token-file", str(token_file), *sock])
    assert result.exit_code == 0 and "subject  erin" in result.output


def test_refusals_and_usage(idp: TestIssuer, control_socket: Path) -> None:
    """A bad token exits 1 with the agent's message; a token on the command line is refused."""
    runner = CliRunner()
    sock = ["--socket", str(control_socket)]
    result = runner.invoke(main, ["login", "--token", "-", *sock], input=idp.mint(aud="x"))
    assert result.exit_code == 1 and "audience" in result.output
    result = runner.invoke(main, ["login", "--token", idp.mint(), *sock])
    assert result.exit_code == 2 and "visible to other users" in result.output
    result = runner.invoke(main, ["whoami", "--socket", str(control_socket) + ".missing"])
    assert result.exit_code == 3 and "agent is not running" in result.output
