"""The GRPO trainer: PPO's loop without a value model, advantages relative to a group.

GRPO (Shao et al. 2024, DeepSeekMath, arXiv 2402.03300, Sec. 4) on the same policy,
reference and rewards as `minidpo.ppo`. Each iteration:

1. rollout: `prompts_per_iteration` training prompts, `group_size` responses each,
   sampled from the policy at `temperature` (one call of `sample_responses`);
2. log-probs of the sampled ids under the policy (old) and the frozen reference;
3. scoring: ``score_fn(samples) -> (B,)``, the reward model (``--reward rm``) or the
   oracle r* itself (``--reward oracle``); no missing-end-of-text penalty (the oracle
   charges its own, and a learned reward gets none here);
4. advantages: each response's reward against its group's, (r - mean) / std
   (``--no-scale-std``: Dr. GRPO's r - mean, arXiv 2503.20783), the same for every token
   of the response; no value model, no GAE (`minidpo.grpo_math.group_advantages`);
5. `epochs` passes over shuffled minibatches of the clipped surrogate minus beta times
   the k3 KL estimate at each token (Eq. 3 and 4), averaged per response
   (``--loss-norm sequence``) or summed over a constant (``constant``, Dr. GRPO);
   Adam, the gradient norm clipped.

The KL is in the loss, not in the reward: its fixed point on the enumerable problem is
not the pi* of the DPO paper's Eq. 4 (`minidpo.exact_grpo` measures by how much).

Metrics (``metrics.jsonl``, one row per iteration): objective/scores (mean score of the
rollouts), objective/oracle (their mean r*), objective/kl (mean sequence log-ratio,
PPO's k1 sum, for comparison), objective/k3 (mean per-token k3), objective/group_std
(mean std of the rewards within a group: 0 means no signal), objective/unterminated,
objective/length, loss/policy_avg, policy/clipfrac_avg, tokens/*, time/*; and held-out
eval/oracle, eval/kl as PPO logs them.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from minidpo.atomic import atomic_write_json
from minidpo.batching import build_batch
from minidpo.checkpoints import provenance, stage_state
from minidpo.config import _f, to_dict
from minidpo.errors import MinidpoError
from minidpo.grpo_math import LOSS_NORMS, group_advantages, grpo_loss
from minidpo.model import GPT
from minidpo.policy import load_policy
from minidpo.ppo import checked_prompts, heldout_oracle_kl, rl_loop, tempered_logprobs
from minidpo.reward_model import load_reward_model
from minidpo.sampling import encode_prompt, sample_responses
from minidpo.scoring import ScoreFn, oracle_scores
from minidpo.seeds import seed_of, stream
from minidpo.shaping import shaped_score_fn
from minidpo.stage import Context, Method, Stage, method_config
from minidpo.tokenizer import Tokenizer
from minidpo.training import Job, check_finite, read_metrics, run_loop
from minidpo.world import load_world

REWARDS = ("rm", "oracle", "shaped")


@dataclass
class GRPOConfig:
    """GRPO against a reward (the reward model, or the oracle)."""

    iterations: int = _f(40, "GRPO iterations (rollout, score, update)")
    prompts_per_iteration: int = _f(8, "training prompts per iteration")
    group_size: int = _f(8, "G: responses per prompt (8 x 8 = PPO's 64 rollouts)")
    minibatch_size: int = _f(32, "responses per optimizer step")
    epochs: int = _f(2, "passes over each rollout batch")
    lr: float = _f(1e-4, "Adam learning rate (constant)")
    grad_clip: float = _f(1.0, "clip the global gradient norm to this (0: off)")
    beta: float = _f(0.04, "weight of the k3 KL term in the loss (DeepSeekMath's 0.04)")
    clip_range: float = _f(0.2, "ratio clip epsilon")
    scale_std: bool = _f(True, "divide advantages by the group's std (--no-scale-std: Dr. GRPO)")
    loss_norm: str = _f("sequence", "sequence: 1/|o_i| per response (GRPO); constant: Dr. GRPO")
    temperature: float = _f(1.0, "rollout sampling temperature (log-probs use logits / T)")
    max_new_tokens: int = _f(64, "longest response in tokens")
    eval_every: int = _f(20, "held-out oracle reward and KL every N iterations (and at 0)")
    eval_samples_per_prompt: int = _f(4, "samples per held-out prompt at each evaluation")
    ckpt_every: int = _f(10, "checkpoint every N iterations")
    snapshot_every: int = _f(
        8, "save the weights every N iterations and at 1, 2, 4, ... below N (0: about 4 per run)"
    )

    def validate(self, flag_prefix: str = "") -> None:
        """Raise MinidpoError naming the flag of the first bad value."""
        f = f"--{flag_prefix}"
        if self.group_size < 2:
            raise MinidpoError(f"{f}group-size: must be >= 2 (a group of one has no baseline)")
        if not 0 <= self.beta < float("inf"):
            raise MinidpoError(f"{f}beta: must be finite and >= 0, got {self.beta}")
        if not 0 < self.clip_range < float("inf"):
            raise MinidpoError(f"{f}clip-range: must be finite and > 0, got {self.clip_range}")
        if self.loss_norm not in LOSS_NORMS:
            raise MinidpoError(
                f"{f}loss-norm: one of {', '.join(LOSS_NORMS)}, got {self.loss_norm!r}"
            )
        if self.minibatch_size > self.prompts_per_iteration * self.group_size:
            raise MinidpoError(
                f"{f}minibatch-size {self.minibatch_size} exceeds the rollout batch "
                f"({self.prompts_per_iteration} x {self.group_size})"
            )


def grpo_iteration(
    it: int,
    *,
    policy: GPT,
    ref: GPT,
    optimizer: torch.optim.Optimizer,
    tok: Tokenizer,
    prompts: Sequence[str],
    block: int,
    cfg: GRPOConfig,
    score_fn: ScoreFn,
    seed: int,
    device: torch.device,
) -> dict[str, Any]:
    """One GRPO iteration (rollout, scoring, update): `run_loop`'s step; returns its metrics."""
    t0 = time.perf_counter()
    P, G = cfg.prompts_per_iteration, cfg.group_size
    rng = stream(seed, "grpo/prompts", it)
    chosen = [prompts[i] for i in rng.choice(len(prompts), size=P, replace=P > len(prompts))]
    grouped = [p for p in chosen for _ in range(G)]  # each group contiguous
    samples = sample_responses(policy, tok, grouped, seed=seed_of(seed, "grpo/rollout", it),
                               temperature=cfg.temperature, max_new_tokens=cfg.max_new_tokens)  # fmt: skip
    prompt_ids = [encode_prompt(tok, p, block, cfg.max_new_tokens) for p in grouped]
    batch = build_batch(prompt_ids, [s.response_ids for s in samples], pad_id=tok.eot_id)
    batch = batch.to(device)
    mask = batch.mask  # (B, T)
    with torch.no_grad():
        old_logp, entropy = tempered_logprobs(
            policy, batch.input_ids, batch.labels, cfg.temperature
        )
        ref_logp, _ = tempered_logprobs(ref, batch.input_ids, batch.labels, cfg.temperature)
    t_rollout = time.perf_counter() - t0

    t0 = time.perf_counter()
    scores = torch.as_tensor(score_fn(samples), dtype=torch.float32).detach().cpu()
    oracle = oracle_scores(samples).float()
    groups = scores.view(P, G)  # (P, G)
    adv = group_advantages(groups, scale_std=cfg.scale_std).reshape(-1).to(device)  # (B,)
    t_scoring = time.perf_counter() - t0

    t0 = time.perf_counter()
    acc = _update(policy, optimizer, batch, old_logp, ref_logp, adv, cfg, seed=seed, it=it)
    t_update = time.perf_counter() - t0
    n_tok = int(batch.n_tokens)
    return {
        "objective/scores": float(scores.mean()),
        "objective/oracle": float(oracle.mean()),
        "objective/kl": float(((old_logp - ref_logp) * mask).sum(1).mean()),
        "objective/k3": float(np.mean(acc["k3"])),
        "objective/group_std": float(groups.std(dim=1).mean()),
        "objective/entropy": float((entropy * mask).sum(1).mean()),
        "objective/unterminated": float(np.mean([not s.terminated for s in samples])),
        "objective/length": float(mask.sum(1).mean()),
        "loss/policy_avg": float(np.mean(acc["loss"])),
        "policy/clipfrac_avg": float(np.mean(acc["clipfrac"])),
        "time/rollout": t_rollout,
        "time/scoring": t_scoring,
        "time/update": t_update,
        # sampling + policy/ref log-probs (+ a learned scorer) + one forward per epoch
        "tokens/forward": n_tok * (1 + 2 + (score_fn is not oracle_scores) + cfg.epochs),
        "tokens/backward": n_tok * cfg.epochs,
        "tokens/sampled": float(mask.sum()),
    }


def _update(
    policy: GPT,
    optimizer: torch.optim.Optimizer,
    batch: Any,
    old_logp: torch.Tensor,
    ref_logp: torch.Tensor,
    adv: torch.Tensor,
    cfg: GRPOConfig,
    *,
    seed: int,
    it: int,
) -> dict[str, list[float]]:
    """`epochs` passes of shuffled minibatches of the Eq. 3 loss; the per-step statistics."""
    B, device = adv.size(0), adv.device
    order_rng = stream(seed, "grpo/minibatches", it)
    params = list(policy.parameters())
    acc: dict[str, list[float]] = {"loss": [], "clipfrac": [], "k3": []}
    for _ in range(cfg.epochs):
        order = order_rng.permutation(B)
        for s in range(0, B, cfg.minibatch_size):
            idx = torch.as_tensor(order[s : s + cfg.minibatch_size], device=device)
            new_logp, _ = tempered_logprobs(policy, batch.input_ids[idx], batch.labels[idx],
                                            cfg.temperature)  # fmt: skip
            loss, parts = grpo_loss(new_logp, old_logp[idx], ref_logp[idx], adv[idx],
                                    batch.mask[idx], clip_range=cfg.clip_range, beta=cfg.beta,
                                    loss_norm=cfg.loss_norm, max_tokens=cfg.max_new_tokens)  # fmt: skip
            check_finite(loss.detach(), "GRPO loss", "grpo update")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            optimizer.step()
            for k, v in (("loss", loss), ("clipfrac", parts["clipfrac"]), ("k3", parts["kl"])):
                acc[k].append(float(v.detach()))
    return acc


def run_grpo(
    cfg: GRPOConfig,
    job: Job,
    *,
    sft_path: str | Path,
    score_fn: ScoreFn,
    flag_prefix: str = "",
) -> dict[str, Any]:
    """Train a policy with GRPO from the SFT checkpoint at `sft_path`; returns a summary.

    Writes ``checkpoint.pt`` (kind "policy"), ``metrics.jsonl`` and ``summary.json`` into
    ``job.out_dir``; ``job.resume`` continues from the checkpoint there (prompts, samples
    and minibatch order depend on (seed, iteration) only)."""
    cfg.validate(flag_prefix)
    device, seed = torch.device(job.device), job.seed
    stage_config = provenance("grpo", cfg, seed, sft=Path(sft_path))
    policy, tok = load_policy(sft_path, device)
    ref = copy.deepcopy(policy).requires_grad_(False)
    for m in (policy, ref):
        m.eval()  # dropout off: rollout and update see the same distribution
    optimizer = torch.optim.Adam(policy.parameters(), lr=cfg.lr, eps=1e-5)
    block = policy.config.block_size
    train_prompts = checked_prompts(None, tok, block, cfg.max_new_tokens)
    eval_prompts = [p.text for p in load_world().prompts("eval")]
    eval_seed = seed_of(seed, "ppo/eval")  # PPO's draw: both trainers' curves start equal

    def step_fn(it: int) -> dict[str, Any]:
        return grpo_iteration(it, policy=policy, ref=ref, optimizer=optimizer, tok=tok,
                              prompts=train_prompts, block=block, cfg=cfg, score_fn=score_fn,
                              seed=seed, device=device)  # fmt: skip

    def eval_fn(model: torch.nn.Module) -> dict[str, float]:
        return heldout_oracle_kl(policy, ref, tok, eval_prompts, seed=eval_seed,
                                 samples_per_prompt=cfg.eval_samples_per_prompt,
                                 max_new_tokens=cfg.max_new_tokens)  # fmt: skip

    loop = rl_loop(cfg, "grpo")
    extra = stage_state(kind="policy", stage="grpo", model_config=to_dict(policy.config),
                        tokenizer=tok.to_dict(), config=stage_config)  # fmt: skip
    last = run_loop(
        policy, optimizer, step_fn, loop=loop, job=job, checkpoint_extra=extra, eval_fn=eval_fn,
        eval_at_start=True,
        counters={"tokens/forward": "tokens_forward", "tokens/backward": "tokens_backward",
                  "tokens/sampled": "tokens_sampled"},
        postfix=("objective/scores", "objective/kl", "objective/oracle"),
    )  # fmt: skip
    rows = read_metrics(Path(job.out_dir) / "metrics.jsonl")
    evals = [r for r in rows if "eval/oracle" in r]
    summary = {
        **last,
        "eval_oracle_start": evals[0]["eval/oracle"] if evals else None,
        "eval_oracle": evals[-1]["eval/oracle"] if evals else None,
        "eval_kl": evals[-1]["eval/kl"] if evals else None,
        "device": str(device),
    }
    if last["steps_done"] == cfg.iterations:
        atomic_write_json(Path(job.out_dir) / "summary.json", summary)
    return summary


def stage(
    name: str = "grpo",
    *,
    reward: str = "rm",
    beta: float | None = None,
    seed: int | None = None,
    folder: Callable[[Context], Path] | None = None,
) -> Stage:
    """The GRPO stage against the reward model (``reward="rm"``), the oracle or the shaped
    oracle (``"shaped"``, `minidpo.shaping`); `beta` overrides the KL weight (the sweep's
    setting). Its run folder is ``grpo-<reward>-beta<beta>`` unless `folder` says otherwise;
    about four snapshots per run (the frontier's points) unless ``--snapshot-every``."""
    if reward not in REWARDS:
        raise MinidpoError(f"--reward: one of {', '.join(REWARDS)}, got {reward!r}")

    def config(ctx: Context) -> GRPOConfig:
        return method_config(ctx, "grpo", None if beta is None else {"beta": beta}, "iterations")

    def out(ctx: Context) -> Path:
        return folder(ctx) if folder else ctx.folder / f"grpo-{reward}-beta{config(ctx).beta:g}"

    def fn(ctx: Context, resume: bool) -> dict[str, Any]:
        score_fn: ScoreFn = oracle_scores
        if reward == "rm":
            score_fn = load_reward_model(ctx.paths.rm, ctx.device).score
        elif reward == "shaped":
            score_fn = shaped_score_fn(ctx.cfg["shaping"])
        job = Job(out(ctx), ctx.run.seed if seed is None else seed, ctx.device, resume,
                  ctx.progress)  # fmt: skip
        s = run_grpo(config(ctx), job, sft_path=ctx.paths.sft, score_fn=score_fn)
        keep = ("eval_oracle_start", "eval_oracle", "eval_kl", "tokens_forward",
                "tokens_backward", "tokens_sampled", "wall_s")  # fmt: skip
        return {k: s.get(k) for k in keep}

    groups = ("grpo", "shaping") if reward == "shaped" else ("grpo",)
    return Stage(name, fn, groups, ("rm",) if reward == "rm" else ("sft",),
                 inputs=lambda c: [c.paths.sft, *([c.paths.rm] if reward == "rm" else [])],
                 outputs=lambda c: [out(c) / "checkpoint.pt"],
                 extra_key=lambda c: [reward, seed, beta],
                 check=lambda c: config(c).validate())  # fmt: skip


# GRPO against the reward model: the card's "middle ground", on the frontier beside PPO
# (same reward model, same rollouts per iteration), swept over its KL weight beta.
METHOD = Method(
    "GRPO", stage("grpo"), key="beta", value=lambda c: c.cfg["grpo"].beta, cost_with=("rm",),
    sweep=lambda c: c.cfg["pipeline"].floats("sweep_grpo_betas"),
    variant=lambda name, b, seed, folder: stage(name, beta=b, seed=seed, folder=folder),
    folder="grpo-rm-beta",
)  # fmt: skip
