"""Memory that processes on one machine share, so that large data reaches a worker uncopied.

A segment is an anonymous memory file (Linux memfd) held open by the process that made it.
Another process on the same machine maps it through ``/proc/PID/fd/FD`` while that process
holds it; the kernel frees it once nobody holds or maps it, so nothing is left behind, even by
a process that is killed. Where there is no memfd (not Linux), a private temporary file stands
in, removed when the segment is released.
"""

from __future__ import annotations

import functools
import mmap
import os
import sys
import weakref
from typing import TYPE_CHECKING, NamedTuple

from .errors import ParforError

if TYPE_CHECKING:
    from ._in_place import Pages

#: Buffers are placed at multiples of this, so that any dtype's alignment holds.
ALIGNMENT = 64
#: Segments at least this large are asked for huge pages, where the system grants them.
HUGE_PAGE = 2 * 2**20
#: Parts of numpy arrays this large are shared in place ...
IN_PLACE_BYTES = 16 * 2**20
#: ... if the other parts of their segment, which live as long as the array then, are at most
#: this large together.
IN_PLACE_COMPANY = 2**20
#: Linux's setting for transparent huge pages in shared memory.
SHMEM_HUGE_PAGES = "/sys/kernel/mm/transparent_hugepage/shmem_enabled"


class Address(NamedTuple):
    """Where another process on this machine finds a segment."""

    machine: str
    path: str
    inode: int
    size: int


#: Where a buffer lies in shared memory: its segment's address, and its start and end there.
Placement = tuple[Address, int, int]


def _machine() -> str:
    """This machine's identity for this boot: a segment address is meaningless elsewhere."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as file:
            return file.read().strip()
    except OSError:
        import socket

        return socket.gethostname()


class Segment:
    """A block of shared memory owned by this process; `release` (or garbage collection)
    gives it up, and the memory goes when the last process that maps it lets go."""

    def __init__(self, size: int) -> None:
        size = max(size, 1)  # an empty file cannot be mapped
        if hasattr(os, "memfd_create"):
            fd = os.memfd_create("parfor", os.MFD_CLOEXEC)
            path = f"/proc/{os.getpid()}/fd/{fd}"
            self._release = weakref.finalize(self, os.close, fd)
        else:
            import tempfile

            fd, path = tempfile.mkstemp(prefix="parfor-shared-")  # mode 0600
            self._release = weakref.finalize(self, _close_and_remove, fd, path)
        os.ftruncate(fd, size)
        self.fd = fd
        self.address = Address(_machine(), path, os.fstat(fd).st_ino, size)

    @classmethod
    def holding(cls, parts: list[memoryview], *, transient: bool = False,
                in_place: bool | None = None) -> tuple[Segment, list[tuple[int, int]]]:
        """A new segment with ``parts`` written one after another (aligned), and where each
        lies in it as ``(start, end)``.

        A large numpy array's part is then shared in place: the array's own memory becomes the
        segment's (see `_in_place`). ``transient`` parts (a task's items, a result), whose copy
        would go with their task, only where shared memory gets huge pages: in 4 KiB pages,
        the array would be read in those from then on, and a copy that goes that soon is worth
        less than the time (W6 took 6% to 12% longer). ``in_place`` False: never (None: as
        the ``share_in_place`` setting says now)."""
        pages = _in_place_pages(parts, transient, in_place)
        spans, end = [], 0
        for part, found in zip(parts, pages, strict=True):
            if found is None:
                start = -(-end // ALIGNMENT) * ALIGNMENT
            else:  # where it lies within a huge page in this process, to map it over
                start = end + (found[0] - end) % HUGE_PAGE
            end = start + part.nbytes
            spans.append((start, end))
        segment = cls(end)
        through_mapping = end >= HUGE_PAGE and huge_pages_on_request()
        if not through_mapping and not any(pages):
            for part, (start, _) in zip(parts, spans, strict=True):
                segment.write(start, part)
            return segment, spans
        with segment.map() as mapping, memoryview(mapping) as memory:
            write = functools.partial(_copy_into, memory) if through_mapping else segment.write
            for part, found, (start, _) in zip(parts, pages, spans, strict=True):
                if found is None:
                    write(start, part)
                else:
                    from ._in_place import move

                    move(part, *found, write, memory, segment.fd, start)
        return segment, spans

    def write(self, offset: int, data: memoryview) -> None:
        """Write ``data`` (flat bytes, as ``PickleBuffer.raw()`` gives them) at ``offset``."""
        while data:
            written = os.pwrite(self.fd, data, offset)
            data, offset = data[written:], offset + written

    def map(self) -> mmap.mmap:
        """This process's own writable mapping of the segment; a large one is asked for huge
        pages before its first write, which is when the memory is placed."""
        mapping = mmap.mmap(self.fd, self.address.size)
        if self.address.size >= HUGE_PAGE and huge_pages_on_request():
            try:
                mapping.madvise(mmap.MADV_HUGEPAGE)
            except OSError:  # a kernel that refuses it for shared mappings: 4 KiB pages, then
                pass
        return mapping

    def release(self) -> None:
        """No new process can map it from now on; the memory goes when the mappings do."""
        self._release()


@functools.cache
def huge_pages_on_request() -> bool:
    """Whether shared memory gets huge pages when a mapping asks for them (Linux's shmem THP
    setting is not "never"). A scan over memory in 4 KiB pages can take nearly twice as long
    (in a virtual machine, say); but where they cannot be had, writing through a mapping,
    a fault per 4 KiB page, is slower than ``pwrite``."""
    return hasattr(mmap, "MADV_HUGEPAGE") and shmem_huge_pages() not in (None, "never", "deny")


def shmem_huge_pages() -> str | None:
    """Linux's setting for huge pages in shared memory (``never``, ``advise``, ...), if any."""
    try:
        with open(SHMEM_HUGE_PAGES) as file:
            setting = file.read()
    except OSError:
        return None
    return setting[setting.find("[") + 1:setting.find("]")] or None


def _in_place_pages(parts: list[memoryview], transient: bool, allowed: bool | None
                    ) -> list[tuple[int, Pages] | None]:
    """For each part, where it starts and the pages of it to share in place, if any: only for
    one large part among small ones, since the array's mapping keeps the whole segment, all its
    parts, for as long as the array lives; ``transient`` ones only where shared memory gets huge
    pages (see `Segment.holding`)."""
    large = [i for i, part in enumerate(parts) if part.nbytes >= IN_PLACE_BYTES]
    found: list[tuple[int, Pages] | None] = [None] * len(parts)
    if (len(large) != 1 or transient and not huge_pages_on_request()
            or sum(part.nbytes for part in parts) - parts[large[0]].nbytes > IN_PLACE_COMPANY):
        return found
    if allowed is None:
        from ._config import current

        allowed = current()["share_in_place"]
    if not allowed:
        return found
    from ._in_place import find_pages  # not at import: it loads ctypes

    found[large[0]] = find_pages(parts[large[0]])
    return found


def _copy_into(memory: memoryview, offset: int, data: memoryview) -> None:
    memory[offset:offset + data.nbytes] = data


def _close_and_remove(fd: int, path: str) -> None:
    os.close(fd)
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def attach(address: Address, *, shared: bool) -> mmap.mmap:
    """Map a segment another process (or this one) made: ``shared`` to write into the same
    memory as every other process, else privately (writes stay in this process).

    Raises ParforError when the segment is on another machine or its owner let it go.
    """
    fd = _open(address, shared)
    try:
        return mmap.mmap(fd, address.size, access=mmap.ACCESS_WRITE if shared
                         else mmap.ACCESS_COPY, **_UNTRACKED)
    finally:
        os.close(fd)


#: A mapping that keeps no file descriptor of its own (Python 3.13 on): a program may hold
#: more mappings than it may open files.
_UNTRACKED = {"trackfd": False} if sys.version_info >= (3, 13) else {}


def copy_of(address: Address) -> bytearray:
    """A copy of a segment another process made: how a small one is better read than mapped,
    since a mapping holds a file descriptor for as long as it lives (a program that keeps a
    thousand results would run out of them). Raises as `attach` does."""
    fd = _open(address, shared=False)
    try:
        copy = bytearray(address.size)
        view, done = memoryview(copy), 0
        with open(fd, "rb", buffering=0, closefd=False) as file:
            while done < len(copy):
                read = file.readinto(view[done:])
                if not read:
                    raise ParforError(f"Shared memory {address.path} is shorter than it was "
                                      "made: its owner changed it.")
                done += read
        view.release()
        return copy
    finally:
        os.close(fd)


def _open(address: Address, shared: bool) -> int:
    """A file descriptor of a segment another process made, after checking that it is it."""
    if address.machine != _machine():
        raise ParforError(
            f"Shared memory {address.path} belongs to another machine: a worker can map it only "
            "on the machine that made it. Send such data as a plain value instead.")
    try:
        fd = os.open(address.path, os.O_RDWR if shared else os.O_RDONLY)
    except OSError as exc:
        raise ParforError(f"Shared memory {address.path} is gone: the process that made it "
                          f"released it or ended ({exc.strerror}).") from exc
    if os.fstat(fd).st_ino != address.inode:
        os.close(fd)
        raise ParforError(f"Shared memory {address.path} is gone: the process that made it "
                          "released it, and the name now means something else.")
    return fd


def still_shared(address: Address) -> bool:
    """Whether the process that made a segment still holds it (so new mappings can be made)."""
    try:
        return os.stat(address.path).st_ino == address.inode
    except OSError:
        return False
