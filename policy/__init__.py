"""Policy model, loader, evaluation and statement classification.

The whole API the agent needs::

    holder = PolicyHolder(config.policy.path)        # raises PolicyError: refuse to start
    policy = holder.current                          # read it once per decision

    # startup, after attribution and identity
    d = policy.connection(subject, resource, now)    # -> ConnectionDecision
    #   write d.to_record() as a policy.decision audit event (durably), then
    #   if not d.allowed: ErrorResponse(d.sqlstate == "28000", d.message), close
    #   d.record is the session's record level, d.mask its masking settings

    # simple query
    d = policy.statement(subject, resource, sql, now)   # -> StatementDecision
    #   audit d.to_record(); if d.blocked: ErrorResponse("42501", d.message),
    #   then ReadyForQuery; nothing is forwarded

    # extended protocol: classify once per Parse, judge when it runs
    c = policy.prepared(sql)                             # -> Classification (LRU cached)
    d = policy.statement(subject, resource, c, now)

    # SIGHUP and a periodic timer
    ok, message = holder.reload()        # or holder.maybe_reload() -> None if unchanged

Decisions are frozen values carrying ``effect``, ``rule_id``, ``reason``,
``policy_version`` (sha256 of the policy file) and ``to_record()``. See
``policy/README.md`` for the file format and the semantics.
"""

from policy.classify import (
    CLASSES,
    FLAGS,
    Classification,
    Classifier,
    StatementInfo,
    classify,
    classify_replication,
    default_classifier,
)
from policy.evaluate import Policy
from policy.loader import DEFAULT_POLICY_PATH, PolicyError, load_policy, parse_policy
from policy.model import (
    ALLOW,
    BLOCK,
    DENY,
    EFFECTS,
    MASK,
    RECORD,
    RECORD_LEVELS,
    REQUIRE_APPROVAL,
    SQLSTATE_BLOCKED,
    SQLSTATE_DENIED,
    ConnectionDecision,
    Mask,
    Resource,
    StatementDecision,
    StatementVerdict,
    Subject,
)
from policy.watch import PolicyHolder

__all__ = [
    "ALLOW",
    "BLOCK",
    "CLASSES",
    "DEFAULT_POLICY_PATH",
    "DENY",
    "EFFECTS",
    "FLAGS",
    "MASK",
    "RECORD",
    "RECORD_LEVELS",
    "REQUIRE_APPROVAL",
    "SQLSTATE_BLOCKED",
    "SQLSTATE_DENIED",
    "Classification",
    "Classifier",
    "ConnectionDecision",
    "Mask",
    "Policy",
    "PolicyError",
    "PolicyHolder",
    "Resource",
    "StatementDecision",
    "StatementInfo",
    "StatementVerdict",
    "Subject",
    "classify",
    "classify_replication",
    "default_classifier",
    "load_policy",
    "parse_policy",
]
