"""Service accounts declared in config: automation without a token, recognised
by where its process runs (systemd unit, cgroup path prefix, executable, uid).

Every criterion an account declares must match; an account declares at least one.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from agent.config import ServiceAccountConfig


@dataclass(frozen=True, slots=True)
class ServiceAccountMatch:
    """An account whose declared criteria all hold for a process, with the facts compared."""

    account: ServiceAccountConfig
    evidence: tuple[str, ...]


def _cgroup_under(cgroup: str, prefix: str) -> bool:
    prefix = prefix.rstrip("/") or "/"
    return cgroup == prefix or prefix == "/" or cgroup.startswith(prefix + "/")


def compare(account: ServiceAccountConfig, process: Mapping[str, Any]) -> tuple[bool, tuple[str, ...]]:
    """Whether ``process`` matches ``account``, and one fact per declared criterion."""
    ok = True
    facts: list[str] = []
    if account.unit is not None:
        unit = process.get("unit")
        hit = unit == account.unit
        ok &= hit
        facts.append(f"unit {unit} {'=' if hit else '!='} {account.unit}")
    if account.cgroup is not None:
        cgroup = process.get("cgroup")
        hit = isinstance(cgroup, str) and _cgroup_under(cgroup, account.cgroup)
        ok &= hit
        facts.append(f"cgroup {cgroup} {'under' if hit else 'not under'} {account.cgroup}")
    if account.exe is not None:
        exe = process.get("exe")
        hit = exe == account.exe
        ok &= hit
        facts.append(f"exe {exe} {'=' if hit else '!='} {account.exe}")
    if account.uid is not None:
        uid = process.get("uid")
        hit = uid == account.uid
        ok &= hit
        facts.append(f"uid {uid} {'=' if hit else '!='} {account.uid}")
    return ok and bool(facts), tuple(facts)


def match_service_account(
    accounts: Iterable[ServiceAccountConfig], process: Mapping[str, Any] | None
) -> ServiceAccountMatch | None:
    """The first declared account that ``process`` matches, if any."""
    if process is None:
        return None
    for account in accounts:
        ok, facts = compare(account, process)
        if ok:
            return ServiceAccountMatch(account, facts)
    return None
