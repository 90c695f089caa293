"""Online (iterative) DPO: the card's first limitation, "offline only", taken away.

Offline DPO learns from pairs sampled once from the SFT policy. Online DPO (Xiong et al.
2023, arXiv 2312.11456; Guo et al. 2024, arXiv 2402.04792) spreads the same labelling
budget over R rounds; each round

1. samples K responses per training prompt from the *current* policy (temperature 1),
2. labels pairs among them by a Bradley-Terry draw on the oracle r*, the labeller of the
   offline pairs (`minidpo.preferences.label_pairs`, the same tau), keeping
   ``pairs / R`` of them,
3. trains DPO on that round's pairs (`minidpo.dpo.run_dpo`: ``steps / R`` steps of the
   run's other DPO settings), starting from the previous round's policy, with the reference
   fixed at SFT (``--reference previous``: the previous round's policy, as in
   iterative/self-rewarding variants).

With ``--pairs 0`` (the default) the budget is the offline training pairs' count; the
steps are ``--train-steps`` over all rounds (offline DPO instead stops by its
convergence rule). Each round's folder (``round<r>/``) holds its pairs, its DPO run and
its reference caches; a round that finished is never redone, so an interrupted run
resumes at the round (and, inside it, at DPO's own checkpoint). The end of each round
is a snapshot (step = DPO steps so far, elapsed = seconds so far, sampling included):
the frontier's points.

Metrics (``metrics.jsonl``, one row per round): round, pairs, samples/oracle (mean r* of
the round's samples: the policy's on-policy reward before the round trains),
pairs/label_agreement, train/loss, eval/* (the round's held-out pair metrics against
its reference), tokens/sampled, time/elapsed.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from minidpo.atomic import append_line, atomic_write_json
from minidpo.checkpoints import CHECKSUM, load_checkpoint, save_checkpoint, snapshots
from minidpo.config import DPOConfig, _f
from minidpo.dpo import run_dpo
from minidpo.errors import MinidpoError
from minidpo.policy import load_policy
from minidpo.preferences import PreferencePair, label_pairs, load_pairs, save_pairs
from minidpo.sampling import sample_responses
from minidpo.scoring import oracle_scores
from minidpo.seeds import seed_of, stream
from minidpo.stage import Context, Method, Stage
from minidpo.training import Job, read_metrics
from minidpo.world import load_world

REFERENCES = ("sft", "previous")


@dataclass
class OnlineDPOConfig:
    """Rounds of on-policy sampling, Bradley-Terry labelling and DPO (the DPO settings are
    the run's ``dpo`` ones)."""

    rounds: int = _f(4, "R: rounds of sample, label, train")
    responses_per_prompt: int = _f(
        6, "K: responses sampled per training prompt each round (15 candidate pairs each)"
    )
    pairs: int = _f(0, "labelled pairs over all rounds (0: as many as the offline training pairs)")
    train_steps: int = _f(
        200,
        "DPO steps over all rounds, steps / R a round (each round's pairs are new, so "
        "no convergence rule: a fixed budget)",
    )
    reference: str = _f("sft", "sft: pi_ref fixed at SFT; previous: the previous round's policy")
    temperature: float = _f(1.0, "sampling temperature of each round's responses")
    max_new_tokens: int = _f(64, "longest sampled response in tokens")

    def validate(self, flag_prefix: str = "") -> None:
        """Raise MinidpoError naming the flag of the first bad value."""
        f = f"--{flag_prefix}"
        if self.rounds < 1:
            raise MinidpoError(f"{f}rounds: must be >= 1, got {self.rounds}")
        if self.responses_per_prompt < 2:
            raise MinidpoError(
                f"{f}responses-per-prompt: must be >= 2 (a pair needs two), got "
                f"{self.responses_per_prompt}"
            )
        if self.pairs < 0:
            raise MinidpoError(f"{f}pairs: must be >= 0, got {self.pairs}")
        if self.reference not in REFERENCES:
            raise MinidpoError(
                f"{f}reference: one of {', '.join(REFERENCES)}, got {self.reference!r}"
            )
        if not 0 < self.temperature < float("inf"):
            raise MinidpoError(f"{f}temperature: must be > 0 and finite, got {self.temperature}")


def round_budgets(total: int, rounds: int) -> list[int]:
    """Pairs per round: `total` split as evenly as it goes, the remainder to the first."""
    base, extra = divmod(total, rounds)
    return [base + (r < extra) for r in range(rounds)]


def sample_round_pairs(
    policy: torch.nn.Module,
    tok: Any,
    prompts: list[str],
    cfg: OnlineDPOConfig,
    *,
    budget: int,
    tau: float,
    seed: int,
    r: int,
) -> tuple[list[PreferencePair], dict[str, float]]:
    """One round's pairs: K samples per prompt from `policy`, labelled by Bradley-Terry on
    r*, at most `budget` of them (a random subset when more qualify); and its statistics."""
    K = cfg.responses_per_prompt
    samples = sample_responses(policy, tok, [p for p in prompts for _ in range(K)],
                               seed=seed_of(seed, "online_dpo/samples", r),
                               temperature=cfg.temperature, max_new_tokens=cfg.max_new_tokens)  # fmt: skip
    rewards = oracle_scores(samples).tolist()
    rng = stream(seed, "online_dpo/labels", r)
    per_prompt = -(-budget // len(prompts))  # ceil: every prompt gets its share
    pairs = label_pairs(samples, rewards, tau=tau, rng=rng, max_pairs_per_prompt=per_prompt)
    if len(pairs) > budget:
        keep = np.sort(rng.choice(len(pairs), size=budget, replace=False))
        pairs = [pairs[i] for i in keep]
    stats = {
        "samples/oracle": float(np.mean(rewards)),
        "pairs/label_agreement": float(np.mean([p.score_chosen > p.score_rejected for p in pairs]))
        if pairs else float("nan"),
        "tokens/sampled": float(sum(len(s.response_ids) for s in samples)),
    }  # fmt: skip
    return pairs, stats


def _snapshot(out_dir: Path, round_ckpt: Path, step: int, elapsed_s: float) -> Path:
    """The end of a round as a frontier snapshot (the round's weights, the online run's
    step and elapsed time), and as the run's current checkpoint."""
    ck = load_checkpoint(round_ckpt, kind="policy")
    drop = ("format", "version", "optimizer", CHECKSUM)
    state = {k: v for k, v in ck.items() if k not in drop}
    state.update(step=step, done=True, elapsed_s=elapsed_s, stage="online_dpo")
    path = out_dir / "snapshots" / f"step-{step:06d}.pt"
    save_checkpoint(path, state)
    return path


def run_online_dpo(
    cfg: OnlineDPOConfig,
    dpo_cfg: DPOConfig,
    job: Job,
    *,
    sft_path: Path,
    offline_pairs: Path,
    eval_pairs: Path | None,
    tau: float,
) -> dict[str, Any]:
    """R rounds of online DPO from the SFT checkpoint; returns a summary. Writes
    ``round<r>/``, ``snapshots/``, ``checkpoint.pt`` (the last round's policy),
    ``metrics.jsonl`` and ``summary.json`` into ``job.out_dir``."""
    cfg.validate()
    out, seed = Path(job.out_dir), job.seed
    budget = cfg.pairs or len(load_pairs(offline_pairs, warn=False)[0])
    steps = cfg.train_steps // cfg.rounds
    if steps < 1:
        raise MinidpoError(
            f"--rounds {cfg.rounds}: more rounds than DPO steps (--train-steps {cfg.train_steps})"
        )
    if budget < cfg.rounds:
        raise MinidpoError(f"--pairs {budget}: fewer labelled pairs than rounds ({cfg.rounds})")
    if not job.resume:
        shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    metrics_path = out / "metrics.jsonl"
    rows = read_metrics(metrics_path) if metrics_path.exists() else []
    prompts = [p.text for p in load_world().prompts("train")]
    round_cfg = dataclasses.replace(dpo_cfg, steps=steps, snapshot_every=0, patience=0,
                                    validation_fraction=0.0,
                                    eval_every=steps, ckpt_every=min(dpo_cfg.ckpt_every, steps))  # fmt: skip
    t0 = time.perf_counter() - (rows[-1]["time/elapsed"] if rows else 0.0)
    for r, n_pairs in enumerate(round_budgets(budget, cfg.rounds)):
        if r < len(rows):
            continue  # finished: its row is written last
        rdir = out / f"round{r}"
        init = sft_path if r == 0 else out / f"round{r - 1}" / "checkpoint.pt"
        ref = sft_path if cfg.reference == "sft" else init
        pairs_file = rdir / "pairs.jsonl"
        stats_file = rdir / "pairs.json"
        if not stats_file.exists():  # the pairs of a round are drawn once
            policy, tok = load_policy(init, job.device)
            pairs, stats = sample_round_pairs(policy, tok, prompts, cfg, budget=n_pairs,
                                              tau=tau, seed=seed, r=r)  # fmt: skip
            del policy
            if len(pairs) < 1:
                raise MinidpoError(f"online DPO round {r}: the policy's samples gave no pairs")
            save_pairs(pairs_file, pairs)
            atomic_write_json(stats_file, {**stats, "pairs": len(pairs)})
        stats = json.loads(stats_file.read_text())
        resume = (rdir / "checkpoint.pt").exists()
        s = run_dpo(round_cfg, Job(rdir, seed_of(seed, "online_dpo/round", r), job.device, resume,
                                   job.progress), sft_path=init, ref_path=ref,
                    train_pairs=pairs_file, eval_pairs=eval_pairs, cache_dir=rdir)  # fmt: skip
        elapsed = time.perf_counter() - t0
        _snapshot(out, rdir / "checkpoint.pt", (r + 1) * steps, elapsed)
        row = {"round": r, **stats, "train/loss": s.get("train/loss"),
               **{k: v for k, v in s.items() if k.startswith("eval/")},
               "step": (r + 1) * steps, "time/elapsed": elapsed}  # fmt: skip
        rows.append(row)
        append_line(metrics_path, json.dumps(row))
    shutil.copyfile(snapshots(out)[-1], out / "checkpoint.pt.tmp")
    (out / "checkpoint.pt.tmp").replace(out / "checkpoint.pt")
    summary = {
        "rounds": cfg.rounds,
        "pairs": int(sum(r["pairs"] for r in rows)),
        "pairs_budget": budget,
        "steps": steps * cfg.rounds,
        "samples_oracle": [r["samples/oracle"] for r in rows],
        "tokens_sampled": int(sum(r["tokens/sampled"] for r in rows)),
        "wall_s": rows[-1]["time/elapsed"],
    }
    atomic_write_json(out / "summary.json", summary)
    return summary


def stage(
    name: str = "online_dpo",
    *,
    beta: float | None = None,
    seed: int | None = None,
    folder: Callable[[Context], Path] | None = None,
) -> Stage:
    """The online DPO stage (`beta` overrides the run's DPO beta: the sweep's setting); its
    folder is ``online-dpo-beta<beta>[-refprevious]`` unless `folder` says otherwise."""

    def dpo_cfg(ctx: Context) -> DPOConfig:
        cfg = ctx.cfg["dpo"]
        return cfg if beta is None else dataclasses.replace(cfg, beta=beta)

    def out(ctx: Context) -> Path:
        if folder:
            return folder(ctx)
        tag = "-refprevious" if ctx.cfg["online_dpo"].reference == "previous" else ""
        return ctx.folder / f"online-dpo-beta{dpo_cfg(ctx).beta:g}{tag}"

    def fn(ctx: Context, resume: bool) -> dict[str, Any]:
        held_out = ctx.paths.held_out_pairs
        job = Job(out(ctx), ctx.run.seed if seed is None else seed, ctx.device, resume,
                  ctx.progress)  # fmt: skip
        s = run_online_dpo(ctx.cfg["online_dpo"], dpo_cfg(ctx), job, sft_path=ctx.paths.sft,
                           offline_pairs=ctx.paths.train_pairs, eval_pairs=held_out,
                           tau=ctx.cfg["prefs"].tau)  # fmt: skip
        return {"pairs": s["pairs"], "tokens_sampled": s["tokens_sampled"],
                "tokens_forward": _tokens(out(ctx)) + s["tokens_sampled"],
                "tokens_backward": _tokens(out(ctx)),
                "samples_oracle": s["samples_oracle"]}  # fmt: skip

    def check(ctx: Context) -> None:
        ctx.cfg["online_dpo"].validate()
        dpo_cfg(ctx).validate()

    return Stage(name, fn, ("online_dpo", "dpo", "prefs"), ("prefs",),
                 inputs=lambda c: [c.paths.sft, c.paths.train_pairs],
                 outputs=lambda c: [out(c) / "checkpoint.pt"],
                 extra_key=lambda c: [beta, seed], check=check)  # fmt: skip


def _tokens(out: Path) -> int:
    """Tokens through the policy's forward and backward over every round's DPO steps (the
    stage's tokens_forward adds the sampled tokens; each round's reference pass over its
    pairs, one forward per pair, is not counted)."""
    total = 0
    for summary in sorted(out.glob("round*/summary.json")):
        total += int(json.loads(summary.read_text()).get("tokens", 0))
    return total


METHOD = Method(
    "Online DPO", stage(), key="beta", value=lambda c: c.cfg["dpo"].beta,
    sweep=lambda c: c.cfg["pipeline"].floats("sweep_online_dpo_betas"),
    variant=lambda name, b, seed, folder: stage(name, beta=b, seed=seed, folder=folder),
    folder="online-dpo-beta",
)  # fmt: skip
