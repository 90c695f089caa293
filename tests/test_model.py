"""Tests for minidpo.model: causality, padding, tying, counting, sampling, the KV cache."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from minidpo.config import ModelConfig, to_dict
from minidpo.errors import MinidpoError
from minidpo.model import (
    GPT,
    GPTConfig,
    ScalarHeadModel,
    attention_bool_mask,
    param_count,
    position_ids,
)
from minidpo.sampling import KVCache, generate, sample_next_token

TINY = GPTConfig(vocab_size=16, block_size=32, n_layer=2, n_head=2, n_embd=32)
EOT = 0


def make_model(seed: int = 0, config: GPTConfig = TINY, sharp: bool = False) -> GPT:
    """A tiny GPT in eval mode. ``sharp`` redraws every matrix with std 0.5 so that the
    next-token distribution is peaked and depends on the whole context (at std 0.02 it
    is near uniform): greedy ties become implausible and padding bugs show."""
    model = GPT(config, generator=torch.Generator().manual_seed(seed))
    if sharp:
        g = torch.Generator().manual_seed(seed + 1000)
        with torch.no_grad():
            for p in model.parameters():
                if p.dim() == 2:
                    p.normal_(0.0, 0.5, generator=g)
    return model.eval()


def random_ids(shape: tuple[int, ...], seed: int, vocab: int = TINY.vocab_size) -> torch.Tensor:
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------- config


def test_config_roundtrip() -> None:
    config = GPTConfig(vocab_size=50, block_size=64, n_layer=3, n_head=2, n_embd=48, bias=False)
    assert GPTConfig.from_dict(config.to_dict()) == config


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(vocab_size=0),
        dict(vocab_size=10, n_embd=30, n_head=4),
        dict(vocab_size=10, dropout=1.0),
        dict(vocab_size=10, block_size=-1),
    ],
)
def test_config_rejects_bad_values(kwargs: dict) -> None:
    with pytest.raises(MinidpoError, match="GPTConfig"):
        GPTConfig(**kwargs)


def test_config_from_dict_rejects_unknown_key() -> None:
    with pytest.raises(MinidpoError, match="n_embed"):
        GPTConfig.from_dict({"vocab_size": 10, "n_embed": 32})


# --------------------------------------------------------------- parameters, tying


@pytest.mark.parametrize(
    "config",
    [
        TINY,
        GPTConfig(vocab_size=512),
        GPTConfig(vocab_size=512, n_layer=4, n_embd=128),
        GPTConfig(vocab_size=100, block_size=20, n_layer=3, n_head=3, n_embd=24, bias=False),
        GPTConfig(vocab_size=7, block_size=9, n_layer=1, n_head=1, n_embd=8),
        GPTConfig(vocab_size=100, block_size=20, n_layer=2, n_head=2, n_embd=16, tie_head=False),
    ],
)
def test_param_count_matches_formula(config: GPTConfig) -> None:
    model = GPT(config)
    counted = sum(p.numel() for p in model.parameters())  # tied weight counted once
    assert counted == param_count(config) == model.num_params()
    non_emb = counted - config.block_size * config.n_embd
    assert model.num_params(non_embedding=True) == param_count(config, non_embedding=True)
    assert model.num_params(non_embedding=True) == non_emb


def test_param_count_known_answer() -> None:
    # 512*128 + 128*128 + 4*(12*128**2 + 13*128) + 2*128, worked out in the docstring
    assert param_count(GPTConfig(vocab_size=512, n_layer=4, n_embd=128)) == 875264
    # the defaults are the cpu preset's: 512*96 + 128*96 + 3*(12*96**2 + 13*96) + 2*96
    assert param_count(GPTConfig(vocab_size=512)) == 397152
    # untied: the head's own 512*96 on top
    assert param_count(GPTConfig(vocab_size=512, tie_head=False)) == 397152 + 512 * 96


def test_an_untied_head_starts_as_the_embedding_and_trains_apart() -> None:
    """--no-tie-head: the same initial draws, so the two start equal; one optimizer step
    on a loss that reaches the head moves head and embedding differently."""
    torch.manual_seed(0)
    tied = GPT(GPTConfig(vocab_size=50, block_size=8, n_layer=1, n_head=1, n_embd=8),
               generator=torch.Generator().manual_seed(1))  # fmt: skip
    untied = GPT(GPTConfig(vocab_size=50, block_size=8, n_layer=1, n_head=1, n_embd=8,
                           tie_head=False), generator=torch.Generator().manual_seed(1))  # fmt: skip
    assert untied.transformer.wte.weight is not untied.lm_head.weight
    assert torch.equal(untied.lm_head.weight, tied.lm_head.weight)
    assert torch.equal(untied.transformer.wte.weight, tied.transformer.wte.weight)
    opt = torch.optim.SGD(untied.parameters(), lr=1.0)
    idx = torch.randint(0, 50, (2, 8))
    untied(idx).logsumexp(-1).mean().backward()
    opt.step()
    assert not torch.equal(untied.lm_head.weight, untied.transformer.wte.weight)


def test_gpt_defaults_are_the_model_config_defaults() -> None:
    gpt = GPTConfig(vocab_size=512)
    assert {k: getattr(gpt, k) for k in to_dict(ModelConfig())} == to_dict(ModelConfig())


def test_weights_are_tied() -> None:
    model = make_model()
    assert model.transformer.wte.weight is model.lm_head.weight
    assert model.transformer.wte.weight.data_ptr() == model.lm_head.weight.data_ptr()


def test_init_is_seeded_and_residual_projections_are_scaled() -> None:
    config = GPTConfig(vocab_size=64, block_size=16, n_layer=8, n_head=4, n_embd=128)
    a = GPT(config, generator=torch.Generator().manual_seed(3))
    b = GPT(config, generator=torch.Generator().manual_seed(3))
    for (name, pa), pb in zip(a.named_parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(pa, pb, rtol=0, atol=0, msg=f"{name} differs for one seed")
    # c_proj: std 0.02 / sqrt(2 * 8) = 0.005; c_fc: 0.02 (65536 samples each, ~0.3% error)
    std_proj = a.transformer.h[0].mlp.c_proj.weight.std().item()
    std_fc = a.transformer.h[0].mlp.c_fc.weight.std().item()
    assert abs(std_proj - 0.005) < 0.0002, std_proj
    assert abs(std_fc - 0.02) < 0.0005, std_fc


# ---------------------------------------------------------------------- forward


def test_forward_shapes() -> None:
    model = make_model()
    idx = random_ids((3, 11), seed=1)
    assert model(idx).shape == (3, 11, TINY.vocab_size)
    assert model.hidden_states(idx).shape == (3, 11, TINY.n_embd)


@pytest.mark.parametrize("with_mask", [False, True])
def test_causality(with_mask: bool) -> None:
    model = make_model(sharp=True)
    idx = random_ids((2, 12), seed=2)
    mask = torch.ones_like(idx) if with_mask else None
    base = model(idx, mask)
    for t in [0, 1, 5, 11]:
        changed = idx.clone()
        changed[:, t] = (changed[:, t] + 1) % TINY.vocab_size
        out = model(changed, mask)
        torch.testing.assert_close(
            out[:, :t], base[:, :t], rtol=1e-6, atol=1e-6, msg=f"position < {t} changed"
        )
        diff = (out[:, t] - base[:, t]).abs().amax(dim=-1)  # (B,)
        assert (diff > 1e-3).all(), f"changing token {t} left logits at {t} unchanged: {diff}"


def test_left_padding_matches_unpadded() -> None:
    model = make_model(sharp=True)
    lengths = [9, 3, 6, 1]
    T = max(lengths)
    seqs = [random_ids((n,), seed=10 + i) for i, n in enumerate(lengths)]
    idx = random_ids((len(seqs), T), seed=99)  # padding ids are arbitrary: they are masked
    mask = torch.zeros_like(idx)
    for i, s in enumerate(seqs):
        idx[i, T - len(s) :] = s
        mask[i, T - len(s) :] = 1
    logits = model(idx, mask)  # (B, T, V)
    assert torch.isfinite(logits).all(), "padding positions produced NaN/inf"
    for i, s in enumerate(seqs):
        alone = model(s[None])[0]  # (n, V)
        torch.testing.assert_close(
            logits[i, T - len(s) :], alone, rtol=0, atol=1e-5, msg=f"row {i} (len {len(s)})"
        )


def test_right_padding_needs_no_mask() -> None:
    model = make_model(sharp=True)
    lengths = [8, 2, 5]
    T = max(lengths)
    idx = random_ids((len(lengths), T), seed=5)  # trailing positions play the padding
    logits = model(idx)
    masked = model(idx, (torch.arange(T)[None, :] < torch.tensor(lengths)[:, None]).long())
    for i, n in enumerate(lengths):
        alone = model(idx[i : i + 1, :n])[0]
        torch.testing.assert_close(logits[i, :n], alone, rtol=0, atol=1e-5, msg=f"row {i}")
        torch.testing.assert_close(masked[i, :n], alone, rtol=0, atol=1e-5, msg=f"row {i} mask")


def test_position_ids_and_bool_mask_known_answer() -> None:
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    assert position_ids(mask).tolist() == [[0, 0, 0, 1, 2], [0, 1, 2, 3, 4]]
    allowed = attention_bool_mask(mask, num_queries=5)  # (B, 1, 5, 5)
    assert allowed.shape == (2, 1, 5, 5)
    expected_row0 = torch.tensor(
        [
            [1, 0, 0, 0, 0],  # padding query: only itself, never an all-False row
            [0, 1, 0, 0, 0],
            [0, 0, 1, 0, 0],
            [0, 0, 1, 1, 0],
            [0, 0, 1, 1, 1],
        ],
        dtype=torch.bool,
    )
    assert torch.equal(allowed[0, 0], expected_row0)
    assert torch.equal(allowed[1, 0], torch.ones(5, 5, dtype=torch.bool).tril())
    # The last 2 queries of 5 keys, as in a cached step.
    assert torch.equal(attention_bool_mask(mask, num_queries=2)[0, 0], expected_row0[3:])


def test_too_long_raises() -> None:
    model = make_model()
    with pytest.raises(MinidpoError, match="block_size=32"):
        model(torch.zeros(1, TINY.block_size + 1, dtype=torch.long))
    model(torch.zeros(1, TINY.block_size, dtype=torch.long))  # exactly block_size is fine


def test_overfits_one_small_batch() -> None:
    model = GPT(TINY, generator=torch.Generator().manual_seed(0)).train()
    idx = random_ids((4, 17), seed=7)
    x, y = idx[:, :-1], idx[:, 1:]  # (4, 16) each
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    losses: list[float] = []
    while len(losses) < 300 and (not losses or losses[-1] >= 0.05):
        logits = model(x)  # (B, T, V)
        loss = F.cross_entropy(logits.reshape(-1, TINY.vocab_size), y.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.05, f"cross-entropy {losses[-1]:.4f} after {len(losses)} steps"
    assert losses[0] > 2.0, f"initial cross-entropy {losses[0]:.3f}, expected ~ln(16) = 2.77"


# --------------------------------------------------------------------- sampling


def test_sample_next_token_known_answers() -> None:
    probs = torch.tensor([0.1, 0.2, 0.7])
    logits = probs.log()[None].repeat(5, 1)  # (5, 3)
    u = torch.tensor([0.0, 0.05, 0.1001, 0.2999, 0.3001])
    assert sample_next_token(logits, u).tolist() == [0, 0, 1, 1, 2]
    # top_k=1 and greedy both give the argmax, whatever u is
    assert sample_next_token(logits, u, top_k=1).tolist() == [2] * 5
    assert sample_next_token(logits, u, temperature=0.0).tolist() == [2] * 5
    # top_k=2 renormalizes over {1, 2}: cdf [0, 2/9, 1]
    u2 = torch.tensor([0.0, 0.2, 0.23, 0.999])
    assert sample_next_token(logits[:4], u2, top_k=2).tolist() == [1, 1, 2, 2]
    # temperature 2 flattens: probs proportional to sqrt(p)
    flat = probs.sqrt() / probs.sqrt().sum()  # [0.186, 0.263, 0.551]
    u3 = torch.tensor([flat[0].item() - 1e-4, flat[0].item() + 1e-4])
    assert sample_next_token(logits[:2], u3, temperature=2.0).tolist() == [0, 1]


def test_sample_next_token_never_picks_zero_probability_tokens() -> None:
    logits = torch.tensor([[float("-inf"), 0.0, float("-inf"), 0.0, float("-inf")]])
    u = torch.linspace(0, 0.999999, 101)
    ids = sample_next_token(logits.repeat(101, 1), u)
    assert set(ids.tolist()) == {1, 3}


PROMPTS = [[3, 4, 5, 6, 7, 8], [9], [1, 2, 3], [15, 14, 13, 12]]
SEEDS = [11, 12, 13, 14]


@pytest.mark.parametrize(
    "temperature, top_k", [(1.0, None), (1.0, 3), (0.7, 5), (0.0, None)], ids=str
)
@pytest.mark.parametrize("use_cache", [True, False], ids=["cache", "nocache"])
def test_batched_generation_equals_one_at_a_time(
    temperature: float, top_k: int | None, use_cache: bool
) -> None:
    model = make_model(seed=1, sharp=True)
    kw = dict(max_new_tokens=12, eot_id=EOT, temperature=temperature, top_k=top_k)
    batched = generate(model, PROMPTS, seeds=SEEDS, use_cache=use_cache, **kw)
    single = [
        generate(model, [p], seeds=[s], use_cache=use_cache, **kw)[0]
        for p, s in zip(PROMPTS, SEEDS, strict=True)
    ]
    assert batched == single
    # the batch is not trivially uniform: responses have different lengths or ids
    assert len({tuple(r) for r in batched}) > 1


def test_generation_stops_at_eot() -> None:
    model = make_model(seed=2)  # near-uniform over 16 ids: P(eot) ~ 1/16 per step
    prompts = [[1 + (i % 15)] * (1 + i % 5) for i in range(24)]
    out = generate(model, prompts, max_new_tokens=20, eot_id=EOT, seeds=range(24))
    stopped = reached_max = 0
    for i, r in enumerate(out):
        assert 1 <= len(r) <= 20, f"row {i} has {len(r)} tokens"
        assert EOT not in r[:-1], f"row {i} continued past eot: {r}"
        assert r[-1] == EOT or len(r) == 20, f"row {i} stopped early without eot: {r}"
        stopped += r[-1] == EOT and len(r) < 20
        reached_max += len(r) == 20
    assert stopped > 0 and reached_max > 0, (stopped, reached_max)  # both cases exercised


def test_generation_seeds() -> None:
    model = make_model(seed=3)
    kw = dict(max_new_tokens=15, eot_id=EOT)
    a = generate(model, PROMPTS, seeds=SEEDS, **kw)
    b = generate(model, PROMPTS, seeds=SEEDS, **kw)
    c = generate(model, PROMPTS, seeds=[s + 100 for s in SEEDS], **kw)
    assert a == b
    assert a != c
    # the same prompt twice in one batch with different seeds gives different samples
    d = generate(model, [PROMPTS[0], PROMPTS[0]], seeds=[1, 2], **kw)
    assert d[0] != d[1]


def test_generate_restores_training_mode_and_validates() -> None:
    model = make_model().train()
    generate(model, [[1, 2]], max_new_tokens=2, eot_id=EOT, seeds=[0])
    assert model.training
    kw = dict(eot_id=EOT, seeds=[0])
    with pytest.raises(MinidpoError, match="block_size 32"):
        generate(model, [[1] * 30], max_new_tokens=3, **kw)
    generate(model, [[1] * 29], max_new_tokens=3, **kw)  # 29 + 3 == 32 fits
    with pytest.raises(MinidpoError, match="seeds"):
        generate(model, [[1], [2]], max_new_tokens=3, **kw)
    with pytest.raises(MinidpoError, match="empty"):
        generate(model, [[]], max_new_tokens=3, **kw)
    with pytest.raises(MinidpoError, match="token id"):
        generate(model, [[99]], max_new_tokens=3, **kw)


# --------------------------------------------------------------------- KV cache


def test_kv_cache_logits_equal_full_forward() -> None:
    model = make_model(seed=4, sharp=True)
    idx = random_ids((3, 14), seed=8)
    mask = torch.ones_like(idx)
    mask[1, :4] = 0  # row 1 is left-padded by 4
    mask[2, :9] = 0  # row 2 by 9
    full = model(idx, mask)  # (B, T, V)
    cache = KVCache(TINY.n_layer, TINY.block_size)
    chunks = [model.lm_head(model.hidden_states(idx[:, :6], mask[:, :6], cache))]  # prefill 6
    for t in range(6, 14):  # then one position at a time
        chunks.append(
            model.lm_head(model.hidden_states(idx[:, t : t + 1], mask[:, : t + 1], cache))
        )
    assert cache.length == 14
    incremental = torch.cat(chunks, dim=1)  # (B, T, V)
    real = mask.bool()
    # float32: the cached and full paths sum in different orders, so logits of size ~3
    # may differ by a few ulps (1.2e-5 seen once, relative 4e-6); a caching bug is O(1)
    torch.testing.assert_close(incremental[real], full[real], rtol=1e-5, atol=1e-5)


def test_kv_cache_generation_equals_no_cache() -> None:
    model = make_model(seed=5, sharp=True)
    for temperature, top_k in [(1.0, None), (0.0, None), (1.0, 4)]:
        kw = dict(max_new_tokens=20, eot_id=EOT, seeds=SEEDS, temperature=temperature, top_k=top_k)
        assert generate(model, PROMPTS, use_cache=True, **kw) == generate(
            model, PROMPTS, use_cache=False, **kw
        ), f"temperature={temperature} top_k={top_k}"


class _GrowingCache:
    """The cache before it was preallocated: keys and values grown by concatenation."""

    def __init__(self, n_layer: int) -> None:
        self.kv: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * n_layer

    @property
    def length(self) -> int:
        return 0 if self.kv[0] is None else self.kv[0][0].size(2)

    def update(self, layer, k, v):
        if self.kv[layer] is not None:
            k, v = (
                torch.cat([old, new], dim=2)
                for old, new in zip(self.kv[layer], (k, v), strict=True)
            )
        self.kv[layer] = (k, v)
        return k, v


@torch.no_grad()
def _generate_before(model, prompts, *, max_new_tokens, eot_id, seeds, temperature, top_k):
    """`generate` as it was before the preallocated cache: the mask rebuilt and the cache
    grown at every step, a mask passed even without padding. The reference for the test."""
    B, T0 = len(prompts), max(len(p) for p in prompts)
    idx = torch.full((B, T0), eot_id, dtype=torch.long)
    mask = torch.zeros((B, T0), dtype=torch.long)
    for i, p in enumerate(prompts):
        idx[i, T0 - len(p) :], mask[i, T0 - len(p) :] = torch.tensor(p), 1
    gens = [torch.Generator().manual_seed(int(s)) for s in seeds]
    uniforms = torch.stack([torch.rand(max_new_tokens, generator=g) for g in gens])
    cache = _GrowingCache(model.config.n_layer)
    logits = model.lm_head(model.hidden_states(idx, mask, cache)[:, -1])
    out, done = [[] for _ in range(B)], [False] * B
    for t in range(max_new_tokens):
        nxt = sample_next_token(logits, uniforms[:, t], temperature, top_k)
        for i, tok in enumerate(nxt.tolist()):
            if not done[i]:
                out[i].append(tok)
                done[i] = tok == eot_id
        if all(done):
            break
        mask = torch.cat([mask, torch.ones_like(nxt[:, None])], dim=1)
        logits = model.lm_head(model.hidden_states(nxt[:, None], mask, cache)[:, -1])
    return out


@pytest.mark.parametrize("padded", [True, False], ids=["padded", "same-length"])
def test_preallocated_cache_samples_the_tokens_it_sampled_before(padded: bool) -> None:
    model = make_model(seed=7, sharp=True)
    prompts = PROMPTS if padded else [PROMPTS[0]] * len(PROMPTS)
    for temperature, top_k in [(1.0, None), (0.0, None), (1.0, 4)]:
        kw = dict(max_new_tokens=20, eot_id=EOT, seeds=SEEDS, temperature=temperature, top_k=top_k)
        assert generate(model, prompts, **kw) == _generate_before(model, prompts, **kw)


def test_kv_cache_is_allocated_once() -> None:
    model = make_model(seed=2)
    cache = KVCache(TINY.n_layer, 12)
    model.hidden_states(random_ids((2, 5), seed=1), None, cache)
    buffers = [k.data_ptr() for k in cache.keys]
    for _ in range(7):
        model.hidden_states(random_ids((2, 1), seed=2), None, cache)
    assert [k.data_ptr() for k in cache.keys] == buffers and cache.length == 12
    with pytest.raises(MinidpoError, match="13 positions, capacity 12"):
        cache.update(0, *(torch.zeros(2, TINY.n_head, 1, 16) for _ in range(2)))


def test_kv_cache_respects_block_size() -> None:
    model = make_model()
    cache = KVCache(TINY.n_layer, TINY.block_size)
    model.hidden_states(torch.zeros(1, 32, dtype=torch.long), None, cache)
    with pytest.raises(MinidpoError, match="33 tokens"):
        model.hidden_states(torch.zeros(1, 1, dtype=torch.long), None, cache)


# ----------------------------------------------------------------- scalar head


def test_scalar_head_model_shape_and_gradients() -> None:
    gpt = make_model(seed=6)
    rm = ScalarHeadModel(gpt, generator=torch.Generator().manual_seed(0)).train()
    assert rm.body is gpt  # shares, does not copy
    # only the head is new: the tied lm_head adds nothing
    n_rm = sum(p.numel() for p in rm.parameters())
    assert n_rm == gpt.num_params() + TINY.n_embd + 1
    idx = random_ids((3, 10), seed=9)
    mask = torch.ones_like(idx)
    mask[0, :3] = 0
    values = rm(idx, mask)
    assert values.shape == (3, 10)
    assert torch.isfinite(values).all()
    values[mask.bool()].sum().backward()
    for name, p in rm.named_parameters():
        assert p.grad is not None, f"no gradient for {name}"
    assert rm.head.weight.grad.abs().sum() > 0
    assert gpt.transformer.h[0].attn.c_attn.weight.grad.abs().sum() > 0, "body got no gradient"


def test_scalar_head_model_on_a_copy_leaves_the_policy_alone() -> None:
    gpt = make_model(seed=7)
    before = copy.deepcopy(gpt.state_dict())
    vm = ScalarHeadModel(copy.deepcopy(gpt))
    opt = torch.optim.SGD(vm.parameters(), lr=0.1)
    vm(random_ids((2, 5), seed=1)).sum().backward()
    opt.step()
    for k, v in gpt.state_dict().items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=0, msg=f"{k} changed")
