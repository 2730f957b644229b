"""A large numpy array's own memory turned into shared memory, in place, so that the data sent
to workers exists once on the machine rather than once in the caller and once more for them.

Once a piece of the array is copied into a segment, the segment is mapped over the array's own
pages, privately (copy-on-write), and the kernel frees those pages. The array keeps its address,
contents and meaning: what the caller writes into it afterwards gets pages of its own (a copy
each, as after a fork), and the workers' view stays as it was sent.

An array the caller writes into between calls gets memory of its own back at the next call,
and is copied as usual from then on: each call would otherwise cost its writes a page copy.

It is done only where nothing else can notice: the whole pages of the part sent (never the
block's first page, which glibc's header lies in), of memory that numpy's default allocator
took from glibc's ``malloc`` as a block mapped for it alone (which ``free`` unmaps whole), in
private anonymous mappings (or ones shared in place before) that carry no special setting
(locked, not inherited by forks, left out of core dumps, ...), on Linux. Since the block is
then made of several mappings, glibc grows or shrinks it by copying, as for any other block,
not by remapping it. Anything else (another allocator, a memory-mapped file, the heap) is left
alone and copied as usual.
"""

from __future__ import annotations

import ctypes
import functools
import mmap
import os
import struct
import sys
import weakref
from collections.abc import Callable
from typing import Any, NamedTuple

#: Copied, then mapped over, at a time: an array sent for the first time never exists twice in
#: full, even briefly.
PIECE = 2 * 2**20
#: Given back memory of its own at a time; each is a mapping of its own from then on. (The
#: segment's memory goes only once the last piece is restored: restoring an array needs its
#: size again, briefly, as copying it does.)
RESTORED_AT_ONCE = 32 * PIECE
#: glibc's header just before the memory ``malloc`` gives: the block's offset and its size,
#: whose low bits are flags.
_HEADER = struct.Struct("=QQ")
_FLAGS = 0b111
_IS_MMAPPED = 0b010
#: Linux's flags for mmap on the machines where this is done.
_MAP_FIXED = 0x10
_MAP_FIXED_NOREPLACE = 0x100000
_MREMAP_MAYMOVE, _MREMAP_FIXED = 1, 2
_RW = mmap.PROT_READ | mmap.PROT_WRITE
_MAP_FAILED = ctypes.c_void_p(-1).value
_MACHINES = ("x86_64", "aarch64")
#: How Linux names a mapping of a parfor segment (a memory file, which has no name on disk).
_SHARED_BEFORE = "/memfd:parfor (deleted)"
#: A page's bits in /proc/self/pagemap: in memory; mapped by this process alone.
_PRESENT = 1 << 63
_EXCLUSIVE = 1 << 56
#: Settings of a mapping (smaps' VmFlags) that mapping a segment over it would drop: locked,
#: not inherited or wiped by forks, left out of core dumps, I/O or raw page frames, watched by
#: userfaultfd, memory tagging.
_REFUSED = frozenset({"lo", "dc", "wf", "dd", "io", "pf", "um", "uw", "ui", "mt"})


#: The blocks of arrays the caller wrote into after they were shared in place, while those
#: live: copied as usual from then on, in memory of their own again.
_written_after_sharing: set[int] = set()


class Pages(NamedTuple):
    """Whole pages of an array's memory that may be shared in place: where they start and
    end."""

    start: int
    end: int


def find_pages(part: memoryview) -> tuple[int, Pages] | None:
    """Where ``part``'s memory starts, and its whole pages that may be shared in place (see
    the module's docstring); None if none may."""
    libc = _libc()
    if libc is None:
        return None
    owner = owning_array(part.obj)
    if owner is None or not _default_allocated(owner):
        return None
    page = mmap.PAGESIZE
    data = owner.__array_interface__["data"][0]
    block = data - _HEADER.size
    if block % page or block in _written_after_sharing:
        return None
    mappings = _plain_mappings(block, -(-(data + owner.nbytes) // page) * page)
    if mappings is None:
        return None
    if any(mapping.written_since for mapping in mappings):
        _stop_sharing(owner, block, mappings, libc)
        return None
    offset, size_and_flags = _HEADER.unpack(ctypes.string_at(block, _HEADER.size))
    size = size_and_flags & ~_FLAGS
    if (offset or size_and_flags & _FLAGS != _IS_MMAPPED or size % page
            or size < _HEADER.size + owner.nbytes):
        return None
    address = buffer_address(part)
    if not data <= address <= address + part.nbytes <= data + owner.nbytes:
        return None
    pages = Pages(-(-address // page) * page, (address + part.nbytes) // page * page)
    if pages.end <= pages.start or _partly_replaced(pages, mappings):
        return None
    if not _own_pages_in_memory(pages, mappings):
        return None  # pages never written (the zero page), shared with a fork, or swapped out
    return address, pages


def _partly_replaced(pages: Pages, mappings: list[_Mapping]) -> bool:
    """Whether sharing ``pages`` would replace part of an earlier segment's mappings only: the
    rest would keep that segment, with the replaced pages, for as long as the array lives."""
    overlapped = {m.inode for m in mappings
                  if m.shared_before and m.start < pages.end and pages.start < m.end}
    return any(m.inode in overlapped and not pages.start <= m.start < m.end <= pages.end
               for m in mappings)


def _own_pages_in_memory(pages: Pages, mappings: list[_Mapping]) -> bool:
    """Whether every page of anonymous memory is in memory and this process's alone: a page
    never written is the shared zero page, and a page inherited by a fork is the parent's too;
    a segment would hold a copy of either for as long as the array lives. (The pages of a
    segment shared in place before are all written; this process maps only those it read.)"""
    numpy = sys.modules["numpy"]
    page = mmap.PAGESIZE
    with open("/proc/self/pagemap", "rb", buffering=0) as pagemap:
        for mapping in mappings:
            low, high = max(mapping.start, pages.start), min(mapping.end, pages.end)
            if mapping.shared_before or low >= high:
                continue
            entries = bytearray((high - low) // page * 8)
            with memoryview(entries) as view:
                read = 0
                while read < len(entries):
                    got = os.preadv(pagemap.fileno(), [view[read:]], low // page * 8 + read)
                    if got <= 0:
                        return False
                    read += got
            required = numpy.uint64(_PRESENT | _EXCLUSIVE)
            if not bool(((numpy.frombuffer(entries, dtype=numpy.uint64) & required)
                         == required).all()):
                return False
    return True


def _stop_sharing(owner: Any, block: int, mappings: list[_Mapping], libc: _Libc) -> None:
    """Give an array the caller writes into between calls memory of its own again, and copy
    it as usual from then on: shared again, it would pay a page copy for each page written,
    after every call, and keep the pages it replaced."""
    _written_after_sharing.add(block)
    weakref.finalize(owner, _written_after_sharing.discard, block)
    for mapping in mappings:
        if mapping.shared_before:
            libc.restore(mapping.start, mapping.end - mapping.start)


def move(part: memoryview, address: int, pages: Pages,
         write: Callable[[int, memoryview], None], memory: memoryview, fd: int,
         offset: int) -> None:
    """Copy ``part`` (at ``address``) with ``write`` into the segment ``fd`` (``memory``, mapped)
    at ``offset``, which lies where ``address`` does within a `PIECE`; map each copied piece of
    ``pages`` over the part's own pages. Once the kernel refuses to map a piece, the rest is
    only copied."""
    libc = _libc()
    mapping = libc is not None
    position = 0
    while position < part.nbytes:
        here = address + position
        size = min(PIECE - here % PIECE, part.nbytes - position)
        write(offset + position, part[position:position + size])
        low, high = max(here, pages.start), min(here + size, pages.end)
        if mapping and low < high:
            copied = memory[offset + low - address:offset + high - address]
            mapping = libc.map_over(low, high - low, fd, offset + low - address, copied)
        position += size


def owning_array(obj: object) -> Any:
    """The numpy array that owns ``obj``'s memory (the base of a view), if any."""
    numpy = sys.modules.get("numpy")
    if numpy is None:
        return None
    while isinstance(obj, numpy.ndarray) and not obj.flags.owndata:
        obj = obj.base
    return obj if isinstance(obj, numpy.ndarray) else None


def _default_allocated(array: Any) -> bool:
    """Whether numpy's default allocator made the array's memory (with glibc's ``malloc``)."""
    handler_name = _handler_name(sys.modules["numpy"])
    return handler_name is not None and handler_name(array) == "default_allocator"


def _handler_name(numpy: Any) -> Callable[[object], str | None] | None:
    for module in ("_core", "core"):  # numpy 2, then 1 (whose _core is not loaded)
        found = getattr(getattr(getattr(numpy, module, None), "multiarray", None),
                        "get_handler_name", None)
        if found is not None:
            return found
    return None


def buffer_address(part: memoryview) -> int:
    """Where a buffer's memory starts."""
    numpy = sys.modules["numpy"]
    return numpy.frombuffer(part, dtype=numpy.uint8).__array_interface__["data"][0]


class _Mapping(NamedTuple):
    """A mapping over an array's memory: its range, whether it is a segment (which one) shared
    in place before, and whether the array was written into there since."""

    start: int
    end: int
    shared_before: bool
    inode: str
    written_since: bool


def _plain_mappings(start: int, end: int) -> list[_Mapping] | None:
    """The mappings over ``[start, end)``, if they are private, readable and writable, and
    anonymous or shared in place before, with nothing else among them (a file, the heap, the
    stack) and no setting that mapping over them would drop; else None."""
    found: list[_Mapping] = []
    reached, current = start, False
    try:
        with open("/proc/self/smaps") as smaps:
            lines = smaps.readlines()
    except OSError:
        return None
    for line in lines:
        key, _, rest = line.partition(" ")
        if not key.endswith(":"):  # a mapping's first line: its range, mode, file
            if reached >= end:
                return found
            low, high = (int(bound, 16) for bound in key.split("-"))
            current = high > reached
            if not current:
                continue
            fields = rest.split(maxsplit=4)
            name = fields[4].rstrip("\n") if len(fields) > 4 else ""
            shared_before = name == _SHARED_BEFORE
            if low > reached or fields[0] != "rw-p" or not (
                    shared_before
                    or fields[3] == "0" and (not name or name.startswith("[anon:"))):
                return None
            found.append(_Mapping(max(low, start), min(high, end), shared_before, fields[3],
                                  False))
            reached = high
        elif current and (key == "VmFlags:" and not _REFUSED.isdisjoint(rest.split())
                          or key == "ProtectionKey:" and rest.strip() != "0"):
            return None
        elif current and key == "Anonymous:" and found[-1].shared_before:
            found[-1] = found[-1]._replace(written_since=int(rest.split()[0]) > 0)
    return found if reached >= end else None


class _Libc:
    """The system calls in-place sharing needs (mmap, munmap, mremap, madvise), through
    glibc."""

    def __init__(self, glibc: ctypes.CDLL) -> None:
        self._mmap = glibc.mmap
        self._mmap.restype = ctypes.c_void_p
        self._mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                               ctypes.c_int, ctypes.c_long]
        self._munmap = glibc.munmap
        self._munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
        self._mremap = glibc.mremap
        self._mremap.restype = ctypes.c_void_p
        self._mremap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t,
                                 ctypes.c_int, ctypes.c_void_p]
        self._madvise = glibc.madvise
        self._madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]

    def map_over(self, address: int, length: int, fd: int, offset: int,
                 copied: memoryview) -> bool:
        """Map the file privately over the range, replacing its pages; whether it did. If it
        did not, the range holds what it held, or else what ``copied`` holds."""
        placed = self._mmap(address, length, _RW, mmap.MAP_PRIVATE | _MAP_FIXED, fd, offset)
        if placed == address:
            return True
        self._put_back(address, length, ctypes.addressof(ctypes.c_char.from_buffer(copied)))
        return False

    def restore(self, address: int, length: int) -> None:
        """Make the range private anonymous memory again, holding what it holds, so that the
        file it maps goes (it is then mapped nowhere); `RESTORED_AT_ONCE` at a time."""
        end = address + length
        while address < end:
            size = min(RESTORED_AT_ONCE - address % RESTORED_AT_ONCE, end - address)
            self._restore_piece(address, size)
            address += size

    def _restore_piece(self, address: int, length: int) -> None:
        scratch = self._mmap(None, length + PIECE, _RW, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS,
                             -1, 0)
        if scratch in (None, _MAP_FAILED):
            return  # no memory to be had: the range keeps its mapping, and its contents
        copy = scratch + (address - scratch) % PIECE  # where it lies within a huge page
        self._madvise(copy, length, mmap.MADV_HUGEPAGE)  # as numpy asks for its arrays
        ctypes.memmove(copy, address, length)
        if self._mremap(copy, length, length, _MREMAP_MAYMOVE | _MREMAP_FIXED,
                        address) == address:
            if copy > scratch:  # the scratch's rest, before and after it
                self._munmap(scratch, copy - scratch)
            self._munmap(copy + length, scratch + PIECE - copy)
        else:
            self._put_back(address, length, copy)
            self._munmap(scratch, length + PIECE)

    def _put_back(self, address: int, length: int, source: int) -> None:
        """After a failed remapping of the range: kernels before 6.12 could drop its old pages
        before failing; if they are gone, map memory there and copy ``source`` into it."""
        placed = self._mmap(address, length, _RW, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS
                            | _MAP_FIXED_NOREPLACE, -1, 0)
        if placed == address:
            ctypes.memmove(address, source, length)
        elif placed not in (None, _MAP_FAILED):  # a kernel without NOREPLACE: it chose a place
            self._munmap(placed, length)


@functools.cache
def _libc() -> _Libc | None:
    """glibc's calls, or None where in-place sharing cannot be done: not Linux on a known
    machine, or ``malloc`` is not glibc's."""
    if sys.platform != "linux" or os.uname().machine not in _MACHINES or sys.maxsize < 2**32:
        return None
    try:
        os.confstr("CS_GNU_LIBC_VERSION")
        process, glibc = ctypes.CDLL(None), ctypes.CDLL("libc.so.6")
    except (OSError, ValueError):
        return None
    if _symbol(process.malloc) != _symbol(glibc.malloc):  # another allocator is preloaded
        return None
    return _Libc(glibc)


def _symbol(function: object) -> int | None:
    return ctypes.cast(function, ctypes.c_void_p).value
