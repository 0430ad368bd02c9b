"""The real database credentials, which the agent holds and clients never see:
read from a root-only file or an environment variable of the agent."""

from __future__ import annotations

import os
import stat
from collections.abc import Mapping
from dataclasses import dataclass, field

from agent.config import ServiceCredentials
from agent.identity import IdentityError

MAX_SECRET_BYTES = 4096


class CredentialError(IdentityError):
    """The configured credential cannot be read, or its file is not private."""


@dataclass(frozen=True, slots=True)
class UpstreamCredential:
    """The user and password the agent authenticates upstream with."""

    user: str
    password: str | None = field(repr=False)
    method: str = "auto"


def read_secret_file(path: os.PathLike[str] | str) -> str:
    """A password file's first line; refused unless a regular file that only its owner
    (root or the agent's user) can read or write."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as e:
        raise CredentialError(f"{path}: cannot open: {e.strerror}") from None
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise CredentialError(f"{path}: not a regular file")
        if st.st_mode & 0o077:
            raise CredentialError(
                f"{path}: readable or writable by group or others (mode "
                f"{stat.S_IMODE(st.st_mode):04o}); chmod 600 it"
            )
        if st.st_uid not in (0, os.geteuid()):
            raise CredentialError(f"{path}: owned by uid {st.st_uid}, not by root")
        data = f.read(MAX_SECRET_BYTES + 1)
    if len(data) > MAX_SECRET_BYTES:
        raise CredentialError(f"{path}: larger than {MAX_SECRET_BYTES} bytes")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise CredentialError(f"{path}: not UTF-8") from None
    secret = text.split("\n", 1)[0].rstrip("\r")
    if not secret:
        raise CredentialError(f"{path}: empty")
    return secret


def load_upstream_credential(
    credentials: ServiceCredentials, environ: Mapping[str, str] | None = None
) -> UpstreamCredential:
    """The credential to use now (the file is read each time, so rotation needs no restart)."""
    password: str | None = None
    if credentials.password_file is not None:
        password = read_secret_file(credentials.password_file)
    elif credentials.password_env is not None:
        env = os.environ if environ is None else environ
        password = env.get(credentials.password_env)
        if not password:
            raise CredentialError(f"${credentials.password_env} is not set in the agent's environment")
    return UpstreamCredential(credentials.user, password, credentials.method)
