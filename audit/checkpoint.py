"""Signed checkpoints in the C2SP tlog-checkpoint / signed-note formats, and the signing key.

A checkpoint note is::

    <origin>
    <tree size>
    <base64 root hash>

    — <key name> <base64(4-byte key ID || Ed25519 signature)>

The key ID is the first 4 bytes of SHA-256(name || "\\n" || 0x01 || public key).
The private key is kept as a Go-``note``-style ``PRIVATE+KEY+name+id+base64``
line in a file of mode 0600; the verifier key is ``name+id+base64(0x01||pk)``.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from audit.errors import CheckpointError

ALG_ED25519 = b"\x01"
SIG_PREFIX = "\u2014 "


def key_id(name: str, public: bytes) -> bytes:
    """The 4-byte signed-note key ID of an Ed25519 key."""
    return hashlib.sha256(name.encode() + b"\n" + ALG_ED25519 + public).digest()[:4]


def _check_name(name: str) -> None:
    if not name or "+" in name or any(c.isspace() for c in name):
        raise CheckpointError(f"key name {name!r} must be non-empty, without spaces or '+'")


@dataclass(frozen=True, slots=True)
class Verifier:
    """A public key that checks checkpoint signatures."""

    name: str
    public: bytes

    @property
    def key_id(self) -> bytes:
        """The 4-byte key ID."""
        return key_id(self.name, self.public)

    def text(self) -> str:
        """The verifier key string ``name+hexid+base64``."""
        b64 = base64.b64encode(ALG_ED25519 + self.public).decode()
        return f"{self.name}+{self.key_id.hex()}+{b64}"

    @classmethod
    def parse(cls, text: str) -> Verifier:
        """Parse a verifier key string."""
        parts = text.strip().split("+", 2)
        if len(parts) != 3:
            raise CheckpointError("verifier key must look like name+keyid+base64")
        name, hexid, b64 = parts
        try:
            raw = base64.b64decode(b64, validate=True)
            want = bytes.fromhex(hexid)
        except (binascii.Error, ValueError):
            raise CheckpointError("verifier key is not valid hex/base64") from None
        if len(raw) != 33 or raw[:1] != ALG_ED25519:
            raise CheckpointError("verifier key is not an Ed25519 key")
        v = cls(name, raw[1:])
        if v.key_id != want:
            raise CheckpointError("verifier key ID does not match its key")
        return v

    def verify(self, message: bytes, signature: bytes) -> bool:
        """Whether ``signature`` is this key's signature of ``message``."""
        try:
            Ed25519PublicKey.from_public_bytes(self.public).verify(signature, message)
        except InvalidSignature:
            return False
        return True


class Signer:
    """An Ed25519 private key that signs checkpoint notes."""

    def __init__(self, name: str, private: Ed25519PrivateKey) -> None:
        _check_name(name)
        self.name = name
        self._key = private
        public = private.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
        self.verifier = Verifier(name, public)

    @classmethod
    def generate(cls, name: str) -> Signer:
        """A new random key."""
        return cls(name, Ed25519PrivateKey.generate())

    def text(self) -> str:
        """The private key line ``PRIVATE+KEY+name+hexid+base64(0x01||seed)``."""
        from cryptography.hazmat.primitives.serialization import NoEncryption, PrivateFormat

        seed = self._key.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())
        b64 = base64.b64encode(ALG_ED25519 + seed).decode()
        return f"PRIVATE+KEY+{self.name}+{self.verifier.key_id.hex()}+{b64}"

    @classmethod
    def parse(cls, text: str) -> Signer:
        """Parse a private key line."""
        parts = text.strip().split("+", 4)
        if len(parts) != 5 or parts[:2] != ["PRIVATE", "KEY"]:
            raise CheckpointError("private key must look like PRIVATE+KEY+name+keyid+base64")
        try:
            raw = base64.b64decode(parts[4], validate=True)
        except binascii.Error:
            raise CheckpointError("private key is not valid base64") from None
        if len(raw) != 33 or raw[:1] != ALG_ED25519:
            raise CheckpointError("private key is not an Ed25519 key")
        signer = cls(parts[2], Ed25519PrivateKey.from_private_bytes(raw[1:]))
        if signer.verifier.key_id.hex() != parts[3]:
            raise CheckpointError("private key ID does not match its key")
        return signer

    def sign_note(self, body: str) -> str:
        """The signed note: ``body`` (ending in a newline), a blank line, one signature line."""
        if not body.endswith("\n"):
            raise CheckpointError("note text must end with a newline")
        sig = self._key.sign(body.encode())
        b64 = base64.b64encode(self.verifier.key_id + sig).decode()
        return f"{body}\n{SIG_PREFIX}{self.name} {b64}\n"


def load_or_create_key(path: Path, name: str) -> Signer:
    """Read the signing key at ``path``, creating it (mode 0600) on first start."""
    try:
        return Signer.parse(path.read_text())
    except FileNotFoundError:
        pass
    signer = Signer.generate(name)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, (signer.text() + "\n").encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)
    pub = public_key_path(path)
    pub.write_text(signer.verifier.text() + "\n")
    return signer


def public_key_path(key_path: Path) -> Path:
    """Where the verifier key of ``key_path`` is written."""
    return key_path.with_name(key_path.name + ".pub")


def read_verifier(key_path: Path) -> Verifier:
    """The verifier key of the signing key at ``key_path`` (its .pub file, else the key itself)."""
    pub = public_key_path(key_path)
    if pub.exists():
        return Verifier.parse(pub.read_text())
    return Signer.parse(key_path.read_text()).verifier


@dataclass(frozen=True, slots=True)
class Checkpoint:
    """A tree head: origin, size and root hash, with the signed note it came from."""

    origin: str
    size: int
    root: bytes
    note: str = ""

    def body(self) -> str:
        """The checkpoint text that is signed."""
        return f"{self.origin}\n{self.size}\n{base64.b64encode(self.root).decode()}\n"

    def sign(self, signer: Signer) -> Checkpoint:
        """This checkpoint with its note signed by ``signer``."""
        return Checkpoint(self.origin, self.size, self.root, signer.sign_note(self.body()))


def parse_note(note: str) -> tuple[str, list[tuple[str, bytes, bytes]]]:
    """Split a signed note into its text and (name, key ID, signature) triples."""
    text, sep, sigs = note.rpartition("\n\n")
    if not sep or not sigs.endswith("\n"):
        raise CheckpointError("not a signed note (no blank line before signatures)")
    out: list[tuple[str, bytes, bytes]] = []
    for line in sigs[:-1].split("\n"):
        if not line.startswith(SIG_PREFIX):
            raise CheckpointError(f"malformed signature line {line!r}")
        fields = line[len(SIG_PREFIX) :].split(" ")
        if len(fields) != 2:
            raise CheckpointError(f"malformed signature line {line!r}")
        try:
            raw = base64.b64decode(fields[1], validate=True)
        except binascii.Error:
            raise CheckpointError("signature is not valid base64") from None
        if len(raw) < 5:
            raise CheckpointError("signature is too short")
        out.append((fields[0], raw[:4], raw[4:]))
    if not out:
        raise CheckpointError("signed note has no signatures")
    return text + "\n", out


def parse_checkpoint_body(text: str) -> tuple[str, int, bytes]:
    """Origin, size and root of a checkpoint text."""
    lines = text.split("\n")
    if len(lines) < 4 or lines[-1] != "":
        raise CheckpointError("checkpoint needs origin, size and root lines")
    origin, size_text, root_b64 = lines[0], lines[1], lines[2]
    if not origin:
        raise CheckpointError("checkpoint origin is empty")
    if not size_text.isdigit() or (size_text != "0" and size_text.startswith("0")):
        raise CheckpointError(f"checkpoint size {size_text!r} is not a decimal number")
    try:
        root = base64.b64decode(root_b64, validate=True)
    except binascii.Error:
        raise CheckpointError("checkpoint root is not valid base64") from None
    if len(root) != 32:
        raise CheckpointError("checkpoint root is not 32 bytes")
    return origin, int(size_text), root


def open_checkpoint(note: str, verifier: Verifier, origin: str | None = None) -> Checkpoint:
    """Parse a signed checkpoint note and check its signature (and origin when given)."""
    text, sigs = parse_note(note)
    cp_origin, size, root = parse_checkpoint_body(text)
    ours = [s for s in sigs if s[0] == verifier.name and s[1] == verifier.key_id]
    if not ours:
        names = ", ".join(f"{n}+{k.hex()}" for n, k, _ in sigs)
        raise CheckpointError(f"checkpoint is not signed by a known key (signed by {names})")
    if not any(verifier.verify(text.encode(), sig) for _, _, sig in ours):
        raise CheckpointError("checkpoint signature does not verify")
    if origin is not None and cp_origin != origin:
        raise CheckpointError(f"checkpoint origin {cp_origin!r} is not this log's {origin!r}")
    return Checkpoint(cp_origin, size, root, note)
