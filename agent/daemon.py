"""``ringfence run``: bring everything up in order, tear it down in reverse.

Start order: the network namespace's claim (agent/claim.py: one agent a namespace,
held until the process ends) → audit log → attribution probes → listeners → redirect rules →
``agent.start`` record → ``READY=1``. Rules go in last, so no connection is
ever redirected to a port nobody listens on. Stop order (SIGTERM/SIGINT):
sessions are ended with a clear message (the session workers' first, then the
agent's, which refuses new ones with the same message meanwhile), then the rules
go (new connections go straight to the service again), then the listeners;
probes detached, ``agent.stop`` recorded, the audit log closed. Sessions end
before the rules go because removing them can drop the address translation of
connections already redirected (iptables-nft), and a session's last words would
then reach its client as a reset.
"""

from __future__ import annotations

import asyncio
import logging
import os
import resource
import signal
import socket
from collections.abc import Callable
from contextlib import AsyncExitStack
from typing import Any

from agent import __version__
from agent.balance import BalanceError, Balancer, SessionCount, off_reason
from agent.claim import Claimed, answer, claim
from agent.config import Config
from agent.logs import configure_logging
from agent.notify import sd_notify
from agent.proxy import Proxy
from agent.redirect import RedirectError, Redirector
from agent.sklookup import SkLookup, SkLookupError, listeners_for
from agent.tls import TlsError
from agent.workers import WorkerPool, event_loops

log = logging.getLogger("ringfence.agent")


class StartupError(Exception):
    """The agent cannot start; the message says why and what to do."""


def run_agent(config: Config) -> int:
    """Run until a stop signal; returns the process exit code."""
    configure_logging(config.agent.log_level, config.agent.log_format)
    if os.geteuid() != 0:
        log.error(
            "ringfence run needs root (iptables rules, BPF probes, reading /proc of other users)",
            extra={"event": "agent.not_root"},
        )
        return 1
    import uvloop

    _raise_open_file_limit()
    try:
        claimed = claim()  # (held until this process ends: see agent/claim.py)
    except (Claimed, OSError) as e:
        why = str(e) if isinstance(e, Claimed) else f"cannot claim this network namespace: {e}"
        log.error("cannot start: %s", why, extra={"event": "agent.start_failed"})
        return 1
    try:
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            return runner.run(_serve(config, claimed))
    except StartupError as e:
        log.error("cannot start: %s", e, extra={"event": "agent.start_failed"})
        return 1
    finally:
        claimed.close()


# The most open files asked for when the hard limit is unlimited (Linux's default fs.nr_open).
OPEN_FILES_CEILING = 1 << 20


def _raise_open_file_limit() -> None:
    """Every session holds two descriptors: take the hard limit on open files as the soft
    one, as servers do (a shell's soft limit of 1024 would stop the agent near 500 sessions;
    the systemd unit sets LimitNOFILE)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = OPEN_FILES_CEILING if hard == resource.RLIM_INFINITY else hard
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError) as e:
            log.warning("cannot raise the open files limit from %d: %s", soft, e,
                        extra={"event": "agent.nofile"})
            return
    log.debug("open files limit %d", resource.getrlimit(resource.RLIMIT_NOFILE)[0],
              extra={"event": "agent.nofile"})


async def _serve(config: Config, claimed: socket.socket) -> int:
    from audit.process import AuditProcess

    loop = asyncio.get_running_loop()
    loop.add_reader(claimed.fileno(), answer, claimed)
    stop = asyncio.Event()
    stop_reason = ["stopped"]
    failed = [False]  # stopping because something the agent needs is gone

    def request_stop(signum: int) -> None:
        stop_reason[0] = f"signal {signal.Signals(signum).name}"
        stop.set()

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, request_stop, signum)

    from policy import PolicyError, PolicyHolder

    try:
        policy = PolicyHolder(config.policy.path)
    except PolicyError as e:
        raise StartupError(f"policy: {e}") from None

    state_dir = config.agent.state_dir
    state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    host = socket.gethostname()

    loops = event_loops(config.agent.workers)
    # The audit writer's sockets for the session workers, one each (agent.workers).
    producer_pairs = [socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
                      for _ in range(loops - 1)]
    worker_sockets = [ours for ours, _ in producer_pairs]

    async with AsyncExitStack() as cleanup:
        for worker_socket in worker_sockets:
            cleanup.callback(worker_socket.close)
        try:
            # The trail is written by a child process: its hashing and storage never wait
            # on this process's GIL, and it commits what it was given if the agent dies.
            audit_log = await asyncio.to_thread(
                AuditProcess.start, config.audit, host=host, state_dir=state_dir,
                producers=[theirs for _, theirs in producer_pairs],
            )
        except Exception as e:
            raise StartupError(str(e) if str(e).startswith("audit trail at") else
                               f"audit trail at {config.audit.path}: {e}") from None
        cleanup.callback(audit_log.close)

        def gone(reason: str) -> None:
            # Sessions already fail closed without a writer; exiting with an error lets
            # the service manager restart the agent and its writer (and its workers).
            def end() -> None:
                stop_reason[0], failed[0] = reason, True
                stop.set()

            loop.call_soon_threadsafe(end)

        audit_log.on_gone = gone

        attributor, attribution_mode, attribution_reason = await _start_attribution(config)
        if attributor is not None:
            cleanup.callback(attributor.stop)

        from agent.doctor import compiled_check

        compiled = compiled_check()
        if not compiled.ok:
            log.warning("compiled data path: %s; see `ringfence doctor`", compiled.detail,
                        extra={"event": "agent.not_compiled"})
        resolver = await _start_identity(config, audit_log, cleanup)
        steering = _start_steering(config)
        if steering is not None:
            cleanup.callback(steering.close)
        try:
            proxy = Proxy(config, audit_log, attributor, policy=lambda: policy.current,
                          identity=resolver)
        except TlsError as e:
            raise StartupError(f"tls: {e}") from None
        if steering is not None:
            # Its upstream connections, from this loop and the workers', pass the program.
            proxy.exemptions = steering.exemptions
        try:
            await proxy.start(loops)
        except OSError as e:
            raise StartupError(str(e)) from None
        balancer = _start_balancing(config, proxy, loops, attach=steering is None)
        if balancer is not None:
            cleanup.callback(balancer.close)
        if steering is not None:
            try:
                families = _steer(config, proxy, steering, balancer)
            except SkLookupError as e:
                await proxy.stop()
                raise StartupError(f"redirect: {e}") from None
        workers = WorkerPool()
        workers.on_gone = gone
        cleanup.callback(workers.stop)
        try:
            # On this (the main) thread: a worker dies with the thread that started it.
            workers.start(config, proxy, worker_sockets, attributor, resolver)
        except RuntimeError as e:
            await proxy.stop()
            raise StartupError(str(e)) from None
        reloader = PolicyReloader(policy, audit_log, workers.reload_policy)
        loop.add_signal_handler(signal.SIGHUP, reloader.reload)
        if config.policy.reload_interval_seconds > 0:
            watch = loop.create_task(reloader.watch(config.policy.reload_interval_seconds))
            cleanup.callback(watch.cancel)

        redirector = Redirector(config.protect, config.redirect, config.agent)
        try:
            if steering is None:
                redirector.install()
                families = [f.name for f in redirector.families]
            elif families:
                steering.attach()
        except RedirectError as e:
            await proxy.stop()
            raise StartupError(f"redirect rules: {e}") from None
        except SkLookupError as e:
            await proxy.stop()
            raise StartupError(f"redirect: {e}") from None

        audit_log.emit(
            "agent.start",
            {
                "version": __version__,
                "pid": os.getpid(),
                "config_path": str(config.source) if config.source else None,
                "services": [
                    {
                        "name": s.name,
                        "protocol": s.protocol,
                        "port": s.port,
                        "listen_port": s.listen_port,
                    }
                    for s in config.protect
                ],
                "attribution_mode": attribution_mode,
                "policy_path": str(config.policy.path),
                "policy_version": policy.version,
                "attribution_reason": attribution_reason,
                "redirect_method": "nat" if steering is None else "sk_lookup",
                "redirect_families": families,
                "worker_pids": workers.pids,
                # How new sessions are spread over the event loops, when there are several:
                # by the sessions each carries, or (configured so, or the kernel refused the
                # program) by the kernel's hash of addresses.
                "balance": (("least-sessions" if balancer is not None else "hash")
                            if loops > 1 else None),
            },
        )
        sd_notify("READY=1")
        log.info(
            "ringfence agent ready",
            extra={
                "event": "agent.ready",
                "version": __version__,
                "services": [f"{s.name}:{s.port}->{s.listen_port}" for s in config.protect],
                "attribution": attribution_mode,
                "event_loops": loops,
            },
        )

        await stop.wait()

        sd_notify("STOPPING=1")
        log.log(logging.ERROR if failed[0] else logging.INFO, "stopping: %s", stop_reason[0],
                extra={"event": "agent.stopping", "reason": stop_reason[0]})
        await asyncio.to_thread(workers.stop)  # their sessions end as the agent's do
        proxy.end_sessions("agent stopping")  # new ones get the same answer until the rules go
        if failed[0] and config.agent.fail_closed:
            # As after a crash: protected ports keep refusing until the agent is back.
            log.error("redirect rules kept: [agent] fail_closed = true",
                      extra={"event": "redirect.kept"})
        elif steering is not None:
            steering.remove()
        else:
            try:
                redirector.remove()
            except RedirectError as e:
                log.error(
                    "could not remove redirect rules; run `ringfence redirect clean`",
                    extra={"event": "redirect.remove_failed", "error": str(e)},
                )
        await proxy.stop("agent stopping")
        try:
            audit_log.emit("agent.stop", {"reason": stop_reason[0]})
        except Exception as e:
            log.error("could not record agent.stop: %s", e, extra={"event": "audit.unavailable"})
    return 1 if failed[0] else 0


def _start_steering(config: Config) -> SkLookup | None:
    """The sk_lookup program's maps, when connections are to be steered by it (``[redirect]
    method``: "sk_lookup", or "auto" without ``fail_closed``, with BPF not turned off and a
    kernel that takes the program); None for iptables REDIRECT."""
    method = config.redirect_method()
    if method == "nat":
        return None
    steering: SkLookup | None = None
    try:
        steering = SkLookup(local=config.redirect.local, remote=config.redirect.remote)
        steering.probe()
    except SkLookupError as e:
        if steering is not None:
            steering.close()
        if method == "sk_lookup":
            raise StartupError(f"redirect: {e}") from None
        log.warning("redirecting with iptables REDIRECT: %s", e,
                    extra={"event": "redirect.sk_lookup_unavailable"})
        return None
    return steering


def _steer(config: Config, proxy: Proxy, steering: SkLookup,
           balancer: Balancer | None) -> list[str]:
    """Give the sk_lookup program (``[redirect] method = "sk_lookup"``) the agent's
    listeners for the protected ports, every event loop's, while this process still holds
    them all; returns the families it will steer (none when neither local nor remote
    clients are to be intercepted)."""
    if not (config.redirect.local or config.redirect.remote):
        return []
    services = [(s.port, [socks for name, socks in proxy.listener_sockets if name == s.name])
                for s in config.protect]
    listeners = listeners_for(services, config.redirect.ipv6)
    steering.add(listeners, None if balancer is None else balancer.counts_fd)
    families = sorted({"ipv4" if listener.family == socket.AF_INET else "ipv6"
                       for listener in listeners})
    if config.redirect.ipv6 and "ipv6" not in families:
        log.warning("no IPv6 listener; IPv6 clients are not intercepted",
                    extra={"event": "redirect.ipv6_unavailable"})
    return families


def _start_balancing(config: Config, proxy: Proxy, loops: int, *,
                     attach: bool = True) -> Balancer | None:
    """New connections to the event loop with the fewest sessions (agent.balance), when
    there are several loops and ``[agent] balance`` asks for it; the kernel's hash when the
    kernel refuses (said in the log: never a reason not to start). ``attach``: the
    balancing program goes on the listener groups; without (``[redirect] method =
    "sk_lookup"``, whose program chooses the loop itself) only the session counts."""
    if loops < 2:
        return None
    reason = off_reason(config.agent.balance, config.bpf.mode)
    if reason is not None:
        log.info("new sessions spread over %d event loops by the kernel's hash of addresses "
                 "(%s)", loops, reason, extra={"event": "agent.balance"})
        return None
    try:
        balancer = Balancer(loops)
        try:
            for _, group in proxy.listener_sockets if attach else ():
                balancer.attach(group)
        except BaseException:
            balancer.close()
            raise
    except BalanceError as e:
        log.warning("new sessions spread over %d event loops by the kernel's hash of "
                    "addresses, not by their sessions: %s", loops, e,
                    extra={"event": "agent.balance_unavailable"})
        return None
    proxy.session_count = SessionCount(balancer.counts_fd, 0)
    log.info("new sessions go to the event loop carrying the fewest (%d loops)", loops,
             extra={"event": "agent.balance"})
    return balancer


async def _start_identity(config: Config, audit_log: Any, cleanup: AsyncExitStack) -> Any:
    """The identity resolver, its issuers' keys loaded, and the control socket for `ringfence login`."""
    from agent.identity.control import ControlServer
    from agent.identity.resolver import IdentityResolver

    resolver = IdentityResolver.from_config(config)
    try:
        await asyncio.to_thread(resolver.verifier.prefetch)
    except Exception as e:  # an unreachable issuer must not stop the agent: refresh retries
        log.warning("could not load identity keys yet: %s", e, extra={"event": "identity.keys"})

    def on_event(name: str, fields: dict[str, Any]) -> None:
        log.info("%s", name, extra={"event": name, **{k: v for k, v in fields.items() if k != "event"}})
        try:
            audit_log.emit(name, fields)
        except Exception as e:
            log.error("could not record %s: %s", name, e, extra={"event": "audit.unavailable"})

    run_dir = config.agent.run_dir
    run_dir.mkdir(mode=0o755, parents=True, exist_ok=True)
    server = ControlServer(run_dir / "control.sock", resolver.registry, resolver.verifier,
                           on_event=on_event)
    await server.start()
    cleanup.push_async_callback(server.close)
    return resolver


class PolicyReloader:
    """Reloads the policy on SIGHUP and when its file changes; a broken file keeps the old one."""

    def __init__(self, holder: Any, audit_log: Any, also: Callable[[], None] | None = None) -> None:
        self.holder = holder
        self.audit_log = audit_log
        # After each reload that loaded (the session workers load the file again). Not after
        # one that failed: the file is broken, each worker would log the same error, and
        # every loop keeps the policy in force. An unchanged file is passed on all the same,
        # so a worker that missed an earlier change catches up.
        self.also = also

    def reload(self) -> None:
        self._report(self.holder.version, self.holder.reload(), "signal")

    async def watch(self, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            previous = self.holder.version
            result = self.holder.maybe_reload()
            if result is not None:
                self._report(previous, result, "file change")

    def _report(self, previous: str, result: tuple[bool, str], trigger: str) -> None:
        ok, message = result
        if ok and self.also is not None:
            self.also()
        level = logging.INFO if ok else logging.ERROR
        log.log(level, "policy reload: %s", message,
                extra={"event": "policy.reload", "ok": ok, "trigger": trigger})
        try:
            self.audit_log.emit(
                "policy.decision",
                {
                    "scope": "policy",
                    "effect": "reload" if ok else "reload_rejected",
                    "reason": message,
                    "trigger": trigger,
                    "previous_version": previous,
                    "policy_version": self.holder.version,
                },
            )
        except Exception as e:
            log.error("could not record the policy reload: %s", e, extra={"event": "audit.unavailable"})


async def _start_attribution(config: Config) -> tuple[Any, str, str | None]:
    """Start BPF attribution (or its procfs fallback) in a worker thread."""
    from agent.attribution import AttributionError, Attributor

    ports = [s.port for s in config.protect]
    attributor = Attributor(config.bpf, ports, config.agent.state_dir)
    try:
        await asyncio.get_running_loop().run_in_executor(None, attributor.start)
    except AttributionError as e:
        raise StartupError(f"attribution: {e}") from None
    reason = attributor.degraded_reason
    if reason:
        log.warning(
            "BPF attribution unavailable; using procfs: %s",
            reason,
            extra={"event": "attribution.degraded"},
        )
    return attributor, attributor.mode, reason
