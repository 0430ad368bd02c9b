"""Session workers: more event loops carrying sessions, each in a process of its own.

One Python event loop carries every session of its process, and under load it is the
agent's bottleneck: it leaves cores idle that PostgreSQL and the clients could use. With
``[agent] workers`` above 1 (``"auto"``: one per CPU the agent may run on, at most
:data:`AUTO_MAX`), the agent starts ``workers - 1`` worker processes
(``python -m agent.workers``), as HAProxy runs a thread and nginx a process per core. Each
listener is bound once per event loop with ``SO_REUSEPORT``, and each new connection goes
to the loop carrying the fewest sessions (:mod:`agent.balance`; the kernel's hash of
addresses when that is off or refused). Each loop keeps its slot in the session counts
current, the workers through the counts map's fd handed to them at start.

What exists once stays in the agent (the main process): the audit writer, the BPF probes
and their maps, the identity resolver with its login registry and control socket, the
redirect rules, and the registry of backend keys that cancel requests are matched
against. A worker carries whole sessions with the same :class:`~agent.proxy.Proxy` and
:class:`~agent.pgsession.PostgresSession` as the agent, and for what only the agent has it
asks over a private ``SOCK_SEQPACKET`` channel (:class:`Channel`):

* ``attribute``: the accepted client socket itself is passed along (``SCM_RIGHTS``) and
  the agent attributes it with its probes, as for its own sessions;
* ``resolve`` and ``credential``: the session's identity and the service's credential;
* ``key``/``unkey`` (no answer) and ``cancel``: backend keys of the worker's sessions, and
  the session a cancel request's key belongs to, whichever process carries it.

Its records go straight to the audit writer over a producer socket of its own
(:meth:`audit.process.AuditProcess.attach`). Its policy is loaded from the same file and
reloaded when the agent's is (SIGHUP from the agent, which records the reload).

Lifetimes: a worker dies with the agent (``PR_SET_PDEATHSIG``); on SIGTERM it ends its
sessions with the same message as the agent's and closes its producer, so the writer
commits all it sent. The agent stops its workers before it ends its own sessions and
removes the redirect rules; SIGINT (a terminal's Ctrl-C reaches the whole group) is left
to the agent. If a worker ends on its own, the agent stops with
an error, as when its writer ends, so that the service manager restarts them together.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import pickle
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent.config import Config, ProtectedService

log = logging.getLogger("ringfence.agent")

AUTO_MAX = 4
# The largest message on a channel (a pickled identity result, the configuration).
MAX_MESSAGE = 1 << 20
START_TIMEOUT = 60.0
STOP_TIMEOUT = 30.0
CALL_TIMEOUT = 30.0  # attribution and identity have timeouts of their own, shorter
CANCEL_LOOKUP_TIMEOUT = 2.0  # asked from the worker's event loop
_PR_SET_PDEATHSIG = 1


def event_loops(setting: int) -> int:
    """How many event loops carry sessions: ``setting``, or for 0 ("auto") one per CPU
    this process may run on, at most AUTO_MAX."""
    if setting > 0:
        return setting
    return max(1, min(AUTO_MAX, len(os.sched_getaffinity(0))))


class CancelKeys:
    """The session each backend key (server host, port, backend pid, secret) belongs to."""

    def __init__(self) -> None:
        self._keys: dict[tuple[str, int, int, bytes], str] = {}

    def register(self, entry: tuple[str, int, int, bytes], session_id: str) -> None:
        self._keys[entry] = session_id

    def unregister(self, entry: tuple[str, int, int, bytes]) -> None:
        self._keys.pop(entry, None)

    def lookup(self, entry: tuple[str, int, int, bytes]) -> str | None:
        return self._keys.get(entry)


# ------------------------------------------------------------------- the channel


class ChannelClosed(Exception):
    """The other end of a worker's channel is gone."""


class Channel:
    """One end of a worker's channel: pickled messages, file descriptors alongside.

    Both ends are this project's own processes, running as root, over a socket pair
    nobody else holds, so pickle carries the messages (identity results, configuration)
    as they are. A request is ``(number, message)``; its answer ``(number, status,
    value)``, in any order; number 0 asks for no answer. On the worker's end a reader
    thread (:meth:`start_reader`) hands each answer to the call waiting for it.
    """

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._send_lock = threading.Lock()
        self._lock = threading.Lock()  # the calls waiting for answers
        self._waiting: dict[int, list[Any]] = {}
        self._next = 0
        self._closed: str | None = None

    def send(self, message: Any, fds: list[int] | None = None) -> None:
        data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
        if len(data) > MAX_MESSAGE:
            raise ValueError(f"channel message of {len(data)} bytes is too large")
        with self._send_lock:
            if fds:
                socket.send_fds(self.sock, [data], fds)
            else:
                self.sock.send(data)

    def receive(self) -> tuple[Any, list[int]]:
        """The next message and the descriptors that came with it; ChannelClosed at the end."""
        data, fds, _, _ = socket.recv_fds(self.sock, MAX_MESSAGE, 4)
        if not data:
            for fd in fds:
                os.close(fd)
            raise ChannelClosed("the other end closed")
        return pickle.loads(data), fds

    def start_reader(self) -> None:
        threading.Thread(target=self._read, name="agent-channel", daemon=True).start()

    def _read(self) -> None:
        reason = "the agent closed the channel"
        try:
            while True:
                (number, status, value), fds = self.receive()
                for fd in fds:
                    os.close(fd)
                with self._lock:
                    slot = self._waiting.pop(number, None)
                if slot is not None:
                    slot[1:] = [status, value]
                    slot[0].set()
        except (ChannelClosed, OSError, ValueError, pickle.UnpicklingError) as e:
            reason = f"the channel to the agent failed: {e}"
        with self._lock:
            self._closed = reason
            waiting, self._waiting = self._waiting, {}
        for slot in waiting.values():
            slot[1:] = ["raise", ChannelClosed(reason)]
            slot[0].set()

    def call(self, message: Any, fds: list[int] | None = None,
             timeout: float = CALL_TIMEOUT) -> Any:
        """Send a request and return its answer (raising what the agent raised)."""
        slot: list[Any] = [threading.Event(), "raise", None]
        with self._lock:
            if self._closed is not None:
                raise ChannelClosed(self._closed)
            self._next += 1
            number = self._next
            self._waiting[number] = slot
        try:
            self.send((number, message), fds)
        except OSError as e:
            with self._lock:
                self._waiting.pop(number, None)
            raise ChannelClosed(f"cannot reach the agent: {e}") from None
        if not slot[0].wait(timeout):
            with self._lock:
                self._waiting.pop(number, None)
            raise ChannelClosed(f"no answer from the agent to {message[0]!r} in {timeout:g}s")
        if slot[1] == "raise":
            raise slot[2]
        return slot[2]

    def notify(self, message: Any) -> None:
        """Send a message that has no answer."""
        self.send((0, message))


# ------------------------------------------------------------- the agent's side


@dataclass
class _Worker:
    process: subprocess.Popen[bytes]
    channel: Channel
    keys: set[tuple[str, int, int, bytes]]
    thread: threading.Thread | None = None
    early: list[tuple[Any, list[int]]] = field(default_factory=list)


class WorkerPool:
    """The agent's workers: started after its listeners, stopped before them."""

    def __init__(self) -> None:
        self.workers: list[_Worker] = []
        self.stopping = False
        self._stopped = False
        self._pool = ThreadPoolExecutor(max_workers=8, thread_name_prefix="worker-requests")
        # Told (on a channel thread) when a worker ends while the pool is not stopping.
        self.on_gone: Callable[[str], None] | None = None

    @property
    def pids(self) -> list[int]:
        return [w.process.pid for w in self.workers]

    def start(
        self,
        config: Config,
        proxy: Any,
        audit_sockets: list[socket.socket],
        attributor: Any,
        identity: Any,
    ) -> None:
        """Start one worker for each of ``audit_sockets`` (producer sockets of the writer),
        each serving its share of ``proxy``'s listeners; waits until every one is serving.
        Raises RuntimeError saying why a worker could not start (the pool is then stopped).

        Call from the main thread: a worker dies when the thread that started it ends."""
        services = {s.name: s for s in config.protect}
        try:
            for index, audit_sock in enumerate(audit_sockets):
                listeners = [(name, socks[index + 1]) for name, socks in proxy.listener_sockets]
                # The worker's slot in the session counts, when new sessions are balanced.
                balance = (None if proxy.session_count is None
                           else (proxy.session_count.counts_fd, index + 1))
                exempt = None if proxy.exemptions is None else proxy.exemptions.map_fd
                worker = self._spawn(config, audit_sock, listeners, attributor is not None,
                                     balance, exempt)
                self.workers.append(worker)
            for worker in self.workers:
                worker.channel.sock.settimeout(START_TIMEOUT)
                while True:
                    try:
                        (number, message), fds = worker.channel.receive()
                    except (ChannelClosed, OSError) as e:
                        code = worker.process.poll()
                        raise RuntimeError(
                            f"session worker {worker.process.pid} did not start: {e}"
                            + ("" if code is None else f" (exit status {code})")) from None
                    if message[0] in ("ready", "error"):
                        break
                    # A connection accepted before "ready" was sent: answered once serving.
                    worker.early.append(((number, message), fds))
                worker.channel.sock.settimeout(None)
                if message[0] != "ready":
                    raise RuntimeError(f"session worker {worker.process.pid}: {message[1]}")
        except BaseException:
            self.stopping = True
            for worker in self.workers:
                worker.process.kill()
                worker.process.wait()
            raise
        finally:
            for sock in audit_sockets:
                sock.close()
            for _, socks in proxy.listener_sockets:
                for sock in socks[1:]:
                    sock.close()
        for worker in self.workers:
            worker.thread = threading.Thread(
                target=self._serve, args=(worker, proxy, attributor, identity, services),
                name=f"worker-{worker.process.pid}", daemon=True)
            worker.thread.start()

    def _spawn(self, config: Config, audit_sock: socket.socket,
               listeners: list[tuple[str, socket.socket]], attribution: bool,
               balance: tuple[int, int] | None, exempt: int | None) -> _Worker:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        fds = [theirs.fileno(), audit_sock.fileno(), *(s.fileno() for _, s in listeners)]
        if balance is not None:
            fds.append(balance[0])
        if exempt is not None:
            fds.append(exempt)
        env = {k: v for k, v in os.environ.items() if k != "NOTIFY_SOCKET"}
        try:
            process = subprocess.Popen(
                [sys.executable, "-m", "agent.workers", str(theirs.fileno()), str(os.getpid())],
                pass_fds=fds, stdin=subprocess.DEVNULL, env=env,
                cwd=str(Path(__file__).resolve().parent.parent),
            )
        finally:
            theirs.close()
        channel = Channel(ours)
        channel.notify(("start", config, audit_sock.fileno(),
                        [(name, s.fileno()) for name, s in listeners], attribution, balance,
                        exempt))
        return _Worker(process, channel, set())

    def _serve(self, worker: _Worker, proxy: Any, attributor: Any, identity: Any,
               services: Mapping[str, ProtectedService]) -> None:
        """Take one worker's requests until its channel closes. Keys are applied in order
        here; requests are answered from a thread pool, so a slow one (keys fetched from an
        issuer) holds up no other."""
        keys = proxy.cancel_keys
        channel = worker.channel

        def answer(number: int, message: tuple[Any, ...], fds: list[int]) -> None:
            try:
                reply: tuple[int, str, Any] = (number, "ok", _answer(
                    message, fds, keys, attributor, identity, services))
            except Exception as e:
                reply = (number, "raise", e)
            finally:
                for fd in fds:
                    with contextlib.suppress(OSError):
                        os.close(fd)
            with contextlib.suppress(OSError):
                try:
                    channel.send(reply)
                except (pickle.PicklingError, TypeError, AttributeError, ValueError):
                    channel.send((number, "raise", RuntimeError(repr(reply[2]))))

        early, worker.early = worker.early, []
        while True:
            if early:
                (number, message), fds = early.pop(0)
            else:
                try:
                    (number, message), fds = channel.receive()
                except (ChannelClosed, OSError, ValueError, pickle.UnpicklingError):
                    break
            kind = message[0]
            if kind == "key":
                keys.register(message[1], message[2])
                worker.keys.add(message[1])
            elif kind == "unkey":
                keys.unregister(message[1])
                worker.keys.discard(message[1])
            else:
                try:
                    self._pool.submit(answer, number, message, fds)
                except RuntimeError:  # the pool is shut down: the agent is stopping
                    for fd in fds:
                        os.close(fd)
        for entry in worker.keys:
            keys.unregister(entry)
        worker.keys.clear()
        if not self.stopping:
            try:
                code = worker.process.wait(5)
            except subprocess.TimeoutExpired:
                worker.process.kill()
                code = worker.process.wait()
            reason = f"session worker {worker.process.pid} ended (exit status {code})"
            log.error("%s", reason, extra={"event": "agent.worker_gone"})
            if self.on_gone is not None:
                self.on_gone(reason)

    def reload_policy(self) -> None:
        """Have every worker load the policy file again, as the agent just did."""
        for worker in self.workers:
            with contextlib.suppress(ProcessLookupError):
                worker.process.send_signal(signal.SIGHUP)

    def stop(self) -> None:
        """End every worker's sessions and wait for the workers (blocking; killed when late).
        Once: the agent stops them before its listeners, and its exit stack again."""
        if self._stopped:
            return
        self._stopped = self.stopping = True
        for worker in self.workers:
            with contextlib.suppress(ProcessLookupError):
                worker.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT
        for worker in self.workers:
            try:
                code = worker.process.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.error("session worker %d did not stop in time; killing it",
                          worker.process.pid, extra={"event": "agent.worker_killed"})
                worker.process.kill()
                code = worker.process.wait()
            if code != 0:
                log.error("session worker %d exited with status %d", worker.process.pid, code,
                          extra={"event": "agent.worker_failed"})
            with contextlib.suppress(OSError):
                worker.channel.sock.close()
            if worker.thread is not None:
                worker.thread.join(5)
        self._pool.shutdown(wait=False, cancel_futures=True)


def _answer(message: tuple[Any, ...], fds: list[int], keys: CancelKeys, attributor: Any,
            identity: Any, services: Mapping[str, ProtectedService]) -> Any:
    kind = message[0]
    if kind == "cancel":
        return keys.lookup(message[1])
    if kind == "attribute":
        if attributor is None or len(fds) != 1:
            raise RuntimeError("no attribution in the agent, or no socket passed")
        conn = socket.socket(fileno=os.dup(fds[0]))
        try:
            return attributor.lookup(conn, message[1]).to_record()
        finally:
            conn.close()
    if kind == "resolve":
        _, process, token, name = message
        return identity.resolve(process, token, service=services.get(name) if name else None)
    if kind == "credential":
        return identity.upstream_credential(services[message[1]])
    raise ValueError(f"unknown request {kind!r}")


# ------------------------------------------------------------- a worker's side


class RemoteCancelKeys:
    """A worker's view of the agent's :class:`CancelKeys`."""

    def __init__(self, channel: Channel) -> None:
        self.channel = channel

    def register(self, entry: tuple[str, int, int, bytes], session_id: str) -> None:
        with contextlib.suppress(OSError):
            self.channel.notify(("key", entry, session_id))

    def unregister(self, entry: tuple[str, int, int, bytes]) -> None:
        with contextlib.suppress(OSError):
            self.channel.notify(("unkey", entry))

    def lookup(self, entry: tuple[str, int, int, bytes]) -> str | None:
        """Asked on the event loop (a cancel request is rare and the answer immediate); a
        lookup that fails leaves the cancel request unmatched in its record, not refused."""
        try:
            session_id: str | None = self.channel.call(("cancel", entry),
                                                       timeout=CANCEL_LOOKUP_TIMEOUT)
        except (OSError, ChannelClosed) as e:
            log.warning("cancel key lookup failed: %s", e, extra={"event": "agent.worker_channel"})
            return None
        return session_id


@dataclass(frozen=True, slots=True)
class _Attributed:
    record: tuple[dict[str, Any] | None, dict[str, Any]]

    def to_record(self) -> tuple[dict[str, Any] | None, dict[str, Any]]:
        return self.record


class RemoteAttributor:
    """Attribution by the agent's probes, for a worker's accepted connections."""

    def __init__(self, channel: Channel) -> None:
        self.channel = channel

    def lookup(self, conn: socket.socket, original_dst: tuple[str, int]) -> _Attributed:
        return _Attributed(self.channel.call(("attribute", original_dst), [conn.fileno()]))


class RemoteIdentity:
    """The agent's identity resolver, for a worker's sessions."""

    def __init__(self, channel: Channel) -> None:
        self.channel = channel

    async def resolve_async(self, process: Mapping[str, Any] | None,
                            in_protocol_token: str | None = None, *,
                            service: ProtectedService | None = None) -> Any:
        return await asyncio.to_thread(
            self.channel.call,
            ("resolve", None if process is None else dict(process), in_protocol_token,
             service.name if service is not None else None))

    def upstream_credential(self, service: ProtectedService) -> Any:
        return self.channel.call(("credential", service.name))


def _die_with_parent(parent: int) -> None:
    """SIGKILL when the agent ends, however it ends."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG)")
    if os.getppid() != parent:  # it ended before the call
        os._exit(1)


def worker_main(channel_fd: int, parent: int) -> int:
    """A worker process: serve the listeners the agent handed over until told to stop."""
    _die_with_parent(parent)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)  # until the policy is loaded (see below)
    channel = Channel(socket.socket(fileno=channel_fd))
    try:
        (_, (kind, config, audit_fd, listeners, attribution, balance, exempt)), _ = \
            channel.receive()
    except (ChannelClosed, OSError, ValueError, pickle.UnpicklingError):
        return 2
    from agent.logs import configure_logging

    configure_logging(config.agent.log_level, config.agent.log_format)
    import uvloop

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(_serve_worker(config, channel, audit_fd, listeners, attribution,
                                        balance, exempt))


async def _serve_worker(config: Config, channel: Channel, audit_fd: int,
                        listeners: list[tuple[str, int]], attribution: bool,
                        balance: tuple[int, int] | None = None,
                        exempt: int | None = None) -> int:
    """Serve ``listeners``; ``balance``: the session counts map's fd and this worker's slot,
    when new sessions are balanced over the event loops (agent.balance); ``exempt``: the
    sk_lookup program's exemption map's fd, with ``[redirect] method = "sk_lookup"``
    (agent.sklookup)."""
    from agent.proxy import Proxy
    from agent.tls import TlsError
    from audit.process import AuditProcess
    from policy import PolicyError, PolicyHolder

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    failed: list[str] = []

    audit_log = AuditProcess.attach(socket.socket(fileno=audit_fd))

    def writer_gone(reason: str) -> None:
        def end() -> None:
            failed.append(reason)
            stop.set()

        loop.call_soon_threadsafe(end)

    audit_log.on_gone = writer_gone
    try:
        policy = PolicyHolder(config.policy.path)
        proxy = Proxy(config, audit_log, RemoteAttributor(channel) if attribution else None,
                      policy=lambda: policy.current, identity=RemoteIdentity(channel),
                      cancel_keys=RemoteCancelKeys(channel))
        if balance is not None:
            from agent.balance import SessionCount

            proxy.session_count = SessionCount(*balance)
        if exempt is not None:
            from agent.sklookup import Exemptions

            proxy.exemptions = Exemptions(exempt)
        services = {s.name: s for s in config.protect}
        await proxy.serve([(services[name], socket.socket(fileno=fd)) for name, fd in listeners])
    except (PolicyError, TlsError, OSError) as e:
        channel.notify(("error", str(e)))
        audit_log.close()
        return 1
    loop.add_signal_handler(signal.SIGTERM, stop.set)

    def reload() -> None:
        ok, message = policy.reload()
        log.log(logging.INFO if ok else logging.ERROR, "session worker: %s", message,
                extra={"event": "policy.reload", "ok": ok, "worker": os.getpid()})

    loop.add_signal_handler(signal.SIGHUP, reload)
    channel.notify(("ready", os.getpid()))
    channel.start_reader()
    await stop.wait()
    if failed:
        log.error("session worker stopping: %s", failed[0], extra={"event": "agent.stopping"})
    await proxy.stop("agent stopping")
    await asyncio.to_thread(audit_log.close)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(worker_main(int(sys.argv[1]), int(sys.argv[2])))
