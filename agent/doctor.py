"""``ringfence doctor``: can this host run the agent, and if not, how to fix it.

One line per check: ``OK``, ``WARN`` (the agent runs, degraded) or ``FAIL``
(the agent cannot run), with the fix under it. The exit code is non-zero when
any check fails.
"""

from __future__ import annotations

import os
import platform
import shutil
import socket
import stat
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path

import click

from agent.attribution import Check, doctor_checks
from agent.config import Config, ConfigError, load_config, resolve_config_path
from agent.redirect import IPV4, IPV6, Family, RedirectError, _restore, family_available


def _config_check(path: str | None) -> tuple[Check, Config | None]:
    resolved = resolve_config_path(path)
    try:
        config = load_config(path)
    except ConfigError as e:
        return Check("config", False, str(e), f"fix {resolved} (see packaging/ringfence.toml)"), None
    return Check("config", True, f"{resolved} is valid"), config


def _root_check() -> Check:
    if os.geteuid() == 0:
        return Check("privileges", True, "running as root")
    return Check("privileges", False, f"running as uid {os.geteuid()}", "run the agent as root")


def _kernel_check() -> Check:
    release = platform.release()
    try:
        major, minor = (int(x) for x in release.split(".")[:2])
    except ValueError:
        return Check("kernel", True, f"Linux {release} (version not parsed)")
    if (major, minor) < (5, 15):
        return Check("kernel", False, f"Linux {release}",
                     "ringfence needs Linux 5.15 or newer (netns cookies in sock_ops)")
    return Check("kernel", True, f"Linux {release}")


def _iptables_backend() -> Check:
    if shutil.which("iptables") is None:
        return Check("iptables", False, "iptables not found", "apt-get install iptables")
    done = subprocess.run(["iptables", "--version"], capture_output=True, text=True, check=False)
    version = done.stdout.strip()
    backend = "nf_tables" if "nf_tables" in version else "legacy" if "legacy" in version else "?"
    return Check("iptables", True, f"{version} (backend {backend})")


def _redirect_check(family: Family, port: int) -> Check:
    """Add and remove a real REDIRECT rule in a scratch chain of the nat table."""
    name = f"{family.name} nat REDIRECT"
    if not family_available(family):
        fix = "apt-get install iptables; modprobe ip6table_nat" if family is IPV6 else (
            "apt-get install iptables; modprobe iptable_nat")
        return Check(name, False, f"cannot read the nat table with {family.save}", fix)
    chain = "RINGFENCE_DOCTOR"
    try:
        _restore(family, [f":{chain} - [0:0]",
                          f"-A {chain} -p tcp --dport 9 -j REDIRECT --to-ports {port}"])
        _restore(family, [f":{chain} - [0:0]", f"-X {chain}"])
    except RedirectError as e:
        return Check(name, False, str(e), "enable netfilter NAT (nf_nat, xt_REDIRECT) in the kernel")
    return Check(name, True, "REDIRECT rule added and removed in a scratch chain")


def _sk_lookup_check(config: Config) -> Check:
    """The sk_lookup program loads and attaches (``[redirect] method = "sk_lookup"``). With
    no ports in its maps it leaves every connection to the kernel meanwhile."""
    from agent.sklookup import SkLookup, SkLookupError, kernel_needed

    name = "sk_lookup redirect"
    needed = kernel_needed(config.redirect.local, config.redirect.remote)
    try:
        steering = SkLookup(local=config.redirect.local, remote=config.redirect.remote)
        try:
            steering.attach()
        finally:
            steering.close()
    except SkLookupError as e:
        return Check(name, False, str(e), f"use Linux {needed} or later, or set "
                     '[redirect] method = "nat"')
    return Check(name, True, "program loaded and attached to this network namespace, then removed")


def _loose_mode(path: Path, allowed: int) -> list[str]:
    """What is wrong with ``path``'s owner and mode, for a root-only file or directory."""
    st = path.lstat()
    problems = []
    if st.st_uid != 0:
        problems.append(f"owned by uid {st.st_uid}")
    if stat.S_ISLNK(st.st_mode):
        problems.append("a symbolic link")
    elif st.st_mode & 0o777 & ~allowed:
        problems.append(f"mode {st.st_mode & 0o777:04o}")
    return problems


def _state_dir_check(config: Config) -> Check:
    """The state directory (audit trail, key, BPF attachment records): root's alone."""
    state = config.agent.state_dir
    if not state.exists():
        return Check("state directory", True, f"{state} does not exist yet; the agent creates it (mode 0700)")
    if not state.is_dir():
        return Check("state directory", False, f"{state} is not a directory",
                     f"move {state} away, or set [agent] state_dir")
    problems = _loose_mode(state, 0o700)
    if problems:
        return Check("state directory", False, f"{state}: {', '.join(problems)}",
                     f"chown root:root {state} && chmod 0700 {state}")
    return Check("state directory", True, f"{state} (root, 0700)")


def _audit_key_check(config: Config) -> Check:
    """The checkpoint signing key: whoever reads it can sign checkpoints."""
    key = config.audit.key_path or config.agent.state_dir / "audit.key"
    if not key.exists() and not key.is_symlink():
        return Check("audit key", True, f"{key} does not exist yet; the agent creates it (mode 0600)")
    if not key.is_file():
        return Check("audit key", False, f"{key} is not a regular file", f"move {key} away")
    problems = _loose_mode(key, 0o600)
    if problems:
        return Check("audit key", False, f"{key}: {', '.join(problems)}",
                     f"chown root:root {key} && chmod 0600 {key}; if others could read it, "
                     "treat it as leaked: archive the trail, move the key away and restart")
    return Check("audit key", True, f"{key} (root, 0600)")


def _ports_check(config: Config) -> Check:
    busy = []
    for service in config.protect:
        for address in config.agent.listen_addresses:
            family = socket.AF_INET6 if ":" in address else socket.AF_INET
            with socket.socket(family, socket.SOCK_STREAM) as sock:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if family == socket.AF_INET6:
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                try:
                    sock.bind((address, service.listen_port))
                except OSError as e:
                    if e.errno not in (97, 99):  # address family unavailable: not a conflict
                        busy.append(f"[{address}]:{service.listen_port} ({e.strerror})")
    if busy:
        from agent.claim import holder, pid_text

        running = holder()
        if running is not None:  # (a host already protected: its agent holds them)
            return Check("listener ports", True, "in use by the agent running in this network "
                         f"namespace{pid_text(running)}: " + ", ".join(busy))
        return Check("listener ports", False, "in use: " + ", ".join(busy),
                     "stop what listens there or set listen_port in [[protect]]")
    ports = ", ".join(str(s.listen_port) for s in config.protect)
    return Check("listener ports", True, f"free: {ports}")


def _unix_socket_check(config: Config, globs: tuple[str, ...] | None = None) -> Check | None:
    """A local PostgreSQL cluster that also listens on Unix sockets: its local clients
    (psql without -h, peer logins) bypass the agent."""
    from agent.pgconf import POSTGRESQL_CONF_GLOBS, unix_socket_directories

    open_ = []
    for service in config.protect:
        if service.protocol != "postgres":
            continue
        found = unix_socket_directories(service.port, globs or POSTGRESQL_CONF_GLOBS)
        if found is not None and found[1]:
            open_.append(f"port {service.port} in {', '.join(found[1])} ({found[0]})")
    if not open_:
        return None
    return Check(
        "unix sockets", False,
        "PostgreSQL also listens on Unix sockets, which no redirect reaches: clients there "
        "(psql without -h, peer logins) are neither recorded nor judged: " + "; ".join(open_),
        "set unix_socket_directories = '' (local tools then use -h 127.0.0.1), or keep the "
        "sockets for the postgres OS user only (pg_hba.conf: local all postgres peer, and no "
        "other local line)")


def _policy_check(config: Config) -> Check | None:
    settings = getattr(config, "policy", None)
    if settings is None:
        return None
    try:
        from policy import load_policy
    except ImportError:
        return None
    try:
        loaded = load_policy(settings.path)
    except Exception as e:
        return Check("policy", False, str(e), f"fix {settings.path}; check it with `ringfence policy check`")
    return Check("policy", True, f"{settings.path} is valid (version {str(loaded.version)[:12]})")


def _balance_check(config: Config) -> Check | None:
    """With several event loops: whether the kernel takes the program that gives each new
    connection to the loop with the fewest sessions (agent.balance), tried on a scratch
    group of loopback listeners."""
    from agent.balance import BalanceError, Balancer, off_reason
    from agent.workers import event_loops

    loops = event_loops(config.agent.workers)
    if loops < 2 or off_reason(config.agent.balance, config.bpf.mode) is not None:
        return None
    group: list[socket.socket] = []
    try:
        for _ in range(loops):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            group.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.bind(("127.0.0.1", group[0].getsockname()[1] if len(group) > 1 else 0))
            sock.listen(1)
        balancer = Balancer(loops)
        try:
            balancer.attach(group)
        finally:
            balancer.close()
    except (BalanceError, OSError) as e:
        return Check("balance", False, f"new sessions would be spread over the {loops} event "
                     f"loops by the kernel's hash of addresses, not by their sessions: {e}",
                     "run as root on a kernel with SK_REUSEPORT programs (4.19 or later), or "
                     "set [agent] balance = \"hash\"")
    finally:
        for sock in group:
            sock.close()
    return Check("balance", True, f"new sessions go to the event loop with the fewest "
                 f"({loops} loops)")


def _bpf_checks(config: Config) -> list[Check]:
    """BPF checks; the compile check merges split kernel headers in a scratch
    directory while the state directory does not exist, so that the doctor
    never creates it (with the wrong mode) itself."""
    state = config.agent.state_dir
    if state.is_dir():
        return doctor_checks(config.bpf, state)
    with tempfile.TemporaryDirectory(prefix="ringfence-doctor-") as scratch:
        return doctor_checks(config.bpf, Path(scratch))


def compiled_check() -> Check:
    """The compiled parts of the data path (setup.py); without them the agent and its audit
    writer run on their Python twins, alike but with more CPU a statement and a row. A
    module built from older sources (a name the code imports is not in it) is told apart
    from one not built at all."""
    from agent.protocols.postgres import NATIVE_SCAN_ERROR
    from audit.log import NATIVE_LINK_ERROR
    from policy.classify import NATIVE_SHAPE_ERROR

    modules = (("agent/protocols/_pgscan", NATIVE_SCAN_ERROR),
               ("policy/_plainshape", NATIVE_SHAPE_ERROR), ("audit/_link", NATIVE_LINK_ERROR))
    failed = [(name, error) for name, error in modules if error is not None]
    if not failed:
        return Check("compiled data path", True, ", ".join(name for name, _ in modules) + " built")
    if os.environ.get("RINGFENCE_IMPL") == "python":
        return Check("compiled data path", False,
                     "RINGFENCE_IMPL=python: the Python twins are in use (more CPU)",
                     "unset RINGFENCE_IMPL")
    missing = [name for name, error in failed if isinstance(error, ModuleNotFoundError)]
    stale = [f"{name} ({error})" for name, error in failed
             if not isinstance(error, ModuleNotFoundError)]
    problems = ([f"not built: {', '.join(missing)}"] if missing else []) + (
        [f"built from older sources: {', '.join(stale)}"] if stale else [])
    return Check("compiled data path", False,
                 "; ".join(problems) + " (the Python twins cost more CPU)",
                 "reinstall the package; in a checkout, `./dev.sh setup` "
                 "(needs gcc, python3-dev and libssl-dev)")


def collect_checks(config_path: str | None) -> list[tuple[Check, bool]]:
    """Every check, with whether its failure stops the agent (False: degraded only)."""
    config_check, config = _config_check(config_path)
    checks: list[tuple[Check, bool]] = [(config_check, True), (_root_check(), True),
                                        (_kernel_check(), True), (_iptables_backend(), True),
                                        (compiled_check(), False)]
    if config is None:
        return checks
    port = config.protect[0].listen_port if config.protect else 15432
    method = config.redirect_method()
    if method != "nat":
        steering = _sk_lookup_check(config)
        if steering.ok or method == "sk_lookup":
            checks.append((steering, True))
        else:  # "auto" falls back to iptables REDIRECT
            checks.append((Check(steering.name, False,
                                 f"{steering.detail}; the agent uses iptables REDIRECT instead",
                                 steering.fix), False))
            method = "nat"
    if method == "nat":
        checks.append((_redirect_check(IPV4, port), True))
        if config.redirect.ipv6:
            checks.append((_redirect_check(IPV6, port), False))
    bpf_fatal = config.bpf.mode == "required"
    if config.bpf.mode != "off":
        checks += [(c, bpf_fatal) for c in _bpf_checks(config)]
    extra: list[Callable[[Config], Check | None]] = [
        _state_dir_check, _audit_key_check, _ports_check, _policy_check,
    ]
    for make in extra:
        check = make(config)
        if check is not None:
            checks.append((check, True))
    balance = _balance_check(config)
    if balance is not None:
        checks.append((balance, False))  # the kernel's hash spreads sessions instead
    unix = _unix_socket_check(config)
    if unix is not None:
        checks.append((unix, False))  # the agent runs; it just cannot see those clients
    return checks


def run_doctor(config_path: str | None) -> int:
    """Print one line per check; return 1 when the agent cannot run."""
    failed = False
    for check, fatal in collect_checks(config_path):
        status = "OK" if check.ok else ("FAIL" if fatal else "WARN")
        failed |= not check.ok and fatal
        click.echo(f"{status:4}  {check.name}: {check.detail}")
        if not check.ok and check.fix:
            click.echo(f"      fix: {check.fix}")
    click.echo("the agent cannot run here" if failed else "the agent can run here")
    return 1 if failed else 0


__all__ = ["collect_checks", "compiled_check", "run_doctor"]
