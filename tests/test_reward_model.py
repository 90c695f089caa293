"""The reward model: Bradley-Terry loss, reading at end-of-text, normalisation, Spearman,
the oracle's ceiling, and the stage (best-checkpoint selection, resume)."""

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from minidpo import reward_model
from minidpo.batching import build_batch
from minidpo.checkpoints import load_checkpoint
from minidpo.errors import MinidpoError
from minidpo.losses import bradley_terry_loss
from minidpo.model import GPT, GPTConfig, ScalarHeadModel
from minidpo.policy import load_policy
from minidpo.preferences import PreferencePair, save_pairs, validation_split
from minidpo.reward_model import (
    RewardModel,
    RewardModelConfig,
    average_ranks,
    build_reward_model,
    load_reward_model,
    normalization,
    oracle_pair_agreement,
    pair_rewards,
    pooled_rewards,
    read_at,
    reward_inputs,
    run_reward_model,
    spearman,
)
from minidpo.sampling import Sample, sample_responses
from minidpo.tokenizer import train_bpe
from minidpo.training import Job, read_metrics
from minidpo.world import format_prompt, load_world

# ------------------------------------------------------------------ pure math


def test_bradley_terry_loss_known_answer():
    rc = torch.tensor([1.0, 0.0, 2.0])
    rr = torch.tensor([0.0, 0.0, -1.0])
    # -log sigmoid(z) = log(1 + e^-z): z = 1, 0, 3
    want = torch.tensor([math.log1p(math.exp(-1)), math.log(2.0), math.log1p(math.exp(-3))])
    torch.testing.assert_close(bradley_terry_loss(rc, rr), want, atol=1e-6, rtol=0)
    # margin m = 1 shifts z by -1; centering adds c * (rc + rr)^2 = 0.5 * [1, 0, 1]
    got = bradley_terry_loss(rc, rr, margin=torch.ones(3), center_coef=0.5)
    z = torch.tensor([0.0, -1.0, 2.0])
    want = torch.log1p(torch.exp(-z)) + 0.5 * torch.tensor([1.0, 0.0, 1.0])
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)


def test_bradley_terry_loss_is_stable_for_large_margins():
    got = bradley_terry_loss(torch.tensor([-200.0]), torch.tensor([200.0]))
    torch.testing.assert_close(got, torch.tensor([400.0]), atol=1e-3, rtol=0)


def test_reward_inputs_rebuild_rows_and_index_the_last_real_token():
    # rows (prompt | response): [5, 6 | 7, 0], [5 | 8, 9, 9, 0], [4, 4, 4 | 3] (unterminated)
    batch = build_batch([[5, 6], [5], [4, 4, 4]], [[7, 0], [8, 9, 9, 0], [3]], pad_id=0)
    tokens, last = reward_inputs(batch)
    assert tokens.shape == (3, 5)
    torch.testing.assert_close(last, torch.tensor([3, 4, 3]), atol=0, rtol=0)
    assert tokens[0, :4].tolist() == [5, 6, 7, 0]
    assert tokens[1].tolist() == [5, 8, 9, 9, 0]
    assert tokens[2, :4].tolist() == [4, 4, 4, 3]
    values = torch.arange(15.0).view(3, 5)  # value = 5 * row + column
    torch.testing.assert_close(read_at(values, last), torch.tensor([3.0, 9.0, 13.0]))


def test_pooled_rewards_known_answers():
    """last: the value at the end-of-text; sum: the values at the response's tokens only."""
    batch = build_batch([[5, 6], [5], [4, 4, 4]], [[7, 0], [8, 9, 9, 0], [3]], pad_id=0)
    values = torch.arange(15.0).view(3, 5)  # value = 5 * row + column
    torch.testing.assert_close(pooled_rewards(values, batch, "last"), torch.tensor([3.0, 9, 13]))
    # row 0: columns 2, 3 -> 2 + 3; row 1: columns 1-4 -> 6 + 7 + 8 + 9; row 2: column 3 -> 13
    torch.testing.assert_close(pooled_rewards(values, batch, "sum"), torch.tensor([5.0, 30, 13]))
    with pytest.raises(MinidpoError, match="--pooling"):
        pooled_rewards(values, batch, "mean")


def test_sum_pooled_reward_model_scores_are_sums_of_the_head(tiny_sft):
    body, tok = load_policy(tiny_sft)
    torch.manual_seed(0)
    model = ScalarHeadModel(body)
    rm = RewardModel(model, tok, gain=1.0, bias=0.0, pooling="sum")
    prompt, response = tok.encode("Explain gravity.\n"), [*tok.encode("Gravity is."), tok.eot_id]
    with torch.no_grad():
        values = model(torch.tensor([prompt + response]))[0]  # (T,)
    expected = values[len(prompt) :].sum()
    torch.testing.assert_close(
        rm.raw_scores([prompt], [response])[0], expected, atol=1e-5, rtol=1e-5
    )


def test_pair_rewards_read_the_model_at_the_end_of_text_token():
    torch.manual_seed(0)
    model = ScalarHeadModel(GPT(GPTConfig(vocab_size=11, block_size=16, n_layer=1, n_embd=8)))
    model.eval()
    prompts, chosen, rejected = [[1, 2], [3]], [[4, 0], [5, 6, 0]], [[7, 8, 9, 0], [10]]
    batch = build_batch([*prompts, *prompts], [*chosen, *rejected], pad_id=0)
    rc, rr = pair_rewards(model, batch)
    with torch.no_grad():  # each row alone, no padding: the value at its last token
        cases = [(rc[0], 0, chosen[0]), (rc[1], 1, chosen[1])]
        cases += [(rr[0], 0, rejected[0]), (rr[1], 1, rejected[1])]
        for got, p, r in cases:
            row = torch.tensor([prompts[p] + r])
            torch.testing.assert_close(got, model(row)[0, -1], atol=1e-5, rtol=0)


def test_normalization_gives_mean_zero_std_one():
    raw = np.random.default_rng(0).normal(3.0, 0.2, size=257)
    gain, bias = normalization(raw)
    z = gain * raw + bias
    np.testing.assert_allclose(z.mean(), 0.0, atol=1e-5)
    np.testing.assert_allclose(z.std(), 1.0, atol=1e-5)
    assert normalization([1.0, 3.0]) == pytest.approx((1.0, -2.0), abs=1e-12)
    with pytest.raises(MinidpoError, match="normalisation"):
        normalization([2.0, 2.0, 2.0])


def test_spearman_known_answers():
    np.testing.assert_allclose(average_ranks([10, 20, 20, 40]), [1, 2.5, 2.5, 4], atol=0)
    # no ties: 1 - 6 * sum d^2 / (n (n^2 - 1)) with d = [-1, 1, -1, 1, 0]: 1 - 24 / 120
    np.testing.assert_allclose(spearman([1, 2, 3, 4, 5], [2, 1, 4, 3, 5]), 0.8, atol=1e-12)
    # ties, by hand: ranks x [1, 2.5, 2.5, 4], y [1, 3, 2, 4]; centred dx [-1.5, 0, 0, 1.5],
    # dy [-1.5, .5, -.5, 1.5]; sum dx dy = 4.5, sum dx^2 = 4.5, sum dy^2 = 5 -> sqrt(0.9)
    np.testing.assert_allclose(spearman([10, 20, 20, 40], [1, 3, 2, 4]), math.sqrt(0.9), atol=1e-12)
    np.testing.assert_allclose(spearman([3, 2, 1], [1, 5, 9]), -1.0, atol=1e-12)
    assert math.isnan(spearman([1, 1, 1], [1, 2, 3]))


def test_oracle_pair_agreement_known_answer():
    world = load_world()
    p = world.prompts("eval")[0]
    t = world.topics[p.topic]
    fact, fact2, vague, wrong = t.facts[0], t.facts[1], t.vague[0], t.wrong[0]
    pairs = [
        PreferencePair(p.text, fact, wrong),  # r* +1 > -1: agrees, 1
        PreferencePair(p.text, wrong, fact),  # -1 < +1: disagrees, 0
        PreferencePair(p.text, fact, fact2),  # +1 = +1: a tie, 1/2
        # the chosen fact never ended: +1 - 1 = 0 < vague +0.25: disagrees, 0
        PreferencePair(p.text, fact, vague, chosen_terminated=False),
        # the rejected fact never ended: vague +0.25 > 0: agrees, 1
        PreferencePair(p.text, vague, fact, rejected_terminated=False),
    ]
    # (1 + 0 + 0.5 + 0 + 1) / 5
    assert oracle_pair_agreement(pairs) == pytest.approx(0.5, abs=1e-12)
    assert oracle_pair_agreement(pairs[:1], world=world) == 1.0
    assert math.isnan(oracle_pair_agreement([]))


# ------------------------------------------------------------------ the stage, tiny


def _pairs(split, n):
    """Fact (chosen) vs wrong claim (rejected), with oracle-like scores."""
    world = load_world()
    out = []
    for i, p in enumerate(world.prompts(split)[:n]):
        t = world.topics[p.topic]
        out.append(
            PreferencePair(p.text, t.facts[i % len(t.facts)], t.wrong[i % len(t.wrong)], 1.0, -1.0)
        )
    return out


def _cfg(**kw):
    cfg = RewardModelConfig(
        steps=12,
        batch_size=8,
        lr=3e-3,
        warmup_steps=2,
        eval_every=3,
        ckpt_every=6,
        n_norm_samples=24,
        max_new_tokens=24,
        report_samples_per_prompt=2,
        validation_fraction=0.25,  # 6 of the 24 training prompts: accuracy in sixths
    )
    for k, v in kw.items():
        setattr(cfg, k, v)
    return cfg


def _run(tiny_sft, files, out, **kw):
    stop_after = kw.pop("stop_after", None)
    resume = kw.pop("resume", False)
    job = Job(out, 0, "cpu", resume=resume, progress=False, stop_after=stop_after)
    return run_reward_model(_cfg(**kw), job, sft_path=tiny_sft, train_pairs=files[0],
                            eval_pairs=files[1])  # fmt: skip


@pytest.fixture(scope="module")
def pair_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("rm_pairs")
    return save_pairs(d / "train.jsonl", _pairs("train", 24)), save_pairs(
        d / "eval.jsonl", _pairs("eval", 8)
    )


@pytest.fixture(scope="module")
def trained(tiny_sft, pair_files, tmp_path_factory):
    out = tmp_path_factory.mktemp("rm") / "reward_model"
    summary = _run(tiny_sft, pair_files, out)
    return out, summary


def test_tiny_run_writes_checkpoint_metrics_and_summary(trained):
    out, summary = trained
    ckpt = load_checkpoint(out / "checkpoint.pt", kind="reward_model")
    keys = {"kind", "stage", "model_config", "tokenizer", "model", "optimizer", "step", "done"}
    assert keys | {"stage_config", "normalization"} <= set(ckpt)
    assert ckpt["done"] and ckpt["step"] == 12
    assert set(ckpt["normalization"]) == {"gain", "bias"} and ckpt["normalization"]["gain"] > 0
    rows = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(1, 13))
    names = {f"{split}/{m}" for split in ("train", "eval") for m in ("loss", "accuracy", "margin")}
    assert names <= set(rows[-1]) and names <= set(rows[5])  # eval every 3 steps
    assert [r["step"] for r in rows if "eval/accuracy" in r] == [3, 6, 9, 12]
    assert 0.0 <= rows[-1]["eval/accuracy"] <= 1.0
    # fact-vs-wrong pairs are easy: the loss falls from its start near log 2
    assert rows[-1]["train/loss"] < rows[0]["train/loss"]
    # 6 of the 24 training prompts (one pair each) choose the checkpoint, 18 train it
    assert (summary["n_train_pairs"], summary["n_validation_pairs"]) == (18, 6)
    assert summary["validation_accuracy"] == summary["best_value"] == ckpt["best_value"]
    report = summary["report"]
    assert report["n_heldout_pairs"] == 8 and report["n_spearman_samples"] == 2 * 40
    assert -1.0 <= report["spearman"] <= 1.0
    # the oracle orders every fact-vs-wrong pair as labelled: the ceiling is 1
    assert report["heldout_ceiling"] == 1.0
    assert report["heldout_gap"] == pytest.approx(1.0 - report["heldout_accuracy"], abs=1e-12)
    assert summary["best_step"] == ckpt["best_step"]
    assert summary["best_value"] == ckpt["best_value"]


def test_final_weights_are_those_of_the_best_evaluation(trained):
    """The stage keeps the evaluation with the best VALIDATION accuracy (ties: the earliest).

    Recomputed from the final checkpoint (raw rewards, each pair's texts re-tokenised):
    on the validation pairs (`validation_split` of the training pairs), the accuracy
    equals the best logged eval/accuracy (1e-9: a count over 6 pairs), and the loss and
    margin equal eval/loss and eval/margin at best_step (1e-6: the same float32 forward,
    measured 0 on the CPU) and not the last step's unless that step is best_step; on the
    held-out pairs, the accuracy is the report's heldout_accuracy. (On the tiny run every
    evaluation scores 5/6, so the earliest, step 3, is kept and its loss differs from
    step 12's by ~0.05; held-out it scores 7/8.)
    """
    out, summary = trained
    ckpt = load_checkpoint(out / "checkpoint.pt", kind="reward_model")
    evals = {r["step"]: r for r in read_metrics(out / "metrics.jsonl") if "eval/accuracy" in r}
    accs = [r["eval/accuracy"] for r in evals.values()]
    best_step = list(evals)[accs.index(max(accs))]  # index(): the earliest of ties
    assert ckpt["best_step"] == summary["best_step"] == best_step
    assert ckpt["best_value"] == pytest.approx(max(accs), abs=1e-12)
    model, tok = build_reward_model(ckpt)
    raw = RewardModel(model, tok, gain=1.0, bias=0.0)

    def metrics(pairs):
        prompts = [p.prompt for p in pairs]
        rc = raw.score_texts(prompts, [p.chosen for p in pairs], [True] * len(pairs))
        rr = raw.score_texts(prompts, [p.rejected for p in pairs], [True] * len(pairs))
        return {
            "eval/accuracy": float((rc > rr).float().mean()),
            "eval/loss": float(bradley_terry_loss(rc, rr).mean()),
            "eval/margin": float((rc - rr).mean()),
        }

    got = metrics(validation_split(_pairs("train", 24), 0.25, seed=0)[1])
    for key, tol in (("eval/accuracy", 1e-9), ("eval/loss", 1e-6), ("eval/margin", 1e-6)):
        want = evals[best_step][key]
        assert abs(got[key] - want) <= tol, f"{key}: {got[key]} vs {want} at step {best_step}"
    if best_step != 12:
        last_loss = evals[12]["eval/loss"]
        assert abs(got["eval/loss"] - last_loss) > 1e-4, "these are the last weights"
    assert summary["validation_accuracy"] == pytest.approx(max(accs), abs=1e-9)
    heldout = metrics(_pairs("eval", 8))["eval/accuracy"]
    assert summary["report"]["heldout_accuracy"] == pytest.approx(heldout, abs=1e-9)


def test_normalisation_is_mean_zero_std_one_on_its_samples(trained, tiny_sft):
    out, _ = trained
    rm = load_reward_model(out / "checkpoint.pt")
    policy, tok = load_policy(tiny_sft)
    # the normalisation samples, redrawn exactly as the stage drew them
    train_prompts = [p.text for p in load_world().prompts("train")]
    cfg = _cfg()
    prompts = [train_prompts[i % len(train_prompts)] for i in range(cfg.n_norm_samples)]
    seed = int(np.random.SeedSequence([0, 5]).generate_state(1)[0])
    samples = sample_responses(policy, tok, prompts, seed=seed, max_new_tokens=cfg.max_new_tokens)
    z = rm.score(samples).double().numpy()
    np.testing.assert_allclose(z.mean(), 0.0, atol=1e-5)
    np.testing.assert_allclose(z.std(), 1.0, atol=1e-5)


def test_score_and_score_texts_agree(trained):
    out, _ = trained
    rm = load_reward_model(out / "checkpoint.pt")
    tok = rm.tok
    texts = [p.chosen for p in _pairs("eval", 3)]
    terminated = [True, False, True]
    samples = [
        Sample("Explain gravity.", t, tok.encode(t) + [tok.eot_id] * done, done)
        for t, done in zip(texts, terminated, strict=True)
    ]
    by_ids = rm.score(samples)
    by_text = rm.score_texts(["Explain gravity."] * 3, texts, terminated)
    assert by_ids.shape == (3,)
    torch.testing.assert_close(by_text, by_ids, atol=1e-5, rtol=0)
    # the end-of-text token is read: dropping it changes the score
    assert (
        abs(float(rm.score_texts(["Explain gravity."], texts[:1], [False])[0] - by_ids[0])) > 1e-4
    )


def test_kind_mismatch_is_refused_both_ways(trained, tiny_sft):
    out, _ = trained
    with pytest.raises(MinidpoError, match="'policy' checkpoint, expected 'reward_model'"):
        load_reward_model(tiny_sft)
    with pytest.raises(MinidpoError, match="'reward_model' checkpoint, expected 'policy'"):
        load_policy(out / "checkpoint.pt")
    with pytest.raises(MinidpoError, match="expected 'policy'"):
        load_checkpoint(out / "checkpoint.pt", kind="policy")
    with pytest.raises(MinidpoError, match="expected 'reward_model'"):
        load_checkpoint(tiny_sft, kind="reward_model")


def test_a_reward_model_as_sft_is_refused(trained, pair_files, tmp_path):
    out, _ = trained
    with pytest.raises(MinidpoError, match="expected 'policy'"):
        _run(out / "checkpoint.pt", pair_files, tmp_path / "rm")


def test_unfinished_run_cannot_be_loaded_and_resumes(tiny_sft, pair_files, trained, tmp_path):
    out = tmp_path / "cut"
    summary = _run(tiny_sft, pair_files, out, stop_after=5)
    assert summary["done"] is False
    with pytest.raises(MinidpoError, match="not normalised"):
        load_reward_model(out / "checkpoint.pt")
    stopped = load_checkpoint(out / "checkpoint.pt")
    assert stopped["step"] == 5 and stopped["best_step"] == 3 and "best_model" in stopped
    _run(tiny_sft, pair_files, out, resume=True)
    full = load_checkpoint(trained[0] / "checkpoint.pt")
    resumed = load_checkpoint(out / "checkpoint.pt")
    for k in full["model"]:
        torch.testing.assert_close(resumed["model"][k], full["model"][k], atol=0, rtol=0)
    assert resumed["normalization"] == full["normalization"]
    for key in ("best_metric", "best_step", "best_value"):
        assert resumed[key] == full[key], key

    def no_time(path):
        return [
            {k: v for k, v in r.items() if not k.startswith("time/")} for r in read_metrics(path)
        ]

    assert no_time(out / "metrics.jsonl") == no_time(trained[0] / "metrics.jsonl")


def test_margin_option_needs_scores(tiny_sft, tmp_path):
    pairs = [PreferencePair(p.prompt, p.chosen, p.rejected) for p in _pairs("train", 4)]
    files = (save_pairs(tmp_path / "t.jsonl", pairs), save_pairs(tmp_path / "e.jsonl", pairs))
    with pytest.raises(MinidpoError, match=r"t\.jsonl: pair 1 has no score"):
        _run(tiny_sft, files, tmp_path / "rm", margin=True)


def test_reward_model_scores_an_unterminated_response_at_its_last_token():
    torch.manual_seed(0)
    body = GPT(GPTConfig(vocab_size=257, block_size=32, n_layer=1, n_embd=8))
    tok = train_bpe(["Hi?\nab"], 257)  # bytes only, and end-of-text = 256
    rm = RewardModel(ScalarHeadModel(body), tok, gain=2.0, bias=1.0)
    s = Sample("Hi?", "ab", [97, 98], terminated=False)
    prompt = tok.encode("Hi?\n")
    with torch.no_grad():
        raw = rm.model(torch.tensor([[*prompt, 97, 98]]))[0, -1]
    torch.testing.assert_close(rm.score([s]), (2.0 * raw + 1.0).reshape(1), atol=1e-5, rtol=0)


def test_the_checkpoint_is_chosen_on_validation_pairs_only(
    tiny_sft, pair_files, tmp_path, monkeypatch
):
    """The eval_fn that keep_best chooses by reads the validation pairs and nothing else:
    prompts carved out of the training file, never in a training batch, none held out;
    without a held-out file it still chooses on them (and there is no report)."""
    _, tok = load_policy(tiny_sft)
    train, valid = validation_split(_pairs("train", 24), 0.25, seed=0)
    train_prompts, valid_prompts = {p.prompt for p in train}, {p.prompt for p in valid}
    heldout_prompts = {p.prompt for p in _pairs("eval", 8)}
    assert len(valid_prompts) == 6 and not valid_prompts & heldout_prompts
    ids = {p: tok.encode(format_prompt(p)) for p in train_prompts | valid_prompts}

    def prompt_of(row):  # each row starts with its prompt's own tokens
        (found,) = [p for p, x in ids.items() if row[: len(x)] == x]
        return found

    seen: dict[str, set] = {}
    phase, chosen_by = ["train"], []
    real_pair_rewards, real_train = reward_model.pair_rewards, reward_model.train

    def spy_pair_rewards(model, batch, pooling="last"):
        seen[phase[0]].update(prompt_of(row) for row in batch.input_ids.tolist())
        return real_pair_rewards(model, batch, pooling)

    def spy_train(model, *, eval_fn, keep_best, **kw):
        chosen_by.append(keep_best)

        def watched(m):
            phase[0] = "eval"
            try:
                return eval_fn(m)
            finally:
                phase[0] = "train"

        return real_train(model, eval_fn=watched, keep_best=keep_best, **kw)

    monkeypatch.setattr(reward_model, "pair_rewards", spy_pair_rewards)
    monkeypatch.setattr(reward_model, "train", spy_train)
    for held_out in (pair_files[1], None):
        seen.update(train=set(), eval=set())
        job = Job(tmp_path / f"rm-{held_out is None}", 0, "cpu", progress=False)
        summary = run_reward_model(_cfg(steps=6), job, sft_path=tiny_sft,
                                   train_pairs=pair_files[0], eval_pairs=held_out)  # fmt: skip
        assert seen["eval"] == valid_prompts
        assert seen["train"] and seen["train"] <= train_prompts
        assert (summary["n_train_pairs"], summary["n_validation_pairs"]) == (18, 6)
        assert summary["best_step"] in (3, 6)
        assert summary["validation_accuracy"] == summary["best_value"]
        assert ("report" in summary) == (held_out is not None)
    assert chosen_by == ["accuracy", "accuracy"]


def test_the_stage_stamp_reports_validation_beside_held_out(monkeypatch, tmp_path):
    """The rm stage's stamp carries the choice's accuracy and the held-out score apart."""
    summary = {"best_step": 30, "best_value": 0.75, "validation_accuracy": 0.75,
               "n_train_pairs": 1152, "n_validation_pairs": 128, "tokens": 10,
               "train/loss": 0.5, "report": {"heldout_accuracy": 0.7, "heldout_ceiling": 0.9,
                                             "heldout_gap": 0.2, "spearman": 0.5}}  # fmt: skip
    monkeypatch.setattr(reward_model, "run_reward_model", lambda *a, **kw: summary)
    paths = SimpleNamespace(held_out_pairs=None, rm_dir=tmp_path / "rm",
                            sft=tmp_path / "sft.pt", train_pairs=tmp_path / "train.jsonl")  # fmt: skip
    ctx = SimpleNamespace(paths=paths, run=SimpleNamespace(seed=0), device="cpu",
                          progress=False, cfg={"rm": _cfg()})  # fmt: skip
    stamp = reward_model._reward_model(ctx, False)
    assert stamp["validation_accuracy"] == 0.75 and stamp["heldout_accuracy"] == 0.7
    assert (stamp["n_train_pairs"], stamp["n_validation_pairs"]) == (1152, 128)
    assert (stamp["best_step"], stamp["heldout_gap"], stamp["spearman"]) == (30, 0.2, 0.5)


def test_the_validation_split_needs_two_prompts_and_a_fraction_in_0_1(tiny_sft, tmp_path):
    one = [PreferencePair("Explain gravity.", f"Fact {i}.", f"Wrong {i}.") for i in range(4)]
    files = (save_pairs(tmp_path / "one.jsonl", one), None)
    with pytest.raises(MinidpoError, match=r"one\.jsonl: all pairs share one prompt"):
        _run(tiny_sft, files, tmp_path / "rm")
    for bad in (0.0, 1.0):
        with pytest.raises(MinidpoError, match="--validation-fraction"):
            _run(tiny_sft, files, tmp_path / "rm", validation_fraction=bad)
