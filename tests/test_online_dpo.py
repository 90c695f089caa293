"""Online DPO: the labelling budget split over rounds, each round's pairs from the current
policy, the end of each round a frontier snapshot, and a run stopped after a round resuming
to the weights of an uninterrupted one."""

import json
import shutil

import pytest
import torch

from minidpo.checkpoints import file_sha256, load_checkpoint, snapshots
from minidpo.config import DPOConfig, PrefsConfig, resolve
from minidpo.errors import MinidpoError
from minidpo.online_dpo import OnlineDPOConfig, round_budgets, run_online_dpo
from minidpo.preferences import build_preferences, load_pairs
from minidpo.training import Job, read_metrics


def test_round_budgets_split_the_pairs_evenly():
    assert round_budgets(10, 3) == [4, 3, 3]
    assert round_budgets(1280, 4) == [320] * 4
    assert sum(round_budgets(7, 7)) == 7


@pytest.mark.parametrize("over, flag", [({"rounds": 0}, "--rounds"),
                                        ({"responses_per_prompt": 1}, "--responses-per-prompt"),
                                        ({"pairs": -1}, "--pairs"),
                                        ({"reference": "final"}, "--reference"),
                                        ({"temperature": 0.0}, "--temperature")])  # fmt: skip
def test_bad_settings_name_the_flag(over, flag):
    with pytest.raises(MinidpoError, match=flag):
        OnlineDPOConfig(**over).validate()


@pytest.fixture(scope="module")
def offline(tiny_sft, tmp_path_factory):
    out = tmp_path_factory.mktemp("prefs")
    build_preferences(sft_path=tiny_sft, out_dir=out, cfg=resolve(PrefsConfig, "prefs", "tiny", None),
                      seed=0, device="cpu")  # fmt: skip
    return out / "train.jsonl", out / "eval.jsonl"


def _run(tiny_sft, offline, out, resume=False, **over):
    cfg = OnlineDPOConfig(**{"rounds": 2, "responses_per_prompt": 3, "max_new_tokens": 48,
                             "train_steps": 10, **over})  # fmt: skip
    dpo_cfg = resolve(DPOConfig, "dpo", "tiny", None)
    return run_online_dpo(cfg, dpo_cfg, Job(out, 0, "cpu", resume, False), sft_path=tiny_sft,
                          offline_pairs=offline[0], eval_pairs=offline[1], tau=1.0)  # fmt: skip


def test_rounds_label_at_most_the_offline_budget_and_snapshot_each_round(
    tiny_sft, offline, tmp_path
):
    s = _run(tiny_sft, offline, tmp_path / "o")
    budget = len(load_pairs(offline[0], warn=False)[0])
    assert s["pairs_budget"] == budget and 0 < s["pairs"] <= budget
    rows = read_metrics(tmp_path / "o" / "metrics.jsonl")
    assert [r["round"] for r in rows] == [0, 1]
    assert [r["step"] for r in rows] == [5, 10]  # tiny DPO: 10 steps over 2 rounds
    snaps = snapshots(tmp_path / "o")
    assert [load_checkpoint(p)["step"] for p in snaps] == [5, 10]
    # the run's checkpoint is the last round's policy; round 1 started from round 0's
    assert file_sha256(tmp_path / "o" / "checkpoint.pt") == file_sha256(snaps[-1])  # a byte copy
    ck1 = load_checkpoint(tmp_path / "o" / "round1" / "checkpoint.pt")
    assert ck1["stage_config"]["sft_sha256"] == file_sha256(
        tmp_path / "o" / "round0" / "checkpoint.pt"
    )
    assert ck1["stage_config"].get("ref_sha256") == file_sha256(tiny_sft)  # the reference stays SFT
    # each round's pairs come from its own samples: not all of round 1's are offline pairs
    offline_set = {(p.prompt, p.chosen, p.rejected) for p in load_pairs(offline[0], warn=False)[0]}
    r1 = load_pairs(tmp_path / "o" / "round1" / "pairs.jsonl", warn=False)[0]
    assert len(r1) == json.loads((tmp_path / "o" / "round1" / "pairs.json").read_text())["pairs"]
    assert sum((p.prompt, p.chosen, p.rejected) in offline_set for p in r1) < len(r1)


def test_previous_reference_is_the_round_before(tiny_sft, offline, tmp_path):
    _run(tiny_sft, offline, tmp_path / "p", reference="previous")
    ck1 = load_checkpoint(tmp_path / "p" / "round1" / "checkpoint.pt")
    assert ck1["stage_config"]["sft_sha256"] == file_sha256(
        tmp_path / "p" / "round0" / "checkpoint.pt"
    )
    assert "ref_sha256" not in ck1["stage_config"]  # reference == starting policy


def test_stopped_after_a_round_resumes_to_the_same_weights(tiny_sft, offline, tmp_path):
    _run(tiny_sft, offline, tmp_path / "full")
    _run(tiny_sft, offline, tmp_path / "cut")
    # as if killed after round 0 finished: round 1's folder and row gone
    shutil.rmtree(tmp_path / "cut" / "round1")
    rows = (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()
    (tmp_path / "cut" / "metrics.jsonl").write_text(rows[0] + "\n")
    (tmp_path / "cut" / "snapshots" / "step-000010.pt").unlink()
    _run(tiny_sft, offline, tmp_path / "cut", resume=True)
    # the same weights and step; the provenance differs only by round 0's file hash, whose
    # bytes carry its own run's wall clock
    cut, full = (load_checkpoint(tmp_path / k / "checkpoint.pt") for k in ("cut", "full"))
    assert cut["step"] == full["step"] == 10 and cut["model"].keys() == full["model"].keys()
    assert all(torch.equal(cut["model"][k], full["model"][k]) for k in full["model"])
    rows = read_metrics(tmp_path / "cut" / "metrics.jsonl")
    assert [r["round"] for r in rows] == [0, 1]
    assert (
        rows[1]["train/loss"] == read_metrics(tmp_path / "full" / "metrics.jsonl")[1]["train/loss"]
    )
