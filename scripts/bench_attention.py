"""The decode step's attention, three ways, in a whole generation: is SDPA on the KV
cache's strided views what a sampled token costs?

    python scripts/bench_attention.py --checkpoint runs/cpu/sft/checkpoint.pt [--repeat 7]

Each way replaces `torch.nn.functional.scaled_dot_product_attention` (what
`minidpo.model` calls; restored after) for one whole `generate` (64 rows x 64 new tokens, 1 thread, the
allocator kept as the command line does), in interleaved rounds; medians, and whether
the sampled tokens equal SDPA's:

    sdpa             as the model runs (the cache's strided views)
    contiguous query SDPA with the query made contiguous first
    matmul           softmax(q k^T / sqrt(hs)) v written out, for the one-position steps
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import torch
import torch.nn.functional as F
from bench_generate import workload

import minidpo.model as model_module
from minidpo.allocator import keep_freed_memory
from minidpo.sampling import generate

SDPA = F.scaled_dot_product_attention


def matmul(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False):
    if q.size(2) != 1 or is_causal:  # the prompt's forward: as the model does it
        return SDPA(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal)
    att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(q.size(-1)))  # (B, nh, 1, Tk)
    if attn_mask is not None:
        att = att.masked_fill(~attn_mask, float("-inf"))
    return torch.softmax(att, dim=-1) @ v  # (B, nh, 1, hs)


def contiguous_query(q, k, v, **kw):
    return SDPA(q.contiguous(), k, v, **kw)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--repeat", type=int, default=7)
    a = ap.parse_args()
    keep_freed_memory()
    torch.set_num_threads(1)
    model, _, prompts, kw = workload(a.checkpoint)
    ways = {"sdpa": SDPA, "contiguous query": contiguous_query, "matmul": matmul}
    times: dict[str, list[float]] = {w: [] for w in ways}
    tokens = {}
    try:
        for _ in range(a.repeat):
            for name, fn in ways.items():
                model_module.F.scaled_dot_product_attention = fn
                t0 = time.perf_counter()
                tokens[name] = generate(model, prompts, **kw)
                times[name].append(time.perf_counter() - t0)
    finally:
        model_module.F.scaled_dot_product_attention = SDPA
    base = statistics.median(times["sdpa"])
    for name, ts in times.items():
        med = statistics.median(ts)
        same = tokens[name] == tokens["sdpa"]
        print(f"{name:<18} {med * 1000:7.1f} ms  {med / base:5.2f}x  same tokens: {same}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
