"""Training-step throughput, side by side: minidpo's GPT against transformers' GPT-2, and a
DPO step against an SFT step on the same rows.

    python scripts/bench_steps.py --checkpoint runs/cpu/sft/checkpoint.pt [--device cpu|cuda]
                                  [--bf16] [--compile] [--batch B] [--seq T] [--repeat 7]
                                  [--out FILE.json]

One step is what `minidpo.training.gradient_step` does: forward, loss, backward,
global-norm clipping at 1.0, AdamW. The ways, timed in interleaved rounds (medians):

    minidpo sft step       the checkpoint's GPT, next-token loss on B x T random tokens
    reference sft step     transformers' GPT2LMHeadModel (SDPA) with the same weights,
                           the architecture nanoGPT reproduces, on the same batch
    minidpo dpo step       the sigmoid DPO loss on B pairs: one forward over the 2B rows
                           [chosen; rejected], reference log-probs given (cached, as in
                           training)
    minidpo sft step, 2B   the SFT step on the same 2B rows (the DPO step's baseline)

Each way reports seconds per step, tokens per second (real tokens through forward and
backward), and the model-flops utilisation against `--peak-tflops` (default: the bf16
dense peak of a known GPU, none on CPU), counting 6N + 12 L T C flops per token as
nanoGPT's `estimate_mfu` does (N: parameters without the position embedding). `--bf16`
runs the forward under bf16 autocast; `--compile` wraps both models in `torch.compile`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

try:
    import minidpo  # noqa: F401
except ImportError:  # run as a plain script from a checkout
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from minidpo.allocator import keep_freed_memory
from minidpo.batching import Batch
from minidpo.checkpoints import load_checkpoint
from minidpo.logprobs import concatenated_logprobs
from minidpo.losses import preference_loss
from minidpo.model import GPTConfig
from minidpo.policy import load_policy
from minidpo.sft import lm_loss
from minidpo.training import make_optimizer

# bf16 dense peak TFLOPS by device name (vendor data sheets; SXM parts)
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0}


def reference_model(checkpoint: Path):
    """transformers' GPT2LMHeadModel with the checkpoint's weights (minidpo's export), or
    None where transformers is not installed (the `hf` extra)."""
    try:
        from transformers import AutoModelForCausalLM
    except ImportError:
        return None

    from minidpo.export import export_hf

    with tempfile.TemporaryDirectory() as d:
        export_hf(checkpoint, Path(d) / "hf")
        return AutoModelForCausalLM.from_pretrained(Path(d) / "hf", attn_implementation="sdpa")


def flops_per_token(cfg: GPTConfig, n_params: int, seq: int) -> float:
    """6N + 12 L T C: a forward and backward's matmul flops per token (nanoGPT's estimate)."""
    return 6 * n_params + 12 * cfg.n_layer * seq * cfg.n_embd


def step(
    model: torch.nn.Module, opt: torch.optim.Optimizer, loss_of: Callable[[], torch.Tensor]
) -> Callable[[], None]:
    """One optimisation step as `gradient_step` takes it."""

    def run() -> None:
        loss = loss_of()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()

    return run


def ways(checkpoint: Path, batch: int, seq: int, device: str, bf16: bool, compile_: bool):
    """(name -> (step function, tokens per step), the model)."""
    torch.manual_seed(0)
    model = load_policy(checkpoint, device)[0]
    cfg = model.config
    ref = reference_model(checkpoint)
    ref = ref.to(device) if ref is not None else None
    fast = (model, ref)
    if compile_:
        fast = (torch.compile(model), ref and torch.compile(ref))
    auto = (
        (lambda: torch.autocast(device, dtype=torch.bfloat16)) if bf16 else contextlib.nullcontext
    )
    x = torch.randint(1, cfg.vocab_size, (2 * batch, seq + 1), device=device)
    rows = Batch(x[:, :-1], x[:, 1:], torch.ones(2 * batch, seq, device=device))  # (2B, T)
    ref_logps = torch.randn(2 * batch, device=device) - 100.0  # (2B,): cached reference

    def lm(net, n: int) -> torch.Tensor:
        part = Batch(rows.input_ids[:n], rows.labels[:n], rows.mask[:n])  # (n, T)
        with auto():
            logits = net(part.input_ids)
            logits = logits.logits if hasattr(logits, "logits") else logits  # (n, T, V)
        return lm_loss(logits.float(), part)

    def dpo() -> torch.Tensor:  # minidpo's DPO loss: one forward over [chosen; rejected]
        with auto():
            chosen, rejected = concatenated_logprobs(fast[0], rows)  # (B,), (B,)
        ref_c, ref_r = ref_logps[:batch], ref_logps[batch:]
        return preference_loss(
            chosen.float(), rejected.float(), ref_c, ref_r, beta=0.1
        ).losses.mean()

    opt_m = make_optimizer(model, 1e-4, 0.1)
    table = {"minidpo sft step": (step(model, opt_m, lambda: lm(fast[0], batch)), batch * seq)}
    if ref is not None:
        opt_r = make_optimizer(ref, 1e-4, 0.1)
        table["reference sft step"] = (step(ref, opt_r, lambda: lm(fast[1], batch)), batch * seq)
    table["minidpo dpo step"] = (step(model, opt_m, dpo), 2 * batch * seq)
    table["minidpo sft step, 2B"] = (step(model, opt_m, lambda: lm(fast[0], 2 * batch)),
                                     2 * batch * seq)  # fmt: skip
    return table, model


def measure(args: argparse.Namespace) -> dict:
    """Interleaved medians of every way; returns the JSON-ready result."""
    device = args.device
    ckpt = load_checkpoint(args.checkpoint, kind="policy")
    batch = args.batch or int(ckpt["stage_config"].get("sft", {}).get("batch_size", 32))
    table, model = ways(Path(args.checkpoint), batch, args.seq, device, args.bf16, args.compile)
    cfg, n_params = model.config, model.num_params()
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    times: dict[str, list[float]] = {k: [] for k in table}
    for r in range(args.warmup + args.repeat):
        for name, (fn, _) in table.items():
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            if r >= args.warmup:
                times[name].append(time.perf_counter() - t0)
    name = torch.cuda.get_device_name() if device.startswith("cuda") else "cpu"
    peak = args.peak_tflops or next((v for k, v in PEAK_TFLOPS.items() if k in name), None)
    fpt = flops_per_token(cfg, n_params, args.seq)
    out: dict = {
        "command": " ".join(["python", *sys.argv]),
        "device": name,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "shape": {"n_layer": cfg.n_layer, "n_head": cfg.n_head, "n_embd": cfg.n_embd,
                  "vocab": cfg.vocab_size, "batch": batch, "seq": args.seq, "params": n_params},
        "bf16": args.bf16, "compile": args.compile, "peak_tflops": peak,
        "ways": {},
    }  # fmt: skip
    for way, (_, tokens) in table.items():
        med = statistics.median(times[way])
        tps = tokens / med
        mfu = tps * fpt / (peak * 1e12) if peak else None
        out["ways"][way] = {"median_s": med, "tokens_per_s": tps, "mfu": mfu, "runs_s": times[way]}
    med = {way: r["median_s"] for way, r in out["ways"].items()}
    out["ratios"] = {
        "minidpo sft step / reference": (
            med["minidpo sft step"] / med["reference sft step"]
            if "reference sft step" in med
            else None
        ),
        "dpo step / sft step on the same 2B rows": (
            med["minidpo dpo step"] / med["minidpo sft step, 2B"]
        ),
    }
    return out


def report(out: dict) -> str:
    rows = [f"{out['device']}, shape {out['shape']}, bf16 {out['bf16']}, compile {out['compile']}"]
    for way, r in out["ways"].items():
        mfu = f"   MFU {r['mfu']:.1%}" if r["mfu"] is not None else ""
        rows.append(
            f"{way:<24} {r['median_s'] * 1e3:9.2f} ms  {r['tokens_per_s']:>12,.0f} tok/s{mfu}"
        )
    rows += [f"{k}: {v:.2f}x" for k, v in out["ratios"].items() if v is not None]
    return "\n".join(rows)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", required=True, help="a policy checkpoint: its shape, weights")
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch", type=int, default=0, help="rows per SFT step (default: the preset's)")
    p.add_argument("--seq", type=int, default=64, help="tokens per row")
    p.add_argument("--repeat", type=int, default=7)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--bf16", action="store_true", help="forward under bf16 autocast")
    p.add_argument("--compile", action="store_true", help="torch.compile both models")
    p.add_argument("--peak-tflops", type=float, default=None)
    p.add_argument("--out")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    keep_freed_memory()  # as the command line does
    out = measure(args)
    print(report(out))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
