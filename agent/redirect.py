"""iptables NAT redirect of protected ports into the agent's listeners.

The ``nat`` redirect method: what ``[redirect] method = "auto"`` uses with
``fail_closed = true``, with BPF turned off, or on a kernel without sk_lookup (the
default otherwise is :mod:`agent.sklookup`, which needs no address translation).

Two chains per address family in the ``nat`` table:

* ``RINGFENCE_OUTPUT`` (jumped to from ``OUTPUT``) catches clients on this
  host. Its first rule returns early for packets carrying the agent's
  upstream mark, so the agent never intercepts itself; it does not exempt
  uid 0, so root's sudo sessions are still caught.
* ``RINGFENCE_PREROUTING`` (jumped to from ``PREROUTING``) catches clients
  on other hosts.

Both only match destinations local to this host (``addrtype LOCAL``).
Everything is applied in one ``iptables-restore -w --noflush`` transaction
per family: stale jumps of a killed run are deleted, the chains are
(re)declared, which flushes them, and the jumps are inserted at position 1.
"""

from __future__ import annotations

import logging
import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass

from agent.config import AgentSettings, ProtectedService, RedirectSettings

log = logging.getLogger("ringfence.redirect")

CHAIN_PREFIX = "RINGFENCE_"
HOOKS = {"OUTPUT": "RINGFENCE_OUTPUT", "PREROUTING": "RINGFENCE_PREROUTING"}


class RedirectError(Exception):
    """The redirect rules could not be read, applied or removed."""


@dataclass(frozen=True, slots=True)
class Family:
    name: str
    save: str
    restore: str


IPV4 = Family("ipv4", "iptables-save", "iptables-restore")
IPV6 = Family("ipv6", "ip6tables-save", "ip6tables-restore")


def _run(argv: Sequence[str], data: str | None = None) -> str:
    if shutil.which(argv[0]) is None:
        raise RedirectError(f"{argv[0]} not found: install the iptables package")
    try:
        done = subprocess.run(
            list(argv), input=data, capture_output=True, text=True, timeout=30, check=False
        )
    except subprocess.TimeoutExpired:
        raise RedirectError(f"{argv[0]} did not finish within 30 s (xtables lock?)") from None
    if done.returncode != 0:
        message = (done.stderr or done.stdout).strip()
        raise RedirectError(f"{' '.join(argv)} failed: {message}")
    return done.stdout


def nat_table(family: Family) -> list[str]:
    """The current ``nat`` table of ``family`` in iptables-save syntax."""
    return _run([family.save, "-t", "nat"]).splitlines()


def _stale_lines(table: Sequence[str]) -> tuple[list[str], set[str]]:
    """Delete commands for jumps into our chains, and the chains that exist."""
    deletes: list[str] = []
    chains: set[str] = set()
    for line in table:
        if line.startswith(":" + CHAIN_PREFIX):
            chains.add(line[1:].split()[0])
        elif line.startswith("-A ") and f"-j {CHAIN_PREFIX}" in line:
            parts = line.split()
            if parts[1].startswith(CHAIN_PREFIX):
                continue  # rules inside our chains go with the chain
            deletes.append("-D " + line[3:])
    return deletes, chains


def _restore(family: Family, lines: list[str]) -> None:
    script = "\n".join(["*nat", *lines, "COMMIT", ""])
    _run([family.restore, "-w", "--noflush"], script)


def family_available(family: Family) -> bool:
    """Whether this family's tools exist and its nat table can be read."""
    try:
        nat_table(family)
    except RedirectError:
        return False
    return True


class Redirector:
    """Installs and removes the RINGFENCE_* chains for the protected services."""

    def __init__(
        self,
        services: Sequence[ProtectedService],
        settings: RedirectSettings,
        agent: AgentSettings,
    ) -> None:
        self.services = tuple(services)
        self.settings = settings
        self.agent = agent
        self.families: list[Family] = []

    def rules(self, family: Family) -> list[str]:
        """The rules inside our chains (iptables-restore syntax)."""
        mark = f"0x{self.agent.upstream_mark:x}/0x{self.agent.mark_mask:x}"
        lines: list[str] = []
        if self.settings.local:
            lines.append(
                f"-A RINGFENCE_OUTPUT -m mark --mark {mark} "
                '-m comment --comment "ringfence: agent upstream" -j RETURN'
            )
        for s in self.services:
            match = f"-p tcp -m addrtype --dst-type LOCAL -m tcp --dport {s.port}"
            target = f'-m comment --comment "ringfence: {s.name}" -j REDIRECT --to-ports {s.listen_port}'
            if self.settings.local:
                lines.append(f"-A RINGFENCE_OUTPUT {match} {target}")
            if self.settings.remote:
                lines.append(f"-A RINGFENCE_PREROUTING {match} {target}")
        return lines

    def install(self) -> None:
        """Replace any stale rules by the current ones, atomically per family."""
        families = [IPV4] + ([IPV6] if self.settings.ipv6 else [])
        installed: list[Family] = []
        for family in families:
            if family is IPV6 and not family_available(family):
                log.warning(
                    "ip6tables nat table unavailable; IPv6 clients are not intercepted",
                    extra={"event": "redirect.ipv6_unavailable"},
                )
                continue
            deletes, _ = _stale_lines(nat_table(family))
            if deletes:
                log.warning(
                    "removing stale ringfence rules left by an earlier run",
                    extra={"event": "redirect.stale", "family": family.name, "count": len(deletes)},
                )
            lines = [f":{chain} - [0:0]" for chain in HOOKS.values()]
            lines += deletes
            hooks = []
            if self.settings.local:
                hooks.append("OUTPUT")
            if self.settings.remote:
                hooks.append("PREROUTING")
            lines += [f"-I {hook} 1 -j {HOOKS[hook]}" for hook in hooks]
            lines += self.rules(family)
            try:
                _restore(family, lines)
            except RedirectError:
                for done in installed:
                    remove_family(done)
                raise
            installed.append(family)
        self.families = installed

    def remove(self) -> None:
        """Remove our chains and jumps from every family where they were installed."""
        errors: list[str] = []
        for family in self.families or [IPV4, IPV6]:
            try:
                remove_family(family)
            except RedirectError as e:
                errors.append(str(e))
        self.families = []
        if errors:
            raise RedirectError("; ".join(errors))

    @staticmethod
    def installed_rules() -> list[str]:
        """Every ringfence chain, jump and rule, prefixed by its family."""
        out: list[str] = []
        for family in (IPV4, IPV6):
            if not family_available(family):
                continue
            for line in nat_table(family):
                if CHAIN_PREFIX in line:
                    out.append(f"{family.name}: {line}")
        return out

    @staticmethod
    def clean_all() -> int:
        """Remove all ringfence chains and jumps; returns how many chains went."""
        removed = 0
        for family in (IPV4, IPV6):
            if family_available(family):
                removed += remove_family(family)
        return removed


def remove_family(family: Family) -> int:
    """Delete our jumps and chains of one family in one transaction."""
    deletes, chains = _stale_lines(nat_table(family))
    if not deletes and not chains:
        return 0
    lines = [f":{chain} - [0:0]" for chain in sorted(chains)]
    lines += deletes
    lines += [f"-X {chain}" for chain in sorted(chains)]
    _restore(family, lines)
    return len(chains)
