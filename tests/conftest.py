"""Shared fixtures: a tiny SFT run (seconds) that the stage tests build on."""

from pathlib import Path

import pytest

from minidpo.config import ModelConfig, RunConfig, SFTConfig, TokenizerConfig, resolve
from minidpo.sft import run_sft


@pytest.fixture(scope="session")
def tiny_sft(tmp_path_factory) -> Path:
    """Path of a finished tiny-preset SFT checkpoint (trained once per test session)."""
    root = tmp_path_factory.mktemp("runs")
    run = RunConfig(name="tiny", runs_dir=str(root), preset="tiny", device="cpu")
    run_sft(
        run,
        resolve(TokenizerConfig, "tokenizer", "tiny", None),
        resolve(ModelConfig, "model", "tiny", None),
        resolve(SFTConfig, "sft", "tiny", None),
        progress=False,
    )
    return root / "tiny" / "sft" / "checkpoint.pt"
