"""One intercepted PostgreSQL connection: what to forward, what to record.

The session is I/O-free. The proxy feeds it the bytes each side sent and
carries out the :class:`Actions` it returns: bytes for the server, bytes for
the client, audit records, and whether to end the connection. Bytes that no
rule changes are forwarded exactly as they came (the client's messages as
framed by the parser, the server's chunks untouched).
"""

from __future__ import annotations

import hashlib
import struct
import time
from collections import deque
from collections.abc import Callable
from dataclasses import MISSING, dataclass, field, fields
from functools import partial
from typing import TYPE_CHECKING, Any

import msgpack

from agent.pgconf import parse_bool
from agent.protocols import postgres as pg
from policy import Subject, classify_replication
from policy.classify import MAX_CACHED_TEXT, Classification
from policy.classify import plain_text as _plain_text
from policy.classify import statement_shape as _statement_shape

if TYPE_CHECKING:
    from policy import Policy

# Sent to the server in place of a blocked statement. It fails in the server's
# parser (nothing runs), so the server itself moves the session into the state
# an error leaves it in: a failed transaction block, or discarding extended
# protocol messages until Sync. The server's error is then replaced by the
# agent's own ErrorResponse.
SUBSTITUTE_SQL = "ringfence blocked this statement"
# In place of a blocked Execute: a Parse of SUBSTITUTE_SQL into a statement of that name.
# It fails either way (in the parser, or because a statement of that name exists) and
# touches no statement or portal of the client's.
_SUBSTITUTE_PARSE = pg.frontend_message(
    b"P", SUBSTITUTE_SQL.encode() + b"\x00" + SUBSTITUTE_SQL.encode() + b"\x00\x00\x00")
# Bound on server bytes held back while a blocked statement's error is awaited.
MAX_HELD = 1 << 20

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


def replication_mode(value: str | None) -> str | None:
    """What a StartupMessage's ``replication`` parameter asks for, read as the server reads
    it: "logical" for ``database`` (replication commands and SQL), "physical" for a true
    boolean (replication commands only), None for false or absent. (The server refuses any
    other value at login.)"""
    if value is None:
        return None
    if value == "database":
        return "logical"
    return "physical" if parse_bool(value) else None


@dataclass(slots=True)
class Actions:
    """What the proxy must do after feeding the session."""

    to_server: list[bytes] = field(default_factory=list)
    to_client: list[bytes] = field(default_factory=list)
    records: list[Record] = field(default_factory=list)
    # Records that must be committed to disk before anything else here is done.
    durable: list[Record] = field(default_factory=list)
    # A token the client sent as its password: the proxy verifies it (it may
    # fetch keys) and hands the result to ``identity_resolved``.
    verify_token: str | None = None
    # Start TLS with the client once the bytes above are sent (after 'S').
    start_tls: bool = False
    close: str | None = None  # end the connection, for this reason, after sending
    # The result event among ``records`` that answers the last statement the session sent
    # (none is left waiting after it): the audit trail may store it in that statement's
    # query record (see audit.process.AuditProcess.emit_packed).
    joining: dict[str, Any] | None = None


@dataclass(slots=True)
class _Pending:
    """A request whose response the session is waiting for."""

    kind: str  # "query" (simple Query or FunctionCall), "execute", "sync" or "blocked"
    started: float = 0.0
    rows: int = 0
    command_rows: int = 0  # DataRows since the last CommandComplete
    copy_bytes: int = 0  # COPY data either way
    commands: list[str] = field(default_factory=list)
    error: dict[str, str] | None = None
    reply: bytes = b""  # for "blocked": the ErrorResponse the client gets
    extended: bool = False  # for "blocked": a Parse (the server then skips to Sync)
    # What its PREPARE and DEALLOCATE statements do to the prepared statements, in order:
    # each applied when its CommandComplete comes (not when the server refuses or skips it).
    changes: list[tuple[str, str | None, str]] | None = None


@dataclass(slots=True)
class _Reused:
    """An allow decision taken for an earlier statement of the same shape in this session."""

    record: dict[str, Any]  # the query record's "policy" field
    allowed: bool = True
    encoded: bytes = field(init=False)  # the same as msgpack, for the one-step path

    def __post_init__(self) -> None:
        self.encoded = msgpack.packb(self.record, use_bin_type=True)


_INT32 = struct.Struct("!i")
_INT16 = struct.Struct("!h")
_PARAMETERS_KEY = msgpack.packb("parameters")
# The answers to Parse and Bind, and to a Describe of a portal with no rows to describe.
_PARSE_COMPLETE = b"1\x00\x00\x00\x04"
_BIND_COMPLETE = b"2\x00\x00\x00\x04"
_NO_DATA = b"n\x00\x00\x00\x04"
_SYNC = b"S\x00\x00\x00\x04"
_TERMINATE = b"X\x00\x00\x00\x04"
# Server messages that change nothing the session tracks.
_PASSIVE = frozenset({
    pg.RowDescription, pg.ParameterStatus, pg.NoticeResponse, pg.ParseComplete, pg.BindComplete,
    pg.NoData, pg.NotificationResponse,
})
# The CommandComplete tags of PREPARE, DEALLOCATE (ALL) and DISCARD ALL.
_PREPARED_TAGS = frozenset({"PREPARE", "DEALLOCATE", "DEALLOCATE ALL", "DISCARD ALL"})
# Client messages each answered up to their own ReadyForQuery.
_SEGMENT_STARTS = (pg.Query, pg.FunctionCall)
# Server messages that end an Execute without a CommandComplete.
_EXECUTE_ENDS = (pg.EmptyQueryResponse, pg.PortalSuspended)
REUSED_SHAPES = 1024  # allow decisions remembered per session
# Prepared statements an EXECUTE is judged through, nested (a Parse may prepare an EXECUTE
# of another); deeper, or back to one already on the way, the text counts as unparseable.
EXECUTE_DEPTH = 8
# Texts followed for a name whose changes failed requests may not have made, at most.
MAYBE_TEXTS = 16
REUSED_TEXT = 16 * 1024  # characters of a Parse's text remembered with its decision, at most
REUSED_TEXTS = 256 * 1024  # and of all of them, per session
EXECUTED_BYTES = 256 * 1024  # bytes of executions' encoded records remembered per session


class _Prepared(dict[str, tuple[str, tuple[int, ...]]]):
    """Prepared statements by name → (text, parameter types), with the characters of the
    named ones' texts (``size``; the unnamed statement is not counted: each Parse replaces
    it, and max_message_bytes bounds it). Changed only by setting, ``del`` and
    :meth:`clear` (or, for the unnamed statement, ``dict.__setitem__``)."""

    __slots__ = ("size",)

    def __init__(self) -> None:
        super().__init__()
        self.size = 0

    def size_after(self, name: str, text: str) -> int:
        """``size`` once ``name`` holds ``text``."""
        if not name:
            return self.size
        old = self.get(name)
        return self.size + len(text) - (len(old[0]) if old is not None else 0)

    def __setitem__(self, name: str, value: tuple[str, tuple[int, ...]]) -> None:
        self.size = self.size_after(name, value[0])
        super().__setitem__(name, value)

    def __delitem__(self, name: str) -> None:
        if name:
            self.size -= len(self[name][0])
        super().__delitem__(name)

    def discard(self, name: str) -> None:
        if name in self:
            del self[name]

    def clear(self) -> None:
        super().clear()
        self.size = 0


@dataclass(slots=True)
class _Portal:
    statement: str
    parameters: list[Any]
    # The request it was bound in (Syncs, Queries and FunctionCalls sent before it).
    request: int
    # Bound to a statement whose Parse the policy blocked, in this request; -1 for any other.
    blocked_in: int = -1


class PostgresSession:
    """Protocol state and recording for one client connection."""

    # The fields the compiled one-step paths (agent/protocols/_pgscan.c) read and move on,
    # as slots; the rest of its state is in its __dict__.
    __slots__ = (
        "policy", "phase", "replication", "record_level", "frontend", "backend", "subject",
        "_reused_subject", "_reused", "_reused_policy", "max_statement",
        "bytes_from_client", "_segments_sent", "statements", "_pending", "clock", "_held",
        "_blocked_pending", "_describes", "_touched", "transaction", "_segments_done",
        "bytes_from_server", "__dict__", "__weakref__",
    )

    def __init__(
        self,
        session_id: str,
        context: dict[str, Any],
        *,
        max_message: int = pg.DEFAULT_MAX_MESSAGE,
        max_statement: int = 64 * 1024,
        max_prepared: int = 256 * 1024 * 1024,
        cancel_target: Callable[[int, bytes], str | None] | None = None,
        policy: Callable[[], Policy] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.session_id = session_id
        self.context = context
        self.max_statement = max_statement
        self.max_prepared = max_prepared
        self.clock = clock
        self.cancel_target = cancel_target
        self.frontend = pg.FrontendParser(max_message, keep=max_statement)
        self.backend = pg.BackendScanner(max_message)
        self.started = clock()
        self.phase = "startup"  # startup → auth → ready → closed
        self.transaction = "I"
        self.bytes_from_client = 0
        self.bytes_from_server = 0
        self.statements = 0
        self.backend_key: tuple[int, bytes] | None = None
        self.auth_method: str | None = None
        self.startup: pg.StartupMessage | None = None
        self.replication: str | None = None  # "physical" or "logical" (see replication_mode)
        self.start_recorded = False
        self.ended = False
        self.last_error: dict[str, str] | None = None
        self._pending: deque[_Pending] = deque()
        # Prepared statements by name → (text, parameter types): by a Parse, or by SQL's
        # PREPARE (its whole text, no types), which share one namespace on the server.
        self._statements = _Prepared()
        self._judging: list[str] = []  # prepared statements an EXECUTE is being judged through
        # A named Parse or Close changes the statements when sent; an error before it in its
        # request makes the server skip it. By request (Syncs sent before it), the names
        # changed and what they held before; the texts a name may still hold on the server
        # after such a request failed, judged with it until a request that succeeds
        # changes the name again.
        self._touched: dict[int, dict[str, tuple[str, tuple[int, ...]] | None]] = {}
        self._failed_requests: set[int] = set()
        self._maybe: dict[str, list[str]] = {}
        self._portals: dict[str, _Portal] = {}
        # Statements whose Parse the policy blocked since the last Sync: the server, failing
        # the substitute, skips their Bind and Execute, which belong to that request.
        self._blocked_names: set[str] = set()
        self._refusal: tuple[str | None, str, str] | None = None
        self.policy = policy
        self.subject: Subject | None = None  # set by the proxy once attribution is known
        self.record_level = "statements"
        self._policy_resource: Any = None
        # Identity (set by the proxy before the startup packet is read).
        self.identity: Any = None  # agent.identity.IdentityResult
        self.subject_for: Callable[[Any], Subject] | None = None
        self.upstream_auth: Any = None  # agent.protocols.pgauth.UpstreamAuth
        self.upstream_user: str | None = None
        self.tls_available = False  # the proxy can terminate TLS for this service
        self.tls_started = False
        self._held: bytearray | None = None  # server bytes held for a blocked statement
        self._blocked_pending = 0  # "blocked" items in _pending
        # Describe (statement) messages awaiting their ParameterDescription, with the
        # number of Sync/Query/FunctionCall sent before each; ReadyForQuery answers counted.
        self._describes: deque[tuple[int, str]] = deque()
        self._segments_sent = 0
        self._segments_done = 0
        # Allow decisions by statement shape, for one policy version and subject.
        self._reused: dict[bytes, _Reused] = {}
        self._reused_policy: Any = None
        self._reused_subject: Any = None
        self._reused_texts: dict[str, _Reused] = {}  # Parse texts of shapes in _reused
        self._reused_texts_size = 0  # their characters
        # Executions' query records but for their parameters, by statement text (see
        # allowed_execute).
        self._executed: dict[str, tuple[dict[str, Any] | None, bytes]] = {}
        self._executed_size = 0  # their bytes

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
        if isinstance(event, _SEGMENT_STARTS):
            self._segments_sent += 1  # each is answered up to its own ReadyForQuery
        if isinstance(event, pg.Query):
            decision = self._judge(event.sql)
            self._begin_statement("query", event.sql, "simple", None, actions, decision)
            if decision is not None and not decision.allowed:
                self._block(decision, pg.query_message(SUBSTITUTE_SQL), False, actions)
            elif not self._over_prepared(self._prepared_by(decision), actions):
                self._await_prepared(decision)
                actions.to_server.append(event.raw)
        elif isinstance(event, pg.Parse):
            decision = self._judge(event.sql, parsed=True)
            if decision is not None and not decision.allowed:
                self.statements += 1
                actions.records.append(("query", self._query_record(event.sql, "extended", decision)))
                substitute = pg.frontend_message(
                    b"P", event.statement.encode() + b"\x00" + SUBSTITUTE_SQL.encode() + b"\x00\x00\x00"
                )
                self._block(decision, substitute, True, actions)
                self._blocked_names.add(event.statement)
                if not event.statement:
                    # The server drops the unnamed statement before it parses a new one,
                    # even one that fails: an Execute after this one runs nothing it knew.
                    self._statements.discard("")
                return
            if self._over_prepared(self._statements.size_after(event.statement, event.sql), actions):
                return
            if event.statement:
                self._touch(event.statement)
            self._statements[event.statement] = (event.sql, event.parameter_types)
            self._blocked_names.discard(event.statement)  # (its Executes are this text's)
            actions.to_server.append(event.raw)
        elif isinstance(event, pg.Bind):
            types = self._statements.get(event.statement, ("", ()))[1]
            self._bind(event.portal, _Portal(
                event.statement, _parameters(event, self.max_statement, types),
                self._segments_sent,
                self._segments_sent if event.statement in self._blocked_names else -1,
            ))
            if event.raw:  # (a large Bind went on already, in pieces)
                actions.to_server.append(event.raw)
        elif isinstance(event, pg.Execute):
            portal = self._portals.get(event.portal)
            if portal is not None and portal.blocked_in == self._segments_sent:
                # The request whose Parse was blocked: its records (the statement's text,
                # its decision, "blocked") already say what became of it, and the server,
                # failing the substitute, skips this until Sync.
                actions.to_server.append(event.raw)
                return
            known = self._statements.get(portal.statement) if portal else None
            params = portal.parameters if portal else None
            maybe = self._maybe_refused(portal.statement) if portal and self._maybe else None
            if maybe is not None:
                self._begin_statement("execute", known[0] if known else "", "extended", params,
                                      actions, maybe)
                self._block(maybe, _SUBSTITUTE_PARSE, True, actions)
                return
            if known is None:  # (the server refuses it)
                self._begin_statement("execute", "", "extended", params, actions)
                actions.to_server.append(event.raw)
                return
            # Judged when it runs, as well as at its Parse: the policy may have changed
            # since, or decide by the time of day.
            decision = self._judge(known[0], parsed=True)
            self._begin_statement("execute", known[0], "extended", params, actions, decision)
            if decision is not None and not decision.allowed:
                self._block(decision, _SUBSTITUTE_PARSE, True, actions)
            else:
                self._await_prepared(decision)
                actions.to_server.append(event.raw)
        elif isinstance(event, pg.Sync):
            self._blocked_names.clear()
            self._pending.append(_Pending("sync"))
            self._segments_sent += 1
            actions.to_server.append(event.raw)
        elif isinstance(event, pg.Describe):
            if event.kind == "S":
                # Its ParameterDescription gives the types Parse left open (asyncpg).
                self._describes.append((self._segments_sent, event.name))
            actions.to_server.append(event.raw)
        elif isinstance(event, pg.Close):
            if event.kind == "S":
                if event.name:
                    self._touch(event.name)
                self._statements.discard(event.name)
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
            if self.phase != "startup" or self.tls_started:
                self._protocol_violation(actions, "client protocol error: late encryption request")
                return
            if isinstance(event, pg.SSLRequest) and self.tls_available:
                actions.to_client.append(pg.SSL_ACCEPTED)
                actions.start_tls = True
                self.tls_started = True
            else:
                actions.to_client.append(pg.SSL_REFUSED)
        elif isinstance(event, pg.CancelRequest):
            self._cancel_request(event, actions)
        elif isinstance(event, pg.PasswordMessage) and self.phase == "token":
            from agent.protocols.pgauth import PgAuthError, parse_password_message

            try:
                actions.verify_token = parse_password_message(event.raw)
            except PgAuthError as e:
                self._protocol_violation(actions, f"client protocol error: {e}")
                return
            self.phase = "verifying"
        elif isinstance(event, pg.Terminate):
            actions.to_server.append(event.raw)
            self._end(actions, "client terminated", "success")
            actions.close = "client terminated"
        elif isinstance(event, pg.CopyData):
            for item in self._pending:
                if item.kind in ("query", "execute"):
                    item.copy_bytes += event.size
                    break
            actions.to_server.append(event.raw)
        else:
            actions.to_server.append(event.raw)

    def allowed_query(self, data: bytes) -> bytes | None:
        """The common case of :meth:`client_data`, in one step: when ``data`` is one whole
        simple Query of a shape this session already allowed (see :meth:`_judge`) and
        nothing else is under way, its query record (already encoded as msgpack, which the
        audit trail takes as it is), the session's state moved on exactly as
        :meth:`client_data` would, and ``data`` is to go to the server as it is. None for
        anything else, with nothing changed: then :meth:`client_data` takes it."""
        policy = self.policy
        if (policy is None or self.phase != "ready" or self.replication is not None
                or self.record_level != "statements" or not self.frontend.between_messages
                or self.subject is not self._reused_subject or not self._reused):
            return None
        current = policy()
        if current is not self._reused_policy or not current.reuses_decisions:
            return None
        record = _allowed_query(data, self._reused, self.frontend.max_message,
                                min(self.max_statement, MAX_CACHED_TEXT), _plain_text)
        if record is None:
            return None
        self.bytes_from_client += len(data)
        self._segments_sent += 1
        self.statements += 1
        self._pending.append(_Pending("query", started=self.clock()))
        return record

    def allowed_execute(self, data: bytes) -> bytes | None:
        """:meth:`allowed_query` for the extended protocol: when ``data`` is exactly what a
        driver sends to run a statement once (a Parse, or none for a statement this session
        knows; a Bind; a Describe of its portal or none; an Execute of that portal; a Sync:
        libpq's PQexecParams and PQexecPrepared) of a statement the policy allows now, and
        nothing else is under way, its query record (encoded as msgpack), the session's
        state moved on exactly as :meth:`client_data` would, and ``data`` is to go to the
        server as it is. None for anything else, with nothing changed (but the policy's
        decision, remembered as :meth:`_judge` does): then :meth:`client_data` takes it."""
        if (self.phase != "ready" or self.replication is not None
                or self.record_level != "statements" or not self.frontend.between_messages
                or self._describes or self._blocked_names):
            return None  # (or a blocked Parse whose request waits for its Sync: general path)
        parts = _bound_execute(data, self.frontend.max_message)
        if parts is None:
            return None
        parse, portal, statement, formats, values = parts
        if parse is not None:
            name, sql, types = parse
            if name != statement or (name and self._statements.size_after(name, sql) > self.max_prepared):
                return None
            known = sql, types
        else:
            found = self._statements.get(statement)
            if found is None:
                return None
            known = found
        if self._maybe and statement in self._maybe:
            return None  # (the general path judges what else it may run)
        sql, types = known
        # Judged when it runs (for a Parse in the same request, once for both).
        decision = self._judge(sql, parsed=True)
        if decision is not None and (not decision.allowed or (
                type(decision) is not _Reused and _touches_prepared(decision))):
            return None  # (the general path notes what a PREPARE or DEALLOCATE did)
        verdict = _verdict(decision)
        parameters = _parameter_values(formats, values, None, self.max_statement, types)
        try:
            encoded: bytes = msgpack.packb(parameters, use_bin_type=True)
        except (OverflowError, ValueError, TypeError):
            return None  # (a binary integer too large for msgpack: the general path says so)
        executed = self._executed.get(sql)
        if executed is not None and executed[0] is verdict:
            prefix = executed[1]
        else:
            prefix = self._executed_prefix(sql, verdict)
        if parse is not None:
            if statement:
                self._touch(statement)
                self._statements[statement] = known
            else:  # (not counted, see _Prepared: at a plain dict's cost)
                dict.__setitem__(self._statements, "", known)
        portals = self._portals
        bound = _Portal(statement, parameters, self._segments_sent)
        if len(portals) == 1 and portal in portals:  # (the commonest: the unnamed portal again)
            portals[portal] = bound
        else:
            self._bind(portal, bound)
        self.bytes_from_client += len(data)
        self.statements += 1
        self._pending.append(_Pending("execute", started=self.clock()))
        self._pending.append(_Pending("sync"))
        self._segments_sent += 1
        return prefix + encoded

    def _bind(self, name: str, portal: _Portal) -> None:
        """A Bind of portal ``name``. PostgreSQL drops a transaction's portals when it ends:
        once every request sent before this one is answered and the last left no
        transaction open, the portals they bound are forgotten here too (a session that
        never closes its named portals would otherwise grow without end)."""
        portals = self._portals
        if ((len(portals) > 1 or (portals and name not in portals)) and self.transaction == "I"
                and self._segments_done == self._segments_sent):
            request = self._segments_sent
            for gone in [key for key, bound in portals.items() if bound.request < request]:
                del portals[gone]
        portals[name] = portal

    def _executed_prefix(self, sql: str, verdict: dict[str, Any] | None) -> bytes:
        """An execution's query record of ``sql`` (with ``verdict`` as its policy field) as
        msgpack, but for its parameters (the map's last entry, to follow): remembered for the
        session with the verdict, as the statements are."""
        record = self._query_record(sql, "extended", None, verdict)
        encoded = msgpack.packb(record, use_bin_type=True)
        prefix: bytes = bytes([0x80 | (len(record) + 1)]) + encoded[1:] + _PARAMETERS_KEY
        if (len(self._executed) >= REUSED_SHAPES
                or self._executed_size + len(prefix) > EXECUTED_BYTES):
            self._executed.clear()
            self._executed_size = 0
        if len(prefix) <= EXECUTED_BYTES:
            self._executed[sql] = (verdict, prefix)
            self._executed_size += len(prefix)
        return prefix

    def plain_reply(self, data: bytes) -> bytes | None:
        """The common case of :meth:`server_data` for bytes already forwarded, in one step:
        when ``data`` is exactly the whole ordinary answer (rows and a CommandComplete, then
        ReadyForQuery) to the one simple Query awaiting it, or to one execution and its Sync
        (led by ParseComplete, BindComplete, and RowDescription or NoData, as
        :meth:`allowed_execute` lets them come), its result record (encoded as msgpack, as
        :meth:`allowed_query`'s), the session's state moved on exactly as
        :meth:`server_data` would. None for anything else, with nothing changed: then
        :meth:`server_data` takes it."""
        pending = self._pending
        if self.phase != "ready" or self._describes:
            return None
        head = pending[0] if pending else None
        if (head is None or head.rows or head.command_rows or head.commands or head.copy_bytes
                or head.error is not None or head.changes or self._touched
                or not self.relays_server_bytes
                or not self.backend.at_boundary):
            return None
        if head.kind == "query":
            if len(pending) != 1:
                return None
            answer = data
        elif head.kind == "execute" and len(pending) == 2 and pending[1].kind == "sync":
            answer = _without_execution_head(data)
        else:
            return None
        reply = _plain_reply(answer, self.backend.max_message, _duration_ms(head, self.clock()))
        if reply is None:
            return None
        record, status = reply
        self.bytes_from_server += len(data)
        pending.clear()
        self.transaction = status
        self._segments_done += 1
        return record

    def _judge(self, sql: str, parsed: bool = False) -> Any:
        """The policy's decision on a statement text, or None without a policy.

        When the policy decides by shape, subject and resource only, an allow
        for a statement's shape is remembered for this session (and this
        policy version and subject), and later statements of that shape skip
        classification and evaluation. ``parsed``: the text of a Parse, which
        drivers send again as it is (its values come in Binds): such a text is
        remembered with its shape's decision, so that the next Parse of it
        skips working out its shape too.
        """
        if self.policy is None:
            return None
        policy = self.policy()
        subject = self.subject
        if policy is not self._reused_policy or subject is not self._reused_subject:
            self._reused_policy, self._reused_subject = policy, subject
            self._reused.clear()
            self._reused_texts.clear()
            self._reused_texts_size = 0
        if self.replication is not None:
            command = classify_replication(sql)
            if command is not None:
                return policy.statement(subject or Subject(), self._resource(), command)
        if parsed:
            known = self._reused_texts.get(sql)
            if known is not None:
                return known
        shape = _statement_shape(sql) if policy.reuses_decisions else None
        decision: Any = None
        if shape is not None:
            decision = self._reused.get(shape)
        if decision is None:
            decision = policy.statement(subject or Subject(), self._resource(),
                                        policy.prepared(sql))
            if _touches_prepared(decision):
                # What an EXECUTE runs is the session's, not the text's: judged each time.
                return self._executed_prepared(decision) if decision.allowed else decision
            if shape is None or not decision.allowed or decision.classification.shape != shape:
                return decision
            if len(self._reused) >= REUSED_SHAPES:
                self._reused.clear()
                self._reused_texts.clear()
                self._reused_texts_size = 0
            self._reused[shape] = _Reused(_policy_field(decision))
        if parsed and shape is not None and len(sql) <= REUSED_TEXT:
            if (len(self._reused_texts) >= REUSED_SHAPES
                    or self._reused_texts_size + len(sql) > REUSED_TEXTS):
                self._reused_texts.clear()
                self._reused_texts_size = 0
            self._reused_texts[sql] = self._reused[shape]
            self._reused_texts_size += len(sql)
        return decision

    def _executed_prepared(self, decision: Any) -> Any:
        """``decision``, an allow of a string that PREPAREs, EXECUTEs or DEALLOCATEs, or
        the policy's refusal of the first statement it EXECUTEs that the policy now refuses,
        judged by the text it was prepared with (a PREPARE's or a Parse's: SQL and the
        protocol share the names): a statement prepared before a reload runs under the
        policy in force, as an Execute does. Read in order, so that an EXECUTE follows the
        string's own PREPARE and DEALLOCATE."""
        prepared: dict[str, tuple[str, tuple[int, ...]]] = self._statements
        for info in decision.classification.statements:
            if info.prepared is None:
                continue
            action, name = info.prepared
            if action == "execute":
                known = prepared.get(name) if name is not None else None
                if name is None or (known is None and name not in self._maybe):
                    continue
                judging = self._judging
                if name in judging or len(judging) >= EXECUTE_DEPTH:
                    ruled = self._unparseable(
                        known[0] if known else info.text,
                        f"prepared statements nested too deep: {' -> '.join(judging)}")
                else:
                    judging.append(name)
                    try:
                        ruled = self._maybe_refused(name) if self._maybe else None
                        if ruled is None and known is not None:
                            ruled = self._judge(known[0])
                    finally:
                        judging.pop()
                if ruled is not None and not ruled.allowed:
                    return ruled
                continue
            if prepared is self._statements:
                prepared = dict(prepared)  # (the session's change only once it runs)
            _prepared_change(prepared, action, name, info.text)
        return decision

    def _prepared_by(self, decision: Any) -> int:
        """:meth:`_Prepared.size_after` for the PREPAREs of a simple Query (an allowed string),
        counted before they are sent."""
        if not _touches_prepared(decision):
            return self._statements.size
        return self._statements.size + sum(
            len(info.text) for info in decision.classification.statements
            if info.prepared is not None and info.prepared[0] == "prepare")

    def _over_prepared(self, size: int, actions: Actions) -> bool:
        """Whether ``size`` characters of prepared texts (what the session would keep once
        the message is sent) are over max_prepared: then the session ends, the message not
        sent."""
        if size <= self.max_prepared:
            return False
        self._fatal(actions, "54000",
                    f"ringfence: this session's prepared statements would exceed "
                    f"{self.max_prepared} characters of text (the agent's max_prepared_bytes); "
                    "close or DEALLOCATE the ones no longer needed",
                    "prepared statements over max_prepared_bytes")
        return True

    def _touch(self, name: str) -> None:
        """A named Parse or Close changes ``name`` in the request being sent."""
        touched = self._touched.setdefault(self._segments_sent, {})
        if name not in touched:
            touched[name] = self._statements.get(name)

    def _settle(self, request: int) -> None:
        """The server answered ``request`` up to its ReadyForQuery: its named Parses and
        Closes took effect, or, after an error in it, perhaps not: then the texts the
        names held before may still be the server's."""
        for earlier in [k for k in self._touched if k < request]:
            # (answered without this session seeing it end: taken as failed, to be safe)
            self._failed_requests.add(earlier)
            self._settle(earlier)
        touched = self._touched.pop(request, None)
        failed = request in self._failed_requests
        self._failed_requests.discard(request)
        if not touched:
            return
        for name, before in touched.items():
            if not failed:
                self._maybe.pop(name, None)
            elif before is not None:
                texts = self._maybe.setdefault(name, [])
                current = self._statements.get(name)
                for text in (before[0], current[0] if current else None):
                    # (past the bound, one more says so; see _maybe_refused)
                    if text is not None and text not in texts and len(texts) <= MAYBE_TEXTS:
                        texts.append(text)

    def _maybe_refused(self, name: str) -> Any:
        """The policy's refusal of a text statement ``name`` may still hold on the server (a
        request that changed it failed), or None when it allows them all."""
        texts = self._maybe.get(name)
        if not texts:
            return None
        if len(texts) > MAYBE_TEXTS:
            ruled = self._unparseable(texts[-1], f"statement {name!r} changed in too many "
                                                 "failed requests to follow")
            return ruled if not ruled.allowed else None
        for text in texts:
            decision = self._judge(text, parsed=True)
            if decision is not None and not decision.allowed:
                return decision
        return None

    def _unparseable(self, sql: str, why: str) -> Any:
        """The policy's decision on ``sql`` taken as text it cannot analyse (``why``)."""
        assert self.policy is not None
        return self.policy().statement(self.subject or Subject(), self._resource(),
                                       Classification(sql, (), parse_error=why))

    def _await_prepared(self, decision: Any) -> None:
        """A string the policy allowed goes to the server: what its PREPARE and DEALLOCATE
        statements will do to the session's prepared statements, once the server says each
        one is done (a PREPARE of a name in use, or a DEALLOCATE in an aborted transaction,
        changes nothing there, nor here)."""
        if _touches_prepared(decision):
            changes = [(info.prepared[0], info.prepared[1], info.text)
                       for info in decision.classification.statements
                       if info.prepared is not None and info.prepared[0] != "execute"]
            if changes:
                self._pending[-1].changes = changes

    def _resource(self) -> Any:
        """The policy's resource for this session (service and database), built once."""
        if self._policy_resource is None:
            from policy import Resource

            database = self.startup.database if self.startup else None
            self._policy_resource = Resource(self.context.get("service", ""), "postgres", database)
        return self._policy_resource

    def _block(self, decision: Any, substitute: bytes, extended: bool, actions: Actions) -> None:
        """Keep a statement from the server; the client gets the policy's error in its place."""
        actions.durable.append(("policy.decision", decision.to_record()))
        reply = pg.error_response("ERROR", decision.sqlstate, decision.message)
        self._blocked_pending += 1
        self._pending.append(
            _Pending("blocked", started=self.clock(), reply=reply, extended=extended,
                     error={"sqlstate": decision.sqlstate, "message": decision.message})
        )
        actions.to_server.append(substitute)

    def connection_decision(self) -> Any:
        """The policy's decision on this connection (after the StartupMessage), or None."""
        if self.policy is None or self.startup is None:
            return None
        if self.subject_for is not None:
            self.subject = self.subject_for(self.identity)
        return self.policy().connection(self.subject or Subject(), self._resource())

    def _startup_message(self, event: pg.StartupMessage, actions: Actions) -> None:
        if event.protocol >> 16 != 3:
            self._protocol_violation(actions, "client protocol error: unsupported protocol")
            return
        self.startup = event
        self.replication = replication_mode(event.parameters.get("replication"))
        if self._refusal is not None:
            self._fatal(actions, *self._refusal)
            return
        if self.identity is not None and self.identity.ask_for_token:
            from agent.protocols.pgauth import authentication_cleartext_password

            self.phase = "token"
            actions.to_client.append(authentication_cleartext_password())
            return
        self._admit(actions)

    def identity_resolved(self, identity: Any) -> Actions:
        """The token the client sent as its password was verified (or refused)."""
        actions = Actions()
        if self.phase != "verifying":
            return actions
        self.identity = identity
        self._admit(actions)
        return actions

    def _admit(self, actions: Actions) -> None:
        """Identity is settled: refuse, or decide by policy and start the upstream login."""
        identity = self.identity
        if identity is not None and identity.refusal is not None:
            sqlstate, message = identity.refusal
            self._fatal(actions, sqlstate, message, "identity refused: " + message)
            return
        self._record_start(actions)
        decision = self.connection_decision()
        if decision is not None:
            actions.durable.append(("policy.decision", decision.to_record()))
            self.record_level = decision.record
            if not decision.allowed:
                self._fatal(actions, decision.sqlstate, decision.message,
                            f"denied by policy rule {decision.rule_id}")
                return
        assert self.startup is not None
        if self.upstream_auth is not None and self.upstream_user is not None:
            # The agent logs in upstream with the service credential; the
            # client's own user name and password never reach the server.
            parameters = dict(self.startup.parameters)
            parameters["user"] = self.upstream_user
            parameters.setdefault("database", self.startup.database or self.upstream_user)
            self.phase = "upstream-auth"
            actions.to_server.append(pg.startup_message(parameters, self.startup.protocol))
        else:
            self.phase = "auth"
            actions.to_server.append(self.startup.raw)

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
        decision: Any = None,
    ) -> None:
        self.statements += 1
        record = self._query_record(sql, protocol, decision)
        if parameters is not None and self.record_level != "metadata":
            record["parameters"] = parameters
        actions.records.append(("query", record))
        if decision is None or decision.allowed:
            self._pending.append(_Pending(kind, started=self.clock()))

    def _query_record(self, sql: str, protocol: str, decision: Any,
                      verdict: dict[str, Any] | None = None) -> dict[str, Any]:
        """A query record; its policy field from ``decision``, or else ``verdict`` (the
        field made already: see _executed_prefix)."""
        encoded = sql.encode("utf-8", "surrogatepass")
        truncated = len(encoded) > self.max_statement
        text = encoded[: self.max_statement].decode("utf-8", "ignore") if truncated else sql
        record: dict[str, Any] = {
            "length": len(encoded),
            "sha256": hashlib.sha256(encoded).hexdigest(),
            "protocol": protocol,
        }
        if self.record_level != "metadata":
            record["text"] = text
            record["truncated"] = truncated
        if decision is not None:
            record["policy"] = _verdict(decision)
        elif verdict is not None:
            record["policy"] = verdict
        return record

    # ------------------------------------------------------------------ server

    @property
    def relays_server_bytes(self) -> bool:
        """Whether the server's next bytes go to the client as they are (so they may go first)."""
        return self._held is None and not self._blocked_pending and self.phase != "upstream-auth"

    def server_data(self, data: bytes, forwarded: bool = False) -> Actions:
        """Bytes from the server: scan, record, forward them unchanged.

        The one exception: the server's error for a blocked statement's
        substitute is cut out and the agent's own error put in its place.
        ``forwarded``: the proxy already sent them on, as
        :attr:`relays_server_bytes` allowed.
        """
        actions = Actions()
        self.bytes_from_server += len(data)
        relaying = self.relays_server_bytes
        boundary = self.backend.at_boundary  # (before this chunk)
        try:
            # Ordinary replies are read in place; the scanner takes the rest from where
            # they end (all of it when none is read, so that its ends match ``data``).
            done = self._scan_replies(data, actions) if relaying and self.backend.at_boundary else 0
            events = self.backend.feed(data[done:]) if not done or done < len(data) else []
        except pg.ServerProtocolError as e:
            # (Records of statements answered before the bad message stay.)
            return self._protocol_violation(actions, f"server protocol error: {e}")
        if self.phase == "upstream-auth":
            return self._upstream_auth_data(data, events, actions)
        if relaying:
            if not forwarded:
                actions.to_client.append(data)
            for event in events:
                self._server_event(event, actions)
            return actions
        # Slow path: cut the chunk at message boundaries.
        ends = self.backend.ends
        start = 0
        # Held bytes are whole messages from the first byte: holding starts at a boundary.
        if self._held is None and self._head_blocked() and boundary:
            self._held = bytearray()
        for event, end in zip(events, ends, strict=True):
            replaced = self._server_event(event, actions)
            if self._held is not None:
                self._held += data[start:end]
                start = end
                if replaced is not None:
                    actions.to_client.append(_without_last_message(bytes(self._held)) + replaced)
                elif self._head_blocked():
                    continue
                else:
                    # The blocked statement was settled without an error of its own (see
                    # _ready_for_query): nothing held is to be replaced.
                    actions.to_client.append(bytes(self._held))
                self._held = None
            if self._head_blocked():
                # Everything after this message answers the (next) blocked statement.
                if end > start:
                    actions.to_client.append(data[start:end])
                self._held = bytearray()
                start = end
        if self._held is not None:
            self._held += data[start:]
            if len(self._held) > MAX_HELD:
                return self._protocol_violation(
                    actions, "server protocol error: unexpected reply to a blocked statement"
                )
        elif start < len(data):
            actions.to_client.append(data[start:])
        return actions

    def _upstream_auth_data(
        self, data: bytes, events: list[pg.BackendEvent], actions: Actions
    ) -> Actions:
        """The server's login exchange is answered by the agent; the client sees only its end."""
        from agent.protocols.pgauth import PgAuthError, authentication_ok

        start = 0
        for i, (event, end) in enumerate(zip(events, self.backend.ends, strict=True)):
            if self.phase != "upstream-auth":
                # Login done: the rest of the chunk is ordinary server traffic.
                rest = data[start:]
                actions.to_client.append(rest)
                for later in events[i:]:
                    self._server_event(later, actions)
                return actions
            if isinstance(event, pg.AuthenticationRequest):
                try:
                    step = self.upstream_auth.step(event.code, event.body)
                except PgAuthError as e:
                    message = "ringfence: the agent could not log in to the database with the " \
                              "service credential"
                    return self._fatal(actions, "28000", message,
                                       f"upstream authentication failed: {e}")
                if step.send:
                    actions.to_server.append(step.send)
                self.auth_method = AUTH_METHODS.get(event.code, self.auth_method)
                if event.code == 10:
                    self.auth_method = _sasl_mechanism(event.body)
                if step.done:
                    self.phase = "auth"
                    actions.to_client.append(authentication_ok())
                start = end
            else:
                # An error (or notice) during the login goes to the client as it came.
                actions.to_client.append(data[start:end])
                self._server_event(event, actions)
                start = end
        if start < len(data) and self.phase != "upstream-auth":
            actions.to_client.append(data[start:])
        return actions

    def _head_blocked(self) -> bool:
        return bool(self._pending) and self._pending[0].kind == "blocked"

    def _server_event(self, event: pg.BackendEvent, actions: Actions) -> bytes | None:
        """Update state for one server message; returns the replacement for a blocked error."""
        if type(event) in _PASSIVE:
            return None
        pending = self._pending
        head = pending[0] if pending else None
        if isinstance(event, pg.DataRows):
            if head is not None:
                head.command_rows += event.count
        elif isinstance(event, pg.CopyOutData):
            if head is not None:
                head.copy_bytes += event.size
        elif isinstance(event, pg.CommandComplete):
            self._command_complete(event, actions)
        elif isinstance(event, _EXECUTE_ENDS):
            if head is not None and head.kind == "execute":
                if isinstance(event, pg.PortalSuspended):
                    head.commands.append("(portal suspended)")
                head.rows += head.command_rows
                head.command_rows = 0
                self._finish(pending.popleft(), actions)
        elif isinstance(event, pg.ErrorResponse):
            if self._touched:
                self._failed_requests.add(self._segments_done)
            if head is not None and head.kind == "blocked":
                return self._blocked_error(actions)
            self._server_error(event, actions)
        elif isinstance(event, pg.ReadyForQuery):
            self._ready_for_query(event.status, actions)
        elif isinstance(event, pg.AuthenticationRequest):
            if event.code != 0:
                self.auth_method = AUTH_METHODS.get(event.code, self.auth_method or "other")
                if event.code == 10:
                    self.auth_method = _sasl_mechanism(event.body)
        elif isinstance(event, pg.BackendKeyData):
            self.backend_key = (event.backend_pid, event.secret)
        elif isinstance(event, pg.ParameterDescription):
            self._forget_unanswered_describes()
            if self._describes:
                self._described(self._describes.popleft()[1], event.type_oids)
        return None

    def _command_complete(self, event: pg.CommandComplete, actions: Actions) -> None:
        pending = self._pending
        head = pending[0] if pending else None
        if head is not None and head.kind != "sync":
            if head.changes and event.tag in _PREPARED_TAGS:
                action, name, text = head.changes.pop(0)
                _prepared_change(self._statements, action, name, text)
                if name is None:
                    self._maybe.clear()
                else:
                    self._maybe.pop(name, None)
            head.commands.append(event.tag)
            # The tag's count when it has one (SELECT, INSERT … RETURNING, COPY,
            # FETCH), else the rows the command returned.
            rows = event.rows
            head.rows += rows if rows is not None else head.command_rows
            head.command_rows = 0
            if head.kind == "execute":
                self._finish(pending.popleft(), actions)

    def _ready_for_query(self, status: str, actions: Actions) -> None:
        self.transaction = status
        if self.phase == "auth":
            self.phase = "ready"
        else:
            if self._touched:
                self._settle(self._segments_done)
            self._segments_done += 1
            if self._describes:
                self._forget_unanswered_describes()
        pending = self._pending
        while pending:
            item = pending.popleft()
            if item.kind == "sync":
                break
            if item.kind == "query-blocked":
                break
            if item.kind == "execute" and item.error is None:
                item.error = {"sqlstate": "", "message": "not executed: pipeline aborted"}
            if item.kind == "blocked":
                # The server skipped its substitute after an earlier error in the pipeline
                # (so no error of its own came): kept from the server all the same.
                self._blocked_pending -= 1
                self._finish(item, actions, outcome="blocked")
                continue
            self._finish(item, actions)
            if item.kind == "query":
                break

    def _scan_replies(self, data: bytes, actions: Actions) -> int:
        """The common replies at the start of ``data``, read in place; returns where they end.

        Only whole messages of the kinds that end or fill an ordinary statement's
        answer (DataRow, RowDescription, CommandComplete, ReadyForQuery, ParseComplete,
        BindComplete, NoData) are taken, each with exactly the effect
        :meth:`_server_event` gives its event; the rest of the chunk, from the first
        message of any other kind (or one not whole, or out of bounds), goes to the
        scanner. Only called while the scanner is at a message boundary.
        """
        pending = self._pending
        unpack = _INT32.unpack_from
        max_message = self.backend.max_message
        datarows = pg.datarows
        size = len(data)
        pos = 0
        rows = row_bytes = 0
        while size - pos >= 5:
            kind = data[pos]
            if kind == 0x44:  # DataRow: the whole run of them at once
                pos, more, more_bytes = datarows(data, pos)
                if not more:
                    break  # not whole here, or invalid: the scanner takes it
                rows += more
                row_bytes += more_bytes
                continue
            length = unpack(data, pos + 1)[0]
            end = pos + 1 + length
            if length < 4 or end > size:
                break
            ready = None
            if kind == 0x43:  # CommandComplete
                if length > max_message:
                    break
            elif kind == 0x5A:  # ReadyForQuery
                ready = pg.READY_EVENTS.get(data[pos + 5 : end])
                if ready is None:
                    break
            elif kind == 0x54:  # RowDescription
                if length < 6 or length > max_message:
                    break
            elif kind != 0x31 and kind != 0x32 and kind != 0x6E:  # ParseComplete, BindComplete, NoData
                break
            if rows:
                # A run of rows ends at any other message, as the scanner ends it.
                if pending:
                    pending[0].command_rows += rows
                rows = row_bytes = 0
            if kind == 0x43:
                self._command_complete(pg.command_complete(data[pos + 5 : end]), actions)
            elif ready is not None:
                self._ready_for_query(ready.status, actions)
            pos = end
        if rows:
            if pos < size:
                # The scanner goes on from here: it ends the run of rows where it would have.
                self.backend.rows_before(rows, row_bytes)
            elif pending:
                pending[0].command_rows += rows
        return pos

    def _forget_unanswered_describes(self) -> None:
        """Describes before the last ReadyForQuery that got no answer (skipped after an error)."""
        describes = self._describes
        while describes and describes[0][0] < self._segments_done:
            describes.popleft()

    def _described(self, name: str, oids: tuple[int, ...]) -> None:
        """The server named the parameter types of statement ``name``: fill the ones Parse left 0."""
        known = self._statements.get(name)
        if known is None:
            return
        sql, types = known
        filled = tuple(types[i] if i < len(types) and types[i] else oid for i, oid in enumerate(oids))
        self._statements[name] = (sql, filled)

    def _blocked_error(self, actions: Actions) -> bytes:
        """The server rejected a blocked statement's substitute: record, and say what to send."""
        item = self._pending.popleft()
        self._blocked_pending -= 1
        self._finish(item, actions, outcome="blocked")
        if not item.extended:
            # A simple Query still waits for its ReadyForQuery.
            self._pending.appendleft(_Pending("query-blocked", started=item.started))
        else:
            while self._pending and self._pending[0].kind == "execute":
                skipped = self._pending.popleft()
                skipped.error = {"sqlstate": "", "message": "not executed: statement blocked by policy"}
                self._finish(skipped, actions)
        return item.reply

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

    def _finish(self, item: _Pending, actions: Actions, outcome: str | None = None) -> None:
        record = self._result_record(item, outcome)
        actions.records.append(("result", record))
        if outcome is None and item.kind in ("query", "execute") and not any(
                other is not item and other.kind != "sync" for other in self._pending):
            actions.joining = record  # (the last statement sent: its query record is the last)

    def _result_record(self, item: _Pending, outcome: str | None = None) -> dict[str, Any]:
        """The ``result`` record of an answered request."""
        record: dict[str, Any] = {
            "duration_ms": _duration_ms(item, self.clock()),
            "rows": item.rows + item.command_rows,
            "command_tag": item.commands[-1] if item.commands else None,
            "commands": item.commands,
            "outcome": outcome or ("failure" if item.error else "success"),
        }
        if item.copy_bytes:
            record["copy_bytes"] = item.copy_bytes
        if item.error:
            record["error"] = item.error
        return record

    # ------------------------------------------------------------- lifecycle

    def defer_refusal(self, sqlstate: str | None, message: str, reason: str) -> None:
        """Answer the coming StartupMessage with this FATAL error instead of forwarding it."""
        self._refusal = (sqlstate, message, reason)

    def refuse(self, sqlstate: str, message: str, reason: str) -> Actions:
        """End the connection with a protocol-native FATAL error to the client."""
        return self._fatal(Actions(), sqlstate, message, reason)

    def _fatal(self, actions: Actions, sqlstate: str | None, message: str, reason: str) -> Actions:
        """A FATAL error to the client, session.end with it, and the connection closed."""
        actions.to_client.append(pg.error_response("FATAL", sqlstate, message))
        self._end(actions, reason, "failure", error={"sqlstate": sqlstate or "", "message": message})
        actions.close = reason
        return actions

    def connection_lost(self, reason: str, outcome: str = "success") -> Actions:
        """The connection ended (either side closed, or the agent stopped)."""
        actions = Actions()
        if self.frontend.buffered:
            reason = (f"{reason}; truncated message: {self.frontend.buffered} bytes of an "
                      "incomplete client message discarded")
            outcome = "failure"
        if self.phase == "auth" and self.last_error is not None:
            reason = f"authentication failed: {self.last_error.get('message', '')}"
            outcome = "failure"
        self._end(actions, reason, outcome)
        return actions

    def client_lost(self, reason: str, outcome: str = "success") -> Actions:
        """The client's connection ended without a Terminate (it closed, or failed).

        When the server is idle between requests (the session ready, nothing sent that it
        has not answered, no transaction open, no message half passed on), it is sent the
        Terminate the client did not send, and ``close`` says so, as after the client's
        own: the server then ends its connection first, so it, not the agent, holds that
        connection's TIME_WAIT, and it ends as it would have for the client (with no
        transaction open, the server logs neither ending). Otherwise the connection simply
        ends, as the client's did.
        """
        idle = (self.phase == "ready" and self.replication is None and not self._pending
                and not self._blocked_pending and self._held is None
                and self.transaction == "I" and self.frontend.between_messages)
        actions = self.connection_lost(reason, outcome)
        if idle:
            actions.to_server.append(_TERMINATE)
            actions.close = "client terminated"
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
        if self.replication is not None:
            record["target"]["replication"] = self.replication
        identity_record = self.identity.to_record() if self.identity is not None else None
        if identity_record is not None:
            record["identity"] = identity_record
        if self.upstream_user is not None and startup is not None:
            record["target"]["user"] = self.upstream_user
            record["target"]["client_user"] = startup.user
        record.update(extra)
        actions.records.append(("session.start", record))
        if identity_record is not None:
            for finding in identity_record.get("findings", []):
                actions.records.append((
                    "identity.finding",
                    {**finding, "subject": identity_record["subject"],
                     "source": identity_record["source"]},
                ))

    def _end(
        self, actions: Actions, reason: str, outcome: str, error: dict[str, str] | None = None
    ) -> None:
        if self.ended:
            return
        self.ended = True
        self._record_start(actions)
        # Statements still waiting for a response when the connection ends.
        for item in self._pending:
            if item.kind not in ("sync", "query-blocked"):
                item.error = item.error or {"sqlstate": "", "message": f"interrupted: {reason}"}
                self._finish(item, actions)
        self._pending.clear()
        self._blocked_pending = 0
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


def _verdict(decision: Any) -> dict[str, Any] | None:
    """The ``policy`` field of a query record for ``decision`` (None without a policy); a
    remembered decision's is made once."""
    if decision is None:
        return None
    return decision.record if isinstance(decision, _Reused) else _policy_field(decision)


def _policy_field(decision: Any) -> dict[str, Any]:
    """The ``policy`` field of a query record."""
    return {
        "effect": decision.effect,
        "rule_id": decision.rule_id,
        "version": decision.policy_version,
        "classes": sorted({st.statement_class for st in decision.classification.statements}),
    }


def _without_last_message(held: bytes) -> bytes:
    """Held server bytes (whole messages) minus the last message, the error being replaced."""
    pos = 0
    last = 0
    while pos < len(held):
        last = pos
        pos += 1 + int.from_bytes(held[pos + 1 : pos + 5], "big")
    return held[:last]


def _sasl_mechanism(body: bytes) -> str:
    names = [n.decode("ascii", "replace") for n in body.split(b"\x00") if n]
    return "scram-sha-256" if "SCRAM-SHA-256" in names else "sasl:" + ",".join(names)


# Binary parameter formats decoded for the record, by type OID (pg_type.dat).
_BINARY_DECODERS: dict[int, Callable[[bytes], Any]] = {
    16: lambda v: v == b"\x01",  # bool
    20: lambda v: int.from_bytes(v, "big", signed=True),  # int8
    21: lambda v: int.from_bytes(v, "big", signed=True),  # int2
    23: lambda v: int.from_bytes(v, "big", signed=True),  # int4
    26: lambda v: int.from_bytes(v, "big"),  # oid
    700: lambda v: struct.unpack("!f", v)[0],  # float4
    701: lambda v: struct.unpack("!d", v)[0],  # float8
    25: lambda v: v.decode("utf-8", "replace"),  # text
    1043: lambda v: v.decode("utf-8", "replace"),  # varchar
}


_TEXT_OIDS = frozenset({25, 1043})


def _parameters(event: pg.Bind, limit: int, types: tuple[int, ...] = ()) -> list[Any]:
    """Bound parameters for the record: text values as text; binary ones decoded when their
    type is known and simple, else as type OID and length."""
    # (A large Bind's values may have been cut short: parameter_lengths has their lengths.)
    return _parameter_values(event.parameter_formats, event.parameters, event.parameter_lengths,
                             limit, types)


def _parameter_values(
    formats: tuple[int, ...], values: tuple[bytes | None, ...] | list[bytes | None],
    lengths: tuple[int, ...] | None, limit: int, types: tuple[int, ...],
) -> list[Any]:
    """:func:`_parameters` of a Bind's parts."""
    out: list[Any] = []
    for i, value in enumerate(values):
        fmt = formats[0] if len(formats) == 1 else (formats[i] if i < len(formats) else 0)
        length = lengths[i] if lengths is not None else len(value or b"")
        if value is None:
            out.append(None)
        elif fmt == 0:
            out.append(value[:limit].decode("utf-8", "replace"))
        else:
            oid = types[i] if i < len(types) and types[i] else None
            decode = _BINARY_DECODERS.get(oid or 0)
            if length != len(value) and oid not in _TEXT_OIDS:
                decode = None  # only text reads the same from part of its value
            try:
                decoded = decode(value[:limit]) if decode is not None else None
            except (struct.error, ValueError):
                decoded = None
            if decoded is not None:
                out.append(decoded)
            else:
                out.append({"format": "binary", "type_oid": oid, "length": length})
    return out


_Execution = tuple[tuple[str, str, tuple[int, ...]] | None, str, str, tuple[int, ...],
                   list[bytes | None]]


def _bound_execute_py(data: bytes, max_message: int) -> _Execution | None:
    """When ``data`` is exactly an optional Parse, a Bind, an optional Describe of a portal,
    an Execute of the portal bound and a Sync, each whole and at most ``max_message``
    bytes, with nothing after any message's fields: ``(parse, portal, statement, formats,
    values)``, the fields read as :class:`~agent.protocols.postgres.FrontendParser` reads
    them, ``parse`` the Parse's (name, text, parameter types) or None. None otherwise.
    (agent/protocols/_pgscan.c has it compiled.)"""
    size = len(data)
    unpack = _INT32.unpack_from
    unpack16 = _INT16.unpack_from
    pos = 0
    parse = None
    if size < 5:
        return None
    if data[0] == 0x50:  # Parse
        length = unpack(data, 1)[0]
        end = 1 + length
        name_end = data.find(b"\x00", 5, end)
        text_end = data.find(b"\x00", name_end + 1, end) if name_end >= 0 else -1
        if length < 4 or length > max_message or end > size or text_end < 0 or end - text_end < 3:
            return None
        count = unpack16(data, text_end + 1)[0]
        if count < 0 or end - text_end - 3 != 4 * count:
            return None
        first = text_end + 3
        types = tuple(unpack(data, first + 4 * i)[0] & 0xFFFFFFFF for i in range(count))
        parse = (data[5:name_end].decode("utf-8", "replace"),
                 data[name_end + 1 : text_end].decode("utf-8", "replace"), types)
        pos = end
    if size - pos < 5 or data[pos] != 0x42:  # Bind
        return None
    length = unpack(data, pos + 1)[0]
    end = pos + 1 + length
    portal_end = data.find(b"\x00", pos + 5, end)
    name_end = data.find(b"\x00", portal_end + 1, end) if portal_end >= 0 else -1
    if length < 4 or length > max_message or end > size or name_end < 0:
        return None
    portal = data[pos + 5 : portal_end]
    statement = data[portal_end + 1 : name_end].decode("utf-8", "replace")
    at = name_end + 1
    if end - at < 2:
        return None
    count = unpack16(data, at)[0]
    at += 2
    if count < 0 or end - at < 2 * count + 2:
        return None
    formats = tuple(unpack16(data, at + 2 * i)[0] for i in range(count))
    at += 2 * count
    count = unpack16(data, at)[0]
    at += 2
    values: list[bytes | None] = []
    for _ in range(count):
        if end - at < 4:
            return None
        value_length = unpack(data, at)[0]
        at += 4
        if value_length == -1:
            values.append(None)
            continue
        if value_length < 0 or end - at < value_length:
            return None
        values.append(data[at : at + value_length])
        at += value_length
    if end - at < 2:
        return None
    count = unpack16(data, at)[0]
    if count < 0 or end - at - 2 != 2 * count:
        return None
    pos = end
    if size - pos >= 6 and data[pos] == 0x44 and data[pos + 5] == 0x50:  # Describe (portal)
        length = unpack(data, pos + 1)[0]
        end = pos + 1 + length
        if (length < 6 or length > max_message or end > size
                or data.find(b"\x00", pos + 6, end) != end - 1):
            return None
        pos = end
    # Execute of the portal bound, then Sync, and nothing after.
    end = pos + 1 + len(portal) + 1 + 4 + 4
    if (size != end + 5 or data[pos] != 0x45 or unpack(data, pos + 1)[0] != end - pos - 1
            or end - pos - 1 > max_message
            or data[pos + 5 : pos + 5 + len(portal)] != portal
            or data[pos + 5 + len(portal)] != 0 or data[end:] != _SYNC):
        return None
    return parse, portal.decode("utf-8", "replace"), statement, formats, values


_bound_execute: Callable[[bytes, int], _Execution | None] = (
    pg.native_bound_execute or _bound_execute_py)


def _touches_prepared(decision: Any) -> bool:
    """Whether ``decision`` is on a string that PREPAREs, EXECUTEs or DEALLOCATEs."""
    classification = getattr(decision, "classification", None)
    return classification is not None and any(
        info.prepared is not None for info in classification.statements)


def _prepared_change(prepared: dict[str, tuple[str, tuple[int, ...]]], action: str,
                     name: str | None, text: str) -> None:
    """What a PREPARE (``text``) or a DEALLOCATE of ``name`` (None: all) does to
    ``prepared`` (the session's, a _Prepared, or a copy)."""
    if action == "prepare" and name is not None:
        prepared[name] = (text, ())
    elif action == "deallocate":
        if name is None:
            prepared.clear()
        elif name in prepared:
            del prepared[name]


def _without_execution_head(data: bytes) -> bytes:
    """``data`` without the ParseComplete, BindComplete, and NoData that may lead the answer
    to one execution (the general path takes them as passing)."""
    pos = 0
    if data.startswith(_PARSE_COMPLETE):
        pos = 5
    if data.startswith(_BIND_COMPLETE, pos):
        pos += 5
    if data.startswith(_NO_DATA, pos):
        pos += 5
    return data[pos:] if pos else data


def _duration_ms(item: _Pending, now: float) -> float:
    """A result record's duration_ms: from the request to ``now``, in milliseconds."""
    return round((now - item.started) * 1000.0, 3)


def _allowed_query_py(
    data: bytes, reused: dict[bytes, _Reused], max_message: int, max_text: int,
    plain: Callable[[str], Any],
) -> bytes | None:
    """The query record of ``data``, encoded as msgpack, when it is one whole simple Query
    whose text is ASCII, holds no NUL before its end, is at most ``max_text`` bytes and has
    a plain shape found allowed in ``reused``; None otherwise. (agent/protocols/_pgscan.c
    has it compiled.)"""
    size = len(data)
    if size < 6 or data[0] != 0x51 or data[-1] != 0:
        return None
    if _INT32.unpack_from(data, 1)[0] != size - 1 or size - 1 > max_message:
        return None
    body = data[5:-1]
    if len(body) > max_text or not body.isascii() or b"\x00" in body:
        return None
    text = body.decode("ascii")
    shape = plain(text)
    if type(shape) is not tuple or not shape:
        return None
    known = reused.get(shape[0])
    if known is None or not known.allowed:
        return None
    record: bytes = msgpack.packb({
        "length": len(body), "sha256": hashlib.sha256(body).hexdigest(), "protocol": "simple",
        "text": text, "truncated": False, "policy": known.record,
    }, use_bin_type=True)
    return record


_allowed_query = pg.native_allowed_query or _allowed_query_py


def _plain_reply_py(data: bytes, max_message: int, duration_ms: float) -> tuple[bytes, str] | None:
    """When ``data`` is exactly an optional RowDescription, DataRows, one CommandComplete
    with an ASCII tag and ReadyForQuery, each whole and within bounds: its result record,
    encoded as msgpack, and the transaction status; rows are the tag's count when it ends
    in one, else the DataRows. None otherwise. (agent/protocols/_pgscan.c has it compiled.)"""
    size = len(data)
    unpack = _INT32.unpack_from
    pos = 0
    if size >= 5 and data[0] == 0x54:  # RowDescription
        length = unpack(data, 1)[0]
        if length < 6 or length > max_message or length > size - 1:
            return None
        pos = length + 1
    pos, rows, _ = pg._datarows(data, pos)
    if size - pos < 5 or data[pos] != 0x43:  # CommandComplete
        return None
    length = unpack(data, pos + 1)[0]
    if length < 5 or length > max_message or length > size - pos - 1:
        return None
    end = pos + 1 + length
    nul = data.find(b"\x00", pos + 5, end)
    if nul < 0 or not data[pos + 5 : nul].isascii():
        return None
    tag = data[pos + 5 : nul].decode("ascii")
    if size - end != 6 or data[end] != 0x5A or unpack(data, end + 1)[0] != 5:  # ReadyForQuery
        return None
    status = chr(data[end + 5])
    if status not in "ITE":
        return None
    last = tag.rsplit(" ", 1)[-1]
    if " " in tag and last.isdigit():
        rows = int(last)
        if rows >= 1 << 64:
            return None  # more than a record's uint64 holds: the general path says so
    record: bytes = msgpack.packb({
        "duration_ms": duration_ms, "rows": rows, "command_tag": tag, "commands": [tag],
        "outcome": "success",
    }, use_bin_type=True)
    return record, status


_plain_reply = pg.native_plain_reply or _plain_reply_py

def _fields_of(cls: type) -> tuple[tuple[str, Any, bool], ...]:
    """A dataclass's fields as (name, default, whether the default is a factory to call):
    how client_step makes a _Pending without running its __init__, which does nothing
    else. (A field without a default gets None: the step gives it its value.)"""
    return tuple(
        (f.name, f.default_factory, True) if f.default_factory is not MISSING
        else (f.name, None if f.default is MISSING else f.default, False)
        for f in fields(cls))


_PENDING_FIELDS = _fields_of(_Pending)

# The proxy's one-step paths compiled (agent/protocols/_pgscan.c): what ClientSide and
# UpstreamSide (agent/proxy.py) do with bytes that allowed_query, allowed_execute or
# plain_reply takes, in one call that reads and moves on the same state (the slots of
# their classes). None without the extension; either way the proxy's Python does the
# same whenever a step declines.
#   client_step(side, data) -> 0 (nothing done), 1 (taken: allowed_query's way for a Query,
#   allowed_execute's for anything else), 2 (the session declined: client_data is next);
#   server_step(side, data) -> 0 (nothing done), 1 (taken), 2 (the bytes relayed to the
#   client, the rest for server_data(data, forwarded=True)).
client_step: Callable[[Any, bytes], int] | None = (
    partial(pg.native_client_step, _plain_text, _Pending, _PENDING_FIELDS, MAX_CACHED_TEXT)
    if pg.native_client_step is not None else None)
server_step: Callable[[Any, bytes], int] | None = pg.native_server_step
