"""What is resident: a file's pages in the page cache (mincore), making a
file cold (posix_fadvise DONTNEED) or partly warm, and this process's
resident memory (RSS)."""

from __future__ import annotations

import ctypes
import ctypes.util
import mmap
import os
import re
import resource
from typing import Any

import numpy as np

PAGE = mmap.PAGESIZE
MADV_DONTNEED = 4

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
_libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]


def resident_pages(path: str | os.PathLike[str], offset: int = 0, length: int | None = None) -> np.ndarray:
    """For each page of path[offset:offset+length] (from the page containing
    `offset`), whether it is in the page cache: mincore on a fresh read-only
    mapping, which maps nothing by itself."""
    size = os.path.getsize(path)
    length = size - offset if length is None else min(length, size - offset)
    if length <= 0:
        return np.zeros(0, bool)
    start = offset - offset % PAGE
    span = length + offset - start
    with open(path, "rb") as f:
        m = mmap.mmap(f.fileno(), span, access=mmap.ACCESS_READ, offset=start)
        try:
            vec = np.zeros((span + PAGE - 1) // PAGE, np.uint8)
            if _libc.mincore(_map_address(m), span, vec.ctypes.data) != 0:
                raise OSError(ctypes.get_errno(), f"mincore failed on {os.fspath(path)!r}")
            return (vec & 1).astype(bool)
        finally:
            m.close()


def residency(path: str | os.PathLike[str], offset: int = 0, length: int | None = None) -> float:
    """Fraction of the pages of path[offset:offset+length] in the page cache."""
    pages = resident_pages(path, offset, length)
    return float(pages.mean()) if len(pages) else 1.0


def _map_address(m: mmap.mmap) -> int:
    """Address of a read-only mmap's first byte (numpy exposes it)."""
    return int(np.frombuffer(m, np.uint8).ctypes.data)


def evict(path: str | os.PathLike[str], require: float = 0.01) -> float:
    """Drop the file's clean pages from the page cache; returns the fraction
    still resident. Pages mapped by a live process are not dropped, so call
    it with the file unmapped (cold runs happen in child processes) or after
    unmap()."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    left = residency(path)
    if left > require:
        try:  # root only; harmless elsewhere
            with open("/proc/sys/vm/drop_caches", "w") as f:
                f.write("1\n")
        except OSError:
            pass
        left = residency(path)
    return left


def unmap(arr: Any) -> None:
    """Drop this process's pages of a mapped array (MADV_DONTNEED): the data
    stays in the page cache, and evict() can then drop it."""
    a = np.asarray(arr).view(np.uint8).reshape(-1)
    addr = int(a.ctypes.data)
    start = addr - addr % PAGE
    _libc.madvise(start, addr + a.nbytes - start, MADV_DONTNEED)


def read_instances(path: str, base: int, instance_bytes: int, idx: np.ndarray) -> None:
    """Bring the given instances' bytes into the page cache (plain reads)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        for i in np.sort(idx):
            os.pread(fd, instance_bytes, base + int(i) * instance_bytes)
    finally:
        os.close(fd)


def warm(path: str | os.PathLike[str]) -> None:
    """Read a whole file once so that it sits in the page cache."""
    with open(path, "rb", buffering=0) as f:
        buf = bytearray(16 << 20)
        while f.readinto(buf):
            pass


# -- resident memory ----------------------------------------------------------------


def rss_bytes() -> int:
    """Resident set size of this process now (/proc/self/statm)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


def rss_detail() -> dict[str, int]:
    """RssAnon / RssFile / RssShmem in bytes (Linux /proc/self/status): file
    pages are page-cache pages mapped into this process, anon pages its own
    heap."""
    out: dict[str, int] = {}
    try:
        with open("/proc/self/status") as f:
            for line in f:
                m = re.match(r"(RssAnon|RssFile|RssShmem):\s+(\d+) kB", line)
                if m:
                    out[m.group(1)] = int(m.group(2)) * 1024
    except OSError:  # not Linux
        pass
    return out


def peak_rss_bytes() -> int:
    """Peak RSS of this process so far (getrusage; Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
