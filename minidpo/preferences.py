"""Preference pairs: sampled from the SFT policy, labelled by Bradley-Terry on the oracle reward.

As in the paper's controlled IMDb experiment (Sec. 6.1), the pairs come from the
SFT policy itself: for each training prompt draw K completions at temperature 1,
score each with the oracle reward r*, and for each pair (a, b) of distinct
completions draw the label from the Bradley-Terry model (Eq. 1, arXiv 2305.18290)

    P(a beats b) = sigmoid((r*(a) - r*(b)) / tau)

with a seeded generator. tau -> 0 makes the label deterministic (the higher
reward wins); pairs with equal reward or identical text are dropped (ties carry
no preference).

Files are JSONL in TRL's standard form, one pair per line:
    {"prompt": ..., "chosen": ..., "rejected": ..., "score_chosen": ..., "score_rejected": ...,
     "chosen_terminated": true, "rejected_terminated": true}
`load_pairs` accepts any TRL-form file (extra keys are ignored, so users can
bring their own pairs) and validates every line.
"""

from __future__ import annotations

import itertools
import json
import math
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from minidpo.atomic import atomic_write_json, atomic_write_jsonl
from minidpo.batching import Batch, concatenated_batch
from minidpo.config import PrefsConfig
from minidpo.errors import MinidpoError
from minidpo.policy import load_policy
from minidpo.sampling import Sample, sample_responses
from minidpo.scoring import oracle_scores
from minidpo.seeds import seed_of, stream
from minidpo.stage import Context, Stage
from minidpo.tokenizer import Tokenizer
from minidpo.world import format_prompt, load_world


@dataclass(frozen=True)
class PreferencePair:
    """One labelled comparison; responses are text without the end-of-text marker."""

    prompt: str
    chosen: str
    rejected: str
    score_chosen: float | None = None
    score_rejected: float | None = None
    chosen_terminated: bool = True  # False: the sampled response never emitted end-of-text
    rejected_terminated: bool = True

    def to_json(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if v is not None}


def bradley_terry_prob(r_a: float, r_b: float, tau: float) -> float:
    """P(a beats b) = sigmoid((r_a - r_b) / tau)  (Eq. 1, arXiv 2305.18290); tau=0 -> step."""
    if tau == 0:
        return 1.0 if r_a > r_b else 0.0 if r_a < r_b else 0.5
    z = (r_a - r_b) / tau
    return 1.0 / (1.0 + math.exp(-z)) if z >= 0 else math.exp(z) / (1.0 + math.exp(z))


def label_pairs(
    samples: Sequence[Sample],
    rewards: Sequence[float],
    *,
    tau: float,
    rng: np.random.Generator,
    max_pairs_per_prompt: int | None = None,
) -> list[PreferencePair]:
    """Pairs among the samples of each prompt, labelled by a Bradley-Terry draw.

    Samples of one prompt are compared two by two; identical texts and equal
    rewards are dropped; when a prompt has more candidate pairs than
    `max_pairs_per_prompt`, a random subset is kept.
    """
    if tau < 0:
        raise MinidpoError(f"--tau: must be >= 0, got {tau}")
    by_prompt: dict[str, list[int]] = {}
    for i, s in enumerate(samples):
        by_prompt.setdefault(s.prompt, []).append(i)
    pairs: list[PreferencePair] = []
    for prompt, idx in by_prompt.items():
        candidates = [
            (a, b)
            for a, b in itertools.combinations(idx, 2)
            if samples[a].response != samples[b].response
            and rewards[a] != rewards[b]
            and samples[a].response.strip()
            and samples[b].response.strip()
        ]
        if max_pairs_per_prompt is not None and len(candidates) > max_pairs_per_prompt:
            keep = rng.choice(len(candidates), size=max_pairs_per_prompt, replace=False)
            candidates = [candidates[k] for k in sorted(keep)]
        for a, b in candidates:
            a_wins = rng.random() < bradley_terry_prob(rewards[a], rewards[b], tau)
            win, lose = (a, b) if a_wins else (b, a)
            pairs.append(
                PreferencePair(
                    prompt=prompt,
                    chosen=samples[win].response,
                    rejected=samples[lose].response,
                    score_chosen=rewards[win],
                    score_rejected=rewards[lose],
                    chosen_terminated=samples[win].terminated,
                    rejected_terminated=samples[lose].terminated,
                )
            )
    return pairs


def validation_split(
    pairs: Sequence[PreferencePair], fraction: float, seed: int
) -> tuple[list[PreferencePair], list[PreferencePair]]:
    """(train, valid): the pairs split by prompt, `fraction` of the prompts to validation.

    Every pair of a prompt goes to one side, so no prompt and no response is on
    both: a checkpoint chosen on `valid` is chosen on prompts it never trained on,
    and the held-out pairs stay unseen by any choice. The validation prompts,
    round(fraction * n) of the n distinct prompts but at least one and at most
    n - 1 (n >= 2), are drawn from the sorted prompts by stream "prefs/validation",
    so the split depends on the seed and the set of prompts, not on the file's
    order; each side keeps the pairs' order. One prompt: all pairs train, none valid.

    Example: prompts a, a, b, c, fraction 1/3 -> one prompt (say b) valid:
    train [a, a, c], valid [b].
    """
    if not 0.0 < fraction < 1.0:
        raise MinidpoError(f"--validation-fraction: must be in (0, 1), got {fraction}")
    prompts = sorted({p.prompt for p in pairs})
    n = len(prompts)
    n_valid = min(max(math.floor(fraction * n + 0.5), 1), n - 1) if n >= 2 else 0
    drawn = stream(seed, "prefs/validation").choice(n, size=n_valid, replace=False)
    valid_prompts = {prompts[i] for i in drawn}
    train = [p for p in pairs if p.prompt not in valid_prompts]
    valid = [p for p in pairs if p.prompt in valid_prompts]
    return train, valid


def save_pairs(path: str | Path, pairs: Sequence[PreferencePair]) -> Path:
    """Write pairs as TRL-form JSONL, atomically."""
    return atomic_write_jsonl(path, (p.to_json() for p in pairs))


def _utf8(raw: bytes, path: Path, n: int) -> str:
    """Line `n` of `path` as text; MinidpoError naming the line if it is not UTF-8."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise MinidpoError(
            f"{path}:{n}: not UTF-8 text (byte 0x{raw[e.start]:02x} at column {e.start + 1}; "
            "a compressed, binary or Latin-1 file?)"
        ) from None


def load_pairs(path: str | Path, *, warn: bool = True) -> tuple[list[PreferencePair], int]:
    """Read and validate a TRL-form preference file; returns (pairs, number skipped).

    Every line must be a JSON object with non-empty string "prompt", "chosen" and
    "rejected"; anything else raises MinidpoError naming ``file:line``. Blank lines
    are ignored. A pair whose chosen equals its rejected carries no preference: it
    is skipped and counted (one warning line on stderr).
    """
    path = Path(path)
    if not path.is_file():
        raise MinidpoError(f"{path}: preference file not found")
    pairs: list[PreferencePair] = []
    skipped = 0
    with path.open("rb") as f:
        for n, raw in enumerate(f, 1):
            line = _utf8(raw, path, n)
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise MinidpoError(f"{path}:{n}: not valid JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise MinidpoError(f"{path}:{n}: expected a JSON object")
            for key in ("prompt", "chosen", "rejected"):
                if key not in row:
                    raise MinidpoError(f"{path}:{n}: missing field {key!r}")
                if not isinstance(row[key], str):
                    raise MinidpoError(f"{path}:{n}: field {key!r} is not a string")
                if not row[key].strip():
                    raise MinidpoError(f"{path}:{n}: field {key!r} is empty")
            if row["chosen"] == row["rejected"]:
                skipped += 1
                continue
            pairs.append(
                PreferencePair(
                    prompt=row["prompt"],
                    chosen=row["chosen"],
                    rejected=row["rejected"],
                    score_chosen=_opt_float(row.get("score_chosen")),
                    score_rejected=_opt_float(row.get("score_rejected")),
                    chosen_terminated=bool(row.get("chosen_terminated", True)),
                    rejected_terminated=bool(row.get("rejected_terminated", True)),
                )
            )
    if not pairs:
        why = f" (all {skipped} have chosen == rejected)" if skipped else ""
        raise MinidpoError(f"{path}: no usable preference pairs{why}")
    if skipped and warn:
        sys.stderr.write(
            f"minidpo: warning: {path}: skipped {skipped} pairs with chosen == rejected\n"
        )
    return pairs, skipped


def _opt_float(v: object) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def build_preferences(
    *,
    sft_path: Path,
    out_dir: Path,
    cfg: PrefsConfig,
    seed: int,
    device: torch.device,
) -> dict:
    """Sample from the SFT policy and write train.jsonl (training prompts) and eval.jsonl
    (held-out prompts) under `out_dir`; returns a summary (pair counts, label noise)."""
    model, tok = load_policy(sft_path, device)
    world = load_world()
    summary: dict = {"config": asdict(cfg), "seed": seed}
    for k, split in enumerate(("train", "eval")):
        prompts = [p.text for p in world.prompts(split) for _ in range(cfg.samples_per_prompt)]
        samples = sample_responses(
            model,
            tok,
            prompts,
            seed=seed_of(seed, "prefs/samples", k),
            temperature=cfg.temperature,
            max_new_tokens=cfg.max_new_tokens,
        )
        rewards = oracle_scores(samples, world).tolist()
        pairs = label_pairs(
            samples,
            rewards,
            tau=cfg.tau,
            rng=stream(seed, "prefs/labels", k),
            max_pairs_per_prompt=cfg.max_pairs_per_prompt,
        )
        if not pairs:
            raise MinidpoError(f"{sft_path}: the SFT samples gave no preference pairs ({split})")
        save_pairs(out_dir / f"{split}.jsonl", pairs)
        summary[split] = {
            "pairs": len(pairs),
            "samples": len(samples),
            "sample_reward_mean": float(np.mean(rewards)),
            # share of pairs whose label agrees with the oracle (1.0 when tau = 0)
            "label_agreement": float(np.mean([p.score_chosen > p.score_rejected for p in pairs])),
        }
    atomic_write_json(out_dir / "summary.json", summary)
    return summary


@dataclass
class TokenizedPairs:
    """Token ids of N preference pairs (responses end with eot when they terminated)."""

    prompts: list[list[int]]
    chosen: list[list[int]]
    rejected: list[list[int]]

    def __len__(self) -> int:
        return len(self.prompts)

    def subset(self, idx: Sequence[int]) -> TokenizedPairs:
        """The pairs at `idx`, in that order."""
        return TokenizedPairs([self.prompts[i] for i in idx], [self.chosen[i] for i in idx],
                              [self.rejected[i] for i in idx])  # fmt: skip

    def batch(self, idx: Sequence[int], pad_id: int) -> Batch:
        """The concatenated [chosen; rejected] batch of the pairs at `idx` (2B rows)."""
        return concatenated_batch(
            [self.prompts[i] for i in idx],
            [self.chosen[i] for i in idx],
            [self.rejected[i] for i in idx],
            pad_id=pad_id,
        )


def tokenize_pairs(
    pairs: Sequence[PreferencePair], tok: Tokenizer, block_size: int, source: str
) -> TokenizedPairs:
    """Encode pairs; a pair longer than the model's context is an error naming it."""
    prompts = tok.encode_batch([format_prompt(p.prompt) for p in pairs])
    chosen = tok.encode_batch([p.chosen for p in pairs])
    rejected = tok.encode_batch([p.rejected for p in pairs])
    for i, p in enumerate(pairs):
        if p.chosen_terminated:
            chosen[i].append(tok.eot_id)
        if p.rejected_terminated:
            rejected[i].append(tok.eot_id)
        longest = len(prompts[i]) + max(len(chosen[i]), len(rejected[i])) - 1
        if longest > block_size:
            raise MinidpoError(
                f"{source}: pair {i + 1} needs {longest} tokens, the model's context is {block_size}"
            )
    return TokenizedPairs(prompts, chosen, rejected)


def _prefs(ctx: Context, resume: bool) -> dict:
    s = build_preferences(sft_path=ctx.paths.sft, out_dir=ctx.paths.prefs_dir,
                          cfg=ctx.cfg["prefs"], seed=ctx.run.seed, device=ctx.device)  # fmt: skip
    return {"train_pairs": s["train"]["pairs"], "eval_pairs": s["eval"]["pairs"],
            "label_agreement": s["train"]["label_agreement"]}  # fmt: skip


PREFS_STAGE = Stage("prefs", _prefs, ("prefs",), ("sft",), inputs=lambda c: [c.paths.sft],
                    outputs=lambda c: [c.paths.prefs_dir / "train.jsonl",
                                       c.paths.prefs_dir / "eval.jsonl"])  # fmt: skip
