from collections.abc import Callable
from typing import Any

def datarows(data: bytes | bytearray | memoryview, pos: int, /) -> tuple[int, int, int]: ...
def allowed_query(
    data: bytes, reused: dict[bytes, Any], max_message: int, max_text: int,
    plain: Callable[[str], Any], /,
) -> bytes | None: ...
def plain_reply(
    data: bytes | bytearray | memoryview, max_message: int, duration_ms: float, /,
) -> tuple[bytes, str] | None: ...
def bound_execute(
    data: bytes | bytearray | memoryview, max_message: int, /,
) -> tuple[tuple[str, str, tuple[int, ...]] | None, str, str, tuple[int, ...],
           list[bytes | None]] | None: ...
def client_step(
    plain: Callable[[str], Any], pending: type, pending_fields: tuple[tuple[str, Any, bool], ...],
    max_cached_text: int, side: Any, data: bytes, /,
) -> int: ...
def server_step(side: Any, data: bytes, /) -> int: ...
