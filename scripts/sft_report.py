"""How good is the SFT policy? Oracle reward of N samples next to the demonstrations'.

    python scripts/sft_report.py --run runs/default --n 1000 --out docs/images

Samples N responses from the run's SFT checkpoint (cycling through the held-out
prompts, temperature 1), scores them with the oracle reward, and does the same
for N demonstrations drawn the way the SFT data was (held-out prompts); prints
mean, std, the unparseable and unterminated shares, writes a histogram PNG and
a JSON of the numbers. It also says where the unparseable share comes from: the
policy's off-world probability mass on those demonstrations (`minidpo.fluency`), by
position kind, whose sum predicts the share to first order.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from minidpo.atomic import atomic_write_json
from minidpo.fluency import WorldGrammar, off_world_mass
from minidpo.oracle import reward_breakdown
from minidpo.plots import reward_histogram
from minidpo.policy import load_policy
from minidpo.sampling import sample_responses
from minidpo.training import resolve_device
from minidpo.world import load_world, sample_demonstrations


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", default="runs/default", help="run folder holding sft/checkpoint.pt")
    ap.add_argument("--n", type=int, default=1000, help="samples and demonstrations to score")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--out", default=None, help="folder for the PNG and JSON (default: the run)")
    args = ap.parse_args()
    out = Path(args.out or args.run)
    world = load_world()
    prompts = [p.text for p in world.prompts("eval")]
    model, tok = load_policy(Path(args.run) / "sft" / "checkpoint.pt", resolve_device(args.device))
    samples = sample_responses(
        model, tok, [prompts[i % len(prompts)] for i in range(args.n)], seed=args.seed
    )
    sft = [reward_breakdown(s.prompt, s.response, terminated=s.terminated) for s in samples]
    demos = sample_demonstrations(world, args.n, np.random.default_rng(args.seed), split="eval")
    dem = [reward_breakdown(d.prompt, d.response) for d in demos]

    def stats(b: list) -> dict:
        r = np.array([x.total for x in b])
        return {
            "n": len(b),
            "mean": float(r.mean()),
            "std": float(r.std(ddof=1)),
            "unparseable_share": float(np.mean([x.unparseable > 0 for x in b])),
            "unterminated_share": float(np.mean([x.unterminated > 0 for x in b])),
        }

    model.eval()
    leak = off_world_mass(
        model, tok, WorldGrammar(world, tok), [d.prompt for d in demos], [d.response for d in demos]
    )
    report = {"sft_samples": stats(sft), "demonstrations": stats(dem), "off_world_mass": leak}
    reward_histogram(
        {"demonstrations": [x.total for x in dem], "SFT samples": [x.total for x in sft]},
        out / "sft_rewards.png",
        f"Oracle reward on held-out prompts: {args.n} SFT samples vs {args.n} demonstrations",
    )
    atomic_write_json(out / "sft_report.json", report)
    print(json.dumps(report, indent=2))
    print(f"wrote {out / 'sft_rewards.png'} and {out / 'sft_report.json'}")


if __name__ == "__main__":
    main()
