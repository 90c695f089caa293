"""The PPO trainer end to end on the tiny preset: metrics, checkpoints, resume, bad input."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from minidpo.checkpoints import load_checkpoint
from minidpo.errors import MinidpoError
from minidpo.model import GPT, GPTConfig, ScalarHeadModel
from minidpo.policy import load_policy
from minidpo.ppo import PPOConfig, run_ppo, tempered_logprobs
from minidpo.scoring import oracle_scores
from minidpo.training import Job, read_metrics

TRL_NAMES = (
    "objective/kl",
    "objective/scores",
    "objective/rlhf_reward",
    "policy/approxkl_avg",
    "policy/clipfrac_avg",
    "loss/policy_avg",
    "loss/value_avg",
    "val/explained_variance",
    "val/clipfrac_avg",
    "objective/oracle",
    "time/rollout",
    "time/scoring",
    "time/update",
)


@pytest.fixture(scope="module")
def sft_path(tiny_sft):
    """The session's tiny SFT checkpoint (tests/conftest.py)."""
    return tiny_sft


def tiny_cfg(**overrides) -> PPOConfig:
    cfg = PPOConfig(
        iterations=3, rollout_batch=8, minibatch_size=4, ppo_epochs=2, max_new_tokens=24,
        eval_every=3, eval_samples_per_prompt=1, ckpt_every=1, lr=1e-3, value_lr=1e-3,
    )  # fmt: skip
    return dataclasses.replace(cfg, **overrides)


def ppo(sft_path, out_dir, cfg=None, resume=False, stop_after=None, **kw):
    kw.setdefault("score_fn", oracle_scores)
    job = Job(out_dir, 0, "cpu", resume=resume, progress=False, stop_after=stop_after)
    return run_ppo(cfg or tiny_cfg(), job, sft_path=sft_path, **kw)


def without_time(rows):
    return [{k: v for k, v in r.items() if not k.startswith("time/")} for r in rows]


@pytest.fixture(scope="module")
def full_run(sft_path, tmp_path_factory):
    out = tmp_path_factory.mktemp("ppo") / "full"
    summary = ppo(sft_path, out)
    return out, summary


def test_run_writes_trl_metrics_and_a_loadable_policy(sft_path, full_run):
    out, summary = full_run
    rows = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in rows] == [0, 1, 2, 3]
    assert "eval/oracle" in rows[0] and "eval/oracle" in rows[-1]
    for r in rows[1:]:
        missing = [k for k in TRL_NAMES if k not in r]
        assert not missing, f"step {r['step']} lacks {missing}"
        assert r["objective/kl_coef"] == 0.05  # fixed controller by default
        assert 0.0 <= r["policy/clipfrac_avg"] <= 1.0
    # Step 1 samples from pi_ref itself: the rollout KL is exactly 0.
    assert rows[1]["objective/kl"] == pytest.approx(0.0, abs=1e-5)
    ckpt = load_checkpoint(out / "checkpoint.pt", kind="policy")
    assert ckpt["stage"] == "ppo" and ckpt["done"] and ckpt["step"] == 3
    for key in ("model_config", "tokenizer", "model", "optimizer", "stage_config"):
        assert key in ckpt
    policy, _ = load_policy(out / "checkpoint.pt")
    sft, _ = load_policy(sft_path)
    moved = max(
        float((a - b).abs().max())
        for a, b in zip(policy.state_dict().values(), sft.state_dict().values(), strict=True)
    )
    assert moved > 1e-4, "PPO did not change the policy"
    assert json.loads((out / "summary.json").read_text())["done_iterations"] == 3
    assert summary["eval_kl_start"] == pytest.approx(0.0, abs=1e-5)


def test_same_seed_same_metrics(sft_path, full_run, tmp_path):
    out, _ = full_run
    ppo(sft_path, tmp_path / "again")
    a = without_time(read_metrics(out / "metrics.jsonl"))
    b = without_time(read_metrics(tmp_path / "again" / "metrics.jsonl"))
    assert a == b  # bit-identical floats on CPU


def test_resume_after_stop_equals_uninterrupted(sft_path, full_run, tmp_path):
    out, _ = full_run
    cut = tmp_path / "cut"
    ppo(sft_path, cut, cfg=tiny_cfg(ckpt_every=10), stop_after=1)
    stopped = load_checkpoint(cut / "checkpoint.pt")
    assert stopped["step"] == 1 and not stopped["done"]
    ppo(sft_path, cut, cfg=tiny_cfg(ckpt_every=10), resume=True)  # on from iteration 1
    full = load_checkpoint(out / "checkpoint.pt")
    resumed = load_checkpoint(cut / "checkpoint.pt")
    for part in ("model", "value_model"):
        for k in full[part]:
            torch.testing.assert_close(
                resumed[part][k], full[part][k], atol=0, rtol=0, msg=f"{part} {k}"
            )
    assert without_time(read_metrics(cut / "metrics.jsonl")) == without_time(
        read_metrics(out / "metrics.jsonl")
    )


def test_resuming_a_finished_run_only_rebuilds_its_summary(sft_path, full_run, tmp_path):
    _, summary = full_run
    done = tmp_path / "done"
    ppo(sft_path, done)
    (done / "summary.json").unlink()
    again = ppo(sft_path, done, resume=True)  # killed after the last checkpoint: no step left
    assert again["done_iterations"] == 3 and (done / "summary.json").exists()
    for key in ("eval_oracle", "eval_kl", "rollout_oracle", "rollout_scores", "tokens_forward"):
        assert again[key] == summary[key], key


@pytest.mark.parametrize("kl_coef", [0.0, -0.1])
def test_nonpositive_kl_coef_is_refused(sft_path, tmp_path, kl_coef):
    with pytest.raises(MinidpoError, match="--kl-coef"):
        ppo(sft_path, tmp_path / "bad", cfg=tiny_cfg(kl_coef=kl_coef))
    assert not (tmp_path / "bad").exists()


def test_bad_config_and_bad_score_fn(sft_path, tmp_path):
    with pytest.raises(MinidpoError, match="--minibatch-size"):
        ppo(sft_path, tmp_path / "a", cfg=tiny_cfg(minibatch_size=16))
    with pytest.raises(ValueError, match="score_fn returned shape"):
        ppo(sft_path, tmp_path / "b", score_fn=lambda s: torch.zeros(len(s) + 1))


def test_missing_eot_penalty_and_adaptive_kl(sft_path, tmp_path):
    """A zero score_fn: the scores are exactly -penalty on the responses that never end."""
    cfg = tiny_cfg(
        iterations=2, max_new_tokens=3, missing_eot_penalty=0.5, adaptive_kl=True,
        kl_target=1.0, kl_horizon=16,
    )  # fmt: skip
    ppo(sft_path, tmp_path / "z", cfg=cfg, score_fn=lambda s: torch.zeros(len(s)))
    rows = read_metrics(tmp_path / "z" / "metrics.jsonl")[1:]
    for r in rows:
        assert r["objective/unterminated"] > 0.5  # 3 tokens rarely finish an answer
        assert r["objective/scores"] == pytest.approx(-0.5 * r["objective/unterminated"], abs=1e-6)
    # Adaptive KL: the first rollout has KL 0, 100% under target, error clipped to -0.2:
    # beta *= 1 - 0.2 * 8 / 16.
    assert rows[1]["objective/kl_coef"] == pytest.approx(0.05 * 0.9, rel=1e-9)


def test_ppo_gt_optimises_exactly_the_oracle_reward(full_run):
    """PPO-GT's score is r* itself: the oracle charges an unterminated response its own -1,
    so no penalty is added on top (it used to be, for -2 in all). 1e-6: float32 means."""
    out, _ = full_run
    assert PPOConfig().missing_eot_penalty == 0.0
    rows = read_metrics(out / "metrics.jsonl")[1:]
    assert any(r["objective/unterminated"] > 0 for r in rows), "no unterminated response: no test"
    for r in rows:
        assert abs(r["objective/scores"] - r["objective/oracle"]) <= 1e-6, (
            f"step {r['step']}: scores {r['objective/scores']} vs oracle {r['objective/oracle']}"
        )


@pytest.mark.parametrize("prefix", ["", "ppo-"])
def test_missing_eot_penalty_is_refused_with_the_oracle(sft_path, tmp_path, prefix):
    cfg = tiny_cfg(missing_eot_penalty=1.0)
    with pytest.raises(MinidpoError, match=f"^--{prefix}missing-eot-penalty: must be 0"):
        ppo(sft_path, tmp_path / "gt", cfg=cfg, flag_prefix=prefix)
    assert not (tmp_path / "gt").exists()  # refused before anything is written
    cfg.validate(prefix)  # a learned reward model may take it
    with pytest.raises(MinidpoError, match=f"--{prefix}missing-eot-penalty"):
        cfg.validate(prefix, oracle=True)


def test_value_init_from_a_reward_model_state_dict(sft_path, tmp_path):
    policy, _ = load_policy(sft_path)
    rm = ScalarHeadModel(GPT(policy.config), generator=torch.Generator().manual_seed(1))
    cfg = tiny_cfg(iterations=1, eval_every=1)
    ppo(sft_path, tmp_path / "rm", cfg=cfg, value_init=rm.state_dict())
    ckpt = load_checkpoint(tmp_path / "rm" / "checkpoint.pt")
    assert ckpt["stage_config"]["value_init_sha256"] is not None
    other = ScalarHeadModel(GPT(GPTConfig(**{**policy.config.to_dict(), "n_embd": 16})))
    with pytest.raises(MinidpoError, match="value_init"):
        ppo(sft_path, tmp_path / "bad", cfg=cfg, value_init=other.state_dict())


def test_tempered_logprobs_known_answer():
    """log-probs at temperature T are log_softmax(logits / T) of the label ids."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=11, block_size=8, n_layer=1, n_head=1, n_embd=8))
    ids = torch.tensor([[1, 2, 3, 4]])
    labels = torch.tensor([[2, 3, 4, -1]])
    with torch.no_grad():
        logp, entropy = tempered_logprobs(model, ids, labels, temperature=2.0)
        full = torch.log_softmax(model(ids).double() / 2.0, dim=-1)[0]  # (T, V)
    want = torch.stack([full[t, labels[0, t]] for t in range(3)]).float()
    torch.testing.assert_close(logp[0, :3], want, atol=1e-6, rtol=0)
    assert float(logp[0, 3]) == 0.0  # padding label
    torch.testing.assert_close(entropy[0], -(full.exp() * full).sum(-1).float(), atol=1e-5, rtol=0)
