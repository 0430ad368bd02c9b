"""The asyncio proxy: accept redirected connections and run a protocol session each.

All socket I/O of the agent's sessions lives here. Per connection:

1. accept on the service's listener; the real target is the accepted socket's
   own address when the sk_lookup program steered the connection (nothing is
   translated), or SO_ORIGINAL_DST behind iptables REDIRECT. A connection that
   was not redirected is refused: the listener is never a way around the rules;
2. attribution (BPF map or procfs) in a worker thread, while the upstream
   socket, marked with SO_MARK so the redirect rules let it pass (or, with
   sk_lookup, bound first and exempted by its address and port), connects to
   the real target;
3. the protocol session is fed the bytes of each side and returns what to
   forward and what to record. A policy decision is on disk before it takes
   effect; other records are queued for the audit writer as soon as the bytes
   they describe are on their way, and no byte is forwarded while the audit
   trail is failing.

Backpressure: when one side's transport buffers more than its high-water
mark, reading from the other side pauses until it drains.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import os
import pwd
import secrets
import socket
import ssl
import struct
from collections.abc import Callable, Sequence
from typing import Any, Protocol, cast

from agent.balance import SessionCount
from agent.config import Config, ProtectedService
from agent.pgconf import keepalive_timing
from agent.pgsession import Actions, PostgresSession, client_step, server_step
from agent.protocols import postgres as pg
from agent.sklookup import Exemptions
from agent.tls import TlsChannel, client_facing_context, upstream_context
from agent.workers import CancelKeys

log = logging.getLogger("ringfence.proxy")

SO_ORIGINAL_DST = 80  # linux/netfilter_ipv4.h
IP6T_SO_ORIGINAL_DST = 80  # linux/netfilter_ipv6/ip6_tables.h
SOL_IPV6 = 41
UPSTREAM_CONNECT_TIMEOUT = 10.0
# After a client's Terminate, how long the agent waits for the server to close the upstream
# connection (it does at once) before closing it itself.
TERMINATE_CLOSE_WAIT = 5.0
ATTRIBUTION_TIMEOUT = 2.0
STARTUP_TIMEOUT = 10.0
HIGH_WATER = 256 * 1024
LOW_WATER = 64 * 1024


# A record to emit: its type and event, or the event already encoded as msgpack (the
# session's one-step paths make it so).
Emitted = tuple[str, dict[str, Any] | bytes]


class AuditSink(Protocol):
    """The part of the audit log the proxy uses."""

    @property
    def healthy(self) -> bool: ...

    def emit(self, type: str, event: dict[str, Any], *, session_id: str | None = None) -> None: ...

    def emit_many(self, records: Sequence[Emitted], *, session_id: str | None = None,
                  joining: object = None) -> None:
        """Queue records in order; ``joining``: the event of a result among them that answers
        the query record this session emitted last (see ``emit_packed``)."""

    def emit_packed(self, type: str, data: bytes, session_id: str | None,
                    caller: asyncio.AbstractEventLoop | None = None, joins: bool = False) -> None:
        """Queue a record whose event is already encoded (msgpack); ``caller``: the loop
        whose callback makes this call; ``joins``: a result that answers the query record
        this session emitted last, with nothing of the session's since (then the two are
        stored as one record when they go to the writer together)."""

    async def emit_durable(
        self, type: str, event: dict[str, Any], *, session_id: str | None = None
    ) -> int: ...


class Attribution(Protocol):
    def to_record(self) -> tuple[dict[str, Any] | None, dict[str, Any]]: ...


class Attributor(Protocol):
    def lookup(self, conn: Any, original_dst: tuple[str, int]) -> Attribution: ...


def original_destination(sock: Any) -> tuple[str, int] | None:
    """The destination the client dialled before REDIRECT, or None if not NATed."""
    try:
        if sock.family == socket.AF_INET6:
            raw = sock.getsockopt(SOL_IPV6, IP6T_SO_ORIGINAL_DST, 28)
            port = struct.unpack_from("!H", raw, 2)[0]
            address = ipaddress.IPv6Address(raw[8:24])
            host = str(address.ipv4_mapped or address)
        else:
            raw = sock.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
            port = struct.unpack_from("!H", raw, 2)[0]
            host = socket.inet_ntoa(raw[4:8])
    except OSError:
        return None
    return host, port


# The client's own encryption requests, answered by the agent before anything goes upstream.
_ENCRYPTION_REQUESTS = (pg.ssl_request(), struct.pack("!ii", 8, pg.GSSENC_REQUEST_CODE))


def _user_name(uid: Any) -> str | None:
    if not isinstance(uid, int):
        return None
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return None


def local_subject(process: dict[str, Any] | None) -> Any:
    """What kernel evidence alone says about the client (never an identity by itself)."""
    from policy import Subject

    if not process:
        return Subject()
    return Subject(
        uid=process.get("uid"),
        loginuid=process.get("loginuid"),
        unix_user=_user_name(process.get("uid")),
        loginuid_user=_user_name(process.get("loginuid")),
    )


def identity_subject(identity: Any, process: dict[str, Any] | None) -> Any:
    """The policy's view of a connection: the verified identity plus kernel evidence."""
    from dataclasses import replace

    subject = local_subject(process)
    if identity is None:
        return subject
    actor = identity.actor.kind if identity.actor.kind in ("human", "automation") else None
    return replace(
        subject,
        subject=identity.subject,
        groups=tuple(identity.groups),
        issuer=identity.token.issuer if identity.token is not None else None,
        service_account=identity.service_account,
        actor=actor,
        findings=tuple(f.kind for f in identity.findings),
        identified=identity.identified,
    )


def _endpoint(address: Any) -> dict[str, Any]:
    host = str(address[0])
    if host.startswith("::ffff:"):
        host = host[7:]
    return {"ip": host, "port": int(address[1])}


class Proxy:
    """Listeners for every protected service and the sessions they carry."""

    # The fields the compiled one-step paths (agent/protocols/_pgscan.c) read and move on,
    # as slots; the rest of its state is in its __dict__.
    __slots__ = (
        "audit", "__dict__", "__weakref__",
    )

    def __init__(
        self,
        config: Config,
        audit: AuditSink,
        attributor: Attributor | None,
        policy: Callable[[], Any] | None = None,
        identity: Any = None,
        cancel_keys: Any = None,
    ) -> None:
        self.config = config
        self.audit = audit
        self.attributor = attributor
        self.policy = policy
        self.identity = identity  # agent.identity.IdentityResolver
        # TLS contexts per service: raises TlsError when configured files are bad.
        self.tls_contexts: dict[str, ssl.SSLContext] = {}
        self._upstream_tls: dict[str, ssl.SSLContext] = {}
        # Keepalive timing on clients' connections, per service (see ServiceKeepalive).
        self.keepalive: dict[str, tuple[int, int, int]] = {}
        for service in config.protect:
            context = client_facing_context(service.tls, service.port)
            if context is not None:
                self.tls_contexts[service.name] = context
            self.keepalive[service.name] = keepalive_timing(service.keepalive, service.port)
        self.servers: list[asyncio.base_events.Server] = []
        self.connections: set[ClientSide] = set()
        self.stopping: str | None = None  # why every session is being ended (end_sessions)
        self.pid = os.getpid()
        # Which session holds each backend key: this process's, or the agent's registry
        # for a session worker (agent.workers.RemoteCancelKeys).
        self.cancel_keys = CancelKeys() if cancel_keys is None else cancel_keys
        # Per service, the sockets bound for each listen address: the first served here,
        # the others handed to session workers (see start).
        self.listener_sockets: list[tuple[str, list[socket.socket]]] = []
        # This event loop's slot in the session counts that balance new connections over
        # the loops (agent.balance), when they are balanced; its map's fd also goes to the
        # session workers (agent.workers).
        self.session_count: SessionCount | None = None
        # When connections are steered by the sk_lookup program (agent.sklookup, [redirect]
        # method): where this loop's upstream connections are let past it while they are
        # made, its map's fd also in the session workers. None with iptables REDIRECT.
        self.exemptions: Exemptions | None = None

    def upstream_tls_context(self, service: ProtectedService) -> ssl.SSLContext:
        """The context for TLS to ``service``'s server (built on first use)."""
        context = self._upstream_tls.get(service.name)
        if context is None:
            context = self._upstream_tls[service.name] = upstream_context(service.tls)
        return context

    async def start(self, loops: int = 1) -> None:
        """Bind every listener and serve it; raises OSError naming the address on failure.

        ``loops`` > 1: each listener is bound that many times (``SO_REUSEPORT``, the kernel
        spreading connections over them); the first is served here and the others are
        left in :attr:`listener_sockets` for session workers (``agent.workers``)."""
        for service in self.config.protect:
            for address in self.config.agent.listen_addresses:
                socks = _bind(address, service.listen_port, loops)
                if socks:
                    self.listener_sockets.append((service.name, socks))
                    await self.serve([(service, socks[0])])

    async def serve(self, listeners: Sequence[tuple[ProtectedService, socket.socket]]) -> None:
        """Accept sessions on sockets already bound and listening."""
        loop = asyncio.get_running_loop()
        for service, sock in listeners:
            sock.setblocking(False)
            server = await loop.create_server(self._factory(service), sock=sock, backlog=1024)
            self.servers.append(server)

    def _factory(self, service: ProtectedService) -> Callable[[], ClientSide]:
        return lambda: ClientSide(self, service)

    def end_sessions(self, reason: str = "agent stopping") -> None:
        """End every open session with a clear message, and each new one as it starts,
        while still listening."""
        self.stopping = reason
        for conn in list(self.connections):
            conn.shutdown(reason)

    async def stop(self, reason: str = "agent stopping") -> None:
        """Stop accepting and end every open session with a clear message."""
        for server in self.servers:
            server.close()
        self.end_sessions(reason)
        for server in self.servers:
            await server.wait_closed()
        self.servers.clear()

    def cancel_target(self, destination: tuple[str, int]) -> Callable[[int, bytes], str | None]:
        def lookup(pid: int, secret: bytes) -> str | None:
            session_id: str | None = self.cancel_keys.lookup(
                (destination[0], destination[1], pid, secret))
            return session_id

        return lookup


def _bind(address: str, port: int, copies: int) -> list[socket.socket]:
    """``copies`` listening sockets on ``address``:``port`` (SO_REUSEPORT when more than one);
    none when the address is IPv6 and the host has no IPv6. Raises OSError naming it."""
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    socks: list[socket.socket] = []
    try:
        for _ in range(copies):
            sock = socket.socket(family, socket.SOCK_STREAM)
            socks.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if copies > 1:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind((address, port))
            sock.listen(1024)
    except OSError as e:
        for sock in socks:
            sock.close()
        if family == socket.AF_INET6 and e.errno in (97, 99):  # no IPv6 here
            log.warning("IPv6 unavailable; not listening on %s", address,
                        extra={"event": "proxy.ipv6_unavailable"})
            return []
        raise OSError(e.errno, f"cannot listen on [{address}]:{port}: {e.strerror}") from None
    return socks


def _keep_alive(sock: Any, timing: tuple[int, int, int] | None = None) -> None:
    """TCP keepalive on one of a session's sockets, with the host's timing (net.ipv4.
    tcp_keepalive_*), as PostgreSQL sets on its clients' and libpq on its own. The agent
    answers each side's probes itself, so without probes of its own a peer that vanished
    (power loss, a network cut) would never be noticed: its backend, and any locks it
    holds, would stay for good. Probing each side, the agent ends the session, and the
    other side's connection with it, when one side stops answering. ``timing`` (idle,
    interval, count; 0 for the host's) as the server's tcp_keepalives_* would set it."""
    if sock is None:
        return
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        for option, value in zip((socket.TCP_KEEPIDLE, socket.TCP_KEEPINTVL, socket.TCP_KEEPCNT),
                                 timing or (0, 0, 0), strict=True):
            if value:
                sock.setsockopt(socket.IPPROTO_TCP, option, value)


class ClientSide(asyncio.Protocol):
    """The client's connection to the agent; owns the session and the upstream."""

    # The fields the compiled one-step paths (agent/protocols/_pgscan.c) read and move on,
    # as slots; the rest of its state is in its __dict__.
    __slots__ = (
        "closed", "_early", "session", "_plain", "_deferred", "proxy", "upstream",
        "transport", "_loop", "session_id", "_query_last", "__dict__", "__weakref__",
    )

    def __init__(self, proxy: Proxy, service: ProtectedService) -> None:
        self.proxy = proxy
        self.service = service
        self.session_id = secrets.token_hex(8)
        self.transport: asyncio.Transport | None = None
        self.upstream: UpstreamSide | None = None
        self.session: PostgresSession | None = None
        self.destination: tuple[str, int] | None = None
        self.closed = False
        self.key_registered: tuple[str, int, int, bytes] | None = None
        self._deferred: list[Actions] | None = None  # actions waiting for a durable commit
        self._early: list[bytes] | None = []  # client bytes that arrived during setup
        self.process: dict[str, Any] | None = None
        self.tls_context = proxy.tls_contexts.get(service.name)
        self.tls: TlsChannel | None = None  # TLS with the client, once started
        self._first_byte_seen = False
        # Upstream TLS: "new" → "negotiating" (SSLRequest sent) → "handshaking" → "tls",
        # or "plain". The client's messages wait in _client_hold meanwhile.
        self.upstream_state = "new"
        self._client_hold: list[bytes] | None = None
        self.client_write_paused = False  # the client's transport is above its high-water mark
        self.upstream_write_paused = False
        # Set once the session is up with neither TLS nor anything of its setup pending
        # (none of which comes back): both sides' bytes then skip the setup steps (see
        # _take_plain_path).
        self._plain = False
        self._loop: asyncio.AbstractEventLoop | None = None  # the loop this connection runs on
        # Whether the session's last record is the query record of the last statement it
        # sent, whose answer may still come by the one-step reply path with nothing recorded
        # in between: the result then joins that record (see _emit_result).
        self._query_last = False

    # asyncio callbacks --------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        transport = cast(asyncio.Transport, transport)
        self.transport = transport
        transport.pause_reading()
        transport.set_write_buffer_limits(HIGH_WATER, LOW_WATER)
        _keep_alive(transport.get_extra_info("socket"), self.proxy.keepalive.get(self.service.name))
        proxy = self.proxy
        proxy.connections.add(self)
        if proxy.session_count is not None:
            proxy.session_count.set(len(proxy.connections))
        self._loop = loop = asyncio.get_running_loop()
        task = loop.create_task(self._setup())
        task.add_done_callback(self._setup_done)

    def _setup_done(self, task: asyncio.Task[None]) -> None:
        if task.cancelled():
            self._close_all()
            return
        error = task.exception()
        if error is not None:
            log.error(
                "session task failed",
                exc_info=error,
                extra={"event": "proxy.setup_failed", "session_id": self.session_id},
            )
            if self.session is not None and not self.session.ended:
                self.apply(
                    self.session.refuse(
                        "XX000", "ringfence: internal error while setting up the session",
                        f"agent error: {error!r}",
                    )
                )
            self._close_all()

    def data_received(self, data: bytes) -> None:
        if client_step is not None:  # (compiled: what _client_bytes does, see below)
            step = client_step(self, data)
            if step == 1:
                return
            if step == 2:  # not the one-step kind
                self.apply(cast(PostgresSession, self.session).client_data(data))
                return
        if self.closed:
            return
        if self._early is not None:
            # Setup is still running (uvloop starts reading right after
            # connection_made, whatever it asked): hold the bytes.
            self._early.append(data)
            if self.transport is not None:
                self.transport.pause_reading()
            return
        self._client_bytes(data)

    def _client_bytes(self, data: bytes) -> None:
        """Bytes off the client's socket: through TLS and setup when they apply, then to the
        session."""
        session = self.session
        if session is None or self.closed:
            return
        if not self._plain:  # (once setup is behind, none of this applies again)
            data = self._through_setup(session, data)
            if not data:
                return
        if self._deferred is None and self.proxy.audit.healthy:
            # The commonest cases (a statement of a shape this session already allowed, or
            # one run in the extended protocol) in one step: forwarded as they are, then
            # recorded, as apply() does for any other.
            record = (session.allowed_query(data) if data[0] == 0x51  # Query
                      else session.allowed_execute(data))
            if record is not None:
                self._write_server(data)
                self._emit_packed("query", record)
                self._query_last = True
                if not self._plain:
                    self._take_plain_path()
                return
        self.apply(session.client_data(data))

    def _through_setup(self, session: PostgresSession, data: bytes) -> bytes:
        """The client's bytes through TLS (direct or after SSLRequest) and the choice of the
        upstream's TLS, when they apply: what is left for the session now (empty when
        nothing is, or when it is held until the server's TLS is up)."""
        if self.tls is None and not self._first_byte_seen and data[:1] == b"\x16":
            # A TLS ClientHello first: PostgreSQL 17's direct TLS (sslnegotiation=direct).
            if self.tls_context is None:
                self.apply(session.connection_lost(
                    "direct TLS (sslnegotiation=direct) requested, but TLS is not configured "
                    "for this service", "failure"))
                self._close_all()
                return b""
            self.tls = TlsChannel(self.tls_context, server_side=True)
            session.tls_started = True
        self._first_byte_seen = True
        if self.tls is not None:
            was_established = self.tls.established
            try:
                data, reply = self.tls.receive(data)
            except ssl.SSLError as e:
                self.apply(session.connection_lost(f"client TLS error: {e.reason or e}", "failure"))
                self._close_all()
                return b""
            if reply and self.transport is not None:
                self.transport.write(reply)
            if self.tls.established and not was_established:
                session.context["tls"] = {"client": self.tls.summary()}
            if not data:
                return b""
        if self.upstream_state == "new" and not data.startswith(_ENCRYPTION_REQUESTS):
            self._choose_upstream_tls()
        if self._client_hold is not None:
            # Until the server's TLS is up: hold, and read no more meanwhile.
            self._client_hold.append(data)
            if self.transport is not None:
                self.transport.pause_reading()
            return b""
        return data

    def _take_plain_path(self) -> None:
        """After the session's first one-step statement: when neither side has TLS and no
        setup step is pending, later bytes skip the setup steps (_through_setup, and the
        server side's). None of these conditions changes back: TLS starts before the first
        message or never, and the upstream's state and the held bytes belong to setup."""
        upstream = self.upstream
        if (self.tls is None and self.upstream_state == "plain" and self._early is None
                and self._client_hold is None and upstream is not None and upstream.tls is None):
            self._plain = True

    def _choose_upstream_tls(self) -> None:
        """Before the session's first message goes upstream: TLS to the server or not."""
        mode = self.service.tls.upstream
        upstream = self.upstream
        if mode == "require" or (mode == "mirror" and self.tls is not None):
            if upstream is None or upstream.transport is None:
                return
            # SSLRequest first; the client's messages wait for the handshake.
            self.upstream_state = "negotiating"
            self._client_hold = []
            upstream.transport.write(pg.ssl_request())
        else:
            self.upstream_state = "plain"

    def _write_client(self, data: bytes) -> None:
        if self.transport is None:
            return
        if self.tls is not None and self.tls.established:
            data = self.tls.send(data)
        self.transport.write(data)

    def _write_server(self, data: bytes) -> None:
        upstream = self.upstream
        if upstream is None or upstream.transport is None:
            return
        if upstream.tls is not None:
            data = upstream.tls.send(data)
        upstream.transport.write(data)

    def upstream_tls_ready(self) -> None:
        """The upstream handshake (or the server's 'N') is done: the client's messages may go on."""
        held, self._client_hold = self._client_hold or [], None
        if held and self.session is not None and not self.closed:
            self.apply(self.session.client_data(b"".join(held)))
        if (self.transport is not None and not self.closed and self._deferred is None
                and not self.upstream_write_paused):
            self.transport.resume_reading()

    def _start_session(self) -> None:
        """Setup is done: replay what arrived meanwhile, then read normally."""
        early, self._early = self._early or [], None
        if early and self.session is not None and not self.closed:
            self._client_bytes(b"".join(early))
        if self.transport is not None and not self.closed and self._deferred is None:
            self.transport.resume_reading()

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        reason = "client closed" if exc is None else f"client connection error: {exc}"
        if self.session is not None and not self.session.ended:
            self.apply(self.session.client_lost(reason, "success" if exc is None else "failure"))
        self._close_all()

    def pause_writing(self) -> None:
        self.client_write_paused = True
        if self.upstream and self.upstream.transport:
            self.upstream.transport.pause_reading()

    def resume_writing(self) -> None:
        self.client_write_paused = False
        if self.upstream and self.upstream.transport and not self.closed and self._deferred is None:
            self.upstream.transport.resume_reading()

    # setup --------------------------------------------------------------

    async def _setup(self) -> None:
        transport = self.transport
        assert transport is not None
        sock = transport.get_extra_info("socket")
        peer = transport.get_extra_info("peername")
        local = transport.get_extra_info("sockname")
        if sock is None or peer is None or local is None:
            transport.close()
            return
        if self.proxy.exemptions is not None:
            # The lookup program hands over connections as the client made them: the local
            # address is the one it dialled.
            destination: tuple[str, int] | None = (local[0], local[1])
        else:
            destination = original_destination(sock)
        context: dict[str, Any] = {
            "service": self.service.name,
            "protocol": self.service.protocol,
            "source": _endpoint(peer),
            "destination": _endpoint(destination) if destination else None,
            "listener": _endpoint(local),
            "agent_pid": self.proxy.pid,
        }
        self.destination = destination
        cfg = self.proxy.config.agent
        self.session = PostgresSession(
            self.session_id,
            context,
            max_message=cfg.max_message_bytes,
            max_statement=cfg.max_statement_bytes,
            max_prepared=cfg.max_prepared_bytes,
            cancel_target=self.proxy.cancel_target(destination) if destination else None,
            policy=self.proxy.policy,
        )
        self.session.tls_available = self.tls_context is not None
        if destination is None or (
            destination[1] == self.service.listen_port and _endpoint(local)["ip"] == destination[0]
        ):
            context["attribution"] = {"source": "unknown", "verified": False}
            self._refuse_at_startup(
                "08004",
                "ringfence: connect to the service's own port; the agent's listener "
                "only accepts redirected connections",
                "not a redirected connection",
            )
            return
        if destination[1] != self.service.port:
            log.warning(
                "redirected connection to an unexpected port",
                extra={"event": "proxy.unexpected_port", "port": destination[1]},
            )
        if self.proxy.stopping is not None:
            context["attribution"] = {"source": "unknown", "verified": False}
            self._refuse_at_startup("57P01", f"terminating connection: ringfence "
                                    f"{self.proxy.stopping}", self.proxy.stopping)
            return
        if not self.proxy.audit.healthy:
            context["attribution"] = {"source": "unknown", "verified": False}
            # 57P03 (cannot connect now), as a server that is starting or stopping
            # answers: pg_isready reports "rejecting connections" and clients retry.
            self._refuse_at_startup(
                "57P03",
                "ringfence: the audit trail cannot be written, so this protected service "
                "refuses connections until it recovers",
                "audit unavailable",
            )
            return
        attribution_task = asyncio.ensure_future(self._attribute(sock, destination))
        try:
            await self._connect_upstream(destination)
        except OSError as e:
            context["process"], context["attribution"] = await attribution_task
            # No SQLSTATE: to libpq (pg_isready, PQping) a refusal without one means
            # that no server answered, which is what a direct connection would find.
            self._refuse_at_startup(
                None,
                f"ringfence: cannot reach {destination[0]}:{destination[1]}: {e.strerror or e}",
                f"upstream connect failed: {e.strerror or e}",
            )
            return
        context["process"], context["attribution"] = await attribution_task
        self.session.subject = local_subject(context["process"])
        if self.proxy.identity is not None:
            refusal = await self._resolve_identity(context["process"])
            if refusal is not None:
                if not self.closed:
                    self._refuse_at_startup(*refusal)
                return
        if self.closed:
            return
        self._start_session()

    async def _resolve_identity(self, process: dict[str, Any] | None) -> tuple[str, str, str] | None:
        """Who speaks for this connection before its startup packet; a refusal if it cannot start."""
        from agent.identity.credentials import CredentialError
        from agent.protocols.pgauth import UpstreamAuth

        resolver = self.proxy.identity
        session = self.session
        assert session is not None
        session.identity = await resolver.resolve_async(process, None, service=self.service)
        session.subject_for = lambda identity: identity_subject(identity, process)
        self.process = process
        if self.service.credentials is None:
            return None
        try:
            credential = await asyncio.to_thread(resolver.upstream_credential, self.service)
        except (CredentialError, OSError, ValueError) as e:
            log.error(
                "service credential unavailable",
                extra={"event": "identity.credential_error", "service": self.service.name,
                       "error": str(e)},
            )
            return ("28000", "ringfence: the service credential for this database cannot be read; "
                    "ask the operator to check [protect.credentials]", f"credential unavailable: {e}")
        session.upstream_auth = UpstreamAuth(credential.user, credential.password, credential.method)
        session.upstream_user = credential.user
        return None

    async def _verify_token(self, token: str) -> None:
        session = self.session
        assert session is not None
        result = await self.proxy.identity.resolve_async(self.process, token, service=self.service)
        if not self.closed:
            self.apply(session.identity_resolved(result))

    def _refuse_at_startup(self, sqlstate: str | None, message: str, reason: str) -> None:
        """Read the client's startup packet, then answer it with a FATAL error.

        Closing at once would reset the connection with the startup packet
        unread, and the client would never see why.
        """
        assert self.session is not None and self.transport is not None
        self.session.defer_refusal(sqlstate, message, reason)
        self._start_session()
        asyncio.get_running_loop().call_later(STARTUP_TIMEOUT, self._startup_timeout)

    def _startup_timeout(self) -> None:
        if self.closed or self.session is None:
            return
        if self.session.phase == "startup":
            self.apply(self.session.connection_lost("no startup packet in time", "failure"))
            self._close_all()

    async def _attribute(
        self, sock: Any, destination: tuple[str, int]
    ) -> tuple[dict[str, Any] | None, dict[str, Any]]:
        attributor = self.proxy.attributor
        if attributor is None:
            return None, {"source": "unknown", "verified": False, "reason": "attribution off"}
        loop = asyncio.get_running_loop()
        try:
            record = await asyncio.wait_for(
                loop.run_in_executor(None, attributor.lookup, sock, destination),
                ATTRIBUTION_TIMEOUT,
            )
            return record.to_record()
        except Exception as e:  # attribution must never take a session down
            log.warning(
                "attribution failed", extra={"event": "attribution.error", "error": repr(e)}
            )
            return None, {"source": "unknown", "verified": False, "reason": f"lookup failed: {e}"}

    async def _connect_upstream(self, destination: tuple[str, int]) -> None:
        loop = asyncio.get_running_loop()
        family = socket.AF_INET6 if ":" in destination[0] else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, self.proxy.config.agent.upstream_mark)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            _keep_alive(sock)
            sock.setblocking(False)
            exemptions = self.proxy.exemptions
            if exemptions is None:
                await asyncio.wait_for(loop.sock_connect(sock, destination),
                                       UPSTREAM_CONNECT_TIMEOUT)
            else:
                with exemptions.connecting(sock, destination):
                    await asyncio.wait_for(loop.sock_connect(sock, destination),
                                           UPSTREAM_CONNECT_TIMEOUT)
        except TimeoutError:
            sock.close()
            raise OSError(110, "connection timed out") from None
        except OSError:
            sock.close()
            raise
        upstream = UpstreamSide(self)
        await loop.create_connection(lambda: upstream, sock=sock)
        self.upstream = upstream
        if self.closed and upstream.transport is not None:
            upstream.transport.close()

    # actions ------------------------------------------------------------

    def apply(self, actions: Actions) -> None:
        """Carry out what the session asked, in order.

        When the actions include durable records (policy decisions), their
        records are queued, then both directions pause until the durable ones
        are on disk; anything arriving meanwhile waits behind them, so order is
        kept and no decision takes effect before it is recorded. Otherwise the
        bytes go out first and the records are queued right after, off the
        client's wait (the writer commits them in batches either way); a
        failing audit trail is checked before anything is forwarded.
        """
        self._query_last = False  # (whatever these are, they come between; see _emit)
        if self._deferred is not None:
            self._deferred.append(actions)
            return
        if actions.durable:
            if not self._emit(actions.records, actions.joining):
                return
            self._deferred = [actions]
            self._pause_both()
            task = asyncio.get_running_loop().create_task(self._commit_durable())
            task.add_done_callback(self._setup_done)
            return
        if actions.records and not self.proxy.audit.healthy:
            self._emit(actions.records, actions.joining)  # counts them lost, ends the session
            return
        self._carry_out(actions)
        self._emit(actions.records, actions.joining)

    def _emit(self, records: Sequence[Emitted], joining: object = None) -> bool:
        # (A query record last: the statement the one-step reply path may answer next.)
        self._query_last = bool(records) and records[-1][0] == "query"
        if not records:
            return True
        try:
            self.proxy.audit.emit_many(records, session_id=self.session_id, joining=joining)
        except Exception as e:
            self._audit_failed(e)
            return False
        return True

    def _emit_packed(self, type: str, data: bytes) -> None:
        """A one-step path's record (already encoded): :meth:`_emit` in fewer steps."""
        try:
            self.proxy.audit.emit_packed(type, data, self.session_id, self._loop)
        except Exception as e:
            self._audit_failed(e)

    def _emit_result(self, data: bytes) -> None:
        """The one-step reply path's result record (already encoded), joining its query's
        record when that is the session's last (see _query_last)."""
        joins, self._query_last = self._query_last, False
        try:
            self.proxy.audit.emit_packed("result", data, self.session_id, self._loop, joins)
        except Exception as e:
            self._audit_failed(e)

    def _audit_failed(self, error: Exception) -> None:
        log.error(
            "audit write failed; ending session",
            extra={"event": "audit.unavailable", "error": repr(error)},
        )
        self._fail_closed()

    async def _commit_durable(self) -> None:
        deferred = self._deferred
        assert deferred is not None
        while deferred and not self.closed:
            actions = deferred.pop(0)
            if actions.durable:
                try:
                    for kind, record in actions.durable:
                        await self.proxy.audit.emit_durable(kind, record, session_id=self.session_id)
                except Exception as e:
                    log.error(
                        "durable audit write failed; ending session",
                        extra={"event": "audit.unavailable", "error": repr(e)},
                    )
                    self._fail_closed()
                    return
            self._carry_out(actions)
            # Records of actions that arrived while waiting, in their order.
            if deferred and not self.closed and not self._emit(deferred[0].records,
                                                               deferred[0].joining):
                return
        self._deferred = None
        self._resume_both()

    def _pause_both(self) -> None:
        if self.transport is not None:
            self.transport.pause_reading()
        if self.upstream is not None and self.upstream.transport is not None:
            self.upstream.transport.pause_reading()

    def _resume_both(self) -> None:
        if self.closed:
            return
        if self.transport is not None and not self.upstream_write_paused:
            self.transport.resume_reading()
        if (self.upstream is not None and self.upstream.transport is not None
                and not self.client_write_paused):
            self.upstream.transport.resume_reading()

    def _carry_out(self, actions: Actions) -> None:
        if actions.to_server:
            self._write_server(
                actions.to_server[0] if len(actions.to_server) == 1 else b"".join(actions.to_server)
            )
        if actions.to_client:
            self._write_client(
                actions.to_client[0] if len(actions.to_client) == 1 else b"".join(actions.to_client)
            )
        if actions.start_tls and self.tls_context is not None:
            self.tls = TlsChannel(self.tls_context, server_side=True)
            self._plain = False  # (the session asks for TLS only during setup)
        session = self.session
        if session is not None and session.backend_key and self.key_registered is None:
            self._register_key(session.backend_key)
        if actions.close:
            self._close_all(server_closes=actions.close == "client terminated")
        elif actions.verify_token is not None:
            task = asyncio.get_running_loop().create_task(self._verify_token(actions.verify_token))
            task.add_done_callback(self._setup_done)

    def _fail_closed(self) -> None:
        if self.transport:
            self._write_client(
                pg.error_response(
                    "FATAL",
                    "58000",
                    "ringfence: the audit trail cannot be written; session ended",
                )
            )
        self._close_all()

    def _register_key(self, key: tuple[int, bytes]) -> None:
        if self.destination is None:
            return
        entry = (self.destination[0], self.destination[1], key[0], key[1])
        self.proxy.cancel_keys.register(entry, self.session_id)
        self.key_registered = entry

    def shutdown(self, reason: str) -> None:
        """End this session because the agent stops."""
        if self.session is not None and not self.session.ended:
            self.apply(
                self.session.refuse(
                    "57P01", f"terminating connection: ringfence {reason}", reason
                )
            )
        self._close_all()

    def _close_all(self, *, server_closes: bool = False) -> None:
        """End the session's connections. ``server_closes``: the server was sent a
        Terminate (the client's, or one in its place: see PostgresSession.client_lost) and
        ends the upstream connection itself; it is then left to do so (for
        at most TERMINATE_CLOSE_WAIT), so that the side closing first, which keeps the
        connection's TIME_WAIT, is the server's: a port the agent's next upstream
        connection could want is not held for a minute."""
        if self.closed:
            return
        self.closed = True
        proxy = self.proxy
        proxy.connections.discard(self)
        if proxy.session_count is not None:
            proxy.session_count.set(len(proxy.connections))
        if self.key_registered is not None:
            self.proxy.cancel_keys.unregister(self.key_registered)
        if self.transport is not None:
            self.transport.close()
        if self.upstream is not None and self.upstream.transport is not None:
            if server_closes:
                asyncio.get_running_loop().call_later(TERMINATE_CLOSE_WAIT,
                                                      self.upstream.transport.close)
            else:
                self.upstream.transport.close()


class UpstreamSide(asyncio.Protocol):
    """The agent's (marked) connection to the real server."""

    # The fields the compiled one-step paths (agent/protocols/_pgscan.c) read and move on,
    # as slots; the rest of its state is in its __dict__.
    __slots__ = (
        "client", "transport", "__dict__", "__weakref__",
    )

    def __init__(self, client: ClientSide) -> None:
        self.client = client
        self.transport: asyncio.Transport | None = None
        self.tls: TlsChannel | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.Transport, transport)
        self.transport = transport
        transport.set_write_buffer_limits(HIGH_WATER, LOW_WATER)

    def data_received(self, data: bytes) -> None:
        if server_step is not None:  # (compiled: what follows does with bytes plain_reply takes)
            step = server_step(self, data)
            if step == 1:
                return
            if step == 2:  # relayed to the client, not the one-step answer
                self.client.apply(cast(PostgresSession, self.client.session).server_data(
                    data, forwarded=True))
                return
        client = self.client
        session = client.session
        if session is None or client.closed:
            return
        if not client._plain:  # (once setup is behind, none of this applies again)
            data = self._through_setup(client, session, data)
            if not data:
                return
        if session.relays_server_bytes and client._deferred is None and client.proxy.audit.healthy:
            # Unchanged bytes go to the client before they are scanned and recorded.
            client._write_client(data)
            record = session.plain_reply(data)  # the commonest answer, in one step
            if record is not None:
                client._emit_result(record)
                return
            client.apply(session.server_data(data, forwarded=True))
            return
        client.apply(session.server_data(data))

    def _through_setup(self, client: ClientSide, session: PostgresSession, data: bytes) -> bytes:
        """The server's bytes through the upstream's TLS negotiation and TLS, when they are
        on: what is left for the session (empty when nothing is)."""
        state = client.upstream_state
        if state == "negotiating":
            self._negotiated(data[:1])
            data = data[1:]
            if not data or client.closed:
                return b""
            state = client.upstream_state
        if self.tls is not None:
            try:
                data, reply = self.tls.receive(data)
            except ssl.SSLError as e:
                client.apply(session.refuse("08006", f"ringfence: TLS to the server failed: "
                                            f"{e.reason or e}", f"upstream TLS error: {e}"))
                return b""
            if reply and self.transport is not None:
                self.transport.write(reply)
            if state == "handshaking" and self.tls.established:
                client.upstream_state = "tls"
                session.context.setdefault("tls", {})["upstream"] = self.tls.summary()
                client.upstream_tls_ready()
        return data

    def _negotiated(self, answer: bytes) -> None:
        """The server's one-byte answer to the agent's SSLRequest."""
        client = self.client
        assert client.session is not None
        if answer == pg.SSL_ACCEPTED:
            self.tls = TlsChannel(client.proxy.upstream_tls_context(client.service), server_side=False)
            client.upstream_state = "handshaking"
            if self.transport is not None:
                self.transport.write(self.tls.start())
            return
        if answer == pg.SSL_REFUSED and client.service.tls.upstream != "require":
            client.upstream_state = "plain"
            client.upstream_tls_ready()
            return
        client.apply(client.session.refuse(
            "08006", "ringfence: the server does not accept TLS, which [protect.tls] upstream "
            "= \"require\" demands", "upstream refused TLS"))

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        client = self.client
        if client.session is not None and not client.session.ended:
            reason = "server closed" if exc is None else f"server connection error: {exc}"
            client.apply(client.session.connection_lost(reason, "success" if exc is None else "failure"))
        client._close_all()

    def pause_writing(self) -> None:
        self.client.upstream_write_paused = True
        if self.client.transport:
            self.client.transport.pause_reading()

    def resume_writing(self) -> None:
        self.client.upstream_write_paused = False
        if self.client.transport and not self.client.closed and self.client._deferred is None:
            self.client.transport.resume_reading()
