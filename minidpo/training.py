"""The training-loop pieces every stage shares: optimizer, schedule, checkpoints, metrics.

SFT, DPO and the reward model all train the same way: AdamW (weight decay on
matrices only), linear warmup then cosine decay, global gradient-norm clipping,
a held-out evaluation every few steps, metrics appended to a JSONL file, a tqdm
progress bar, and checkpoints written atomically so a killed run resumes where it
left off. `train` runs that loop; the stage supplies only a `loss_fn` and a
deterministic `get_batch(step)`. Because the batch of step s depends on (seed, s)
alone, a run stopped after k steps and resumed ends with the same weights as one
that was never stopped. With `keep_best`, the run ends with the weights of its best
evaluation instead of its last (early stopping by checkpoint selection, as reward
models are usually trained), and that choice resumes exactly too.

Left out: gradient accumulation, mixed precision, distributed training; the
models here are small enough not to need them.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from minidpo.atomic import atomic_torch_save, atomic_write_text
from minidpo.errors import MinidpoError

CHECKPOINT_FORMAT = "minidpo-checkpoint"
CHECKPOINT_VERSION = 1


def resolve_device(name: str) -> torch.device:
    """``auto`` -> CUDA when present, else CPU; anything else is checked, not trusted."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise MinidpoError(f"--device: {name!r} is not a device ({e})") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise MinidpoError(f"--device: {name!r} asked for, but no CUDA device is available")
    if device.type not in ("cpu", "cuda"):
        raise MinidpoError(f"--device: {name!r} is not supported (use auto, cpu or cuda)")
    return device


def lr_at(step: int, *, lr: float, warmup_steps: int, max_steps: int, min_lr_ratio: float) -> float:
    """Learning rate at `step` (0-based): linear warmup to `lr`, then cosine to `lr*min_lr_ratio`.

    Example: lr_at(0, lr=1.0, warmup_steps=10, max_steps=100, min_lr_ratio=0.1) == 0.1
    """
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
    floor = lr * min_lr_ratio
    return floor + 0.5 * (lr - floor) * (1.0 + math.cos(math.pi * progress))


def make_optimizer(model: torch.nn.Module, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW with weight decay on >=2-D tensors (matrices, embeddings) only, as in GPT-2/nanoGPT."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95))


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> Path:
    """Write a checkpoint atomically, stamped with its format and version."""
    return atomic_torch_save(
        {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, **state}, path
    )


def load_checkpoint(path: str | Path, *, kind: str | None = None) -> dict[str, Any]:
    """Read a checkpoint written by `save_checkpoint`, or raise one clear MinidpoError.

    `kind` ("policy", "reward_model", ...) is checked when given, so a reward model
    handed to a stage that wants a policy is refused by name.
    """
    path = Path(path)
    if not path.is_file():
        raise MinidpoError(f"{path}: checkpoint not found")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for truncated or foreign files
        msg = str(e).splitlines()[0][:120] if str(e) else type(e).__name__
        raise MinidpoError(f"{path}: corrupt or not a checkpoint ({msg})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise MinidpoError(f"{path}: not a minidpo checkpoint")
    if ckpt.get("version") != CHECKPOINT_VERSION:
        raise MinidpoError(
            f"{path}: checkpoint version {ckpt.get('version')!r}, "
            f"this minidpo reads version {CHECKPOINT_VERSION}"
        )
    if kind is not None and ckpt.get("kind") != kind:
        raise MinidpoError(f"{path}: holds a {ckpt.get('kind')!r} checkpoint, expected {kind!r}")
    return ckpt


class MetricsLog:
    """Metrics as JSON lines, one object per logged step: ``{"step": 10, "train/loss": ...}``.

    Appending is not atomic, so on resume the file is cut back to the rows of steps
    the checkpoint had already taken; the log of a resumed run then equals the log
    of an uninterrupted one.
    """

    def __init__(self, path: str | Path, resume_step: int = 0):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        rows = read_metrics(self.path) if resume_step > 0 and self.path.exists() else []
        kept = [r for r in rows if r["step"] <= resume_step]
        atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in kept))

    def log(self, row: dict[str, Any]) -> None:
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The rows of a metrics JSONL file."""
    path = Path(path)
    rows = []
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            raise MinidpoError(f"{path}:{i}: not valid JSON") from None
    return rows


@dataclass
class LoopConfig:
    """The loop settings a stage passes to `train` (taken from its own config)."""

    steps: int
    lr: float
    warmup_steps: int
    min_lr_ratio: float
    weight_decay: float
    grad_clip: float
    eval_every: int
    ckpt_every: int
    resume: bool = False
    desc: str = "train"

    @classmethod
    def from_config(cls, cfg: Any, *, desc: str, resume: bool) -> LoopConfig:
        """The loop settings of a stage config (SFTConfig, DPOConfig, ...), read by name."""
        shared = [f.name for f in fields(cls) if f.name not in ("resume", "desc")]
        return cls(**{name: getattr(cfg, name) for name in shared}, resume=resume, desc=desc)


LossFn = Callable[[torch.nn.Module, Any], tuple[torch.Tensor, dict[str, float]]]


def train(
    model: torch.nn.Module,
    *,
    loop: LoopConfig,
    get_batch: Callable[[int], Any],
    loss_fn: LossFn,
    ckpt_path: str | Path,
    metrics_path: str | Path,
    checkpoint_extra: dict[str, Any],
    eval_fn: Callable[[torch.nn.Module], dict[str, float]] | None = None,
    stop_after: int | None = None,
    progress: bool = True,
    snapshot_every: int = 0,
    keep_best: str | None = None,
) -> dict[str, Any]:
    """Run the shared loop; returns the last logged metrics (+ wall_s, tokens_per_s, best_*).

    `get_batch(step)` must be a pure function of the step (seeded per step), and
    `loss_fn(model, batch)` returns the scalar loss and a dict of floats to log
    (``tokens`` counts the tokens the step processed, for tokens/s). The
    checkpoint holds model, optimizer, step and `checkpoint_extra` (config,
    tokenizer, ...); it is rewritten every `ckpt_every` steps and at the end with
    ``done=True``. `stop_after` ends the loop early (as if killed) after that many
    steps, for the resume tests. `snapshot_every` > 0 also saves the weights every that
    many steps to ``snapshots/step-NNNNNN.pt`` beside the checkpoint (a loadable
    checkpoint without the optimizer), for evaluating the policy along training.
    Each row logs ``tokens`` (cumulative tokens through forward and backward) and
    ``time/elapsed`` (cumulative training seconds, carried across a resume).

    `keep_best` names a key of `eval_fn`'s dict (``"accuracy"``) to maximise: the
    weights of the best evaluation (ties: the earliest; NaN loses) are kept, and
    the final checkpoint (``done=True``) holds THOSE as ``model`` (its optimizer is
    the last step's). Until then the checkpoint holds the current weights and
    optimizer plus ``best_model``, so a resumed run chooses exactly as an
    uninterrupted one. Checkpoint and returned dict record ``best_metric``
    (``"eval/accuracy"``), ``best_step`` and ``best_value``.
    """
    if keep_best is not None and eval_fn is None:
        raise ValueError("train: keep_best needs an eval_fn to choose by")
    ckpt_path = Path(ckpt_path)
    optimizer = make_optimizer(model, loop.lr, loop.weight_decay)
    start, tokens_before, elapsed_before = 0, 0, 0.0
    best: BestWeights | None = None
    best_metric = None if keep_best is None else f"eval/{keep_best}"
    if loop.resume and ckpt_path.exists():
        ckpt = load_checkpoint(ckpt_path)
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        start = int(ckpt["step"])
        tokens_before = int(ckpt.get("tokens", 0))
        elapsed_before = float(ckpt.get("elapsed_s", 0.0))
        if best_metric is not None and ckpt.get("best_metric") == best_metric:
            weights = ckpt["model"] if ckpt.get("done") else ckpt.get("best_model")
            if weights is not None:
                best = BestWeights(int(ckpt["best_step"]), float(ckpt["best_value"]), weights)
    log = MetricsLog(metrics_path, resume_step=start)
    if start == 0:
        shutil.rmtree(ckpt_path.parent / "snapshots", ignore_errors=True)  # a fresh run's own

    def checkpoint(step: int, done: bool) -> None:
        state = {
            **checkpoint_extra,
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "step": step,
            "done": done,
            "tokens": tokens_before + tokens,
            "elapsed_s": elapsed_before + time.perf_counter() - t0,
        }
        if best is not None:
            state.update(best_metric=best_metric, best_step=best.step, best_value=best.value)
            state["model" if done else "best_model"] = best.model  # done: the chosen weights
        save_checkpoint(ckpt_path, state)

    last: dict[str, float] = {}
    reached = start
    bar = tqdm(range(start, loop.steps), desc=loop.desc, disable=not progress, leave=False)
    t0, tokens = time.perf_counter(), 0
    for step in bar:
        lr = lr_at(
            step,
            lr=loop.lr,
            warmup_steps=loop.warmup_steps,
            max_steps=loop.steps,
            min_lr_ratio=loop.min_lr_ratio,
        )
        for g in optimizer.param_groups:
            g["lr"] = lr
        model.train()
        loss, metrics = loss_fn(model, get_batch(step))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(
            model.parameters(), loop.grad_clip if loop.grad_clip > 0 else float("inf")
        )
        optimizer.step()
        tokens += int(metrics.get("tokens", 0))
        done_steps = reached = step + 1
        row = {"step": done_steps, "lr": lr, "grad_norm": float(grad_norm)}
        row.update({f"train/{k}": v for k, v in metrics.items() if k != "tokens"})
        if eval_fn is not None and (done_steps % loop.eval_every == 0 or done_steps == loop.steps):
            model.eval()
            with torch.no_grad():
                row.update({f"eval/{k}": v for k, v in eval_fn(model).items()})
            if best_metric is not None:
                if best_metric not in row:
                    raise ValueError(f"train: keep_best {keep_best!r} is not a key eval_fn returns")
                value = float(row[best_metric])
                if improves(value, None if best is None else best.value):
                    best = BestWeights(done_steps, value, copy_state(model))
        row["tokens"] = tokens_before + tokens
        row["time/elapsed"] = elapsed_before + time.perf_counter() - t0
        log.log(row)
        last = row
        if snapshot_every > 0 and done_steps % snapshot_every == 0:
            save_snapshot(
                ckpt_path.parent, checkpoint_extra, model, done_steps, row["time/elapsed"]
            )
        elapsed = time.perf_counter() - t0
        bar.set_postfix(loss=f"{row['train/loss']:.3f}", tok_s=f"{tokens / max(elapsed, 1e-9):.0f}")
        if done_steps == loop.steps:
            checkpoint(done_steps, done=True)
        elif done_steps % loop.ckpt_every == 0:
            checkpoint(done_steps, done=False)
        if stop_after is not None and done_steps - start >= stop_after:
            if done_steps < loop.steps:  # the last step already wrote the done checkpoint
                checkpoint(done_steps, done=False)
            break
    bar.close()
    out: dict[str, Any] = dict(last)
    out["wall_s"] = time.perf_counter() - t0
    out["tokens_per_s"] = tokens / max(out["wall_s"], 1e-9)
    if best is not None:
        if reached == loop.steps:
            model.load_state_dict(best.model)  # the run is over: leave the chosen weights
        out.update(best_metric=best_metric, best_step=best.step, best_value=best.value)
    return out


@dataclass
class BestWeights:
    """The weights of the best evaluation so far (`train`'s ``keep_best``)."""

    step: int
    value: float
    model: dict[str, torch.Tensor]


def improves(value: float, best: float | None) -> bool:
    """Whether an evaluation `value` replaces the `best` so far (None: none yet) under
    `train`'s ``keep_best``: strictly greater, so ties keep the earliest; NaN never beats
    a number, any number beats NaN.

    Example: improves(0.5, 0.5) is False; improves(0.5, float("nan")) is True.
    """
    if best is None:
        return True
    if math.isnan(value):
        return False
    return math.isnan(best) or value > best


def copy_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A detached copy of the model's state_dict (same devices), immune to later steps."""
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


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
    """SHA-256 of a file's bytes: the identity of a stage's input (pairs, checkpoints)."""
    h = hashlib.sha256()
    with Path(path).open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def stage_status(ckpt_path: str | Path, stage_config: dict[str, Any], *, force: bool) -> str:
    """Whether a checkpointed stage is to be run "fresh", "resume"d, or is already "done".

    A checkpoint written with another configuration is refused (one clear error)
    rather than silently overwritten; ``force`` starts afresh regardless.
    """
    ckpt_path = Path(ckpt_path)
    if force or not ckpt_path.exists():
        return "fresh"
    ckpt = load_checkpoint(ckpt_path)
    if ckpt.get("stage_config") != stage_config:
        raise MinidpoError(
            f"{ckpt_path}: exists with another configuration; "
            "use --force to retrain or --name for a new run"
        )
    return "done" if ckpt.get("done") else "resume"
