"""The four impersonation findings, each raised and each not raised when facts agree."""

from __future__ import annotations

import time
from typing import Any

from agent.config import IdentitySettings, ServiceAccountConfig
from agent.identity.actor import analyse_actor
from agent.identity.findings import (
    human_token_by_automation,
    service_account_misuse,
    session_mismatch,
    subject_user_mismatch,
    token_findings,
)
from agent.identity.registry import Registration
from agent.identity.tokens import VerifiedToken
from tests.unit.identity.conftest import process, service_process


def token(subject: str = "alice@example.com", **kw: Any) -> VerifiedToken:
    fields: dict[str, Any] = {
        "issuer": "https://idp.example.com",
        "subject": subject,
        "groups": ("dba",),
        "jti": "jti-1",
        "exp": int(time.time()) + 600,
        "iat": int(time.time()),
        "audience": ("ringfence",),
        "algorithm": "RS256",
        "key_id": "k1",
        "token_sha256": "ab" * 32,
    }
    fields.update(kw)
    return VerifiedToken(**fields)


USERS = {"alice": 1000, "bob": 1001}.get


def test_human_token_by_automation() -> None:
    """A person's token used by a systemd service is a finding carrying the actor evidence."""
    actor = analyse_actor(service_process())
    finding = human_token_by_automation(token(), actor, ())
    assert finding is not None and finding.kind == "human_token_by_automation"
    assert "alice@example.com" in finding.detail and "etl.service" in finding.detail
    assert finding.evidence == actor.evidence


def test_human_token_by_human_or_workload_token_by_automation_is_fine() -> None:
    """No finding for a person at a terminal, nor for automation subjects or automation issuers."""
    assert human_token_by_automation(token(), analyse_actor(process()), ()) is None
    automation = analyse_actor(service_process())
    assert human_token_by_automation(token("ci-deploy"), automation, ("ci-*",)) is None
    assert human_token_by_automation(token(subject_kind="automation"), automation, ()) is None


def test_session_mismatch() -> None:
    """A token registered by uid 1000 in session 7 and used from session 9 is a finding."""
    t = token()
    registered = Registration(1000, 7, 555, t, time.time())
    assert session_mismatch(t, process(), [registered]) is None
    finding = session_mismatch(t, process(audit_session=9), [registered])
    assert finding is not None and finding.kind == "session_mismatch"
    assert "audit session 7" in finding.detail and "audit session 9" in finding.detail
    other_uid = session_mismatch(t, process(uid=1001), [registered])
    assert other_uid is not None and "uid 1001" in other_uid.detail


def test_subject_user_mismatch() -> None:
    """A subject mapped to alice used by bob's login is a finding; by alice's it is not."""
    settings = IdentitySettings(subject_users=(("alice@example.com", "alice"),))
    assert subject_user_mismatch(token(), process(), settings, USERS) is None
    assert subject_user_mismatch(token(), process(loginuid=1000, uid=33), settings, USERS) is None
    finding = subject_user_mismatch(token(), process(loginuid=1001, uid=1001), settings, USERS)
    assert finding is not None and finding.kind == "subject_user_mismatch"
    assert "loginuid is 1001" in finding.detail
    assert "local user alice has uid 1000" in finding.evidence
    no_login = subject_user_mismatch(token(), process(loginuid=None, uid=1001), settings, USERS)
    assert no_login is not None and "uid (loginuid unset) is 1001" in no_login.detail
    unmapped = subject_user_mismatch(token("carol"), process(loginuid=1001), settings, USERS)
    assert unmapped is None


def test_subject_mapped_to_missing_user() -> None:
    """A subject mapped to a user this host does not have is a finding."""
    settings = IdentitySettings(subject_users=(("alice@example.com", "nosuchuser"),))
    finding = subject_user_mismatch(token(), process(), settings, USERS)
    assert finding is not None and "no local user nosuchuser" in finding.evidence


def test_service_account_misuse() -> None:
    """A service account's token from a process outside its declared unit and exe is a finding."""
    account = ServiceAccountConfig(
        "etl", unit="etl.service", exe="/usr/bin/python3.11", token_subjects=("svc-etl",)
    )
    settings = IdentitySettings(service_accounts=(account,))
    assert service_account_misuse(token("svc-etl"), service_process(), settings) is None
    finding = service_account_misuse(token("svc-etl"), process(), settings)
    assert finding is not None and finding.kind == "service_account_misuse"
    assert "unit session-7.scope != etl.service" in finding.evidence
    assert service_account_misuse(token("alice@example.com"), process(), settings) is None


def test_token_findings_collects_all() -> None:
    """Several disagreements yield several findings, in a fixed order."""
    settings = IdentitySettings(subject_users=(("alice@example.com", "alice"),))
    record = service_process(uid=1001)
    t = token()
    registered = Registration(1000, 7, 555, t, time.time())
    kinds = [f.kind for f in token_findings(t, record, analyse_actor(record), settings, [registered], USERS)]
    assert kinds == ["human_token_by_automation", "session_mismatch", "subject_user_mismatch"]
