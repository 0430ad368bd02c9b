"""The proxy's compiled one-step paths (``client_step`` and ``server_step`` of
agent/protocols/_pgscan.c, called first by ``ClientSide.data_received`` and
``UpstreamSide.data_received``) do what the proxy's Python does with the same bytes: the
same bytes to each side, the same records queued for the audit trail, the same session
and connection state; whatever they do not take they leave untouched for the Python."""

from __future__ import annotations

import asyncio
import itertools
import struct
import threading
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import agent.proxy as proxy_module
from agent.config import parse_config
from agent.pgsession import _PENDING_FIELDS, PostgresSession, _Pending
from agent.protocols import postgres as pg
from agent.proxy import ClientSide, Proxy, UpstreamSide
from audit.errors import AuditUnavailable
from audit.process import AuditProcess
from policy.classify import MAX_CACHED_TEXT, plain_text
from tests.support.fuzz import examples
from tests.support.native import compiled
from tests.unit.test_pgsession_fast import REPLY, _chunks, _replies, msg, state
from tests.unit.test_pgsession_policy import POLICY, STARTUP

SELECT = "SELECT abalance FROM pgbench_accounts WHERE aid = {};"
LOGIN = msg(b"R", b"\x00\x00\x00\x00") + msg(b"Z", b"I")


class Transport:
    """Keeps what is written and the flow-control calls."""

    def __init__(self) -> None:
        self.written: list[bytes] = []
        self.calls: list[str] = []

    def write(self, data: bytes) -> None:
        self.written.append(bytes(data))

    def pause_reading(self) -> None:
        self.calls.append("pause")

    def resume_reading(self) -> None:
        self.calls.append("resume")

    def close(self) -> None:
        self.calls.append("close")

    def is_closing(self) -> bool:
        return "close" in self.calls


class Queue(AuditProcess):
    """The agent's side of the audit trail without a writer: records stay queued.
    (A subclass, so that its fields are the slots the compiled steps read.)"""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop, self._loop_thread = loop, threading.get_ident()
        self._closing = False
        self._healthy = True
        self.failure: str | None = None
        self._unencoded: list[tuple[Any, ...]] = []
        self._flush_loop = loop
        self._check_at = 0  # every record asks for a batch step
        self.steps = 0
        self._lock = threading.Lock()

    def _batch_step(self, loop: asyncio.AbstractEventLoop, ts: int) -> None:
        self.steps += 1

    def _send_buffer(self) -> None:
        pass

    async def emit_durable(self, type: str, event: Any, *, session_id: str | None = None) -> int:
        self._unencoded.append((type, session_id, 0, event, "durable"))
        return len(self._unencoded)


# Nothing on disk is used: the proxy reads its services, the queue above stands for the store.
CONFIG = parse_config({"protect": [{"name": "postgres", "protocol": "postgres", "port": 5432}]})


def connection(loop: asyncio.AbstractEventLoop) -> tuple[ClientSide, UpstreamSide, Queue]:
    """A session past its login on the plain path (no TLS), as the proxy has it then."""
    audit = Queue(loop)
    proxy = Proxy(CONFIG, audit, None, policy=lambda: POLICY)
    client = ClientSide(proxy, CONFIG.protect[0])
    client.session_id = "s1"
    client.transport = Transport()  # type: ignore[assignment]
    client._early = None
    client._loop = loop
    clock = itertools.count(100.0, 0.00125)
    client.session = pg_session = PostgresSession(
        "s1", {"service": "postgres"}, policy=lambda: POLICY, clock=lambda: next(clock))
    client.upstream = upstream = UpstreamSide(client)
    upstream.transport = Transport()  # type: ignore[assignment]
    client.upstream_state = "plain"
    client._plain = True
    client.apply(pg_session.client_data(STARTUP))
    client.apply(pg_session.server_data(LOGIN))
    return client, upstream, audit


def observed(client: ClientSide, upstream: UpstreamSide, audit: Queue) -> dict[str, Any]:
    """What a step may change: bytes out, records queued (but their time), state."""
    assert client.session is not None
    return {
        "to_server": b"".join(upstream.transport.written),  # type: ignore[union-attr]
        "to_client": b"".join(client.transport.written),  # type: ignore[union-attr]
        "flow": (upstream.transport.calls, client.transport.calls),  # type: ignore[union-attr]
        "records": [item[:2] + item[3:] for item in audit._unencoded], "steps": audit.steps,
        "session": state(client.session), "query_last": client._query_last,
        "deferred": client._deferred is not None, "closed": client.closed,
    }


def native_steps() -> tuple[Any, Any]:
    client = compiled("agent.protocols._pgscan", "client_step", pg.native_client_step is not None)
    server = compiled("agent.protocols._pgscan", "server_step", pg.native_server_step is not None)
    return (lambda side, data: client(plain_text, _Pending, _PENDING_FIELDS, MAX_CACHED_TEXT,
                                      side, data)), server


def counted(step: Any, answers: list[Any]) -> Any:
    """``step``, keeping its answers in ``answers``."""
    def call(side: Any, data: bytes) -> Any:
        answer = step(side, data)
        answers.append(answer)
        return answer
    return call


class Steps:
    """The proxy's module with its compiled steps, or without (its Python alone)."""

    def __init__(self, steps: tuple[Any, Any] | None) -> None:
        self.steps = steps or (None, None)

    def __enter__(self) -> None:
        self.saved = proxy_module.client_step, proxy_module.server_step
        proxy_module.client_step, proxy_module.server_step = self.steps

    def __exit__(self, *exc: object) -> None:
        proxy_module.client_step, proxy_module.server_step = self.saved


async def settled() -> None:
    """Durable records' commits done (on both connections alike)."""
    for _ in range(3):
        await asyncio.sleep(0)


async def run_both(steps: list[tuple[bytes, list[bytes]]], compiled_steps: tuple[Any, Any],
                   settle_first: bool = False) -> None:
    loop = asyncio.get_running_loop()
    fast, general = connection(loop), connection(loop)
    assert observed(*fast) == observed(*general)
    if settle_first:
        await settled()
    for chunk, reply in steps:
        # (A transport never hands over empty bytes.)
        for data, to_server in [(chunk, False)] * bool(chunk) + [(part, True) for part in reply
                                                                 if part]:
            with Steps(compiled_steps):
                (fast[1] if to_server else fast[0]).data_received(data)
            with Steps(None):
                (general[1] if to_server else general[0]).data_received(data)
            await settled()
            assert observed(*fast) == observed(*general)
            if fast[0].closed:
                return


@settings(max_examples=examples(400), deadline=None)
@given(st.lists(st.tuples(_chunks, _replies), min_size=1, max_size=8), st.booleans())
def test_compiled_steps_do_what_the_proxy_does(steps: list[tuple[bytes, list[bytes]]],
                                               settle_first: bool) -> None:
    """Any client bytes and server answers, the first of them while the login's records are
    being committed or after: the same bytes, records and state either way."""
    asyncio.run(run_both(steps, native_steps(), settle_first))


@settings(max_examples=examples(100), deadline=None)
@given(st.lists(st.integers(1, 10**6), min_size=1, max_size=12))
def test_compiled_steps_take_the_commonest_traffic(keys: list[int]) -> None:
    """pgbench -S traffic: after its shape's first statement every Query and its answer go
    the compiled way, with what the Python would have done."""
    taken: list[Any] = []
    client_step, server_step = (counted(step, taken) for step in native_steps())
    steps = [(pg.query_message(SELECT.format(key)), [REPLY]) for key in keys]
    asyncio.run(run_both(steps, (client_step, server_step)))
    # The first statement comes while the login's records are being committed (held, on the
    # general path); its shape judged, the rest go the one-step way. Every answer does.
    assert taken == [0, 1] + [1, 1] * (len(keys) - 1)


def test_compiled_steps_take_prepared_executions() -> None:
    """pgbench -M prepared traffic (Bind, Describe, Execute, Sync of a statement prepared
    once): the client step takes each execution the session's allowed_execute takes, the
    server step each answer, with what the Python would have done."""
    taken: list[Any] = []
    client_step, server_step = (counted(step, taken) for step in native_steps())
    text = SELECT.format("$1").encode()
    prepare = msg(b"P", b"P0_1\x00" + text + b"\x00\x00\x00") + msg(b"S", b"")
    steps = [(prepare, [msg(b"1", b"") + msg(b"Z", b"I")])] + [
        (msg(b"B", b"\x00P0_1\x00" + struct.pack("!hhi", 0, 1, len(str(key))) + str(key).encode()
             + struct.pack("!h", 0))
         + msg(b"D", b"P\x00") + msg(b"E", b"\x00" + struct.pack("!i", 0)) + msg(b"S", b""),
         [msg(b"2", b"") + REPLY])
        for key in (1, 2, 3)]
    asyncio.run(run_both(steps, (client_step, server_step), settle_first=True))
    # The Parse and its Sync go the general way (their answer relayed first, then read
    # there); each execution is judged when it runs and taken in one step, and each answer.
    assert taken == [2, 2] + [1, 1] * 3


def test_the_pending_statement_is_what_its_class_makes() -> None:
    """The compiled step makes the session's pending item without running its __init__:
    every field as the dataclass would set it, the list of commands its own."""

    async def run() -> Any:
        client, upstream, _ = connection(asyncio.get_running_loop())
        await settled()
        client_step, _ = native_steps()
        assert client.session is not None
        client.data_received(pg.query_message(SELECT.format(1)))  # (its shape judged)
        upstream.data_received(REPLY)
        assert client_step(client, pg.query_message(SELECT.format(2))) == 1
        return client.session._pending[-1]

    made = asyncio.run(run())
    assert made == _Pending("query", started=made.started)
    assert type(made) is _Pending and made.commands == [] and made.commands is not _Pending(
        "query").commands
    made.commands.append("SELECT 1")  # its own list, not a default shared with others
    assert _Pending("query").commands == []


def test_emit_failure_goes_to_audit_failed(monkeypatch: pytest.MonkeyPatch) -> None:
    """An audit queue that fails while the compiled step queues a record: the session ends
    (ClientSide._audit_failed), the statement having gone to the server, as in Python."""

    async def run() -> None:
        loop = asyncio.get_running_loop()
        sides = []
        for steps in (native_steps(), None):
            client, upstream, audit = connection(loop)
            await settled()  # the login's records committed, as a client waits for them

            def failing(loop: Any, ts: int, audit: Queue = audit) -> None:
                audit._healthy = False
                audit.failure = "writer gone"

            with Steps(steps):
                client.data_received(pg.query_message(SELECT.format(1)))
                upstream.data_received(REPLY)
                monkeypatch.setattr(audit, "_batch_step", failing)
                client.data_received(pg.query_message(SELECT.format(2)))
            sides.append(observed(client, upstream, audit))
        assert sides[0] == sides[1]
        assert b"the audit trail cannot be written" in sides[0]["to_client"]
        assert "close" in sides[0]["flow"][1]  # the client's connection
        assert pg.query_message(SELECT.format(2)) in sides[0]["to_server"]

    asyncio.run(run())


def test_unhealthy_error_names_the_failure() -> None:
    loop = asyncio.new_event_loop()
    try:
        audit = Queue(loop)
        audit.failure = "disk full"
        error = audit._failing()
        assert isinstance(error, AuditUnavailable) and "disk full" in str(error)
    finally:
        loop.close()
