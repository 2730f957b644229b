"""Length-prefixed messages over pipes, shared by the processes backend and its workers."""

from __future__ import annotations

import struct
from typing import BinaryIO

_LENGTH = struct.Struct("!Q")
COUNT = struct.Struct("!Q")


def write_frame(stream: BinaryIO, kind: bytes, *body: bytes, flush: bool = True) -> None:
    """Write one message: its kind (one byte) and its body, given in parts so that large ones
    are not copied to be joined; the caller serializes writers. Without ``flush`` it may wait
    in the stream's buffer for the next message, to go out with it in one system call."""
    stream.write(_LENGTH.pack(1 + sum(len(part) for part in body)) + kind)
    for part in body:
        stream.write(part)
    if flush:
        stream.flush()


def read_frame(stream: BinaryIO) -> tuple[bytes, memoryview] | None:
    """The next ``(kind, body)``, or None when the other side closed the pipe (or died).

    The body is a view, not a copy: a large message is held in memory once.
    """
    header = _read_exactly(stream, _LENGTH.size)
    if header is None:
        return None
    message = _read_exactly(stream, _LENGTH.unpack(header)[0])
    if message is None:
        return None
    return message[:1], memoryview(message)[1:]


def _read_exactly(stream: BinaryIO, size: int) -> bytes | None:
    data = stream.read(size)
    if data is None or len(data) < size:  # a buffered reader only comes up short at EOF
        return None
    return data
