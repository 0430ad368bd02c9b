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
