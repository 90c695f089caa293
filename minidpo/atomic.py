"""Atomic file writes: a temp file in the same folder, fsync, then rename.

A stage killed mid-write leaves either the old file or the new one, never half
of one, so a rerun can trust whatever it finds. Every file minidpo writes goes
through these helpers (metrics logs are appended line by line and truncated on
resume, see `minidpo.training`). The temp file gets the mode a plain ``open`` would
have given (0666 less the umask), not ``mkstemp``'s private 0600.

A write the file system refuses (disk full, read-only, permission denied) is one
MinidpoError naming the path, with the temp file removed and the old file untouched,
so freeing space and rerunning resumes; a line appended to a log (`append_line`)
is refused the same way, naming its path. The temp file of a process killed before its
rename is removed by the next write of the same file (one writer per run folder:
`minidpo.lock`). Under torchrun only rank 0 writes (`minidpo.distributed`): on the
other ranks these helpers write nothing.
"""

from __future__ import annotations

import io
import json
import os
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, BinaryIO

import torch

from minidpo import distributed
from minidpo.errors import MinidpoError


def _umask() -> int:
    mask = os.umask(0)  # the only way to read it is to set it; put it straight back
    os.umask(mask)
    return mask


def _atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], None]) -> Path:
    path = Path(path)
    if not distributed.is_writer():  # under torchrun, rank 0 writes every file
        return path
    prefix = f".{path.name}."
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        for stale in path.parent.glob(f"{prefix}*.tmp"):  # left by a killed writer
            stale.unlink(missing_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=prefix, suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise MinidpoError(f"{path}: cannot write ({e.strerror or e})") from None
    try:
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise MinidpoError(f"{path}: cannot write ({e.strerror or e})") from None
        raise
    return path


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write `data` to `path` atomically."""
    return _atomic_write(path, lambda f: f.write(data))


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write UTF-8 `text` to `path` atomically."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Write `obj` as indented JSON (with a trailing newline) atomically."""
    return atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def atomic_write_jsonl(path: str | os.PathLike, rows: Iterable[dict]) -> Path:
    """Write one JSON object per line atomically."""
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    return atomic_write_text(path, text)


def append_line(path: str | os.PathLike, line: str) -> None:
    """Append `line` and a newline to the UTF-8 file `path` (a metrics log; not atomic: a
    resumed run cuts the log back first). A refused write is one MinidpoError naming it."""
    try:
        with Path(path).open("a", encoding="utf-8") as f:
            f.write(line + "\n")
    except OSError as e:
        raise MinidpoError(f"{path}: cannot write ({e.strerror or e})") from None


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> Path:
    """`torch.save` to `path` atomically (serialised in memory first, so a refused write
    is a Python OSError, never an error deep inside torch's zip writer)."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    return atomic_write_bytes(path, buf.getvalue())
