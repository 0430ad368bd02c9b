"""Impersonation findings: where the claim (a token) and the evidence (the
process) disagree. Each is recorded with its evidence; the configured action
(refuse by default, or flag) decides whether the connection goes on.

* ``human_token_by_automation``: a person's token used by an automated process;
* ``session_mismatch``: a token registered by one uid/audit session used from another;
* ``subject_user_mismatch``: the token's subject maps to a local user other
  than the process's login user;
* ``service_account_misuse``: a service account's token used from a process
  that does not match the account's declared unit/cgroup/exe/uid.
"""

from __future__ import annotations

import fnmatch
import pwd
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from agent.config import IdentitySettings
from agent.identity.actor import ActorVerdict, set_id
from agent.identity.registry import Registration
from agent.identity.service_accounts import compare
from agent.identity.tokens import VerifiedToken

FINDING_KINDS = (
    "human_token_by_automation",
    "session_mismatch",
    "subject_user_mismatch",
    "service_account_misuse",
)


class FindingAction(StrEnum):
    """What a finding does to the connection."""

    REFUSE = "refuse"
    FLAG = "flag"


@dataclass(frozen=True, slots=True)
class Finding:
    """One disagreement between a token's claim and the process evidence."""

    kind: str
    detail: str
    evidence: tuple[str, ...]

    def to_record(self) -> dict[str, Any]:
        return {"kind": self.kind, "detail": self.detail, "evidence": list(self.evidence)}


def is_human_subject(token: VerifiedToken, automation_subjects: Iterable[str]) -> bool:
    """Whether the token names a person: its issuer says so and no automation pattern matches."""
    if token.subject_kind != "human":
        return False
    return not any(fnmatch.fnmatchcase(token.subject, p) for p in automation_subjects)


def human_token_by_automation(
    token: VerifiedToken, actor: ActorVerdict, automation_subjects: Iterable[str]
) -> Finding | None:
    if actor.kind != "automation" or not is_human_subject(token, automation_subjects):
        return None
    return Finding(
        "human_token_by_automation",
        f"the token of person {token.subject} is used by an automated process "
        f"({'; '.join(actor.evidence[:3])}); automation needs its own service account or "
        "workload token",
        actor.evidence,
    )


def session_mismatch(
    token: VerifiedToken,
    process: Mapping[str, Any] | None,
    registrations: Iterable[Registration],
) -> Finding | None:
    uid = process.get("uid") if process else None
    session = set_id(process.get("audit_session")) if process else None
    elsewhere = [r for r in registrations if (r.uid, r.audit_session) != (uid, session)]
    if not elsewhere:
        return None
    r = elsewhere[0]
    return Finding(
        "session_mismatch",
        f"the token of {token.subject} was registered by uid {r.uid} in audit session "
        f"{r.audit_session} and is used from uid {uid} in audit session {session}",
        (
            f"registered by uid {r.uid} session {r.audit_session} pid {r.pid}",
            f"used by uid {uid} session {session}",
        ),
    )


UidOf = Callable[[str], int | None]


def uid_of(user: str) -> int | None:
    """The uid of a local user name, or None if there is no such user."""
    try:
        return pwd.getpwnam(user).pw_uid
    except KeyError:
        return None


def subject_user_mismatch(
    token: VerifiedToken,
    process: Mapping[str, Any] | None,
    settings: IdentitySettings,
    lookup_uid: UidOf = uid_of,
) -> Finding | None:
    user = settings.local_user_for(token.subject)
    if user is None or process is None:
        return None
    expected = lookup_uid(user)
    loginuid = set_id(process.get("loginuid"))
    actual = loginuid if loginuid is not None else process.get("uid")
    what = "loginuid" if loginuid is not None else "uid (loginuid unset)"
    if expected is not None and expected == actual:
        return None
    found = f"local user {user} has uid {expected}" if expected is not None else f"no local user {user}"
    return Finding(
        "subject_user_mismatch",
        f"the token of {token.subject} belongs to local user {user}, but the process's {what} is {actual}",
        (f"subject {token.subject} maps to {user}", found, f"process {what} {actual}"),
    )


def service_account_misuse(
    token: VerifiedToken, process: Mapping[str, Any] | None, settings: IdentitySettings
) -> Finding | None:
    for account in settings.service_accounts:
        if token.subject not in account.token_subjects:
            continue
        ok, facts = compare(account, process or {})
        if ok:
            return None
        return Finding(
            "service_account_misuse",
            f"the token of service account {account.name} is used from a process that "
            "does not match the account's declaration",
            facts,
        )
    return None


def token_findings(
    token: VerifiedToken,
    process: Mapping[str, Any] | None,
    actor: ActorVerdict,
    settings: IdentitySettings,
    registrations: Iterable[Registration] = (),
    lookup_uid: UidOf = uid_of,
) -> tuple[Finding, ...]:
    """Every finding for a token used by this process (registrations: those of the same token)."""
    found = (
        human_token_by_automation(token, actor, settings.automation_subjects),
        session_mismatch(token, process, registrations),
        subject_user_mismatch(token, process, settings, lookup_uid),
        service_account_misuse(token, process, settings),
    )
    return tuple(f for f in found if f is not None)
