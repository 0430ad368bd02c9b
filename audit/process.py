"""The audit trail written by a child process, so its work never waits on the agent's GIL.

:class:`AuditProcess` has the producer side of :class:`~audit.log.AuditLog`
(``emit``, ``emit_durable``, ``emit_durable_sync``, ``flush``, ``close``,
``healthy``, ``failure``) and runs the :class:`AuditLog` itself in a child
(``python -m audit.process``). The agent encodes each event with msgpack as
before, unless it comes already encoded (bytes: the PostgreSQL session's one-step
paths write theirs so); records emitted on the event loop thread are sent together, about
3 ms after the first of them and at most 5 ms (see ``SEND_DELAY_NS``), so that
the writer wakes once per batch rather than once per loop turn; records from
other threads, and strict records (with everything batched before them), go
at once. Over a Unix
socket pair, each frame is a 4-byte big-endian length and a msgpack array:

agent → writer: ``["b", [[type, session_id, ts_ns, event], ...]]`` batched
records (a ``result`` may carry a fifth element, ``true``: it answers the query record
its session sent last, and when that is in the same frame the writer stores both as one
record, see ``AuditProcess.emit_packed``); ``["d", id, type, session_id, ts_ns, event]``
a strict record;
``["f", id]`` flush; ``["c"]`` close. The writer reads batch frames into its queue in
one compiled step (``audit.log.batch_items``) and anything else with msgpack.

writer → agent: ``["ready"]`` or ``["error", message]`` once at start;
``["r", id, seq, error]`` a strict record committed (or not);
``["f", id, done]``; ``["h", healthy, failure]`` whenever the store starts
failing or recovers.

Further producers (the agent's session workers, see ``agent.workers``) speak the same
frames over sockets of their own, handed to the writer when it starts; each is read by a
thread of its own, and the writer stops only once the agent and every one of them have
closed.

The writer holds an exclusive lock on the store while it runs, so a restarted
agent's writer waits for the previous one to commit what it was given. If the
agent dies, the writer sees the socket close, commits everything it received
and exits; it ignores SIGTERM and SIGINT (systemd signals the whole unit) for
the same reason. If the writer dies, the trail is unavailable (sessions fail
closed) and ``on_gone`` is told; the agent then exits with an error so that the
service manager restarts it and its writer.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import pickle
import select
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgpack

from audit.errors import AuditUnavailable, InvalidEvent
from audit.log import (
    _PRODUCER_TYPES,
    AuditLog,
    Event,
    _Waiter,
    batch_frame,
    batch_frame_of,
    batch_items,
    encode_producer_event,
    require_producer_type,
    thread_packer,
)

if TYPE_CHECKING:
    from agent.config import AuditSettings

log = logging.getLogger("ringfence.audit")

_LENGTH = struct.Struct(">I")
START_TIMEOUT = 120.0  # opening a large store, or waiting for the previous writer
LOCK_NAME = ".writer.lock"
# How long batched records from the event loop wait in the agent before they are sent to
# the writer (which commits them at most batch_max_delay_ms later): they go with the first
# loop turn that emits a record SEND_DELAY_NS after the batch began, or, when none follows,
# SEND_AT_THE_LATEST after it (a timer that busy loops then never need to wake for).
# The longer the wait, the fewer batches the writer wakes for, and the more of a
# statement's answers reach the agent while the statement's record still waits, so that
# the two are stored as one (at eight clients, 3 ms instead of 1 ms took about 0.03x
# HAProxy's TPS off the distance: bench/README.md, "Batches to the writer every 3 ms").
# SEND_AT_THE_LATEST bounds what an agent killed outright can lose (audit/SCHEMA.md).
SEND_DELAY_NS = 3_000_000
SEND_AT_THE_LATEST = 0.005
_NEVER = 1 << 64


def _queued(records: Sequence[tuple[str, Event]], session_id: str | None, ts: int,
            joining: object) -> list[tuple[Any, ...]]:
    """The batch buffer's items for ``records`` of one session emitted at ``ts``: (type,
    session_id, ts, event), True after them for the result ``joining`` (see emit_many)."""
    return [(type, session_id, ts, event, True)
            if joining is not None and event is joining and type == "result"
            else (type, session_id, ts, event)
            for type, event in records]


def _send(sock: socket.socket, message: Any) -> None:
    data = msgpack.packb(message, use_bin_type=True)
    sock.sendall(_LENGTH.pack(len(data)) + data)


def _encodable(value: Any) -> Any:
    """``value`` with what msgpack cannot encode turned into text saying what it was."""
    if isinstance(value, Mapping):
        return {_encodable(k): _encodable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_encodable(v) for v in value]
    if isinstance(value, str):
        return value.encode("utf-8", "backslashreplace").decode("utf-8")
    if isinstance(value, int) and not isinstance(value, bool):
        return value if -(1 << 63) <= value < (1 << 64) else str(value)
    if value is None or isinstance(value, bool | float | bytes):
        return value
    return repr(value)


def _receive(sock: socket.socket) -> Any:
    """The next frame, or None at the end of the stream."""
    body = _receive_body(sock)
    return None if body is None else msgpack.unpackb(body, raw=False)


def _receive_body(sock: socket.socket) -> bytes | None:
    """The next frame's bytes, or None at the end of the stream."""
    head = _read_exactly(sock, 4)
    if head is None:
        return None
    return _read_exactly(sock, _LENGTH.unpack(head)[0])


# A producer's frames are read into a buffer this large (a larger frame gets one of its own).
_FRAME_BUFFER = 1 << 18


class _Frames:
    """A producer's frames off its socket, read in large pieces: a frame costs one system
    call or less (several often arrive together) and its bytes are copied once, into the
    buffer; :meth:`next` returns a view of them, valid until the next call."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._buffer = bytearray(_FRAME_BUFFER)
        self._view = memoryview(self._buffer)
        self._start = self._end = 0

    def next(self) -> memoryview | None:
        """The next frame's bytes, or None at the end of the stream (also mid-frame)."""
        while True:
            start, available = self._start, self._end - self._start
            if available >= 4:
                body = start + 4
                end = body + _LENGTH.unpack_from(self._buffer, start)[0]
                if end <= self._end:
                    self._start = end
                    return self._view[body:end]
                needed = end - start
            else:
                needed = 4
            if start + needed > len(self._buffer):
                self._make_room(needed)
            count = self._sock.recv_into(self._view[self._end:])
            if not count:
                return None
            self._end += count

    def _make_room(self, needed: int) -> None:
        """Move the unread bytes to the buffer's start; into a new buffer when the frame
        being read is larger than this one, or back to the usual size after one was."""
        unread = self._view[self._start:self._end]
        size = len(self._buffer)
        if needed > size or (size > _FRAME_BUFFER and needed <= _FRAME_BUFFER):
            buffer = bytearray(max(needed, _FRAME_BUFFER))
            buffer[:len(unread)] = unread
            self._view.release()
            self._buffer, self._view = buffer, memoryview(buffer)
        else:
            self._view[:len(unread)] = unread
        self._start, self._end = 0, len(unread)


def _read_exactly(sock: socket.socket, size: int) -> bytes | None:
    chunks = bytearray()
    while len(chunks) < size:
        chunk = sock.recv(size - len(chunks))
        if not chunk:
            return None
        chunks += chunk
    return bytes(chunks)


class AuditProcess:
    """The agent's side of an audit trail written by a child process (see the module doc)."""

    # The fields the proxy's compiled one-step paths (agent/protocols/_pgscan.c) read and
    # move on, as slots; the rest of its state is in its __dict__.
    __slots__ = (
        "_loop", "_closing", "_healthy", "_unencoded", "_check_at", "_flush_loop",
        "__dict__", "__weakref__",
    )

    def __init__(self, process: subprocess.Popen[bytes] | None, sock: socket.socket) -> None:
        self._process = process  # None in a session worker, which shares the agent's writer
        self._sock = sock
        # Called (on a reader thread) if the writer ends while the trail is open.
        self.on_gone: Callable[[str], None] | None = None
        self._lock = threading.Lock()  # the outgoing buffer and the socket
        # Batched records not yet sent, encoded when their batch is: (type, session_id, ts,
        # event), and True after them for a result that joins its query (emit_packed).
        self._unencoded: list[tuple[Any, ...]] = []
        self._flush_loop: asyncio.AbstractEventLoop | None = None  # where a send is scheduled
        # The timer that sends the batch if no later record does (None once a send is due).
        self._flush_timer: asyncio.TimerHandle | None = None
        # When a record from the loop's thread must look at the batch again (time.time_ns()).
        self._check_at = 0
        # The event loop whose thread emitted last, and that thread (see _loop_of_caller).
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: int | None = None
        self._healthy = True
        self._closing = False
        self._gone = False  # the writer process ended or cannot be reached
        self.failure: str | None = None
        self._next_id = 0
        self._waiting: dict[int, _Waiter] = {}
        self._flushes: dict[int, tuple[threading.Event, list[bool]]] = {}
        self._tls = threading.local()
        self._reader = threading.Thread(target=self._read, name="audit-replies", daemon=True)
        self._reader.start()

    @classmethod
    def start(
        cls, settings: AuditSettings, *, host: str, state_dir: Path,
        lock_timeout: float = START_TIMEOUT - 10, producers: list[socket.socket] | None = None,
    ) -> AuditProcess:
        """Start the writer process and wait until its store is open; raises RuntimeError.

        ``lock_timeout``: how long the writer waits for a previous writer of the same store.
        ``producers``: sockets of further producers (the agent's session workers, see
        :meth:`attach`), handed to the writer and closed here; the writer takes their frames
        as the agent's, and stops only after each of them has closed.
        """
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        fds = [theirs.fileno(), *(p.fileno() for p in producers or ())]
        try:
            process = subprocess.Popen(
                [sys.executable, "-m", "audit.process", *map(str, fds)],
                pass_fds=fds,
                stdin=subprocess.DEVNULL,
                cwd=str(Path(__file__).resolve().parent.parent),
            )
        finally:
            theirs.close()
            for producer in producers or ():
                producer.close()
        mine.settimeout(START_TIMEOUT)
        try:
            _send(mine, ["open", pickle.dumps((settings, host, str(state_dir), lock_timeout))])
            answer = _receive(mine)
        except (OSError, TimeoutError) as e:
            process.kill()
            raise RuntimeError(f"the audit writer process did not start: {e}") from None
        if not answer or answer[0] != "ready":
            process.wait(30)
            reason = answer[1] if answer else f"it exited with status {process.returncode}"
            raise RuntimeError(reason)
        mine.settimeout(None)
        return cls(process, mine)

    @classmethod
    def attach(cls, sock: socket.socket) -> AuditProcess:
        """A further producer of a running writer, over the other end of one of the sockets
        given to :meth:`start` as ``producers``. Its records are the agent's; its
        :meth:`close` returns once the writer has taken everything it sent."""
        return cls(None, sock)

    # ------------------------------------------------------------ producers

    @property
    def healthy(self) -> bool:
        """Whether the store is writing (False while failing, after close or without a writer)."""
        return self._healthy and not self._closing

    def emit(self, type: str, event: Event, *, session_id: str | None = None) -> None:
        """Queue a record (batched durability); raises AuditUnavailable while the store fails.

        On the event loop's thread the event is kept as it is and encoded together with the
        rest of its batch when that is sent (at most ``SEND_AT_THE_LATEST`` later), which on
        a busy host costs far less than encoding each record as it comes; the caller must
        not change an event after emitting it. Values msgpack cannot encode are recorded as
        text (and logged) rather than losing the record.
        """
        self.emit_many(((type, event),), session_id=session_id)

    def emit_many(
        self, records: Sequence[tuple[str, Event]], *, session_id: str | None = None,
        joining: object = None,
    ) -> None:
        """:meth:`emit` for several records of one session, in order, in one call.
        ``joining``: the event of a ``result`` among them that answers the query record this
        session emitted last (see :meth:`emit_packed`'s ``joins``)."""
        for type, _ in records:
            require_producer_type(type)
        loop = self._loop_of_caller()
        if loop is not None:
            if self._closing:
                raise AuditUnavailable("audit log is closed")
            ts = time.time_ns()
            self._unencoded.extend(_queued(records, session_id, ts, joining))
            if ts >= self._check_at or self._flush_loop is not loop:
                self._batch_step(loop, ts)
            healthy, failure = self._healthy, self.failure
        else:
            with self._lock:
                if self._closing:
                    raise AuditUnavailable("audit log is closed")
                # Sent at once, after the loop's records queued before it.
                ts = time.time_ns()
                self._unencoded.extend(_queued(records, session_id, ts, joining))
                self._send_buffer()
                healthy, failure = self._healthy, self.failure
        if not healthy:
            # The writer counts them as lost (an audit.loss record follows on recovery).
            raise AuditUnavailable(f"audit store is failing: {failure}")

    def emit_packed(self, type: str, data: bytes, session_id: str | None,
                    caller: asyncio.AbstractEventLoop | None = None, joins: bool = False) -> None:
        """:meth:`emit` of an event already encoded (a msgpack map), in as few steps as
        can be: the proxy's commonest records, on the event loop's thread.

        ``caller``: the loop whose callback is running this call, when the caller knows it
        (a protocol's ``data_received``); it saves asking which thread and loop this is.
        ``joins``, for a ``result``: it answers the query record this session emitted last
        (with this method, nothing of the session's since). When that record is still in
        the same batch, the writer stores the two as one, the query carrying its result
        (audit/SCHEMA.md); else the result is a record of its own."""
        loop = self._loop
        if (loop is None or self._closing or type not in _PRODUCER_TYPES
                or (caller is not loop if caller is not None else
                    threading.get_ident() != self._loop_thread or not loop.is_running())):
            self.emit_many(((type, data),), session_id=session_id)  # says what is wrong
            return
        ts = time.time_ns()
        self._unencoded.append((type, session_id, ts, data, True) if joins and type == "result"
                               else (type, session_id, ts, data))
        if ts >= self._check_at or self._flush_loop is not loop:
            self._batch_step(loop, ts)
        if not self._healthy:
            raise self._failing()

    def _failing(self) -> AuditUnavailable:
        """What a record emitted while the store fails raises."""
        return AuditUnavailable(f"audit store is failing: {self.failure}")

    def _batch_step(self, loop: asyncio.AbstractEventLoop, ts: int) -> None:
        """After a record from the loop's thread: start a batch, or have it sent when due."""
        if self._flush_loop is not loop:  # (a loop that ended may have left one unsent)
            # A new batch: sent by the first loop turn that emits after SEND_DELAY_NS,
            # or by a timer when no record follows.
            self._flush_loop = loop
            self._check_at = ts + SEND_DELAY_NS
            self._flush_timer = loop.call_later(SEND_AT_THE_LATEST, self._flush_buffer)
        elif self._flush_timer is not None:
            self._flush_timer.cancel()
            self._flush_timer = None
            self._check_at = _NEVER  # until this batch is sent
            loop.call_soon(self._flush_buffer)

    async def emit_durable(
        self, type: str, event: Event, *, session_id: str | None = None
    ) -> int:
        """Queue a record and return its seq once its commit is on disk (strict durability)."""
        waiter = _Waiter(asyncio.get_running_loop())
        self._strict(type, event, session_id, waiter)
        assert waiter.future is not None
        return await waiter.future

    def emit_durable_sync(
        self, type: str, event: Event, *, session_id: str | None = None
    ) -> int:
        """emit_durable for callers outside an event loop: blocks until the commit is on disk."""
        waiter = _Waiter()
        self._strict(type, event, session_id, waiter)
        return waiter.wait()

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every record emitted before this call is committed or counted lost."""
        done = threading.Event()
        result = [False]
        with self._lock:
            if self._closing or self._gone:
                return False
            number = self._take_id()
            self._flushes[number] = (done, result)
            self._send_buffer()
            self._send_locked(["f", number])
        done.wait(timeout)
        return result[0]

    def close(self) -> None:
        """Send what is buffered, let the writer commit it and stop. Idempotent."""
        with self._lock:
            if self._closing:
                return
            # Before the close frame: the writer may answer it by closing its end at once,
            # and the reader must take that end as this close, not the writer gone.
            self._closing = True
            self._send_buffer()
            self._send_locked(["c"])
        if self._process is None:
            # A further producer: the writer closes its end once it has taken every frame.
            self._reader.join(timeout=120)
            self._sock.close()
            return
        try:
            self._process.wait(timeout=120)
        except subprocess.TimeoutExpired:
            log.error("the audit writer did not stop in time; killing it")
            self._process.kill()
            self._process.wait()
        self._sock.close()
        self._reader.join(timeout=5)

    def __enter__(self) -> AuditProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --------------------------------------------------------------- inside

    def _encode(self, type: str, event: Event) -> bytes:
        return encode_producer_event(self._tls, type, event)

    def _item(self, type: str, session_id: str | None, ts: int, event: Event,
              joins: bool = False) -> bytes:
        """One record of a batch frame, ``[type, session_id, ts, event]`` packed (with
        ``true`` after it for a result that joins its query, see :meth:`emit_packed`)."""
        try:
            data = self._encode(type, event)
        except InvalidEvent as e:
            log.error("audit record %r of session %s holds values msgpack cannot encode (%s); "
                      "they are recorded as text", type, session_id, e)
            data = self._encode(type, _encodable(event))
        record = (type, session_id, ts, data, True) if joins else (type, session_id, ts, data)
        item: bytes = thread_packer(self._tls).pack(record)
        return item

    def _loop_of_caller(self) -> asyncio.AbstractEventLoop | None:
        """The event loop running in this thread, if any (its records are sent in batches).
        Remembered by thread, since asking asyncio costs a system call each time."""
        loop = self._loop
        if loop is not None and threading.get_ident() == self._loop_thread and loop.is_running():
            return loop
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return None
        self._loop, self._loop_thread = loop, threading.get_ident()
        return loop

    def _strict(
        self, type: str, event: Event, session_id: str | None, waiter: _Waiter
    ) -> None:
        data = self._encode(type, event)
        with self._lock:
            if self._closing:
                raise AuditUnavailable("audit log is closed")
            if self._gone:
                raise AuditUnavailable(f"audit store is failing: {self.failure}")
            number = self._take_id()
            self._waiting[number] = waiter
            self._send_buffer()
            self._send_locked(["d", number, type, session_id, time.time_ns(), data])

    def _take_id(self) -> int:
        self._next_id += 1
        return self._next_id

    def _flush_buffer(self) -> None:
        timer, self._flush_timer = self._flush_timer, None
        if timer is not None:
            timer.cancel()
        with self._lock:
            self._flush_loop = None
            self._send_buffer()

    def _send_buffer(self) -> None:
        """Send the records not yet sent as one frame (the caller holds the lock)."""
        unencoded = self._unencoded
        if unencoded:
            # The loop's thread may append meanwhile (without the lock): take a prefix.
            count = len(unencoded)
            taken = unencoded[:count]
            del unencoded[:count]
            # The frame ["b", [item, ...]]: in one step, or record by record when one
            # holds what msgpack cannot encode (_item says what and records it as text).
            packer = thread_packer(self._tls)
            try:
                body = batch_frame(taken, packer.pack)
            except (TypeError, ValueError, OverflowError):
                packer.reset()
                body = batch_frame_of([self._item(*record) for record in taken])
            self._send_frame(body)

    def _send_locked(self, message: Any) -> None:
        """Send a frame (the caller holds the lock)."""
        self._send_frame(msgpack.packb(message, use_bin_type=True))

    def _send_frame(self, body: bytes | bytearray) -> None:
        """Send an encoded frame (the caller holds the lock)."""
        if self._gone:
            return
        try:
            self._sock.sendall(_LENGTH.pack(len(body)) + body)
        except OSError as e:
            self._writer_gone(f"audit writer process unreachable: {e}")

    def _read(self) -> None:
        # Wait in poll() for something to read: a thread blocked in recv() on a Unix socket
        # is also woken each time the writer drains what the agent sent (the socket has one
        # wait queue for both directions), hundreds of times a second under load.
        readable = select.poll()
        readable.register(self._sock, select.POLLIN)
        try:
            while True:
                readable.poll()
                message = _receive(self._sock)
                if message is None:
                    break
                self._handle(message)
        except (OSError, ValueError) as e:
            log.error("audit writer connection failed: %s", e)
        if not self._closing:
            if self._process is None:
                reason = "the audit writer process ended or closed this producer's connection"
            else:
                time.sleep(0.1)  # let its exit status be known
                reason = f"audit writer process ended (exit status {self._process.poll()})"
            with self._lock:
                self._writer_gone(reason)
            if self.on_gone is not None:
                self.on_gone(reason)

    def _handle(self, message: list[Any]) -> None:
        kind = message[0]
        if kind == "r":
            _, number, seq, error = message
            with self._lock:
                waiter = self._waiting.pop(number, None)
            if waiter is not None:
                waiter.resolve(seq, AuditUnavailable(error) if error else None)
        elif kind == "f":
            with self._lock:
                entry = self._flushes.pop(message[1], None)
            if entry is not None:
                entry[1][0] = bool(message[2])
                entry[0].set()
        elif kind == "h":
            with self._lock:
                if not self._gone:
                    self._healthy, self.failure = bool(message[1]), message[2]

    def _writer_gone(self, reason: str) -> None:
        """No writer any more: the trail is unavailable and every waiter learns so (the caller
        holds the lock)."""
        if self._gone:
            return
        if not self._closing:
            log.error("%s", reason)
        self._gone = True
        self._healthy = False
        self.failure = reason
        waiting, self._waiting = self._waiting, {}
        flushes, self._flushes = self._flushes, {}
        for waiter in waiting.values():
            waiter.resolve(-1, AuditUnavailable(reason))
        for done, _ in flushes.values():
            done.set()


# ------------------------------------------------------------------- writer


def _lock_store(root: Path, timeout: float) -> int:
    """Hold the store's writer lock, waiting for a previous writer to finish; returns the fd."""
    root.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(root / LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    deadline = time.monotonic() + timeout
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return fd
        except BlockingIOError:
            if time.monotonic() >= deadline:
                os.close(fd)
                raise RuntimeError(
                    f"another audit writer holds {root / LOCK_NAME} (a second agent on this "
                    "audit path, or the previous one still committing)"
                ) from None
            time.sleep(0.05)


def serve(sock: socket.socket, producers: Sequence[socket.socket] = ()) -> int:
    """The writer process: open the store, then apply the agent's frames until it goes.

    ``producers``: further producers' sockets (the agent's session workers), each read by a
    thread of its own; the agent's own close waits until each of them has closed, so that
    everything they sent is committed with the rest.
    """
    first = _receive(sock)
    if not first or first[0] != "open":
        return 2
    settings, host, state_dir, lock_timeout = pickle.loads(first[1])
    replies = [_replier(s) for s in (sock, *producers)]

    def on_health(healthy: bool, failure: str | None) -> None:
        for reply in replies:
            reply(["h", healthy, failure])

    try:
        _lock_store(Path(settings.path), lock_timeout)
        audit_log = AuditLog.open(settings, host=host, state_dir=Path(state_dir),
                                  on_health=on_health)
    except Exception as e:
        replies[0](["error", f"audit trail at {settings.path}: {e}"])
        return 1
    replies[0](["ready"])
    threads = [
        threading.Thread(target=_apply_frames, args=(s, audit_log, reply),
                         name=f"producer-{s.fileno()}", daemon=True)
        for s, reply in zip(producers, replies[1:], strict=True)
    ]
    for thread in threads:
        thread.start()
    try:
        _apply_frames(sock, audit_log, replies[0])
        for thread in threads:
            thread.join()
    finally:
        audit_log.close()
    return 0


def _replier(sock: socket.socket) -> Callable[[Any], None]:
    send_lock = threading.Lock()

    def reply(message: Any) -> None:
        with send_lock, contextlib.suppress(OSError):
            _send(sock, message)

    return reply


def _apply_frames(sock: socket.socket, audit_log: AuditLog, reply: Callable[[Any], None]) -> None:
    """One producer's frames into the log, until it closes (then its socket is closed)."""
    frames = _Frames(sock)
    try:
        while True:
            body = frames.next()
            if body is None:
                break
            items = batch_items(body)  # the commonest frame, read in one step
            if items is not None:
                audit_log.queue_items(items)  # counts them lost while failing
                continue
            message = msgpack.unpackb(body, raw=False)
            kind = message[0]
            if kind == "c":
                break
            if kind == "b":
                audit_log.emit_encoded_many(message[1])
            elif kind == "d":
                _, number, type, session_id, ts, data = message

                def answer(seq: int, error: BaseException | None, number: int = number) -> None:
                    reply(["r", number, seq, str(error) if error else None])

                try:
                    audit_log.emit_encoded(type, data, session_id, ts, _Waiter(callback=answer))
                except AuditUnavailable as e:
                    answer(-1, e)
            elif kind == "f":
                reply(["f", message[1], audit_log.flush()])
    except (OSError, ValueError) as e:
        log.error("audit writer: connection to the agent failed: %s", e)
    finally:
        sock.close()


def main() -> int:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    logging.basicConfig(stream=sys.stderr, level=logging.INFO,
                        format="ringfence audit writer: %(levelname)s %(message)s")
    sock, *producers = (socket.socket(fileno=int(fd)) for fd in sys.argv[1:])
    return serve(sock, producers)


if __name__ == "__main__":
    sys.exit(main())
