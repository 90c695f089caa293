"""Supervised fine-tuning: the tiny GPT learns the toy world from demonstrations.

Stage 1 of both pipelines (RLHF and DPO). The GPT is trained from scratch on
(prompt, response) demonstrations of mixed quality (`world.sample_demonstrations`)
with the next-token cross-entropy on the response tokens only (prompt tokens
masked; ``--all-tokens`` trains on both). The result is pi_SFT, which the later
stages also use as the frozen reference pi_ref.

Outputs under runs/<name>/:
    tokenizer.json          the BPE tokenizer (`minidpo.tokenizer_stage`)
    sft/checkpoint.pt       model, optimizer, step, configs and tokenizer
    sft/metrics.jsonl       train/loss, eval/loss, lr, grad_norm per step
    sft/summary.json        final losses and wall time
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from minidpo import distributed
from minidpo.atomic import atomic_write_json
from minidpo.batching import Batch, build_batch
from minidpo.checkpoints import stage_state
from minidpo.config import ModelConfig, RunConfig, SFTConfig, TokenizerConfig, to_dict
from minidpo.errors import MinidpoError
from minidpo.model import GPT, GPTConfig
from minidpo.paths import RunPaths
from minidpo.seeds import stream
from minidpo.stage import Context, Stage
from minidpo.tokenizer import Tokenizer
from minidpo.tokenizer_stage import prepare_tokenizer, world_tokenizer
from minidpo.training import Job, LoopConfig, resolve_device, train
from minidpo.world import World, format_prompt, load_world, sample_demonstrations


def lm_loss(logits: torch.Tensor, batch: Batch, count: torch.Tensor | None = None) -> torch.Tensor:
    """Mean next-token cross-entropy over the masked positions: their sum divided by
    `count` (default their number; under torchrun, the ranks' mean number, so that the
    mean of the ranks' losses is the global batch's mean over tokens)."""
    B, T, V = logits.shape
    nll = F.cross_entropy(
        logits.reshape(B * T, V),  # (B*T, V)
        batch.labels.clamp(min=0).reshape(B * T),  # (B*T,)
        reduction="none",
    ).view(B, T)  # (B, T)
    return (nll * batch.mask).sum() / (batch.mask.sum() if count is None else count)


def tokenize_demos(tok: Tokenizer, demos: list) -> tuple[list[list[int]], list[list[int]]]:
    """Prompt ids (formatted prompt) and response ids (+ end-of-text) of each demonstration."""
    prompts = tok.encode_batch([format_prompt(d.prompt) for d in demos])
    responses = [[*ids, tok.eot_id] for ids in tok.encode_batch([d.response for d in demos])]
    return prompts, responses


@torch.no_grad()
def mean_lm_loss(
    model: torch.nn.Module,
    prompts: list[list[int]],
    responses: list[list[int]],
    pad_id: int,
    batch_size: int = 128,
) -> float:
    """Token-weighted mean cross-entropy of `model` on the responses (the quantity trained)."""
    device = next(model.parameters()).device
    total, count = 0.0, 0.0
    for s in range(0, len(prompts), batch_size):
        b = build_batch(prompts[s : s + batch_size], responses[s : s + batch_size], pad_id=pad_id)
        b = b.to(device)
        n = float(b.mask.sum())
        total += lm_loss(model(b.input_ids), b).item() * n
        count += n
    return total / count


# The last data `sft_data` built, kept for the one call that follows its check: the
# stage's check builds the data before anything is written, the training takes it.
_LAST: dict[tuple, tuple] = {}


def _data_key(world: World, tok: Tokenizer, cfg: SFTConfig, seed: int) -> tuple:
    return (id(world), tuple(tok.merges.items()), cfg.n_demos, cfg.n_eval_demos, seed)


def sft_data(world: World, tok: Tokenizer, cfg: SFTConfig, seed: int, block_size: int,
             flag: str = "--block-size"):  # fmt: skip
    """((prompt ids, response ids) of the training demonstrations, the same of the held-out
    ones); a demonstration longer than the context is an error naming `flag`.
    The data of the call before, with the same inputs, is reused (not built twice)."""
    data = _LAST.pop(_data_key(world, tok, cfg, seed), None)
    if data is None:
        train_demos, eval_demos = demonstrations(world, cfg, seed)
        data = (tokenize_demos(tok, train_demos), tokenize_demos(tok, eval_demos))
    (train_p, train_r), (eval_p, eval_r) = data
    longest = max(len(p) + len(r) for p, r in zip(train_p + eval_p, train_r + eval_r, strict=True))
    if longest - 1 > block_size:
        raise MinidpoError(
            f"{flag} {block_size}: the longest demonstration needs {longest - 1} tokens of context"
        )
    return data


def check_block_size(run: RunConfig, cfg: dict[str, Any], flag: str = "--block-size") -> None:
    """``--block-size`` (`flag`) against the longest demonstration of the run, before anything is
    written (in `minidpo sft`, before the tokenizer): the data is built with the tokenizer
    trained in memory, and kept for the training that follows."""
    world = load_world()
    tok = world_tokenizer(cfg["tokenizer"], world)
    data = sft_data(world, tok, cfg["sft"], run.seed, cfg["model"].block_size, flag)
    _LAST.clear()
    _LAST[_data_key(world, tok, cfg["sft"], run.seed)] = data


def demonstrations(world: World, cfg: SFTConfig, seed: int) -> tuple[list, list]:
    """The SFT data of a run: (training, held-out) demonstrations, drawn from one
    generator seeded by (seed, 1), training prompts first."""
    rng = stream(seed, "sft/demonstrations")
    train = sample_demonstrations(world, cfg.n_demos, rng)
    return train, sample_demonstrations(world, cfg.n_eval_demos, rng, split="eval")


def run_sft(
    run: RunConfig,
    tok_cfg: TokenizerConfig,
    model_cfg: ModelConfig,
    cfg: SFTConfig,
    *,
    resume: bool = False,
    progress: bool = True,
    stop_after: int | None = None,
) -> dict[str, Any]:
    """Train the SFT policy (`resume`: continue from its checkpoint); returns its summary."""
    out = RunPaths.of(run).sft_dir
    stage_config = {
        "tokenizer": to_dict(tok_cfg),
        "model": to_dict(model_cfg),
        "sft": to_dict(cfg),
        "seed": run.seed,
    }
    device = resolve_device(run.device)
    world = load_world()
    tok = prepare_tokenizer(run, tok_cfg, world)
    torch.manual_seed(run.seed)
    gpt_cfg = GPTConfig(vocab_size=tok.vocab_size, **to_dict(model_cfg))
    model = GPT(gpt_cfg).to(device)

    (train_p, train_r), (eval_p, eval_r) = sft_data(world, tok, cfg, run.seed, gpt_cfg.block_size)

    def get_batch(step: int) -> Batch:
        rng = stream(run.seed, "sft/batch", step)  # the batch depends on (seed, step) only
        idx = distributed.shard(rng.integers(0, len(train_p), cfg.batch_size))  # this rank's
        return build_batch(
            [train_p[i] for i in idx],
            [train_r[i] for i in idx],
            pad_id=tok.eot_id,
            all_tokens=cfg.all_tokens,
        ).to(device)

    def loss_fn(m: torch.nn.Module, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
        loss = lm_loss(m(batch.input_ids), batch, distributed.mean(batch.mask.sum()))
        return loss, {"loss": loss.item(), "tokens": batch.n_tokens}

    def eval_fn(m: torch.nn.Module) -> dict[str, float]:
        return {"loss": mean_lm_loss(m, eval_p, eval_r, tok.eot_id)}

    job = Job(out, run.seed, device, resume, progress, stop_after)
    extra = stage_state(kind="policy", stage="sft", model_config=to_dict(gpt_cfg),
                        tokenizer=tok.to_dict(), config=stage_config)  # fmt: skip
    t0 = time.perf_counter()
    last = train(
        model,
        loop=LoopConfig.from_config(cfg, desc="sft"),
        job=job,
        get_batch=get_batch,
        loss_fn=loss_fn,
        checkpoint_extra=extra,
        eval_fn=eval_fn,
    )
    summary = {
        "steps": cfg.steps,
        "train_loss": last.get("train/loss"),
        "eval_loss": last.get("eval/loss"),
        "wall_s": time.perf_counter() - t0,
        "tokens_per_s": last.get("tokens_per_s"),
        "n_params": model.num_params(),
        "device": str(device),
    }
    if stop_after is None or last.get("step") == cfg.steps:
        atomic_write_json(out / "summary.json", summary)
    return summary


def load_summary(out: Path) -> dict[str, Any]:
    """The summary.json a finished SFT run wrote (empty if it wrote none)."""
    path = out / "summary.json"
    return json.loads(path.read_text()) if path.exists() else {}


def _sft(ctx: Context, resume: bool) -> dict[str, Any]:
    c = ctx.cfg
    s = run_sft(ctx.run, c["tokenizer"], c["model"], c["sft"], resume=resume,
                progress=ctx.progress)  # fmt: skip
    return {k: s[k] for k in ("steps", "train_loss", "eval_loss", "wall_s") if k in s}


SFT_STAGE = Stage("sft", _sft, ("tokenizer", "model", "sft"), ("tokenizer",),
                  inputs=lambda c: [c.paths.tokenizer],
                  outputs=lambda c: [c.paths.sft_dir / "checkpoint.pt"],
                  check=lambda c: check_block_size(c.run, c.cfg, c.flag("model", "block_size")))  # fmt: skip
