"""The toy world ("explain"): prompts, sentence pools and SFT demonstrations.

A prompt asks about one topic ("Explain gravity.", "What is gravity?", ...). Each
topic has three pools of short sentences, kept as editable JSON under
``data/explain/``:

- ``facts``: specific correct sentences ("Gravity is the force that attracts
  objects with mass toward each other.");
- ``vague``: true but uninformative sentences ("Gravity is when things fall down.");
- ``wrong``: false claims ("There is no gravity on the Moon.").

Another topic's sentence is off-topic. `minidpo.oracle` scores a response by
looking each of its sentences up here (`World.classify`).

Train/eval split (the rule lives in ``paraphrases.json`` as ``holdout_offsets``):
topics are indexed 0..N-1 in alphabetical order of name and topic ``i`` holds out
paraphrase ``(i + k) mod P`` for every ``k`` in ``holdout_offsets`` (P paraphrases).
With P = 6 and offsets (0, 3) every topic keeps 4 of its 6 prompts for training
and every paraphrase trains on two thirds of the topics, so evaluation measures
generalisation to unseen topic x paraphrase combinations, never to unseen words.

What this file leaves out: any notion of grammar. A sentence is an exact string
(after whitespace normalisation); a paraphrase of a fact is not a fact. The world
is deliberately closed so the oracle reward is exact and cannot be argued with.
"""

from __future__ import annotations

import functools
import json
import re
import types
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from minidpo.errors import MinidpoError
from minidpo.resources import data_dir

KINDS = ("fact", "vague", "wrong")
SPLITS = ("train", "eval")
TOPIC_PLACEHOLDER = "{topic}"
DEFAULT_DATA_DIR = data_dir() / "explain"  # data/explain, in the checkout or the wheel

_POOL_KEYS = {"facts": "fact", "vague": "vague", "wrong": "wrong"}  # JSON key -> kind
_SENTENCE_END = re.compile(r"(?<=[.!?]) ")  # applied after whitespace normalisation


@dataclass(frozen=True)
class Topic:
    """One topic's sentence pools, in file order."""

    name: str
    facts: tuple[str, ...]
    vague: tuple[str, ...]
    wrong: tuple[str, ...]


@dataclass(frozen=True)
class Prompt:
    """A prompt text, its topic, and the index of its paraphrase template."""

    text: str
    topic: str
    paraphrase: int  # index into World.paraphrases


@dataclass(frozen=True)
class Demonstration:
    """One SFT example. `response` has no end-of-text marker; the tokenizer appends it."""

    prompt: str
    response: str
    quality: str = ""  # the mixture component that produced it (see sample_demonstrations)


def normalize_whitespace(text: str) -> str:
    """Collapse every run of whitespace (spaces, tabs, newlines) to one space and strip.

    Example: ``normalize_whitespace("  A  b.\\n\\tC. ") == "A b. C."``
    """
    return " ".join(text.split())


def split_sentences(text: str) -> list[str]:
    """Split normalised `text` after each ".", "!" or "?" that is followed by a space or the end.

    The last piece may be a fragment without final punctuation. Empty text gives [].
    Example: ``split_sentences("A b. C d? e") == ["A b.", "C d?", "e"]``
    """
    text = normalize_whitespace(text)
    return _SENTENCE_END.split(text) if text else []


def format_prompt(prompt: str) -> str:
    """The text the model sees before its response: the prompt and one newline.

    Why a newline: under a GPT-2 style split pattern ``\\n`` before a letter is a
    pre-token of its own (letters, punctuation and whitespace never share one), so
    ``tokens(format_prompt(p) + r) == tokens(format_prompt(p)) + tokens(r)``: the
    prompt and the response tokenise independently and the response mask is exact.
    """
    return prompt + "\n"


def held_out_paraphrases(
    topic_index: int, n_paraphrases: int, offsets: Sequence[int]
) -> tuple[int, ...]:
    """Paraphrase indices that topic `topic_index` holds out for eval: (i + k) mod P, sorted.

    Example: ``held_out_paraphrases(10, 6, (0, 3)) == (1, 4)``
    """
    return tuple(sorted({(topic_index + k) % n_paraphrases for k in offsets}))


class World:
    """The closed world: topics, paraphrases, the train/eval split and a sentence index.

    Build it with `load_world`; the constructor checks the cross-file invariants
    (unique sentences, a usable split) but cannot name files, so `load_world`
    checks them first with file names.
    """

    def __init__(
        self,
        topics: Mapping[str, Topic],
        paraphrases: Sequence[str],
        holdout_offsets: Sequence[int],
    ) -> None:
        self.topics: Mapping[str, Topic] = types.MappingProxyType(
            {name: topics[name] for name in sorted(topics)}
        )
        self.paraphrases: tuple[str, ...] = tuple(paraphrases)
        self.holdout_offsets: tuple[int, ...] = tuple(holdout_offsets)

        self._sentences: dict[str, tuple[str, str]] = {}  # sentence -> (topic, kind)
        for topic in self.topics.values():
            for key, kind in _POOL_KEYS.items():
                for s in getattr(topic, key):
                    if s in self._sentences:
                        raise MinidpoError(f"duplicate sentence in the world: {s!r}")
                    self._sentences[s] = (topic.name, kind)

        p = len(self.paraphrases)
        self._prompts: dict[str, list[Prompt]] = {"train": [], "eval": []}
        self._split_of: dict[str, str] = {}
        self._prompt_by_text: dict[str, Prompt] = {}  # topic by topic, in paraphrase order
        for i, name in enumerate(self.topics):
            held = held_out_paraphrases(i, p, self.holdout_offsets)
            for j, template in enumerate(self.paraphrases):
                prompt = Prompt(template.replace(TOPIC_PLACEHOLDER, name), name, j)
                if prompt.text in self._prompt_by_text:
                    raise MinidpoError(f"duplicate prompt in the world: {prompt.text!r}")
                split = "eval" if j in held else "train"
                self._prompts[split].append(prompt)
                self._split_of[prompt.text] = split
                self._prompt_by_text[prompt.text] = prompt

        train = self._prompts["train"]
        missing = [t for t in self.topics if not any(q.topic == t for q in train)]
        missing += [
            self.paraphrases[j] for j in range(p) if not any(q.paraphrase == j for q in train)
        ]
        if missing:
            raise MinidpoError(f"holdout_offsets leave these out of training: {', '.join(missing)}")
        if not self._prompts["eval"]:
            raise MinidpoError("holdout_offsets leave the eval split empty")

    def prompts(self, split: str) -> list[Prompt]:
        """The prompts of `split` ("train" or "eval"), topic by topic in paraphrase order."""
        if split not in SPLITS:
            raise MinidpoError(f"unknown split {split!r}: expected one of {', '.join(SPLITS)}")
        return list(self._prompts[split])

    def prompt(self, prompt_text: str) -> Prompt:
        """The `Prompt` with text `prompt_text` (whitespace-normalised); MinidpoError if none."""
        key = normalize_whitespace(prompt_text)
        if key not in self._prompt_by_text:
            raise MinidpoError(f"prompt not in the world: {prompt_text!r}")
        return self._prompt_by_text[key]

    def topic_of(self, prompt_text: str) -> str:
        """The topic a prompt asks about; MinidpoError for a prompt not in the world."""
        return self.prompt(prompt_text).topic

    def split_of(self, prompt_text: str) -> str:
        """ "train" or "eval" for a prompt of the world; MinidpoError otherwise."""
        return self._split_of[self.prompt(prompt_text).text]

    def classify(self, sentence: str) -> tuple[str, str] | None:
        """(topic, kind) of a world sentence, kind in {"fact", "vague", "wrong"}; None otherwise.

        Matching is exact after whitespace normalisation (case and punctuation count).
        """
        return self._sentences.get(normalize_whitespace(sentence))

    def sentences(self) -> list[str]:
        """Every sentence of the world, topic by topic, facts then vague then wrong."""
        return list(self._sentences)

    def corpus(self) -> list[str]:
        """The tokenizer's training text: every piece of text in the form the model sees it.

        Each prompt as `format_prompt` writes it (both splits), and each sentence twice:
        as a response opens ("Gravity is ...") and as it follows another sentence
        (" Gravity is ..."). A multi-sentence response is one of those openings followed
        by those continuations, so under the GPT-2 split pattern this list holds every
        pretoken of every demonstration, each word with the leading space it carries
        there. (Trained on bare sentences alone, BPE never sees " Gravity" and every
        later sentence of a response starts with a lone " " token.)
        """
        prompts = [format_prompt(text) for text in self._prompt_by_text]
        return prompts + [form for s in self.sentences() for form in (s, " " + s)]


# ---------------------------------------------------------------- loading


def _read_json(path: Path) -> object:
    if not path.is_file():
        raise MinidpoError(f"{path}: file not found")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise MinidpoError(f"{path}:{e.lineno}: invalid JSON: {e.msg}") from None
    except UnicodeDecodeError as e:
        raise MinidpoError(f"{path}: not UTF-8 text: {e.reason}") from None


def _check_sentence(path: Path, key: str, s: object) -> str:
    if not isinstance(s, str) or not s:
        raise MinidpoError(f"{path}: {key!r} holds {s!r}, expected a non-empty string")
    if s != normalize_whitespace(s):
        raise MinidpoError(f"{path}: {key!r} sentence has extra whitespace: {s!r}")
    if not s.endswith("."):
        raise MinidpoError(f"{path}: {key!r} sentence does not end with '.': {s!r}")
    if not s[0].isupper():
        raise MinidpoError(f"{path}: {key!r} sentence does not start with a capital: {s!r}")
    if split_sentences(s) != [s]:
        raise MinidpoError(f"{path}: {key!r} entry is more than one sentence: {s!r}")
    return s


def _load_paraphrases(path: Path) -> tuple[list[str], list[int]]:
    obj = _read_json(path)
    if not isinstance(obj, dict):
        raise MinidpoError(f"{path}: expected a JSON object")
    for key in ("paraphrases", "holdout_offsets"):
        if key not in obj:
            raise MinidpoError(f"{path}: missing key {key!r}")
    paraphrases, offsets = obj["paraphrases"], obj["holdout_offsets"]
    if not isinstance(paraphrases, list) or not paraphrases:
        raise MinidpoError(f"{path}: 'paraphrases' must be a non-empty list")
    for t in paraphrases:
        if not isinstance(t, str) or t.count(TOPIC_PLACEHOLDER) != 1:
            raise MinidpoError(f"{path}: paraphrase {t!r} must contain {TOPIC_PLACEHOLDER} once")
        if t != normalize_whitespace(t):
            raise MinidpoError(f"{path}: paraphrase {t!r} has extra whitespace")
    if len(set(paraphrases)) != len(paraphrases):
        raise MinidpoError(f"{path}: duplicate paraphrases")
    p = len(paraphrases)
    ok = isinstance(offsets, list) and all(type(k) is int and 0 <= k < p for k in offsets)
    if not ok or not offsets or len(set(offsets)) != len(offsets) or len(offsets) >= p:
        raise MinidpoError(
            f"{path}: 'holdout_offsets' must be 1 to {p - 1} distinct integers in [0, {p})"
        )
    return paraphrases, offsets


def _load_topic(path: Path) -> Topic:
    obj = _read_json(path)
    if not isinstance(obj, dict):
        raise MinidpoError(f"{path}: expected a JSON object")
    for key in ("topic", *_POOL_KEYS):
        if key not in obj:
            raise MinidpoError(f"{path}: missing key {key!r}")
    name = obj["topic"]
    if name != path.stem:
        raise MinidpoError(f"{path}: 'topic' is {name!r} but the file name says {path.stem!r}")
    pools = {}
    for key in _POOL_KEYS:
        pool = obj[key]
        if not isinstance(pool, list) or not pool:
            raise MinidpoError(f"{path}: {key!r} must be a non-empty list of sentences")
        pools[key] = tuple(_check_sentence(path, key, s) for s in pool)
    return Topic(name=name, **pools)


def _load(data_dir: Path) -> World:
    if not data_dir.is_dir():
        raise MinidpoError(f"{data_dir}: world data folder not found")
    paraphrases, offsets = _load_paraphrases(data_dir / "paraphrases.json")
    topic_dir = data_dir / "topics"
    files = sorted(topic_dir.glob("*.json")) if topic_dir.is_dir() else []
    if not files:
        raise MinidpoError(f"{topic_dir}: no topic files (*.json) found")
    topics: dict[str, Topic] = {}
    first_seen: dict[str, Path] = {}
    for path in files:
        topic = _load_topic(path)
        for key in _POOL_KEYS:
            for s in getattr(topic, key):
                if s in first_seen:
                    raise MinidpoError(
                        f"{path}: duplicate sentence {s!r} (also in {first_seen[s]})"
                    )
                first_seen[s] = path
        topics[topic.name] = topic
    try:
        return World(topics, paraphrases, offsets)
    except MinidpoError as e:
        raise MinidpoError(f"{data_dir / 'paraphrases.json'}: {e}") from None


@functools.lru_cache(maxsize=1)
def _default_world() -> World:
    return _load(DEFAULT_DATA_DIR)


def load_world(data_dir: Path | None = None) -> World:
    """Load and validate a world folder (``paraphrases.json`` + ``topics/*.json``).

    `data_dir=None` loads the repository's ``data/explain`` once and caches it.
    Any problem (missing folder or file, invalid JSON, a missing key, an empty
    pool, a duplicate sentence, a sentence without a final ".") raises
    `MinidpoError` naming the file.
    """
    if data_dir is None:
        return _default_world()
    return _load(Path(data_dir))


# ---------------------------------------------------------------- demonstrations

# (name, probability, what the response holds). Probabilities sum to 1.
DEMONSTRATION_MIXTURE: tuple[tuple[str, float, str], ...] = (
    ("good", 0.35, "2-3 distinct facts of the topic"),
    ("mediocre", 0.30, "1-2 vague sentences and at most one fact"),
    ("wrong", 0.15, "1-2 on-topic facts/vague sentences and one wrong claim"),
    ("off_topic", 0.10, "1-2 on-topic facts/vague sentences and one fact of another topic"),
    ("repeated", 0.10, "1-2 facts, then one of them again"),
)


def _pick(pool: Sequence[str], k: int, rng: np.random.Generator) -> list[str]:
    """`k` distinct sentences of `pool`, in random order."""
    return [pool[i] for i in rng.permutation(len(pool))[:k]]


def _insert_at_random(sentences: list[str], extra: str, rng: np.random.Generator) -> list[str]:
    at = int(rng.integers(len(sentences) + 1))
    return [*sentences[:at], extra, *sentences[at:]]


def _demonstration_sentences(
    world: World, topic: Topic, quality: str, rng: np.random.Generator
) -> list[str]:
    on_topic = list(topic.facts) + list(topic.vague)
    if quality == "good":
        return _pick(topic.facts, int(rng.integers(2, 4)), rng)
    if quality == "mediocre":
        chosen = _pick(topic.vague, int(rng.integers(1, 3)), rng)
        chosen += _pick(topic.facts, int(rng.integers(0, 2)), rng)
        return [chosen[i] for i in rng.permutation(len(chosen))]
    if quality == "wrong":
        (claim,) = _pick(topic.wrong, 1, rng)
        return _insert_at_random(_pick(on_topic, int(rng.integers(1, 3)), rng), claim, rng)
    if quality == "off_topic":
        others = [name for name in world.topics if name != topic.name]
        other = world.topics[others[int(rng.integers(len(others)))]]
        (stray,) = _pick(other.facts, 1, rng)
        return _insert_at_random(_pick(on_topic, int(rng.integers(1, 3)), rng), stray, rng)
    if quality == "repeated":
        chosen = _pick(topic.facts, int(rng.integers(1, 3)), rng)
        return [*chosen, chosen[int(rng.integers(len(chosen)))]]
    raise ValueError(f"unknown demonstration quality {quality!r}")


def sample_demonstrations(
    world: World, n: int, rng: np.random.Generator, split: str = "train"
) -> list[Demonstration]:
    """`n` SFT demonstrations of mixed quality for prompts of `split`, drawn with `rng`.

    Each demonstration picks a prompt uniformly, then a quality by this mixture
    (`DEMONSTRATION_MIXTURE`), and joins 1-4 sentences with single spaces:

    | quality   | share | response                                          | oracle reward |
    |-----------|-------|---------------------------------------------------|---------------|
    | good      | 35%   | 2-3 distinct facts of the topic                   | +2 to +3      |
    | mediocre  | 30%   | 1-2 vague sentences and at most one fact          | +0.25 to +1.5 |
    | wrong     | 15%   | 1-2 on-topic facts/vague sentences, a wrong claim | -0.75 to +1   |
    | off_topic | 10%   | 1-2 on-topic facts/vague sentences + another      | -0.25 to +1.5 |
    |           |       | topic's fact                                      |               |
    | repeated  | 10%   | 1-2 facts, then one of them again                 | +0.5 to +1.5  |

    The SFT policy imitates this mixture, so it is mediocre on purpose (mean
    oracle reward about 1.3, see tests/test_world.py) and alignment has room to
    move it toward the "good" row. Same `rng` state, same demonstrations.
    """
    prompts = world.prompts(split)
    names = [name for name, _, _ in DEMONSTRATION_MIXTURE]
    probs = np.array([p for _, p, _ in DEMONSTRATION_MIXTURE])
    out = []
    for _ in range(n):
        prompt = prompts[int(rng.integers(len(prompts)))]
        quality = names[int(rng.choice(len(names), p=probs))]
        sentences = _demonstration_sentences(world, world.topics[prompt.topic], quality, rng)
        out.append(Demonstration(prompt.text, " ".join(sentences), quality))
    return out
