"""Preference pairs: the Bradley-Terry labels and the validating TRL-form loader."""

import gzip
import json
import re

import numpy as np
import pytest

from minidpo.errors import MinidpoError
from minidpo.gravity import load_example
from minidpo.preferences import (
    PreferencePair,
    bradley_terry_prob,
    label_pairs,
    load_pairs,
    save_pairs,
    validation_split,
)
from minidpo.sampling import Sample
from minidpo.seeds import stream


def _s(prompt, text, terminated=True):
    return Sample(prompt, text, [1, 2], terminated)


def test_bradley_terry_known_values():
    assert bradley_terry_prob(1.0, 0.0, 1.0) == pytest.approx(1 / (1 + np.exp(-1)), abs=1e-15)
    assert bradley_terry_prob(0.0, 1.0, 0.5) == pytest.approx(1 / (1 + np.exp(2)), abs=1e-15)
    assert bradley_terry_prob(3.0, 3.0, 0.7) == pytest.approx(0.5, abs=1e-15)
    assert bradley_terry_prob(1e4, 0.0, 1e-3) == 1.0  # no overflow
    assert bradley_terry_prob(0.0, 1e4, 1e-3) == 0.0
    assert bradley_terry_prob(2.0, 1.0, 0.0) == 1.0  # tau -> 0: deterministic


def test_tau_zero_labels_by_reward_and_drops_ties():
    samples = [_s("p", "a"), _s("p", "b"), _s("p", "c"), _s("p", "a")]
    rewards = [1.0, 2.0, 1.0, 1.0]  # a~c tie, a==a same text
    pairs = label_pairs(samples, rewards, tau=0.0, rng=np.random.default_rng(0))
    got = sorted((p.chosen, p.rejected) for p in pairs)
    assert got == [("b", "a"), ("b", "a"), ("b", "c")]
    assert all(p.score_chosen > p.score_rejected for p in pairs)


def test_bradley_terry_label_frequency_matches_probability():
    # one pair with r difference 1 and tau 1, drawn many times: P(a wins) = sigmoid(1) = 0.7311
    samples = [_s(f"p{i}", t) for i in range(4000) for t in ("a", "b")]
    rewards = [1.0, 0.0] * 4000
    pairs = label_pairs(samples, rewards, tau=1.0, rng=np.random.default_rng(1))
    freq = np.mean([p.chosen == "a" for p in pairs])
    # binomial standard error sqrt(p(1-p)/n) = 0.007; allow 4 of them
    assert abs(freq - 1 / (1 + np.exp(-1))) < 0.028


def test_label_pairs_deterministic_per_seed_and_capped():
    samples = [_s("p", t) for t in "abcdef"]
    rewards = [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]
    a = label_pairs(samples, rewards, tau=1.0, rng=np.random.default_rng(3), max_pairs_per_prompt=4)
    b = label_pairs(samples, rewards, tau=1.0, rng=np.random.default_rng(3), max_pairs_per_prompt=4)
    assert a == b and len(a) == 4


def test_save_load_round_trip_keeps_extra_keys_out(tmp_path):
    pairs = [PreferencePair("p", "good.", "bad.", 1.0, 0.0, True, False)]
    path = save_pairs(tmp_path / "pairs.jsonl", pairs)
    loaded, skipped = load_pairs(path)
    assert loaded == pairs and skipped == 0
    # a user's own TRL file: extra keys ignored, scores optional
    user = tmp_path / "user.jsonl"
    user.write_text(json.dumps({"prompt": "x", "chosen": "y", "rejected": "z", "id": 7}) + "\n\n")
    (pair,), _ = load_pairs(user)
    assert pair == PreferencePair("x", "y", "z")


@pytest.mark.parametrize(
    "line, message",
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "expected a JSON object"),
        ('{"prompt": "p", "chosen": "c"}', "missing field 'rejected'"),
        ('{"prompt": "p", "chosen": 3, "rejected": "r"}', "field 'chosen' is not a string"),
        ('{"prompt": "p", "chosen": "c", "rejected": "  "}', "field 'rejected' is empty"),
    ],
)
def test_loader_names_file_and_line(tmp_path, line, message):
    path = tmp_path / "bad.jsonl"
    good = json.dumps({"prompt": "p", "chosen": "c", "rejected": "r"})
    path.write_text(good + "\n" + line + "\n")
    with pytest.raises(MinidpoError) as e:
        load_pairs(path)
    assert f"{path}:2" in str(e.value) and message in str(e.value)


def test_identical_pairs_skipped_and_counted(tmp_path, capsys):
    path = tmp_path / "p.jsonl"
    rows = [
        {"prompt": "p", "chosen": "c", "rejected": "c"},
        {"prompt": "p", "chosen": "c", "rejected": "r"},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    pairs, skipped = load_pairs(path)
    assert len(pairs) == 1 and skipped == 1
    assert "skipped 1 pairs" in capsys.readouterr().err


def test_missing_and_empty_files(tmp_path):
    with pytest.raises(MinidpoError, match="not found"):
        load_pairs(tmp_path / "nope.jsonl")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(MinidpoError, match="no usable preference pairs"):
        load_pairs(empty)


def test_empty_responses_never_make_a_pair():
    samples = [_s("p", ""), _s("p", "x"), _s("p", "  "), _s("p", "y")]
    pairs = label_pairs(samples, [-1.0, 1.0, -1.0, 0.0], tau=0.0, rng=np.random.default_rng(0))
    assert [(p.chosen, p.rejected) for p in pairs] == [("x", "y")]


@pytest.mark.parametrize(
    "content, where",
    [
        (gzip.compress(b'{"prompt": "p", "chosen": "a", "rejected": "b"}\n'), ":1: not UTF-8 text"),
        (
            '{"prompt": "p", "chosen": "a", "rejected": "b"}\n{"prompt": "p", "chosen": "café", '
            '"rejected": "b"}\n'.encode("latin-1"),
            ":2: not UTF-8 text (byte 0xe9",
        ),
        (bytes(range(128, 256)), ":1: not UTF-8 text (byte 0x80 at column 1"),
    ],
)
def test_a_file_that_is_not_utf8_is_one_error_naming_the_line(tmp_path, content, where):
    path = tmp_path / "pairs.jsonl"
    path.write_bytes(content)
    with pytest.raises(MinidpoError, match=re.escape(f"{path}{where}")):
        load_pairs(path)


def test_a_gravity_example_that_is_not_utf8_is_one_error(tmp_path):
    path = tmp_path / "example.json"
    path.write_bytes(b"\xff\xfe{}")
    with pytest.raises(MinidpoError, match="not UTF-8 text"):
        load_example(path)


# ------------------------------------------------------------------ the validation split


def _by_prompt(n_prompts, per_prompt=3):
    """`per_prompt` pairs on each of `n_prompts` prompts, interleaved: p00 p01 ... p00 p01 ..."""
    return [
        PreferencePair(f"p{i:02d}", f"good {i} {k}.", f"bad {i} {k}.")
        for k in range(per_prompt)
        for i in range(n_prompts)
    ]


def test_validation_split_known_answer():
    """The validation prompts are round(fraction * n) of the SORTED prompts, drawn by the
    stream "prefs/validation"; each side keeps the file's order."""
    pairs = _by_prompt(20)
    train, valid = validation_split(pairs, 0.1, seed=0)
    drawn = stream(0, "prefs/validation").choice(20, size=2, replace=False)
    want = {f"p{i:02d}" for i in drawn}
    assert {p.prompt for p in valid} == want and len(valid) == 2 * 3
    assert valid == [p for p in pairs if p.prompt in want]
    assert train == [p for p in pairs if p.prompt not in want]
    # the order of the file does not move a prompt to the other side
    shuffled = [pairs[i] for i in np.random.default_rng(5).permutation(len(pairs))]
    assert {p.prompt for p in validation_split(shuffled, 0.1, seed=0)[1]} == want


def _responses(pairs):
    return {r for p in pairs for r in (p.chosen, p.rejected)}


def test_validation_split_is_by_prompt_and_disjoint():
    pairs = _by_prompt(30, per_prompt=4)
    train, valid = validation_split(pairs, 0.2, seed=3)
    assert len(train) + len(valid) == len(pairs)
    assert not {p.prompt for p in train} & {p.prompt for p in valid}
    assert not _responses(train) & _responses(valid)
    assert len({p.prompt for p in valid}) == 6 and len(valid) == 6 * 4


@pytest.mark.parametrize(
    "n_prompts, fraction, n_valid",
    [(20, 0.1, 2), (20, 0.25, 5), (10, 0.25, 3), (20, 0.01, 1), (20, 0.99, 19), (2, 0.5, 1),
     (2, 0.01, 1), (2, 0.99, 1), (1, 0.5, 0)],
)  # fmt: skip
def test_validation_split_sizes(n_prompts, fraction, n_valid):
    """round(fraction * n), halves up (10 * 0.25 = 2.5 -> 3), at least one prompt each
    side from two prompts on; one prompt: no validation."""
    train, valid = validation_split(_by_prompt(n_prompts), fraction, seed=0)
    assert len({p.prompt for p in valid}) == n_valid
    assert len({p.prompt for p in train}) == n_prompts - n_valid


def test_validation_split_is_deterministic_and_follows_the_seed():
    pairs = _by_prompt(40)
    assert validation_split(pairs, 0.1, seed=7) == validation_split(pairs, 0.1, seed=7)
    splits = {frozenset(p.prompt for p in validation_split(pairs, 0.1, seed=s)[1]) for s in (0, 1)}
    assert len(splits) == 2, "seeds 0 and 1 carve out the same prompts"


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.1, 1.5, float("nan")])
def test_validation_split_refuses_a_fraction_outside_0_1(fraction):
    with pytest.raises(MinidpoError, match="--validation-fraction"):
        validation_split(_by_prompt(4), fraction, seed=0)
