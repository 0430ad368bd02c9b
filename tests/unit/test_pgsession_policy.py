"""Policy enforcement inside the PostgreSQL session: blocked statements never reach the server."""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Any

import msgpack
import pytest

from agent.pgsession import SUBSTITUTE_SQL, PostgresSession
from agent.protocols import postgres as pg
from policy import load_policy, parse_policy

REPO = Path(__file__).resolve().parents[2]
POLICY = load_policy(REPO / "packaging" / "policy.toml")


ALLOW_ALL = parse_policy('[defaults]\nunidentified = "allow"\n')
NO_WRITES = parse_policy('[defaults]\nunidentified = "allow"\n[[rule]]\nid = "no-writes"\n'
                         'effect = "block"\nclasses = ["write"]\n')


def msg(kind: bytes, body: bytes) -> bytes:
    return kind + struct.pack("!i", len(body) + 4) + body


SYNTAX_ERROR = msg(b"E", b"SERROR\x00C42601\x00Msyntax error at or near \"ringfence\"\x00\x00")
STARTUP = pg.startup_message({"user": "alice", "database": "shop"})


def ready(policy: Any = POLICY, startup: bytes = STARTUP) -> PostgresSession:
    s = PostgresSession("s1", {"service": "postgres"}, policy=lambda: policy)
    s.client_data(startup)
    s.server_data(msg(b"R", struct.pack("!i", 0)) + msg(b"Z", b"I"))
    return s


def decoded(data: bytes) -> list[pg.BackendEvent]:
    return pg.BackendScanner().feed(data)


def test_connection_decision_is_durable_before_startup_is_forwarded() -> None:
    """The connection's policy.decision is a durable record in the same step as the forward."""
    s = PostgresSession("s1", {"service": "postgres"}, policy=lambda: POLICY)
    actions = s.client_data(STARTUP)
    assert actions.to_server == [STARTUP]
    (decision,) = [r for t, r in actions.durable if t == "policy.decision"]
    assert decision["effect"] == "allow" and decision["scope"] == "connection"


def test_denied_connection_gets_28000_and_nothing_is_forwarded() -> None:
    """A policy that denies the connection answers the startup with FATAL 28000."""
    deny = parse_policy('[defaults]\nunidentified = "deny"\n')
    s = PostgresSession("s1", {"service": "postgres"}, policy=lambda: deny)
    actions = s.client_data(STARTUP)
    assert actions.to_server == [] and actions.close
    (error,) = decoded(actions.to_client[0])
    assert isinstance(error, pg.ErrorResponse) and error.sqlstate == "28000"


def test_blocked_simple_query_is_replaced_and_answered_with_42501() -> None:
    """DROP TABLE never reaches the server; the client gets 42501 naming the rule, then Z."""
    s = ready()
    actions = s.client_data(pg.query_message("DROP TABLE accounts"))
    assert actions.to_server == [pg.query_message(SUBSTITUTE_SQL)]
    assert b"accounts" not in b"".join(actions.to_server)
    (decision,) = [r for t, r in actions.durable if t == "policy.decision"]
    assert decision["effect"] == "block" and decision["rule_id"] == "block-drop"
    (query,) = [r for t, r in actions.records if t == "query"]
    assert query["text"] == "DROP TABLE accounts" and query["policy"]["effect"] == "block"

    reply = s.server_data(SYNTAX_ERROR + msg(b"Z", b"T"))
    error, z = decoded(b"".join(reply.to_client))
    assert isinstance(error, pg.ErrorResponse) and error.sqlstate == "42501"
    assert "block-drop" in error.message
    assert z == pg.ReadyForQuery("T")
    (result,) = [r for t, r in reply.records if t == "result"]
    assert result["outcome"] == "blocked"


@pytest.mark.parametrize("cut", [1, 3, 5, 8, len(SYNTAX_ERROR) - 1, len(SYNTAX_ERROR) + 2])
def test_replacement_works_across_any_chunk_split(cut: int) -> None:
    """However the server's reply is split, the client sees exactly our error and the Z."""
    s = ready()
    s.client_data(pg.query_message("TRUNCATE accounts"))
    stream = SYNTAX_ERROR + msg(b"Z", b"I")
    out = b"".join(s.server_data(stream[:cut]).to_client + s.server_data(stream[cut:]).to_client)
    error, z = decoded(out)
    assert isinstance(error, pg.ErrorResponse) and "block-truncate" in error.message
    assert z == pg.ReadyForQuery("I")


def test_pipeline_keeps_earlier_results_and_replaces_only_the_blocked_error() -> None:
    """In one extended pipeline, the allowed statement's replies pass byte for byte; the
    blocked Parse's error is ours and the server skips to Sync as it would after an error."""
    s = ready()
    ok = (msg(b"P", b"\x00select 1\x00\x00\x00") + msg(b"B", b"\x00\x00\x00\x00\x00\x00\x00\x00")
          + msg(b"E", b"\x00\x00\x00\x00\x00") + msg(b"S", b""))
    bad = (msg(b"P", b"\x00DELETE FROM accounts\x00\x00\x00")
           + msg(b"B", b"\x00\x00\x00\x00\x00\x00\x00\x00") + msg(b"E", b"\x00\x00\x00\x00\x00")
           + msg(b"S", b""))
    actions = s.client_data(ok + bad)
    sent = b"".join(actions.to_server)
    assert b"DELETE FROM accounts" not in sent and SUBSTITUTE_SQL.encode() in sent
    first = (msg(b"1", b"") + msg(b"2", b"") + msg(b"D", struct.pack("!hi", 1, 1) + b"1")
             + msg(b"C", b"SELECT 1\x00") + msg(b"Z", b"I"))
    reply = s.server_data(first + SYNTAX_ERROR + msg(b"Z", b"I"))
    out = b"".join(reply.to_client)
    assert out.startswith(first)
    error, z = decoded(out[len(first):])
    assert isinstance(error, pg.ErrorResponse) and "block-delete-without-where" in error.message
    assert z == pg.ReadyForQuery("I")
    outcomes = [r["outcome"] for t, r in reply.records if t == "result"]
    assert outcomes == ["success", "blocked"]  # (the blocked Parse's Execute is part of it)


def test_allowed_query_carries_the_rule_in_its_record() -> None:
    """An allowed statement is forwarded as it came and its query record names the decision."""
    s = ready()
    q = pg.query_message("select * from accounts where id = 1")
    actions = s.client_data(q)
    assert actions.to_server == [q] and actions.durable == []
    (query,) = [r for t, r in actions.records if t == "query"]
    assert query["policy"]["effect"] == "allow" and query["policy"]["classes"] == ["read"]


def test_server_bytes_may_go_first_except_while_a_blocked_reply_is_pending() -> None:
    """Unchanged server bytes may be relayed before they are scanned; never around a blocked error."""
    s = ready()
    assert s.relays_server_bytes
    s.client_data(pg.query_message("SELECT 1"))
    answer = msg(b"C", b"SELECT 1\x00") + msg(b"Z", b"I")
    relayed = s.server_data(answer, forwarded=True)
    assert relayed.to_client == []
    (result,) = [r for t, r in relayed.records if t == "result"]
    assert result["command_tag"] == "SELECT 1" and result["outcome"] == "success"

    s.client_data(pg.query_message("DROP TABLE accounts"))
    assert not s.relays_server_bytes
    reply = s.server_data(SYNTAX_ERROR + msg(b"Z", b"I"))
    error, _ = decoded(b"".join(reply.to_client))
    assert isinstance(error, pg.ErrorResponse) and error.sqlstate == "42501"
    assert s.relays_server_bytes


def test_a_shape_allowed_once_is_judged_again_after_a_policy_reload() -> None:
    """Statements of one shape reuse their allow in a session, until the policy changes."""
    current = [ALLOW_ALL]
    s = PostgresSession("s1", {"service": "postgres"}, policy=lambda: current[0])
    s.client_data(STARTUP)
    s.server_data(msg(b"R", struct.pack("!i", 0)) + msg(b"Z", b"I"))
    done = msg(b"C", b"DELETE 1\x00") + msg(b"Z", b"I")
    for n in (1, 2):
        actions = s.client_data(pg.query_message(f"DELETE FROM accounts WHERE id = {n}"))
        assert actions.to_server == [pg.query_message(f"DELETE FROM accounts WHERE id = {n}")]
        (query,) = [r for t, r in actions.records if t == "query"]
        assert query["policy"]["effect"] == "allow" and query["policy"]["classes"] == ["write"]
        assert query["text"] == f"DELETE FROM accounts WHERE id = {n}"
        s.server_data(done)

    current[0] = parse_policy(
        '[defaults]\nunidentified = "allow"\n'
        '[[rule]]\nid = "no-writes"\neffect = "block"\nclasses = ["write"]\n'
    )
    actions = s.client_data(pg.query_message("DELETE FROM accounts WHERE id = 3"))
    assert actions.to_server == [pg.query_message(SUBSTITUTE_SQL)]
    (decision,) = [r for t, r in actions.durable if t == "policy.decision"]
    assert decision["rule_id"] == "no-writes"


def replication_session(mode: str, policy: Any = POLICY) -> PostgresSession:
    return ready(policy, pg.startup_message({"user": "replicator", "database": "replication",
                                             "replication": mode}))


@pytest.mark.parametrize("mode", ["true", "on", "yes", "1", "database"])
def test_replication_commands_pass_on_replication_connections(mode: str) -> None:
    """pg_basebackup, standbys and logical decoding speak the walsender's own commands: on a
    replication connection they are judged as such (class replication), not as SQL that
    fails to parse, and reach the server."""
    s = replication_session(mode)
    for command, kind in [("IDENTIFY_SYSTEM", "IDENTIFY_SYSTEM"),
                          ("  base_backup ( LABEL 'nightly', CHECKPOINT 'fast' );", "BASE_BACKUP"),
                          ("START_REPLICATION SLOT \"s\" PHYSICAL 0/2000000 TIMELINE 1",
                           "START_REPLICATION")]:
        sent = pg.query_message(command)
        actions = s.client_data(sent)
        assert actions.to_server == [sent]
        (query,) = [r for t, r in actions.records if t == "query"]
        assert query["policy"]["effect"] == "allow"
        assert query["policy"]["classes"] == ["replication"]
        s.server_data(msg(b"C", kind.encode() + b"\x00") + msg(b"Z", b"I"))


def test_replication_connections_are_marked_in_the_session_record() -> None:
    s = PostgresSession("s1", {"service": "postgres"}, policy=lambda: POLICY)
    actions = s.client_data(pg.startup_message({"user": "r", "replication": "database"}))
    (start,) = [r for t, r in actions.records if t == "session.start"]
    assert start["target"]["replication"] == "logical"
    s = PostgresSession("s2", {"service": "postgres"}, policy=lambda: POLICY)
    actions = s.client_data(pg.startup_message({"user": "r", "replication": "false"}))
    (start,) = [r for t, r in actions.records if t == "session.start"]
    assert "replication" not in start["target"]


def test_sql_on_a_logical_replication_connection_is_judged_as_sql() -> None:
    """replication=database also runs SQL: a DROP there is blocked like anywhere else."""
    s = replication_session("database")
    actions = s.client_data(pg.query_message("DROP TABLE accounts"))
    assert actions.to_server == [pg.query_message(SUBSTITUTE_SQL)]


@pytest.mark.parametrize("mode", [None, "false", "off", "o"])
def test_replication_commands_elsewhere_are_unparseable_sql(mode: str | None) -> None:
    """Outside a replication connection the server would reject IDENTIFY_SYSTEM as SQL; the
    policy's unparseable default decides, as for any text PostgreSQL cannot parse."""
    parameters = {"user": "alice", "database": "shop"}
    if mode is not None:
        parameters["replication"] = mode
    s = ready(startup=pg.startup_message(parameters))
    actions = s.client_data(pg.query_message("IDENTIFY_SYSTEM"))
    assert actions.to_server == [pg.query_message(SUBSTITUTE_SQL)]
    (decision,) = [r for t, r in actions.durable if t == "policy.decision"]
    assert decision["rule_id"] == "defaults.unparseable"


def test_a_policy_can_hold_back_replication() -> None:
    """A rule on class replication keeps base backups from the server, with its reason."""
    policy = parse_policy('''
[defaults]
unidentified = "allow"
[[rule]]
id = "no-base-backups"
effect = "block"
classes = ["replication"]
kinds = ["BASE_BACKUP"]
reason = "base backups go through the backup host"
''')
    s = replication_session("true", policy)
    assert s.client_data(pg.query_message("IDENTIFY_SYSTEM")).to_server == [
        pg.query_message("IDENTIFY_SYSTEM")]
    s.server_data(msg(b"C", b"IDENTIFY_SYSTEM\x00") + msg(b"Z", b"I"))
    actions = s.client_data(pg.query_message("BASE_BACKUP (CHECKPOINT 'fast')"))
    assert actions.to_server == [pg.query_message(SUBSTITUTE_SQL)]
    (decision,) = [r for t, r in actions.durable if t == "policy.decision"]
    assert decision["rule_id"] == "no-base-backups"
    reply = s.server_data(SYNTAX_ERROR + msg(b"Z", b"I"))
    error = next(e for e in decoded(b"".join(reply.to_client)) if isinstance(e, pg.ErrorResponse))
    assert "base backups go through the backup host" in error.message


def _bound_run(statement: str, value: bytes, text: str | None = None) -> bytes:
    """An execution of ``statement`` with one text parameter, as libpq sends it: a Parse
    first when ``text`` is given (PQexecParams), else none (PQexecPrepared)."""
    parse = (msg(b"P", statement.encode() + b"\x00" + text.encode() + b"\x00\x00\x00")
             if text is not None else b"")
    bind = msg(b"B", b"\x00" + statement.encode() + b"\x00" + struct.pack("!hhi", 0, 1, len(value))
               + value + struct.pack("!h", 0))
    return parse + bind + msg(b"E", b"\x00" + struct.pack("!i", 0)) + msg(b"S", b"")


def _with_prepared(current: list[Any], name: bytes, text: str) -> PostgresSession:
    """A session under ``current[0]`` (which the test may change) with statement ``name``
    prepared as ``text``."""
    s = PostgresSession("s1", {"service": "postgres"}, policy=lambda: current[0])
    s.client_data(STARTUP)
    s.server_data(msg(b"R", struct.pack("!i", 0)) + msg(b"Z", b"I"))
    s.client_data(msg(b"P", name + b"\x00" + text.encode() + b"\x00\x00\x00") + msg(b"S", b""))
    s.server_data(msg(b"1", b"") + msg(b"Z", b"I"))
    return s


@pytest.mark.parametrize("one_step", [False, True], ids=["general", "one-step"])
def test_an_execution_is_judged_when_it_runs(one_step: bool) -> None:
    """An extended execution's query record carries the policy's verdict, as a simple
    Query's carries its own, and that verdict is taken when it runs: a statement prepared
    before a reload runs under the new policy."""
    old = ALLOW_ALL
    new = parse_policy('[defaults]\nunidentified = "allow"\n'
                       '[[rule]]\nid = "no-writes"\neffect = "block"\nclasses = ["write"]\n')
    assert old.version != new.version
    current = [old]
    text = "SELECT balance FROM accounts WHERE id = $1"
    s = _with_prepared(current, b"fetch", text)
    answer = msg(b"2", b"") + msg(b"n", b"") + msg(b"C", b"SELECT 0\x00") + msg(b"Z", b"I")

    def run(data: bytes) -> dict[str, Any]:
        if one_step:
            encoded = s.allowed_execute(data)
            assert encoded is not None
            record: dict[str, Any] = msgpack.unpackb(encoded)
        else:
            actions = s.client_data(data)
            assert b"".join(actions.to_server) == data
            (record,) = [r for t, r in actions.records if t == "query"]
        s.server_data(answer)
        assert record["text"] == text
        return record

    prepared = run(_bound_run("fetch", b"1"))
    assert prepared["policy"] == {"effect": "allow", "rule_id": "defaults.allow",
                                  "version": old.version, "classes": ["read"]}
    current[0] = new
    assert run(_bound_run("fetch", b"2"))["policy"]["version"] == new.version
    assert run(_bound_run("", b"3", text))["policy"]["version"] == new.version


@pytest.mark.parametrize("one_step", [False, True], ids=["general", "one-step"])
def test_a_statement_prepared_before_a_reload_is_blocked_when_it_runs(one_step: bool) -> None:
    """A DELETE prepared while the policy allowed it (a driver's statement cache) is kept
    from the server once a reload blocks it: the client gets 42501 naming the rule, the
    server sees a Parse that fails in its place, and the statement stays usable should the
    policy allow it again."""
    current = [ALLOW_ALL]
    text = "DELETE FROM accounts WHERE id = $1"
    s = _with_prepared(current, b"purge", text)
    current[0] = NO_WRITES
    data = _bound_run("purge", b"7")
    if one_step:
        assert s.allowed_execute(data) is None  # the general path decides
    actions = s.client_data(data)
    sent = b"".join(actions.to_server)
    execute = msg(b"E", b"\x00" + struct.pack("!i", 0))
    assert execute not in sent and b"DELETE" not in sent
    assert sent.startswith(_bound_run("purge", b"7")[:-len(execute) - 5])  # the Bind went on
    (decision,) = [r for t, r in actions.durable if t == "policy.decision"]
    assert decision["effect"] == "block" and decision["rule_id"] == "no-writes"
    (query,) = [r for t, r in actions.records if t == "query"]
    assert query["text"] == text and query["parameters"] == ["7"]
    assert query["policy"]["effect"] == "block"

    # The server: Bind done, then the substitute fails; it discards the rest until Sync.
    reply = s.server_data(msg(b"2", b"") + SYNTAX_ERROR + msg(b"Z", b"I"))
    bound, error, z = decoded(b"".join(reply.to_client))
    assert bound == pg.BindComplete()
    assert isinstance(error, pg.ErrorResponse) and error.sqlstate == "42501"
    assert "no-writes" in error.message
    assert z == pg.ReadyForQuery("I")
    (result,) = [r for t, r in reply.records if t == "result"]
    assert result["outcome"] == "blocked"
    assert not s._pending and s.relays_server_bytes

    current[0] = ALLOW_ALL
    again = s.client_data(_bound_run("purge", b"8"))
    assert b"".join(again.to_server) == _bound_run("purge", b"8")


def test_a_statement_prepared_in_sql_before_a_reload_is_blocked_when_it_runs() -> None:
    """PREPARE ... AS DELETE while the policy allowed it, then a reload that blocks writes:
    EXECUTE of it is judged as what it runs, kept from the server with the rule named; in
    the simple and the extended protocol, and with the text's shape already allowed.
    EXECUTE of a read still runs, and DEALLOCATE (also within one string) forgets."""
    current = [ALLOW_ALL]
    s = PostgresSession("s1", {"service": "postgres"}, policy=lambda: current[0])
    s.client_data(STARTUP)
    s.server_data(msg(b"R", struct.pack("!i", 0)) + msg(b"Z", b"I"))

    def query(sql: str, *tags: str) -> str:
        """``sql`` sent; when it reaches the server, answered with ``tags`` (or SELECT 1)."""
        data = pg.query_message(sql)
        answer = b"".join(msg(b"C", t.encode() + b"\x00") for t in tags or ["SELECT 1"])
        if s.allowed_query(data) is not None:
            s.server_data(answer + msg(b"Z", b"I"))
            return "sent"
        actions = s.client_data(data)
        if b"".join(actions.to_server) == data:
            s.server_data(answer + msg(b"Z", b"I"))
            return "sent"
        (decision,) = [r for t, r in actions.durable if t == "policy.decision"]
        assert decision["rule_id"] == "no-writes"
        reply = s.server_data(SYNTAX_ERROR + msg(b"Z", b"I"))
        error, _ = decoded(b"".join(reply.to_client))
        assert isinstance(error, pg.ErrorResponse) and error.sqlstate == "42501"
        return "blocked"

    assert query("PREPARE purge (int) AS DELETE FROM accounts WHERE id = $1", "PREPARE") == "sent"
    assert query("PREPARE one AS SELECT 1", "PREPARE") == "sent"
    assert [query("EXECUTE purge(1)"), query("EXECUTE purge(2)")] == ["sent", "sent"]
    current[0] = NO_WRITES
    assert [query("EXECUTE purge(3)"), query("EXECUTE Purge(4)")] == ["blocked", "blocked"]
    assert query("EXECUTE one") == "sent"
    extended = _bound_run("", b"5", "EXECUTE purge(5)")
    assert s.allowed_execute(extended) is None
    actions = s.client_data(extended)
    assert b"purge" not in b"".join(actions.to_server)
    assert [r["effect"] for t, r in actions.durable if t == "policy.decision"] == ["block"]
    s.server_data(SYNTAX_ERROR + msg(b"Z", b"I"))
    assert query("DEALLOCATE ALL; PREPARE purge AS SELECT 2; EXECUTE purge",
                 "DEALLOCATE ALL", "PREPARE", "SELECT 1") == "sent"
    assert query("EXECUTE purge") == "sent"
    assert query("PREPARE purge2 AS DELETE FROM accounts") == "blocked"


def _prepare_in_sql(s: PostgresSession, sql: str) -> None:
    """``sql``, a PREPARE, sent as a simple Query and done by the server."""
    s.client_data(pg.query_message(sql))
    s.server_data(msg(b"C", b"PREPARE\x00") + msg(b"Z", b"I"))


@pytest.mark.parametrize(("request_", "refusal"), [
    # The name is in use: the server keeps the DELETE.
    ("PREPARE purge AS SELECT 1", b"C42P05\x00Mprepared statement \"purge\" already exists"),
    # In an aborted transaction the server ignores it: the DELETE stays.
    ("DEALLOCATE purge", b"C25P02\x00Mcurrent transaction is aborted"),
    ("DISCARD ALL", b"C25P02\x00Mcurrent transaction is aborted"),
], ids=["prepare-in-use", "deallocate-aborted", "discard-aborted"])
def test_a_prepare_or_deallocate_the_server_refuses_changes_nothing(
    request_: str, refusal: bytes,
) -> None:
    """What a PREPARE or DEALLOCATE does counts once the server has done it: one it refuses
    leaves the statement as it was, so after a reload that blocks writes the DELETE still
    prepared under that name is blocked when EXECUTEd."""
    current = [ALLOW_ALL]
    s = _with_prepared(current, b"other", "SELECT 1")
    _prepare_in_sql(s, "PREPARE purge AS DELETE FROM accounts WHERE id = 1")
    sent = s.client_data(pg.query_message(request_)).to_server
    assert sent == [pg.query_message(request_)]
    s.server_data(msg(b"E", b"SERROR\x00" + refusal + b"\x00\x00") + msg(b"Z", b"E"))
    current[0] = NO_WRITES
    actions = s.client_data(pg.query_message("EXECUTE purge"))
    assert actions.to_server == [pg.query_message(SUBSTITUTE_SQL)]
    (decision,) = [r for t, r in actions.durable if t == "policy.decision"]
    assert decision["rule_id"] == "no-writes"


def _close(name: bytes) -> bytes:
    return msg(b"C", b"S" + name + b"\x00")


@pytest.mark.parametrize("trick", ["close-skipped", "parse-refused"])
def test_a_parse_or_close_the_server_skips_leaves_what_the_name_may_run(trick: str) -> None:
    """A named Parse or Close changes the session's statements when sent, and an error before
    it in its request makes the server skip it (or a Parse of a name in use fails): the text
    the name held stays judged with it, so after a reload that blocks writes the DELETE the
    server still holds under that name is blocked, by Bind and Execute and by SQL's EXECUTE.
    A request that succeeds in changing the name ends the doubt."""
    current = [ALLOW_ALL]
    s = _with_prepared(current, b"purge", "DELETE FROM accounts WHERE id = $1")
    refused = msg(b"E", b"SERROR\x00C26000\x00Mno such statement\x00\x00")
    if trick == "close-skipped":
        bind = msg(b"B", b"\x00nosuch\x00" + struct.pack("!hhh", 0, 0, 0))
        sent = s.client_data(bind + _close(b"purge") + msg(b"S", b"")).to_server
        assert b"".join(sent).endswith(_close(b"purge") + msg(b"S", b""))
    else:
        refused = msg(b"E", b"SERROR\x00C42P05\x00Mprepared statement exists\x00\x00")
        s.client_data(_parse(b"purge", b"SELECT 1") + msg(b"S", b""))
    s.server_data(refused + msg(b"Z", b"I"))
    current[0] = NO_WRITES

    run = _bound_run("purge", b"7")
    assert s.allowed_execute(run) is None
    actions = s.client_data(run)
    assert msg(b"E", b"\x00" + struct.pack("!i", 0)) not in b"".join(actions.to_server)
    assert [r["rule_id"] for t, r in actions.durable if t == "policy.decision"] == ["no-writes"]
    s.server_data(msg(b"2", b"") + SYNTAX_ERROR + msg(b"Z", b"I"))
    actions = s.client_data(pg.query_message("EXECUTE purge(7)"))
    assert actions.to_server == [pg.query_message(SUBSTITUTE_SQL)]
    s.server_data(SYNTAX_ERROR + msg(b"Z", b"I"))

    # A Close the server does (CloseComplete, no error): the name holds nothing any more.
    s.client_data(_close(b"purge") + msg(b"S", b""))
    s.server_data(msg(b"3", b"") + msg(b"Z", b"I"))
    assert b"".join(s.client_data(run).to_server) == run
    assert not s._maybe and not s._touched


def test_sql_and_the_protocol_share_prepared_statement_names_under_a_reload() -> None:
    """The server keeps one namespace for Parse's named statements and SQL's PREPARE: a
    DELETE prepared by a driver (Parse) and run by SQL's EXECUTE, or prepared in SQL and run
    by Bind and Execute, is judged as what it runs once a reload blocks writes."""
    current = [ALLOW_ALL]
    s = _with_prepared(current, b"bydriver", "DELETE FROM accounts WHERE id = $1")
    _prepare_in_sql(s, "PREPARE bysql AS DELETE FROM accounts WHERE id = 1")
    current[0] = NO_WRITES

    actions = s.client_data(pg.query_message("EXECUTE bydriver(7)"))
    assert actions.to_server == [pg.query_message(SUBSTITUTE_SQL)]
    (decision,) = [r for t, r in actions.durable if t == "policy.decision"]
    assert decision["rule_id"] == "no-writes"
    s.server_data(SYNTAX_ERROR + msg(b"Z", b"I"))

    data = _bound_run("bysql", b"7")
    assert s.allowed_execute(data) is None
    actions = s.client_data(data)
    assert msg(b"E", b"\x00" + struct.pack("!i", 0)) not in b"".join(actions.to_server)
    (query,) = [r for t, r in actions.records if t == "query"]
    assert query["text"].startswith("PREPARE bysql AS DELETE")
    assert query["policy"]["effect"] == "block"
    s.server_data(msg(b"2", b"") + SYNTAX_ERROR + msg(b"Z", b"I"))

    # SQL's DEALLOCATE drops a driver's statement too: its EXECUTE is the server's to refuse.
    s.client_data(pg.query_message("DEALLOCATE bydriver"))
    s.server_data(msg(b"C", b"DEALLOCATE\x00") + msg(b"Z", b"I"))
    assert s.client_data(pg.query_message("EXECUTE bydriver(7)")).to_server == [
        pg.query_message("EXECUTE bydriver(7)")]


@pytest.mark.parametrize("texts", [
    {"a": "EXECUTE b", "b": "EXECUTE a"},
    {**{f"s{n}": f"EXECUTE s{n + 1}" for n in range(19)}, "s19": "SELECT 1"},
], ids=["cycle", "twenty deep"])
def test_executes_through_prepared_executes_end_as_unparseable(texts: dict[str, str]) -> None:
    """A Parse may prepare an EXECUTE of another statement: a cycle of them, or a chain deeper
    than the session follows, is judged as text the policy cannot analyse (blocked by
    default, the rule named) instead of exhausting the agent's stack; the session goes on."""
    s = ready()
    for name, text in texts.items():
        s.client_data(_parse(name.encode(), text.encode()) + msg(b"S", b""))
        s.server_data(msg(b"1", b"") + msg(b"Z", b"I"))
    first = next(iter(texts))
    actions = s.client_data(pg.query_message(f"EXECUTE {first}"))
    assert actions.to_server == [pg.query_message(SUBSTITUTE_SQL)]
    (decision,) = [r for t, r in actions.durable if t == "policy.decision"]
    assert decision["rule_id"] == "defaults.unparseable"
    assert "nested too deep" in decision["reason"]
    s.server_data(SYNTAX_ERROR + msg(b"Z", b"I"))
    assert s.client_data(pg.query_message("SELECT 1")).to_server == [pg.query_message("SELECT 1")]
    if "s15" in texts:  # within the depth the session follows, the chain's end decides
        sent = s.client_data(pg.query_message("EXECUTE s15")).to_server
        assert sent == [pg.query_message("EXECUTE s15")]


def _parse(name: bytes, sql: bytes) -> bytes:
    return msg(b"P", name + b"\x00" + sql + b"\x00\x00\x00")


@pytest.mark.parametrize("name", [b"", b"purge"], ids=["unnamed", "named"])
def test_a_blocked_parse_and_its_execution_are_one_statement_in_the_trail(name: bytes) -> None:
    """PQexecParams of a blocked DELETE (Parse, Bind, Execute, Sync) is recorded once: one
    query record with the statement's text and one result, blocked; the Bind and Execute
    the server skips after the substitute's error add nothing. A later request that runs
    the statement the blocked Parse never made is recorded as its own (failed) attempt."""
    s = ready()
    bind = msg(b"B", b"\x00" + name + b"\x00" + struct.pack("!hhh", 0, 0, 0))
    execute = msg(b"E", b"\x00" + struct.pack("!i", 0))
    sync = msg(b"S", b"")
    actions = s.client_data(_parse(name, b"DELETE FROM accounts") + bind + execute + sync)
    assert b"DELETE" not in b"".join(actions.to_server)
    assert [r["text"] for t, r in actions.records if t == "query"] == ["DELETE FROM accounts"]
    reply = s.server_data(SYNTAX_ERROR + msg(b"Z", b"I"))
    assert [r["outcome"] for t, r in reply.records if t == "result"] == ["blocked"]
    assert not s._pending and s.statements == 1

    # After the Sync the same Bind and Execute are a new request: the server refuses it.
    again = s.client_data(bind + execute + sync)
    assert b"".join(again.to_server) == bind + execute + sync
    (query,) = [r for t, r in again.records if t == "query"]
    assert query["text"] == ""
    refused = msg(b"E", b"SERROR\x00C26000\x00Mprepared statement does not exist\x00\x00")
    answered = s.server_data(refused + msg(b"Z", b"I"))
    (result,) = [r for t, r in answered.records if t == "result"]
    assert result["outcome"] == "failure" and result["error"]["sqlstate"] == "26000"
    assert not s._pending and s.relays_server_bytes


@pytest.mark.parametrize("piece", [None, 1, 7], ids=["whole", "bytewise", "sevens"])
def test_blocked_statements_skipped_by_the_server_keep_the_session_in_sync(piece: int | None) -> None:
    """After an error the server skips the rest of a pipeline up to Sync, a blocked
    statement's substitute with it, so no error of its own comes for it: the client still
    gets the server's error and ReadyForQuery, the statement is recorded as blocked, and the
    session relays the next answers as usual."""
    division = msg(b"E", b"SERROR\x00C22012\x00Mdivision by zero\x00\x00")
    bind = msg(b"B", b"\x00a\x00" + struct.pack("!hhh", 0, 0, 0))
    execute = msg(b"E", b"\x00" + struct.pack("!i", 0))
    cases = [
        # A failing execution, then a blocked Parse: the client sees the server's error.
        (_parse(b"a", b"SELECT 1/0") + bind + execute + _parse(b"b", b"DROP TABLE y"),
         msg(b"1", b"") + msg(b"2", b"") + division + msg(b"Z", b"I"), "22012",
         ["failure", "blocked"]),
        # Two blocked Parses: the first one's error is the policy's, the second is skipped.
        (_parse(b"a", b"DROP TABLE x") + _parse(b"b", b"DROP TABLE y"),
         SYNTAX_ERROR + msg(b"Z", b"I"), "42501", ["blocked", "blocked"]),
    ]
    for request, answer, sqlstate, outcomes in cases:
        s = ready()
        s.client_data(request + msg(b"S", b""))
        out: list[bytes] = []
        records: list[dict[str, Any]] = []
        step = piece or len(answer)
        for i in range(0, len(answer), step):
            actions = s.server_data(answer[i:i + step])
            out += actions.to_client
            records += [r for t, r in actions.records if t == "result"]
        *_, error, z = decoded(b"".join(out))
        assert isinstance(error, pg.ErrorResponse) and error.sqlstate == sqlstate
        assert z == pg.ReadyForQuery("I")
        assert [r["outcome"] for r in records] == outcomes
        assert not s._pending and s.relays_server_bytes

        s.client_data(pg.query_message("SELECT 1"))
        answered = msg(b"C", b"SELECT 1\x00") + msg(b"Z", b"I")
        after = s.server_data(answered)
        assert b"".join(after.to_client) == answered
        (result,) = [r for t, r in after.records if t == "result"]
        assert result["outcome"] == "success"
