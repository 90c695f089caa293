"""The `minidpo` command: one subcommand per stage, flags derived from the config dataclasses.

    minidpo tokenizer    train the BPE tokenizer on the world's corpus
    minidpo sft          supervised fine-tuning (tokenizer first if needed)
    minidpo sample       print samples of a policy with their oracle reward
    minidpo score        the oracle reward of a given response, rule by rule
    minidpo demo         the main job on its default preset (what `make demo` runs)

Bad input (an unknown flag or preset, a missing or corrupt file) prints one line
``minidpo: error: <what and where>`` and exits with code 2.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from minidpo.config import (
    ModelConfig,
    RunConfig,
    SampleConfig,
    SFTConfig,
    TokenizerConfig,
    add_dataclass_args,
    resolve,
)
from minidpo.errors import MinidpoError


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line and exit code 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        sys.stderr.write(f"minidpo: error: {message} (see `{self.prog} --help`)\n")
        raise SystemExit(2)


def _run(args: argparse.Namespace) -> RunConfig:
    return resolve(RunConfig, "run", args.preset or "cpu", args)


def _cfg(cls: type, group: str, args: argparse.Namespace):
    return resolve(cls, group, args.preset or "cpu", args)


def cmd_tokenizer(args: argparse.Namespace) -> int:
    from minidpo.sft import prepare_tokenizer, run_dir
    from minidpo.world import load_world

    run = _run(args)
    tok = prepare_tokenizer(run, _cfg(TokenizerConfig, "tokenizer", args), load_world())
    example = "Explain gravity."
    print(f"tokenizer: {run_dir(run) / 'tokenizer.json'} (vocab {tok.vocab_size})")
    print(f"{example!r} -> {tok.encode(example)}")
    return 0


def cmd_sft(args: argparse.Namespace) -> int:
    from minidpo.sft import run_sft

    summary = run_sft(
        _run(args),
        _cfg(TokenizerConfig, "tokenizer", args),
        _cfg(ModelConfig, "model", args),
        _cfg(SFTConfig, "sft", args),
    )
    print(
        f"sft: {summary['steps']} steps, train loss {summary['train_loss']:.4f}, "
        f"held-out loss {summary['eval_loss']:.4f}, {summary['wall_s']:.1f} s"
    )
    return 0


def _print_samples(samples, *, show_breakdown: bool = False) -> float:
    from minidpo.oracle import oracle_reward

    total = 0.0
    for s in samples:
        r = oracle_reward(s.prompt, s.response, terminated=s.terminated)
        total += r
        end = "" if s.terminated else "  [no end-of-text]"
        print(f"[{r:+.2f}] {s.prompt}\n        {s.response}{end}")
    return total / max(1, len(samples))


def cmd_sample(args: argparse.Namespace) -> int:
    from minidpo.policy import load_policy, sample_responses
    from minidpo.sft import run_dir
    from minidpo.training import resolve_device
    from minidpo.world import load_world

    run = _run(args)
    cfg = _cfg(SampleConfig, "sample", args)
    if cfg.split not in ("train", "eval"):
        raise MinidpoError(f"--split: {cfg.split!r} is not train or eval")
    path = Path(args.checkpoint) if args.checkpoint else run_dir(run) / "sft" / "checkpoint.pt"
    model, tok = load_policy(path, resolve_device(run.device))
    prompts = [p.text for p in load_world().prompts(cfg.split)]
    chosen = [prompts[i % len(prompts)] for i in range(cfg.n)]
    samples = sample_responses(
        model,
        tok,
        chosen,
        seed=run.seed,
        temperature=cfg.temperature,
        top_k=cfg.top_k,
        max_new_tokens=cfg.max_new_tokens,
    )
    mean = _print_samples(samples)
    print(f"mean oracle reward over {len(samples)} samples: {mean:+.3f}")
    return 0


def cmd_score(args: argparse.Namespace) -> int:
    from minidpo.oracle import reward_breakdown

    b = reward_breakdown(args.prompt, args.response, terminated=not args.unterminated)
    print(b)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """Tokenizer + SFT on the preset, then a few samples with their oracle reward."""
    cmd_sft(args)
    args.n = args.n or 6
    return cmd_sample(args)


Handler = Callable[[argparse.Namespace], int]
STAGE_GROUPS = [
    (TokenizerConfig, "tokenizer"),
    (ModelConfig, "model"),
    (SFTConfig, "sft"),
]


def build_parser() -> argparse.ArgumentParser:
    from minidpo import __version__

    parser = _Parser(
        prog="minidpo",
        description="DPO from scratch, beside the RLHF pipeline it replaces, on a toy world.",
    )
    parser.add_argument("--version", action="version", version=f"minidpo {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    def add(name: str, handler: Handler, help: str, groups: list) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help)
        add_dataclass_args(p, RunConfig, "run")
        for cls, group in groups:
            add_dataclass_args(p, cls, group)
        p.set_defaults(handler=handler)
        return p

    add("tokenizer", cmd_tokenizer, "train the BPE tokenizer on the world's corpus",
        [(TokenizerConfig, "tokenizer")])  # fmt: skip
    add("sft", cmd_sft, "supervised fine-tuning on demonstrations", STAGE_GROUPS)
    p = add("sample", cmd_sample, "print policy samples with their oracle reward",
            [(SampleConfig, "sample")])  # fmt: skip
    p.add_argument("--checkpoint", help="policy checkpoint (default: the run's SFT checkpoint)")
    p = add("demo", cmd_demo, "the main job on its default preset",
            [*STAGE_GROUPS, (SampleConfig, "sample")])  # fmt: skip
    p.add_argument("--checkpoint", help=argparse.SUPPRESS)
    p = sub.add_parser("score", help="the oracle reward of a response, rule by rule")
    p.add_argument("prompt", help='e.g. "Explain gravity."')
    p.add_argument("response", help="the response text")
    p.add_argument("--unterminated", action="store_true", help="the response never ended")
    p.set_defaults(handler=cmd_score, preset=None)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `minidpo` console script and `python -m minidpo`."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.handler(args)
    except MinidpoError as e:
        sys.stderr.write(f"minidpo: error: {e}\n")
        return 2
    except KeyboardInterrupt:
        sys.stderr.write("minidpo: interrupted; run the same command again to resume\n")
        return 130
