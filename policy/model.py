"""The policy model: who connects, to what, the rules, and the decisions made.

Everything here is a frozen value. :mod:`policy.loader` builds the rule side
from TOML; :mod:`policy.evaluate` turns rules into decisions. ``README.md`` in
this folder documents the semantics.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import time
from typing import Any

from policy.classify import Classification, StatementInfo

# Effects. allow/deny decide connections; block decides statements;
# require_approval decides a connection (no statement conditions) or the
# statements it matches; mask and record add settings to either.
ALLOW = "allow"
DENY = "deny"
BLOCK = "block"
REQUIRE_APPROVAL = "require_approval"
MASK = "mask"
RECORD = "record"
EFFECTS = (ALLOW, DENY, BLOCK, REQUIRE_APPROVAL, MASK, RECORD)

RECORD_LEVELS = ("metadata", "statements", "statements+results")
ACTORS = ("human", "automation")
# Masking detectors the masking engine provides; a policy naming another is
# rejected so that a typo cannot silently leave data unmasked.
DETECTORS = ("email", "credit_card", "iban", "phone", "ssn", "ipv4", "ipv6", "jwt", "secret")

# SQLSTATEs for the protocol-native refusals.
SQLSTATE_BLOCKED = "42501"  # insufficient_privilege
SQLSTATE_DENIED = "28000"  # invalid_authorization_specification


@dataclass(frozen=True, slots=True)
class Subject:
    """What is known about who connects; every field may be unknown."""

    subject: str | None = None
    groups: tuple[str, ...] = ()
    issuer: str | None = None
    service_account: str | None = None
    actor: str | None = None  # "human" | "automation" | None
    findings: tuple[str, ...] = ()  # impersonation finding kinds
    unix_user: str | None = None
    loginuid_user: str | None = None
    uid: int | None = None
    loginuid: int | None = None
    # True when a verified token or a service-account mapping speaks for the
    # connection; kernel facts alone never identify.
    identified: bool = False

    def summary(self) -> dict[str, Any]:
        """The known fields as a plain dict (for reports)."""
        out: dict[str, Any] = {}
        for name in self.__slots__:
            value = getattr(self, name)
            if value not in (None, ()):
                out[name] = list(value) if isinstance(value, tuple) else value
        out["identified"] = self.identified
        return out


@dataclass(frozen=True, slots=True)
class Resource:
    """The protected service a connection reaches (``[[protect]]`` name)."""

    service: str
    protocol: str = "postgres"
    database: str | None = None

    def __str__(self) -> str:
        return f"{self.service}/{self.database}" if self.database else self.service


# ---------------------------------------------------------------------------
# Rules as loaded.


@dataclass(frozen=True, slots=True)
class SubjectSet:
    """``[subjects.NAME]``: all given keys must hold; within a key, any value."""

    name: str
    subjects: tuple[str, ...] = ()
    groups: tuple[str, ...] = ()
    issuers: tuple[str, ...] = ()
    service_accounts: tuple[str, ...] = ()
    actors: tuple[str, ...] = ()
    findings: tuple[str, ...] = ()
    unix_users: tuple[str, ...] = ()
    loginuid_users: tuple[str, ...] = ()
    uids: tuple[int, ...] = ()
    loginuids: tuple[int, ...] = ()
    identified: bool | None = None


@dataclass(frozen=True, slots=True)
class ResourceSet:
    """``[resources.NAME]``: services (and optionally databases) it covers."""

    name: str
    services: tuple[str, ...] = ()
    protocols: tuple[str, ...] = ()
    databases: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class TimeWindow:
    """Days of the week (0 = Monday) and a time range, in one time zone."""

    days: frozenset[int] = frozenset(range(7))
    start: time | None = None  # None with end None: the whole day
    end: time | None = None  # may be before start: the range wraps midnight
    timezone: str = "UTC"


@dataclass(frozen=True, slots=True)
class Match:
    """The conditions of a rule (or of its ``unless``); empty keys match all."""

    subjects: tuple[str, ...] = ()  # names of [subjects.*] sets, any of them
    resources: tuple[str, ...] = ()  # names of [resources.*] sets, any of them
    classes: tuple[str, ...] = ()
    kinds: tuple[str, ...] = ()
    flags: tuple[str, ...] = ()
    objects: tuple[str, ...] = ()
    functions: tuple[str, ...] = ()
    pattern: str | None = None
    time: TimeWindow | None = None

    @property
    def statement_conditions(self) -> bool:
        """Whether any condition looks at a statement."""
        return bool(
            self.classes
            or self.kinds
            or self.flags
            or self.objects
            or self.functions
            or self.pattern is not None
        )


@dataclass(frozen=True, slots=True)
class Mask:
    """Columns and detectors whose values are masked in results."""

    columns: tuple[str, ...] = ()
    detectors: tuple[str, ...] = ()
    rule_id: str = ""

    def summary(self) -> dict[str, Any]:
        """A plain dict for audit records."""
        return {"rule_id": self.rule_id, "columns": list(self.columns), "detectors": list(self.detectors)}


@dataclass(frozen=True, slots=True)
class Rule:
    """One ``[[rule]]``, in file order."""

    id: str
    effect: str
    reason: str
    match: Match = field(default_factory=Match)
    unless: Match | None = None
    level: str | None = None  # record rules
    mask: Mask | None = None  # mask rules
    line: int = 0

    @property
    def statement_scoped(self) -> bool:
        """Whether the rule applies per statement (it looks at statements, or blocks)."""
        if self.effect == BLOCK:
            return True
        unless = self.unless.statement_conditions if self.unless else False
        return self.match.statement_conditions or unless


@dataclass(frozen=True, slots=True)
class Defaults:
    """``[defaults]``: what applies when no rule decides."""

    # "deny": an unidentified client is refused unless an allow rule names
    # `identified = false` in one of its subject sets; "allow": unidentified
    # clients are allowed when no rule denies them.
    unidentified: str = DENY
    # "block" or "allow" a query string the parser rejects.
    unparseable: str = BLOCK
    record: str = "statements"


# ---------------------------------------------------------------------------
# Decisions.


@dataclass(frozen=True, slots=True)
class ConnectionDecision:
    """Whether a connection may proceed, and the session settings it gets."""

    effect: str  # allow | deny | require_approval
    rule_id: str
    reason: str
    policy_version: str
    record: str
    record_rule_id: str
    mask: Mask | None = None

    @property
    def allowed(self) -> bool:
        return self.effect == ALLOW

    @property
    def sqlstate(self) -> str:
        return SQLSTATE_DENIED

    @property
    def message(self) -> str:
        """Text for a startup ErrorResponse when the connection is not allowed."""
        verb = "denied" if self.effect == DENY else "needs approval"
        return f"ringfence: connection {verb} by policy rule {self.rule_id}: {self.reason}"

    def to_record(self) -> dict[str, Any]:
        """The ``policy.decision`` audit event body."""
        return {
            "scope": "connection",
            "effect": self.effect,
            "rule_id": self.rule_id,
            "reason": self.reason,
            "policy_version": self.policy_version,
            "record": self.record,
            "record_rule_id": self.record_rule_id,
            "mask": self.mask.summary() if self.mask else None,
        }


@dataclass(frozen=True, slots=True)
class StatementVerdict:
    """The decision for one statement of a query string."""

    statement: StatementInfo
    effect: str  # allow | block | require_approval
    rule_id: str
    reason: str
    record: str


@dataclass(frozen=True, slots=True)
class StatementDecision:
    """Whether a query string may reach the server, and how it is recorded."""

    effect: str  # allow | block | require_approval
    rule_id: str
    reason: str
    policy_version: str
    record: str
    classification: Classification
    verdicts: tuple[StatementVerdict, ...] = ()
    mask: Mask | None = None

    @property
    def allowed(self) -> bool:
        return self.effect == ALLOW

    @property
    def blocked(self) -> bool:
        return self.effect == BLOCK

    @property
    def sqlstate(self) -> str:
        return SQLSTATE_BLOCKED

    @property
    def message(self) -> str:
        """Text for the ErrorResponse of a blocked (or held) statement."""
        verb = "blocked" if self.effect == BLOCK else "needs approval"
        return f"ringfence: statement {verb} by policy rule {self.rule_id}: {self.reason}"

    def to_record(self) -> dict[str, Any]:
        """The ``policy.decision`` audit event body."""
        out: dict[str, Any] = {
            "scope": "statement",
            "effect": self.effect,
            "rule_id": self.rule_id,
            "reason": self.reason,
            "policy_version": self.policy_version,
            "record": self.record,
            "mask": self.mask.summary() if self.mask else None,
        }
        if self.classification.parse_error is not None:
            out["parse_error"] = self.classification.parse_error
        out["statements"] = [
            {**v.statement.summary(), "effect": v.effect, "rule_id": v.rule_id} for v in self.verdicts
        ]
        return out
