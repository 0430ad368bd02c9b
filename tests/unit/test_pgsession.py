"""The PostgreSQL session: what it forwards and what it records, message by message."""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Any

import msgpack
import pytest

from agent.pgsession import PostgresSession
from agent.protocols import postgres as pg


def msg(kind: bytes, body: bytes) -> bytes:
    return kind + struct.pack("!i", len(body) + 4) + body


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def session() -> tuple[PostgresSession, Clock]:
    clock = Clock()
    s = PostgresSession("s1", {"service": "postgres", "source": {"ip": "127.0.0.1", "port": 5}},
                        max_statement=32, clock=clock)
    return s, clock


def records(actions: Any, kind: str) -> list[dict[str, Any]]:
    return [r for t, r in actions.records if t == kind]


AUTH_OK = msg(b"R", struct.pack("!i", 0)) + msg(b"K", struct.pack("!ii", 11, 22)) + msg(b"Z", b"I")
STARTUP = pg.startup_message({"user": "alice", "database": "shop"})


def ready(s: PostgresSession) -> None:
    s.client_data(STARTUP)
    s.server_data(AUTH_OK)


def test_startup_is_forwarded_and_recorded_with_target() -> None:
    """The StartupMessage goes upstream unchanged and session.start names database and user."""
    s, _ = session()
    actions = s.client_data(STARTUP)
    assert actions.to_server == [STARTUP]
    (start,) = records(actions, "session.start")
    assert start["target"] == {"database": "shop", "user": "alice", "application_name": None}
    assert start["service"] == "postgres"


def test_ssl_request_is_refused_locally() -> None:
    """An SSLRequest is answered 'N' by the agent and never reaches the server."""
    s, _ = session()
    actions = s.client_data(struct.pack("!ii", 8, pg.SSL_REQUEST_CODE))
    assert actions.to_client == [b"N"] and actions.to_server == []


def test_simple_query_recorded_with_rows_tag_and_duration() -> None:
    """A Query becomes a query record, its response a result with rows, tag and duration."""
    s, clock = session()
    ready(s)
    actions = s.client_data(pg.query_message("select 42"))
    assert actions.to_server == [pg.query_message("select 42")]
    (query,) = records(actions, "query")
    assert query["text"] == "select 42" and query["protocol"] == "simple"
    clock.now += 0.25
    response = (msg(b"T", struct.pack("!h", 1) + b"?column?\x00" + b"\x00" * 18)
                + msg(b"D", struct.pack("!hi", 1, 2) + b"42") + msg(b"C", b"SELECT 1\x00")
                + msg(b"Z", b"I"))
    actions = s.server_data(response)
    assert actions.to_client == [response]
    (result,) = records(actions, "result")
    assert result["rows"] == 1 and result["command_tag"] == "SELECT 1"
    assert result["outcome"] == "success" and result["duration_ms"] == 250.0


def test_error_response_makes_a_failed_result() -> None:
    """A server error is recorded with its SQLSTATE and message."""
    s, _ = session()
    ready(s)
    s.client_data(pg.query_message("select * from nope"))
    actions = s.server_data(msg(b"E", b"SERROR\x00C42P01\x00Mno such table\x00\x00") + msg(b"Z", b"I"))
    (result,) = records(actions, "result")
    assert result["outcome"] == "failure"
    assert result["error"] == {"sqlstate": "42P01", "message": "no such table"}


def test_long_statement_is_truncated_but_hashed_whole() -> None:
    """Text beyond max_statement is cut; length and SHA-256 cover the whole statement."""
    s, _ = session()
    ready(s)
    sql = "select '" + "x" * 100 + "'"
    (query,) = records(s.client_data(pg.query_message(sql)), "query")
    assert query["truncated"] is True and len(query["text"]) == 32 and query["length"] == len(sql)


def test_extended_pipeline_error_marks_later_executions_not_executed() -> None:
    """In a pipeline, an error fails its Execute and the queued ones behind it until Sync."""
    s, _ = session()
    ready(s)
    parse = msg(b"P", b"\x00select 1/$1\x00" + struct.pack("!h", 0))
    bind = msg(b"B", b"\x00\x00" + struct.pack("!hhi", 0, 1, 1) + b"0" + struct.pack("!h", 0))
    execute = msg(b"E", b"\x00" + struct.pack("!i", 0))
    actions = s.client_data(parse + bind + execute + bind + execute + msg(b"S", b""))
    queries = records(actions, "query")
    assert [q["parameters"] for q in queries] == [["0"], ["0"]]
    assert all(q["text"] == "select 1/$1" and q["protocol"] == "extended" for q in queries)
    reply = (msg(b"1", b"") + msg(b"2", b"")
             + msg(b"E", b"SERROR\x00C22012\x00Mdivision by zero\x00\x00") + msg(b"Z", b"I"))
    results = records(s.server_data(reply), "result")
    assert [r["error"]["sqlstate"] for r in results] == ["22012", ""]
    assert "not executed" in results[1]["error"]["message"]


def test_a_result_answering_the_last_statement_sent_may_join_its_query_record() -> None:
    """Actions.joining names the result that answers the last statement the session sent,
    none left waiting behind it (the audit trail may store the two as one record): a lone
    Query's, an error's, the last of a pipeline's; not one with others still waiting, nor
    a blocked statement's."""
    s, _ = session()
    ready(s)
    s.client_data(pg.query_message("select 1"))
    actions = s.server_data(msg(b"C", b"SELECT 0\x00") + msg(b"Z", b"I"))
    (result,) = records(actions, "result")
    assert actions.joining is result
    s.client_data(pg.query_message("select * from nope"))
    actions = s.server_data(msg(b"E", b"SERROR\x00C42P01\x00Mno such table\x00\x00") + msg(b"Z", b"I"))
    assert actions.joining is records(actions, "result")[0]
    # Two queries in flight: the first's answer leaves the second waiting.
    s.client_data(pg.query_message("select 2") + pg.query_message("select 3"))
    first = s.server_data(msg(b"C", b"SELECT 0\x00") + msg(b"Z", b"I"))
    assert records(first, "result") and first.joining is None
    last = s.server_data(msg(b"C", b"SELECT 0\x00") + msg(b"Z", b"I"))
    assert last.joining is records(last, "result")[0]
    # A pipeline of two executions: only the last one's result may join.
    parse = msg(b"P", b"\x00select $1\x00" + struct.pack("!h", 0))
    bind = msg(b"B", b"\x00\x00" + struct.pack("!hhi", 0, 1, 1) + b"0" + struct.pack("!h", 0))
    execute = msg(b"E", b"\x00" + struct.pack("!i", 0))
    s.client_data(parse + bind + execute + bind + execute + msg(b"S", b""))
    actions = s.server_data(msg(b"1", b"") + msg(b"2", b"") + msg(b"C", b"SELECT 1\x00")
                            + msg(b"2", b"") + msg(b"C", b"SELECT 1\x00") + msg(b"Z", b"I"))
    results = records(actions, "result")
    assert len(results) == 2 and actions.joining is results[1]
    # A statement interrupted by the connection's end is answered too.
    s.client_data(pg.query_message("select pg_sleep(10)"))
    actions = s.connection_lost("client closed")
    assert actions.joining is records(actions, "result")[0]


def test_a_blocked_statements_result_does_not_join() -> None:
    """A statement the policy kept from the server has its decision recorded between its
    query and result: the result stays a record of its own."""
    from policy import load_policy

    policy = load_policy(Path(__file__).resolve().parents[2] / "packaging" / "policy.toml")
    s = PostgresSession("s1", {"service": "postgres"}, policy=lambda: policy)
    ready(s)
    s.client_data(pg.query_message("drop table accounts"))
    actions = s.server_data(msg(b"E", b"SERROR\x00C42501\x00Mblocked\x00\x00") + msg(b"Z", b"I"))
    (result,) = records(actions, "result")
    assert result["outcome"] == "blocked" and actions.joining is None


def test_garbage_startup_ends_session_with_reason() -> None:
    """A garbage startup packet ends the session with a FATAL error and a session.end reason."""
    s, _ = session()
    actions = s.client_data(b"\x80\x00\x00\x00garbage")
    assert actions.close and "invalid startup packet length" in actions.close
    (end,) = records(actions, "session.end")
    assert "invalid startup packet length" in end["reason"] and end["outcome"] == "failure"
    assert records(actions, "session.start"), "a session.start precedes every session.end"
    assert actions.to_client and actions.to_client[0].startswith(b"E")


def test_terminate_ends_session_with_counters() -> None:
    """Terminate is forwarded and session.end carries bytes and statement counts."""
    s, _ = session()
    ready(s)
    s.client_data(pg.query_message("select 1"))
    s.server_data(msg(b"C", b"SELECT 0\x00") + msg(b"Z", b"I"))
    actions = s.client_data(msg(b"X", b""))
    (end,) = records(actions, "session.end")
    assert end["statements"] == 1 and end["reason"] == "client terminated"
    assert end["bytes_from_client"] == len(STARTUP) + len(pg.query_message("select 1")) + 5
    assert end["backend_pid"] == 11


def test_a_client_gone_while_the_server_is_idle_is_terminated_for_it() -> None:
    """A client that closes without a Terminate, its session idle: the server is sent the
    Terminate, so it ends its connection as for the client's own; with anything still
    outstanding or a transaction open, nothing is sent in the client's name."""
    s, _ = session()
    ready(s)
    s.client_data(pg.query_message("select 1"))
    s.server_data(msg(b"C", b"SELECT 0\x00") + msg(b"Z", b"I"))
    actions = s.client_lost("client closed")
    assert actions.to_server == [msg(b"X", b"")] and actions.close == "client terminated"
    (end,) = records(actions, "session.end")
    assert end["reason"] == "client closed" and end["outcome"] == "success"

    def unterminated(client: bytes, server: bytes = b"") -> None:
        s, _ = session()
        ready(s)
        s.client_data(client)
        if server:
            s.server_data(server)
        actions = s.client_lost("client closed")
        assert actions.to_server == [] and actions.close is None, client
        assert records(actions, "session.end")

    unterminated(pg.query_message("select pg_sleep(10)"))  # still running
    unterminated(pg.query_message("begin"), msg(b"C", b"BEGIN\x00") + msg(b"Z", b"T"))
    unterminated(pg.query_message("select 1")[:7])  # half a message passed on
    # Before the session is ready (authentication under way) nothing is sent either.
    s, _ = session()
    s.client_data(STARTUP)
    actions = s.client_lost("client closed")
    assert actions.to_server == [] and actions.close is None


def test_connection_lost_mid_query_records_interrupted_result() -> None:
    """A statement still running when the connection drops gets a failed result."""
    s, _ = session()
    ready(s)
    s.client_data(pg.query_message("select pg_sleep(10)"))
    actions = s.connection_lost("client closed")
    (result,) = records(actions, "result")
    assert "interrupted" in result["error"]["message"]
    assert records(actions, "session.end")


def test_authentication_failure_is_the_end_reason() -> None:
    """A FATAL error during authentication becomes the session.end reason."""
    s, _ = session()
    s.client_data(STARTUP)
    s.server_data(msg(b"R", struct.pack("!i", 10) + b"SCRAM-SHA-256\x00\x00"))
    s.server_data(msg(b"E", b"SFATAL\x00C28P01\x00Mpassword authentication failed\x00\x00"))
    (end,) = records(s.connection_lost("server closed"), "session.end")
    assert end["reason"].startswith("authentication failed: password authentication failed")
    assert end["auth_method"] == "scram-sha-256"


def test_deferred_refusal_answers_the_startup_packet() -> None:
    """A refusal decided before the startup packet is sent as FATAL after it, never forwarded."""
    s, _ = session()
    s.defer_refusal("58000", "ringfence: audit trail unavailable", "audit unavailable")
    ssl = s.client_data(struct.pack("!ii", 8, pg.SSL_REQUEST_CODE))
    assert ssl.to_client == [b"N"]
    actions = s.client_data(STARTUP)
    assert actions.to_server == [] and actions.close == "audit unavailable"
    (error,) = pg.BackendScanner().feed(actions.to_client[0])
    assert isinstance(error, pg.ErrorResponse) and error.sqlstate == "58000"
    (end,) = records(actions, "session.end")
    assert end["reason"] == "audit unavailable" and end["outcome"] == "failure"


def test_a_refusal_without_sqlstate_reads_as_no_server_to_libpq() -> None:
    """The server unreachable: the FATAL carries the agent's message but no SQLSTATE field,
    which libpq's ping (pg_isready) reads as "no response", as it would directly."""
    s, _ = session()
    s.defer_refusal(None, "ringfence: cannot reach 127.0.0.1:5432: Connection refused",
                    "upstream connect failed")
    actions = s.client_data(STARTUP)
    (error,) = pg.BackendScanner().feed(actions.to_client[0])
    assert isinstance(error, pg.ErrorResponse)
    assert "C" not in error.fields and error.message.startswith("ringfence: cannot reach")
    (end,) = records(actions, "session.end")
    assert end["error"] == {"sqlstate": "", "message": error.message}


def test_close_with_a_partial_message_names_the_truncation() -> None:
    """A client that closes mid-message gets a session.end saying the message was truncated."""
    s, _ = session()
    ready(s)
    s.client_data(pg.query_message("select 1")[:7])
    (end,) = records(s.connection_lost("client closed"), "session.end")
    assert "truncated message: 7 bytes" in end["reason"] and end["outcome"] == "failure"


def test_returning_rows_are_counted_once() -> None:
    """INSERT … RETURNING: the 2 returned rows and the tag's count 2 make rows == 2, not 4."""
    s, _ = session()
    ready(s)
    s.client_data(pg.query_message("insert into t values (1), (2) returning id"))
    row = msg(b"D", struct.pack("!hi", 1, 1) + b"1")
    actions = s.server_data(msg(b"T", struct.pack("!h", 1) + b"id\x00" + b"\x00" * 18) + row + row
                            + msg(b"C", b"INSERT 0 2\x00") + msg(b"Z", b"I"))
    (result,) = records(actions, "result")
    assert result["rows"] == 2 and result["command_tag"] == "INSERT 0 2"


def test_copy_in_and_out_record_their_bytes() -> None:
    """COPY FROM STDIN and COPY TO STDOUT results carry the rows from the tag and the data bytes."""
    s, _ = session()
    ready(s)
    s.client_data(pg.query_message("copy t from stdin"))
    s.server_data(msg(b"G", b"\x00\x00\x00"))
    s.client_data(msg(b"d", b"1\tone\n") + msg(b"d", b"2\ttwo\n") + msg(b"c", b""))
    (result,) = records(s.server_data(msg(b"C", b"COPY 2\x00") + msg(b"Z", b"I")), "result")
    assert (result["rows"], result["copy_bytes"], result["command_tag"]) == (2, 12, "COPY 2")

    s.client_data(pg.query_message("copy t to stdout"))
    out = msg(b"H", b"\x00\x00\x00") + msg(b"d", b"1\tone\n") + msg(b"d", b"2\ttwo\n") + msg(b"c", b"")
    actions = s.server_data(out[:9])
    actions.records += s.server_data(out[9:] + msg(b"C", b"COPY 2\x00") + msg(b"Z", b"I")).records
    (result,) = records(actions, "result")
    assert (result["rows"], result["copy_bytes"]) == (2, 12)


def _describe_round(s: PostgresSession, name: bytes, sql: bytes, answer: bytes) -> None:
    """Parse without types, Describe the statement, Sync; the server answers with ``answer``."""
    s.client_data(msg(b"P", name + b"\x00" + sql + b"\x00" + struct.pack("!h", 0))
                  + msg(b"D", b"S" + name + b"\x00") + msg(b"S", b""))
    s.server_data(msg(b"1", b"") + answer + msg(b"Z", b"I"))


def _bind_binary_int(s: PostgresSession, name: bytes, value: int) -> list[Any]:
    bind = msg(b"B", b"\x00" + name + b"\x00" + struct.pack("!hh", 1, 1) + struct.pack("!h", 1)
               + struct.pack("!ii", 4, value) + struct.pack("!h", 0))
    (query,) = records(s.client_data(bind + msg(b"E", b"\x00" + struct.pack("!i", 0))), "query")
    parameters: list[Any] = query["parameters"]
    return parameters


def test_parameter_types_left_to_the_server_come_from_its_parameter_description() -> None:
    """asyncpg-style: Parse names no types; the answer to Describe does, so binary values decode."""
    s, _ = session()
    ready(s)
    _describe_round(s, b"a", b"select $1", msg(b"t", struct.pack("!hi", 1, 23)) + msg(b"n", b""))
    assert _bind_binary_int(s, b"a", 42) == [42]


def test_describes_skipped_after_an_error_do_not_shift_later_answers() -> None:
    """A Describe the server skipped (error earlier in its pipeline) gets no answer; the next
    statement's ParameterDescription still goes to the next statement."""
    s, _ = session()
    ready(s)
    s.client_data(msg(b"P", b"bad\x00selec $1\x00" + struct.pack("!h", 0))
                  + msg(b"D", b"Sbad\x00") + msg(b"S", b""))
    s.server_data(msg(b"E", b"SERROR\x00C42601\x00Msyntax error\x00\x00") + msg(b"Z", b"I"))
    _describe_round(s, b"b", b"select $1", msg(b"t", struct.pack("!hi", 1, 17)) + msg(b"n", b""))
    assert _bind_binary_int(s, b"b", 7) == [{"format": "binary", "type_oid": 17, "length": 4}]


def test_binary_parameters_decoded_when_simple_else_type_and_length() -> None:
    """A binary int4 parameter is recorded as its value; an unknown binary type as OID and length."""
    s, _ = session()
    ready(s)
    parse = msg(b"P", b"s\x00select $1, $2\x00" + struct.pack("!hii", 2, 23, 17))
    bind = msg(b"B", b"\x00s\x00" + struct.pack("!hh", 1, 1) + struct.pack("!h", 2)
               + struct.pack("!i", 4) + struct.pack("!i", 42) + struct.pack("!i", 3) + b"\x01\x02\x03"
               + struct.pack("!h", 0))
    actions = s.client_data(parse + bind + msg(b"E", b"\x00" + struct.pack("!i", 0)))
    (query,) = records(actions, "query")
    assert query["parameters"] == [42, {"format": "binary", "type_oid": 17, "length": 3}]


def test_a_long_cancel_key_finds_its_session() -> None:
    """Protocol 3.2 (PostgreSQL 18) cancel keys of up to 256 bytes: the session keeps the
    server's key whole, and a CancelRequest carrying it is matched to that session and
    forwarded as it came."""
    secret = bytes(range(64))
    target, _ = session()
    target.client_data(pg.startup_message({"user": "alice", "database": "shop"},
                                          pg.PROTOCOL_V3 | 2))
    target.server_data(msg(b"R", struct.pack("!i", 0)) + msg(b"K", struct.pack("!i", 11) + secret)
                       + msg(b"Z", b"I"))
    assert target.backend_key == (11, secret)
    keys = {target.backend_key: "s1"}
    canceller = PostgresSession("s2", {"service": "postgres"},
                                cancel_target=lambda pid, key: keys.get((pid, key)))
    request = struct.pack("!iii", 12 + len(secret), pg.CANCEL_REQUEST_CODE, 11) + secret
    actions = canceller.client_data(request)
    assert actions.to_server == [request]
    (start,) = records(actions, "session.start")
    assert start["cancel"] == {"backend_pid": 11, "target_session_id": "s1"}


def _portal_request(portals: list[str], executes: list[str], value: bytes) -> bytes:
    """Binds of ``portals`` (to the unnamed statement, one text parameter), Executes of
    ``executes``, then Sync."""
    binds = b"".join(msg(b"B", name.encode() + b"\x00\x00" + struct.pack("!hhi", 0, 1, len(value))
                         + value + struct.pack("!h", 0)) for name in portals)
    runs = b"".join(msg(b"E", name.encode() + b"\x00" + struct.pack("!i", 0)) for name in executes)
    return binds + runs + msg(b"S", b"")


def _sent(s: PostgresSession, data: bytes, one_step: bool) -> list[dict[str, Any]]:
    """The query records of ``data`` from the client, through the proxy's one-step path
    when it takes them (as the proxy does) or the general one."""
    if one_step:
        encoded = s.allowed_execute(data)
        if encoded is not None:
            return [msgpack.unpackb(encoded)]
    return records(s.client_data(data), "query")


@pytest.mark.parametrize("one_step", [False, True])
def test_portals_end_with_their_transaction(one_step: bool) -> None:
    """PostgreSQL drops a transaction's portals when it ends, so a session binding a new
    named portal for each statement and never closing one leaves the agent nothing to keep;
    portals of an open transaction, and those bound earlier in the same request, are still
    known, so their executions are recorded with their statement and parameters."""
    s, _ = session()
    ready(s)
    s.client_data(msg(b"P", b"\x00select $1::text\x00" + struct.pack("!h", 0)) + msg(b"S", b""))
    s.server_data(msg(b"1", b"") + msg(b"Z", b"I"))
    answer = msg(b"2", b"") + msg(b"C", b"SELECT 1\x00") + msg(b"Z", b"I")
    for i in range(2000):
        (query,) = _sent(s, _portal_request([f"p{i}"], [f"p{i}"], str(i).encode()), one_step)
        assert query["text"] == "select $1::text" and query["parameters"] == [str(i)]
        s.server_data(answer)
    assert len(s._portals) <= 2
    # Two portals bound, then run, in one request after an idle ReadyForQuery.
    both = _sent(s, _portal_request(["a", "b"], ["a", "b"], b"x"), one_step)
    assert [q["text"] for q in both] == ["select $1::text"] * 2
    s.server_data(msg(b"2", b"") * 2 + msg(b"C", b"SELECT 1\x00") * 2 + msg(b"Z", b"I"))
    # In a transaction a portal outlives its request.
    s.client_data(pg.query_message("begin"))
    s.server_data(msg(b"C", b"BEGIN\x00") + msg(b"Z", b"T"))
    _sent(s, _portal_request(["kept"], [], b"early"), one_step)
    s.server_data(msg(b"2", b"") + msg(b"Z", b"T"))
    _sent(s, _portal_request(["other"], ["other"], b"y"), one_step)
    s.server_data(answer[:-6] + msg(b"Z", b"T"))
    (later,) = _sent(s, _portal_request([], ["kept"], b""), one_step)
    assert later["text"] == "select $1::text" and later["parameters"] == ["early"]


def _limited(limit: int) -> PostgresSession:
    from policy import parse_policy

    policy = parse_policy('[defaults]\nunidentified = "allow"\n')
    s = PostgresSession("s1", {"service": "postgres"}, max_prepared=limit, policy=lambda: policy)
    ready(s)
    return s


def _ended_over_the_limit(actions: Any) -> None:
    assert actions.to_server == [] and actions.close
    (end,) = records(actions, "session.end")
    assert end["reason"] == "prepared statements over max_prepared_bytes"
    assert end["error"]["sqlstate"] == "54000"
    assert b"max_prepared_bytes" in actions.to_client[-1] and actions.to_client[-1][:1] == b"E"


def test_prepared_texts_are_bounded_per_session() -> None:
    """The texts a session keeps prepared (to record and judge their executions) are
    bounded: a Parse that would take them over max_prepared ends the session with a FATAL
    54000 and is not sent; closing a statement, or preparing another text under the same
    name, makes room."""
    s = _limited(1000)

    def parse(name: str, size: int) -> Any:
        sql = "select '" + "x" * (size - 9) + "'"
        return s.client_data(msg(b"P", name.encode() + b"\x00" + sql.encode() + b"\x00\x00\x00")
                             + msg(b"S", b""))

    assert parse("a", 600).to_server
    s.server_data(msg(b"1", b"") + msg(b"Z", b"I"))
    assert parse("a", 900).to_server  # (a replaces a)
    s.server_data(msg(b"1", b"") + msg(b"Z", b"I"))
    s.client_data(msg(b"C", b"Sa\x00") + msg(b"S", b""))
    s.server_data(msg(b"3", b"") + msg(b"Z", b"I"))
    assert parse("b", 600).to_server
    s.server_data(msg(b"1", b"") + msg(b"Z", b"I"))
    assert parse("", 900).to_server  # (the unnamed statement, replaced by each Parse, is not counted)
    s.server_data(msg(b"1", b"") + msg(b"Z", b"I"))
    _ended_over_the_limit(parse("c", 401))


def test_sql_prepare_is_bounded_too_and_deallocate_makes_room() -> None:
    """PREPARE counts as a Parse does, once the server has done it; a string whose
    PREPAREs would go over the bound ends the session before it is sent."""
    s = _limited(1024)
    text = "PREPARE p AS SELECT '" + "x" * 600 + "'"
    assert s.client_data(pg.query_message(text)).to_server
    s.server_data(msg(b"C", b"PREPARE\x00") + msg(b"Z", b"I"))
    assert s.client_data(pg.query_message("DEALLOCATE p")).to_server
    s.server_data(msg(b"C", b"DEALLOCATE\x00") + msg(b"Z", b"I"))
    assert s.client_data(pg.query_message(text)).to_server
    s.server_data(msg(b"C", b"PREPARE\x00") + msg(b"Z", b"I"))
    actions = s.client_data(pg.query_message(text.replace("PREPARE p", "PREPARE q")))
    (query,) = records(actions, "query")
    assert query["text"].startswith("PREPARE q AS")
    _ended_over_the_limit(actions)


def test_the_one_step_path_leaves_a_parse_over_the_bound_to_the_general_one() -> None:
    """A Parse, Bind, Execute, Sync of a named statement over the bound is not taken in one
    step: the general path ends the session."""
    s = _limited(1024)
    sql = ("select '" + "x" * 1100 + "'").encode()
    data = (msg(b"P", b"s1\x00" + sql + b"\x00\x00\x00") + msg(b"B", b"\x00s1\x00" + b"\x00" * 6)
            + msg(b"E", b"\x00" + struct.pack("!i", 0)) + msg(b"S", b""))
    assert s.allowed_execute(data) is None
    _ended_over_the_limit(s.client_data(data))
