"""``ringfence bpf`` and ``ringfence cleanup``: what the agent left in the kernel.

``ringfence cleanup`` is what runs after the agent stops, also after a crash
or a kill (the systemd unit's ``ExecStopPost``): it removes the redirect
rules, so that no protected port stays redirected to a listener that is gone,
unless ``[agent] fail_closed = true`` says that a port without its agent must
refuse connections; and it detaches the BPF programs that the stopped agent
of this configuration left attached (only on kernels without cgroup BPF links:
with them, the kernel detached them when the agent's process ended). ``--all``
removes every ringfence chain and program on the host, whatever the
configuration says (package removal).
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import click

from agent.cli_options import config_option, exit_while_agent_runs
from agent.config import Config, ConfigError, load_config

log = logging.getLogger("ringfence.cleanup")



def _config(path: str | None, *, tolerant: bool) -> Config:
    """The configuration; with ``tolerant``, the defaults when it cannot be read.

    Cleanup must work when the configuration is broken or already deleted:
    what is in the kernel has to go all the same.
    """
    try:
        return load_config(path)
    except ConfigError as e:
        if not tolerant:
            click.echo(f"ringfence: config error: {e}", err=True)
            sys.exit(2)
        click.echo(f"ringfence: {e}; using the default settings", err=True)
        return Config()


def _cgroup_root(config: Config) -> Path:
    from agent.attribution import AttributionError, resolve_cgroup_root

    try:
        return resolve_cgroup_root(config.bpf.cgroup_root)
    except AttributionError as e:
        click.echo(f"ringfence: {e}", err=True)
        sys.exit(1)


def _quiet_logging() -> None:
    logging.basicConfig(level=logging.WARNING, format="ringfence: %(message)s", stream=sys.stderr)


@click.group()
def bpf() -> None:
    """Inspect or detach the agent's BPF programs."""


@bpf.command("status")
@config_option
def bpf_status(config_path: str | None) -> None:
    """List the ringfence_* programs attached to the cgroup v2 root."""
    from agent.attribution import ringfence_programs

    root = _cgroup_root(_config(config_path, tolerant=True))
    found = ringfence_programs(root)
    if not found:
        click.echo(f"no ringfence BPF programs attached to {root}")
        return
    for _, prog_id, name in found:
        click.echo(f"{root}: {name} (id {prog_id})")


@bpf.command("clean")
@config_option
@click.option(
    "--all",
    "everything",
    is_flag=True,
    help="Every ringfence_* program on the cgroup root, also those of agents still running.",
)
def bpf_clean(config_path: str | None, everything: bool) -> None:
    """Detach the programs a stopped agent of this configuration left attached."""
    _quiet_logging()
    config = _config(config_path, tolerant=True)
    click.echo(f"detached {_detach(config, everything)} ringfence BPF program(s)")


def _detach(config: Config, everything: bool) -> int:
    from agent.attribution import (
        AttributionError,
        detach_all_ringfence_programs,
        detach_stale,
        resolve_cgroup_root,
    )

    if not everything:
        return detach_stale(config.agent.state_dir)
    try:
        root = resolve_cgroup_root(config.bpf.cgroup_root)
    except AttributionError:
        return 0  # no cgroup v2 mount: nothing can be attached
    return detach_all_ringfence_programs(root)


@click.command()
@config_option
@click.option(
    "--all",
    "everything",
    is_flag=True,
    help="Every ringfence chain and BPF program on this host, also with fail_closed (package removal).",
)
def cleanup(config_path: str | None, everything: bool) -> None:
    """Remove what a stopped or crashed agent left: redirect rules and BPF programs.

    The redirect rules stay when [agent] fail_closed = true (without --all).
    Run after the agent has stopped: the rules are removed whichever agent
    installed them, so without --all it refuses while an agent runs in this
    network namespace.
    """
    from agent.redirect import RedirectError, Redirector

    _quiet_logging()
    if not everything:
        exit_while_agent_runs("clean up after it")
    config = _config(config_path, tolerant=True)
    failed = False
    if config.agent.fail_closed and not everything:
        click.echo("redirect rules kept: [agent] fail_closed = true (protected ports refuse connections)")
    else:
        try:
            click.echo(f"removed {Redirector.clean_all()} ringfence chain(s)")
        except RedirectError as e:
            click.echo(f"ringfence: redirect rules: {e}", err=True)
            failed = True
    # Also with [bpf] mode = "off": an earlier run may have attached programs.
    try:
        click.echo(f"detached {_detach(config, everything)} ringfence BPF program(s)")
    except OSError as e:
        click.echo(f"ringfence: BPF programs: {e.strerror or e}", err=True)
        failed = True
    sys.exit(1 if failed else 0)


__all__ = ["bpf", "cleanup"]
