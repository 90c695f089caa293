"""The stage protocol: what a stage declares, and the one layer that decides skip, resume or rerun.

A `Stage` declares its config groups, its input files, its output files and a
function ``fn(ctx, resume) -> summary`` that writes the outputs. `run_stage` is the
only place that decides what happens, for the pipeline and for the single-stage
commands (`minidpo sft`, `minidpo dpo`, ...) alike:

- **skip** when the stamp ``stages/<stage>.json`` holds the stage's current key and its
  outputs still hash to what the stamp recorded. The key is the SHA-256 of the stage's
  config groups, its extra settings, the seed and the content hash of every input
  file, so a stage reruns when its settings or anything it reads changed, and a
  bit-identical upstream rerun leaves it alone;
- **resume** when a ``.started`` stamp with the same key says an earlier attempt was
  interrupted: the stage continues from its own checkpoint (``resume=True``);
- **rerun from scratch** otherwise (first run, changed settings or inputs, a damaged
  output, or ``--force``): ``resume=False``, and the stage overwrites its outputs.

Bad input is refused before anything is written: the key reads every input (a
missing or unreadable one is one error naming it and what is wrong with it, in the
words `minidpo.checkpoints.read_problem` uses for every command; the advice to run
the stages before it only for the run's own files, not for one the user named), then
every world prompt is checked to fit the SFT's context with the stage's
``max_new_tokens`` to spare, and the stage's `check` runs, all before the ``.started``
stamp. An allocation that fails (a size past the machine's memory) takes the start
back like bad input (`errors.out_of_memory`). A stage never decides this itself:
trainers take ``resume`` and checkpoint; the stamp says what was done. Adding a method is one stage file with its `Stage`, plus
one entry in the pipeline's table (docs/ARCHITECTURE.md shows the diff it took).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from minidpo import distributed
from minidpo.atomic import atomic_write_json
from minidpo.checkpoints import content_sha256, read_problem
from minidpo.config import RunConfig, to_dict
from minidpo.cost import measure
from minidpo.errors import MinidpoError, out_of_memory
from minidpo.lock import hold, release
from minidpo.paths import RunPaths
from minidpo.sampling import check_policy_context
from minidpo.threads import POLICY


@dataclass
class Context:
    """A run: where it writes, its settings per stage group, and its device."""

    run: RunConfig
    cfg: dict[str, Any]  # group name -> config dataclass
    device: torch.device
    progress: bool = True
    force: set[str] = field(default_factory=set)
    log: Callable[[str], None] = print
    inputs: dict[str, Path] = field(default_factory=dict)  # RunPaths.inputs
    prefixed: tuple[str, ...] = ()  # groups whose flags carry the group's name (the pipeline's)

    def flag(self, group: str, name: str) -> str:
        """The flag of config field `name` of `group` as the user types it in this command
        (``--max-new-tokens`` in `minidpo ppo`, ``--ppo-max-new-tokens`` in the pipeline)."""
        prefix = f"{group.replace('_', '-')}-" if group in self.prefixed else ""
        return f"--{prefix}{name.replace('_', '-')}"

    @property
    def paths(self) -> RunPaths:
        return RunPaths.of(self.run, self.inputs)

    @property
    def folder(self) -> Path:
        return self.paths.folder

    @property
    def sft_path(self) -> Path:
        return self.paths.sft

    @property
    def pairs(self) -> tuple[Path, Path]:
        return self.paths.train_pairs, self.paths.eval_pairs

    def with_seed(self, seed: int) -> Context:
        """The same run with another seed (the sweep's repeats)."""
        return dataclasses.replace(self, run=dataclasses.replace(self.run, seed=seed))


def _none(ctx: Context) -> Any:
    return None


def _nothing_to_check(ctx: Context) -> None:
    pass


@dataclass(frozen=True)
class Stage:
    """One stage: ``fn(ctx, resume)`` writes `outputs` from `inputs` and returns a summary."""

    name: str
    fn: Callable[[Context, bool], dict[str, Any]]
    groups: tuple[str, ...]  # config groups that are part of its key
    deps: tuple[str, ...]  # stages that must run first (they write its inputs)
    inputs: Callable[[Context], list[Path]]  # files it reads: their content is in its key
    outputs: Callable[[Context], list[Path]]  # files whose hash identifies its result
    extra_key: Callable[[Context], Any] = _none  # settings outside its groups
    check: Callable[[Context], None] = _nothing_to_check  # bad input: raise before any write


def read_stamp(path: Path) -> dict[str, Any] | None:
    """A stamp, or None when missing or unreadable (then the stage simply runs again)."""
    try:
        stamp = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return stamp if isinstance(stamp, dict) else None


def stage_key(ctx: Context, stage: Stage) -> str:
    """Hash of the stage's config groups, seed, extra settings and its inputs' content.

    An input that is missing or unreadable is one MinidpoError naming it, what is wrong
    with it and, for the run's own files (not one the user named), the stages to run."""
    inputs = {}
    named = set(ctx.inputs.values())
    for path in stage.inputs(ctx):
        digest = content_sha256([path])
        if digest is None:
            hint = "" if path in named else (" (run the stages before it first, e.g. "
                                             "`minidpo pipeline` with the same --name)")  # fmt: skip
            raise MinidpoError(f"{path}: {read_problem(path)}; stage {stage.name} reads it{hint}")
        inputs[path.name if path.is_relative_to(ctx.folder) else str(path)] = digest
    payload = {
        "stage": stage.name,
        "config": {g: to_dict(ctx.cfg[g]) for g in stage.groups},
        "extra": stage.extra_key(ctx),
        "seed": ctx.run.seed,
        "inputs": inputs,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def up_to_date(ctx: Context, stage: Stage, key: str) -> dict[str, Any] | None:
    """The stage's stamp when it holds `key` and the outputs still hash as stamped."""
    stamp = read_stamp(ctx.paths.stamp(stage.name))
    if stamp is None or stamp.get("key") != key or stage.name in ctx.force:
        return None
    outs = stage.outputs(ctx)
    if not outs or content_sha256(outs) != stamp.get("outputs_sha256"):
        return None
    return stamp


def _undo_start(folder: Path, started: Path) -> None:
    """Take back what starting a stage wrote (its `.started` stamp, and the stamps folder,
    the lock and the run folder when nothing else is in them): bad input writes nothing."""
    started.unlink(missing_ok=True)
    with contextlib.suppress(OSError):
        started.parent.rmdir()  # only if empty
    if {p.name for p in folder.iterdir()} <= {".lock"}:
        release(folder)
        for d in (folder, folder.parent):  # the run folder, then --runs-dir, if empty
            with contextlib.suppress(OSError):
                d.rmdir()


@dataclass(frozen=True)
class _Start:
    """What `run_stage` decided before running a stage (on rank 0, under torchrun)."""

    key: str
    stamp: dict[str, Any] | None  # the current stamp: the stage is up to date
    resume: bool = False
    first: bool = False  # no earlier attempt: bad input takes back the start


def _check_contexts(ctx: Context, stage: Stage) -> None:
    """A stage that samples from the SFT policy: every world prompt leaves room for its
    groups' ``max_new_tokens`` in the policy's context, one error naming the flag as typed
    in this command (``--max-new-tokens``, ``--ppo-max-new-tokens``) before any write."""
    if ctx.paths.sft not in stage.inputs(ctx):
        return
    for group in stage.groups:
        n = getattr(ctx.cfg[group], "max_new_tokens", None)
        if n is not None:
            check_policy_context(ctx.paths.sft, n, ctx.flag(group, "max_new_tokens"))


def _start(ctx: Context, stage: Stage) -> _Start:
    """Skip, or take the run folder's lock and write the ``.started`` stamp."""
    key = stage_key(ctx, stage)
    old = up_to_date(ctx, stage, key)
    if old is not None:
        ctx.log(f"[{stage.name}] up to date ({old['cost']['wall_s']:.1f} s when run)")
        return _Start(key, old)
    _check_contexts(ctx, stage)
    stage.check(ctx)  # one clear error, and nothing written yet
    hold(ctx.folder)  # one writer per run folder (`minidpo.lock`)
    started_path = ctx.paths.stamp(stage.name).with_suffix(".started")
    started = read_stamp(started_path)
    resume = stage.name not in ctx.force and started is not None and started.get("key") == key
    atomic_write_json(started_path, {"key": key})
    ctx.log(f"[{stage.name}] {'resuming' if resume else 'running'}")
    return _Start(key, None, resume, first=started is None)


def _finish(ctx: Context, stage: Stage, key: str, summary: dict[str, Any], cost: Any) -> dict:
    """The stamp of a stage that ran: its key, its outputs' hash, its summary and cost."""
    path = ctx.paths.stamp(stage.name)
    outs = stage.outputs(ctx)
    digest = content_sha256(outs) if outs else None
    if digest is None:
        missing = [str(p) for p in outs if not p.exists()]
        raise MinidpoError(f"stage {stage.name}: outputs missing after the run: {missing or 'all'}")
    stamp = {
        "stage": stage.name,
        "key": key,
        "outputs_sha256": digest,
        "summary": summary,
        "cost": dataclasses.asdict(cost),
        "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    atomic_write_json(path, stamp)
    path.with_suffix(".started").unlink(missing_ok=True)
    ctx.log(f"[{stage.name}] done in {cost.wall_s:.1f} s")
    return stamp


def run_stage(ctx: Context, stage: Stage, stamps: dict[str, dict]) -> dict[str, Any]:
    """Skip, resume or rerun one stage (see the module docstring); returns its stamp and
    records it in `stamps`.

    Under torchrun every rank runs the stage; rank 0 alone decides and writes the stamps,
    and hands its decision and its stamp to the others (`minidpo.distributed`)."""
    distributed.barrier()  # rank 0 has written what the stages before wrote
    start = distributed.from_main(lambda: _start(ctx, stage))
    if start.stamp is not None:
        stamps[stage.name] = start.stamp
        return start.stamp
    POLICY.refresh()  # training threads: the idle cores now (`minidpo.threads`)
    try:
        with measure(ctx.device) as cost:
            summary = stage.fn(ctx, start.resume)
    except Exception as e:  # bad input (or a size past memory), found before a resumable write
        bad = isinstance(e, MinidpoError) or out_of_memory(e) is not None
        if bad and start.first and distributed.is_writer():
            _undo_start(ctx.folder, ctx.paths.stamp(stage.name).with_suffix(".started"))
        raise
    distributed.barrier()  # every rank has finished its part
    stamp = distributed.from_main(lambda: _finish(ctx, stage, start.key, summary, cost))
    stamps[stage.name] = stamp
    return stamp


# Snapshots of each training run: the points of the reward-KL frontier.
SNAPSHOTS_PER_RUN = 4


def method_config(
    ctx: Context, group: str, overrides: dict[str, Any] | None, steps_field: str
) -> Any:
    """A method's config: the run's `group` with `overrides` on top, and a snapshot every
    steps / SNAPSHOTS_PER_RUN steps unless ``snapshot_every`` is set."""
    cfg = dataclasses.replace(ctx.cfg[group], **(overrides or {}))
    if cfg.snapshot_every == 0:
        every = max(1, getattr(cfg, steps_field) // SNAPSHOTS_PER_RUN)
        cfg = dataclasses.replace(cfg, snapshot_every=every)
    return cfg


def training_summary(s: dict[str, Any]) -> dict[str, Any]:
    """What a stamp keeps of a supervised trainer's summary: tokens through forward and
    backward (the cost table) and the last training loss."""
    tokens = int(s.get("tokens", 0))
    return {"tokens_forward": tokens, "tokens_backward": tokens, "train_loss": s.get("train/loss")}


Variant = Callable[[str, float, int, Callable[[Context], Path]], Stage]


def _no_sweep(ctx: Context) -> list[float]:
    return []


@dataclass(frozen=True)
class Method:
    """A trained policy the pipeline compares with the others: one entry of its table.

    `stage` trains the pipeline's own run. `key` names the setting that places it on the
    frontier ("beta", "kl"; "" for none) and `value(ctx)` is the pipeline's own value of
    it; `cost_with` lists the shared stages its cost includes (DPO's reference log-probs,
    PPO's reward model). For the frontier sweep, `sweep(ctx)` gives the values to run and
    `variant(name, value, seed, folder)` the stage of one sweep run, in a folder named
    `folder` + value (``dpo-beta0.5``).
    """

    name: str
    stage: Stage
    key: str = ""
    value: Callable[[Context], float] | None = None
    cost_with: tuple[str, ...] = ()
    sweep: Callable[[Context], list[float]] = _no_sweep
    variant: Variant | None = None
    folder: str = ""
    sweep_key: str = ""  # the swept setting when it is not `key` (PPO: "target", its KL target)

    def label(self, value: float | None) -> str:
        """A setting as tables and plots write it: "beta=0.5" ("" without a key)."""
        return f"{self.key}={value:g}" if self.key and value is not None else ""

    def sweep_label(self, value: float) -> str:
        """A sweep run's setting: "beta=0.5", or "target=2" where the sweep varies another."""
        key = self.sweep_key or self.key
        return f"{key}={value:g}" if key else ""

    def setting(self, ctx: Context) -> str:
        """The pipeline's own setting: "beta=0.1"."""
        return self.label(None if self.value is None else self.value(ctx))

    def sweep_dir(self, ctx: Context, value: float, seed: int) -> Path:
        """The folder of one sweep run: ``sweep/seed<s>/<folder><value>``."""
        tag = f"{self.folder}{value:g}" if self.sweep_key or self.key else self.folder
        return ctx.folder / "sweep" / f"seed{seed}" / tag

    def sweep_stage(self, ctx: Context, value: float, seed: int) -> Stage:
        """One run of the sweep as a stage (its stamp: ``sweep-<method>-<setting>-seed<s>``)."""
        if self.variant is None:
            raise MinidpoError(f"{self.name} has no sweep variant")
        label = self.sweep_label(value) or "default"
        name = f"sweep-{self.name}-{label}-seed{seed}".replace("=", "").replace(" ", "-")
        return self.variant(name, value, seed, lambda c: self.sweep_dir(c, value, seed))
