"""SQL classification against the statement corpus (corpus.toml)."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from policy.classify import (
    CLASSES,
    FLAGS,
    Classifier,
    classify,
    classify_replication,
    statement_shape,
)
from tests.support.fuzz import examples

CORPUS = tomllib.loads((Path(__file__).parent / "corpus.toml").read_text("utf-8"))["case"]


def _id(case: dict[str, Any]) -> str:
    return case["sql"][:60] or "<empty>"


def test_corpus_is_large_enough() -> None:
    """The corpus holds at least 150 statements."""
    assert len(CORPUS) >= 150


@pytest.mark.parametrize("case", CORPUS, ids=_id)
def test_corpus(case: dict[str, Any]) -> None:
    """Each corpus statement gets the expected kind, class, flags and objects."""
    c = classify(case["sql"])
    if case.get("parse_error"):
        assert c.parse_error is not None
        assert c.statements == ()
        return
    assert c.parse_error is None
    got = [s for s in c.statements]
    assert len(got) == len(case["expect"]), [s.kind for s in got]
    for s, expected in zip(got, case["expect"], strict=True):
        kind, klass, flags, *objects = expected
        assert klass in CLASSES and set(flags) <= set(FLAGS)
        assert (s.kind, s.statement_class, sorted(s.flags)) == (kind, klass, sorted(flags))
        if objects:
            assert list(s.objects) == objects[0]


def test_statement_text_is_sliced_per_statement() -> None:
    """Each statement of a chain carries its own text, also after multibyte characters."""
    c = classify("SELECT 'ü'; DROP TABLE users")
    assert [s.text for s in c.statements] == ["SELECT 'ü'", "DROP TABLE users"]


@pytest.mark.parametrize(("sql", "prepared"), [
    ("PREPARE Purge (int) AS DELETE FROM t WHERE id = $1", [("prepare", "purge")]),
    ('EXECUTE "Purge"(7)', [("execute", "Purge")]),
    ("DEALLOCATE PREPARE purge", [("deallocate", "purge")]),
    ("DEALLOCATE ALL", [("deallocate", None)]),
    ("DISCARD ALL", [("deallocate", None)]),
    ("DISCARD PLANS", [None]),
    ("SELECT 1; EXECUTE p", [None, ("execute", "p")]),
])
def test_sql_level_prepared_statements_are_named_as_the_server_folds_them(
    sql: str, prepared: list[Any]
) -> None:
    """What a statement does to the session's SQL-level prepared statements, by name (unquoted
    names fold to lower case), also when its classification comes from a cached shape."""
    assert [s.prepared for s in classify(sql).statements] == prepared
    classifier = Classifier()
    for text in (sql, sql.replace("7", "8")):
        assert [s.prepared for s in classifier(text).statements] == prepared


def test_parse_error_carries_the_parser_message() -> None:
    """Unparseable text reports PostgreSQL's syntax error."""
    assert "syntax error" in (classify("DROPP TABLE x").parse_error or "")


def test_deep_nesting_does_not_exhaust_the_stack() -> None:
    """Deeply nested input is classified or rejected, never a RecursionError."""
    c = classify("SELECT " + "(" * 900 + "1" + ")" * 900)
    assert c.parse_error is not None or c.statements[0].kind == "SELECT"


def test_classifier_caches_by_text_within_bounds() -> None:
    """A text no shape stands for (a DO body) is cached by its text, and the cache stays bounded."""
    cl = Classifier(max_entries=2)
    first = cl("DO $$BEGIN PERFORM 1; END$$")
    assert cl("DO $$BEGIN PERFORM 1; END$$") is first
    assert cl.hits == 1
    cl("DO $$BEGIN PERFORM 2; END$$")
    cl("DO $$BEGIN PERFORM 3; END$$")
    assert len(cl) == 2
    assert cl("DO $$BEGIN PERFORM 1; END$$") is not first


def test_texts_differing_only_in_literals_are_parsed_once() -> None:
    """pgbench-style statements share one parse; each keeps its own text."""
    cl = Classifier()
    texts = [f"SELECT abalance FROM pgbench_accounts WHERE aid = {n};" for n in (1, 42, 987654)]
    texts += [f"/* app */ SELECT * FROM users WHERE name = '{n}' AND age > {a}" for n, a in
              (("bob", 3), ("o''hara", 30), ("ünï", 300))]
    results = [cl(t) for t in texts]
    assert cl.misses == 2 and cl.hits == 4
    for text, result in zip(texts, results, strict=True):
        assert result == classify(text)
        assert result.shape is not None
    assert results[1].statements[0].text == "SELECT abalance FROM pgbench_accounts WHERE aid = 42"


@pytest.mark.parametrize("text", [
    "SELECT abalance FROM pgbench_accounts WHERE aid = 42;",
    "  select * from t where a = 1 and b = 22  ;  ",
    "UPDATE t SET n = n + 1 WHERE id = 7",
    "/* app */ SELECT * FROM users WHERE name = 'bob' AND age > 3",
    "select 1.5, 1e5, x1, 12345678901 from t",
])
def test_the_sessions_shape_key_is_the_classifications(text: str) -> None:
    """statement_shape, which a session keys its reused decisions by, gives the very key the
    classification carries (a decision is reused only when they are equal)."""
    shape = Classifier()(text).shape
    assert shape is not None and statement_shape(text) == shape


@pytest.mark.parametrize("text", ["select 1; select 2", "  ;  ", "", "select 1 -- x\n; select 2"])
def test_texts_of_no_one_statement_have_no_shape_key(text: str) -> None:
    assert statement_shape(text) is None


# Pairs that differ only inside a literal but must not share a classification.
LITERAL_SENSITIVE = [
    ("DO $$BEGIN PERFORM 1; END$$", "DO $$BEGIN DROP TABLE users; END$$"),
    ("DO 'BEGIN PERFORM 1; END'", "DO 'BEGIN DELETE FROM users; END'"),
    ("SELECT set_config('work_mem', '1MB', false)", "SELECT set_config('role', 'admin', false)"),
    ("CREATE FUNCTION f() RETURNS int LANGUAGE sql AS 'SELECT 1'",
     "CREATE FUNCTION f() RETURNS int LANGUAGE c AS 'lib', 'sym'"),
    ("EXECUTE format('SELECT %s', 1)", "EXECUTE format('DROP TABLE %s', 1)"),
]


@pytest.mark.parametrize(("harmless", "dangerous"), LITERAL_SENSITIVE)
def test_statements_whose_literals_matter_are_not_shared(harmless: str, dangerous: str) -> None:
    """A literal the classification reads (a DO body, a setting name) keeps its text's own result."""
    cl = Classifier()
    cl(harmless)
    assert cl(dangerous) == classify(dangerous)
    assert cl(harmless) == classify(harmless)


def _literal_variants(sql: str) -> list[str]:
    """The text with its digits and the letters inside quotes changed, a few ways."""
    out = []
    for digit, letter in (("7", "q"), ("0", "Z"), ("123456", "xy")):
        changed = re.sub(r"[0-9]+", digit, sql)
        out.append(changed)
        out.append(re.sub(r"'([^']*)'", lambda m, x=letter: "'" + re.sub(r"[A-Za-z]", x, m[1]) + "'",
                          changed))
    return out


def test_shared_parses_match_the_parser_over_the_corpus() -> None:
    """Whatever the cache shares, every corpus text and literal variant classifies as uncached."""
    cl = Classifier()
    texts = [case["sql"] for case in CORPUS] + [a for pair in LITERAL_SENSITIVE for a in pair]
    texts += [v for t in list(texts) for v in _literal_variants(t)]
    for _ in range(2):
        for text in texts:
            assert cl(text) == classify(text), text
    assert cl.hits > len(texts)


def test_classifier_does_not_cache_huge_texts() -> None:
    """Texts above the size limit are classified but not kept."""
    cl = Classifier(max_text=10)
    cl("SELECT 1234567890")
    assert len(cl) == 0


_NUMBERS = st.one_of(
    st.sampled_from(["007", "1.5", ".5", "1e5", "1e-5", "2147483648", "99999999999", "0x1F", "1_000"]),
    st.integers(0, 10**9).map(str),
)
_ATOMS = st.one_of(_NUMBERS, st.sampled_from(["t.a", "x_2", "b1", "true", "null", "current_date"]))


def _expressions_over(e: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
    ops = st.sampled_from(["+", "-", "*", "=", "<", ">=", "and", "or"])
    calls = st.sampled_from(["abs", "f", "pg_read_file", "set_config", "coalesce"])
    suffixes = st.sampled_from(["::int", "::numeric(10,2)", "::varchar(3)", "::text", "[2]"])
    return st.one_of(
        st.builds("{} {} {}".format, e, ops, e),
        st.builds("({})".format, e),
        st.builds("-{}".format, e),
        st.builds("{}({})".format, calls, e),
        st.builds("{}{}".format, e, suffixes),
        st.builds("{} in ({}, 3)".format, e, e),
    )


_EXPRESSIONS = st.recursive(_ATOMS, _expressions_over, max_leaves=6)
_STATEMENTS = st.one_of(
    st.builds("select {}".format, _EXPRESSIONS),
    st.builds("select * from t where {} limit {};".format, _EXPRESSIONS, _NUMBERS),
    st.builds("update t set a = {} where id = 3".format, _EXPRESSIONS),
    st.builds("delete from t where {}".format, _EXPRESSIONS),
    st.builds("insert into t values ({}, 2) returning a".format, _EXPRESSIONS),
    st.builds("select 1; delete from t where {}".format, _EXPRESSIONS),
)


@settings(max_examples=examples(400), deadline=None)
@given(_STATEMENTS, st.booleans(), st.integers(0, 999_999_999))
def test_texts_that_share_a_shape_classify_as_uncached(text: str, tight: bool, number: int) -> None:
    """Generated statements with numbers in every position (also written without spaces): the
    text and its renumbered variant, through one classifier, each classify exactly as the
    uncached parser says, whether their shape is shared or not."""
    if tight:
        text = re.sub(r" ?([=<>+*(),-]) ?", r"\1", text)
    variant = re.sub(r"[0-9]+", str(number), text)
    cl = Classifier()
    for candidate in (text, variant, text):
        assert cl(candidate) == classify(candidate), candidate


@pytest.mark.parametrize(("text", "kind", "flags"), [
    ("IDENTIFY_SYSTEM", "IDENTIFY_SYSTEM", set()),
    ("identify_system;", "IDENTIFY_SYSTEM", set()),
    ("\n\t SHOW wal_segment_size", "SHOW", set()),
    ("TIMELINE_HISTORY 2", "TIMELINE_HISTORY", set()),
    ("START_REPLICATION SLOT \"sub\" LOGICAL 0/0 (\"proto_version\" '1')", "START_REPLICATION",
     set()),
    ("BASE_BACKUP (LABEL 'x', PROGRESS)", "BASE_BACKUP", {"server_admin"}),
    ("CREATE_REPLICATION_SLOT \"s\" TEMPORARY PHYSICAL (RESERVE_WAL)", "CREATE_REPLICATION_SLOT",
     {"server_admin"}),
    ("DROP_REPLICATION_SLOT s WAIT", "DROP_REPLICATION_SLOT", {"server_admin"}),
    ("READ_REPLICATION_SLOT s", "READ_REPLICATION_SLOT", set()),
])
def test_replication_commands_are_classified_by_their_keyword(
    text: str, kind: str, flags: set[str]
) -> None:
    found = classify_replication(text)
    assert found is not None and found.parse_error is None
    (info,) = found.statements
    assert (info.kind, info.statement_class, set(info.flags)) == (kind, "replication", flags)


@pytest.mark.parametrize("text", [
    "SELECT 1",
    "",
    "IDENTIFY_SYSTEMx",  # one identifier to the server's scanner, not the keyword
    "IDENTIFY_SYSTEM$1",
    "BASE_BACKUP\u00e9",
    '"IDENTIFY_SYSTEM"',  # a quoted identifier is never a keyword
    "-- note\nIDENTIFY_SYSTEM",  # the replication scanner knows no comments
    "/* x */ BASE_BACKUP",
])
def test_texts_the_server_takes_as_sql_are_not_replication_commands(text: str) -> None:
    """Exactly when the first token is a replication keyword: anything else goes to the SQL
    parser and is judged as SQL (where these fail to parse and the policy's default holds)."""
    assert classify_replication(text) is None
