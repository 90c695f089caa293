"""The GRPO trainer on the tiny preset: metrics, exact r* with the oracle, resume, the CLI."""

import pytest
import torch

from minidpo.checkpoints import content_sha256, load_checkpoint
from minidpo.cli import main
from minidpo.config import resolve
from minidpo.grpo import GRPOConfig, run_grpo
from minidpo.scoring import oracle_scores
from minidpo.training import Job, read_metrics


def _cfg(**kw) -> GRPOConfig:
    cfg = resolve(GRPOConfig, "grpo", "tiny", None)
    for k, v in kw.items():
        setattr(cfg, k, v)
    return cfg


def _run(tiny_sft, out, **kw):
    job = Job(out, 0, "cpu", progress=False,
              **{k: kw.pop(k) for k in ("stop_after", "resume") if k in kw})  # fmt: skip
    return run_grpo(_cfg(**kw), job, sft_path=tiny_sft, score_fn=oracle_scores)


def test_metrics_and_the_oracle_scores_exactly(tiny_sft, tmp_path) -> None:
    s = _run(tiny_sft, tmp_path / "a")
    rows = read_metrics(tmp_path / "a" / "metrics.jsonl")
    train = [r for r in rows if "objective/scores" in r]
    assert len(train) == 3 and "eval/oracle" in rows[0] and "eval/oracle" in rows[-1]
    for r in train:
        assert r["objective/scores"] == r["objective/oracle"]  # r* itself, no penalty on top
        assert r["objective/k3"] >= 0 and r["objective/group_std"] >= 0
        assert r["tokens/sampled"] > 0 and r["tokens/backward"] > 0
    assert s["tokens_sampled"] == sum(r["tokens/sampled"] for r in train)
    assert load_checkpoint(tmp_path / "a" / "checkpoint.pt", kind="policy")["done"]


def test_a_flat_group_teaches_nothing_and_a_varied_one_moves_the_policy(tiny_sft, tmp_path):
    """At the start pi = pi_ref, so k3 and its gradient are 0: with every group's rewards
    equal (the tiny model's samples all score -2) the update is exactly zero; with larger
    groups some rewards differ and the policy moves, differently under Dr. GRPO."""
    before = load_checkpoint(tiny_sft)["model"]["lm_head.weight"]

    def head(name: str, **kw) -> torch.Tensor:
        _run(tiny_sft, tmp_path / name, iterations=1, **kw)
        (row,) = [
            r for r in read_metrics(tmp_path / name / "metrics.jsonl") if "objective/group_std" in r
        ]
        return row["objective/group_std"], load_checkpoint(tmp_path / name / "checkpoint.pt")[
            "model"
        ]["lm_head.weight"]

    std, flat = head("flat")
    assert std == 0.0 and torch.equal(flat, before)
    big = {"prompts_per_iteration": 4, "group_size": 8, "minibatch_size": 8}
    std, grpo = head("grpo", **big)
    _, dr = head("dr", **big, scale_std=False, loss_norm="constant")
    assert std > 0 and not torch.equal(grpo, before) and not torch.equal(grpo, dr)


def test_resume_after_stop_equals_uninterrupted(tiny_sft, tmp_path) -> None:
    _run(tiny_sft, tmp_path / "full")
    _run(tiny_sft, tmp_path / "cut", stop_after=2)
    assert load_checkpoint(tmp_path / "cut" / "checkpoint.pt")["step"] == 2
    _run(tiny_sft, tmp_path / "cut", resume=True)
    full, cut = (tmp_path / d / "checkpoint.pt" for d in ("full", "cut"))
    assert content_sha256([full]) == content_sha256([cut])


def test_the_command_trains_against_the_oracle(tiny_sft, tmp_path, capsys) -> None:
    argv = ["grpo", "--preset", "tiny", "--runs-dir", str(tmp_path), "--reward", "oracle",
            "--sft", str(tiny_sft)]  # fmt: skip
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "grpo-oracle-beta0.04/checkpoint.pt" in out and "held-out oracle reward" in out
    assert main(argv) == 0  # a second time: up to date
    assert "up to date" in capsys.readouterr().out


@pytest.mark.parametrize(
    "flags, message",
    [(["--group-size", "1"], "--group-size: must be >= 2"),
     (["--loss-norm", "token"], "--loss-norm: one of sequence, constant"),
     (["--beta", "nan"], "--beta: must be finite"),
     (["--minibatch-size", "64"], "--minibatch-size 64 exceeds the rollout batch")],
)  # fmt: skip
def test_bad_settings_are_one_line_before_anything(tmp_path, capsys, flags, message) -> None:
    assert main(["grpo", "--preset", "tiny", "--runs-dir", str(tmp_path), *flags]) == 2
    err = [x for x in capsys.readouterr().err.splitlines() if x.strip()]
    assert len(err) == 1 and message in err[0], err
    assert not any(tmp_path.iterdir())
