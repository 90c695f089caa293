"""A tiny GPT, written from scratch, plus a scalar head for reward and value models.

What it is: a decoder-only transformer in the GPT-2 layout (Radford et al. 2019,
"Language Models are Unsupervised Multitask Learners", Sec. 2.3): token and learned
position embeddings, pre-LayerNorm blocks ``x + attn(ln_1(x))``, ``x + mlp(ln_2(x))``,
causal self-attention through ``F.scaled_dot_product_attention``, a 4x GELU MLP, a
final LayerNorm, and an output head whose weight is tied to the token embedding.

- `GPTConfig`: the hyperparameters, a reason for each; `param_count(config)` gives
  the closed-form number of parameters.
- `GPT.forward(idx, attention_mask)` -> logits (B, T, V); `GPT.hidden_states` -> (B, T, C),
  optionally through a key/value cache (`Cache`): sampling, with the cache, is
  `minidpo.sampling.generate`.
- `ScalarHeadModel`: the same body with a ``Linear(n_embd, 1)`` head, one scalar per
  position: the reward model (Bradley-Terry) and the PPO value model.

Padding. ``attention_mask`` is 1 for real tokens and 0 for padding.
- Right padding (training, log-probs) needs no mask: attention is causal, so a real
  token only ever sees earlier positions, which are real too. Outputs at padding
  positions are meaningless and must be masked out of any loss.
- Left padding (generation) needs the mask: positions are counted from each row's
  first real token, and no query attends to a padding key.

What it leaves out, on purpose: dropout beyond the embedding/residual dropouts and
SDPA's ``dropout_p``; flash-attention or fused-kernel code (SDPA picks a kernel);
weight-decay parameter groups and the optimizer (the training loop's job); loading
pretrained GPT-2 weights; MFU estimates; mixed precision; rotary or ALiBi positions.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.nn as nn
from torch.nn import functional as F

from minidpo.config import ModelConfig
from minidpo.errors import MinidpoError


@dataclass
class GPTConfig:
    """Hyperparameters of `GPT`. The size defaults are the cpu preset's (`ModelConfig`, one
    source for both): 3 blocks of width 96, ~0.34M parameters in the blocks."""

    vocab_size: int
    """Number of token ids, including special tokens; the tokenizer decides it."""

    block_size: int = ModelConfig.block_size
    """Longest sequence the model can see: the size of the position-embedding table.
    Prompt plus response must fit; 128 is ample for the toy world's short answers."""

    n_layer: int = ModelConfig.n_layer
    """Number of transformer blocks. Three are enough to learn the toy world on a CPU."""

    n_head: int = ModelConfig.n_head
    """Attention heads per block; must divide ``n_embd`` (head size = n_embd // n_head)."""

    n_embd: int = ModelConfig.n_embd
    """Width of the residual stream (C). Cost grows as n_embd**2 per token per layer."""

    dropout: float = ModelConfig.dropout
    """Dropout on embeddings, attention weights and residual branches while training.
    0.0 by default: tiny models on small data rarely need it, and it keeps runs exact."""

    bias: bool = True
    """Biases in Linear layers and LayerNorms, as in GPT-2. False is slightly smaller."""

    tie_head: bool = ModelConfig.tie_head
    """One (V, C) matrix both embeds ids and scores the next token (Press & Wolf 2017, as
    in GPT-2). False: the head starts as a copy of the embedding and the two train apart
    (V*C more parameters, the same compute)."""

    def __post_init__(self) -> None:
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise MinidpoError(f"GPTConfig.{name} must be a positive int, got {value!r}")
        if self.n_embd % self.n_head != 0:
            raise MinidpoError(
                f"GPTConfig.n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise MinidpoError(f"GPTConfig.dropout must be in [0, 1), got {self.dropout!r}")

    def to_dict(self) -> dict[str, Any]:
        """Plain dict of the fields, for JSON and checkpoints."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> GPTConfig:
        """Inverse of `to_dict`; unknown keys are an error, not silently dropped."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise MinidpoError(f"GPTConfig: unknown field(s) {unknown}; known: {sorted(known)}")
        return cls(**d)


def param_count(config: GPTConfig, non_embedding: bool = False) -> int:
    """Closed-form number of parameters of ``GPT(config)``.

    With C = n_embd, L = n_layer, V = vocab_size, P = block_size, and b = 1 if
    ``config.bias`` else 0:

        token embedding (tied with lm_head, counted once)   V*C
        lm_head, only if not ``tie_head``                    V*C
        position embedding                                   P*C
        per block: ln_1, ln_2               2 * (C + b*C)
                   attention  c_attn        C*3C + b*3C
                              c_proj        C*C  + b*C
                   MLP        c_fc          C*4C + b*4C
                              c_proj        4C*C + b*C
                   = 12*C**2 + 2*C + b*11*C
        final LayerNorm                                      C + b*C

        total = V*C + P*C + L*(12*C**2 + (2 + 11*b)*C) + (1 + b)*C  (+ V*C untied)

    ``non_embedding`` drops the position embedding, as nanoGPT does: the token
    embedding stays because, tied, it is also the output layer's weight.

    Example: GPTConfig(vocab_size=512, n_layer=4, n_embd=128) (P=128, bias) ->
    65536 + 16384 + 4*(196608 + 1664) + 256 = 875264.
    """
    C, L, b = config.n_embd, config.n_layer, int(config.bias)
    per_block = 12 * C * C + (2 + 11 * b) * C
    total = config.vocab_size * C + config.block_size * C + L * per_block + (1 + b) * C
    total += 0 if config.tie_head else config.vocab_size * C
    if non_embedding:
        total -= config.block_size * C
    return total


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position of each token counted from its row's first real token.

    attention_mask (B, T), 1 = real, 0 = padding  ->  (B, T) long. Padding before the
    first real token gets 0 (it is never attended to, so its value does not matter).

    Example: [[0, 0, 1, 1, 1]] -> [[0, 0, 0, 1, 2]].
    """
    return (attention_mask.long().cumsum(dim=1) - 1).clamp(min=0)  # (B, T)


def attention_bool_mask(attention_mask: torch.Tensor, num_queries: int) -> torch.Tensor:
    """Boolean SDPA mask, True where a query may attend to a key.

    attention_mask (B, Tk) over all keys (cached ones first); the queries are the last
    ``num_queries`` (Tq) positions. A query attends to a key when the key is not in its
    future AND the key is real; every query also attends to itself, so a padding query
    never has a fully masked row (which would make softmax return NaN).

    Returns (B, 1, Tq, Tk), broadcast over heads.
    """
    Tk = attention_mask.size(1)  # keys, cached ones included
    device = attention_mask.device
    q_pos = torch.arange(Tk - num_queries, Tk, device=device)  # (Tq,) absolute index
    k_pos = torch.arange(Tk, device=device)  # (Tk,)
    causal = k_pos[None, :] <= q_pos[:, None]  # (Tq, Tk)
    itself = k_pos[None, :] == q_pos[:, None]  # (Tq, Tk)
    key_real = attention_mask.bool()[:, None, None, :]  # (B, 1, 1, Tk)
    return (causal & key_real) | itself  # (B, 1, Tq, Tk)


class Cache(Protocol):
    """What attention needs of a key/value cache (`minidpo.sampling.KVCache` is the one)."""

    @property
    def length(self) -> int: ...

    def update(
        self, layer: int, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]: ...


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention (Vaswani et al. 2017, Eq. 1) via SDPA."""

    def __init__(self, config: GPTConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.n_head = config.n_head
        self.n_embd = config.n_embd
        self.dropout = config.dropout
        # query, key, value projections for all heads, in one matrix
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(
        self,
        x: torch.Tensor,
        attn_mask: torch.Tensor | None = None,
        cache: Cache | None = None,
    ) -> torch.Tensor:
        """x (B, T, C); attn_mask bool (B, 1, T, T_past + T), or None: no padding, and the T
        new positions are either the first (T_past = 0) or a single one (T = 1)."""
        B, T, C = x.size()
        hs = C // self.n_head
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)  # each (B, T, C)
        q = q.view(B, T, self.n_head, hs).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, hs).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.n_head, hs).transpose(1, 2)  # (B, nh, T, hs)
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)  # (B, nh, T_past + T, hs)
        dropout_p = self.dropout if self.training else 0.0
        # softmax(q k^T / sqrt(hs)) v, Eq. 1 of Vaswani et al. 2017
        if attn_mask is None:  # no padding: causal over T > 1 new positions from the start,
            # or one new position that sees every cached key (SDPA's is_causal would align
            # its one query with the first key, not the last)
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=T > 1)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p)
        # y: (B, nh, T, hs)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C): heads side by side
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    """Position-wise feed-forward: Linear(C, 4C), GELU (exact, not tanh), Linear(4C, C)."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.gelu = nn.GELU()
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))  # (B, T, C)


class Block(nn.Module):
    """One transformer block, LayerNorm at the input of each sub-block (GPT-2, Sec. 2.3)."""

    def __init__(self, config: GPTConfig, layer_idx: int) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config, layer_idx)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(
        self,
        x: torch.Tensor,
        attn_mask: torch.Tensor | None = None,
        cache: Cache | None = None,
    ) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), attn_mask, cache)  # (B, T, C)
        x = x + self.mlp(self.ln_2(x))  # (B, T, C)
        return x


class GPT(nn.Module):
    """The language model: ids (B, T) -> next-token logits (B, T, V).

    ``generator`` seeds the initialization; without it the global torch RNG is used.
    """

    def __init__(self, config: GPTConfig, *, generator: torch.Generator | None = None) -> None:
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(config.vocab_size, config.n_embd),
                wpe=nn.Embedding(config.block_size, config.n_embd),
                drop=nn.Dropout(config.dropout),
                h=nn.ModuleList([Block(config, i) for i in range(config.n_layer)]),
                ln_f=nn.LayerNorm(config.n_embd, bias=config.bias),
            )
        )
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        # Weight tying (Press & Wolf 2017, as in GPT-2): one (V, C) matrix both embeds
        # ids and scores the next token.
        self.transformer.wte.weight = self.lm_head.weight

        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=0.02, generator=generator)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
        # Scale the residual projections by 1/sqrt(N), N = 2 * n_layer residual layers,
        # per GPT-2 paper (Sec. 2.3): the residual stream's variance then stays put with depth.
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                std = 0.02 / math.sqrt(2 * config.n_layer)
                nn.init.normal_(p, mean=0.0, std=std, generator=generator)
        if not config.tie_head:  # untie after init: same draws, so the same start either way
            self.transformer.wte.weight = nn.Parameter(self.lm_head.weight.detach().clone())

    @property
    def device(self) -> torch.device:
        return self.lm_head.weight.device

    def num_params(self, non_embedding: bool = False) -> int:
        """Parameters of this model (tied weights once); equals `param_count(config)`.

        ``non_embedding`` subtracts the position embedding only (see `param_count`).
        """
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.transformer.wpe.weight.numel()
        return n

    def hidden_states(
        self,
        idx: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        cache: Cache | None = None,
    ) -> torch.Tensor:
        """Final hidden states (B, T, C), after ln_f, of the T new positions in ``idx`` (B, T).

        With a cache (`minidpo.sampling.generate`), ``attention_mask`` covers the cached
        positions and the new ones, (B, T_past + T); without a mask all positions are taken
        as real, and no mask is built where none is needed (the first positions, or one
        new position).
        """
        B, T = idx.shape
        T_total = T + (cache.length if cache is not None else 0)
        if T_total > self.config.block_size:
            raise MinidpoError(
                f"sequence of {T_total} tokens is longer than the model's "
                f"block_size={self.config.block_size} (GPTConfig.block_size)"
            )
        past = T_total - T
        if attention_mask is None and (past == 0 or T == 1):
            pos = torch.arange(past, T_total, device=idx.device)  # (T,)
            attn_mask = None  # no padding: SDPA's unmasked kernels (see CausalSelfAttention)
        else:
            if attention_mask is None:
                attention_mask = torch.ones(B, T_total, dtype=torch.long, device=idx.device)
            if tuple(attention_mask.shape) != (B, T_total):
                raise ValueError(
                    f"attention_mask has shape {tuple(attention_mask.shape)}, "
                    f"expected {(B, T_total)}"
                )
            pos = position_ids(attention_mask)[:, -T:]  # (B, T)
            attn_mask = attention_bool_mask(attention_mask, T)  # (B, 1, T, T_total)
        tok_emb = self.transformer.wte(idx)  # (B, T, C)
        pos_emb = self.transformer.wpe(pos)  # (T, C) or (B, T, C)
        x = self.transformer.drop(tok_emb + pos_emb)  # (B, T, C)
        for block in self.transformer.h:
            x = block(x, attn_mask, cache)  # (B, T, C)
        return self.transformer.ln_f(x)  # (B, T, C)

    def forward(
        self, idx: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """idx (B, T) long -> logits (B, T, V); logits[:, t] scores token t + 1.

        attention_mask (B, T): 1 real, 0 padding. Needed for left padding only; see the
        module docstring.
        """
        return self.lm_head(self.hidden_states(idx, attention_mask))  # (B, T, V)


class ScalarHeadModel(nn.Module):
    """A GPT body with a scalar head: ids (B, T) -> one scalar per position (B, T).

    Used as the reward model (its value at the last real token is r(x, y)) and the PPO
    value model. ``ScalarHeadModel(gpt)`` SHARES ``gpt``'s modules; pass
    ``copy.deepcopy(gpt)`` for an independent one. The body's lm_head is unused (it is
    the tied token embedding, so it adds no parameters).

    The head is ``Linear(n_embd, 1)`` with a normal init, std 1/sqrt(n_embd + 1), and a
    zero bias. Its input is the output of ln_f, whose n_embd features have unit variance
    at init, so the first outputs are NOT near zero: their std is about
    sqrt(n_embd / (n_embd + 1)), i.e. close to 1 (measured on random token batches: 0.7
    to 1.1 per model, mean 0.93, for n_embd 32 to 128). They start on the scale of a unit
    reward, not at zero; gradients reach the body from the first step (an all-zero head
    would give the body no gradient at step one).
    """

    def __init__(self, body: GPT, *, generator: torch.Generator | None = None) -> None:
        super().__init__()
        self.body = body
        n_embd = body.config.n_embd
        self.head = nn.Linear(n_embd, 1)
        std = 1 / math.sqrt(n_embd + 1)
        nn.init.normal_(self.head.weight, mean=0.0, std=std, generator=generator)
        nn.init.zeros_(self.head.bias)
        self.head.to(body.device)  # initialized on CPU, where ``generator`` lives

    @property
    def config(self) -> GPTConfig:
        return self.body.config

    @property
    def has_unused_parameters(self) -> bool:
        """Whether the forward leaves parameters out: an untied body's lm_head (DDP asks)."""
        return not self.body.config.tie_head

    def forward(
        self, idx: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """idx (B, T) long -> scalars (B, T); padding positions are meaningless."""
        h = self.body.hidden_states(idx, attention_mask)  # (B, T, C)
        return self.head(h).squeeze(-1)  # (B, T)
