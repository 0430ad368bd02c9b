"""PostgreSQL authentication pieces: RFC 7677's SCRAM-SHA-256 vector, md5, the
cleartext request, PasswordMessage parsing, and whole upstream exchanges."""

from __future__ import annotations

import base64
import hashlib
import hmac
import struct

import pytest

from agent.protocols.pgauth import (
    AUTH_CLEARTEXT,
    AUTH_MD5,
    AUTH_OK,
    AUTH_SASL,
    AUTH_SASL_CONTINUE,
    AUTH_SASL_FINAL,
    PgAuthError,
    ScramClient,
    UpstreamAuth,
    authentication_cleartext_password,
    md5_password,
    parse_password_message,
    password_message,
    saslprep,
)

SERVER_FIRST = b"r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096"


def test_scram_rfc7677_vector() -> None:
    """The client messages and the server signature check match RFC 7677's example."""
    client = ScramClient("user", "pencil", nonce="rOprNGfwEbeRWgbNEkqO")
    assert client.client_first() == b"n,,n=user,r=rOprNGfwEbeRWgbNEkqO"
    client.receive_server_first(SERVER_FIRST)
    assert client.client_final() == (
        b"c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,"
        b"p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ="
    )
    client.verify_server_final(b"v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4=")
    assert client.done


def test_scram_rejects_a_server_that_does_not_know_the_password() -> None:
    """A wrong server signature, a server error or a nonce not extending ours is refused."""
    client = ScramClient("user", "pencil", nonce="rOprNGfwEbeRWgbNEkqO")
    client.receive_server_first(SERVER_FIRST)
    client.client_final()
    with pytest.raises(PgAuthError, match="does not match"):
        client.verify_server_final(b"v=" + base64.b64encode(b"x" * 32))
    with pytest.raises(PgAuthError, match="refused SCRAM: invalid-proof"):
        client.verify_server_final(b"e=invalid-proof")
    other = ScramClient("user", "pencil", nonce="abc")
    with pytest.raises(PgAuthError, match="nonce"):
        other.receive_server_first(b"r=xyz123,s=QUJD,i=4096")
    with pytest.raises(PgAuthError, match="iteration"):
        ScramClient("u", "p", nonce="abc").receive_server_first(b"r=abcdef,s=QUJD,i=0")


def test_md5_password() -> None:
    """md5 is 'md5' + md5(md5(password + user) + salt), with PostgreSQL's well-known inner hash."""
    salt = b"\x01\x02\x03\x04"
    expected = hashlib.md5(b"3175bce1d3201d16594cebf9d7eb3f9d" + salt).hexdigest()
    assert md5_password("postgres", "postgres", salt) == "md5" + expected
    with pytest.raises(PgAuthError):
        md5_password("postgres", "postgres", b"\x01")


def test_cleartext_request_and_password_message() -> None:
    """The agent's request is 'R' int32 8 int32 3; a PasswordMessage parses whole or as a body."""
    assert authentication_cleartext_password() == b"R\x00\x00\x00\x08\x00\x00\x00\x03"
    message = password_message("eyJ.token.sig")
    assert message == b"p\x00\x00\x00\x12eyJ.token.sig\x00"
    assert parse_password_message(message) == "eyJ.token.sig"
    assert parse_password_message(b"eyJ.token.sig\x00") == "eyJ.token.sig"
    for bad in (b"no-terminator", b"two\x00strings\x00", b"\xff\xfe\x00"):
        with pytest.raises(PgAuthError):
            parse_password_message(bad)


def test_saslprep() -> None:
    """SASLprep maps soft hyphens away and normalises; prohibited input is used as it is."""
    assert saslprep("I\u00adX") == "IX"
    assert saslprep("\u2168") == "IX"
    assert saslprep("user") == "user"
    assert saslprep("a\u0007b") == "a\u0007b"


class ScramServer:
    """The server side of SCRAM-SHA-256, for exercising UpstreamAuth end to end."""

    def __init__(self, password: str, salt: bytes = b"0123456789ab", iterations: int = 4096):
        salted = hashlib.pbkdf2_hmac("sha256", password.encode(), salt, iterations)
        self.stored_key = hashlib.sha256(hmac.digest(salted, b"Client Key", "sha256")).digest()
        self.server_key = hmac.digest(salted, b"Server Key", "sha256")
        self.salt, self.iterations = salt, iterations

    def first(self, sasl_initial: bytes) -> bytes:
        body = sasl_initial[5:]
        mechanism, rest = body.split(b"\x00", 1)
        assert mechanism == b"SCRAM-SHA-256"
        (length,) = struct.unpack("!i", rest[:4])
        client_first = rest[4 : 4 + length].decode()
        assert client_first.startswith("n,,")
        self.client_first_bare = client_first[3:]
        nonce = self.client_first_bare.split("r=", 1)[1] + "SERVERNONCE"
        salt = base64.b64encode(self.salt).decode()
        self.server_first = f"r={nonce},s={salt},i={self.iterations}"
        return self.server_first.encode()

    def final(self, sasl_response: bytes) -> bytes:
        client_final = sasl_response[5:].decode()
        without_proof, proof_b64 = client_final.rsplit(",p=", 1)
        auth = f"{self.client_first_bare},{self.server_first},{without_proof}".encode()
        signature = hmac.digest(self.stored_key, auth, "sha256")
        client_key = bytes(a ^ b for a, b in zip(base64.b64decode(proof_b64), signature, strict=True))
        if hashlib.sha256(client_key).digest() != self.stored_key:
            return b"e=invalid-proof"
        return b"v=" + base64.b64encode(hmac.digest(self.server_key, auth, "sha256"))


def test_upstream_scram_exchange() -> None:
    """UpstreamAuth completes SCRAM-SHA-256 against a server that knows the password."""
    server = ScramServer("app-secret")
    auth = UpstreamAuth("app", "app-secret")
    initial = auth.step(AUTH_SASL, b"SCRAM-SHA-256-PLUS\x00SCRAM-SHA-256\x00\x00")
    assert initial.send is not None and initial.send[:1] == b"p"
    response = auth.step(AUTH_SASL_CONTINUE, server.first(initial.send))
    assert response.send is not None
    final = auth.step(AUTH_SASL_FINAL, server.final(response.send))
    assert final.send is None and not final.done
    assert auth.step(AUTH_OK, b"").done
    assert auth.used == "scram-sha-256"


def test_upstream_scram_wrong_password() -> None:
    """With the wrong password the server's refusal surfaces as PgAuthError."""
    server = ScramServer("right")
    auth = UpstreamAuth("app", "wrong")
    initial = auth.step(AUTH_SASL, b"SCRAM-SHA-256\x00\x00")
    assert initial.send is not None
    response = auth.step(AUTH_SASL_CONTINUE, server.first(initial.send))
    assert response.send is not None
    with pytest.raises(PgAuthError, match="invalid-proof"):
        auth.step(AUTH_SASL_FINAL, server.final(response.send))


def test_upstream_md5_and_trust() -> None:
    """md5 answers with the salted hash; trust needs no password."""
    auth = UpstreamAuth("app", "pw")
    step = auth.step(AUTH_MD5, b"salt")
    assert step.send == password_message(md5_password("app", "pw", b"salt"))
    assert UpstreamAuth("app", None, "trust").step(AUTH_OK, b"").done
    assert UpstreamAuth("app", "pw").step(AUTH_OK, b"").done


def test_upstream_never_downgrades() -> None:
    """auto never sends the password in cleartext; a configured method must be the one asked for."""
    with pytest.raises(PgAuthError, match="configured for auto"):
        UpstreamAuth("app", "pw").step(AUTH_CLEARTEXT, b"")
    step = UpstreamAuth("app", "pw", "password").step(AUTH_CLEARTEXT, b"")
    assert step.send == password_message("pw")
    with pytest.raises(PgAuthError, match="configured for md5"):
        UpstreamAuth("app", "pw", "md5").step(AUTH_SASL, b"SCRAM-SHA-256\x00\x00")
    with pytest.raises(PgAuthError, match="did not ask for scram-sha-256"):
        UpstreamAuth("app", "pw", "scram-sha-256").step(AUTH_OK, b"")
    with pytest.raises(PgAuthError, match="offers only"):
        UpstreamAuth("app", "pw").step(AUTH_SASL, b"SCRAM-SHA-256-PLUS\x00\x00")


def test_upstream_server_must_prove_itself() -> None:
    """AuthenticationOk before the SCRAM server signature is refused."""
    auth = UpstreamAuth("app", "pw")
    auth.step(AUTH_SASL, b"SCRAM-SHA-256\x00\x00")
    with pytest.raises(PgAuthError, match="skipped the SCRAM server signature"):
        auth.step(AUTH_OK, b"")
