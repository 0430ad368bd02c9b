"""Actor analysis on crafted process records: kinds and the evidence that decided them."""

from __future__ import annotations

from typing import Any

from agent.identity.actor import analyse_actor
from tests.unit.identity.conftest import process, service_process


def evidence(record: dict[str, Any] | None) -> str:
    return " | ".join(analyse_actor(record).evidence)


def test_interactive_ssh_session_is_human() -> None:
    """A tty, a login uid and an ancestry through sshd make a human, with those facts as evidence."""
    verdict = analyse_actor(process())
    assert verdict.kind == "human"
    assert verdict.evidence[:2] == ("controlling tty pts/3", "loginuid 1000")
    assert "ancestor sshd (pid 4199): a login or terminal" in verdict.evidence
    assert "in login session session-7.scope" in verdict.evidence


def test_systemd_service_is_automation() -> None:
    """No tty, no login uid and a system service unit make automation."""
    verdict = analyse_actor(service_process())
    assert verdict.kind == "automation"
    assert verdict.evidence[0] == "in system service etl.service"
    assert "no controlling tty" in verdict.evidence and "loginuid unset" in verdict.evidence


def test_setsid_without_loginuid_is_automation() -> None:
    """A detached process (no tty, loginuid unset) outside any unit is automation."""
    record = process(tty=None, loginuid=None, audit_session=None, unit=None, ancestry=[])
    verdict = analyse_actor(record)
    assert verdict.kind == "automation"
    assert verdict.evidence == ("no controlling tty", "loginuid unset")


def test_cron_job_with_loginuid_is_automation() -> None:
    """A cron job is automation even though pam_loginuid set its login uid."""
    record = process(
        tty=None,
        unit="cron.service",
        ancestry=[{"pid": 300, "comm": "cron", "exe": "/usr/sbin/cron", "uid": 0}],
    )
    verdict = analyse_actor(record)
    assert verdict.kind == "automation"
    assert "ancestor cron (pid 300): a scheduled job" in verdict.evidence
    assert "in system service cron.service" in verdict.evidence


def test_ci_runner_is_automation_even_with_a_tty() -> None:
    """A descendant of a CI runner is automation whatever terminal it has."""
    record = process(
        ancestry=[{"pid": 50, "comm": "gitlab-runner", "exe": "/usr/bin/gitlab-runner", "uid": 999}]
    )
    verdict = analyse_actor(record)
    assert verdict.kind == "automation"
    assert verdict.evidence[0] == "ancestor gitlab-runner (pid 50): a CI runner"


def test_container_is_automation() -> None:
    """A process in a container (by id, cgroup or runtime ancestor) is automation."""
    by_id = analyse_actor(process(container_id="0123456789abcdef0123"))
    assert by_id.kind == "automation" and by_id.evidence[0] == "runs in container 0123456789ab"
    by_cgroup = analyse_actor(process(cgroup="/system.slice/docker-abc.scope", unit=None))
    assert by_cgroup.kind == "automation"
    shim = [{"pid": 9, "comm": "containerd-shim", "exe": "/usr/bin/containerd-shim-runc-v2"}]
    assert "container runtime" in evidence(process(ancestry=shim))


def test_ssh_command_without_tty_is_unknown() -> None:
    """`ssh host cmd` (a login, no tty) is neither clearly human nor automation."""
    verdict = analyse_actor(process(tty=None))
    assert verdict.kind == "unknown"
    assert verdict.evidence[:2] == ("no controlling tty", "loginuid 1000")


def test_tty_without_loginuid_is_unknown() -> None:
    """A terminal without a login uid is not enough for human."""
    assert analyse_actor(process(loginuid=None, unit=None, ancestry=[])).kind == "unknown"


def test_unset_loginuid_sentinel_counts_as_unset() -> None:
    """The kernel's 4294967295 login uid means unset, like None."""
    record = process(tty=None, loginuid=4294967295, unit=None, ancestry=[])
    assert analyse_actor(record).kind == "automation"


def test_no_attribution() -> None:
    """Without a process record the actor is unknown and says why."""
    assert analyse_actor(None).kind == "unknown"
    assert evidence(None) == "no process attribution"


def test_sshd_unit_is_not_a_system_service() -> None:
    """Processes left in ssh.service (no pam_systemd) are not automation for that reason."""
    assert analyse_actor(process(unit="ssh.service")).kind == "human"
