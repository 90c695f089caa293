"""The table of random streams: unique tags, valid kinds, and no two streams sharing a draw."""

from __future__ import annotations

import re
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest

from minidpo.seeds import KINDS, STREAMS, seed_of, stream

SEEDS = range(5)
INDICES = [(), *((i,) for i in range(4)), *((i, j) for i in range(2) for j in range(2))]
SOURCE = Path(__file__).resolve().parent.parent / "minidpo"


def _rng_streams() -> list[str]:
    return [n for n, (_, kind, _) in STREAMS.items() if kind == "rng"]


def _seed_streams() -> list[str]:
    """The streams `seed_of` serves: every kind but "rng" (so a stray kind is checked too)."""
    return [n for n, (_, kind, _) in STREAMS.items() if kind != "rng"]


def _first_draw(seed: int, name: str, index: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(int(x) for x in stream(seed, name, *index).integers(0, 2**64, 4, dtype=np.uint64))


def _owners(draws: dict[tuple[int, str, tuple[int, ...]], object]) -> dict[object, set]:
    """Which (seed, name) pairs produced each draw."""
    owners: dict[object, set] = defaultdict(set)
    for (seed, name, _), draw in draws.items():
        owners[draw].add((seed, name))
    return owners


def test_tags_unique() -> None:
    """Catches two names on one tag, e.g. "dpo/batch" and "ppo/prompts" both on (3, "rng")."""
    by_tag = defaultdict(list)
    for name, (tag, _, _) in STREAMS.items():
        by_tag[tag].append(name)
    shared = {tag: names for tag, names in by_tag.items() if len(names) > 1}
    assert not shared, f"tags used by more than one stream: {shared}"


def test_kinds_valid() -> None:
    """Catches a stream whose draw is not SeedSequence([seed, tag, *index]), such as the
    "offset" kind (seed + tag + sum(index)) that let seeds and indices trade places."""
    bad = {name: kind for name, (_, kind, _) in STREAMS.items() if kind not in KINDS}
    assert not bad, f"kinds other than {KINDS}: {bad}"
    assert all(isinstance(tag, int) and tag > 0 for tag, _, _ in STREAMS.values())
    assert all(what.strip() for _, _, what in STREAMS.values())


def test_rng_streams_share_no_draw() -> None:
    """No first draw (4 uint64) of any rng stream, over seeds 0-4 and small indices, is
    also the first draw of another stream or of the same stream under another seed.
    Catches tags shared between names ("rm/batch" and "prefs/labels" both on 4 once)."""
    draws = {
        (s, n, i): _first_draw(s, n, i) for s in SEEDS for n in _rng_streams() for i in INDICES
    }
    shared = {d: o for d, o in _owners(draws).items() if len(o) > 1}
    assert not shared, f"draws shared between (seed, stream) pairs: {sorted(shared.values())}"


def test_seed_streams_share_no_seed() -> None:
    """No seed of any seed stream, over seeds 0-4 and small indices, is also the seed of
    another stream or of the same stream under another seed. Catches the old offset
    kinds: "eval/samples" was seed + 12345, so seed 0 at index 1 equalled seed 1 at
    index 0, and "prefs/samples" (seed * 1000 + 17 + k) could reach 12345 too."""
    draws = {(s, n, i): seed_of(s, n, *i) for s in SEEDS for n in _seed_streams() for i in INDICES}
    shared = {d: o for d, o in _owners(draws).items() if len(o) > 1}
    assert not shared, f"seeds shared between (seed, stream) pairs: {sorted(shared.values())}"


def test_indices_of_one_stream_differ() -> None:
    """Within one stream and seed, distinct indices of one length draw differently (the
    offset kinds summed the index, so (0, 1) and (1, 0) gave one seed). Indices of
    different lengths may coincide, (0,) and (0, 0) say: hence one length per stream."""
    for s in SEEDS:
        for length in {len(i) for i in INDICES if i}:
            same = [i for i in INDICES if len(i) == length]
            for n in _rng_streams():
                got = [_first_draw(s, n, i) for i in same]
                assert len(set(got)) == len(got), (n, length)
            for n in _seed_streams():
                got = [seed_of(s, n, *i) for i in same]
                assert len(set(got)) == len(got), (n, length)


def test_seed_streams_do_not_reproduce_rng_streams() -> None:
    """A sampler seeded with a seed stream's seed does not draw what an rng stream draws
    (that would need a tag of 0, i.e. entropy [seed] padded to [seed, 0, 0])."""
    rng_draws = {_first_draw(s, n, i) for s in SEEDS for n in _rng_streams() for i in INDICES}
    for s in SEEDS:
        for n in _seed_streams():
            for i in INDICES:
                g = np.random.default_rng(seed_of(s, n, *i))
                draw = tuple(int(x) for x in g.integers(0, 2**64, 4, dtype=np.uint64))
                assert draw not in rng_draws, (s, n, i)


@pytest.mark.parametrize(
    "call, name",
    [(stream, n) for n in _seed_streams()] + [(seed_of, n) for n in _rng_streams()],
)
def test_wrong_kind_raises_key_error(call, name) -> None:
    """stream() of a seed stream or seed_of() of an rng stream is a KeyError, not a
    silent draw of the other kind (the old seed_of fell through to offset arithmetic)."""
    with pytest.raises(KeyError, match=re.escape(name)):
        call(0, name, 1)


def test_unknown_stream_raises_key_error() -> None:
    with pytest.raises(KeyError):
        stream(0, "no/such")
    with pytest.raises(KeyError):
        seed_of(0, "no/such")


def test_deterministic() -> None:
    """The same (seed, name, index) always draws the same; a resumed run depends on it."""
    for n in _rng_streams():
        assert _first_draw(3, n, (7,)) == _first_draw(3, n, (7,))
    for n in _seed_streams():
        assert seed_of(3, n, 7) == seed_of(3, n, 7)
    assert seed_of(0, "eval/samples") == int(
        np.random.SeedSequence([0, STREAMS["eval/samples"][0]]).generate_state(1)[0]
    )
    a = stream(0, "dpo/batch", 5).random(3)
    b = np.random.default_rng([0, STREAMS["dpo/batch"][0], 5]).random(3)
    assert np.array_equal(a, b)


CALL = re.compile(r"\b(stream|seed_of)\(\s*[^,()]+(?:\([^()]*\))?[^,()]*,\s*\"([^\"]+)\"([^)]*)\)")


def test_call_sites_name_known_streams_of_their_kind() -> None:
    """Every `stream(..., "name", ...)` / `seed_of(..., "name", ...)` in the package names
    a stream of the table, of the kind the call needs, with one number of indices per
    stream (SeedSequence pads with zeros: index () and (0,) draw alike)."""
    arity: dict[str, set[int]] = defaultdict(set)
    found = 0
    for path in sorted(SOURCE.glob("*.py")):
        if path.name == "seeds.py":
            continue
        for call, name, rest in CALL.findall(path.read_text()):
            found += 1
            assert name in STREAMS, f"{path.name}: {call}() of unknown stream {name!r}"
            kind = STREAMS[name][1]
            assert kind == ("rng" if call == "stream" else "seed"), f"{path.name}: {call}({name!r})"
            arity[name].add(len([a for a in rest.split(",") if a.strip()]))
    assert found >= 20  # the pattern still matches the call sites
    mixed = {n: a for n, a in arity.items() if len(a) > 1}
    assert not mixed, f"streams called with different numbers of indices: {mixed}"
