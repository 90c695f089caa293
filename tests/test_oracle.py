"""Tests for minidpo.oracle: each rule by a hand-computed score, and properties by hypothesis."""

from __future__ import annotations

import re

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from numpy.testing import assert_allclose

from minidpo import oracle
from minidpo.errors import MinidpoError
from minidpo.oracle import (
    MAX_SENTENCES,
    REWARD_MAX,
    REWARD_MIN,
    REWARD_TABLE,
    RULE_VALUES,
    oracle_reward,
    reward_breakdown,
    reward_table_markdown,
)
from minidpo.world import load_world, split_sentences

WORLD = load_world()
P = "Explain gravity."
G = WORLD.topics["gravity"]
F = WORLD.topics["friction"]
FACT, VAGUE, WRONG = G.facts[0], G.vague[0], G.wrong[0]
ATOL = 1e-12  # every value is a multiple of 0.25, so sums are exact in float64
PROPERTY = settings(
    max_examples=150, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow]
)


def r(response: str, **kw) -> float:
    return oracle_reward(P, response, world=WORLD, **kw)


def close(actual: float, expected: float) -> None:
    assert_allclose(actual, expected, rtol=0, atol=ATOL)


# ---------------------------------------------------------------- each rule, hand-computed

RULE_CASES = {
    # name: (response, terminated, expected score, hand computation)
    "one fact": (FACT, True, 1.0, "+1"),
    "three distinct facts": (" ".join(G.facts[:3]), True, 3.0, "+1 +1 +1"),
    "one vague": (VAGUE, True, 0.25, "+0.25"),
    "vague capped at two": (" ".join(G.vague[:4]), True, 0.5, "+0.25 +0.25 +0 +0"),
    "wrong claim": (WRONG, True, -1.0, "-1"),
    "fact and wrong claim": (f"{FACT} {WRONG}", True, 0.0, "+1 -1"),
    "wrong claim of another topic": (F.wrong[0], True, -1.0, "-1 (wrong beats off-topic)"),
    "off-topic fact": (F.facts[0], True, -0.5, "-0.5"),
    "off-topic vague": (F.vague[0], True, -0.5, "-0.5"),
    "fact and off-topic fact": (f"{FACT} {F.facts[0]}", True, 0.5, "+1 -0.5"),
    "repeated fact": (f"{FACT} {FACT}", True, 0.5, "+1 -0.5"),
    "fact three times": (f"{FACT} {FACT} {FACT}", True, 0.0, "+1 -0.5 -0.5"),
    "repeated gibberish": ("Blue cheese. Blue cheese.", True, -1.5, "-1 -0.5"),
    "unparseable sentence": ("Gravity is a kind of cheese.", True, -1.0, "-1"),
    "question mark sentence": ("What is gravity?", True, -1.0, "-1 (not a world sentence)"),
    "trailing fragment": (f"{FACT} Gravity is the", True, 0.0, "+1 -1"),
    "fact without final period": (FACT[:-1], True, -1.0, "-1 (a fragment)"),
    "empty response": ("", True, -1.0, "-1 (counts as one unparseable)"),
    "whitespace-only response": (" \n\t ", True, -1.0, "-1"),
    "unterminated fact": (FACT, False, 0.0, "+1 -1"),
    "unterminated fragment": ("Gravity is the", False, -2.0, "-1 -1"),
    "six sentences": (" ".join(G.facts[:5]) + " " + VAGUE, True, 4.5, "+5 -0.5"),
    "over-length wrong claim": (" ".join(G.facts[:5]) + " " + WRONG, True, 4.5, "+5 -0.5"),
    "lower clip": (" ".join(G.wrong) + " " + " ".join(F.wrong), False, -5.0, "-7 -1 -> -5"),
    "all five facts": (" ".join(G.facts[:5]), True, 5.0, "+5 (the maximum)"),
}


@pytest.mark.parametrize("case", list(RULE_CASES))
def test_rule_hand_computed(case):
    response, terminated, expected, _ = RULE_CASES[case]
    close(r(response, terminated=terminated), expected)


def test_breakdown_counts_and_labels():
    response = f"{FACT} {VAGUE} {FACT} {F.facts[0]} {WRONG} Gravity is cheese. trailing"
    b = reward_breakdown(P, response, terminated=False, world=WORLD)
    assert (b.fact, b.vague, b.repeated, b.off_topic, b.wrong, b.unparseable) == (1, 1, 1, 1, 1, 0)
    assert (b.over_length, b.unterminated, b.vague_extra) == (2, 1, 0)
    assert [label for _, label in b.labels] == [
        "fact", "vague", "repeated", "off_topic", "wrong", "over_length", "over_length"
    ]  # fmt: skip
    close(b.raw, 1 + 0.25 - 0.5 - 0.5 - 1 - 0.5 - 0.5 - 1)
    close(b.total, b.raw)


def test_seed_pair_is_ordered():
    chosen = "Gravity is the force that attracts objects with mass toward each other."
    rejected = "Gravity is when things fall down."
    close(r(chosen), 1.0)
    close(r(rejected), 0.25)
    assert r(chosen) > r(rejected)


def test_prompt_may_carry_formatting_but_must_be_known():
    close(oracle_reward("Explain gravity.\n", FACT, world=WORLD), 1.0)
    close(oracle_reward("What is friction?", F.facts[1], world=WORLD), 1.0)
    close(oracle_reward("What is friction?", FACT, world=WORLD), -0.5)
    with pytest.raises(MinidpoError, match="not in the world"):
        oracle_reward("Explain cheese.", FACT, world=WORLD)


def test_default_world_is_used_when_none_given():
    close(oracle_reward(P, FACT), r(FACT))


# ---------------------------------------------------------------- the table is one table


def test_table_constant_docstring_and_markdown_agree():
    assert len(RULE_VALUES) == len(REWARD_TABLE)
    markdown = reward_table_markdown()
    for rule in REWARD_TABLE:
        row = re.search(rf"^\| {rule.name} +\| *([-+]?[0-9.]+) *\|", oracle.__doc__, re.MULTILINE)
        assert row, f"rule {rule.name} missing from the module docstring"
        close(float(row.group(1)), rule.value)
        assert f"| {rule.name} | {rule.value:+.2f} |" in markdown


def test_raw_is_the_sum_of_counts_times_values():
    response = " ".join([*G.facts[:2], *G.vague, F.facts[0], "Nonsense here."])
    b = reward_breakdown(P, response, world=WORLD)
    close(b.raw, sum(getattr(b, name) * value for name, value in RULE_VALUES.items()))


# ---------------------------------------------------------------- properties

WORDS = sorted({w.strip(".,'") for s in WORLD.sentences() for w in s.split()} - {""})
MIN_FACT_SCORE = min(
    oracle_reward(q.text, fact, world=WORLD)
    for split in ("train", "eval")
    for q in WORLD.prompts(split)
    for fact in WORLD.topics[q.topic].facts
)
gibberish_sentence = st.lists(st.sampled_from(WORDS), min_size=1, max_size=14).map(
    lambda ws: " ".join(ws).capitalize() + "."
)
any_sentence = st.one_of(
    st.sampled_from(WORLD.sentences()), gibberish_sentence, st.text(max_size=30)
)
whitespace = st.text(alphabet=" \t\n\r", min_size=1, max_size=4)


def test_every_single_fact_scores_one():
    close(MIN_FACT_SCORE, 1.0)


@PROPERTY
@given(text=st.text(max_size=400), terminated=st.booleans())
def test_bounded_for_arbitrary_text(text, terminated):
    score = r(text, terminated=terminated)
    assert REWARD_MIN <= score <= REWARD_MAX


@PROPERTY
@given(sentences=st.lists(any_sentence, max_size=8), terminated=st.booleans())
def test_bounded_for_world_like_text(sentences, terminated):
    score = r(" ".join(sentences), terminated=terminated)
    assert REWARD_MIN <= score <= REWARD_MAX


@PROPERTY
@given(text=st.text(max_size=200))
def test_unparseable_text_scores_strictly_below_any_fact(text):
    assume(all(WORLD.classify(s) is None for s in split_sentences(text)))
    assert r(text) <= -1.0 < MIN_FACT_SCORE


@PROPERTY
@given(sentences=st.lists(gibberish_sentence, min_size=1, max_size=8), terminated=st.booleans())
def test_gibberish_from_world_words_never_beats_a_fact(sentences, terminated):
    assume(all(WORLD.classify(s) is None for s in sentences))
    assert r(" ".join(sentences), terminated=terminated) < MIN_FACT_SCORE


@PROPERTY
@given(
    sentences=st.lists(
        st.one_of(st.sampled_from(WORLD.sentences()), gibberish_sentence), max_size=7
    ),
    gaps=st.lists(whitespace, min_size=1, max_size=20),
    lead=st.text(alphabet=" \t\n", max_size=3),
    trail=st.text(alphabet=" \t\n", max_size=3),
)
def test_invariant_to_whitespace(sentences, gaps, lead, trail):
    canonical = " ".join(sentences)
    k = 0
    pieces = []
    for ch in canonical:  # replace every space (between and within sentences) by a run
        if ch == " ":
            pieces.append(gaps[k % len(gaps)])
            k += 1
        else:
            pieces.append(ch)
    messy = lead + "".join(pieces) + trail
    close(r(messy), r(canonical))
    assert reward_breakdown(P, messy, world=WORLD) == reward_breakdown(P, canonical, world=WORLD)


@PROPERTY
@given(fact=st.sampled_from(G.facts), n=st.integers(min_value=1, max_value=12))
def test_repeating_a_fact_cannot_farm_reward(fact, n):
    assert r(" ".join([fact] * n)) <= 1.0


@PROPERTY
@given(sentences=st.lists(any_sentence, max_size=12))
def test_no_response_beats_distinct_facts_count(sentences):
    b = reward_breakdown(P, " ".join(sentences), world=WORLD)
    assert b.total <= b.fact + 0.25 * min(b.vague, 2) + 1e-12
    assert b.fact + b.vague + b.vague_extra + b.wrong + b.off_topic <= MAX_SENTENCES
