"""TLS for protected services: the agent terminates the client's TLS and opens its own upstream.

:class:`TlsChannel` is TLS over memory buffers (``ssl.MemoryBIO``): fed the
bytes that arrived, it returns the plaintext and the bytes to send back, so
the proxy keeps doing all socket I/O itself, TLS or not, and can start TLS in
the middle of a connection (after PostgreSQL's SSLRequest) or on its first
byte (PostgreSQL 17's direct TLS).
"""

from __future__ import annotations

import logging
import ssl
from dataclasses import dataclass
from pathlib import Path

from agent.config import ServiceTls
from agent.pgconf import POSTGRESQL_CONF_GLOBS, local_cluster, parse_bool

log = logging.getLogger("ringfence.tls")

# What PostgreSQL 17 clients ask for with direct TLS (sslnegotiation=direct).
ALPN_POSTGRESQL = "postgresql"
TLS_RECORD_HANDSHAKE = 0x16


class TlsError(Exception):
    """TLS cannot be set up as configured."""


@dataclass(frozen=True, slots=True)
class ServerTlsFiles:
    cert_file: Path
    key_file: Path
    source: str  # where they were found


def find_server_tls_files(port: int, globs: tuple[str, ...] = POSTGRESQL_CONF_GLOBS) -> ServerTlsFiles | None:
    """The certificate and key of the local PostgreSQL server listening on ``port``, if it uses TLS."""
    cluster = local_cluster(port, globs)
    if cluster is None:
        return None
    conf, settings = cluster
    if not parse_bool(settings.get("ssl", "off")):
        return None
    base = Path(settings.get("data_directory", str(conf.parent)))
    cert = Path(settings.get("ssl_cert_file", "server.crt"))
    key = Path(settings.get("ssl_key_file", "server.key"))
    return ServerTlsFiles(base / cert if not cert.is_absolute() else cert,
                          base / key if not key.is_absolute() else key, str(conf))


def client_facing_context(settings: ServiceTls, port: int) -> ssl.SSLContext | None:
    """The context the agent presents to clients, or None when TLS is off for this service."""
    if not settings.cert_file:
        return None
    if settings.cert_file == "auto":
        found = find_server_tls_files(port)
        if found is None:
            return None
        cert, key, source = found.cert_file, found.key_file, f"the server's own ({found.source})"
    else:
        cert, key, source = Path(settings.cert_file), Path(settings.key_file), "configured"
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as e:
        raise TlsError(f"cannot load TLS certificate {cert} and key {key}: {e}") from None
    context.set_alpn_protocols([ALPN_POSTGRESQL])
    log.info("TLS for clients with the %s certificate %s", source, cert,
             extra={"event": "tls.ready", "cert_file": str(cert)})
    return context


def upstream_context(settings: ServiceTls) -> ssl.SSLContext:
    """The context for the agent's own TLS connection to the server."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if settings.upstream_ca_file:
        try:
            context.load_verify_locations(settings.upstream_ca_file)
        except (OSError, ssl.SSLError) as e:
            raise TlsError(f"cannot load upstream CA file {settings.upstream_ca_file}: {e}") from None
        context.check_hostname = False  # the server is addressed by IP; the CA pins it
        context.verify_mode = ssl.CERT_REQUIRED
    else:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


class TlsChannel:
    """One TLS connection over memory buffers."""

    def __init__(self, context: ssl.SSLContext, *, server_side: bool) -> None:
        self.incoming = ssl.MemoryBIO()
        self.outgoing = ssl.MemoryBIO()
        self.tls = context.wrap_bio(self.incoming, self.outgoing, server_side=server_side)
        self.established = False
        self.closed = False

    def start(self) -> bytes:
        """Begin the handshake (client side); returns the bytes to send."""
        self._handshake()
        return self.outgoing.read()

    def receive(self, data: bytes) -> tuple[bytes, bytes]:
        """Feed bytes from the peer; returns (plaintext, bytes to send to the peer)."""
        self.incoming.write(data)
        plain: list[bytes] = []
        if not self.established:
            self._handshake()
        if self.established:
            while True:
                try:
                    chunk = self.tls.read(65536)
                except ssl.SSLWantReadError:
                    break
                except ssl.SSLZeroReturnError:
                    self.closed = True
                    break
                if not chunk:
                    break
                plain.append(chunk)
        return b"".join(plain), self.outgoing.read()

    def send(self, plain: bytes) -> bytes:
        """Encrypt ``plain``; returns the bytes to send to the peer."""
        self.tls.write(plain)
        return self.outgoing.read()

    def _handshake(self) -> None:
        try:
            self.tls.do_handshake()
        except ssl.SSLWantReadError:
            return
        self.established = True

    def summary(self) -> dict[str, object]:
        """Protocol version and cipher, for the session record."""
        cipher = self.tls.cipher()
        return {"version": self.tls.version(), "cipher": cipher[0] if cipher else None,
                "alpn": self.tls.selected_alpn_protocol()}
