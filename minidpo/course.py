"""What the lesson notebooks share: the setting, the run folder they build up, exercise checks.

Every notebook in lessons/ imports this module first. It keeps the notebooks short
and the same in three places:

* `versions()`: the line each lesson prints in its first cell (python, torch, numpy,
  minidpo), so a reader can tell whose outputs they are looking at;
* the setting: the full `cpu` preset by default, or the `tiny` preset when the
  environment variable ``MINIDPO_LESSONS_FAST=1`` is set (what the tests run);
* the run folder: the lessons share one run, ``runs/lessons-<preset>/``, and each
  ``*_checkpoint()`` / ``preference_pairs()`` call runs its pipeline stage (and what it
  reads) only if its stamp is not current (`minidpo.pipeline.run_stages`), so lesson 05 reuses lesson 03's
  SFT model, and any lesson still runs on its own, top to bottom;
* `exercise()`: checks the reader's code against the package, or, while the reader has
  not written it yet, checks the solution in lessons/solutions/ and says so.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import platform
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

import minidpo
from minidpo import dpo
from minidpo.config import (
    DPOConfig,
    EvalConfig,
    RunConfig,
    resolve,
    to_dict,
)
from minidpo.paths import RunPaths
from minidpo.pipeline import GROUPS, run_stages
from minidpo.stage import Context, run_stage

FAST_ENV = "MINIDPO_LESSONS_FAST"
RUNS_ENV = "MINIDPO_LESSONS_RUNS"
REPO = Path(__file__).resolve().parents[1]
SOLUTIONS = REPO / "lessons" / "solutions"


def fast() -> bool:
    """True when the lessons run in their fast setting (``MINIDPO_LESSONS_FAST=1``)."""
    return os.environ.get(FAST_ENV, "") not in ("", "0")


def preset() -> str:
    """The preset the lessons train with: ``tiny`` when fast, else ``cpu`` (the default)."""
    return "tiny" if fast() else "cpu"


def versions() -> str:
    """One line: python, torch, numpy and minidpo versions, and the lesson setting."""
    return (
        f"python {platform.python_version()}, torch {torch.__version__}, "
        f"numpy {np.__version__}, minidpo {minidpo.__version__}; "
        f"preset {preset()}{' (fast)' if fast() else ''}"
    )


def run_config(seed: int = 0) -> RunConfig:
    """The lessons' shared run: ``<runs>/lessons-<preset>`` on the CPU."""
    runs = os.environ.get(RUNS_ENV) or str(REPO / "runs")
    return RunConfig(name=f"lessons-{preset()}", runs_dir=runs, preset=preset(), seed=seed,
                     device="cpu")  # fmt: skip


def config(cls: type, group: str, **overrides):
    """The lesson preset's config for one stage, with `overrides` on top."""
    cfg = resolve(cls, group, preset(), None)
    for k, v in overrides.items():
        if not hasattr(cfg, k):
            raise TypeError(f"{cls.__name__} has no field {k!r}")
        setattr(cfg, k, v)
    return cfg


def folder() -> Path:
    """The lessons' run folder (created on first use)."""
    return RunPaths.of(run_config()).folder


def context(progress: bool = False):
    """The lessons' run as a pipeline `Context` (every stage group at the lesson preset)."""
    cfg = {group: config(cls, group) for group, cls in GROUPS.items()}
    return Context(run=run_config(), cfg=cfg, device=torch.device("cpu"), progress=progress,
                   log=lambda message: None)  # fmt: skip


def sft_checkpoint(progress: bool = False) -> Path:
    """The SFT policy of the lessons' run, trained first if it is not there (lesson 03)."""
    ctx = context(progress)
    run_stages(ctx, ["sft"])
    return ctx.sft_path


def preference_pairs() -> tuple[Path, Path]:
    """(train.jsonl, eval.jsonl): pairs sampled from the SFT policy, built if missing."""
    ctx = context()
    run_stages(ctx, ["prefs"])
    return ctx.pairs


def reward_model_checkpoint(progress: bool = False) -> Path:
    """The Bradley-Terry reward model on the lessons' pairs, trained if missing (lesson 04)."""
    ctx = context(progress)
    run_stages(ctx, ["rm"])
    return ctx.paths.rm


def dpo_checkpoint(progress: bool = False, **overrides) -> Path:
    """A DPO policy on the lessons' pairs (`overrides`: DPOConfig fields, e.g. beta=0.5),
    one folder per full config (``dpo-<loss>-beta<b>-<hash of the config>``)."""
    cfg = config(DPOConfig, "dpo", **overrides)
    key = hashlib.sha256(json.dumps(to_dict(cfg), sort_keys=True).encode()).hexdigest()[:8]
    ctx = context(progress)
    run_stages(ctx, ["ref_logps"])

    def out(c: Context) -> Path:
        return c.paths.dpo_dir(cfg.loss, cfg.beta, cfg.label_smoothing, tag=key)

    run_stage(ctx, dpo.stage(f"dpo-{key}", overrides=overrides, folder=out), {})
    return out(ctx) / "checkpoint.pt"


def eval_config(**overrides) -> EvalConfig:
    """The evaluation setting of the lessons (fewer samples when fast)."""
    return config(EvalConfig, "eval", **overrides)


def load_solution(name: str) -> dict:
    """The names defined by lessons/solutions/<name>.py."""
    path = SOLUTIONS / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"lesson_solution_{name}", path)
    if spec is None or spec.loader is None:
        raise FileNotFoundError(path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return vars(module)


def exercise(
    candidate: Callable, solution: str, check: Callable[[Callable], None], name: str = ""
) -> str:
    """Check the reader's `candidate` with `check` (which asserts against the package).

    While the reader's function still raises NotImplementedError, the same check runs on
    the function of the same name in lessons/solutions/<solution>.py, so a notebook
    executed untouched (as the tests do) verifies the published solution. A wrong answer
    raises AssertionError with `check`'s message; the return value says which was checked.
    """
    fn_name = name or candidate.__name__
    try:
        check(candidate)
    except NotImplementedError:
        check(load_solution(solution)[fn_name])
        msg = (
            f"{fn_name}: not written yet, so the solution (lessons/solutions/{solution}.py) "
            "was checked instead; it passes"
        )
    else:
        msg = f"{fn_name}: correct, it agrees with the package"
    print(msg)
    return msg
