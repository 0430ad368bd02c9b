"""Identity through the agent: OIDC tokens bound to kernel evidence, with real psql.

A small OIDC issuer (discovery document and JWKS) runs on the database host's
loopback; the agent trusts it, holds the real database credential of role
``app``, and logs in upstream itself (SCRAM-SHA-256).
"""

from __future__ import annotations

import base64
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import require
from tests.support.agent import REPO, AgentProcess
from tests.support.netns import NetNS, call_in, netns
from tests.support.oidc import TestIssuer, b64url, unsigned_token
from tests.support.pgserver import PgServer, pgserver

NOBODY = 65534
APP_PASSWORD = "app-secret-never-shown"


class Stack:
    def __init__(self, ns: NetNS, server: PgServer, idp: TestIssuer, agent: AgentProcess) -> None:
        self.ns, self.server, self.idp, self.agent = ns, server, idp, agent

    def psql_argv(self, sql: str, user: str = "alice") -> list[str]:
        return [self.server.tool("psql"), "-X", "-w", "-P", "pager=off", "-h", "127.0.0.1", "-U", user,
                "-d", "postgres",
                "-tAc", sql]

    def interactive(self, argv: list[str], env: dict[str, str] | None = None,
                    loginuid: int = 1000, uid: int = NOBODY, before: str = "") -> list[str]:
        """A login session (loginuid set) with a terminal (script's pty), as ``uid``."""
        exports = " ".join(f"{k}={shlex.quote(v)}" for k, v in (env or {}).items())
        inner = f"exec setpriv --reuid={uid} --regid={uid} --clear-groups env {exports} {shlex.join(argv)}"
        script = (f"echo {loginuid} > /proc/self/loginuid && {before} "
                  f"exec script -qec {shlex.quote(inner)} /dev/null")
        return ["sh", "-c", script]

    def run(self, argv: list[str]) -> subprocess.CompletedProcess[str]:
        return subprocess.run(self.ns.argv(argv), capture_output=True, text=True, timeout=60,
                              stdin=subprocess.DEVNULL)


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    require(os.geteuid() == 0, "root")
    require(Path("/usr/lib/postgresql").is_dir(), "a PostgreSQL server (postgresql package)")
    require(shutil.which("script") is not None, "script (bsdutils)")
    workdir = Path(tempfile.mkdtemp(prefix="ringfence-identity-"))
    # Users run `ringfence login`: the config and the control socket's directory are world-readable,
    # as /etc/ringfence and /run/ringfence are on a host.
    workdir.chmod(0o755)
    secret = workdir / "postgres-app"
    secret.write_text(APP_PASSWORD + "\n")
    secret.chmod(0o600)
    policy = workdir / "policy.toml"
    policy.write_text('[defaults]\nunidentified = "deny"\n\n[subjects.people]\nidentified = true\n\n'
                      '[[rule]]\nid = "people"\neffect = "allow"\nsubjects = ["people"]\n'
                      'reason = "verified identities may connect"\n')
    with netns("rfid") as ns, pgserver(ns, passwords={"app": APP_PASSWORD}) as server:
        idp = call_in(ns, TestIssuer)
        with idp:
            services = f"""
[[protect]]
name = "postgres"
protocol = "postgres"
port = 5432

[protect.credentials]
user = "app"
password_file = "{secret}"
"""
            extra = f"""
[identity]
# Let a rotation be picked up a second after the previous refresh (default 30 s).
jwks_min_refresh_seconds = 1

[[identity.issuers]]
issuer = "{idp.url}"
audience = "ringfence"
discovery = true
groups_claim = "groups"
"""
            agent = AgentProcess(ns, workdir / "agent", extra=extra, services=services, policy=policy)
            agent.start()
            try:
                yield Stack(ns, server, idp, agent)
            finally:
                if agent.running:
                    agent.stop()
    shutil.rmtree(workdir, ignore_errors=True)


def starts(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in records if r["type"] == "session.start"]


def test_token_as_password_connects_as_the_mapped_role(stack: Stack) -> None:
    """PGPASSWORD=<token> psql: the server sees role app, the record shows subject, groups, issuer,
    source in-protocol, mapped user and the process; the token reaches neither server nor trail."""
    token = stack.idp.mint("alice@example.com")
    done = stack.run(stack.interactive(stack.psql_argv("select current_user"), {"PGPASSWORD": token}))
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.strip() == "app"

    def alice(rs: list[dict[str, Any]]) -> dict[str, Any] | None:
        return next((r for r in starts(rs) if (r.get("identity") or {}).get("subject")
                     == "alice@example.com" and r["identity"]["source"] == "in-protocol"), None)

    start = stack.agent.wait_for(alice)
    identity = start["identity"]
    assert identity["groups"] == ["dba", "staff"]
    assert identity["issuer"] == stack.idp.url
    assert identity["database_user"] == "app" and start["target"]["user"] == "app"
    assert identity["actor"]["kind"] == "human"
    assert start["process"]["uid"] == NOBODY and start["process"]["loginuid"] == 1000
    assert start["process"]["exe"].endswith("/psql")
    signature = token.rsplit(".", 1)[1]
    assert signature not in json.dumps(stack.agent.records())
    assert signature not in stack.server.log.read_text(errors="replace")
    assert APP_PASSWORD not in json.dumps(stack.agent.records())


def _forged_tokens(idp: TestIssuer) -> dict[str, tuple[str, str]]:
    """Each bad token with the words its refusal must contain."""
    now = int(time.time())
    rsa = idp.key("RS256")
    good = idp.mint("alice@example.com")
    head, body, sig = good.split(".")
    payload = json.loads(base64.urlsafe_b64decode(body + "=="))
    payload["sub"] = "mallory@example.com"
    tampered = f"{head}.{b64url(json.dumps(payload).encode())}.{sig}"
    # HS256 keyed with the RSA public key: the classic algorithm-confusion forgery.
    hs_header = {"alg": "HS256", "kid": rsa.kid, "typ": "JWT"}
    hs_claims = idp.claims()
    hs256 = unsigned_token(hs_header, hs_claims, _hmac(rsa.public_pem(), hs_header, hs_claims))
    return {
        "expired": (idp.mint(exp=now - 3600, iat=now - 7200, nbf=now - 7200), "expired at"),
        "not yet valid": (idp.mint(nbf=now + 3600), "not valid before"),
        "wrong audience": (idp.mint(aud="someone-else"), "audience"),
        "wrong issuer": (idp.mint(iss="https://evil.example.com"), "is not trusted here"),
        "alg none": (unsigned_token({"alg": "none", "typ": "JWT"}, idp.claims()), "unsigned (alg none)"),
        "hs256 with the rsa public key": (hs256, "shared secret (HS256)"),
        "unknown kid": (idp.mint(kid="no-such-key"), "signing key 'no-such-key' is not published"),
        "tampered payload": (tampered, "signature does not verify"),
        "garbage": ("this-is-not-a-token", "is not a token"),
    }


def _hmac(key: bytes, header: dict[str, Any], claims: dict[str, Any]) -> bytes:
    import hashlib
    import hmac

    signing_input = (b64url(json.dumps(header).encode()) + "." + b64url(json.dumps(claims).encode()))
    return hmac.new(key, signing_input.encode(), hashlib.sha256).digest()


def test_each_bad_token_is_refused_with_its_own_message(stack: Stack) -> None:
    """Expired, not yet valid, wrong audience or issuer, alg none, HS256 keyed with the RSA public
    key, unknown kid, tampered payload and garbage are each refused clearly and recorded."""
    messages: dict[str, str] = {}
    for case, (token, words) in _forged_tokens(stack.idp).items():
        done = stack.run(stack.interactive(stack.psql_argv("select 1"), {"PGPASSWORD": token}))
        output = done.stdout + done.stderr
        assert done.returncode != 0, f"{case}: accepted"
        assert "FATAL:  ringfence:" in output, f"{case}: {output}"
        line = next(x for x in output.splitlines() if "FATAL:  ringfence:" in x)
        assert words.lower() in line.lower(), f"{case}: {line}"
        messages[case] = line
    assert len(set(messages.values())) == len(messages), "every refusal says what is wrong"
    ends = stack.agent.wait_for(
        lambda rs: [r for r in rs if r["type"] == "session.end"
                    and r["reason"].startswith("identity refused")] if len(
            [r for r in rs if r["type"] == "session.end"
             and r["reason"].startswith("identity refused")]) >= len(messages) else None)
    assert all(e["error"]["sqlstate"] == "28P01" for e in ends)


def test_login_registration_then_plain_psql(stack: Stack) -> None:
    """After `ringfence login` in a login session, plain psql there is attributed to the token's
    subject; the same psql as another uid is not."""
    token_file = stack.agent.workdir.parent / "bob.token"
    token_file.write_text(stack.idp.mint("bob@example.com"))
    token_file.chmod(0o644)
    ringfence = shlex.join([sys.executable, "-m", "agent.cli", "login",
                            "--config", str(stack.agent.config), "--token-file", str(token_file)])
    before = (f"cd {REPO} && setpriv --reuid={NOBODY} --regid={NOBODY} --clear-groups "
              f"env PYTHONPATH={REPO} {ringfence} && ")
    done = stack.run(stack.interactive(stack.psql_argv("select current_user"), before=before))
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.strip().endswith("app")

    def bob(rs: list[dict[str, Any]]) -> dict[str, Any] | None:
        return next((r for r in starts(rs) if (r.get("identity") or {}).get("subject")
                     == "bob@example.com"), None)

    start = stack.agent.wait_for(bob)
    assert start["identity"]["source"] == "login"

    other = stack.run(stack.interactive(stack.psql_argv("select current_user"), uid=1,
                                        before=before))
    assert other.returncode != 0
    assert "app" not in other.stdout.splitlines()[-1:]


def test_human_token_in_a_service_is_an_impersonation(stack: Stack) -> None:
    """A person's token in the environment of a process with no tty and no loginuid (a service)
    is refused with an impersonation finding; the same token from a terminal login is accepted."""
    token = stack.idp.mint("carol@example.com")
    service = ["setsid", "env", f"RINGFENCE_TOKEN={token}", "setpriv", f"--reuid={NOBODY}",
               f"--regid={NOBODY}", "--clear-groups", *stack.psql_argv("select current_user")]
    done = stack.run(service)
    assert done.returncode != 0
    assert "FATAL:  ringfence:" in done.stderr

    def carol_refused(rs: list[dict[str, Any]]) -> dict[str, Any] | None:
        return next((r for r in starts(rs) if (r.get("identity") or {}).get("subject")
                     == "carol@example.com" and r["identity"].get("findings")), None)

    start = stack.agent.wait_for(carol_refused)
    finding = start["identity"]["findings"][0]
    assert finding["action"] == "refused"
    assert start["identity"]["actor"]["kind"] == "automation"
    events = [r for r in stack.agent.records() if r["type"] == "identity.finding"
              and r["session_id"] == start["session_id"]]
    assert events and events[0]["kind"] == finding["kind"] and events[0]["evidence"]

    ok = stack.run(stack.interactive(stack.psql_argv("select current_user"),
                                     {"RINGFENCE_TOKEN": token}))
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert ok.stdout.strip().endswith("app")


def test_key_rotation_is_picked_up_without_restart(stack: Stack) -> None:
    """A token signed with a key the issuer rotated in is accepted after the JWKS refresh."""
    pid = stack.agent.process.pid  # type: ignore[union-attr]
    time.sleep(1.5)  # past the refresh rate limit set in the config
    fresh = stack.idp.rotate("RS256")
    token = stack.idp.mint("dave@example.com", key=fresh)
    done = stack.run(stack.interactive(stack.psql_argv("select current_user"), {"PGPASSWORD": token}))
    assert done.returncode == 0, done.stdout + done.stderr
    assert stack.agent.process.pid == pid and stack.agent.running  # type: ignore[union-attr]
    assert stack.idp.requests["/jwks"] >= 2
