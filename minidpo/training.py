"""The training loop every trainer shares: optimizer, schedule, checkpoints, metrics, resume.

`run_loop` is the loop: a step function, a held-out evaluation every few steps,
metrics appended to a JSONL file, a progress bar, snapshots for the frontier, and
checkpoints written atomically so a killed run resumes where it left off. PPO hands
it its iteration (rollout, score, update) as the step. The supervised trainers (SFT,
DPO, the reward model, Preferred-FT) use `train`, which adds the step they share
(`gradient_step`): AdamW with weight decay on matrices only, linear warmup then cosine
decay, global gradient-norm clipping. The stage supplies only a `loss_fn` and a
deterministic `get_batch(step)`. Because the batch of step s depends on (seed, s)
alone, a run stopped after k steps and resumed ends with the same weights as one
that was never stopped. With `keep_best`, the run ends with the weights of its best
evaluation instead of its last (early stopping by checkpoint selection, as reward
models are usually trained), and that choice resumes exactly too. Whether a run
resumes is not decided here but by the stage layer (`minidpo.stage`).

Under torchrun the supervised trainers run data-parallel (`minidpo.distributed`: DDP,
each rank a share of the step's batch, rank 0 the one writer). Left out: gradient
accumulation and mixed precision; the models here are small enough not to need them.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch

from minidpo import distributed
from minidpo.atomic import append_line, atomic_write_text
from minidpo.checkpoints import load_checkpoint, save_checkpoint, save_snapshot
from minidpo.errors import MinidpoError
from minidpo.progress import progress
from minidpo.sampling import GENERATED
from minidpo.threads import POLICY


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
        self.rows = [r for r in rows if r["step"] <= resume_step]
        atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in self.rows))

    def log(self, row: dict[str, Any]) -> None:
        if not distributed.is_writer():  # under torchrun, rank 0 keeps the log
            return
        append_line(self.path, json.dumps(row))


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
    snapshot_every: int = 0  # > 0: weights saved every that many steps (the frontier's points)
    snapshot_dense: bool = False  # also at steps 1, 2, 4, ... below snapshot_every
    patience: int = 0  # > 0: stop once `stop_on` has not improved for this many evaluations
    desc: str = "train"

    @classmethod
    def from_config(cls, cfg: Any, *, desc: str) -> LoopConfig:
        """The loop settings of a stage config (SFTConfig, DPOConfig, ...), read by name
        (``snapshot_every`` where the config has one)."""
        optional = {"snapshot_every": 0, "snapshot_dense": False, "patience": 0}
        shared = [f.name for f in fields(cls) if f.name not in (*optional, "desc")]
        return cls(**{name: getattr(cfg, name) for name in shared},
                   **{k: getattr(cfg, k, v) for k, v in optional.items()}, desc=desc)  # fmt: skip

    def is_snapshot(self, step: int) -> bool:
        """Whether the weights after `step` steps are a frontier point: every
        `snapshot_every` steps, and with `snapshot_dense` at the powers of two below it
        (1, 2, 4, 8, then every 8: the frontier starts near KL 0)."""
        if self.snapshot_every <= 0:
            return False
        dense = self.snapshot_dense and step < self.snapshot_every and step & (step - 1) == 0
        return step % self.snapshot_every == 0 or dense


def converged(values: Sequence[float], patience: int) -> int | None:
    """The convergence rule of a run that minimises an evaluated metric: the index of
    the evaluation at which the best value so far has not improved for `patience`
    evaluations (None: not yet). Ties do not improve; NaN never does.

    Example: converged([0.69, 0.60, 0.61, 0.62], patience=2) is 3."""
    best, since = math.inf, 0
    for i, v in enumerate(values):
        if v < best:
            best, since = v, 0
        else:
            since += 1
            if since >= patience:
                return i
    return None


@dataclass(frozen=True)
class Job:
    """What every trainer takes besides its config and inputs: where it writes (`out_dir`:
    checkpoint.pt, metrics.jsonl, summary.json, snapshots/), its seed and device, whether it
    continues from the checkpoint there (`resume`, decided by the stage layer), a progress
    bar, and `stop_after` (end after that many steps, as if killed: the resume tests)."""

    out_dir: Path
    seed: int
    device: torch.device | str = "cpu"
    resume: bool = False
    progress: bool = True
    stop_after: int | None = None


LossFn = Callable[[torch.nn.Module, Any], tuple[torch.Tensor, dict[str, float]]]
StepFn = Callable[[int], dict[str, Any]]  # step -> its metrics row (without "step")


@dataclass
class Carried:
    """State beyond model and optimizer that a checkpoint carries and a resume restores
    (PPO's value model and KL coefficient): how to read it, and how to put it back."""

    save: Callable[[], Any]
    load: Callable[[Any], None]


def check_finite(value: torch.Tensor, what: str, where: str) -> None:
    """Stop a run on a non-finite `value` (a loss, a gradient norm): one MinidpoError
    naming `where` (the run and step) and `what`, raised before the optimizer steps, so
    the weights and the last checkpoint on disk stay as they were."""
    if not bool(torch.isfinite(value).all()):
        raise MinidpoError(
            f"{where}: the {what} is {float(value)}, not finite; stopped before the update "
            "(the last checkpoint is kept: check the inputs and settings, e.g. the learning rate)"
        )


def gradient_step(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    loop: LoopConfig,
    get_batch: Callable[[int], Any],
    loss_fn: LossFn,
) -> StepFn:
    """The step of every supervised trainer: the scheduled learning rate, the loss of
    the step's batch, backward, global gradient-norm clipping, one AdamW step."""

    def step_fn(step: int) -> dict[str, Any]:
        lr = lr_at(step, lr=loop.lr, warmup_steps=loop.warmup_steps, max_steps=loop.steps,
                   min_lr_ratio=loop.min_lr_ratio)  # fmt: skip
        for g in optimizer.param_groups:
            g["lr"] = lr
        model.train()
        loss, metrics = loss_fn(model, get_batch(step))
        # under torchrun: the mean over the ranks, so that all of them stop together
        check_finite(distributed.mean(loss.detach()), "loss", f"{loop.desc}, step {step + 1}")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        clip = loop.grad_clip if loop.grad_clip > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        check_finite(grad_norm, "gradient norm", f"{loop.desc}, step {step + 1}")
        optimizer.step()
        metrics = distributed.mean_metrics(metrics)  # the global batch's, under torchrun
        row: dict[str, Any] = {"lr": lr, "grad_norm": float(grad_norm)}
        row.update({f"train/{k}": v for k, v in metrics.items() if k != "tokens"})
        row["tokens"] = int(metrics.get("tokens", 0))
        return row

    return step_fn


def train(
    model: torch.nn.Module,
    *,
    loop: LoopConfig,
    job: Job,
    get_batch: Callable[[int], Any],
    loss_fn: LossFn,
    **kwargs: Any,
) -> dict[str, Any]:
    """A supervised trainer's loop: AdamW (`make_optimizer`) stepped by `gradient_step`
    inside `run_loop` (whose keyword arguments pass through).

    `get_batch(step)` must be a pure function of the step (seeded per step), and
    `loss_fn(model, batch)` returns the scalar loss and a dict of floats to log
    (``tokens`` counts the tokens the step processed, for tokens/s).

    Under torchrun (`minidpo.distributed`) the step runs the model wrapped in DDP, which
    averages the ranks' gradients: `get_batch` gives this rank's share of the step's
    batch, and `loss_fn` a loss whose mean over the ranks is the global batch's loss.
    """
    optimizer = make_optimizer(model, loop.lr, loop.weight_decay)
    step_fn = gradient_step(distributed.wrap(model), optimizer, loop, get_batch, loss_fn)
    return run_loop(model, optimizer, step_fn, loop=loop, job=job, **kwargs)


class _LoopState:
    """What `run_loop` carries from step to step and across a resume: the step reached,
    the counters, the best evaluation so far; and how it evaluates and checkpoints."""

    def __init__(self, model, optimizer, job, extra, eval_fn, carried, counters,
                 keep_best) -> None:  # fmt: skip
        if keep_best is not None and eval_fn is None:
            raise ValueError("train: keep_best needs an eval_fn to choose by")
        self.model, self.optimizer, self.extra = model, optimizer, extra
        self.ckpt_path = ckpt_path = Path(job.out_dir) / "checkpoint.pt"
        self.eval_fn, self.carried, self.keep_best = eval_fn, carried, keep_best
        self.best_metric = None if keep_best is None else f"eval/{keep_best}"
        self.start, self.elapsed_before = 0, 0.0
        self.counters, self.totals = counters, {name: 0 for name in counters.values()}
        self.best: BestWeights | None = None
        if job.resume and ckpt_path.exists():
            self._restore()
        elif distributed.is_writer():
            shutil.rmtree(ckpt_path.parent / "snapshots", ignore_errors=True)  # a fresh run's own
        self.t0 = time.perf_counter()

    def _restore(self) -> None:
        ckpt = load_checkpoint(self.ckpt_path)
        self.model.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        for name, c in self.carried.items():
            c.load(ckpt[name])
        self.start, self.elapsed_before = int(ckpt["step"]), float(ckpt.get("elapsed_s", 0.0))
        self.totals = {name: int(ckpt.get(name, 0)) for name in self.totals}
        if self.best_metric is not None and ckpt.get("best_metric") == self.best_metric:
            weights = ckpt["model"] if ckpt.get("done") else ckpt.get("best_model")
            if weights is not None:
                self.best = BestWeights(int(ckpt["best_step"]), float(ckpt["best_value"]), weights)

    def elapsed(self) -> float:
        """Training seconds so far, this run and the runs it resumes."""
        return self.elapsed_before + time.perf_counter() - self.t0

    def evaluate(self, row: dict[str, Any], step: int) -> None:
        """Add ``eval/<k>`` and ``time/eval`` to `row`; keep the weights if they are best."""
        t_eval = time.perf_counter()
        self.model.eval()
        with torch.no_grad():
            row.update({f"eval/{k}": v for k, v in self.eval_fn(self.model).items()})
        row["time/eval"] = time.perf_counter() - t_eval
        if self.best_metric is not None:
            if self.best_metric not in row:
                raise ValueError(
                    f"train: keep_best {self.keep_best!r} is not a key eval_fn returns"
                )
            value = float(row[self.best_metric])
            if improves(value, None if self.best is None else self.best.value):
                self.best = BestWeights(step, value, copy_state(self.model))

    def checkpoint(self, step: int, finished: bool) -> None:
        state = {
            **self.extra,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "step": step,
            "done": finished,
            **self.totals,
            "elapsed_s": self.elapsed(),
            **{name: c.save() for name, c in self.carried.items()},
        }
        if self.best is not None:
            best = self.best
            state.update(best_metric=self.best_metric, best_step=best.step, best_value=best.value)
            state["model" if finished else "best_model"] = best.model  # finished: the chosen
        save_checkpoint(self.ckpt_path, state)

    def count(self, row: dict[str, Any]) -> None:
        """Add a step's row to the cumulative counters (a counter named like its key is
        logged as the total only)."""
        for key, total in self.counters.items():
            self.totals[total] += int(row.pop(key) if key == total else row[key])

    def result(self, last: dict[str, Any], reached: int, finished: bool,
               converged: bool) -> dict[str, Any]:  # fmt: skip
        """`run_loop`'s return: the last row, the run's cost and how it ended; a finished
        run with ``keep_best`` leaves the chosen weights in the model."""
        out: dict[str, Any] = dict(last)
        out["wall_s"] = time.perf_counter() - self.t0
        out["tokens_per_s"] = self.totals.get("tokens", 0) / max(out["wall_s"], 1e-9)
        out.update(steps_done=reached, finished=finished,
                   converged_step=reached if converged else None)  # fmt: skip
        if self.best is not None:
            if finished:
                self.model.load_state_dict(self.best.model)
            out.update(best_metric=self.best_metric, best_step=self.best.step,
                       best_value=self.best.value)  # fmt: skip
        return out


def _step_row(step_fn: StepFn, step: int) -> dict[str, Any]:
    """One step's metrics row, with the response tokens the step itself generated
    (``tokens/generated``: the ledger's measure of sampling while training)."""
    sampled = GENERATED.tokens
    row = {"step": step + 1, **step_fn(step)}
    row["tokens/generated"] = GENERATED.tokens - sampled
    return row


def run_loop(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    step_fn: StepFn,
    *,
    loop: LoopConfig,
    job: Job,
    checkpoint_extra: dict[str, Any],
    eval_fn: Callable[[torch.nn.Module], dict[str, float]] | None = None,
    eval_at_start: bool = False,
    carried: dict[str, Carried] | None = None,
    counters: dict[str, str] | None = None,
    postfix: Sequence[str] = ("train/loss",),
    keep_best: str | None = None,
    stop_on: str | None = None,
) -> dict[str, Any]:
    """The loop every trainer shares; returns the last row (+ wall_s, tokens_per_s, best_*).

    `step_fn(step)` takes one optimisation step (0-based) and returns its metrics row;
    every `loop.eval_every` steps (and at the last) ``eval/<k>`` of `eval_fn` is added;
    `eval_at_start` logs a row ``{"step": 0, eval/...}`` first. `counters` maps a per-step
    key to a cumulative one (default ``tokens`` to ``tokens``), logged and checkpointed.
    The checkpoint ``job.out_dir/checkpoint.pt`` (model, optimizer, step, counters,
    `checkpoint_extra`, each `carried` state) is rewritten every `ckpt_every` steps and at
    the end with ``done=True``; with ``job.resume`` a run continues from it, and
    ``job.stop_after`` ends the loop (as if killed) after that many steps. Rows go to
    ``metrics.jsonl`` and log ``time/elapsed``; ``loop.snapshot_every`` > 0 saves the
    weights to ``snapshots/step-NNNNNN.pt`` (the frontier's points).

    `keep_best` names a key of `eval_fn`'s dict (``"accuracy"``) to maximise: the final
    checkpoint holds the weights of the best evaluation (ties: the earliest; NaN loses),
    with the last step's optimizer; until then it holds the current weights plus
    ``best_model``, so a resumed run chooses exactly as an uninterrupted one. Checkpoint
    and returned dict record ``best_metric`` (``"eval/accuracy"``), ``best_step``, ``best_value``.

    `stop_on` names a key of `eval_fn`'s dict to minimise (`StopRule`): the run ends when
    it converges or at ``loop.steps``, the cap; either end is final (``finished``,
    ``converged_step``: None when the cap bound) and a snapshot.
    """
    counters = {"tokens": "tokens"} if counters is None else counters
    state = _LoopState(model, optimizer, job, checkpoint_extra, eval_fn, carried or {},
                       counters, keep_best)  # fmt: skip
    log = MetricsLog(Path(job.out_dir) / "metrics.jsonl", resume_step=state.start)
    rule = StopRule(stop_on and f"eval/{stop_on}", loop.patience, log.rows)
    stop_after, done_early = job.stop_after, rule.done
    if eval_at_start and state.start == 0 and eval_fn is not None:
        first: dict[str, Any] = {"step": 0}
        state.evaluate(first, 0)
        log.log({k: v for k, v in first.items() if k != "time/eval"})
    last: dict[str, Any] = dict(log.rows[-1]) if log.rows else {}
    reached, ran = state.start, 0
    bar = progress(range(state.start, state.start if done_early else loop.steps),
                   desc=loop.desc, initial=state.start,
                   enabled=job.progress and distributed.is_writer())  # fmt: skip
    for step in bar:
        POLICY.tick(step)  # another process may have started or stopped
        row = _step_row(step_fn, step)
        reached, ran = step + 1, ran + 1
        state.count(row)
        if eval_fn is not None and (reached % loop.eval_every == 0 or reached == loop.steps):
            state.evaluate(row, reached)
        row.update(state.totals)
        row["time/elapsed"] = state.elapsed()
        log.log(row)
        last, done_early = row, rule.update(row)
        finished = reached == loop.steps or done_early
        if loop.is_snapshot(reached) or (finished and loop.snapshot_every > 0):
            save_snapshot(state.ckpt_path.parent, checkpoint_extra, model, reached,
                          row["time/elapsed"])  # fmt: skip
        bar.set_postfix({k.split("/")[-1]: f"{row[k]:.3f}" for k in postfix if k in row})
        stopping = stop_after is not None and ran >= stop_after
        if finished or reached % loop.ckpt_every == 0 or stopping:
            state.checkpoint(reached, finished=finished)
        if stopping or done_early:
            break
    bar.close()
    return state.result(last, reached, finished=reached == loop.steps or done_early,
                        converged=done_early)  # fmt: skip


@dataclass
class StopRule:
    """`run_loop`'s convergence rule: the run is done at the evaluation where `key` (an
    ``eval/`` metric to minimise, ``"eval/valid/loss"``) has not improved for `patience`
    evaluations (`converged`); no key or patience 0: never. `rows` are the metrics already
    logged, so a resumed run reads the rule's history back from ``metrics.jsonl``."""

    key: str | None
    patience: int
    rows: Sequence[dict[str, Any]] = ()

    def __post_init__(self) -> None:
        self.active = self.key is not None and self.patience > 0
        self.history = [float(r[self.key]) for r in self.rows if self.active and self.key in r]
        self.done = self.active and converged(self.history, self.patience) is not None

    def update(self, row: dict[str, Any]) -> bool:
        """Read one logged row; returns whether the run has converged."""
        if self.active and self.key in row:
            self.history.append(float(row[self.key]))
            self.done = converged(self.history, self.patience) is not None
        return self.done


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
