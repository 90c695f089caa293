"""Checkpoints: the one file format every stage writes, and the content hash that identifies it.

A checkpoint is a dict saved with ``torch.save`` (atomically) and read back with
``weights_only=True``, so a file from elsewhere can hold tensors and plain values but
never run code. It is stamped with a format name and version and a SHA-256 of its own
content (``sha256``), checked on every load, so bytes flipped inside a tensor (which
``torch.load`` reads without complaint) are refused by name. It carries what a
later stage needs to rebuild the model without the stage that wrote it: ``kind``
("policy" or "reward_model"), ``stage``, ``model_config``, ``tokenizer`` and the
``config`` it was trained with (`stage_state`).

`content_sha256` is the identity of a stage's result: the bytes of a plain file, or
for a checkpoint its content without wall-clock entries, so a bit-identical rerun has
the same hash and leaves the stages that read it alone.

A file that cannot be read is one message per kind, the same in every command:
"not found", "a folder, not a file", "permission denied", and for a checkpoint
"truncated or damaged", "not a minidpo checkpoint", "holds code or objects beyond
tensors and plain values" or "content does not match its checksum" (`read_problem`).
"""

from __future__ import annotations

import contextlib
import hashlib
import re
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from minidpo.atomic import atomic_torch_save
from minidpo.config import to_dict
from minidpo.errors import MinidpoError

CHECKPOINT_FORMAT = "minidpo-checkpoint"
CHECKPOINT_VERSION = 2  # 2: the content checksum
READABLE_VERSIONS = (1, 2)  # a version-1 file (no checksum) still loads, unchecked
CHECKSUM = "sha256"  # the entry holding the checksum of everything else
VOLATILE = ("elapsed_s", CHECKSUM)  # entries that differ between identical runs


def stage_state(
    *, kind: str, stage: str, model_config: dict[str, Any], tokenizer: dict, config: Any
) -> dict[str, Any]:
    """The entries every stage's checkpoint carries besides weights and optimizer."""
    return {
        "kind": kind,
        "stage": stage,
        "model_config": model_config,
        "tokenizer": tokenizer,
        "stage_config": config,
    }


def provenance(group: str, cfg: Any, seed: int, **inputs: Path | None) -> dict[str, Any]:
    """What a checkpoint records of how it was made: its config, seed, and the SHA-256 of
    each input file (``sft=path`` -> ``"sft_sha256"``; None stays None)."""
    out: dict[str, Any] = {group: to_dict(cfg), "seed": seed}
    for name, path in inputs.items():
        out[f"{name}_sha256"] = None if path is None else file_sha256(path)
    return out


def _checksum(ckpt: dict[str, Any]) -> str:
    h = hashlib.sha256()
    _feed(h, ckpt, skip=(CHECKSUM,))
    return h.hexdigest()


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> Path:
    """Write a checkpoint atomically, stamped with its format, version and checksum."""
    ckpt = {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, **state}
    ckpt[CHECKSUM] = _checksum(ckpt)
    return atomic_torch_save(ckpt, path)


def file_problem(path: Path) -> str | None:
    """Why the file `path` cannot be opened for reading ("not found", "a folder, not a
    file", "permission denied"), or None."""
    if not path.exists():
        return "not found"
    if path.is_dir():
        return "a folder, not a file"
    try:
        with path.open("rb") as f:
            f.read(1)
    except OSError as e:
        return _os_problem(e)
    return None


def _os_problem(e: OSError) -> str:
    if isinstance(e, PermissionError):
        return "permission denied"
    return f"cannot be read ({e.strerror or e})"


def _torch_load(path: Path) -> tuple[Any, str | None]:
    """(the content of `path`, None), or (None, why it is not a readable checkpoint)."""
    problem = file_problem(path)
    if problem is not None:
        return None, problem
    try:
        with warnings.catch_warnings():  # torch warns about foreign pickles: the error says it
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True), None
    except OSError as e:
        return None, _os_problem(e)
    except Exception as e:  # torch raises many types for truncated or foreign files
        named = re.search(r"unsupported GLOBAL (\S{1,80})", str(e))  # refused, never called
        if named:
            return None, (f"holds code or objects beyond tensors and plain values ({named[1]}; "
                          "refused unread)")  # fmt: skip
        with path.open("rb") as f:
            zipped = f.read(4) == b"PK\x03\x04"  # torch.save's format is a zip archive
        return None, "truncated or damaged" if zipped else "not a minidpo checkpoint"


def read_problem(path: Path) -> str:
    """Why an input `content_sha256` could not hash cannot be read: the words of
    `load_checkpoint` for a checkpoint, of `file_problem` for any file."""
    problem = file_problem(path)
    if problem is None and path.suffix == ".pt":
        problem = _torch_load(path)[1]
    return problem or "cannot be read"


def load_checkpoint(path: str | Path, *, kind: str | None = None) -> dict[str, Any]:
    """Read a checkpoint written by `save_checkpoint`, or raise one clear MinidpoError
    (one message per kind of failure: see the module docstring).

    `kind` ("policy", "reward_model", ...) is checked when given, so a reward model
    handed to a stage that wants a policy is refused by name.
    """
    path = Path(path)
    ckpt, problem = _torch_load(path)
    if problem is not None:
        raise MinidpoError(f"{path}: {problem}")
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise MinidpoError(f"{path}: not a minidpo checkpoint")
    if ckpt.get("version") not in READABLE_VERSIONS:
        raise MinidpoError(
            f"{path}: checkpoint version {ckpt.get('version')!r}, this minidpo reads "
            f"versions {', '.join(map(str, READABLE_VERSIONS))}"
        )
    if ckpt["version"] >= 2 and ckpt.get(CHECKSUM) != _checksum(ckpt):
        raise MinidpoError(f"{path}: content does not match its checksum (damaged on disk?)")
    if kind is not None and ckpt.get("kind") != kind:
        raise MinidpoError(f"{path}: holds a {ckpt.get('kind')!r} checkpoint, expected {kind!r}")
    return ckpt


def save_snapshot(
    out_dir: Path, extra: dict[str, Any], model: torch.nn.Module, step: int, elapsed_s: float
) -> Path:
    """Weights at `step` as ``<out_dir>/snapshots/step-NNNNNN.pt`` (loadable like the
    checkpoint, without the optimizer): the points of the reward-KL frontier."""
    path = Path(out_dir) / "snapshots" / f"step-{step:06d}.pt"
    state = {k: v for k, v in extra.items() if k != "optimizer"}
    state.update(model=model.state_dict(), step=step, done=True, elapsed_s=elapsed_s)
    save_checkpoint(path, state)
    return path


def snapshots(out_dir: str | Path) -> list[Path]:
    """The snapshots of a stage folder, in step order."""
    return sorted((Path(out_dir) / "snapshots").glob("step-*.pt"))


def file_sha256(path: str | Path) -> str:
    """SHA-256 of a file's bytes."""
    h = hashlib.sha256()
    with Path(path).open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _feed(h: Any, obj: Any, skip: Sequence[str] = VOLATILE) -> None:
    """Hash a checkpoint's content deterministically (tensors by their bytes), leaving
    out the top-level-or-nested entries named in `skip`."""
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous()
        h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.numpy().tobytes() if t.dtype != torch.bfloat16 else t.float().numpy().tobytes())
    elif isinstance(obj, dict):
        for k in sorted(obj, key=str):
            if k not in skip:
                h.update(f"K{k}".encode())
                _feed(h, obj[k], skip)
    elif isinstance(obj, (list, tuple)):
        h.update(f"L{len(obj)}".encode())
        for x in obj:
            _feed(h, x, skip)
    else:
        h.update(repr(obj).encode())


def content_sha256(paths: Sequence[Path]) -> str | None:
    """One hash over files: their bytes, or for ``.pt`` files their content without
    wall-clock entries. None when a file is missing or unreadable (a damaged result)."""
    h = hashlib.sha256()
    for p in paths:
        h.update(p.name.encode())
        try:
            if p.suffix == ".pt":
                ckpt, problem = _torch_load(p)
                if problem is not None:
                    return None
                _feed(h, ckpt)
            else:
                h.update(file_sha256(p).encode())
        except Exception:  # missing, truncated or foreign: not the result that was stamped
            return None
    return h.hexdigest()


@contextlib.contextmanager
def malformed_as_error(where: str | Path) -> Iterator[None]:
    """Rebuilding a model from a checkpoint that passed the format check but does not fit
    (a missing key, weights of another shape): one MinidpoError naming `where`."""
    try:
        yield
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        first = (str(e).strip().splitlines() or [""])[-1].strip()[:200]
        raise MinidpoError(f"{where}: malformed checkpoint ({type(e).__name__}: {first})") from None
