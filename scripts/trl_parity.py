"""minidpo's DPO trainer beside TRL's DPOTrainer, step by step, on the same model and batches.

    python scripts/trl_parity.py --sft runs/default/sft/checkpoint.pt \\
        --pairs runs/default/prefs/train.jsonl --steps 10 --out parity.json \\
        --policy runs/default/dpo-sigmoid-beta0.1/checkpoint.pt --rm runs/default/rm/checkpoint.pt

For each loss type both trainers share (sigmoid = DPO, robust, hinge): `minidpo dpo`'s
trainer runs `--steps` steps; the same policy, exported by `minidpo export --hf`, and the
pairs of those steps in minidpo's order, exported in TRL's text form, go through TRL's
DPOTrainer with the same optimiser (AdamW, betas 0.9/0.95, minidpo's learning-rate
schedule) and gradient clipping, sampling in order. The script prints, for every logged
metric, the largest difference over the steps, and for the weights after the last step;
`tests/test_trl_parity.py` asserts them on the tiny preset. TRL reads and tokenises the
text itself, so the same numbers also check the export's token ids.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import sys
from pathlib import Path

import torch
from datasets import Dataset
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PrinterCallback,
)
from trl import DPOConfig as TRLConfig
from trl import DPOTrainer

from minidpo.config import DPOConfig, resolve
from minidpo.dpo import batch_indices, run_dpo
from minidpo.export import export_hf, hf_state_dict, trl_rows
from minidpo.policy import load_policy
from minidpo.preferences import PreferencePair, load_pairs, save_pairs, tokenize_pairs
from minidpo.reward_model import load_reward_model
from minidpo.training import Job, lr_at, make_optimizer, read_metrics

METRICS = ("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies",
           "rewards/margins", "logps/chosen", "logps/rejected")  # fmt: skip
# (minidpo --loss, --label-smoothing) and TRL's loss_type with the same formula
LOSSES = {"sigmoid": ("sigmoid", 0.0), "robust": ("robust", 0.1), "hinge": ("hinge", 0.0)}


def trl_trainer(hf_dir: Path, rows: list[dict], cfg: DPOConfig, work: Path) -> DPOTrainer:
    """TRL's DPOTrainer on the exported model, set up as minidpo trains: the same AdamW and
    schedule, batches in the file's order, float32 on the CPU, no checkpointing or bf16."""
    policy = AutoModelForCausalLM.from_pretrained(hf_dir)
    ref = AutoModelForCausalLM.from_pretrained(hf_dir)
    opt = make_optimizer(policy, cfg.lr, cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_at(
        s, lr=1.0, warmup_steps=cfg.warmup_steps, max_steps=cfg.steps,
        min_lr_ratio=cfg.min_lr_ratio))  # fmt: skip
    args = TRLConfig(
        output_dir=str(work / "trl"), per_device_train_batch_size=cfg.batch_size,
        max_steps=cfg.steps, beta=cfg.beta, loss_type=[cfg.loss],
        label_smoothing=cfg.label_smoothing, learning_rate=cfg.lr,
        max_grad_norm=cfg.grad_clip, logging_steps=1, report_to=[], bf16=False,
        gradient_checkpointing=False, use_cpu=True, train_sampling_strategy="sequential",
        save_strategy="no", max_length=None, seed=0, disable_tqdm=True,
    )  # fmt: skip
    trainer = DPOTrainer(model=policy, ref_model=ref, args=args,
                         train_dataset=Dataset.from_list(rows),
                         processing_class=AutoTokenizer.from_pretrained(hf_dir),
                         optimizers=(opt, sched))  # fmt: skip
    trainer.remove_callback(PrinterCallback)  # the logs are read from state.log_history
    return trainer


def run_both(sft: Path, pairs: list[PreferencePair], cfg: DPOConfig, work: Path) -> dict:
    """Both trainers for `cfg.steps` steps; per metric the largest |difference| over steps
    (every pair trained on, no convergence rule: TRL's trainer has none)."""
    cfg = dataclasses.replace(cfg, validation_fraction=0.0, patience=0, snapshot_every=0)
    shutil.rmtree(work, ignore_errors=True)  # a fresh run each time (no resume)
    work.mkdir(parents=True)
    train = save_pairs(work / "train.jsonl", pairs)
    run_dpo(cfg, Job(work / "minidpo", 0, "cpu", progress=False), sft_path=sft,
            train_pairs=train, eval_pairs=None, cache_dir=work / "cache")  # fmt: skip
    mine = read_metrics(work / "minidpo" / "metrics.jsonl")
    order = [pairs[i] for s in range(cfg.steps)
             for i in batch_indices(0, s, len(pairs), cfg.batch_size)]  # fmt: skip
    export_hf(sft, work / "hf", force=True)
    trainer = trl_trainer(work / "hf", trl_rows(order, str(train))[0], cfg, work)
    trainer.train()
    theirs = [h for h in trainer.state.log_history if "rewards/chosen" in h]
    assert len(mine) == len(theirs) == cfg.steps, (len(mine), len(theirs))
    out = {m: max(abs(a[f"train/{m}"] - b[m]) for a, b in zip(mine, theirs, strict=True))
           for m in METRICS}  # fmt: skip
    out["logps/chosen relative"] = max(
        abs(a["train/logps/chosen"] - b["logps/chosen"]) / abs(a["train/logps/chosen"])
        for a, b in zip(mine, theirs, strict=True))  # fmt: skip
    trained = hf_state_dict(load_policy(work / "minidpo" / "checkpoint.pt")[0])
    hf = trainer.model.state_dict()
    out["weights"] = max((trained[k] - hf[k]).abs().max().item() for k in trained)
    out["loss first, last"] = [mine[0]["train/loss"], mine[-1]["train/loss"]]
    return out


def logits_gap(ckpt: Path, pairs: list[PreferencePair], work: Path) -> float:
    """Largest |logit| difference, float32, between a minidpo policy and its export, over
    the real positions of the first 64 pairs' [chosen; rejected] batch."""
    model, tok = load_policy(ckpt)
    export_hf(ckpt, work / "hf-logits", force=True)
    hf = AutoModelForCausalLM.from_pretrained(work / "hf-logits").eval()
    batch = tokenize_pairs(pairs[:64], tok, model.config.block_size, "pairs").batch(
        range(min(64, len(pairs))), tok.eot_id)  # fmt: skip
    real = batch.labels >= 0
    with torch.no_grad():
        gap = (model(batch.input_ids) - hf(batch.input_ids).logits)[real].abs().max()
    return gap.item()


def reward_gap(ckpt: Path, pairs: list[PreferencePair], work: Path) -> float:
    """Largest |reward| difference between a minidpo reward model and its export (the
    sequence-classification logit) on the first 64 pairs' chosen responses, batched."""
    rm = load_reward_model(ckpt)
    export_hf(ckpt, work / "hf-rm", force=True)
    hf = AutoModelForSequenceClassification.from_pretrained(work / "hf-rm").eval()
    hf_tok = AutoTokenizer.from_pretrained(work / "hf-rm")
    rows = trl_rows(pairs[:64], "pairs")[0]
    mine = rm.score_texts([p.prompt for p in pairs[:64]], [p.chosen for p in pairs[:64]],
                          [p.chosen_terminated for p in pairs[:64]])  # fmt: skip
    enc = hf_tok([r["prompt"] + r["chosen"] for r in rows], padding=True, return_tensors="pt")
    with torch.no_grad():
        return (mine - hf(**enc).logits[:, 0]).abs().max().item()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sft", required=True, help="minidpo SFT checkpoint (the start and reference)")
    ap.add_argument("--pairs", required=True, help="minidpo pairs file (TRL form)")
    ap.add_argument("--policy", help="also: the logits of this policy against its export")
    ap.add_argument("--rm", help="also: the rewards of this reward model against its export")
    ap.add_argument("--preset", default="cpu", help="DPO settings of this preset (default cpu)")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--work", default="runs/trl-parity", help="scratch folder")
    ap.add_argument("--out", help="write the figures as JSON here")
    a = ap.parse_args()
    pairs = load_pairs(a.pairs)[0]
    results: dict = {}
    if a.policy:
        results["policy logits"] = logits_gap(Path(a.policy), pairs, Path(a.work))
    if a.rm:
        results["reward model"] = reward_gap(Path(a.rm), pairs, Path(a.work))
    print(json.dumps(results), flush=True)
    for name, (loss, eps) in LOSSES.items():
        cfg = resolve(DPOConfig, "dpo", a.preset, None)
        cfg.loss, cfg.label_smoothing, cfg.steps = loss, eps, a.steps
        results[name] = run_both(Path(a.sft), pairs, cfg, Path(a.work) / name)
        print(name, json.dumps(results[name]), flush=True)
    if a.out:
        Path(a.out).write_text(json.dumps({"command": " ".join(sys.argv), **results}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
