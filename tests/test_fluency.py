"""The world grammar and the off-world mass: checked against brute force and closed forms."""

import numpy as np
import pytest
import torch

from minidpo.fluency import POSITION_KINDS, WorldGrammar, off_world_mass
from minidpo.tokenizer import train_bpe
from minidpo.world import format_prompt, load_world, sample_demonstrations


@pytest.fixture(scope="module")
def world():
    return load_world()


@pytest.fixture(scope="module")
def tok(world):
    return train_bpe(world.corpus(), 400)


@pytest.fixture(scope="module")
def grammar(world, tok):
    return WorldGrammar(world, tok)


@pytest.fixture(scope="module")
def demos(world):
    return sample_demonstrations(world, 200, np.random.default_rng(0), split="eval")


def test_every_demonstration_stays_in_the_world(grammar, tok, demos) -> None:
    for d in demos:
        ids = [*tok.encode(d.response), tok.eot_id]
        walk = grammar.walk(ids)
        assert len(walk) == len(ids)
        kinds = [k for k, _ in walk]
        assert kinds[0] == "first token"
        n_sentences = d.response.count(". ") + d.response.count("? ") + d.response.count("! ") + 1
        assert kinds.count("after a sentence") == n_sentences  # the last one: end-of-text
        assert tok.eot_id in walk[-1][1]  # end-of-text is allowed after the last sentence
        assert tok.eot_id not in walk[0][1]  # an empty response is not in the world


def test_allowed_sets_equal_brute_force_over_the_sentences(world, grammar, tok) -> None:
    """Inside a response's first sentence (and at the next token) the allowed set is
    every next id of a token sequence built from the world's sentences, by brute force."""
    starts = sorted({tok.encode(" " + s)[0] for s in world.sentences()})
    seqs = [tok.encode(s) for s in world.sentences()]
    for s in world.sentences()[::17]:
        ids = tok.encode(s)
        walk = grammar.walk([*ids, tok.eot_id])
        for j in range(len(ids) + 1):
            prefix = ids[:j]
            expected = {q[j] for q in seqs if q[:j] == prefix and len(q) > j}
            if any(q == prefix for q in seqs):  # a whole sentence: stop or go on
                expected |= set(starts) | {tok.eot_id}
            assert walk[j][1] == expected, (s, j)


def test_a_splice_leaves_the_world_where_it_happens(grammar, tok) -> None:
    good = tok.encode("Magnetism is what makes magnets stick.")
    bad = tok.encode("Combustion is what makes magnets stick.")
    grammar.walk([*good, tok.eot_id])
    first_diff = next(i for i, (a, b) in enumerate(zip(good, bad, strict=False)) if a != b)
    with pytest.raises(ValueError, match="leaves the world"):
        grammar.walk([*bad, tok.eot_id])
    # the same splice, checked token by token: its prefix is fine up to the slip
    ok = 0
    for j in range(1, len(bad) + 1):
        try:
            grammar.walk(bad[:j])
            ok = j
        except ValueError:
            break
    assert ok >= first_diff


class _FixedLogits(torch.nn.Module):
    """A 'model' whose logits at every position are one fixed vector."""

    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        self.logits = torch.nn.Parameter(logits)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.logits.expand(*idx.shape, -1)


def test_uniform_model_leaks_one_minus_allowed_over_vocabulary(grammar, tok, demos) -> None:
    V = tok.vocab_size
    model = _FixedLogits(torch.zeros(V))
    got = off_world_mass(model, tok, grammar, [d.prompt for d in demos], [d.response for d in demos],
                         batch_size=7)  # fmt: skip
    expected = dict.fromkeys(POSITION_KINDS, 0.0)
    for d in demos:
        for kind, allowed in grammar.walk([*tok.encode(d.response), tok.eot_id]):
            expected[kind] += 1 - len(allowed) / V
    for k, v in expected.items():
        assert got[k] == pytest.approx(v / len(demos), rel=1e-5), k
    assert got["total"] == pytest.approx(sum(expected.values()) / len(demos), rel=1e-5)


def test_a_model_on_the_world_only_leaks_nothing(world, grammar, tok) -> None:
    """All mass on one in-world token at every position: the off-world mass is 0; moving
    a share eps of it onto an off-world token leaks eps at every position."""
    text = world.sentences()[0]
    ids = [*tok.encode(text), tok.eot_id]
    walk = grammar.walk(ids)
    prompt = world.prompts("eval")[0].text
    n_prompt = len(tok.encode(format_prompt(prompt)))

    class Teacher(torch.nn.Module):
        def __init__(self, eps: float) -> None:
            super().__init__()
            self.eps = eps
            self.w = torch.nn.Parameter(torch.zeros(1))

        def forward(self, idx):
            p = torch.full((*idx.shape, tok.vocab_size), 1e-30)
            for j, t in enumerate(ids):
                outside = next(v for v in range(tok.vocab_size) if v not in walk[j][1])
                p[:, n_prompt - 1 + j, t] = 1 - self.eps
                p[:, n_prompt - 1 + j, outside] = self.eps
            return p.log()

    assert off_world_mass(Teacher(0.0), tok, grammar, [prompt], [text])["total"] == pytest.approx(
        0, abs=1e-6
    )
    leak = off_world_mass(Teacher(0.01), tok, grammar, [prompt], [text])
    assert leak["total"] == pytest.approx(0.01 * len(ids), rel=1e-4)
