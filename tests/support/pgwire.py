"""Raw PostgreSQL protocol for tests that speak it themselves (a socket, no driver)."""

from __future__ import annotations

import socket
import struct


def frames(data: bytes) -> list[tuple[bytes, bytes]]:
    """The whole messages in ``data``: (kind, body) each."""
    out = []
    while data:
        length = struct.unpack_from("!i", data, 1)[0]
        out.append((data[:1], data[5 : 1 + length]))
        data = data[1 + length :]
    return out


def until_ready(sock: socket.socket) -> bytes:
    """Everything the server sends up to and including the next ReadyForQuery."""
    reply = b""
    while not (len(reply) >= 6 and reply[-6:-1] == b"Z\x00\x00\x00\x05"):
        chunk = sock.recv(65536)
        assert chunk, f"connection closed after {reply[-300:]!r}"
        reply += chunk
    return reply
