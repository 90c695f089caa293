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


def _save_model_checkpoint(path: Path, model, tok, **entries) -> Path:
    """A checkpoint of `model` (a GPT: kind "policy"; a ScalarHeadModel: "reward_model",
    with `entries` such as normalization and pooling) as a stage would write it."""
    from minidpo.checkpoints import save_checkpoint, stage_state
    from minidpo.model import ScalarHeadModel

    kind = "reward_model" if isinstance(model, ScalarHeadModel) else "policy"
    state = stage_state(kind=kind, stage="test", model_config=model.config.to_dict(),
                        tokenizer=tok.to_dict(), config={})  # fmt: skip
    return save_checkpoint(path, {**state, **entries, "model": model.state_dict(), "step": 0})


@pytest.fixture(scope="session")
def tiny_reward_model(tiny_sft, tmp_path_factory) -> Path:
    """A reward-model checkpoint on the tiny SFT body: a random head, normalised."""
    import torch

    from minidpo.model import ScalarHeadModel
    from minidpo.policy import load_policy

    body, tok = load_policy(tiny_sft)
    rm = ScalarHeadModel(body, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        rm.head.bias.fill_(0.3)
    path = tmp_path_factory.mktemp("rm") / "checkpoint.pt"
    return _save_model_checkpoint(path, rm, tok, normalization={"gain": 1.7, "bias": -0.4},
                                 pooling="last")  # fmt: skip


@pytest.fixture(scope="session")
def save_model_checkpoint():
    """`_save_model_checkpoint`: a checkpoint of a hand-built model, as a stage writes it."""
    return _save_model_checkpoint


def _fact_pairs(split: str, n: int):
    """Pairs for the first `n` prompts of `split`: a fact of the topic (chosen) against a
    wrong claim (rejected); every response terminated."""
    from minidpo.preferences import PreferencePair
    from minidpo.world import load_world

    world = load_world()
    out = []
    for i, p in enumerate(world.prompts(split)[:n]):
        t = world.topics[p.topic]
        out.append(PreferencePair(p.text, t.facts[i % len(t.facts)], t.wrong[i % len(t.wrong)]))
    return out


@pytest.fixture(scope="session")
def fact_pairs():
    """`_fact_pairs(split, n)`: world pairs whose labels are never in doubt."""
    return _fact_pairs
