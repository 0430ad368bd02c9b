"""One intercepted PostgreSQL connection: what to forward, what to record.

The session is I/O-free. The proxy feeds it the bytes each side sent and
carries out the :class:`Actions` it returns: bytes for the server, bytes for
the client, audit records, and whether to end the connection. Bytes that no
rule changes are forwarded exactly as they came (the client's messages as
framed by the parser, the server's chunks untouched).
"""

from __future__ import annotations

import hashlib
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from agent.protocols import postgres as pg

AUTH_METHODS = {
    0: "ok",
    2: "kerberos",
    3: "password",
    5: "md5",
    7: "gss",
    9: "sspi",
    10: "sasl",
}

Record = tuple[str, dict[str, Any]]


@dataclass(slots=True)
class Actions:
    """What the proxy must do after feeding the session."""

    to_server: list[bytes] = field(default_factory=list)
    to_client: list[bytes] = field(default_factory=list)
    records: list[Record] = field(default_factory=list)
    close: str | None = None  # end the connection, for this reason, after sending


@dataclass(slots=True)
class _Pending:
    """A request whose response the session is waiting for."""

    kind: str  # "query" (simple Query or FunctionCall), "execute" or "sync"
    started: float = 0.0
    rows: int = 0
    commands: list[str] = field(default_factory=list)
    error: dict[str, str] | None = None


@dataclass(slots=True)
class _Portal:
    statement: str
    parameters: list[Any]


class PostgresSession:
    """Protocol state and recording for one client connection."""

    def __init__(
        self,
        session_id: str,
        context: dict[str, Any],
        *,
        max_message: int = pg.DEFAULT_MAX_MESSAGE,
        max_statement: int = 64 * 1024,
        cancel_target: Callable[[int, int], str | None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.session_id = session_id
        self.context = context
        self.max_statement = max_statement
        self.clock = clock
        self.cancel_target = cancel_target
        self.frontend = pg.FrontendParser(max_message)
        self.backend = pg.BackendScanner(max_message)
        self.started = clock()
        self.phase = "startup"  # startup → auth → ready → closed
        self.transaction = "I"
        self.bytes_from_client = 0
        self.bytes_from_server = 0
        self.statements = 0
        self.backend_key: tuple[int, int] | None = None
        self.auth_method: str | None = None
        self.startup: pg.StartupMessage | None = None
        self.start_recorded = False
        self.ended = False
        self.last_error: dict[str, str] | None = None
        self._pending: deque[_Pending] = deque()
        self._statements: dict[str, str] = {}
        self._portals: dict[str, _Portal] = {}
        self._refusal: tuple[str, str, str] | None = None

    # ------------------------------------------------------------------ client

    def client_data(self, data: bytes) -> Actions:
        """Bytes from the client: frame, record, and say what to forward."""
        actions = Actions()
        self.bytes_from_client += len(data)
        try:
            events = self.frontend.feed(data)
        except pg.ClientProtocolError as e:
            return self._protocol_violation(actions, f"client protocol error: {e}")
        for event in events:
            self._client_event(event, actions)
            if actions.close:
                break
        return actions

    def _client_event(self, event: pg.FrontendEvent, actions: Actions) -> None:
        if isinstance(event, pg.Query):
            self._begin_statement("query", event.sql, "simple", None, actions)
            actions.to_server.append(event.raw)
        elif isinstance(event, pg.Parse):
            self._statements[event.statement] = event.sql
            actions.to_server.append(event.raw)
        elif isinstance(event, pg.Bind):
            self._portals[event.portal] = _Portal(
                event.statement, _parameters(event, self.max_statement)
            )
            actions.to_server.append(event.raw)
        elif isinstance(event, pg.Execute):
            portal = self._portals.get(event.portal)
            sql = self._statements.get(portal.statement, "") if portal else ""
            params = portal.parameters if portal else None
            self._begin_statement("execute", sql, "extended", params, actions)
            actions.to_server.append(event.raw)
        elif isinstance(event, pg.Sync):
            self._pending.append(_Pending("sync"))
            actions.to_server.append(event.raw)
        elif isinstance(event, pg.Close):
            if event.kind == "S":
                self._statements.pop(event.name, None)
            else:
                self._portals.pop(event.name, None)
            actions.to_server.append(event.raw)
        elif isinstance(event, pg.FunctionCall):
            self._begin_statement(
                "query", f"-- function call oid {event.function_oid}", "function", None, actions
            )
            actions.to_server.append(event.raw)
        elif isinstance(event, pg.StartupMessage):
            self._startup_message(event, actions)
        elif isinstance(event, pg.SSLRequest | pg.GSSENCRequest):
            if self.phase != "startup":
                self._protocol_violation(actions, "client protocol error: late encryption request")
                return
            actions.to_client.append(pg.SSL_REFUSED)
        elif isinstance(event, pg.CancelRequest):
            self._cancel_request(event, actions)
        elif isinstance(event, pg.Terminate):
            actions.to_server.append(event.raw)
            self._end(actions, "client terminated", "success")
            actions.close = "client terminated"
        else:
            actions.to_server.append(event.raw)

    def _startup_message(self, event: pg.StartupMessage, actions: Actions) -> None:
        if event.protocol >> 16 != 3:
            self._protocol_violation(actions, "client protocol error: unsupported protocol")
            return
        self.startup = event
        if self._refusal is not None:
            sqlstate, message, reason = self._refusal
            actions.to_client.append(pg.error_response("FATAL", sqlstate, message))
            self._end(actions, reason, "failure", error={"sqlstate": sqlstate, "message": message})
            actions.close = reason
            return
        self.phase = "auth"
        self._record_start(actions)
        actions.to_server.append(event.raw)

    def _cancel_request(self, event: pg.CancelRequest, actions: Actions) -> None:
        if self._refusal is not None:
            self._end(actions, self._refusal[2], "failure")
            actions.close = self._refusal[2]
            return
        target = self.cancel_target(event.backend_pid, event.secret) if self.cancel_target else None
        self.phase = "cancel"
        self._record_start(
            actions,
            cancel={"backend_pid": event.backend_pid, "target_session_id": target},
        )
        actions.to_server.append(event.raw)

    def _begin_statement(
        self,
        kind: str,
        sql: str,
        protocol: str,
        parameters: list[Any] | None,
        actions: Actions,
    ) -> None:
        self.statements += 1
        encoded = sql.encode("utf-8", "surrogatepass")
        truncated = len(encoded) > self.max_statement
        text = encoded[: self.max_statement].decode("utf-8", "ignore") if truncated else sql
        record: dict[str, Any] = {
            "text": text,
            "length": len(encoded),
            "sha256": hashlib.sha256(encoded).hexdigest(),
            "truncated": truncated,
            "protocol": protocol,
        }
        if parameters is not None:
            record["parameters"] = parameters
        actions.records.append(("query", record))
        self._pending.append(_Pending(kind, started=self.clock()))

    # ------------------------------------------------------------------ server

    def server_data(self, data: bytes) -> Actions:
        """Bytes from the server: scan, record, forward them unchanged."""
        actions = Actions()
        self.bytes_from_server += len(data)
        try:
            events = self.backend.feed(data)
        except pg.ServerProtocolError as e:
            reason = f"server protocol error: {e}"
            self._end(actions, reason, "failure")
            actions.to_client.append(
                pg.error_response("FATAL", "08P01", f"ringfence: {reason}")
            )
            actions.close = reason
            return actions
        actions.to_client.append(data)
        for event in events:
            self._server_event(event, actions)
        return actions

    def _server_event(self, event: pg.BackendEvent, actions: Actions) -> None:
        pending = self._pending
        head = pending[0] if pending else None
        if isinstance(event, pg.DataRows):
            if head is not None:
                head.rows += event.count
        elif isinstance(event, pg.CommandComplete):
            if head is not None and head.kind != "sync":
                head.commands.append(event.tag)
                rows = event.rows
                if rows is not None and not event.tag.startswith(("SELECT", "COPY", "FETCH")):
                    head.rows += rows
                elif rows is not None and head.rows == 0:
                    head.rows = rows
                if head.kind == "execute":
                    self._finish(pending.popleft(), actions)
        elif isinstance(event, pg.EmptyQueryResponse | pg.PortalSuspended):
            if head is not None and head.kind == "execute":
                if isinstance(event, pg.PortalSuspended):
                    head.commands.append("(portal suspended)")
                self._finish(pending.popleft(), actions)
        elif isinstance(event, pg.ErrorResponse):
            self._server_error(event, actions)
        elif isinstance(event, pg.ReadyForQuery):
            self.transaction = event.status
            if self.phase == "auth":
                self.phase = "ready"
            while pending:
                item = pending.popleft()
                if item.kind == "sync":
                    break
                if item.kind == "execute" and item.error is None:
                    item.error = {"sqlstate": "", "message": "not executed: pipeline aborted"}
                self._finish(item, actions)
                if item.kind == "query":
                    break
        elif isinstance(event, pg.AuthenticationRequest):
            if event.code != 0:
                self.auth_method = AUTH_METHODS.get(event.code, self.auth_method or "other")
                if event.code == 10:
                    self.auth_method = _sasl_mechanism(event.body)
        elif isinstance(event, pg.BackendKeyData):
            self.backend_key = (event.backend_pid, event.secret)

    def _server_error(self, event: pg.ErrorResponse, actions: Actions) -> None:
        error = {"sqlstate": event.sqlstate, "message": event.message}
        self.last_error = error
        if self.phase in ("auth", "startup"):
            return
        pending = self._pending
        if not pending or pending[0].kind == "sync":
            return
        head = pending[0]
        head.error = error
        if head.kind == "execute":
            self._finish(pending.popleft(), actions)
            # The server now discards everything until Sync: executions
            # queued behind the failed one never run.
            while pending and pending[0].kind == "execute":
                item = pending.popleft()
                item.error = {"sqlstate": "", "message": "not executed: earlier error in pipeline"}
                self._finish(item, actions)

    def _finish(self, item: _Pending, actions: Actions) -> None:
        record: dict[str, Any] = {
            "duration_ms": round((self.clock() - item.started) * 1000.0, 3),
            "rows": item.rows,
            "command_tag": item.commands[-1] if item.commands else None,
            "commands": item.commands,
            "outcome": "failure" if item.error else "success",
        }
        if item.error:
            record["error"] = item.error
        actions.records.append(("result", record))

    # ------------------------------------------------------------- lifecycle

    def defer_refusal(self, sqlstate: str, message: str, reason: str) -> None:
        """Answer the coming StartupMessage with this FATAL error instead of forwarding it."""
        self._refusal = (sqlstate, message, reason)

    def refuse(self, sqlstate: str, message: str, reason: str) -> Actions:
        """End the connection with a protocol-native FATAL error to the client."""
        actions = Actions()
        actions.to_client.append(pg.error_response("FATAL", sqlstate, message))
        self._end(actions, reason, "failure", error={"sqlstate": sqlstate, "message": message})
        actions.close = reason
        return actions

    def connection_lost(self, reason: str, outcome: str = "success") -> Actions:
        """The connection ended (either side closed, or the agent stopped)."""
        actions = Actions()
        if self.phase == "auth" and self.last_error is not None:
            reason = f"authentication failed: {self.last_error.get('message', '')}"
            outcome = "failure"
        self._end(actions, reason, outcome)
        return actions

    def _protocol_violation(self, actions: Actions, reason: str) -> Actions:
        actions.to_client.append(pg.error_response("FATAL", "08P01", f"ringfence: {reason}"))
        self._end(actions, reason, "failure")
        actions.close = reason
        return actions

    def _record_start(self, actions: Actions, **extra: Any) -> None:
        if self.start_recorded:
            return
        self.start_recorded = True
        record = dict(self.context)
        startup = self.startup
        record["target"] = (
            {
                "database": startup.database,
                "user": startup.user,
                "application_name": startup.parameters.get("application_name"),
            }
            if startup
            else None
        )
        record.update(extra)
        actions.records.append(("session.start", record))

    def _end(
        self, actions: Actions, reason: str, outcome: str, error: dict[str, str] | None = None
    ) -> None:
        if self.ended:
            return
        self.ended = True
        self._record_start(actions)
        # Statements still waiting for a response when the connection ends.
        for item in self._pending:
            if item.kind != "sync":
                item.error = item.error or {"sqlstate": "", "message": f"interrupted: {reason}"}
                self._finish(item, actions)
        self._pending.clear()
        self.phase = "closed"
        record: dict[str, Any] = {
            "reason": reason,
            "outcome": outcome,
            "bytes_from_client": self.bytes_from_client,
            "bytes_from_server": self.bytes_from_server,
            "statements": self.statements,
            "duration_ms": round((self.clock() - self.started) * 1000.0, 3),
            "auth_method": self.auth_method,
        }
        if self.backend_key is not None:
            record["backend_pid"] = self.backend_key[0]
        if error is not None:
            record["error"] = error
        actions.records.append(("session.end", record))


def _sasl_mechanism(body: bytes) -> str:
    names = [n.decode("ascii", "replace") for n in body.split(b"\x00") if n]
    return "scram-sha-256" if "SCRAM-SHA-256" in names else "sasl:" + ",".join(names)


def _parameters(event: pg.Bind, limit: int) -> list[Any]:
    """Bound parameters for the record: text values as text, binary ones as length."""
    formats = event.parameter_formats
    out: list[Any] = []
    for i, value in enumerate(event.parameters):
        fmt = formats[0] if len(formats) == 1 else (formats[i] if i < len(formats) else 0)
        if value is None:
            out.append(None)
        elif fmt == 0:
            out.append(value[:limit].decode("utf-8", "replace"))
        else:
            out.append({"format": "binary", "length": len(value)})
    return out
