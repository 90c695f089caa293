"""SFT end to end on the tiny preset: determinism, resume, and bad input (skipping a finished
run and rerunning a changed one are the stage layer's, tested in test_stage.py)."""

import json

import pytest
import torch

from minidpo.checkpoints import load_checkpoint
from minidpo.config import ModelConfig, RunConfig, SFTConfig, TokenizerConfig, resolve
from minidpo.errors import MinidpoError
from minidpo.sft import run_sft
from minidpo.training import read_metrics


def _cfgs(tmp_path, name, **sft_overrides):
    run = RunConfig(name=name, runs_dir=str(tmp_path), preset="tiny", device="cpu")
    tok = resolve(TokenizerConfig, "tokenizer", "tiny", None)
    model = resolve(ModelConfig, "model", "tiny", None)
    sft = resolve(SFTConfig, "sft", "tiny", None)
    for k, v in sft_overrides.items():
        setattr(sft, k, v)
    return run, tok, model, sft


def _metrics(tmp_path, name):
    """The logged rows without wall-clock timings (the one thing that may differ)."""
    rows = read_metrics(tmp_path / name / "sft" / "metrics.jsonl")
    return [{k: v for k, v in r.items() if not k.startswith("time/")} for r in rows]


def test_same_seed_same_metrics_twice(tmp_path):
    run_sft(*_cfgs(tmp_path, "a"), progress=False)
    run_sft(*_cfgs(tmp_path, "b"), progress=False)
    a, b = _metrics(tmp_path, "a"), _metrics(tmp_path, "b")
    assert len(a) == 20
    for ra, rb in zip(a, b, strict=True):
        assert ra == rb  # bit-identical floats on CPU
    assert "eval/loss" in a[-1] and a[-1]["train/loss"] < a[0]["train/loss"]


def test_resume_after_stop_equals_uninterrupted(tmp_path):
    run_sft(*_cfgs(tmp_path, "full"), progress=False)
    run_sft(*_cfgs(tmp_path, "cut"), progress=False, stop_after=7)
    stopped = load_checkpoint(tmp_path / "cut" / "sft" / "checkpoint.pt")
    assert stopped["step"] == 7 and not stopped["done"]
    run_sft(*_cfgs(tmp_path, "cut"), progress=False, resume=True)  # resumes at step 7
    full = load_checkpoint(tmp_path / "full" / "sft" / "checkpoint.pt")["model"]
    resumed = load_checkpoint(tmp_path / "cut" / "sft" / "checkpoint.pt")["model"]
    for k in full:
        torch.testing.assert_close(resumed[k], full[k], atol=0, rtol=0, msg=f"weights {k}")
    assert _metrics(tmp_path, "cut") == _metrics(tmp_path, "full")


def test_a_fresh_run_overwrites_and_gives_the_same_numbers(tmp_path):
    run_sft(*_cfgs(tmp_path, "s"), progress=False, stop_after=5)
    run_sft(*_cfgs(tmp_path, "s"), progress=False)  # resume=False: from step 0
    run_sft(*_cfgs(tmp_path, "full"), progress=False)
    assert _metrics(tmp_path, "s") == _metrics(tmp_path, "full")


def test_all_tokens_option_trains_on_prompts_too(tmp_path):
    run_sft(*_cfgs(tmp_path, "all", all_tokens=True, steps=2), progress=False)
    summary = json.loads((tmp_path / "all" / "sft" / "summary.json").read_text())
    assert summary["steps"] == 2


def test_corrupt_checkpoint_is_one_clear_error(tmp_path):
    run, *rest = _cfgs(tmp_path, "c")
    path = tmp_path / "c" / "sft" / "checkpoint.pt"
    path.parent.mkdir(parents=True)
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(MinidpoError, match="corrupt"):
        run_sft(run, *rest, progress=False, resume=True)
    assert path.read_bytes() == b"not a checkpoint"  # left as found
