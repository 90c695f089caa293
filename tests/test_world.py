"""Tests for minidpo.world: the shipped data, the split rule, loading errors, demonstrations."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import regex

from minidpo.errors import MinidpoError
from minidpo.oracle import oracle_reward
from minidpo.world import (
    DEMONSTRATION_MIXTURE,
    KINDS,
    Demonstration,
    format_prompt,
    held_out_paraphrases,
    load_world,
    normalize_whitespace,
    sample_demonstrations,
    split_sentences,
)

SEED_PROMPT = "Explain gravity."
SEED_CHOSEN = "Gravity is the force that attracts objects with mass toward each other."
SEED_REJECTED = "Gravity is when things fall down."

# GPT-2's pre-tokenisation pattern (openai/gpt-2 encoder.py), used only to check format_prompt.
GPT2_SPLIT = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


@pytest.fixture(scope="module")
def world():
    return load_world()


# ---------------------------------------------------------------- the shipped world


def test_shipped_world_size_and_pools(world):
    assert len(world.topics) >= 16
    assert len(world.paraphrases) >= 6
    for topic in world.topics.values():
        assert 4 <= len(topic.facts) <= 6, topic.name
        assert 3 <= len(topic.vague) <= 4, topic.name
        assert 3 <= len(topic.wrong) <= 4, topic.name


def test_shipped_sentences_are_short_capitalised_and_unique(world):
    sentences = world.sentences()
    assert len(sentences) == len(set(sentences))
    for s in sentences:
        assert 5 <= len(s.split()) <= 14, s
        assert s[0].isupper() and s.endswith("."), s
        assert split_sentences(s) == [s], s


def test_seed_pair_is_in_the_world(world):
    assert world.topic_of(SEED_PROMPT) == "gravity"
    assert world.classify(SEED_CHOSEN) == ("gravity", "fact")
    assert world.classify(SEED_REJECTED) == ("gravity", "vague")
    assert world.split_of(SEED_PROMPT) == "train"


def test_classify_normalises_whitespace_and_knows_each_kind(world):
    topic = world.topics["friction"]
    assert world.classify("  " + topic.facts[0].replace(" ", " \t\n ") + "\n") == (
        "friction",
        "fact",
    )
    for kind, pool in zip(KINDS, (topic.facts, topic.vague, topic.wrong), strict=True):
        assert {world.classify(s) for s in pool} == {("friction", kind)}
    assert world.classify("Friction is a kind of cheese.") is None
    assert world.classify(topic.facts[0].lower()) is None  # case counts


def test_topic_of_accepts_formatted_prompt_and_rejects_unknown(world):
    assert world.topic_of(format_prompt("What is osmosis?")) == "osmosis"
    with pytest.raises(MinidpoError, match="not in the world"):
        world.topic_of("Explain cheese.")
    with pytest.raises(MinidpoError, match="unknown split"):
        world.prompts("test")


def test_corpus_holds_every_prompt_and_sentence_as_the_model_sees_them(world):
    """Formatted prompts, and each sentence as a response opens and as it follows another."""
    corpus = world.corpus()
    prompts = [q.text for split in ("train", "eval") for q in world.prompts(split)]
    sentences = world.sentences()
    assert set(corpus) == {format_prompt(p) for p in prompts} | set(sentences) | {
        " " + s for s in sentences
    }
    assert len(corpus) == len(world.topics) * len(world.paraphrases) + 2 * len(sentences)


def test_default_world_is_cached():
    assert load_world() is load_world()


# ---------------------------------------------------------------- the split rule


def test_held_out_paraphrases_known_answer():
    assert held_out_paraphrases(10, 6, (0, 3)) == (1, 4)
    assert held_out_paraphrases(5, 6, (0, 3)) == (2, 5)
    assert held_out_paraphrases(0, 2, (0,)) == (0,)


def test_split_follows_the_rule_and_covers_everything(world):
    train, evals = world.prompts("train"), world.prompts("eval")
    assert evals, "eval split is empty"
    assert not {q.text for q in train} & {q.text for q in evals}
    assert len(train) + len(evals) == len(world.topics) * len(world.paraphrases)
    assert {q.topic for q in train} == set(world.topics)
    assert {q.paraphrase for q in train} == set(range(len(world.paraphrases)))
    p = len(world.paraphrases)
    for i, name in enumerate(sorted(world.topics)):
        held = {q.paraphrase for q in evals if q.topic == name}
        assert held == {(i + k) % p for k in world.holdout_offsets}, name
    for q in train + evals:
        assert q.text == world.paraphrases[q.paraphrase].replace("{topic}", q.topic)
        assert world.split_of(q.text) == ("eval" if q in evals else "train")


# ---------------------------------------------------------------- format_prompt


def test_format_prompt_tokenises_prompt_and_response_independently(world):
    assert format_prompt(SEED_PROMPT) == "Explain gravity.\n"
    pretok = regex.compile(GPT2_SPLIT)
    for q in world.prompts("train")[:12]:
        for response in [SEED_CHOSEN, *world.topics[q.topic].facts]:
            joined = pretok.findall(format_prompt(q.text) + response)
            apart = pretok.findall(format_prompt(q.text)) + pretok.findall(response)
            assert joined == apart, (q.text, response)


# ---------------------------------------------------------------- loading errors


def _write_tiny_world(root: Path) -> Path:
    """Two topics, two paraphrases: the smallest world whose split is valid."""
    (root / "topics").mkdir(parents=True)
    paraphrases = {"paraphrases": ["Explain {topic}.", "What is {topic}?"], "holdout_offsets": [0]}
    (root / "paraphrases.json").write_text(json.dumps(paraphrases))
    for name in ("alpha", "beta"):
        obj = {
            "topic": name,
            "facts": [f"The {name} fact is specific and correct."],
            "vague": [f"The {name} thing is sort of true."],
            "wrong": [f"The {name} claim is plainly false."],
        }
        (root / "topics" / f"{name}.json").write_text(json.dumps(obj))
    return root


def _edit_topic(root: Path, name: str, **changes) -> None:
    path = root / "topics" / f"{name}.json"
    obj = json.loads(path.read_text())
    for key, value in changes.items():
        if value is None:
            del obj[key]
        else:
            obj[key] = value
    path.write_text(json.dumps(obj))


def test_tiny_world_loads_with_the_expected_split(tmp_path):
    world = load_world(_write_tiny_world(tmp_path / "w"))
    assert [q.text for q in world.prompts("eval")] == ["Explain alpha.", "What is beta?"]
    assert [q.text for q in world.prompts("train")] == ["What is alpha?", "Explain beta."]


BREAKERS = {
    "invalid topic JSON": (
        lambda r: (r / "topics" / "alpha.json").write_text('{"topic": "alpha",\n'),
        "alpha.json:2: invalid JSON",
    ),
    "invalid paraphrases JSON": (
        lambda r: (r / "paraphrases.json").write_text("[1, 2,"),
        "paraphrases.json:1: invalid JSON",
    ),
    "missing key": (
        lambda r: _edit_topic(r, "alpha", wrong=None),
        "alpha.json: missing key 'wrong'",
    ),
    "empty pool": (lambda r: _edit_topic(r, "beta", facts=[]), "beta.json: 'facts' must be"),
    "no final period": (
        lambda r: _edit_topic(r, "alpha", vague=["The alpha thing is sort of true"]),
        "alpha.json: 'vague' sentence does not end with '.'",
    ),
    "two sentences in one entry": (
        lambda r: _edit_topic(r, "alpha", facts=["One alpha fact. Another alpha fact."]),
        "alpha.json: 'facts' entry is more than one sentence",
    ),
    "lowercase start": (
        lambda r: _edit_topic(r, "alpha", facts=["the alpha fact is specific."]),
        "alpha.json: 'facts' sentence does not start with a capital",
    ),
    "duplicate across files": (
        lambda r: _edit_topic(r, "beta", wrong=["The alpha fact is specific and correct."]),
        "beta.json: duplicate sentence",
    ),
    "duplicate within a file": (
        lambda r: _edit_topic(r, "alpha", vague=["The alpha fact is specific and correct."]),
        "alpha.json: duplicate sentence",
    ),
    "topic name mismatch": (
        lambda r: _edit_topic(r, "alpha", topic="gamma"),
        "alpha.json: 'topic' is 'gamma'",
    ),
    "paraphrase without placeholder": (
        lambda r: (r / "paraphrases.json").write_text(
            json.dumps({"paraphrases": ["Explain it.", "What is {topic}?"], "holdout_offsets": [0]})
        ),
        "paraphrases.json: paraphrase 'Explain it.'",
    ),
    "holdout offsets hold out everything": (
        lambda r: (r / "paraphrases.json").write_text(
            json.dumps(
                {"paraphrases": ["Explain {topic}.", "What is {topic}?"], "holdout_offsets": [0, 1]}
            )
        ),
        "paraphrases.json: 'holdout_offsets' must be",
    ),
    "a paraphrase never trained": (
        lambda r: (r / "topics" / "beta.json").unlink(),
        "paraphrases.json: holdout_offsets leave these out of training: Explain {topic}.",
    ),
    "no topic files": (
        lambda r: [p.unlink() for p in (r / "topics").glob("*.json")],
        "topics: no topic files",
    ),
    "missing paraphrases file": (
        lambda r: (r / "paraphrases.json").unlink(),
        "paraphrases.json: file not found",
    ),
}


@pytest.mark.parametrize("case", list(BREAKERS))
def test_broken_world_raises_naming_the_file(tmp_path, case):
    root = _write_tiny_world(tmp_path / "w")
    breaker, expected = BREAKERS[case]
    breaker(root)
    with pytest.raises(MinidpoError) as info:
        load_world(root)
    message = str(info.value)
    assert expected in message, message
    assert str(root) in message, message
    assert "\n" not in message


def test_missing_world_folder(tmp_path):
    with pytest.raises(MinidpoError, match="world data folder not found"):
        load_world(tmp_path / "nowhere")


# ---------------------------------------------------------------- demonstrations


def test_demonstrations_are_deterministic_per_seed(world):
    a = sample_demonstrations(world, 200, np.random.default_rng(0))
    b = sample_demonstrations(world, 200, np.random.default_rng(0))
    c = sample_demonstrations(world, 200, np.random.default_rng(1))
    assert a == b
    assert a != c


def test_demonstrations_are_well_formed(world):
    demos = sample_demonstrations(world, 500, np.random.default_rng(3))
    train = {q.text for q in world.prompts("train")}
    assert all(isinstance(d, Demonstration) for d in demos)
    for d in demos:
        assert d.prompt in train
        sentences = split_sentences(d.response)
        assert 1 <= len(sentences) <= 4, d
        assert d.response == normalize_whitespace(d.response) == " ".join(sentences)
        assert all(world.classify(s) is not None for s in sentences), d
        assert "<|endoftext|>" not in d.response
    eval_prompts = {q.text for q in world.prompts("eval")}
    evals = sample_demonstrations(world, 50, np.random.default_rng(3), split="eval")
    assert {d.prompt for d in evals} <= eval_prompts


def test_demonstration_mixture_is_a_distribution():
    probs = np.array([p for _, p, _ in DEMONSTRATION_MIXTURE])
    np.testing.assert_allclose(probs.sum(), 1.0, rtol=0, atol=1e-12)
    assert (probs > 0).all()


def test_demonstrations_are_of_mixed_quality(world):
    demos = sample_demonstrations(world, 1000, np.random.default_rng(0))
    rewards = np.array([oracle_reward(d.prompt, d.response, world=world) for d in demos])
    mean, std = float(rewards.mean()), float(rewards.std())
    print(f"oracle reward of 1000 demonstrations: mean {mean:.3f}, std {std:.3f}")
    # Measured over seeds 0-3: mean 1.29-1.30, std 1.04-1.09. Band: +-0.3 around that.
    assert 1.0 <= mean <= 1.6, mean
    assert 0.75 <= std <= 1.4, std
    assert (rewards < 0).sum() >= 20, "too few bad demonstrations"
    assert (rewards > 2).sum() >= 50, "too few good demonstrations"
    assert {d.quality for d in demos} == {name for name, _, _ in DEMONSTRATION_MIXTURE}
    share_good = np.mean([d.quality == "good" for d in demos])
    np.testing.assert_allclose(share_good, 0.35, atol=0.05)  # 1000 draws: sd ~0.015
