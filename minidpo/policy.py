"""A policy = a GPT + the tokenizer it was trained with: loading it, and sampling text from it.

Every stage that samples (the `sample` command, preference pairs, evaluation,
PPO rollouts) goes through `sample_responses`, which formats prompts the one way
the model was trained on (`world.format_prompt`), samples a whole batch at once,
and decodes. Row i of a call with seed s is sampled with its own generator
seeded by (s, i), so a sample does not depend on the batch it was drawn in.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from minidpo.errors import MinidpoError
from minidpo.model import GPT, GPTConfig
from minidpo.tokenizer import Tokenizer
from minidpo.training import load_checkpoint
from minidpo.world import format_prompt


@dataclass
class Sample:
    """One sampled response."""

    prompt: str
    response: str  # decoded text, without the end-of-text token
    response_ids: list[int]  # token ids, ending with eot when terminated
    terminated: bool  # True when the model emitted <|endoftext|>


def build_policy(ckpt: dict[str, Any]) -> tuple[GPT, Tokenizer]:
    """The GPT and tokenizer stored in a policy checkpoint (weights loaded, eval mode, CPU)."""
    model = GPT(GPTConfig(**ckpt["model_config"]))
    model.load_state_dict(ckpt["model"])
    model.eval()
    return model, Tokenizer.from_dict(ckpt["tokenizer"])


def load_policy(path: str | Path, device: torch.device | str = "cpu") -> tuple[GPT, Tokenizer]:
    """Load a policy checkpoint (SFT or aligned); a reward model is refused by name."""
    ckpt = load_checkpoint(path, kind="policy")
    model, tok = build_policy(ckpt)
    return model.to(device), tok


def encode_prompt(tok: Tokenizer, prompt: str, block_size: int, max_new_tokens: int) -> list[int]:
    """Token ids of a formatted prompt, checked to leave room for the response."""
    ids = tok.encode(format_prompt(prompt))
    if len(ids) + max_new_tokens > block_size:
        raise MinidpoError(
            f"prompt {prompt!r} is {len(ids)} tokens; with {max_new_tokens} new tokens it "
            f"exceeds the model's context of {block_size}"
        )
    return ids


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
        ids = model.generate(
            encoded[chunk],
            max_new_tokens=max_new_tokens,
            eot_id=tok.eot_id,
            seeds=[int(s) for s in seeds[chunk]],
            temperature=temperature,
            top_k=top_k or None,
        )
        for prompt, resp in zip(prompts[chunk], ids, strict=True):
            terminated = len(resp) > 0 and resp[-1] == tok.eot_id
            text_ids = resp[:-1] if terminated else resp
            out.append(Sample(prompt, tok.decode(text_ids), list(resp), terminated))
    return out
