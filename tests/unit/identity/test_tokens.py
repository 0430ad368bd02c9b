"""Token verification against a real issuer on loopback: every rejection has its
own code and message, keys come from discovery or a file, rotation is picked up."""

from __future__ import annotations

import hashlib
import hmac
import json
import time
from pathlib import Path

import pytest

from agent.config import IssuerConfig
from agent.identity.tokens import TokenRejected, TokenVerifier, token_sha256
from tests.support.oidc import TestIssuer, b64url, new_key, unsigned_token


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def discovery(idp: TestIssuer, **kw: object) -> IssuerConfig:
    return IssuerConfig(
        issuer=idp.url,
        audience="ringfence",
        discovery=True,
        groups_claim="groups",
        **kw,  # type: ignore[arg-type]
    )


@pytest.fixture
def verifier(idp: TestIssuer) -> TokenVerifier:
    return TokenVerifier([discovery(idp)], leeway_seconds=30)


def rejected(verifier: TokenVerifier, token: str) -> TokenRejected:
    with pytest.raises(TokenRejected) as info:
        verifier.verify(token)
    assert token not in info.value.message
    assert token not in json.dumps(info.value.to_record(), default=str)
    return info.value


@pytest.mark.parametrize("algorithm", ["RS256", "ES256", "EdDSA"])
def test_accepts_each_allowed_algorithm(idp: TestIssuer, verifier: TokenVerifier, algorithm: str) -> None:
    """A token signed with RS256, ES256 or EdDSA by the issuer verifies, with its claims."""
    token = idp.mint("alice@example.com", algorithm=algorithm, jti="j-1")
    v = verifier.verify(token)
    assert (v.issuer, v.subject, v.groups, v.jti) == (idp.url, "alice@example.com", ("dba", "staff"), "j-1")
    assert v.algorithm == algorithm and v.key_id == idp.key(algorithm).kid
    assert v.audience == ("ringfence",)
    assert v.token_sha256 == hashlib.sha256(token.encode()).hexdigest()
    assert token not in json.dumps(v.to_record())


def test_custom_subject_and_groups_claims(idp: TestIssuer) -> None:
    """subject_claim and groups_claim choose which claims name the person and their groups."""
    verifier = TokenVerifier(
        [IssuerConfig(idp.url, "ringfence", discovery=True, subject_claim="email", groups_claim="roles")]
    )
    v = verifier.verify(idp.mint("u-123", email="bob@example.com", roles="admins"))
    assert (v.subject, v.groups) == ("bob@example.com", ("admins",))


def test_jwks_file(idp: TestIssuer, tmp_path: Path) -> None:
    """Keys can come from a JWKS file instead of discovery."""
    jwks = idp.write_jwks(tmp_path / "idp.jwks")
    verifier = TokenVerifier([IssuerConfig(idp.url, "ringfence", jwks_file=jwks)])
    before = sum(idp.requests.values())
    assert verifier.verify(idp.mint(algorithm="ES256")).subject == "alice@example.com"
    assert sum(idp.requests.values()) == before


def test_several_issuers(tmp_path: Path) -> None:
    """Tokens of each trusted issuer verify; another issuer's key does not sign for the first."""
    with TestIssuer() as a, TestIssuer() as b:
        verifier = TokenVerifier([discovery(a), discovery(b)])
        assert verifier.verify(a.mint("a-user")).issuer == a.url
        assert verifier.verify(b.mint("b-user")).issuer == b.url
        forged = b.mint("a-user", iss=a.url, kid=a.key().kid)
        assert rejected(verifier, forged).code == "bad_signature"
        other_kid = b.mint("a-user", iss=a.url)
        assert rejected(verifier, other_kid).code == "unknown_kid"


def rejection_cases(idp: TestIssuer) -> dict[str, tuple[str, str]]:
    """Each bad token with the code it must be refused with."""
    now = int(time.time())
    good = idp.mint()
    h, p, s = good.split(".")
    claims = json.loads(b64url_decode(p))
    claims["sub"] = "root@example.com"
    tampered = f"{h}.{b64url(json.dumps(claims).encode())}.{s}"
    rsa = idp.key("RS256")
    hs_header = b64url(json.dumps({"alg": "HS256", "typ": "JWT", "kid": rsa.kid}).encode())
    hs_payload = b64url(json.dumps(idp.claims()).encode())
    signing_input = f"{hs_header}.{hs_payload}".encode()
    hs_sig = hmac.new(rsa.public_pem(), signing_input, hashlib.sha256).digest()
    return {
        "expired": ("expired", idp.mint(exp=now - 120, iat=now - 600, nbf=now - 600)),
        "not yet valid": ("not_yet_valid", idp.mint(nbf=now + 600, iat=now)),
        "issued in the future": ("not_yet_valid", idp.mint(iat=now + 600, nbf=None)),
        "wrong audience": ("bad_audience", idp.mint(aud="other-app")),
        "no audience": ("bad_audience", idp.mint(aud=None)),
        "wrong issuer": ("unknown_issuer", idp.mint(iss="https://evil.example.com")),
        "no issuer": ("missing_claim", idp.mint(iss=None)),
        "alg none": ("alg_not_allowed", unsigned_token({"alg": "none"}, idp.claims())),
        "HS256 with the RSA public key": (
            "alg_not_allowed",
            f"{hs_header}.{hs_payload}.{b64url(hs_sig)}",
        ),
        "unknown kid": ("unknown_kid", idp.mint(key=new_key("RS256", kid="never-published"))),
        "tampered payload": ("bad_signature", tampered),
        "garbage": ("malformed", "hunter2"),
        "no subject": ("missing_claim", idp.mint(sub=None)),
        "no exp": ("missing_claim", idp.mint(exp=None)),
    }


def b64url_decode(part: str) -> bytes:
    import base64

    return base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))


def test_each_rejection_has_its_code_and_own_message(idp: TestIssuer, verifier: TokenVerifier) -> None:
    """Every kind of bad token is refused with the expected code and a message no other case shares."""
    messages: dict[str, str] = {}
    for case, (code, token) in rejection_cases(idp).items():
        error = rejected(verifier, token)
        assert error.code == code, f"{case}: {error.code}: {error.message}"
        assert error.to_record()["token_sha256"] == token_sha256(token), case
        messages[case] = error.message
    assert len(set(messages.values())) == len(messages), messages


def test_messages_say_what_to_do(idp: TestIssuer, verifier: TokenVerifier) -> None:
    """The expired message names the expiry time and `ringfence login`; audience names the expected one."""
    now = int(time.time())
    expired = rejected(verifier, idp.mint(exp=now - 3600, iat=now - 7200, nbf=now - 7200))
    assert time.strftime("%Y-%m-%d %H:%M", time.gmtime(now - 3600)) in expired.message
    assert "ringfence login" in expired.message
    aud = rejected(verifier, idp.mint(aud="other-app"))
    assert "'ringfence'" in aud.message and "other-app" in aud.message
    hs = rejection_cases(idp)["HS256 with the RSA public key"][1]
    assert "shared secret (HS256)" in rejected(verifier, hs).message


def test_leeway_allows_small_clock_skew(idp: TestIssuer) -> None:
    """A token expired 10 s ago passes with 30 s of leeway and fails with none."""
    now = int(time.time())
    token = idp.mint(exp=now - 10, iat=now - 300, nbf=now - 300)
    assert TokenVerifier([discovery(idp)], leeway_seconds=30).verify(token)
    assert rejected(TokenVerifier([discovery(idp)], leeway_seconds=0), token).code == "expired"


def test_issuer_algorithm_allow_list(idp: TestIssuer) -> None:
    """An issuer limited to ES256 refuses its own RS256 tokens."""
    verifier = TokenVerifier([discovery(idp, algorithms=("ES256",))])
    assert verifier.verify(idp.mint(algorithm="ES256"))
    assert rejected(verifier, idp.mint(algorithm="RS256")).code == "alg_not_allowed"


def test_algorithm_must_fit_the_key(idp: TestIssuer, verifier: TokenVerifier) -> None:
    """A token claiming ES256 but naming the issuer's RSA key is refused before verification."""
    ec = idp.key("ES256")
    token = idp.mint(key=ec, kid=idp.key("RS256").kid)
    assert rejected(verifier, token).code == "alg_not_allowed"


def test_key_rotation_is_picked_up_without_restart() -> None:
    """After the issuer rotates its key, a token with the new kid verifies once the JWKS is refetched."""
    with TestIssuer(("RS256",)) as idp:
        verifier = TokenVerifier([discovery(idp)], min_refresh_seconds=30)
        assert verifier.verify(idp.mint())
        assert idp.requests["/jwks"] == 1
        idp.rotate("RS256")
        assert verifier.verify(idp.mint()).key_id == idp.key().kid
        assert idp.requests["/jwks"] == 2


def test_unknown_kid_refresh_is_rate_limited() -> None:
    """Unknown kids trigger at most one key refresh per interval per issuer."""
    clock = FakeClock()
    with TestIssuer(("RS256",)) as idp:
        verifier = TokenVerifier([discovery(idp)], min_refresh_seconds=30, clock=clock)
        verifier.prefetch()
        assert idp.requests["/jwks"] == 1
        clock.now += 31
        for i in range(5):
            error = rejected(verifier, idp.mint(key=new_key("RS256", kid=f"bogus-{i}")))
            assert error.code == "unknown_kid"
        assert idp.requests["/jwks"] == 2
        assert "next refresh in" in error.message
        rotated = idp.rotate("RS256")
        assert rejected(verifier, idp.mint(key=rotated)).code == "unknown_kid"
        clock.now += 31
        assert verifier.verify(idp.mint(key=rotated)).key_id == rotated.kid
        assert idp.requests["/jwks"] == 3


def test_cache_expiry_refetches(idp: TestIssuer) -> None:
    """Keys older than the cache lifetime are fetched again on the next verification."""
    clock = FakeClock()
    verifier = TokenVerifier([discovery(idp)], cache_seconds=3600, clock=clock)
    verifier.verify(idp.mint())
    loads = verifier.issuers[idp.url].loads
    clock.now += 100
    verifier.verify(idp.mint())
    assert verifier.issuers[idp.url].loads == loads
    clock.now += 3600
    verifier.verify(idp.mint())
    assert verifier.issuers[idp.url].loads == loads + 1


def test_unreachable_issuer() -> None:
    """When no keys can be fetched the token is refused as keys_unavailable, not as bad."""
    with TestIssuer(("RS256",)) as idp:
        idp.fail = True
        error = rejected(TokenVerifier([discovery(idp)]), idp.mint())
        assert error.code == "keys_unavailable"
        assert "503" in error.to_record()["error"]


def test_keys_kept_when_refresh_fails() -> None:
    """A failed refresh keeps the keys already known."""
    clock = FakeClock()
    with TestIssuer(("RS256",)) as idp:
        verifier = TokenVerifier([discovery(idp)], cache_seconds=60, clock=clock)
        token = idp.mint()
        verifier.verify(token)
        idp.fail = True
        clock.now += 120
        assert verifier.verify(token).subject == "alice@example.com"


def test_discovery_must_name_the_issuer(tmp_path: Path) -> None:
    """A discovery document that names another issuer is not trusted for keys."""
    with TestIssuer(("RS256",)) as idp:
        idp.discovery_document = lambda: {"issuer": "https://other", "jwks_uri": f"{idp.url}/jwks"}  # type: ignore[method-assign]
        error = rejected(TokenVerifier([discovery(idp)]), idp.mint())
        assert error.code == "keys_unavailable"
        assert idp.requests["/jwks"] == 0


def test_symmetric_keys_in_jwks_are_ignored(idp: TestIssuer, tmp_path: Path) -> None:
    """An 'oct' key in a JWKS file can never verify a token."""
    secret = b"shared"
    path = tmp_path / "jwks"
    path.write_text(json.dumps({"keys": [{"kty": "oct", "kid": "k", "k": b64url(secret)}]}))
    verifier = TokenVerifier([IssuerConfig(idp.url, "ringfence", jwks_file=path)])
    header = b64url(json.dumps({"alg": "HS256", "kid": "k"}).encode())
    payload = b64url(json.dumps(idp.claims()).encode())
    sig = hmac.new(secret, f"{header}.{payload}".encode(), hashlib.sha256).digest()
    assert rejected(verifier, f"{header}.{payload}.{b64url(sig)}").code == "alg_not_allowed"
    rs = unsigned_token({"alg": "RS256", "kid": "k"}, idp.claims(), b"x" * 256)
    assert rejected(verifier, rs).code == "unknown_kid"
