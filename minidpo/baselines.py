"""The paper's two cheap baselines: Preferred-FT and Best-of-N (arXiv 2305.18290, Sec. 6).

- Preferred-FT: supervised fine-tuning on the CHOSEN responses of the preference
  pairs only, starting from pi_SFT; the rejected responses are thrown away. It is
  the same next-token cross-entropy as SFT (`minidpo.sft.lm_loss`, response tokens
  only), run by the shared loop, and writes a "policy" checkpoint that every
  evaluation reads like any other. A response that wins several pairs appears
  once per pair, so it weighs as often as it won.
- Best-of-N: draw N samples from a policy (pi_SFT) for each prompt and keep the one a
  score function (the reward model, or the oracle for an upper bound) rates
  highest. No training at all, but N times the sampling cost at test time. All
  N x prompts samples are drawn in one batched call; ties go to the earliest sample.

Unlikelihood, the paper's third baseline, is its own stage (`minidpo.unlikelihood`).

Left out: rejection-sampling fine-tuning on Best-of-N outputs, and any KL control for Preferred-FT.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from minidpo.atomic import atomic_write_json, atomic_write_jsonl
from minidpo.batching import Batch, build_batch
from minidpo.checkpoints import provenance, stage_state
from minidpo.config import _f, to_dict
from minidpo.errors import MinidpoError
from minidpo.model import GPT
from minidpo.policy import load_policy
from minidpo.preferences import load_pairs, tokenize_pairs
from minidpo.reward_model import load_reward_model
from minidpo.sampling import Sample, sample_responses
from minidpo.scoring import ScoreFn, oracle_breakdowns, oracle_scores
from minidpo.seeds import seed_of, stream
from minidpo.sft import lm_loss, mean_lm_loss
from minidpo.stage import Context, Method, Stage, method_config, training_summary
from minidpo.tokenizer import Tokenizer
from minidpo.training import Job, LoopConfig, train
from minidpo.world import load_world

GRAVITY = "Explain gravity."
GRAVITY_SAMPLES = 2  # "Explain gravity." samples of each method, shown in the report


@dataclass
class PreferredFTConfig:
    """Preferred-FT: SFT on the chosen responses of the preference pairs."""

    steps: int = _f(150, "optimizer steps")
    batch_size: int = _f(32, "chosen responses per step")
    lr: float = _f(3e-4, "peak learning rate (AdamW); lower than SFT's, it starts from SFT")
    warmup_steps: int = _f(15, "linear warmup steps")
    min_lr_ratio: float = _f(0.1, "cosine decay floor as a fraction of the peak")
    weight_decay: float = _f(0.0, "AdamW weight decay on matrices")
    grad_clip: float = _f(1.0, "clip the global gradient norm to this (0: off)")
    eval_every: int = _f(50, "held-out loss on the chosen responses every N steps")
    ckpt_every: int = _f(50, "checkpoint every N steps")
    snapshot_every: int = _f(
        0, "save the weights every N steps, the frontier's points (0: about 4 per run)"
    )


def chosen_data(
    path: Path, tok: Tokenizer, block_size: int
) -> tuple[list[list[int]], list[list[int]]]:
    """Prompt ids and chosen-response ids (end-of-text appended when it terminated)."""
    data = tokenize_pairs(load_pairs(path)[0], tok, block_size, str(path))
    return data.prompts, data.chosen


def chosen_loss(
    model: GPT, prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]], pad_id: int
) -> float:
    """Token-weighted mean cross-entropy of `model` on the chosen responses (what it trains)."""
    return mean_lm_loss(model, list(prompts), list(responses), pad_id)


def run_preferred_ft(
    cfg: PreferredFTConfig,
    job: Job,
    *,
    sft_path: Path,
    train_pairs: Path,
    eval_pairs: Path | None = None,
) -> dict[str, Any]:
    """Fine-tune pi_SFT on the chosen responses of the pairs; returns the final metrics."""  # fmt: skip
    stage_config = provenance("preferred_ft", cfg, job.seed, sft=sft_path, pairs=train_pairs)
    seed, device, out_dir = job.seed, torch.device(job.device), job.out_dir
    policy, tok = load_policy(sft_path, device)
    block = policy.config.block_size
    train_p, train_r = chosen_data(train_pairs, tok, block)
    if eval_pairs is not None:
        eval_p, eval_r = chosen_data(eval_pairs, tok, block)

    def get_batch(step: int) -> Batch:
        rng = stream(seed, "preferred_ft/batch", step)  # the batch depends on (seed, step) only
        idx = rng.choice(len(train_p), size=min(cfg.batch_size, len(train_p)), replace=False)
        batch = build_batch([train_p[i] for i in idx], [train_r[i] for i in idx], pad_id=tok.eot_id)
        return batch.to(device)

    def loss_fn(m: torch.nn.Module, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
        loss = lm_loss(m(batch.input_ids), batch)
        return loss, {"loss": loss.item(), "tokens": batch.n_tokens}

    def eval_fn(m: torch.nn.Module) -> dict[str, float]:
        return {"loss": chosen_loss(m, eval_p, eval_r, tok.eot_id)}

    extra = stage_state(kind="policy", stage="preferred_ft", model_config=to_dict(policy.config),
                        tokenizer=tok.to_dict(), config=stage_config)  # fmt: skip
    t0 = time.perf_counter()
    last = train(policy, loop=LoopConfig.from_config(cfg, desc="preferred-ft"), job=job,
                 get_batch=get_batch, loss_fn=loss_fn, checkpoint_extra=extra,
                 eval_fn=eval_fn if eval_pairs is not None else None)  # fmt: skip
    summary = {**last, "wall_s_total": time.perf_counter() - t0, "n_train_pairs": len(train_p)}
    if last["steps_done"] == cfg.steps:
        atomic_write_json(out_dir / "summary.json", summary)
    return summary


def best_of_n_candidates(
    policy: GPT,
    tok: Tokenizer,
    prompts: Sequence[str],
    *,
    n: int,
    score_fn: ScoreFn,
    seed: int,
    temperature: float = 1.0,
    max_new_tokens: int = 64,
) -> tuple[list[Sample], torch.Tensor]:
    """`n` samples of `policy` per prompt and their scores (P*n,) float64: the candidates of
    prompt i are rows i*n .. i*n + n - 1 of one batched `sample_responses` call with `seed`."""
    if n < 1:
        raise MinidpoError(f"--n: Best-of-N needs n >= 1, got {n}")
    expanded = [p for p in prompts for _ in range(n)]
    candidates = sample_responses(
        policy, tok, expanded, seed=seed, temperature=temperature, max_new_tokens=max_new_tokens
    )
    scores = torch.as_tensor(score_fn(candidates), dtype=torch.float64).cpu()  # (P*n,)
    if scores.shape != (len(candidates),):
        raise ValueError(
            f"score_fn returned shape {tuple(scores.shape)}, expected ({len(candidates)},)"
        )
    return candidates, scores


def pick_best(scores: torch.Tensor, n: int) -> torch.Tensor:
    """Index of the first highest score in each consecutive group of `n`: (len/n,)."""
    best = scores.view(-1, n).argmax(dim=1)  # first maximum of each row
    return torch.arange(best.numel()) * n + best


def best_of_n(
    policy: GPT, tok: Tokenizer, prompts: Sequence[str], *, n: int, **kw: Any
) -> list[Sample]:
    """For each prompt, the highest-scoring of `n` samples of `policy` (ties: the earliest;
    n = 1 is plain sampling). `kw`: ``score_fn``, ``seed``, ``temperature``,
    ``max_new_tokens``, as `best_of_n_candidates` takes them."""
    candidates, scores = best_of_n_candidates(policy, tok, prompts, n=n, **kw)
    return [candidates[int(i)] for i in pick_best(scores, n)]


def best_of_n_curve(
    scores: torch.Tensor, oracle: torch.Tensor, n: int, ns: Sequence[int]
) -> list[dict[str, float]]:
    """Best-of-N for every N in `ns` from the same pool: `scores` and `oracle` (P*n,) hold
    n candidates per prompt; each prompt's n split into n/N groups of N consecutive ones,
    the best of each group by `scores` kept. Returns per N the oracle reward of the kept
    (mean, se over all kept), how many were kept, and the closed-form KL.

    Example: n = 2, scores [0, 1], oracle [5, 3]: N=1 keeps both (mean 4), N=2 keeps the
    second (3)."""
    out = []
    for N in ns:
        if N < 1 or n % N:
            raise MinidpoError(f"Best-of-N curve: N={N} must divide the pool of {n} candidates")
        kept = oracle[pick_best(scores, N)].double()
        se = float(kept.std(unbiased=True) / kept.numel() ** 0.5) if kept.numel() > 1 else 0.0
        out.append({"n": N, "reward": float(kept.mean()), "reward_se": se,
                    "selections": int(kept.numel()), "kl": best_of_n_kl(N)})  # fmt: skip
    return out


def best_of_n_kl(n: int) -> float:
    """KL(best-of-n || pi) = log n - (n - 1)/n for a continuous score, an upper bound with
    ties (Beirami et al. 2024, arXiv 2401.01879, who prove the bound)."""
    return math.log(n) - (n - 1) / n


def preferred_ft_stage(
    name: str = "preferred_ft",
    *,
    seed: int | None = None,
    folder: Callable[[Context], Path] | None = None,
) -> Stage:
    """The Preferred-FT stage: the run's own, or a sweep run with its own seed and folder."""

    def out(ctx: Context) -> Path:
        return folder(ctx) if folder else ctx.paths.preferred_ft_dir

    def fn(ctx: Context, resume: bool) -> dict[str, Any]:
        held_out = ctx.paths.held_out_pairs
        job = Job(out(ctx), ctx.run.seed if seed is None else seed, ctx.device, resume,
                  ctx.progress)  # fmt: skip
        s = run_preferred_ft(method_config(ctx, "preferred_ft", None, "steps"), job,
                             sft_path=ctx.paths.sft, train_pairs=ctx.paths.train_pairs,
                             eval_pairs=held_out)  # fmt: skip
        return training_summary(s)

    return Stage(name, fn, ("preferred_ft",), ("prefs",),
                 inputs=lambda c: [c.paths.sft, c.paths.train_pairs],
                 outputs=lambda c: [out(c) / "checkpoint.pt"],
                 extra_key=lambda c: [seed])  # fmt: skip


def best_of_n_samples(ctx: Context, resume: bool = False) -> dict[str, Any]:
    """Best-of-N selections (reward model picks) on the held-out prompts, written to
    ``best-of-n/samples.jsonl``; plus the selections for "Explain gravity."."""
    p, ev = ctx.cfg["pipeline"], ctx.cfg["eval"]
    policy, tok = load_policy(ctx.paths.sft, ctx.device)
    rm = load_reward_model(ctx.paths.rm, ctx.device)
    prompts = [x.text for x in load_world().prompts("eval")
               for _ in range(p.best_of_n_samples_per_prompt)]  # fmt: skip
    prompts += [GRAVITY] * GRAVITY_SAMPLES
    tokens = [0]

    def score(candidates: Sequence[Sample]) -> torch.Tensor:
        # each candidate went through the policy (sampling) and the reward model: 2 forwards
        tokens[0] += 2 * sum(
            len(tok.encode(s.prompt)) + 1 + len(s.response_ids) for s in candidates
        )
        return rm.score(candidates)

    candidates, scores = best_of_n_candidates(
        policy, tok, prompts, n=p.best_of_n, score_fn=score,
        seed=seed_of(ctx.run.seed, "eval/samples"), temperature=ev.temperature,
        max_new_tokens=ev.max_new_tokens,
    )  # fmt: skip
    picked = [candidates[int(i)] for i in pick_best(scores, p.best_of_n)]
    held_out = (len(prompts) - GRAVITY_SAMPLES) * p.best_of_n  # the curve: held-out prompts only
    curve = best_of_n_curve(scores[:held_out], oracle_scores(candidates[:held_out]), p.best_of_n,
                            [N for N in (1, 2, 4, 8, 16, 32, 64) if p.best_of_n % N == 0])  # fmt: skip
    atomic_write_json(ctx.paths.best_of_n_samples.with_name("curve.json"), {"curve": curve})
    rows = [{"prompt": s.prompt, "response": s.response, "terminated": s.terminated,
             "n_tokens": len(s.response_ids), "oracle": b.total, "unparseable": b.unparseable > 0}
            for s, b in zip(picked, oracle_breakdowns(picked), strict=True)]  # fmt: skip
    atomic_write_jsonl(ctx.paths.best_of_n_samples, rows)
    return {"n": p.best_of_n, "selections": len(rows),
            "samples_generated": len(prompts) * p.best_of_n,
            "tokens_forward": tokens[0], "tokens_backward": 0}  # fmt: skip


PREFERRED_FT_METHOD = Method(
    "Preferred-FT", preferred_ft_stage(), sweep=lambda c: [0.0],
    variant=lambda name, _, seed, folder: preferred_ft_stage(name, seed=seed, folder=folder),
    folder="preferred-ft",
)  # fmt: skip

BEST_OF_N_STAGE = Stage(
    "best_of_n", best_of_n_samples, ("eval",), ("rm",),
    inputs=lambda c: [c.paths.sft, c.paths.rm],
    outputs=lambda c: [c.paths.best_of_n_samples, c.paths.best_of_n_samples.with_name("curve.json")],
    extra_key=lambda c: [c.cfg["pipeline"].best_of_n, c.cfg["pipeline"].best_of_n_samples_per_prompt],
)  # fmt: skip
