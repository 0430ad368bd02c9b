"""The upstream credential: from a private file (checked) or the agent's environment."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.config import ServiceCredentials
from agent.identity.credentials import CredentialError, load_upstream_credential


def test_private_file(tmp_path: Path) -> None:
    """A 0600 file's first line is the password; it never shows in the repr."""
    secret = tmp_path / "pg"
    secret.write_text("s3cret-pw\n")
    secret.chmod(0o600)
    cred = load_upstream_credential(ServiceCredentials("app", password_file=secret))
    assert (cred.user, cred.password, cred.method) == ("app", "s3cret-pw", "auto")
    assert "s3cret" not in repr(cred)


def test_file_readable_by_others_is_refused(tmp_path: Path) -> None:
    """A password file that group or others can read is refused with the fix."""
    secret = tmp_path / "pg"
    secret.write_text("pw\n")
    secret.chmod(0o644)
    with pytest.raises(CredentialError, match="mode 0644.*chmod 600"):
        load_upstream_credential(ServiceCredentials("app", password_file=secret))


def test_symlink_and_missing_file_are_refused(tmp_path: Path) -> None:
    """Symlinks are not followed; a missing file says so."""
    secret = tmp_path / "pg"
    secret.write_text("pw\n")
    secret.chmod(0o600)
    link = tmp_path / "link"
    link.symlink_to(secret)
    with pytest.raises(CredentialError, match="cannot open"):
        load_upstream_credential(ServiceCredentials("app", password_file=link))
    with pytest.raises(CredentialError, match="cannot open"):
        load_upstream_credential(ServiceCredentials("app", password_file=tmp_path / "nope"))


def test_environment_variable() -> None:
    """password_env reads the agent's own environment; unset is an error naming the variable."""
    creds = ServiceCredentials("app", password_env="PG_APP_PASSWORD")
    assert load_upstream_credential(creds, {"PG_APP_PASSWORD": "pw"}).password == "pw"
    with pytest.raises(CredentialError, match=r"\$PG_APP_PASSWORD is not set"):
        load_upstream_credential(creds, {})
