"""The run's plots and its report, made from the files the pipeline wrote.

Nothing here trains or samples: `make_plots` and `write_report` read
``eval/results.json``, ``sweep/points.json`` (when the sweep ran), the stamps in
``stages/`` and the training metrics, so a report can be rebuilt at any time.

The frontier follows the paper's Figure 2 (left): oracle reward against
KL(pi || pi_ref), one point per evaluated snapshot; with several seeds a point is
the mean over seeds with its standard error on both axes. The upper frontier of a
method is its Pareto front: going right along KL, the points that beat every
point of the same method with less KL.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from minidpo.atomic import atomic_write_text
from minidpo.evaluate import mean_se
from minidpo.frontier import MatchedKL, matched_kl, upper_hull
from minidpo.plots import figure, save_png
from minidpo.stage import Context, Stage
from minidpo.stats import HOLDS, NOT_HERE, UNDECIDED, above, normal_interval, t_quantile
from minidpo.training import read_metrics

METHOD_ORDER = ["SFT", "DPO", "DPO+NLL", "DPOP", "Online DPO", "PPO", "PPO-GT", "GRPO",
                "Preferred-FT", "Unlikelihood"]  # fmt: skip
COLORS = {"SFT": "black", "DPO": "C0", "DPO+NLL": "C9", "DPOP": "C7", "Online DPO": "navy",
          "PPO": "C3", "PPO-GT": "C2", "GRPO": "C6", "Preferred-FT": "C4",
          "Unlikelihood": "C5"}  # fmt: skip


def _color(method: str) -> str:
    """One colour per method on every plot (Best-of-N: the rest)."""
    return COLORS.get(method, "C1")


def load_results(folder: Path) -> dict[str, Any]:
    return json.loads((folder / "eval" / "results.json").read_text())


def frontier_points(folder: Path) -> tuple[list[dict[str, Any]], str]:
    """Points of the frontier plot and where they come from: the sweep (mean over seeds
    per snapshot) when it ran, else the pipeline's own single-seed run.

    Each point has two standard errors of its reward: ``reward_se``, from the spread of
    the seeds' means (training, data and sampling noise together), and ``sampling_se``,
    the sampling noise alone, sqrt(sum_s se_s^2) / n over the seeds' own standard errors:
    what more samples shrink. ``reward_ci`` is the 95 % half-width: t with n - 1 df times
    ``reward_se`` over n seeds, or 1.96 sampling se for one seed."""
    sweep = folder / "sweep" / "points.json"
    if sweep.exists():
        raw = json.loads(sweep.read_text())["points"]
        groups: dict[tuple, list[dict]] = defaultdict(list)
        for p in raw:
            groups[(p["method"], p["setting"], p["step"])].append(p)
        points = []
        for (method, setting, step), ps in groups.items():
            n = len(ps)
            r_mean, r_se = mean_se([p["reward"] for p in ps])
            k_mean, k_se = mean_se([p["kl"] for p in ps])
            points.append({
                "method": method, "setting": setting, "step": step, "seeds": n,
                "reward": r_mean, "reward_se": r_se if n > 1 else ps[0]["reward_se"],
                "sampling_se": float(np.sqrt(sum(p["reward_se"] ** 2 for p in ps)) / n),
                "kl": k_mean, "kl_se": k_se if n > 1 else (ps[0]["kl_se"] or 0.0),
                "elapsed_s": float(np.mean([p["elapsed_s"] for p in ps])),
                "reward_ci": (t_quantile(0.975, n - 1) * r_se if n > 1
                              else 1.96 * ps[0]["reward_se"]),
            })  # fmt: skip
        results = folder / "eval" / "results.json"
        if results.exists():  # Best-of-N has no training run: its one point, from the pipeline
            points += [dict(p, seeds=1, sampling_se=p["reward_se"],
                            reward_ci=1.96 * p["reward_se"])
                       for p in load_results(folder)["frontier"]
                       if p["method"].startswith("Best-of-")]  # fmt: skip
        n = max(p["seeds"] for p in points)
        return points, f"mean over {n} seeds; bars: 95 % t interval over seeds"
    results = load_results(folder)
    return ([dict(p, seeds=1, sampling_se=p.get("reward_se"),
                  reward_ci=1.96 * (p.get("reward_se") or 0.0)) for p in results["frontier"]],
            "one seed; bars: 95 % over sampling")  # fmt: skip


def rising_hull(points: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The frontier as drawn: the upper concave hull of a method's own points up to its
    highest one (`minidpo.frontier`: a mixture of two snapshots reaches the chord)."""
    hull = upper_hull(points)
    return hull[: max(range(len(hull)), key=lambda i: hull[i]["reward"]) + 1] if hull else []


# A point this far below SFT's reward has left the world (mostly unparseable text); it is
# named beside the frontier plot instead of stretching its axes over it.
OFF_CHART_BELOW_SFT = 1.0


def plot_frontier(folder: Path, path: Path) -> Path:
    points, source = frontier_points(folder)
    sft = [p for p in points if p["method"] == "SFT"]
    floor = (sft[0]["reward"] if sft else -np.inf) - OFF_CHART_BELOW_SFT
    off = [p for p in points if p["reward"] < floor]
    points = [p for p in points if p["reward"] >= floor]
    fig, ax = figure(figsize=(7, 4.5))
    methods = [m for m in METHOD_ORDER if m != "SFT"]
    methods += sorted({p["method"] for p in points} - set(METHOD_ORDER))
    for m in methods:
        ps = [p for p in points if p["method"] == m]
        if not ps:
            continue
        c = _color(m)
        ax.errorbar([p["kl"] for p in ps], [p["reward"] for p in ps],
                    yerr=[p["reward_ci"] for p in ps],
                    fmt="o", ms=4, color=c, alpha=0.55, elinewidth=0.8, label=m)  # fmt: skip
        front = rising_hull(ps)
        ax.plot([p["kl"] for p in front], [p["reward"] for p in front], "-", color=c, lw=1.5)
    for p in sft:
        ax.errorbar([0], [p["reward"]], yerr=[p["reward_ci"]], fmt="*", ms=12, color="black",
                    label="SFT (reference)")  # fmt: skip
    ax.set_xlabel("KL(π ‖ π_ref), nats per response (on the policy's own samples)")
    ax.set_ylabel("oracle reward r*, mean over held-out samples")
    ax.set_title(f"Reward-KL frontier (lines: each method's own frontier; {source})", fontsize=9)
    ax.axhline(sft[0]["reward"] if sft else 0, color="grey", lw=0.6, ls=":")
    ax.legend(frameon=False, fontsize=8, loc="best")
    for i, m in enumerate(sorted({p["method"] for p in off})):
        ps = [p for p in off if p["method"] == m]
        ax.text(0.99, 0.02 + 0.05 * i, f"off the chart: {m}, {len(ps)} points, reward "
                f"{min(p['reward'] for p in ps):+.2f} to {max(p['reward'] for p in ps):+.2f}, "
                f"KL {min(p['kl'] for p in ps):.0f} to {max(p['kl'] for p in ps):.0f}",
                transform=ax.transAxes, ha="right", fontsize=7, color=_color(m))  # fmt: skip
    return save_png(fig, path)


def _first(pattern: str, folder: Path) -> Path | None:
    found = sorted(folder.glob(pattern))
    return found[0] if found else None


def plot_dpo_curves(folder: Path, path: Path) -> Path | None:
    d = _first("dpo-*/metrics.jsonl", folder)
    if d is None:
        return None
    rows = [r for r in read_metrics(d) if "train/rewards/margins" in r]
    fig, axes = figure(1, 3, figsize=(12, 3.6))
    steps = [r["step"] for r in rows]

    def line(ax, key, label, **kw):
        ax.plot(steps, [r[key] for r in rows], label=label, **kw)

    line(axes[0], "train/rewards/chosen", "rewards/chosen  β log π/π_ref (chosen)")
    line(axes[0], "train/rewards/rejected", "rewards/rejected")
    line(axes[0], "train/rewards/margins", "margin (chosen − rejected)", color="k")
    axes[0].set_title("implicit rewards (training batches)")
    axes[0].set_ylabel("implicit reward (nats × β)")
    line(axes[1], "train/logps/chosen", "log π(y_w|x)")
    line(axes[1], "train/logps/rejected", "log π(y_l|x)")
    axes[1].set_title("sequence log-probs: do the chosen fall?")
    axes[1].set_ylabel("log-prob (nats)")
    line(axes[2], "train/rewards/accuracies", "train")
    ev = [r for r in rows if "eval/rewards/accuracies" in r]
    axes[2].plot([r["step"] for r in ev], [r["eval/rewards/accuracies"] for r in ev], "o-",
                 label="held-out")  # fmt: skip
    axes[2].set_title("reward accuracy (margin > 0)")
    axes[2].set_ylabel("share of pairs")
    for ax in axes:
        ax.set_xlabel("DPO step")
        ax.legend(frameon=False, fontsize=7)
    fig.suptitle(f"DPO training curves ({d.parent.name})")
    return save_png(fig, path)


def smooth(values: Sequence[float], window: int = 5) -> np.ndarray:
    """Trailing moving average (shorter windows at the start), same length as `values`."""
    v = np.asarray(values, dtype=np.float64)
    c = np.cumsum(np.insert(v, 0, 0.0))
    idx = np.arange(1, len(v) + 1)
    lo = np.maximum(idx - window, 0)
    return (c[idx] - c[lo]) / (idx - lo)


def plot_ppo_curves(folder: Path, path: Path) -> Path | None:
    runs = {p.parent.name: p for p in sorted(folder.glob("ppo-*/metrics.jsonl"))}
    if not runs:
        return None
    fig, axes = figure(1, 2, figsize=(11, 3.6))
    for i, (name, p) in enumerate(runs.items()):
        rows = [r for r in read_metrics(p) if "objective/kl" in r]
        it = [r["step"] for r in rows]
        c = _color("PPO-GT" if "-oracle-" in name else "PPO") if i < 2 else f"C{i + 4}"
        if name.startswith("ppo-rm"):
            scores = [r["objective/scores"] for r in rows]
            axes[0].plot(it, scores, "--", color=c, lw=0.6, alpha=0.5)
            axes[0].plot(it, smooth(scores), "--", color=c, lw=2,
                         label=f"{name}: reward-model score")  # fmt: skip
        oracle = [r["objective/oracle"] for r in rows]
        axes[0].plot(it, oracle, "-", color=c, lw=0.6, alpha=0.5)
        axes[0].plot(it, smooth(oracle), "-", color=c, lw=2, label=f"{name}: oracle reward")
        axes[1].plot(it, [r["objective/kl"] for r in rows], color=c, label=name)
    axes[0].set_title("rollouts: what PPO optimises vs the truth (thick: 5-iteration mean)")
    axes[0].set_ylabel("reward (reward model normalised on SFT samples)")
    axes[1].set_title("KL(π ‖ π_ref) of the rollouts")
    axes[1].set_ylabel("nats per response")
    for ax in axes:
        ax.set_xlabel("PPO iteration")
        ax.legend(frameon=False, fontsize=7)
    return save_png(fig, path)


def plot_win_rates(folder: Path, path: Path) -> Path:
    final = load_results(folder)["final"]
    names = [m for m in final if final[m].get("win_rate_vs_ref") is not None]
    fig, ax = figure(figsize=(6.5, 3.5))
    vals = [final[m]["win_rate_vs_ref"] for m in names]
    ax.bar(names, vals, color=[_color(m) for m in names])
    for x, v in enumerate(vals):
        ax.text(x, v + 0.01, f"{v:.0%}", ha="center", fontsize=8)
    ax.axhline(0.5, color="grey", ls=":", lw=1)
    ax.set_ylim(0, 1)
    ax.set_ylabel("win rate vs SFT (oracle reward; ties ½)")
    ax.set_title("Win rate against SFT, same held-out prompts")
    return save_png(fig, path)


def plot_reward_distributions(folder: Path, path: Path) -> Path:
    rewards = load_results(folder)["rewards"]
    names = list(rewards)
    fig, axes = figure(1, len(names), figsize=(2.2 * len(names), 3), sharey=True)
    bins = np.arange(-3.125, 3.2, 0.25)
    for ax, m in zip(np.atleast_1d(axes), names, strict=True):
        r = np.asarray(rewards[m])
        ax.hist(r, bins=bins, color=_color(m), density=True)
        ax.axvline(r.mean(), color="k", ls="--", lw=1)
        ax.set_title(f"{m}\nmean {r.mean():+.2f}", fontsize=9)
        ax.set_xlabel("oracle reward")
    np.atleast_1d(axes)[0].set_ylabel("density")
    fig.suptitle("Oracle reward of held-out samples, per method")
    return save_png(fig, path)


def make_plots(folder: str | Path) -> list[Path]:
    """Every plot of the run into ``plots/``; returns the paths written."""
    folder = Path(folder)
    out = folder / "plots"
    made = [
        plot_frontier(folder, out / "frontier.png"),
        plot_dpo_curves(folder, out / "dpo_curves.png"),
        plot_ppo_curves(folder, out / "ppo_curves.png"),
        plot_win_rates(folder, out / "win_rates.png"),
        plot_reward_distributions(folder, out / "reward_distributions.png"),
    ]
    return [p for p in made if p is not None]


# --------------------------------------------------------------------------- numbers


def stamps_of(folder: Path) -> dict[str, dict[str, Any]]:
    out = {}
    for p in sorted((folder / "stages").glob("*.json")):
        try:
            out[p.stem] = json.loads(p.read_text())
        except ValueError:
            continue
    return out


def cost_table(folder: Path) -> list[dict[str, Any]]:
    """Per method: wall time, tokens through forward/backward, peak memory, and the
    training time to first reach the SFT oracle reward + the reach margin."""
    stamps = stamps_of(folder)
    results = load_results(folder)
    points, _ = frontier_points(folder)
    target = results["final"]["SFT"]["reward_mean"] + results["reach_margin"]
    # each method's stages, as the evaluation recorded them (the pipeline's method table)
    stages = ((stamps.get("eval") or {}).get("summary") or {}).get("methods") or {}
    rows = []
    for method, names in stages.items():
        got = [stamps[n] for n in names if n in stamps]
        if len(got) != len(names):
            continue
        fwd = sum(int(s["summary"].get("tokens_forward") or 0) for s in got)
        bwd = sum(int(s["summary"].get("tokens_backward") or 0) for s in got)
        peaks = [s["cost"].get("peak_rss_mb") for s in got if s["cost"].get("peak_rss_mb")]
        grown = [s["cost"]["peak_rss_mb"] - s["cost"]["start_rss_mb"] for s in got
                 if s["cost"].get("peak_rss_mb") and s["cost"].get("start_rss_mb")]  # fmt: skip
        reach = sorted((p["elapsed_s"], p["setting"]) for p in points
                       if p["method"] == method and p["reward"] >= target and p["step"] > 0)  # fmt: skip
        rows.append({
            "method": method, "stages": "+".join(names),
            "wall_s": sum(s["cost"]["wall_s"] for s in got),
            "tokens_forward": fwd, "tokens_backward": bwd,
            "peak_rss_mb": max(peaks) if peaks else None,
            "rss_growth_mb": max(grown) if grown else None,
            "reach_s": reach[0][0] if reach else None,
            "reach_setting": reach[0][1] if reach else None,
        })  # fmt: skip
    return rows


def frontier_table(folder: Path) -> list[dict[str, Any]]:
    """Per (method, setting) of the frontier: its last snapshot's reward and KL (mean ± se
    over seeds) and its best snapshot's reward (biased upward: the best of noisy points)."""
    points, _ = frontier_points(folder)
    runs: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for p in points:
        runs[(p["method"], p["setting"])].append(p)
    rows = []
    for (method, setting), ps in runs.items():
        last = max(ps, key=lambda p: p["step"])
        best = max(ps, key=lambda p: p["reward"])
        rows.append({"method": method, "setting": setting, "seeds": last["seeds"],
                     "reward": last["reward"], "reward_se": last["reward_se"],
                     "reward_ci": last["reward_ci"], "best_reward_ci": best["reward_ci"],
                     "sampling_se": last["sampling_se"],
                     "kl": last["kl"], "kl_se": last["kl_se"],
                     "best_reward": best["reward"], "best_reward_se": best["reward_se"]})  # fmt: skip
    return rows


SE_TARGET = 0.05  # a frontier point's standard error on the reward (the issue's target)


def frontier_lines(folder: Path) -> list[str]:
    """`frontier_table` as markdown, then how many last snapshots meet `SE_TARGET`, by
    either standard error (see `frontier_points`)."""
    rows = frontier_table(folder)
    n = max((r["seeds"] for r in rows), default=1)
    over = f"95 % t over {n} seeds" if n > 1 else "95 % over sampling, one seed"
    L = [f"| method | setting | seeds | oracle reward, last (± {over}) | sampling se | KL, last "
         "(± se) | oracle reward, best snapshot |", "|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        L.append(f"| {r['method']} | {r['setting'] or '–'} | {r['seeds']} | {r['reward']:+.3f} ± "
                 f"{r['reward_ci']:.3f} | {r['sampling_se']:.3f} | {r['kl']:.2f} ± "
                 f"{r['kl_se'] or 0:.2f} | {r['best_reward']:+.3f} ± "
                 f"{r['best_reward_ci']:.3f} |")  # fmt: skip
    sampling = [r for r in rows if r["sampling_se"] > SE_TARGET]
    seeded = [r for r in rows if r["seeds"] > 1]
    spread = [r for r in seeded if r["reward_se"] > SE_TARGET]

    def names(rs: list[dict[str, Any]], se: str) -> str:
        return ", ".join(f"{r['method']} {r['setting']}".strip() + f" {r[se]:.3f}" for r in rs)

    n = len(rows)
    L += ["", f"Sampling se ≤ {SE_TARGET} for {n - len(sampling)} of {n} last snapshots"
          + (f" (above it: {names(sampling, 'sampling_se')})" if sampling else "")
          + (f"; the se over seeds ≤ {SE_TARGET} for {len(seeded) - len(spread)} of "
             f"{len(seeded)}" if seeded else "")
          + (f" (above it: {names(spread, 'reward_se')})" if spread else "") + "."]  # fmt: skip
    return L


def convergence_table(folder: Path) -> list[dict[str, Any]]:
    """Per DPO-family sweep run: each seed's last step, and on how many seeds the
    convergence rule (not the step cap) ended it (``summary.json``'s ``converged_step``)."""
    rows = []
    for pattern in DPO_FAMILY:
        for run in sorted(
            {p.parent.name for p in folder.glob(f"sweep/seed*/{pattern}/summary.json")}
        ):
            got = [
                json.loads(p.read_text())
                for p in sorted(folder.glob(f"sweep/seed*/{run}/summary.json"))
            ]
            got = [s for s in got if "converged_step" in s]
            if got:
                rows.append({"run": run, "steps": [int(s["steps_done"]) for s in got],
                             "converged": sum(s["converged_step"] is not None for s in got)})  # fmt: skip
    return rows


def separation(points: Sequence[dict[str, Any]], method: str) -> list[tuple[str, str, int | None]]:
    """For each pair of `method`'s settings: the first snapshot step at which their points
    differ on some seed (None: identical at every common snapshot). The adaptive KL
    controller clips its error, so its runs at different targets can coincide for a while."""
    at: dict[str, dict[tuple[int, int], tuple[float, float]]] = defaultdict(dict)
    for p in points:
        if p["method"] == method and p["step"] > 0:
            at[p["setting"]][(int(p["step"]), int(p.get("seed", 0)))] = (p["reward"], p["kl"])
    out = []
    names = sorted(at)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            common = sorted(set(at[a]) & set(at[b]))
            first = next(
                (step for step, seed in common if at[a][(step, seed)] != at[b][(step, seed)]), None
            )
            out.append((a, b, first))
    return out


def training_rule_lines(folder: Path) -> list[str]:
    """How the sweep's runs ended: DPO's convergence rule against its cap, and where PPO's
    adaptive runs part (measured, `separation`)."""
    L = []
    for r in convergence_table(folder):
        capped = len(r["steps"]) - r["converged"]
        L.append(f"- {r['run']}: stopped at steps {', '.join(map(str, r['steps']))}; the "
                 f"validation-loss rule ended {r['converged']} of {len(r['steps'])} seeds"
                 + (f", the step cap {capped}" if capped else ""))  # fmt: skip
    for a, b, first in separation(raw_points(folder), "PPO"):
        L.append(f"- PPO {a} and {b}: " + ("identical at every common snapshot" if first is None
                 else f"identical before iteration {first}, apart from it on"))  # fmt: skip
    return ["How the runs ended (the sweep's seeds):", "", *L, ""] if L else []


def _reference_means(folder: Path) -> tuple[float, float] | None:
    """Mean log pi_ref(y_w|x) and log pi_ref(y_l|x) over the held-out pairs (the cache)."""
    found = sorted((folder / "prefs").glob("eval.ref-*.pt"))
    if not found:
        return None
    cache = torch.load(found[0], map_location="cpu", weights_only=True)
    return float(cache["chosen"].mean()), float(cache["rejected"].mean())


DPO_FAMILY = ("dpo-beta*", "dpo-nll-alpha*", "dpop-lambda*")


def displacement_table(folder: Path) -> list[dict[str, Any]]:
    """Likelihood displacement in every DPO-family run of the sweep (Razin et al. 2024,
    arXiv 2410.08847), mean over seeds at the last held-out evaluation: the change of the
    mean chosen and rejected log-probs from the reference's, and the shares of pairs whose
    chosen or rejected log-prob rose above the reference's."""
    ref = _reference_means(folder)
    runs: dict[str, list[dict]] = defaultdict(list)
    for pattern in DPO_FAMILY:
        for path in sorted(folder.glob(f"sweep/seed*/{pattern}/metrics.jsonl")):
            ev = [r for r in read_metrics(path) if "eval/logps/chosen_rose" in r]
            if ev:
                runs[path.parent.name].append(ev[-1])
    rows = []
    for name, last in runs.items():
        mean = {k: float(np.mean([r[f"eval/{k}"] for r in last]))
                for k in ("logps/chosen", "logps/rejected", "logps/chosen_rose",
                          "logps/rejected_rose", "rewards/accuracies")}  # fmt: skip
        rows.append({"run": name, "seeds": len(last),
                     "chosen_change": None if ref is None else mean["logps/chosen"] - ref[0],
                     "rejected_change": None if ref is None else mean["logps/rejected"] - ref[1],
                     "chosen_rose": mean["logps/chosen_rose"],
                     "rejected_rose": mean["logps/rejected_rose"],
                     "accuracy": mean["rewards/accuracies"]})  # fmt: skip
    return rows


def displacement_lines(folder: Path) -> list[str]:
    """`displacement_table` as markdown (nothing when no DPO run logged it)."""
    rows = displacement_table(folder)
    if not rows:
        return []
    L = ["## Likelihood displacement", "",
         "Every DPO-family run of the sweep at its last held-out evaluation (mean over seeds): "
         "the change of the mean log-prob of the held-out pairs' chosen and rejected responses "
         "from the reference's, the share of pairs whose log-prob rose above the reference's, "
         "and the implicit reward's pair accuracy.", "",
         "| run | seeds | Δ log π(y_w) | Δ log π(y_l) | chosen rose | rejected rose | pair accuracy |",
         "|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        L.append(f"| {r['run']} | {r['seeds']} | {fmt(r['chosen_change'], '+.2f')} | "
                 f"{fmt(r['rejected_change'], '+.2f')} | {r['chosen_rose']:.1%} | "
                 f"{r['rejected_rose']:.1%} | {r['accuracy']:.1%} |")  # fmt: skip
    return [*L, ""]


def raw_points(folder: Path) -> list[dict[str, Any]]:
    """One point per (method, setting, seed, snapshot): the sweep's, else the pipeline's."""
    sweep = folder / "sweep" / "points.json"
    if sweep.exists():
        return json.loads(sweep.read_text())["points"]
    return load_results(folder)["frontier"]


# The pairs of methods the report compares on matched KL, the headline first.
COMPARISONS = [("DPO", "PPO"), ("GRPO", "PPO"), ("Online DPO", "DPO")]


def compare(folder: Path, a: str = "DPO", b: str = "PPO") -> MatchedKL:
    """`minidpo.frontier.matched_kl` of methods a and b on the run's per-seed points."""
    return matched_kl(raw_points(folder), a, b)


def comparison_text(m: MatchedKL) -> str:
    """One sentence: where a and b were compared, the gaps and the verdict on a >= b."""
    if m.overlap is None:
        spans = "; ".join(f"{x} {lo:.2f}-{hi:.2f}" for x, (lo, hi) in m.ranges.items())
        return (f"{m.a} vs {m.b}: no KL where every seed of both has points ({spans or 'none'} "
                "nats), so this run cannot decide which frontier is higher.")  # fmt: skip
    g = m.mean_gap
    verdict = {HOLDS: f"{m.a}'s frontier is above {m.b}'s", NOT_HERE:
               f"{m.a}'s frontier is below {m.b}'s", UNDECIDED:
               "the run cannot tell the two frontiers apart"}[above(g)]  # fmt: skip
    return (
        f"{m.a} vs {m.b} on KL {m.overlap[0]:.2f}-{m.overlap[1]:.2f} nats (where both "
        f"have points; {m.points[m.a]} and {m.points[m.b]} points): mean gap {m.a} − {m.b} "
        f"{g.text()} (95 % interval over {g.over}); {verdict} there. Gaps: {m.where()}."
    )


def comparison_lines(folder: Path) -> list[str]:
    """Every pair of `COMPARISONS` with points on both sides, compared on matched KL."""
    points = raw_points(folder)
    found = [matched_kl(points, a, b) for a, b in COMPARISONS]
    found = [m for m in found if m.points[m.a] and m.points[m.b]]
    if not found:
        return []
    L = ["## Matched-KL comparisons", "",
         "Each method's frontier is the upper concave hull of its own points (`minidpo.frontier`),"
         " per seed; two methods are compared only on the KLs where every seed of both has "
         "points, and the gap's interval is 95 % over seeds (t, paired by seed).", ""]  # fmt: skip
    return [*L, *(f"- {comparison_text(m)}" for m in found), ""]


def conclusion(folder: Path) -> str:
    """The measured answer to: is DPO's frontier above PPO's where both have points?"""
    final = load_results(folder)["final"]
    sft = final["SFT"]["reward_mean"]
    best = max((m for m in final if m != "SFT"), key=lambda m: final[m]["reward_mean"])
    lines = [f"Best final policy by oracle reward: {best} ({final[best]['reward_mean']:+.3f}, "
             f"SFT {sft:+.3f})."]  # fmt: skip
    m = compare(folder)
    if not m.points.get("DPO") or not m.points.get("PPO"):
        lines.append("No DPO or no PPO points were measured, so no matched-KL comparison.")
    else:
        lines.append(comparison_text(m))
        agrees = m.overlap is not None and above(m.mean_gap) == HOLDS
        lines.append("The paper's Figure 2 finds DPO's frontier above PPO's at every KL; "
                     + ("this run agrees on the overlap." if agrees else
                        "this run does not show that."))  # fmt: skip
    settings = {p["method"]: p.get("setting") for p in load_results(folder)["frontier"]}
    for name in ("DPO", "PPO", "PPO-GT"):
        if name in final:
            d = final[name]["reward_mean"] - sft
            se = float(np.hypot(final[name]["reward_se"], final["SFT"]["reward_se"]))
            iv = normal_interval(d, se, over="sampling, one seed")
            tag = {HOLDS: "above", NOT_HERE: "below", UNDECIDED: "not distinguishable from"}[
                above(iv)
            ]
            lines.append(f"At the pipeline's setting{_setting(settings.get(name))}, {name} ends "
                         f"{tag} SFT ({iv.text()}, 95 % over sampling).")  # fmt: skip
    return " ".join(lines)


def _setting(setting: str | None) -> str:
    return f" ({setting})" if setting else ""


def fmt(v, spec: str, none: str = "–") -> str:
    """`v` formatted with `spec`, or `none` for None."""
    return none if v is None else format(v, spec)


def reward_model_lines(folder: Path, stamps: dict[str, dict]) -> list[str]:
    """The reward model beside its ceiling, and the PPO settings that use it."""
    rm = (stamps.get("rm") or {}).get("summary") or {}
    if rm.get("heldout_accuracy") is None:
        return []
    penalty = None
    pipeline = folder / "pipeline.json"
    if pipeline.exists():
        penalty = json.loads(pipeline.read_text())["config"]["ppo"].get("missing_eot_penalty")
    best = rm.get("best_step")
    return [
        "## Reward model", "",
        f"Held-out pair accuracy {rm['heldout_accuracy']:.1%} (the checkpoint with the best "
        f"accuracy on {rm.get('n_validation_pairs', '–')} validation pairs carved from the "
        f"training pairs, {fmt(rm.get('validation_accuracy'), '.1%')}"
        f"{'' if best is None else f', step {best}'}; the held-out pairs took no part in the "
        "choice), against a ceiling of "
        f"{fmt(rm.get('heldout_ceiling'), '.1%')}: the oracle's own agreement with the same "
        "Bradley-Terry labels (ties count one half); gap "
        f"{fmt(None if rm.get('heldout_gap') is None else 100 * rm['heldout_gap'], '.1f')} "
        f"points. Spearman correlation with the oracle on fresh SFT samples: "
        f"{fmt(rm.get('spearman'), '.3f')}. PPO against it subtracts "
        f"{fmt(penalty, 'g')} from the score of a response that never ends "
        "(`--ppo-missing-eot-penalty`); PPO-GT optimises the oracle reward with no penalty on top.",
    ]  # fmt: skip


def write_report(folder: str | Path, extra: Sequence[str] = ()) -> Path:
    """``report.md``: plots, tables, "Explain gravity." side by side, the conclusion, and
    `extra` lines after the conclusion (the claims ledger, `minidpo.claims`)."""
    folder = Path(folder)
    results = load_results(folder)
    final = results["final"]
    spp = results["samples_per_prompt"]
    stamps = stamps_of(folder)
    total = sum(s["cost"]["wall_s"] for n, s in stamps.items() if not n.startswith("sweep-"))
    sweep_timing = folder / "sweep" / "timing.json"
    _, source = frontier_points(folder)
    L = [f"# minidpo report: {folder.name}", ""]
    L += [*comparison_lines(folder), "## Conclusion", "", conclusion(folder), "", *extra]
    L += [f"## Held-out evaluation ({spp} samples per held-out prompt; oracle reward ± se)", ""]
    L += [
        "Outside the pairs: the share of samples that are none of the held-out pairs'"
        " responses to the same prompt (where likelihood displacement sends the mass).",
        "",
    ]
    L += ["| method | oracle reward | KL(π‖π_ref) | win vs SFT | unparseable | outside the pairs "
          "| length |", "|---|---|---|---|---|---|---|"]  # fmt: skip
    for m, r in final.items():
        kl = fmt(r.get("kl_mean"), ".2f") + (" (closed form)" if r.get("kl_note") else "")
        L.append(f"| {m} | {r['reward_mean']:+.3f} ± {r['reward_se']:.3f} | {kl} | "
                 f"{fmt(r.get('win_rate_vs_ref'), '.1%')} | {r['unparseable_rate']:.1%} | "
                 f"{fmt(r.get('outside_pairs'), '.1%')} | {r['mean_length']:.1f} |")  # fmt: skip
    L += ["", *reward_model_lines(folder, stamps)]
    L += ["", f"## Reward-KL frontier ({source})", "", "![frontier](plots/frontier.png)", ""]
    L += [
        "Each method's last snapshot and its best (per setting):",
        "",
        *frontier_lines(folder),
        "",
    ]
    L += training_rule_lines(folder)
    L += displacement_lines(folder)
    L += ["## Cost per method", ""]
    rows = cost_table(folder)
    target = final["SFT"]["reward_mean"]
    L += [f"Time to reach: training seconds until a snapshot first scored ≥ "
          f"{target + results['reach_margin']:+.2f} (SFT {target:+.2f} + {results['reach_margin']}), "
          f"over every setting of the method ({source}; the fastest setting in brackets); "
          "– where none did. Peak RSS: the process's resident memory at its highest during the "
          "method's stages (it includes what earlier stages left allocated); growth: the most it "
          "rose above its level at a stage's start.", ""]  # fmt: skip
    L += ["| method | stages | wall time (s) | tokens forward | tokens backward | peak RSS (MB) "
          "| RSS growth (MB) | time to reach (s) |", "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        L.append(f"| {r['method']} | {r['stages']} | {r['wall_s']:.1f} | {r['tokens_forward']:,} | "
                 f"{r['tokens_backward']:,} | {fmt(r['peak_rss_mb'], '.0f')} | "
                 f"{fmt(r['rss_growth_mb'], '.0f')} | "
                 f"{fmt(r['reach_s'], '.1f')}{_setting(r['reach_setting'])} |")  # fmt: skip
    L += ["", f"Whole pipeline: {total:.0f} s, the sum of its stages' wall times when they ran "
          "(`stages/*.json`)."]  # fmt: skip
    if sweep_timing.exists():
        t = json.loads(sweep_timing.read_text())
        shared = sum(v for k, v in t["stages"].items() if not k.startswith("sweep"))
        L[-1] += (f" The sweep from scratch: {t['wall_s']:.0f} s, of which {shared:.0f} s are "
                  f"the stages it shares with the pipeline (SFT to the reward model) and the "
                  f"plots and report (`sweep/timing.json`).")  # fmt: skip
    L += ["", "## Training curves", "", "![dpo](plots/dpo_curves.png)", "",
          "![ppo](plots/ppo_curves.png)", "", "## Win rate and reward distributions", "",
          "![win](plots/win_rates.png)", "", "![dist](plots/reward_distributions.png)", ""]  # fmt: skip
    L += ['## "Explain gravity." side by side', ""]
    for m, samples in results["gravity"].items():
        for s in samples:
            end = "" if s["terminated"] else " *(no end-of-text)*"
            L.append(f"- **{m}** [{s['oracle']:+.2f}] {s['response']}{end}")
    L.append("")
    return atomic_write_text(folder / "report.md", "\n".join(L))


def summary_text(folder: str | Path) -> str:
    """The printed summary at the end of a run: the evaluation table and the conclusion."""
    folder = Path(folder)
    final = load_results(folder)["final"]
    rows = [f"{'method':<14} {'oracle reward':>16} {'KL':>7} {'win vs SFT':>10}"]
    for m, r in final.items():
        reward = f"{r['reward_mean']:+.3f} ± {r['reward_se']:.3f}"
        rows.append(f"{m:<14} {reward:>16} {fmt(r.get('kl_mean'), '.2f'):>7} "
                    f"{fmt(r.get('win_rate_vs_ref'), '.1%'):>10}")  # fmt: skip
    return "\n".join([*rows, "", conclusion(folder), f"report: {folder / 'report.md'}"])


def _plots(ctx: Context, resume: bool) -> dict[str, Any]:
    return {"plots": [str(p.relative_to(ctx.folder)) for p in make_plots(ctx.folder)]}


PLOTS_STAGE = Stage("plots", _plots, (), ("eval",), inputs=lambda c: [c.paths.results],
                    outputs=lambda c: sorted(c.paths.plots_dir.glob("*.png")))  # fmt: skip
