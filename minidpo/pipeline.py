"""The whole job in one command: every stage in order, each skipped when already done.

    tokenizer -> sft -> prefs -> ref_logps -> dpo      -> eval -> plots -> report
                                 \\-> rm -> ppo, best_of_n
                                 \\-> ppo_gt, preferred_ft

A stage is a function of a `Context` that writes under the run folder and returns
a JSON-ready summary. After it finishes, the pipeline writes a stamp,
``stages/<stage>.json``: the stage's key, the SHA-256 of its outputs, its summary
and its cost (wall time, peak memory). The key is the hash of the stage's config,
the seed, and the output hashes of the stages it reads, so a stage is skipped only
when neither its settings nor anything upstream changed; `force` reruns named
stages (and, their outputs changing, whatever depends on them).

Interrupted runs: every training stage checkpoints and resumes by itself
(`minidpo.training.stage_status`); the pipeline writes a ``.started`` stamp with the
key before a stage runs, so a rerun of the same command resumes the stage (same key)
or restarts it (changed settings). Evaluation and plots are deterministic given
their inputs and are simply redone. On the CPU a resumed run ends with the numbers
of an uninterrupted one (tested on the tiny preset).

The sweep (`run_sweep`) reuses the same machinery for the reward-KL frontier.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from minidpo.atomic import atomic_write_json
from minidpo.baselines import PreferredFTConfig
from minidpo.config import (
    DPOConfig,
    EvalConfig,
    ModelConfig,
    PrefsConfig,
    RunConfig,
    SFTConfig,
    TokenizerConfig,
    _f,
    to_dict,
)
from minidpo.cost import measure
from minidpo.errors import MinidpoError
from minidpo.ppo import PPOConfig
from minidpo.reward_model import RewardModelConfig
from minidpo.sft import run_dir
from minidpo.training import file_sha256


@dataclass
class PipelineConfig:
    """What the pipeline adds to the stages' own settings: baselines, evaluation, sweep."""

    best_of_n: int = _f(16, "N of the Best-of-N baseline (candidates per prompt, SFT samples)")
    best_of_n_samples_per_prompt: int = _f(8, "Best-of-N selections evaluated per prompt")
    ppo_gt_kl_coef: float = _f(0.05, "KL coefficient of PPO-GT (PPO on the oracle reward)")
    frontier_samples_per_prompt: int = _f(4, "samples per held-out prompt at each frontier point")
    reach_margin: float = _f(
        0.2, "cost table: time to first reach the SFT oracle reward + this margin"
    )
    seeds: int = _f(3, "sweep: seeds per setting (seed, seed + 1, ...)")
    sweep_dpo_betas: str = _f("0.1,0.3,1", "sweep: DPO betas, comma-separated")
    sweep_ppo_kl_coefs: str = _f("0.02,0.05,0.2", "sweep: PPO KL coefficients, comma-separated")

    def validate(self) -> None:
        """Raise MinidpoError naming the flag of the first bad value."""
        for name in ("best_of_n", "best_of_n_samples_per_prompt", "frontier_samples_per_prompt",
                     "seeds"):  # fmt: skip
            if getattr(self, name) < 1:
                raise MinidpoError(f"--{name.replace('_', '-')}: must be >= 1")
        if not self.ppo_gt_kl_coef > 0:
            raise MinidpoError(f"--ppo-gt-kl-coef: must be > 0, got {self.ppo_gt_kl_coef}")
        self.floats("sweep_dpo_betas")
        self.floats("sweep_ppo_kl_coefs")

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
    "preferred_ft": PreferredFTConfig,
    "eval": EvalConfig,
    "pipeline": PipelineConfig,
}

# Snapshots of each training run: the points of the reward-KL frontier.
SNAPSHOTS_PER_RUN = 4


@dataclass
class Context:
    """A pipeline run: where it writes, its settings per stage group, and its device."""

    run: RunConfig
    cfg: dict[str, Any]  # group name -> config dataclass
    device: torch.device
    progress: bool = True
    force: set[str] = field(default_factory=set)
    log: Callable[[str], None] = print

    @property
    def folder(self) -> Path:
        return run_dir(self.run)

    @property
    def sft_path(self) -> Path:
        return self.folder / "sft" / "checkpoint.pt"

    @property
    def pairs(self) -> tuple[Path, Path]:
        return self.folder / "prefs" / "train.jsonl", self.folder / "prefs" / "eval.jsonl"


@dataclass
class Stage:
    """One step of the pipeline."""

    name: str
    fn: Callable[[Context, bool], dict[str, Any]]  # (ctx, force) -> summary
    groups: tuple[str, ...]  # config groups that are part of its key
    deps: tuple[str, ...]  # stages whose outputs it reads
    outputs: Callable[[Context], list[Path]]  # files whose hash identifies its result
    extra_key: Callable[[Context], Any] = lambda ctx: None


def snapshot_every(steps: int) -> int:
    """Snapshot spacing that gives about SNAPSHOTS_PER_RUN points per run."""
    return max(1, steps // SNAPSHOTS_PER_RUN)


def with_snapshots(cfg: Any, steps_field: str) -> Any:
    return dataclasses.replace(cfg, snapshot_every=snapshot_every(getattr(cfg, steps_field)))


# --------------------------------------------------------------------------- stages


def st_tokenizer(ctx: Context, force: bool) -> dict[str, Any]:
    from minidpo.sft import prepare_tokenizer
    from minidpo.world import load_world

    path = ctx.folder / "tokenizer.json"
    if force:
        path.unlink(missing_ok=True)
    tok = prepare_tokenizer(ctx.run, ctx.cfg["tokenizer"], load_world())
    return {"vocab_size": tok.vocab_size}


def st_sft(ctx: Context, force: bool) -> dict[str, Any]:
    from minidpo.sft import run_sft

    c = ctx.cfg
    s = run_sft(dataclasses.replace(ctx.run, force=force), c["tokenizer"], c["model"], c["sft"],
                progress=ctx.progress)  # fmt: skip
    return {k: s[k] for k in ("steps", "train_loss", "eval_loss") if k in s}


def st_prefs(ctx: Context, force: bool) -> dict[str, Any]:
    from minidpo.preferences import build_preferences

    s = build_preferences(sft_path=ctx.sft_path, out_dir=ctx.folder / "prefs",
                          cfg=ctx.cfg["prefs"], seed=ctx.run.seed, device=ctx.device)  # fmt: skip
    return {"train_pairs": s["train"]["pairs"], "eval_pairs": s["eval"]["pairs"],
            "label_agreement": s["train"]["label_agreement"]}  # fmt: skip


def st_ref_logps(ctx: Context, force: bool) -> dict[str, Any]:
    """Reference log-probs of every pair, computed once and cached beside the pairs."""
    from minidpo.dpo import reference_logps, tokenize_pairs
    from minidpo.policy import load_policy
    from minidpo.preferences import load_pairs

    _, tok = load_policy(ctx.sft_path)
    block = ctx.cfg["model"].block_size
    tokens = 0
    for path in ctx.pairs:
        if force:
            for old in path.parent.glob(f"{path.stem}.ref-*.pt"):
                old.unlink()
        data = tokenize_pairs(load_pairs(path, warn=False)[0], tok, block, str(path))
        reference_logps(path, ctx.sft_path, data, tok.eot_id, ctx.device)
        tokens += sum(2 * len(p) + len(c) + len(r)
                      for p, c, r in zip(data.prompts, data.chosen, data.rejected, strict=True))  # fmt: skip
    return {"tokens_forward": tokens}


def _dpo_out(ctx: Context) -> Path:
    cfg = ctx.cfg["dpo"]
    return ctx.folder / f"dpo-{cfg.loss}-beta{cfg.beta:g}"


def _dpo(ctx: Context, force: bool, beta: float, out: Path) -> dict[str, Any]:
    from minidpo.dpo import run_dpo

    train, held_out = ctx.pairs
    cfg = with_snapshots(dataclasses.replace(ctx.cfg["dpo"], beta=beta), "steps")
    s = run_dpo(sft_path=ctx.sft_path, train_pairs=train, eval_pairs=held_out, out_dir=out,
                cfg=cfg, seed=ctx.run.seed, device=ctx.device, progress=ctx.progress,
                force=force)  # fmt: skip
    return _train_summary(s, backward=True)


def st_dpo(ctx: Context, force: bool) -> dict[str, Any]:
    return _dpo(ctx, force, ctx.cfg["dpo"].beta, _dpo_out(ctx))


def st_rm(ctx: Context, force: bool) -> dict[str, Any]:
    from minidpo.reward_model import run_reward_model

    train, held_out = ctx.pairs
    s = run_reward_model(sft_path=ctx.sft_path, train_pairs=train, eval_pairs=held_out,
                         out_dir=ctx.folder / "rm", cfg=ctx.cfg["rm"], seed=ctx.run.seed,
                         device=ctx.device, progress=ctx.progress, force=force)  # fmt: skip
    rep = s.get("report") or {}
    keep = ("heldout_accuracy", "heldout_ceiling", "heldout_gap", "spearman")
    return {**{k: rep.get(k) for k in keep}, "best_step": s.get("best_step"),
            **_train_summary(s, backward=True)}  # fmt: skip


def _ppo(ctx: Context, force: bool, reward: str, kl_coef: float, out: Path) -> dict[str, Any]:
    from minidpo.ppo import oracle_scores, run_ppo
    from minidpo.reward_model import load_reward_model

    cfg = dataclasses.replace(ctx.cfg["ppo"], kl_coef=kl_coef)
    cfg = with_snapshots(cfg, "iterations")
    if reward == "oracle":  # PPO-GT optimises r* exactly: the oracle charges its own -1
        cfg = dataclasses.replace(cfg, missing_eot_penalty=0.0)
        score_fn, value_init = oracle_scores, None
    else:
        rm = load_reward_model(ctx.folder / "rm" / "checkpoint.pt", ctx.device)
        score_fn, value_init = rm.score, rm.model.state_dict()
    s = run_ppo(sft_path=ctx.sft_path, out_dir=out, cfg=cfg, score_fn=score_fn,
                seed=ctx.run.seed, device=ctx.device, value_init=value_init,
                progress=ctx.progress, force=force, flag_prefix="ppo-")  # fmt: skip
    keep = ("eval_oracle_start", "eval_oracle", "eval_kl", "rollout_scores", "rollout_oracle",
            "time_per_iteration", "tokens_forward", "tokens_backward", "wall_s")  # fmt: skip
    return {k: s.get(k) for k in keep}


def _ppo_out(ctx: Context, reward: str) -> Path:
    kl = ctx.cfg["ppo"].kl_coef if reward == "rm" else ctx.cfg["pipeline"].ppo_gt_kl_coef
    return ctx.folder / f"ppo-{reward}-kl{kl:g}"


def st_ppo(ctx: Context, force: bool) -> dict[str, Any]:
    return _ppo(ctx, force, "rm", ctx.cfg["ppo"].kl_coef, _ppo_out(ctx, "rm"))


def st_ppo_gt(ctx: Context, force: bool) -> dict[str, Any]:
    kl = ctx.cfg["pipeline"].ppo_gt_kl_coef
    return _ppo(ctx, force, "oracle", kl, _ppo_out(ctx, "oracle"))


def _preferred_ft(ctx: Context, force: bool, out: Path) -> dict[str, Any]:
    from minidpo.baselines import run_preferred_ft

    train, held_out = ctx.pairs
    s = run_preferred_ft(sft_path=ctx.sft_path, train_pairs=train, eval_pairs=held_out,
                         out_dir=out, cfg=with_snapshots(ctx.cfg["preferred_ft"], "steps"),
                         seed=ctx.run.seed, device=ctx.device, progress=ctx.progress,
                         force=force)  # fmt: skip
    return _train_summary(s, backward=True)


def st_preferred_ft(ctx: Context, force: bool) -> dict[str, Any]:
    return _preferred_ft(ctx, force, ctx.folder / "preferred-ft")


def _train_summary(s: dict[str, Any], backward: bool) -> dict[str, Any]:
    tokens = int(s.get("tokens", 0))
    return {"tokens_forward": tokens, "tokens_backward": tokens if backward else 0,
            "train_loss": s.get("train/loss")}  # fmt: skip


def st_best_of_n(ctx: Context, force: bool) -> dict[str, Any]:
    """Best-of-N selections on the held-out prompts, picked by the reward model."""
    from minidpo.evaluation import best_of_n_samples

    return best_of_n_samples(ctx)


def st_eval(ctx: Context, force: bool) -> dict[str, Any]:
    from minidpo.evaluation import evaluate_all

    return evaluate_all(ctx)


def st_plots(ctx: Context, force: bool) -> dict[str, Any]:
    from minidpo.report import make_plots

    return {"plots": [str(p.relative_to(ctx.folder)) for p in make_plots(ctx.folder)]}


def st_report(ctx: Context, force: bool) -> dict[str, Any]:
    from minidpo.report import write_report

    return {"report": str(write_report(ctx.folder).relative_to(ctx.folder))}


def _policy_dirs(ctx: Context) -> dict[str, Path]:
    """Method name -> training folder of every trained policy of the pipeline."""
    return {
        "DPO": _dpo_out(ctx),
        "PPO": _ppo_out(ctx, "rm"),
        "PPO-GT": _ppo_out(ctx, "oracle"),
        "Preferred-FT": ctx.folder / "preferred-ft",
    }


def _ckpts(ctx: Context, *dirs: Path) -> list[Path]:
    return [d / "checkpoint.pt" for d in dirs]


STAGES: list[Stage] = [
    Stage("tokenizer", st_tokenizer, ("tokenizer",), (),
          lambda c: [c.folder / "tokenizer.json"]),
    Stage("sft", st_sft, ("tokenizer", "model", "sft"), ("tokenizer",),
          lambda c: [c.sft_path]),
    Stage("prefs", st_prefs, ("prefs",), ("sft",), lambda c: list(c.pairs)),
    Stage("ref_logps", st_ref_logps, (), ("sft", "prefs"),
          lambda c: sorted(c.folder.joinpath("prefs").glob("*.ref-*.pt"))),
    Stage("dpo", st_dpo, ("dpo",), ("ref_logps",), lambda c: _ckpts(c, _dpo_out(c))),
    Stage("rm", st_rm, ("rm",), ("sft", "prefs"), lambda c: _ckpts(c, c.folder / "rm")),
    Stage("ppo", st_ppo, ("ppo",), ("rm",), lambda c: _ckpts(c, _ppo_out(c, "rm"))),
    Stage("ppo_gt", st_ppo_gt, ("ppo",), ("sft",), lambda c: _ckpts(c, _ppo_out(c, "oracle")),
          extra_key=lambda c: c.cfg["pipeline"].ppo_gt_kl_coef),
    Stage("preferred_ft", st_preferred_ft, ("preferred_ft",), ("prefs",),
          lambda c: _ckpts(c, c.folder / "preferred-ft")),
    Stage("best_of_n", st_best_of_n, ("eval",), ("rm",),
          lambda c: [c.folder / "best-of-n" / "samples.jsonl"],
          extra_key=lambda c: [c.cfg["pipeline"].best_of_n,
                               c.cfg["pipeline"].best_of_n_samples_per_prompt]),
    Stage("eval", st_eval, ("eval",), ("dpo", "ppo", "ppo_gt", "preferred_ft", "best_of_n"),
          lambda c: [c.folder / "eval" / "results.json"],
          extra_key=lambda c: [c.cfg["pipeline"].frontier_samples_per_prompt,
                               c.cfg["pipeline"].reach_margin]),
    Stage("plots", st_plots, (), ("eval",), lambda c: sorted(c.folder.glob("plots/*.png"))),
    Stage("report", st_report, (), ("eval", "plots"), lambda c: [c.folder / "report.md"]),
]  # fmt: skip
STAGE_NAMES = [s.name for s in STAGES]


# --------------------------------------------------------------------------- machinery


VOLATILE = ("elapsed_s",)  # checkpoint entries that differ between identical runs


def _feed(h: Any, obj: Any) -> None:
    """Hash a checkpoint's content deterministically (tensors by their bytes)."""
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous()
        h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.numpy().tobytes() if t.dtype != torch.bfloat16 else t.float().numpy().tobytes())
    elif isinstance(obj, dict):
        for k in sorted(obj, key=str):
            if k not in VOLATILE:
                h.update(f"K{k}".encode())
                _feed(h, obj[k])
    elif isinstance(obj, (list, tuple)):
        h.update(f"L{len(obj)}".encode())
        for x in obj:
            _feed(h, x)
    else:
        h.update(repr(obj).encode())


def outputs_sha256(paths: Sequence[Path]) -> str:
    """One hash over a stage's outputs: file bytes, or for checkpoints their content
    without wall-clock entries, so a bit-identical rerun leaves downstream stages alone."""
    h = hashlib.sha256()
    for p in paths:
        h.update(p.name.encode())
        if p.suffix == ".pt":
            _feed(h, torch.load(p, map_location="cpu", weights_only=True))
        else:
            h.update(file_sha256(p).encode())
    return h.hexdigest()


def stamp_path(ctx: Context, name: str) -> Path:
    return ctx.folder / "stages" / f"{name}.json"


def read_stamp(path: Path) -> dict[str, Any] | None:
    """A stamp, or None when missing or unreadable (then the stage simply runs again)."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def stage_key(ctx: Context, stage: Stage, stamps: dict[str, dict]) -> str:
    """Hash of the stage's config groups, seed, extra settings and its inputs' hashes."""
    payload = {
        "stage": stage.name,
        "config": {g: to_dict(ctx.cfg[g]) for g in stage.groups},
        "extra": stage.extra_key(ctx),
        "seed": ctx.run.seed,
        "inputs": {d: stamps[d]["outputs_sha256"] for d in stage.deps},
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def run_stage(ctx: Context, stage: Stage, stamps: dict[str, dict]) -> dict[str, Any]:
    """Run (or skip) one stage; returns its stamp and records it in `stamps`."""
    key = stage_key(ctx, stage, stamps)
    path = stamp_path(ctx, stage.name)
    old = read_stamp(path)
    if old is not None and old.get("key") == key and stage.name not in ctx.force:
        outs = stage.outputs(ctx)
        if outs and all(p.exists() for p in outs) and outputs_sha256(outs) == old["outputs_sha256"]:
            ctx.log(f"[{stage.name}] up to date ({old['cost']['wall_s']:.1f} s when run)")
            stamps[stage.name] = old
            return old
    started = read_stamp(path.with_suffix(".started"))
    # rerun from scratch when asked, or when an earlier attempt had other settings
    force = stage.name in ctx.force or (started is not None and started.get("key") != key)
    force = force or (old is not None and old.get("key") != key)
    atomic_write_json(path.with_suffix(".started"), {"key": key})
    ctx.log(f"[{stage.name}] running{' (from scratch)' if force else ''}")
    with measure(ctx.device) as cost:
        summary = stage.fn(ctx, force)
    outs = stage.outputs(ctx)
    missing = [str(p) for p in outs if not p.exists()]
    if not outs or missing:
        raise MinidpoError(f"stage {stage.name}: outputs missing after the run: {missing or 'all'}")
    stamp = {
        "stage": stage.name,
        "key": key,
        "outputs_sha256": outputs_sha256(outs),
        "summary": summary,
        "cost": dataclasses.asdict(cost),
        "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    atomic_write_json(path, stamp)
    path.with_suffix(".started").unlink(missing_ok=True)
    ctx.log(f"[{stage.name}] done in {cost.wall_s:.1f} s")
    stamps[stage.name] = stamp
    return stamp


def check_force(names: Sequence[str]) -> set[str]:
    bad = [n for n in names if n not in STAGE_NAMES]
    if bad:
        raise MinidpoError(f"--force: unknown stage {bad[0]!r} (stages: {', '.join(STAGE_NAMES)})")
    return set(names)


def run_stages(ctx: Context, names: Sequence[str]) -> dict[str, dict]:
    """The named stages and every stage they read, in pipeline order, each skipped when
    its stamp is current (what the sweep and the lessons use); returns the stamps."""
    by_name = {s.name: s for s in STAGES}
    needed, todo = set(), list(names)
    while todo:
        name = todo.pop()
        if name not in needed:
            needed.add(name)
            todo += by_name[name].deps
    stamps: dict[str, dict] = {}
    for stage in STAGES:
        if stage.name in needed:
            run_stage(ctx, stage, stamps)
    return stamps


def run_pipeline(ctx: Context, until: str | None = None) -> dict[str, dict]:
    """Every stage in order (up to and including `until`); returns the stamps."""
    stamps: dict[str, dict] = {}
    t0 = time.perf_counter()
    for stage in STAGES:
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


def sweep_runs(ctx: Context) -> list[tuple[str, str, float, int]]:
    """(method, setting label, value, seed) of every training run of the sweep."""
    p = ctx.cfg["pipeline"]
    if p.seeds < 1:
        raise MinidpoError(f"--seeds: must be >= 1, got {p.seeds}")
    seeds = [ctx.run.seed + i for i in range(p.seeds)]
    runs: list[tuple[str, str, float, int]] = []
    for seed in seeds:
        runs += [("DPO", f"beta={b:g}", b, seed) for b in p.floats("sweep_dpo_betas")]
        runs += [("PPO", f"kl={k:g}", k, seed) for k in p.floats("sweep_ppo_kl_coefs")]
        runs += [("PPO-GT", f"kl={p.ppo_gt_kl_coef:g}", p.ppo_gt_kl_coef, seed)]
        runs += [("Preferred-FT", "", 0.0, seed)]
    return runs


def sweep_dir(ctx: Context, method: str, value: float, seed: int) -> Path:
    tag = {"DPO": f"dpo-beta{value:g}", "PPO": f"ppo-rm-kl{value:g}",
           "PPO-GT": f"ppo-oracle-kl{value:g}", "Preferred-FT": "preferred-ft"}[method]  # fmt: skip
    return ctx.folder / "sweep" / f"seed{seed}" / tag


def sweep_stage(method: str, label: str, value: float, seed: int) -> Stage:
    """A sweep run as a Stage (same skip-and-resume rules as the pipeline's)."""
    name = f"sweep-{method}-{label or 'default'}-seed{seed}".replace("=", "")

    def fn(ctx: Context, force: bool) -> dict[str, Any]:
        sub = dataclasses.replace(ctx, run=dataclasses.replace(ctx.run, seed=seed))
        out = sweep_dir(ctx, method, value, seed)
        if method == "DPO":
            return _dpo(sub, force, value, out)
        if method in ("PPO", "PPO-GT"):
            return _ppo(sub, force, "rm" if method == "PPO" else "oracle", value, out)
        return _preferred_ft(sub, force, out)

    group = {"DPO": "dpo", "PPO": "ppo", "PPO-GT": "ppo", "Preferred-FT": "preferred_ft"}[method]
    deps = ("ref_logps",) if method == "DPO" else ("rm",) if method == "PPO" else ("prefs",)
    return Stage(name, fn, (group,), deps,
                 lambda c: [sweep_dir(c, method, value, seed) / "checkpoint.pt"],
                 extra_key=lambda c: [method, value, seed])  # fmt: skip


def run_sweep(ctx: Context) -> dict[str, Any]:
    """The frontier sweep: shared SFT, pairs and reward model, then every (method,
    setting, seed) run with snapshots, every snapshot evaluated, the frontier plotted."""
    from minidpo.evaluation import evaluate_sweep
    from minidpo.report import make_plots, write_report

    t0 = time.perf_counter()
    stamps = run_stages(ctx, ["ref_logps", "rm"])  # what the sweep's runs share
    for method, label, value, seed in sweep_runs(ctx):
        run_stage(ctx, sweep_stage(method, label, value, seed), stamps)
    ctx.log("[sweep] evaluating every snapshot")
    with measure(ctx.device) as cost:
        points = evaluate_sweep(ctx, sweep_runs(ctx))
    make_plots(ctx.folder)
    write_report(ctx.folder)
    wall = {n: s["cost"]["wall_s"] for n, s in stamps.items()}
    wall["sweep_eval"] = cost.wall_s
    total = time.perf_counter() - t0
    atomic_write_json(ctx.folder / "sweep" / "timing.json", {"wall_s": total, "stages": wall})
    return {"points": len(points), "wall_s": total}
