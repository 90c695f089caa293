"""Reward shaping: the brevity term, r_shaped from the oracle's breakdown, and DPO's only way
to take it (relabelled pairs), each against a hand-computed answer."""

import math

import numpy as np
import pytest

from minidpo.errors import MinidpoError
from minidpo.preferences import PreferencePair
from minidpo.sampling import Sample
from minidpo.shaping import (
    ShapingConfig,
    relabel_pairs,
    shaped_of_text,
    shaped_score_fn,
    shaping_term,
)
from minidpo.world import load_world

W = load_world()
PROMPT = W.prompts("train")[0]
TOPIC = W.topics[PROMPT.topic]


def text(*sentences: str) -> str:
    return " ".join(sentences)


@pytest.mark.parametrize("n, want", [(0, 0.0), (1, 0.0), (2, 0.0), (3, -0.5), (5, -1.5)])
def test_shaping_term_is_a_penalty_per_sentence_beyond_the_free_ones(n, want):
    assert shaping_term(n, ShapingConfig(weight=0.5, free_sentences=2)) == want


def test_shaped_reward_is_the_oracle_plus_the_term():
    cfg = ShapingConfig(weight=0.5, free_sentences=2)
    three = text(*TOPIC.facts[:3])  # r* = 3 facts = +3, 3 sentences: -0.5
    assert shaped_of_text(PROMPT.text, three, True, cfg) == pytest.approx(2.5)
    two = text(*TOPIC.facts[:2])
    assert shaped_of_text(PROMPT.text, two, True, cfg) == pytest.approx(2.0)
    # unterminated: r* charges -1 itself, the term adds nothing for two sentences
    assert shaped_of_text(PROMPT.text, two, False, cfg) == pytest.approx(1.0)
    scores = shaped_score_fn(cfg)([Sample(PROMPT.text, three, [], True),
                                   Sample(PROMPT.text, two, [], True)])  # fmt: skip
    assert scores.tolist() == pytest.approx([2.5, 2.0])


def test_relabel_flips_a_pair_the_term_reverses_and_drops_ties():
    cfg = ShapingConfig(weight=0.5, free_sentences=2)
    long = text(*TOPIC.facts[:2], *TOPIC.vague[:2])  # r* 2.5, 4 sentences: shaped 1.5
    short = text(*TOPIC.facts[:2])  # r* 2.0, shaped 2.0
    three = text(*TOPIC.facts[:3])  # shaped 2.5
    long5 = text(TOPIC.facts[0], TOPIC.facts[1], TOPIC.vague[0], TOPIC.vague[1], TOPIC.facts[2])
    # long5: r* 3 + 0.5 = 3.5, 5 sentences: shaped 3.5 - 1.5 = 2.0, a tie with short
    pairs = [PreferencePair(PROMPT.text, long, short, 2.5, 2.0),
             PreferencePair(PROMPT.text, three, short, 3.0, 2.0),
             PreferencePair(PROMPT.text, long5, short, 3.5, 2.0)]  # fmt: skip
    out = relabel_pairs(pairs, cfg, tau=0.0, rng=np.random.default_rng(0))
    assert len(out) == 2  # long5 and short tie on r_shaped: dropped
    assert (out[0].chosen, out[0].rejected) == (short, long)
    assert (out[0].score_chosen, out[0].score_rejected) == pytest.approx((2.0, 1.5))
    assert (out[1].chosen, out[1].rejected) == (three, short)


def test_relabel_with_noise_follows_bradley_terry():
    cfg = ShapingConfig(weight=0.5, free_sentences=2)
    long = text(*TOPIC.facts[:2], *TOPIC.vague[:2])  # shaped 1.5
    short = text(*TOPIC.facts[:2])  # shaped 2.0
    pairs = [PreferencePair(PROMPT.text, long, short, 2.5, 2.0)] * 4000
    out = relabel_pairs(pairs, cfg, tau=1.0, rng=np.random.default_rng(1))
    share = np.mean([p.chosen == short for p in out])
    want = 1 / (1 + math.exp(-0.5))  # sigmoid(2.0 - 1.5)
    assert share == pytest.approx(want, abs=4 * math.sqrt(want * (1 - want) / 4000))


@pytest.mark.parametrize("cfg, flag", [(ShapingConfig(weight=float("nan")), "--weight"),
                                       (ShapingConfig(weight=float("inf")), "--weight"),
                                       (ShapingConfig(weight=-1.0), "--weight"),
                                       (ShapingConfig(free_sentences=-1), "--free-sentences")])  # fmt: skip
def test_bad_shaping_settings_name_the_flag(cfg, flag):
    with pytest.raises(MinidpoError, match=flag):
        cfg.validate()
