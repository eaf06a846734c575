"""Files written whole or not at all: a participant's state, a saved audit log."""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import tempfile
from pathlib import Path


def replace_file(path: Path, data: bytes, *, keep_mode: bool = False) -> None:
    """Put `data` at `path` so that a crash, a full disk or Ctrl-C leaves either the old file or
    the new one whole, never a partial one. The new file is one of our own (O_EXCL, mode 0600),
    never a leftover with a looser mode; `keep_mode` gives it the mode of the file it replaces.
    Raises OSError, also for a `path` that is no regular file (nor a link to one): a rename
    would put the data in place of a device, a FIFO or a socket (as root, of /dev/null)."""
    for look in (os.lstat, os.stat):  # the name itself, then what a link names
        try:
            mode = look(path).st_mode
        except FileNotFoundError:
            break
        if not (stat.S_ISREG(mode) or stat.S_ISLNK(mode)):
            raise OSError(errno.EINVAL, "not a regular file", str(path))
    # In the same directory, so that os.replace is a rename on one file system.
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            if keep_mode:
                with contextlib.suppress(FileNotFoundError):
                    os.fchmod(f.fileno(), stat.S_IMODE(os.stat(path).st_mode))
            f.write(data)
            f.flush()
            os.fsync(f.fileno())  # on disk before it replaces the old file
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)  # and the rename itself


def _fsync_dir(directory: Path) -> None:
    """Make a rename in `directory` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems cannot sync a directory: the rename is all we can do
    finally:
        os.close(fd)
