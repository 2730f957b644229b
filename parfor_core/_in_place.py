"""A large numpy array's own memory turned into shared memory, in place, so that its data exists
once on the machine rather than once in the caller and once more for the workers.

Once a piece of the array is copied into a segment, the segment is mapped over the array's own
pages, privately (copy-on-write), and the kernel frees those pages. The array keeps its
address, contents and meaning: what the caller writes into it afterwards gets pages of its own,
and the workers' view stays as it was sent.

It is done only where nothing else can notice: memory that numpy's default allocator took from
glibc's ``malloc`` as a block mapped for it alone (which ``free`` unmaps whole), in a private
anonymous mapping (or one shared in place before), on Linux. Anything else (another allocator,
a memory-mapped file, the heap) is left alone and copied as usual.
"""

from __future__ import annotations

import ctypes
import functools
import mmap
import os
import struct
import sys
from collections.abc import Callable
from typing import NamedTuple

#: Copied, then mapped over, at a time: the data never exists twice in full, even briefly.
PIECE = 2 * 2**20
#: File room kept past the data. glibc grows such a block in place by remapping it
#: (``ndarray.resize``), which extends the mapping over the file; a touch past the file's end
#: would be a bus error. Room in a memory file costs nothing until written.
ROOM = 1 << 40
#: glibc's header just before the memory ``malloc`` gives: the block's offset and its size,
#: whose low bits are flags.
_HEADER = struct.Struct("=QQ")
_FLAGS = 0b111
_IS_MMAPPED = 0b010
#: Linux's value of MAP_FIXED on the machines where it is used.
_MAP_FIXED = 0x10
_MACHINES = ("x86_64", "aarch64")
#: How Linux names a mapping of a parfor segment whose descriptor is closed.
_SHARED_BEFORE = "/memfd:parfor (deleted)"


class Block(NamedTuple):
    """Memory ``malloc`` mapped for one array alone: its address and length, whole pages."""

    start: int
    length: int


def find_block(part: memoryview) -> tuple[Block, int] | None:
    """The block holding ``part``'s memory, and where the part starts in it, if the block may be
    shared in place (see the module's docstring); else None."""
    if _map_fixed() is None:
        return None
    owner = _owning_array(part.obj)
    if owner is None:
        return None
    data = owner.__array_interface__["data"][0]
    start = data - _HEADER.size
    if start % mmap.PAGESIZE or not _private_memory(start, data + owner.nbytes):
        return None
    offset, size = _HEADER.unpack(ctypes.string_at(start, _HEADER.size))
    length = size & ~_FLAGS
    if (offset or size & _FLAGS != _IS_MMAPPED or length % mmap.PAGESIZE
            or length < _HEADER.size + owner.nbytes
            or not _private_memory(start, start + length)):
        return None
    return Block(start, length), _address(part) - start


def move(block: Block, memory: memoryview, fd: int, offset: int) -> None:
    """Copy ``block`` into ``memory`` (the segment ``fd``, mapped) at ``offset``, which must
    lie at the same place as the block within a `PIECE`; map each copied piece over the
    block's own pages. A piece the kernel will not map keeps its private pages."""
    map_fixed = _map_fixed()
    source = memoryview((ctypes.c_char * block.length).from_address(block.start)).cast("B")
    position, mapping = 0, map_fixed is not None
    while position < block.length:
        size = min(PIECE - (block.start + position) % PIECE, block.length - position)
        memory[offset + position:offset + position + size] = source[position:position + size]
        if mapping:
            mapping = map_fixed(block.start + position, size, fd, offset + position)
        position += size


def _owning_array(obj: object) -> object | None:
    """The numpy array that owns ``obj``'s memory, if numpy's default allocator made it."""
    numpy = sys.modules.get("numpy")
    if numpy is None:
        return None
    while isinstance(obj, numpy.ndarray) and not obj.flags.owndata:
        obj = obj.base
    if not isinstance(obj, numpy.ndarray):
        return None
    handler_name = _handler_name(numpy)
    return obj if handler_name is not None and handler_name(obj) == "default_allocator" else None


def _handler_name(numpy: object) -> Callable[[object], str | None] | None:
    for module in ("_core", "core"):
        found = getattr(getattr(getattr(numpy, module, None), "multiarray", None),
                        "get_handler_name", None)
        if found is not None:
            return found
    return None


def _address(part: memoryview) -> int:
    """Where a buffer's memory starts."""
    numpy = sys.modules["numpy"]
    return numpy.frombuffer(part, dtype=numpy.uint8).__array_interface__["data"][0]


def _private_memory(start: int, end: int) -> bool:
    """Whether ``[start, end)`` lies in private, readable and writable mappings that are
    anonymous or shared in place before, with nothing else (a file, the heap, the stack)."""
    reached = start
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split(maxsplit=5)
            low, high = (int(bound, 16) for bound in fields[0].split("-"))
            if high <= reached:
                continue
            name = fields[5].rstrip("\n") if len(fields) > 5 else ""
            if low > reached or fields[1] != "rw-p" or not (
                    (fields[4] == "0" and (not name or name.startswith("[anon:")))
                    or name == _SHARED_BEFORE):
                return False
            reached = high
            if reached >= end:
                return True
    return False


@functools.cache
def _map_fixed() -> Callable[[int, int, int, int], bool] | None:
    """``map_fixed(address, length, fd, offset)``: map the file privately over ``address``,
    replacing what was there; whether it did. None where in-place sharing cannot be done:
    not Linux, not glibc's ``malloc``, or an unknown value of MAP_FIXED."""
    if sys.platform != "linux" or os.uname().machine not in _MACHINES:
        return None
    try:
        os.confstr("CS_GNU_LIBC_VERSION")
        process, glibc = ctypes.CDLL(None, use_errno=True), ctypes.CDLL("libc.so.6")
    except (OSError, ValueError):
        return None
    if _symbol(process.malloc) != _symbol(glibc.malloc):  # another allocator is preloaded
        return None
    mmap_ = glibc.mmap
    mmap_.restype = ctypes.c_void_p
    mmap_.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                      ctypes.c_int, ctypes.c_long]
    protection, flags = mmap.PROT_READ | mmap.PROT_WRITE, mmap.MAP_PRIVATE | _MAP_FIXED

    def map_fixed(address: int, length: int, fd: int, offset: int) -> bool:
        return mmap_(address, length, protection, flags, fd, offset) == address

    return map_fixed


def _symbol(function: object) -> int | None:
    return ctypes.cast(function, ctypes.c_void_p).value
