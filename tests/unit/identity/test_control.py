"""The control socket over a real Unix socket: the kernel tells who the caller is
(SO_PEERCRED, /proc/<pid>/sessionid); login, whoami and logout act for that caller only."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.config import IssuerConfig
from agent.identity.control import ControlServer, control_request, start_control_server
from agent.identity.registry import LoginRegistry
from agent.identity.tokens import TokenVerifier
from tests.support.oidc import TestIssuer

ROOT = Path(__file__).resolve().parents[3]


@pytest.fixture
def sock_dir() -> Iterator[Path]:
    """A directory other uids can traverse (pytest's tmp_path is private to root)."""
    path = Path(tempfile.mkdtemp(prefix="ringfence-control-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


CLIENT = """
import json, sys
from pathlib import Path
from agent.identity.control import control_request
print(json.dumps(control_request(Path(sys.argv[1]), json.loads(sys.argv[2]))))
"""


def client_as(
    path: Path, request: dict[str, Any], *, uid: int | None = None, loginuid: int | None = None
) -> dict[str, Any]:
    """Send a request from a child process, optionally as another uid or in a new audit session."""
    argv = [sys.executable, "-c", CLIENT, str(path), json.dumps(request)]
    if loginuid is not None:
        # Writing the login uid gives the process a new audit session id.
        argv = ["sh", "-c", f'echo {loginuid} > /proc/self/loginuid && exec "$@"', "sh", *argv]
    out = subprocess.run(
        argv,
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,
        user=uid,
        env={"PYTHONPATH": str(ROOT), "PATH": os.environ["PATH"]},
    )
    result: dict[str, Any] = json.loads(out.stdout)
    return result


def run(
    idp: TestIssuer,
    sock_dir: Path,
    body: Callable[[Path, LoginRegistry, list[tuple[str, dict[str, Any]]]], Awaitable[None]],
) -> None:
    """Start a control server on a socket in tmp_path, run ``body`` against it, close it."""
    verifier = TokenVerifier([IssuerConfig(idp.url, "ringfence", discovery=True, groups_claim="groups")])
    registry = LoginRegistry()
    events: list[tuple[str, dict[str, Any]]] = []
    path = sock_dir / "run" / "control.sock"

    async def main() -> None:
        server = ControlServer(path, registry, verifier, on_event=lambda n, f: events.append((n, f)))
        await server.start()
        try:
            await body(path, registry, events)
        finally:
            await server.close()
        assert not path.exists()

    asyncio.run(main())


def test_login_whoami_logout(idp: TestIssuer, sock_dir: Path) -> None:
    """A login registers the token for the caller's uid and session; whoami shows it; logout drops it."""
    token = idp.mint("alice@example.com")

    async def body(path: Path, registry: LoginRegistry, events: list[Any]) -> None:
        assert stat.S_IMODE(path.stat().st_mode) == 0o666
        ask = lambda r: asyncio.to_thread(control_request, path, r)  # noqa: E731
        login = await ask({"op": "login", "token": token})
        assert login["ok"], login
        reg = login["registration"]
        assert (reg["subject"], reg["uid"], reg["groups"]) == ("alice@example.com", 0, ["dba", "staff"])
        me = await ask({"op": "whoami"})
        assert me["registration"]["token_sha256"] == reg["token_sha256"]
        assert registry.lookup(0, me["audit_session"]) is not None
        assert (await ask({"op": "logout"}))["removed"] is True
        assert (await ask({"op": "whoami"}))["registration"] is None
        assert (await ask({"op": "logout"}))["removed"] is False
        assert [name for name, _ in events] == ["identity.login", "identity.logout"]
        assert token not in json.dumps(events)

    run(idp, sock_dir, body)


def test_pid_comes_from_the_kernel(idp: TestIssuer, sock_dir: Path) -> None:
    """The recorded pid is the connecting process's, from SO_PEERCRED."""

    async def body(path: Path, registry: LoginRegistry, events: list[Any]) -> None:
        me = await asyncio.to_thread(control_request, path, {"op": "whoami"})
        assert me["pid"] == os.getpid() and me["uid"] == os.getuid()

    run(idp, sock_dir, body)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as other uids")
def test_other_uid_and_other_session_do_not_see_the_login(idp: TestIssuer, sock_dir: Path) -> None:
    """A login made by root is not visible to uid 65534, nor to root in another audit session."""
    token = idp.mint("alice@example.com")

    async def body(path: Path, registry: LoginRegistry, events: list[Any]) -> None:
        login = await asyncio.to_thread(control_request, path, {"op": "login", "token": token})
        assert login["ok"]
        nobody = await asyncio.to_thread(client_as, path, {"op": "whoami"}, uid=65534)
        assert nobody["uid"] == 65534 and nobody["registration"] is None
        other = await asyncio.to_thread(client_as, path, {"op": "whoami"}, loginuid=4321)
        assert other["uid"] == 0 and other["audit_session"] != login["registration"]["audit_session"]
        assert other["registration"] is None
        # nobody registers for itself only
        mine = await asyncio.to_thread(client_as, path, {"op": "login", "token": token}, uid=65534)
        assert mine["registration"]["uid"] == 65534
        assert registry.lookup(0, login["registration"]["audit_session"]) is not None

    run(idp, sock_dir, body)


def test_bad_requests_and_tokens(idp: TestIssuer, sock_dir: Path) -> None:
    """A bad token is refused with its code and message and audited; junk gets a clean error."""

    async def body(path: Path, registry: LoginRegistry, events: list[Any]) -> None:
        ask = lambda r: asyncio.to_thread(control_request, path, r)  # noqa: E731
        bad = await ask({"op": "login", "token": idp.mint(aud="other")})
        assert (bad["ok"], bad["code"]) == (False, "bad_audience")
        assert "audience" in bad["error"]
        assert events[-1][0] == "identity.login_refused" and events[-1][1]["code"] == "bad_audience"
        assert (await ask({"op": "login"}))["code"] == "bad_request"
        assert (await ask({"op": "dance"}))["code"] == "bad_request"
        assert len(registry) == 0

        reader, writer = await asyncio.open_unix_connection(str(path))
        writer.write(b"not json\n")
        await writer.drain()
        answer = json.loads(await reader.readline())
        writer.close()
        assert answer["code"] == "bad_request"

    run(idp, sock_dir, body)


def test_start_control_server_function(idp: TestIssuer, tmp_path: Path) -> None:
    """start_control_server returns a serving asyncio server on a 0666 socket."""

    async def main() -> None:
        verifier = TokenVerifier([IssuerConfig(idp.url, "ringfence", discovery=True)])
        path = tmp_path / "control.sock"
        server = await start_control_server(path, LoginRegistry(), verifier)
        try:
            assert server.is_serving()
            me = await asyncio.to_thread(control_request, path, {"op": "whoami"})
            assert me["ok"] and me["registration"] is None
        finally:
            server.close()
            await server.wait_closed()

    asyncio.run(main())
