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
)
from minidpo.sampling import Sample


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
