"""The layout of a run folder, in one place: where every stage reads and writes.

    runs/<name>/
        tokenizer.json
        sft/                      checkpoint.pt, metrics.jsonl, summary.json
        prefs/                    train.jsonl, eval.jsonl, *.ref-<key>.pt (reference log-probs)
        rm/                       the reward model
        dpo-<loss>-beta<b>[-eps<e>][-<tag>]/
        ppo-<rm|oracle>-kl<k>/    PPO against the reward model, PPO-GT against the oracle
        preferred-ft/  best-of-n/ eval/  plots/  report.md
        stages/<stage>.json       the stamp of each stage (`minidpo.stage`)
        sweep/seed<s>/prefs/, rm/    the seed's own pairs and reward model
        sweep/seed<s>/<method folder>/  (`minidpo.stage.Method.sweep_dir`)

A command may read its inputs from elsewhere (``--sft``, ``--pairs``, ``--eval-pairs``,
``--rm``): `RunPaths.inputs` holds those, and every stage asks this object, so the
pipeline and the single-stage commands agree on every path. A sweep seed draws its own
pairs and reward model into ``sweep/seed<s>/prefs`` and ``sweep/seed<s>/rm`` (the
``prefs_dir`` and ``rm_dir`` inputs).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from minidpo.config import RunConfig


@dataclass(frozen=True)
class RunPaths:
    """Every path of the run at `folder`; `inputs` ("sft", "train_pairs", "eval_pairs",
    "rm") replace the run's own files as a stage's inputs."""

    folder: Path
    inputs: dict[str, Path] = field(default_factory=dict)

    @classmethod
    def of(cls, run: RunConfig, inputs: dict[str, Path] | None = None) -> RunPaths:
        """The paths of the run folder runs/<name>/ of `run`."""
        return cls(Path(run.runs_dir) / run.name, dict(inputs or {}))

    @property
    def tokenizer(self) -> Path:
        return self.folder / "tokenizer.json"

    @property
    def sft_dir(self) -> Path:
        return self.folder / "sft"

    @property
    def sft(self) -> Path:
        """The SFT checkpoint: pi_SFT, and pi_ref of every later stage."""
        return self.inputs.get("sft", self.sft_dir / "checkpoint.pt")

    @property
    def prefs_dir(self) -> Path:
        """The pairs and their reference log-probs (a sweep seed's own: ``inputs["prefs_dir"]``)."""
        return self.inputs.get("prefs_dir", self.folder / "prefs")

    @property
    def train_pairs(self) -> Path:
        return self.inputs.get("train_pairs", self.prefs_dir / "train.jsonl")

    @property
    def eval_pairs(self) -> Path:
        return self.inputs.get("eval_pairs", self.prefs_dir / "eval.jsonl")

    @property
    def held_out_pairs(self) -> Path | None:
        """The held-out pairs a trainer evaluates on: those named (``--eval-pairs``), which
        must exist (a stage lists them as an input, so a mistyped path is an error, not
        "none"), else the run's own when the prefs stage wrote them, else None."""
        if "eval_pairs" in self.inputs or self.eval_pairs.exists():
            return self.eval_pairs
        return None

    @property
    def rm_dir(self) -> Path:
        return self.inputs.get("rm_dir", self.folder / "rm")

    @property
    def rm(self) -> Path:
        return self.inputs.get("rm", self.rm_dir / "checkpoint.pt")

    def dpo_dir(self, loss: str, beta: float, label_smoothing: float = 0.0, tag: str = "") -> Path:
        """``dpo-<loss>-beta<b>``, ``-eps<e>`` with label smoothing, ``-<tag>`` if given."""
        smooth = f"-eps{label_smoothing:g}" if label_smoothing else ""
        return self.folder / f"dpo-{loss}-beta{beta:g}{smooth}{f'-{tag}' if tag else ''}"

    def ppo_dir(self, reward: str, kl_coef: float) -> Path:
        """``ppo-rm-kl<k>`` (RLHF) or ``ppo-oracle-kl<k>`` (PPO-GT)."""
        return self.folder / f"ppo-{reward}-kl{kl_coef:g}"

    @property
    def preferred_ft_dir(self) -> Path:
        return self.folder / "preferred-ft"

    @property
    def best_of_n_samples(self) -> Path:
        return self.folder / "best-of-n" / "samples.jsonl"

    @property
    def results(self) -> Path:
        return self.folder / "eval" / "results.json"

    @property
    def plots_dir(self) -> Path:
        return self.folder / "plots"

    @property
    def report(self) -> Path:
        return self.folder / "report.md"

    def stamp(self, stage: str) -> Path:
        return self.folder / "stages" / f"{stage}.json"
