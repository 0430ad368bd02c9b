"""Policy files: TOML text → validated, compiled :class:`~policy.evaluate.Policy`.

Every error names the file, line and column: syntax errors from tomllib's
own position, semantic errors from the line of the offending key or table,
found by a small scan of the source text (:class:`_SourceMap`).
"""

from __future__ import annotations

import hashlib
import os
import re
import tomllib
from collections.abc import Mapping
from datetime import time
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from policy.classify import CLASSES, FLAGS, Classifier
from policy.evaluate import Policy
from policy.model import (
    ACTORS,
    ALLOW,
    BLOCK,
    DENY,
    DETECTORS,
    EFFECTS,
    MASK,
    RECORD,
    RECORD_LEVELS,
    REQUIRE_APPROVAL,
    Defaults,
    Mask,
    Match,
    ResourceSet,
    Rule,
    SubjectSet,
    TimeWindow,
)

DEFAULT_POLICY_PATH = Path("/etc/ringfence/policy.toml")

KeyPath = tuple[str | int, ...]


class PolicyError(Exception):
    """A policy file is unreadable or invalid; ``str()`` is ``file:line:col: message``."""

    def __init__(
        self, message: str, source: str | None = None, line: int | None = None, column: int | None = None
    ) -> None:
        super().__init__(message)
        self.message = message
        self.source = source
        self.line = line
        self.column = column

    def __str__(self) -> str:
        where = self.source or "<policy>"
        if self.line is not None:
            where += f":{self.line}:{self.column or 1}"
        return f"{where}: {self.message}"


class _Invalid(Exception):
    def __init__(self, path: KeyPath, message: str) -> None:
        super().__init__(message)
        self.path = path
        self.message = message


# ---------------------------------------------------------------------------
# Locating keys in the source text.

_BARE = r"[A-Za-z0-9_-]+"
_KEY = rf'(?:{_BARE}|"(?:[^"\\]|\\.)*"|\'[^\']*\')'
_DOTTED = rf"{_KEY}(?:\s*\.\s*{_KEY})*"
_ARRAY_HEADER = re.compile(rf"^\s*\[\[\s*({_DOTTED})\s*\]\]\s*(?:#.*)?$")
_TABLE_HEADER = re.compile(rf"^\s*\[\s*({_DOTTED})\s*\]\s*(?:#.*)?$")
_KEY_LINE = re.compile(rf"^(\s*)({_DOTTED})\s*=")
_PART = re.compile(_KEY)


def _split_key(dotted: str) -> list[str]:
    parts = []
    for m in _PART.finditer(dotted):
        part = m.group(0)
        if part[:1] in "\"'":
            part = part[1:-1]
        parts.append(part)
    return parts


class _SourceMap:
    """Maps key paths (``("rule", 2, "effect")``) to (line, column) in TOML text."""

    def __init__(self, text: str) -> None:
        self.positions: dict[KeyPath, tuple[int, int]] = {}
        arrays: dict[tuple[str, ...], int] = {}
        current: KeyPath = ()
        in_string: str | None = None
        for lineno, line in enumerate(text.splitlines(), 1):
            if in_string is not None:
                if line.count(in_string) % 2 == 1:
                    in_string = None
                continue
            if m := _ARRAY_HEADER.match(line):
                names = _split_key(m.group(1))
                arrays[tuple(names)] = arrays.get(tuple(names), -1) + 1
                current = self._resolve(names, arrays) + (arrays[tuple(names)],)
                self.positions.setdefault(current, (lineno, line.index("[") + 1))
                continue
            if m := _TABLE_HEADER.match(line):
                current = self._resolve(_split_key(m.group(1)), arrays)
                self.positions.setdefault(current, (lineno, line.index("[") + 1))
                continue
            if m := _KEY_LINE.match(line):
                path = current + tuple(_split_key(m.group(2)))
                self.positions.setdefault(path, (lineno, len(m.group(1)) + 1))
                rest = line[m.end() :]
                for quote in ('"""', "'''"):
                    if rest.count(quote) % 2 == 1:
                        in_string = quote
                        break

    @staticmethod
    def _resolve(names: list[str], arrays: Mapping[tuple[str, ...], int]) -> KeyPath:
        path: list[str | int] = []
        for i, name in enumerate(names):
            path.append(name)
            prefix = tuple(names[: i + 1])
            if prefix in arrays and i < len(names) - 1:
                path.append(arrays[prefix])
        return tuple(path)

    def find(self, path: KeyPath) -> tuple[int, int] | None:
        """The position of ``path`` or of its nearest ancestor that is written out."""
        while path:
            if path in self.positions:
                return self.positions[path]
            path = path[:-1]
        return None


def _where(path: KeyPath) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else part)
    return out


# ---------------------------------------------------------------------------
# Typed reading of tables.


class _Table:
    def __init__(self, path: KeyPath, data: Any) -> None:
        if not isinstance(data, dict):
            raise _Invalid(path, f"{_where(path)}: expected a table")
        self.path = path
        self.data: dict[str, Any] = data
        self.used: set[str] = set()

    def at(self, name: str) -> KeyPath:
        return self.path + (name,)

    def fail(self, name: str, message: str) -> _Invalid:
        return _Invalid(self.at(name), f"{_where(self.at(name))}: {message}")

    def text(self, name: str, default: str | None = None) -> str | None:
        self.used.add(name)
        value = self.data.get(name, default)
        if value is not None and not isinstance(value, str):
            raise self.fail(name, f"expected a string, got {type(value).__name__}")
        return value

    def choice(self, name: str, allowed: tuple[str, ...], default: str | None) -> str | None:
        value = self.text(name, default)
        if value is not None and value not in allowed:
            raise self.fail(name, f"must be one of {', '.join(allowed)}; got {value!r}")
        return value

    def strings(self, name: str, allowed: tuple[str, ...] | None = None) -> tuple[str, ...]:
        self.used.add(name)
        value = self.data.get(name, [])
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise self.fail(name, "expected a string or an array of strings")
        for v in value:
            if not v:
                raise self.fail(name, "empty string")
            if allowed is not None and v not in allowed:
                raise self.fail(name, f"unknown value {v!r}; expected one of {', '.join(allowed)}")
        return tuple(value)

    def ints(self, name: str) -> tuple[int, ...]:
        self.used.add(name)
        value = self.data.get(name, [])
        if isinstance(value, int) and not isinstance(value, bool):
            value = [value]
        if not isinstance(value, list) or not all(
            isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value
        ):
            raise self.fail(name, "expected a non-negative integer or an array of them")
        return tuple(value)

    def flag(self, name: str) -> bool | None:
        self.used.add(name)
        value = self.data.get(name)
        if value is not None and not isinstance(value, bool):
            raise self.fail(name, f"expected true or false, got {type(value).__name__}")
        return value

    def finish(self) -> None:
        for name in self.data:
            if name not in self.used:
                raise self.fail(name, "unknown key")


# ---------------------------------------------------------------------------

_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]*$")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")
_DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
_HOURS = re.compile(r"^(\d{1,2}):(\d{2})\s*-\s*(\d{1,2}):(\d{2})$")
_MATCH_KEYS = (
    "subjects",
    "resources",
    "classes",
    "kinds",
    "flags",
    "objects",
    "functions",
    "pattern",
    "time",
)


def _defaults(t: _Table) -> Defaults:
    d = Defaults()
    out = Defaults(
        unidentified=t.choice("unidentified", (ALLOW, DENY), d.unidentified) or d.unidentified,
        unparseable=t.choice("unparseable", (BLOCK, ALLOW), d.unparseable) or d.unparseable,
        record=t.choice("record", RECORD_LEVELS, d.record) or d.record,
    )
    t.finish()
    return out


def _subject_set(name: str, t: _Table) -> SubjectSet:
    if not _NAME.match(name):
        raise _Invalid(t.path, f"{_where(t.path)}: use letters, digits, '-' and '_' in names")
    out = SubjectSet(
        name=name,
        subjects=t.strings("subjects"),
        groups=t.strings("groups"),
        issuers=t.strings("issuers"),
        service_accounts=t.strings("service_accounts"),
        actors=t.strings("actors", ACTORS),
        findings=t.strings("findings"),
        unix_users=t.strings("unix_users"),
        loginuid_users=t.strings("loginuid_users"),
        uids=t.ints("uids"),
        loginuids=t.ints("loginuids"),
        identified=t.flag("identified"),
    )
    t.finish()
    return out


def _resource_set(name: str, t: _Table) -> ResourceSet:
    if not _NAME.match(name):
        raise _Invalid(t.path, f"{_where(t.path)}: use letters, digits, '-' and '_' in names")
    out = ResourceSet(
        name=name,
        services=t.strings("services"),
        protocols=t.strings("protocols"),
        databases=t.strings("databases"),
    )
    t.finish()
    return out


def _time_window(t: _Table) -> TimeWindow:
    days: set[int] = set()
    for spec in t.strings("days"):
        first, _, last = spec.lower().partition("-")
        if first not in _DAYS or (last and last not in _DAYS):
            raise t.fail("days", f"{spec!r}: use mon..sun or a range like mon-fri")
        a = _DAYS.index(first)
        b = _DAYS.index(last) if last else a
        days.update((a + i) % 7 for i in range((b - a) % 7 + 1))
    start = end = None
    hours = t.text("hours")
    if hours is not None:
        m = _HOURS.match(hours.strip())
        if not m:
            raise t.fail("hours", f"{hours!r}: use HH:MM-HH:MM")
        h1, m1, h2, m2 = (int(x) for x in m.groups())
        if h1 > 23 or h2 > 24 or m1 > 59 or m2 > 59 or (h2 == 24 and m2):
            raise t.fail("hours", f"{hours!r}: not a time of day")
        start = time(h1, m1)
        end = time(23, 59, 59, 999999) if h2 == 24 else time(h2, m2)
        if start == end:
            raise t.fail("hours", f"{hours!r}: empty range")
    timezone = t.text("timezone", "UTC") or "UTC"
    try:
        ZoneInfo(timezone)
    except (ZoneInfoNotFoundError, ValueError):
        raise t.fail("timezone", f"unknown time zone {timezone!r}") from None
    t.finish()
    return TimeWindow(
        days=frozenset(days) if days else frozenset(range(7)), start=start, end=end, timezone=timezone
    )


def _match(
    t: _Table, subject_names: Mapping[str, SubjectSet], resource_names: Mapping[str, ResourceSet]
) -> Match:
    subjects = t.strings("subjects")
    for name in subjects:
        if name not in subject_names:
            raise t.fail("subjects", f"no [subjects.{name}] is defined")
    resources = t.strings("resources")
    for name in resources:
        if name not in resource_names:
            raise t.fail("resources", f"no [resources.{name}] is defined")
    pattern = t.text("pattern")
    if pattern is not None:
        try:
            re.compile(pattern)
        except re.error as e:
            raise t.fail("pattern", f"not a regular expression: {e}") from None
    window = None
    if "time" in t.data:
        t.used.add("time")
        window = _time_window(_Table(t.at("time"), t.data["time"]))
    return Match(
        subjects=subjects,
        resources=resources,
        classes=t.strings("classes", CLASSES),
        kinds=tuple(k.upper() for k in t.strings("kinds")),
        flags=t.strings("flags", FLAGS),
        objects=t.strings("objects"),
        functions=t.strings("functions"),
        pattern=pattern,
        time=window,
    )


def _rule(
    t: _Table,
    seen: dict[str, KeyPath],
    subject_names: Mapping[str, SubjectSet],
    resource_names: Mapping[str, ResourceSet],
    line: int,
) -> Rule:
    if "id" not in t.data:
        raise _Invalid(t.path, f"{_where(t.path)}: every rule needs an id")
    rule_id = t.text("id") or ""
    if not _ID.match(rule_id) or rule_id.startswith("defaults."):
        raise t.fail("id", f"{rule_id!r}: use letters, digits and _ . : - (not 'defaults.')")
    if rule_id in seen:
        raise t.fail("id", f"{rule_id!r} is already used by {_where(seen[rule_id])}")
    seen[rule_id] = t.path
    if "effect" not in t.data:
        raise _Invalid(t.path, f"{_where(t.path)}: rule {rule_id} needs an effect")
    effect = t.choice("effect", EFFECTS, None) or ""
    reason = t.text("reason") or f"rule {rule_id} ({effect})"
    match = _match(t, subject_names, resource_names)
    unless = None
    if "unless" in t.data:
        t.used.add("unless")
        u = _Table(t.at("unless"), t.data["unless"])
        if not u.data:
            raise _Invalid(u.path, f"{_where(u.path)}: an empty unless would disable the rule")
        unless = _match(u, subject_names, resource_names)
        u.finish()
    for key, owner in (("level", RECORD), ("columns", MASK), ("detectors", MASK)):
        if key in t.data and effect != owner:
            raise t.fail(key, f"only {owner} rules take {key}")
    level = None
    if effect == RECORD:
        if "level" not in t.data:
            raise _Invalid(t.path, f"{_where(t.path)}: a record rule needs a level")
        level = t.choice("level", RECORD_LEVELS, None)
    mask = None
    if effect == MASK:
        columns = t.strings("columns")
        detectors = t.strings("detectors", DETECTORS)
        if not columns and not detectors:
            raise _Invalid(t.path, f"{_where(t.path)}: a mask rule needs columns or detectors")
        mask = Mask(columns=columns, detectors=detectors, rule_id=rule_id)
    rule = Rule(
        id=rule_id,
        effect=effect,
        reason=reason,
        match=match,
        unless=unless,
        level=level,
        mask=mask,
        line=line,
    )
    if effect in (ALLOW, DENY) and rule.statement_scoped:
        raise t.fail(
            "effect",
            f"{effect} decides connections and cannot look at statements; use block "
            "(with unless for exceptions)",
        )
    if (
        effect == REQUIRE_APPROVAL
        and match.statement_conditions is False
        and unless
        and (unless.statement_conditions)
    ):
        raise t.fail("unless", "a connection approval cannot make exceptions by statement")
    t.finish()
    return rule


def parse_policy(
    text: str | bytes,
    source: str | os.PathLike[str] | None = None,
    classifier: Classifier | None = None,
) -> Policy:
    """Validate policy text into a :class:`Policy`; raises :class:`PolicyError`."""
    name = str(source) if source is not None else None
    raw = text.encode("utf-8") if isinstance(text, str) else text
    try:
        decoded = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise PolicyError(f"not UTF-8: {e.reason} at byte {e.start}", name) from None
    try:
        data = tomllib.loads(decoded)
    except tomllib.TOMLDecodeError as e:
        message, line, column = _toml_position(str(e), decoded)
        raise PolicyError(message, name, line, column) from None
    smap = _SourceMap(decoded)
    try:
        return _build(data, smap, hashlib.sha256(raw).hexdigest(), source, classifier)
    except _Invalid as e:
        pos = smap.find(e.path)
        raise PolicyError(e.message, name, *(pos or (None, None))) from None


_TOML_AT = re.compile(r"\s*\(at line (\d+), column (\d+)\)\s*$")
_TOML_END = re.compile(r"\s*\(at end of document\)\s*$")


def _toml_position(message: str, text: str) -> tuple[str, int | None, int | None]:
    if m := _TOML_AT.search(message):
        return message[: m.start()], int(m.group(1)), int(m.group(2))
    if m := _TOML_END.search(message):
        lines = text.splitlines() or [""]
        return message[: m.start()], len(lines), len(lines[-1]) + 1
    return message, None, None


def _build(
    data: dict[str, Any],
    smap: _SourceMap,
    version: str,
    source: str | os.PathLike[str] | None,
    classifier: Classifier | None,
) -> Policy:
    root = _Table((), data)
    defaults = Defaults()
    if "defaults" in data:
        root.used.add("defaults")
        defaults = _defaults(_Table(("defaults",), data["defaults"]))
    subject_sets: dict[str, SubjectSet] = {}
    if "subjects" in data:
        root.used.add("subjects")
        table = _Table(("subjects",), data["subjects"])
        for name, value in table.data.items():
            subject_sets[name] = _subject_set(name, _Table(("subjects", name), value))
    resource_sets: dict[str, ResourceSet] = {}
    if "resources" in data:
        root.used.add("resources")
        table = _Table(("resources",), data["resources"])
        for name, value in table.data.items():
            resource_sets[name] = _resource_set(name, _Table(("resources", name), value))
    rules: list[Rule] = []
    root.used.add("rule")
    items = data.get("rule", [])
    if not isinstance(items, list):
        raise _Invalid(("rule",), "rule: write rules as [[rule]] tables")
    seen: dict[str, KeyPath] = {}
    for i, item in enumerate(items):
        pos = smap.find(("rule", i))
        t = _Table(("rule", i), item)
        rules.append(_rule(t, seen, subject_sets, resource_sets, pos[0] if pos else 0))
    root.finish()
    return Policy(
        rules=rules,
        subject_sets=tuple(subject_sets.values()),
        resource_sets=tuple(resource_sets.values()),
        defaults=defaults,
        version=version,
        source=Path(source) if source is not None else None,
        classifier=classifier,
    )


def read_policy_file(path: str | os.PathLike[str]) -> bytes:
    """The bytes of a policy file; raises :class:`PolicyError` when unreadable."""
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise PolicyError(f"cannot read policy: {e.strerror or e}", str(path)) from None


def load_policy(path: str | os.PathLike[str], classifier: Classifier | None = None) -> Policy:
    """Read and validate a policy file."""
    return parse_policy(read_policy_file(path), source=path, classifier=classifier)
