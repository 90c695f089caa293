"""Sampling text from a GPT: batched generation with a key/value cache, one generator per row.

- `generate(model, prompts, ...)`: prompts of different lengths left-padded into one
  batch, a `KVCache` so each new token costs one position instead of T, and row i
  sampled by inverse CDF from uniforms drawn up front from its own seed, so a row's
  sample never depends on its batch (`sample_next_token`).
- `sample_responses`: what every stage that samples goes through (the `sample`
  command, preference pairs, evaluation, PPO rollouts, Best-of-N). It formats prompts
  the one way the model was trained on (`world.format_prompt`), samples a whole batch
  at once, and decodes. Row i of a call with seed s gets its own generator seeded by
  (s, i).

Per step, generation does no more than it must: the cache is preallocated
(`KVCache`), the attention mask grows in a preallocated buffer, and a batch with no
padding (every prompt the same length) passes no mask at all, so SDPA runs its
unmasked kernels.

Left out: top-p and beam search.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from minidpo import threads
from minidpo.errors import MinidpoError
from minidpo.model import GPT, GPTConfig
from minidpo.policy import load_policy
from minidpo.tokenizer import Tokenizer
from minidpo.world import format_prompt, load_world


@dataclass
class Sample:
    """One sampled response."""

    prompt: str
    response: str  # decoded text, without the end-of-text token
    response_ids: list[int]  # token ids, ending with eot when terminated
    terminated: bool  # True when the model emitted <|endoftext|>


class KVCache:
    """Keys and values of the positions already processed, in buffers allocated once.

    Each layer's buffer is (B, nh, capacity, hs), made at its first ``update``; an
    ``update`` writes the new positions' keys/values (B, nh, T_new, hs) at the end of
    what is cached and returns views of the filled part, (B, nh, T_past + T_new, hs), for
    attention. Nothing is copied again: growing by concatenation would copy the whole
    cache at every step, O(T^2) bytes over a generation.
    """

    def __init__(self, n_layer: int, capacity: int) -> None:
        self.capacity = capacity
        self.keys: list[torch.Tensor | None] = [None] * n_layer
        self.values: list[torch.Tensor | None] = [None] * n_layer
        self.lengths = [0] * n_layer

    @property
    def length(self) -> int:
        """Number of positions cached so far (read before a step updates layer 0)."""
        return self.lengths[0]

    def update(
        self, layer: int, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        start, end = self.lengths[layer], self.lengths[layer] + k.size(2)
        if end > self.capacity:
            raise MinidpoError(f"KVCache: {end} positions, capacity {self.capacity}")
        if self.keys[layer] is None:
            B, nh, _, hs = k.shape
            self.keys[layer] = k.new_empty(B, nh, self.capacity, hs)
            self.values[layer] = v.new_empty(B, nh, self.capacity, hs)
        keys, values = self.keys[layer], self.values[layer]
        keys[:, :, start:end] = k
        values[:, :, start:end] = v
        self.lengths[layer] = end
        return keys[:, :, :end], values[:, :, :end]  # (B, nh, T_past + T_new, hs)


def check_generate_args(
    config: GPTConfig,
    prompts: list[list[int]],
    max_new_tokens: int,
    eot_id: int,
    seeds: Sequence[int],
    temperature: float,
    top_k: int | None,
) -> None:
    """`generate`'s arguments, each checked: one MinidpoError naming the first bad one."""  # fmt: skip
    if len(seeds) != len(prompts):
        raise MinidpoError(f"generate: {len(prompts)} prompts but {len(seeds)} seeds")
    if max_new_tokens < 1:
        raise MinidpoError(f"generate: max_new_tokens must be >= 1, got {max_new_tokens}")
    if temperature < 0:
        raise MinidpoError(f"generate: temperature must be >= 0, got {temperature}")
    if top_k is not None and top_k < 1:
        raise MinidpoError(f"generate: top_k must be >= 1 or None, got {top_k}")
    V, block_size = config.vocab_size, config.block_size
    if not 0 <= eot_id < V:
        raise MinidpoError(f"generate: eot_id {eot_id} is outside the vocabulary [0, {V})")
    for i, p in enumerate(prompts):
        if len(p) == 0:
            raise MinidpoError(f"generate: prompt {i} is empty")
        if len(p) + max_new_tokens > block_size:
            raise MinidpoError(
                f"generate: prompt {i} has {len(p)} tokens + max_new_tokens "
                f"{max_new_tokens} > block_size {block_size}"
            )
        if min(p) < 0 or max(p) >= V:
            raise MinidpoError(f"generate: prompt {i} has a token id outside [0, {V})")


@dataclass
class TokenCounter:
    """Response tokens `generate` has produced in this process: what a training loop reads
    around its step to measure whether a method samples while it trains."""

    tokens: int = 0


GENERATED = TokenCounter()


@torch.inference_mode()  # no_grad, and no version counters or view tracking (README)
def generate(
    model: GPT,
    prompts: list[list[int]],
    *,
    max_new_tokens: int,
    eot_id: int,
    seeds: Sequence[int],
    temperature: float = 1.0,
    top_k: int | None = None,
    use_cache: bool = True,
) -> list[list[int]]:
    """Sample a response for each prompt; returns the response ids per row.

    Prompts of different lengths are left-padded into one batch. A row stops at
    ``eot_id`` (included in its output) or after ``max_new_tokens``; finished rows
    are ignored from then on and the loop ends when every row is done.

    Row i draws its ``max_new_tokens`` uniforms up front from a CPU generator
    seeded with ``seeds[i]`` and samples by inverse CDF (`sample_next_token`), so
    its output depends only on (prompt, seed), never on the rest of the batch.
    ``temperature == 0`` is greedy. The model is put in eval mode while sampling.
    """
    check_generate_args(model.config, prompts, max_new_tokens, eot_id, seeds, temperature, top_k)
    if not prompts:
        return []

    device = model.device
    B, T0 = len(prompts), max(len(p) for p in prompts)
    T_max = T0 + max_new_tokens
    idx = torch.full((B, T0), eot_id, dtype=torch.long)  # (B, T0), pad value is masked
    mask = torch.ones((B, T_max), dtype=torch.long)  # (B, T_max): prompt, then responses
    for i, p in enumerate(prompts):
        idx[i, T0 - len(p) :] = torch.tensor(p, dtype=torch.long)  # left padding
        mask[i, : T0 - len(p)] = 0
    padded = any(len(p) < T0 for p in prompts)  # else no mask at all: SDPA's unmasked path
    idx, mask = idx.to(device), mask.to(device)
    uniforms = torch.stack(  # (B, max_new_tokens), each row from its own seed
        [torch.rand(max_new_tokens, generator=torch.Generator().manual_seed(int(s))) for s in seeds]
    ).to(device)

    was_training = model.training
    model.eval()
    try:
        cache = KVCache(model.config.n_layer, T_max) if use_cache else None
        prompt_mask = mask[:, :T0] if padded else None
        logits = model.lm_head(model.hidden_states(idx, prompt_mask, cache)[:, -1])  # (B, V)
        responses: list[list[int]] = [[] for _ in range(B)]
        done = [False] * B
        for t in range(max_new_tokens):
            next_ids = sample_next_token(logits, uniforms[:, t], temperature, top_k)  # (B,)
            for i, tok in enumerate(next_ids.tolist()):
                if not done[i]:
                    responses[i].append(tok)
                    done[i] = tok == eot_id
            if all(done) or t == max_new_tokens - 1:
                break
            new = next_ids[:, None]  # (B, 1)
            seen = mask[:, : T0 + t + 1] if padded else None  # (B, T + 1), a view
            if cache is not None:
                h = model.hidden_states(new, seen, cache)  # (B, 1, C): one new position
            else:
                idx = torch.cat([idx, new], dim=1)  # (B, T + 1)
                h = model.hidden_states(idx, seen, None)  # (B, T + 1, C): recompute all
            logits = model.lm_head(h[:, -1])  # (B, V)
    finally:
        model.train(was_training)
    GENERATED.tokens += sum(len(r) for r in responses)
    return responses


def sample_next_token(
    logits: torch.Tensor,
    uniforms: torch.Tensor,
    temperature: float = 1.0,
    top_k: int | None = None,
) -> torch.Tensor:
    """Draw one token per row by inverse-CDF sampling with the given uniforms.

    logits (B, V), uniforms (B,) in [0, 1) -> ids (B,) long. Row i returns the first
    token whose cumulative probability exceeds ``uniforms[i]``. ``temperature == 0``
    returns the argmax; ``top_k`` keeps the k largest logits (ties may keep more).

    Example: probabilities [0.1, 0.2, 0.7] and u = 0.25 -> token 1 (0.1 <= 0.25 < 0.3).
    """
    if temperature == 0:
        return logits.argmax(dim=-1)  # (B,)
    logits = logits.float() / temperature  # (B, V)
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.size(-1)), dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))  # (B, V)
    # float64: a float32 cumsum over V terms carries about V ulps of rounding, enough for
    # two batches whose logits differ in the last bit to land u on different tokens.
    cdf = torch.softmax(logits.double(), dim=-1).cumsum(dim=-1)  # (B, V)
    # Scale u by the total so a cdf ending at 1 - eps cannot run off the end; right=True
    # skips zero-probability tokens (cdf[j] == cdf[j-1] can never bracket u).
    target = (uniforms.to(cdf) * cdf[:, -1])[:, None]  # (B, 1)
    ids = torch.searchsorted(cdf, target, right=True)  # (B, 1)
    return ids.squeeze(1).clamp(max=logits.size(-1) - 1)  # (B,)


def encode_prompt(tok: Tokenizer, prompt: str, block_size: int, max_new_tokens: int) -> list[int]:
    """Token ids of a formatted prompt, checked to leave room for the response."""
    ids = tok.encode(format_prompt(prompt))
    if len(ids) + max_new_tokens > block_size:
        raise MinidpoError(
            f"prompt {prompt!r} is {len(ids)} tokens; with {max_new_tokens} new tokens it "
            f"exceeds the model's context of {block_size}"
        )
    return ids


def check_context(
    tok: Tokenizer, prompts: Sequence[str], block_size: int, max_new_tokens: int, flag: str
) -> None:
    """Every prompt leaves room for `max_new_tokens` in the model's context, checked before
    anything is sampled or written: else one MinidpoError naming `flag` as the user typed
    it (``--max-new-tokens``, ``--ppo-max-new-tokens``) and the longest prompt."""
    longest = max(dict.fromkeys(prompts), key=lambda text: len(tok.encode(format_prompt(text))))
    try:
        encode_prompt(tok, longest, block_size, max_new_tokens)
    except MinidpoError as e:
        raise MinidpoError(f"{flag} {max_new_tokens}: {e}") from None


def check_policy_context(sft_path: Path, max_new_tokens: int, flag: str) -> None:
    """`check_context` for the policy at `sft_path` on every prompt of the world."""
    policy, tok = load_policy(sft_path)
    prompts = [p.text for split in ("train", "eval") for p in load_world().prompts(split)]
    check_context(tok, prompts, policy.config.block_size, max_new_tokens, flag)


def load_prompts(
    path: str | Path,
    tok: Tokenizer,
    block_size: int,
    max_new_tokens: int,
    check: Callable[[str], object] | None = None,
) -> list[str]:
    """Prompts from a UTF-8 text file, one per line (blank lines skipped).

    Each must fit the model's context with `max_new_tokens` to spare and pass `check`
    (which raises MinidpoError); the first that does not (or an unreadable file) is
    one MinidpoError naming file:line.
    """
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise MinidpoError(f"{path}: prompt file not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise MinidpoError(f"{path}: cannot read the prompt file ({type(e).__name__})") from None
    prompts = []
    for i, line in enumerate(lines, 1):
        text = line.strip()
        if not text:
            continue
        n = len(tok.encode(format_prompt(text)))
        if n + max_new_tokens > block_size:
            raise MinidpoError(
                f"{path}:{i}: prompt is {n} tokens; with {max_new_tokens} new tokens it "
                f"exceeds the model's context of {block_size}"
            )
        if check is not None:
            try:
                check(text)
            except MinidpoError as e:
                raise MinidpoError(f"{path}:{i}: {e}") from None
        prompts.append(text)
    if not prompts:
        raise MinidpoError(f"{path}: no prompts (one per line expected)")
    return prompts


@torch.no_grad()
def sample_responses(
    model: GPT,
    tok: Tokenizer,
    prompts: Sequence[str],
    *,
    seed: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    max_new_tokens: int = 64,
    batch_size: int = 256,
) -> list[Sample]:
    """One sample per entry of `prompts` (repeat a prompt to get several), batched."""
    block = model.config.block_size
    encoded = [encode_prompt(tok, p, block, max_new_tokens) for p in prompts]
    seeds = np.random.SeedSequence(seed).generate_state(len(prompts), dtype=np.uint32)
    out: list[Sample] = []
    model.eval()
    for start in range(0, len(prompts), batch_size):
        chunk = slice(start, start + batch_size)
        with threads.sampling():  # the idle cores under the policy (minidpo.threads)
            ids = generate(model, encoded[chunk], max_new_tokens=max_new_tokens,
                           eot_id=tok.eot_id, seeds=[int(s) for s in seeds[chunk]],
                           temperature=temperature, top_k=top_k or None)  # fmt: skip
        for prompt, resp in zip(prompts[chunk], ids, strict=True):
            terminated = len(resp) > 0 and resp[-1] == tok.eot_id
            text_ids = resp[:-1] if terminated else resp
            out.append(Sample(prompt, tok.decode(text_ids), list(resp), terminated))
    return out
