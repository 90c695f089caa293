"""The tokenizer stage: the world's BPE tokenizer, trained, checked and written to the run.

`minidpo.tokenizer` is a general byte-level BPE; this module is what the toy world
asks of it. The tokenizer is trained on `world.corpus()` (every sentence the world
can say, each after a space as it appears inside a response), then checked: a
vocabulary too small splits a word into more than `MAX_TOKENS_PER_WORD` tokens or
leaves a lone " " token before one, and the GPT then spells instead of speaking.
The stage writes runs/<name>/tokenizer.json, which the SFT stage reads.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from minidpo.config import RunConfig, TokenizerConfig
from minidpo.errors import MinidpoError
from minidpo.paths import RunPaths
from minidpo.stage import Context, Stage
from minidpo.tokenizer import Tokenizer, coverage_problem, train_bpe
from minidpo.world import World, load_world

# Every word of the world in at most this many tokens (the cpu preset's 1856 tokens is the
# smallest multiple of 32 that achieves it on data/explain; 1885 makes every word one token).
MAX_TOKENS_PER_WORD = 2


def world_tokenizer(cfg: TokenizerConfig, world: World) -> Tokenizer:
    """The BPE tokenizer trained on `world.corpus()` with `cfg.vocab_size` tokens, checked.

    MinidpoError naming ``--vocab-size`` (before anything is written) when the size is
    more than the corpus can fill, or too small for the world: a word that needs more
    than `MAX_TOKENS_PER_WORD` tokens, or a lone " " token before a word.
    """
    corpus = world.corpus()
    tok = train_bpe(corpus, cfg.vocab_size)
    if tok.vocab_size != cfg.vocab_size:
        raise MinidpoError(
            f"--vocab-size {cfg.vocab_size}: the world's corpus supports at most "
            f"{tok.vocab_size} tokens (every word is then one token)"
        )
    problem = coverage_problem(tok, corpus, MAX_TOKENS_PER_WORD)
    if problem is not None:
        raise MinidpoError(f"--vocab-size {cfg.vocab_size}: too small for the world: {problem}")
    return tok


def prepare_tokenizer(run: RunConfig, cfg: TokenizerConfig, world: World) -> Tokenizer:
    """The run's tokenizer: trained (a fraction of a second) and checked by `world_tokenizer`,
    then written to runs/<name>/tokenizer.json. A file already there is kept if it holds
    the same tokenizer and refused otherwise (unreadable, another version, other merges),
    left as found, unless `run.force`."""
    tok = world_tokenizer(cfg, world)
    path = RunPaths.of(run).tokenizer
    if path.exists() and not run.force:
        if Tokenizer.load(path).merges != tok.merges:
            raise MinidpoError(
                f"{path}: holds another tokenizer; use --force to retrain or --name for a new run"
            )
        return tok
    tok.save(path)
    return tok


def _tokenizer(ctx: Context, resume: bool) -> dict[str, Any]:
    run = dataclasses.replace(ctx.run, force=True)  # the stage layer decided to (re)build it
    tok = prepare_tokenizer(run, ctx.cfg["tokenizer"], load_world())
    return {"vocab_size": tok.vocab_size}


def _check(ctx: Context) -> None:
    world_tokenizer(ctx.cfg["tokenizer"], load_world())  # a bad --vocab-size, before any stage


TOKENIZER_STAGE = Stage("tokenizer", _tokenizer, ("tokenizer",), (), inputs=lambda c: [],
                        outputs=lambda c: [c.paths.tokenizer], check=_check)  # fmt: skip
