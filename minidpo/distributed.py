"""Many processes through torchrun: PyTorch DDP for the supervised trainers, rank 0 the one writer.

    torchrun --nproc-per-node N -m minidpo sft|dpo|rm [flags]

What a run of N processes does (N = torchrun's ``WORLD_SIZE``):

- every rank runs the same command: it reads the same inputs, builds the step's whole
  batch from (seed, step) as one process would, and trains on its own 1/N of the rows
  (`shard`), so the global batch is ``--batch-size`` whatever N is;
- the model is wrapped in ``DistributedDataParallel`` (`wrap`), which starts every rank
  from rank 0's weights and averages the gradients over the ranks in backward; each
  loss is written so that this average is the gradient of the global batch's loss
  (a mean over rows needs nothing, SFT's mean over tokens divides by `mean` of the
  token counts), and the logged metrics are averaged over the ranks (`mean_metrics`);
- **rank 0 is the only writer**: the atomic writes, the metrics log, the run folder's
  lock and the stage stamps are skipped on the other ranks (`is_writer`), whose
  standard output is silenced; the stage layer decides skip/resume/rerun on rank 0
  and hands the decision to every rank (`from_main`), so the resume rules are
  those of one process, and the ranks wait for each other at each stage's end;
- the backend is NCCL with one GPU per rank (``LOCAL_RANK``) under ``--device cuda``,
  gloo on CPU (the test runs 2 CPU processes); under ``--threads auto`` each rank
  takes its share of the cores.

Only ``sft``, ``dpo`` and ``rm`` train this way. PPO, GRPO, online DPO and the
pipeline sample rollouts between updates and stay single-process: under torchrun
they are refused (`check_command`, exit 2). So is a ``--batch-size`` that N does not
divide (`check_divides`).
"""

from __future__ import annotations

import atexit
import os
import sys
from collections.abc import Callable
from typing import Any, NoReturn, TypeVar

import torch
import torch.distributed as dist

from minidpo.errors import MinidpoError

SUPPORTED = ("sft", "dpo", "rm")  # the commands that train under torchrun
T = TypeVar("T")
_joined = False  # whether this process joined torchrun's group (`setup`)


def joined() -> bool:
    """Whether this process joined torchrun's process group (then it ends by `end_process`)."""
    return _joined


def launched() -> int:
    """The number of processes torchrun started (``WORLD_SIZE``; 1 without torchrun)."""
    value = os.environ.get("WORLD_SIZE", "1")
    if not value.isdigit() or int(value) < 1:
        raise MinidpoError(f"WORLD_SIZE: must be a whole number >= 1, got {value!r}")
    return int(value)


def world() -> int:
    """Processes in this run's group (1 when there is none)."""
    return dist.get_world_size() if dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def is_writer() -> bool:
    """Whether this process writes files: always, except on the ranks other than 0."""
    return rank() == 0


def check_command(command: str) -> None:
    """Under torchrun, refuse a command that does not train across processes."""
    n = launched()
    if n > 1 and command not in SUPPORTED:
        raise MinidpoError(
            f"torchrun: `minidpo {command}` runs in one process (WORLD_SIZE is {n}); "
            f"only {', '.join(SUPPORTED)} train across processes"
        )


def check_divides(batch_size: int, flag: str = "--batch-size") -> None:
    """Refuse a global batch the processes cannot share equally."""
    n = launched()
    if n > 1 and batch_size % n:
        raise MinidpoError(f"{flag} {batch_size}: torchrun's {n} processes must divide it")


def setup(device: str) -> None:
    """Join torchrun's process group (nothing without torchrun): NCCL on ``LOCAL_RANK``'s
    GPU when `device` is CUDA (or auto with CUDA present), gloo on CPU."""
    if launched() == 1 or dist.is_initialized():
        return
    local = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    if cuda:
        torch.cuda.set_device(local)
    dist.init_process_group("nccl" if cuda else "gloo")
    global _joined
    _joined = True
    if rank() != 0:
        sys.stdout = open(os.devnull, "w")  # one report: rank 0's


def shard(rows: T) -> T:
    """This rank's rows of a step's global batch (a contiguous 1/N of an index array or
    a list); all of them in one process."""
    n = world()
    if n == 1:
        return rows
    size = len(rows)  # type: ignore[arg-type]
    if size % n:
        raise MinidpoError(f"a batch of {size} rows cannot be split over {n} processes")
    per = size // n
    return rows[rank() * per : (rank() + 1) * per]  # type: ignore[index]


def mean(value: torch.Tensor) -> torch.Tensor:
    """The mean of a (detached) tensor over the ranks; the tensor itself in one process."""
    if world() == 1:
        return value
    total = value.detach().clone()
    dist.all_reduce(total)
    return total / world()


def mean_metrics(metrics: dict[str, float]) -> dict[str, float]:
    """Each float metric averaged over the ranks (``tokens`` summed): with equal shards,
    the global batch's means."""
    if world() == 1:
        return metrics
    keys = sorted(metrics)
    values = torch.tensor([float(metrics[k]) for k in keys], dtype=torch.float64)
    dist.all_reduce(values)
    out = {k: v / world() for k, v in zip(keys, values.tolist(), strict=True)}
    if "tokens" in metrics:
        out["tokens"] = int(values[keys.index("tokens")])
    return out


def wrap(model: torch.nn.Module) -> torch.nn.Module:
    """The model in DistributedDataParallel (the model itself in one process).

    A model with parameters its forward does not use (``has_unused_parameters``, the
    reward model on an untied GPT body) turns on DDP's search for them."""
    if world() == 1:
        return model
    device = next(model.parameters()).device
    ids = [device.index] if device.type == "cuda" else None
    unused = bool(getattr(model, "has_unused_parameters", False))
    return torch.nn.parallel.DistributedDataParallel(
        model, device_ids=ids, find_unused_parameters=unused
    )


def from_main(fn: Callable[[], T]) -> T:
    """``fn()`` run on rank 0 alone, its result (or its MinidpoError) on every rank."""
    if world() == 1:
        return fn()
    box: list[Any] = [None]
    if rank() == 0:
        try:
            box = [("ok", fn())]
        except MinidpoError as e:
            box = [("error", str(e))]
    dist.broadcast_object_list(box, src=0)
    kind, value = box[0]
    if kind == "error":
        raise MinidpoError(value)
    return value


def barrier() -> None:
    """Wait for every rank (nothing in one process)."""
    if world() > 1:
        dist.barrier()


def teardown() -> None:
    """Leave the process group, if this process joined one."""
    if dist.is_initialized():
        dist.destroy_process_group()


def end_process(code: int) -> NoReturn:
    """End a process that joined torchrun's group: Python's exit work, then ``os._exit``.

    Why not a plain exit: gloo's worker threads outlive `destroy_process_group` (its
    shutdown does not join them), and in 3 of 80 two-process tiny SFT runs with their
    output to pipes (`scripts/torchrun_exits.py`) the C++ destructors run at interpreter
    exit then aborted a rank ("terminate called without
    an active exception", SIGABRT) after the run had written everything, so torchrun
    reported a failed run. Here the exit work that matters runs first (the group is left,
    the atexit handlers release the run folder's lock, the streams are flushed), and the
    process ends without the destructors."""
    teardown()
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
