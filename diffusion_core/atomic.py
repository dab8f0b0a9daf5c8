"""Replacing a folder atomically, and cleaning what an interrupted replacement left behind.

:func:`atomic_folder` yields a new empty folder beside the target (``.<name>.tmp-<hex>``, created under
the umask like any folder); the caller fills it; on success it is fsynced and swapped in with one rename.
On Linux the swap is ``renameat2(RENAME_EXCHANGE)``, so readers see either the old folder or the new
one; elsewhere the old folder is renamed aside first (a crash between the two renames leaves it,
complete, beside the target). A failure before the swap leaves the target untouched and removes the
temporary folder. A process killed mid-save cannot clean up: the next save of the same target removes
the temporaries it recognises by name (:func:`remove_stale_temporaries`). Saving one target from two
processes at once is not supported.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

from diffusion_core.configuration import make_temp_dir_beside, remove_stale_temporaries


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths with Linux ``renameat2(RENAME_EXCHANGE)``; False where unsupported."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
        return False
    raise OSError(err, f"could not swap {str(a)!r} and {str(b)!r}: {os.strerror(err)}")


def swap_into_place(tmp: Path, folder: Path) -> Path | None:
    """Make ``tmp`` the new ``folder``; return where the old folder now lies (to delete), if any."""
    if not folder.exists():
        os.rename(tmp, folder)
        return None
    if _exchange(tmp, folder):
        return tmp
    aside = tmp.with_name(tmp.name + ".old")
    os.rename(folder, aside)
    try:
        os.rename(tmp, folder)
    except BaseException:
        os.rename(aside, folder)
        raise
    return aside


def fsync_dir(path: Path) -> None:
    """Flush a folder's entries to disk (best effort: not every platform can open a folder)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_folder(target: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty temporary folder to fill; on normal exit it replaces ``target`` atomically."""
    target = Path(target).absolute()
    if target.exists() and not target.is_dir():
        raise ValueError(f"folder: {str(target)!r} exists and is not a folder")
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(target)
    tmp = make_temp_dir_beside(target)
    try:
        yield tmp
        fsync_dir(tmp)
        old = swap_into_place(tmp, target)
        fsync_dir(target.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
