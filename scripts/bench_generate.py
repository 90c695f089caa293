"""Batched sampling, side by side: minidpo's generate (preallocated cache), the previous
loop (cache grown by concatenation, mask rebuilt every step), no cache, and transformers'
generate on the same exported model. Interleaved repeats, medians, 1 torch thread.

    python scripts/bench_generate.py --checkpoint runs/cpu/sft/checkpoint.pt --repeat 7
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from test_model import _generate_before  # the previous loop, kept as a reference

from minidpo.allocator import keep_freed_memory
from minidpo.export import export_hf
from minidpo.policy import load_policy
from minidpo.sampling import generate
from minidpo.world import format_prompt, load_world


def workload(checkpoint: str, batch: int = 64, new_tokens: int = 64):
    """(model, tokenizer, prompts, generate's keywords): the sampling every benchmark times."""
    model, tok = load_policy(checkpoint)
    prompt = tok.encode(format_prompt(load_world().prompts("eval")[0].text))
    prompts = [prompt] * batch  # one prompt: the unpadded case (GRPO groups, Best-of-N)
    # eot_id 0 (byte 0x00, never sampled): every row runs all new tokens, as transformers'
    # does with min_new_tokens, so every way does the same work
    kw = dict(max_new_tokens=new_tokens, eot_id=0, seeds=list(range(batch)),
              temperature=1.0, top_k=None)  # fmt: skip
    return model, tok, prompts, kw


def measure(checkpoint: str, repeat: int = 7, batch: int = 64, new_tokens: int = 64) -> dict:
    """Interleaved medians (seconds) of every way on one thread: {"median_s", "runs_s"}."""
    from transformers import AutoModelForCausalLM

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    model, tok, prompts, kw = workload(checkpoint, batch, new_tokens)
    with tempfile.TemporaryDirectory() as d:
        export_hf(checkpoint, Path(d) / "hf")
        hf = AutoModelForCausalLM.from_pretrained(Path(d) / "hf").eval()
    ids = torch.tensor(prompts)
    ways = {
        "minidpo generate": lambda: generate(model, prompts, **kw),
        "previous loop": lambda: _generate_before(model, prompts, **kw),
        "no cache": lambda: generate(model, prompts, use_cache=False, **kw),
        "transformers generate": lambda: hf.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            do_sample=True,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            pad_token_id=tok.eot_id,
        ),
    }
    times: dict[str, list[float]] = {k: [] for k in ways}
    with torch.no_grad():
        for _ in range(repeat):
            for name, fn in ways.items():
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
    torch.set_num_threads(before)
    return {"median_s": {k: statistics.median(v) for k, v in times.items()}, "runs_s": times}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--out")
    a = ap.parse_args()
    keep_freed_memory()  # as the command line does
    result = measure(a.checkpoint, a.repeat, a.batch, a.new_tokens)
    med = result["median_s"]
    base = med["minidpo generate"]
    for k, v in med.items():
        print(f"{k:<24} {v * 1000:8.1f} ms   {v / base:5.2f}x minidpo's")
    if a.out:
        Path(a.out).write_text(
            json.dumps({"command": " ".join(sys.argv), **result}, indent=2) + "\n"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
