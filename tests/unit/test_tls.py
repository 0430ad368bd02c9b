"""TLS helpers: finding the server's own certificate, and TLS over memory buffers."""

from __future__ import annotations

import ssl
from pathlib import Path

import pytest

from agent.config import ServiceTls
from agent.tls import TlsChannel, TlsError, client_facing_context, find_server_tls_files


def conf(tmp_path: Path, name: str, text: str) -> str:
    path = tmp_path / name / "postgresql.conf"
    path.parent.mkdir(parents=True)
    path.write_text(text)
    return str(tmp_path / "*" / "postgresql.conf")


def test_finds_the_cluster_on_the_port_and_resolves_relative_files(tmp_path: Path) -> None:
    """The cluster whose port matches gives its certificate and key, relative to its data directory."""
    pattern = conf(tmp_path, "a", "port = 5433\nssl = on\n")
    conf(tmp_path, "b", "port = 5432  # main\nssl = on\ndata_directory = '/var/lib/pg'\n"
                        "ssl_cert_file = '/etc/ssl/certs/x.pem'\nssl_key_file = 'server.key'\n")
    found = find_server_tls_files(5432, (pattern,))
    assert found is not None
    assert found.cert_file == Path("/etc/ssl/certs/x.pem")
    assert found.key_file == Path("/var/lib/pg/server.key")


def test_server_without_ssl_means_no_tls(tmp_path: Path) -> None:
    """A cluster with ssl = off gives nothing: the agent then answers SSLRequest with 'N'."""
    pattern = conf(tmp_path, "a", "port = 5432\nssl = off\n")
    assert find_server_tls_files(5432, (pattern,)) is None


@pytest.mark.parametrize("value", ["t", "'yes'", "ON", "1", "tru"])
def test_ssl_is_on_however_postgresql_spells_it(tmp_path: Path, value: str) -> None:
    """The server reads ``ssl = t`` (any spelling of true) as on: so does the agent."""
    pattern = conf(tmp_path, "a", f"port = 5432\nssl = {value}\n")
    assert find_server_tls_files(5432, (pattern,)) is not None


@pytest.mark.parametrize("value", ["f", "no", "OFF", "0", "o", "of", "maybe"])
def test_ssl_is_off_for_false_or_unreadable_values(tmp_path: Path, value: str) -> None:
    pattern = conf(tmp_path, "a", f"port = 5432\nssl = {value}\n")
    assert find_server_tls_files(5432, (pattern,)) is None


def test_bad_certificate_files_are_a_clear_error(tmp_path: Path) -> None:
    """Configured files that do not load stop the agent with a message naming them."""
    settings = ServiceTls(cert_file=str(tmp_path / "nope.crt"), key_file=str(tmp_path / "nope.key"))
    with pytest.raises(TlsError, match="nope.crt"):
        client_facing_context(settings, 5432)


def test_tls_off_when_cert_file_is_empty() -> None:
    """cert_file = "" turns TLS off for the service."""
    assert client_facing_context(ServiceTls(cert_file="", key_file=""), 5432) is None


def test_channels_talk_to_each_other_over_memory() -> None:
    """A client and a server channel complete a handshake and carry data both ways."""
    import subprocess
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        key, crt = Path(d) / "k.pem", Path(d) / "c.pem"
        subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                        "ec_paramgen_curve:prime256v1", "-nodes", "-subj", "/CN=localhost",
                        "-keyout", str(key), "-out", str(crt), "-days", "1"],
                       check=True, capture_output=True)
        server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        server_ctx.load_cert_chain(crt, key)
    client_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client_ctx.check_hostname = False
    client_ctx.verify_mode = ssl.CERT_NONE
    client, server = TlsChannel(client_ctx, server_side=False), TlsChannel(server_ctx, server_side=True)
    to_server = client.start()
    for _ in range(5):
        _, to_client = server.receive(to_server)
        _, to_server = client.receive(to_client)
    assert client.established and server.established
    plain, _ = server.receive(client.send(b"hello"))
    assert plain == b"hello"
    back, _ = client.receive(server.send(b"world"))
    assert back == b"world"
    assert server.summary()["version"] in ("TLSv1.2", "TLSv1.3")


def test_unix_sockets_of_the_cluster_on_the_port(tmp_path: Path) -> None:
    """Where the protected cluster also listens on Unix sockets: the setting's directories,
    the build's default when unset, none when set to ''."""
    from agent.pgconf import unix_socket_directories

    pattern = conf(tmp_path / "1", "a", "port = 5432\nunix_socket_directories = '/run/pg, /tmp'\n")
    assert unix_socket_directories(5432, (pattern,)) == (pattern.replace("*", "a"), ["/run/pg", "/tmp"])
    assert unix_socket_directories(5433, (pattern,)) is None
    unset = conf(tmp_path / "2", "b", "port = 5432\n")
    assert unix_socket_directories(5432, (unset,))[1] == ["(the build's default)"]  # type: ignore[index]
    off = conf(tmp_path / "3", "c", "port = 5432\nunix_socket_directories = ''\n")
    assert unix_socket_directories(5432, (off,))[1] == []  # type: ignore[index]


def test_doctor_warns_of_clients_that_bypass_the_agent(tmp_path: Path) -> None:
    """doctor names the sockets and how to close the gap; nothing when they are off."""
    from agent.config import load_config
    from agent.doctor import _unix_socket_check

    config_file = tmp_path / "ringfence.toml"
    config_file.write_text('[[protect]]\nname = "pg"\nprotocol = "postgres"\nport = 5432\n')
    config = load_config(config_file)
    listening = conf(tmp_path / "1", "on", "port = 5432\nunix_socket_directories = '/var/run/postgresql'\n")
    check = _unix_socket_check(config, (listening,))
    assert check is not None and not check.ok
    assert "/var/run/postgresql" in check.detail and "unix_socket_directories = ''" in check.fix
    closed = conf(tmp_path / "2", "off", "port = 5432\nunix_socket_directories = ''\n")
    assert _unix_socket_check(config, (closed,)) is None


def test_keepalive_timing_follows_the_cluster_unless_configured(tmp_path: Path) -> None:
    """"auto" takes the cluster's tcp_keepalives_* (units as PostgreSQL reads them), 0 where
    it leaves them to the host; numbers in the config win."""
    from agent.config import ServiceKeepalive
    from agent.pgconf import keepalive_timing

    tuned = conf(tmp_path / "1", "a", "port = 5432\ntcp_keepalives_idle = '1min'\n"
                                      "tcp_keepalives_interval = 5\n")
    assert keepalive_timing(ServiceKeepalive(), 5432, (tuned,)) == (60, 5, 0)
    assert keepalive_timing(ServiceKeepalive(), 5433, (tuned,)) == (0, 0, 0)
    assert keepalive_timing(ServiceKeepalive(idle=30, count=3), 5432, (tuned,)) == (30, 5, 3)


def test_keepalive_options_reach_the_socket() -> None:
    """The agent's probes run with the timing it was given, or the host's."""
    import socket

    from agent.proxy import _keep_alive

    with socket.socket() as tuned, socket.socket() as plain:
        _keep_alive(tuned, (60, 5, 3))
        _keep_alive(plain)
        assert tuned.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
        assert [tuned.getsockopt(socket.IPPROTO_TCP, o)
                for o in (socket.TCP_KEEPIDLE, socket.TCP_KEEPINTVL, socket.TCP_KEEPCNT)] == [60, 5, 3]
        assert plain.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
        with open("/proc/sys/net/ipv4/tcp_keepalive_time") as f:
            assert plain.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) == int(f.read())
