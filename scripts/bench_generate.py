"""Batched sampling, side by side: minidpo's generate (preallocated cache), the previous
loop (cache grown by concatenation, mask rebuilt every step), no cache, transformers'
generate on the same exported model, `generate` under `torch.no_grad` (as it ran before
it took `torch.inference_mode`), and the floor: a bare decode loop (the model's
prefill and one-token steps on the same cache, argmax, nothing else), beside the one
thing `generate` adds to it: the sampling step (`sample_next_token`) alone, as many
times as there are new tokens, on logits of the same shape. Interleaved
repeats (the order reversed every other round) after untimed warm-up rounds (the first
rounds run slower), 1 torch thread. Reported: each
way's median time, and the median over rounds of its time over `generate`'s in the same
round, which a slow minute of the machine moves less.

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
from minidpo.sampling import KVCache, generate, sample_next_token
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


def bare_decode(model, prompts: list[list[int]], new_tokens: int) -> torch.Tensor:
    """The floor under `generate` on unpadded prompts: the same forwards on the same
    cache, the next token by argmax, no per-row bookkeeping and no sampling. Returns the
    tokens (B, new_tokens): greedy `generate`'s, which `measure` checks."""
    idx = torch.tensor(prompts)  # (B, T0)
    cache = KVCache(model.config.n_layer, idx.size(1) + new_tokens)
    logits = model.lm_head(model.hidden_states(idx, None, cache)[:, -1])  # (B, V)
    out = [logits.argmax(dim=-1, keepdim=True)]  # each (B, 1)
    for _ in range(new_tokens - 1):
        logits = model.lm_head(model.hidden_states(out[-1], None, cache)[:, -1])  # (B, V)
        out.append(logits.argmax(dim=-1, keepdim=True))
    return torch.cat(out, dim=1)


def measure(
    checkpoint: str, repeat: int = 7, batch: int = 64, new_tokens: int = 64, warmup: int = 3
) -> dict:
    """Every way on one thread, interleaved: {"median_s", "ratio_to_generate", "runs_s"}."""
    from transformers import AutoModelForCausalLM

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    model, tok, prompts, kw = workload(checkpoint, batch, new_tokens)
    with tempfile.TemporaryDirectory() as d:
        export_hf(checkpoint, Path(d) / "hf")
        hf = AutoModelForCausalLM.from_pretrained(Path(d) / "hf").eval()
    ids = torch.tensor(prompts)
    logits = torch.randn(batch, model.config.vocab_size)  # (B, V)
    uniforms = torch.rand(new_tokens, batch)  # (new_tokens, B)
    ways = {
        "minidpo generate": lambda: generate(model, prompts, **kw),
        "previous loop": lambda: _generate_before(model, prompts, **kw),
        # generate's body under no_grad alone (below), not its torch.inference_mode
        "generate, no_grad": lambda: generate.__wrapped__(model, prompts, **kw),
        "no cache": lambda: generate(model, prompts, use_cache=False, **kw),
        "bare decode loop": lambda: bare_decode(model, prompts, new_tokens),
        "sampling step alone": lambda: [sample_next_token(logits, u).tolist() for u in uniforms],
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
        greedy = generate(model, prompts, **{**kw, "temperature": 0.0})
        if bare_decode(model, prompts, new_tokens).tolist() != greedy:
            raise SystemExit("bench_generate: the bare decode loop is not greedy generate's")
        for r in range(warmup + repeat):
            for name in list(ways) if r % 2 == 0 else reversed(ways):
                t0 = time.perf_counter()
                ways[name]()
                if r >= warmup:
                    times[name].append(time.perf_counter() - t0)
    torch.set_num_threads(before)
    base = times["minidpo generate"]
    return {
        "median_s": {k: statistics.median(v) for k, v in times.items()},
        "ratio_to_generate": {  # median over rounds of (this way / generate), same round
            k: statistics.median(t / b for t, b in zip(v, base, strict=True))
            for k, v in times.items()
        },
        "runs_s": times,
    }


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
    for k, v in result["median_s"].items():
        ratio = result["ratio_to_generate"][k]
        print(f"{k:<24} {v * 1000:8.1f} ms   {ratio:5.2f}x minidpo's (median per round)")
    if a.out:
        Path(a.out).write_text(
            json.dumps({"command": " ".join(sys.argv), **result}, indent=2) + "\n"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
