"""The DPO trainer: pi_theta initialised from SFT, trained on preference pairs with Eq. 7.

    L_DPO = -E[ log sigmoid( beta log pi(y_w|x)/pi_ref(y_w|x) - beta log pi(y_l|x)/pi_ref(y_l|x) ) ]

What makes it cheap, as in the reference implementation:
- the reference log-probs log pi_ref(y|x) are computed ONCE, in batches, before
  training, and cached in the run's ``prefs/`` folder (``<pairs>.ref-<key>.pt``, keyed
  by the content hash of the pairs file and of the SFT checkpoint; never beside a
  ``--pairs`` file of the user's, whose folder may be read-only), so no reference model
  sits in memory during training and nothing is recomputed unless the pairs or
  the SFT checkpoint change;
- chosen and rejected responses go through the policy in one concatenated
  forward (`minidpo.logprobs.concatenated_logprobs`).

Metrics follow TRL's names: loss, rewards/chosen, rewards/rejected,
rewards/accuracies, rewards/margins, logps/chosen, logps/rejected (prefixed
train/ and eval/; eval is every held-out pair). With the displacement remedies of
``minidpo.losses`` on, loss/nll (--nll-alpha > 0, the unweighted mean token NLL of
y_w) and loss/dpop_penalty (--dpop-lambda > 0) are logged too. On the held-out
pairs, logps/chosen_rose and logps/rejected_rose are the shares of pairs whose
policy log-prob is above the reference's: likelihood displacement (Razin et al.
2024, arXiv 2410.08847) shows as eval/logps/chosen_rose near 0 while
eval/rewards/accuracies rises.

Left out: a reference model updated during training (TR-DPO), length
normalisation, padding-free packing.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from minidpo import distributed
from minidpo.atomic import atomic_torch_save, atomic_write_json
from minidpo.batching import Batch
from minidpo.checkpoints import file_sha256, provenance, stage_state
from minidpo.config import DPOConfig, to_dict
from minidpo.logprobs import concatenated_logprobs
from minidpo.losses import check_loss_args, preference_loss
from minidpo.policy import load_policy
from minidpo.preferences import (
    PreferencePair,
    TokenizedPairs,
    load_pairs,
    tokenize_pairs,
    validation_split,
)
from minidpo.seeds import stream
from minidpo.stage import Context, Method, Stage, method_config, training_summary
from minidpo.training import Job, LoopConfig, train


@torch.no_grad()
def compute_logps(
    model: torch.nn.Module, data: TokenizedPairs, pad_id: int, batch_size: int = 64
) -> tuple[torch.Tensor, torch.Tensor]:
    """log pi(y_w|x), log pi(y_l|x) for every pair, in batches: (N,), (N,) on CPU."""
    device = next(model.parameters()).device
    model.eval()
    chosen, rejected = [], []
    for s in range(0, len(data), batch_size):
        idx = range(s, min(s + batch_size, len(data)))
        c, r = concatenated_logprobs(model, data.batch(idx, pad_id).to(device))
        chosen.append(c.float().cpu())
        rejected.append(r.float().cpu())
    return torch.cat(chosen), torch.cat(rejected)


def reference_logps(
    pairs_path: Path,
    sft_path: Path,
    data: TokenizedPairs,
    pad_id: int,
    device: torch.device,
    cache_dir: Path,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference log-probs of every pair, from the cache in `cache_dir` when it is current.

    The cache key is the hash of the pairs file and of the SFT checkpoint: change
    either and the cache is recomputed (with the reference model loaded only then).
    """
    key = hashlib.sha256((file_sha256(pairs_path) + file_sha256(sft_path)).encode()).hexdigest()
    cache = Path(cache_dir) / f"{pairs_path.stem}.ref-{key[:16]}.pt"
    if cache.exists():
        try:
            saved = torch.load(cache, map_location="cpu", weights_only=True)
            if saved.get("key") == key and len(saved["chosen"]) == len(data):
                return saved["chosen"], saved["rejected"]
        except Exception:
            pass  # unreadable cache: recompute it
    ref, _ = load_policy(sft_path)
    chosen, rejected = compute_logps(ref.to(device), data, pad_id)
    atomic_torch_save({"key": key, "chosen": chosen, "rejected": rejected}, cache)
    del ref
    return chosen, rejected


def chosen_lengths(data: TokenizedPairs) -> torch.Tensor:
    """|y_w| of every pair (N,): its tokens, end-of-text included, as the response mask counts."""
    return torch.tensor([len(c) for c in data.chosen], dtype=torch.float32)


def preference_metrics(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    cfg: DPOConfig,
    lengths: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Mean loss over the pairs and TRL-named metrics; `lengths` (|y_w|, (B,)) for --nll-alpha."""
    out = preference_loss(
        policy_chosen,
        policy_rejected,
        ref_chosen,
        ref_rejected,
        beta=cfg.beta,
        loss_type=cfg.loss,
        label_smoothing=cfg.label_smoothing,
        nll_alpha=cfg.nll_alpha,
        dpop_lambda=cfg.dpop_lambda,
        chosen_lengths=lengths,
    )
    loss = out.losses.mean()
    margins = out.chosen_rewards - out.rejected_rewards
    metrics = {
        "loss": loss.item(),
        "rewards/chosen": out.chosen_rewards.mean().item(),
        "rewards/rejected": out.rejected_rewards.mean().item(),
        "rewards/accuracies": (margins > 0).float().mean().item(),
        "rewards/margins": margins.mean().item(),
        "logps/chosen": policy_chosen.detach().mean().item(),
        "logps/rejected": policy_rejected.detach().mean().item(),
    }
    if out.nll is not None:
        metrics["loss/nll"] = out.nll.mean().item()
    if out.dpop_penalty is not None:
        metrics["loss/dpop_penalty"] = out.dpop_penalty.mean().item()
    return loss, metrics


def displacement_metrics(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
) -> dict[str, float]:
    """Shares of pairs whose policy log-prob rose above the reference's, chosen and rejected.

    Likelihood displacement (Razin et al. 2024, arXiv 2410.08847) is logps/chosen_rose
    near 0: the margin grows while log pi(y_w|x) falls too.
    """
    return {
        "logps/chosen_rose": (policy_chosen > ref_chosen).float().mean().item(),
        "logps/rejected_rose": (policy_rejected > ref_rejected).float().mean().item(),
    }


def batch_indices(seed: int, step: int, n_pairs: int, batch_size: int) -> np.ndarray:
    """The pairs of training step `step`, in epochs: epoch e is a permutation of the
    `n_pairs` drawn from its own stream, cut into n_pairs // batch_size batches (the
    remainder waits for a later epoch's shuffle), so every pair is seen once an epoch,
    a resumed run draws the same, and the TRL parity test feeds TRL these batches."""
    size = min(batch_size, n_pairs)
    per_epoch = n_pairs // size
    epoch, j = divmod(step, per_epoch)
    return stream(seed, "dpo/batch", epoch).permutation(n_pairs)[j * size : (j + 1) * size]


def split_indices(
    pairs: Sequence[PreferencePair], fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Indices of the training and the validation pairs of a pair file: the validation
    split (`validation_split`, by prompt, the reward model's rule) decides convergence and
    is never trained on. Indices, because the file's reference log-probs are cached whole."""
    if fraction <= 0:
        return np.arange(len(pairs)), np.arange(0)
    held = {id(p) for p in validation_split(pairs, fraction, seed)[1]}
    inside = np.array([id(p) in held for p in pairs], dtype=bool)
    return np.flatnonzero(~inside), np.flatnonzero(inside)


Evaluated = tuple[TokenizedPairs, torch.Tensor, torch.Tensor]  # pairs, reference logps


def evaluator(
    cfg: DPOConfig, eot_id: int, valid: Evaluated | None, held_out: Evaluated | None
) -> Callable[[torch.nn.Module], dict[str, float]] | None:
    """The DPO run's evaluation: ``valid/*`` on the validation split (what the convergence
    rule reads), the preference and displacement metrics on the held-out pairs."""
    if valid is None and held_out is None:
        return None

    def eval_fn(model: torch.nn.Module) -> dict[str, float]:
        metrics: dict[str, float] = {}
        if valid is not None:
            data, rc, rr = valid
            pc, pr = compute_logps(model, data, eot_id)
            got = preference_metrics(pc, pr, rc, rr, cfg, chosen_lengths(data))[1]
            metrics.update({f"valid/{k}": v for k, v in got.items()})
        if held_out is not None:
            data, rc, rr = held_out
            pc, pr = compute_logps(model, data, eot_id)
            metrics.update(preference_metrics(pc, pr, rc, rr, cfg, chosen_lengths(data))[1])
            metrics.update(displacement_metrics(pc, pr, rc, rr))
        return metrics

    return eval_fn


def run_dpo(
    cfg: DPOConfig,
    job: Job,
    *,
    sft_path: Path,
    train_pairs: Path,
    eval_pairs: Path | None,
    cache_dir: Path,
    ref_path: Path | None = None,
) -> dict[str, Any]:
    """Train a DPO policy from the SFT checkpoint on the pairs; returns the final metrics.
    Both pair files are read and checked before anything is written; the reference
    log-probs are cached in `cache_dir` (the run's prefs folder). `ref_path`: a reference
    other than the starting policy (online DPO's rounds, the reference's role); default
    `sft_path`, the paper's pi_ref = pi_SFT."""
    check_loss_args(cfg.beta, cfg.loss, cfg.label_smoothing, nll_alpha=cfg.nll_alpha,
                    dpop_lambda=cfg.dpop_lambda)  # fmt: skip
    other_ref = {} if ref_path in (None, sft_path) else {"ref": ref_path}
    stage_config = provenance("dpo", cfg, job.seed, sft=sft_path, pairs=train_pairs, **other_ref)
    seed, device, out_dir = job.seed, torch.device(job.device), job.out_dir
    policy, tok = load_policy(sft_path, device)
    block = policy.config.block_size
    all_pairs = load_pairs(train_pairs)[0]
    train_data = tokenize_pairs(all_pairs, tok, block, str(train_pairs))
    train_idx, valid_idx = split_indices(all_pairs, cfg.validation_fraction, seed)
    if eval_pairs is not None:
        eval_data = tokenize_pairs(load_pairs(eval_pairs)[0], tok, block, str(eval_pairs))
    ref_path = sft_path if ref_path is None else ref_path
    ref_c, ref_r = reference_logps(train_pairs, ref_path, train_data, tok.eot_id, device, cache_dir)
    train_lengths = chosen_lengths(train_data)
    if eval_pairs is not None:
        eval_ref = reference_logps(eval_pairs, ref_path, eval_data, tok.eot_id, device, cache_dir)

    def get_batch(step: int) -> tuple[Batch, torch.Tensor]:
        idx = train_idx[distributed.shard(batch_indices(seed, step, len(train_idx),
                                                        cfg.batch_size))]  # fmt: skip
        return train_data.batch(idx, tok.eot_id).to(device), torch.as_tensor(idx)

    def loss_fn(model: torch.nn.Module, item: tuple[Batch, torch.Tensor]):
        batch, idx = item
        pc, pr = concatenated_logprobs(model, batch)
        loss, metrics = preference_metrics(
            pc, pr, ref_c[idx].to(device), ref_r[idx].to(device), cfg, train_lengths[idx].to(device)
        )
        return loss, {**metrics, "tokens": batch.n_tokens}

    valid = (train_data.subset(valid_idx), ref_c[valid_idx], ref_r[valid_idx])
    held_out = (eval_data, *eval_ref) if eval_pairs is not None else None
    eval_fn = evaluator(cfg, tok.eot_id, valid if len(valid_idx) else None, held_out)

    loop = LoopConfig.from_config(cfg, desc=f"dpo[{cfg.loss}, beta={cfg.beta:g}]")
    extra = stage_state(kind="policy", stage="dpo", model_config=to_dict(policy.config),
                        tokenizer=tok.to_dict(), config=stage_config)  # fmt: skip
    t0 = time.perf_counter()
    last = train(
        policy,
        loop=loop,
        job=job,
        get_batch=get_batch,
        loss_fn=loss_fn,
        checkpoint_extra=extra,
        eval_fn=eval_fn,
        stop_on="valid/loss" if len(valid_idx) else None,
    )
    summary = {**last, "wall_s_total": time.perf_counter() - t0, "n_train_pairs": len(train_idx),
               "n_validation_pairs": len(valid_idx)}  # fmt: skip
    if last["finished"]:
        atomic_write_json(out_dir / "summary.json", summary)
    return summary


def _ref_logps(ctx: Context, resume: bool) -> dict[str, Any]:
    """Reference log-probs of every pair, computed once and cached in the run's prefs/."""
    _, tok = load_policy(ctx.paths.sft)
    block = ctx.cfg["model"].block_size
    tokens = 0
    for path in ctx.pairs:
        for old in ctx.paths.prefs_dir.glob(f"{path.stem}.ref-*.pt"):
            old.unlink()  # the stage reruns only when they are stale
        data = tokenize_pairs(load_pairs(path, warn=False)[0], tok, block, str(path))
        reference_logps(path, ctx.paths.sft, data, tok.eot_id, ctx.device, ctx.paths.prefs_dir)
        tokens += sum(2 * len(p) + len(c) + len(r)
                      for p, c, r in zip(data.prompts, data.chosen, data.rejected, strict=True))  # fmt: skip
    return {"tokens_forward": tokens}


REF_LOGPS_STAGE = Stage(
    "ref_logps", _ref_logps, ("model",), ("sft", "prefs"),
    inputs=lambda c: [c.paths.sft, *c.pairs],
    outputs=lambda c: sorted(c.paths.prefs_dir.glob("*.ref-*.pt")),
)  # fmt: skip


def stage(
    name: str = "dpo",
    *,
    overrides: dict[str, Any] | Callable[[Context], dict[str, Any]] | None = None,
    seed: int | None = None,
    folder: Callable[[Context], Path] | None = None,
) -> Stage:
    """The DPO stage: the run's own (``dpo``), or a sweep's or a lesson's run with
    `overrides` of DPOConfig fields (or a function of the context giving them), its own
    `seed` and `folder`."""

    def over(ctx: Context) -> dict[str, Any] | None:
        return overrides(ctx) if callable(overrides) else overrides

    def config(ctx: Context) -> DPOConfig:
        return method_config(ctx, "dpo", over(ctx), "steps")

    def out(ctx: Context) -> Path:
        if folder:
            return folder(ctx)
        cfg = config(ctx)
        tag = "-".join(
            f"{k}{v:g}" for k, v in (("nll", cfg.nll_alpha), ("dpop", cfg.dpop_lambda)) if v
        )
        return ctx.paths.dpo_dir(cfg.loss, cfg.beta, cfg.label_smoothing, tag)

    def inputs(ctx: Context) -> list[Path]:
        held_out = ctx.paths.held_out_pairs
        return [ctx.paths.sft, ctx.paths.train_pairs, *([held_out] if held_out else [])]

    def fn(ctx: Context, resume: bool) -> dict[str, Any]:
        held_out = ctx.paths.held_out_pairs
        job = Job(out(ctx), ctx.run.seed if seed is None else seed, ctx.device, resume,
                  ctx.progress)  # fmt: skip
        s = run_dpo(config(ctx), job, sft_path=ctx.paths.sft, train_pairs=ctx.paths.train_pairs,
                    eval_pairs=held_out, cache_dir=ctx.paths.prefs_dir)  # fmt: skip
        return training_summary(s)

    return Stage(name, fn, ("dpo",), ("ref_logps",), inputs=inputs,
                 outputs=lambda c: [out(c) / "checkpoint.pt"],
                 extra_key=lambda c: [over(c), seed],
                 check=lambda c: config(c).validate())  # fmt: skip


METHOD = Method(
    "DPO", stage("dpo"), key="beta", value=lambda c: c.cfg["dpo"].beta, cost_with=("ref_logps",),
    sweep=lambda c: c.cfg["pipeline"].floats("sweep_dpo_betas"),
    variant=lambda name, beta, seed, folder: stage(name, overrides={"beta": beta}, seed=seed,
                                                   folder=folder),
    folder="dpo-beta",
)  # fmt: skip


def _remedy(name: str, field: str, key: str, value: Callable[[Context], float]) -> Method:
    """DPO at the pipeline's beta with one likelihood-displacement remedy switched on."""
    return Method(
        name, stage(name.lower().replace("+", "_"), overrides=lambda c: {field: value(c)}),
        key=key, value=value, cost_with=("ref_logps",), sweep=lambda c: [value(c)],
        variant=lambda run, v, seed, folder: stage(run, overrides={field: v}, seed=seed,
                                                   folder=folder),
        folder=f"{name.lower().replace('+', '-')}-{key}",
    )  # fmt: skip


# Two remedies for likelihood displacement (Razin et al. 2024, arXiv 2410.08847), each a
# method of its own on the frontier: the chosen response's NLL added to the loss (RPO,
# Pang et al. 2024) and DPOP's penalty on a falling chosen log-prob (Pal et al. 2024).
NLL_METHOD = _remedy("DPO+NLL", "nll_alpha", "alpha", lambda c: c.cfg["pipeline"].nll_remedy_alpha)
DPOP_METHOD = _remedy(
    "DPOP", "dpop_lambda", "lambda", lambda c: c.cfg["pipeline"].dpop_remedy_lambda
)
