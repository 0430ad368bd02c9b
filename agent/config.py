"""Agent configuration: TOML file, validated into frozen dataclasses.

The default file is ``packaging/ringfence.toml``, installed as
``/etc/ringfence/ringfence.toml``; ``--config PATH`` or ``RINGFENCE_CONFIG``
choose another. Every key is documented in the default file. Unknown keys
and bad values are rejected with a message that names the key.
"""

from __future__ import annotations

import ipaddress
import os
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

DEFAULT_CONFIG_PATH = Path("/etc/ringfence/ringfence.toml")
CONFIG_ENV = "RINGFENCE_CONFIG"

SUPPORTED_PROTOCOLS = ("postgres",)
DEFAULT_PORTS = {"postgres": 5432}

T = TypeVar("T")


class ConfigError(Exception):
    """The configuration file is missing, unreadable or invalid."""


@dataclass(frozen=True, slots=True)
class AgentSettings:
    state_dir: Path = Path("/var/lib/ringfence")
    run_dir: Path = Path("/run/ringfence")
    log_level: str = "info"
    log_format: str = "json"
    # SO_MARK carried by the agent's own upstream sockets; the redirect rules
    # return early for packets whose mark matches under mark_mask.
    upstream_mark: int = 0x52460000
    mark_mask: int = 0xFFFF0000
    listen_addresses: tuple[str, ...] = ("0.0.0.0", "::")
    # Largest single protocol message the agent reads whole (statements, server
    # replies it decodes) before the session is ended; rows, COPY data, larger
    # Binds and function calls pass in pieces whatever their size (a Bind's
    # values kept to max_statement_bytes each for the record).
    max_message_bytes: int = 64 * 1024 * 1024
    # How much of a statement's text is kept in its audit record.
    max_statement_bytes: int = 64 * 1024
    # The texts of the named statements one session has prepared and not closed, which
    # the agent keeps to record and judge their executions, at most (in characters); a
    # session preparing more is ended.
    max_prepared_bytes: int = 256 * 1024 * 1024
    # After a crash or kill, `ringfence cleanup` (the service's ExecStopPost)
    # keeps the redirect rules: protected ports refuse connections until the
    # agent is back, instead of being reachable without an audit trail.
    fail_closed: bool = False
    # Event loops carrying sessions, each in a process of its own (agent.workers): the
    # agent's and workers - 1 session workers. 0 ("auto"): one per CPU, at most 4.
    workers: int = 0
    # How new connections are spread over those event loops: "least-sessions" (to the
    # loop carrying the fewest, by a BPF program on the listeners; see agent.balance)
    # or "hash" (the kernel's hash of the connection's addresses).
    balance: str = "least-sessions"


@dataclass(frozen=True, slots=True)
class BpfSettings:
    # "auto": use BPF when it loads, else fall back to procfs and say so;
    # "required": refuse to start without BPF; "off": procfs only.
    mode: str = "auto"
    # "auto": the running kernel's headers under /lib/modules/$(uname -r),
    # else the newest installed headers set (ringfence's BPF programs read only
    # UAPI contexts, so headers of another release are safe); or a path to a
    # /lib/modules/<release> directory or a kernel build tree.
    kernel_headers: str = "auto"
    # "auto": the cgroup v2 mount found in /proc/mounts.
    cgroup_root: str = "auto"
    map_entries: int = 65536


@dataclass(frozen=True, slots=True)
class RedirectSettings:
    # How connections to protected ports reach the agent: "nat" (iptables REDIRECT,
    # agent.redirect) or "sk_lookup" (a BPF program choosing the agent's listener at the
    # kernel's socket lookup, agent.sklookup: no address translation, no connection
    # tracking; the program goes with the agent, so not with agent.fail_closed). "auto":
    # sk_lookup, unless agent.fail_closed, bpf.mode = "off" or the kernel refuses the
    # program (then nat).
    method: str = "auto"
    ipv6: bool = True
    # Intercept clients on this host (nat OUTPUT) and from other hosts
    # (nat PREROUTING).
    local: bool = True
    remote: bool = True


@dataclass(frozen=True, slots=True)
class AuditSettings:
    path: Path = Path("/var/lib/ringfence/audit")
    # Ed25519 checkpoint signing key; None: <agent.state_dir>/audit.key.
    key_path: Path | None = None
    # Checkpoint origin line; "" derives "<host>/ringfence/audit".
    origin: str = ""
    checkpoint_every_records: int = 10_000
    checkpoint_every_seconds: float = 60.0
    # Where checkpoints also go: "" (nowhere), "stdout", or a file path.
    checkpoint_export: str = ""
    segment_max_bytes: int = 1 << 30
    # 0: segments are rotated by size only.
    segment_max_age_seconds: float = 0.0
    queue_size: int = 65_536
    batch_max_records: int = 4096
    batch_max_delay_ms: float = 20.0
    # While the store fails, how often the writer tries to write again.
    retry_interval_ms: float = 500.0


@dataclass(frozen=True, slots=True)
class ServiceCredentials:
    """What the agent uses upstream for a protected service; never shown to clients."""

    user: str
    password_file: Path | None = None
    password_env: str | None = None
    # auto: SCRAM-SHA-256, md5 or trust, whichever the server asks for (never
    # cleartext); or exactly one of CREDENTIAL_METHODS.
    method: str = "auto"


CREDENTIAL_METHODS = ("auto", "scram-sha-256", "md5", "password", "trust")


@dataclass(frozen=True, slots=True)
class ServiceTls:
    """TLS between clients and the agent, and between the agent and the server."""

    # Certificate and key the agent presents to clients. "auto": the
    # PostgreSQL server's own ssl_cert_file/ssl_key_file (from the
    # postgresql.conf of the local cluster on this port), so clients that
    # verify the server's certificate keep working; "" turns TLS off
    # (SSLRequest answered 'N').
    cert_file: str = "auto"
    key_file: str = "auto"
    # "mirror": TLS to the server when the client used TLS; "require":
    # always (the connection fails if the server refuses); "off": never.
    upstream: str = "mirror"
    # CA bundle to verify the server's certificate with; "" skips verification
    # (the usual case for a server on this host).
    upstream_ca_file: str = ""


TLS_UPSTREAM_MODES = ("mirror", "require", "off")


@dataclass(frozen=True, slots=True)
class ServiceKeepalive:
    """TCP keepalive timing on clients' connections to the agent (the agent probes them in
    the server's place). Each value is whole seconds (count: probes), 0 for the host's
    net.ipv4.tcp_keepalive_* setting, or "auto": the local cluster's tcp_keepalives_idle,
    _interval and _count (postgresql.conf of the cluster on this port), so a server tuned
    to notice vanished clients early still does through the agent."""

    idle: int | str = "auto"
    interval: int | str = "auto"
    count: int | str = "auto"


# Public-key JWS algorithms an issuer may be allowed; "none" and HMAC never are.
TOKEN_ALGORITHMS = (
    "RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA",
)


@dataclass(frozen=True, slots=True)
class IssuerConfig:
    """One trusted OIDC issuer: where its keys come from and how its tokens read."""

    issuer: str
    audience: str
    jwks_file: Path | None = None
    discovery: bool = False
    jwks_uri: str | None = None
    subject_claim: str = "sub"
    groups_claim: str | None = None
    algorithms: tuple[str, ...] = ("RS256", "ES256", "EdDSA")
    required_claims: tuple[str, ...] = ("exp",)
    # "human": its subjects are people (a finding when automation uses them);
    # "automation": workload identities (CI, services).
    subject_kind: str = "human"
    ca_file: Path | None = None


@dataclass(frozen=True, slots=True)
class ServiceAccountConfig:
    """Automation without a token, recognised by where its process runs."""

    name: str
    unit: str | None = None
    cgroup: str | None = None
    exe: str | None = None
    uid: int | None = None
    subject: str = ""
    groups: tuple[str, ...] = ()
    # Token subjects that belong to this account: such a token used from a
    # process that does not match the account is an impersonation finding.
    token_subjects: tuple[str, ...] = ()

    @property
    def identity_subject(self) -> str:
        return self.subject or f"service:{self.name}"


@dataclass(frozen=True, slots=True)
class IdentitySettings:
    issuers: tuple[IssuerConfig, ...] = ()
    env_var: str = "RINGFENCE_TOKEN"
    on_finding: str = "refuse"
    leeway_seconds: int = 30
    jwks_cache_seconds: int = 3600
    jwks_min_refresh_seconds: int = 30
    service_accounts: tuple[ServiceAccountConfig, ...] = ()
    # (token subject, local user name): the person's account on this host.
    subject_users: tuple[tuple[str, str], ...] = ()
    # Glob patterns of token subjects that are automation, not people.
    automation_subjects: tuple[str, ...] = ()
    # Refuse connections for which no identity is found.
    required: bool = False

    def local_user_for(self, subject: str) -> str | None:
        for mapped_subject, user in self.subject_users:
            if mapped_subject == subject:
                return user
        return None


@dataclass(frozen=True, slots=True)
class ProtectedService:
    name: str
    port: int
    protocol: str
    listen_port: int
    credentials: ServiceCredentials | None = None
    tls: ServiceTls = field(default_factory=ServiceTls)
    keepalive: ServiceKeepalive = field(default_factory=ServiceKeepalive)


@dataclass(frozen=True, slots=True)
class PolicySettings:
    # The policy file (policy/README.md); reloaded on SIGHUP and when it changes.
    path: Path = Path("/etc/ringfence/policy.toml")
    # How often the file's inode, size and mtime are checked; 0 turns the
    # periodic check off (SIGHUP still reloads).
    reload_interval_seconds: float = 2.0


@dataclass(frozen=True, slots=True)
class Config:
    agent: AgentSettings = field(default_factory=AgentSettings)
    bpf: BpfSettings = field(default_factory=BpfSettings)
    redirect: RedirectSettings = field(default_factory=RedirectSettings)
    audit: AuditSettings = field(default_factory=AuditSettings)
    identity: IdentitySettings = field(default_factory=IdentitySettings)
    policy: PolicySettings = field(default_factory=PolicySettings)
    protect: tuple[ProtectedService, ...] = ()
    source: Path | None = None

    def redirect_method(self) -> str:
        """The redirect ``[redirect] method`` asks for, given the rest of the config: "nat",
        "sk_lookup", or "auto" (sk_lookup if the kernel takes the program, else nat).
        "auto" is "nat" with ``agent.fail_closed`` (only iptables rules outlive the agent)
        or with BPF turned off."""
        method = self.redirect.method
        if method == "auto" and (self.agent.fail_closed or self.bpf.mode == "off"):
            return "nat"
        return method

    def service_by_listen_port(self, port: int) -> ProtectedService | None:
        for service in self.protect:
            if service.listen_port == port:
                return service
        return None


class _Table:
    """A TOML table being read: typed access by key, unknown keys reported."""

    def __init__(self, where: str, data: Mapping[str, Any]) -> None:
        self.where = where
        self.data = data
        self.used: set[str] = set()

    def key(self, name: str) -> str:
        return f"{self.where}.{name}" if self.where else name

    def get(self, name: str, kind: type[T], default: T) -> T:
        self.used.add(name)
        if name not in self.data:
            return default
        value = self.data[name]
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise ConfigError(
                f"{self.key(name)}: expected {kind.__name__}, got {type(value).__name__}"
            )
        return value

    def require(self, name: str, kind: type[T]) -> T:
        if name not in self.data:
            raise ConfigError(f"{self.key(name)}: required key is missing")
        return self.get(name, kind, kind())

    def choice(self, name: str, allowed: tuple[str, ...], default: str) -> str:
        value = self.get(name, str, default)
        if value not in allowed:
            raise ConfigError(f"{self.key(name)}: must be one of {', '.join(allowed)}, got {value!r}")
        return value

    def port(self, name: str, default: int | None = None) -> int:
        value = self.require(name, int) if default is None else self.get(name, int, default)
        if not 1 <= value <= 65535:
            raise ConfigError(f"{self.key(name)}: {value} is not a TCP port (1-65535)")
        return value

    def path(self, name: str, default: Path) -> Path:
        value = self.get(name, str, str(default))
        if not value:
            raise ConfigError(f"{self.key(name)}: must not be empty")
        return Path(value)

    def table(self, name: str) -> _Table:
        self.used.add(name)
        value = self.data.get(name, {})
        if not isinstance(value, dict):
            raise ConfigError(f"{self.key(name)}: expected a table")
        return _Table(self.key(name), value)

    def finish(self) -> None:
        unknown = sorted(set(self.data) - self.used)
        if unknown:
            raise ConfigError(f"{self.key(unknown[0])}: unknown key")


def _agent(t: _Table) -> AgentSettings:
    d = AgentSettings()
    addresses = t.get("listen_addresses", list, list(d.listen_addresses))
    for i, address in enumerate(addresses):
        try:
            ipaddress.ip_address(address)
        except (TypeError, ValueError):
            raise ConfigError(
                f"{t.key('listen_addresses')}[{i}]: not an IP address: {address!r}"
            ) from None
    mark = t.get("upstream_mark", int, d.upstream_mark)
    mask = t.get("mark_mask", int, d.mark_mask)
    if not 0 < mark < 2**32 or not 0 < mask < 2**32 or mark & ~mask:
        raise ConfigError(
            f"{t.key('upstream_mark')}: must be a non-zero 32-bit value inside mark_mask"
        )
    max_message = t.get("max_message_bytes", int, d.max_message_bytes)
    if not 1024 <= max_message <= 2**30:
        raise ConfigError(f"{t.key('max_message_bytes')}: must be between 1024 and 2^30")
    max_statement = t.get("max_statement_bytes", int, d.max_statement_bytes)
    if max_statement < 64:
        raise ConfigError(f"{t.key('max_statement_bytes')}: must be at least 64")
    max_prepared = t.get("max_prepared_bytes", int, d.max_prepared_bytes)
    if max_prepared < 1024:
        raise ConfigError(f"{t.key('max_prepared_bytes')}: must be at least 1024")
    raw_workers: object = t.get("workers", object, "auto")
    if raw_workers == "auto":
        workers = d.workers
    elif isinstance(raw_workers, int) and not isinstance(raw_workers, bool) and 1 <= raw_workers <= 64:
        workers = raw_workers
    else:
        raise ConfigError(f"{t.key('workers')}: must be \"auto\" or a number from 1 to 64, "
                          f"got {raw_workers!r}")
    settings = AgentSettings(
        workers=workers,
        balance=t.choice("balance", ("least-sessions", "hash"), d.balance),
        state_dir=t.path("state_dir", d.state_dir),
        run_dir=t.path("run_dir", d.run_dir),
        log_level=t.choice("log_level", ("debug", "info", "warning", "error"), d.log_level),
        log_format=t.choice("log_format", ("json", "text"), d.log_format),
        upstream_mark=mark,
        mark_mask=mask,
        listen_addresses=tuple(addresses),
        max_message_bytes=max_message,
        max_statement_bytes=max_statement,
        max_prepared_bytes=max_prepared,
        fail_closed=t.get("fail_closed", bool, d.fail_closed),
    )
    t.finish()
    return settings


def _bpf(t: _Table) -> BpfSettings:
    d = BpfSettings()
    entries = t.get("map_entries", int, d.map_entries)
    if not 1024 <= entries <= 1 << 22:
        raise ConfigError(f"{t.key('map_entries')}: must be between 1024 and 4194304")
    settings = BpfSettings(
        mode=t.choice("mode", ("auto", "required", "off"), d.mode),
        kernel_headers=t.get("kernel_headers", str, d.kernel_headers) or "auto",
        cgroup_root=t.get("cgroup_root", str, d.cgroup_root) or "auto",
        map_entries=entries,
    )
    t.finish()
    return settings


def _redirect(t: _Table) -> RedirectSettings:
    d = RedirectSettings()
    settings = RedirectSettings(
        method=t.choice("method", ("auto", "nat", "sk_lookup"), d.method),
        ipv6=t.get("ipv6", bool, d.ipv6),
        local=t.get("local", bool, d.local),
        remote=t.get("remote", bool, d.remote),
    )
    t.finish()
    return settings


def _audit(t: _Table) -> AuditSettings:
    d = AuditSettings()

    def bounded(name: str, kind: type[T], default: T, low: float, high: float) -> T:
        value = t.get(name, kind, default)
        if not low <= value <= high:  # type: ignore[operator]
            raise ConfigError(f"{t.key(name)}: must be between {low:g} and {high:g}")
        return value

    key_path = t.get("key_path", str, "")
    origin = t.get("origin", str, d.origin)
    if origin and (any(c.isspace() for c in origin) or "+" in origin):
        raise ConfigError(f"{t.key('origin')}: must not contain spaces or '+'")
    export = t.get("checkpoint_export", str, d.checkpoint_export)
    if export not in ("", "stdout") and not Path(export).is_absolute():
        raise ConfigError(
            f"{t.key('checkpoint_export')}: must be \"\", \"stdout\" or an absolute path"
        )
    queue_size = bounded("queue_size", int, d.queue_size, 16, 1 << 24)
    settings = AuditSettings(
        path=t.path("path", d.path),
        key_path=Path(key_path) if key_path else None,
        origin=origin,
        checkpoint_every_records=bounded(
            "checkpoint_every_records", int, d.checkpoint_every_records, 1, 1 << 32
        ),
        checkpoint_every_seconds=bounded(
            "checkpoint_every_seconds", float, d.checkpoint_every_seconds, 0.01, 86400 * 7
        ),
        checkpoint_export=export,
        segment_max_bytes=bounded("segment_max_bytes", int, d.segment_max_bytes, 1 << 20, 1 << 40),
        segment_max_age_seconds=bounded(
            "segment_max_age_seconds", float, d.segment_max_age_seconds, 0, 86400 * 366
        ),
        queue_size=queue_size,
        batch_max_records=bounded("batch_max_records", int, d.batch_max_records, 1, queue_size),
        batch_max_delay_ms=bounded("batch_max_delay_ms", float, d.batch_max_delay_ms, 0, 1000),
        retry_interval_ms=bounded("retry_interval_ms", float, d.retry_interval_ms, 1, 60_000),
    )
    t.finish()
    return settings


def _loopback_or_https(url: str) -> bool:
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    if parts.scheme == "https" and parts.hostname:
        return True
    return parts.scheme == "http" and parts.hostname in ("127.0.0.1", "::1", "localhost")


def _str_list(t: _Table, name: str, default: tuple[str, ...]) -> tuple[str, ...]:
    values = t.get(name, list, list(default))
    for i, value in enumerate(values):
        if not isinstance(value, str) or not value:
            raise ConfigError(f"{t.key(name)}[{i}]: expected a non-empty string")
    return tuple(values)


def _issuer(t: _Table) -> IssuerConfig:
    d = IssuerConfig("", "")
    issuer = t.require("issuer", str)
    if not _loopback_or_https(issuer):
        raise ConfigError(
            f"{t.key('issuer')}: must be an https:// URL (http:// only on loopback)"
        )
    audience = t.require("audience", str)
    if not audience:
        raise ConfigError(f"{t.key('audience')}: must not be empty")
    jwks_file = t.get("jwks_file", str, "")
    discovery = t.get("discovery", bool, False)
    jwks_uri = t.get("jwks_uri", str, "")
    if sum((bool(jwks_file), discovery, bool(jwks_uri))) != 1:
        raise ConfigError(
            f"{t.key('jwks_file')}: set exactly one of jwks_file, discovery, jwks_uri"
        )
    if jwks_uri and not _loopback_or_https(jwks_uri):
        raise ConfigError(
            f"{t.key('jwks_uri')}: must be an https:// URL (http:// only on loopback)"
        )
    algorithms = _str_list(t, "algorithms", d.algorithms)
    for alg in algorithms:
        if alg not in TOKEN_ALGORITHMS:
            raise ConfigError(
                f"{t.key('algorithms')}: {alg!r} is not allowed "
                f"(public-key algorithms only: {', '.join(TOKEN_ALGORITHMS)})"
            )
    if not algorithms:
        raise ConfigError(f"{t.key('algorithms')}: must not be empty")
    ca_file = t.get("ca_file", str, "")
    settings = IssuerConfig(
        issuer=issuer,
        audience=audience,
        jwks_file=Path(jwks_file) if jwks_file else None,
        discovery=discovery,
        jwks_uri=jwks_uri or None,
        subject_claim=t.get("subject_claim", str, d.subject_claim) or d.subject_claim,
        groups_claim=t.get("groups_claim", str, "") or None,
        algorithms=algorithms,
        required_claims=_str_list(t, "required_claims", d.required_claims),
        subject_kind=t.choice("subject_kind", ("human", "automation"), d.subject_kind),
        ca_file=Path(ca_file) if ca_file else None,
    )
    t.finish()
    return settings


def _service_account(t: _Table) -> ServiceAccountConfig:
    name = t.require("name", str)
    if not name:
        raise ConfigError(f"{t.key('name')}: must not be empty")
    uid = t.get("uid", int, -1)
    account = ServiceAccountConfig(
        name=name,
        unit=t.get("unit", str, "") or None,
        cgroup=t.get("cgroup", str, "") or None,
        exe=t.get("exe", str, "") or None,
        uid=uid if uid >= 0 else None,
        subject=t.get("subject", str, ""),
        groups=_str_list(t, "groups", ()),
        token_subjects=_str_list(t, "token_subjects", ()),
    )
    if all(x is None for x in (account.unit, account.cgroup, account.exe, account.uid)):
        raise ConfigError(f"{t.where}: declare at least one of unit, cgroup, exe, uid")
    t.finish()
    return account


def _tables(t: _Table, name: str) -> list[_Table]:
    items = t.get(name, list, [])
    tables = []
    for i, item in enumerate(items):
        if not isinstance(item, dict):
            raise ConfigError(f"{t.key(name)}[{i}]: expected a table")
        tables.append(_Table(f"{t.key(name)}[{i}]", item))
    return tables


def _identity(t: _Table) -> IdentitySettings:
    d = IdentitySettings()
    issuers = tuple(_issuer(x) for x in _tables(t, "issuers"))
    seen = [i.issuer for i in issuers]
    for i, issuer in enumerate(seen):
        if issuer in seen[:i]:
            raise ConfigError(f"identity.issuers[{i}].issuer: {issuer} is listed twice")
    env_var = t.get("env_var", str, d.env_var)
    if "=" in env_var or "\0" in env_var:
        raise ConfigError(f"{t.key('env_var')}: not an environment variable name")
    leeway = t.get("leeway_seconds", int, d.leeway_seconds)
    if not 0 <= leeway <= 600:
        raise ConfigError(f"{t.key('leeway_seconds')}: must be between 0 and 600")
    cache = t.get("jwks_cache_seconds", int, d.jwks_cache_seconds)
    min_refresh = t.get("jwks_min_refresh_seconds", int, d.jwks_min_refresh_seconds)
    if cache < 60 or not 1 <= min_refresh <= cache:
        raise ConfigError(
            f"{t.key('jwks_cache_seconds')}: must be at least 60, "
            "and jwks_min_refresh_seconds between 1 and jwks_cache_seconds"
        )
    users = t.table("subject_users")
    for subject, user in users.data.items():
        users.used.add(subject)
        if not isinstance(user, str) or not user:
            raise ConfigError(f"{users.key(subject)}: expected a local user name")
    settings = IdentitySettings(
        issuers=issuers,
        env_var=env_var,
        on_finding=t.choice("on_finding", ("refuse", "flag"), d.on_finding),
        leeway_seconds=leeway,
        jwks_cache_seconds=cache,
        jwks_min_refresh_seconds=min_refresh,
        service_accounts=tuple(_service_account(x) for x in _tables(t, "service_accounts")),
        subject_users=tuple((str(k), str(v)) for k, v in users.data.items()),
        automation_subjects=_str_list(t, "automation_subjects", ()),
        required=t.get("required", bool, d.required),
    )
    t.finish()
    return settings


def _credentials(t: _Table) -> ServiceCredentials:
    user = t.require("user", str)
    if not user:
        raise ConfigError(f"{t.key('user')}: must not be empty")
    password_file = t.get("password_file", str, "")
    password_env = t.get("password_env", str, "")
    method = t.choice("method", CREDENTIAL_METHODS, "auto")
    if password_file and password_env:
        raise ConfigError(
            f"{t.key('password_file')}: set password_file or password_env, not both"
        )
    if not password_file and not password_env and method != "trust":
        raise ConfigError(f"{t.key('password_file')}: set password_file or password_env")
    t.finish()
    return ServiceCredentials(
        user=user,
        password_file=Path(password_file) if password_file else None,
        password_env=password_env or None,
        method=method,
    )


def _protect(items: Any) -> tuple[ProtectedService, ...]:
    if not isinstance(items, list):
        raise ConfigError("protect: expected an array of tables ([[protect]])")
    services: list[ProtectedService] = []
    for i, item in enumerate(items):
        if not isinstance(item, dict):
            raise ConfigError(f"protect[{i}]: expected a table")
        t = _Table(f"protect[{i}]", item)
        name = t.require("name", str)
        if not name or not name.replace("-", "").replace("_", "").isalnum():
            raise ConfigError(f"{t.key('name')}: use letters, digits, '-' and '_' only")
        protocol = t.choice("protocol", SUPPORTED_PROTOCOLS, "postgres")
        port = t.port("port", DEFAULT_PORTS[protocol])
        default_listen = port + 10000 if port + 10000 <= 65535 else None
        if default_listen is None and "listen_port" not in item:
            raise ConfigError(f"{t.key('listen_port')}: required when port + 10000 exceeds 65535")
        listen_port = t.port("listen_port", default_listen)
        if listen_port == port:
            raise ConfigError(f"{t.key('listen_port')}: must differ from port {port}")
        credentials = _credentials(t.table("credentials")) if "credentials" in item else None
        tls = _tls(t.table("tls"))
        keepalive = _keepalive(t.table("keepalive"))
        t.finish()
        services.append(
            ProtectedService(name, port, protocol, listen_port, credentials, tls, keepalive))
    _check_unique(services)
    return tuple(services)


def _keepalive(t: _Table) -> ServiceKeepalive:
    values: dict[str, int | str] = {}
    for name in ("idle", "interval", "count"):
        t.used.add(name)
        value = t.data.get(name, "auto")
        if value != "auto" and (isinstance(value, bool) or not isinstance(value, int)
                                or not 0 <= value <= 32767):
            raise ConfigError(f"{t.key(name)}: expected \"auto\" or whole seconds from 0 "
                              f"(the host's setting) to 32767, got {value!r}")
        values[name] = value
    t.finish()
    return ServiceKeepalive(**values)


def _tls(t: _Table) -> ServiceTls:
    d = ServiceTls()
    settings = ServiceTls(
        cert_file=t.get("cert_file", str, d.cert_file),
        key_file=t.get("key_file", str, d.key_file),
        upstream=t.choice("upstream", TLS_UPSTREAM_MODES, d.upstream),
        upstream_ca_file=t.get("upstream_ca_file", str, d.upstream_ca_file),
    )
    if (settings.cert_file == "auto") != (settings.key_file == "auto") or (
        bool(settings.cert_file) != bool(settings.key_file)
    ):
        raise ConfigError(f"{t.key('key_file')}: set cert_file and key_file together")
    t.finish()
    return settings


def _check_unique(services: list[ProtectedService]) -> None:
    seen: dict[str, str] = {}
    for i, s in enumerate(services):
        for what, value in (("name", s.name), ("port", str(s.port)), ("listen_port", str(s.listen_port))):
            tag = f"{what}={value}"
            if tag in seen:
                raise ConfigError(f"protect[{i}].{what}: {value} is already used by {seen[tag]}")
            seen[tag] = f"protect[{i}]"
        ports = {x.port for x in services}
        if s.listen_port in ports:
            raise ConfigError(f"protect[{i}].listen_port: {s.listen_port} is a protected port")


def _policy(t: _Table) -> PolicySettings:
    d = PolicySettings()
    interval = t.get("reload_interval_seconds", float, d.reload_interval_seconds)
    if not 0 <= interval <= 3600:
        raise ConfigError(f"{t.key('reload_interval_seconds')}: must be between 0 and 3600")
    settings = PolicySettings(path=t.path("path", d.path), reload_interval_seconds=interval)
    t.finish()
    return settings


_SECTIONS: dict[str, Callable[[_Table], Any]] = {
    "agent": _agent,
    "bpf": _bpf,
    "redirect": _redirect,
    "audit": _audit,
    "identity": _identity,
    "policy": _policy,
}


def parse_config(data: Mapping[str, Any], source: Path | None = None) -> Config:
    """Validate a decoded TOML document into a :class:`Config`."""
    root = _Table("", data)
    sections = {name: reader(root.table(name)) for name, reader in _SECTIONS.items()}
    root.used.add("protect")
    services = _protect(data.get("protect", []))
    root.finish()
    if sections["redirect"].method == "sk_lookup" and sections["agent"].fail_closed:
        raise ConfigError(
            'agent.fail_closed = true needs redirect.method = "nat": the sk_lookup program '
            "goes with the agent's process, so it cannot keep protected ports closed while "
            "the agent is down")
    return Config(protect=services, source=source, **sections)


def resolve_config_path(explicit: str | os.PathLike[str] | None) -> Path:
    """The file to read: ``--config``, then ``$RINGFENCE_CONFIG``, then the default."""
    if explicit:
        return Path(explicit)
    env = os.environ.get(CONFIG_ENV)
    if env:
        return Path(env)
    return DEFAULT_CONFIG_PATH


def load_config(path: str | os.PathLike[str] | None = None) -> Config:
    """Read and validate the configuration file."""
    resolved = resolve_config_path(path)
    try:
        raw = resolved.read_bytes()
    except OSError as e:
        raise ConfigError(f"{resolved}: cannot read config: {e.strerror or e}") from None
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        raise ConfigError(f"{resolved}: {e}") from None
    try:
        return parse_config(data, source=resolved)
    except ConfigError as e:
        raise ConfigError(f"{resolved}: {e}") from None
