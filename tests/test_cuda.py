"""The model, sampling and training on CUDA against the same on CPU (skipped without CUDA).

Same weights, same batch: the CUDA forward's logits and the loss curve of a few AdamW
steps agree with the CPU's within float32 tolerances (different kernels sum in another
order), and the KV-cache path samples the same greedy tokens as the no-cache path on the
device. Run by `scripts/gpu_checks.sh` (`pytest -m cuda`).
"""

from __future__ import annotations

import copy

import pytest
import torch

from minidpo.batching import build_batch
from minidpo.model import GPT, GPTConfig
from minidpo.sampling import generate
from minidpo.sft import lm_loss
from minidpo.training import make_optimizer

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

CFG = GPTConfig(vocab_size=97, n_layer=2, n_head=4, n_embd=64, block_size=48)
# CUDA and CPU float32 matmuls (TF32 off) differ by a few ulps per sum
LOGITS_TOL = 1e-4
LOSS_TOL = 1e-4


@pytest.fixture(autouse=True)
def _no_tf32():
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


def _models() -> tuple[GPT, GPT]:
    torch.manual_seed(0)
    cpu = GPT(CFG)
    return cpu, copy.deepcopy(cpu).cuda()


def _batch():
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(1, 97, (n,), generator=g).tolist() for n in (3, 5, 4, 6)]
    responses = [[*torch.randint(1, 97, (n,), generator=g).tolist(), 0] for n in (9, 4, 7, 12)]
    return build_batch(prompts, responses, pad_id=0)


def test_logits_match_cpu():
    cpu, gpu = _models()
    b = _batch()
    with torch.no_grad():
        want = cpu(b.input_ids)
        got = gpu(b.input_ids.cuda()).cpu()
    assert (got - want).abs().max().item() <= LOGITS_TOL


def test_training_steps_match_cpu():
    cpu, gpu = _models()
    b = _batch()
    losses = {}
    for name, model in (("cpu", cpu), ("cuda", gpu)):
        batch = b.to(next(model.parameters()).device)
        opt = make_optimizer(model, 1e-3, 0.1)
        curve = []
        for _ in range(5):
            loss = lm_loss(model(batch.input_ids), batch)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            curve.append(loss.item())
        losses[name] = curve
    gaps = [abs(a - b) for a, b in zip(losses["cpu"], losses["cuda"], strict=True)]
    assert max(gaps) <= LOSS_TOL, losses


def test_cached_greedy_sampling_matches_no_cache_on_cuda():
    _, gpu = _models()
    prompts = [[5, 6, 7], [8, 9], [10, 11, 12, 13]]  # left-padded: the masked path
    kw = dict(max_new_tokens=16, eot_id=0, seeds=[0, 1, 2], temperature=0.0)
    with torch.no_grad():
        cached = generate(gpu, prompts, **kw)
        plain = generate(gpu, prompts, use_cache=False, **kw)
    assert cached == plain and all(len(r) > 0 for r in cached)
