"""The `minidpo` command: one subcommand per stage, flags derived from the config dataclasses.

    minidpo tokenizer    train the BPE tokenizer on the world's corpus
    minidpo sft          supervised fine-tuning (tokenizer first if needed)
    minidpo sample       print samples of a policy with their oracle reward
    minidpo score        the oracle reward of a given response, rule by rule
    minidpo prefs        preference pairs sampled from SFT, labelled by Bradley-Terry on r*
    minidpo dpo          DPO (or a member of its loss family) on the pairs
    minidpo eval         oracle reward, KL to the reference and win rate of a policy
    minidpo gravity      the seed card's "Explain gravity." worked example, number by number
    minidpo export       a checkpoint as a transformers GPT-2 folder; pairs in TRL's text form
    minidpo rm           the Bradley-Terry reward model on the same pairs
    minidpo ppo          PPO against the reward model (--reward oracle: PPO-GT; shaped: r_shaped)
    minidpo grpo         GRPO against the reward model, the oracle or r_shaped (no value model)
    minidpo preferred-ft SFT on the chosen responses only (a baseline of the paper)
    minidpo best-of-n    N samples from SFT, keep the one the reward model scores highest
    minidpo pipeline     every stage in order, skipping what is done; then eval, plots, report
    minidpo sweep        the pipeline, then the reward-KL frontier sweep over settings and seeds
    minidpo demo         the pipeline on its default preset (what `make demo` runs)

Bad input (an unknown flag or preset, a missing or corrupt file) prints one line
``minidpo: error: <what and where>`` and exits with code 2.
"""

from __future__ import annotations

import argparse
import errno
import json
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from minidpo import __version__, allocator, distributed, threads
from minidpo.atomic import atomic_write_json, atomic_write_jsonl
from minidpo.baselines import PreferredFTConfig, best_of_n
from minidpo.config import (
    MEMORY_SIZES,
    DPOConfig,
    EvalConfig,
    ModelConfig,
    PrefsConfig,
    RunConfig,
    SampleConfig,
    SFTConfig,
    TokenizerConfig,
    add_dataclass_args,
    resolve,
)
from minidpo.errors import MinidpoError, one_line, out_of_memory
from minidpo.evaluate import evaluate_policy, summarize
from minidpo.export import TRL_VERSION, export_hf, trl_rows
from minidpo.gravity import compute, load_example, render
from minidpo.grpo import GRPOConfig
from minidpo.grpo import stage as grpo_stage
from minidpo.online_dpo import OnlineDPOConfig
from minidpo.online_dpo import stage as online_dpo_stage
from minidpo.oracle import RULE_VALUES, reward_breakdown
from minidpo.paths import RunPaths
from minidpo.pipeline import (
    BY_NAME,
    GROUPS,
    STAGE_NAMES,
    Context,
    check_force,
    run_pipeline,
    run_stage,
    run_sweep,
    sweep_runs,
)
from minidpo.policy import load_policy
from minidpo.ppo import PPOConfig
from minidpo.ppo import stage as ppo_stage
from minidpo.preferences import load_pairs
from minidpo.report import summary_text
from minidpo.reward_model import RewardModelConfig, load_reward_model
from minidpo.sampling import check_context, sample_responses
from minidpo.scoring import oracle_breakdowns, oracle_scores
from minidpo.seeds import seed_of
from minidpo.sft import check_block_size
from minidpo.shaping import ShapingConfig
from minidpo.stage import Stage
from minidpo.tokenizer import Tokenizer
from minidpo.tokenizer_stage import world_tokenizer
from minidpo.training import read_metrics, resolve_device
from minidpo.world import load_world


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line and exit code 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        sys.stderr.write(f"minidpo: error: {one_line(message)} (see `{self.prog} --help`)\n")
        raise SystemExit(2)


def _run(args: argparse.Namespace) -> RunConfig:
    return resolve(RunConfig, "run", args.preset or "cpu", args)


def _cfg(cls: type, group: str, args: argparse.Namespace):
    prefix = f"{group}_" if group in getattr(args, "prefixed", ()) else ""
    return resolve(cls, group, args.preset or "cpu", args, prefix)


def _checked(args: argparse.Namespace, groups: Sequence[str]) -> dict[str, Any]:
    """Every config group: `groups` from the flags, checked (ranges and each group's own
    `validate`) before anything is read or written, the others from the preset."""
    cfg = {g: _cfg(cls, g, args) if g in groups else resolve(cls, g, args.preset or "cpu", None)
           for g, cls in GROUPS.items()}  # fmt: skip
    for g in groups:
        prefix = f"{g.replace('_', '-')}-" if g in getattr(args, "prefixed", ()) else ""
        if hasattr(cfg[g], "validate"):
            cfg[g].validate(prefix)
        if hasattr(cfg[g], "batch_size"):  # under torchrun: split equally over the processes
            distributed.check_divides(cfg[g].batch_size, f"--{prefix}batch-size")
    return cfg


def _one_stage(args: argparse.Namespace, name: str, groups: Sequence[str], *,
               stage: Stage | None = None, **inputs: str | None):  # fmt: skip
    """Run the pipeline's stage `name` (or `stage`, one the pipeline does not run) alone,
    through the one stage layer (skip, resume or rerun, as in `minidpo pipeline`): its
    `groups` from the flags, every other group from the preset, `inputs` ("sft",
    "train_pairs", ...) replacing the run's own files. Returns (stage, context, stamp)."""

    run = _run(args)
    cfg = _checked(args, groups)
    stage = stage or BY_NAME[name]
    given = {k: Path(v) for k, v in inputs.items() if v}
    ctx = Context(run=run, cfg=cfg, device=resolve_device(run.device),
                  force={stage.name} if run.force else set(), inputs=given,
                  prefixed=getattr(args, "prefixed", ()))  # fmt: skip
    return stage, ctx, run_stage(ctx, stage, {})


def cmd_tokenizer(args: argparse.Namespace) -> int:

    _, ctx, _ = _one_stage(args, "tokenizer", ["tokenizer"])
    tok = Tokenizer.load(ctx.paths.tokenizer)
    example = "Explain gravity."
    print(f"tokenizer: {ctx.paths.tokenizer} (vocab {tok.vocab_size})")
    print(f"{example!r} -> {tok.encode(example)}")
    return 0


def cmd_sft(args: argparse.Namespace) -> int:
    cfg = _checked(args, ["tokenizer", "model", "sft"])  # every flag and --block-size against
    check_block_size(_run(args), cfg)  # the longest demonstration, before the tokenizer is written
    _one_stage(args, "tokenizer", ["tokenizer"])  # the SFT model's tokenizer first, if needed
    _, ctx, stamp = _one_stage(args, "sft", ["tokenizer", "model", "sft"])
    s = json.loads((ctx.paths.sft_dir / "summary.json").read_text())
    print(
        f"sft: {s['steps']} steps, train loss {s['train_loss']:.4f}, "
        f"held-out loss {s['eval_loss']:.4f}, {stamp['cost']['wall_s']:.1f} s"
    )
    return 0


def _print_samples(samples, rewards: Sequence[float]) -> None:
    for s, r in zip(samples, rewards, strict=True):
        end = "" if s.terminated else "  [no end-of-text]"
        print(f"[{r:+.2f}] {s.prompt}\n        {s.response}{end}")


def sample_summary(result, cfg: SampleConfig) -> list[str]:
    """The three lines `minidpo sample` ends on: mean oracle reward ± its standard error,
    then the unparseable and unterminated shares, each ± its binomial standard error."""
    n = result.n_samples

    def share(p: float) -> str:
        return f"{100 * p:.1f} % ± {100 * (p * (1 - p) / n) ** 0.5:.1f}"

    return [
        f"oracle reward: {result.reward_mean:+.3f} ± {result.reward_se:.3f} (mean ± se over "
        f"{n} samples, {cfg.split} prompts, temperature {cfg.temperature:g})",
        f"unparseable: {share(result.unparseable_rate)} "
        f"({round(result.unparseable_rate * n)} of {n} hold a sentence outside the world)",
        f"unterminated: {share(result.unterminated_rate)} "
        f"({round(result.unterminated_rate * n)} of {n} never emitted end-of-text)",
    ]


def cmd_sample(args: argparse.Namespace) -> int:

    run = _run(args)
    cfg = _cfg(SampleConfig, "sample", args)
    if cfg.split not in ("train", "eval"):
        raise MinidpoError(f"--split: {cfg.split!r} is not train or eval")
    if cfg.n < 1:
        raise MinidpoError(f"--n: must be >= 1, got {cfg.n}")
    if cfg.show < 0:
        raise MinidpoError(f"--show: must be >= 0, got {cfg.show}")
    path = Path(args.checkpoint) if args.checkpoint else RunPaths.of(run).sft
    model, tok = load_policy(path, resolve_device(run.device))
    prompts = [p.text for p in load_world().prompts(cfg.split)]
    check_context(tok, prompts, model.config.block_size, cfg.max_new_tokens, "--max-new-tokens")
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
    scored = oracle_breakdowns(samples)
    rewards = [b.total for b in scored]
    _print_samples(samples[: cfg.show], rewards[: cfg.show])
    if cfg.show < len(samples):
        print(f"... ({len(samples) - cfg.show} more not shown; --show N prints more)")
    result = summarize(samples, rewards, [b.unparseable > 0 for b in scored], None, None)
    print("\n".join(sample_summary(result, cfg)))
    return 0


def cmd_score(args: argparse.Namespace) -> int:

    b = reward_breakdown(args.prompt, args.response, terminated=not args.unterminated)
    for sentence, rule in b.labels:
        print(f"{RULE_VALUES[rule]:+.2f}  {rule:<12} {sentence}")
    if b.unterminated:
        print(f"{RULE_VALUES['unterminated']:+.2f}  unterminated (no end-of-text)")
    clipped = "" if b.raw == b.total else f" (sum {b.raw:+.2f}, clipped)"
    print(f"oracle reward {b.total:+.2f}{clipped}")
    return 0


def _sft_path(run: RunConfig, args: argparse.Namespace) -> Path:
    return Path(args.sft) if getattr(args, "sft", None) else RunPaths.of(run).sft


def _trained(stage, ctx) -> Path:
    """The checkpoint a training stage wrote."""
    return stage.outputs(ctx)[0]


def cmd_prefs(args: argparse.Namespace) -> int:
    _, ctx, stamp = _one_stage(args, "prefs", ["prefs"], sft=args.sft)
    s = stamp["summary"]
    print(
        f"prefs: {s['train_pairs']} train pairs, {s['eval_pairs']} held-out pairs in "
        f"{ctx.paths.prefs_dir} (labels agree with the oracle on {s['label_agreement']:.1%})"
    )
    return 0


def cmd_dpo(args: argparse.Namespace) -> int:
    stage, ctx, _ = _one_stage(args, "dpo", ["dpo"], sft=args.sft, train_pairs=args.pairs,
                               eval_pairs=args.eval_pairs)  # fmt: skip
    ckpt = _trained(stage, ctx)
    s = json.loads((ckpt.parent / "summary.json").read_text())
    acc = s.get("eval/rewards/accuracies", s.get("train/rewards/accuracies"))
    print(f"dpo: {ckpt} (loss {s['train/loss']:.4f}, reward accuracy {acc:.1%})")
    return 0


def _evaluate_checkpoint(run: RunConfig, cfg: EvalConfig, ckpt: Path, ref: Path | None):

    device = resolve_device(run.device)
    model, tok = load_policy(ckpt, device)
    prompts = [p.text for p in load_world().prompts("eval")]
    check_context(tok, prompts, model.config.block_size, cfg.max_new_tokens, "--max-new-tokens")
    ref_model = load_policy(ref, device)[0] if ref is not None else None
    return evaluate_policy(
        model,
        tok,
        prompts,
        samples_per_prompt=cfg.samples_per_prompt,
        seed=seed_of(run.seed, "eval/samples"),
        ref=ref_model,
        temperature=cfg.temperature,
        max_new_tokens=cfg.max_new_tokens,
    )


def cmd_eval(args: argparse.Namespace) -> int:

    run = _run(args)
    cfg = _cfg(EvalConfig, "eval", args)
    sft = _sft_path(run, args)
    ckpt = Path(args.checkpoint) if args.checkpoint else sft
    ref = Path(args.ref) if args.ref else sft
    same = ckpt.resolve() == ref.resolve()
    result, _, _ = _evaluate_checkpoint(run, cfg, ckpt, None if same else ref)
    out = Path(args.out) if args.out else ckpt.with_name("eval.json")
    atomic_write_json(out, {"checkpoint": str(ckpt), "ref": str(ref), **result.to_dict()})
    print(_eval_table({ckpt.parent.name: result}))
    print(f"eval: {out}")
    return 0


def _eval_table(results: dict) -> str:
    def fmt(v, spec):
        return "-" if v is None else format(v, spec)

    rows = [
        f"{'policy':<28} {'oracle reward':>16} {'KL(pi||ref)':>12} {'win vs SFT':>10} "
        f"{'length':>7} {'unparseable':>11}"
    ]
    for name, r in results.items():
        reward = f"{r.reward_mean:+.3f} +- {r.reward_se:.3f}"
        rows.append(
            f"{name:<28} {reward:>16} {fmt(r.kl_mean, '.2f'):>12} "
            f"{fmt(r.win_rate_vs_ref, '.1%'):>10} {r.mean_length:>7.1f} "
            f"{r.unparseable_rate:>11.1%}"
        )
    return "\n".join(rows)


def _rm_path(run: RunConfig, args: argparse.Namespace) -> Path:
    return Path(args.rm) if args.rm else RunPaths.of(run).rm


def cmd_rm(args: argparse.Namespace) -> int:
    _, ctx, stamp = _one_stage(args, "rm", ["rm"], sft=args.sft)
    s = stamp["summary"]
    print(
        f"rm: {ctx.paths.rm_dir / 'checkpoint.pt'} (held-out accuracy "
        f"{s.get('heldout_accuracy') or 0:.1%}, Spearman with the oracle "
        f"{s.get('spearman') or float('nan'):.3f})"
    )
    return 0


def cmd_ppo(args: argparse.Namespace) -> int:
    """PPO alone at --kl-coef: --reward rm, the pipeline's `ppo` stage; oracle, its `ppo_gt`
    stage; shaped, the limits experiments' PPO on r_shaped (`minidpo.shaping`, the
    --shaping-* flags), run ``ppo-shaped-kl<k>``, stage ``ppo_shaped``."""
    cfg = _cfg(PPOConfig, "ppo", args)
    cfg.validate(oracle=args.reward != "rm")  # r_shaped charges a missing end as r* does
    if args.reward == "oracle":  # PPO-GT: the pipeline's stage, at the --kl-coef given here
        args.ppo_gt_kl_coef = cfg.kl_coef
    name = {"rm": "ppo", "oracle": "ppo_gt", "shaped": "ppo_shaped"}[args.reward]
    own = ppo_stage(name, reward="shaped") if args.reward == "shaped" else None
    stage, ctx, stamp = _one_stage(args, name, ["ppo", "pipeline", "shaping"], stage=own,
                                   sft=args.sft, rm=args.rm, prompts=args.prompts)  # fmt: skip
    s = stamp["summary"]
    print(
        f"ppo: {_trained(stage, ctx)} (held-out oracle reward {s['eval_oracle']:+.3f} "
        f"at KL {s['eval_kl']:.2f}{_shaped_note(args, _trained(stage, ctx).parent)}; "
        f"{s['wall_s']:.0f} s)"
    )
    return 0


def _shaped_note(args: argparse.Namespace, run_dir: Path) -> str:
    """With --reward shaped: the last rollouts' mean r_shaped (the score optimised,
    objective/scores of the run's metrics.jsonl) and their mean r* (objective/oracle)."""
    metrics = run_dir / "metrics.jsonl"
    if args.reward != "shaped" or not metrics.exists():
        return ""
    rows = [r for r in read_metrics(metrics) if "objective/scores" in r]
    if not rows:
        return ""
    return (f"; last rollouts r_shaped {rows[-1]['objective/scores']:+.3f}, "
            f"r* {rows[-1]['objective/oracle']:+.3f}")  # fmt: skip


def cmd_grpo(args: argparse.Namespace) -> int:
    """GRPO alone (with --reward rm, the pipeline's own GRPO stage): the run's SFT and,
    with --reward rm, its reward model; with --reward shaped, the limits experiments'
    GRPO on r_shaped (`minidpo.shaping`, the --shaping-* flags), stage ``grpo_shaped``."""
    cfg = _checked(args, ["pipeline", "shaping"])
    cfg["grpo"] = _cfg(GRPOConfig, "grpo", args)  # ranges checked in `resolve`
    cfg["grpo"].validate()
    run = _run(args)
    given = {k: Path(v) for k, v in (("sft", args.sft), ("rm", args.rm)) if v}
    stage = grpo_stage("grpo_shaped" if args.reward == "shaped" else "grpo", reward=args.reward)
    ctx = Context(run=run, cfg=cfg, device=resolve_device(run.device),
                  force={stage.name} if run.force else set(), inputs=given)  # fmt: skip
    s = run_stage(ctx, stage, {})["summary"]
    note = _shaped_note(args, _trained(stage, ctx).parent)
    print(f"grpo: {_trained(stage, ctx)} (held-out oracle reward {s['eval_oracle']:+.3f} "
          f"at KL {s['eval_kl']:.2f}{note}; {s['wall_s']:.0f} s)")  # fmt: skip
    return 0


def cmd_online_dpo(args: argparse.Namespace) -> int:
    """Online DPO alone (the pipeline's stage): the run's SFT and offline pairs (their count
    is the default labelling budget), its DPO settings."""
    cfg = _checked(args, ["online_dpo", "dpo"])
    run = _run(args)
    ctx = Context(run=run, cfg=cfg, device=resolve_device(run.device),
                  force={"online_dpo"} if run.force else set())  # fmt: skip
    stage = online_dpo_stage()
    s = run_stage(ctx, stage, {})["summary"]
    rewards = " -> ".join(f"{r:+.2f}" for r in s["samples_oracle"])
    print(f"online-dpo: {_trained(stage, ctx)} ({s['pairs']} pairs labelled; on-policy oracle "
          f"reward at the start of each round {rewards})")  # fmt: skip
    return 0


def cmd_preferred_ft(args: argparse.Namespace) -> int:
    stage, ctx, stamp = _one_stage(args, "preferred_ft", ["preferred_ft"], sft=args.sft)
    loss = stamp["summary"].get("train_loss")
    print(
        f"preferred-ft: {_trained(stage, ctx)} (train loss {loss if loss is None else round(loss, 4)})"
    )
    return 0


def cmd_best_of_n(args: argparse.Namespace) -> int:

    run = _run(args)
    cfg = _cfg(EvalConfig, "eval", args)
    device = resolve_device(run.device)
    policy, tok = load_policy(_sft_path(run, args), device)
    score_fn = (
        oracle_scores
        if args.reward == "oracle"
        else load_reward_model(_rm_path(run, args), device).score
    )
    prompts = [p.text for p in load_world().prompts("eval") for _ in range(cfg.samples_per_prompt)]
    check_context(tok, prompts, policy.config.block_size, cfg.max_new_tokens, "--max-new-tokens")
    samples = best_of_n(
        policy, tok, prompts, n=args.n, score_fn=score_fn, seed=seed_of(run.seed, "eval/samples"),
        temperature=cfg.temperature, max_new_tokens=cfg.max_new_tokens,
    )  # fmt: skip
    b = oracle_breakdowns(samples)
    result = summarize(samples, [x.total for x in b], [x.unparseable > 0 for x in b], None, None)
    out = RunPaths.of(run).folder / f"best-of-{args.n}-{args.reward}" / "eval.json"
    atomic_write_json(out, {"n": args.n, "reward": args.reward, **result.to_dict()})
    print(_eval_table({f"best-of-{args.n} ({args.reward})": result}))
    print(f"best-of-n: {out}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    """`--hf DIR`: a policy or reward model as a transformers folder; `--trl-pairs OUT`:
    pairs TRL's DPOTrainer tokenises to minidpo's ids. Every input is read and checked
    before anything is written."""
    if not (args.hf or args.trl_pairs):
        raise MinidpoError("export: give --hf DIR and/or --trl-pairs OUT.jsonl")
    run = _run(args)
    paths = RunPaths.of(run)
    rows, unterminated = None, 0
    if args.trl_pairs:
        src = Path(args.pairs) if args.pairs else paths.train_pairs
        rows, unterminated = trl_rows(load_pairs(src)[0], str(src))
    if args.hf:
        if args.checkpoint:
            ckpt = Path(args.checkpoint)
        else:
            dpo = resolve(DPOConfig, "dpo", args.preset or "cpu", None)
            ckpt = paths.dpo_dir(dpo.loss, dpo.beta) / "checkpoint.pt"
        s = export_hf(ckpt, args.hf, force=run.force)
        print(f"export: {s['kind']} of stage {s['stage']} ({ckpt}) -> {s['out']}")
    if rows is not None:
        atomic_write_jsonl(args.trl_pairs, rows)
        print(f"export: {len(rows)} pairs in TRL's text form -> {args.trl_pairs}")
        if unterminated:
            print(f"export: warning: {unterminated} responses never terminated; TRL's "
                  f"DPOTrainer ({TRL_VERSION}) appends <|endoftext|> to them, minidpo does not",
                  file=sys.stderr)  # fmt: skip
    return 0


def cmd_gravity(args: argparse.Namespace) -> int:

    print(render(compute(load_example(args.example))))
    return 0


def _check_contexts(cfg: dict[str, Any], tok: Tokenizer, prefixed: Sequence[str]) -> None:
    """Every world prompt leaves room for every stage's ``max_new_tokens`` in the model's
    context: checked before any stage runs, naming the flag (not minutes later)."""
    prompts = [p.text for split in ("train", "eval") for p in load_world().prompts(split)]
    for group, c in cfg.items():
        if hasattr(c, "max_new_tokens"):
            flag = f"--{f'{group}-' if group in prefixed else ''}max-new-tokens"
            check_context(tok, prompts, cfg["model"].block_size, c.max_new_tokens, flag)


def _context(args: argparse.Namespace):
    """A pipeline Context from the flags: every stage group resolved for the preset."""

    run = _run(args)
    cfg = {g: _cfg(cls, g, args) for g, cls in GROUPS.items()}
    prefixed = getattr(args, "prefixed", ())
    for group, c in cfg.items():  # every group's own checks, before any stage runs
        if hasattr(c, "validate"):
            c.validate(f"{group.replace('_', '-')}-" if group in prefixed else "")
    tok = world_tokenizer(cfg["tokenizer"], load_world())  # a bad --vocab-size, at once
    _check_contexts(cfg, tok, prefixed)
    forced = check_force(args.force or [])
    return Context(
        run=run, cfg=cfg, device=resolve_device(run.device), force=forced, prefixed=prefixed
    )


def cmd_pipeline(args: argparse.Namespace) -> int:
    """Every stage in order, each skipped when done; --sweep adds the frontier sweep."""

    ctx = _context(args)
    if args.sweep:
        sweep_runs(ctx)  # its own checks, before the pipeline runs
    t0 = time.perf_counter()
    run_pipeline(ctx)
    if args.sweep:
        run_sweep(ctx)
    print()
    print(summary_text(ctx.folder))
    print(f"wall time {time.perf_counter() - t0:.0f} s; stages: {ctx.folder / 'stages'}")
    return 0


# `minidpo demo`'s methods (`--methods`): DPO and the RLHF pipeline it replaces; every
# other method runs in `minidpo pipeline` and the sweep.
DEMO_METHODS = "dpo,ppo"
Handler = Callable[[argparse.Namespace], int]
STAGE_GROUPS = [
    (TokenizerConfig, "tokenizer"),
    (ModelConfig, "model"),
    (SFTConfig, "sft"),
]
SFT_HELP = "SFT checkpoint (default: the run's runs/<name>/sft/checkpoint.pt)"
SHAPED_HELP = (
    f"r_shaped = r* - --shaping-weight (default {ShapingConfig.weight:g}) per sentence beyond "
    f"--shaping-free-sentences (default {ShapingConfig.free_sentences}), the reward of the "
    "sweep's limits experiments (the sweep's --shaping-* flags)"
)


def build_parser() -> argparse.ArgumentParser:

    parser = _Parser(
        prog="minidpo",
        description="DPO from scratch, beside the RLHF pipeline it replaces, on a toy world.",
    )
    parser.add_argument("--version", action="version", version=f"minidpo {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    def add(
        name: str, handler: Handler, help: str, groups: list, prefixed: tuple = ()
    ) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help)
        add_dataclass_args(p, RunConfig, "run")
        for cls, group in groups:
            add_dataclass_args(p, cls, group, f"{group}_" if group in prefixed else "")
        p.set_defaults(handler=handler, prefixed=prefixed)
        return p

    add("tokenizer", cmd_tokenizer, "train the BPE tokenizer on the world's corpus",
        [(TokenizerConfig, "tokenizer")])  # fmt: skip
    add("sft", cmd_sft, "supervised fine-tuning on demonstrations", STAGE_GROUPS)
    p = add("sample", cmd_sample, "print policy samples with their oracle reward",
            [(SampleConfig, "sample")])  # fmt: skip
    p.add_argument("--checkpoint", help="policy checkpoint (default: the run's SFT checkpoint)")
    p = add("prefs", cmd_prefs, "preference pairs from SFT samples, Bradley-Terry labels",
            [(PrefsConfig, "prefs")])  # fmt: skip
    p.add_argument("--sft", help=SFT_HELP)
    p = add("dpo", cmd_dpo, "train a policy with DPO (or IPO, cDPO, hinge, robust DPO)",
            [(DPOConfig, "dpo")])  # fmt: skip
    p.add_argument("--sft", help=SFT_HELP)
    p.add_argument("--pairs", help="training pairs, TRL-form JSONL (default: the run's prefs)")
    p.add_argument("--eval-pairs", help="held-out pairs, TRL-form JSONL (default: the run's)")
    p = add("eval", cmd_eval, "evaluate a policy on the held-out prompts", [(EvalConfig, "eval")])
    p.add_argument("--checkpoint", help="policy to evaluate (default: the run's SFT)")
    p.add_argument("--sft", help=SFT_HELP)
    p.add_argument("--ref", help="reference policy for KL and win rate (default: the SFT)")
    p.add_argument("--out", help="JSON output (default: eval.json beside the checkpoint)")

    rm_help = "reward-model checkpoint (default: the run's runs/<name>/rm/checkpoint.pt)"
    p = add("rm", cmd_rm, "train the Bradley-Terry reward model on the run's pairs",
            [(RewardModelConfig, "rm")])  # fmt: skip
    p.add_argument("--sft", help=SFT_HELP)
    p = add("ppo", cmd_ppo, "PPO against the reward model, the oracle (PPO-GT) or r_shaped",
            [(PPOConfig, "ppo"), (ShapingConfig, "shaping")], prefixed=("shaping",))  # fmt: skip
    p.add_argument("--sft", help=SFT_HELP)
    p.add_argument("--rm", help=rm_help)
    p.add_argument("--reward", choices=("rm", "oracle", "shaped"), default="rm",
                   help="rm: the reward model (RLHF); oracle: r* itself (PPO-GT); shaped: "
                        f"{SHAPED_HELP} (run ppo-shaped-kl<k>)")  # fmt: skip
    p.add_argument("--prompts", help="training prompts, one per line (default: the world's)")
    p = add("grpo", cmd_grpo, "GRPO against the reward model, the oracle or r_shaped (no critic)",
            [(GRPOConfig, "grpo"), (ShapingConfig, "shaping")], prefixed=("shaping",))  # fmt: skip
    p.add_argument("--sft", help=SFT_HELP)
    p.add_argument("--rm", help=rm_help)
    p.add_argument("--reward", choices=("rm", "oracle", "shaped"), default="rm",
                   help=f"rm: the reward model; oracle: r* itself; shaped: {SHAPED_HELP} "
                        "(run grpo-shaped-beta<b>)")  # fmt: skip
    p = add("online-dpo", cmd_online_dpo, "online (iterative) DPO: rounds of on-policy pairs",
            [(OnlineDPOConfig, "online_dpo"), (DPOConfig, "dpo")])  # fmt: skip
    p = add("preferred-ft", cmd_preferred_ft, "SFT on the chosen responses of the pairs",
            [(PreferredFTConfig, "preferred_ft")])  # fmt: skip
    p.add_argument("--sft", help=SFT_HELP)
    p = add("best-of-n", cmd_best_of_n, "N SFT samples per prompt, the best by the reward model",
            [(EvalConfig, "eval")])  # fmt: skip
    p.add_argument("--sft", help=SFT_HELP)
    p.add_argument("--rm", help=rm_help)
    p.add_argument("--n", type=int, default=16, help="candidates per prompt (default: 16)")
    p.add_argument("--reward", choices=("rm", "oracle"), default="rm",
                   help="which reward picks the best candidate")  # fmt: skip
    p = add("export", cmd_export, "a checkpoint as a transformers folder, pairs for TRL", [])
    p.add_argument("--hf", metavar="DIR",
                   help="write a transformers GPT-2 folder (config, safetensors, tokenizer)")  # fmt: skip
    p.add_argument("--checkpoint",
                   help="policy or reward model to export (default: the run's DPO policy)")  # fmt: skip
    p.add_argument("--trl-pairs", metavar="OUT", help="write pairs in TRL's text form (JSONL)")
    p.add_argument("--pairs", help="pairs to convert (default: the run's training pairs)")
    p = sub.add_parser("gravity", help="the seed card's worked example, number by number")
    p.add_argument("--example", help="example JSON (default: data/gravity_example.json)")
    p.set_defaults(handler=cmd_gravity, preset=None)

    for name, handler, help_ in (
        ("pipeline", cmd_pipeline, "every stage in order, then the evaluation, plots and report"),
        (
            "demo",
            cmd_pipeline,
            "the main job (what `make demo` runs): SFT, then DPO against RLHF "
            "(reward model + PPO), evaluated, plotted, reported",
        ),
        (
            "sweep",
            cmd_pipeline,
            "the pipeline, then the reward-KL frontier sweep (seeds x settings)",
        ),
    ):
        p = sub.add_parser(name, help=help_, description=help_)
        add_dataclass_args(p, RunConfig, "run", skip=("force",))
        for group, cls in GROUPS.items():
            prefix = "" if group == "pipeline" else f"{group}_"
            add_dataclass_args(p, cls, group, prefix)
        p.add_argument("--force", action="append", metavar="STAGE",
                       help=f"rerun this stage (repeatable): {', '.join(STAGE_NAMES)}")  # fmt: skip
        if name == "pipeline":
            p.add_argument("--sweep", action="store_true", help="also run the frontier sweep")
        p.set_defaults(handler=handler, prefixed=tuple(g for g in GROUPS if g != "pipeline"),
                       sweep=name == "sweep")  # fmt: skip
        if name == "demo":  # the race the project measures: DPO against RLHF (RM + PPO)
            p.set_defaults(methods=DEMO_METHODS)
    p = sub.add_parser("score", help="the oracle reward of a response, rule by rule")
    p.add_argument("prompt", help='e.g. "Explain gravity."')
    p.add_argument("response", help="the response text")
    p.add_argument("--unterminated", action="store_true", help="the response never ended")
    p.set_defaults(handler=cmd_score, preset=None)
    return parser


# errno values of a file system that refuses a write; the atomic writes, the metrics logs
# and the lock name their path themselves, these catch the rest (a folder made, a file in
# the way of a folder).
REFUSED_WRITES = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM,
                            errno.ENOTDIR, errno.EISDIR})  # fmt: skip


def _no_memory(args: argparse.Namespace, asked: str) -> str:
    """The line for an allocation that failed: how much it asked for and the sizes the user
    typed (`config.MEMORY_SIZES`, as flags), the ones to make smaller."""
    typed = [f"--{dest.replace('_', '-')} {v}" for dest, v in vars(args).items()
             if type(v) is int and any(dest == n or dest.endswith(f"_{n}") for n in MEMORY_SIZES)]  # fmt: skip
    what = f"out of memory ({asked} asked for)" if asked else "out of memory"
    if typed:
        return f"{what}: more than this machine holds at {', '.join(typed)}; try smaller"
    return f"{what}: the preset's sizes are more than this machine holds; try smaller ones"


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `minidpo` console script and `python -m minidpo`."""
    args = build_parser().parse_args(argv)
    code = _dispatch(args)
    if distributed.joined():  # a torchrun rank: ends here (see `distributed.end_process`)
        distributed.end_process(code)
    return code


def _dispatch(args: argparse.Namespace) -> int:
    """The command `args` names, its bad input one line on stderr and exit code 2."""
    try:
        distributed.check_command(args.command)  # under torchrun: sft, dpo and rm only
        allocator.keep_freed_memory()  # freed tensors' pages reused, not faulted in again
        threads.configure(getattr(args, "threads", None) or "auto")
        distributed.setup(getattr(args, "device", None) or "auto")
        return args.handler(args)
    except MinidpoError as e:
        sys.stderr.write(f"minidpo: error: {one_line(str(e))}\n")
        return 2
    except OSError as e:  # the file system said no: disk full, read-only, permission denied
        if e.errno not in REFUSED_WRITES:
            raise
        where = e.filename or "a file"
        sys.stderr.write(f"minidpo: error: {one_line(f'{where}: {e.strerror}')}\n")
        return 2
    except (MemoryError, RuntimeError) as e:  # a size past memory: NumPy's, torch's allocator
        asked = out_of_memory(e)
        if asked is None:
            raise
        sys.stderr.write(f"minidpo: error: {_no_memory(args, asked)}\n")
        return 2
    except KeyboardInterrupt:
        sys.stderr.write("minidpo: interrupted; run the same command again to resume\n")
        return 130
    finally:
        distributed.teardown()
