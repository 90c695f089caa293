"""Configuration: dataclasses with a reason per field, presets, and CLI flags derived from them.

Every stage reads its settings from a dataclass below; `add_dataclass_args` turns
a dataclass into argparse flags (``n_layer`` -> ``--n-layer``, booleans get
``--flag/--no-flag``), and `resolve` builds the final value in three layers:
the dataclass default, then the preset (``tiny`` for tests, ``cpu`` the default,
``gpu`` a larger model), then the flags the user actually typed. So a flag always
wins, a preset only changes what it names, and a config can be written to JSON
and read back (`to_dict` / `from_dict`).

Left out: config files and exec-style overrides; a run is reproduced from its
command line (saved with every checkpoint).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, TypeVar

from minidpo.errors import MinidpoError
from minidpo.losses import check_loss_args

T = TypeVar("T")


def _f(default: Any, help: str) -> Any:
    return field(default=default, metadata={"help": help})


@dataclass
class RunConfig:
    """Where a run writes and how it runs."""

    name: str = _f("default", "run name: every output goes under <runs-dir>/<name>/")
    runs_dir: str = _f("runs", "folder that holds all runs")
    preset: str = _f("cpu", "preset: tiny (tests, seconds), cpu (default), gpu (larger model)")
    seed: int = _f(0, "seed of every random generator in the run")
    device: str = _f("auto", "auto (CUDA when present, else CPU), cpu, cuda, cuda:N")
    threads: str = _f(
        "auto",
        "torch threads: auto (every idle core, for training and sampling; OMP_NUM_THREADS "
        "if set) or N for N everywhere (minidpo.threads)",
    )
    force: bool = _f(False, "rerun a stage even if its outputs exist")


@dataclass
class TokenizerConfig:
    """Byte-level BPE trained on the world's corpus."""

    vocab_size: int = _f(
        1856,
        "256 bytes + learned merges + 1 special token (<|endoftext|>); the smallest multiple "
        "of 32 at which every word of the world is at most 2 tokens",
    )


@dataclass
class ModelConfig:
    """Size of the tiny GPT (the vocabulary size comes from the tokenizer)."""

    n_layer: int = _f(3, "transformer blocks")
    n_head: int = _f(4, "attention heads per block")
    n_embd: int = _f(96, "residual stream width")
    block_size: int = _f(128, "context length in tokens (prompt + response + end-of-text)")
    dropout: float = _f(0.0, "dropout probability (0: the toy world needs none)")
    tie_head: bool = _f(
        True,
        "one matrix embeds ids and scores the next token, as in GPT-2 (--no-tie-head: "
        "the head starts as a copy and trains apart; README, SFT)",
    )

    def validate(self, flag_prefix: str = "") -> None:
        """The shape checks `GPTConfig` makes, as flags, before any stage writes a file."""
        f = f"--{flag_prefix}"
        if self.n_embd % self.n_head != 0:
            raise MinidpoError(
                f"{f}n-head: {self.n_head} does not divide {f}n-embd {self.n_embd} "
                "(each head gets n_embd / n_head dimensions)"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise MinidpoError(f"{f}dropout: must be in [0, 1), got {self.dropout}")
        self._check_memory(f)

    def _check_memory(self, f: str) -> None:
        """Sizes the machine cannot hold, refused before any write: the parameters (at the
        smallest vocabulary, 257) times 12 bytes (the weights and AdamW's two moments, all
        three in every checkpoint, which is serialised in memory before it is written)
        against the machine's memory, naming the flag of the largest term."""
        C, L, P = self.n_embd, self.n_layer, self.block_size
        terms = {f"{f}block-size {P}": P * C, f"{f}n-layer {L} with {f}n-embd {C}": L * 12 * C * C,
                 f"{f}n-embd {C}": MIN_VOCAB_SIZE * C}  # fmt: skip
        need, memory = 12 * sum(terms.values()), machine_memory()
        if memory is not None and need > memory:
            flag = max(terms, key=terms.__getitem__)
            raise MinidpoError(
                f"{flag}: a model of {need // 12:,} parameters needs at least {need / 2**30:,.0f} "
                f"GiB to train (12 bytes a parameter), more than this machine's "
                f"{memory / 2**30:,.0f} GiB"
            )


@dataclass
class SFTConfig:
    """Supervised fine-tuning on demonstrations."""

    steps: int = _f(3000, "optimizer steps (fewer leave more unparseable samples: README table)")
    batch_size: int = _f(32, "sequences per step")
    lr: float = _f(3e-3, "peak learning rate (AdamW)")
    min_lr_ratio: float = _f(0.1, "cosine decay floor as a fraction of the peak")
    warmup_steps: int = _f(30, "linear warmup steps")
    weight_decay: float = _f(
        0.0, "AdamW weight decay on matrices (0.1 left more unparseable samples: README table)"
    )
    grad_clip: float = _f(1.0, "clip the global gradient norm to this (0: off)")
    n_demos: int = _f(40000, "demonstrations sampled from the training prompts")
    n_eval_demos: int = _f(400, "demonstrations sampled from the held-out prompts")
    all_tokens: bool = _f(False, "train on prompt tokens too (default: response tokens only)")
    eval_every: int = _f(500, "held-out loss every N steps")
    ckpt_every: int = _f(500, "checkpoint every N steps")

    def validate(self, flag_prefix: str = "") -> None:
        """A batch is drawn from the demonstrations: no larger than their number."""
        f = f"--{flag_prefix}"
        if self.batch_size > self.n_demos:
            raise MinidpoError(
                f"{f}batch-size {self.batch_size}: more than the {self.n_demos:,} "
                f"demonstrations it is drawn from ({f}n-demos)"
            )


@dataclass
class SampleConfig:
    """Sampling from a policy."""

    n: int = _f(8, "samples to draw (cycling through the prompts of --split)")
    show: int = _f(8, "samples to print with their reward (the summary covers all --n)")
    temperature: float = _f(1.0, "softmax temperature (0: greedy)")
    top_k: int = _f(0, "keep the k most likely tokens (0: all)")
    max_new_tokens: int = _f(64, "maximum response length in tokens")
    split: str = _f("eval", "prompts to sample from: eval (held out) or train")


@dataclass
class PrefsConfig:
    """Preference pairs sampled from the SFT policy and labelled by Bradley-Terry on r*."""

    samples_per_prompt: int = _f(12, "completions drawn per prompt (temperature 1)")
    max_pairs_per_prompt: int = _f(16, "pairs kept per prompt (a random subset of all pairs)")
    tau: float = _f(
        0.5, "Bradley-Terry temperature: P(a>b) = sigmoid((r_a - r_b)/tau); 0 = deterministic"
    )
    temperature: float = _f(1.0, "sampling temperature for the completions")
    max_new_tokens: int = _f(64, "maximum completion length in tokens")


@dataclass
class DPOConfig:
    """DPO training (Eq. 7, arXiv 2305.18290) and its loss family."""

    beta: float = _f(0.1, "KL strength beta: implicit reward = beta * log(pi/pi_ref)")
    loss: str = _f(
        "sigmoid", "sigmoid (DPO), ipo, hinge, robust; sigmoid + --label-smoothing = cDPO"
    )
    label_smoothing: float = _f(0.0, "label noise eps for conservative/robust DPO (0 <= eps < 0.5)")
    nll_alpha: float = _f(
        0.0,
        "weight of the chosen response's mean token NLL added to the loss, DPO + NLL "
        "(RPO, Pang et al. 2024, arXiv 2404.19733; TRL's rpo_alpha); 0: off",
    )
    dpop_lambda: float = _f(
        0.0,
        "DPOP penalty lambda * max(0, log pi_ref(y_w) - log pi(y_w)) taken off the margin "
        "(Pal et al. 2024, arXiv 2402.13228, Eq. 3); 0: off",
    )
    steps: int = _f(
        1000, "cap on optimizer steps; the run ends earlier when the convergence rule says so"
    )
    batch_size: int = _f(32, "preference pairs per step (2x sequences in the forward)")
    lr: float = _f(1e-4, "peak learning rate (AdamW)")
    min_lr_ratio: float = _f(
        1.0,
        "cosine decay floor as a fraction of the peak (1: constant after warmup, as the "
        "paper's code trains)",
    )
    warmup_steps: int = _f(20, "linear warmup steps")
    weight_decay: float = _f(0.0, "AdamW weight decay on matrices")
    grad_clip: float = _f(1.0, "clip the global gradient norm to this (0: off)")
    validation_fraction: float = _f(
        0.1,
        "share of the training prompts whose pairs are held back to decide convergence "
        "(0: train on every pair, no convergence rule: the run takes --steps)",
    )
    patience: int = _f(
        5,
        "convergence: stop once the validation loss has not improved for this many "
        "evaluations (0: off)",
    )
    eval_every: int = _f(20, "validation and held-out pair metrics every N steps")
    ckpt_every: int = _f(50, "checkpoint every N steps")
    snapshot_every: int = _f(
        25,
        "save the weights every N steps and at the end: the frontier's points (0: about 4 per run)",
    )

    def validate(self, flag_prefix: str = "") -> None:
        """Raise MinidpoError naming the flag of a bad loss setting, before anything runs
        (`minidpo.losses.check_loss_args`, its flag given `flag_prefix`: ``--dpo-beta``)."""
        try:
            check_loss_args(self.beta, self.loss, self.label_smoothing, nll_alpha=self.nll_alpha,
                            dpop_lambda=self.dpop_lambda)  # fmt: skip
        except MinidpoError as e:
            raise MinidpoError(str(e).replace("--", f"--{flag_prefix}", 1)) from None
        f = f"--{flag_prefix}"
        if not 0 <= self.validation_fraction < 1:
            raise MinidpoError(
                f"{f}validation-fraction: must be in [0, 1), got {self.validation_fraction}"
            )
        if self.patience < 0:
            raise MinidpoError(f"{f}patience: must be >= 0, got {self.patience}")
        if self.patience > 0 and self.validation_fraction == 0:
            raise MinidpoError(
                f"{f}patience: the convergence rule needs validation pairs "
                f"({f}validation-fraction > 0), or set {f}patience 0"
            )
        if self.snapshot_every > self.steps:
            raise MinidpoError(
                f"{f}snapshot-every: {self.snapshot_every} is past the step cap {f}steps "
                f"{self.steps}: no snapshot would be taken"
            )


@dataclass
class EvalConfig:
    """Evaluation of a policy on the held-out prompts under the oracle reward."""

    samples_per_prompt: int = _f(32, "samples per held-out prompt")
    temperature: float = _f(1.0, "sampling temperature (1: the policy itself, as KL needs)")
    max_new_tokens: int = _f(64, "maximum response length in tokens")


# Preferred-FT and Unlikelihood at the tiny preset: ten steps of eight pairs.
_TINY_BASELINE = {"steps": 10, "batch_size": 8, "warmup_steps": 2, "eval_every": 5, "ckpt_every": 5}
# PPO and GRPO at the tiny preset: three iterations of short responses.
_TINY_RL = {"iterations": 3, "max_new_tokens": 24, "eval_every": 3, "eval_samples_per_prompt": 1,
            "ckpt_every": 1, "snapshot_every": 2}  # fmt: skip

PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    "tiny": {
        "model": {"n_layer": 1, "n_head": 2, "n_embd": 32, "block_size": 128},
        "sft": {
            "steps": 20,
            "batch_size": 8,
            "warmup_steps": 2,
            "n_demos": 200,
            "n_eval_demos": 40,
            "eval_every": 10,
            "ckpt_every": 10,
        },
        "sample": {"max_new_tokens": 48},
        "prefs": {"samples_per_prompt": 4, "max_pairs_per_prompt": 3, "max_new_tokens": 48},
        "dpo": {
            "steps": 10,
            "batch_size": 8,
            "warmup_steps": 2,
            "eval_every": 5,
            "ckpt_every": 5,
            "snapshot_every": 5,
            "patience": 2,
        },
        "eval": {"samples_per_prompt": 2, "max_new_tokens": 48},
        "rm": {
            "steps": 12,
            "batch_size": 8,
            "warmup_steps": 2,
            "eval_every": 3,
            "ckpt_every": 6,
            "n_norm_samples": 24,
            "max_new_tokens": 24,
            "report_samples_per_prompt": 2,
        },
        "ppo": {**_TINY_RL, "rollout_batch": 8, "minibatch_size": 4},
        "grpo": {**_TINY_RL, "prompts_per_iteration": 2, "group_size": 4, "minibatch_size": 4},
        "preferred_ft": _TINY_BASELINE,
        "unlikelihood": _TINY_BASELINE,
        "pipeline": {
            "best_of_n": 4,
            "best_of_n_samples_per_prompt": 1,
            "frontier_samples_per_prompt": 1,
            "seeds": 2,
            "sweep_dpo_betas": "0.1,0.5",
            "sweep_ppo_kl_targets": "1",
            "sweep_unlikelihood_alphas": "0.5",
            "sweep_grpo_betas": "0.04",
            "sweep_online_dpo_betas": "0.1",
            "weak_reference_steps": 5,
        },
        "online_dpo": {
            "rounds": 2,
            "responses_per_prompt": 2,
            "max_new_tokens": 48,
            "train_steps": 10,
        },
    },
    "cpu": {},
    "gpu": {
        "model": {"n_layer": 8, "n_head": 8, "n_embd": 384, "block_size": 128},
        "sft": {"steps": 3000, "batch_size": 128, "lr": 1e-3, "n_demos": 40000},
        "prefs": {"samples_per_prompt": 16, "max_pairs_per_prompt": 32},
        "ppo": {"iterations": 100, "rollout_batch": 256, "minibatch_size": 64},
        "eval": {"samples_per_prompt": 64},
        "pipeline": {"frontier_samples_per_prompt": 8},
    },
}


def add_dataclass_args(
    parser: argparse.ArgumentParser,
    cls: type,
    group: str,
    prefix: str = "",
    skip: tuple[str, ...] = (),
) -> None:
    """Add one flag per field of dataclass `cls`; defaults are left unset so `resolve` can
    tell what the user typed from what a preset or the dataclass supplies. A command that
    runs several stages prefixes their flags (``prefix="dpo_"``: ``--dpo-steps``)."""
    g = parser.add_argument_group(group, (cls.__doc__ or "").replace("%", "%%") or None)
    for f in fields(cls):
        if f.name in skip:
            continue
        name = prefix + f.name
        flag = "--" + name.replace("_", "-")
        help_ = f"{f.metadata.get('help', '')} (default: {f.default})".replace("%", "%%")
        if f.type in (bool, "bool"):
            g.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction, help=help_)
        else:
            typ = {"int": int, "float": float, "str": str}.get(f.type, f.type)
            g.add_argument(flag, dest=name, type=typ, help=help_, metavar=f.name.upper())


def resolve(
    cls: type[T], group: str, preset: str, args: argparse.Namespace | None, prefix: str = ""
) -> T:
    """Dataclass default <- preset[group] <- flags the user typed."""
    if preset not in PRESETS:
        raise MinidpoError(
            f"--preset: unknown preset {preset!r} (choose from {', '.join(PRESETS)})"
        )
    values = dict(PRESETS[preset].get(group, {}))
    if args is not None:
        for f in fields(cls):
            v = getattr(args, prefix + f.name, None)
            if v is not None:
                values[f.name] = v
    cfg = cls(**values)
    check_ranges(cfg, prefix.replace("_", "-"))
    return cfg


# The ranges every config field of these names must hold, whatever its group (one check,
# before anything runs): counts of steps, samples, sizes >= 1; offsets >= 0; rates > 0.
POSITIVE_INTS = frozenset({
    "steps", "batch_size", "eval_every", "ckpt_every", "iterations", "rollout_batch",
    "minibatch_size", "ppo_epochs", "samples_per_prompt", "eval_samples_per_prompt",
    "max_new_tokens", "n_demos", "n", "n_layer", "n_head", "n_embd", "block_size",
    "vocab_size", "max_pairs_per_prompt", "train_steps",
})  # fmt: skip
# The fields that size what is held in memory at once: named, as the user typed them, when
# an allocation fails (`minidpo.cli`).
MEMORY_SIZES = (
    "batch_size", "block_size", "n_embd", "n_layer", "n_head", "n_demos", "n_eval_demos",
    "rollout_batch", "minibatch_size", "samples_per_prompt", "eval_samples_per_prompt", "n",
    "max_new_tokens", "n_norm_samples", "group_size", "prompts_per_iteration",
    "responses_per_prompt", "max_pairs_per_prompt", "vocab_size",
)  # fmt: skip
NON_NEGATIVE_INTS = frozenset({"warmup_steps", "snapshot_every", "seed", "show", "top_k"})
POSITIVE_FLOATS = frozenset({"lr", "value_lr", "temperature"})
NON_NEGATIVE_FLOATS = frozenset({"weight_decay", "grad_clip"})
# Counts held in memory at once, capped so a slip of the keyboard fails at once instead of
# hanging: 2,000,000 demonstrations take about a minute to draw and under 1 GiB.
AT_MOST = {"n_demos": 2_000_000}
# The smallest vocabulary a byte-level BPE has: the 256 bytes and <|endoftext|>.
MIN_VOCAB_SIZE = 257
AT_LEAST = {"vocab_size": (MIN_VOCAB_SIZE, "the 256 bytes and <|endoftext|>")}


def machine_memory() -> int | None:
    """Bytes of memory of this machine (None where the system does not say)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def check_ranges(cfg: Any, flag_prefix: str = "") -> None:
    """MinidpoError naming the flag of the first field out of its range (`POSITIVE_INTS`
    and the others), and of a run ``--name`` that is not one folder name."""
    for f in fields(cfg):
        v, flag = getattr(cfg, f.name), f"--{flag_prefix}{f.name.replace('_', '-')}"
        if f.name in POSITIVE_INTS and isinstance(v, int) and v < 1:
            raise MinidpoError(f"{flag}: must be >= 1, got {v}")
        if f.name in NON_NEGATIVE_INTS and isinstance(v, int) and v < 0:
            raise MinidpoError(f"{flag}: must be >= 0, got {v}")
        if f.name in AT_MOST and isinstance(v, int) and v > AT_MOST[f.name]:
            raise MinidpoError(f"{flag}: at most {AT_MOST[f.name]:,}, got {v:,}")
        if f.name in AT_LEAST and isinstance(v, int) and v < AT_LEAST[f.name][0]:
            least, why = AT_LEAST[f.name]
            raise MinidpoError(f"{flag}: at least {least} ({why}), got {v:,}")
        if f.name in POSITIVE_FLOATS and not (v > 0 and math.isfinite(v)):
            raise MinidpoError(f"{flag}: must be finite and > 0, got {v}")
        if f.name in NON_NEGATIVE_FLOATS and not (v >= 0 and math.isfinite(v)):
            raise MinidpoError(f"{flag}: must be finite and >= 0, got {v}")
    if isinstance(cfg, RunConfig) and (
        cfg.name in ("", ".", "..") or "/" in cfg.name or "\\" in cfg.name
    ):
        raise MinidpoError(
            f"--name: {cfg.name!r} is not a folder name (it must stay inside --runs-dir)"
        )
    if isinstance(cfg, RunConfig):
        _check_run_folder(cfg)


def _check_run_folder(run: RunConfig) -> None:
    """The run folder ``--runs-dir/--name`` can be a folder: neither it nor a folder above
    it is a file (checked before any write, naming the flag whose path is a file)."""
    runs = Path(run.runs_dir)
    for p in (runs / run.name, runs, *runs.parents):
        if p.is_dir():
            return
        if p.exists():
            if p == runs:
                raise MinidpoError(f"--runs-dir {run.runs_dir}: a file, not a folder")
            flag = f"--name {run.name}" if p == runs / run.name else f"--runs-dir {run.runs_dir}"
            raise MinidpoError(f"{flag}: {p} is a file, not a folder")


def to_dict(cfg: Any) -> dict[str, Any]:
    """A config as a plain dict (saved in checkpoints and run folders)."""
    return dataclasses.asdict(cfg)


def from_dict(cls: type[T], d: dict[str, Any]) -> T:
    """Rebuild a config saved by `to_dict`, ignoring keys this version does not know."""
    known = {f.name for f in fields(cls)}
    return cls(**{k: v for k, v in d.items() if k in known})
