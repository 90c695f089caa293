"""Unlikelihood: the paper's third cheap baseline (arXiv 2305.18290, Sec. 6), one stage file.

"Unlikelihood [Welleck et al. 2019, arXiv 1908.04319] simply optimizes the policy to
maximize the probability assigned to y_w and minimize the probability assigned to y_l;
we use an optional coefficient alpha in [0, 1] on the unlikelihood term." Starting from
pi_SFT, on the same pairs as DPO, per pair:

    L_UL = -log pi(y_w|x) - alpha * sum_t log(1 - pi(y_l,t | x, y_l,<t))

the likelihood of the chosen response plus Welleck's token-level unlikelihood of the
rejected one (`minidpo.losses.unlikelihood_loss`). The unlikelihood term is bounded
(each token's term is at most 0 and vanishes as its probability does); maximising
-log pi(y_l|x) instead would be unbounded. No reference model and no KL term: like
Preferred-FT, nothing holds the policy near pi_SFT but the step count.

This file is also the worked example of adding a method (docs/ARCHITECTURE.md):
the trainer, its `Stage`, its `Method`, and one line in `minidpo.pipeline.METHODS`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from minidpo.atomic import atomic_write_json
from minidpo.batching import Batch
from minidpo.checkpoints import provenance, stage_state
from minidpo.config import _f, to_dict
from minidpo.errors import MinidpoError
from minidpo.logprobs import token_logprobs
from minidpo.losses import unlikelihood_loss
from minidpo.policy import load_policy
from minidpo.preferences import TokenizedPairs, load_pairs, tokenize_pairs
from minidpo.seeds import stream
from minidpo.stage import Context, Method, Stage, method_config, training_summary
from minidpo.training import Job, LoopConfig, train


@dataclass
class UnlikelihoodConfig:
    """Unlikelihood: the chosen response's likelihood, the rejected one's unlikelihood."""

    alpha: float = _f(0.5, "weight of the unlikelihood term (the paper sweeps 0.05 to 1)")
    steps: int = _f(150, "optimizer steps")
    batch_size: int = _f(32, "pairs per step")
    lr: float = _f(3e-4, "peak learning rate (AdamW), as Preferred-FT's")
    warmup_steps: int = _f(15, "linear warmup steps")
    min_lr_ratio: float = _f(0.1, "cosine decay floor as a fraction of the peak")
    weight_decay: float = _f(0.0, "AdamW weight decay on matrices")
    grad_clip: float = _f(1.0, "clip the global gradient norm to this (0: off)")
    eval_every: int = _f(50, "held-out loss every N steps")
    ckpt_every: int = _f(50, "checkpoint every N steps")
    snapshot_every: int = _f(
        0, "save the weights every N steps, the frontier's points (0: about 4 per run)"
    )

    def validate(self, flag_prefix: str = "unlikelihood-") -> None:
        """Raise MinidpoError naming the flag of a bad alpha (``--unlikelihood-alpha`` in
        `minidpo pipeline`)."""
        if not 0 <= self.alpha <= 1:
            raise MinidpoError(f"--{flag_prefix}alpha: must be in [0, 1], got {self.alpha}")


def pair_losses(
    model: torch.nn.Module, batch: Batch, alpha: float
) -> tuple[torch.Tensor, dict[str, float]]:
    """Mean unlikelihood loss of a concatenated [chosen; rejected] batch (2B rows), one
    forward; and its parts: log pi(y_w|x), log pi(y_l|x) and the unlikelihood term."""
    logps = token_logprobs(model(batch.input_ids), batch.labels)  # (2B, T)
    B = logps.shape[0] // 2
    losses, chosen, unlikely = unlikelihood_loss(
        logps[:B], batch.mask[:B], logps[B:], batch.mask[B:], alpha
    )
    rejected = (logps[B:] * batch.mask[B:]).sum(-1)  # (B,)
    loss = losses.mean()
    return loss, {
        "loss": loss.item(),
        "logps/chosen": chosen.detach().mean().item(),
        "logps/rejected": rejected.detach().mean().item(),
        "unlikelihood": unlikely.detach().mean().item(),
    }


def run_unlikelihood(
    cfg: UnlikelihoodConfig,
    job: Job,
    *,
    sft_path: Path,
    train_pairs: Path,
    eval_pairs: Path | None = None,
) -> dict[str, Any]:
    """Train pi_SFT with the unlikelihood loss on the pairs; returns the final metrics."""  # fmt: skip
    cfg.validate()
    stage_config = provenance("unlikelihood", cfg, job.seed, sft=sft_path, pairs=train_pairs)
    device = torch.device(job.device)
    policy, tok = load_policy(sft_path, device)

    def pairs(path: Path) -> TokenizedPairs:
        return tokenize_pairs(load_pairs(path)[0], tok, policy.config.block_size, str(path))

    train_data = pairs(train_pairs)
    eval_data = pairs(eval_pairs) if eval_pairs is not None else None

    def get_batch(step: int) -> Batch:
        rng = stream(job.seed, "unlikelihood/batch", step)  # the batch depends on (seed, step)
        idx = rng.choice(len(train_data), size=min(cfg.batch_size, len(train_data)), replace=False)
        return train_data.batch(idx, tok.eot_id).to(device)

    def loss_fn(m: torch.nn.Module, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
        loss, metrics = pair_losses(m, batch, cfg.alpha)
        return loss, {**metrics, "tokens": batch.n_tokens}

    def eval_fn(m: torch.nn.Module) -> dict[str, float]:
        """Each metric's mean over every held-out pair (in chunks of 64 pairs)."""
        n, totals = len(eval_data), {}
        for start in range(0, n, 64):
            idx = range(start, min(start + 64, n))
            part = pair_losses(m, eval_data.batch(idx, tok.eot_id).to(device), cfg.alpha)[1]
            for k, v in part.items():
                totals[k] = totals.get(k, 0.0) + v * len(idx) / n
        return totals

    extra = stage_state(kind="policy", stage="unlikelihood", model_config=to_dict(policy.config),
                        tokenizer=tok.to_dict(), config=stage_config)  # fmt: skip
    t0 = time.perf_counter()
    last = train(policy, loop=LoopConfig.from_config(cfg, desc=f"unlikelihood[{cfg.alpha:g}]"),
                 job=job, get_batch=get_batch, loss_fn=loss_fn, checkpoint_extra=extra,
                 eval_fn=eval_fn if eval_data is not None else None)  # fmt: skip
    summary = {**last, "wall_s_total": time.perf_counter() - t0, "n_train_pairs": len(train_data)}
    if last["steps_done"] == cfg.steps:
        atomic_write_json(job.out_dir / "summary.json", summary)
    return summary


def stage(
    name: str = "unlikelihood",
    *,
    alpha: float | None = None,
    seed: int | None = None,
    folder: Callable[[Context], Path] | None = None,
) -> Stage:
    """The Unlikelihood stage: the run's own, or a sweep run at `alpha`, `seed`, `folder`."""
    overrides = None if alpha is None else {"alpha": alpha}

    def out(ctx: Context) -> Path:
        return folder(ctx) if folder else ctx.folder / f"unlikelihood-alpha{config(ctx).alpha:g}"

    def config(ctx: Context) -> UnlikelihoodConfig:
        return method_config(ctx, "unlikelihood", overrides, "steps")

    def fn(ctx: Context, resume: bool) -> dict[str, Any]:
        held_out = ctx.paths.held_out_pairs
        job = Job(out(ctx), ctx.run.seed if seed is None else seed, ctx.device, resume,
                  ctx.progress)  # fmt: skip
        s = run_unlikelihood(config(ctx), job, sft_path=ctx.paths.sft,
                             train_pairs=ctx.paths.train_pairs, eval_pairs=held_out)  # fmt: skip
        return training_summary(s)

    return Stage(name, fn, ("unlikelihood",), ("prefs",),
                 inputs=lambda c: [c.paths.sft, c.paths.train_pairs],
                 outputs=lambda c: [out(c) / "checkpoint.pt"],
                 extra_key=lambda c: [overrides, seed],
                 check=lambda c: config(c).validate())  # fmt: skip


METHOD = Method(
    "Unlikelihood", stage(), key="alpha", value=lambda c: c.cfg["unlikelihood"].alpha,
    sweep=lambda c: c.cfg["pipeline"].floats("sweep_unlikelihood_alphas"),
    variant=lambda name, alpha, seed, folder: stage(name, alpha=alpha, seed=seed, folder=folder),
    folder="unlikelihood-alpha",
)  # fmt: skip
