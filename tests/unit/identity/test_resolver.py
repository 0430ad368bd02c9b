"""The resolver: sources in order, refusals with SQLSTATEs and clear messages,
findings refused or flagged, and records that never hold a token."""

from __future__ import annotations

import asyncio
import json
import subprocess
import time
from dataclasses import replace
from typing import Any

import pytest

from agent.config import (
    IdentitySettings,
    IssuerConfig,
    ProtectedService,
    ServiceAccountConfig,
    ServiceCredentials,
)
from agent.identity.registry import LoginRegistry
from agent.identity.resolver import IdentityResolver
from agent.identity.tokens import TokenVerifier
from tests.support.oidc import TestIssuer
from tests.support.procs import wait_until_running
from tests.unit.identity.conftest import process, service_process

PG = ProtectedService("pg", 5432, "postgres", 15432, ServiceCredentials("app", password_env="X"))
PASSTHROUGH = ProtectedService("pg", 5432, "postgres", 15432)


def resolver(idp: TestIssuer, **settings: Any) -> IdentityResolver:
    issuer = IssuerConfig(idp.url, "ringfence", discovery=True, groups_claim="groups")
    identity = IdentitySettings(issuers=(issuer,), **settings)
    return IdentityResolver(identity, TokenVerifier(identity.issuers), LoginRegistry())


def no_token_in(record: dict[str, Any], token: str) -> None:
    text = json.dumps(record, default=str)
    assert token not in text and token.split(".")[2] not in text


def test_in_protocol_token(idp: TestIssuer) -> None:
    """A valid password-token identifies the connection; the record shows who, how and the mapped user."""
    token = idp.mint("alice@example.com", jti="j-7")
    result = resolver(idp).resolve(process(), token, service=PG)
    assert result.identified and result.refusal is None
    record = result.to_record()
    assert record["source"] == "in-protocol"
    assert (record["subject"], record["issuer"], record["jti"]) == ("alice@example.com", idp.url, "j-7")
    assert record["groups"] == ["dba", "staff"] and record["database_user"] == "app"
    assert record["actor"]["kind"] == "human" and record["findings"] == []
    assert len(record["token_sha256"]) == 64
    no_token_in(record, token)


def test_bad_in_protocol_token_is_refused_as_invalid_password(idp: TestIssuer) -> None:
    """An expired password-token gets 28P01, a message saying what to do, and the reason on record."""
    now = int(time.time())
    token = idp.mint(exp=now - 300, iat=now - 900, nbf=now - 900)
    result = resolver(idp).resolve(process(), token, service=PG)
    assert result.refusal is not None
    sqlstate, message = result.refusal
    assert sqlstate == "28P01"
    assert message.startswith("ringfence: the token expired at ") and "ringfence login" in message
    record = result.to_record()
    assert record["rejection"]["code"] == "expired" and record["database_user"] is None
    no_token_in(record, token)


def test_garbage_password_is_refused(idp: TestIssuer) -> None:
    """A plain password where a token is expected is refused as not a token."""
    result = resolver(idp).resolve(process(), "hunter2", service=PG)
    assert result.refusal is not None and "not a token" in result.refusal[1]
    assert "hunter2" not in json.dumps(result.to_record())


def test_human_token_from_a_service_is_refused(idp: TestIssuer) -> None:
    """A person's token used by a systemd service is refused (28000) with the finding on record."""
    result = resolver(idp).resolve(service_process(), idp.mint(), service=PG)
    assert result.refusal is not None and result.refusal[0] == "28000"
    assert "automated process" in result.refusal[1]
    finding = result.to_record()["findings"][0]
    assert finding["kind"] == "human_token_by_automation" and finding["action"] == "refused"
    assert "in system service etl.service" in finding["evidence"]


def test_flag_lets_findings_through(idp: TestIssuer) -> None:
    """With on_finding = flag the same connection goes on, flagged."""
    result = resolver(idp, on_finding="flag").resolve(service_process(), idp.mint(), service=PG)
    assert result.refusal is None and result.identified
    assert result.to_record()["findings"][0]["action"] == "flagged"


def test_login_registration(idp: TestIssuer) -> None:
    """A registered login identifies later connections of the same uid and audit session only."""
    r = resolver(idp)
    token = r.verifier.verify(idp.mint("bob@example.com"))
    r.registry.register(1000, 7, 99, token)
    result = r.resolve(process(), None, service=PG)
    assert (result.source, result.subject, result.database_user) == ("login", "bob@example.com", "app")
    assert "audit session 7" in result.evidence[0]
    other_uid = r.resolve(process(uid=1001), None, service=PG)
    assert other_uid.source is None and other_uid.ask_for_token
    other_session = r.resolve(process(audit_session=8), None, service=PG)
    assert other_session.source is None


def test_token_registered_elsewhere_is_a_finding(idp: TestIssuer) -> None:
    """A token registered in session 7 and passed as the password from session 9 is refused."""
    r = resolver(idp)
    text = idp.mint()
    r.registry.register(1000, 7, 99, r.verifier.verify(text))
    result = r.resolve(process(audit_session=9), text, service=PG)
    assert result.refusal is not None
    assert [f.kind for f in result.findings] == ["session_mismatch"]


def test_ask_for_token_when_the_agent_holds_credentials(idp: TestIssuer) -> None:
    """With no other identity, a service whose credentials the agent holds asks for a token."""
    r = resolver(idp)
    first = r.resolve(process(), None, service=PG)
    assert first.ask_for_token and first.refusal is None and first.source is None
    passthrough = r.resolve(process(), None, service=PASSTHROUGH)
    assert not passthrough.ask_for_token and passthrough.refusal is None
    assert passthrough.to_record()["source"] is None


def test_required_identity(idp: TestIssuer) -> None:
    """identity.required refuses unidentified connections with a message naming the remedies."""
    result = resolver(idp, required=True).resolve(process(), None, service=PASSTHROUGH)
    assert result.refusal is not None
    assert result.refusal[0] == "28000" and "ringfence login" in result.refusal[1]


def test_service_account(idp: TestIssuer) -> None:
    """A declared service account identifies a matching process that has no token."""
    account = ServiceAccountConfig("etl", unit="etl.service", groups=("batch",))
    r = resolver(idp, service_accounts=(account,))
    result = r.resolve(service_process(), None, service=PG)
    record = result.to_record()
    assert (record["source"], record["subject"], record["service_account"]) == (
        "service-account",
        "service:etl",
        "etl",
    )
    assert record["groups"] == ["batch"] and record["actor"]["kind"] == "automation"
    assert record["evidence"] == ["unit etl.service = etl.service"]


@pytest.fixture
def child_with_token(idp: TestIssuer) -> Any:
    procs: list[subprocess.Popen[bytes]] = []

    def start(token: str) -> dict[str, Any]:
        child = subprocess.Popen(["sleep", "30"], env={"RINGFENCE_TOKEN": token})
        procs.append(child)
        wait_until_running(child.pid, ["sleep", "30"])
        return process(pid=child.pid, comm="sleep", ancestry=[])

    yield start
    for child in procs:
        child.kill()
        child.wait()


def test_env_token(idp: TestIssuer, child_with_token: Any) -> None:
    """A token in the process's environment identifies it, with the pid it was read from."""
    token = idp.mint("carol@example.com")
    record = child_with_token(token)
    result = resolver(idp).resolve(record, None, service=PG)
    assert (result.source, result.subject) == ("env", "carol@example.com")
    assert f"environment of pid {record['pid']}" in result.evidence[0]
    no_token_in(result.to_record(), token)


def test_bad_env_token_is_refused(idp: TestIssuer, child_with_token: Any) -> None:
    """A token in the environment with the wrong audience is refused, naming the variable."""
    record = child_with_token(idp.mint(aud="elsewhere"))
    result = resolver(idp).resolve(record, None, service=PG)
    assert result.refusal is not None and result.refusal[0] == "28000"
    assert result.refusal[1].startswith("ringfence: the token in $RINGFENCE_TOKEN: ")


def test_login_comes_before_env(idp: TestIssuer, child_with_token: Any) -> None:
    """A registered login wins over a token in the environment."""
    r = resolver(idp)
    record = child_with_token(idp.mint("carol@example.com"))
    r.registry.register(1000, 7, 99, r.verifier.verify(idp.mint("bob@example.com")))
    assert r.resolve(record, None, service=PG).subject == "bob@example.com"


def test_unattributed_connection(idp: TestIssuer) -> None:
    """Without a process record, a token still identifies; the actor is unknown."""
    result = resolver(idp).resolve(None, idp.mint(), service=PG)
    assert result.identified and result.actor.kind == "unknown"


def test_resolve_async(idp: TestIssuer) -> None:
    """resolve_async gives the same answer from a worker thread."""
    r = resolver(idp)
    result = asyncio.run(r.resolve_async(process(), idp.mint(), service=PG))
    assert result.source == "in-protocol"


def test_upstream_credential(idp: TestIssuer) -> None:
    """The resolver hands out the service's credential; a passthrough service has none."""
    r = resolver(idp)
    service = replace(PG, credentials=ServiceCredentials("app", None, None, "trust"))
    assert r.upstream_credential(service).user == "app"
    with pytest.raises(ValueError):
        r.upstream_credential(PASSTHROUGH)
