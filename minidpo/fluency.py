"""Where a policy's probability leaves the world: the off-world mass at every token.

A response is in the world when it is a sequence of the world's sentences (any topic,
any kind, repeats allowed) joined by single spaces and closed by end-of-text. At every
prefix of such a response only some next tokens keep it in the world: the tokens that
continue a sentence of the world, and at a sentence boundary also the first token of a
next sentence or end-of-text. `WorldGrammar` holds those sets as a trie over token ids.

`off_world_mass` teacher-forces a policy on in-world responses and sums, position by
position, the probability it puts on every other token. To first order the expected
number of such slips per response is the share of its samples that leave the world
(the oracle's "unparseable"): sum_t leak_t ~ 1 - prod_t (1 - leak_t) while leaks are
small. Split by position kind, it says whether a fluent-but-imperfect policy slips at
its first token, after a sentence (the next sentence's first token or end-of-text: the
right distribution is spread over many choices) or inside a sentence (where it is
nearly deterministic).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from minidpo.batching import build_batch
from minidpo.tokenizer import Tokenizer
from minidpo.world import World, format_prompt

POSITION_KINDS = ("first token", "after a sentence", "inside a sentence")


@dataclass
class _Node:
    children: dict[int, _Node]
    complete: bool = False  # a whole sentence ends here


class WorldGrammar:
    """The next tokens that keep a response in the world, after any in-world prefix.

    Two tries: sentences as a response opens them ("Gravity is ...") and as they follow
    another sentence (" Gravity is ..."); the tokenizer learned both forms (see
    `World.corpus`), and a response's ids are the concatenation of those pieces.
    """

    def __init__(self, world: World, tok: Tokenizer) -> None:
        self.eot_id = tok.eot_id
        self.opening = _Node({})
        self.continuation = _Node({})
        for s in world.sentences():
            for root, text in ((self.opening, s), (self.continuation, " " + s)):
                node = root
                for t in tok.encode(text):
                    node = node.children.setdefault(t, _Node({}))
                node.complete = True

    def walk(self, ids: Sequence[int]) -> list[tuple[str, frozenset[int]]]:
        """For each position of `ids` (a response, end-of-text included): its kind and
        the allowed next-token set before it. Raises ValueError if `ids` leaves the world."""
        out: list[tuple[str, frozenset[int]]] = []
        node: _Node | None = None  # None: at a boundary, before any sentence
        started = False
        for t in ids:
            if node is None:  # at the response start or after a whole sentence
                root = self.continuation if started else self.opening
                allowed = set(root.children) | ({self.eot_id} if started else set())
                kind = "after a sentence" if started else "first token"
            else:
                allowed = set(node.children)
                kind = "inside a sentence"
                if node.complete:  # a whole sentence that a longer one also begins
                    allowed |= set(self.continuation.children) | {self.eot_id}
                    kind = "after a sentence"
            out.append((kind, frozenset(allowed)))
            if t not in allowed:
                raise ValueError(f"token {t} at position {len(out) - 1} leaves the world")
            if t == self.eot_id:
                break
            if node is not None and node.complete and t not in node.children:
                node = None  # the sentence ended; t starts the next one
            if node is None:
                node = (self.continuation if started else self.opening).children[t]
                started = True
            else:
                node = node.children[t]
            if not node.children:
                node = None
        return out


@torch.no_grad()
def off_world_mass(
    model: torch.nn.Module,
    tok: Tokenizer,
    grammar: WorldGrammar,
    prompts: Sequence[str],
    responses: Sequence[str],
    batch_size: int = 64,
) -> dict[str, float]:
    """Mean over responses of the summed off-world probability, by position kind.

    `responses` must be in the world (demonstrations are). Returns one entry per
    `POSITION_KINDS` and "total"; each is an expected number of slips per response.
    """
    device = next(model.parameters()).device
    sums = dict.fromkeys(POSITION_KINDS, 0.0)
    for i in range(0, len(prompts), batch_size):
        ps = [tok.encode(format_prompt(p)) for p in prompts[i : i + batch_size]]
        rs = [[*tok.encode(r), tok.eot_id] for r in responses[i : i + batch_size]]
        batch = build_batch(ps, rs, pad_id=tok.eot_id).to(device)
        probs = torch.softmax(model(batch.input_ids).float(), dim=-1).cpu()
        for b, (p, r) in enumerate(zip(ps, rs, strict=True)):
            for j, (kind, allowed) in enumerate(grammar.walk(r)):
                row = probs[b, len(p) - 1 + j]
                sums[kind] += 1.0 - float(row[list(allowed)].sum())
    n = len(prompts)
    out = {k: v / n for k, v in sums.items()}
    out["total"] = sum(out.values())
    return out
