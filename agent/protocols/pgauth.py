"""PostgreSQL authentication pieces for the agent (sans-IO, pure).

Towards the client: ask for a cleartext password (where the client's token
arrives) and read its PasswordMessage. Towards the server: answer its
authentication requests with the service credential the agent holds:
SCRAM-SHA-256 (RFC 5802 / RFC 7677, without channel binding), md5, cleartext
only when configured, or trust (AuthenticationOk straight away).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import stringprep
import struct
import unicodedata
from dataclasses import dataclass

_INT32 = struct.Struct("!i")

AUTH_OK = 0
AUTH_CLEARTEXT = 3
AUTH_MD5 = 5
AUTH_SASL = 10
AUTH_SASL_CONTINUE = 11
AUTH_SASL_FINAL = 12

SCRAM_SHA_256 = "SCRAM-SHA-256"
MAX_SCRAM_ITERATIONS = 1_000_000
METHODS = ("auto", "scram-sha-256", "md5", "password", "trust")


class PgAuthError(Exception):
    """Authentication cannot proceed: bad message, unsupported or refused method,
    or a server that failed to prove it knows the password."""


def _message(kind: bytes, body: bytes) -> bytes:
    return kind + _INT32.pack(len(body) + 4) + body


def authentication_cleartext_password() -> bytes:
    """AuthenticationCleartextPassword ('R', int32 3): asks the client for its password."""
    return _message(b"R", _INT32.pack(AUTH_CLEARTEXT))


def authentication_ok() -> bytes:
    """AuthenticationOk ('R', int32 0)."""
    return _message(b"R", _INT32.pack(AUTH_OK))


def password_message(password: str) -> bytes:
    """A PasswordMessage ('p') carrying ``password`` (cleartext or md5 form)."""
    return _message(b"p", password.encode("utf-8") + b"\x00")


def parse_password_message(data: bytes) -> str:
    """The password of a PasswordMessage: the whole message ('p', length, body) or its body."""
    body = data
    if data[:1] == b"p" and len(data) >= 5 and _INT32.unpack_from(data, 1)[0] == len(data) - 1:
        body = data[5:]
    if not body.endswith(b"\x00") or b"\x00" in body[:-1]:
        raise PgAuthError("password message is not one NUL-terminated string")
    try:
        return body[:-1].decode("utf-8")
    except UnicodeDecodeError:
        raise PgAuthError("password message is not UTF-8") from None


def md5_password(user: str, password: str, salt: bytes) -> str:
    """The md5 answer: 'md5' + md5(md5(password + user) + salt), in hex."""
    if len(salt) != 4:
        raise PgAuthError("md5 salt must be 4 bytes")
    inner = hashlib.md5((password + user).encode("utf-8")).hexdigest()
    return "md5" + hashlib.md5(inner.encode("ascii") + salt).hexdigest()


def saslprep(text: str) -> str:
    """RFC 4013 SASLprep; like PostgreSQL, a string it rejects is used as it is."""
    mapped = "".join(" " if stringprep.in_table_c12(c) else c for c in text if not stringprep.in_table_b1(c))
    normal = unicodedata.normalize("NFKC", mapped)
    if not normal:
        return text
    prohibited = (
        stringprep.in_table_c12,
        stringprep.in_table_c21_c22,
        stringprep.in_table_c3,
        stringprep.in_table_c4,
        stringprep.in_table_c5,
        stringprep.in_table_c6,
        stringprep.in_table_c7,
        stringprep.in_table_c8,
        stringprep.in_table_c9,
        stringprep.in_table_a1,
    )
    if any(check(c) for c in normal for check in prohibited):
        return text
    if any(stringprep.in_table_d1(c) for c in normal):
        if not (stringprep.in_table_d1(normal[0]) and stringprep.in_table_d1(normal[-1])):
            return text
        if any(stringprep.in_table_d2(c) for c in normal):
            return text
    return normal


def _escape_name(name: str) -> str:
    return name.replace("=", "=3D").replace(",", "=2C")


def _attributes(message: str) -> dict[str, str]:
    attributes: dict[str, str] = {}
    for part in message.split(","):
        if len(part) < 2 or part[1] != "=":
            raise PgAuthError(f"malformed SCRAM attribute {part[:16]!r}")
        attributes.setdefault(part[0], part[2:])
    return attributes


class ScramClient:
    """The client side of SCRAM-SHA-256 without channel binding (gs2 header ``n,,``)."""

    def __init__(self, username: str, password: str, nonce: str | None = None) -> None:
        self._password = saslprep(password).encode("utf-8")
        self.nonce = nonce or base64.b64encode(secrets.token_bytes(18)).decode("ascii")
        self.client_first_bare = f"n={_escape_name(username)},r={self.nonce}"
        self._server_first: str | None = None
        self._combined_nonce = ""
        self._salted: bytes = b""
        self._auth_message = b""
        self.done = False

    def client_first(self) -> bytes:
        return ("n,," + self.client_first_bare).encode("utf-8")

    def receive_server_first(self, data: bytes) -> None:
        message = data.decode("utf-8", "strict")
        attrs = _attributes(message)
        if "e" in attrs:
            raise PgAuthError(f"server refused SCRAM: {attrs['e']}")
        try:
            nonce, salt_b64, iterations = attrs["r"], attrs["s"], int(attrs["i"])
        except (KeyError, ValueError):
            raise PgAuthError("server-first-message lacks r, s or i") from None
        if not nonce.startswith(self.nonce) or len(nonce) <= len(self.nonce):
            raise PgAuthError("server nonce does not extend the client nonce")
        if not 1 <= iterations <= MAX_SCRAM_ITERATIONS:
            raise PgAuthError(f"SCRAM iteration count {iterations} out of range")
        try:
            salt = base64.b64decode(salt_b64, validate=True)
        except ValueError:
            raise PgAuthError("SCRAM salt is not base64") from None
        self._server_first = message
        self._combined_nonce = nonce
        self._salted = hashlib.pbkdf2_hmac("sha256", self._password, salt, iterations)

    def client_final(self) -> bytes:
        if self._server_first is None:
            raise PgAuthError("client-final before server-first")
        without_proof = f"c=biws,r={self._combined_nonce}"
        self._auth_message = ",".join((self.client_first_bare, self._server_first, without_proof)).encode(
            "utf-8"
        )
        client_key = hmac.digest(self._salted, b"Client Key", "sha256")
        stored_key = hashlib.sha256(client_key).digest()
        signature = hmac.digest(stored_key, self._auth_message, "sha256")
        proof = bytes(a ^ b for a, b in zip(client_key, signature, strict=True))
        return f"{without_proof},p={base64.b64encode(proof).decode('ascii')}".encode()

    def verify_server_final(self, data: bytes) -> None:
        attrs = _attributes(data.decode("utf-8", "strict"))
        if "e" in attrs:
            raise PgAuthError(f"server refused SCRAM: {attrs['e']}")
        if "v" not in attrs or not self._auth_message:
            raise PgAuthError("server-final-message lacks its signature")
        server_key = hmac.digest(self._salted, b"Server Key", "sha256")
        expected = hmac.digest(server_key, self._auth_message, "sha256")
        try:
            given = base64.b64decode(attrs["v"], validate=True)
        except ValueError:
            raise PgAuthError("server signature is not base64") from None
        if not hmac.compare_digest(expected, given):
            raise PgAuthError("server signature does not match: the server does not know the password")
        self.done = True


@dataclass(frozen=True, slots=True)
class AuthStep:
    """What to do after one authentication request from the server."""

    send: bytes | None  # a frontend message to send upstream, if any
    done: bool = False  # AuthenticationOk arrived: the login succeeded


class UpstreamAuth:
    """Answers the server's authentication requests for ``user`` with ``password``.

    Feed each AuthenticationRequest (its code and the body after the code) to
    :meth:`step`; send ``step.send`` upstream; stop at ``step.done``. Never
    sends the password in cleartext unless ``method`` is ``"password"``.
    """

    def __init__(self, user: str, password: str | None, method: str = "auto") -> None:
        if method not in METHODS:
            raise ValueError(f"unknown method {method!r}")
        self.user = user
        self._password = password
        self.method = method
        self._scram: ScramClient | None = None
        self.used: str | None = None

    def _allow(self, method: str) -> str:
        if self.method == "auto" and method in ("scram-sha-256", "md5"):
            return self._need_password(method)
        if self.method == method:
            return self._need_password(method)
        raise PgAuthError(
            f"server asks for {method} authentication but the credential for {self.user} "
            f"is configured for {self.method}"
        )

    def _need_password(self, method: str) -> str:
        if self._password is None:
            raise PgAuthError(f"server asks for {method} but no password is configured")
        self.used = method
        return self._password

    def step(self, code: int, body: bytes) -> AuthStep:
        if code == AUTH_OK:
            if self._scram is not None and not self._scram.done:
                raise PgAuthError("server skipped the SCRAM server signature")
            if self.used is None:
                if self.method not in ("auto", "trust"):
                    raise PgAuthError(f"server did not ask for {self.method} authentication")
                self.used = "trust"
            return AuthStep(None, done=True)
        if code == AUTH_CLEARTEXT:
            return AuthStep(password_message(self._allow("password")))
        if code == AUTH_MD5:
            password = self._allow("md5")
            return AuthStep(password_message(md5_password(self.user, password, body[:4])))
        if code == AUTH_SASL:
            mechanisms = [m.decode("utf-8", "replace") for m in body.split(b"\x00") if m]
            if SCRAM_SHA_256 not in mechanisms:
                raise PgAuthError(f"server offers only {', '.join(mechanisms)}")
            password = self._allow("scram-sha-256")
            # PostgreSQL takes the user from the startup message, not from SCRAM.
            self._scram = ScramClient("", password)
            first = self._scram.client_first()
            body_out = SCRAM_SHA_256.encode() + b"\x00" + _INT32.pack(len(first)) + first
            return AuthStep(_message(b"p", body_out))
        if code == AUTH_SASL_CONTINUE and self._scram is not None:
            self._scram.receive_server_first(body)
            return AuthStep(_message(b"p", self._scram.client_final()))
        if code == AUTH_SASL_FINAL and self._scram is not None:
            self._scram.verify_server_final(body)
            return AuthStep(None)
        raise PgAuthError(f"unsupported or unexpected authentication request {code}")
