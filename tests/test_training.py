"""The shared training-loop pieces: schedule, checkpoints, metrics log, devices, keep_best."""

import itertools
import json
import math

import pytest
import torch

from minidpo.checkpoints import load_checkpoint, save_checkpoint
from minidpo.errors import MinidpoError
from minidpo.training import (
    Job,
    LoopConfig,
    MetricsLog,
    converged,
    improves,
    lr_at,
    read_metrics,
    resolve_device,
    train,
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
    with pytest.raises(MinidpoError, match="truncated or damaged"):
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


# ------------------------------------------------------------------ keep_best, on a toy model


def _toy_train(
    out,
    *,
    stop_after=None,
    resume=False,
    keep_best="score",
    snapshot_every=0,
    patience=0,
    stop_on=None,
):
    """A 4 -> 1 linear regression, 12 steps, evaluated every 2 with a score that rises and
    falls along the run (a function of the weights alone, so it resumes exactly)."""
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    w_true = torch.tensor([[1.0, -2.0, 0.5, 3.0]])

    def get_batch(step):
        x = torch.randn(8, 4, generator=torch.Generator().manual_seed(step))
        return x, x @ w_true.T

    def loss_fn(m, batch):
        x, y = batch
        loss = ((m(x) - y) ** 2).mean()
        return loss, {"loss": float(loss.detach())}

    def eval_fn(m):
        score = float(torch.sin(8.0 * m.weight.sum()))
        return {"score": score, "loss": -score}

    loop = LoopConfig(steps=12, lr=0.05, warmup_steps=0, min_lr_ratio=1.0, weight_decay=0.0,
                      grad_clip=0.0, eval_every=2, ckpt_every=4, snapshot_every=snapshot_every,
                      patience=patience)  # fmt: skip
    job = Job(out, 0, resume=resume, progress=False, stop_after=stop_after)
    last = train(
        model, loop=loop, job=job, get_batch=get_batch, loss_fn=loss_fn,
        checkpoint_extra={"kind": "toy"}, eval_fn=eval_fn, keep_best=keep_best, stop_on=stop_on,
    )  # fmt: skip
    return model, last


def _no_time(rows):
    return [{k: v for k, v in r.items() if not k.startswith("time/")} for r in rows]


def test_improves_ties_keep_the_earliest_and_nan_never_wins():
    assert improves(0.3, None) and improves(float("nan"), None)
    assert improves(0.6, 0.5) and not improves(0.5, 0.5) and not improves(0.4, 0.5)
    assert not improves(float("nan"), 0.5) and improves(-1.0, float("nan"))


def test_keep_best_ends_with_the_weights_of_the_best_evaluation(tmp_path):
    model, last = _toy_train(tmp_path, snapshot_every=2)
    rows = [r for r in read_metrics(tmp_path / "metrics.jsonl") if "eval/score" in r]
    scores = [r["eval/score"] for r in rows]
    assert [r["step"] for r in rows] == [2, 4, 6, 8, 10, 12]
    want_step = rows[scores.index(max(scores))]["step"]  # index(): the earliest of ties
    assert want_step != 12, f"the toy run must peak before its end to test anything: {scores}"
    ckpt = load_checkpoint(tmp_path / "checkpoint.pt", kind="toy")
    assert ckpt["done"] and ckpt["step"] == 12 and "best_model" not in ckpt
    assert (ckpt["best_metric"], ckpt["best_step"]) == ("eval/score", want_step)
    assert ckpt["best_value"] == max(scores)
    assert (last["best_step"], last["best_value"]) == (want_step, max(scores))
    at_best = load_checkpoint(tmp_path / "snapshots" / f"step-{want_step:06d}.pt")["model"]
    at_end = load_checkpoint(tmp_path / "snapshots" / "step-000012.pt")["model"]
    for k in at_best:
        torch.testing.assert_close(ckpt["model"][k], at_best[k], atol=0, rtol=0, msg=k)
        torch.testing.assert_close(model.state_dict()[k], at_best[k], atol=0, rtol=0, msg=k)
    assert not torch.equal(at_best["weight"], at_end["weight"])
    # without keep_best the same run ends with its last weights
    _toy_train(tmp_path / "plain", keep_best=None)
    plain = load_checkpoint(tmp_path / "plain" / "checkpoint.pt")
    assert "best_step" not in plain
    torch.testing.assert_close(plain["model"]["weight"], at_end["weight"], atol=0, rtol=0)


def test_keep_best_resume_after_kill_equals_uninterrupted(tmp_path):
    """Killed at step 7 with its last checkpoint at step 4 (rows 5-7 logged, the evaluation
    at step 6 seen, then lost): the resumed run chooses as the full one. The best (step 2)
    lies before the checkpoint, so a resume that forgot it would pick step 12 instead."""
    _toy_train(tmp_path / "full")
    full = load_checkpoint(tmp_path / "full" / "checkpoint.pt")
    cut = tmp_path / "cut"
    _toy_train(cut, stop_after=4)
    at_4 = (cut / "checkpoint.pt").read_bytes()
    assert load_checkpoint(cut / "checkpoint.pt")["best_step"] == full["best_step"] == 2
    _toy_train(cut, stop_after=3, resume=True)  # on to step 7 ...
    (cut / "checkpoint.pt").write_bytes(at_4)  # ... then killed: only the step-4 checkpoint stands
    assert len(read_metrics(cut / "metrics.jsonl")) == 7
    _toy_train(cut, resume=True)
    resumed = load_checkpoint(cut / "checkpoint.pt")
    for key in ("step", "done", "best_metric", "best_step", "best_value"):
        assert resumed[key] == full[key], key
    for part in ("model", "optimizer"):
        a, b = resumed[part], full[part]
        if part == "optimizer":
            a, b = a["state"], b["state"]
        torch.testing.assert_close(a, b, atol=0, rtol=0, msg=part)
    assert _no_time(read_metrics(cut / "metrics.jsonl")) == _no_time(
        read_metrics(tmp_path / "full" / "metrics.jsonl")
    )


def test_keep_best_needs_an_eval_metric(tmp_path):
    model = torch.nn.Linear(2, 1)
    loop = LoopConfig(steps=2, lr=0.1, warmup_steps=0, min_lr_ratio=1.0, weight_decay=0.0,
                      grad_clip=0.0, eval_every=1, ckpt_every=1)  # fmt: skip
    kw = dict(
        loop=loop, get_batch=lambda s: torch.ones(1, 2),
        loss_fn=lambda m, x: (m(x).sum(), {"loss": 0.0}),
        job=Job(tmp_path, 0, progress=False), checkpoint_extra={},
    )  # fmt: skip
    with pytest.raises(ValueError, match="needs an eval_fn"):
        train(model, keep_best="accuracy", **kw)
    with pytest.raises(ValueError, match="'accuracy' is not a key"):
        train(model, keep_best="accuracy", eval_fn=lambda m: {"loss": 0.0}, **kw)


@pytest.mark.parametrize("what", ["loss", "gradient norm"])
def test_a_non_finite_loss_or_gradient_stops_the_run_and_keeps_the_last_checkpoint(tmp_path, what):
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    bad_step = 6  # 1-based: the step whose loss (or gradient) is not finite

    def get_batch(step):
        return torch.randn(8, 4, generator=torch.Generator().manual_seed(step)), step

    def loss_fn(m, batch):
        x, step = batch
        y = m(x)
        if step + 1 == bad_step and what == "gradient norm":
            y.register_hook(lambda g: g * float("inf"))  # a finite loss, an infinite gradient
        loss = (y**2).mean()
        if step + 1 == bad_step and what == "loss":
            loss = loss * float("nan")
        return loss, {"loss": float(loss.detach())}

    loop = LoopConfig(steps=12, lr=0.05, warmup_steps=0, min_lr_ratio=1.0, weight_decay=0.0,
                      grad_clip=1.0, eval_every=100, ckpt_every=4)  # fmt: skip
    job = Job(tmp_path, 0, progress=False)
    with pytest.raises(MinidpoError, match=rf"step {bad_step}: the {what} is (nan|inf)"):
        train(model, loop=loop, job=job, get_batch=get_batch, loss_fn=loss_fn,
              checkpoint_extra={"kind": "toy"})  # fmt: skip
    assert all(torch.isfinite(p).all() for p in model.parameters())  # no update was taken
    ckpt = load_checkpoint(tmp_path / "checkpoint.pt")
    assert ckpt["step"] == 4 and not ckpt["done"]  # the last good checkpoint, kept
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values())


def test_the_convergence_rule_known_answers():
    assert converged([0.69, 0.60, 0.61, 0.62], patience=2) == 3
    assert converged([0.69, 0.60, 0.61, 0.59, 0.60], patience=2) is None  # improved at 3
    assert converged([0.5, 0.5], patience=1) == 1  # a tie does not improve
    assert converged([0.5, float("nan"), float("nan")], patience=2) == 2  # NaN never improves
    assert converged([0.7, 0.6, 0.5], patience=1) is None


def test_snapshot_schedule_is_dense_at_the_start():
    loop = LoopConfig(steps=40, lr=1.0, warmup_steps=0, min_lr_ratio=1.0, weight_decay=0.0,
                      grad_clip=0.0, eval_every=1, ckpt_every=1, snapshot_every=8,
                      snapshot_dense=True)  # fmt: skip
    assert [s for s in range(1, 41) if loop.is_snapshot(s)] == [1, 2, 4, 8, 16, 24, 32, 40]
    sparse = LoopConfig(**{**loop.__dict__, "snapshot_dense": False})
    assert [s for s in range(1, 41) if sparse.is_snapshot(s)] == [8, 16, 24, 32, 40]


def test_a_run_stops_where_its_validation_metric_stops_improving(tmp_path):
    """The toy's "loss" (-score) first rises after its best evaluation: with patience 2
    the run ends two evaluations later, final, with a snapshot of its last weights; the
    same run without the rule takes all 12 steps."""
    _toy_train(tmp_path / "all", keep_best=None)
    losses = [r["eval/loss"] for r in read_metrics(tmp_path / "all" / "metrics.jsonl")
              if "eval/loss" in r]  # fmt: skip
    stop = converged(losses, 2)
    assert stop is not None and 2 * (stop + 1) < 12, losses
    _, last = _toy_train(tmp_path / "early", keep_best=None, patience=2, stop_on="loss",
                         snapshot_every=4)  # fmt: skip
    assert last["finished"] and last["steps_done"] == last["converged_step"] == 2 * (stop + 1)
    ckpt = load_checkpoint(tmp_path / "early" / "checkpoint.pt")
    assert ckpt["done"] and ckpt["step"] == 2 * (stop + 1)
    snaps = sorted(p.name for p in (tmp_path / "early" / "snapshots").glob("*.pt"))
    assert snaps[-1] == f"step-{2 * (stop + 1):06d}.pt"
    # resumed after it converged: nothing more is trained
    _, again = _toy_train(tmp_path / "early", keep_best=None, patience=2, stop_on="loss",
                          resume=True, snapshot_every=4)  # fmt: skip
    assert again["steps_done"] == last["steps_done"]
    assert load_checkpoint(tmp_path / "early" / "checkpoint.pt")["step"] == ckpt["step"]


def test_a_killed_converging_run_resumes_to_the_same_stop(tmp_path):
    _, full = _toy_train(tmp_path / "full", keep_best=None, patience=2, stop_on="loss")
    cut = tmp_path / "cut"
    _toy_train(cut, keep_best=None, patience=2, stop_on="loss", stop_after=4)
    _, resumed = _toy_train(cut, keep_best=None, patience=2, stop_on="loss", resume=True)
    assert resumed["converged_step"] == full["converged_step"]
    a, b = (
        load_checkpoint(cut / "checkpoint.pt"),
        load_checkpoint(tmp_path / "full" / "checkpoint.pt"),
    )
    torch.testing.assert_close(a["model"], b["model"], atol=0, rtol=0)
