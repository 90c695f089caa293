"""Every ledger row, fed a small synthetic results folder twice: once so that its claim
holds and once so that it does not (and, where a row has one, its undecided or
inconclusive case)."""

import dataclasses
import json

import pytest

from minidpo import claims, grpo_math
from minidpo.gravity import load_example
from minidpo.stats import HOLDS, INCONCLUSIVE, NOT_HERE, NOT_YET, UNDECIDED

SEEDS = (0, 1, 2, 3, 4)
JITTER = (0.01, -0.02, 0.0, 0.02, -0.01)  # seed-to-seed noise, mean 0


def _pt(method, setting, seed, step, reward, kl, se=0.05, elapsed=None):
    return {"method": method, "setting": setting, "seed": seed, "step": step,
            "reward": reward, "reward_se": se, "kl": kl, "kl_se": 0.01,
            "elapsed_s": float(step) if elapsed is None else elapsed}  # fmt: skip


def _run(method, setting, curve, jitter=JITTER, time_per_step=1.0):
    """Points of one (method, setting) over SEEDS: curve is [(step, reward, kl), ...]."""
    return [_pt(method, setting, s, step, r + j, kl, elapsed=step * time_per_step)
            for s, j in zip(SEEDS, jitter, strict=True) for step, r, kl in curve]  # fmt: skip


def _folder(tmp_path, points, name="run"):
    f = tmp_path / name
    (f / "sweep").mkdir(parents=True)
    sft = [_pt("SFT", "", s, 0, 1.0, 0.0) for s in SEEDS]
    (f / "sweep" / "points.json").write_text(json.dumps({"points": sft + points}))
    return f


def _metrics(folder, run, rows):
    (folder / run).mkdir(parents=True, exist_ok=True)
    (folder / run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


RISING = [(10, 1.2, 0.2), (20, 1.4, 0.5), (30, 1.5, 1.0)]


def test_code_lines_decide_simplicity_both_ways(tmp_path, monkeypatch):
    f = _folder(tmp_path, [])
    assert claims.simplicity_rows(f)[0]["verdict"] == HOLDS  # 188 against 393 lines
    monkeypatch.setattr(claims, "DPO_CORE", claims.RLHF_CORE)
    assert claims.simplicity_rows(f)[0]["verdict"] == NOT_HERE


def _spread_points(dpo_jitter, ppo_jitter, dpo_levels, ppo_levels):
    pts = []
    for i, level in enumerate(dpo_levels):
        pts += _run("DPO", f"beta={0.1 * (i + 1):g}", [(10, level, 0.3)], dpo_jitter)
    for i, level in enumerate(ppo_levels):
        pts += _run("PPO", f"target={i + 1}", [(10, level, 1.0)], ppo_jitter)
    return pts


def test_stability_over_seeds_both_ways(tmp_path):
    small, big = [x / 10 for x in JITTER], [x * 10 for x in JITTER]
    calm = _folder(tmp_path, _spread_points(small, big, [1.5, 1.5], [1.5, 1.5]), "calm")
    wild = _folder(tmp_path, _spread_points(big, small, [1.5, 1.5], [1.5, 1.5]), "wild")
    assert claims.stability_rows(calm)[0]["verdict"] == HOLDS
    assert claims.stability_rows(wild)[0]["verdict"] == NOT_HERE


def test_stability_over_settings_both_ways(tmp_path):
    calm = _folder(tmp_path, _spread_points(JITTER, JITTER, [1.5, 1.52], [1.0, 1.6]), "calm")
    wild = _folder(tmp_path, _spread_points(JITTER, JITTER, [1.0, 1.6], [1.5, 1.52]), "wild")
    assert claims.stability_rows(calm)[1]["verdict"] == HOLDS
    assert claims.stability_rows(wild)[1]["verdict"] == NOT_HERE


def test_cost_row_both_ways(tmp_path, monkeypatch):
    f = _folder(tmp_path, [])
    (f / "eval").mkdir()

    def table(dpo_s, ppo_s):
        return lambda folder: [
            {"method": "DPO", "wall_s": dpo_s, "tokens_forward": 10, "tokens_backward": 5},
            {"method": "PPO", "wall_s": ppo_s, "tokens_forward": 30, "tokens_backward": 9},
        ]

    monkeypatch.setattr(claims, "cost_table", table(20.0, 60.0))
    assert claims.simplicity_rows(f)[-1]["verdict"] == HOLDS
    monkeypatch.setattr(claims, "cost_table", table(90.0, 60.0))
    assert claims.simplicity_rows(f)[-1]["verdict"] == NOT_HERE


@pytest.mark.parametrize(("dpo", "ppo", "want"), [(0, 500, HOLDS), (40, 500, NOT_HERE),
                                                  (0, 0, INCONCLUSIVE)])  # fmt: skip
def test_sampling_row_counts_the_generated_tokens(tmp_path, dpo, ppo, want):
    f = _folder(tmp_path, [])
    _metrics(f, "dpo-sigmoid-beta0.1", [{"step": 1, "tokens/generated": dpo}, {"step": 2,
             "tokens/generated": 0}])  # fmt: skip
    _metrics(f, "ppo-rm-kl0.05", [{"step": 1, "tokens/generated": ppo}])
    row = claims.sampling_row(f)
    assert row["verdict"] == want and f"DPO {dpo:,}" in row["number"]


def test_sampling_row_without_the_counter_is_not_measured(tmp_path):
    f = _folder(tmp_path, [])
    _metrics(f, "dpo-sigmoid-beta0.1", [{"step": 1, "train/loss": 0.6}])
    _metrics(f, "ppo-rm-kl0.05", [{"step": 1, "tokens/generated": 9}])
    assert claims.sampling_row(f)["verdict"] == NOT_YET


def test_frontier_row_both_ways_and_undecided_without_overlap(tmp_path):
    ppo = _run("PPO", "target=1", [(8, 1.1, 0.1), (16, 1.3, 0.6), (24, 1.45, 1.2)])
    good = _folder(tmp_path, ppo + _run("DPO", "beta=0.1", RISING), "good")
    bad = _folder(tmp_path, ppo + _run("DPO", "beta=0.1", [(s, r - 0.3, k) for s, r, k in RISING]),
                  "bad")  # fmt: skip
    apart = _folder(tmp_path, _run("PPO", "target=1", [(8, 1.6, 2.0), (16, 1.7, 3.0)])
                    + _run("DPO", "beta=0.1", RISING), "apart")  # fmt: skip
    assert claims.frontier_row(good)["verdict"] == HOLDS
    assert claims.frontier_row(bad)["verdict"] == NOT_HERE
    row = claims.frontier_row(apart)
    assert row["verdict"] == UNDECIDED and "cannot decide" in row["number"]


def _betas(kls):
    return [p for b, kl in zip((0.05, 0.1, 1.0), kls, strict=True)
            for p in _run("DPO", f"beta={b:g}", [(10, 1.4, kl)])]  # fmt: skip


def test_beta_row_both_ways(tmp_path):
    # the KL jitters with the seed too, so each step's interval has a width
    def run(kls):
        pts = _betas(kls)
        for p, j in zip(pts, JITTER * 3, strict=True):
            p["kl"] += j
        return pts

    rising = _folder(tmp_path, run([0.2, 0.5, 1.0]), "rising")
    falling = _folder(tmp_path, run([1.0, 0.8, 0.2]), "falling")
    flat = _folder(tmp_path, run([0.5, 0.5, 0.5]), "flat")
    assert claims.beta_row(rising)["verdict"] == HOLDS
    assert claims.beta_row(falling)["verdict"] == NOT_HERE
    assert claims.beta_row(flat)["verdict"] == UNDECIDED


@pytest.mark.parametrize(("share", "want"), [(0.7, HOLDS), (0.3, NOT_HERE)])
def test_displacement_row_both_ways(tmp_path, share, want):
    f = _folder(tmp_path, [])
    for s, j in zip(SEEDS, JITTER, strict=True):
        _metrics(f / "sweep" / f"seed{s}", "dpo-beta0.1",
                 [{"step": 50, "eval/logps/chosen_rose": share + j}])  # fmt: skip
    assert claims.displacement_row(f)["verdict"] == want


def test_displacement_row_of_one_run_uses_its_pairs(tmp_path):
    f = _folder(tmp_path, [])
    (f / "sweep" / "points.json").unlink()
    (f / "prefs").mkdir()
    (f / "prefs" / "summary.json").write_text(json.dumps({"eval": {"pairs": 640}}))
    _metrics(f, "dpo-sigmoid-beta0.1", [{"step": 50, "eval/logps/chosen_rose": 0.42}])
    row = claims.displacement_row(f)
    assert row["verdict"] == NOT_HERE and "640 held-out pairs" in row["number"]


def test_hacking_row_both_ways(tmp_path):
    steady = _folder(tmp_path, _run("DPO", "beta=0.1", RISING), "steady")
    hacked = _folder(tmp_path, _run("DPO", "beta=0.1", [*RISING, (40, 1.0, 2.0)]), "hacked")
    assert claims.hacking_row(steady)["verdict"] == HOLDS
    assert claims.hacking_row(hacked)["verdict"] == NOT_HERE


def test_lines_row_both_ways(monkeypatch):
    assert claims.lines_row()["verdict"] == NOT_HERE  # the core is 188 lines
    monkeypatch.setitem(claims.THRESHOLDS, "core_lines", 500)
    assert claims.lines_row()["verdict"] == HOLDS


def test_worked_example_compares_the_rounded_loss_with_the_card():
    ex = load_example()
    row = claims.worked_example_row(ex)
    assert row["verdict"] == NOT_HERE and "0.5501" in row["number"]  # 0.550, not 0.549
    assert claims.worked_example_row(dataclasses.replace(ex, card_loss=0.550))["verdict"] == HOLDS
    broken = dataclasses.replace(ex, beta=0.2, card_loss=0.550)  # a different loss
    assert claims.worked_example_row(broken)["verdict"] == NOT_HERE


def test_cost_to_reach_row_both_ways(tmp_path):
    ppo = _run("PPO", "target=1", [(8, 1.3, 0.5), (16, 1.5, 1.0)], time_per_step=10.0)
    fast = _folder(tmp_path, ppo + _run("DPO", "beta=0.1", [(10, 1.6, 0.5)]), "fast")
    slow = _folder(tmp_path, ppo + _run("DPO", "beta=0.1", [(100, 1.6, 0.5)]), "slow")
    never = _folder(tmp_path, ppo + _run("DPO", "beta=0.1", [(10, 0.9, 0.5)]), "never")
    assert claims.cost_to_reach_row(fast)["verdict"] == HOLDS  # 160 s against 10 s
    assert claims.cost_to_reach_row(slow)["verdict"] == NOT_HERE  # against 100 s
    assert claims.cost_to_reach_row(never)["verdict"] == NOT_HERE  # far below PPO's best


def test_online_row_both_ways(tmp_path):
    off = _run("DPO", "beta=0.1", [(10, 1.4, 0.5)]) + _run("DPO", "beta=1", [(10, 1.3, 0.2)])

    def online(delta):
        return (_run("Online DPO", "beta=0.1", [(10, 1.4 + delta, 0.5)])
                + _run("Online DPO", "beta=1", [(10, 1.3 + delta, 0.2)]))  # fmt: skip

    assert claims.online_row(_folder(tmp_path, off + online(0.2), "up"))["verdict"] == HOLDS
    assert claims.online_row(_folder(tmp_path, off + online(-0.2), "down"))["verdict"] == NOT_HERE


def _limits(tmp_path, name, rows):
    f = _folder(tmp_path, [], name)
    full = {k: {"seeds": [{"oracle": o + j, "shaped": s + j} for j in JITTER], "oracle": o}
            for k, (o, s) in rows.items()}  # fmt: skip
    (f / "sweep" / "limits.json").write_text(json.dumps({"rows": full}))
    return f


BASE = {"SFT": (1.0, 0.5), "early SFT (weak reference)": (0.6, 0.2), "DPO": (1.5, 1.0),
        "DPO, weak reference": (1.45, 0.9), "PPO-GT": (1.7, 1.0), "GRPO on r*": (1.6, 1.0)}  # fmt: skip


def test_reference_row_both_ways(tmp_path):
    weak = _limits(tmp_path, "weak", {**BASE, "DPO, weak start": (0.8, 0.4)})
    same = _limits(tmp_path, "same", {**BASE, "DPO, weak start": (1.7, 1.2)})
    assert claims.reference_row(weak)["verdict"] == HOLDS
    assert claims.reference_row(same)["verdict"] == NOT_HERE


def test_shaping_row_both_ways_and_its_positive_control(tmp_path):
    def run(name, ppo_shaped, grpo_shaped, dpo_shaped):
        return _limits(tmp_path, name, {**BASE, "DPO, weak start": (0.8, 0.4),
                                        "PPO on r_shaped": (1.5, ppo_shaped),
                                        "GRPO on r_shaped": (1.5, grpo_shaped),
                                        "DPO, relabelled by r_shaped": (1.4, dpo_shaped)})  # fmt: skip

    assert claims.shaping_row(run("holds", 1.5, 1.4, 1.05))["verdict"] == HOLDS
    assert claims.shaping_row(run("no", 1.5, 1.4, 1.8))["verdict"] == NOT_HERE
    row = claims.shaping_row(run("control", 1.0, 1.0, 1.05))  # neither RL method gains
    assert row["verdict"] == INCONCLUSIVE


def test_grpo_row_both_ways(tmp_path, monkeypatch):
    pts = _run("PPO", "target=1", [(8, 1.5, 1.0)]) + _run("GRPO", "beta=0.1", [(8, 1.5, 1.0)])
    f = _folder(tmp_path, pts)
    # between DPO's and PPO's lines: DPO's core and one more function
    monkeypatch.setattr(claims, "GRPO_CORE", (*claims.DPO_CORE, grpo_math.k3_kl))
    assert claims.grpo_row(f)["verdict"] == HOLDS
    low = pts[:5] + _run("GRPO", "beta=0.1", [(8, 1.0, 1.0)])
    assert claims.grpo_row(_folder(tmp_path, low, "low"))["verdict"] == NOT_HERE
    monkeypatch.setattr(claims, "GRPO_CORE", claims.PPO_CORE + claims.DPO_CORE)  # not between
    assert claims.grpo_row(f)["verdict"] == NOT_HERE


def test_every_row_says_not_measured_on_an_empty_run(tmp_path):
    f = _folder(tmp_path, [])
    rows = [claims.sampling_row(f), claims.frontier_row(f), claims.beta_row(f),
            claims.displacement_row(f), claims.hacking_row(f), claims.cost_to_reach_row(f),
            claims.online_row(f), claims.reference_row(f), claims.shaping_row(f),
            claims.grpo_row(f)]  # fmt: skip
    assert {r["verdict"] for r in rows} == {NOT_YET}


def test_displacement_row_of_one_run_without_its_pair_count_is_not_measured(tmp_path):
    f = _folder(tmp_path, [])
    (f / "sweep" / "points.json").unlink()
    _metrics(f, "dpo-sigmoid-beta0.1", [{"step": 50, "eval/logps/chosen_rose": 0.42}])
    assert claims.displacement_row(f)["verdict"] == NOT_YET
