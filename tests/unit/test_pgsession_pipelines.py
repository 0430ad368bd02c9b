"""Pipelines mixing statements that run, fail and are blocked, against a model of the server.

The server model follows PostgreSQL's extended protocol: each message answered in order,
the first error makes it skip everything up to the next Sync, each Sync answered with
ReadyForQuery. Whatever the mix and however the answers are cut into chunks, the client
must see exactly the server's answers with only the blocked substitute's error replaced
by the policy's, every statement recorded once with its outcome, and the session left
relaying the next answers as they come.
"""

from __future__ import annotations

import struct
from typing import Any

import msgpack
from hypothesis import example, given, settings
from hypothesis import strategies as st

from agent.pgsession import SUBSTITUTE_SQL, PostgresSession
from agent.protocols import postgres as pg
from policy import parse_policy
from tests.support.fuzz import examples

ALLOW_ALL = parse_policy('[defaults]\nunidentified = "allow"\n')
NO_DELETES = parse_policy('[defaults]\nunidentified = "allow"\n[[rule]]\nid = "no-deletes"\n'
                          'effect = "block"\nclasses = ["write"]\n')
PREPARED_DELETE = "DELETE FROM t WHERE id = $1"  # prepared as "w" while deletes are allowed
TEXTS = {"runs": "SELECT 1", "fails": "SELECT 1/0", "blocked": "DELETE FROM t WHERE id = 2"}


def msg(kind: bytes, body: bytes) -> bytes:
    return kind + struct.pack("!i", len(body) + 4) + body


def parse(name: str, sql: str) -> bytes:
    return msg(b"P", name.encode() + b"\x00" + sql.encode() + b"\x00\x00\x00")


def bind(statement: str) -> bytes:
    return msg(b"B", b"\x00" + statement.encode() + b"\x00" + struct.pack("!hhh", 0, 0, 0))


EXECUTE = msg(b"E", b"\x00" + struct.pack("!i", 0))
SYNC = msg(b"S", b"")


class Server:
    """PostgreSQL's answers to frontend messages, as far as these pipelines need."""

    def __init__(self) -> None:
        self.parser = pg.FrontendParser()
        self.parser.startup_done()
        self.statements = {"w": PREPARED_DELETE}
        self.portal: str | None = None
        self.skipping = False
        self.answers: list[tuple[bytes, str | None]] = []  # (message, SQLSTATE of an error)

    def receive(self, data: bytes) -> bytes:
        out = b""
        for event in self.parser.feed(data):
            out += self._answer(event)
        return out

    def _error(self, sqlstate: str) -> bytes:
        self.skipping = True
        return self._say(msg(b"E", b"SERROR\x00C" + sqlstate.encode() + b"\x00Mno\x00\x00"),
                         sqlstate)

    def _say(self, message: bytes, sqlstate: str | None = None) -> bytes:
        self.answers.append((message, sqlstate))
        return message

    def _answer(self, event: Any) -> bytes:
        if isinstance(event, pg.Sync):
            self.skipping = False
            return self._say(msg(b"Z", b"I"))
        if self.skipping:
            return b""
        if isinstance(event, pg.Parse):
            if event.statement == "":
                self.statements.pop("", None)  # dropped before the new text is parsed
            if event.sql == SUBSTITUTE_SQL:
                return self._error("42601")
            self.statements[event.statement] = event.sql
            return self._say(msg(b"1", b""))
        if isinstance(event, pg.Bind):
            if event.statement not in self.statements:
                return self._error("26000")
            self.portal = self.statements[event.statement]
            return self._say(msg(b"2", b""))
        if isinstance(event, pg.Execute):
            if self.portal is None:
                return self._error("34000")
            if "1/0" in self.portal:
                return self._error("22012")
            tag = b"DELETE 1" if self.portal.startswith("DELETE") else b"SELECT 1"
            return self._say(msg(b"C", tag + b"\x00"))
        raise AssertionError(f"unexpected message {event!r}")


def request(item: str) -> bytes:
    """The client's messages for one item of a pipeline."""
    if item == "sync":
        return SYNC
    if item == "prepared":  # the DELETE prepared before the policy blocked it
        return bind("w") + EXECUTE
    return parse("", TEXTS[item]) + bind("") + EXECUTE


items = st.lists(st.sampled_from(["runs", "fails", "blocked", "prepared", "sync"]),
                 min_size=1, max_size=12)


def from_client(s: PostgresSession, data: bytes, one_step: bool) -> tuple[bytes, list[Any], int]:
    """``data`` from the client as the proxy takes it: what goes to the server, the query
    records, and the decisions written durably."""
    if one_step:
        record = (s.allowed_query(data) if data[:1] == b"Q" else s.allowed_execute(data))
        if record is not None:
            return data, [msgpack.unpackb(record)], 0
    actions = s.client_data(data)
    return (b"".join(actions.to_server), [r for t, r in actions.records if t == "query"],
            sum(1 for t, _ in actions.durable if t == "policy.decision"))


def from_server(s: PostgresSession, data: bytes, one_step: bool) -> tuple[bytes, list[Any]]:
    """``data`` from the server as the proxy takes it: what goes to the client, and the
    result records."""
    if one_step and s.relays_server_bytes:
        record = s.plain_reply(data)
        if record is not None:
            return data, [msgpack.unpackb(record)]
        actions = s.server_data(data, forwarded=True)
        assert not actions.to_client
        return data, [r for t, r in actions.records if t == "result"]
    actions = s.server_data(data)
    return b"".join(actions.to_client), [r for t, r in actions.records if t == "result"]


@given(items, st.lists(st.integers(1, 40), min_size=1, max_size=30), st.booleans(),
       st.booleans())
@settings(max_examples=examples(800), deadline=None)
# Two blocked statements in a pipeline, the answer cut inside the first ReadyForQuery.
@example(["blocked", "blocked", "sync", "blocked"], [28], False, False)
# A failure before a blocked statement: no error of the blocked statement's own comes.
@example(["fails", "blocked"], [1], True, True)
def test_pipelines_of_run_failed_and_blocked_statements(
    pipeline: list[str], cuts: list[int], one_chunk: bool, one_step: bool,
) -> None:
    """Also with the one-step paths taken where they apply, as the proxy takes them."""
    current = [ALLOW_ALL]
    s = PostgresSession("s1", {"service": "postgres"}, policy=lambda: current[0])
    s.client_data(pg.startup_message({"user": "alice", "database": "shop"}))
    s.server_data(msg(b"R", struct.pack("!i", 0)) + msg(b"Z", b"I"))
    s.client_data(parse("w", PREPARED_DELETE) + SYNC)
    s.server_data(msg(b"1", b"") + msg(b"Z", b"I"))
    current[0] = NO_DELETES
    server = Server()

    pipeline = [*pipeline, "sync"]
    sent = b""
    queries: list[dict[str, Any]] = []
    blocked = 0
    # Sent as a driver does: each statement on its own, with the Sync after it if one follows.
    requests: list[tuple[str, bytes]] = []
    for item in pipeline:
        if item == "sync" and requests and not requests[-1][1].endswith(SYNC):
            requests[-1] = (requests[-1][0], requests[-1][1] + SYNC)
        else:
            requests.append((item, request(item)))
    for item, data in requests:
        to_server, records, decisions = from_client(s, data, one_step)
        sent += to_server
        queries += records
        blocked += decisions
        # Each request is recorded once, by the text it sent (a blocked Parse's Bind and
        # Execute belong to it), never by an earlier statement's.
        text = PREPARED_DELETE if item == "prepared" else TEXTS.get(item)
        assert [r["text"] for r in records] == ([] if text is None else [text])
    assert blocked == sum(item in ("blocked", "prepared") for item in pipeline)
    assert b"DELETE" not in sent, "a blocked statement reached the server"
    answer = server.receive(sent)

    seen = b""
    results: list[dict[str, Any]] = []
    at = 0
    for size in ([len(answer)] if one_chunk else [*cuts, len(answer)]):
        if at >= len(answer):
            break
        to_client, records = from_server(s, answer[at:at + size], one_step)
        at += size
        seen += to_client
        results += records
    if at < len(answer):
        to_client, records = from_server(s, answer[at:], one_step)
        seen += to_client
        results += records

    # The client sees the server's answers, the substitute's error replaced by the policy's.
    expected = [(message[:1], "42501" if sqlstate == "42601" else sqlstate)
                for message, sqlstate in server.answers]
    events = pg.BackendScanner().feed(seen)
    kinds: list[tuple[bytes, str | None]] = []
    for event in events:
        if isinstance(event, pg.ErrorResponse):
            kinds.append((b"E", event.sqlstate))
        elif isinstance(event, pg.ReadyForQuery):
            kinds.append((b"Z", None))
        elif isinstance(event, pg.CommandComplete):
            kinds.append((b"C", None))
    assert kinds == [(k, code) for k, code in expected if k in (b"E", b"Z", b"C")]
    assert seen.count(b"Z\x00\x00\x00\x05I") == pipeline.count("sync")

    # Every statement recorded once, with what became of it.
    assert len(results) == len(queries)
    assert all(r["outcome"] in ("success", "failure", "blocked") for r in results)
    assert sum(r["outcome"] == "blocked" for r in results) == blocked
    assert not s._pending and s.relays_server_bytes

    # And the session goes on as usual.
    s.client_data(pg.query_message("SELECT 1"))
    after = s.server_data(msg(b"C", b"SELECT 1\x00") + msg(b"Z", b"I"))
    assert b"".join(after.to_client) == msg(b"C", b"SELECT 1\x00") + msg(b"Z", b"I")
