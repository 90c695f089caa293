"""The claims ledger: each claim of the study card, measured on the run's files, with a verdict.

Every row is computed here from what the pipeline and the sweep wrote (``eval/results.json``,
``sweep/points.json``, ``sweep/limits.json``, the stamps, the training metrics) and from the
package's own source (lines of code), never typed by hand. Each verdict comes from one rule
(`minidpo.stats`): a claim "holds" where the 95 % interval of its measurement lies wholly on
the claim's side of the row's threshold, "does not hold" where it lies wholly on the other
side, and is "undecided at this power" otherwise; the same rule serves DPO's strengths and
its limits. Counts (lines of code, tokens) have no interval. "inconclusive" is a row whose
positive control failed, "not measured yet" one whose files are missing. The thresholds are
`THRESHOLDS`, fixed before the run; every row prints its interval and what it is over.

The rows (the card's words in quotes):

* "DPO: simple, stable, cheap" / "RLHF: complex, unstable, expensive": lines of code of each
  method's core (loss + trainer), seed-to-seed spread of the final reward and spread across
  the sweep's settings (bootstrap over seeds), wall time and tokens of the pipeline's runs.
* "No reward model, no RL sampling": the response tokens the training loop generated
  (`minidpo.sampling.GENERATED`, logged as ``tokens/generated``).
* "Matches or exceeds PPO-based RLHF": the matched-KL mean gap (`minidpo.frontier`).
* "Larger beta: policy changes more aggressively": KL against beta, on the GPT (seed-paired)
  and in closed form (`minidpo.exact`).
* "The gradient makes y_w more likely and y_l less likely": the share of held-out pairs whose
  chosen log-prob rose (likelihood displacement, Razin et al. 2024, arXiv 2410.08847).
* "No reward hacking": each DPO run's best snapshot (by seed mean) against its last.
* "~50 lines of core code": counted.
* The worked example's loss rounded to the card's three digits, against the card's 0.549.
* DPO's cost to reach PPO's best reward (the wall-time ratio).
* "Offline only": online DPO against offline DPO at the same labelled-pair budget.
* "Depends on the reference model" and "no reward shaping": `minidpo.limits`'s table; the
  shaping row's positive control is the direct methods' own gain on r_shaped.
* "GRPO: a middle ground": its own core's lines, and its best reward against PPO's.
"""

from __future__ import annotations

import ast
import inspect
import itertools
import json
import textwrap
from collections import defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from minidpo import dpo, grpo, grpo_math, losses, ppo, ppo_math, reward_model
from minidpo.config import DPOConfig
from minidpo.exact import beta_sweep, make_problem
from minidpo.gravity import GravityExample, compute, load_example
from minidpo.report import (
    compare,
    comparison_text,
    cost_table,
    frontier_points,
    raw_points,
    write_report,
)
from minidpo.stage import Context, Stage
from minidpo.stats import (
    HOLDS,
    INCONCLUSIVE,
    NOT_HERE,
    NOT_YET,
    UNDECIDED,
    Interval,
    above,
    below,
    bootstrap_interval,
    normal_interval,
    seed_interval,
    t_interval,
)
from minidpo.training import read_metrics

# Every threshold a verdict is decided by, in one place, fixed before the run.
THRESHOLDS: dict[str, float] = {
    "simpler": 0.5,  # DPO's core is "simple" if at most this share of RLHF's lines
    "core_lines": 75,  # "~50 lines of core code": the loss + trainer within this many
    "card_digits": 3,  # the worked example's loss, rounded to the card's digits
    "match_margin": 0.05,  # "matches": the mean frontier gap is not below -this (r* units)
    "hacking_margin": 0.05,  # "no hacking": the best-to-last drop is below this (r* units)
    "displacement": 0.5,  # "y_w more likely": the chosen log-prob rose on more than this share
    "cheaper": 5.0,  # DPO reaches PPO's best in at most 1/this of PPO's time
}

# The core of each method: its loss and its trainer (what a reader must understand to
# reimplement it), counted by `code_lines`. GRPO's is its own code only; it trains against
# the same reward model as PPO, which RLHF_CORE counts.
DPO_CORE: tuple[Callable, ...] = (
    losses.preference_loss, dpo.preference_metrics, dpo.compute_logps, dpo.reference_logps,
    dpo.run_dpo,
)  # fmt: skip
GRPO_CORE: tuple[Callable, ...] = (
    grpo_math.group_advantages, grpo_math.k3_kl, grpo_math.grpo_loss, grpo.grpo_iteration,
    grpo._update, grpo.run_grpo,
)  # fmt: skip
REWARD_MODEL_CORE: tuple[Callable, ...] = (
    losses.bradley_terry_loss, reward_model.pair_rewards, reward_model.train_reward_model,
    reward_model.normalise,
)  # fmt: skip
PPO_CORE: tuple[Callable, ...] = (
    ppo.run_ppo, ppo.rollout, ppo.rollout_scores, ppo.ppo_iteration, ppo.update,
    ppo_math.kl_penalized_rewards, ppo_math.compute_gae, ppo_math.whiten, ppo_math.policy_loss,
    ppo_math.value_loss, ppo_math.AdaptiveKLController,
)  # fmt: skip
RLHF_CORE = REWARD_MODEL_CORE + PPO_CORE


def code_lines(objs: Sequence[Callable]) -> int:
    """Lines of code of functions and classes: not blank, not a comment, not a docstring."""
    total = 0
    for obj in objs:
        src = textwrap.dedent(inspect.getsource(obj))
        docs: set[int] = set()
        for node in ast.walk(ast.parse(src)):
            body = getattr(node, "body", None)
            if isinstance(body, list) and body and isinstance(body[0], ast.Expr):
                value = body[0].value
                if isinstance(value, ast.Constant) and isinstance(value.value, str):
                    docs.update(range(body[0].lineno, body[0].end_lineno + 1))
        total += sum(
            1
            for i, line in enumerate(src.splitlines(), 1)
            if line.strip() and not line.strip().startswith("#") and i not in docs
        )
    return total


def _row(claim: str, measured: str, number: str, verdict: str, threshold: str) -> dict[str, str]:
    return {
        "claim": claim,
        "measured": measured,
        "number": number,
        "verdict": verdict,
        "threshold": threshold,
    }


def _missing(claim: str, measured: str) -> dict[str, str]:
    return _row(claim, measured, "–", NOT_YET, "")


def _all(verdicts: Sequence[str]) -> str:
    """A claim made at every setting: it holds if it holds at each, does not hold if it
    fails at any one, and is undecided otherwise."""
    if not verdicts or NOT_YET in verdicts:
        return NOT_YET
    if NOT_HERE in verdicts:
        return NOT_HERE
    return HOLDS if all(v == HOLDS for v in verdicts) else UNDECIDED


def _iv(iv: Interval | None, spec: str = "+.3f") -> str:
    return "–" if iv is None else f"{iv.text(spec)} ({iv.over})"


# ------------------------------------------------------------------ per-seed final points


def last_snapshots(points: Sequence[dict], method: str) -> dict[str, dict[int, dict]]:
    """setting -> seed -> the last snapshot of `method` in that (setting, seed) run."""
    last: dict[str, dict[int, dict]] = defaultdict(dict)
    for p in points:
        if p["method"] == method and p["step"] > 0:
            runs = last[p["setting"]]
            seed = int(p.get("seed", 0))
            if seed not in runs or p["step"] > runs[seed]["step"]:
                runs[seed] = p
    return dict(last)


def _finals(folder: Path, method: str, key: str = "reward") -> dict[str, dict[int, float]]:
    """setting -> seed -> `key` of `method`'s last snapshot."""
    return {s: {seed: p[key] for seed, p in runs.items()}
            for s, runs in last_snapshots(raw_points(folder), method).items()}  # fmt: skip


def _paired(a: dict[int, float], b: dict[int, float]) -> Interval | None:
    """The interval of a - b over the seeds both have (seed s of each trained on seed s's
    data), or None with fewer than two."""
    seeds = sorted(set(a) & set(b))
    return t_interval([a[s] - b[s] for s in seeds]) if len(seeds) >= 2 else None


def _final_interval(folder: Path, method: str, setting: str) -> Interval | None:
    runs = last_snapshots(raw_points(folder), method).get(setting, {})
    ps = [runs[s] for s in sorted(runs)]
    return seed_interval([p["reward"] for p in ps], [p.get("reward_se") for p in ps])


# ------------------------------------------------------------------------------- the rows


def simplicity_rows(folder: Path) -> list[dict[str, str]]:
    """ "Simple, stable, cheap" against "complex, unstable, expensive"."""
    d_loc, r_loc = code_lines(DPO_CORE), code_lines(RLHF_CORE)
    share = THRESHOLDS["simpler"]
    rows = [
        _row(
            '"DPO: simple" vs "RLHF: complex"',
            "lines of code of the core (loss + trainer; RLHF: reward model + PPO)",
            f"DPO {d_loc}, RLHF {r_loc}",
            HOLDS if d_loc <= share * r_loc else NOT_HERE,
            f"holds if DPO's is at most {share:g} of RLHF's",
        ),
        *stability_rows(folder),
    ]
    cost = {r["method"]: r for r in cost_table(folder)} if (folder / "eval").exists() else {}
    d, pp = cost.get("DPO"), cost.get("PPO")
    if d and pp:

        def tok(r: dict) -> int:
            return r["tokens_forward"] + r["tokens_backward"]

        rows.append(
            _row(
                '"DPO: cheap" vs "RLHF: expensive"',
                "wall time and tokens (forward + backward) of the pipeline's runs, shared "
                "stages included (one run each)",
                f"DPO {d['wall_s']:.1f} s, {tok(d):,}; PPO {pp['wall_s']:.1f} s, {tok(pp):,} "
                f"(x{pp['wall_s'] / d['wall_s']:.1f} time)",
                HOLDS if d["wall_s"] < pp["wall_s"] and tok(d) < tok(pp) else NOT_HERE,
                "holds if DPO costs less in both",
            )
        )
    return rows


def _seed_sd(runs: list[list[float]]) -> float:
    """Mean over settings of the seed-to-seed std of the final reward."""
    return float(np.mean([np.std(r, ddof=1) for r in runs]))


def _setting_range(runs: list[list[float]]) -> float:
    """Range over settings of the seed-mean final reward."""
    means = [float(np.mean(r)) for r in runs]
    return max(means) - min(means)


def stability_rows(folder: Path) -> list[dict[str, str]]:
    """ "Stable" vs "unstable": DPO's spreads minus PPO's, bootstrap over seeds."""
    d = [list(v.values()) for _, v in sorted(_finals(folder, "DPO").items())]
    p = [list(v.values()) for _, v in sorted(_finals(folder, "PPO").items())]
    rows = []
    for label, stat, what, settings in (
        ("seeds", _seed_sd, "seed-to-seed std of the final oracle reward, mean over the "
         "sweep's settings", 1),
        ("settings", _setting_range, "range over the sweep's settings (betas; KL targets) "
         "of the seed-mean final oracle reward", 2),
    ):  # fmt: skip
        claim = f'"DPO: stable" vs "RLHF: unstable" ({label})'
        if len(d) < settings or len(p) < settings or min(map(len, d + p)) < 2:
            rows.append(_missing(claim, what))
            continue
        k = len(d)

        def diff(g: list[list[float]], stat: Callable = stat, k: int = k) -> float:
            return stat(g[:k]) - stat(g[k:])

        iv = bootstrap_interval(diff, d + p)
        rows.append(
            _row(
                claim,
                what + "; DPO − PPO",
                f"DPO {stat(d):.3f}, PPO {stat(p):.3f}; DPO − PPO {_iv(iv)}",
                below(iv),
                "holds if DPO − PPO is below 0",
            )
        )
    return rows


def _generated(folder: Path, pattern: str) -> int | None:
    """Response tokens the training loops of the runs matching `pattern` generated (None:
    no run, or one logged before the counter existed)."""
    rows = [r for path in sorted(folder.glob(f"{pattern}/metrics.jsonl"))
            for r in read_metrics(path) if r.get("step", 0) > 0]  # fmt: skip
    if not rows or any("tokens/generated" not in r for r in rows):
        return None
    return int(sum(r["tokens/generated"] for r in rows))


def sampling_row(folder: Path) -> dict[str, str]:
    """ "No reward model, no RL sampling": tokens the training loop generated."""
    claim, what = '"No reward model, no RL sampling"', "response tokens generated while training"
    d, p = _generated(folder, "dpo-sigmoid-beta*"), _generated(folder, "ppo-rm-*")
    if d is None or p is None:
        return _missing(claim, what)
    verdict = INCONCLUSIVE if p == 0 else HOLDS if d == 0 else NOT_HERE
    return _row(
        claim,
        what + " (the sampler's own counter, read around each training step; PPO is the "
        "control: its rollouts must count)",
        f"DPO {d:,}, PPO {p:,}",
        verdict,
        "holds if DPO's count is 0 and PPO's is not (inconclusive if PPO's is 0 too)",
    )


def frontier_row(folder: Path) -> dict[str, str]:
    """ "Matches or exceeds PPO": the matched-KL mean gap, non-inferiority at a margin."""
    claim, margin = '"Matches or exceeds PPO-based RLHF"', THRESHOLDS["match_margin"]
    m = compare(folder, "DPO", "PPO")
    if not m.points.get("DPO") or not m.points.get("PPO"):
        return _missing(claim, "matched-KL frontier gap")
    return _row(
        claim,
        "mean of DPO − PPO frontier reward over the KLs where both have points (each "
        "method's own points, linear between them)",
        comparison_text(m),
        UNDECIDED if m.mean_gap is None else above(m.mean_gap, -margin),
        f"holds if the mean gap is above −{margin:g}; undecided without an overlap",
    )


def beta_row(folder: Path) -> dict[str, str]:
    """ "Larger beta: the policy changes more aggressively": KL against beta."""
    claim = '"Larger beta: policy changes more aggressively"'
    by_beta = {float(s.split("=")[1]): kl for s, kl in _finals(folder, "DPO", "kl").items()
               if s.startswith("beta=")}  # fmt: skip
    betas = sorted(by_beta)
    if len(betas) < 2:
        return _missing(claim, "KL of DPO's last snapshot at each beta")
    steps = [_paired(by_beta[b1], by_beta[b0]) for b0, b1 in itertools.pairwise(betas)]
    exact = beta_sweep(make_problem(), tuple(betas))
    gpt = ", ".join(f"{b:g}: {np.mean(list(by_beta[b].values())):.2f}" for b in betas)
    rises = ", ".join(f"{b0:g}→{b1:g} {_iv(s, '+.2f')}"
                      for b0, b1, s in zip(betas, betas[1:], steps, strict=False))  # fmt: skip
    closed = ", ".join(f"{r.beta:g}: {r.kl:.2f}" for r in exact)
    return _row(
        claim,
        "KL(π‖π_ref) of DPO's last snapshot at each beta (mean over seeds) and its change "
        "at each larger beta (seed-paired); the closed form's pi* (Eq. 4) on an enumerable "
        "problem",
        f"GPT {gpt}; changes {rises}; closed form {closed}",
        _all([above(s) if s is not None else UNDECIDED for s in steps]),
        "holds if KL rises at every larger beta; does not hold if it falls at any",
    )


def _rose(folder: Path) -> tuple[list[tuple[str, float]], Interval | None]:
    """(run, chosen-rose share) of each plain-DPO run's last held-out evaluation, and the
    interval of the share: over the sweep's seeds at the pipeline's beta, else the pipeline's
    one run over its held-out pairs."""
    sweep = sorted(folder.glob("sweep/seed*/dpo-beta*/metrics.jsonl"))
    found = []
    for path in sweep or sorted(folder.glob("dpo-sigmoid-beta*/metrics.jsonl")):
        ev = [r for r in read_metrics(path) if "eval/logps/chosen_rose" in r]
        if ev:
            name = (
                path.parent.name if not sweep else f"{path.parent.parent.name}/{path.parent.name}"
            )
            found.append((name, float(ev[-1]["eval/logps/chosen_rose"])))
    if not found:
        return [], None
    if sweep:
        by_run: dict[str, list[float]] = defaultdict(list)
        for name, share in found:
            by_run[name.split("/")[1]].append(share)
        found = [(run, float(np.mean(v))) for run, v in sorted(by_run.items())]
        run = min(by_run, key=lambda r: abs(float(r.removeprefix("dpo-beta")) - DPOConfig().beta))
        return found, seed_interval(by_run[run])
    summary = folder / "prefs" / "summary.json"
    n = json.loads(summary.read_text())["eval"]["pairs"] if summary.exists() else None
    if not n:
        return found, None
    share = found[0][1]
    return found, normal_interval(
        share, np.sqrt(share * (1 - share) / n), over=f"{n} held-out pairs"
    )


def displacement_row(folder: Path) -> dict[str, str]:
    """ "The gradient makes y_w more likely and y_l less likely": chosen log-probs that rose."""
    claim, share = (
        '"The gradient makes y_w more likely and y_l less likely"',
        THRESHOLDS["displacement"],
    )
    found, iv = _rose(folder)
    if iv is None:
        return _missing(claim, "held-out pairs whose chosen log-prob rose")
    return _row(
        claim,
        "share of held-out pairs whose chosen log-prob under the policy rose above the "
        "reference's at the last evaluation, plain DPO at the pipeline's beta (likelihood "
        "displacement when low)",
        f"{_iv(iv, '.2f')}; each run (mean over seeds): "
        + ", ".join(f"{n} {s:.0%}" for n, s in found),
        above(iv, share),
        f"holds if the share is above {share:g}",
    )


def hacking_row(folder: Path) -> dict[str, str]:
    """ "No reward hacking": each DPO run's best snapshot against its last."""
    claim, margin = '"No reward hacking"', THRESHOLDS["hacking_margin"]
    runs: dict[str, dict[int, list[dict]]] = defaultdict(lambda: defaultdict(list))
    for p in raw_points(folder):
        if p["method"] == "DPO" and p["step"] > 0:
            runs[p["setting"]][int(p["step"])].append(p)
    if not runs:
        return _missing(claim, "best − last snapshot")
    drops, verdicts = [], []
    for setting, by_step in sorted(runs.items()):
        # each seed stops at its own step: its last snapshot is its own; the best step is
        # chosen by the seed mean among the steps every seed reached
        per_seed: dict[int, dict[int, dict]] = defaultdict(dict)
        for step, ps in by_step.items():
            for p in ps:
                per_seed[int(p.get("seed", 0))][step] = p
        common = set.intersection(*(set(v) for v in per_seed.values()))
        best = max(common, key=lambda st: np.mean([v[st]["reward"] for v in per_seed.values()]))
        pairs = [(v[best], v[max(v)]) for _, v in sorted(per_seed.items())]
        gaps = [b["reward"] - e["reward"] for b, e in pairs]
        if len(gaps) >= 2:
            iv = t_interval(gaps)
        else:
            ((b, e),) = pairs
            iv = normal_interval(gaps[0], float(np.hypot(b["reward_se"], e["reward_se"])))
        drops.append(f"{setting} best step {best} → each seed's last {_iv(iv, '+.3f')}")
        verdicts.append(below(iv, margin))
    return _row(
        claim,
        "drop in oracle reward from each DPO run's best snapshot (by seed mean) to its last, "
        "seed-paired",
        "; ".join(drops),
        _all(verdicts),
        f"holds if every drop is below {margin:g}; does not hold if any is above it",
    )


def lines_row() -> dict[str, str]:
    """ "~50 lines of core code": counted."""
    loss, core, most = (
        code_lines([losses.preference_loss]),
        code_lines(DPO_CORE),
        THRESHOLDS["core_lines"],
    )
    return _row(
        '"~50 lines of core code"',
        "lines of code (no blank, comment or docstring lines) of the loss, and of the loss + trainer",
        f"loss {loss}, core {core}",
        HOLDS if core <= most else NOT_HERE,
        f"holds if the core is at most {most:g} lines",
    )


def worked_example_row(example: GravityExample | None = None) -> dict[str, str]:
    """The worked example: the loss computed here, rounded to the card's digits, against the
    card's printed loss."""
    r = compute(example or load_example())
    digits = int(THRESHOLDS["card_digits"])
    agree = r.max_abs_diff < 1e-9
    verdict = (
        HOLDS
        if agree and round(r.torch.loss, digits) == round(r.example.card_loss, digits)
        else NOT_HERE
    )
    return _row(
        f"Worked example: loss {r.example.card_loss:.{digits}f}",
        "-log sigma(beta (log-ratio_w − log-ratio_l)), torch and NumPy",
        f"{r.torch.loss:.4f} (torch and NumPy agree to {r.max_abs_diff:.0e}), {round(r.torch.loss, digits):.{digits}f} "
        f"to {digits} digits; the card's {r.example.card_loss:.{digits}f} is -ln({r.example.card_sigmoid:.3f}) "
        f"= {r.loss_from_card_sigmoid:.4f} cut to three digits",
        verdict,
        f"holds if the loss rounded to {digits} digits is the card's (and torch and NumPy agree)",
    )


def cost_to_reach_row(folder: Path) -> dict[str, str]:
    """DPO's wall time to reach PPO's best oracle reward, against PPO's own."""
    claim, ratio_min = "DPO at least 5x cheaper than PPO (to PPO's best)", THRESHOLDS["cheaper"]
    what = "training seconds to first reach PPO's best oracle reward (mean over seeds)"
    points, _ = frontier_points(folder)
    ppo_pts = [p for p in points if p["method"] == "PPO" and p["step"] > 0]
    dpo_pts = [p for p in points if p["method"] == "DPO" and p["step"] > 0]
    if not ppo_pts or not dpo_pts:
        return _missing(claim, what)
    best = max(ppo_pts, key=lambda p: p["reward"])
    rule = f"holds if DPO reaches it in at most 1/{ratio_min:g} of PPO's time"
    reached = sorted(
        (p["elapsed_s"], p["setting"]) for p in dpo_pts if p["reward"] >= best["reward"]
    )
    if not reached:
        top = max(dpo_pts, key=lambda p: p["reward"])
        half = float(np.hypot(top["reward_ci"], best["reward_ci"]))
        gap = Interval(top["reward"] - best["reward"], top["reward"] - best["reward"] - half,
                       top["reward"] - best["reward"] + half, top["seeds"], "seed means")  # fmt: skip
        return _row(
            claim,
            what,
            f"PPO's best {best['reward']:+.3f} after {best['elapsed_s']:.1f} s; DPO never reaches "
            f"it: its best {top['reward']:+.3f} ({top['setting']}), gap {_iv(gap)}",
            NOT_HERE if above(gap) == NOT_HERE else UNDECIDED,
            rule + "; does not hold if DPO's best is below PPO's",
        )
    t, setting = reached[0]
    ratio = best["elapsed_s"] / t if t > 0 else float("inf")
    return _row(
        claim,
        what,
        f"PPO {best['elapsed_s']:.1f} s to {best['reward']:+.3f}; DPO {t:.1f} s ({setting}): x{ratio:.1f}",
        HOLDS if ratio >= ratio_min else NOT_HERE,
        rule,
    )


def online_row(folder: Path) -> dict[str, str]:
    """Limitation 1, "offline only": online DPO against offline DPO at the same beta and the
    same number of labelled pairs, seed-paired."""
    claim = "Offline only (limitation 1)"
    on, off = _finals(folder, "Online DPO"), _finals(folder, "DPO")
    common = sorted(set(on) & set(off), key=lambda s: float(s.split("=")[1]))
    if not common:
        return _missing(claim, "online − offline DPO")
    gaps = [(s, _paired(on[s], off[s]) or _single_gap(folder, s)) for s in common]
    return _row(
        claim,
        "final oracle reward of online DPO (rounds of on-policy pairs, reference SFT) minus "
        "offline DPO's, the same beta and labelled-pair budget",
        "; ".join(f"{s}: {_iv(iv)}" for s, iv in gaps),
        _all([above(iv) if iv is not None else UNDECIDED for _, iv in gaps]),
        "holds (on-policy data helps) if online − offline is above 0 at every beta; does "
        "not hold if it is below 0 at any",
    )


def _single_gap(folder: Path, setting: str) -> Interval | None:
    """Online − offline DPO of a one-seed run, from the sampling standard errors."""
    a, b = _final_interval(folder, "Online DPO", setting), _final_interval(folder, "DPO", setting)
    if a is None or b is None or a.n > 1 or b.n > 1:
        return None
    half = float(np.hypot(a.hi - a.mean, b.hi - b.mean))
    d = a.mean - b.mean
    return Interval(d, d - half, d + half, 1, "sampling only (1 seed)")


def _limits_file(folder: str | Path) -> dict[str, Any] | None:
    """``sweep/limits.json`` (`minidpo.limits.evaluate_limits`), or None without a sweep."""
    path = Path(folder) / "sweep" / "limits.json"
    return json.loads(path.read_text()) if path.exists() else None


def _gap(rows: dict[str, dict[str, Any]], a: str, b: str, key: str) -> list[float]:
    """Per seed: a − b in `key` (seed s of both trained on seed s's data)."""
    return [x[key] - y[key] for x, y in zip(rows[a]["seeds"], rows[b]["seeds"], strict=True)]


def reference_row(folder: Path) -> dict[str, str]:
    """Limitation 2, "depends on the reference": DPO from a weak (early SFT) reference."""
    claim = "Depends on the reference model (limitation 2)"
    limits = _limits_file(folder)
    if limits is None:
        return _missing(claim, "DPO from a weak reference")
    rows = limits["rows"]
    start = t_interval(_gap(rows, "DPO, weak start", "DPO", "oracle"))
    ref = t_interval(_gap(rows, "DPO, weak reference", "DPO", "oracle"))
    return _row(
        claim,
        "final oracle reward of DPO (same pairs, beta, rule) with the early SFT checkpoint as "
        "policy and reference (weak start), or as reference only (weak reference), minus DPO "
        "from the final SFT, seed-paired",
        f"early SFT {rows['early SFT (weak reference)']['oracle']:+.3f}, SFT "
        f"{rows['SFT']['oracle']:+.3f}, DPO from SFT {rows['DPO']['oracle']:+.3f}; weak start "
        f"{_iv(start)}; weak reference {_iv(ref)}",
        below(start),
        "holds if DPO from the weak start ends below DPO from SFT",
    )


SHAPING = {  # method -> (its run with the shaping term, the same method on r*)
    "PPO": ("PPO on r_shaped", "PPO-GT"),
    "GRPO": ("GRPO on r_shaped", "GRPO on r*"),
    "DPO": ("DPO, relabelled by r_shaped", "DPO"),
}


def shaping_row(folder: Path) -> dict[str, str]:
    """Limitation 3, "no reward shaping": what each method gains on r_shaped from the term.

    The positive control: PPO or GRPO, which optimise r_shaped directly, must gain on it over
    the same method on r*; if neither does, the run cannot tell what DPO misses."""
    claim = "No reward shaping (limitation 3)"
    limits = _limits_file(folder)
    if limits is None:
        return _missing(claim, "gain on r_shaped")
    rows = limits["rows"]
    gains = {m: _gap(rows, a, b, "shaped") for m, (a, b) in SHAPING.items()}
    cost = {m: t_interval(_gap(rows, a, b, "oracle")) for m, (a, b) in SHAPING.items()}
    control = [m for m in ("PPO", "GRPO") if above(t_interval(gains[m])) == HOLDS]
    behind = {m: t_interval([g - d for g, d in zip(gains[m], gains["DPO"], strict=True)])
              for m in control}  # fmt: skip
    number = "; ".join(
        f"{m}: r_shaped {_iv(t_interval(gains[m]))}, r* {cost[m].text()}" for m in SHAPING
    )
    number += "".join(f"; {m} − DPO gain {_iv(iv)}" for m, iv in behind.items())
    return _row(
        claim,
        "gain on r_shaped (and change on r*) of each method trained with the shaping term "
        "over the same method without it, seed-paired",
        number,
        INCONCLUSIVE if not control else _all([above(iv) for iv in behind.values()]),
        "control: PPO's or GRPO's own gain on r_shaped above 0 (else inconclusive); holds if "
        "DPO's gain is below each gaining method's",
    )


def grpo_row(folder: Path) -> dict[str, str]:
    """ "GRPO: a middle ground between PPO's flexibility and DPO's simplicity"."""
    claim, margin = "GRPO: a middle ground between PPO and DPO", THRESHOLDS["match_margin"]
    g, p = _finals(folder, "GRPO"), _finals(folder, "PPO")
    if not g or not p:
        return _missing(claim, "GRPO's core and reward")
    d_loc, g_loc, r_loc = code_lines(DPO_CORE), code_lines(GRPO_CORE), code_lines(RLHF_CORE)
    best_g = max(g, key=lambda s: np.mean(list(g[s].values())))
    best_p = max(p, key=lambda s: np.mean(list(p[s].values())))
    gap = _paired(g[best_g], p[best_p])
    if gap is None:
        a, b = _final_interval(folder, "GRPO", best_g), _final_interval(folder, "PPO", best_p)
        if a is not None and b is not None:
            half = float(np.hypot(a.hi - a.mean, b.hi - b.mean))
            gap = Interval(a.mean - b.mean, a.mean - b.mean - half, a.mean - b.mean + half, 1,
                           "sampling only (1 seed)")  # fmt: skip
    p_loc = code_lines(PPO_CORE)
    between = d_loc < g_loc < p_loc
    reward = above(gap, -margin) if gap is not None else UNDECIDED
    return _row(
        claim,
        "lines of code of GRPO's own core (its loss and trainer) against DPO's and PPO's own "
        "(both RL methods also train and query the same reward model), and GRPO's best "
        "final oracle reward over the settings minus PPO's best",
        f"core lines DPO {d_loc}, GRPO {g_loc}, PPO {p_loc} (+ the reward model's "
        f"{r_loc - p_loc} for either RL method); best final reward GRPO ({best_g}) − PPO "
        f"({best_p}) {_iv(gap)}",
        NOT_HERE if not between else reward,
        f"holds if GRPO's core is between DPO's and PPO's and its best reward is above "
        f"PPO's − {margin:g}",
    )


def ledger(folder: str | Path) -> list[dict[str, str]]:
    """Every row of the ledger for the run at `folder`."""
    folder = Path(folder)
    return [
        *simplicity_rows(folder),
        sampling_row(folder),
        frontier_row(folder),
        beta_row(folder),
        displacement_row(folder),
        hacking_row(folder),
        lines_row(),
        worked_example_row(),
        cost_to_reach_row(folder),
        online_row(folder),
        reference_row(folder),
        shaping_row(folder),
        grpo_row(folder),
    ]


def ledger_lines(folder: str | Path) -> list[str]:
    """The ledger as a markdown section."""
    L = [
        "## Claims ledger",
        "",
        "Each claim of the study card, measured on this run (`minidpo.claims`). Intervals "
        "are 95 %, over what each says; a verdict holds where the interval lies on the "
        "claim's side of the threshold, does not hold where it lies on the other side, "
        "and is undecided at this power otherwise.",
        "",
        "| claim | measured | number | verdict | threshold |",
        "|---|---|---|---|---|",
    ]
    L += [
        f"| {r['claim']} | {r['measured']} | {r['number']} | **{r['verdict']}** | "
        f"{r['threshold'] or '–'} |"
        for r in ledger(folder)
    ]
    return [*L, ""]


def limits_lines(folder: str | Path) -> list[str]:
    """The limits experiments' table (``sweep/limits.json``) as a markdown section; empty
    when the run has no sweep."""
    limits = _limits_file(folder)
    if limits is None:
        return []
    sh, n = limits["shaping"], len(limits["seeds"])
    L = [
        "## The reference's role and reward shaping (limitations 2 and 3)",
        "",
        f"Final policies, {limits['samples_per_prompt']} samples per held-out prompt and seed, "
        f"mean ± se over {n} seeds (each seed its own pairs and reward model). Early SFT: the "
        f"run's SFT stopped at {limits['weak_reference_steps']} of its {limits['sft_steps']} "
        f"steps. r_shaped = r* − {sh['weight']:g} per sentence beyond {sh['free_sentences']}.",
        "",
        "| policy | oracle reward r* | r_shaped | KL to SFT | sentences | unparseable |",
        "|---|---|---|---|---|---|",
    ]

    def pm(r: dict[str, Any], k: str) -> str:  # one seed has no se
        return f"{r[k]:+.3f}" + ("" if r[f"{k}_se"] is None else f" ± {r[f'{k}_se']:.3f}")

    for name, r in limits["rows"].items():
        L.append(
            f"| {name} | {pm(r, 'oracle')} | {pm(r, 'shaped')} | {r['kl']:.2f} | "
            f"{r['sentences']:.2f} | {r['unparseable']:.1%} |"
        )
    return [*L, ""]


def write_full_report(folder: str | Path) -> Path:
    """``report.md`` with the claims ledger and the limits table after the conclusion."""
    return write_report(folder, ledger_lines(folder) + limits_lines(folder))


def _report(ctx: Context, resume: bool) -> dict[str, Any]:
    return {"report": str(write_full_report(ctx.folder).relative_to(ctx.folder))}


REPORT_STAGE = Stage(
    "report",
    _report,
    (),
    ("eval", "plots"),
    inputs=lambda c: [c.paths.results, *sorted(c.paths.plots_dir.glob("*.png"))],
    outputs=lambda c: [c.paths.report],
)
