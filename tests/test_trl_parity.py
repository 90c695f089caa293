"""The parity test against TRL: `minidpo dpo` and TRL's DPOTrainer, fed the exported model
and the exported pairs, agree step by step (`scripts/trl_parity.py` does the work)."""

import importlib.util
from pathlib import Path

import pytest

from minidpo.config import DPOConfig, resolve
from minidpo.export import TRL_VERSION, export_hf, trl_rows
from minidpo.policy import load_policy
from minidpo.preferences import PreferencePair, tokenize_pairs

trl = pytest.importorskip("trl", reason="the hf extra (make test installs it)")
ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("trl_parity", ROOT / "scripts" / "trl_parity.py")
parity = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(parity)

# Stated tolerances (float32 on the CPU; measured in the README's parity table)
# measured on the tiny preset: at most 6.0e-7 (loss, rewards), 1.0e-7 (logps, relative)
ATOL = {"loss": 3e-6, "rewards/chosen": 3e-6, "rewards/rejected": 3e-6, "rewards/margins": 3e-6,
        "rewards/accuracies": 0.0}  # fmt: skip
LOGPS_RTOL = 1e-6  # logps/* are sums of ~20 token log-probs (~-70): relative
# Every parameter after the last step. Adam divides each gradient by its own running RMS,
# so float32 noise on a near-zero gradient moves a weight by up to a fraction of lr (1e-3
# here): measured 3.1e-6 (sigmoid), 3.3e-6 (robust), 1.0e-5 (hinge, whose kink sharpens it).
WEIGHTS_ATOL = 5e-5


def test_pinned_trl_is_the_one_documented():
    assert trl.__version__ == TRL_VERSION


@pytest.mark.slow
@pytest.mark.parametrize("name", list(parity.LOSSES))
def test_minidpo_and_trl_agree_step_by_step(name, tiny_sft, tmp_path, fact_pairs):
    loss, eps = parity.LOSSES[name]
    cfg = resolve(DPOConfig, "dpo", "tiny", None)
    cfg.loss, cfg.label_smoothing = loss, eps
    cfg.steps, cfg.batch_size, cfg.lr, cfg.warmup_steps = 5, 4, 1e-3, 2  # a schedule that moves
    gaps = parity.run_both(tiny_sft, fact_pairs("train", 24), cfg, tmp_path)
    for metric, tol in ATOL.items():
        assert gaps[metric] <= tol, (metric, gaps[metric])
    assert gaps["logps/chosen relative"] <= LOGPS_RTOL, gaps
    assert gaps["weights"] <= WEIGHTS_ATOL, gaps
    first, last = gaps["loss first, last"]
    assert abs(first - last) > 1e-3, "training moved the loss, so the comparison can fail"


def test_trl_tokenises_the_exported_pairs_to_minidpos_ids(tiny_sft, tmp_path, fact_pairs):
    """TRL's own tokenisation of the text form: the ids minidpo trains on. The one case it
    cannot give: a response that never terminated gains an end-of-text in TRL."""
    pairs = fact_pairs("train", 8)
    pairs[3] = PreferencePair(pairs[3].prompt, pairs[3].chosen, pairs[3].rejected,
                              rejected_terminated=False)  # fmt: skip
    _, tok = load_policy(tiny_sft)
    export_hf(tiny_sft, tmp_path / "hf")
    cfg = resolve(DPOConfig, "dpo", "tiny", None)
    rows, unterminated = trl_rows(pairs, "x")
    assert unterminated == 1
    ds = parity.trl_trainer(tmp_path / "hf", rows, cfg, tmp_path).train_dataset
    mine = tokenize_pairs(pairs, tok, 128, "x")
    assert list(ds["prompt_ids"]) == mine.prompts
    assert list(ds["chosen_ids"]) == mine.chosen
    theirs = list(ds["rejected_ids"])
    assert [r for i, r in enumerate(theirs) if i != 3] == [
        r for i, r in enumerate(mine.rejected) if i != 3
    ]
    assert theirs[3] == [*mine.rejected[3], tok.eot_id]  # TRL appends EOS to every response
