"""``ringfence policy check|explain|test`` through click's runner."""

from __future__ import annotations

from pathlib import Path

from click.testing import CliRunner

from agent.cli import main

PACKAGING = Path(__file__).resolve().parents[3] / "packaging"
POLICY = str(PACKAGING / "policy.toml")
AT = "2024-05-06T12:00:00+00:00"


def _run(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, ["policy", *args])
    return result.exit_code, result.output


def _explain(*args: str) -> list[str]:
    code, out = _run("explain", "--policy", POLICY, "--at", AT, *args)
    assert code == 0, out
    return out.splitlines()


def test_check_ok_and_error(tmp_path: Path) -> None:
    """check prints the version of a valid file and file:line:col for a broken one."""
    code, out = _run("check", POLICY)
    assert code == 0 and "ok, 10 rule(s)" in out
    bad = tmp_path / "p.toml"
    bad.write_text('[[rule]]\nid = "a"\neffect = "nope"\n')
    code, out = _run("check", str(bad))
    assert code == 2 and f"{bad}:3:1: rule[0].effect" in out


def test_explain_blocked_drop() -> None:
    """explain names the blocking rule, its line and the non-matching rules."""
    lines = _explain(
        "--subject",
        "alice",
        "--groups",
        "dba,eng",
        "--actor",
        "human",
        "--resource",
        "postgres/app",
        "--sql",
        "DROP TABLE users",
    )
    assert "connection: allow by allow-trusted: identity trusted by the agent configuration" in lines
    assert "statement 1: DROP TABLE [ddl] flags=drop objects=users" in lines
    assert "  block-drop (block, line 48): matches" in lines
    assert "  block-truncate (block, line 57): not flags ['truncate']" in lines
    assert lines[-2] == "statement: block by block-drop: DROP is blocked by the ringfence policy"


def test_explain_safe_query() -> None:
    """explain of a safe query ends allowed by the default."""
    lines = _explain("--subject", "alice", "--resource", "postgres", "--sql", "SELECT * FROM t")
    assert lines[-2] == "statement: allow by defaults.allow: no rule blocks or holds this statement"
    assert lines[-1] == "record: statements"


def test_explain_unidentified_connection() -> None:
    """Without identity the connection is allowed by [defaults] unidentified."""
    lines = _explain("--unix-user", "carol", "--resource", "postgres")
    assert "subject unix_user=carol identified=False" in lines
    assert (
        lines[-2] == "connection: allow by defaults.unidentified: unidentified clients are allowed by default"
    )


def test_explain_cte_wrapped_delete_and_parse_error() -> None:
    """explain shows the CTE-wrapped DELETE's flags and an unparseable statement's error."""
    lines = _explain(
        "--unix-user",
        "carol",
        "--resource",
        "postgres",
        "--sql",
        "WITH d AS (DELETE FROM t RETURNING *) SELECT * FROM d",
    )
    assert "statement 1: SELECT [write] flags=data_modifying_cte,delete_without_where objects=t" in lines
    assert lines[-2].startswith("statement: block by block-delete-without-where")
    lines = _explain("--unix-user", "carol", "--resource", "postgres", "--sql", "DROPP x")
    assert any(line.startswith("parse error: syntax error") for line in lines)
    assert lines[-2].startswith("statement: block by defaults.unparseable")


def test_packaged_decision_table_passes() -> None:
    """The default policy passes its own decision table."""
    code, out = _run("test", POLICY)
    assert code == 0, out
    assert " 0 failed" in out and "FAIL" not in out


def test_failing_table_exits_nonzero(tmp_path: Path) -> None:
    """A case whose expectation is wrong fails with its line and the difference."""
    (tmp_path / "p.toml").write_text((PACKAGING / "policy.toml").read_text())
    (tmp_path / "p.tests.toml").write_text(
        '[[case]]\nname = "wrong"\nunix_user = "x"\nresource = "postgres"\n'
        'sql = "DROP TABLE t"\nexpect = "allow"\n'
    )
    code, out = _run("test", str(tmp_path / "p.toml"))
    assert code == 1
    assert "FAIL  wrong" in out and "p.tests.toml:1" in out and "got block by block-drop" in out


def test_replication_commands_judged_as_on_a_replication_connection(tmp_path: Path) -> None:
    """explain --replication and a table case with replication = true classify a walsender
    command as one (class replication); a policy rule on that class then decides."""
    lines = _explain("--unix-user", "postgres", "--resource", "postgres", "--replication",
                     "--sql", "CREATE_REPLICATION_SLOT s LOGICAL test_decoding")
    assert "statement 1: CREATE_REPLICATION_SLOT [replication] flags=server_admin objects=-" in lines
    assert lines[-2] == "statement: allow by defaults.allow: no rule blocks or holds this statement"
    (tmp_path / "p.toml").write_text(
        '[defaults]\nunidentified = "allow"\n'
        '[[rule]]\nid = "no-streams"\neffect = "block"\nclasses = ["replication"]\n'
        'kinds = ["START_REPLICATION"]\nreason = "no replication streams from here"\n')
    (tmp_path / "p.tests.toml").write_text(
        '[[case]]\nname = "stream"\nunix_user = "x"\nresource = "postgres"\nreplication = true\n'
        'sql = "START_REPLICATION SLOT s PHYSICAL 0/0"\nexpect = "block"\nrule = "no-streams"\n'
        '[[case]]\nname = "identify"\nunix_user = "x"\nresource = "postgres"\n'
        'replication = true\nsql = "IDENTIFY_SYSTEM"\nexpect = "allow"\n')
    code, out = _run("test", str(tmp_path / "p.toml"))
    assert code == 0 and "2 passed, 0 failed" in out, out
    (tmp_path / "p.tests.toml").write_text(
        '[[case]]\nname = "no command"\nunix_user = "x"\nresource = "postgres"\n'
        'replication = true\nexpect = "allow"\n')
    code, out = _run("test", str(tmp_path / "p.toml"))
    assert code == 2 and "a replication case needs the command (sql)" in out, out
