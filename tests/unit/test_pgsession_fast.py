"""The one-step paths for the commonest traffic leave the session exactly where the
general paths do, with the same records and bytes; anything else they decline, changing
nothing: ``PostgresSession.allowed_query`` (a statement of a shape the session already
allowed) and ``PostgresSession.allowed_execute`` (a statement run once in the extended
protocol) against ``client_data``, ``PostgresSession.plain_reply`` (their ordinary answer)
against ``server_data``. Their compiled steps (agent/protocols/_pgscan.c) answer as their
Python twins."""

from __future__ import annotations

import struct
from typing import Any

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.pgsession import (
    PostgresSession,
    _allowed_query_py,
    _bound_execute_py,
    _plain_reply_py,
    _Reused,
)
from agent.protocols import postgres as pg
from audit.process import _encodable
from policy import load_policy
from policy.classify import plain_text
from tests.support.fuzz import examples
from tests.support.native import compiled
from tests.unit.test_pgsession_policy import POLICY, REPO, STARTUP

MAX_MESSAGE = pg.DEFAULT_MAX_MESSAGE


def native(name: str = "allowed_query") -> Any:
    return compiled("agent.protocols._pgscan", name, pg.NATIVE_SCAN)


def msg(kind: bytes, body: bytes) -> bytes:
    return kind + struct.pack("!i", len(body) + 4) + body


REPLY = (msg(b"T", struct.pack("!h", 1) + b"abalance\x00" + struct.pack("!ihihih", 0, 0, 23, 4, -1, 0))
         + msg(b"D", struct.pack("!hi", 1, 2) + b"-1") + msg(b"C", b"SELECT 1\x00") + msg(b"Z", b"I"))
ERROR = msg(b"E", b"SERROR\x00C42P01\x00Mno such table\x00\x00") + msg(b"Z", b"I")


def encoded(records: list[tuple[str, Any]]) -> list[tuple[str, bytes]]:
    """Records as the audit trail stores their events: msgpack, as the writer gets them
    (what msgpack cannot encode made text, as the agent's side of the writer does)."""
    out = []
    for t, e in records:
        try:
            data = e if isinstance(e, bytes) else msgpack.packb(e, use_bin_type=True)
        except OverflowError:
            data = msgpack.packb(_encodable(e), use_bin_type=True)
        out.append((t, data))
    return out


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
        "reused_texts": sorted(s._reused_texts),
        "phase": s.phase, "transaction": s.transaction, "buffered": s.frontend.buffered,
        "bytes_from_server": s.bytes_from_server, "ended": s.ended,
        "pending_counts": [(p.rows, p.command_rows, p.commands, p.copy_bytes, p.error)
                           for p in s._pending],
        "scanner_at_boundary": s.backend.at_boundary, "last_error": s.last_error,
        "statements_known": s._statements, "prepared_size": s._statements.size,
        "describes": list(s._describes), "touched": s._touched, "maybe": s._maybe,
        "blocked_names": s._blocked_names,
        "portals": {name: (p.statement, p.parameters, p.request, p.blocked_in)
                    for name, p in s._portals.items()},
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
def cstring(text: str) -> bytes:
    return text.encode() + b"\x00"


def execution(parse: tuple[str, str, list[int]] | None, portal: str, statement: str,
              formats: list[int], values: list[bytes | None], results: list[int],
              describe: bytes | None, execute: tuple[str, int] | None, sync: bytes) -> bytes:
    """A statement run in the extended protocol, as drivers send it, or something close."""
    data = b""
    if parse is not None:
        name, text, types = parse
        data += msg(b"P", cstring(name) + cstring(text) + struct.pack("!h", len(types))
                    + b"".join(struct.pack("!I", t) for t in types))
    data += msg(b"B", cstring(portal) + cstring(statement)
                + struct.pack(f"!h{len(formats)}h", len(formats), *formats)
                + struct.pack("!h", len(values))
                + b"".join(struct.pack("!i", -1) if v is None else struct.pack("!i", len(v)) + v
                           for v in values)
                + struct.pack(f"!h{len(results)}h", len(results), *results))
    if describe is not None:
        data += msg(b"D", describe)
    if execute is not None:
        data += msg(b"E", cstring(execute[0]) + struct.pack("!i", execute[1]))
    return data + sync


_names = st.sampled_from(["", "P0_1", "s2"])
_executions = st.builds(
    execution,
    st.none() | st.tuples(_names, _texts | st.just("SELECT abalance FROM pgbench_accounts "
                                                  "WHERE aid = $1"),
                          st.lists(st.sampled_from([0, 16, 23, 25, 701, 2**32 - 1]), max_size=3)),
    st.sampled_from(["", "p1"]), _names | st.just("unknown"),
    st.lists(st.sampled_from([0, 1, 2, -1]), max_size=3),
    st.lists(st.none() | st.binary(max_size=9) | st.integers(0, 10**6).map(lambda n: b"%d" % n),
             max_size=3),
    st.lists(st.sampled_from([0, 1]), max_size=2),
    st.none() | st.sampled_from([b"P\x00", b"Pp1\x00", b"S\x00", b"SP0_1\x00", b"P", b"P\x00x"]),
    st.none() | st.tuples(st.sampled_from(["", "p1"]), st.sampled_from([0, 1, -1])),
    st.sampled_from([msg(b"S", b""), b"", msg(b"H", b""), msg(b"S", b"x")]),
)
# As libpq sends them: PQexecParams (with its Parse) and PQexecPrepared (without).
_driver_executions = st.builds(
    lambda parse, name, portal, values, types: execution(
        (name, parse, types) if parse else None, portal, name, [], values, [],
        b"P" + cstring(portal), (portal, 0), msg(b"S", b"")),
    st.none() | st.just("SELECT abalance FROM pgbench_accounts WHERE aid = $1") | _texts,
    _names, st.sampled_from(["", "p1"]),
    st.lists(st.none() | st.integers(0, 10**6).map(lambda n: b"%d" % n), max_size=3),
    st.lists(st.sampled_from([0, 23, 25]), max_size=3),
)
_chunks = st.one_of(
    _driver_executions,
    _driver_executions,
    _texts.map(pg.query_message),
    _texts.map(pg.query_message).map(lambda q: q + q),  # two in one chunk
    st.tuples(_texts.map(pg.query_message), st.integers(1, 8)).map(lambda qc: qc[0][: -qc[1]]),
    st.binary(max_size=20),
    _executions,
    _executions.map(lambda e: e + e),
    st.tuples(_executions, st.integers(1, 8)).map(lambda ec: ec[0][: -ec[1]]),
    st.tuples(_executions, st.integers(0, 200), st.integers(0, 255)).map(
        lambda eib: eib[0][: eib[1]] + bytes([eib[2]]) + eib[0][eib[1] + 1 :]),  # one byte changed
)


def answer(tag: bytes, rows: int, status: bytes = b"I", described: bool = True) -> bytes:
    head = REPLY[: REPLY.index(b"D")] if described else b""
    return (head + msg(b"D", struct.pack("!hi", 1, 1) + b"7") * rows + msg(b"C", tag + b"\x00")
            + msg(b"Z", status))


# Answers: ordinary ones with all kinds of tags, errors, notices, two answers at once,
# and any of them cut anywhere.
_tags = st.one_of(
    st.sampled_from([b"SELECT 1", b"SELECT 0", b"INSERT 0 5", b"BEGIN", b"SET", b"SELECT ",
                     b"SELECT 00012", b"FETCH 99999999999999999999999999999999999",
                     b"FETCH 18446744073709551615", b"FETCH 18446744073709551616", b"X \xc3\xa9 2",
                     b"", b"SELECT 1\x00junk"]),
    st.binary(max_size=12),
)
PARSED, BOUND, NO_DATA = msg(b"1", b""), msg(b"2", b""), msg(b"n", b"")
_answers = st.one_of(
    st.builds(answer, _tags, st.integers(0, 3), st.sampled_from([b"I", b"T", b"E", b"X"]),
              st.booleans()),
    st.builds(lambda head, a: head + a,  # in the extended protocol
              st.sampled_from([BOUND, PARSED + BOUND, BOUND + NO_DATA, PARSED + BOUND + NO_DATA,
                               PARSED, NO_DATA + BOUND, BOUND + BOUND]),
              st.builds(answer, _tags, st.integers(0, 3), st.sampled_from([b"I", b"T"]),
                        st.booleans())),
    st.just(BOUND + msg(b"s", b"") + msg(b"Z", b"I")),  # PortalSuspended
    st.just(PARSED + BOUND + ERROR),
    st.just(ERROR), st.just(msg(b"N", b"SNOTICE\x00Mhi\x00\x00") + REPLY), st.just(REPLY + REPLY),
    st.binary(max_size=12),
)
_replies: st.SearchStrategy[list[bytes]] = st.one_of(
    _answers.map(lambda a: [a]),
    st.tuples(_answers, st.integers(1, 40)).map(lambda ac: [ac[0][: ac[1]], ac[0][ac[1]:]]),
    st.just([]),
)


def one_step(s: PostgresSession, chunk: bytes) -> bytes | None:
    """The client side's one-step path, chosen as the proxy chooses it."""
    return s.allowed_query(chunk) if chunk[:1] == b"Q" else s.allowed_execute(chunk)


def feed_server(fast: PostgresSession, general: PostgresSession, chunks: list[bytes]) -> None:
    """As the proxy does: bytes it may forward first go to the one-step path, then to
    server_data (forwarded), the rest to server_data."""
    for chunk in chunks:
        if not chunk:
            continue
        assert fast.relays_server_bytes == general.relays_server_bytes
        forwarded = fast.relays_server_bytes
        record = fast.plain_reply(chunk) if forwarded else None
        b = general.server_data(chunk, forwarded=forwarded)
        if record is None:
            a = fast.server_data(chunk, forwarded=forwarded)
            assert (a.to_client, a.records) == (b.to_client, b.records)
        else:
            assert b.to_client == [] and [("result", record)] == encoded(b.records)
        assert state(fast) == state(general)


@settings(max_examples=examples(600), deadline=None)
@given(st.lists(st.tuples(_chunks, _replies), min_size=1, max_size=8))
def test_same_session_either_way(steps: list[tuple[bytes, list[bytes]]]) -> None:
    """Fed the same bytes, a session that tries the one-step paths first and one that never
    does send the same bytes on and make the same records and state."""
    fast, general = ready(), ready()
    fast_records: list[tuple[str, Any]]
    for chunk, reply in steps:
        before = state(fast)
        record = one_step(fast, chunk)
        if record is None:
            assert state(fast) == before  # declined: nothing changed
            a = fast.client_data(chunk)
            fast_out, fast_records = a.to_server, a.records + a.durable
            if a.close:
                return
        else:
            fast_out, fast_records = [chunk], [("query", record)]
        b = general.client_data(chunk)
        assert b"".join(fast_out) == b"".join(b.to_server)
        assert encoded(fast_records) == encoded(b.records + b.durable)
        assert state(fast) == state(general)
        if b.close:
            return
        feed_server(fast, general, reply)
        if general.ended:
            return


def test_taken_for_a_shape_already_allowed_and_not_before() -> None:
    """pgbench -S's statement: judged the first time, then in one step for any other key."""
    s = ready()
    first = pg.query_message("SELECT abalance FROM pgbench_accounts WHERE aid = 1;")
    assert s.allowed_query(first) is None
    s.client_data(first)
    s.server_data(REPLY)
    again = pg.query_message("SELECT abalance FROM pgbench_accounts WHERE aid = 73;")
    encoded_query = s.allowed_query(again)
    assert encoded_query is not None
    record = msgpack.unpackb(encoded_query)
    assert record["text"] == "SELECT abalance FROM pgbench_accounts WHERE aid = 73;"
    assert record["policy"]["effect"] == "allow"
    assert [p.kind for p in s._pending] == ["query"]
    encoded_result = s.plain_reply(REPLY)
    assert encoded_result is not None
    result = msgpack.unpackb(encoded_result)
    assert result["rows"] == 1 and result["command_tag"] == "SELECT 1"
    assert not s._pending and s.transaction == "I"


SELECT_ONE = "SELECT abalance FROM pgbench_accounts WHERE aid = $1"


def prepared(portal: str, key: bytes, parse: bool = False, text: str = SELECT_ONE) -> bytes:
    """pgbench -M prepared's transaction (with its Parse: -M extended's, unnamed)."""
    name = "" if parse else "P0_1"
    return execution((name, text, []) if parse else None, portal, name, [], [key], [],
                     b"P" + cstring(portal), (portal, 0), msg(b"S", b""))


def test_extended_executions_taken_in_one_step() -> None:
    """pgbench -M prepared and -M extended: each execution in one step, recorded with its
    text and parameters as the general path records it, and its answer too."""
    s = ready()
    s.client_data(msg(b"P", b"P0_1\x00" + cstring(SELECT_ONE) + b"\x00\x00")
                  + msg(b"S", b""))  # prepared once (PQprepare)
    s.server_data(PARSED + msg(b"Z", b"I"))
    for key, data in ((b"73", prepared("", b"73")), (b"74", prepared("", b"74", parse=True))):
        encoded_query = s.allowed_execute(data)
        assert encoded_query is not None
        record = msgpack.unpackb(encoded_query)
        assert record == {"length": len(SELECT_ONE), "sha256": record["sha256"],
                          "protocol": "extended", "text": SELECT_ONE, "truncated": False,
                          "parameters": [key.decode()], "policy": record["policy"]}
        # The verdict its Parse was given, as a simple Query's record carries its own.
        assert record["policy"]["effect"] == "allow" and record["policy"]["classes"] == ["read"]
        assert [p.kind for p in s._pending] == ["execute", "sync"]
        head = PARSED + BOUND if data[:1] == b"P" else BOUND
        encoded_result = s.plain_reply(head + REPLY)
        assert encoded_result is not None
        result = msgpack.unpackb(encoded_result)
        assert result["rows"] == 1 and result["command_tag"] == "SELECT 1"
        assert not s._pending and s.transaction == "I"
    assert s.statements == 2


def test_a_parse_text_judged_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """A driver's Parse of the same text again: neither the policy nor the shape is worked
    out again, until the policy changes."""
    import agent.pgsession as pgsession

    shapes: list[str] = []
    shape_of = pgsession._statement_shape
    monkeypatch.setattr(pgsession, "_statement_shape", lambda t: shapes.append(t) or shape_of(t))
    current = [POLICY]
    s = PostgresSession("s1", {"service": "postgres"}, policy=lambda: current[0])
    s.client_data(STARTUP)
    s.server_data(msg(b"R", struct.pack("!i", 0)) + msg(b"Z", b"I"))
    for key in (b"1", b"2", b"3"):
        assert s.allowed_execute(prepared("", key, parse=True)) is not None
        assert s.plain_reply(PARSED + BOUND + REPLY) is not None
    assert shapes == [SELECT_ONE]
    current[0] = load_policy(REPO / "packaging" / "policy.toml")  # a reload
    assert s.allowed_execute(prepared("", b"4", parse=True)) is not None
    assert shapes == [SELECT_ONE, SELECT_ONE]


def test_extended_declined_when_the_general_path_must_decide() -> None:
    """A Parse the policy blocks, a statement the session does not know, and a value the
    record cannot hold as it is: each declined, and the general path records it."""
    s = ready()
    blocked = prepared("", b"1", parse=True, text="DROP TABLE pgbench_accounts")
    assert s.allowed_execute(blocked) is None
    actions = s.client_data(blocked)
    assert [t for t, _ in actions.durable] == ["policy.decision"]
    s.server_data(msg(b"E", b"SERROR\x00C42601\x00Msyntax\x00\x00") + msg(b"Z", b"I"))
    assert s.allowed_execute(prepared("", b"1")) is None  # no statement P0_1 here
    huge = execution(("", "SELECT $1::int4", [23]), "", "", [1], [b"\x7f" * 9], [], None,
                     ("", 0), msg(b"S", b""))
    assert s.allowed_execute(huge) is None
    records = encoded(s.client_data(huge).records)
    assert msgpack.unpackb(records[0][1])["parameters"] == [str(int.from_bytes(b"\x7f" * 9))]


def test_declined_while_policy_or_subject_changed() -> None:
    """A new policy version (a reload) or subject: the general path judges again."""
    current = [POLICY]
    s = PostgresSession("s1", {"service": "postgres"}, policy=lambda: current[0])
    s.client_data(STARTUP)
    s.server_data(msg(b"R", struct.pack("!i", 0)) + msg(b"Z", b"I"))
    s.client_data(pg.query_message("select 1 from t where id = 1"))
    s.server_data(REPLY)
    query = pg.query_message("select 1 from t where id = 2")
    current[0] = load_policy(REPO / "packaging" / "policy.toml")  # the same file, reloaded
    assert s.allowed_query(query) is None
    s.client_data(query)
    s.server_data(REPLY)
    assert s.allowed_query(pg.query_message("select 1 from t where id = 3")) is not None
    s.subject = object()  # type: ignore[assignment]
    assert s.allowed_query(pg.query_message("select 1 from t where id = 4")) is None


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


@settings(max_examples=examples(2000), deadline=None)
@given(_chunks, st.integers(0, 100))
def test_compiled_execution_step_answers_as_python(data: bytes, max_message: int) -> None:
    bound_execute = native("bound_execute")
    for limit in (MAX_MESSAGE, max_message):
        assert bound_execute(data, limit) == _bound_execute_py(data, limit)


def test_compiled_execution_step_reads_what_drivers_send() -> None:
    """Both steps read pgbench's requests (so the property above compares answers, not
    only refusals), and refuse a bad argument."""
    bound_execute = native("bound_execute")
    with_parse = execution(("", SELECT_ONE, [23, 2**32 - 1]), "p1", "", [1, 0], [b"\x00\x01", None],
                           [1], b"Pp1\x00", ("p1", 0), msg(b"S", b""))
    expected = (("", SELECT_ONE, (23, 2**32 - 1)), "p1", "", (1, 0), [b"\x00\x01", None])
    for step in (bound_execute, _bound_execute_py):
        assert step(with_parse, MAX_MESSAGE) == expected
        assert step(prepared("", b"42"), MAX_MESSAGE) == (None, "", "P0_1", (), [b"42"])
        assert step(with_parse, 20) is None  # the Parse is over the limit
        assert step(with_parse[:-1], MAX_MESSAGE) is None
    with pytest.raises(TypeError):
        bound_execute(with_parse)
    with pytest.raises(TypeError):
        bound_execute("text", MAX_MESSAGE)


@settings(max_examples=examples(2000), deadline=None)
@given(st.one_of(_answers, _answers.map(lambda a: a[:-1]), st.binary(max_size=40)),
       st.integers(0, 100), st.floats())
def test_compiled_reply_step_answers_as_python(data: bytes, max_message: int,
                                               duration: float) -> None:
    plain_reply = native("plain_reply")
    for limit in (MAX_MESSAGE, max_message):
        assert plain_reply(data, limit, duration) == _plain_reply_py(data, limit, duration)


def test_reply_step_counts() -> None:
    """The tag's count when it has one, else the rows; the status as the server sent it."""
    plain_reply = native("plain_reply")

    def read(step: Any, data: bytes) -> Any:
        out = step(data, MAX_MESSAGE, 1.5)
        if out is None:
            return None
        record = msgpack.unpackb(out[0])
        assert record["duration_ms"] == 1.5 and record["outcome"] == "success"
        assert record["commands"] == [record["command_tag"]]
        return record["command_tag"], record["rows"], out[1]

    most = b"FETCH 18446744073709551615"  # a record's uint64 at most
    for step in (plain_reply, _plain_reply_py):
        assert read(step, answer(b"SELECT 3", 3)) == ("SELECT 3", 3, "I")
        assert read(step, answer(b"INSERT 0 5", 0, b"T", False)) == ("INSERT 0 5", 5, "T")
        assert read(step, answer(b"SHOW", 2)) == ("SHOW", 2, "I")
        assert read(step, answer(most, 0)) == (most.decode(), 2**64 - 1, "I")
        assert read(step, answer(b"FETCH 18446744073709551616", 0)) is None  # the general path's
        assert read(step, answer(b"SELECT 1", 1) + b"x") is None
        assert read(step, ERROR) is None
