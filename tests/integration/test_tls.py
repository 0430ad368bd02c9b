"""TLS through the agent: clients keep their sslmode, including verify-full against the
server's own certificate, and the agent speaks TLS upstream when the client did."""

from __future__ import annotations

import datetime
import ipaddress
import os
import shutil
import socket
import ssl
import struct
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from agent.protocols import postgres as pg
from tests.conftest import require
from tests.support.agent import AgentProcess
from tests.support.netns import NetNS, call_in, netns
from tests.support.pgserver import PgServer, pgserver


def make_certificates(directory: Path) -> tuple[Path, Path, Path]:
    """A CA and a server certificate for 127.0.0.1 and localhost: (ca.pem, server.crt, server.key)."""
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "ringfence test CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - datetime.timedelta(days=1))
          .not_valid_after(now + datetime.timedelta(days=30))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
            .issuer_name(ca_name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=30))
            .add_extension(x509.SubjectAlternativeName([
                x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                critical=False)
            .sign(ca_key, hashes.SHA256()))
    paths = directory / "ca.pem", directory / "server.crt", directory / "server.key"
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    paths[2].chmod(0o600)
    for p in paths:
        os.chmod(p.parent, 0o755)
    paths[0].chmod(0o644)
    return paths


SCRAM_PASSWORD = "correct-horse-battery"


class Stack:
    def __init__(self, ns: NetNS, server: PgServer, agent: AgentProcess, ca: Path) -> None:
        self.ns, self.server, self.agent, self.ca = ns, server, agent, ca

    def psql(self, conninfo: str, sql: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(self.ns.argv([self.server.tool("psql"), "-X", "-tA", "-d", conninfo,
                                            "-c", sql]), capture_output=True, text=True, timeout=60)


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    require(os.geteuid() == 0, "root")
    require(Path("/usr/lib/postgresql").is_dir(), "a PostgreSQL server (postgresql package)")
    workdir = Path(tempfile.mkdtemp(prefix="ringfence-tls-"))
    workdir.chmod(0o755)
    ca, cert, key = make_certificates(workdir)
    hba = ("hostnossl all secure 0.0.0.0/0 reject", "hostnossl all secure ::/0 reject")
    with netns("rftls") as ns, pgserver(ns, roles=("nobody", "secure"), ssl_files=(cert, key),
                                        hba_first=hba, passwords={"scram": SCRAM_PASSWORD}) as server:
        policy = workdir / "policy.toml"
        policy.write_text('[defaults]\nunidentified = "allow"\n')
        services = f"""
[[protect]]
name = "postgres"
protocol = "postgres"
port = 5432

[protect.tls]
cert_file = "{cert}"
key_file = "{key}"
"""
        agent = AgentProcess(ns, workdir / "agent", services=services, policy=policy)
        agent.start()
        try:
            yield Stack(ns, server, agent, ca)
        finally:
            if agent.running:
                agent.stop()
    shutil.rmtree(workdir, ignore_errors=True)


def latest_start(agent: AgentProcess, application: str) -> dict[str, Any]:
    return agent.wait_for(lambda rs: next(
        (r for r in reversed(rs) if r["type"] == "session.start"
         and (r.get("target") or {}).get("application_name") == application), None))


def test_verify_full_against_the_servers_certificate(stack: Stack) -> None:
    """sslmode=verify-full with the server's CA works through the agent, which presents the
    server's certificate; the record shows TLS on both legs."""
    done = stack.psql(f"host=127.0.0.1 user=nobody dbname=postgres sslmode=verify-full "
                      f"sslrootcert={stack.ca} application_name=verify-full", "select 1")
    assert done.returncode == 0, done.stderr
    start = latest_start(stack.agent, "verify-full")
    assert start["tls"]["client"]["version"] in ("TLSv1.2", "TLSv1.3")
    assert start["tls"]["upstream"]["version"] in ("TLSv1.2", "TLSv1.3")
    assert stack.agent.wait_for(lambda rs: any(r["type"] == "query" and r["text"] == "select 1"
                                               for r in rs))


@pytest.mark.parametrize("mode", ["disable", "prefer", "require"])
def test_other_sslmodes_keep_working(stack: Stack, mode: str) -> None:
    """sslmode=disable, prefer and require clients connect and run statements as before."""
    done = stack.psql(f"host=127.0.0.1 user=nobody dbname=postgres sslmode={mode} "
                      f"application_name=mode-{mode}", "select 41 + 1")
    assert done.returncode == 0 and done.stdout.strip() == "42", done.stderr
    start = latest_start(stack.agent, f"mode-{mode}")
    assert ("tls" in start) == (mode != "disable")


def test_scram_channel_binding_holds_through_the_agent(stack: Stack) -> None:
    """channel_binding=require (SCRAM-SHA-256-PLUS): the binding is the hash of the server's
    certificate, which the agent presents to the client and the server holds upstream, so
    it checks out end to end; the password is never the agent's business."""
    done = stack.psql(f"host=127.0.0.1 user=scram dbname=postgres sslmode=verify-full "
                      f"sslrootcert={stack.ca} channel_binding=require password={SCRAM_PASSWORD} "
                      f"application_name=channel-binding", "select current_user")
    assert done.returncode == 0 and done.stdout.strip() == "scram", done.stderr
    start = latest_start(stack.agent, "channel-binding")
    assert start["tls"]["upstream"]["version"] in ("TLSv1.2", "TLSv1.3")
    # Without TLS there is nothing to bind to, and libpq refuses rather than downgrade.
    plain = stack.psql(f"host=127.0.0.1 user=scram dbname=postgres sslmode=disable "
                       f"channel_binding=require password={SCRAM_PASSWORD}", "select 1")
    assert plain.returncode != 0 and "channel binding" in plain.stderr


def test_upstream_tls_when_the_server_requires_it(stack: Stack) -> None:
    """A role the server admits only over TLS connects when the client uses TLS (the agent then
    uses TLS upstream too) and is rejected by the server when the client does not."""
    ok = stack.psql("host=127.0.0.1 user=secure dbname=postgres sslmode=require", "select current_user")
    assert ok.returncode == 0 and ok.stdout.strip() == "secure", ok.stderr
    plain = stack.psql("host=127.0.0.1 user=secure dbname=postgres sslmode=disable", "select 1")
    assert plain.returncode != 0 and "no encryption" in plain.stderr


def test_direct_tls_is_handled(stack: Stack) -> None:
    """A client that starts with a TLS ClientHello (PostgreSQL 17 direct TLS, ALPN postgresql)
    gets the PostgreSQL protocol inside TLS."""
    def exchange() -> bytes:
        context = ssl.create_default_context(cafile=str(stack.ca))
        context.set_alpn_protocols(["postgresql"])
        with socket.create_connection(("127.0.0.1", 5432), timeout=20) as raw, \
                context.wrap_socket(raw, server_hostname="localhost") as tls:
            assert tls.selected_alpn_protocol() == "postgresql"
            tls.sendall(pg.startup_message({"user": "nobody", "database": "postgres",
                                            "application_name": "direct-tls"}))
            reply = b""
            while b"Z\x00\x00\x00\x05" not in reply:
                chunk = tls.recv(65536)
                if not chunk:
                    break
                reply += chunk
            tls.sendall(b"X" + struct.pack("!i", 4))
            return reply

    reply = call_in(stack.ns, exchange)
    events = pg.BackendScanner().feed(reply)
    assert pg.AuthenticationRequest(0, b"") in events
    assert pg.ReadyForQuery("I") in events
    start = latest_start(stack.agent, "direct-tls")
    assert start["tls"]["client"]["alpn"] == "postgresql"
