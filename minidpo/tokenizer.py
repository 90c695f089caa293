"""A byte-level BPE tokenizer trained from scratch, served by `tiktoken`.

What it is: GPT-2-style byte-level byte-pair encoding (Sennrich et al., ACL 2016,
arXiv 1508.07909; byte-level as in GPT-2, Radford et al. 2019). Text is split into
pretokens with the GPT-2 regex, each pretoken becomes UTF-8 bytes (ids 0..255),
and merges learned on a corpus glue adjacent tokens into new ids 256, 257, ...
One special token, ``<|endoftext|>``, takes the id after the last merge.
Training (`train_bpe`) and a reference encoder (`Tokenizer.encode_slow`) are
plain Python you can read top to bottom; `Tokenizer.encode` hands the same
vocabulary to a `tiktoken.Encoding`, whose Rust core is faster and gives the same ids.

The merge rule (why `encode_slow` is not minbpe's encoder): tiktoken does not
look up merge *pairs*; it repeatedly merges the adjacent pair whose
concatenated *bytes* have the lowest rank (leftmost on ties), and a pretoken
whose bytes are a whole token becomes that token at once. A pair-based encoder
(minbpe's) can disagree when one byte string is reachable by two splits, e.g.
``"ab" + "c"`` and ``"a" + "bc"``. So `encode_slow` implements tiktoken's rule,
and the trainer keeps every word in the state that very encoder produces: after
each merge it re-encodes the words the new token touches. In that state no
adjacent pair ever spells an existing token, so every merge makes new bytes,
the byte -> rank table tiktoken needs is well defined, and the counts the
trainer sees are the counts of the ids the encoder will emit. (On the corpora
tried, the merges equal those of plain pair-by-pair training; the re-encoding
makes the agreement a guarantee instead of an observation.)

The special token: ``<|endoftext|>`` written in user text is ordinary text.
`encode` treats the input as ordinary text throughout (tiktoken's
``encode_ordinary``), so ``encode("a<|endoftext|>")`` never contains `eot_id`
and decodes back to the same string; only code appends `eot_id` (the end of a
response). The catch: `decode` renders `eot_id` as the same literal, so a
decoded string alone cannot tell the two apart; work with ids when it matters.

What it leaves out: other special tokens, normalisation (NFC etc.), byte
shuffling (GPT-2 permutes the first 256 ids; here id i is byte i), a minimum
pair frequency, and streaming over corpora that do not fit in memory.
"""

from __future__ import annotations

import itertools
import json
import os
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import regex
import tiktoken

from minidpo.atomic import atomic_write_json
from minidpo.errors import MinidpoError

# The pretokenizer of GPT-2 (openai/gpt-2 src/encoder.py): contractions, words with
# an optional leading space, numbers, punctuation runs, and whitespace.
GPT2_SPLIT_PATTERN = (
    r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
)
EOT = "<|endoftext|>"

FORMAT = "minidpo-bpe"
VERSION = 1


# ---------------------------------------------------------------- training helpers


def get_stats(
    ids: list[int], counts: dict[tuple[int, int], int] | None = None
) -> dict[tuple[int, int], int]:
    """Count each adjacent pair of `ids`, adding to `counts` if given.

    Example: get_stats([1, 2, 3, 1, 2]) -> {(1, 2): 2, (2, 3): 1, (3, 1): 1}
    """
    counts = {} if counts is None else counts
    for pair in itertools.pairwise(ids):
        counts[pair] = counts.get(pair, 0) + 1
    return counts


def merge(ids: list[int], pair: tuple[int, int], idx: int) -> list[int]:
    """Replace every occurrence of `pair` in `ids`, scanning left to right, with `idx`.

    Example: merge([1, 2, 3, 1, 2], (1, 2), 4) -> [4, 3, 4]
    Example: merge([5, 5, 5], (5, 5), 6) -> [6, 5]   (leftmost first, no overlap)
    """
    out = []
    i = 0
    while i < len(ids):
        if i + 1 < len(ids) and (ids[i], ids[i + 1]) == pair:
            out.append(idx)
            i += 2
        else:
            out.append(ids[i])
            i += 1
    return out


def bpe_piece(piece: bytes, ranks: dict[bytes, int]) -> list[int]:
    """Encode one pretoken the way tiktoken does (its `byte_pair_merge`).

    A piece that is a whole token is that token. Otherwise start from single
    bytes and repeatedly merge the adjacent pair whose concatenated bytes have
    the lowest rank, the leftmost one on ties, until no pair is a token.

    Example: with ranks {b"a": 97, b"b": 98, b"c": 99, b"bc": 256, b"ab": 257, b"abc": 258},
    bpe_piece(b"abcab", ranks) -> [258, 257]: merge b"bc" (256), then b"ab" (257), then
    b"a" + b"bc", which spells b"abc" (258) although that merge was recorded as b"ab" + b"c".
    """
    if piece in ranks:
        return [ranks[piece]]
    parts = [piece[i : i + 1] for i in range(len(piece))]
    while len(parts) > 1:
        best_rank, best_i = None, -1
        for i in range(len(parts) - 1):
            rank = ranks.get(parts[i] + parts[i + 1])
            if rank is not None and (best_rank is None or rank < best_rank):
                best_rank, best_i = rank, i
        if best_rank is None:
            break
        parts[best_i : best_i + 2] = [parts[best_i] + parts[best_i + 1]]
    return [ranks[p] for p in parts]


def train_bpe(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """Learn `vocab_size - 257` merges from `texts` (256 bytes + merges + ``<|endoftext|>``).

    Each text is split with `GPT2_SPLIT_PATTERN`; identical pretokens ("words")
    are counted once, so a step costs the number of distinct words touched, not
    the corpus size. Every step merges the most frequent adjacent pair, counted
    over words weighted by frequency; ties go to the smallest pair (a, b), so
    training is deterministic. After a merge the words that contain the new
    token's bytes are re-encoded with `bpe_piece` (see the module docstring).

    Stops early, with fewer merges than asked, when no word has two tokens left
    (a tiny corpus); check the returned tokenizer's `vocab_size`.
    """
    if vocab_size < 257:
        raise MinidpoError(f"vocab_size must be at least 257 (256 bytes + {EOT}), got {vocab_size}")
    pattern = regex.compile(GPT2_SPLIT_PATTERN)
    word_freq: Counter[bytes] = Counter()
    for text in texts:
        word_freq.update(w.encode("utf-8") for w in pattern.findall(text))
    if not word_freq:
        raise MinidpoError("cannot train a tokenizer on an empty corpus (no text found)")

    words = list(word_freq)  # distinct pretokens as bytes
    freqs = [word_freq[w] for w in words]
    word_of_bytes = {w: i for i, w in enumerate(words)}
    ids = [list(w) for w in words]  # current encoding of each word
    vocab = [bytes([b]) for b in range(256)]  # id -> bytes
    ranks = {v: i for i, v in enumerate(vocab)}  # bytes -> id (= rank)

    stats: dict[tuple[int, int], int] = {}  # pair -> frequency-weighted count
    where: dict[bytes, set[int]] = {}  # bytes of an adjacent pair -> words holding it

    def account(i: int, sign: int) -> None:
        for a, b in itertools.pairwise(ids[i]):
            stats[(a, b)] = stats.get((a, b), 0) + sign * freqs[i]
            if stats[(a, b)] == 0:
                del stats[(a, b)]
            if sign > 0:
                where.setdefault(vocab[a] + vocab[b], set()).add(i)

    for i in range(len(words)):
        account(i, +1)

    merges: dict[tuple[int, int], int] = {}
    for idx in range(256, vocab_size - 1):
        if not stats:
            break  # every word is a single token: no merge left to learn
        top = max(stats.values())
        pair = min(p for p, c in stats.items() if c == top)
        new = vocab[pair[0]] + vocab[pair[1]]
        assert new not in ranks, "encoder state spells an existing token"  # see module doc
        merges[pair] = idx
        vocab.append(new)
        ranks[new] = idx
        touched = where.pop(new, set())
        if new in word_of_bytes:
            touched.add(word_of_bytes[new])  # the whole-word shortcut of bpe_piece
        for i in sorted(touched):
            account(i, -1)
            ids[i] = bpe_piece(words[i], ranks)
            account(i, +1)
        # `where` keeps stale entries for pairs a word lost; they only cost a re-encode.
    return Tokenizer(merges)


def coverage_problem(tok: Tokenizer, texts: Iterable[str], max_tokens_per_word: int) -> str | None:
    """The first way `tok` splits the words of `texts` badly, or None if it splits none.

    A word is a pretoken of the split pattern (" Gravity", with its leading space). Two
    things are checked, in this order: a word that is a space before a letter must not
    start with a lone " " token (the model would spell every later sentence's first word
    from a space it learns nothing from), and no word may take more than
    `max_tokens_per_word` tokens.

    Example: a tokenizer that never saw " Moon" gives
    "' Moon' starts with a lone ' ' token: [32, ...]".
    """
    words = sorted({w for text in texts for w in tok._compiled.findall(text)})
    encoded = dict(zip(words, tok.encode_batch(words), strict=True))
    lone = tok.ranks.get(b" ")
    for w, ids in encoded.items():
        if len(w) > 1 and w[0] == " " and w[1].isalpha() and ids[0] == lone and len(ids) > 1:
            return f"{w!r} starts with a lone ' ' token: {ids}"
    for w, ids in encoded.items():
        if len(ids) > max_tokens_per_word:
            return f"{w!r} takes {len(ids)} tokens (at most {max_tokens_per_word} allowed): {ids}"
    return None


# ---------------------------------------------------------------- the tokenizer


class Tokenizer:
    """A trained byte-level BPE vocabulary: merges in rank order plus ``<|endoftext|>``.

    `merges` maps a pair of ids to the id it merges into, in the order learned
    (ids 256, 257, ...; the id is the rank). `eot_id` = 256 + len(merges) and
    `vocab_size` = eot_id + 1.
    """

    def __init__(
        self, merges: dict[tuple[int, int], int], pattern: str = GPT2_SPLIT_PATTERN
    ) -> None:
        self.merges = dict(merges)
        self.pattern = pattern
        self._vocab = _vocab_from_merges(list(self.merges.items()), "merges")
        self.ranks = {v: i for i, v in enumerate(self._vocab)}  # bytes -> id
        self.eot_id = 256 + len(self.merges)
        self.vocab_size = self.eot_id + 1
        self._compiled = regex.compile(pattern)
        self._encoding: tiktoken.Encoding | None = None

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size}, eot_id={self.eot_id})"

    def __reduce__(self) -> tuple:
        return (Tokenizer, (self.merges, self.pattern))

    @property
    def encoding(self) -> tiktoken.Encoding:
        """The same vocabulary as a `tiktoken.Encoding` (built on first use, then cached)."""
        if self._encoding is None:
            self._encoding = tiktoken.Encoding(
                name=f"minidpo-bpe-{self.vocab_size}",
                pat_str=self.pattern,
                mergeable_ranks=dict(self.ranks),
                special_tokens={EOT: self.eot_id},
            )
        return self._encoding

    def encode(self, text: str) -> list[int]:
        """Ids of `text`, all of it ordinary text (a literal ``<|endoftext|>`` included)."""
        return self.encoding.encode_ordinary(text)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """`encode` of each text (tiktoken runs them on a thread pool)."""
        return self.encoding.encode_ordinary_batch(list(texts))

    def encode_slow(self, text: str) -> list[int]:
        """The pure-Python reference for `encode`: same split, same merge rule, same ids."""
        out: list[int] = []
        for piece in self._compiled.findall(text):
            out.extend(bpe_piece(piece.encode("utf-8"), self.ranks))
        return out

    def decode(self, ids: Iterable[int]) -> str:
        """Text of `ids`; `eot_id` becomes ``<|endoftext|>``, invalid UTF-8 becomes U+FFFD."""
        return self.encoding.decode(list(ids), errors="replace")

    # ------------------------------------------------------------ persistence

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready description (what `save` writes; a checkpoint can embed it)."""
        return {
            "format": FORMAT,
            "version": VERSION,
            "pattern": self.pattern,
            "merges": [[a, b] for (a, b) in self.merges],
            "special_tokens": {EOT: self.eot_id},
        }

    @classmethod
    def from_dict(cls, d: Any, where: str = "tokenizer") -> Tokenizer:
        """Rebuild from `to_dict` output; MinidpoError (prefixed by `where`) if malformed."""
        if not isinstance(d, dict):
            raise MinidpoError(f"{where}: expected a JSON object, got {type(d).__name__}")
        if d.get("format") != FORMAT:
            raise MinidpoError(f"{where}: format is {d.get('format')!r}, expected {FORMAT!r}")
        if d.get("version") != VERSION:
            raise MinidpoError(f"{where}: version {d.get('version')!r} is not supported")
        pattern = d.get("pattern")
        if not isinstance(pattern, str):
            raise MinidpoError(f"{where}: 'pattern' must be a string")
        try:
            regex.compile(pattern)
        except regex.error as e:
            raise MinidpoError(f"{where}: 'pattern' does not compile: {e}") from None
        raw = d.get("merges")
        if not isinstance(raw, list) or not all(
            isinstance(m, list)
            and len(m) == 2
            and all(isinstance(x, int) and not isinstance(x, bool) for x in m)
            for m in raw
        ):
            raise MinidpoError(f"{where}: 'merges' must be a list of [int, int] pairs")
        merges = {(a, b): 256 + i for i, (a, b) in enumerate(raw)}
        if len(merges) != len(raw):
            raise MinidpoError(f"{where}: 'merges' lists the same pair twice")
        _vocab_from_merges(list(merges.items()), f"{where}: merges")
        if d.get("special_tokens") != {EOT: 256 + len(merges)}:
            raise MinidpoError(
                f"{where}: 'special_tokens' must be {{{EOT!r}: {256 + len(merges)}}}, "
                f"got {d.get('special_tokens')!r}"
            )
        tok = cls(merges, pattern)
        try:  # tiktoken's regex engine is not `regex`: a pattern one takes, the other may refuse
            tok.encoding  # noqa: B018 (built here so a bad pattern fails at load, by name)
        except ValueError as e:
            first = str(e).splitlines()[0][:120]
            raise MinidpoError(f"{where}: 'pattern' is not one tiktoken can run: {first}") from None
        return tok

    def save(self, path: str | os.PathLike) -> Path:
        """Write `to_dict` as JSON to `path`, atomically."""
        return atomic_write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | os.PathLike) -> Tokenizer:
        """Read a file written by `save`; MinidpoError naming `path` if it is not one."""
        try:
            text = Path(path).read_text(encoding="utf-8")
        except FileNotFoundError:
            raise MinidpoError(f"{path}: tokenizer file not found") from None
        except (OSError, UnicodeDecodeError) as e:
            raise MinidpoError(f"{path}: cannot read tokenizer file: {e}") from None
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise MinidpoError(f"{path}:{e.lineno}: invalid JSON: {e.msg}") from None
        return cls.from_dict(d, where=str(path))


def _vocab_from_merges(items: list[tuple[tuple[int, int], int]], where: str) -> list[bytes]:
    """id -> bytes for 256 bytes plus `items` ((a, b) -> id); checks ids and uniqueness."""
    vocab = [bytes([b]) for b in range(256)]
    seen = set(vocab)
    for n, ((a, b), idx) in enumerate(items):
        if idx != 256 + n:
            raise MinidpoError(f"{where}: merge #{n} has id {idx}, expected {256 + n}")
        if not (0 <= a < idx and 0 <= b < idx):
            raise MinidpoError(f"{where}: merge #{n} ({a}, {b}) uses an id not yet defined")
        new = vocab[a] + vocab[b]
        if new in seen:
            raise MinidpoError(f"{where}: merge #{n} ({a}, {b}) repeats the bytes {new!r}")
        seen.add(new)
        vocab.append(new)
    return vocab
