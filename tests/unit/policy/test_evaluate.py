"""Evaluation semantics: deny wins, first match per effect kind, defaults."""

from __future__ import annotations

from datetime import UTC, datetime

from policy import Resource, Subject, parse_policy
from policy.classify import Classifier

PG = Resource("postgres", database="app")
ALICE = Subject(subject="alice", groups=("dba",), actor="human", identified=True)
BOB = Subject(subject="bob", groups=("eng",), actor="human", identified=True)
BOT = Subject(service_account="ci", actor="automation", identified=True)
LOCAL = Subject(unix_user="carol", uid=1001)
MONDAY_NOON = datetime(2024, 5, 6, 12, 0, tzinfo=UTC)
SUNDAY_NIGHT = datetime(2024, 5, 5, 23, 0, tzinfo=UTC)

BASE = """
[subjects.dbas]
groups = ["dba"]
[subjects.engineers]
groups = ["eng"]
[subjects.everyone]
[subjects.bots]
actors = ["automation"]
[subjects.local]
identified = false
unix_users = ["carol"]
[resources.app]
services = ["postgres"]
databases = ["app"]
"""


def policy(rules: str, defaults: str = ""):  # type: ignore[no-untyped-def]
    return parse_policy(BASE + defaults + rules, source="t.toml")


def test_unidentified_denied_by_default() -> None:
    """Without [defaults] an unidentified client is denied, even by a catch-all allow."""
    p = policy('[[rule]]\nid = "all"\neffect = "allow"\n')
    d = p.connection(LOCAL, PG, MONDAY_NOON)
    assert (d.effect, d.rule_id) == ("deny", "defaults.unidentified")


def test_unidentified_admitted_by_explicit_rule() -> None:
    """A rule whose subject set says identified = false admits an unidentified client."""
    p = policy('[[rule]]\nid = "local"\neffect = "allow"\nsubjects = ["local"]\n')
    assert p.connection(LOCAL, PG, MONDAY_NOON).rule_id == "local"


def test_unidentified_allow_default() -> None:
    """[defaults] unidentified = "allow" lets unidentified clients in when nothing denies."""
    p = policy("", '[defaults]\nunidentified = "allow"\n')
    d = p.connection(LOCAL, PG, MONDAY_NOON)
    assert (d.effect, d.rule_id) == ("allow", "defaults.unidentified")


def test_identified_without_rule_is_denied() -> None:
    """An identified subject no rule allows is denied."""
    p = policy('[[rule]]\nid = "dba"\neffect = "allow"\nsubjects = ["dbas"]\n')
    assert p.connection(BOB, PG, MONDAY_NOON).rule_id == "defaults.no_rule"
    assert p.connection(ALICE, PG, MONDAY_NOON).allowed


def test_deny_wins_over_an_earlier_allow() -> None:
    """A later deny beats an earlier allow."""
    p = policy(
        '[[rule]]\nid = "all"\neffect = "allow"\n'
        '[[rule]]\nid = "no-bots"\neffect = "deny"\nsubjects = ["bots"]\n'
    )
    assert p.connection(BOT, PG, MONDAY_NOON).rule_id == "no-bots"
    assert p.connection(ALICE, PG, MONDAY_NOON).rule_id == "all"


def test_connection_approval() -> None:
    """require_approval without statement conditions holds the connection."""
    p = policy(
        '[[rule]]\nid = "all"\neffect = "allow"\n'
        '[[rule]]\nid = "jit"\neffect = "require_approval"\nsubjects = ["engineers"]\n'
    )
    assert p.connection(BOB, PG, MONDAY_NOON).effect == "require_approval"


def test_first_block_wins_and_unless_makes_exceptions() -> None:
    """The first matching block decides; unless exempts subjects."""
    p = policy(
        '[[rule]]\nid = "all"\neffect = "allow"\n'
        '[[rule]]\nid = "no-drop"\neffect = "block"\nflags = ["drop"]\nreason = "no"\n'
        '[rule.unless]\nsubjects = ["dbas"]\n'
        '[[rule]]\nid = "no-ddl"\neffect = "block"\nclasses = ["ddl"]\n'
    )
    bob = p.statement(BOB, PG, "DROP TABLE t", MONDAY_NOON)
    assert (bob.effect, bob.rule_id, bob.message) == (
        "block",
        "no-drop",
        "ringfence: statement blocked by policy rule no-drop: no",
    )
    assert p.statement(ALICE, PG, "DROP TABLE t", MONDAY_NOON).rule_id == "no-ddl"
    assert p.statement(ALICE, PG, "SELECT 1", MONDAY_NOON).allowed


def test_block_wins_over_approval_in_any_order() -> None:
    """A matching block beats a require_approval that comes first."""
    p = policy(
        '[[rule]]\nid = "all"\neffect = "allow"\n'
        '[[rule]]\nid = "ask"\neffect = "require_approval"\nclasses = ["write"]\n'
        '[[rule]]\nid = "no-truncate"\neffect = "block"\nflags = ["truncate"]\n'
    )
    assert p.statement(BOB, PG, "TRUNCATE t", MONDAY_NOON).rule_id == "no-truncate"
    d = p.statement(BOB, PG, "INSERT INTO t VALUES (1)", MONDAY_NOON)
    assert (d.effect, d.rule_id) == ("require_approval", "ask")


def test_any_blocked_statement_blocks_the_string() -> None:
    """Every statement of a chain is checked and one block blocks the whole string."""
    p = policy(
        '[[rule]]\nid = "all"\neffect = "allow"\n[[rule]]\nid = "b"\neffect = "block"\nflags = ["drop"]\n'
    )
    d = p.statement(BOB, PG, "SELECT 1; SELECT 2; DROP TABLE t", MONDAY_NOON)
    assert d.blocked and [v.effect for v in d.verdicts] == ["allow", "allow", "block"]


def test_unparseable_blocked_by_default_and_allowed_when_configured() -> None:
    """Unparseable text follows [defaults] unparseable, block when absent."""
    rules = '[[rule]]\nid = "all"\neffect = "allow"\n'
    assert policy(rules).statement(BOB, PG, "DROPP x", MONDAY_NOON).rule_id == "defaults.unparseable"
    p = policy(rules, '[defaults]\nunparseable = "allow"\n')
    assert p.statement(BOB, PG, "DROPP x", MONDAY_NOON).allowed


def test_denied_connection_blocks_statements() -> None:
    """Statements of a subject the policy now denies are blocked."""
    p = policy('[[rule]]\nid = "no-bots"\neffect = "deny"\nsubjects = ["bots"]\n')
    d = p.statement(BOT, PG, "SELECT 1", MONDAY_NOON)
    assert d.blocked and d.rule_id == "no-bots"


def test_record_and_mask_take_the_first_match() -> None:
    """record and mask come from the first matching rule of their kind, in file order."""
    p = policy(
        '[[rule]]\nid = "all"\neffect = "allow"\n'
        '[[rule]]\nid = "payroll-results"\neffect = "record"\nlevel = "statements+results"\n'
        'objects = ["payroll.*"]\n'
        '[[rule]]\nid = "meta"\neffect = "record"\nlevel = "metadata"\n'
        '[[rule]]\nid = "m1"\neffect = "mask"\ncolumns = ["ssn"]\nobjects = ["payroll.*"]\n'
        '[[rule]]\nid = "m2"\neffect = "mask"\ndetectors = ["email"]\n'
    )
    conn = p.connection(BOB, PG, MONDAY_NOON)
    assert (conn.record, conn.record_rule_id) == ("metadata", "meta")
    assert conn.mask is not None and conn.mask.rule_id == "m2"
    d = p.statement(BOB, PG, "SELECT * FROM payroll.salaries", MONDAY_NOON)
    assert d.record == "statements+results" and d.mask is not None and d.mask.columns == ("ssn",)
    d = p.statement(BOB, PG, "SELECT * FROM salaries", MONDAY_NOON)
    assert d.record == "statements+results", "an unqualified name may resolve into payroll"
    assert p.statement(BOB, PG, "SELECT 1", MONDAY_NOON).record == "metadata"


def test_time_window_with_zone() -> None:
    """A time window matches by weekday and hours in its time zone."""
    p = policy(
        '[[rule]]\nid = "all"\neffect = "allow"\n'
        '[[rule]]\nid = "off-hours"\neffect = "block"\nclasses = ["write", "ddl"]\n'
        '[rule.unless]\ntime = { days = ["mon-fri"], hours = "08:00-18:00", timezone = "Europe/Berlin" }\n'
    )
    assert p.statement(BOB, PG, "DELETE FROM t WHERE id = 1", MONDAY_NOON).allowed
    assert p.statement(BOB, PG, "DELETE FROM t WHERE id = 1", SUNDAY_NIGHT).blocked
    # 17:30 UTC is 19:30 in Berlin in May.
    evening = datetime(2024, 5, 6, 17, 30, tzinfo=UTC)
    assert p.statement(BOB, PG, "DELETE FROM t WHERE id = 1", evening).blocked


def test_resource_sets_match_service_and_database() -> None:
    """Resource sets select by service and database."""
    p = policy('[[rule]]\nid = "app"\neffect = "allow"\nresources = ["app"]\n')
    assert p.connection(BOB, PG, MONDAY_NOON).allowed
    assert not p.connection(BOB, Resource("postgres", database="other"), MONDAY_NOON).allowed


def test_kinds_objects_functions_and_pattern() -> None:
    """Statement conditions match kinds (globs), objects, functions and a regex."""
    p = policy(
        '[[rule]]\nid = "all"\neffect = "allow"\n'
        '[[rule]]\nid = "k"\neffect = "block"\nkinds = ["alter *"]\n'
        '[[rule]]\nid = "o"\neffect = "block"\nobjects = ["secrets"]\n'
        '[[rule]]\nid = "f"\neffect = "block"\nfunctions = ["pg_sleep"]\n'
        '[[rule]]\nid = "p"\neffect = "block"\npattern = "\\\\bcrossjoin_hint\\\\b"\n'
    )
    when = MONDAY_NOON
    assert p.statement(BOB, PG, "ALTER INDEX i RENAME TO j", when).rule_id == "k"
    assert p.statement(BOB, PG, 'SELECT * FROM vault."secrets"', when).rule_id == "o"
    assert p.statement(BOB, PG, "SELECT pg_catalog.pg_sleep(10)", when).rule_id == "f"
    assert p.statement(BOB, PG, "SELECT 1 /* CROSSJOIN_HINT */", when).rule_id == "p"
    assert p.statement(BOB, PG, "SELECT 1", when).allowed


def test_decision_records() -> None:
    """to_record() carries rule id, effect, reason, policy version and statements."""
    p = policy(
        '[[rule]]\nid = "all"\neffect = "allow"\n[[rule]]\nid = "b"\neffect = "block"\nflags = ["drop"]\n'
    )
    r = p.statement(BOB, PG, "DROP TABLE t", MONDAY_NOON).to_record()
    assert r["rule_id"] == "b" and r["effect"] == "block" and r["policy_version"] == p.version
    assert r["statements"][0]["kind"] == "DROP TABLE" and r["statements"][0]["rule_id"] == "b"
    c = p.connection(BOB, PG, MONDAY_NOON).to_record()
    assert c["scope"] == "connection" and c["rule_id"] == "all" and c["policy_version"] == p.version


def test_prepared_classification_is_reused() -> None:
    """A classified prepared statement is judged without parsing again."""
    classifier = Classifier()
    p = parse_policy(
        BASE + '[[rule]]\nid = "all"\neffect = "allow"\n[[rule]]\nid = "b"\neffect = "block"\n'
        'flags = ["drop"]\n', source="t.toml", classifier=classifier,
    )
    c = p.prepared("DROP TABLE t")
    assert p.prepared("DROP TABLE t") == c
    assert (classifier.misses, classifier.hits) == (1, 1)
    d = p.statement(BOB, PG, c, MONDAY_NOON)
    assert d.blocked and d.classification is c


def test_decisions_shared_by_shape_stay_per_text_and_per_subject() -> None:
    """Texts of one shape reuse a decision, yet each carries its own text, and subjects differ."""
    p = policy(
        '[[rule]]\nid = "all"\neffect = "allow"\n'
        '[[rule]]\nid = "w"\neffect = "block"\nsubjects = ["bots"]\nclasses = ["write"]\n'
    )
    for n in (1, 22, 333):
        text = f"UPDATE accounts SET balance = {n} WHERE id = {n}"
        human, bot = p.statement(BOB, PG, text, MONDAY_NOON), p.statement(BOT, PG, text, MONDAY_NOON)
        assert human.allowed and bot.blocked and bot.rule_id == "w"
        for d in (human, bot):
            assert d.classification.text == text
            assert d.classification.shape is not None
            assert [v.statement.text for v in d.verdicts] == [text]


def test_pattern_rules_see_every_text_of_a_shape() -> None:
    """A rule over the text (pattern) is judged per text, never by a shared decision."""
    p = policy(
        '[[rule]]\nid = "all"\neffect = "allow"\n'
        '[[rule]]\nid = "vip"\neffect = "block"\npattern = "id = 13\\\\b"\n'
    )
    assert p.statement(BOB, PG, "SELECT * FROM accounts WHERE id = 12", MONDAY_NOON).allowed
    assert p.statement(BOB, PG, "SELECT * FROM accounts WHERE id = 13", MONDAY_NOON).blocked
    assert p.statement(BOB, PG, "SELECT * FROM accounts WHERE id = 14", MONDAY_NOON).allowed


def test_time_windows_are_judged_at_each_statement() -> None:
    """A time-bound rule decides by the statement's own time, whatever was decided before."""
    p = policy(
        '[[rule]]\nid = "all"\neffect = "allow"\n'
        '[[rule]]\nid = "weekend"\neffect = "block"\nclasses = ["write"]\n'
        '[rule.time]\ndays = ["sat", "sun"]\n'
    )
    text = "DELETE FROM accounts WHERE id = {}"
    assert p.statement(BOB, PG, text.format(1), MONDAY_NOON).allowed
    assert p.statement(BOB, PG, text.format(2), SUNDAY_NIGHT).blocked
    assert p.statement(BOB, PG, text.format(3), MONDAY_NOON).allowed
