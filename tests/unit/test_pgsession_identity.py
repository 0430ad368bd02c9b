"""The session's login flow when the agent verifies a token and logs in upstream itself."""

from __future__ import annotations

import struct
from types import SimpleNamespace
from typing import Any

from agent.pgsession import PostgresSession
from agent.protocols import pgauth
from agent.protocols import postgres as pg


def msg(kind: bytes, body: bytes) -> bytes:
    return kind + struct.pack("!i", len(body) + 4) + body


STARTUP = pg.startup_message({"user": "alice", "database": "shop"})


def identity(**kw: Any) -> Any:
    base = dict(ask_for_token=False, refusal=None, subject=None, groups=(), token=None,
                service_account=None, findings=(), identified=False,
                actor=SimpleNamespace(kind="human"))
    base.update(kw)
    return SimpleNamespace(to_record=lambda: {"subject": base["subject"]}, **base)


def test_token_as_password_then_agent_logs_in_upstream_with_md5() -> None:
    """The client is asked for a cleartext password (its token); the server sees the mapped
    user and the agent's md5 answer; the client sees only AuthenticationOk and what follows."""
    s = PostgresSession("s1", {"service": "postgres"})
    s.identity = identity(ask_for_token=True)
    s.upstream_auth = pgauth.UpstreamAuth("app", "s3cret", "auto")
    s.upstream_user = "app"
    actions = s.client_data(STARTUP)
    assert actions.to_server == [] and actions.to_client == [pgauth.authentication_cleartext_password()]
    actions = s.client_data(msg(b"p", b"eyJ.token.sig\x00"))
    assert actions.verify_token == "eyJ.token.sig" and actions.to_server == []

    actions = s.identity_resolved(identity(subject="alice@example.com", identified=True))
    (startup,) = actions.to_server
    (event,) = pg.FrontendParser().feed(startup)
    assert isinstance(event, pg.StartupMessage)
    assert event.user == "app" and event.database == "shop"
    start = next(r for t, r in actions.records if t == "session.start")
    assert start["identity"] == {"subject": "alice@example.com"}
    assert start["target"]["user"] == "app" and start["target"]["client_user"] == "alice"

    salt = b"\x01\x02\x03\x04"
    actions = s.server_data(msg(b"R", struct.pack("!i", 5) + salt))
    assert actions.to_client == []
    assert actions.to_server == [pgauth.password_message(pgauth.md5_password("app", "s3cret", salt))]
    assert b"eyJ" not in b"".join(actions.to_server)

    tail = msg(b"S", b"server_version\x0015\x00") + msg(b"K", struct.pack("!ii", 7, 8)) + msg(b"Z", b"I")
    actions = s.server_data(msg(b"R", struct.pack("!i", 0)) + tail)
    assert b"".join(actions.to_client) == pgauth.authentication_ok() + tail
    assert s.phase == "ready" and s.backend_key == (7, b"\x00\x00\x00\x08")


def test_refused_token_answers_with_its_sqlstate_and_ends_the_session() -> None:
    """A refused identity gets a FATAL error with the resolver's SQLSTATE and message."""
    s = PostgresSession("s1", {"service": "postgres"})
    s.identity = identity(ask_for_token=True)
    s.client_data(STARTUP)
    s.client_data(msg(b"p", b"garbage\x00"))
    refused = identity(refusal=("28P01", "ringfence: the password is not a token"))
    actions = s.identity_resolved(refused)
    assert actions.close and actions.to_server == []
    (error,) = pg.BackendScanner().feed(actions.to_client[0])
    assert isinstance(error, pg.ErrorResponse)
    assert (error.sqlstate, error.message) == ("28P01", "ringfence: the password is not a token")
    end = next(r for t, r in actions.records if t == "session.end")
    assert end["reason"].startswith("identity refused")
