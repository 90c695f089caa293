"""The whole job in one command: the stage table, run in order, each skipped when done.

    tokenizer -> sft -> prefs -> ref_logps -> dpo      -> eval -> plots -> report
                                 \\-> rm -> ppo, best_of_n
                                 \\-> ppo_gt, preferred_ft

Each stage is declared in its own module (`minidpo.stage.Stage`: config groups,
inputs, outputs, a function); `STAGES` lists them in order, and `minidpo.stage.run_stage`
decides for each whether to skip, resume or rerun it, from its stamp
``stages/<stage>.json`` (the key, the outputs' hash, the summary and the cost: wall
time, peak memory). `force` reruns named stages (and, their outputs changing,
whatever reads them). On the CPU a resumed run ends with the numbers of an
uninterrupted one (tested on the tiny preset).

The sweep (`run_sweep`) reuses the same machinery for the reward-KL frontier: every
(method, setting, seed) is one more instance of a method's stage.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from minidpo import dpo, grpo, limits, online_dpo, ppo, unlikelihood
from minidpo.atomic import atomic_write_json
from minidpo.baselines import BEST_OF_N_STAGE, PREFERRED_FT_METHOD, PreferredFTConfig
from minidpo.claims import REPORT_STAGE, write_full_report
from minidpo.comparison import eval_seconds, eval_stage, evaluate_sweep
from minidpo.config import (
    DPOConfig,
    EvalConfig,
    ModelConfig,
    PrefsConfig,
    SFTConfig,
    TokenizerConfig,
    _f,
    to_dict,
)
from minidpo.errors import MinidpoError
from minidpo.grpo import GRPOConfig
from minidpo.online_dpo import OnlineDPOConfig
from minidpo.ppo import PPOConfig
from minidpo.preferences import PREFS_STAGE
from minidpo.report import PLOTS_STAGE, make_plots
from minidpo.reward_model import RM_STAGE, RewardModelConfig
from minidpo.sft import SFT_STAGE
from minidpo.shaping import ShapingConfig
from minidpo.stage import Context, Method, Stage, read_stamp, run_stage
from minidpo.tokenizer_stage import TOKENIZER_STAGE
from minidpo.unlikelihood import UnlikelihoodConfig

__all__ = ["GROUPS", "METHODS", "STAGES", "STAGE_NAMES", "Context", "PipelineConfig",
           "read_stamp", "run_pipeline", "run_stages", "run_sweep"]  # fmt: skip


@dataclass
class PipelineConfig:
    """What the pipeline adds to the stages' own settings: baselines, evaluation, sweep."""

    best_of_n: int = _f(16, "N of the Best-of-N baseline (candidates per prompt, SFT samples)")
    best_of_n_samples_per_prompt: int = _f(
        16, "Best-of-N selections evaluated per prompt (16 x 40 prompts: se < 0.05 at N = 16)"
    )
    ppo_gt_kl_coef: float = _f(0.05, "KL coefficient of PPO-GT (PPO on the oracle reward)")
    frontier_samples_per_prompt: int = _f(
        8,
        "samples per held-out prompt at each frontier point and seed (8 x 40 prompts)",
    )
    reach_margin: float = _f(
        0.2, "cost table: time to first reach the SFT oracle reward + this margin"
    )
    seeds: int = _f(
        5,
        "sweep: seeds per setting (seed, seed + 1, ...), each with its own pairs and reward "
        "model; intervals are t with seeds - 1 df",
    )
    nll_remedy_alpha: float = _f(1.0, "DPO+NLL: weight of the chosen response's NLL (RPO's 1)")
    dpop_remedy_lambda: float = _f(50.0, "DPOP: lambda of its penalty (the DPOP paper's 50)")
    sweep_dpo_betas: str = _f("0.05,0.1,1,5", "sweep: DPO betas, comma-separated (the paper's)")
    sweep_ppo_kl_targets: str = _f(
        "0.25,1,4",
        "sweep: KL targets (nats) of PPO's adaptive KL controller, comma-separated "
        "(down to 0.25: PPO's frontier starts where DPO's does)",
    )
    sweep_unlikelihood_alphas: str = _f(
        "0.05,0.1,0.5,1", "sweep: Unlikelihood alphas, comma-separated (the paper's)"
    )
    sweep_grpo_betas: str = _f("0.01,0.1", "sweep: GRPO KL weights beta, comma-separated")
    sweep_online_dpo_betas: str = _f("0.1,1", "sweep: online DPO betas, comma-separated")
    weak_reference_steps: int = _f(
        500, "sweep, the reference's role: the early SFT checkpoint's step (of SFT's steps)"
    )
    methods: str = _f(
        "all",
        "the methods the pipeline trains and compares: their stage names, comma-separated "
        "(dpo, ppo, grpo, ..., best_of_n), or all; `minidpo demo`: dpo,ppo",
    )

    def validate(self, flag_prefix: str = "") -> None:
        """Raise MinidpoError naming the flag of the first bad value (its flags are never
        prefixed: `flag_prefix` is there for the one signature every config's `validate` has)."""
        for name in ("best_of_n", "best_of_n_samples_per_prompt", "frontier_samples_per_prompt"):
            if getattr(self, name) < 1:
                raise MinidpoError(f"--{name.replace('_', '-')}: must be >= 1")
        if self.seeds < 2:
            raise MinidpoError(
                f"--seeds: the sweep needs at least 2 (its intervals are over seeds), got "
                f"{self.seeds}"
            )
        for name in ("nll_remedy_alpha", "dpop_remedy_lambda"):
            if not 0 < getattr(self, name) < float("inf"):
                raise MinidpoError(f"--{name.replace('_', '-')}: must be > 0 and finite")
        if not self.ppo_gt_kl_coef > 0:
            raise MinidpoError(f"--ppo-gt-kl-coef: must be > 0, got {self.ppo_gt_kl_coef}")
        for name in ("sweep_dpo_betas", "sweep_ppo_kl_targets", "sweep_unlikelihood_alphas",
                     "sweep_grpo_betas", "sweep_online_dpo_betas"):  # fmt: skip
            self.floats(name)
        if self.weak_reference_steps < 1:
            raise MinidpoError(
                f"--weak-reference-steps: must be >= 1, got {self.weak_reference_steps}"
            )
        if any(a > 1 for a in self.floats("sweep_unlikelihood_alphas")):
            raise MinidpoError("--sweep-unlikelihood-alphas: each alpha must be in (0, 1]")
        self.selected()

    def selected(self) -> set[str]:
        """The stage names of the methods `--methods` selects (one error naming the flag)."""
        choices = [*(m.stage.name for m in METHODS), BEST_OF_N_STAGE.name]
        names = [x.strip() for x in self.methods.split(",") if x.strip()]
        if names == ["all"]:
            return set(choices)
        bad = [n for n in names if n not in choices] or ([] if names else [self.methods])
        if bad:
            raise MinidpoError(
                f"--methods: unknown method {bad[0]!r} (choose from all, {', '.join(choices)})"
            )
        return set(names)

    def floats(self, name: str) -> list[float]:
        """A comma-separated list field as floats (one clear error naming the flag)."""
        raw = getattr(self, name)
        try:
            values = [float(x) for x in raw.split(",") if x.strip()]
        except ValueError:
            values = []
        if not values or any(not v > 0 for v in values):
            flag = "--" + name.replace("_", "-")
            raise MinidpoError(
                f"{flag}: expected positive numbers separated by commas, got {raw!r}"
            )
        return values


GROUPS: dict[str, type] = {
    "tokenizer": TokenizerConfig,
    "model": ModelConfig,
    "sft": SFTConfig,
    "prefs": PrefsConfig,
    "dpo": DPOConfig,
    "rm": RewardModelConfig,
    "ppo": PPOConfig,
    "grpo": GRPOConfig,
    "online_dpo": OnlineDPOConfig,
    "shaping": ShapingConfig,
    "preferred_ft": PreferredFTConfig,
    "unlikelihood": UnlikelihoodConfig,
    "eval": EvalConfig,
    "pipeline": PipelineConfig,
}


# The methods compared, in the order of every table. A new method: its stage file, and one
# line here (docs/ARCHITECTURE.md, "Adding a method").
METHODS: list[Method] = [
    dpo.METHOD,
    dpo.NLL_METHOD,
    dpo.DPOP_METHOD,
    online_dpo.METHOD,
    ppo.RLHF_METHOD,
    ppo.GT_METHOD,
    grpo.METHOD,
    PREFERRED_FT_METHOD,
    unlikelihood.METHOD,
]


def pipeline_stages(selected: set[str] | None = None) -> list[Stage]:
    """The pipeline, in order: what the methods share, the methods (those `selected`
    names, every one by default), then evaluation and report."""
    methods = [m for m in METHODS if selected is None or m.stage.name in selected]
    best_of_n = selected is None or BEST_OF_N_STAGE.name in selected
    return [
        TOKENIZER_STAGE,
        SFT_STAGE,
        PREFS_STAGE,
        dpo.REF_LOGPS_STAGE,
        RM_STAGE,
        *(m.stage for m in methods),
        *([BEST_OF_N_STAGE] if best_of_n else []),
        eval_stage(methods, best_of_n=best_of_n),
        PLOTS_STAGE,
        REPORT_STAGE,
    ]


STAGES: list[Stage] = pipeline_stages()
STAGE_NAMES = [s.name for s in STAGES]
BY_NAME = {s.name: s for s in STAGES}


def check_force(names: Sequence[str]) -> set[str]:
    bad = [n for n in names if n not in STAGE_NAMES]
    if bad:
        raise MinidpoError(f"--force: unknown stage {bad[0]!r} (stages: {', '.join(STAGE_NAMES)})")
    return set(names)


def run_stages(ctx: Context, names: Sequence[str]) -> dict[str, dict]:
    """The named stages and every stage they read, in pipeline order, each skipped when
    its stamp is current (what the sweep and the lessons use); returns the stamps."""
    needed, todo = set(), list(names)
    while todo:
        name = todo.pop()
        if name not in needed:
            needed.add(name)
            todo += BY_NAME[name].deps
    stamps: dict[str, dict] = {}
    for stage in STAGES:
        if stage.name in needed:
            run_stage(ctx, stage, stamps)
    return stamps


def run_pipeline(ctx: Context, until: str | None = None) -> dict[str, dict]:
    """Every stage of the selected methods (`--methods`) in order (up to and including
    `until`); returns the stamps."""
    stamps: dict[str, dict] = {}
    t0 = time.perf_counter()
    for stage in pipeline_stages(ctx.cfg["pipeline"].selected()):
        run_stage(ctx, stage, stamps)
        if stage.name == until:
            break
    atomic_write_json(
        ctx.folder / "pipeline.json",
        {
            "wall_s": time.perf_counter() - t0,
            "stages": {n: s["cost"] for n, s in stamps.items()},
            "config": {g: to_dict(c) for g, c in ctx.cfg.items()},
            "seed": ctx.run.seed,
            "device": str(ctx.device),
        },
    )
    return stamps


# --------------------------------------------------------------------------- sweep


def sweep_runs(ctx: Context) -> list[tuple[Method, float, int]]:
    """(method, value of its swept setting, seed) of every training run of the sweep."""
    p = ctx.cfg["pipeline"]
    if p.selected() != PipelineConfig().selected():
        raise MinidpoError(
            f"--methods: the sweep compares every method, got {p.methods!r} (leave it at all)"
        )
    if p.seeds < 2:
        raise MinidpoError(
            f"--seeds: the sweep needs at least 2 (its intervals are over seeds), got {p.seeds}"
        )
    return [(m, value, ctx.run.seed + i) for i in range(p.seeds) for m in METHODS
            for value in m.sweep(ctx)]  # fmt: skip


# What a sweep seed draws anew: its preference pairs (samples and labels), their
# reference log-probs and its reward model; the SFT policy is the run's, shared.
SEED_DATA: list[Stage] = [PREFS_STAGE, dpo.REF_LOGPS_STAGE, RM_STAGE]


def seed_context(ctx: Context, seed: int) -> Context:
    """The context of one sweep seed: the run's settings and SFT, the seed's own pairs
    and reward model under ``sweep/seed<s>/`` (`minidpo.paths`)."""
    root = ctx.folder / "sweep" / f"seed{seed}"
    inputs = {**ctx.inputs, "prefs_dir": root / "prefs", "rm_dir": root / "rm"}
    return dataclasses.replace(ctx.with_seed(seed), inputs=inputs)


def seed_data_stages(seed: int) -> list[Stage]:
    """`SEED_DATA` as one seed's stages (``sweep-prefs-seed<s>``, ...)."""
    return [dataclasses.replace(s, name=f"sweep-{s.name}-seed{seed}") for s in SEED_DATA]


def run_sweep(ctx: Context) -> dict[str, Any]:
    """The frontier sweep: the run's SFT, then per seed its own pairs and reward model
    (`seed_context`), every (method, setting) run with snapshots and the limits
    experiments (`minidpo.limits`); every snapshot evaluated, the frontier plotted.

    ``sweep/timing.json`` holds the cost of the sweep from scratch, from measured parts:
    every stage's wall time from its stamp (measured when it ran) and every evaluation's
    from its cache, so a rerun that skips everything reports the same total."""
    t0 = time.perf_counter()
    runs = sweep_runs(ctx)
    stamps = run_stages(ctx, ["sft"])  # what every seed shares
    run_stage(ctx, limits.EARLY_SFT_STAGE, stamps)
    seeds = sorted({seed for _, _, seed in runs})
    for seed in seeds:
        sctx = seed_context(ctx, seed)
        for stage in seed_data_stages(seed):
            run_stage(sctx, stage, stamps)
        for method, value, _ in (r for r in runs if r[2] == seed):
            run_stage(sctx, method.sweep_stage(sctx, value, seed), stamps)
        for stage in limits.limit_stages(sctx, seed):
            run_stage(sctx, stage, stamps)
    ctx.log("[sweep] evaluating every snapshot")
    points = evaluate_sweep(ctx, [(m.name, m.sweep_label(v), m.sweep_dir(ctx, v, s), s)
                                  for m, v, s in runs])  # fmt: skip
    table = limits.evaluate_limits(ctx, seeds)
    t1 = time.perf_counter()
    make_plots(ctx.folder)
    write_full_report(ctx.folder)
    wall = {n: s["cost"]["wall_s"] for n, s in stamps.items()}
    wall["sweep_eval"] = (
        eval_seconds([m.sweep_dir(ctx, v, s) for m, v, s in runs]) + table["eval_s"]
    )
    wall["plots_report"] = time.perf_counter() - t1
    atomic_write_json(ctx.folder / "sweep" / "timing.json",
                      {"wall_s": sum(wall.values()), "stages": wall,
                       "this_call_s": time.perf_counter() - t0})  # fmt: skip
    return {"points": len(points), "wall_s": sum(wall.values())}
