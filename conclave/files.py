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
    A symbolic link stays one: the file it names is replaced (in that file's directory), as a
    state kept on another volume through a link must be. Raises OSError, also for a `path`
    that is no regular file (nor a link to one: a rename would put the data in place of a
    device, a FIFO or a socket, as root of /dev/null), and for a link to nothing, naming where
    it points (an unmounted volume: a file made there would be a new one, in the wrong place)."""
    target = _link_target(path)
    with contextlib.suppress(FileNotFoundError):
        if not stat.S_ISREG(os.lstat(target).st_mode):
            raise OSError(errno.EINVAL, "not a regular file", str(path))
    # In the same directory, so that os.replace is a rename on one file system.
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            if keep_mode:
                with contextlib.suppress(FileNotFoundError):
                    os.fchmod(f.fileno(), stat.S_IMODE(os.stat(target).st_mode))
            f.write(data)
            f.flush()
            os.fsync(f.fileno())  # on disk before it replaces the old file
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(target.parent)  # and the rename itself


def remove_file(path: Path) -> Path:
    """Remove the file at `path`, as `replace_file` writes it: a symbolic link stays, and the
    file it names (at the end of its links) goes; the file removed is returned. Nothing is
    done for a missing file or a link to nothing. Raises OSError for a loop of links, and for
    a `path` (or the file it names) that is no regular file."""
    try:
        target = _link_target(path)
    except OSError as exc:
        if exc.errno == errno.ENOENT:  # a link to nothing: no file of ours to remove
            return path
        raise
    try:
        if not stat.S_ISREG(os.lstat(target).st_mode):
            raise OSError(errno.EINVAL, "not a regular file", str(target))
        os.unlink(target)
    except FileNotFoundError:
        return target
    _fsync_dir(target.parent)
    return target


def _link_target(path: Path) -> Path:
    """`path`, or the file it names at the end of its links (which must exist: see
    `replace_file`); OSError for a loop of links."""
    try:
        if not stat.S_ISLNK(os.lstat(path).st_mode):
            return path
    except FileNotFoundError:
        return path
    target = Path(os.path.realpath(path))
    try:
        os.stat(path)  # a loop raises ELOOP here
    except FileNotFoundError:
        raise OSError(
            errno.ENOENT, f"a symbolic link to {target}, which does not exist", str(path)
        ) from None
    return target


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
