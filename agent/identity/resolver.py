"""Which identity a connection speaks for, and whether the process evidence agrees.

Sources, in this order; the first that yields an identity wins:

1. ``in-protocol``: a token given by the client as its password (only asked
   for when the agent holds the service's credentials and nothing below
   identified the connection; a bad token is refused, never skipped);
2. ``login``: a token registered with ``ringfence login`` by the process's uid
   from its audit session;
3. ``env``: the configured variable (``RINGFENCE_TOKEN``) in the environment
   of the process or its ancestors (a bad token there is refused too);
4. ``service-account``: a declared service account the process matches.

Then the actor analysis runs on the process, and for token identities the
impersonation findings; with ``on_finding = "refuse"`` any finding refuses.
A service whose credentials the agent holds always needs an identity.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from agent.config import Config, IdentitySettings, ProtectedService
from agent.identity.actor import ActorVerdict, analyse_actor, set_id
from agent.identity.credentials import UpstreamCredential, load_upstream_credential
from agent.identity.env import PROC, find_env_token
from agent.identity.findings import Finding, FindingAction, UidOf, token_findings, uid_of
from agent.identity.registry import LoginRegistry
from agent.identity.service_accounts import match_service_account
from agent.identity.tokens import TokenRejected, TokenVerifier, VerifiedToken

SOURCES = ("in-protocol", "login", "env", "service-account")
# SQLSTATEs of refusals: a bad password-token, and everything else.
INVALID_PASSWORD = "28P01"
INVALID_AUTHORIZATION = "28000"
PREFIX = "ringfence: "


@dataclass(frozen=True, slots=True)
class IdentityResult:
    """The identity of one connection, the actor evidence, findings and the verdict."""

    actor: ActorVerdict
    source: str | None = None
    subject: str | None = None
    groups: tuple[str, ...] = ()
    token: VerifiedToken | None = None
    service_account: str | None = None
    evidence: tuple[str, ...] = ()
    findings: tuple[Finding, ...] = ()
    finding_action: FindingAction = FindingAction.REFUSE
    rejection: Mapping[str, Any] | None = None
    database_user: str | None = None
    # (SQLSTATE, message) when the connection must be refused.
    refusal: tuple[str, str] | None = None
    # The session should send AuthenticationCleartextPassword and resolve
    # again with the password as the in-protocol token.
    ask_for_token: bool = field(default=False)

    @property
    def identified(self) -> bool:
        return self.subject is not None and self.refusal is None

    def to_record(self) -> dict[str, Any]:
        """The ``identity`` field of a session record; never contains a token."""
        record: dict[str, Any] = {
            "source": self.source,
            "subject": self.subject,
            "groups": list(self.groups),
            "issuer": self.token.issuer if self.token else None,
            "jti": self.token.jti if self.token else None,
            "token_sha256": self.token.token_sha256 if self.token else None,
            "expires": self.token.exp if self.token else None,
            "service_account": self.service_account,
            "database_user": self.database_user,
            "evidence": list(self.evidence),
            "actor": self.actor.to_record(),
            "findings": [
                {**f.to_record(), "action": "refused" if self.refusal else "flagged"} for f in self.findings
            ],
        }
        if self.token is not None:
            record["claims"] = dict(self.token.claims)
        if self.rejection is not None:
            record["rejection"] = dict(self.rejection)
        if self.refusal is not None:
            record["refusal"] = {"sqlstate": self.refusal[0], "message": self.refusal[1]}
        return record


class IdentityResolver:
    """Resolves identities for connections; one per agent, shared by all sessions."""

    def __init__(
        self,
        settings: IdentitySettings,
        verifier: TokenVerifier,
        registry: LoginRegistry,
        *,
        proc: Path = PROC,
        lookup_uid: UidOf = uid_of,
    ) -> None:
        self.settings = settings
        self.verifier = verifier
        self.registry = registry
        self._proc = proc
        self._lookup_uid = lookup_uid

    @classmethod
    def from_config(cls, config: Config) -> IdentityResolver:
        """A resolver with its own verifier and registry, built from the configuration."""
        return cls(config.identity, TokenVerifier.from_settings(config.identity), LoginRegistry())

    async def resolve_async(
        self,
        process: Mapping[str, Any] | None,
        in_protocol_token: str | None = None,
        *,
        service: ProtectedService | None = None,
    ) -> IdentityResult:
        """:meth:`resolve` in a worker thread (it may fetch keys and reads /proc)."""
        return await asyncio.to_thread(self.resolve, process, in_protocol_token, service=service)

    def resolve(
        self,
        process: Mapping[str, Any] | None,
        in_protocol_token: str | None = None,
        *,
        service: ProtectedService | None = None,
    ) -> IdentityResult:
        """The identity of a connection from ``process`` (the attribution's process
        record, None if unattributed) to ``service``."""
        actor = analyse_actor(process)
        result = IdentityResult(actor=actor, finding_action=FindingAction(self.settings.on_finding))
        holds_credentials = service is not None and service.credentials is not None

        if in_protocol_token is not None:
            result = self._from_token(
                result, process, in_protocol_token, "in-protocol", ("password message",)
            )
        else:
            result = self._from_login(result, process)
            if result.source is None and result.refusal is None:
                result = self._from_env(result, process)
            if result.source is None and result.refusal is None:
                result = self._from_service_account(result, process)

        if result.refusal is None and result.source is None:
            if holds_credentials and in_protocol_token is None:
                result = replace(result, ask_for_token=True)
            elif holds_credentials or self.settings.required:
                result = replace(
                    result,
                    refusal=(
                        INVALID_AUTHORIZATION,
                        PREFIX + "no identity for this connection: pass your token as the "
                        "password (PGPASSWORD=$TOKEN) or run `ringfence login` first",
                    ),
                )
        if result.refusal is None and result.source is not None and holds_credentials:
            assert service is not None and service.credentials is not None
            result = replace(result, database_user=service.credentials.user)
        return result

    def upstream_credential(self, service: ProtectedService) -> UpstreamCredential:
        """The credential for ``service`` (raises CredentialError if unreadable)."""
        if service.credentials is None:
            raise ValueError(f"service {service.name} has no [protect.credentials]")
        return load_upstream_credential(service.credentials)

    def _from_token(
        self,
        result: IdentityResult,
        process: Mapping[str, Any] | None,
        token_text: str,
        source: str,
        evidence: tuple[str, ...],
    ) -> IdentityResult:
        try:
            token = self.verifier.verify(token_text)
        except TokenRejected as e:
            where = "" if source == "in-protocol" else f"the token in ${self.settings.env_var}: "
            sqlstate = INVALID_PASSWORD if source == "in-protocol" else INVALID_AUTHORIZATION
            return replace(
                result,
                source=source,
                evidence=evidence,
                rejection=e.to_record(),
                refusal=(sqlstate, PREFIX + where + e.message),
            )
        registrations = self.registry.registrations_of(token)
        return self._with_findings(result, process, token, source, evidence, registrations)

    def _with_findings(
        self,
        result: IdentityResult,
        process: Mapping[str, Any] | None,
        token: VerifiedToken,
        source: str,
        evidence: tuple[str, ...],
        registrations: tuple[Any, ...] = (),
    ) -> IdentityResult:
        findings = token_findings(
            token, process, result.actor, self.settings, registrations, self._lookup_uid
        )
        refusal = None
        if findings and result.finding_action is FindingAction.REFUSE:
            refusal = (
                INVALID_AUTHORIZATION,
                PREFIX + "refused: " + findings[0].detail,
            )
        return replace(
            result,
            source=source,
            subject=token.subject,
            groups=token.groups,
            token=token,
            evidence=evidence,
            findings=findings,
            refusal=refusal,
        )

    def _from_login(self, result: IdentityResult, process: Mapping[str, Any] | None) -> IdentityResult:
        if process is None or not isinstance(process.get("uid"), int):
            return result
        uid = process["uid"]
        session = set_id(process.get("audit_session"))
        registration = self.registry.lookup(uid, session)
        if registration is None:
            return result
        evidence = (
            f"ringfence login by uid {registration.uid} in audit session "
            f"{registration.audit_session} (pid {registration.pid})",
        )
        return self._with_findings(result, process, registration.token, "login", evidence)

    def _from_env(self, result: IdentityResult, process: Mapping[str, Any] | None) -> IdentityResult:
        found = find_env_token(process, self.settings.env_var, proc=self._proc)
        if found is None:
            return result
        evidence = (f"${self.settings.env_var} in the {found.evidence}",)
        return self._from_token(result, process, found.value, "env", evidence)

    def _from_service_account(
        self, result: IdentityResult, process: Mapping[str, Any] | None
    ) -> IdentityResult:
        match = match_service_account(self.settings.service_accounts, process)
        if match is None:
            return result
        account = match.account
        return replace(
            result,
            source="service-account",
            subject=account.identity_subject,
            groups=account.groups,
            service_account=account.name,
            evidence=match.evidence,
        )
