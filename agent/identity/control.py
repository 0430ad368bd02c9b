"""The agent's control socket (``<run_dir>/control.sock``) and its client.

A Unix stream socket, mode 0666: any local user may register a token, but only
for themselves, since the caller's uid and pid come from the kernel
(SO_PEERCRED) and its audit session from ``/proc/<pid>/sessionid``.

Protocol: one JSON object per line each way, one request per connection.

* ``{"op": "login", "token": "<JWT>"}`` -> ``{"ok": true, "registration": {...}}``
* ``{"op": "logout"}`` -> ``{"ok": true, "removed": true|false}``
* ``{"op": "whoami"}`` -> ``{"ok": true, "uid": .., "audit_session": .., "registration": {..}|null}``
* errors -> ``{"ok": false, "code": "...", "error": "<what to do>"}``
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.identity import IdentityError
from agent.identity.actor import set_id
from agent.identity.env import PROC
from agent.identity.registry import LoginRegistry, RegistryFull
from agent.identity.tokens import TokenRejected, TokenVerifier

log = logging.getLogger(__name__)

SOCKET_NAME = "control.sock"
MAX_LINE_BYTES = 64 * 1024
REQUEST_TIMEOUT_SECONDS = 30.0

EventSink = Callable[[str, dict[str, Any]], None]


class ControlError(IdentityError):
    """The control socket cannot be reached or answered badly."""


@dataclass(frozen=True, slots=True)
class Peer:
    """Who is on the other end of a control connection, from the kernel."""

    pid: int
    uid: int
    gid: int
    audit_session: int | None

    def to_record(self) -> dict[str, Any]:
        return {
            "pid": self.pid,
            "uid": self.uid,
            "gid": self.gid,
            "audit_session": self.audit_session,
        }


def peer_credentials(sock: Any) -> tuple[int, int, int]:
    """(pid, uid, gid) of a connected Unix socket's peer, from SO_PEERCRED."""
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, gid = struct.unpack("3i", raw)
    return pid, uid, gid


def audit_session_of(pid: int, uid: int, proc: Path = PROC) -> int | None:
    """The audit session id of ``pid``; None if unset. Raises if ``pid`` no longer
    belongs to ``uid`` (it exited and the pid was reused)."""
    try:
        status = (proc / str(pid) / "status").read_text()
        raw = (proc / str(pid) / "sessionid").read_text().strip()
    except OSError:
        raise ControlError(f"process {pid} went away") from None
    real_uid = next((int(line.split()[1]) for line in status.splitlines() if line.startswith("Uid:")), None)
    if real_uid != uid:
        raise ControlError(f"process {pid} no longer belongs to uid {uid}")
    try:
        return set_id(int(raw))
    except ValueError:
        return None


class ControlServer:
    """Serves login/logout/whoami on a Unix socket; ``await start()``, ``await close()``."""

    def __init__(
        self,
        path: Path,
        registry: LoginRegistry,
        verifier: TokenVerifier,
        *,
        on_event: EventSink | None = None,
        proc: Path = PROC,
    ) -> None:
        self.path = Path(path)
        self.registry = registry
        self.verifier = verifier
        self._on_event = on_event
        self._proc = proc
        self.server: asyncio.AbstractServer | None = None

    async def start(self) -> asyncio.AbstractServer:
        self.path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            if self.path.is_socket():
                self.path.unlink()
        self.server = await asyncio.start_unix_server(self._serve, path=str(self.path), limit=MAX_LINE_BYTES)
        os.chmod(self.path, 0o666)
        return self.server

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()
            self.server = None
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

    def _event(self, name: str, fields: dict[str, Any]) -> None:
        if self._on_event is None:
            return
        try:
            self._on_event(name, fields)
        except Exception:
            log.exception("control: event sink failed for %s", name)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            response = await asyncio.wait_for(self._handle(reader, writer), timeout=REQUEST_TIMEOUT_SECONDS)
        except TimeoutError:
            response = {"ok": False, "code": "timeout", "error": "request timed out"}
        except Exception:
            log.exception("control: request failed")
            response = {"ok": False, "code": "internal", "error": "internal error; see agent log"}
        try:
            writer.write(json.dumps(response).encode() + b"\n")
            await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError, OSError):
                await writer.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> dict[str, Any]:
        try:
            pid, uid, gid = peer_credentials(writer.get_extra_info("socket"))
            peer = Peer(pid, uid, gid, audit_session_of(pid, uid, self._proc))
        except (OSError, ControlError) as e:
            return {"ok": False, "code": "peer", "error": f"cannot identify the caller: {e}"}
        try:
            line = await reader.readline()
        except (ValueError, asyncio.LimitOverrunError):
            return {"ok": False, "code": "bad_request", "error": "request line too long"}
        try:
            request = json.loads(line)
        except ValueError:
            request = None
        if not isinstance(request, dict) or not isinstance(request.get("op"), str):
            return {"ok": False, "code": "bad_request", "error": "expected a JSON object with op"}
        op = request["op"]
        if op == "login":
            return await self._login(peer, request.get("token"))
        if op == "logout":
            removed = self.registry.remove(peer.uid, peer.audit_session)
            if removed is not None:
                self._event("identity.logout", {"peer": peer.to_record(), **removed.token.to_record()})
            return {"ok": True, "removed": removed is not None, **peer.to_record()}
        if op == "whoami":
            registration = self.registry.lookup(peer.uid, peer.audit_session)
            return {
                "ok": True,
                **peer.to_record(),
                "registration": registration.to_record() if registration else None,
            }
        return {"ok": False, "code": "bad_request", "error": f"unknown op {op!r}"}

    async def _login(self, peer: Peer, token: Any) -> dict[str, Any]:
        if not isinstance(token, str) or not token.strip():
            return {"ok": False, "code": "bad_request", "error": "no token given"}
        try:
            verified = await self.verifier.verify_async(token)
        except TokenRejected as e:
            self._event("identity.login_refused", {"peer": peer.to_record(), **e.to_record()})
            return {"ok": False, "code": e.code, "error": e.message}
        try:
            registration = self.registry.register(peer.uid, peer.audit_session, peer.pid, verified)
        except RegistryFull as e:
            return {"ok": False, "code": "registry_full", "error": str(e)}
        self._event("identity.login", {"peer": peer.to_record(), **verified.to_record()})
        return {"ok": True, "registration": registration.to_record()}


async def start_control_server(
    path: Path,
    registry: LoginRegistry,
    verifier: TokenVerifier,
    *,
    on_event: EventSink | None = None,
) -> asyncio.AbstractServer:
    """Serve the control socket at ``path`` (mode 0666) until the returned server closes."""
    return await ControlServer(path, registry, verifier, on_event=on_event).start()


def control_request(
    path: Path, request: dict[str, Any], timeout: float = REQUEST_TIMEOUT_SECONDS + 5
) -> dict[str, Any]:
    """Send one request to the agent's control socket and return its answer."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        try:
            sock.connect(str(path))
        except FileNotFoundError:
            raise ControlError(f"the agent is not running (no control socket at {path})") from None
        except OSError as e:
            raise ControlError(f"cannot reach the agent at {path}: {e.strerror or e}") from None
        try:
            sock.sendall(json.dumps(request).encode() + b"\n")
            data = b""
            while not data.endswith(b"\n") and len(data) <= MAX_LINE_BYTES:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                data += chunk
        except OSError as e:
            raise ControlError(f"the agent at {path} did not answer: {e}") from None
    try:
        response = json.loads(data)
    except ValueError:
        raise ControlError(f"the agent at {path} answered something that is not JSON") from None
    if not isinstance(response, dict):
        raise ControlError(f"the agent at {path} answered something that is not an object")
    return response
