"""A policy = a GPT + the tokenizer it was trained with, rebuilt from a checkpoint.

Sampling text from it is `minidpo.sampling`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from minidpo.checkpoints import load_checkpoint, malformed_as_error
from minidpo.model import GPT, GPTConfig
from minidpo.tokenizer import Tokenizer


def build_policy(ckpt: dict[str, Any], where: str | Path = "checkpoint") -> tuple[GPT, Tokenizer]:
    """The GPT and tokenizer stored in a policy checkpoint (weights loaded, eval mode, CPU);
    a malformed one is one MinidpoError naming `where`."""
    with malformed_as_error(where):
        model = GPT(GPTConfig(**ckpt["model_config"]))
        model.load_state_dict(ckpt["model"])
        tok = Tokenizer.from_dict(ckpt["tokenizer"])
    return model.eval(), tok


def load_policy(path: str | Path, device: torch.device | str = "cpu") -> tuple[GPT, Tokenizer]:
    """Load a policy checkpoint (SFT or aligned); a reward model is refused by name."""
    ckpt = load_checkpoint(path, kind="policy")
    model, tok = build_policy(ckpt, path)
    return model.to(device), tok
