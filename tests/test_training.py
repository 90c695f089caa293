"""The shared training-loop pieces: schedule, checkpoints, metrics log, devices."""

import itertools
import json
import math

import pytest
import torch

from minidpo.errors import MinidpoError
from minidpo.training import (
    MetricsLog,
    load_checkpoint,
    lr_at,
    read_metrics,
    resolve_device,
    save_checkpoint,
)


def test_lr_schedule_warmup_then_cosine():
    kw = dict(lr=1.0, warmup_steps=10, max_steps=110, min_lr_ratio=0.1)
    assert lr_at(0, **kw) == pytest.approx(0.1, abs=1e-12)
    assert lr_at(9, **kw) == pytest.approx(1.0, abs=1e-12)
    assert lr_at(10, **kw) == pytest.approx(1.0, abs=1e-12)
    # halfway through the decay: floor + (peak - floor)/2
    assert lr_at(60, **kw) == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi * 0.5)), abs=1e-12)
    assert lr_at(110, **kw) == pytest.approx(0.1, abs=1e-12)
    lrs = [lr_at(s, **kw) for s in range(10, 111)]
    assert all(a >= b - 1e-15 for a, b in itertools.pairwise(lrs))


def test_checkpoint_round_trip(tmp_path):
    path = tmp_path / "c.pt"
    save_checkpoint(path, {"kind": "policy", "step": 3, "model": {"w": torch.ones(2)}})
    ckpt = load_checkpoint(path, kind="policy")
    assert ckpt["step"] == 3
    torch.testing.assert_close(ckpt["model"]["w"], torch.ones(2), atol=0, rtol=0)
    assert not list(tmp_path.glob(".*tmp"))  # no temp file left behind


def test_checkpoint_errors_name_the_file(tmp_path):
    with pytest.raises(MinidpoError, match="not found"):
        load_checkpoint(tmp_path / "missing.pt")
    bad = tmp_path / "corrupt.pt"
    bad.write_bytes(b"\x00garbage" * 10)
    with pytest.raises(MinidpoError, match=str(bad)):
        load_checkpoint(bad)
    good = tmp_path / "good.pt"
    save_checkpoint(good, {"kind": "reward_model", "step": 0})
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[:50])
    with pytest.raises(MinidpoError, match="corrupt"):
        load_checkpoint(truncated)
    with pytest.raises(MinidpoError, match="expected 'policy'"):
        load_checkpoint(good, kind="policy")
    foreign = tmp_path / "foreign.pt"
    torch.save({"state_dict": {}}, foreign)
    with pytest.raises(MinidpoError, match="not a minidpo checkpoint"):
        load_checkpoint(foreign)
    old = tmp_path / "old.pt"
    torch.save({"format": "minidpo-checkpoint", "version": 99}, old)
    with pytest.raises(MinidpoError, match="version 99"):
        load_checkpoint(old)


def test_metrics_log_truncates_on_resume(tmp_path):
    path = tmp_path / "m.jsonl"
    log = MetricsLog(path)
    for s in range(1, 6):
        log.log({"step": s, "x": s * 1.0})
    MetricsLog(path, resume_step=3)
    assert [r["step"] for r in read_metrics(path)] == [1, 2, 3]
    path.write_text(json.dumps({"step": 1}) + "\n{broken\n")
    with pytest.raises(MinidpoError, match=r"m.jsonl:2"):
        read_metrics(path)


def test_resolve_device():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type in ("cpu", "cuda")
    with pytest.raises(MinidpoError, match="--device"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(MinidpoError, match="no CUDA"):
            resolve_device("cuda")
