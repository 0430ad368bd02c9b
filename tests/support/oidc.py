"""A small OIDC issuer for tests: discovery document and JWKS over HTTP on
127.0.0.1 (in a thread), signing keys of each algorithm, minting, rotation."""

from __future__ import annotations

import base64
import json
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm

PrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey


@dataclass
class SigningKey:
    """A private key with its kid and JWS algorithm."""

    kid: str
    algorithm: str
    private: PrivateKey

    def public_jwk(self) -> dict[str, Any]:
        public = self.private.public_key()
        if self.algorithm == "RS256":
            jwk = RSAAlgorithm.to_jwk(public, as_dict=True)
        elif self.algorithm == "ES256":
            jwk = ECAlgorithm.to_jwk(public, as_dict=True)
        else:
            jwk = OKPAlgorithm.to_jwk(public, as_dict=True)
        return {**jwk, "kid": self.kid, "alg": self.algorithm, "use": "sig"}

    def public_pem(self) -> bytes:
        return self.private.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )


def new_key(algorithm: str = "RS256", kid: str | None = None) -> SigningKey:
    """A fresh signing key for RS256, ES256 or EdDSA."""
    private: PrivateKey
    if algorithm == "RS256":
        private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    elif algorithm == "ES256":
        private = ec.generate_private_key(ec.SECP256R1())
    elif algorithm == "EdDSA":
        private = ed25519.Ed25519PrivateKey.generate()
    else:
        raise ValueError(algorithm)
    return SigningKey(kid or f"{algorithm.lower()}-{uuid.uuid4().hex[:8]}", algorithm, private)


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def unsigned_token(header: dict[str, Any], payload: dict[str, Any], signature: bytes = b"") -> str:
    """Assemble a JWS from parts without signing it (for forged and broken tokens)."""
    return ".".join(
        (
            b64url(json.dumps(header).encode()),
            b64url(json.dumps(payload).encode()),
            b64url(signature),
        )
    )


class TestIssuer:
    """An OIDC issuer on http://127.0.0.1:<port>; ``with TestIssuer() as idp:``."""

    __test__ = False

    def __init__(self, algorithms: tuple[str, ...] = ("RS256", "ES256", "EdDSA")) -> None:
        self.keys = [new_key(alg) for alg in algorithms]
        self.requests: Counter[str] = Counter()
        self.fail = False
        issuer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's name)
                issuer.requests[self.path] += 1
                if issuer.fail:
                    self.send_error(503)
                    return
                if self.path == "/.well-known/openid-configuration":
                    body = issuer.discovery_document()
                elif self.path == "/jwks":
                    body = issuer.jwks()
                else:
                    self.send_error(404)
                    return
                data = json.dumps(body).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> TestIssuer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)

    def discovery_document(self) -> dict[str, Any]:
        return {
            "issuer": self.url,
            "jwks_uri": f"{self.url}/jwks",
            "id_token_signing_alg_values_supported": sorted({k.algorithm for k in self.keys}),
        }

    def jwks(self) -> dict[str, Any]:
        return {"keys": [k.public_jwk() for k in self.keys]}

    def write_jwks(self, path: Path) -> Path:
        path.write_text(json.dumps(self.jwks()))
        return path

    def key(self, algorithm: str = "RS256") -> SigningKey:
        return next(k for k in self.keys if k.algorithm == algorithm)

    def rotate(self, algorithm: str = "RS256") -> SigningKey:
        """Replace the key of ``algorithm`` with a new one (new kid) and return it."""
        fresh = new_key(algorithm)
        self.keys = [k for k in self.keys if k.algorithm != algorithm] + [fresh]
        return fresh

    def claims(self, subject: str = "alice@example.com", **overrides: Any) -> dict[str, Any]:
        now = int(time.time())
        claims: dict[str, Any] = {
            "iss": self.url,
            "sub": subject,
            "aud": "ringfence",
            "iat": now,
            "nbf": now,
            "exp": now + 600,
            "jti": uuid.uuid4().hex,
            "groups": ["dba", "staff"],
            "email": subject,
        }
        claims.update(overrides)
        return {k: v for k, v in claims.items() if v is not None}

    def mint(
        self,
        subject: str = "alice@example.com",
        *,
        algorithm: str = "RS256",
        key: SigningKey | None = None,
        kid: str | None = None,
        headers: dict[str, Any] | None = None,
        **claims: Any,
    ) -> str:
        """A signed token; ``claims`` override the defaults (None removes one)."""
        key = key or self.key(algorithm)
        header = {"kid": kid or key.kid, **(headers or {})}
        return jwt.encode(
            self.claims(subject, **claims), key.private, algorithm=key.algorithm, headers=header
        )
