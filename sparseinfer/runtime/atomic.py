"""Crash-safe writes of an artifact directory: fsynced files, the atomic swap of a finished temporary
directory into place, and the per-directory lock that makes concurrent saves take turns."""

from __future__ import annotations

import contextlib
import ctypes
import glob
import os
import re
import shutil
import sys
import uuid
from pathlib import Path


def write_bytes(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def umask() -> int:
    try:  # reading it without setting it (os.umask would race with other threads)
        with open("/proc/self/status") as f:
            return int(next(line.split()[1] for line in f if line.startswith("Umask:")), 8)
    except (OSError, StopIteration, ValueError):
        return 0o022


def exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one atomic step (Linux renameat2 RENAME_EXCHANGE); False where that is
    not available (other systems, old libc, file systems without it)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    at_fdcwd, rename_exchange = -100, 2
    return renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


# The temporary folder of a save (`.NAME.tmp-xxxxxxxx`), and the old artifact it is replacing while the
# two swap places without renameat2 (`.NAME.old-xxxxxxxx`): never artifacts to load.
IN_FLIGHT = re.compile(r"\..+\.(tmp|old)-[0-9a-f]{8}")


@contextlib.contextmanager
def directory_lock(directory: Path):
    """Saves into one directory take turns (an exclusive flock on it, released when the process ends,
    however it ends); yields False where there is no such lock (not POSIX, or a file system without
    flock): saves then run side by side and leave interrupted saves' folders alone."""
    try:
        import fcntl
    except ImportError:
        yield False
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError:
            yield False
        else:
            yield True
    finally:
        os.close(fd)  # releases the lock


def remove_interrupted_saves(path: Path) -> None:
    """Temporary folders that saves to ``path`` left behind when they were killed (call with the lock)."""
    for p in path.parent.glob(f".{glob.escape(path.name)}.tmp-*"):
        if IN_FLIGHT.fullmatch(p.name) and p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)


def replace_directory(tmp: Path, path: Path) -> None:
    """Move the finished temp directory into place; an existing artifact goes only now. On Linux
    the two directories are swapped atomically; elsewhere the old one is renamed aside first, so
    a crash between the two renames leaves it as ``.<name>.old-*`` next to the target."""
    if path.exists() and exchange(tmp, path):
        fsync_dir(path.parent)
        shutil.rmtree(tmp, ignore_errors=True)  # now holds the old artifact
        return
    old = None
    if path.exists():
        old = path.with_name(f".{path.name}.old-{uuid.uuid4().hex[:8]}")
        os.rename(path, old)
    try:
        os.rename(tmp, path)
    except BaseException:
        if old is not None:
            os.rename(old, path)
        raise
    fsync_dir(path.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
