"""The reward model of the RLHF pipeline: a GPT with a scalar head, trained with Bradley-Terry.

Stage 2 of RLHF (the stage DPO removes). The body starts as a copy of the SFT
policy, a ``Linear(n_embd, 1)`` head (`minidpo.model.ScalarHeadModel`) reads the
hidden state at the response's END-OF-TEXT token (the last real token of the row;
an unterminated response is read at its last token), and the model learns from the
same preference pairs as DPO by maximum likelihood under Bradley-Terry:

    L_R = -E[ log sigmoid( r(x, y_w) - r(x, y_l) ) ]          (Eq. 2, arXiv 2305.18290)

(`minidpo.losses.bradley_terry_loss`, beside the DPO loss that replaces it). Two optional terms, both off by default:
- ``--margin``: subtract the pair's score margin m = score_chosen - score_rejected
  inside the sigmoid, as in Llama 2's margin loss (Touvron et al. 2023, Eq. 2);
- ``--center-coef c``: add c * (r_w + r_l)^2, TRL's ``center_rewards_coefficient``
  (Eisenstein et al. 2023), which keeps rewards near zero without changing which
  response wins.

Chosen and rejected rows go through the model in ONE forward over the same
concatenated [chosen; rejected] batch as DPO (`minidpo.dpo.TokenizedPairs.batch`).

Training keeps the checkpoint with the best VALIDATION pair accuracy (the share of
pairs with r(chosen) > r(rejected), evaluated every `eval_every` steps), not the last
one: `minidpo.training.train` with ``keep_best="accuracy"``. The validation pairs are
those of ``validation_fraction`` of the training prompts, carved out by prompt
(`minidpo.preferences.validation_split`) and never trained on; the held-out pairs
(held-out prompts) take no part in the choice, so the accuracy reported on them is
not inflated by it. That held-out accuracy is reported beside its ceiling, the
oracle's own agreement with the same labels (`oracle_pair_agreement`): labels drawn
by Bradley-Terry at a temperature tau > 0 disagree with r* on some pairs, and a
reward model is not expected to beat r* there.

A Bradley-Terry reward is defined only up to a constant, so after training it is
normalised as in lm-human-preferences (Ziegler et al. 2019): draw
``n_norm_samples`` SFT samples on the training prompts, score them, and store
``gain`` and ``bias`` so that ``gain * r_raw + bias`` has mean 0 and std 1 on them.
`RewardModel.score` returns the normalised reward.

Outputs under the stage's folder:
    checkpoint.pt   kind "reward_model": model (the best evaluation's weights once done),
                    optimizer, step, configs, tokenizer, best_step, best_value,
                    "normalization": {"gain", "bias"} (None until training is done)
    metrics.jsonl   train/ and eval/ loss, accuracy, margin per step (eval/: the validation pairs)
    summary.json    last metrics, best_step/best_value (= validation_accuracy), the pair
                    counts of each split, normalisation, `reward_model_report` (held-out)

Left out: an ensemble of reward models, a separate value head, per-token rewards,
and re-normalising against the PPO policy's own samples during RL.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from minidpo import distributed
from minidpo.atomic import atomic_write_json
from minidpo.batching import Batch, build_batch
from minidpo.checkpoints import (
    load_checkpoint,
    malformed_as_error,
    provenance,
    save_checkpoint,
    stage_state,
)
from minidpo.config import _f, to_dict
from minidpo.errors import MinidpoError
from minidpo.losses import bradley_terry_loss
from minidpo.model import GPT, GPTConfig, ScalarHeadModel
from minidpo.oracle import oracle_reward
from minidpo.policy import load_policy
from minidpo.preferences import (
    PreferencePair,
    TokenizedPairs,
    load_pairs,
    tokenize_pairs,
    validation_split,
)
from minidpo.sampling import Sample, encode_prompt, sample_responses
from minidpo.scoring import oracle_scores
from minidpo.seeds import seed_of, stream
from minidpo.stage import Context, Stage, training_summary
from minidpo.tokenizer import Tokenizer
from minidpo.training import Job, LoopConfig, train
from minidpo.world import World, format_prompt, load_world


@dataclass
class RewardModelConfig:
    """Reward-model training (Bradley-Terry, Eq. 2 of arXiv 2305.18290) and normalisation."""

    steps: int = _f(
        100, "optimizer steps (held-out accuracy ~70 % from step 40 on; 300 gain nothing)"
    )
    batch_size: int = _f(32, "preference pairs per step (2x sequences in the forward)")
    lr: float = _f(3e-4, "peak learning rate (AdamW); 1e-4 and 1e-3 measured no better")
    warmup_steps: int = _f(10, "linear warmup steps")
    min_lr_ratio: float = _f(0.1, "cosine decay floor as a fraction of the peak")
    weight_decay: float = _f(0.0, "AdamW weight decay on matrices")
    grad_clip: float = _f(1.0, "clip the global gradient norm to this (0: off)")
    margin: bool = _f(
        False, "subtract the pair's score margin inside the sigmoid (Llama 2's margin loss)"
    )
    center_coef: float = _f(0.0, "coefficient of the reward-centering term c * (r_w + r_l)^2")
    pooling: str = _f(
        "last",
        "last: the head read at end-of-text; sum: the head summed over the response's tokens",
    )
    eval_every: int = _f(
        10,
        "validation pair metrics every N steps; the best accuracy's weights are kept (~10 evals)",
    )
    validation_fraction: float = _f(
        0.1,
        "share of the training prompts whose pairs are held back to choose the checkpoint "
        "(the held-out pairs only score it)",
    )
    ckpt_every: int = _f(50, "checkpoint every N steps")
    n_norm_samples: int = _f(320, "SFT samples on the training prompts used to normalise")
    max_new_tokens: int = _f(64, "length limit of the normalisation and report samples")
    report_samples_per_prompt: int = _f(
        8, "fresh SFT samples per held-out prompt for the Spearman report (0: no report)"
    )


# --------------------------------------------------------------------------- pure math


def reward_inputs(batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """The full token rows of a `build_batch` batch and the index of each row's last token.

    `build_batch` drops each row's last token from ``input_ids`` (it is only ever a
    label), but the reward is read AT that token, the end-of-text, so the rows are
    rebuilt: tokens = [input_ids[:, 0], labels...] (B, T + 1), with padding as id 0
    (right padding: a causal model never attends to it from a real position, so any
    valid id will do). A row with n labels has n + 1 tokens; its last is at index n.

    Example: input_ids [[5, 6, 7]], labels [[6, 7, 0]] -> tokens [[5, 6, 7, 0]], last [3].
    """
    real = batch.labels >= 0  # (B, T)
    rest = batch.labels.clamp(min=0)  # (B, T): padding -1 -> id 0
    tokens = torch.cat([batch.input_ids[:, :1], rest], dim=1)  # (B, T + 1)
    last = real.sum(dim=1)  # (B,) = number of labels = index of the last token
    return tokens, last


def read_at(values: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """values (B, T), index (B,) long -> values[b, index[b]] (B,)."""
    return values.gather(1, index[:, None]).squeeze(1)  # (B,)


POOLINGS = ("last", "sum")


def pooled_rewards(values: torch.Tensor, batch: Batch, pooling: str) -> torch.Tensor:
    """One reward per row from the head's values on `reward_inputs` rows: (B, T + 1) -> (B,).

    ``last``: the value at the row's last token, the end-of-text (InstructGPT, TRL).
    ``sum``: the sum of the values at the response's tokens (end-of-text included,
    prompt and padding excluded), r(x, y) = sum_t v(x, y_<=t): a reward that adds up
    over the response, as the oracle's per-sentence table does.

    Example: values [[1, 2, 3, 4]], prompt of 2 tokens, response of 2 -> last 4, sum 7.
    """
    if pooling == "last":
        return read_at(values, reward_inputs(batch)[1])
    if pooling == "sum":
        at_response = torch.cat([torch.zeros_like(batch.mask[:, :1]), batch.mask], dim=1)
        return (values * at_response.to(values.dtype)).sum(dim=1)  # (B,)
    raise MinidpoError(f"--pooling: {pooling!r} is not one of {', '.join(POOLINGS)}")


def normalization(raw: Sequence[float] | np.ndarray) -> tuple[float, float]:
    """(gain, bias) such that gain * raw + bias has mean 0 and (population) std 1.

    Example: raw [1, 3] -> mean 2, std 1 -> gain 1, bias -2.
    """
    a = np.asarray(raw, dtype=np.float64)
    std = float(a.std())
    if len(a) < 2 or not std > 0:
        raise MinidpoError(
            f"reward normalisation: {len(a)} samples with std {std:g}; need >= 2 distinct scores"
        )
    return 1.0 / std, -float(a.mean()) / std


def average_ranks(x: Sequence[float] | np.ndarray) -> np.ndarray:
    """Ranks 1..n of `x`, ties sharing the average of the ranks they span.

    Example: [10, 20, 20, 40] -> [1, 2.5, 2.5, 4].
    """
    a = np.asarray(x, dtype=np.float64)
    order = np.argsort(a, kind="stable")
    ranks = np.empty(len(a), dtype=np.float64)
    i = 0
    while i < len(a):
        j = i
        while j + 1 < len(a) and a[order[j + 1]] == a[order[i]]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2 + 1  # average of ranks i+1 .. j+1
        i = j + 1
    return ranks


def spearman(x: Sequence[float] | np.ndarray, y: Sequence[float] | np.ndarray) -> float:
    """Spearman's rank correlation: the Pearson correlation of the average ranks.

    NaN when either side is constant (the correlation is undefined).

    Example: x [1, 2, 3, 4, 5], y [2, 1, 4, 3, 5] -> 1 - 6 * 4 / (5 * 24) = 0.8.
    """
    if len(x) != len(y):
        raise ValueError(f"spearman: {len(x)} x values but {len(y)} y values")
    rx, ry = average_ranks(x), average_ranks(y)
    dx, dy = rx - rx.mean(), ry - ry.mean()
    denom = float(np.sqrt((dx * dx).sum() * (dy * dy).sum()))
    return float((dx * dy).sum() / denom) if denom > 0 else float("nan")


def oracle_pair_agreement(pairs: Sequence[PreferencePair], world: World | None = None) -> float:
    """Share of pairs the oracle itself orders as labelled: r*(x, y_w) > r*(x, y_l) counts 1,
    a tie 1/2 (a coin flip), each response scored with its own terminated flag.

    The ceiling of a reward model's held-out accuracy on the same pairs; NaN for no pairs.

    Example: a correct fact (+1) chosen over a wrong claim (-1) counts 1; two facts 1/2.
    """
    world = load_world() if world is None else world
    agree = []
    for p in pairs:
        r_w = oracle_reward(p.prompt, p.chosen, terminated=p.chosen_terminated, world=world)
        r_l = oracle_reward(p.prompt, p.rejected, terminated=p.rejected_terminated, world=world)
        agree.append(1.0 if r_w > r_l else 0.5 if r_w == r_l else 0.0)
    return float(np.mean(agree)) if agree else float("nan")


def pair_metrics(losses: torch.Tensor, r_chosen: torch.Tensor, r_rejected: torch.Tensor):
    """loss, accuracy (share with r_w > r_l), margin (mean r_w - r_l), mean r_w and r_l."""
    margins = (r_chosen - r_rejected).detach()
    return {
        "loss": losses.detach().mean().item(),
        "accuracy": (margins > 0).float().mean().item(),
        "margin": margins.mean().item(),
        "rewards/chosen": r_chosen.detach().mean().item(),
        "rewards/rejected": r_rejected.detach().mean().item(),
    }


# --------------------------------------------------------------------------- the model


def pair_rewards(
    model: ScalarHeadModel, batch: Batch, pooling: str = "last"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Raw rewards (r_w (B,), r_l (B,)) from one forward over a concatenated 2B-row batch."""
    tokens, _ = reward_inputs(batch)  # (2B, T + 1)
    r = pooled_rewards(model(tokens), batch, pooling)  # (2B,)
    B = r.shape[0] // 2
    return r[:B], r[B:]


def check_fits(data: TokenizedPairs, block_size: int, source: str) -> None:
    """The reward reads the end-of-text token itself, so prompt + response must fit whole."""
    for i in range(len(data)):
        n = len(data.prompts[i]) + max(len(data.chosen[i]), len(data.rejected[i]))
        if n > block_size:
            raise MinidpoError(
                f"{source}: pair {i + 1} needs {n} tokens, the model's context is {block_size}"
            )


def pair_margins(pairs: Sequence[PreferencePair], source: str) -> torch.Tensor:
    """score_chosen - score_rejected per pair (N,), for the margin loss."""
    out = []
    for i, p in enumerate(pairs):
        if p.score_chosen is None or p.score_rejected is None:
            raise MinidpoError(
                f"{source}: pair {i + 1} has no score_chosen/score_rejected, which --margin needs"
            )
        out.append(p.score_chosen - p.score_rejected)
    return torch.tensor(out, dtype=torch.float32)


class RewardModel:
    """A trained, normalised reward model: r(x, y) = gain * head(h_eot) + bias.

    Scores are computed without gradients, in batches, and returned on the CPU.
    """

    def __init__(
        self,
        model: ScalarHeadModel,
        tok: Tokenizer,
        gain: float,
        bias: float,
        pooling: str = "last",
    ):
        self.model = model.eval()
        self.tok = tok
        self.gain = gain
        self.bias = bias
        self.pooling = pooling

    @property
    def device(self) -> torch.device:
        return self.model.body.device

    @torch.no_grad()
    def raw_scores(
        self, prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]], bs: int = 128
    ) -> torch.Tensor:
        """Unnormalised rewards of (prompt ids, response ids) rows: (N,) float32 on CPU."""
        block = self.model.config.block_size
        out = []
        for s in range(0, len(prompts), bs):
            p, r = prompts[s : s + bs], responses[s : s + bs]
            if max(len(a) + len(b) for a, b in zip(p, r, strict=True)) > block:
                raise MinidpoError(f"reward model: a response exceeds the context of {block}")
            batch = build_batch(p, r, pad_id=self.tok.eot_id).to(self.device)
            values = self.model(reward_inputs(batch)[0])  # (b, T + 1)
            out.append(pooled_rewards(values, batch, self.pooling).float().cpu())
        return torch.cat(out) if out else torch.zeros(0)

    def normalize(self, raw: torch.Tensor) -> torch.Tensor:
        return raw * self.gain + self.bias

    def score(self, samples: Sequence[Sample]) -> torch.Tensor:
        """Normalised rewards (B,) of samples: their own response_ids after the formatted prompt."""
        block = self.model.config.block_size
        prompts = [encode_prompt(self.tok, s.prompt, block, 0) for s in samples]
        return self.normalize(self.raw_scores(prompts, [s.response_ids for s in samples]))

    def score_texts(
        self, prompts: Sequence[str], responses: Sequence[str], terminated: Sequence[bool]
    ) -> torch.Tensor:
        """Normalised rewards (B,) of response texts (end-of-text appended when terminated)."""
        p_ids = self.tok.encode_batch([format_prompt(p) for p in prompts])
        r_ids = self.tok.encode_batch(list(responses))
        r_ids = [[*r, self.tok.eot_id] if t else r for r, t in zip(r_ids, terminated, strict=True)]
        return self.normalize(self.raw_scores(p_ids, r_ids))


def build_reward_model(
    ckpt: dict[str, Any], where: str | Path = "checkpoint"
) -> tuple[ScalarHeadModel, Tokenizer]:
    """The ScalarHeadModel and tokenizer of a reward-model checkpoint (CPU, eval mode); a
    malformed one is one MinidpoError naming `where`."""
    with malformed_as_error(where):
        model = ScalarHeadModel(GPT(GPTConfig(**ckpt["model_config"])))
        model.load_state_dict(ckpt["model"])
        tok = Tokenizer.from_dict(ckpt["tokenizer"])
    return model.eval(), tok


def load_reward_model(path: str | Path, device: torch.device | str = "cpu") -> RewardModel:
    """Load a finished reward model; a policy checkpoint is refused by name."""
    ckpt = load_checkpoint(path, kind="reward_model")
    norm = ckpt.get("normalization")
    if not norm:
        raise MinidpoError(f"{path}: reward model is not normalised yet (its run did not finish)")
    model, tok = build_reward_model(ckpt, path)
    gain, bias = float(norm["gain"]), float(norm["bias"])
    return RewardModel(model.to(device), tok, gain, bias, ckpt.get("pooling", "last"))


def reward_model_report(
    rm: RewardModel,
    policy: GPT,
    *,
    eval_pairs: Sequence[PreferencePair],
    prompts: Sequence[str],
    samples_per_prompt: int,
    seed: int,
    max_new_tokens: int = 64,
) -> dict[str, float]:
    """How well the reward model stands in for the oracle on held-out data.

    - heldout_accuracy: share of held-out pairs with r(chosen) > r(rejected);
    - heldout_ceiling: the oracle's own agreement with those labels
      (`oracle_pair_agreement`), and heldout_gap = heldout_ceiling - heldout_accuracy;
    - spearman: rank correlation between the reward model and the oracle reward on
      `samples_per_prompt` fresh samples of `policy` (pi_SFT) per prompt.
    """
    rc = rm.score_texts(
        [p.prompt for p in eval_pairs],
        [p.chosen for p in eval_pairs],
        [p.chosen_terminated for p in eval_pairs],
    )
    rr = rm.score_texts(
        [p.prompt for p in eval_pairs],
        [p.rejected for p in eval_pairs],
        [p.rejected_terminated for p in eval_pairs],
    )
    expanded = [p for p in prompts for _ in range(samples_per_prompt)]
    samples = sample_responses(
        policy, rm.tok, expanded, seed=seed, temperature=1.0, max_new_tokens=max_new_tokens
    )
    oracle = oracle_scores(samples).tolist()
    accuracy = float((rc > rr).float().mean())
    ceiling = oracle_pair_agreement(eval_pairs)
    return {
        "heldout_accuracy": accuracy,
        "heldout_ceiling": ceiling,
        "heldout_gap": ceiling - accuracy,
        "n_heldout_pairs": len(eval_pairs),
        "spearman": spearman(rm.score(samples).numpy(), oracle),
        "n_spearman_samples": len(samples),
    }


# --------------------------------------------------------------------------- the stage


@dataclass(frozen=True)
class PairSplit:
    """The reward model's pairs: `train` and `validation` (chosen by) from the training
    file, `heldout` (reported on; None without a held-out file) from the other."""

    train: list[PreferencePair]
    validation: list[PreferencePair]
    heldout: list[PreferencePair] | None

    @classmethod
    def of(
        cls,
        pairs: Sequence[PreferencePair],
        heldout: list[PreferencePair] | None,
        fraction: float,
        seed: int,
        source: str | Path,
    ) -> PairSplit:
        """Carve the validation prompts out of the training `pairs` (read from `source`)."""
        train, validation = validation_split(pairs, fraction, seed)
        if not validation:
            raise MinidpoError(
                f"{source}: all pairs share one prompt; --validation-fraction needs pairs "
                "of at least 2 prompts (the checkpoint is chosen on prompts it never trained on)"
            )
        return cls(train, validation, heldout)

    def indices(self, pairs: Sequence[PreferencePair]) -> tuple[np.ndarray, list[int]]:
        """The positions in `pairs` (the training file) of the train and validation pairs."""
        held = {p.prompt for p in self.validation}
        train = np.array([i for i, p in enumerate(pairs) if p.prompt not in held])
        return train, [i for i, p in enumerate(pairs) if p.prompt in held]


def check_config(cfg: RewardModelConfig) -> None:
    """Raise MinidpoError naming the flag of the first bad value."""
    if cfg.n_norm_samples < 2:
        raise MinidpoError(f"--n-norm-samples: must be >= 2, got {cfg.n_norm_samples}")
    if cfg.pooling not in POOLINGS:
        raise MinidpoError(f"--pooling: {cfg.pooling!r} is not one of {', '.join(POOLINGS)}")
    if cfg.center_coef < 0:
        raise MinidpoError(f"--center-coef: must be >= 0, got {cfg.center_coef}")
    if not 0.0 < cfg.validation_fraction < 1.0:
        raise MinidpoError(
            f"--validation-fraction: must be in (0, 1), got {cfg.validation_fraction}"
        )


def run_reward_model(
    cfg: RewardModelConfig,
    job: Job,
    *,
    sft_path: Path,
    train_pairs: Path,
    eval_pairs: Path | None,
) -> dict[str, Any]:
    """Train, normalise and report on a reward model initialised from SFT; returns its summary.

    ``job.resume`` continues from the checkpoint (a run killed after training but before
    normalising resumes straight into the normalisation). The weights kept are those of
    the evaluation with the best validation accuracy (``best_step``, ``validation_accuracy``
    in the summary); `eval_pairs`, when given, are only reported on (``report``).
    """  # fmt: skip
    check_config(cfg)
    t0 = time.perf_counter()
    seed, device = job.seed, torch.device(job.device)
    policy, tok = load_policy(sft_path)
    last, model, split = train_reward_model(
        policy, tok, cfg, job, train_pairs=train_pairs, eval_pairs=eval_pairs,
        provenance_=provenance("reward_model", cfg, seed, sft=sft_path, pairs=train_pairs),
    )  # fmt: skip
    if not distributed.is_writer():  # under torchrun: rank 0 normalises and reports alone
        return last
    ckpt_path = job.out_dir / "checkpoint.pt"
    ckpt = load_checkpoint(ckpt_path, kind="reward_model")
    if not ckpt["done"]:
        return {**last, "done": False}
    policy = policy.to(device)
    model.load_state_dict(ckpt["model"])
    rm, raw = normalise(model, tok, policy, ckpt_path, ckpt, cfg, seed)
    summary: dict[str, Any] = {
        **last,
        "best_step": ckpt.get("best_step"),
        "best_value": ckpt.get("best_value"),
        "done": True,
        "normalization": {"gain": rm.gain, "bias": rm.bias, "raw_mean": float(raw.mean())},
        "validation_accuracy": ckpt.get("best_value"),  # of the kept weights, the choice's own
        "n_train_pairs": len(split.train),
        "n_validation_pairs": len(split.validation),
    }
    if split.heldout is not None and cfg.report_samples_per_prompt > 0:
        summary["report"] = reward_model_report(
            rm, policy, eval_pairs=split.heldout,
            prompts=[p.text for p in load_world().prompts("eval")],
            samples_per_prompt=cfg.report_samples_per_prompt,
            seed=seed_of(seed, "rm/report"), max_new_tokens=cfg.max_new_tokens,
        )  # fmt: skip
    summary["wall_s_total"] = time.perf_counter() - t0
    atomic_write_json(job.out_dir / "summary.json", summary)
    return summary


def train_reward_model(
    body: GPT,
    tok: Tokenizer,
    cfg: RewardModelConfig,
    job: Job,
    *,
    train_pairs: Path,
    eval_pairs: Path | None,
    provenance_: dict[str, Any],
) -> tuple[dict[str, Any], ScalarHeadModel, PairSplit]:
    """The Bradley-Terry training of `run_reward_model` (a copy of `body` + a scalar head) on
    the training side of `validation_split`, the checkpoint chosen on its validation side;
    returns the loop's last row, the model and the pairs of each split."""  # fmt: skip
    seed, device = job.seed, torch.device(job.device)
    gen = torch.Generator().manual_seed(seed)
    model = ScalarHeadModel(copy.deepcopy(body), generator=gen).to(device)
    block, pad = model.config.block_size, tok.eot_id

    def prepare(path: Path) -> tuple[list[PreferencePair], TokenizedPairs, torch.Tensor | None]:
        pairs = load_pairs(path)[0]  # checked whole, so an error names the pair of the file
        data = tokenize_pairs(pairs, tok, block, str(path))
        check_fits(data, block, str(path))
        return pairs, data, (pair_margins(pairs, str(path)) if cfg.margin else None)

    pairs, data, margins = prepare(train_pairs)  # the validation pairs are rows of `data` too
    split = PairSplit.of(pairs, prepare(eval_pairs)[0] if eval_pairs else None,
                         cfg.validation_fraction, seed, train_pairs)  # fmt: skip
    train_idx, valid_idx = split.indices(pairs)

    def get_batch(step: int) -> tuple[Batch, torch.Tensor]:
        rng = stream(seed, "rm/batch", step)
        k = min(cfg.batch_size, len(train_idx))
        idx = distributed.shard(train_idx[rng.choice(len(train_idx), size=k, replace=False)])
        return data.batch(idx, pad).to(device), torch.as_tensor(idx)  # idx: this rank's rows

    def losses_of(m, batch: Batch, margin: torch.Tensor | None):
        rc, rr = pair_rewards(m, batch, cfg.pooling)  # (B,), (B,)
        mg = margin.to(device) if margin is not None else None
        return bradley_terry_loss(rc, rr, margin=mg, center_coef=cfg.center_coef), rc, rr

    def loss_fn(m: torch.nn.Module, item: tuple[Batch, torch.Tensor]):
        batch, idx = item
        losses, rc, rr = losses_of(m, batch, None if margins is None else margins[idx])
        return losses.mean(), {**pair_metrics(losses, rc, rr), "tokens": batch.n_tokens}

    def eval_fn(m: torch.nn.Module) -> dict[str, float]:  # on the validation pairs alone
        parts = []
        for s in range(0, len(valid_idx), 64):
            idx = valid_idx[s : s + 64]
            mg = None if margins is None else margins[idx]
            parts.append(losses_of(m, data.batch(idx, pad).to(device), mg))
        return pair_metrics(*(torch.cat(column) for column in zip(*parts, strict=True)))

    extra = stage_state(kind="reward_model", stage="reward_model",
                        model_config=to_dict(body.config), tokenizer=tok.to_dict(),
                        config=provenance_)  # fmt: skip
    last = train(
        model, loop=LoopConfig.from_config(cfg, desc="reward model"), job=job,
        get_batch=get_batch, loss_fn=loss_fn,
        checkpoint_extra={**extra, "normalization": None, "pooling": cfg.pooling},
        eval_fn=eval_fn, keep_best="accuracy",
    )  # fmt: skip
    return last, model, split


def normalise(
    model: ScalarHeadModel,
    tok: Tokenizer,
    policy: GPT,
    ckpt_path: Path,
    ckpt: dict[str, Any],
    cfg: RewardModelConfig,
    seed: int,
) -> tuple[RewardModel, torch.Tensor]:
    """Gain and bias so the reward has mean 0 and std 1 on SFT samples of the training
    prompts (lm-human-preferences), written into the checkpoint; returns the normalised
    reward model and the raw scores (float64)."""  # fmt: skip
    train_prompts = [p.text for p in load_world().prompts("train")]
    norm_prompts = [train_prompts[i % len(train_prompts)] for i in range(cfg.n_norm_samples)]
    norm_samples = sample_responses(policy, tok, norm_prompts,
                                    seed=seed_of(seed, "rm/normalisation"),
                                    max_new_tokens=cfg.max_new_tokens)  # fmt: skip
    rm = RewardModel(model, tok, 1.0, 0.0, cfg.pooling)
    raw = rm.score(norm_samples).double()  # (n_norm_samples,)
    rm.gain, rm.bias = normalization(raw.numpy())
    ckpt["normalization"] = {"gain": rm.gain, "bias": rm.bias}
    save_checkpoint(ckpt_path, {k: v for k, v in ckpt.items() if k not in ("format", "version")})
    return rm, raw


def _reward_model(ctx: Context, resume: bool) -> dict[str, Any]:
    held_out = ctx.paths.held_out_pairs
    job = Job(ctx.paths.rm_dir, ctx.run.seed, ctx.device, resume, ctx.progress)
    s = run_reward_model(ctx.cfg["rm"], job, sft_path=ctx.paths.sft,
                         train_pairs=ctx.paths.train_pairs, eval_pairs=held_out)  # fmt: skip
    rep = s.get("report") or {}
    keep = ("heldout_accuracy", "heldout_ceiling", "heldout_gap", "spearman")
    mine = ("best_step", "validation_accuracy", "n_train_pairs", "n_validation_pairs")
    return {**{k: rep.get(k) for k in keep}, **{k: s.get(k) for k in mine},
            **training_summary(s)}  # fmt: skip


RM_STAGE = Stage("rm", _reward_model, ("rm",), ("sft", "prefs"),
                 inputs=lambda c: [c.paths.sft, *c.pairs],
                 outputs=lambda c: [c.paths.rm_dir / "checkpoint.pt"])  # fmt: skip
