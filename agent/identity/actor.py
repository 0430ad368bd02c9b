"""Actor analysis: is a person or an automated process making this connection?

Decided from kernel facts in the attribution record, never from a token:

* ``automation`` when the process descends from cron/at, a CI runner or a
  container runtime, runs in a container or a system service's cgroup, or has
  neither a controlling tty nor a login uid;
* ``human`` when it has a controlling tty and a login uid and none of the above;
* ``unknown`` otherwise (e.g. ``ssh host cmd``: a login but no tty).

The verdict carries the evidence that decided it, decisive facts first.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

UNSET_ID = 0xFFFFFFFF

# Process names (comm, at most 15 characters, or the exe's basename).
LOGIN_PROGRAMS = frozenset(
    {
        "sshd",
        "login",
        "mosh-server",
        "gdm-session-wor",
        "lightdm",
        "sddm-helper",
        "gnome-terminal-",
        "gnome-terminal-server",
        "konsole",
        "xterm",
        "uxterm",
        "urxvt",
        "kitty",
        "alacritty",
        "wezterm-gui",
        "foot",
        "tilix",
        "terminator",
        "xfce4-terminal",
        "tmux: server",
        "screen",
        "SCREEN",
    }
)
SCHEDULERS = frozenset({"cron", "crond", "anacron", "atd", "fcron", "systemd-cron"})
CI_RUNNERS = frozenset(
    {
        "gitlab-runner",
        "Runner.Worker",
        "Runner.Listener",
        "buildkite-agent",
        "act_runner",
        "drone-runner-ex",
        "drone-runner-ds",
        "woodpecker-agen",
        "woodpecker-agent",
        "circleci-agent",
        "Agent.Worker",
        "Agent.Listener",
        "teamcity-agent",
        "jenkins-agent",
    }
)
CONTAINER_RUNTIMES = frozenset(
    {"containerd-shim", "runc", "crun", "conmon", "dockerd", "docker-init", "youki", "runsc"}
)
LOGIN_SERVICES = frozenset({"ssh.service", "sshd.service", "systemd-logind.service"})
CONTAINER_CGROUP_MARKS = ("/docker/", "/docker-", "/kubepods", "/libpod-", "/lxc/", "/crio-")


@dataclass(frozen=True, slots=True)
class ActorVerdict:
    """Who is connecting, as far as kernel facts tell: the kind and why."""

    kind: str  # "human" | "automation" | "unknown"
    evidence: tuple[str, ...]

    def to_record(self) -> dict[str, Any]:
        return {"kind": self.kind, "evidence": list(self.evidence)}


def set_id(value: Any) -> int | None:
    """An id that counts as set (login uid, audit session), else None."""
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < UNSET_ID:
        return value
    return None


def _names(entry: Mapping[str, Any]) -> set[str]:
    names = set()
    comm = entry.get("comm")
    if isinstance(comm, str) and comm:
        names.add(comm)
    exe = entry.get("exe")
    if isinstance(exe, str) and exe:
        names.add(os.path.basename(exe.removesuffix(" (deleted)")))
    return names


def _is_runtime(name: str) -> bool:
    return name in CONTAINER_RUNTIMES or name.startswith("containerd-shim")


def analyse_actor(process: Mapping[str, Any] | None) -> ActorVerdict:
    """The actor verdict for an attribution record's process (None: not attributed)."""
    if process is None:
        return ActorVerdict("unknown", ("no process attribution",))
    automation: list[str] = []
    human: list[str] = []

    chain: list[Mapping[str, Any]] = [process]
    ancestry = process.get("ancestry")
    if isinstance(ancestry, list):
        chain += [a for a in ancestry if isinstance(a, Mapping)]
    for depth, entry in enumerate(chain):
        names = _names(entry)
        where = "process" if depth == 0 else "ancestor"
        tag = f"(pid {entry.get('pid')})"
        if names & SCHEDULERS:
            automation.append(f"{where} {sorted(names & SCHEDULERS)[0]} {tag}: a scheduled job")
        if names & CI_RUNNERS:
            automation.append(f"{where} {sorted(names & CI_RUNNERS)[0]} {tag}: a CI runner")
        runtimes = sorted(n for n in names if _is_runtime(n))
        if runtimes:
            automation.append(f"{where} {runtimes[0]} {tag}: a container runtime")
        if names & LOGIN_PROGRAMS:
            human.append(f"{where} {sorted(names & LOGIN_PROGRAMS)[0]} {tag}: a login or terminal")

    container_id = process.get("container_id")
    cgroup = process.get("cgroup")
    if isinstance(container_id, str) and container_id:
        automation.append(f"runs in container {container_id[:12]}")
    elif isinstance(cgroup, str) and any(m in cgroup for m in CONTAINER_CGROUP_MARKS):
        automation.append(f"runs in a container cgroup {cgroup}")

    unit = process.get("unit")
    if isinstance(unit, str) and unit:
        if unit.startswith("session-") and unit.endswith(".scope"):
            human.append(f"in login session {unit}")
        elif unit.endswith(".service") and unit not in LOGIN_SERVICES and not unit.startswith("user@"):
            automation.append(f"in system service {unit}")

    tty = process.get("tty")
    has_tty = isinstance(tty, str) and bool(tty)
    loginuid = set_id(process.get("loginuid"))
    tty_fact = f"controlling tty {tty}" if has_tty else "no controlling tty"
    login_fact = f"loginuid {loginuid}" if loginuid is not None else "loginuid unset"

    if automation:
        return ActorVerdict("automation", (*automation, tty_fact, login_fact, *human))
    if has_tty and loginuid is not None:
        return ActorVerdict("human", (tty_fact, login_fact, *human))
    if not has_tty and loginuid is None:
        return ActorVerdict("automation", (tty_fact, login_fact, *human))
    return ActorVerdict("unknown", (tty_fact, login_fact, *human))
