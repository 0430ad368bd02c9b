"""Decision tables: expected decisions kept beside a policy (``policy.tests.toml``).

``ringfence policy test`` loads a table with :func:`load_table` and checks it
with :func:`run_table`. A case describes a client, a resource, an optional
statement and time, and the expected effect (and optionally rule and record
level); errors name the case's line.
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from policy.classify import Classification, classify_replication
from policy.evaluate import Policy
from policy.loader import PolicyError, _Invalid, _SourceMap, _Table, _toml_position, read_policy_file
from policy.model import ACTORS, ALLOW, BLOCK, DENY, RECORD_LEVELS, REQUIRE_APPROVAL, Resource, Subject

_EFFECTS = (ALLOW, DENY, BLOCK, REQUIRE_APPROVAL)


@dataclass(frozen=True, slots=True)
class Case:
    """One expected decision."""

    name: str
    line: int
    subject: Subject
    resource: Resource
    sql: str | None
    at: datetime | None
    expect: str
    rule: str | None = None
    record: str | None = None
    replication: bool = False  # the statement comes on a replication connection


@dataclass(frozen=True, slots=True)
class CaseResult:
    """A case and what the policy decided."""

    case: Case
    effect: str
    rule_id: str
    record: str
    problems: tuple[str, ...]

    @property
    def passed(self) -> bool:
        return not self.problems


@dataclass(frozen=True, slots=True)
class Table:
    """A decision table and the policy file it belongs to."""

    path: Path
    policy_path: Path
    cases: tuple[Case, ...]


def table_for(policy_path: Path) -> Path:
    """The table kept beside a policy: ``policy.toml`` -> ``policy.tests.toml``."""
    return policy_path.with_name(policy_path.stem + ".tests.toml")


def parse_resource(text: str) -> Resource:
    """``service`` or ``service/database``."""
    service, _, database = text.partition("/")
    return Resource(service=service, database=database or None)


def load_table(path: str | os.PathLike[str], policy_path: Path | None = None) -> Table:
    """Read a decision table; raises :class:`PolicyError` with file:line:col."""
    source = Path(path)
    text = read_policy_file(source).decode("utf-8", "replace")
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        message, line, column = _toml_position(str(e), text)
        raise PolicyError(message, str(source), line, column) from None
    smap = _SourceMap(text)
    try:
        root = _Table((), data)
        named = root.text("policy")
        if policy_path is None:
            if named:
                policy_path = source.parent / named
            else:
                policy_path = source.with_name(source.name.replace(".tests.toml", ".toml"))
        items = data.get("case", [])
        root.used.add("case")
        root.finish()
        if not isinstance(items, list) or not items:
            raise _Invalid(("case",), "case: write at least one [[case]] table")
        cases = tuple(_case(_Table(("case", i), item), smap) for i, item in enumerate(items))
    except _Invalid as e:
        pos = smap.find(e.path)
        raise PolicyError(e.message, str(source), *(pos or (None, None))) from None
    return Table(path=source, policy_path=policy_path, cases=cases)


def _case(t: _Table, smap: _SourceMap) -> Case:
    pos = smap.find(t.path)
    name = t.text("name") or f"case at line {pos[0] if pos else '?'}"
    uid = t.ints("uid")
    at_text = t.text("at")
    at = None
    if at_text is not None:
        try:
            at = datetime.fromisoformat(at_text)
        except ValueError:
            raise t.fail("at", f"{at_text!r}: not an RFC 3339 time") from None
    resource = t.text("resource")
    if not resource:
        raise t.fail("resource", "every case needs a resource")
    expect = t.choice("expect", _EFFECTS, None)
    if expect is None:
        raise t.fail("expect", "every case needs an expected effect")
    subject = Subject(
        subject=t.text("subject"),
        groups=t.strings("groups"),
        issuer=t.text("issuer"),
        service_account=t.text("service_account"),
        actor=t.choice("actor", ACTORS, None),
        findings=t.strings("findings"),
        unix_user=t.text("unix_user"),
        loginuid_user=t.text("loginuid_user"),
        uid=uid[0] if uid else None,
        identified=bool(t.flag("identified")),
    )
    case = Case(
        name=name,
        line=pos[0] if pos else 0,
        subject=subject,
        resource=parse_resource(resource),
        sql=t.text("sql"),
        at=at,
        expect=expect,
        rule=t.text("rule"),
        record=t.choice("record", RECORD_LEVELS, None),
        replication=bool(t.flag("replication")),
    )
    if case.replication and case.sql is None:
        raise t.fail("replication", "a replication case needs the command (sql)")
    t.finish()
    return case


def on_connection(sql: str, replication: bool) -> str | Classification:
    """A statement as the session judges it: on a replication connection, a replication
    command is classified as one; anything else is SQL."""
    return (classify_replication(sql) or sql) if replication else sql


def run_case(policy: Policy, case: Case) -> CaseResult:
    """Judge one case and compare with what it expects."""
    now = case.at or datetime.now(UTC)
    if case.sql is None:
        c = policy.connection(case.subject, case.resource, now)
        effect, rule_id, record = c.effect, c.rule_id, c.record
    else:
        s = policy.statement(case.subject, case.resource,
                             on_connection(case.sql, case.replication), now)
        effect, rule_id, record = s.effect, s.rule_id, s.record
    problems = []
    if effect != case.expect:
        problems.append(f"expected {case.expect}, got {effect} by {rule_id}")
    if case.rule is not None and rule_id != case.rule:
        problems.append(f"expected rule {case.rule}, got {rule_id}")
    if case.record is not None and record != case.record:
        problems.append(f"expected record {case.record}, got {record}")
    return CaseResult(case, effect, rule_id, record, tuple(problems))


def run_table(policy: Policy, table: Table) -> list[CaseResult]:
    """Judge every case of a table."""
    return [run_case(policy, case) for case in table.cases]
