"""One writer per run folder: a lock file holding the writer's process id.

Two commands writing the same run folder at once would interleave their metrics rows and
overwrite each other's checkpoints. The first stage that writes takes the lock,
``runs/<name>/.lock`` (created with O_EXCL, so only one process can create it); the
process keeps it until it exits. A second process stops at once with one error naming
the holder's pid. A lock whose process no longer exists (a killed run) is stale and is
taken over. Reading (a stage found up to date) takes no lock. The processes of one
torchrun launch are one writer: rank 0 holds the lock (`minidpo.distributed`). A lock
the file system refuses (disk full, read-only) is one error naming the lock file, and
leaves neither the lock nor the folders made for it.
"""

from __future__ import annotations

import atexit
import contextlib
import os
from pathlib import Path

from minidpo import distributed
from minidpo.errors import MinidpoError

_HELD: set[Path] = set()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def _holder(path: Path) -> int | None:
    try:
        return int(path.read_text().strip() or 0) or None
    except (OSError, ValueError):
        return None


def _release(path: Path) -> None:
    if _holder(path) == os.getpid():
        path.unlink(missing_ok=True)
    _HELD.discard(path)


def release(folder: Path) -> None:
    """Give up the lock of `folder` before exit (a command that stops before writing)."""
    _release(Path(folder) / ".lock")


def hold(folder: Path) -> None:
    """Take the lock of `folder` for this process (a no-op if it holds it already);
    MinidpoError naming the holder if a live process holds it."""
    path = Path(folder) / ".lock"
    if path in _HELD or not distributed.is_writer():  # under torchrun, rank 0 holds it
        return
    made = [d for d in (path.parent, *path.parent.parents) if not d.exists()]
    try:
        _take(path)
    except OSError as e:  # refused by the file system: take back the folders made for it
        for d in made:  # the deepest first, each only if empty
            with contextlib.suppress(OSError):
                d.rmdir()
        raise MinidpoError(
            f"{path}: cannot take the run folder's lock ({e.strerror or e})"
        ) from None


def _take(path: Path) -> None:
    """Create the lock file `path` holding this process's id (see `hold`)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    for _ in range(2):  # a stale lock is removed once, then created afresh
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            pid = _holder(path)
            if pid is not None and pid != os.getpid() and _alive(pid):
                raise MinidpoError(
                    f"{path.parent}: in use by another minidpo process (pid {pid}); wait for "
                    "it, or use another --name"
                ) from None
            path.unlink(missing_ok=True)  # stale: its process is gone
            continue
        try:
            os.write(fd, f"{os.getpid()}\n".encode())
        except OSError:
            path.unlink(missing_ok=True)  # the empty file just created: no one's lock
            raise
        finally:
            os.close(fd)
        _HELD.add(path)
        atexit.register(_release, path)
        return
    raise MinidpoError(f"{path}: could not take the run folder's lock")
