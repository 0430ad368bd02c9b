"""OIDC token verification: several trusted issuers, keys from JWKS files or
discovery, a fixed public-key algorithm allow-list.

Order of checks, each with its own :class:`TokenRejected` code and message:
shape (``malformed``), algorithm (``alg_not_allowed``: ``none`` and HMAC are
refused before any key is looked at), issuer (``unknown_issuer``), key
(``unknown_kid``, after one rate-limited refresh of the issuer's keys),
signature (``bad_signature``), then claims (``expired``, ``not_yet_valid``,
``bad_audience``, ``missing_claim``). Messages never contain the token.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import ipaddress
import json
import logging
import ssl
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

import jwt
from jwt import PyJWK

from agent.config import TOKEN_ALGORITHMS, IdentitySettings, IssuerConfig
from agent.identity import IdentityError

log = logging.getLogger(__name__)

MAX_TOKEN_BYTES = 16 * 1024
MAX_DOCUMENT_BYTES = 1024 * 1024
FETCH_TIMEOUT_SECONDS = 5.0
# Claims copied into the record besides the ones that have fields.
RECORDED_CLAIMS = ("name", "email", "preferred_username", "azp", "client_id", "amr", "acr")

_KEY_TYPES: dict[str, tuple[str, tuple[str, ...]]] = {
    "RS256": ("RSA", ()),
    "RS384": ("RSA", ()),
    "RS512": ("RSA", ()),
    "PS256": ("RSA", ()),
    "PS384": ("RSA", ()),
    "PS512": ("RSA", ()),
    "ES256": ("EC", ("P-256",)),
    "ES384": ("EC", ("P-384",)),
    "ES512": ("EC", ("P-521",)),
    "EdDSA": ("OKP", ("Ed25519", "Ed448")),
}


class TokenRejected(IdentityError):
    """A token that does not verify; ``message`` tells its holder what to do."""

    CODES = (
        "malformed",
        "alg_not_allowed",
        "unknown_issuer",
        "unknown_kid",
        "keys_unavailable",
        "bad_signature",
        "expired",
        "not_yet_valid",
        "bad_audience",
        "missing_claim",
    )

    def __init__(self, code: str, message: str, detail: Mapping[str, Any] | None = None) -> None:
        assert code in self.CODES, code
        super().__init__(message)
        self.code = code
        self.message = message
        self.detail: dict[str, Any] = dict(detail or {})

    def to_record(self) -> dict[str, Any]:
        """The audit form: code, message and what is known of the token (never the token)."""
        return {"code": self.code, "message": self.message, **self.detail}


@dataclass(frozen=True, slots=True)
class VerifiedToken:
    """The claims of a token whose signature and validity were checked."""

    issuer: str
    subject: str
    groups: tuple[str, ...]
    jti: str | None
    exp: int
    iat: int | None
    audience: tuple[str, ...]
    algorithm: str
    key_id: str | None
    token_sha256: str
    subject_kind: str = "human"
    claims: tuple[tuple[str, Any], ...] = ()

    def to_record(self) -> dict[str, Any]:
        """The audit form: who and which token, by hash."""
        return {
            "issuer": self.issuer,
            "subject": self.subject,
            "groups": list(self.groups),
            "jti": self.jti,
            "exp": self.exp,
            "iat": self.iat,
            "audience": list(self.audience),
            "algorithm": self.algorithm,
            "kid": self.key_id,
            "token_sha256": self.token_sha256,
            "subject_kind": self.subject_kind,
            "claims": dict(self.claims),
        }


def token_sha256(token: str) -> str:
    """The hex SHA-256 of a token's text, the only form in which it is recorded."""
    return hashlib.sha256(token.encode("utf-8", "surrogateescape")).hexdigest()


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _b64json(part: str) -> Any:
    padded = part + "=" * (-len(part) % 4)
    raw = base64.urlsafe_b64decode(padded.encode("ascii"))
    return json.loads(raw)


def _allowed_url(url: str) -> bool:
    parts = urlsplit(url)
    if parts.scheme == "https" and parts.hostname:
        return True
    if parts.scheme != "http" or not parts.hostname:
        return False
    if parts.hostname == "localhost":
        return True
    try:
        return ipaddress.ip_address(parts.hostname).is_loopback
    except ValueError:
        return False


Fetch = Callable[[str, IssuerConfig], bytes]


def fetch_url(url: str, issuer: IssuerConfig) -> bytes:
    """GET a document (https, or http on loopback), at most 1 MiB, with a timeout."""
    if not _allowed_url(url):
        raise IdentityError(f"{url}: only https:// (or http:// on loopback) is fetched")
    context = None
    if url.startswith("https:"):
        context = ssl.create_default_context(cafile=str(issuer.ca_file) if issuer.ca_file else None)
    request = urllib.request.Request(url, headers={"Accept": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=FETCH_TIMEOUT_SECONDS, context=context) as r:
            body: bytes = r.read(MAX_DOCUMENT_BYTES + 1)
    except (urllib.error.URLError, OSError, ValueError) as e:
        raise IdentityError(f"{url}: {e}") from None
    if len(body) > MAX_DOCUMENT_BYTES:
        raise IdentityError(f"{url}: document larger than {MAX_DOCUMENT_BYTES} bytes")
    return body


@dataclass(slots=True)
class _KeySet:
    by_kid: dict[str, dict[str, Any]] = field(default_factory=dict)
    without_kid: list[dict[str, Any]] = field(default_factory=list)


def parse_jwks(document: Any) -> _KeySet:
    """The usable signing keys of a JWKS document; symmetric and encryption keys are dropped."""
    if not isinstance(document, dict) or not isinstance(document.get("keys"), list):
        raise IdentityError("not a JWKS document (no 'keys' array)")
    keys = _KeySet()
    for jwk in document["keys"]:
        if not isinstance(jwk, dict) or jwk.get("kty") not in ("RSA", "EC", "OKP"):
            continue
        if jwk.get("use", "sig") != "sig":
            continue
        kid = jwk.get("kid")
        if isinstance(kid, str) and kid:
            keys.by_kid[kid] = jwk
        else:
            keys.without_kid.append(jwk)
    return keys


class IssuerKeys:
    """One issuer's signing keys: loaded once, cached, refreshed on an unknown
    ``kid`` at most once per ``min_refresh`` seconds, and when the cache ages."""

    def __init__(
        self,
        config: IssuerConfig,
        *,
        fetch: Fetch = fetch_url,
        clock: Callable[[], float] = time.monotonic,
        cache_seconds: float = 3600,
        min_refresh_seconds: float = 30,
    ) -> None:
        self.config = config
        self._fetch = fetch
        self._clock = clock
        self._cache_seconds = cache_seconds
        self._min_refresh = min_refresh_seconds
        self._lock = threading.Lock()
        self._keys: _KeySet | None = None
        self._loaded_at = 0.0
        self._last_attempt: float | None = None
        self._last_kid_refresh: float | None = None
        self._pyjwk: dict[tuple[str, str], PyJWK] = {}
        self.loads = 0
        self.last_error: str | None = None

    def _load(self) -> None:
        """Fetch and replace the key set; on failure keep the old keys."""
        self._last_attempt = self._clock()
        try:
            document = json.loads(self._read_jwks())
            keys = parse_jwks(document)
        except (IdentityError, ValueError, OSError) as e:
            self.last_error = str(e)
            log.warning("issuer %s: cannot load signing keys: %s", self.config.issuer, e)
            return
        self._keys = keys
        self._pyjwk.clear()
        self._loaded_at = self._last_attempt
        self.loads += 1
        self.last_error = None

    def _read_jwks(self) -> bytes:
        c = self.config
        if c.jwks_file is not None:
            with open(c.jwks_file, "rb") as f:
                return f.read(MAX_DOCUMENT_BYTES)
        if c.jwks_uri is not None:
            return self._fetch(c.jwks_uri, c)
        url = c.issuer.rstrip("/") + "/.well-known/openid-configuration"
        discovery = json.loads(self._fetch(url, c))
        if not isinstance(discovery, dict) or discovery.get("issuer") != c.issuer:
            raise IdentityError(f"{url}: discovery document names another issuer")
        jwks_uri = discovery.get("jwks_uri")
        if not isinstance(jwks_uri, str) or not _allowed_url(jwks_uri):
            raise IdentityError(f"{url}: jwks_uri missing or not https")
        return self._fetch(jwks_uri, c)

    def ensure_loaded(self) -> None:
        """Load the keys if never loaded (rate-limited after a failure) or the cache aged."""
        with self._lock:
            now = self._clock()
            if self._keys is None:
                if self._last_attempt is None or now - self._last_attempt >= self._min_refresh:
                    self._load()
            elif now - self._loaded_at >= self._cache_seconds and self._may_refresh(now):
                self._load()

    def _may_refresh(self, now: float) -> bool:
        return self._last_attempt is None or now - self._last_attempt >= self._min_refresh

    def refresh_for_unknown_kid(self) -> bool:
        """Reload the keys unless an unknown kid already did so in the last
        ``min_refresh`` seconds (the first one after a load always may)."""
        with self._lock:
            now = self._clock()
            last = self._last_kid_refresh
            if last is not None and now - last < self._min_refresh:
                return False
            self._last_kid_refresh = now
            self._load()
            return True

    @property
    def available(self) -> bool:
        return self._keys is not None

    def retry_in(self) -> int:
        last = self._last_kid_refresh
        if last is None:
            return 0
        return max(0, int(self._min_refresh - (self._clock() - last)) + 1)

    def candidates(self, kid: str | None) -> list[dict[str, Any]]:
        with self._lock:
            keys = self._keys
        if keys is None:
            return []
        if kid is not None:
            jwk = keys.by_kid.get(kid)
            return [jwk] if jwk is not None else []
        return list(keys.without_kid) + list(keys.by_kid.values())

    def pyjwk(self, jwk: dict[str, Any], algorithm: str) -> PyJWK:
        cache_key = (json.dumps(jwk, sort_keys=True), algorithm)
        with self._lock:
            key = self._pyjwk.get(cache_key)
        if key is None:
            key = PyJWK(jwk, algorithm)
            with self._lock:
                self._pyjwk[cache_key] = key
        return key


def _key_fits(jwk: Mapping[str, Any], algorithm: str) -> bool:
    kty, curves = _KEY_TYPES[algorithm]
    if jwk.get("kty") != kty or (curves and jwk.get("crv") not in curves):
        return False
    declared = jwk.get("alg")
    return declared is None or declared == algorithm


class TokenVerifier:
    """Verifies tokens against the configured issuers; thread-safe.

    :meth:`verify` may fetch keys over the network (bounded by a 5 s timeout);
    from asyncio use :meth:`verify_async`, which runs it in a worker thread.
    """

    def __init__(
        self,
        issuers: Iterable[IssuerConfig],
        *,
        leeway_seconds: float = 30,
        cache_seconds: float = 3600,
        min_refresh_seconds: float = 30,
        fetch: Fetch = fetch_url,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.leeway = leeway_seconds
        self._wall_clock = wall_clock
        self.issuers: dict[str, IssuerKeys] = {
            c.issuer: IssuerKeys(
                c,
                fetch=fetch,
                clock=clock,
                cache_seconds=cache_seconds,
                min_refresh_seconds=min_refresh_seconds,
            )
            for c in issuers
        }

    @classmethod
    def from_settings(cls, settings: IdentitySettings) -> TokenVerifier:
        return cls(
            settings.issuers,
            leeway_seconds=settings.leeway_seconds,
            cache_seconds=settings.jwks_cache_seconds,
            min_refresh_seconds=settings.jwks_min_refresh_seconds,
        )

    def prefetch(self) -> None:
        """Load every issuer's keys now (at agent start), so the first connection waits less."""
        for keys in self.issuers.values():
            keys.ensure_loaded()

    async def verify_async(self, token: str) -> VerifiedToken:
        import asyncio

        return await asyncio.to_thread(self.verify, token)

    def verify(self, token: str) -> VerifiedToken:
        """The verified claims of ``token``, or :class:`TokenRejected`."""
        token = token.strip()
        digest = token_sha256(token)
        detail: dict[str, Any] = {"token_sha256": digest}
        header, payload = self._parse(token, detail)
        algorithm = header.get("alg")
        detail["alg"] = algorithm
        self._check_algorithm(algorithm, detail)
        assert isinstance(algorithm, str)
        kid = header.get("kid")
        if kid is not None and not isinstance(kid, str):
            raise TokenRejected("malformed", "the token's key id (kid) is not a string", detail)
        detail["kid"] = kid
        iss = payload.get("iss")
        if iss is None:
            raise TokenRejected(
                "missing_claim",
                "the token names no issuer (iss claim); use a token from a trusted issuer",
                detail,
            )
        detail["issuer"] = iss
        keys = self.issuers.get(iss) if isinstance(iss, str) else None
        if keys is None:
            raise TokenRejected(
                "unknown_issuer",
                f"the token's issuer {iss!r} is not trusted here; "
                "use a token from an issuer this agent trusts",
                detail,
            )
        issuer = keys.config
        subject = payload.get(issuer.subject_claim)
        if isinstance(subject, str):
            detail["subject"] = subject
        if algorithm not in issuer.algorithms:
            raise TokenRejected(
                "alg_not_allowed",
                f"the token is signed with {algorithm}, which is not allowed for issuer "
                f"{iss} (allowed: {', '.join(issuer.algorithms)})",
                detail,
            )
        jwk = self._find_key(keys, kid, algorithm, detail)
        claims = self._decode(token, keys, jwk, algorithm, payload, detail)
        return self._verified(issuer, claims, header, digest, detail)

    @staticmethod
    def _parse(token: str, detail: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        not_a_jwt = (
            "the credential is not a token (expected a JWT: header.payload.signature); "
            "pass the token exactly as your identity provider issued it, "
            "or run `ringfence login`"
        )
        if not token or len(token) > MAX_TOKEN_BYTES:
            raise TokenRejected("malformed", not_a_jwt, detail)
        parts = token.split(".")
        if len(parts) != 3:
            raise TokenRejected("malformed", not_a_jwt, detail)
        try:
            header = _b64json(parts[0])
            payload = _b64json(parts[1])
        except (binascii.Error, ValueError, UnicodeError):
            raise TokenRejected("malformed", not_a_jwt, detail) from None
        if not isinstance(header, dict) or not isinstance(payload, dict):
            raise TokenRejected("malformed", not_a_jwt, detail)
        return header, payload

    @staticmethod
    def _check_algorithm(algorithm: Any, detail: dict[str, Any]) -> None:
        if algorithm is None or (isinstance(algorithm, str) and algorithm.lower() == "none"):
            raise TokenRejected(
                "alg_not_allowed",
                "the token is unsigned (alg none); only tokens signed by a trusted issuer "
                "are accepted: get one from your identity provider",
                detail,
            )
        if not isinstance(algorithm, str):
            raise TokenRejected("malformed", "the token's algorithm (alg) is not a string", detail)
        if algorithm.upper().startswith("HS"):
            raise TokenRejected(
                "alg_not_allowed",
                f"the token is signed with a shared secret ({algorithm}); only public-key "
                "signatures (RS256, ES256, EdDSA) from a trusted issuer are accepted",
                detail,
            )
        if algorithm not in TOKEN_ALGORITHMS:
            raise TokenRejected(
                "alg_not_allowed",
                f"the token's algorithm {algorithm!r} is not supported "
                f"(allowed: {', '.join(TOKEN_ALGORITHMS)})",
                detail,
            )

    @staticmethod
    def _find_key(
        keys: IssuerKeys, kid: str | None, algorithm: str, detail: dict[str, Any]
    ) -> list[dict[str, Any]]:
        issuer = keys.config.issuer
        keys.ensure_loaded()
        if not keys.available:
            raise TokenRejected(
                "keys_unavailable",
                f"the signing keys of issuer {issuer} cannot be fetched right now; "
                "retry shortly, and tell the operator if it persists",
                {**detail, "error": keys.last_error},
            )
        found = keys.candidates(kid)
        refreshed = False
        if not found and kid is not None:
            refreshed = keys.refresh_for_unknown_kid()
            found = keys.candidates(kid)
        if not found:
            if kid is None:
                raise TokenRejected(
                    "unknown_kid",
                    f"the token names no key id (kid) and issuer {issuer} publishes no key "
                    "for it; get a new token",
                    detail,
                )
            when = (
                "its keys were just refreshed"
                if refreshed
                else f"its keys were refreshed recently; next refresh in {keys.retry_in()} s"
            )
            raise TokenRejected(
                "unknown_kid",
                f"the token's signing key {kid!r} is not published by issuer {issuer} "
                f"({when}); get a new token, or retry shortly if the issuer is rotating keys",
                detail,
            )
        fitting = [jwk for jwk in found if _key_fits(jwk, algorithm)]
        if not fitting:
            raise TokenRejected(
                "alg_not_allowed",
                f"the token claims algorithm {algorithm}, which does not match issuer "
                f"{issuer}'s key {kid!r}; get a new token",
                detail,
            )
        return fitting

    def _decode(
        self,
        token: str,
        keys: IssuerKeys,
        jwks: list[dict[str, Any]],
        algorithm: str,
        payload: dict[str, Any],
        detail: dict[str, Any],
    ) -> dict[str, Any]:
        issuer = keys.config
        required = sorted({"iss", *issuer.required_claims})
        options: Any = {"require": required, "verify_sub": False, "verify_jti": False}
        last: Exception | None = None
        for jwk in jwks:
            try:
                key = keys.pyjwk(jwk, algorithm)
            except jwt.PyJWTError as e:
                last = e
                continue
            try:
                claims: dict[str, Any] = jwt.decode(
                    token,
                    key=key,
                    algorithms=[algorithm],
                    audience=issuer.audience,
                    issuer=issuer.issuer,
                    leeway=self.leeway,
                    options=options,
                )
                return claims
            except jwt.InvalidSignatureError as e:
                last = e
                continue
            except jwt.PyJWTError as e:
                raise self._claims_error(e, issuer, payload, detail) from None
        if last is not None and not isinstance(last, jwt.InvalidSignatureError):
            log.warning("issuer %s: unusable key: %s", issuer.issuer, last)
        raise TokenRejected(
            "bad_signature",
            f"the token's signature does not verify with issuer {issuer.issuer}'s key "
            f"{detail.get('kid')!r}: it was altered or not issued there; get a new token",
            detail,
        )

    def _claims_error(
        self,
        e: jwt.PyJWTError,
        issuer: IssuerConfig,
        payload: dict[str, Any],
        detail: dict[str, Any],
    ) -> TokenRejected:
        if isinstance(e, jwt.ExpiredSignatureError):
            exp = payload.get("exp")
            when = _iso(float(exp)) if isinstance(exp, int | float) else "an earlier time"
            return TokenRejected(
                "expired",
                f"the token expired at {when}; get a fresh token and run `ringfence login` "
                "(or pass it as the password again)",
                detail,
            )
        if isinstance(e, jwt.ImmatureSignatureError):
            nbf = payload.get("nbf")
            if "(nbf)" in str(e) and isinstance(nbf, int | float):
                return TokenRejected(
                    "not_yet_valid",
                    f"the token is not valid before {_iso(float(nbf))}; wait until then, or "
                    "check the clocks of this host and of the issuer",
                    detail,
                )
            iat = payload.get("iat")
            when = _iso(float(iat)) if isinstance(iat, int | float) else "the future"
            return TokenRejected(
                "not_yet_valid",
                f"the token was issued in the future ({when}); check the clocks of this host "
                "and of the issuer",
                detail,
            )
        if isinstance(e, jwt.MissingRequiredClaimError):
            if e.claim == "aud":
                return TokenRejected(
                    "bad_audience",
                    f"the token has no audience; request a token for audience {issuer.audience!r}",
                    detail,
                )
            return TokenRejected(
                "missing_claim",
                f"the token lacks the required claim {e.claim!r}; ask your identity provider "
                "for a token that carries it",
                {**detail, "claim": e.claim},
            )
        if isinstance(e, jwt.InvalidAudienceError):
            aud = payload.get("aud")
            return TokenRejected(
                "bad_audience",
                f"the token is for audience {aud!r}, not {issuer.audience!r}; request a token "
                f"for audience {issuer.audience!r}",
                {**detail, "audience": aud},
            )
        if isinstance(e, jwt.InvalidIssuerError):
            return TokenRejected(
                "unknown_issuer",
                f"the token's issuer is not {issuer.issuer!r}; use a token from a trusted issuer",
                detail,
            )
        return TokenRejected(
            "malformed",
            f"the token's claims are invalid ({e}); get a new token from your identity provider",
            detail,
        )

    def _verified(
        self,
        issuer: IssuerConfig,
        claims: dict[str, Any],
        header: dict[str, Any],
        digest: str,
        detail: dict[str, Any],
    ) -> VerifiedToken:
        subject = claims.get(issuer.subject_claim)
        if not isinstance(subject, str) or not subject:
            raise TokenRejected(
                "missing_claim",
                f"the token lacks the subject claim {issuer.subject_claim!r}; ask your identity "
                "provider for a token that carries it",
                {**detail, "claim": issuer.subject_claim},
            )
        groups: tuple[str, ...] = ()
        if issuer.groups_claim:
            raw = claims.get(issuer.groups_claim)
            if isinstance(raw, str):
                groups = (raw,)
            elif isinstance(raw, list):
                groups = tuple(g for g in raw if isinstance(g, str))
        exp = claims.get("exp")
        if not isinstance(exp, int | float):
            # A token without exp (allowed only if the operator removed it from
            # required_claims) lives for at most an hour in the login registry.
            exp = self._wall_clock() + 3600
        iat = claims.get("iat")
        aud = claims.get("aud")
        if isinstance(aud, str):
            aud = [aud]
        audience = tuple(a for a in aud or () if isinstance(a, str))
        jti = claims.get("jti")
        return VerifiedToken(
            issuer=issuer.issuer,
            subject=subject,
            groups=groups,
            jti=jti if isinstance(jti, str) else None,
            exp=int(exp),
            iat=int(iat) if isinstance(iat, int | float) else None,
            audience=audience,
            algorithm=str(header.get("alg")),
            key_id=detail.get("kid"),
            token_sha256=digest,
            subject_kind=issuer.subject_kind,
            claims=tuple((k, claims[k]) for k in RECORDED_CLAIMS if k in claims),
        )
