"""The DPO trainer on the tiny preset: metrics, the reference cache, resume, loss family."""

import math

import pytest
import torch

import minidpo.dpo as dpo_mod
from minidpo.checkpoints import load_checkpoint
from minidpo.config import DPOConfig, resolve
from minidpo.dpo import run_dpo
from minidpo.errors import MinidpoError
from minidpo.losses import LOSS_TYPES, preference_loss
from minidpo.policy import load_policy
from minidpo.preferences import PreferencePair, load_pairs, save_pairs, tokenize_pairs
from minidpo.training import Job, read_metrics

TRL_NAMES = [
    "loss",
    "rewards/chosen",
    "rewards/rejected",
    "rewards/accuracies",
    "rewards/margins",
    "logps/chosen",
    "logps/rejected",
]


@pytest.fixture(scope="module")
def pair_files(tmp_path_factory, fact_pairs):
    d = tmp_path_factory.mktemp("pairs")
    return save_pairs(d / "train.jsonl", fact_pairs("train", 24)), save_pairs(
        d / "eval.jsonl", fact_pairs("eval", 8)
    )


def _cfg(**kw):
    cfg = resolve(DPOConfig, "dpo", "tiny", None)
    for k, v in kw.items():
        setattr(cfg, k, v)
    return cfg


def _run(tiny_sft, pair_files, out, **kw):
    """DPO into `out`, its reference cache in out/../cache (as a run's prefs/ folder)."""
    train, evals = pair_files
    job = Job(out, 0, "cpu", progress=False,
              **{k: v for k, v in kw.items() if k in ("stop_after", "resume")})  # fmt: skip
    return run_dpo(_cfg(**kw), job, sft_path=tiny_sft, train_pairs=train, eval_pairs=evals,
                   cache_dir=out.parent / "cache")  # fmt: skip


def test_metrics_names_and_first_step_known_answer(tiny_sft, pair_files, tmp_path):
    _run(tiny_sft, pair_files, tmp_path / "a")
    rows = read_metrics(tmp_path / "a" / "metrics.jsonl")
    assert len(rows) == 10
    for name in TRL_NAMES:
        assert f"train/{name}" in rows[0]
        assert f"eval/{name}" in rows[-1]
    # at step 1 the policy IS the reference: implicit rewards 0, loss = -log sigmoid(0) = ln 2
    assert rows[0]["train/loss"] == pytest.approx(math.log(2), abs=1e-5)
    # the displacement metric, held out only; the options' terms only when they are on
    assert 0.0 <= rows[-1]["eval/logps/chosen_rose"] <= 1.0
    assert 0.0 <= rows[-1]["eval/logps/rejected_rose"] <= 1.0
    assert not any(k.endswith(("_rose", "loss/nll", "loss/dpop_penalty")) for k in rows[0])
    assert rows[0]["train/rewards/margins"] == pytest.approx(0.0, abs=1e-5)
    assert rows[-1]["train/loss"] < math.log(2)
    model, tok = load_policy(tmp_path / "a" / "checkpoint.pt")
    assert tok.eot_id > 0 and model.config.n_layer == 1


def test_reference_logps_computed_once_and_recomputed_on_change(
    tiny_sft, pair_files, tmp_path, monkeypatch
):
    calls = []
    real = dpo_mod.load_policy
    monkeypatch.setattr(dpo_mod, "load_policy", lambda *a: calls.append(1) or real(*a))
    _run(tiny_sft, pair_files, tmp_path / "a", steps=2)
    assert len(calls) == 3  # the policy, then the reference for train and for eval pairs
    calls.clear()
    _run(tiny_sft, pair_files, tmp_path / "b", steps=2)
    assert len(calls) == 1  # the policy only: reference log-probs came from the cache
    train, evals = pair_files
    edited = tmp_path / "edited.jsonl"
    edited.write_text(train.read_text().replace("Gravity", "Gravity", 1) + "\n")
    calls.clear()
    job = Job(tmp_path / "c", 0, "cpu", progress=False)
    run_dpo(_cfg(steps=2), job, sft_path=tiny_sft, train_pairs=edited, eval_pairs=evals,
            cache_dir=tmp_path / "cache")  # fmt: skip
    assert len(calls) == 2  # new pairs file: its reference log-probs recomputed
    assert len(list((tmp_path / "cache").glob("*.ref-*.pt"))) == 3


def test_pairs_in_a_read_only_folder_train_and_nothing_is_written_beside_them(
    tiny_sft, pair_files, tmp_path
):
    src = tmp_path / "readonly"
    src.mkdir()
    copies = []
    for f in pair_files:
        copies.append(src / f.name)
        copies[-1].write_bytes(f.read_bytes())
    src.chmod(0o555)
    try:
        _run(tiny_sft, tuple(copies), tmp_path / "run" / "dpo", steps=2)
        assert sorted(p.name for p in src.iterdir()) == ["eval.jsonl", "train.jsonl"]
        assert len(list((tmp_path / "run" / "cache").glob("*.ref-*.pt"))) == 2
    finally:
        src.chmod(0o755)


def test_a_bad_eval_pairs_file_is_reported_before_anything_is_written(
    tiny_sft, pair_files, tmp_path
):
    train, _ = pair_files
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "Explain gravity.", "chosen": "A."}\n')
    with pytest.raises(MinidpoError, match=r"bad.jsonl:1"):
        _run(tiny_sft, (train, bad), tmp_path / "run" / "dpo", steps=2)
    assert not (tmp_path / "run").exists()


def test_cached_reference_equals_fresh_computation(tiny_sft, pair_files, tmp_path):
    train, _ = pair_files
    model, tok = load_policy(tiny_sft)
    data = tokenize_pairs(load_pairs(train)[0], tok, model.config.block_size, "x")
    c, r = dpo_mod.reference_logps(train, tiny_sft, data, tok.eot_id, torch.device("cpu"),
                                   tmp_path)  # fmt: skip
    c2, r2 = dpo_mod.compute_logps(model, data, tok.eot_id)
    torch.testing.assert_close(c, c2, atol=1e-5, rtol=1e-6)
    torch.testing.assert_close(r, r2, atol=1e-5, rtol=1e-6)


def test_resume_after_stop_equals_uninterrupted(tiny_sft, pair_files, tmp_path):
    _run(tiny_sft, pair_files, tmp_path / "full")
    _run(tiny_sft, pair_files, tmp_path / "cut", stop_after=4)
    assert load_checkpoint(tmp_path / "cut" / "checkpoint.pt")["step"] == 4
    _run(tiny_sft, pair_files, tmp_path / "cut", resume=True)  # on from step 4
    a = load_checkpoint(tmp_path / "full" / "checkpoint.pt")["model"]
    b = load_checkpoint(tmp_path / "cut" / "checkpoint.pt")["model"]
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=0, rtol=0, msg=f"weights {k}")


@pytest.mark.parametrize("loss", LOSS_TYPES)
def test_every_loss_type_trains(tiny_sft, pair_files, tmp_path, loss):
    eps = 0.1 if loss == "robust" else 0.0
    s = _run(tiny_sft, pair_files, tmp_path / loss, loss=loss, steps=3, label_smoothing=eps)
    assert math.isfinite(s["train/loss"])


def test_displacement_remedies_train_and_log_their_terms(tiny_sft, pair_files, tmp_path):
    _run(tiny_sft, pair_files, tmp_path / "r", steps=2, nll_alpha=1.0, dpop_lambda=5.0)
    rows = read_metrics(tmp_path / "r" / "metrics.jsonl")
    for prefix in ("train/", "eval/"):
        assert math.isfinite(rows[-1][f"{prefix}loss/nll"]) and rows[-1][f"{prefix}loss/nll"] > 0
        assert rows[-1][f"{prefix}loss/dpop_penalty"] >= 0
    # step 1: the policy is the reference, so h = 0 and the penalty is ~0 (float noise
    # between the cached and the training forward): loss = ln 2 + NLL
    first = rows[0]
    assert first["train/loss/dpop_penalty"] == pytest.approx(0.0, abs=1e-4)
    assert first["train/loss"] == pytest.approx(math.log(2) + first["train/loss/nll"], abs=1e-3)
    assert 0.0 <= rows[-1]["eval/logps/chosen_rose"] <= 1.0


def test_chosen_lengths_count_the_response_mask(tiny_sft, pair_files):
    train, _ = pair_files
    model, tok = load_policy(tiny_sft)
    data = tokenize_pairs(load_pairs(train)[0], tok, model.config.block_size, "x")
    idx = [0, 3, 5, 7]
    mask_counts = data.batch(idx, tok.eot_id).mask[: len(idx)].sum(-1)  # (B,) chosen rows
    torch.testing.assert_close(dpo_mod.chosen_lengths(data)[idx], mask_counts, rtol=0, atol=0)


def test_default_config_metrics_equal_the_plain_loss():
    g = torch.Generator().manual_seed(0)
    pc, pr, rc, rr = (-10 * torch.rand(16, generator=g) for _ in range(4))
    cfg = DPOConfig()
    loss, metrics = dpo_mod.preference_metrics(pc, pr, rc, rr, cfg, torch.ones(16))
    plain = preference_loss(pc, pr, rc, rr, beta=cfg.beta)  # the call before the options
    assert torch.equal(loss, plain.losses.mean())
    assert list(metrics) == TRL_NAMES  # no new keys in the default rows


def test_displacement_metrics_known_answer():
    """Chosen -1, -2, -3, -4 against a reference at -2: only -1 rose (-2 is level): 1/4.
    Rejected -1, -1, -3, -1 against -2: three rose: 3/4."""
    ref = torch.full((4,), -2.0)
    got = dpo_mod.displacement_metrics(
        torch.tensor([-1.0, -2.0, -3.0, -4.0]), torch.tensor([-1.0, -1.0, -3.0, -1.0]), ref, ref
    )
    assert got == {"logps/chosen_rose": 0.25, "logps/rejected_rose": 0.75}


def test_bad_input(tiny_sft, pair_files, tmp_path):
    with pytest.raises(MinidpoError, match="--beta"):
        _run(tiny_sft, pair_files, tmp_path / "x", beta=0.0)
    with pytest.raises(MinidpoError, match="--beta"):
        _run(tiny_sft, pair_files, tmp_path / "x", beta=float("inf"))
    with pytest.raises(MinidpoError, match="--nll-alpha"):
        _run(tiny_sft, pair_files, tmp_path / "x", nll_alpha=-1.0)
    with pytest.raises(MinidpoError, match="--dpop-lambda"):
        _run(tiny_sft, pair_files, tmp_path / "x", dpop_lambda=float("nan"))
    with pytest.raises(MinidpoError, match="--loss"):
        _run(tiny_sft, pair_files, tmp_path / "x", loss="kto")
    long = save_pairs(
        tmp_path / "long.jsonl", [PreferencePair("Explain gravity.", "Gravity. " * 200, "No.")]
    )
    with pytest.raises(MinidpoError, match=r"long.jsonl: pair 1 needs \d+ tokens"):
        job = Job(tmp_path / "y", 0, "cpu", progress=False)
        run_dpo(_cfg(), job, sft_path=tiny_sft, train_pairs=long, eval_pairs=None,
                cache_dir=tmp_path / "y")  # fmt: skip
    assert not (tmp_path / "y").exists()  # nothing half-written
