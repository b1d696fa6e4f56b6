"""The Linux system calls mergecli uses that Python's `os` lacks, through libc: an atomic exchange of
two paths (renameat2 RENAME_EXCHANGE), extent preallocation (fallocate) and early writeback
(sync_file_range). Each answers False where the system or the file system has no such call, and the
caller falls back.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import functools
import os
from pathlib import Path

_AT_FDCWD = -100
_RENAME_EXCHANGE = 2
_UNSUPPORTED = (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP)


@functools.cache
def _libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    return ctypes.CDLL(name, use_errno=True) if name else None


def exchange(first: Path, second: Path) -> bool:
    """Swap two paths atomically; False where the system cannot.

    Raises:
        OSError: the exchange failed for another reason (a missing path, permissions).
    """
    renameat2 = getattr(_libc(), "renameat2", None)
    if renameat2 is None:
        return False
    if renameat2(_AT_FDCWD, os.fsencode(first), _AT_FDCWD, os.fsencode(second), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in _UNSUPPORTED:  # no such call, or not on this file system
        return False
    raise OSError(code, os.strerror(code), str(second))


def preallocate(fd: int, size: int) -> bool:
    """Reserve `size` bytes of disk for a new file (mode 0 fallocate: no zeros written), so that its
    writes need no block allocation each and a full disk fails now; False where unsupported.

    Raises:
        OSError: ENOSPC (no room) and other real failures.
    """
    fallocate = getattr(_libc(), "fallocate", None)
    if fallocate is None or size <= 0:
        return False
    if fallocate(fd, 0, ctypes.c_long(0), ctypes.c_long(size)) == 0:
        return True
    code = ctypes.get_errno()
    if code in _UNSUPPORTED:
        return False
    raise OSError(code, os.strerror(code))


_SYNC_FILE_RANGE_WRITE = 2


def start_writeback(fd: int, offset: int, nbytes: int) -> bool:
    """Ask the kernel to start writing `nbytes` at `offset` of `fd` to disk, without waiting
    (sync_file_range SYNC_FILE_RANGE_WRITE), so that little is left for the fsync at the end;
    False where unsupported (the final fsync then does all the work)."""
    sync_file_range = getattr(_libc(), "sync_file_range", None)
    if sync_file_range is None or nbytes <= 0:
        return False
    return sync_file_range(fd, ctypes.c_int64(offset), ctypes.c_int64(nbytes), _SYNC_FILE_RANGE_WRITE) == 0
