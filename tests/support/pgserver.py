"""A real PostgreSQL server started by a test, inside a network namespace."""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from tests.support.netns import NetNS, run


def pg_bindir() -> Path | None:
    """The newest installed PostgreSQL server's bin directory."""
    root = Path("/usr/lib/postgresql")
    if not root.is_dir():
        return None
    versions = sorted((p for p in root.iterdir() if (p / "bin" / "postgres").exists()),
                      key=lambda p: [int(x) for x in p.name.split(".") if x.isdigit()])
    return versions[-1] / "bin" if versions else None


@dataclass
class PgServer:
    ns: NetNS
    bindir: Path
    datadir: Path
    sockdir: Path
    port: int
    process: subprocess.Popen[bytes]

    @property
    def log(self) -> Path:
        return self.datadir.parent / "server.log"

    def tool(self, name: str) -> str:
        return str(self.bindir / name)


def _as_postgres(argv: list[str]) -> list[str]:
    return ["runuser", "-u", "postgres", "--", *argv]


@contextmanager
def pgserver(
    ns: NetNS,
    port: int = 5432,
    roles: tuple[str, ...] = ("nobody",),
    passwords: dict[str, str] | None = None,
    ssl_files: tuple[Path, Path] | None = None,
    hba_first: tuple[str, ...] = (),
    server_settings: dict[str, str] | None = None,
) -> Iterator[PgServer]:
    """initdb + postgres in ``ns`` listening on all addresses, the given roles created.

    Roles in ``passwords`` get that password and must log in over TCP with
    SCRAM-SHA-256; everything else is trusted. Every statement the server
    runs is logged to ``server.log``. ``server_settings`` are further
    configuration parameters (``{"wal_level": "logical"}``).
    """
    passwords = passwords or {}
    settings: list[str] = []
    for name, value in (server_settings or {}).items():
        settings += ["-c", f"{name}={value}"]
    bindir = pg_bindir()
    if bindir is None:
        raise RuntimeError("PostgreSQL server is not installed")
    pw = pwd.getpwnam("postgres")
    base = Path(tempfile.mkdtemp(prefix="ringfence-pg-"))
    os.chmod(base, 0o755)
    datadir, sockdir = base / "data", base / "sock"
    for d in (datadir, sockdir):
        d.mkdir()
        os.chown(d, pw.pw_uid, pw.pw_gid)
    run(_as_postgres([str(bindir / "initdb"), "-D", str(datadir), "-A", "trust", "-U", "postgres",
                      "--no-sync", "-E", "UTF8", "--locale", "C"]))
    with open(datadir / "pg_hba.conf", "w") as f:
        f.write("local all all trust\n")
        for line in hba_first:
            f.write(line + "\n")
        for role in passwords:
            f.write(f"host all {role} 0.0.0.0/0 scram-sha-256\nhost all {role} ::/0 scram-sha-256\n")
        f.write("host all all 0.0.0.0/0 trust\nhost all all ::/0 trust\n")
    if ssl_files is not None:
        for source, name in zip(ssl_files, ("server.crt", "server.key"), strict=True):
            target = datadir / name
            shutil.copy(source, target)
            os.chown(target, pw.pw_uid, pw.pw_gid)
            target.chmod(0o600)
        settings += ["-c", "ssl=on"]
    with open(base / "server.log", "wb") as server_log:
        process = ns.popen(
            _as_postgres([str(bindir / "postgres"), "-D", str(datadir), "-p", str(port),
                          "-c", "listen_addresses=*", "-c", f"unix_socket_directories={sockdir}",
                          "-c", "fsync=off", "-c", "max_connections=100",
                          "-c", "log_connections=on", "-c", "log_statement=all",
                          "-c", "password_encryption=scram-sha-256", *settings]),
            stdout=subprocess.DEVNULL, stderr=server_log,
        )
    server = PgServer(ns, bindir, datadir, sockdir, port, process)
    try:
        deadline = time.monotonic() + 60
        while True:
            done = subprocess.run(ns.argv([server.tool("pg_isready"), "-h", str(sockdir), "-p",
                                           str(port)]), capture_output=True)
            if done.returncode == 0:
                break
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError((base / "server.log").read_text())
            time.sleep(0.1)
        for role in (*roles, *passwords):
            password = passwords.get(role)
            clause = f" PASSWORD '{password}'" if password else ""
            ns.run(_as_postgres([server.tool("psql"), "-h", str(sockdir), "-p", str(port), "-U",
                                 "postgres", "-c", f'CREATE ROLE "{role}" LOGIN{clause}']))
        yield server
    finally:
        process.terminate()
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        shutil.rmtree(base, ignore_errors=True)


NOBODY = 65534


def psql_argv(server: PgServer, sql: str, host: str = "127.0.0.1", user: str = "nobody",
              port: int = 5432) -> list[str]:
    """psql running ``sql`` against ``host``:``port`` (a directory: the Unix socket there)."""
    return [server.tool("psql"), "-X", "-h", host, "-p", str(port), "-U", user,
            "-d", "postgres", "-c", sql]


def as_nobody(argv: list[str]) -> list[str]:
    return ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", *argv]


def psql_as_nobody_matches_direct(ns: NetNS, server: PgServer, sql: str,
                                  host: str = "127.0.0.1") -> int:
    """Run ``sql`` with psql as uid nobody dialling ``host``:5432, check that it prints byte
    for byte what it prints over the server's Unix socket (which no redirect reaches), and
    return its pid."""
    direct = ns.run(as_nobody(psql_argv(server, sql, host=str(server.sockdir))))
    proc = ns.popen(as_nobody(psql_argv(server, sql, host=host)), stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert out == direct.stdout.encode(), (out, direct.stdout)
    return proc.pid
