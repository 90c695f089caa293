"""The oracle reward r*(prompt, response): a pure, documented function of the text.

It plays the role of the sentiment classifier in the IMDb experiment of the DPO
paper (arXiv 2305.18290, Sec. 6.1): the ground truth every policy is measured
against, and the reward that labels preference pairs through Bradley-Terry.

The response is whitespace-normalised (runs of spaces, tabs and newlines become
one space; ends stripped), split after each ".", "!" or "?" followed by a space or
the end, and each sentence is scored in order by the first rule that applies:

| rule          | value | applies to                                                        |
|---------------|-------|-------------------------------------------------------------------|
| over_length   | -0.5  | each sentence after the 5th (it earns nothing else)               |
| repeated      | -0.5  | each repeat of a sentence already in the response (nothing else)  |
| fact          | +1.0  | each distinct correct fact of the asked topic                     |
| vague         | +0.25 | each distinct vague sentence of the asked topic, first 2 only     |
| vague_extra   |  0.0  | each distinct vague sentence of the asked topic after the 2nd     |
| wrong         | -1.0  | each wrong claim (of any topic)                                   |
| off_topic     | -0.5  | each fact or vague sentence of another topic                      |
| unparseable   | -1.0  | each sentence not in the world, or a trailing fragment without    |
|               |       | final punctuation; an empty response counts as one                |
| unterminated  | -1.0  | once, if the model never emitted end-of-text (terminated=False)   |

The total is clipped to [-5, +5]; +5 (five distinct facts) is also the most
any response can reach, so only the lower clip ever binds.

Why these numbers: gibberish is always unparseable, so a response without a
world sentence scores at most -1 and can never beat one correct fact (+1);
the seed pair is ordered (fact +1.0 > vague +0.25); a repeated fact costs
instead of paying, so repetition cannot farm reward; the vague cap and the
length limit stop padding.

What this leaves out: paraphrase, partial credit, order and style. A sentence
counts only if it is exactly one of the world's sentences.
"""

from __future__ import annotations

from dataclasses import dataclass

from minidpo.world import World, load_world, normalize_whitespace, split_sentences

MAX_SENTENCES = 5  # sentences after this many earn nothing and cost OVER_LENGTH
MAX_VAGUE_CREDITED = 2  # vague sentences after this many earn 0
REWARD_MIN, REWARD_MAX = -5.0, 5.0  # the documented clip range of the total


@dataclass(frozen=True)
class RewardRule:
    """One row of the reward table."""

    name: str
    value: float
    applies_to: str


REWARD_TABLE: tuple[RewardRule, ...] = (
    RewardRule("over_length", -0.5, f"each sentence after the {MAX_SENTENCES}th (nothing else)"),
    RewardRule("repeated", -0.5, "each repeat of a sentence already in the response"),
    RewardRule("fact", 1.0, "each distinct correct fact of the asked topic"),
    RewardRule(
        "vague",
        0.25,
        f"each distinct vague sentence of the asked topic, first {MAX_VAGUE_CREDITED}",
    ),
    RewardRule(
        "vague_extra",
        0.0,
        f"each vague sentence of the asked topic after the {MAX_VAGUE_CREDITED}nd",
    ),
    RewardRule("wrong", -1.0, "each wrong claim (of any topic)"),
    RewardRule("off_topic", -0.5, "each fact or vague sentence of another topic"),
    RewardRule(
        "unparseable",
        -1.0,
        "each sentence not in the world, or a trailing fragment; an empty response counts as one",
    ),
    RewardRule("unterminated", -1.0, "once, if the response never emitted end-of-text"),
)
RULE_VALUES: dict[str, float] = {rule.name: rule.value for rule in REWARD_TABLE}


@dataclass(frozen=True)
class RewardBreakdown:
    """How many times each rule fired, the unclipped sum, and the clipped total.

    `labels` pairs each sentence of the response with the rule that scored it.
    """

    fact: int
    vague: int
    vague_extra: int
    wrong: int
    off_topic: int
    repeated: int
    unparseable: int
    unterminated: int
    over_length: int
    raw: float  # sum over rules of count * value, before clipping
    total: float  # raw clipped to [REWARD_MIN, REWARD_MAX]
    labels: tuple[tuple[str, str], ...]


def reward_breakdown(
    prompt: str, response: str, *, terminated: bool = True, world: World | None = None
) -> RewardBreakdown:
    """Score `response` to `prompt` rule by rule (see the module table).

    `prompt` must be a prompt of the world (MinidpoError otherwise); a trailing
    newline from `format_prompt` is fine.
    """
    world = load_world() if world is None else world
    topic = world.topic_of(prompt)
    counts = {rule.name: 0 for rule in REWARD_TABLE}
    labels: list[tuple[str, str]] = []
    seen: set[str] = set()
    for k, sentence in enumerate(split_sentences(response)):
        if k >= MAX_SENTENCES:
            rule = "over_length"
        elif sentence in seen:
            rule = "repeated"
        else:
            found = world.classify(sentence)
            if found is None:
                rule = "unparseable"
            else:
                sentence_topic, kind = found
                if kind == "wrong":
                    rule = "wrong"
                elif sentence_topic != topic:
                    rule = "off_topic"
                elif kind == "fact":
                    rule = "fact"
                else:
                    rule = "vague" if counts["vague"] < MAX_VAGUE_CREDITED else "vague_extra"
        seen.add(sentence)
        counts[rule] += 1
        labels.append((sentence, rule))
    if not normalize_whitespace(response):
        counts["unparseable"] += 1  # an empty response scores like one unparseable sentence
    if not terminated:
        counts["unterminated"] += 1
    raw = sum(counts[name] * value for name, value in RULE_VALUES.items())
    total = min(REWARD_MAX, max(REWARD_MIN, raw))
    return RewardBreakdown(**counts, raw=raw, total=total, labels=tuple(labels))


def oracle_reward(
    prompt: str, response: str, *, terminated: bool = True, world: World | None = None
) -> float:
    """r*(prompt, response): the clipped total of `reward_breakdown`, in [-5, +5]."""
    return reward_breakdown(prompt, response, terminated=terminated, world=world).total


def reward_table_markdown() -> str:
    """The reward table as a Markdown table (for the README and reports)."""
    lines = ["| rule | value | applies to |", "| --- | ---: | --- |"]
    lines += [f"| {r.name} | {r.value:+.2f} | {r.applies_to} |" for r in REWARD_TABLE]
    lines.append(
        f"\nSentences are scored in this order, first match wins; at most {MAX_SENTENCES} "
        f"sentences are scored; the total is clipped to [{REWARD_MIN:+.0f}, {REWARD_MAX:+.0f}]."
    )
    return "\n".join(lines)
