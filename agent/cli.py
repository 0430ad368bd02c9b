"""The ``ringfence`` command line."""

from __future__ import annotations

import sys

import click

from agent import __version__
from agent.cli_audit import audit
from agent.cli_bpf import bpf, cleanup
from agent.cli_identity import login, logout, whoami
from agent.cli_options import config_option, exit_while_agent_runs, load_or_exit
from agent.cli_policy import policy


@click.group()
@click.version_option(__version__, prog_name="ringfence")
def main() -> None:
    """ringfence: identity-aware, tamper-evident interception of protected ports."""


@main.command()
@config_option
def run(config_path: str | None) -> None:
    """Run the agent in the foreground until SIGTERM or SIGINT."""
    from agent.daemon import run_agent

    sys.exit(run_agent(load_or_exit(config_path)))


@main.command()
@config_option
def doctor(config_path: str | None) -> None:
    """Check that this host can run the agent; one line per check."""
    from agent.doctor import run_doctor

    sys.exit(run_doctor(config_path))


@main.group()
def redirect() -> None:
    """Inspect or remove the redirect rules (iptables) and sk_lookup programs."""


@redirect.command("status")
def redirect_status() -> None:
    """Show the RINGFENCE_* chains and their rules, and the agents' sk_lookup programs."""
    from agent.redirect import Redirector
    from agent.sklookup import attached

    rules = Redirector.installed_rules()
    try:
        programs = attached()
    except OSError as e:
        programs = []
        click.echo(f"cannot list sk_lookup programs: {e.strerror}", err=True)
    if not rules:
        click.echo("no ringfence redirect rules installed")
    for line in rules:
        click.echo(line)
    for program in programs:
        click.echo(f"sk_lookup: program {program.prog_id} attached to network namespace "
                   f"{program.netns_inode} (link {program.link_id}; it goes with its agent)")


@redirect.command("clean")
def redirect_clean() -> None:
    """Remove every RINGFENCE_* chain and jump (also those of a crashed agent)."""
    from agent.redirect import Redirector

    exit_while_agent_runs("remove its redirect rules")
    removed = Redirector.clean_all()
    click.echo(f"removed {removed} ringfence chain(s)")


main.add_command(audit)
main.add_command(bpf)
main.add_command(cleanup)
main.add_command(policy)
main.add_command(login)
main.add_command(logout)
main.add_command(whoami)

if __name__ == "__main__":
    main()
