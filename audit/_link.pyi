from collections.abc import Callable, Sequence
from typing import Any

def link(
    batch: Sequence[tuple[str, str | None, int, bytes, object]], seq: int, prev: bytes,
    stack: list[bytes], size: int, version: int, enc_type: dict[str, bytes],
    enc_sid: dict[str | None, bytes], encode_names: Callable[[str, str | None], bytes],
    counters: dict[str, int], session_start: str, session_end: str, /,
) -> tuple[list[tuple[bytes, bytes]], bytes, list[tuple[bytes, bytes]], list[tuple[int, int]],
           bytes, int]: ...

def batch_items(
    body: bytes | memoryview, types: frozenset[str], /,
) -> list[tuple[str, str | None, int, bytes, object]] | None: ...

def batch_frame(
    records: list[tuple[Any, ...]], pack: Callable[[Any], bytes], /,
) -> bytes: ...
