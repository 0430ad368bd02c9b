"""Protocol messages a raw client meets through the agent exactly as directly: the server's
NegotiateProtocolVersion for a newer minor version or a ``_pq_`` option, and ParameterStatus
when a setting the client tracks changes."""

from __future__ import annotations

import socket
import struct
from pathlib import Path

from agent.protocols import postgres as pg
from tests.integration.clients.conftest import Host, app_name, wait_sessions
from tests.support.netns import call_in
from tests.support.pgwire import frames, until_ready

PROTOCOL_V3_1 = pg.PROTOCOL_V3 | 1


Conversation = tuple[list[tuple[bytes, bytes]], ...]


def converse(address: str | tuple[str, int], parameters: dict[str, str], statements: list[str],
             protocol: int = pg.PROTOCOL_V3) -> Conversation:
    """Log in, run each statement, end: the server's messages up to ReadyForQuery after the
    login, then those answering each statement."""
    family = socket.AF_UNIX if isinstance(address, str) else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.settimeout(20)
        sock.connect(address)
        sock.sendall(pg.startup_message({"user": "postgres", "database": "postgres", **parameters},
                                        protocol))
        replies = [frames(until_ready(sock))]
        for sql in statements:
            sock.sendall(pg.query_message(sql))
            replies.append(frames(until_ready(sock)))
        sock.sendall(pg.frontend_message(b"X", b""))
    return tuple(replies)


def both_ways(pghost: Host, app: str, statements: list[str], protocol: int = pg.PROTOCOL_V3,
              options: dict[str, str] | None = None) -> tuple[Conversation, Conversation]:
    """The same conversation through the agent and directly (the server's Unix socket, which the
    agent never sees)."""
    parameters = {"application_name": app, **(options or {})}
    through = call_in(pghost.ns, lambda: converse(
        ("127.0.0.1", 5432), parameters, statements, protocol))
    direct = call_in(pghost.ns, lambda: converse(
        str(Path(pghost.server.sockdir) / ".s.PGSQL.5432"), parameters, statements, protocol))
    return through, direct


def test_negotiate_protocol_version_passes(pghost: Host) -> None:
    """Protocol 3.1 with an unknown `_pq_` option: the server downgrades, the client goes on."""
    app = app_name("negotiate")
    (login, answer), (direct_login, direct_answer) = both_ways(
        pghost, app, ["select 6 * 7"], protocol=PROTOCOL_V3_1,
        options={"_pq_.ringfence_probe": "on"})
    # NegotiateProtocolVersion: the newest version the server speaks (3.0), the option it did
    # not recognize; byte for byte what the client gets directly.
    negotiation = [body for kind, body in login if kind == b"v"]
    assert negotiation == [struct.pack("!ii", pg.PROTOCOL_V3, 1) + b"_pq_.ringfence_probe\x00"]
    assert negotiation == [body for kind, body in direct_login if kind == b"v"]
    # The rest of the conversation as directly (key data and parameter values aside).
    assert [kind for kind, _ in login] == [kind for kind, _ in direct_login]
    assert answer == direct_answer
    records = wait_sessions(pghost.agent, app)[0]
    query = next(r for r in records if r["type"] == "query")
    result = next(r for r in records if r["type"] == "result")
    assert query["text"] == "select 6 * 7"
    assert (result["outcome"], result["rows"], result["command_tag"]) == ("success", 1, "SELECT 1")


def test_parameter_status_changes_pass(pghost: Host) -> None:
    """SET of a reported setting: the server's ParameterStatus reaches the client as directly."""
    app = app_name("parameters")
    statements = ["set application_name = 'renamed'", "set timezone = 'Asia/Tokyo'",
                  "reset all"]
    (_, *answers), (_, *direct_answers) = both_ways(pghost, app, statements)
    assert answers == direct_answers
    reported = [body for answer in answers for kind, body in answer if kind == b"S"]
    assert b"application_name\x00renamed\x00" in reported
    assert b"TimeZone\x00Asia/Tokyo\x00" in reported
    records = wait_sessions(pghost.agent, app)[0]
    results = [r for r in records if r["type"] == "result"]
    assert [r["command_tag"] for r in results] == ["SET", "SET", "RESET"]
