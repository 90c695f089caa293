"""How far can a reward model get on these pairs? A linear probe told the answer's sentences.

    python scripts/reward_probe.py --run runs/bench

Fits a Bradley-Terry logistic regression on the run's training pairs (prefs/train.jsonl)
whose features are exact: how often each world sentence occurs in a response (first 5
sentences, as the oracle scores), plus counts of unparseable sentences and a missing
end-of-text. r(y) = w . features(y), trained by L-BFGS with an L2 penalty, then scored
on the held-out pairs beside the ceiling (the oracle's own agreement with the labels).
A neural reward model must discover these features; the probe is handed them, so its
accuracy bounds what a model additive over sentence identities can reach from these
pairs. The oracle is not such a model (repeats, the first-two-vague rule, off-topic
facts), which is why the probe stays below the ceiling too.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from minidpo.preferences import load_pairs
from minidpo.reward_model import oracle_pair_agreement
from minidpo.world import load_world, split_sentences


def pair_features(pairs, world) -> torch.Tensor:
    """features(chosen) - features(rejected) per pair: (N, sentences + 2)."""
    index = {s: i for i, s in enumerate(world.sentences())}
    dim = len(index) + 2

    def feats(response: str, terminated: bool) -> np.ndarray:
        f = np.zeros(dim)
        for s in split_sentences(response)[:5]:
            f[index[s] if world.classify(s) else dim - 2] += 1
        f[dim - 1] = 0.0 if terminated else 1.0
        return f

    diffs = [
        feats(p.chosen, p.chosen_terminated) - feats(p.rejected, p.rejected_terminated)
        for p in pairs
    ]
    return torch.tensor(np.array(diffs), dtype=torch.float64)


def fit(x: torch.Tensor, l2: float) -> torch.Tensor:
    """Weights w minimising -mean log sigmoid(x @ w) + l2 |w|^2 (Eq. 2, arXiv 2305.18290)."""
    w = torch.zeros(x.shape[1], dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w], max_iter=500)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = -F.logsigmoid(x @ w).mean() + l2 * (w**2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", default="runs/default", help="run folder holding prefs/")
    ap.add_argument("--l2", type=float, nargs="+", default=[1e-3, 1e-2, 1e-1])
    args = ap.parse_args()
    world = load_world()
    train = load_pairs(Path(args.run) / "prefs" / "train.jsonl", warn=False)[0]
    held = load_pairs(Path(args.run) / "prefs" / "eval.jsonl", warn=False)[0]
    x_train, x_held = pair_features(train, world), pair_features(held, world)
    print(f"{len(train)} training pairs, {len(held)} held-out; "
          f"ceiling {oracle_pair_agreement(held, world):.1%}")  # fmt: skip
    for l2 in args.l2:
        w = fit(x_train, l2)
        acc = float(((x_held @ w) > 0).double().mean() + 0.5 * ((x_held @ w) == 0).double().mean())
        train_acc = float(((x_train @ w) > 0).double().mean())
        print(f"l2 {l2:g}: train accuracy {train_acc:.1%}, held-out accuracy {acc:.1%}")


if __name__ == "__main__":
    main()
