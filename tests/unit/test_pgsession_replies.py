"""The session reads common server replies in place; it must record exactly what the scanner's
events would have made it record, at any split of the stream and for broken streams too."""

from __future__ import annotations

import struct
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from agent.pgsession import Actions, PostgresSession
from agent.protocols import postgres as pg
from tests.support.fuzz import examples


def msg(kind: bytes, body: bytes) -> bytes:
    return kind + struct.pack("!i", len(body) + 4) + body


STARTUP = pg.startup_message({"user": "alice", "database": "shop"})
AUTH_OK = msg(b"R", struct.pack("!i", 0)) + msg(b"K", struct.pack("!ii", 11, 22)) + msg(b"Z", b"I")

# What clients send: simple queries, and extended-protocol pipelines up to Sync.
CLIENT_MESSAGES = [
    pg.query_message("select 1"),
    pg.query_message("insert into t values (1); select 2"),
    msg(b"P", b"s1\x00select $1\x00" + struct.pack("!h", 0))
    + msg(b"B", b"\x00s1\x00" + struct.pack("!hhi", 0, 1, 1) + b"7" + struct.pack("!h", 0))
    + msg(b"E", b"\x00" + struct.pack("!i", 0)),
    msg(b"E", b"\x00" + struct.pack("!i", 5)),
    msg(b"S", b""),
]

# What servers answer (in any order here: both readings must agree even on nonsense).
SERVER_MESSAGES = [
    msg(b"T", struct.pack("!h", 1) + b"a\x00" + b"\x00" * 18),
    msg(b"D", struct.pack("!hi", 1, 1) + b"1"),
    msg(b"D", struct.pack("!hi", 1, 3) + b"abc"),
    msg(b"C", b"SELECT 2\x00"),
    msg(b"C", b"INSERT 0 1\x00"),
    msg(b"C", b"BEGIN\x00"),
    msg(b"Z", b"I"),
    msg(b"Z", b"T"),
    msg(b"Z", b"E"),
    msg(b"1", b""),
    msg(b"2", b""),
    msg(b"n", b""),
    msg(b"s", b""),
    msg(b"I", b""),
    msg(b"E", b"SERROR\x00C42P01\x00Mno such table\x00\x00"),
    msg(b"N", b"SNOTICE\x00C00000\x00Mhello\x00\x00"),
    msg(b"S", b"TimeZone\x00UTC\x00"),
    msg(b"t", struct.pack("!hI", 1, 23)),
    msg(b"A", struct.pack("!i", 7) + b"chan\x00payload\x00"),
    msg(b"H", struct.pack("!bh", 0, 0)) + msg(b"d", b"1\n") + msg(b"c", b""),
    # Not what a server sends, but what a broken or hostile one might.
    msg(b"C", b"SELECT 1"),  # no NUL
    msg(b"Z", b"IX"),  # long status
    msg(b"T", b""),  # too short
    b"D\x00\x00\x00\x02",  # invalid length
    b"\x00\x00\x00\x00\x05",  # unknown type
]


class Clock:
    now = 100.0

    def __call__(self) -> float:
        return self.now


def new_session(in_place: bool) -> PostgresSession:
    s = PostgresSession("s1", {"service": "postgres"}, clock=Clock(), max_message=4096)
    if not in_place:
        s._scan_replies = lambda data, actions: 0  # type: ignore[method-assign]
    s.client_data(STARTUP)
    s.server_data(AUTH_OK)
    return s


def outcome(actions: Actions) -> tuple[Any, ...]:
    return (actions.records, b"".join(actions.to_client), b"".join(actions.to_server),
            actions.close)


def state(s: PostgresSession) -> tuple[Any, ...]:
    return (s.transaction, s.phase, s.ended, s.bytes_from_server, s._segments_done,
            s.backend._rows, s.backend._row_bytes,
            [(p.kind, p.rows, p.command_rows, p.commands, p.error, p.copy_bytes)
             for p in s._pending])


@given(st.data())
@settings(max_examples=examples(400), deadline=None)
def test_replies_read_in_place_record_what_the_scanner_would(data: st.DataObject) -> None:
    """Random client requests and server replies, split anywhere and interleaved: both ways of
    reading give the same records, the same bytes each way and the same session state. A
    broken server stream ends both sessions with the same error to the client."""
    client = data.draw(st.lists(st.sampled_from(CLIENT_MESSAGES), max_size=6))
    replies = data.draw(st.lists(st.sampled_from(SERVER_MESSAGES[:-5]), max_size=25))
    broken = data.draw(st.lists(st.sampled_from(SERVER_MESSAGES[-5:]), max_size=1))
    stream = b"".join(replies + broken)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=6)))
    chunks = [stream[a:b] for a, b in zip([0, *cuts], [*cuts, len(stream)], strict=True) if b > a]
    forwarded = data.draw(st.booleans())
    # Each side's items in their own order, the two sides interleaved as drawn.
    sides = data.draw(st.permutations(["c"] * len(client) + ["s"] * len(chunks)))
    client_items, server_items = iter(client), iter(chunks)
    sessions = [new_session(True), new_session(False)]
    for side in sides:
        payload = next(client_items) if side == "c" else next(server_items)
        if sessions[0].ended or sessions[1].ended:
            assert sessions[0].ended and sessions[1].ended
            break
        results = [
            outcome(s.client_data(payload) if side == "c"
                    else s.server_data(payload, forwarded=forwarded))
            for s in sessions
        ]
        if results[0][3] is not None or results[1][3] is not None:
            # Ended by a broken message: the same reason, and the same bytes to the client.
            # (Read in place, statements answered earlier in that chunk keep their results.)
            assert results[0][1:] == results[1][1:]
            assert broken
            break
        assert results[0] == results[1]
        assert state(sessions[0]) == state(sessions[1])
    if not broken:
        assert not sessions[0].ended


def test_a_run_of_rows_ends_at_any_other_message_as_in_the_scanner() -> None:
    """Rows, a ParseComplete, then a row cut by the chunk's end: the first run is counted
    where the scanner counts it, whatever comes after (a case found by the test above)."""
    row = SERVER_MESSAGES[1]
    stream = row + msg(b"1", b"") + row + SERVER_MESSAGES[3] + SERVER_MESSAGES[6]
    in_place, scanner = new_session(True), new_session(False)
    for s in (in_place, scanner):
        s.client_data(pg.query_message("select 1"))
    for chunk in (stream[:22], stream[22:]):
        assert outcome(in_place.server_data(chunk)) == outcome(scanner.server_data(chunk))
        assert state(in_place) == state(scanner)


def test_a_whole_reply_is_read_without_the_scanner() -> None:
    """A query's whole answer in one chunk is recorded from the bytes in place."""
    s = new_session(True)
    s.client_data(pg.query_message("select 1"))
    reply = (SERVER_MESSAGES[0] + SERVER_MESSAGES[1] + SERVER_MESSAGES[2] + SERVER_MESSAGES[3]
             + SERVER_MESSAGES[6])
    s.backend.feed = None  # type: ignore[assignment,method-assign]
    actions = s.server_data(reply)
    assert actions.to_client == [reply]
    (result,) = [r for t, r in actions.records if t == "result"]
    assert result["rows"] == 2 and result["command_tag"] == "SELECT 2"
    assert result["outcome"] == "success"


def test_a_bad_message_after_answered_statements_keeps_their_results() -> None:
    """A server error in mid-chunk ends the session; what was answered before it is recorded."""
    s = new_session(True)
    s.client_data(pg.query_message("select 1"))
    s.client_data(pg.query_message("select 2"))
    answer = SERVER_MESSAGES[1] + SERVER_MESSAGES[3] + SERVER_MESSAGES[6]
    actions = s.server_data(answer + b"\x00\x00\x00\x00\x05")
    results = [r for t, r in actions.records if t == "result"]
    assert [r["outcome"] for r in results] == ["success", "failure"]
    assert results[1]["error"]["message"].startswith("interrupted: server protocol error")
    assert actions.close is not None
    assert b"".join(actions.to_client).startswith(b"E")  # the FATAL error, not the bad bytes
