"""The one-command pipeline: stages skip when done, --force reruns one, a changed setting
reruns what depends on it, an interrupted run resumes to the same numbers; and the pure
pieces of the report (Pareto frontier, matched-KL gaps, Best-of-N's closed-form KL)."""

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from minidpo.baselines import best_of_n_curve, best_of_n_kl
from minidpo.claims import code_lines, ledger
from minidpo.cli import _context, build_parser, main
from minidpo.comparison import outside_pairs_share
from minidpo.errors import MinidpoError
from minidpo.pipeline import METHODS, STAGE_NAMES, run_pipeline
from minidpo.report import (
    _color,
    compare,
    comparison_text,
    conclusion,
    cost_table,
    displacement_table,
    frontier_lines,
    frontier_table,
    rising_hull,
    separation,
    smooth,
    training_rule_lines,
)
from minidpo.sampling import Sample
from minidpo.stats import HOLDS, INCONCLUSIVE, NOT_HERE, NOT_YET, UNDECIDED


def ctx_for(root: Path, name: str, *extra: str):
    args = build_parser().parse_args(
        ["pipeline", "--preset", "tiny", "--runs-dir", str(root), "--name", name,
         "--device", "cpu", *extra]
    )  # fmt: skip
    ctx = _context(args)
    ctx.progress = False
    ctx.log = lambda msg: ctx.lines.append(msg)
    ctx.lines = []
    return ctx


def finals(folder: Path) -> dict:
    return json.loads((folder / "eval" / "results.json").read_text())["final"]


@pytest.fixture(scope="module")
def done(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipe")
    ctx = ctx_for(root, "full")
    run_pipeline(ctx)
    return root, ctx


@pytest.mark.slow
def test_every_stage_ran_and_wrote_its_outputs(done):
    _, ctx = done
    assert [line.split("]")[0][1:] for line in ctx.lines if "done in" in line] == STAGE_NAMES
    f = ctx.folder
    for name in STAGE_NAMES:
        stamp = json.loads((f / "stages" / f"{name}.json").read_text())
        assert stamp["cost"]["wall_s"] > 0 and len(stamp["outputs_sha256"]) == 64
    assert {p.name for p in (f / "plots").glob("*.png")} == {
        "frontier.png", "dpo_curves.png", "ppo_curves.png", "win_rates.png",
        "reward_distributions.png",
    }  # fmt: skip
    report = (f / "report.md").read_text()
    for needle in ("## Conclusion", "## Claims ledger", "| DPO |", "| PPO |", "Explain gravity",
                   "frontier.png"):  # fmt: skip
        assert needle in report, needle
    methods = set(finals(f))
    assert {"SFT", "DPO", "DPO+NLL", "DPOP", "PPO", "PPO-GT", "Preferred-FT", "Unlikelihood",
            "Online DPO", "GRPO", "Best-of-4"} == methods  # fmt: skip
    rows = ledger(f)
    assert len(rows) >= 16 and {r["verdict"] for r in rows} <= set(VERDICTS)
    assert all(r["threshold"] for r in rows if r["verdict"] != NOT_YET)
    final = json.loads((f / "eval" / "results.json").read_text())
    assert all(0 <= r["outside_pairs"] <= 1 for m, r in final["final"].items()
               if not m.startswith("Best-of-"))  # fmt: skip
    curve = [p for p in final["frontier"] if p["method"] == "Best-of-N"]
    assert [p["setting"] for p in curve] == ["N=2", "N=4"]
    assert curve[-1]["reward"] == pytest.approx(final["final"]["Best-of-4"]["reward_mean"])
    rows = {r["method"]: r for r in cost_table(f)}
    assert set(rows) == methods - {"SFT"}
    assert all(r["tokens_forward"] > 0 and r["wall_s"] > 0 for r in rows.values())
    rm = json.loads((f / "stages" / "rm.json").read_text())["summary"]
    # Best-of-N trains nothing itself: its backward tokens are the reward model's
    assert rows["Best-of-4"]["tokens_backward"] == rm["tokens_backward"] > 0
    assert rows["DPO"]["tokens_backward"] > 0


@pytest.mark.slow
def test_demo_runs_dpo_and_ppo_only_to_the_full_pipelines_numbers(done, tmp_path):
    """`minidpo demo` (`--methods dpo,ppo`) trains and evaluates DPO and RLHF only, and
    each to the numbers the full pipeline gives it (same seed, same numbers)."""
    _, full = done
    args = build_parser().parse_args(["demo", "--preset", "tiny", "--runs-dir", str(tmp_path),
                                      "--name", "full", "--device", "cpu"])  # fmt: skip
    ctx = _context(args)
    ctx.progress, ctx.lines = False, []
    ctx.log = ctx.lines.append
    run_pipeline(ctx)
    ran = [line.split("]")[0][1:] for line in ctx.lines if "done in" in line]
    assert ran == ["tokenizer", "sft", "prefs", "ref_logps", "rm", "dpo", "ppo", "eval", "plots",
                   "report"]  # fmt: skip
    demo, every = finals(ctx.folder), finals(full.folder)
    assert set(demo) == {"SFT", "DPO", "PPO"}
    for method in demo:
        assert demo[method] == every[method], method
    assert "| DPO |" in (ctx.folder / "report.md").read_text()


def test_methods_flag_refuses_unknown_names_and_a_partial_sweep(tmp_path, capsys):
    base = ["--preset", "tiny", "--runs-dir", str(tmp_path), "--name", "x"]
    assert main(["pipeline", *base, "--methods", "dpo,nope"]) == 2
    assert "--methods: unknown method 'nope'" in capsys.readouterr().err
    assert main(["sweep", *base, "--methods", "dpo,ppo"]) == 2
    assert "--methods: the sweep compares every method" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
    assert build_parser().parse_args(["demo"]).methods == "dpo,ppo"
    assert build_parser().parse_args(["pipeline"]).methods is None  # the default: all


@pytest.mark.slow
def test_rerun_skips_everything_and_force_reruns_one(done):
    root, _ = done
    again = ctx_for(root, "full")
    run_pipeline(again)
    assert all("up to date" in line for line in again.lines), again.lines
    forced = ctx_for(root, "full", "--force", "preferred_ft")
    run_pipeline(forced)
    ran = [line.split("]")[0][1:] for line in forced.lines if "running" in line]
    # its outputs are bit-identical (same seed), so what reads them stays up to date
    assert ran == ["preferred_ft"], ran


@pytest.mark.slow
def test_changed_setting_reruns_only_what_depends_on_it(done, tmp_path):
    root, _ = done
    shutil.copytree(root / "full", tmp_path / "full")  # leave the shared run as it is
    ctx = ctx_for(tmp_path, "full", "--best-of-n", "3")
    run_pipeline(ctx)
    ran = [line.split("]")[0][1:] for line in ctx.lines if "running" in line]
    assert ran == ["best_of_n", "eval", "plots", "report"], ran
    assert "Best-of-3" in finals(ctx.folder)


@pytest.mark.slow
def test_killed_run_resumes_to_the_same_numbers(done, tmp_path):
    """Kill the pipeline twice at different points (SIGINT, then SIGKILL), rerun the same
    command, and compare the final evaluation with the uninterrupted run's."""
    _, ctx = done
    cmd = [sys.executable, "-m", "minidpo", "pipeline", "--preset", "tiny",
           "--runs-dir", str(tmp_path), "--name", "cut", "--device", "cpu"]  # fmt: skip
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    stages = tmp_path / "cut" / "stages"
    for sig, after in ((signal.SIGINT, "sft.json"), (signal.SIGKILL, "rm.json")):
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        t0 = time.time()
        while not (stages / after).exists() and time.time() - t0 < 300 and proc.poll() is None:
            time.sleep(0.05)
        time.sleep(0.7)  # into the next stage
        proc.send_signal(sig)
        proc.wait(timeout=120)
        assert proc.returncode != 0, "the run finished before it could be interrupted"
    assert not (tmp_path / "cut" / "report.md").exists()
    assert subprocess.run(cmd, env=env, capture_output=True).returncode == 0
    a, b = finals(ctx.folder), finals(tmp_path / "cut")
    assert a.keys() == b.keys()
    for m in a:
        for k in ("reward_mean", "kl_mean", "win_rate_vs_ref", "unparseable_rate"):
            assert a[m][k] == pytest.approx(b[m][k], abs=1e-9), (m, k)


def test_unknown_force_stage_is_one_line_exit_2(tmp_path, capsys):
    code = main(["pipeline", "--preset", "tiny", "--runs-dir", str(tmp_path), "--force", "nope"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "--force: unknown stage 'nope'" in err[0]


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--sweep-dpo-betas", "0.1,abc"], "--sweep-dpo-betas: expected positive numbers"),
        (["--sweep-ppo-kl-targets", "0.1,-1"], "--sweep-ppo-kl-targets: expected positive numbers"),
        (["--sweep-unlikelihood-alphas", "0.5,2"], "--sweep-unlikelihood-alphas: each alpha"),
        (["--sweep-dpo-betas", ""], "--sweep-dpo-betas: expected positive numbers"),
        (["--nll-remedy-alpha", "-1"], "--nll-remedy-alpha: must be > 0"),
        (["--dpop-remedy-lambda", "inf"], "--dpop-remedy-lambda: must be > 0"),
        (["--seeds", "0"], "--seeds: the sweep needs at least 2"),
        (["--ppo-gt-kl-coef", "0"], "--ppo-gt-kl-coef: must be > 0"),
        (["--ppo-kl-coef", "-1"], "--ppo-kl-coef: must be > 0"),
    ],
)
def test_bad_pipeline_setting_is_one_line_exit_2_before_any_work(tmp_path, capsys, flags, message):
    code = main(["sweep", "--preset", "tiny", "--runs-dir", str(tmp_path), *flags])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and message in err[0], err
    assert not any(tmp_path.iterdir()), "nothing may be written"


def test_the_drawn_frontier_is_the_rising_part_of_the_hull():
    pts = [{"kl": k, "reward": r} for k, r in [(0.5, 0.0), (1, 0.5), (2, 0.3), (3, 0.9), (4, 0.8)]]
    assert [(p["kl"], p["reward"]) for p in rising_hull(pts)] == [(0.5, 0.0), (1, 0.5), (3, 0.9)]


def test_the_report_compares_only_where_both_methods_have_points(tmp_path):
    """SFT is no stand-in: DPO up to KL 0.5 and PPO from 0.8 have no KL in common, so the
    conclusion says the run cannot decide; with a PPO point at 0.3 they overlap on
    0.3-0.5, and DPO is above there."""
    pts = [
        {"method": "SFT", "kl": 0.0, "reward": 0.0, "reward_se": 0.01, "step": 0, "seed": 0},
        {"method": "DPO", "kl": 0.2, "reward": 0.6, "reward_se": 0.01, "step": 1, "seed": 0},
        {"method": "DPO", "kl": 0.5, "reward": 0.9, "reward_se": 0.01, "step": 2, "seed": 0},
        {"method": "PPO", "kl": 0.8, "reward": 0.5, "reward_se": 0.01, "step": 1, "seed": 0},
        {"method": "PPO", "kl": 4.0, "reward": 1.0, "reward_se": 0.01, "step": 2, "seed": 0},
    ]
    final = {m: {"reward_mean": 0.5, "reward_se": 0.01} for m in ("SFT", "DPO", "PPO")}
    (tmp_path / "eval").mkdir()

    def write(points):
        (tmp_path / "eval" / "results.json").write_text(json.dumps({"frontier": points,
                                                                    "final": final}))  # fmt: skip

    write(pts)
    assert compare(tmp_path).overlap is None
    assert "cannot decide" in conclusion(tmp_path)
    write([*pts, {"method": "PPO", "kl": 0.3, "reward": 0.1, "reward_se": 0.01, "step": 0,
                  "seed": 0}])  # fmt: skip
    m = compare(tmp_path)
    assert m.overlap == pytest.approx((0.3, 0.5))
    assert "DPO's frontier is above PPO's" in comparison_text(m)


def test_frontier_table_keeps_each_runs_last_and_best_snapshot(tmp_path):
    pts = [
        {"method": "SFT", "setting": "", "kl": 0.0, "kl_se": 0.0, "reward": 0.0,
         "reward_se": 0.1, "step": 0},
        {"method": "DPO", "setting": "beta=0.1", "kl": 0.2, "kl_se": 0.01, "reward": 0.6,
         "reward_se": 0.05, "step": 10},
        {"method": "DPO", "setting": "beta=0.1", "kl": 0.4, "kl_se": 0.02, "reward": 0.5,
         "reward_se": 0.04, "step": 20},
        {"method": "DPO", "setting": "beta=1", "kl": 0.1, "kl_se": 0.0, "reward": 0.3,
         "reward_se": 0.03, "step": 20},
    ]  # fmt: skip
    (tmp_path / "eval").mkdir()
    (tmp_path / "eval" / "results.json").write_text(json.dumps({"frontier": pts}))
    rows = {(r["method"], r["setting"]): r for r in frontier_table(tmp_path)}
    assert set(rows) == {("SFT", ""), ("DPO", "beta=0.1"), ("DPO", "beta=1")}
    r = rows[("DPO", "beta=0.1")]
    assert (r["reward"], r["kl"], r["best_reward"]) == (0.5, 0.4, 0.6)  # last is step 20
    assert rows[("DPO", "beta=1")]["best_reward"] == 0.3


def test_sweep_points_carry_both_standard_errors_and_the_target_is_counted(tmp_path):
    """Three seeds of one run: se over seeds from the seeds' means, sampling se =
    sqrt(sum se_s^2) / 3 from their own; the report line counts both against 0.05."""
    seeds = [(1.0, 0.06), (1.3, 0.06), (1.6, 0.06)]  # (reward, its sampling se) per seed
    raw = [{"method": "PPO", "setting": "target=2", "step": 40, "seed": s, "reward": r,
            "reward_se": se, "kl": 1.0, "kl_se": 0.1, "elapsed_s": 1.0}
           for s, (r, se) in enumerate(seeds)]  # fmt: skip
    (tmp_path / "sweep").mkdir()
    (tmp_path / "sweep" / "points.json").write_text(json.dumps({"points": raw}))
    (row,) = frontier_table(tmp_path)
    assert row["reward_se"] == pytest.approx(np.std([1.0, 1.3, 1.6], ddof=1) / np.sqrt(3))
    assert row["sampling_se"] == pytest.approx(np.sqrt(3 * 0.06**2) / 3)  # 0.0346
    line = frontier_lines(tmp_path)[-1]
    assert line.startswith("Sampling se ≤ 0.05 for 1 of 1 last snapshots;")
    assert "the se over seeds ≤ 0.05 for 0 of 1 (above it: PPO target=2 0.173)." in line


@pytest.mark.parametrize("n", [1, 2, 4, 16])
def test_best_of_n_kl_closed_form_matches_exact_discrete_computation(n):
    """Over M equally likely outcomes with distinct scores, best-of-n picks rank i with
    probability ((i+1)^n - i^n) / M^n; its KL to uniform tends to log n - (n-1)/n."""
    M = 200_000
    i = np.arange(M, dtype=np.float64)
    p = ((i + 1) ** n - i**n) / float(M) ** n
    kl = float(np.sum(p * np.log(np.maximum(p, 1e-300) * M)))
    assert kl == pytest.approx(best_of_n_kl(n), abs=1e-3)
    assert best_of_n_kl(2) == pytest.approx(math.log(2) - 0.5)


def test_smooth_is_a_trailing_mean():
    assert smooth([1, 2, 3, 4, 5, 6], window=3).tolist() == pytest.approx([1, 1.5, 2, 3, 4, 5])


VERDICTS = (HOLDS, NOT_HERE, UNDECIDED, INCONCLUSIVE, NOT_YET)


def _counted(x):
    """A docstring, a comment and a blank line: none of them count."""
    # a comment

    return x + 1


def test_code_lines_counts_code_only():
    assert code_lines([_counted]) == 2  # the def line and the return


def test_best_of_n_curve_keeps_the_best_of_each_group():
    scores = torch.tensor([0.0, 1.0, 5.0, 2.0, 0.0, 0.0, 3.0, 9.0])  # 2 prompts x 4
    oracle = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0])
    curve = {c["n"]: c for c in best_of_n_curve(scores, oracle, 4, [1, 2, 4])}
    assert curve[1]["reward"] == pytest.approx(4.5) and curve[1]["selections"] == 8
    # N=2: groups (0,1)->2, (5,2)->3, (0,0)->5 (first maximum), (3,9)->8
    assert curve[2]["reward"] == pytest.approx((2 + 3 + 5 + 8) / 4)
    assert curve[4]["reward"] == pytest.approx((3 + 8) / 2) and curve[4]["selections"] == 2
    assert curve[4]["kl"] == pytest.approx(math.log(4) - 3 / 4)
    with pytest.raises(MinidpoError):
        best_of_n_curve(scores, oracle, 4, [3])


def test_outside_pairs_share_counts_responses_no_pair_holds(tmp_path):
    pairs = tmp_path / "pairs.jsonl"
    rows = [{"prompt": "p", "chosen": "a", "rejected": "b"}, {"prompt": "q", "chosen": "c",
             "rejected": "a"}]  # fmt: skip
    pairs.write_text("".join(json.dumps(r) + "\n" for r in rows))
    samples = [Sample("p", "a", [], True), Sample("p", "c", [], True), Sample("q", "a", [], True),
               Sample("q", "z", [], True)]  # fmt: skip
    assert outside_pairs_share(samples, pairs) == pytest.approx(0.5)  # "c" for p, "z" for q
    assert outside_pairs_share(samples, tmp_path / "none.jsonl") is None


def test_displacement_table_averages_the_last_held_out_evaluation(tmp_path):
    (tmp_path / "prefs").mkdir()
    torch.save({"key": "k", "chosen": torch.tensor([-6.0, -8.0]),
                "rejected": torch.tensor([-9.0, -11.0])}, tmp_path / "prefs" / "eval.ref-k.pt")  # fmt: skip
    for seed, (chosen, rose) in enumerate([(-7.5, 0.25), (-6.5, 0.75)]):
        run = tmp_path / "sweep" / f"seed{seed}" / "dpo-beta0.1"
        run.mkdir(parents=True)
        rows = [{"step": 50, "eval/logps/chosen": 0.0, "eval/logps/rejected": 0.0,
                 "eval/logps/chosen_rose": 1.0, "eval/logps/rejected_rose": 1.0,
                 "eval/rewards/accuracies": 1.0},
                {"step": 100, "eval/logps/chosen": chosen, "eval/logps/rejected": -12.0,
                 "eval/logps/chosen_rose": rose, "eval/logps/rejected_rose": 0.0,
                 "eval/rewards/accuracies": 0.5}]  # fmt: skip
        (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (row,) = displacement_table(tmp_path)
    assert row["run"] == "dpo-beta0.1" and row["seeds"] == 2
    assert row["chosen_change"] == pytest.approx(-7.0 - (-7.0))  # the last rows only
    assert row["rejected_change"] == pytest.approx(-12.0 - (-10.0))
    assert (row["chosen_rose"], row["rejected_rose"]) == pytest.approx((0.5, 0.0))


@pytest.mark.slow
def test_tiny_sweep_runs_every_method_and_the_limits_and_keeps_its_timing(tmp_path):
    """The whole sweep at the tiny preset: every method's runs, the limits experiments of
    each seed, their table, the ledger's four rows measured; a rerun skips every stage and
    reports the same cost (the timing comes from the stamps and the evaluation caches)."""
    args = ["sweep", "--preset", "tiny", "--runs-dir", str(tmp_path), "--name", "s"]
    assert main(args) == 0
    folder = tmp_path / "s"
    limits = json.loads((folder / "sweep" / "limits.json").read_text())
    assert limits["seeds"] == [0, 1]
    want = {"SFT", "early SFT (weak reference)", "DPO", "DPO, weak start", "DPO, weak reference",
            "DPO, relabelled by r_shaped", "PPO-GT", "PPO on r_shaped", "GRPO on r*",
            "GRPO on r_shaped"}  # fmt: skip
    assert set(limits["rows"]) == want
    for row in limits["rows"].values():
        assert (
            len(row["seeds"]) == 2
            and math.isfinite(row["oracle"])
            and row["shaped"] <= (row["oracle"] + 1e-12)
        )  # the shaping term is a penalty
    report = (folder / "report.md").read_text()
    section = report.split("## The reference's role and reward shaping")[1].split("\n## ")[0]
    assert all(f"| {name} | " in section for name in want), section
    methods = {
        p["method"] for p in json.loads((folder / "sweep" / "points.json").read_text())["points"]
    }
    assert {"Online DPO", "GRPO"} <= methods
    rows = {r["claim"]: r for r in ledger(folder)}
    for claim in ("Offline only (limitation 1)", "Depends on the reference model (limitation 2)",
                  "No reward shaping (limitation 3)", "GRPO: a middle ground between PPO and DPO"):  # fmt: skip
        assert rows[claim]["verdict"] in (HOLDS, NOT_HERE, UNDECIDED, INCONCLUSIVE), rows[claim]
    timing = json.loads((folder / "sweep" / "timing.json").read_text())
    assert timing["wall_s"] == pytest.approx(sum(timing["stages"].values()))
    assert main([*args, "--force", "report"]) == 0
    again = json.loads((folder / "sweep" / "timing.json").read_text())
    stages = {k: v for k, v in again["stages"].items() if k not in ("report", "plots_report")}
    assert stages == {k: v for k, v in timing["stages"].items() if k in stages}
    assert again["stages"]["sweep_eval"] == timing["stages"]["sweep_eval"]


def test_every_method_has_its_own_colour_on_the_plots():
    names = ["SFT", *(m.name for m in METHODS), "Best-of-N"]
    assert len({_color(n) for n in names}) == len(names)


def test_separation_finds_where_two_settings_part():
    def pt(setting, step, reward, seed=0):
        return {"method": "PPO", "setting": setting, "step": step, "seed": seed,
                "reward": reward, "kl": reward / 2}  # fmt: skip

    same = [pt(t, s, 1.0 + s / 10) for t in ("target=1", "target=4") for s in (1, 2, 4)]
    assert separation(same, "PPO") == [("target=1", "target=4", None)]
    apart = [*same[:3], pt("target=4", 1, 1.1), pt("target=4", 2, 1.2), pt("target=4", 4, 9.0)]
    assert separation(apart, "PPO") == [("target=1", "target=4", 4)]


def test_training_rule_lines_say_which_seeds_converged(tmp_path):
    for seed, (steps, conv) in enumerate([(300, 300), (1000, None)]):
        run = tmp_path / "sweep" / f"seed{seed}" / "dpo-beta0.1"
        run.mkdir(parents=True)
        (run / "summary.json").write_text(json.dumps({"steps_done": steps, "converged_step": conv}))
    (tmp_path / "sweep" / "points.json").write_text(json.dumps({"points": []}))
    lines = training_rule_lines(tmp_path)
    assert any("dpo-beta0.1: stopped at steps 300, 1000" in x and "ended 1 of 2 seeds, the "
               "step cap 1" in x for x in lines), lines  # fmt: skip
