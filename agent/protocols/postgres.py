"""PostgreSQL frontend/backend protocol v3, sans-IO.

Two parsers, one per direction, each fed the bytes that arrived and returning
events. Neither touches sockets, clocks or files.

* :class:`FrontendParser` reads what a client sends. It frames every message
  (startup packets first, then typed messages) and returns one event per
  message, carrying the message's bytes exactly as they came (``raw``) so the
  caller can forward them untouched.
* :class:`BackendScanner` reads what a server sends. The caller forwards the
  server's chunks as they came; the scanner only walks message headers and
  decodes the few message kinds a record needs (authentication, parameter
  status, key data, command completion, errors, ready-for-query). DataRow
  bodies are skipped, never buffered, so a large result streams in bounded
  memory.

Message layouts follow the PostgreSQL documentation, "Frontend/Backend
Protocol" (chapter 55 of the v15 manual).
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Final

# Startup-phase request codes (the int32 after the length of an untyped packet).
PROTOCOL_V3: Final = 3 << 16
CANCEL_REQUEST_CODE: Final = (1234 << 16) | 5678
SSL_REQUEST_CODE: Final = (1234 << 16) | 5679
GSSENC_REQUEST_CODE: Final = (1234 << 16) | 5680

# The server's own bound on a startup packet (MAX_STARTUP_PACKET_LENGTH).
MAX_STARTUP_PACKET: Final = 10000
DEFAULT_MAX_MESSAGE: Final = 64 * 1024 * 1024
MAX_CANCEL_SECRET: Final = 256  # bytes of a cancel key (protocol 3.2 lets the server choose)

SSL_REFUSED: Final = b"N"
SSL_ACCEPTED: Final = b"S"

_INT32 = struct.Struct("!i")
_HEADER = struct.Struct("!Bi")
_INT16 = struct.Struct("!h")

FRONTEND_TYPES: Final = frozenset(b"BCcDdEFfHPpQSX")


def _datarows(data: bytes | bytearray | memoryview, pos: int) -> tuple[int, int, int]:
    """Where the run of whole DataRow messages at ``pos`` ends, how many there are and their
    bytes (type bytes included). It ends at another type, a DataRow not whole in ``data``, an
    invalid length (below 4: left for the caller's checks) or the end of ``data``."""
    size = len(data)
    unpack_length = _INT32.unpack_from
    rows = row_bytes = 0
    while size - pos >= 5 and data[pos] == 0x44:
        length = unpack_length(data, pos + 1)[0]
        if length < 4 or size - pos - 1 < length:
            break
        rows += 1
        row_bytes += length + 1
        pos += length + 1
    return pos, rows, row_bytes


# Why the compiled steps are not in use, for `ringfence doctor`; None when they are.
NATIVE_SCAN_ERROR: ImportError | None = None
try:  # the same loop compiled (setup.py); this module works alike without it
    if os.environ.get("RINGFENCE_IMPL") == "python":
        raise ImportError("RINGFENCE_IMPL=python")
    from agent.protocols._pgscan import allowed_query as _native_allowed_query
    from agent.protocols._pgscan import bound_execute as _native_bound_execute
    from agent.protocols._pgscan import client_step as _native_client_step
    from agent.protocols._pgscan import datarows as datarows
    from agent.protocols._pgscan import plain_reply as _native_plain_reply
    from agent.protocols._pgscan import server_step as _native_server_step
except ImportError as e:  # a source tree where it was not built, or RINGFENCE_IMPL=python
    NATIVE_SCAN_ERROR = e
    datarows = _datarows
    _native_allowed_query = None  # type: ignore[assignment]
    _native_bound_execute = None  # type: ignore[assignment]
    _native_plain_reply = None  # type: ignore[assignment]
    _native_client_step = None  # type: ignore[assignment]
    _native_server_step = None  # type: ignore[assignment]
# The compiled steps behind agent.pgsession's one-step paths; None without them (it has
# their twins).
native_allowed_query: Final[Callable[..., Any] | None] = _native_allowed_query
native_plain_reply: Final[Callable[..., Any] | None] = _native_plain_reply
# The proxy's one-step paths (agent/proxy.py), compiled around the two above.
native_client_step: Final[Callable[..., int] | None] = _native_client_step
native_server_step: Final[Callable[..., int] | None] = _native_server_step
native_bound_execute: Final[Callable[..., Any] | None] = _native_bound_execute
NATIVE_SCAN: Final = datarows is not _datarows


class ProtocolError(Exception):
    """The byte stream does not follow the protocol."""


class ClientProtocolError(ProtocolError):
    """The client (frontend) sent bytes that break the protocol."""


class ServerProtocolError(ProtocolError):
    """The server (backend) sent bytes that break the protocol."""


# --------------------------------------------------------------------------
# Frontend events


@dataclass(frozen=True, slots=True)
class StartupMessage:
    protocol: int
    parameters: dict[str, str]
    raw: bytes

    @property
    def user(self) -> str | None:
        return self.parameters.get("user")

    @property
    def database(self) -> str | None:
        return self.parameters.get("database", self.parameters.get("user"))


@dataclass(frozen=True, slots=True)
class SSLRequest:
    raw: bytes


@dataclass(frozen=True, slots=True)
class GSSENCRequest:
    raw: bytes


@dataclass(frozen=True, slots=True)
class CancelRequest:
    backend_pid: int
    secret: bytes  # 4 bytes in protocol 3.0; up to 256 from protocol 3.2 (PostgreSQL 18)
    raw: bytes


@dataclass(frozen=True, slots=True)
class Query:
    """A simple-protocol Query ('Q'): one string, possibly several statements."""

    sql: str
    raw: bytes


@dataclass(frozen=True, slots=True)
class Parse:
    statement: str
    sql: str
    parameter_types: tuple[int, ...]
    raw: bytes


@dataclass(frozen=True, slots=True)
class Bind:
    portal: str
    statement: str
    parameter_formats: tuple[int, ...]
    parameters: tuple[bytes | None, ...]
    result_formats: tuple[int, ...]
    raw: bytes
    # Set for a Bind over max_message, passed on in pieces (MessagePiece) as it came: each
    # parameter's real length (-1 for NULL), its value in ``parameters`` possibly cut
    # short, and ``raw`` empty.
    parameter_lengths: tuple[int, ...] | None = None


@dataclass(frozen=True, slots=True)
class MessagePiece:
    """Part of a Bind or FunctionCall over max_message, to pass on as it is (a large Bind's
    event follows its last piece; a large FunctionCall's event carries its first)."""

    raw: bytes


@dataclass(frozen=True, slots=True)
class Execute:
    portal: str
    max_rows: int
    raw: bytes


@dataclass(frozen=True, slots=True)
class Describe:
    kind: str  # "S" statement or "P" portal
    name: str
    raw: bytes


@dataclass(frozen=True, slots=True)
class Close:
    kind: str
    name: str
    raw: bytes


@dataclass(frozen=True, slots=True)
class Sync:
    raw: bytes


@dataclass(frozen=True, slots=True)
class Flush:
    raw: bytes


@dataclass(frozen=True, slots=True)
class Terminate:
    raw: bytes


@dataclass(frozen=True, slots=True)
class PasswordMessage:
    """'p': password, SASL initial response or SASL response (opaque here)."""

    raw: bytes


@dataclass(frozen=True, slots=True)
class CopyData:
    """CopyData from the client, or a piece of one: a large message is passed on as it
    arrives rather than held whole, so ``raw`` may be its first bytes (with the header) or
    a later part, and ``size`` counts the data bytes in ``raw``."""

    size: int
    raw: bytes


@dataclass(frozen=True, slots=True)
class CopyDone:
    raw: bytes


@dataclass(frozen=True, slots=True)
class CopyFail:
    message: str
    raw: bytes


@dataclass(frozen=True, slots=True)
class FunctionCall:
    function_oid: int
    raw: bytes


FrontendEvent = (
    StartupMessage | SSLRequest | GSSENCRequest | CancelRequest | Query | Parse | Bind
    | MessagePiece | Execute | Describe | Close | Sync | Flush | Terminate | PasswordMessage
    | CopyData | CopyDone | CopyFail | FunctionCall
)


def _cstring(body: bytes, pos: int, side: type[ProtocolError]) -> tuple[str, int]:
    end = body.find(b"\x00", pos)
    if end < 0:
        raise side("string field is not NUL-terminated")
    return body[pos:end].decode("utf-8", "replace"), end + 1


class _Reader:
    """Cursor over one message body; every read is bounds-checked."""

    __slots__ = ("body", "pos", "side")

    def __init__(self, body: bytes, side: type[ProtocolError]) -> None:
        self.body = body
        self.pos = 0
        self.side = side

    def cstring(self) -> str:
        value, self.pos = _cstring(self.body, self.pos, self.side)
        return value

    def int16(self) -> int:
        if self.pos + 2 > len(self.body):
            raise self.side("message ends inside an int16 field")
        (value,) = struct.unpack_from("!h", self.body, self.pos)
        self.pos += 2
        return int(value)

    def int32(self) -> int:
        if self.pos + 4 > len(self.body):
            raise self.side("message ends inside an int32 field")
        (value,) = _INT32.unpack_from(self.body, self.pos)
        self.pos += 4
        return int(value)

    def take(self, n: int) -> bytes:
        if n < 0 or self.pos + n > len(self.body):
            raise self.side("field length runs past the end of the message")
        value = self.body[self.pos : self.pos + n]
        self.pos += n
        return value

    def int16_array(self) -> tuple[int, ...]:
        count = self.int16()
        if count < 0:
            raise self.side("negative array length")
        return tuple(self.int16() for _ in range(count))


def _parse_startup(packet: bytes) -> StartupMessage | SSLRequest | GSSENCRequest | CancelRequest:
    length = len(packet)
    code = _INT32.unpack_from(packet, 4)[0]
    if code == SSL_REQUEST_CODE and length == 8:
        return SSLRequest(packet)
    if code == GSSENC_REQUEST_CODE and length == 8:
        return GSSENCRequest(packet)
    if code == CANCEL_REQUEST_CODE and 16 <= length <= 12 + MAX_CANCEL_SECRET:
        return CancelRequest(_INT32.unpack_from(packet, 8)[0], packet[12:], packet)
    if code >> 16 != 3:
        raise ClientProtocolError(
            f"unsupported startup request code {code} (protocol {code >> 16}.{code & 0xFFFF})"
        )
    body = packet[8:]
    if not body.endswith(b"\x00"):
        raise ClientProtocolError("startup packet does not end with a NUL byte")
    parts = body[:-1].split(b"\x00")
    if parts and parts[-1] == b"":
        parts.pop()
    if len(parts) % 2:
        raise ClientProtocolError("startup packet has a parameter name without a value")
    params: dict[str, str] = {}
    for i in range(0, len(parts), 2):
        params[parts[i].decode("utf-8", "replace")] = parts[i + 1].decode("utf-8", "replace")
    if "user" not in params:
        raise ClientProtocolError("startup packet has no user name")
    return StartupMessage(code, params, packet)


def _decode_frontend(kind: int, raw: bytes) -> FrontendEvent:
    if kind == 0x51:  # Q, the commonest: its string is read in place
        end = raw.find(b"\x00", 5)
        if end < 0:
            raise ClientProtocolError("string field is not NUL-terminated")
        return Query(raw[5:end].decode("utf-8", "replace"), raw)
    body = raw[5:]
    r = _Reader(body, ClientProtocolError)
    if kind == 0x50:  # P
        name = r.cstring()
        sql = r.cstring()
        count = r.int16()
        types = tuple(r.int32() & 0xFFFFFFFF for _ in range(max(count, 0)))
        return Parse(name, sql, types, raw)
    if kind == 0x42:  # B
        portal = r.cstring()
        statement = r.cstring()
        formats = r.int16_array()
        count = r.int16()
        values: list[bytes | None] = []
        for _ in range(max(count, 0)):
            size = r.int32()
            values.append(None if size == -1 else r.take(size))
        return Bind(portal, statement, formats, tuple(values), r.int16_array(), raw)
    if kind == 0x45:  # E
        return Execute(r.cstring(), r.int32(), raw)
    if kind == 0x44:  # D
        which = r.take(1).decode("ascii", "replace")
        return Describe(which, r.cstring(), raw)
    if kind == 0x43:  # C
        which = r.take(1).decode("ascii", "replace")
        return Close(which, r.cstring(), raw)
    if kind == 0x53:  # S
        return Sync(raw)
    if kind == 0x48:  # H
        return Flush(raw)
    if kind == 0x58:  # X
        return Terminate(raw)
    if kind == 0x70:  # p
        return PasswordMessage(raw)
    if kind == 0x64:  # d
        return CopyData(len(body), raw)
    if kind == 0x63:  # c
        return CopyDone(raw)
    if kind == 0x66:  # f
        return CopyFail(r.cstring(), raw)
    if kind == 0x46:  # F
        return FunctionCall(r.int32(), raw)
    raise ClientProtocolError(f"unknown frontend message type {bytes([kind])!r}")


class _BindStream:
    """A Bind over max_message, read as it passes: the server gets it piece by piece, and
    what is kept is its body with each parameter value cut to ``keep`` bytes (its length
    field rewritten to match), all of it at most ``limit`` bytes, plus each value's real
    length. Its fields are then decoded as any Bind's, from what was kept."""

    # Steps through the body: names, format codes, parameters, then the rest.
    _PORTAL, _STATEMENT, _FORMATS_COUNT, _FORMATS, _PARAMS_COUNT, _LENGTH, _VALUE, _REST = range(8)

    def __init__(self, length: int, keep: int, limit: int) -> None:
        self.length = length
        self.remaining = length - 4  # body bytes still to come
        self.keep = keep
        self.limit = limit
        self.kept = bytearray()
        self.lengths: list[int] = []
        self._step = self._PORTAL
        self._field = 0  # where the field being read starts in ``kept``
        self._need = 0  # bytes that field needs (fixed-size steps)
        self._params = 0  # parameters still to read
        self._value_left = 0  # bytes of the current value still to come
        self._value_room = 0  # of which still kept

    def feed(self, data: bytes) -> None:
        """The next ``data`` of the body (no more than ``remaining``)."""
        self.remaining -= len(data)
        pos, size = 0, len(data)
        kept = self.kept
        while pos < size:
            step = self._step
            if step == self._VALUE:
                take = min(self._value_left, size - pos)
                keep = min(take, self._value_room)
                if keep:
                    kept += data[pos : pos + keep]
                    self._value_room -= keep
                self._value_left -= take
                pos += take
                if not self._value_left:
                    self._next_parameter()
                continue
            if step in (self._PORTAL, self._STATEMENT):
                nul = data.find(b"\x00", pos)
                end = size if nul < 0 else nul + 1
            elif step == self._REST:
                end = size
            else:
                end = min(size, pos + self._need - (len(kept) - self._field))
            if len(kept) + end - pos > self.limit:
                raise ClientProtocolError(
                    f"Bind fields beyond the limit of {self.limit} bytes (the agent's max_message_bytes)")
            kept += data[pos:end]
            pos = end
            if step in (self._PORTAL, self._STATEMENT):
                if nul >= 0:
                    self._step += 1
                    self._start_fixed(2)
            elif step != self._REST and len(kept) - self._field == self._need:
                self._fixed_done()

    def _start_fixed(self, need: int) -> None:
        self._field = len(self.kept)
        self._need = need
        if need == 0:
            self._fixed_done()

    def _fixed_done(self) -> None:
        kept, at, step = self.kept, self._field, self._step
        if step == self._FORMATS_COUNT:
            count = _INT16.unpack_from(kept, at)[0]
            if count < 0:
                raise ClientProtocolError("negative array length")
            self._step = self._FORMATS
            self._start_fixed(2 * count)
        elif step == self._FORMATS:
            self._step = self._PARAMS_COUNT
            self._start_fixed(2)
        elif step == self._PARAMS_COUNT:
            self._params = max(_INT16.unpack_from(kept, at)[0], 0)
            self._step = self._LENGTH
            self._next_parameter(first=True)
        elif step == self._LENGTH:
            length = _INT32.unpack_from(kept, at)[0]
            self.lengths.append(length)
            if length < -1:
                raise ClientProtocolError("field length runs past the end of the message")
            if length <= 0:
                self._next_parameter()
                return
            room = max(min(self.keep, self.limit - len(kept)), 0)
            _INT32.pack_into(kept, at, min(length, room))
            self._step = self._VALUE
            self._value_left = length
            self._value_room = room

    def _next_parameter(self, first: bool = False) -> None:
        if not first:
            self._params -= 1
        if self._params > 0:
            self._step = self._LENGTH
            self._start_fixed(4)
        else:
            self._step = self._REST

    def finish(self) -> Bind:
        """The Bind, once its last byte went by; raises when it ended inside a field."""
        if self._step != self._REST:
            raise ClientProtocolError("message ends inside a Bind field")
        decoded = _decode_frontend(0x42, b"B" + _INT32.pack(len(self.kept) + 4) + bytes(self.kept))
        assert isinstance(decoded, Bind)
        return Bind(decoded.portal, decoded.statement, decoded.parameter_formats,
                    decoded.parameters, decoded.result_formats, b"", tuple(self.lengths))


class FrontendParser:
    """Frames and decodes what a client sends.

    ``feed(data)`` returns the complete messages found so far; a partial
    message stays buffered, except CopyData, whose pieces are returned as they
    arrive (COPY FROM STDIN streams; nothing in its data is read), and a Bind
    over ``max_message``, whose pieces are returned as MessagePiece events and
    then a Bind event with its fields and the first ``keep`` bytes of each
    parameter value (PostgreSQL takes Binds up to 1 GB: large bytea uploads),
    and a FunctionCall over it (lo_write of a large buffer), returned as its
    event with the first piece, then MessagePiece events.
    Bounds: a startup packet may not exceed the server's own limit (10000
    bytes), any other message may not exceed ``max_message``; a declared
    length beyond either fails at once, before any body arrives.
    """

    # The fields the compiled one-step paths (agent/protocols/_pgscan.c) read and move on,
    # as slots; the rest of its state is in its __dict__.
    __slots__ = (
        "_buffer", "_startup", "_copy_remaining", "_bind", "_pass_remaining", "max_message",
        "__dict__", "__weakref__",
    )

    def __init__(self, max_message: int = DEFAULT_MAX_MESSAGE, keep: int = 64 * 1024) -> None:
        self.max_message = max_message
        self.keep = keep
        self._buffer = bytearray()
        self._startup = True
        self._copy_remaining = 0  # bytes of a CopyData still to come, passed on as they do
        self._bind: _BindStream | None = None  # a Bind over max_message, passing
        self._pass_remaining = 0  # bytes of a large FunctionCall still to come
        self._pass_length = 0  # and all of its bytes

    @property
    def buffered(self) -> int:
        """Bytes of an incomplete message held, or of a large Bind or FunctionCall passed on
        so far."""
        if self._bind is not None:
            return self._bind.length + 1 - self._bind.remaining
        if self._pass_remaining:
            return self._pass_length - self._pass_remaining
        return len(self._buffer)

    @property
    def between_messages(self) -> bool:
        """Whether the next byte starts a typed message: nothing held, no message being passed
        on in pieces, the startup packet behind."""
        return not (self._buffer or self._startup or self._copy_remaining or self._bind is not None
                    or self._pass_remaining)

    def startup_done(self) -> None:
        """Switch to typed messages (after a StartupMessage was accepted)."""
        self._startup = False

    def feed(self, data: bytes) -> list[FrontendEvent]:
        events: list[FrontendEvent] = []
        if self._copy_remaining:
            taken = min(self._copy_remaining, len(data))
            self._copy_remaining -= taken
            events.append(CopyData(taken, data[:taken]))
            data = data[taken:]
            if not data:
                return events
        if self._bind is not None:
            taken = min(self._bind.remaining, len(data))
            self._pass_bind(data[:taken], events)
            data = data[taken:]
            if not data:
                return events
        if self._pass_remaining:
            taken = min(self._pass_remaining, len(data))
            self._pass_remaining -= taken
            events.append(MessagePiece(data[:taken]))
            data = data[taken:]
            if not data:
                return events
        buf = self._buffer
        if not buf and not self._startup and len(data) >= 5 and not events:
            # The common case, one whole message and nothing held: no buffering.
            kind = data[0]
            length = _INT32.unpack_from(data, 1)[0]
            if len(data) == length + 1 and kind in FRONTEND_TYPES and 4 <= length <= self.max_message:
                return [_decode_frontend(kind, data)]
        buf += data
        pos = 0
        size = len(buf)
        while True:
            if self._startup:
                if size - pos < 4:
                    break
                length = _INT32.unpack_from(buf, pos)[0]
                if length < 8 or length > MAX_STARTUP_PACKET:
                    raise ClientProtocolError(f"invalid startup packet length {length}")
                if size - pos < length:
                    break
                event = _parse_startup(bytes(buf[pos : pos + length]))
                pos += length
                events.append(event)
                if isinstance(event, StartupMessage):
                    self._startup = False
                elif isinstance(event, CancelRequest) and size > pos:
                    # A cancel request is the only thing on its connection.
                    raise ClientProtocolError("data after a cancel request")
                continue
            if size - pos < 5:
                break
            kind = buf[pos]
            length = _INT32.unpack_from(buf, pos + 1)[0]
            if kind not in FRONTEND_TYPES:
                raise ClientProtocolError(f"unknown frontend message type {bytes([kind])!r}")
            if length < 4:
                raise ClientProtocolError(f"invalid message length {length}")
            end = pos + 1 + length
            if kind == 0x64 and size < end:  # CopyData: what there is goes on now
                events.append(CopyData(size - pos - 5, bytes(buf[pos:size])))
                self._copy_remaining = end - size
                pos = size
                break
            if length > self.max_message and kind == 0x46:  # F: lo_write of a large buffer
                if size - pos < 9:
                    break  # its function's OID first
                # Only the function is read; the call goes on as it comes.
                take = min(end, size)
                events.append(FunctionCall(_INT32.unpack_from(buf, pos + 5)[0], bytes(buf[pos:take])))
                self._pass_remaining = end - take
                self._pass_length = length + 1
                pos = take
                if self._pass_remaining:
                    break
                continue
            if length > self.max_message:
                if kind != 0x42:  # B
                    raise ClientProtocolError(
                        f"message of {length} bytes exceeds the limit of {self.max_message} "
                        "(the agent's max_message_bytes)"
                    )
                # A Bind this large is passed on as it comes, its values read in part.
                self._bind = _BindStream(length, self.keep, self.max_message)
                events.append(MessagePiece(bytes(buf[pos : pos + 5])))
                body_end = min(end, size)
                self._pass_bind(bytes(buf[pos + 5 : body_end]), events)
                pos = body_end
                if self._bind is not None:
                    break
                continue
            if size < end:
                break
            events.append(_decode_frontend(kind, bytes(buf[pos:end])))
            pos = end
        if pos:
            del buf[:pos]
        return events

    def _pass_bind(self, data: bytes, events: list[FrontendEvent]) -> None:
        """``data`` of the large Bind: read, and passed on; at its end, the Bind itself."""
        stream = self._bind
        assert stream is not None
        if data:
            stream.feed(data)
            events.append(MessagePiece(data))
        if stream.remaining == 0:
            self._bind = None
            events.append(stream.finish())


# --------------------------------------------------------------------------
# Backend events


@dataclass(frozen=True, slots=True)
class AuthenticationRequest:
    code: int  # 0 ok, 3 cleartext, 5 md5, 10 SASL, 11 SASL continue, 12 SASL final
    body: bytes


@dataclass(frozen=True, slots=True)
class ParameterStatus:
    name: str
    value: str


@dataclass(frozen=True, slots=True)
class BackendKeyData:
    backend_pid: int
    secret: bytes  # the cancel key: 4 bytes in protocol 3.0, up to 256 from 3.2


@dataclass(frozen=True, slots=True)
class ReadyForQuery:
    status: str  # "I" idle, "T" in transaction, "E" failed transaction


@dataclass(frozen=True, slots=True)
class RowDescription:
    columns: int


@dataclass(frozen=True, slots=True)
class DataRows:
    """``count`` DataRow messages in a row (bodies not decoded)."""

    count: int
    size: int


@dataclass(frozen=True, slots=True)
class CopyOutData:
    """``count`` CopyData messages from the server (COPY TO STDOUT), ``size`` bytes of data."""

    count: int
    size: int


@dataclass(frozen=True, slots=True)
class CommandComplete:
    tag: str
    # Row count carried by the tag (SELECT n, INSERT oid n, UPDATE n, …), read once.
    rows: int | None = field(init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        last = self.tag.rsplit(" ", 1)[-1]
        object.__setattr__(self, "rows", int(last) if last.isdigit() and " " in self.tag else None)


@dataclass(frozen=True, slots=True)
class EmptyQueryResponse:
    pass


@dataclass(frozen=True, slots=True)
class ErrorResponse:
    fields: dict[str, str]

    @property
    def sqlstate(self) -> str:
        return self.fields.get("C", "")

    @property
    def message(self) -> str:
        return self.fields.get("M", "")

    @property
    def severity(self) -> str:
        return self.fields.get("V", self.fields.get("S", ""))


@dataclass(frozen=True, slots=True)
class NoticeResponse:
    fields: dict[str, str]


@dataclass(frozen=True, slots=True)
class ParseComplete:
    pass


@dataclass(frozen=True, slots=True)
class BindComplete:
    pass


@dataclass(frozen=True, slots=True)
class PortalSuspended:
    pass


@dataclass(frozen=True, slots=True)
class NoData:
    pass


@dataclass(frozen=True, slots=True)
class CopyResponse:
    direction: str  # "in", "out" or "both"


@dataclass(frozen=True, slots=True)
class NotificationResponse:
    backend_pid: int
    channel: str


@dataclass(frozen=True, slots=True)
class NegotiateProtocolVersion:
    minor: int


@dataclass(frozen=True, slots=True)
class ParameterDescription:
    """The parameter types of a statement, answering a client's Describe of it."""

    type_oids: tuple[int, ...]


BackendEvent = (
    AuthenticationRequest | ParameterStatus | BackendKeyData | ReadyForQuery | RowDescription
    | DataRows | CopyOutData | CommandComplete | EmptyQueryResponse | ErrorResponse | NoticeResponse
    | ParseComplete | BindComplete | PortalSuspended | NoData | CopyResponse
    | NotificationResponse | NegotiateProtocolVersion | ParameterDescription
)

# Backend message types whose body a record needs; everything else is skipped.
_DECODED = frozenset(b"RSKZCEINATt")
# Events are immutable, so the commonest are made once and shared: ReadyForQuery for
# each transaction status, and (up to MAX_SHARED_EVENTS each) CommandComplete by body
# and RowDescription by column count.
READY_EVENTS: Final = {status: ReadyForQuery(status.decode()) for status in (b"I", b"T", b"E")}
MAX_SHARED_EVENTS = 512
_COMPLETIONS: dict[bytes, CommandComplete] = {}
_DESCRIPTIONS: dict[int, RowDescription] = {}
# Types that only need a marker event (no body).
_MARKERS: dict[int, BackendEvent] = {
    ord("1"): ParseComplete(),
    ord("2"): BindComplete(),
    ord("s"): PortalSuspended(),
    ord("n"): NoData(),
    ord("I"): EmptyQueryResponse(),
}
_COPY = {ord("G"): "in", ord("H"): "out", ord("W"): "both"}
BACKEND_TYPES: Final = frozenset(b"RSKZTDCEIN123nstGHWdcAvV")


def _fields(body: bytes) -> dict[str, str]:
    fields: dict[str, str] = {}
    pos = 0
    while pos < len(body) and body[pos] != 0:
        code = chr(body[pos])
        value, pos = _cstring(body, pos + 1, ServerProtocolError)
        fields[code] = value
    return fields


def command_complete(body: bytes) -> CommandComplete:
    """A CommandComplete from its body (shared for the commonest bodies)."""
    complete = _COMPLETIONS.get(body)
    if complete is None:
        end = body.find(b"\x00")
        if end < 0:
            raise ServerProtocolError("string field is not NUL-terminated")
        complete = CommandComplete(body[:end].decode("utf-8", "replace"))
        if len(_COMPLETIONS) < MAX_SHARED_EVENTS:
            _COMPLETIONS[body] = complete
    return complete


def _decode_backend(kind: int, body: bytes) -> BackendEvent:
    # The messages that end every statement first, without a reader.
    if kind == 0x5A:  # Z
        ready = READY_EVENTS.get(body)
        if ready is not None:
            return ready
    elif kind == 0x43:  # C
        return command_complete(body)
    elif kind == 0x54 and len(body) >= 2:  # T
        columns = _INT16.unpack_from(body)[0]
        description = _DESCRIPTIONS.get(columns)
        if description is None:
            description = RowDescription(columns)
            if len(_DESCRIPTIONS) < MAX_SHARED_EVENTS:
                _DESCRIPTIONS[columns] = description
        return description
    r = _Reader(body, ServerProtocolError)
    if kind == 0x44:
        raise AssertionError("DataRow bodies are never decoded")
    if kind == 0x52:  # R
        return AuthenticationRequest(r.int32(), body[4:])
    if kind == 0x53:  # S
        name = r.cstring()
        return ParameterStatus(name, r.cstring())
    if kind == 0x4B:  # K
        return BackendKeyData(r.int32(), body[4:])
    if kind == 0x5A:  # Z
        return ReadyForQuery(r.take(1).decode("ascii", "replace"))
    if kind == 0x43:  # C
        return CommandComplete(r.cstring())
    if kind == 0x45:  # E
        return ErrorResponse(_fields(body))
    if kind == 0x4E:  # N
        return NoticeResponse(_fields(body))
    if kind == 0x41:  # A
        pid = r.int32()
        return NotificationResponse(pid, r.cstring())
    if kind == 0x54:  # T
        return RowDescription(r.int16())
    if kind == 0x76:  # v
        return NegotiateProtocolVersion(r.int32())
    if kind == 0x74:  # t
        count = r.int16()
        if count < 0 or len(body) != 2 + 4 * count:
            raise ServerProtocolError("ParameterDescription length does not match its count")
        return ParameterDescription(struct.unpack_from(f"!{count}I", body, 2))
    raise ServerProtocolError(f"unexpected backend message type {bytes([kind])!r}")


class BackendScanner:
    """Walks the server's byte stream message by message without copying it.

    ``feed(chunk)`` returns events for the messages that ended in this chunk
    and that a record needs; runs of DataRow messages become one
    :class:`DataRows` event. Bodies of decoded kinds are bounded by
    ``max_message``; bodies of skipped kinds (DataRow, CopyData, …) are never
    held, whatever their size.
    """

    # The fields the compiled one-step paths (agent/protocols/_pgscan.c) read and move on,
    # as slots; the rest of its state is in its __dict__.
    __slots__ = (
        "_remaining", "_header", "_rows", "_copy_messages", "max_message", "__dict__",
        "__weakref__",
    )

    def __init__(self, max_message: int = DEFAULT_MAX_MESSAGE) -> None:
        self.max_message = max_message
        # After each feed: for every returned event, the offset in that chunk
        # just past the last byte of its message, so a caller can cut the
        # chunk at message boundaries.
        self.ends: list[int] = []
        self._header = bytearray()  # a message header split across chunks
        self._kind = -1  # type of the message whose body is in progress
        self._remaining = 0  # body bytes of that message still to come
        self._body: bytearray | None = None  # collected body of a decoded kind
        self._rows = 0
        self._row_bytes = 0
        self._copy_messages = 0
        self._copy_bytes = 0

    @property
    def at_boundary(self) -> bool:
        """Whether the next byte fed starts a message (nothing partial or uncounted is held)."""
        return not (self._remaining or self._header or self._rows or self._copy_messages)

    def rows_before(self, count: int, size: int) -> None:
        """``count`` DataRows of ``size`` bytes, read by the caller, came just before the next
        byte fed: they join the run the next messages may continue."""
        self._rows += count
        self._row_bytes += size

    def feed(self, chunk: bytes) -> list[BackendEvent]:
        events: list[BackendEvent] = []
        ends: list[int] = []
        self.ends = ends
        pos = 0
        size = len(chunk)
        unpack_header = _HEADER.unpack_from
        while pos < size:
            if self._remaining:
                take = min(self._remaining, size - pos)
                if self._body is not None:
                    self._body += chunk[pos : pos + take]
                pos += take
                self._remaining -= take
                if not self._remaining:
                    self._finish(events, ends, pos)
                continue
            if self._header or size - pos < 5:
                need = 5 - len(self._header)
                self._header += chunk[pos : pos + need]
                pos += min(need, size - pos)
                if len(self._header) < 5:
                    break
                kind, length = unpack_header(self._header)
                self._header.clear()
            else:
                kind, length = unpack_header(chunk, pos)
                pos += 5
            if kind == 0x64 and length >= 4:  # CopyData (COPY TO STDOUT): counted, not held
                self._copy_messages += 1
                self._copy_bytes += length - 4
            if kind == 0x44:  # DataRow: the hot path
                if length < 4:
                    raise ServerProtocolError(f"invalid message length {length}")
                body_len = length - 4
                if size - pos >= body_len:
                    # This row and the whole rows right after it, counted in one tight loop
                    # (a row not whole here, or invalid, is left for the general path).
                    pos, rows, row_bytes = datarows(chunk, pos + body_len)
                    self._rows += rows + 1
                    self._row_bytes += row_bytes + length + 1
                    continue
                self._rows += 1
                self._row_bytes += length + 1
                self._kind = kind
                self._remaining = body_len - (size - pos)
                pos = size
                continue
            body_len = length - 4
            if 0 <= body_len <= size - pos and kind in _DECODED and length <= self.max_message:
                # The whole message is in this chunk: decode it in place.
                if self._rows or self._copy_messages:
                    self._flush_counts(kind, events, ends, pos - 5)
                end = pos + body_len
                event = _MARKERS.get(kind)
                events.append(event if event is not None else _decode_backend(kind, chunk[pos:end]))
                ends.append(end)
                pos = end
                continue
            self._start(kind, length, events, ends, pos - 5)
            if self._remaining == 0:
                self._finish(events, ends, pos)
        if self._rows and not self._remaining:
            self._flush_rows(events, ends, pos)
        if self._copy_messages and not self._remaining:
            events.append(CopyOutData(self._copy_messages, self._copy_bytes))
            ends.append(pos)
            self._copy_messages = self._copy_bytes = 0
        return events

    def _flush_rows(self, events: list[BackendEvent], ends: list[int], end: int) -> None:
        events.append(DataRows(self._rows, self._row_bytes))
        ends.append(max(end, 0))
        self._rows = 0
        self._row_bytes = 0

    def _flush_counts(
        self, kind: int, events: list[BackendEvent], ends: list[int], start: int
    ) -> None:
        """A message of ``kind`` starts at ``start``: the DataRow/CopyData runs before it end."""
        if self._rows:
            self._flush_rows(events, ends, start)
        if self._copy_messages and kind != 0x64:
            events.append(CopyOutData(self._copy_messages, self._copy_bytes))
            ends.append(max(start, 0))
            self._copy_messages = self._copy_bytes = 0

    def _start(
        self, kind: int, length: int, events: list[BackendEvent], ends: list[int], start: int
    ) -> None:
        if kind not in BACKEND_TYPES:
            raise ServerProtocolError(f"unknown backend message type {bytes([kind])!r}")
        if length < 4:
            raise ServerProtocolError(f"invalid message length {length}")
        self._flush_counts(kind, events, ends, start)
        self._kind = kind
        self._remaining = length - 4
        if kind in _DECODED:
            if length > self.max_message:
                raise ServerProtocolError(
                    f"message of {length} bytes exceeds the limit of {self.max_message}"
                )
            self._body = bytearray()
        else:
            self._body = None

    def _finish(self, events: list[BackendEvent], ends: list[int], end: int) -> None:
        kind = self._kind
        body = self._body
        self._kind = -1
        self._body = None
        if kind == 0x44:
            return
        event: BackendEvent | None = _MARKERS.get(kind)
        if event is None:
            copy = _COPY.get(kind)
            if copy is not None:
                event = CopyResponse(copy)
            elif body is not None:
                event = _decode_backend(kind, bytes(body))
        if event is not None:
            events.append(event)
            ends.append(end)


# --------------------------------------------------------------------------
# Writers: protocol-native replies built by the agent itself


def _message(kind: bytes, body: bytes) -> bytes:
    return kind + _INT32.pack(len(body) + 4) + body


def error_response(
    severity: str,
    sqlstate: str | None,
    message: str,
    *,
    detail: str | None = None,
    hint: str | None = None,
) -> bytes:
    """An ErrorResponse ('E') as a server would send it; without a SQLSTATE when
    ``sqlstate`` is None (libpq then takes the server for not answering at all)."""
    parts = [b"S", severity.encode(), b"\x00", b"V", severity.encode(), b"\x00"]
    if sqlstate is not None:
        parts += [b"C", sqlstate.encode("ascii"), b"\x00"]
    parts += [b"M", message.encode(), b"\x00"]
    if detail:
        parts += [b"D", detail.encode(), b"\x00"]
    if hint:
        parts += [b"H", hint.encode(), b"\x00"]
    parts.append(b"\x00")
    return _message(b"E", b"".join(parts))


def ready_for_query(status: str) -> bytes:
    """A ReadyForQuery ('Z') with transaction status I, T or E."""
    return _message(b"Z", status.encode("ascii"))


def startup_message(parameters: dict[str, str], protocol: int = PROTOCOL_V3) -> bytes:
    """A StartupMessage packet (used by tests and by the agent's own logins)."""
    body = _INT32.pack(protocol)
    for name, value in parameters.items():
        body += name.encode() + b"\x00" + value.encode() + b"\x00"
    body += b"\x00"
    return _INT32.pack(len(body) + 4) + body


def ssl_request() -> bytes:
    """An SSLRequest packet (the agent's own, to a server)."""
    return struct.pack("!ii", 8, SSL_REQUEST_CODE)


def query_message(sql: str) -> bytes:
    """A simple-protocol Query ('Q')."""
    return _message(b"Q", sql.encode() + b"\x00")


def frontend_message(kind: bytes, body: bytes) -> bytes:
    """Any typed frontend message."""
    return _message(kind, body)
