"""The one stage layer (`minidpo.stage.run_stage`): skip, resume or rerun, for every training
stage, on the tiny preset.

For each training stage: a run killed after a checkpoint resumes (same weights and metrics
as an uninterrupted run); a finished one is skipped; changed settings rerun it from
scratch; ``--force`` reruns it; a damaged output (a truncated checkpoint) is rebuilt, not
a crash; a missing input is one error naming it, with nothing written.
"""

from __future__ import annotations

import dataclasses
import shutil

import pytest
import torch

import minidpo.training as training
from minidpo.checkpoints import load_checkpoint
from minidpo.config import resolve
from minidpo.errors import MinidpoError
from minidpo.pipeline import BY_NAME, GROUPS, Context, run_stages
from minidpo.stage import run_stage
from minidpo.training import read_metrics

TRAINING_STAGES = ["sft", "dpo", "dpo_nll", "dpop", "rm", "ppo", "ppo_gt", "preferred_ft",
                   "unlikelihood"]  # fmt: skip
# a setting of each stage's own group that changes its result (the remedies' weights are
# pipeline settings: their stages' keys must follow them)
CHANGE = {"sft": ("sft", "lr"), "dpo": ("dpo", "beta"), "rm": ("rm", "lr"),
          "dpo_nll": ("pipeline", "nll_remedy_alpha"), "dpop": ("pipeline", "dpop_remedy_lambda"),
          "ppo": ("ppo", "lr"), "ppo_gt": ("ppo", "lr"), "preferred_ft": ("preferred_ft", "lr"),
          "unlikelihood": ("unlikelihood", "lr")}  # fmt: skip


def _ctx(root, name: str, log: list[str] | None = None) -> Context:
    from minidpo.config import RunConfig

    run = RunConfig(name=name, runs_dir=str(root), preset="tiny", device="cpu")
    cfg = {g: resolve(cls, g, "tiny", None) for g, cls in GROUPS.items()}
    sink = log if log is not None else []
    return Context(run=run, cfg=cfg, device=torch.device("cpu"), progress=False,
                   log=sink.append)  # fmt: skip


def _ckpt(ctx: Context, stage: str):
    return load_checkpoint(BY_NAME[stage].outputs(ctx)[0])


def _rows(ctx: Context, stage: str):
    path = BY_NAME[stage].outputs(ctx)[0].parent / "metrics.jsonl"
    return [{k: v for k, v in r.items() if not k.startswith("time/")} for r in read_metrics(path)]


def _same_weights(a, b) -> None:
    for k in a["model"]:
        torch.testing.assert_close(a["model"][k], b["model"][k], atol=0, rtol=0, msg=k)


@pytest.fixture(scope="module")
def full(tmp_path_factory):
    """Every training stage run once, uninterrupted: the reference."""
    ctx = _ctx(tmp_path_factory.mktemp("stage"), "full")
    run_stages(ctx, TRAINING_STAGES)
    return ctx


class Killed(Exception):
    pass


def kill_after_first_checkpoint(monkeypatch) -> None:
    """From now on every loop dies right after its first intermediate checkpoint."""
    original = training._LoopState.checkpoint

    def checkpoint(self, step, finished):
        original(self, step, finished)
        if not finished:
            raise Killed(f"killed after step {step}")

    monkeypatch.setattr(training._LoopState, "checkpoint", checkpoint)


@pytest.mark.parametrize("stage", TRAINING_STAGES)
def test_killed_stage_resumes_to_the_uninterrupted_result(stage, full, tmp_path, monkeypatch):
    log: list[str] = []
    ctx = _ctx(tmp_path, "cut", log)
    deps = [d for d in BY_NAME[stage].deps]
    if deps:
        run_stages(ctx, deps)
    kill_after_first_checkpoint(monkeypatch)
    with pytest.raises(Killed):
        run_stage(ctx, BY_NAME[stage], {})
    started = ctx.paths.stamp(stage).with_suffix(".started")
    assert started.exists() and not _ckpt(ctx, stage)["done"]
    monkeypatch.undo()
    run_stage(ctx, BY_NAME[stage], {})
    assert log[-2] == f"[{stage}] resuming", log[-3:]
    assert not started.exists()
    _same_weights(_ckpt(ctx, stage), _ckpt(full, stage))
    assert _rows(ctx, stage) == _rows(full, stage)


@pytest.mark.parametrize("stage", TRAINING_STAGES)
def test_finished_skipped_changed_rerun_forced_rerun_damaged_rebuilt(stage, full, tmp_path):
    log: list[str] = []
    root = tmp_path / "runs"
    shutil.copytree(full.folder, root / "copy")
    ctx = _ctx(root, "copy", log)
    out = BY_NAME[stage].outputs(ctx)[0]
    mtime = out.stat().st_mtime_ns
    run_stage(ctx, BY_NAME[stage], {})  # finished, same settings: skipped
    assert log[-1].startswith(f"[{stage}] up to date") and out.stat().st_mtime_ns == mtime

    run_stage(dataclasses.replace(ctx, force={stage}), BY_NAME[stage], {})  # --force
    assert f"[{stage}] running" in log and out.stat().st_mtime_ns != mtime
    _same_weights(_ckpt(ctx, stage), _ckpt(full, stage))  # rerun from scratch: same numbers

    out.write_bytes(out.read_bytes()[:100])  # a damaged output: rebuilt, not a crash
    log.clear()
    run_stage(ctx, BY_NAME[stage], {})
    assert log[0] == f"[{stage}] running"
    _same_weights(_ckpt(ctx, stage), _ckpt(full, stage))

    group, field = CHANGE[stage]  # changed settings: rerun from scratch, another result
    changed = dict(ctx.cfg)
    changed[group] = dataclasses.replace(
        ctx.cfg[group], **{field: getattr(ctx.cfg[group], field) * 3}
    )
    other = dataclasses.replace(ctx, cfg=changed)
    log.clear()
    run_stage(other, BY_NAME[stage], {})
    assert log[0] == f"[{stage}] running"
    after = load_checkpoint(BY_NAME[stage].outputs(other)[0])
    ref = _ckpt(full, stage)
    assert any(not torch.equal(after["model"][k], ref["model"][k]) for k in ref["model"])


@pytest.mark.parametrize("stage", ["prefs", "dpo", "rm", "ppo", "preferred_ft"])
def test_missing_input_is_one_error_and_nothing_written(stage, tmp_path):
    ctx = _ctx(tmp_path, "empty")
    with pytest.raises(MinidpoError, match=r"not found; stage .* reads it"):
        run_stage(ctx, BY_NAME[stage], {})
    assert not (tmp_path / "empty").exists()
