"""The PPO trainer: stage 3 of RLHF, a policy trained against a reward with a KL leash.

The policy starts from the SFT checkpoint; the frozen SFT is also the reference
pi_ref. Each iteration (as in lm-human-preferences, Ziegler et al. 2019, and TRL's
PPO trainer):

1. rollout: `rollout_batch` training prompts, one response each, sampled from the
   policy at `temperature` (`minidpo.policy.sample_responses`);
2. log-probs of the sampled ids under the policy and the reference, both from
   ``logits / temperature`` (the distribution that was sampled), and the values;
3. scoring: ``score_fn(samples) -> (B,)`` (the reward model for RLHF, the oracle for
   PPO-GT); with a reward model, a response that never emitted end-of-text can also
   lose `missing_eot_penalty` (lm-human-preferences; 0 by default). PPO-GT optimises
   exactly r*: the oracle already charges -1 for such a response, so a penalty on top
   is refused;
4. per-token rewards -beta (log pi - log pi_ref), plus the score at the last token;
   GAE advantages and returns; advantages whitened (`minidpo.ppo_math`);
5. `ppo_epochs` passes over shuffled minibatches: clipped surrogate (PPO Eq. 7) +
   `vf_coef` x clipped value loss, one Adam step per minibatch (eps 1e-5, gradient
   norm clipped), policy and value model in one optimizer, as TRL, each with its own
   learning rate (`lr`, `value_lr`);
6. optionally, the adaptive KL controller moves beta towards `kl_target`.

The value model is a `ScalarHeadModel`: initialised from the reward model's weights
when `value_init` is given (as lm-human-preferences and TRL do), else the SFT body
with a zero head. Dropout stays off throughout (every model in eval mode), so the
log-probs of rollout and update agree (a point of "The N Implementation Details of
RLHF with PPO", Huang et al. 2024).

Metrics (``metrics.jsonl``, one row per iteration, TRL's names): objective/kl (mean
sequence KL of the rollouts), objective/scores, objective/non_score_reward,
objective/rlhf_reward, objective/entropy, objective/kl_coef, objective/oracle (the
oracle reward of the same rollouts: with a reward model, the gap to
objective/scores shows reward over-optimisation), policy/approxkl_avg,
policy/clipfrac_avg, loss/policy_avg, loss/value_avg, val/explained_variance,
val/clipfrac_avg, time/rollout, time/scoring, time/update (seconds), and every
`eval_every` iterations (and at step 0, before any update) eval/oracle and eval/kl
on the held-out prompts at temperature 1.

The loop itself (checkpoints, resume, evaluation, snapshots) is the one every trainer
shares, `minidpo.training.run_loop`, with `ppo_iteration` as its step; the value
model and beta travel in the checkpoint as carried state.

Left out: learning-rate annealing, reward clipping, value normalisation, early
stopping on approxkl, gradient accumulation.
"""

from __future__ import annotations

import copy
import hashlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from minidpo.atomic import atomic_write_json
from minidpo.batching import Batch, build_batch
from minidpo.checkpoints import load_checkpoint, provenance, stage_state
from minidpo.config import _f, to_dict
from minidpo.errors import MinidpoError
from minidpo.evaluate import sample_logprobs
from minidpo.logprobs import token_logprobs
from minidpo.model import GPT, ScalarHeadModel
from minidpo.policy import load_policy
from minidpo.ppo_math import (
    AdaptiveKLController,
    FixedKLController,
    compute_gae,
    explained_variance,
    kl_penalized_rewards,
    masked_mean,
    policy_loss,
    value_loss,
    whiten,
)
from minidpo.reward_model import load_reward_model
from minidpo.sampling import Sample, encode_prompt, load_prompts, sample_responses
from minidpo.scoring import ScoreFn, oracle_scores
from minidpo.seeds import seed_of, stream
from minidpo.shaping import shaped_score_fn
from minidpo.stage import Context, Method, Stage, method_config
from minidpo.tokenizer import Tokenizer
from minidpo.training import Carried, Job, LoopConfig, check_finite, read_metrics, run_loop
from minidpo.world import load_world


@dataclass
class PPOConfig:
    """PPO against a reward (the reward model, or the oracle for PPO-GT)."""

    iterations: int = _f(40, "PPO iterations (rollout, score, update)")
    rollout_batch: int = _f(64, "prompts per iteration, one response each")
    minibatch_size: int = _f(32, "responses per optimizer step")
    ppo_epochs: int = _f(2, "passes over each rollout batch")
    lr: float = _f(1e-4, "Adam learning rate of the policy (constant)")
    value_lr: float = _f(
        3e-4, "Adam learning rate of the value model (a separate network, so its own rate)"
    )
    grad_clip: float = _f(1.0, "clip the global gradient norm to this (0: off)")
    kl_coef: float = _f(0.05, "beta: per-token KL penalty coefficient (initial one if adaptive)")
    adaptive_kl: bool = _f(False, "steer beta towards --kl-target (Ziegler et al. 2019)")
    kl_target: float = _f(6.0, "target sequence KL (nats) of the adaptive controller")
    kl_horizon: int = _f(
        128, "adaptive controller horizon, in samples (128: beta can move about 10 % per iteration)"
    )
    gamma: float = _f(1.0, "discount (1: the score at the end counts fully for every token)")
    lam: float = _f(0.95, "GAE lambda (bias-variance trade-off of the advantages)")
    clip_range: float = _f(0.2, "PPO ratio clip epsilon (Eq. 7)")
    clip_range_value: float = _f(0.2, "value clip: how far a value may move from its rollout value")
    vf_coef: float = _f(
        0.1, "weight of the value loss in the joint loss (Adam: acts through the joint clip)"
    )
    temperature: float = _f(1.0, "rollout sampling temperature (log-probs use logits / T)")
    max_new_tokens: int = _f(64, "longest response in tokens")
    missing_eot_penalty: float = _f(
        0.0,
        "subtracted from a learned reward model's score of a response without end-of-text "
        "(which the model cannot see; the oracle charges its own -1, so PPO-GT refuses it)",
    )
    whiten_rewards: bool = _f(False, "rescale per-token rewards to unit variance before GAE")
    eval_every: int = _f(20, "held-out oracle reward and KL every N iterations (and at 0)")
    eval_samples_per_prompt: int = _f(4, "samples per held-out prompt at each evaluation")
    ckpt_every: int = _f(10, "checkpoint every N iterations")
    snapshot_every: int = _f(
        8,
        "save the weights every N iterations and at 1, 2, 4, ... below N (the frontier's "
        "points, dense near KL 0; 0: about 4 per run)",
    )

    def validate(self, flag_prefix: str = "", *, oracle: bool = False) -> None:
        """Raise MinidpoError naming the flag of the first bad value (`flag_prefix`: the
        command's prefix for PPO flags, ``ppo-`` in `minidpo pipeline`). `oracle`: the
        score is r* itself (PPO-GT), which takes no missing-end-of-text penalty."""
        f = f"--{flag_prefix}"
        if not self.kl_coef > 0:
            raise MinidpoError(f"{f}kl-coef: must be > 0, got {self.kl_coef}")
        positive_ints = (
            "iterations", "rollout_batch", "minibatch_size", "ppo_epochs", "max_new_tokens",
            "eval_every", "eval_samples_per_prompt", "ckpt_every", "kl_horizon",
        )  # fmt: skip
        for name in positive_ints:
            if getattr(self, name) < 1:
                raise MinidpoError(f"{f}{name.replace('_', '-')}: must be >= 1")
        for name in (
            "lr",
            "value_lr",
            "clip_range",
            "clip_range_value",
            "temperature",
            "kl_target",
        ):
            if not getattr(self, name) > 0:
                raise MinidpoError(f"{f}{name.replace('_', '-')}: must be > 0")
        if not 0 <= self.gamma <= 1 or not 0 <= self.lam <= 1:
            raise MinidpoError(f"{f}gamma/{f}lam: must be in [0, 1], got {self.gamma}, {self.lam}")
        if self.minibatch_size > self.rollout_batch:
            raise MinidpoError(
                f"{f}minibatch-size {self.minibatch_size} exceeds {f}rollout-batch "
                f"{self.rollout_batch}"
            )
        if oracle and self.missing_eot_penalty != 0:
            raise MinidpoError(
                f"{f}missing-eot-penalty: must be 0 against the oracle reward, got "
                f"{self.missing_eot_penalty} (r* already charges -1 for a response "
                "that never ended; the penalty is for a learned reward model)"
            )


@dataclass
class Rollout:
    """One iteration's batch: (B, T) tensors in the right-padded layout of `build_batch`."""

    input_ids: torch.Tensor  # (B, T) long
    labels: torch.Tensor  # (B, T) long, the sampled ids at response positions
    mask: torch.Tensor  # (B, T) float, 1 on response tokens
    logprobs: torch.Tensor  # (B, T) policy log-probs at rollout time (temperature T)
    values: torch.Tensor  # (B, T) value estimates at rollout time
    advantages: torch.Tensor  # (B, T) whitened GAE
    returns: torch.Tensor  # (B, T) value targets


def tempered_logprobs(
    model: GPT, input_ids: torch.Tensor, labels: torch.Tensor, temperature: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """log pi_T(label_t) from logits / temperature, and the token entropy: (B, T) each."""
    logits = model(input_ids).float() / temperature  # (B, T, V)
    logp = token_logprobs(logits, labels)  # (B, T)
    with torch.no_grad():
        full = torch.log_softmax(logits, dim=-1)  # (B, T, V)
        entropy = -(full.exp() * full).sum(-1)  # (B, T)
    return logp, entropy


def make_value_model(
    policy: GPT, value_init: dict[str, torch.Tensor] | None, seed: int
) -> ScalarHeadModel:
    """A value model: the reward model's weights when given, else the SFT body + a zero head.

    The zero head makes every first value 0, so the first advantages are the plain
    (lam-discounted) rewards-to-go; a randomly initialised head would instead put value
    noise of order 1 into every token's advantage (delta_t = V_{t+1} - V_t) while the
    critic is still untrained, which drives the policy away from pi_ref without gain.
    """
    gen = torch.Generator().manual_seed(int(seed))
    body = copy.deepcopy(policy).cpu()
    value = ScalarHeadModel(body, generator=gen)
    if value_init is None:
        torch.nn.init.zeros_(value.head.weight)
    else:
        try:
            value.load_state_dict(value_init)
        except RuntimeError as e:
            first = str(e).splitlines()[0][:160]
            raise MinidpoError(
                f"value_init: the reward model does not match the policy's shape ({first})"
            ) from None
    return value.to(policy.device)


# The settings of a GPT that change the names or shapes of its weights.
SHAPE = ("vocab_size", "block_size", "n_layer", "n_head", "n_embd", "bias", "tie_head")


def check_value_init(rm_path: Path, sft_path: Path) -> None:
    """The reward model at `rm_path`, which PPO's value model starts from, has the shape of
    the policy at `sft_path`: else one MinidpoError naming both and what differs (before
    anything is written, not a state-dict error mid-run)."""
    rm = load_checkpoint(rm_path, kind="reward_model")["model_config"]
    sft = load_checkpoint(sft_path, kind="policy")["model_config"]
    diff = [f"{k} {rm.get(k)} vs {sft.get(k)}" for k in SHAPE if rm.get(k) != sft.get(k)]
    if diff:
        raise MinidpoError(
            f"{rm_path}: the reward model's shape is not that of the policy {sft_path} "
            f"({', '.join(diff)}); PPO starts its value model from the reward model"
        )


def state_digest(state: dict[str, torch.Tensor] | None) -> str | None:
    """A SHA-256 of a state_dict's names and values (None for None), to key a run on it."""
    if state is None:
        return None
    h = hashlib.sha256()
    for k in sorted(state):
        h.update(k.encode())
        h.update(state[k].detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


@torch.no_grad()
def heldout_oracle_kl(
    policy: GPT,
    ref: GPT,
    tok: Tokenizer,
    prompts: Sequence[str],
    *,
    samples_per_prompt: int,
    seed: int,
    max_new_tokens: int,
) -> dict[str, float]:
    """Held-out oracle reward and KL(pi || pi_ref) (mean sequence log-ratio) at temperature 1.

    The same `seed` at every evaluation, so successive numbers differ by the policy,
    not by the draw.
    """
    expanded = [p for p in prompts for _ in range(samples_per_prompt)]
    samples = sample_responses(
        policy, tok, expanded, seed=seed, temperature=1.0, max_new_tokens=max_new_tokens
    )
    rewards = oracle_scores(samples).float()
    log_ratio = sample_logprobs(policy, tok, samples) - sample_logprobs(ref, tok, samples)
    return {
        "oracle": float(rewards.mean()),
        "kl": float(log_ratio.mean()),
        "unterminated": float(np.mean([not s.terminated for s in samples])),
        "length": float(np.mean([len(s.response_ids) for s in samples])),
    }


def run_ppo(
    cfg: PPOConfig,
    job: Job,
    *,
    sft_path: str | Path,
    score_fn: ScoreFn,
    value_init: dict[str, torch.Tensor] | None = None,
    prompts: Sequence[str] | None = None,
    flag_prefix: str = "",
) -> dict[str, Any]:
    """Train a policy with PPO from the SFT checkpoint at `sft_path`; returns a summary.

    Writes ``checkpoint.pt`` (kind "policy", loadable by `minidpo.policy.load_policy`;
    it also holds the value model, the optimizer and beta, for resuming),
    ``metrics.jsonl`` and ``summary.json`` into ``job.out_dir``; ``job.resume`` continues
    from the checkpoint there (the iteration's prompts, samples and minibatch order depend
    on (seed, iteration) only, so a resumed run ends with the weights of an uninterrupted
    one).
    `prompts` replaces the world's training prompts (each must fit the context with
    `max_new_tokens` to spare). With ``snapshot_every``, the policy's weights are also
    saved every that many iterations under ``snapshots/`` (the frontier's points).
    `cfg` is validated first (errors name ``--{flag_prefix}<flag>``); with
    ``score_fn=oracle_scores`` (PPO-GT) a nonzero `missing_eot_penalty` is refused.
    """
    cfg.validate(flag_prefix, oracle=score_fn is oracle_scores)
    out_dir, device, seed = Path(job.out_dir), torch.device(job.device), job.seed
    prompts_sha = (
        None if prompts is None else hashlib.sha256("\n".join(prompts).encode()).hexdigest()
    )
    stage_config = {**provenance("ppo", cfg, seed, sft=Path(sft_path)),
                    "value_init_sha256": state_digest(value_init), "prompts_sha256": prompts_sha}  # fmt: skip
    policy, tok = load_policy(sft_path, device)
    ref = copy.deepcopy(policy).requires_grad_(False)
    value_model = make_value_model(policy, value_init, seed)
    for m in (policy, ref, value_model):
        m.eval()  # dropout off: rollout and update see the same distribution
    groups = [
        {"params": list(policy.parameters()), "lr": cfg.lr},
        {"params": list(value_model.parameters()), "lr": cfg.value_lr},
    ]
    optimizer = torch.optim.Adam(groups, eps=1e-5)  # eps 1e-5, as the N details advise
    kl_ctl = kl_controller(cfg)
    block = policy.config.block_size
    train_prompts = checked_prompts(prompts, tok, block, cfg.max_new_tokens)
    eval_prompts = [p.text for p in load_world().prompts("eval")]
    eval_seed = seed_of(seed, "ppo/eval")

    def step_fn(it: int) -> dict[str, Any]:
        return ppo_iteration(
            it, policy=policy, ref=ref, value_model=value_model, optimizer=optimizer,
            kl_ctl=kl_ctl, tok=tok, prompts=train_prompts, block=block, cfg=cfg,
            score_fn=score_fn, seed=seed, device=device,
        )  # fmt: skip

    def eval_fn(model: torch.nn.Module) -> dict[str, float]:
        return heldout_oracle_kl(policy, ref, tok, eval_prompts, seed=eval_seed,
                                 samples_per_prompt=cfg.eval_samples_per_prompt,
                                 max_new_tokens=cfg.max_new_tokens)  # fmt: skip

    loop = rl_loop(cfg, "ppo")
    extra = stage_state(kind="policy", stage="ppo", model_config=to_dict(policy.config),
                        tokenizer=tok.to_dict(), config=stage_config)  # fmt: skip
    carried = {
        "value_model": Carried(value_model.state_dict, value_model.load_state_dict),
        "kl_coef": Carried(lambda: kl_ctl.value, lambda v: setattr(kl_ctl, "value", float(v))),
    }
    last = run_loop(
        policy, optimizer, step_fn, loop=loop, job=job, checkpoint_extra=extra, eval_fn=eval_fn,
        eval_at_start=True, carried=carried,
        counters={"tokens/forward": "tokens_forward", "tokens/backward": "tokens_backward"},
        postfix=("objective/scores", "objective/kl", "objective/oracle"),
    )  # fmt: skip
    summary = ppo_summary(read_metrics(out_dir / "metrics.jsonl"), cfg, last, kl_ctl.value)
    summary["device"] = str(device)
    if last["steps_done"] == cfg.iterations:
        atomic_write_json(out_dir / "summary.json", summary)
    return summary


def rl_loop(cfg: Any, desc: str) -> LoopConfig:
    """The loop settings of an RL trainer (PPO, GRPO): one step per iteration at a constant
    learning rate, no warmup, no weight decay; its clip, evaluations and checkpoints;
    snapshots dense at the start (`LoopConfig.is_snapshot`), where KL is near 0."""
    return LoopConfig(steps=cfg.iterations, lr=cfg.lr, warmup_steps=0, min_lr_ratio=1.0,
                      weight_decay=0.0, grad_clip=cfg.grad_clip, eval_every=cfg.eval_every,
                      ckpt_every=cfg.ckpt_every, snapshot_every=cfg.snapshot_every,
                      snapshot_dense=True, desc=desc)  # fmt: skip


def checked_prompts(
    prompts: Sequence[str] | None, tok: Tokenizer, block: int, max_new_tokens: int
) -> list[str]:
    """The training prompts (None: the world's), each checked to fit the context with
    `max_new_tokens` to spare: an error now, not mid-run."""
    out = list(prompts) if prompts is not None else [p.text for p in load_world().prompts("train")]
    if not out:
        raise MinidpoError("PPO needs at least one training prompt")
    for p in out:
        encode_prompt(tok, p, block, max_new_tokens)
    return out


def kl_controller(cfg: PPOConfig) -> AdaptiveKLController | FixedKLController:
    """beta's controller: adaptive towards `kl_target` (Ziegler et al. 2019), or fixed."""
    if cfg.adaptive_kl:
        return AdaptiveKLController(cfg.kl_coef, cfg.kl_target, cfg.kl_horizon)
    return FixedKLController(cfg.kl_coef)


def ppo_summary(
    rows: list[dict[str, Any]], cfg: PPOConfig, last: dict[str, Any], kl_coef: float
) -> dict[str, Any]:
    """The summary of a PPO run from its metrics rows: held-out oracle reward and KL at
    the start and the end, the last rollouts, tokens and the time per phase."""
    iters = [r for r in rows if r["step"] > 0]
    evals = [r for r in rows if "eval/oracle" in r]
    final = iters[-1] if iters else {}
    return {
        "iterations": cfg.iterations,
        "done_iterations": last["steps_done"],
        "eval_oracle_start": evals[0]["eval/oracle"] if evals else None,
        "eval_kl_start": evals[0]["eval/kl"] if evals else None,
        "eval_oracle": evals[-1]["eval/oracle"] if evals else None,
        "eval_kl": evals[-1]["eval/kl"] if evals else None,
        "rollout_oracle": final.get("objective/oracle"),
        "rollout_scores": final.get("objective/scores"),
        "rollout_kl": final.get("objective/kl"),
        "kl_coef": kl_coef,
        "wall_s": last["wall_s"],
        "tokens_forward": final.get("tokens_forward", 0),
        "tokens_backward": final.get("tokens_backward", 0),
        "time_per_iteration": {
            k: float(np.mean([r[k] for r in iters])) if iters else None
            for k in ("time/rollout", "time/scoring", "time/update")
        },
    }


def rollout(
    policy: GPT,
    tok: Tokenizer,
    prompts: Sequence[str],
    block: int,
    cfg: PPOConfig,
    seed: int,
    it: int,
) -> tuple[list[Sample], Batch]:
    """Iteration `it`'s rollout: `rollout_batch` training prompts, one sample each from the
    policy (prompts and sampling seeds depend on (seed, it) only), and their batch."""  # fmt: skip
    rng = stream(seed, "ppo/prompts", it)
    B = cfg.rollout_batch
    chosen = [prompts[i] for i in rng.choice(len(prompts), size=B, replace=B > len(prompts))]
    samples = sample_responses(policy, tok, chosen, seed=seed_of(seed, "ppo/rollout", it),
                               temperature=cfg.temperature, max_new_tokens=cfg.max_new_tokens)  # fmt: skip
    prompt_ids = [encode_prompt(tok, p, block, cfg.max_new_tokens) for p in chosen]
    return samples, build_batch(prompt_ids, [s.response_ids for s in samples], pad_id=tok.eot_id)


def rollout_scores(
    samples: Sequence[Sample], score_fn: ScoreFn, cfg: PPOConfig
) -> tuple[torch.Tensor, torch.Tensor]:
    """The score of each rollout, (B,) float32 on the CPU, less `missing_eot_penalty` for a
    response that never ended (lm-human-preferences; a learned reward only: `run_ppo`
    refuses it with the oracle); and which never ended, (B,) bool."""
    scores = torch.as_tensor(score_fn(samples), dtype=torch.float32).detach().cpu()
    if scores.shape != (len(samples),):
        raise ValueError(
            f"score_fn returned shape {tuple(scores.shape)}, expected ({len(samples)},)"
        )
    unterminated = torch.tensor([not s.terminated for s in samples])
    return scores - cfg.missing_eot_penalty * unterminated.float(), unterminated


def ppo_iteration(
    it: int,
    *,
    policy: GPT,
    ref: GPT,
    value_model: ScalarHeadModel,
    optimizer: torch.optim.Optimizer,
    kl_ctl: AdaptiveKLController | FixedKLController,
    tok: Tokenizer,
    prompts: Sequence[str],
    block: int,
    cfg: PPOConfig,
    score_fn: ScoreFn,
    seed: int,
    device: torch.device,
) -> dict[str, Any]:
    """One PPO iteration (rollout, scoring, update): `run_loop`'s step; returns its metrics."""
    t0 = time.perf_counter()
    B = cfg.rollout_batch
    samples, batch = rollout(policy, tok, prompts, block, cfg, seed, it)
    batch = batch.to(device)
    n_tok = int(batch.n_tokens)  # real (unpadded) tokens of the rollout sequences
    mask = batch.mask  # (B, T)
    with torch.no_grad():
        logprobs, entropy = tempered_logprobs(
            policy, batch.input_ids, batch.labels, cfg.temperature
        )
        ref_logprobs, _ = tempered_logprobs(ref, batch.input_ids, batch.labels, cfg.temperature)
        values = value_model(batch.input_ids).float() * mask  # (B, T)
    t_rollout = time.perf_counter() - t0

    t0 = time.perf_counter()
    scores, unterminated = rollout_scores(samples, score_fn, cfg)
    oracle = oracle_scores(samples).float()
    scores = scores.to(device)
    t_scoring = time.perf_counter() - t0

    # --- update
    t0 = time.perf_counter()
    beta = kl_ctl.value
    with torch.no_grad():
        kl = (logprobs - ref_logprobs) * mask  # (B, T) per-token log-ratio
        rewards = kl_penalized_rewards(scores, logprobs, ref_logprobs, mask, beta)  # (B, T)
        if cfg.whiten_rewards:
            rewards = whiten(rewards, mask, shift_mean=False)
        advantages, returns = compute_gae(rewards, values, mask, cfg.gamma, cfg.lam)
        advantages = whiten(advantages, mask)  # (B, T), 0 outside the response
    roll = Rollout(batch.input_ids, batch.labels, mask, logprobs, values, advantages, returns)
    stats = update(policy, value_model, optimizer, roll, cfg, seed=seed, it=it)
    seq_kl = kl.sum(1)  # (B,) sequence log-ratio
    mean_kl = float(seq_kl.mean())
    kl_ctl.update(mean_kl, B)  # after the update, as lm-human-preferences
    t_update = time.perf_counter() - t0

    non_score = float((-beta * kl).sum(1).mean())
    return {
        "objective/kl": mean_kl,
        "objective/scores": float(scores.mean()),
        "objective/non_score_reward": non_score,
        "objective/rlhf_reward": float(scores.mean()) + non_score,
        "objective/entropy": float((entropy * mask).sum(1).mean()),
        "objective/kl_coef": beta,
        "objective/oracle": float(oracle.mean()),
        "objective/unterminated": float(unterminated.float().mean()),
        "objective/length": float(mask.sum(1).mean()),
        **stats,
        "val/explained_variance": explained_variance(values, returns, mask),
        "time/rollout": t_rollout,
        "time/scoring": t_scoring,
        "time/update": t_update,
        # sampling + policy/ref/value log-probs (+ a learned scorer) + per epoch policy and value
        "tokens/forward": n_tok * (1 + 3 + (score_fn is not oracle_scores) + 2 * cfg.ppo_epochs),
        "tokens/backward": n_tok * 2 * cfg.ppo_epochs,
        "tokens/sampled": float(mask.sum()),  # response tokens generated this iteration
    }


def update(
    policy: GPT,
    value_model: ScalarHeadModel,
    optimizer: torch.optim.Optimizer,
    roll: Rollout,
    cfg: PPOConfig,
    *,
    seed: int,
    it: int,
) -> dict[str, float]:
    """`ppo_epochs` passes of shuffled minibatches; returns the averaged PPO statistics."""
    B = roll.input_ids.size(0)
    rng = stream(seed, "ppo/minibatches", it)
    params = [p for g in optimizer.param_groups for p in g["params"]]
    acc: dict[str, list[float]] = {
        k: [] for k in ("approxkl", "clipfrac", "pg", "vf", "vf_clipfrac", "ratio")
    }
    for _ in range(cfg.ppo_epochs):
        order = rng.permutation(B)
        for s in range(0, B, cfg.minibatch_size):
            idx = torch.as_tensor(order[s : s + cfg.minibatch_size], device=roll.input_ids.device)
            ids, labels, mask = roll.input_ids[idx], roll.labels[idx], roll.mask[idx]
            new_logp, _ = tempered_logprobs(policy, ids, labels, cfg.temperature)  # (b, T)
            new_values = value_model(ids).float()  # (b, T)
            pg, clipfrac, approxkl = policy_loss(
                new_logp, roll.logprobs[idx], roll.advantages[idx], mask, cfg.clip_range
            )  # Eq. 7, arXiv 1707.06347
            vf, vf_clipfrac = value_loss(
                new_values, roll.values[idx], roll.returns[idx], mask, cfg.clip_range_value
            )
            loss = pg + cfg.vf_coef * vf
            check_finite(loss.detach(), "PPO loss (policy + value)", "ppo update")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            optimizer.step()
            with torch.no_grad():
                ratio = masked_mean(torch.exp(new_logp - roll.logprobs[idx]), mask)
            for k, v in zip(acc, (approxkl, clipfrac, pg, vf, vf_clipfrac, ratio), strict=True):
                acc[k].append(float(v.detach()))
    mean = {k: float(np.mean(v)) for k, v in acc.items()}
    return {
        "policy/approxkl_avg": mean["approxkl"],
        "policy/clipfrac_avg": mean["clipfrac"],
        "loss/policy_avg": mean["pg"],
        "loss/value_avg": mean["vf"],
        "val/clipfrac_avg": mean["vf_clipfrac"],
        "val/ratio": mean["ratio"],
    }


def stage(
    name: str = "ppo",
    *,
    reward: str = "rm",
    kl_coef: Callable[[Context], float] | None = None,
    kl_target: float | None = None,
    seed: int | None = None,
    folder: Callable[[Context], Path] | None = None,
) -> Stage:
    """The PPO stage against the reward model (``reward="rm"``, RLHF), the oracle
    (``"oracle"``, PPO-GT, which takes no missing-end-of-text penalty: r* charges its
    own) or the shaped oracle (``"shaped"``, `minidpo.shaping`); `kl_coef`, `kl_target`
    (the adaptive controller steering towards it, as the paper's PPO runs did), `seed`
    and `folder` make PPO-GT's, the sweep's and the limits' runs."""
    if reward not in ("rm", "oracle", "shaped"):
        raise MinidpoError(f"--reward: one of rm, oracle, shaped; got {reward!r}")

    def config(ctx: Context) -> PPOConfig:
        over = {} if kl_coef is None else {"kl_coef": kl_coef(ctx)}
        if kl_target is not None:
            over.update(adaptive_kl=True, kl_target=kl_target)
        if reward != "rm":
            over["missing_eot_penalty"] = 0.0
        return method_config(ctx, "ppo", over, "iterations")

    def out(ctx: Context) -> Path:
        return folder(ctx) if folder else ctx.paths.ppo_dir(reward, config(ctx).kl_coef)

    def inputs(ctx: Context) -> list[Path]:
        prompts = [ctx.inputs["prompts"]] if "prompts" in ctx.inputs else []
        return [ctx.paths.sft, *([ctx.paths.rm] if reward == "rm" else []), *prompts]

    def training_prompts(ctx: Context) -> list[str] | None:
        """The prompts of ``--prompts`` (the oracle, logged along every run, knows the
        world's only), each checked; None: the world's training prompts."""
        if "prompts" not in ctx.inputs:
            return None
        policy, tok = load_policy(ctx.paths.sft)
        return load_prompts(ctx.inputs["prompts"], tok, policy.config.block_size,
                            config(ctx).max_new_tokens, check=load_world().prompt)  # fmt: skip

    def check(ctx: Context) -> None:
        """Before any write: the prompts of ``--prompts`` (the world's the stage layer checks)
        fit the context, and the reward model has the policy's shape."""
        training_prompts(ctx)
        if reward == "rm":
            check_value_init(ctx.paths.rm, ctx.paths.sft)

    def fn(ctx: Context, resume: bool) -> dict[str, Any]:
        cfg = config(ctx)
        score_fn: ScoreFn = oracle_scores
        value_init = None
        if reward == "rm":
            rm = load_reward_model(ctx.paths.rm, ctx.device)
            score_fn, value_init = rm.score, rm.model.state_dict()
        elif reward == "shaped":
            score_fn = shaped_score_fn(ctx.cfg["shaping"])
        job = Job(out(ctx), ctx.run.seed if seed is None else seed, ctx.device, resume,
                  ctx.progress)  # fmt: skip
        s = run_ppo(cfg, job, sft_path=ctx.paths.sft, score_fn=score_fn, value_init=value_init,
                    prompts=training_prompts(ctx), flag_prefix="ppo-")  # fmt: skip
        keep = ("eval_oracle_start", "eval_oracle", "eval_kl", "rollout_scores",
                "rollout_oracle", "time_per_iteration", "tokens_forward", "tokens_backward",
                "wall_s")  # fmt: skip
        return {k: s.get(k) for k in keep}

    groups = ("ppo", "shaping") if reward == "shaped" else ("ppo",)
    return Stage(name, fn, groups, ("rm",) if reward == "rm" else ("sft",), inputs=inputs,
                 outputs=lambda c: [out(c) / "checkpoint.pt"],
                 extra_key=lambda c: [reward, None if kl_coef is None else kl_coef(c), seed,
                                      *([] if kl_target is None else [kl_target])],
                 check=check)  # fmt: skip


def _gt_kl(ctx: Context) -> float:
    return ctx.cfg["pipeline"].ppo_gt_kl_coef


# The pipeline's own PPO run has a fixed KL coefficient; the sweep, as the paper's Figure 2,
# runs the adaptive controller at several KL targets (the paper: 3, 6, 9, 12 nats; here
# `PipelineConfig.sweep_ppo_kl_targets`, spanning this world's range).
RLHF_METHOD = Method(
    "PPO", stage("ppo", reward="rm"), key="kl", value=lambda c: c.cfg["ppo"].kl_coef,
    cost_with=("rm",), sweep=lambda c: c.cfg["pipeline"].floats("sweep_ppo_kl_targets"),
    variant=lambda name, target, seed, folder: stage(name, reward="rm", kl_target=target,
                                                     seed=seed, folder=folder),
    folder="ppo-rm-target", sweep_key="target",
)  # fmt: skip
GT_METHOD = Method(
    "PPO-GT", stage("ppo_gt", reward="oracle", kl_coef=_gt_kl), key="kl", value=_gt_kl,
    sweep=lambda c: [_gt_kl(c)],
    variant=lambda name, kl, seed, folder: stage(name, reward="oracle", kl_coef=lambda c: kl,
                                                 seed=seed, folder=folder),
    folder="ppo-oracle-kl",
)  # fmt: skip
