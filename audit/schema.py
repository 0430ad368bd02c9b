"""Audit record schema: event types, typed event fields and the stored envelope.

Every record is stored as one msgpack array, the *envelope*::

    [version, seq, ts_ns, prev, type, host, session_id, index, event]

``ts_ns`` is UTC time in integer nanoseconds since the Unix epoch (when the
event was emitted); ``prev`` is the RFC 6962 leaf hash of record ``seq - 1``
(32 zero bytes for seq 0); ``index`` is the record's position within its
session (0 for ``session.start``), ``None`` when ``session_id`` is ``None``.
The stored bytes are kept byte for byte and hashed as stored, never
re-encoded. See ``SCHEMA.md`` for the meaning of every field.
"""

from __future__ import annotations

import datetime as _dt
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal, NotRequired, TypedDict

import msgpack

from audit.errors import InvalidEvent, RecordDecodeError, UnknownEventType

ENVELOPE_VERSION = 1
ZERO_HASH = bytes(32)

AGENT_START = "agent.start"
AGENT_STOP = "agent.stop"
SESSION_START = "session.start"
QUERY = "query"
RESULT = "result"
POLICY_DECISION = "policy.decision"
APPROVAL_REQUEST = "approval.request"
APPROVAL_DECISION = "approval.decision"
SESSION_END = "session.end"
AUDIT_LOSS = "audit.loss"
CHECKPOINT = "checkpoint"
IDENTITY_FINDING = "identity.finding"
IDENTITY_LOGIN = "identity.login"
IDENTITY_LOGIN_REFUSED = "identity.login_refused"
IDENTITY_LOGOUT = "identity.logout"

EVENT_TYPES: frozenset[str] = frozenset(
    {
        AGENT_START,
        AGENT_STOP,
        SESSION_START,
        QUERY,
        RESULT,
        POLICY_DECISION,
        APPROVAL_REQUEST,
        APPROVAL_DECISION,
        SESSION_END,
        AUDIT_LOSS,
        CHECKPOINT,
        IDENTITY_FINDING,
        IDENTITY_LOGIN,
        IDENTITY_LOGIN_REFUSED,
        IDENTITY_LOGOUT,
    }
)

# Event types only the store itself writes.
STORE_EVENT_TYPES: frozenset[str] = frozenset({AUDIT_LOSS, CHECKPOINT})


class Endpoint(TypedDict):
    ip: str
    port: int


class ServiceInfo(TypedDict):
    name: str
    protocol: str
    port: int
    listen_port: int


class AgentStart(TypedDict):
    version: str
    config_path: str | None
    services: list[ServiceInfo]
    attribution_mode: str
    attribution_reason: NotRequired[str]


class AgentStop(TypedDict):
    reason: str


class Ancestor(TypedDict):
    pid: int
    comm: str
    exe: str | None
    uid: int


class ProcessInfo(TypedDict):
    pid: int
    tid: int | None
    uid: int
    gid: int
    loginuid: int | None
    audit_session: int | None
    comm: str
    exe: str | None
    cmdline: list[str]
    tty: str | None
    cgroup: str | None
    unit: str | None
    container_id: str | None
    ancestry: list[Ancestor]


class Attribution(TypedDict):
    source: Literal["bpf", "procfs", "remote", "unknown"]
    verified: bool
    reason: NotRequired[str]


class Target(TypedDict):
    database: str | None
    user: str | None
    application_name: str | None


class SessionStart(TypedDict):
    service: str
    protocol: str
    source: Endpoint
    destination: Endpoint
    listener: Endpoint
    # The agent process carrying the session: the agent's own or a session worker's.
    agent_pid: NotRequired[int]
    process: ProcessInfo | None
    attribution: Attribution
    target: Target | None


class ErrorInfo(TypedDict):
    sqlstate: str
    message: str


class Result(TypedDict):
    duration_ms: float
    rows: int
    command_tag: str | None
    commands: list[str]
    outcome: Literal["success", "failure", "blocked"]
    copy_bytes: NotRequired[int]
    error: NotRequired[ErrorInfo]


class Verdict(TypedDict):
    effect: str
    rule_id: str | None
    version: str | None
    classes: list[str]


class Query(TypedDict):
    text: NotRequired[str]
    length: int
    sha256: str
    truncated: NotRequired[bool]
    protocol: Literal["simple", "extended", "function"]
    parameters: NotRequired[list[Any]]
    policy: NotRequired[Verdict]
    # The statement's result, when it came before this record left the agent (then no
    # ``result`` record follows); see statement_result.
    result: NotRequired[Result]


class PolicyDecision(TypedDict):
    scope: Literal["connection", "statement", "policy"]
    effect: str
    rule_id: str | None
    reason: str
    policy_version: str | None
    record: NotRequired[str]
    mask: NotRequired[list[str]]
    statements: NotRequired[list[Any]]


_RESULT_KEY: bytes = msgpack.packb("result")
_FIXMAP_ONE_MORE = {head: bytes((head + 1,)) for head in range(0x80, 0x8F)}


def with_result(query: bytes, result: bytes) -> bytes | None:
    """A ``query`` event (an encoded msgpack map) carrying the statement's ``result`` event
    (encoded too) as its field ``result``: the statement as one record. None when either is
    not a small map (fewer than 15 fields, which the agent's are)."""
    head = _FIXMAP_ONE_MORE.get(query[0]) if query else None
    if head is not None and result and 0x80 <= result[0] <= 0x8F:
        return head + query[1:] + _RESULT_KEY + result
    return None


def statement_result(record_type: str, event: Mapping[str, Any]) -> Mapping[str, Any] | None:
    """The result a record gives: a ``result`` record's event, or the ``result`` a ``query``
    record carries when the answer came before the record was written (None otherwise)."""
    if record_type == RESULT:
        return event
    if record_type == QUERY:
        found = event.get("result")
        return found if isinstance(found, Mapping) else None
    return None


class ApprovalRequest(TypedDict):
    request_id: str
    reason: str
    approvers: NotRequired[list[str]]


class ApprovalDecision(TypedDict):
    request_id: str
    outcome: Literal["approved", "denied", "expired"]
    approver: str | None
    reason: NotRequired[str]


class SessionEnd(TypedDict):
    reason: str
    outcome: Literal["success", "failure"]
    bytes_from_client: int
    bytes_from_server: int
    statements: int
    duration_ms: float
    error: NotRequired[str]


class AuditLoss(TypedDict):
    lost: int
    by_type: dict[str, int]
    reason: str
    first_ts: int
    last_ts: int


class CheckpointEvent(TypedDict):
    origin: str
    size: int
    root: bytes
    note: str
    segment: int
    frontier: NotRequired[list[bytes]]


@dataclass(frozen=True, slots=True)
class Record:
    """One decoded audit record together with the exact bytes it was stored as."""

    seq: int
    ts_ns: int
    prev: bytes
    type: str
    host: str
    session_id: str | None
    index: int | None
    event: Mapping[str, Any]
    raw: bytes
    version: int = ENVELOPE_VERSION

    @property
    def ts(self) -> str:
        """The timestamp as RFC 3339 UTC with microseconds."""
        return format_ts(self.ts_ns)

    def to_json(self) -> dict[str, Any]:
        """Envelope fields flattened with the event, ready for ``json.dumps`` (bytes as hex)."""
        out: dict[str, Any] = {
            "seq": self.seq,
            "ts": self.ts,
            "host": self.host,
            "type": self.type,
            "session_id": self.session_id,
            "index": self.index,
        }
        for key, value in self.event.items():
            if key not in out:
                out[key] = jsonable(value)
        return out


def format_ts(ts_ns: int) -> str:
    """Epoch nanoseconds as RFC 3339 UTC with microseconds."""
    seconds, ns = divmod(ts_ns, 1_000_000_000)
    t = _dt.datetime.fromtimestamp(seconds, _dt.UTC).replace(microsecond=ns // 1000)
    return t.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def parse_ts(text: str) -> int:
    """RFC 3339 (or a bare date) as epoch nanoseconds; naive times are UTC."""
    t = _dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    if t.tzinfo is None:
        t = t.replace(tzinfo=_dt.UTC)
    return int(t.timestamp()) * 1_000_000_000 + t.microsecond * 1000


def jsonable(value: Any) -> Any:
    """A msgpack value made JSON-serialisable (bytes become hex)."""
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value).hex()
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    return value


def check_type(type: str) -> None:
    """Raise UnknownEventType unless ``type`` is a defined event type."""
    if type not in EVENT_TYPES:
        raise UnknownEventType(f"unknown audit event type {type!r}")


def encode_event(event: Mapping[str, Any]) -> bytes:
    """The msgpack encoding of an event map (raises AuditError on values msgpack cannot encode)."""
    try:
        data: bytes = msgpack.packb(event, use_bin_type=True)
    except (TypeError, ValueError, OverflowError) as e:
        raise InvalidEvent(f"event cannot be encoded: {e}") from None
    return data


def encode_envelope(
    seq: int,
    ts_ns: int,
    prev: bytes,
    type: str,
    host: str,
    session_id: str | None,
    index: int | None,
    event_bytes: bytes,
) -> bytes:
    """The stored bytes of a record whose event is already msgpack-encoded."""
    head: bytes = msgpack.packb(
        [ENVELOPE_VERSION, seq, ts_ns, prev, type, host, session_id, index], use_bin_type=True
    )
    # A fixarray of 8 becomes a fixarray of 9 whose last element is the event.
    return b"\x99" + head[1:] + event_bytes


def decode_record(raw: bytes) -> Record:
    """Decode stored bytes into a Record; raises RecordDecodeError if they are not one."""
    try:
        env = msgpack.unpackb(raw, raw=False, strict_map_key=False)
    except Exception as e:  # msgpack raises several unrelated types
        raise RecordDecodeError(f"not msgpack: {e}") from None
    if not isinstance(env, list) or len(env) != 9:
        raise RecordDecodeError("envelope is not an array of 9 elements")
    version, seq, ts_ns, prev, type, host, session_id, index, event = env
    if version != ENVELOPE_VERSION:
        raise RecordDecodeError(f"unsupported envelope version {version!r}")
    if not isinstance(seq, int) or not isinstance(ts_ns, int):
        raise RecordDecodeError("seq and ts must be integers")
    if not isinstance(prev, bytes) or len(prev) != 32:
        raise RecordDecodeError("previous leaf hash must be 32 bytes")
    if type not in EVENT_TYPES or not isinstance(host, str) or not isinstance(event, dict):
        raise RecordDecodeError(f"bad type, host or event (type {type!r})")
    if session_id is not None and not isinstance(session_id, str):
        raise RecordDecodeError("session_id must be a string or nil")
    if index is not None and not isinstance(index, int):
        raise RecordDecodeError("index must be an integer or nil")
    return Record(seq, ts_ns, prev, type, host, session_id, index, event, bytes(raw), version)
