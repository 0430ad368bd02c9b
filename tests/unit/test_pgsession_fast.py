"""The one-step path for a statement of a shape the session already allowed
(``PostgresSession.allowed_query``, compiled in agent/protocols/_pgscan.c) leaves the
session exactly where the general path (``client_data``) does, with the same record and
the same bytes for the server; anything else it declines, changing nothing."""

from __future__ import annotations

import struct
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.pgsession import PostgresSession, _allowed_query_py, _Reused
from agent.protocols import postgres as pg
from policy import load_policy
from policy.classify import plain_text
from tests.support.fuzz import examples
from tests.support.native import compiled
from tests.unit.test_pgsession_policy import POLICY, STARTUP

MAX_MESSAGE = pg.DEFAULT_MAX_MESSAGE


def native() -> Any:
    return compiled("agent.protocols._pgscan", "allowed_query", pg.NATIVE_SCAN)


def msg(kind: bytes, body: bytes) -> bytes:
    return kind + struct.pack("!i", len(body) + 4) + body


REPLY = (msg(b"T", struct.pack("!h", 1) + b"abalance\x00" + struct.pack("!ihihih", 0, 0, 23, 4, -1, 0))
         + msg(b"D", struct.pack("!hi", 1, 2) + b"-1") + msg(b"C", b"SELECT 1\x00") + msg(b"Z", b"I"))
ERROR = msg(b"E", b"SERROR\x00C42P01\x00Mno such table\x00\x00") + msg(b"Z", b"I")


def ready(policy: Any = POLICY) -> PostgresSession:
    s = PostgresSession("s1", {"service": "postgres"}, policy=lambda: policy,
                        clock=lambda: 100.0)
    s.client_data(STARTUP)
    s.server_data(msg(b"R", struct.pack("!i", 0)) + msg(b"Z", b"I"))
    return s


def state(s: PostgresSession) -> dict[str, Any]:
    """What the session tracks that a client's statement can change."""
    return {
        "bytes_from_client": s.bytes_from_client, "statements": s.statements,
        "segments_sent": s._segments_sent, "segments_done": s._segments_done,
        "pending": [(p.kind, p.started) for p in s._pending], "reused": sorted(s._reused),
        "phase": s.phase, "transaction": s.transaction, "buffered": s.frontend.buffered,
    }


# Statements: pgbench's with any key, other plain ones, blocked ones, texts that are not
# plain (quotes, non-ASCII), several statements, a NUL inside, empty ones.
_texts = st.one_of(
    st.integers(0, 10**12).map(lambda n: f"SELECT abalance FROM pgbench_accounts WHERE aid = {n};"),
    st.integers(0, 10**6).map(lambda n: f"select * from t where id = {n}"),
    st.sampled_from(["DROP TABLE accounts", "TRUNCATE t", "SELECT 1; SELECT 2", "", "   ",
                     "SELECT 'x' FROM t", "SELECT 'é'", "SELECT 1\x00SELECT 2", "BEGIN", "COMMIT"]),
    st.text(st.characters(codec="ascii"), max_size=30),
    st.text(max_size=10),
)
_chunks = st.one_of(
    _texts.map(pg.query_message),
    _texts.map(pg.query_message).map(lambda q: q + q),  # two in one chunk
    st.tuples(_texts.map(pg.query_message), st.integers(1, 8)).map(lambda qc: qc[0][: -qc[1]]),
    st.binary(max_size=20),
)


@settings(max_examples=examples(600), deadline=None)
@given(st.lists(st.tuples(_chunks, st.sampled_from([REPLY, ERROR, b""])), min_size=1, max_size=8))
def test_same_session_either_way(steps: list[tuple[bytes, bytes]]) -> None:
    """Fed the same bytes, a session that tries the one-step path first and one that never
    does send the same bytes to the server and make the same records and state."""
    fast, general = ready(), ready()
    for chunk, reply in steps:
        before = state(fast)
        record = fast.allowed_query(chunk)
        if record is None:
            assert state(fast) == before  # declined: nothing changed
            a = fast.client_data(chunk)
            fast_out, fast_records = a.to_server, a.records + a.durable
            if a.close:
                return
        else:
            fast_out, fast_records = [chunk], [("query", record)]
        b = general.client_data(chunk)
        assert fast_out == b.to_server
        assert fast_records == b.records + b.durable
        assert state(fast) == state(general)
        if b.close:
            return
        if reply and fast._pending:
            assert fast.server_data(reply).records == general.server_data(reply).records
            assert state(fast) == state(general)


def test_taken_for_a_shape_already_allowed_and_not_before() -> None:
    """pgbench -S's statement: judged the first time, then in one step for any other key."""
    s = ready()
    first = pg.query_message("SELECT abalance FROM pgbench_accounts WHERE aid = 1;")
    assert s.allowed_query(first) is None
    s.client_data(first)
    s.server_data(REPLY)
    again = pg.query_message("SELECT abalance FROM pgbench_accounts WHERE aid = 73;")
    record = s.allowed_query(again)
    assert record is not None
    assert record["text"] == "SELECT abalance FROM pgbench_accounts WHERE aid = 73;"
    assert record["policy"]["effect"] == "allow"
    assert [p.kind for p in s._pending] == ["query"]


def test_declined_while_policy_or_subject_changed() -> None:
    """A new policy version (a reload) or subject: the general path judges again."""
    current = [POLICY]
    s = PostgresSession("s1", {"service": "postgres"}, policy=lambda: current[0])
    s.client_data(STARTUP)
    s.server_data(msg(b"R", struct.pack("!i", 0)) + msg(b"Z", b"I"))
    s.client_data(pg.query_message("select 1 from t where id = 1"))
    s.server_data(REPLY)
    query = pg.query_message("select 1 from t where id = 2")
    current[0] = load_policy(pg_policy_path())
    assert s.allowed_query(query) is None
    s.client_data(query)
    s.server_data(REPLY)
    assert s.allowed_query(pg.query_message("select 1 from t where id = 3")) is not None
    s.subject = object()  # type: ignore[assignment]
    assert s.allowed_query(pg.query_message("select 1 from t where id = 4")) is None


def pg_policy_path() -> Any:
    from tests.unit.test_pgsession_policy import REPO
    return REPO / "packaging" / "policy.toml"


# The compiled step against its twin, on any bytes.
_reused_keys = st.lists(_texts, max_size=4).map(
    lambda texts: {shape[0]: _Reused({"effect": "allow", "n": i}, allowed=i % 3 != 2)
                   for i, text in enumerate(texts)
                   if type(shape := plain_text(text)) is tuple})


@settings(max_examples=examples(2000), deadline=None)
@given(_chunks, _reused_keys, st.integers(0, 100), st.integers(0, 100))
def test_compiled_step_answers_as_python(data: bytes, reused: dict[bytes, _Reused],
                                         max_message: int, max_text: int) -> None:
    allowed_query = native()
    for limits in ((MAX_MESSAGE, 1 << 20), (max_message, max_text)):
        assert allowed_query(data, reused, *limits, plain_text) == \
            _allowed_query_py(data, reused, *limits, plain_text)


def test_compiled_step_passes_errors_on() -> None:
    """A failing shape function or a bad argument is an exception, not a crash."""
    allowed_query = native()
    query = pg.query_message("select 1")

    def broken(text: str) -> Any:
        raise RuntimeError("no shape")

    with pytest.raises(RuntimeError, match="no shape"):
        allowed_query(query, {}, MAX_MESSAGE, 1000, broken)
    with pytest.raises(TypeError):
        allowed_query(query, [], MAX_MESSAGE, 1000, plain_text)
    with pytest.raises(TypeError):
        allowed_query(query, {})
