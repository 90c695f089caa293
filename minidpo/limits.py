"""The card's limitations 2 and 3 on the GPT: the reference's role, and reward shaping.

Run by the sweep (`minidpo.pipeline.run_sweep`, ``sweep/seed<s>/limits-*``), one more
set of stages per seed, then evaluated together (`evaluate_limits`, ``sweep/limits.json``):

* **The reference's role** (limitation 2). DPO's optimum is pi_ref exp(r / beta) / Z
  (Eq. 4): whatever the reference lacks, the policy lacks too. An early SFT checkpoint
  (the run's own SFT stopped at `PipelineConfig.weak_reference_steps` of its steps,
  the same schedule) serves as the weak reference. Two runs on the same offline pairs
  with the run's DPO settings: **weak start** (policy and reference both the early
  checkpoint) and **weak reference** (the final SFT trained against the early
  checkpoint as pi_ref), against offline DPO from the final SFT (the sweep's own run at
  the same beta and seed).
* **Reward shaping** (limitation 3, `minidpo.shaping`): PPO and GRPO optimise
  r_shaped = r* + brevity term directly; DPO can only relabel its offline pairs by
  Bradley-Terry on r_shaped. Each is compared with the same method on r* (PPO-GT, GRPO on
  the oracle, offline DPO), all measured on both r_shaped and r*.

Every final policy is sampled `frontier_samples_per_prompt` times per held-out prompt
(the frontier's evaluation, its seed per training seed), so each row of the table is a
mean over seeds with the standard error over seeds.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from minidpo import dpo, grpo, ppo
from minidpo.atomic import atomic_write_json
from minidpo.checkpoints import file_sha256
from minidpo.evaluate import evaluate_policy
from minidpo.policy import load_policy
from minidpo.preferences import load_pairs, save_pairs
from minidpo.scoring import oracle_breakdowns
from minidpo.seeds import seed_of, stream
from minidpo.sft import run_sft
from minidpo.shaping import relabel_pairs, shaped_reward
from minidpo.stage import Context, Stage, training_summary
from minidpo.training import Job
from minidpo.world import load_world


def limits_dir(ctx: Context, seed: int) -> Path:
    return ctx.folder / "sweep" / f"seed{seed}"


def early_sft_path(ctx: Context) -> Path:
    """The weak reference: the run's SFT stopped early (one per run: SFT's seed is the run's)."""
    return ctx.folder / "sweep" / "limits-sft-early" / "sft" / "checkpoint.pt"


def _early_sft(ctx: Context, resume: bool) -> dict[str, Any]:
    steps = ctx.cfg["pipeline"].weak_reference_steps
    run = dataclasses.replace(ctx.run, name=str(Path(ctx.run.name) / "sweep" / "limits-sft-early"))
    c = ctx.cfg
    # always from scratch: `stop_after` counts the steps of one call, not of the run
    s = run_sft(run, c["tokenizer"], c["model"], c["sft"], resume=False, progress=ctx.progress,
                stop_after=steps)  # fmt: skip
    return {"steps": steps, "of": c["sft"].steps, "wall_s": s["wall_s"]}


EARLY_SFT_STAGE = Stage(
    "sweep-limits-sft-early", _early_sft, ("tokenizer", "model", "sft"), ("sft",),
    inputs=lambda c: [c.paths.tokenizer], outputs=lambda c: [early_sft_path(c)],
    extra_key=lambda c: c.cfg["pipeline"].weak_reference_steps,
)  # fmt: skip


def reference_stage(kind: str, seed: int) -> Stage:
    """DPO with the early SFT as the reference: ``weak-start`` (it is the starting policy
    too) or ``weak-ref`` (the final SFT is trained against it)."""

    def out(ctx: Context) -> Path:
        return limits_dir(ctx, seed) / f"limits-dpo-{kind}"

    def fn(ctx: Context, resume: bool) -> dict[str, Any]:
        early = early_sft_path(ctx)
        start = early if kind == "weak-start" else ctx.paths.sft
        cfg = dataclasses.replace(ctx.cfg["dpo"], snapshot_every=0)
        s = dpo.run_dpo(cfg, Job(out(ctx), seed, ctx.device, resume, ctx.progress),
                        sft_path=start, ref_path=early, train_pairs=ctx.paths.train_pairs,
                        eval_pairs=ctx.paths.eval_pairs, cache_dir=out(ctx))  # fmt: skip
        return training_summary(s)

    return Stage(f"sweep-limits-dpo-{kind}-seed{seed}", fn, ("dpo",),
                 ("sweep-limits-sft-early", "prefs"),
                 inputs=lambda c: [early_sft_path(c), c.paths.sft, *c.pairs],
                 outputs=lambda c: [out(c) / "checkpoint.pt"], extra_key=lambda c: [kind, seed])  # fmt: skip


def relabelled_pairs_path(ctx: Context, seed: int) -> Path:
    return limits_dir(ctx, seed) / "limits-shaped-pairs" / "train.jsonl"


def relabel_stage(seed: int) -> Stage:
    """The seed's training pairs relabelled by Bradley-Terry on r_shaped."""

    def fn(ctx: Context, resume: bool) -> dict[str, Any]:
        pairs, _ = load_pairs(ctx.paths.train_pairs, warn=False)
        out = relabel_pairs(pairs, ctx.cfg["shaping"], tau=ctx.cfg["prefs"].tau,
                            rng=stream(seed, "shaping/labels"))  # fmt: skip
        save_pairs(relabelled_pairs_path(ctx, seed), out)
        old = {(p.prompt, p.chosen, p.rejected) for p in pairs}
        flipped = sum((q.prompt, q.rejected, q.chosen) in old for q in out)
        return {"pairs": len(out), "of": len(pairs), "dropped_ties": len(pairs) - len(out),
                "flipped": flipped}  # fmt: skip

    return Stage(f"sweep-limits-shaped-pairs-seed{seed}", fn, ("shaping", "prefs"), ("prefs",),
                 inputs=lambda c: [c.paths.train_pairs],
                 outputs=lambda c: [relabelled_pairs_path(c, seed)], extra_key=lambda c: seed)  # fmt: skip


def shaped_dpo_stage(seed: int) -> Stage:
    """Offline DPO on the pairs relabelled by r_shaped: the most DPO can do with a shaping term."""

    def out(ctx: Context) -> Path:
        return limits_dir(ctx, seed) / "limits-dpo-shaped"

    def fn(ctx: Context, resume: bool) -> dict[str, Any]:
        cfg = dataclasses.replace(ctx.cfg["dpo"], snapshot_every=0)
        s = dpo.run_dpo(cfg, Job(out(ctx), seed, ctx.device, resume, ctx.progress),
                        sft_path=ctx.paths.sft, train_pairs=relabelled_pairs_path(ctx, seed),
                        eval_pairs=None, cache_dir=out(ctx))  # fmt: skip
        return training_summary(s)

    return Stage(f"sweep-limits-dpo-shaped-seed{seed}", fn, ("dpo",),
                 (f"sweep-limits-shaped-pairs-seed{seed}",),
                 inputs=lambda c: [c.paths.sft, relabelled_pairs_path(c, seed)],
                 outputs=lambda c: [out(c) / "checkpoint.pt"], extra_key=lambda c: seed)  # fmt: skip


def _gt_kl(ctx: Context) -> float:
    return ctx.cfg["pipeline"].ppo_gt_kl_coef


def limit_stages(ctx: Context, seed: int) -> list[Stage]:
    """Every stage of the limits experiments for one seed (`EARLY_SFT_STAGE`, which every
    seed shares, runs before them, in the run's own context)."""
    d = limits_dir(ctx, seed)
    return [
        relabel_stage(seed),
        reference_stage("weak-start", seed),
        reference_stage("weak-ref", seed),
        shaped_dpo_stage(seed),
        ppo.stage(f"sweep-limits-ppo-shaped-seed{seed}", reward="shaped", kl_coef=_gt_kl,
                  seed=seed, folder=lambda c: d / "limits-ppo-shaped"),
        grpo.stage(f"sweep-limits-grpo-shaped-seed{seed}", reward="shaped", seed=seed,
                   folder=lambda c: d / "limits-grpo-shaped"),
        grpo.stage(f"sweep-limits-grpo-oracle-seed{seed}", reward="oracle", seed=seed,
                   folder=lambda c: d / "limits-grpo-oracle"),
    ]  # fmt: skip


def limit_policies(ctx: Context, seed: int) -> dict[str, Path]:
    """Row name -> final checkpoint of every policy the limits table compares, one seed
    (the r*-trained counterparts are the sweep's own runs)."""
    d = limits_dir(ctx, seed)
    beta = ctx.cfg["dpo"].beta
    return {
        "SFT": ctx.paths.sft,
        "early SFT (weak reference)": early_sft_path(ctx),
        "DPO": d / f"dpo-beta{beta:g}" / "checkpoint.pt",
        "DPO, weak start": d / "limits-dpo-weak-start" / "checkpoint.pt",
        "DPO, weak reference": d / "limits-dpo-weak-ref" / "checkpoint.pt",
        "DPO, relabelled by r_shaped": d / "limits-dpo-shaped" / "checkpoint.pt",
        "PPO-GT": d / f"ppo-oracle-kl{_gt_kl(ctx):g}" / "checkpoint.pt",
        "PPO on r_shaped": d / "limits-ppo-shaped" / "checkpoint.pt",
        "GRPO on r*": d / "limits-grpo-oracle" / "checkpoint.pt",
        "GRPO on r_shaped": d / "limits-grpo-shaped" / "checkpoint.pt",
    }


def _evaluate(ctx: Context, path: Path, seed: int, ref, tok) -> dict[str, float]:
    """Oracle and shaped reward (mean, se), KL to SFT, sentences, unparseable share."""
    spp, ev = ctx.cfg["pipeline"].frontier_samples_per_prompt, ctx.cfg["eval"]
    model, _ = load_policy(path, ctx.device)
    prompts = [p.text for p in load_world().prompts("eval")]
    result, samples, _ = evaluate_policy(
        model, tok, prompts, samples_per_prompt=spp, seed=seed_of(seed, "eval/samples"),
        ref=ref, temperature=ev.temperature, max_new_tokens=ev.max_new_tokens,
    )  # fmt: skip
    b = oracle_breakdowns(samples)
    shaped = np.array([shaped_reward(x, ctx.cfg["shaping"]) for x in b])
    return {"oracle": result.reward_mean, "shaped": float(shaped.mean()), "kl": result.kl_mean,
            "sentences": float(np.mean([len(x.labels) for x in b])),
            "unparseable": result.unparseable_rate}  # fmt: skip


def evaluate_limits(ctx: Context, seeds: Sequence[int]) -> dict[str, Any]:
    """Every limits policy of every seed evaluated (cached beside each checkpoint by its
    hash and the settings); writes ``sweep/limits.json``: per row, the mean over seeds and
    the standard error over seeds of each measure, and the seeds' own values."""
    ref, tok = load_policy(ctx.paths.sft, ctx.device)
    spp, sh = ctx.cfg["pipeline"].frontier_samples_per_prompt, ctx.cfg["shaping"]
    per_row: dict[str, list[dict[str, float]]] = {}
    eval_s = 0.0
    for seed in seeds:
        for row, path in limit_policies(ctx, seed).items():
            key = hashlib.sha256(f"{file_sha256(path)} {spp} {seed} {sh}".encode()).hexdigest()
            cache = path.parent / f"{path.stem}.limits-{seed}.json"
            saved = json.loads(cache.read_text()) if cache.exists() else {}
            if saved.get("key") != key:
                t0 = time.perf_counter()
                value = _evaluate(ctx, path, seed, ref, tok)
                saved = {"key": key, "value": value, "eval_s": time.perf_counter() - t0}
                atomic_write_json(cache, saved)
            per_row.setdefault(row, []).append(saved["value"])
            eval_s += saved["eval_s"]
    table = {}
    for row, values in per_row.items():
        table[row] = {"seeds": values}
        for k in values[0]:
            xs = np.array([v[k] for v in values], dtype=float)
            se = float(xs.std(ddof=1) / np.sqrt(len(xs))) if len(xs) > 1 else None
            table[row][k] = float(xs.mean())
            table[row][f"{k}_se"] = se
    out = {"shaping": dataclasses.asdict(sh), "seeds": list(seeds),
           "weak_reference_steps": ctx.cfg["pipeline"].weak_reference_steps,
           "sft_steps": ctx.cfg["sft"].steps, "samples_per_prompt": spp, "rows": table, "eval_s": eval_s}  # fmt: skip
    atomic_write_json(ctx.folder / "sweep" / "limits.json", out)
    return out
