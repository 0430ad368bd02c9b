"""Export records as JSON lines (our flattened shape) or as OCSF-shaped events.

The OCSF mapping follows OCSF 1.x classes: protected-session records map to
Datastore Activity (class 6005; connect / query / other), agent records to
Application Lifecycle (class 6002; start / stop), everything else to Datastore
Activity "Other". Fields without an OCSF home are kept under ``unmapped``.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from typing import Any

from audit.schema import Record, jsonable

PRODUCT = {"name": "ringfence", "vendor_name": "ringfence"}
OCSF_VERSION = "1.1.0"

_DATASTORE = 6005
_LIFECYCLE = 6002
_ACTIVITY: dict[str, tuple[int, int, str]] = {
    "agent.start": (_LIFECYCLE, 3, "Start"),
    "agent.stop": (_LIFECYCLE, 4, "Stop"),
    "session.start": (_DATASTORE, 3, "Connect"),
    "query": (_DATASTORE, 4, "Query"),
}


def in_window(records: Iterable[Record], since_ns: int | None, until_ns: int | None) -> Iterator[Record]:
    """Records whose timestamp is within [since, until)."""
    for r in records:
        if since_ns is not None and r.ts_ns < since_ns:
            continue
        if until_ns is not None and r.ts_ns >= until_ns:
            continue
        yield r


def to_jsonl(record: Record) -> str:
    """One record as the flattened JSON object ``tail --json`` prints."""
    return json.dumps(record.to_json(), separators=(",", ":"), ensure_ascii=False)


def _endpoint(value: Any) -> dict[str, Any] | None:
    if isinstance(value, dict) and "ip" in value:
        return {"ip": value.get("ip"), "port": value.get("port")}
    return None


def to_ocsf(record: Record) -> dict[str, Any]:
    """One record as an OCSF-shaped event."""
    class_uid, activity_id, activity = _ACTIVITY.get(record.type, (_DATASTORE, 99, "Other"))
    ev = dict(record.event)
    out: dict[str, Any] = {
        "class_uid": class_uid,
        "category_uid": 6,
        "activity_id": activity_id,
        "activity_name": activity,
        "type_uid": class_uid * 100 + activity_id,
        "time": record.ts_ns // 1_000_000,
        "severity_id": 1,
        "metadata": {
            "version": OCSF_VERSION,
            "product": PRODUCT,
            "uid": str(record.seq),
            "log_name": "ringfence-audit",
            "event_code": record.type,
            "correlation_uid": record.session_id,
        },
        "device": {"hostname": record.host},
    }
    # A query record that carries its result (audit/SCHEMA.md) is the statement's whole
    # activity: its outcome and error are the result's.
    result = ev.pop("result", None) if record.type == "query" else None
    if isinstance(result, dict):
        ev.update({k: v for k, v in result.items() if k not in ev})
    outcome = ev.pop("outcome", None)
    if outcome in ("success", "failure"):
        out["status"] = "Success" if outcome == "success" else "Failure"
        out["status_id"] = 1 if outcome == "success" else 2
    error = ev.pop("error", None)
    if isinstance(error, dict):
        out["status_code"] = error.get("sqlstate")
        out["status_detail"] = error.get("message")
    elif error is not None:
        out["status_detail"] = error
    if record.type == "query":
        out["query_info"] = {"query_string": ev.pop("text", None)}
    for src, dst in (("source", "src_endpoint"), ("destination", "dst_endpoint")):
        ep = _endpoint(ev.pop(src, None))
        if ep is not None:
            out[dst] = ep
    process = ev.pop("process", None)
    if isinstance(process, dict):
        out["actor"] = {
            "process": {
                "pid": process.get("pid"),
                "name": process.get("comm"),
                "cmd_line": " ".join(process.get("cmdline") or []),
                "file": {"path": process.get("exe")},
                "user": {"uid": str(process.get("uid"))},
            },
            "user": {"uid": str(process.get("loginuid", process.get("uid")))},
        }
    target = ev.pop("target", None)
    if isinstance(target, dict):
        out["database"] = {"name": target.get("database")}
        if target.get("user") is not None:
            out.setdefault("actor", {})["authorizations"] = [{"policy": {"name": target["user"]}}]
    out["unmapped"] = jsonable({"index": record.index, **ev})
    return out
