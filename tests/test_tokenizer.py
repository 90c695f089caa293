"""Tests for minidpo.tokenizer: known answers, tiktoken == reference encoder, persistence."""

from __future__ import annotations

import itertools
import json
import pickle
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from minidpo.errors import MinidpoError
from minidpo.tokenizer import (
    EOT,
    GPT2_SPLIT_PATTERN,
    Tokenizer,
    bpe_piece,
    coverage_problem,
    get_stats,
    merge,
    train_bpe,
)

SUBJECTS = [
    "Gravity", "Friction", "Inertia", "Photosynthesis", "Evolution", "A cell", "DNA",
    "Energy", "An atom", "Light", "Sound", "A magnet", "An enzyme", "The heart", "A virus",
    "Momentum", "Electricity", "A neuron", "Respiration", "Entropy",
]  # fmt: skip
VERBS = ["explains", "describes", "controls", "affects", "changes", "depends on", "is part of"]
OBJECTS = [
    "how objects with mass attract each other", "the motion of planets", "the speed of waves",
    "the growth of plants", "the structure of proteins", "the flow of charge",
    "the temperature of a gas", "the energy in food", "the shape of molecules",
    "the signals between cells", "the pressure of fluids", "the colour of light",
]  # fmt: skip
ENDINGS = [".", "!", ", as experiments show.", " in 1905.", " (mostly).", "; it's well known."]


def science_corpus(n: int, seed: int = 0) -> list[str]:
    """`n` templated English sentences about physics and biology."""
    rng = random.Random(seed)
    return [
        f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)} {rng.choice(OBJECTS)}{rng.choice(ENDINGS)}"
        for _ in range(n)
    ]


@pytest.fixture(scope="module")
def corpus() -> list[str]:
    return science_corpus(400)


@pytest.fixture(scope="module")
def tok(corpus: list[str]) -> Tokenizer:
    return train_bpe(corpus, 400)


# ---------------------------------------------------------------- known answers


def test_get_stats_and_merge_examples() -> None:
    assert get_stats([1, 2, 3, 1, 2]) == {(1, 2): 2, (2, 3): 1, (3, 1): 1}
    counts = {(1, 2): 5}
    assert get_stats([1, 2], counts) is counts and counts == {(1, 2): 6}
    assert get_stats([7]) == {}
    assert merge([1, 2, 3, 1, 2], (1, 2), 4) == [4, 3, 4]
    assert merge([5, 5, 5], (5, 5), 6) == [6, 5]  # leftmost first, no overlap
    assert merge([1, 3], (1, 2), 4) == [1, 3]


def test_wikipedia_example_by_hand() -> None:
    # "aaabdaaabac" (Wikipedia, Byte pair encoding) is one pretoken. Counts: aa 4
    # (overlapping positions), ab 2, others 1 -> Z = aa = 256: "Z a b d Z a b a c".
    # Then (Z, a) 2 and (a, b) 2 tie; the smaller pair (97, 98) wins -> Y = ab = 257:
    # "Z Y d Z Y a c". Then (Z, Y) 2 -> X = 258: "X d X a c".
    tok = train_bpe(["aaabdaaabac"], vocab_size=256 + 3 + 1)
    assert tok.merges == {(97, 97): 256, (97, 98): 257, (256, 257): 258}
    expected = [258, ord("d"), 258, ord("a"), ord("c")]
    assert tok.encode_slow("aaabdaaabac") == expected
    assert tok.encode("aaabdaaabac") == expected
    assert tok.decode(expected) == "aaabdaaabac"
    assert tok.eot_id == 259 and tok.vocab_size == 260


def test_bpe_piece_merges_by_bytes_not_by_pair() -> None:
    ranks = {bytes([i]): i for i in range(256)} | {b"bc": 256, b"ab": 257, b"abc": 258}
    # bc (256), then ab (257), then a + bc spells abc (258) though 258 was made as ab + c.
    assert bpe_piece(b"abcab", ranks) == [258, 257]
    # A piece that is a whole token is that token, even if merging would not reach it.
    # abcd (259) is ab + cd, but bc (256) merges first and a, bc, d is stuck.
    ranks = {bytes([i]): i for i in range(256)} | {b"bc": 256, b"ab": 257, b"cd": 258}
    ranks[b"abcd"] = 259
    assert bpe_piece(b"abcd", ranks) == [259]
    assert bpe_piece(b"xabcd", ranks) == [ord("x"), ord("a"), 256, ord("d")]
    tok = Tokenizer({(98, 99): 256, (97, 98): 257, (99, 100): 258, (257, 258): 259})
    assert tok.encode("abcd xabcd") == tok.encode_slow("abcd xabcd") == [259, 32, 120, 97, 256, 100]


def test_bpe_piece_agrees_with_tiktoken_on_an_ambiguous_vocabulary() -> None:
    # Merges bc, ab, (ab)c: b"abc" is reachable as ab + c and as a + bc.
    tok = Tokenizer({(98, 99): 256, (97, 98): 257, (257, 99): 258})
    for text in ["abc", "abcab", "aabcc", "xabcabcd abc", "babcbc"]:
        assert tok.encode_slow(text) == tok.encode(text), text


def _naive_train(texts: list[str], vocab_size: int) -> dict[tuple[int, int], int]:
    """Unoptimised trainer: re-encode every word from scratch at every step."""
    import regex

    words = [w.encode() for t in texts for w in regex.findall(GPT2_SPLIT_PATTERN, t)]
    ranks = {bytes([i]): i for i in range(256)}
    vocab = list(ranks)
    merges = {}
    for idx in range(256, vocab_size - 1):
        stats: dict = {}
        for w in words:
            get_stats(bpe_piece(w, ranks), stats)
        if not stats:
            break
        pair = min(stats, key=lambda p: (-stats[p], p))
        merges[pair] = idx
        vocab.append(vocab[pair[0]] + vocab[pair[1]])
        ranks[vocab[-1]] = idx
    return merges


@settings(max_examples=40, deadline=None)
@given(
    texts=st.lists(st.text(alphabet="abc d'\n", max_size=30), min_size=1, max_size=8),
    vocab_size=st.integers(257, 300),
)
def test_incremental_training_matches_naive_and_tiktoken(texts: list[str], vocab_size: int) -> None:
    # A three-letter alphabet makes byte strings reachable by several splits likely.
    if not any(texts):
        return
    tok = train_bpe(texts, vocab_size)
    assert tok.merges == _naive_train(texts, vocab_size)
    for text in [*texts, "".join(texts), "abcabc dcba"]:
        assert tok.encode(text) == tok.encode_slow(text), text
        assert tok.decode(tok.encode(text)) == text


# ---------------------------------------------------------------- tiktoken == reference


def test_encode_equals_encode_slow_over_corpus(tok: Tokenizer, corpus: list[str]) -> None:
    assert tok.vocab_size == 400  # the corpus is rich enough to learn every merge asked
    for i, text in enumerate(corpus):
        assert tok.encode(text) == tok.encode_slow(text), f"sentence {i}: {text!r}"
    whole = "\n".join(corpus)
    assert tok.encode(whole) == tok.encode_slow(whole)
    assert tok.encode_batch(corpus[:20]) == [tok.encode(t) for t in corpus[:20]]
    # The merges learned something: well under one token per byte on the training text.
    assert len(tok.encode(whole)) < 0.5 * len(whole.encode())


@settings(max_examples=200, deadline=None)
@given(text=st.text(st.characters(exclude_categories=["Cs"]), max_size=60))
def test_round_trip_arbitrary_unicode(tok: Tokenizer, text: str) -> None:
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert all(0 <= i < tok.eot_id for i in ids)


@settings(max_examples=200, deadline=None)
@given(text=st.text(st.characters(codec="utf-8", max_codepoint=0x2FFF), max_size=60))
def test_encode_slow_equals_encode_on_random_text(tok: Tokenizer, text: str) -> None:
    # Up to U+2FFF: the `regex` package and tiktoken's Rust regex may ship different
    # Unicode versions, which could split newly assigned characters differently.
    assert tok.encode_slow(text) == tok.encode(text)


# ---------------------------------------------------------------- the special token


def test_literal_endoftext_is_ordinary_text(tok: Tokenizer) -> None:
    for text in [EOT, "a<|endoftext|>", "x <|endoftext|> y<|endoftext|>"]:
        ids = tok.encode(text)
        assert tok.eot_id not in ids
        assert tok.encode_slow(text) == ids
        assert tok.decode(ids) == text
    assert tok.encode_batch([EOT])[0] == tok.encode(EOT)


def test_eot_id_decodes_to_literal_and_vocab_arithmetic(tok: Tokenizer) -> None:
    assert tok.eot_id == 256 + len(tok.merges)
    assert tok.vocab_size == tok.eot_id + 1
    assert sorted(tok.merges.values()) == list(range(256, tok.eot_id))
    assert tok.encoding.n_vocab == tok.vocab_size
    assert tok.encoding is tok.encoding  # built once
    ids = [*tok.encode("Gravity."), tok.eot_id]
    assert tok.decode(ids) == "Gravity." + EOT
    assert tok.decode([tok.eot_id]) == EOT


def test_decode_replaces_invalid_utf8(tok: Tokenizer) -> None:
    snowman = tok.encode("☃")  # three bytes, not learned as one token
    assert len(snowman) == 3
    assert tok.decode(snowman[:2]) == "\ufffd"


def test_training_stops_early_on_a_tiny_corpus() -> None:
    tok = train_bpe(["ab ab"], vocab_size=1000)
    # words "ab" and " ab": merge ab, then (32, ab); then every word is one token.
    assert tok.merges == {(97, 98): 256, (32, 256): 257}
    assert tok.vocab_size == 259
    assert tok.encode("ab ab") == [256, 257]


def test_training_is_deterministic(corpus: list[str]) -> None:
    assert train_bpe(corpus[:50], 300).merges == train_bpe(corpus[:50], 300).merges


@pytest.mark.parametrize("texts", [[], [""], ["", ""], iter([])])
def test_empty_corpus_raises(texts) -> None:
    with pytest.raises(MinidpoError, match="empty corpus"):
        train_bpe(texts, 300)


@pytest.mark.parametrize("vocab_size", [0, 256])
def test_too_small_vocab_raises(vocab_size: int) -> None:
    with pytest.raises(MinidpoError, match="vocab_size"):
        train_bpe(["hello"], vocab_size)
    assert train_bpe(["hello"], 257).vocab_size == 257  # bytes + EOT, no merges


# ---------------------------------------------------------------- persistence


def test_save_load_round_trip(tok: Tokenizer, corpus: list[str], tmp_path) -> None:
    path = tok.save(tmp_path / "sub" / "tokenizer.json")
    d = json.loads(path.read_text())
    assert d["format"] == "minidpo-bpe" and d["version"] == 1
    assert d["special_tokens"] == {EOT: tok.eot_id}
    loaded = Tokenizer.load(path)
    assert loaded.pattern == GPT2_SPLIT_PATTERN == tok.pattern
    assert loaded.merges == tok.merges and loaded.eot_id == tok.eot_id
    for text in [*corpus[:50], "Hello, world!  It's 2024.\n"]:
        assert loaded.encode(text) == tok.encode(text)
        assert loaded.encode_slow(text) == tok.encode(text)
    assert [p.name for p in path.parent.iterdir()] == ["tokenizer.json"]  # no temp files left


def test_to_dict_from_dict_and_pickle(tok: Tokenizer) -> None:
    again = Tokenizer.from_dict(json.loads(json.dumps(tok.to_dict())))
    assert again.merges == tok.merges and again.pattern == tok.pattern
    tok.encoding  # noqa: B018  (build the cache; pickling must not depend on it)
    unpickled = pickle.loads(pickle.dumps(tok))
    assert unpickled.encode("Entropy changes.") == tok.encode("Entropy changes.")


def test_custom_pattern_survives_load(tmp_path) -> None:
    tok = Tokenizer({(97, 98): 256}, pattern=r"\S+|\s+")
    loaded = Tokenizer.load(tok.save(tmp_path / "t.json"))
    assert loaded.pattern == r"\S+|\s+"
    assert loaded.encode("ab ab") == tok.encode("ab ab") == [256, 32, 256]


def _good() -> dict:
    return Tokenizer({(97, 98): 256, (256, 99): 257}).to_dict()


BAD_FILES = {
    "invalid JSON": "{not json",
    "a JSON list": json.dumps([1, 2]),
    "another format": json.dumps(_good() | {"format": "gpt2"}),
    "another version": json.dumps(_good() | {"version": 2}),
    "merges not pairs": json.dumps(_good() | {"merges": [[97, 98, 99]]}),
    "merges not ints": json.dumps(_good() | {"merges": [["a", "b"]]}),
    "merge uses a future id": json.dumps(_good() | {"merges": [[97, 257], [256, 99]]}),
    "merge repeats bytes": json.dumps(
        _good() | {"merges": [[97, 98], [98, 99], [256, 99], [97, 257]]}
    ),
    "duplicate pair": json.dumps(_good() | {"merges": [[97, 98], [97, 98]]}),
    "wrong special tokens": json.dumps(_good() | {"special_tokens": {EOT: 300}}),
    "bad pattern": json.dumps(_good() | {"pattern": "(unclosed"}),
    "pattern only regex takes (\\X)": json.dumps(_good() | {"pattern": r"\X"}),
    "pattern only regex takes (recursion)": json.dumps(_good() | {"pattern": r"a(?R)?b|\s"}),
}


@pytest.mark.parametrize("what", list(BAD_FILES))
def test_load_errors_name_the_path(what: str, tmp_path) -> None:
    path = tmp_path / "tok.json"
    path.write_text(BAD_FILES[what])
    with pytest.raises(MinidpoError) as info:
        Tokenizer.load(path)
    assert str(path) in str(info.value), what
    assert "\n" not in str(info.value)
    if "pattern" in what:
        assert "'pattern'" in str(info.value), what


def test_load_missing_file(tmp_path) -> None:
    path = tmp_path / "missing.json"
    with pytest.raises(MinidpoError, match="not found") as info:
        Tokenizer.load(path)
    assert str(path) in str(info.value)


def test_bad_merges_in_constructor_raise() -> None:
    for merges in [{(97, 98): 257}, {(97, 300): 256}, {(97, 98): 256, (256, 99): 256}]:
        with pytest.raises(MinidpoError):
            Tokenizer(merges)


@pytest.fixture(scope="module")
def world_tok() -> Tokenizer:
    """The project's real tokenizer: the cpu preset's vocabulary on the world's corpus."""
    from minidpo.config import TokenizerConfig
    from minidpo.tokenizer_stage import world_tokenizer
    from minidpo.world import load_world

    return world_tokenizer(TokenizerConfig(), load_world())


def _demo_texts(n: int) -> list[str]:
    """`n` demonstrations as the model sees them: formatted prompt + response."""
    import numpy as np

    from minidpo.world import format_prompt, load_world, sample_demonstrations

    demos = sample_demonstrations(load_world(), n, np.random.default_rng(0))
    return [format_prompt(d.prompt) + d.response for d in demos]


def test_world_corpus_ids_identical_and_round_trip(world_tok: Tokenizer) -> None:
    """tiktoken and the pure-Python encoder give the same ids on the world's whole corpus,
    on demonstrations built from it, and on the corpus as one string; decode inverts."""
    from minidpo.world import load_world

    corpus = load_world().corpus()
    for text in [*corpus, *_demo_texts(300)]:
        ids = world_tok.encode(text)
        assert ids == world_tok.encode_slow(text), text
        assert world_tok.decode(ids) == text
    assert world_tok.encode(" ".join(corpus)) == world_tok.encode_slow(" ".join(corpus))


def test_world_tokenizer_saves_and_loads_to_the_same_ids(world_tok: Tokenizer, tmp_path) -> None:
    texts = _demo_texts(200)
    loaded = Tokenizer.load(world_tok.save(tmp_path / "tokenizer.json"))
    assert loaded.merges == world_tok.merges and loaded.vocab_size == world_tok.vocab_size
    assert loaded.encode_batch(texts) == world_tok.encode_batch(texts)


def test_no_lone_space_before_a_word_in_the_demonstrations(world_tok: Tokenizer) -> None:
    """Every word after the first of a response carries its space: " Gravity" is one or two
    tokens, never [" ", ...]. Checked on 2,000 demonstrations (every quality, every topic)."""
    lone = world_tok.encode(" ")
    assert len(lone) == 1
    for text in _demo_texts(2000):
        ids = world_tok.encode(text)
        for a, b in itertools.pairwise(ids):
            if a == lone[0]:
                assert not world_tok.decode([b])[:1].isalpha(), (text, world_tok.decode([a, b]))


def test_every_world_word_is_at_most_two_tokens(world_tok: Tokenizer) -> None:
    from minidpo.world import load_world

    words = {w for t in load_world().corpus() for w in world_tok._compiled.findall(t)}
    lengths = {w: len(world_tok.encode(w)) for w in words}
    assert max(lengths.values()) <= 2, max(lengths, key=lengths.get)
    assert len(world_tok.encode(" Gravity keeps the Moon in orbit around the Earth.")) <= 11
    assert world_tok.vocab_size == 1856


def test_coverage_problem_names_the_word() -> None:
    tok = train_bpe(["Gravity pulls.", "Moon"], 262)
    assert coverage_problem(tok, ["Gravity pulls. Moon"], 2) is not None
    assert "' Moon' starts with a lone ' ' token" in coverage_problem(tok, [" Moon"], 10)
    assert "takes" in coverage_problem(tok, ["Moon"], 1)
    whole = train_bpe([" Moon", "Moon"], 400)
    assert coverage_problem(whole, [" Moon Moon", "Moon"], 1) is None


@pytest.mark.parametrize(
    "vocab_size, message",
    [(768, "lone ' ' token"), (1824, "takes 3 tokens"), (4096, "supports at most 1885")],
)
def test_bad_vocab_size_is_refused_by_the_flag(vocab_size: int, message: str, tmp_path) -> None:
    """A --vocab-size too small for the world (or more than its corpus fills) is one line
    naming the flag, exit code 2, and nothing is written: in the stage and the pipeline."""
    from minidpo.cli import main

    for cmd in ("tokenizer", "sft", "pipeline"):
        args = [cmd, "--runs-dir", str(tmp_path / "runs"), "--preset", "tiny"]
        with pytest.raises(SystemExit) as e:
            raise SystemExit(main([*args, "--vocab-size" if cmd != "pipeline" else
                                   "--tokenizer-vocab-size", str(vocab_size)]))  # fmt: skip
        assert e.value.code == 2, cmd
        assert not (tmp_path / "runs").exists(), cmd
    from minidpo.config import TokenizerConfig
    from minidpo.tokenizer_stage import world_tokenizer
    from minidpo.world import load_world

    with pytest.raises(MinidpoError, match=f"--vocab-size {vocab_size}: .*{message}"):
        world_tokenizer(TokenizerConfig(vocab_size=vocab_size), load_world())
