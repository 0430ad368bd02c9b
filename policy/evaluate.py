"""Evaluation: a loaded policy turns (subject, resource, statement, time) into decisions.

Each rule is compiled once, when the policy is loaded, into a tuple of small
condition callables (one per key it sets), so evaluating a rule is a run of
``all(...)`` over prepared tests and nothing is re-parsed per statement. The
same conditions, run one by one, give ``explain`` its "why not".

Semantics (documented in README.md):

* Connection: among the rules without statement conditions whose conditions
  hold, a ``deny`` wins; else the first ``require_approval``; else the first
  ``allow``. With none, an unidentified client gets ``[defaults]
  unidentified`` and an identified one is denied. While ``unidentified =
  "deny"``, an unidentified client is admitted only by rules whose matching
  subject set says ``identified = false``.
* Statement: the connection is judged again (a reloaded policy can revoke an
  open session); a ``deny`` blocks. Each statement of the string is judged:
  the first matching ``block`` wins, else the first matching
  ``require_approval``, else it is allowed. The string is blocked if any of
  its statements is.
* ``record`` and ``mask``: the first matching rule of that effect, in file
  order, across both scopes.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from fnmatch import fnmatchcase
from pathlib import Path
from zoneinfo import ZoneInfo

from policy.classify import Classification, Classifier, StatementInfo, default_classifier
from policy.model import (
    ALLOW,
    BLOCK,
    DENY,
    MASK,
    RECORD,
    RECORD_LEVELS,
    REQUIRE_APPROVAL,
    ConnectionDecision,
    Defaults,
    Mask,
    Match,
    Resource,
    ResourceSet,
    Rule,
    StatementDecision,
    StatementVerdict,
    Subject,
    SubjectSet,
    TimeWindow,
)

MEMO_ENTRIES = 4096  # remembered statement decisions per policy version


@dataclass(frozen=True, slots=True)
class _Context:
    subject: Subject
    resource: Resource
    now: datetime
    statement: StatementInfo | None = None


Test = Callable[[_Context], bool]


@dataclass(frozen=True, slots=True)
class _Condition:
    label: str
    test: Test


@dataclass(frozen=True, slots=True)
class _CompiledRule:
    rule: Rule
    conditions: tuple[_Condition, ...]
    unless: tuple[_Condition, ...] | None
    admits_unidentified: Test

    def matches(self, ctx: _Context) -> bool:
        if not all(c.test(ctx) for c in self.conditions):
            return False
        return self.unless is None or not all(c.test(ctx) for c in self.unless)

    def why_not(self, ctx: _Context) -> str | None:
        """None when the rule matches, else the first condition that fails."""
        for c in self.conditions:
            if not c.test(ctx):
                return f"not {c.label}"
        if self.unless is not None and all(c.test(ctx) for c in self.unless):
            return "unless: " + " and ".join(c.label for c in self.unless)
        return None


# ---------------------------------------------------------------------------
# Condition builders: each returns a callable configured once.


def _any_glob(patterns: Sequence[str]) -> Callable[[str | None], bool]:
    exact = frozenset(p for p in patterns if not any(ch in p for ch in "*?["))
    globs = tuple(p for p in patterns if p not in exact)

    def test(value: str | None) -> bool:
        if value is None:
            return False
        return value in exact or any(fnmatchcase(value, g) for g in globs)

    return test


def _subject_set(s: SubjectSet) -> Test:
    tests: list[Callable[[Subject], bool]] = []

    def one(patterns: Sequence[str], get: Callable[[Subject], str | None]) -> None:
        if patterns:
            glob = _any_glob(patterns)
            tests.append(lambda subj: glob(get(subj)))

    def many(patterns: Sequence[str], get: Callable[[Subject], Iterable[str]]) -> None:
        if patterns:
            glob = _any_glob(patterns)
            tests.append(lambda subj: any(glob(v) for v in get(subj)))

    one(s.subjects, lambda x: x.subject)
    many(s.groups, lambda x: x.groups)
    one(s.issuers, lambda x: x.issuer)
    one(s.service_accounts, lambda x: x.service_account)
    one(s.unix_users, lambda x: x.unix_user)
    one(s.loginuid_users, lambda x: x.loginuid_user)
    many(s.findings, lambda x: x.findings)
    if s.actors:
        actors = frozenset(s.actors)
        tests.append(lambda x: x.actor in actors)
    if s.uids:
        uids = frozenset(s.uids)
        tests.append(lambda x: x.uid in uids)
    if s.loginuids:
        loginuids = frozenset(s.loginuids)
        tests.append(lambda x: x.loginuid in loginuids)
    if s.identified is not None:
        identified = s.identified
        tests.append(lambda x: x.identified is identified)
    frozen = tuple(tests)
    return lambda ctx: all(t(ctx.subject) for t in frozen)


def _resource_set(r: ResourceSet) -> Test:
    services = _any_glob(r.services) if r.services else None
    protocols = frozenset(r.protocols)
    databases = _any_glob(r.databases) if r.databases else None

    def test(ctx: _Context) -> bool:
        res = ctx.resource
        if services is not None and not services(res.service):
            return False
        if protocols and res.protocol not in protocols:
            return False
        return databases is None or databases(res.database)

    return test


def _object_matcher(patterns: Sequence[str]) -> Callable[[str], bool]:
    """Match relation names; an unqualified name matches a pattern's table part
    under any schema, since the search_path decides at run time."""
    qualified = tuple(p for p in patterns if "." in p)
    bare = tuple(p for p in patterns if "." not in p)
    tails = tuple(p.split(".", 1)[1] for p in qualified)

    def test(name: str) -> bool:
        table = name.rsplit(".", 1)[-1]
        if any(fnmatchcase(table, p) for p in bare):
            return True
        if "." in name:
            return any(fnmatchcase(name, p) for p in qualified)
        return any(fnmatchcase(name, t) for t in tails)

    return test


def _time_window(w: TimeWindow) -> Test:
    zone = ZoneInfo(w.timezone)

    def test(ctx: _Context) -> bool:
        now = ctx.now if ctx.now.tzinfo else ctx.now.replace(tzinfo=UTC)
        local = now.astimezone(zone)
        if w.start is None or w.end is None:
            return local.weekday() in w.days
        clock = local.time().replace(tzinfo=None)
        if w.start <= w.end:
            return local.weekday() in w.days and w.start <= clock < w.end
        # Wraps midnight: the part after midnight belongs to the previous day.
        if clock >= w.start:
            return local.weekday() in w.days
        return clock < w.end and (local.weekday() - 1) % 7 in w.days

    return test


def _statement_test(get: Callable[[StatementInfo], bool]) -> Test:
    return lambda ctx: ctx.statement is not None and get(ctx.statement)


def _conditions(m: Match, subjects: dict[str, Test], resources: dict[str, Test]) -> tuple[_Condition, ...]:
    out: list[_Condition] = []
    if m.subjects:
        tests = tuple(subjects[name] for name in m.subjects)
        out.append(_Condition(f"subjects {list(m.subjects)}", lambda c: any(t(c) for t in tests)))
    if m.resources:
        rtests = tuple(resources[name] for name in m.resources)
        out.append(_Condition(f"resources {list(m.resources)}", lambda c: any(t(c) for t in rtests)))
    if m.time is not None:
        w = m.time
        out.append(_Condition(f"time {_describe_window(w)}", _time_window(w)))
    if m.classes:
        classes = frozenset(m.classes)
        out.append(
            _Condition(f"classes {list(m.classes)}", _statement_test(lambda s: s.statement_class in classes))
        )
    if m.kinds:
        kinds = _any_glob([k.upper() for k in m.kinds])
        out.append(_Condition(f"kinds {list(m.kinds)}", _statement_test(lambda s: kinds(s.kind))))
    if m.flags:
        flags = frozenset(m.flags)
        out.append(_Condition(f"flags {list(m.flags)}", _statement_test(lambda s: bool(s.flags & flags))))
    if m.objects:
        objects = _object_matcher(m.objects)
        out.append(
            _Condition(
                f"objects {list(m.objects)}",
                _statement_test(lambda s: any(objects(o) for o in s.objects)),
            )
        )
    if m.functions:
        functions = _object_matcher(m.functions)
        out.append(
            _Condition(
                f"functions {list(m.functions)}",
                _statement_test(lambda s: any(functions(f) for f in s.functions)),
            )
        )
    if m.pattern is not None:
        regex = re.compile(m.pattern, re.IGNORECASE | re.DOTALL)
        out.append(
            _Condition(f"pattern {m.pattern!r}", _statement_test(lambda s: regex.search(s.text) is not None))
        )
    return tuple(out)


def _describe_window(w: TimeWindow) -> str:
    days = ",".join(["mon", "tue", "wed", "thu", "fri", "sat", "sun"][d] for d in sorted(w.days))
    hours = f" {w.start:%H:%M}-{w.end:%H:%M}" if w.start and w.end else ""
    return f"{days}{hours} {w.timezone}"


def _compile(
    rule: Rule,
    subject_sets: dict[str, SubjectSet],
    subjects: dict[str, Test],
    resources: dict[str, Test],
) -> _CompiledRule:
    explicit = tuple(subjects[name] for name in rule.match.subjects if subject_sets[name].identified is False)

    def admits_unidentified(ctx: _Context) -> bool:
        return any(t(ctx) for t in explicit)

    return _CompiledRule(
        rule=rule,
        conditions=_conditions(rule.match, subjects, resources),
        unless=_conditions(rule.unless, subjects, resources) if rule.unless else None,
        admits_unidentified=admits_unidentified,
    )


# ---------------------------------------------------------------------------


def _utcnow() -> datetime:
    return datetime.now(UTC)


class Policy:
    """A validated, compiled policy. Immutable; reloading builds a new one."""

    def __init__(
        self,
        *,
        rules: Sequence[Rule],
        subject_sets: Sequence[SubjectSet] = (),
        resource_sets: Sequence[ResourceSet] = (),
        defaults: Defaults | None = None,
        version: str = "",
        source: Path | None = None,
        classifier: Classifier | None = None,
    ) -> None:
        self.rules = tuple(rules)
        self.subject_sets = {s.name: s for s in subject_sets}
        self.resource_sets = {r.name: r for r in resource_sets}
        self.defaults = defaults or Defaults()
        self.version = version
        self.source = source
        self._classify = classifier if classifier is not None else default_classifier
        subjects = {name: _subject_set(s) for name, s in self.subject_sets.items()}
        resources = {name: _resource_set(r) for name, r in self.resource_sets.items()}
        compiled = [_compile(r, self.subject_sets, subjects, resources) for r in self.rules]
        self._access = tuple(
            c
            for c in compiled
            if c.rule.effect in (ALLOW, DENY, REQUIRE_APPROVAL) and not c.rule.statement_scoped
        )
        self._gates = tuple(
            c for c in compiled if c.rule.effect in (BLOCK, REQUIRE_APPROVAL) and c.rule.statement_scoped
        )
        self._records = tuple(c for c in compiled if c.rule.effect == RECORD)
        self._masks = tuple(c for c in compiled if c.rule.effect == MASK)
        self._compiled = tuple(compiled)
        # Decisions by (statement shape, subject, resource). Only when nothing
        # but those decides: no time windows, no patterns over the text.
        matches = [m for r in self.rules for m in (r.match, r.unless) if m is not None]
        self._memo: dict[tuple[bytes, Subject, Resource], StatementDecision] | None = (
            None if any(m.time is not None or m.pattern is not None for m in matches) else {}
        )
        # Whether a statement's decision depends only on its shape, the subject and the
        # resource (no time windows, no patterns over the text), so it may be reused for the
        # same shape. (An attribute, not a property: it is read for every statement.)
        self.reuses_decisions: bool = self._memo is not None

    # -- classification ----------------------------------------------------

    def prepared(self, sql: str) -> Classification:
        """Classify a statement text once (cached; use for extended-protocol Parse)."""
        return self._classify(sql)

    # -- connections -------------------------------------------------------

    def connection(
        self, subject: Subject, resource: Resource, now: datetime | None = None
    ) -> ConnectionDecision:
        """Decide whether ``subject`` may open a session on ``resource``."""
        ctx = _Context(subject, resource, now or _utcnow())
        effect, rule_id, reason = self._access_decision(ctx)
        level, level_rule = self._record(ctx, connection_only=True)
        return ConnectionDecision(
            effect=effect,
            rule_id=rule_id,
            reason=reason,
            policy_version=self.version,
            record=level,
            record_rule_id=level_rule,
            mask=self._mask(ctx, connection_only=True),
        )

    def _access_decision(self, ctx: _Context) -> tuple[str, str, str]:
        strict = not ctx.subject.identified and self.defaults.unidentified == DENY
        found: dict[str, Rule] = {}
        for c in self._access:
            effect = c.rule.effect
            if effect in found or not c.matches(ctx):
                continue
            if strict and effect != DENY and not c.admits_unidentified(ctx):
                continue
            found[effect] = c.rule
        for effect in (DENY, REQUIRE_APPROVAL, ALLOW):
            if effect in found:
                return effect, found[effect].id, found[effect].reason
        if not ctx.subject.identified:
            if self.defaults.unidentified == ALLOW:
                return ALLOW, "defaults.unidentified", "unidentified clients are allowed by default"
            return DENY, "defaults.unidentified", "the client is not identified and no rule admits it"
        return DENY, "defaults.no_rule", "no rule allows this identity on this resource"

    def _record(self, ctx: _Context, connection_only: bool) -> tuple[str, str]:
        for c in self._records:
            if connection_only and c.rule.statement_scoped:
                continue
            if c.matches(ctx) and c.rule.level is not None:
                return c.rule.level, c.rule.id
        return self.defaults.record, "defaults.record"

    def _mask(self, ctx: _Context, connection_only: bool) -> Mask | None:
        for c in self._masks:
            if connection_only and c.rule.statement_scoped:
                continue
            if c.matches(ctx):
                return c.rule.mask
        return None

    # -- statements --------------------------------------------------------

    def statement(
        self,
        subject: Subject,
        resource: Resource,
        sql: str | Classification,
        now: datetime | None = None,
    ) -> StatementDecision:
        """Decide whether a query string (or a classified prepared statement) may run."""
        classification = sql if isinstance(sql, Classification) else self._classify(sql)
        memo = self._memo
        if memo is None or classification.shape is None:
            return self._statement(subject, resource, classification, now or _utcnow())
        key = (classification.shape, subject, resource)
        known = memo.get(key)
        if known is None:
            known = self._statement(subject, resource, classification, now or _utcnow())
            if len(memo) >= MEMO_ENTRIES:
                memo.clear()
            memo[key] = known
            return known
        # Same shape, same decision; the statements are this text's own.
        verdicts = tuple(
            StatementVerdict(info, v.effect, v.rule_id, v.reason, v.record)
            for info, v in zip(classification.statements, known.verdicts, strict=True)
        )
        return StatementDecision(
            known.effect, known.rule_id, known.reason, known.policy_version, known.record,
            classification, verdicts, known.mask,
        )

    def _statement(
        self, subject: Subject, resource: Resource, classification: Classification, now: datetime
    ) -> StatementDecision:
        conn = self.connection(subject, resource, now)

        def whole(effect: str, rule_id: str, reason: str) -> StatementDecision:
            return StatementDecision(
                effect=effect,
                rule_id=rule_id,
                reason=reason,
                policy_version=self.version,
                record=conn.record,
                classification=classification,
                mask=conn.mask,
            )

        if conn.effect == DENY:
            return whole(BLOCK, conn.rule_id, f"the connection is no longer allowed: {conn.reason}")
        if classification.parse_error is not None:
            effect = BLOCK if self.defaults.unparseable == BLOCK else ALLOW
            reason = f"the statement could not be parsed ({classification.parse_error})"
            return whole(effect, "defaults.unparseable", reason)
        if not classification.statements:
            return whole(ALLOW, "defaults.allow", "empty query")

        verdicts: list[StatementVerdict] = []
        mask: Mask | None = None
        for info in classification.statements:
            ctx = _Context(subject, resource, now, info)
            effect, rule_id, reason = self._gate(ctx)
            level, _ = self._record(ctx, connection_only=False)
            verdicts.append(StatementVerdict(info, effect, rule_id, reason, level))
            if mask is None:
                mask = self._mask(ctx, connection_only=False)
        deciding = next(
            (v for v in verdicts if v.effect == BLOCK),
            next((v for v in verdicts if v.effect == REQUIRE_APPROVAL), verdicts[0]),
        )
        record = max((v.record for v in verdicts), key=RECORD_LEVELS.index)
        return StatementDecision(
            effect=deciding.effect,
            rule_id=deciding.rule_id,
            reason=deciding.reason,
            policy_version=self.version,
            record=record,
            classification=classification,
            verdicts=tuple(verdicts),
            mask=mask,
        )

    def _gate(self, ctx: _Context) -> tuple[str, str, str]:
        approval: Rule | None = None
        for c in self._gates:
            if c.rule.effect == BLOCK:
                if c.matches(ctx):
                    return BLOCK, c.rule.id, c.rule.reason
            elif approval is None and c.matches(ctx):
                approval = c.rule
        if approval is not None:
            return REQUIRE_APPROVAL, approval.id, approval.reason
        return ALLOW, "defaults.allow", "no rule blocks or holds this statement"

    # -- explain -----------------------------------------------------------

    def explain(
        self,
        subject: Subject,
        resource: Resource,
        sql: str | Classification | None = None,
        now: datetime | None = None,
    ) -> list[str]:
        """Lines saying which rules match, which do not and why, and the decision."""
        now = now or _utcnow()
        lines = [f"policy {self.source or '<memory>'} version {self.version[:16]}"]
        who = " ".join(
            f"{k}={','.join(v) if isinstance(v, list) else v}" for k, v in subject.summary().items()
        )
        lines.append(f"subject {who}")
        lines.append(f"resource {resource} ({resource.protocol})")
        lines.append(f"time {now.isoformat()}")
        conn = self.connection(subject, resource, now)
        ctx = _Context(subject, resource, now)
        lines.append("connection rules:")
        for c in self._compiled:
            if c.rule.statement_scoped:
                continue
            why = c.why_not(ctx)
            lines.append(
                f"  {c.rule.id} ({c.rule.effect}, line {c.rule.line}): " + ("matches" if why is None else why)
            )
        lines.append(f"connection: {conn.effect} by {conn.rule_id}: {conn.reason}")
        lines.append(f"record: {conn.record} by {conn.record_rule_id}")
        if conn.mask is not None:
            lines.append(f"mask: {_describe_mask(conn.mask)}")
        if sql is None:
            return lines
        decision = self.statement(subject, resource, sql, now)
        if decision.classification.parse_error is not None:
            lines.append(f"parse error: {decision.classification.parse_error}")
        for n, v in enumerate(decision.verdicts, 1):
            s = v.statement
            lines.append(
                f"statement {n}: {s.kind} [{s.statement_class}]"
                f" flags={','.join(sorted(s.flags)) or '-'}"
                f" objects={','.join(s.objects) or '-'}"
            )
            sctx = _Context(subject, resource, now, s)
            for c in self._compiled:
                if not c.rule.statement_scoped:
                    continue
                why = c.why_not(sctx)
                lines.append(
                    f"  {c.rule.id} ({c.rule.effect}, line {c.rule.line}): "
                    + ("matches" if why is None else why)
                )
            lines.append(f"  -> {v.effect} by {v.rule_id}: {v.reason}")
        lines.append(f"statement: {decision.effect} by {decision.rule_id}: {decision.reason}")
        lines.append(f"record: {decision.record}")
        if decision.mask is not None:
            lines.append(f"mask: {_describe_mask(decision.mask)}")
        return lines


def _describe_mask(m: Mask) -> str:
    return f"columns={','.join(m.columns) or '-'} detectors={','.join(m.detectors) or '-'} (rule {m.rule_id})"
