"""The PostgreSQL sans-IO parsers, fed byte strings as they come off the wire."""

from __future__ import annotations

import contextlib
import struct
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.protocols import postgres as pg
from tests.support.fuzz import examples


def msg(kind: bytes, body: bytes) -> bytes:
    return kind + struct.pack("!i", len(body) + 4) + body


STARTUP = pg.startup_message({"user": "alice", "database": "shop", "application_name": "psql"})


def test_startup_message_parameters() -> None:
    """A StartupMessage yields its user, database and raw bytes unchanged."""
    events = pg.FrontendParser().feed(STARTUP)
    assert len(events) == 1
    event = events[0]
    assert isinstance(event, pg.StartupMessage)
    assert (event.user, event.database) == ("alice", "shop")
    assert event.parameters["application_name"] == "psql"
    assert event.raw == STARTUP


def test_database_defaults_to_user() -> None:
    """Without a database parameter the server uses the user name, and so does the record."""
    event = pg.FrontendParser().feed(pg.startup_message({"user": "bob"}))[0]
    assert isinstance(event, pg.StartupMessage)
    assert event.database == "bob"


def test_ssl_then_startup_then_query() -> None:
    """SSLRequest comes alone, then the StartupMessage, then typed messages."""
    parser = pg.FrontendParser()
    ssl = struct.pack("!ii", 8, pg.SSL_REQUEST_CODE)
    assert isinstance(parser.feed(ssl)[0], pg.SSLRequest)
    events = parser.feed(STARTUP + pg.query_message("select 42"))
    assert isinstance(events[0], pg.StartupMessage)
    assert isinstance(events[1], pg.Query) and events[1].sql == "select 42"


def test_gssenc_and_cancel_requests() -> None:
    """GSSENCRequest and CancelRequest are recognised by their codes."""
    assert isinstance(pg.FrontendParser().feed(struct.pack("!ii", 8, pg.GSSENC_REQUEST_CODE))[0],
                      pg.GSSENCRequest)
    cancel = pg.FrontendParser().feed(struct.pack("!iiii", 16, pg.CANCEL_REQUEST_CODE, 4242, 99))[0]
    assert isinstance(cancel, pg.CancelRequest)
    assert (cancel.backend_pid, cancel.secret) == (4242, struct.pack("!i", 99))



def test_cancel_keys_of_protocol_3_2_are_kept_whole() -> None:
    """From protocol 3.2 (PostgreSQL 18) the server picks a cancel key of up to 256 bytes: the
    BackendKeyData and the CancelRequest carry it whole, and a longer one is refused."""
    secret = bytes(range(32))
    key = pg.BackendScanner().feed(b"K" + struct.pack("!ii", 8 + len(secret), 4242) + secret)
    assert key == [pg.BackendKeyData(4242, secret)]
    request = struct.pack("!iii", 12 + len(secret), pg.CANCEL_REQUEST_CODE, 4242) + secret
    (cancel,) = pg.FrontendParser().feed(request)
    assert isinstance(cancel, pg.CancelRequest)
    assert (cancel.backend_pid, cancel.secret, cancel.raw) == (4242, secret, request)
    too_long = struct.pack("!iii", 12 + 257, pg.CANCEL_REQUEST_CODE, 4242) + bytes(257)
    with pytest.raises(pg.ClientProtocolError):
        pg.FrontendParser().feed(too_long)

@pytest.mark.parametrize(
    "data, reason",
    [
        (struct.pack("!i", 2**31 - 1), "invalid startup packet length"),
        (b"\x80\x00\x00\x00", "invalid startup packet length"),
        (struct.pack("!i", 4) + b"abcd", "invalid startup packet length"),
        (struct.pack("!ii", 8, 12345), "unsupported startup request code"),
        (b"GET / HTTP/1.1\r\n\r\n", "invalid startup packet length"),
    ],
)
def test_bad_startup_packets_are_rejected(data: bytes, reason: str) -> None:
    """Garbage or absurd startup packets raise a client-side error naming the problem."""
    with pytest.raises(pg.ClientProtocolError, match=reason):
        pg.FrontendParser().feed(data)


def test_huge_declared_length_fails_before_the_body_arrives() -> None:
    """A typed message declaring 2^31-1 bytes fails at once; nothing is buffered for it."""
    parser = pg.FrontendParser(max_message=1 << 20)
    parser.feed(STARTUP)
    with pytest.raises(pg.ClientProtocolError, match="exceeds the limit"):
        parser.feed(b"Q" + struct.pack("!i", 2**31 - 1))


def test_unknown_frontend_type_is_rejected() -> None:
    """An unknown message type after startup is a client protocol error."""
    parser = pg.FrontendParser()
    parser.feed(STARTUP)
    with pytest.raises(pg.ClientProtocolError, match="unknown frontend message type"):
        parser.feed(msg(b"z", b""))


def test_truncated_message_waits_for_more() -> None:
    """A partial message yields nothing until its last byte arrives."""
    parser = pg.FrontendParser()
    parser.feed(STARTUP)
    q = pg.query_message("select 1")
    assert parser.feed(q[:3]) == []
    assert parser.feed(q[3:-1]) == []
    (event,) = parser.feed(q[-1:])
    assert isinstance(event, pg.Query) and event.raw == q


def test_extended_protocol_messages() -> None:
    """Parse, Bind, Describe, Execute, Close and Sync decode their fields."""
    parse = msg(b"P", b"s1\x00select $1::int\x00" + struct.pack("!hi", 1, 23))
    bind = msg(
        b"B",
        b"p1\x00s1\x00" + struct.pack("!hh", 1, 0) + struct.pack("!hi", 1, 2) + b"42"
        + struct.pack("!h", 0),
    )
    describe = msg(b"D", b"Pp1\x00")
    execute = msg(b"E", b"p1\x00" + struct.pack("!i", 10))
    close = msg(b"C", b"Ss1\x00")
    sync = msg(b"S", b"")
    parser = pg.FrontendParser()
    parser.feed(STARTUP)
    events = parser.feed(parse + bind + describe + execute + close + sync)
    p, b, d, e, c, s = events
    assert isinstance(p, pg.Parse) and (p.statement, p.sql, p.parameter_types) == (
        "s1", "select $1::int", (23,))
    assert isinstance(b, pg.Bind) and b.parameters == (b"42",) and b.statement == "s1"
    assert isinstance(d, pg.Describe) and (d.kind, d.name) == ("P", "p1")
    assert isinstance(e, pg.Execute) and (e.portal, e.max_rows) == ("p1", 10)
    assert isinstance(c, pg.Close) and (c.kind, c.name) == ("S", "s1")
    assert isinstance(s, pg.Sync)
    assert b"".join(ev.raw for ev in events) == parse + bind + describe + execute + close + sync


def test_bind_with_lying_lengths_is_rejected() -> None:
    """A Bind whose parameter length runs past the message is a protocol error, not a crash."""
    parser = pg.FrontendParser()
    parser.feed(STARTUP)
    bad = msg(b"B", b"\x00\x00" + struct.pack("!hh", 0, 1) + struct.pack("!i", 1000) + b"xx")
    with pytest.raises(pg.ClientProtocolError):
        parser.feed(bad)


# ---------------------------------------------------------------- backend


def server_stream(rows: int = 3) -> bytes:
    out = msg(b"R", struct.pack("!i", 0))
    out += msg(b"S", b"server_version\x0015.1\x00")
    out += msg(b"K", struct.pack("!ii", 777, 888))
    out += msg(b"Z", b"I")
    out += msg(b"T", struct.pack("!h", 1) + b"x\x00" + b"\x00" * 18)
    for i in range(rows):
        value = str(i).encode()
        out += msg(b"D", struct.pack("!hi", 1, len(value)) + value)
    out += msg(b"C", f"SELECT {rows}\x00".encode())
    out += msg(b"E", b"SERROR\x00C42P01\x00Mrelation does not exist\x00\x00")
    out += msg(b"Z", b"E")
    return out


def feed_in_pieces(
    feed: Callable[[bytes], list[Any]], stream: bytes, data: st.DataObject, pieces: int
) -> list[Any]:
    """Feed ``stream`` cut at up to ``pieces`` points Hypothesis draws; returns all events."""
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=pieces)))
    events: list[Any] = []
    last = 0
    for cut in [*cuts, len(stream)]:
        events += feed(stream[last:cut])
        last = cut
    return events


def summarize(events: list[pg.BackendEvent]) -> list[object]:
    """Merge DataRows events so differently chunked feeds compare equal."""
    out: list[object] = []
    for e in events:
        if isinstance(e, pg.DataRows) and out and isinstance(out[-1], pg.DataRows):
            prev = out.pop()
            assert isinstance(prev, pg.DataRows)
            e = pg.DataRows(prev.count + e.count, prev.size + e.size)
        out.append(e)
    return out


def test_backend_scanner_decodes_what_a_record_needs() -> None:
    """Auth, parameters, key data, rows, tag, error and transaction status are reported."""
    events = pg.BackendScanner().feed(server_stream(3))
    assert events == [
        pg.AuthenticationRequest(0, b""),
        pg.ParameterStatus("server_version", "15.1"),
        pg.BackendKeyData(777, struct.pack("!i", 888)),
        pg.ReadyForQuery("I"),
        pg.RowDescription(1),
        pg.DataRows(3, 3 * (1 + 4 + 6 + 1)),
        pg.CommandComplete("SELECT 3"),
        pg.ErrorResponse({"S": "ERROR", "C": "42P01", "M": "relation does not exist"}),
        pg.ReadyForQuery("E"),
    ]


@given(st.data())
@settings(max_examples=examples(200), deadline=None)
def test_backend_scanner_is_independent_of_chunking(data: st.DataObject) -> None:
    """Any split of the server stream yields the same events as feeding it whole."""
    stream = server_stream(data.draw(st.integers(0, 20)))
    events = feed_in_pieces(pg.BackendScanner().feed, stream, data, 12)
    assert summarize(events) == summarize(pg.BackendScanner().feed(stream))


def test_backend_scanner_never_holds_a_large_data_row() -> None:
    """A 10 MB DataRow fed in 64 KiB chunks is counted without being buffered."""
    big = msg(b"D", struct.pack("!hi", 1, 10_000_000) + b"x" * 10_000_000) + msg(b"C", b"SELECT 1\x00")
    scanner = pg.BackendScanner(max_message=1 << 20)
    events: list[pg.BackendEvent] = []
    for i in range(0, len(big), 65536):
        events += scanner.feed(big[i : i + 65536])
        assert scanner._body is None or len(scanner._body) < 1024
    assert summarize(events) == [pg.DataRows(1, len(big) - 14), pg.CommandComplete("SELECT 1")]


def test_frontend_passes_a_large_copy_data_on_in_pieces() -> None:
    """A 10 MB CopyData (over max_message) fed in 64 KiB chunks goes on as it arrives: never
    buffered, its pieces rebuild it, their sizes add up to its data, and the next message is
    framed as usual."""
    data = b"x" * 10_000_000
    stream = msg(b"d", data) + msg(b"c", b"")
    parser = pg.FrontendParser(max_message=1 << 20)
    parser.startup_done()
    events: list[pg.FrontendEvent] = []
    for i in range(0, len(stream), 65536):
        events += parser.feed(stream[i : i + 65536])
        assert parser.buffered < 64
    pieces = [e for e in events if isinstance(e, pg.CopyData)]
    assert b"".join(e.raw for e in events) == stream
    assert sum(e.size for e in pieces) == len(data) and len(pieces) > 100
    assert isinstance(events[-1], pg.CopyDone)
    with pytest.raises(pg.ClientProtocolError, match="max_message_bytes"):
        parser.feed(msg(b"Q", b"x" * (2 << 20)))


def _bind(portal: str, statement: str, formats: list[int], values: list[bytes | None],
          results: list[int]) -> bytes:
    body = portal.encode() + b"\x00" + statement.encode() + b"\x00"
    body += struct.pack(f"!h{len(formats)}h", len(formats), *formats)
    body += struct.pack("!h", len(values))
    for value in values:
        body += struct.pack("!i", -1) if value is None else struct.pack("!i", len(value)) + value
    return msg(b"B", body + struct.pack(f"!h{len(results)}h", len(results), *results))


_names = st.text(alphabet="abc_1", max_size=6)
_binds = st.builds(
    _bind, _names, _names, st.lists(st.sampled_from([0, 1]), max_size=3),
    st.lists(st.one_of(st.none(), st.binary(max_size=90)), max_size=6),
    st.lists(st.sampled_from([0, 1]), max_size=3),
)


@given(st.lists(_binds, min_size=1, max_size=3), st.data())
@settings(max_examples=examples(400), deadline=None)
def test_a_bind_over_max_message_passes_in_pieces_at_any_split(
    binds: list[bytes], data: st.DataObject
) -> None:
    """A Bind larger than max_message is passed on as it comes (its pieces rebuild it) and
    then decoded from what was kept: the same fields as whole, each value's first bytes
    (at most ``keep``) and its real length; what follows is framed as usual."""
    stream = b"".join(binds) + msg(b"S", b"")
    whole = pg.FrontendParser()
    whole.startup_done()
    expected = [e for e in whole.feed(stream) if isinstance(e, pg.Bind)]
    parser = pg.FrontendParser(max_message=120, keep=16)
    parser.startup_done()
    events = feed_in_pieces(parser.feed, stream, data, 40)
    assert b"".join(e.raw for e in events) == stream
    assert parser.buffered == 0 and isinstance(events[-1], pg.Sync)
    got = [e for e in events if isinstance(e, pg.Bind)]
    assert len(got) == len(expected)
    for bind, full, raw in zip(got, expected, binds, strict=True):
        assert (bind.portal, bind.statement, bind.parameter_formats, bind.result_formats) == (
            full.portal, full.statement, full.parameter_formats, full.result_formats)
        if len(raw) - 1 <= 120:  # not over max_message: framed whole, as ever
            assert bind == full
            continue
        assert bind.raw == b"" and bind.parameter_lengths == tuple(
            -1 if v is None else len(v) for v in full.parameters)
        for value, full_value in zip(bind.parameters, full.parameters, strict=True):
            if full_value is None:
                assert value is None
            else:
                assert value is not None and len(value) <= 16 and full_value.startswith(value)


def test_a_large_bind_keeps_little_and_its_errors_are_protocol_errors() -> None:
    """A 10 MB bytea Bind (over max_message) fed in 64 KiB chunks: nothing of it is held
    beyond ``keep`` bytes of its value; a Bind ending inside a field is a protocol error."""
    value = b"\x01" * 10_000_000
    stream = _bind("", "s1", [1], [value, b"42"], [1])
    parser = pg.FrontendParser(max_message=1 << 20, keep=64)
    parser.startup_done()
    events: list[pg.FrontendEvent] = []
    for i in range(0, len(stream), 65536):
        events += parser.feed(stream[i : i + 65536])
    bind = events[-1]
    assert isinstance(bind, pg.Bind) and bind.parameter_lengths == (10_000_000, 2)
    assert bind.parameters == (value[:64], b"42") and b"".join(e.raw for e in events) == stream
    # Its body ends inside the first value.
    cut = msg(b"B", stream[5:-1 - 4 - 2 - 2 - 2][:-3])
    parser = pg.FrontendParser(max_message=1 << 20)
    parser.startup_done()
    with pytest.raises(pg.ClientProtocolError, match="ends inside a Bind field"):
        for i in range(0, len(cut), 65536):
            parser.feed(cut[i : i + 65536])


@given(st.binary(max_size=300), st.data())
@settings(max_examples=examples(300), deadline=None)
def test_a_function_call_over_max_message_passes_in_pieces_at_any_split(
    argument: bytes, data: st.DataObject
) -> None:
    """A FunctionCall larger than max_message (lo_write of a large buffer) is one event naming
    its function, then pieces; they rebuild it, and what follows is framed as usual."""
    call = msg(b"F", struct.pack("!ihhhi", 955, 1, 1, 1, len(argument)) + argument
               + struct.pack("!h", 1))
    stream = call + msg(b"S", b"")
    parser = pg.FrontendParser(max_message=64)
    parser.startup_done()
    events = feed_in_pieces(parser.feed, stream, data, 40)
    assert b"".join(e.raw for e in events) == stream
    calls = [e for e in events if isinstance(e, pg.FunctionCall)]
    assert [c.function_oid for c in calls] == [955]
    assert all(isinstance(e, pg.MessagePiece) for e in events[1:-1])
    assert isinstance(events[-1], pg.Sync) and parser.buffered == 0
    if len(call) - 1 > 64:  # passed on in pieces: a call cut short counts what came of it
        cut = pg.FrontendParser(max_message=64)
        cut.startup_done()
        cut.feed(call[:-1])
        assert cut.buffered == len(call) - 1


def test_backend_garbage_is_a_server_error() -> None:
    """Bytes that are not backend messages raise a server-side protocol error."""
    with pytest.raises(pg.ServerProtocolError):
        pg.BackendScanner().feed(b"\x00\x01\x02\x03\x04\x05")


def frontend_stream() -> bytes:
    parse = msg(b"P", b"\x00select $1\x00" + struct.pack("!h", 0))
    bind = msg(b"B", b"\x00\x00" + struct.pack("!hhi", 0, 1, 1) + b"7" + struct.pack("!h", 0))
    return (
        STARTUP
        + msg(b"p", b"secret\x00")
        + pg.query_message("select 1; select 2")
        + parse + bind + msg(b"E", b"\x00" + struct.pack("!i", 0)) + msg(b"S", b"")
        + msg(b"d", b"1\t2\n") + msg(b"c", b"") + msg(b"X", b"")
    )


@given(st.data())
@settings(max_examples=examples(300), deadline=None)
def test_frontend_frames_are_identical_to_the_input_at_any_split(data: st.DataObject) -> None:
    """Split anywhere, the parser returns the same frames, and their bytes rebuild the input."""
    stream = frontend_stream()
    parser = pg.FrontendParser()
    events = feed_in_pieces(parser.feed, stream, data, 20)
    assert b"".join(e.raw for e in events) == stream
    assert parser.buffered == 0


@given(st.binary(max_size=300), st.integers(0, 299), st.binary(min_size=1, max_size=8))
@settings(max_examples=examples(500), deadline=None)
def test_mutated_streams_never_escape_as_other_exceptions(
    noise: bytes, position: int, patch: bytes
) -> None:
    """Mutated or random bytes either parse or raise ProtocolError; buffers stay bounded."""
    stream = bytearray(frontend_stream())
    position %= len(stream)
    stream[position : position + len(patch)] = patch
    for candidate in (bytes(stream), noise):
        parser = pg.FrontendParser(max_message=4096)
        with contextlib.suppress(pg.ProtocolError):
            parser.feed(candidate)
        assert parser.buffered <= max(len(candidate), 4096 + 5)
        scanner = pg.BackendScanner(max_message=4096)
        with contextlib.suppress(pg.ProtocolError):
            scanner.feed(candidate)
        assert scanner._body is None or len(scanner._body) <= 4096


def test_error_response_writer_round_trips() -> None:
    """The agent's own ErrorResponse decodes like a server's."""
    raw = pg.error_response("ERROR", "42501", "blocked", hint="ask")
    (event,) = pg.BackendScanner().feed(raw)
    assert isinstance(event, pg.ErrorResponse)
    assert (event.severity, event.sqlstate, event.message) == ("ERROR", "42501", "blocked")
    assert event.fields["H"] == "ask"
    assert pg.ready_for_query("T") == b"Z\x00\x00\x00\x05T"


def test_backend_scanner_reports_message_end_offsets() -> None:
    """Each event comes with the offset just past its message, so a chunk can be cut there."""
    stream = server_stream(2)
    scanner = pg.BackendScanner()
    events = scanner.feed(stream)
    assert len(scanner.ends) == len(events)
    assert scanner.ends[-1] == len(stream)
    error_index = next(i for i, e in enumerate(events) if isinstance(e, pg.ErrorResponse))
    start = scanner.ends[error_index - 1]
    (only,) = pg.BackendScanner().feed(stream[start : scanner.ends[error_index]])
    assert isinstance(only, pg.ErrorResponse) and only.sqlstate == "42P01"
