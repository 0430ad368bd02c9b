"""The local PostgreSQL cluster's own settings (postgresql.conf), which the agent follows
where the server's behaviour should carry through it: TLS files, Unix sockets, keepalive."""

from __future__ import annotations

import glob
import re
from pathlib import Path

from agent.config import ServiceKeepalive

# Where distributions keep PostgreSQL's configuration: Debian's clusters and
# the data directories of RPM packages.
POSTGRESQL_CONF_GLOBS = (
    "/etc/postgresql/*/*/postgresql.conf",
    "/var/lib/pgsql/data/postgresql.conf",
    "/var/lib/pgsql/*/data/postgresql.conf",
)

_SETTING = re.compile(r"^\s*([a-z_]+)\s*=?\s*(?:'((?:[^']|'')*)'|([^\s#]+))")


def _settings(conf: Path) -> dict[str, str]:
    out: dict[str, str] = {}
    for line in conf.read_text(errors="replace").splitlines():
        m = _SETTING.match(line)
        if m:
            value = m.group(2).replace("''", "'") if m.group(2) is not None else m.group(3)
            out[m.group(1)] = value
    return out


def parse_bool(value: str) -> bool | None:
    """A boolean as PostgreSQL reads one (its ``parse_bool``), in a setting or a startup
    parameter: true, yes, on or 1, false, no, off or 0, in any case, or an unambiguous
    prefix of one of the words ("t", "ye", "of"; "o" alone is neither); None otherwise."""
    word = value.lower()
    if not word:
        return None
    if word == "1" or "true".startswith(word) or "yes".startswith(word):
        return True
    if word == "0" or "false".startswith(word) or "no".startswith(word):
        return False
    if len(word) >= 2:
        if word == "on":
            return True
        if "off".startswith(word):
            return False
    return None


def local_cluster(port: int, globs: tuple[str, ...] = POSTGRESQL_CONF_GLOBS,
                  ) -> tuple[Path, dict[str, str]] | None:
    """The postgresql.conf of the local PostgreSQL cluster on ``port``, and its settings."""
    for pattern in globs:
        for name in sorted(glob.glob(pattern)):
            conf = Path(name)
            try:
                settings = _settings(conf)
            except OSError:
                continue
            try:
                if int(settings.get("port", "5432")) == port:
                    return conf, settings
            except ValueError:
                continue
    return None


def unix_socket_directories(port: int, globs: tuple[str, ...] = POSTGRESQL_CONF_GLOBS,
                            ) -> tuple[str, list[str]] | None:
    """Where the local cluster on ``port`` also listens on Unix sockets: (its postgresql.conf,
    the directories); None when no cluster on this port is found. Connections there never
    pass the agent. (Without the setting, Debian's and RPM builds use /var/run/postgresql and
    /tmp: an unset value counts as the build's default, which is never empty.)"""
    cluster = local_cluster(port, globs)
    if cluster is None:
        return None
    conf, settings = cluster
    value = settings.get("unix_socket_directories")
    if value is None:
        return str(conf), ["(the build's default)"]
    return str(conf), [d.strip() for d in value.split(",") if d.strip()]


_DURATION = re.compile(r"^\s*(\d+)\s*(ms|s|min|h|d)?\s*$")
_UNIT_SECONDS = {None: 1.0, "ms": 0.001, "s": 1.0, "min": 60.0, "h": 3600.0, "d": 86400.0}


def _seconds(value: str | None) -> int:
    """A PostgreSQL duration setting in seconds ('60', '60s', '1min'); 0 if unset or unreadable."""
    match = _DURATION.match(value or "")
    if match is None:
        return 0
    return round(int(match.group(1)) * _UNIT_SECONDS[match.group(2)])


def keepalive_timing(settings: ServiceKeepalive, port: int,
                     globs: tuple[str, ...] = POSTGRESQL_CONF_GLOBS) -> tuple[int, int, int]:
    """(idle, interval, count) for clients' connections; 0 leaves the host's setting. "auto"
    takes the local cluster's tcp_keepalives_* (0 there too when unset or absent)."""
    cluster: dict[str, str] | None = None
    timing = []
    for name in ("idle", "interval", "count"):
        value = getattr(settings, name)
        if value == "auto":
            if cluster is None:
                found = local_cluster(port, globs)
                cluster = found[1] if found else {}
            raw = cluster.get(f"tcp_keepalives_{name}") or ""
            value = _seconds(raw) if name != "count" else int(raw) if raw.isdigit() else 0
        timing.append(int(value))
    return timing[0], timing[1], timing[2]
