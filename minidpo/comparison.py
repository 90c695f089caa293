"""The pipeline's comparison (its ``eval`` stage): every method measured the same way, on
the held-out prompts; `minidpo.evaluate` measures one policy.

* Final policies (SFT, DPO, PPO, PPO-GT, Preferred-FT) and Best-of-N: oracle
  reward ± standard error, KL(pi || pi_ref) on the policy's own samples, win rate
  against SFT on the same prompts and seeds (`minidpo.evaluate.evaluate_policy`).
* Frontier points: every training snapshot, with fewer samples per prompt
  (`PipelineConfig.frontier_samples_per_prompt`), as the paper's Figure 2 (left)
  plots oracle reward against KL.
* Best-of-N has no policy to take a log-ratio of; its KL to SFT is the closed form
  log N - (N - 1)/N, exact when the N scores have no ties and an upper bound otherwise
  (Beirami et al. 2024, arXiv 2401.01879, who prove the bound; the formula is what
  papers plot for it, e.g. Gao et al. 2022, arXiv 2210.10760).
* "Explain gravity.": a few responses of each method, the report's side-by-side.

Everything is written to ``eval/results.json`` (and ``sweep/points.json`` for the
sweep); the plots and the report read only those files.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from minidpo.atomic import atomic_write_json
from minidpo.baselines import GRAVITY, GRAVITY_SAMPLES, best_of_n_kl
from minidpo.checkpoints import file_sha256, load_checkpoint, snapshots
from minidpo.evaluate import EvalResult, evaluate_policy, summarize
from minidpo.policy import build_policy, load_policy
from minidpo.sampling import Sample, sample_responses
from minidpo.scoring import oracle_scores
from minidpo.seeds import seed_of
from minidpo.stage import Context, Method, Stage
from minidpo.world import load_world


def outside_pairs_share(samples: Sequence[Sample], pairs_path: Path) -> float | None:
    """Share of `samples` whose response is none of the responses (chosen or rejected) the
    preference pairs at `pairs_path` hold for the same prompt: where the probability mass
    that leaves the pairs goes (likelihood displacement; None without pairs)."""
    if not pairs_path.exists():
        return None
    seen: dict[str, set[str]] = {}
    for line in pairs_path.open(encoding="utf-8"):
        row = json.loads(line)
        seen.setdefault(row["prompt"], set()).update((row["chosen"], row["rejected"]))
    outside = [s.response not in seen.get(s.prompt, ()) for s in samples]
    return sum(outside) / len(outside) if outside else None


def _eval_prompts() -> list[str]:
    return [p.text for p in load_world().prompts("eval")]


def policy_dirs(ctx: Context, methods: Sequence[Method]) -> dict[str, Path]:
    """Method name -> training folder of the pipeline's run of each method."""
    return {m.name: m.stage.outputs(ctx)[0].parent for m in methods}


def _point(result, **extra) -> dict[str, Any]:
    return {"reward": result.reward_mean, "reward_se": result.reward_se,
            "kl": result.kl_mean, "kl_se": result.kl_se, **extra}  # fmt: skip


def evaluate_snapshots(
    ctx: Context, folder: Path, method: str, setting: str, seed: int, ref, ref_rewards, tok
) -> list[dict[str, Any]]:
    """Frontier points of one training run: every snapshot, cached beside it by the hash
    of the snapshot and the evaluation settings (an interrupted sweep resumes)."""
    spp = ctx.cfg["pipeline"].frontier_samples_per_prompt
    ev = ctx.cfg["eval"]
    eval_seed = seed_of(seed, "eval/samples")  # per training seed: sampling noise independent too
    points = []
    for snap in snapshots(folder):
        key = hashlib.sha256(
            f"{file_sha256(snap)} {spp} {ev.temperature} {ev.max_new_tokens} {eval_seed}".encode()
        ).hexdigest()
        cache = snap.with_suffix(".eval.json")
        saved = json.loads(cache.read_text()) if cache.exists() else {}
        if saved.get("key") == key and "eval_s" in saved:
            points.append(saved["point"])
            continue
        t0 = time.perf_counter()
        ck = load_checkpoint(snap, kind="policy")
        model = build_policy(ck, snap)[0].to(ctx.device)
        result, _, _ = evaluate_policy(
            model, tok, _eval_prompts(), samples_per_prompt=spp, seed=eval_seed, ref=ref,
            temperature=ev.temperature, max_new_tokens=ev.max_new_tokens, ref_rewards=ref_rewards,
        )  # fmt: skip
        point = _point(result, method=method, setting=setting, seed=seed, step=int(ck["step"]),
                       elapsed_s=float(ck.get("elapsed_s", 0.0)),
                       win_rate=result.win_rate_vs_ref)  # fmt: skip
        # eval_s: the sweep's cost counts it (`eval_seconds`), the results never do
        atomic_write_json(cache, {"key": key, "point": point, "eval_s": time.perf_counter() - t0})
        points.append(point)
    return points


def _sft_reference(ctx: Context, samples_per_prompt: int, seed: int | None = None, loaded=None):
    """SFT (the reference) sampled once: its model, tokenizer, result and rewards
    (`loaded`: the (model, tokenizer) when already in memory)."""
    ev = ctx.cfg["eval"]
    ref, tok = loaded or load_policy(ctx.sft_path, ctx.device)
    result, samples, rewards = evaluate_policy(
        ref, tok, _eval_prompts(), samples_per_prompt=samples_per_prompt,
        seed=seed_of(ctx.run.seed if seed is None else seed, "eval/samples"),
        temperature=ev.temperature, max_new_tokens=ev.max_new_tokens,
    )  # fmt: skip
    return ref, tok, result, samples, rewards


def _gravity(model, tok, ctx: Context) -> list[dict[str, Any]]:
    ev = ctx.cfg["eval"]
    out = sample_responses(model, tok, [GRAVITY] * GRAVITY_SAMPLES,
                           seed=seed_of(ctx.run.seed, "eval/gravity"),
                           temperature=ev.temperature, max_new_tokens=ev.max_new_tokens)  # fmt: skip
    return [{"response": s.response, "terminated": s.terminated, "oracle": r}
            for s, r in zip(out, oracle_scores(out).tolist(), strict=True)]  # fmt: skip


def _best_of_n(ctx: Context, sft_rewards: list[float]) -> tuple[EvalResult, list[dict]]:
    """Best-of-N's result from its stage's selections (KL: the closed form), and its rows."""
    p, ev = ctx.cfg["pipeline"], ctx.cfg["eval"]
    rows = [json.loads(x) for x in ctx.paths.best_of_n_samples.open()]
    held_out = rows[: len(rows) - GRAVITY_SAMPLES]  # the last rows answer "Explain gravity."
    k, spp = p.best_of_n_samples_per_prompt, ev.samples_per_prompt
    # win rate: selection j of prompt i against SFT sample j of the same prompt (the
    # seeds differ: Best-of-N draws its candidates in one call of its own)
    paired = (
        [sft_rewards[(i // k) * spp + (i % k)] for i in range(len(held_out))] if k <= spp else None
    )
    fake = [
        Sample(x["prompt"], x["response"], [0] * x["n_tokens"], x["terminated"]) for x in held_out
    ]
    result = summarize(fake, [x["oracle"] for x in held_out],
                       [x["unparseable"] for x in held_out], None, paired)  # fmt: skip
    return result, rows


def evaluate_all(ctx: Context, methods: Sequence[Method], best_of_n: bool = True) -> dict[str, Any]:
    """Evaluate SFT, every method and Best-of-N (unless `best_of_n` is False); writes
    ``eval/results.json``. Returns the final reward and KL of each, and what the report
    needs of the methods: the stages each one's cost counts, and its setting."""
    ev, p = ctx.cfg["eval"], ctx.cfg["pipeline"]
    ref, tok, sft_result, sft_samples, sft_rewards = _sft_reference(ctx, ev.samples_per_prompt)
    final = {"SFT": {**sft_result.to_dict(),
                     "outside_pairs": outside_pairs_share(sft_samples, ctx.paths.eval_pairs)}}  # fmt: skip
    rewards = {"SFT": sft_rewards}
    gravity = {"SFT": _gravity(ref, tok, ctx)}
    for method, folder in policy_dirs(ctx, methods).items():
        model, _ = load_policy(folder / "checkpoint.pt", ctx.device)
        result, samples, r = evaluate_policy(
            model, tok, _eval_prompts(), samples_per_prompt=ev.samples_per_prompt,
            seed=seed_of(ctx.run.seed, "eval/samples"), ref=ref, temperature=ev.temperature,
            max_new_tokens=ev.max_new_tokens, ref_rewards=sft_rewards,
        )  # fmt: skip
        outside = outside_pairs_share(samples, ctx.paths.eval_pairs)
        final[method], rewards[method] = {**result.to_dict(), "outside_pairs": outside}, r
        gravity[method] = _gravity(model, tok, ctx)
    cost = {m.name: [*m.cost_with, m.stage.name] for m in methods}
    curve = []
    if best_of_n:
        bon_result, bon = _best_of_n(ctx, sft_rewards)
        name = f"Best-of-{p.best_of_n}"
        final[name] = {**bon_result.to_dict(), "kl_mean": best_of_n_kl(p.best_of_n), "kl_se": 0.0,
                       "kl_note": "closed form log N - (N-1)/N"}  # fmt: skip
        rewards[name] = [x["oracle"] for x in bon[: len(bon) - GRAVITY_SAMPLES]]
        gravity[name] = [{"response": x["response"], "terminated": x["terminated"],
                          "oracle": x["oracle"]} for x in bon[len(bon) - GRAVITY_SAMPLES:]]  # fmt: skip
        curve = json.loads(ctx.paths.best_of_n_samples.with_name("curve.json").read_text())["curve"]
        cost[name] = ["rm", "best_of_n"]
    frontier = _frontier(ctx, methods, ref, tok, sft_result, sft_rewards)
    frontier += [{"method": "Best-of-N", "setting": f"N={c['n']}", "seed": ctx.run.seed,
                  "step": 0, "elapsed_s": 0.0, "reward": c["reward"], "reward_se": c["reward_se"],
                  "kl": c["kl"], "kl_se": 0.0} for c in curve if c["n"] > 1]  # fmt: skip
    out = {
        "prompts": "held-out",
        "samples_per_prompt": ev.samples_per_prompt,
        "final": final,
        "rewards": {m: [round(x, 4) for x in r] for m, r in rewards.items()},
        "frontier": frontier,
        "gravity": gravity,
        "reach_margin": p.reach_margin,
    }
    atomic_write_json(ctx.paths.results, out)
    return {"final": {m: {"reward": r["reward_mean"], "kl": r["kl_mean"]} for m, r in final.items()},
            "methods": cost,
            "settings": {m.name: m.setting(ctx) for m in methods}}  # fmt: skip


def _frontier(ctx: Context, methods, ref, tok, sft_result, sft_rewards) -> list[dict[str, Any]]:
    """Frontier points of the pipeline's own runs (one seed), SFT at the origin."""
    p, ev = ctx.cfg["pipeline"], ctx.cfg["eval"]
    frontier = [_point(sft_result, method="SFT", setting="", seed=ctx.run.seed, step=0,
                       elapsed_s=0.0, kl=0.0, kl_se=0.0, win_rate=0.5)]  # fmt: skip
    if p.frontier_samples_per_prompt != ev.samples_per_prompt:
        _, _, small, _, small_rewards = _sft_reference(
            ctx, p.frontier_samples_per_prompt, loaded=(ref, tok)
        )
    else:
        small, small_rewards = sft_result, sft_rewards
    frontier[0].update(reward=small.reward_mean, reward_se=small.reward_se)
    for m in methods:
        folder = m.stage.outputs(ctx)[0].parent
        frontier += evaluate_snapshots(ctx, folder, m.name, m.setting(ctx), ctx.run.seed, ref,
                                       small_rewards, tok)  # fmt: skip
    return frontier


def eval_seconds(folders: Sequence[Path]) -> float:
    """Seconds the evaluation of every snapshot in `folders` took, from its cache (each
    measured when it was evaluated)."""
    total = 0.0
    for folder in folders:
        for snap in snapshots(folder):
            cache = snap.with_suffix(".eval.json")
            if cache.exists():
                total += float(json.loads(cache.read_text()).get("eval_s", 0.0))
    return total


def evaluate_sweep(ctx: Context, runs: Sequence[tuple[str, str, Path, int]]) -> list[dict]:
    """Every snapshot of every sweep run (method name, setting, folder, seed); writes
    ``sweep/points.json``."""
    spp = ctx.cfg["pipeline"].frontier_samples_per_prompt
    points, refs = [], {}
    for method, setting, folder, seed in runs:
        if seed not in refs:  # SFT sampled with each seed's evaluation seed: its own point
            loaded = next(iter(refs.values()))[:2] if refs else None
            ref, tok, sft_result, _, sft_rewards = _sft_reference(ctx, spp, seed, loaded)
            refs[seed] = (ref, tok, sft_rewards)
            points.append(_point(sft_result, method="SFT", setting="", seed=seed, step=0,
                                 elapsed_s=0.0, kl=0.0, kl_se=0.0, win_rate=0.5))  # fmt: skip
        ref, tok, sft_rewards = refs[seed]
        points += evaluate_snapshots(ctx, folder, method, setting, seed, ref, sft_rewards, tok)
    atomic_write_json(ctx.folder / "sweep" / "points.json",
                      {"samples_per_prompt": spp, "points": points})  # fmt: skip
    return points


def eval_stage(methods: Sequence[Method], best_of_n: bool = True) -> Stage:
    """The evaluation stage of the pipeline whose methods are `methods` (and Best-of-N)."""

    def bon(c: Context) -> list[Path]:
        samples = c.paths.best_of_n_samples
        return [samples, samples.with_name("curve.json")] if best_of_n else []

    return Stage(
        "eval", lambda ctx, resume: evaluate_all(ctx, methods, best_of_n), ("eval",),
        (*(m.stage.name for m in methods), *(["best_of_n"] if best_of_n else [])),
        inputs=lambda c: [c.paths.sft, *(d / "checkpoint.pt" for d in policy_dirs(c, methods).values()),
                          *bon(c)],
        outputs=lambda c: [c.paths.results],
        extra_key=lambda c: [c.cfg["pipeline"].frontier_samples_per_prompt,
                             c.cfg["pipeline"].reach_margin],
    )  # fmt: skip
