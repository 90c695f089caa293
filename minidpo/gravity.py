"""The seed card's worked example, "Explain gravity.", computed number by number.

One preference pair, four log-probabilities and beta = 0.1 (``data/gravity_example.json``)
go through the DPO loss (Eq. 7 of Rafailov et al. 2023, arXiv 2305.18290) twice:
once with the torch loss of ``minidpo.losses`` (autograd for the gradients) and once
with the hand-derived float64 NumPy reference of ``minidpo.numpy_ref``. ``render``
prints the walk-through with each number's equation, both implementations side by
side, and why the card prints 0.549 where the exact loss is 0.5501.

Left out: where the log-probabilities come from. The card's numbers are given, not
computed by a model; ``minidpo.logprobs`` computes such numbers for real sequences.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from minidpo import numpy_ref
from minidpo.errors import MinidpoError
from minidpo.losses import preference_loss
from minidpo.resources import data_dir

DEFAULT_PATH = data_dir() / "gravity_example.json"  # in the checkout or the wheel
FORMAT, VERSION = "minidpo-gravity-example", 1
_LOGP_KEYS = ("policy_chosen_logp", "ref_chosen_logp", "policy_rejected_logp", "ref_rejected_logp")


@dataclass(frozen=True)
class GravityExample:
    """The card's inputs and the two numbers it prints."""

    prompt: str
    chosen: str
    rejected: str
    policy_chosen_logp: float  # log pi_theta(y_w|x)
    ref_chosen_logp: float  # log pi_ref(y_w|x)
    policy_rejected_logp: float  # log pi_theta(y_l|x)
    ref_rejected_logp: float  # log pi_ref(y_l|x)
    beta: float
    card_sigmoid: float  # sigma(beta h) as the card prints it
    card_loss: float  # the loss as the card prints it


@dataclass(frozen=True)
class PairNumbers:
    """Every intermediate number of the DPO loss on one pair, from one implementation."""

    chosen_logratio: float  # log pi_theta(y_w|x) - log pi_ref(y_w|x)
    rejected_logratio: float  # log pi_theta(y_l|x) - log pi_ref(y_l|x)
    h: float  # chosen_logratio - rejected_logratio
    margin: float  # beta h = r_hat(y_w) - r_hat(y_l), TRL's rewards/margins
    sigmoid: float  # sigma(beta h), the Bradley-Terry probability that y_w wins
    loss: float  # -log sigma(beta h)
    grad_chosen: float  # dL / d log pi_theta(y_w|x)
    grad_rejected: float  # dL / d log pi_theta(y_l|x)
    chosen_reward: float  # beta * chosen_logratio
    rejected_reward: float  # beta * rejected_logratio

    def values(self) -> tuple[float, ...]:
        return tuple(getattr(self, k) for k in self.__dataclass_fields__)


@dataclass(frozen=True)
class GravityResult:
    """Both implementations' numbers, their agreement, and the card's rounding explained."""

    example: GravityExample
    torch: PairNumbers
    numpy: PairNumbers
    max_abs_diff: float  # max over all numbers of |torch - numpy|
    loss_from_card_sigmoid: float  # -ln(card_sigmoid), the card's rounded sigma carried on
    loss_from_card_sigmoid_cut: float  # that, cut (not rounded) to three decimals


def load_example(path: str | Path | None = None) -> GravityExample:
    """Read and validate the example file; MinidpoError naming the file on any problem."""
    path = Path(path) if path is not None else DEFAULT_PATH
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise MinidpoError(f"{path}: cannot read gravity example: {e.strerror}") from None
    except json.JSONDecodeError as e:
        raise MinidpoError(f"{path}:{e.lineno}: not valid JSON: {e.msg}") from None
    except UnicodeDecodeError as e:
        raise MinidpoError(f"{path}: not UTF-8 text (byte at offset {e.start})") from None
    if not isinstance(raw, dict):
        raise MinidpoError(f"{path}: expected a JSON object")
    if raw.get("format") != FORMAT or raw.get("version") != VERSION:
        raise MinidpoError(
            f"{path}: expected format {FORMAT!r} version {VERSION}, "
            f"got {raw.get('format')!r} version {raw.get('version')!r}"
        )

    def number(obj: dict, key: str, where: str = "") -> float:
        if key not in obj:
            raise MinidpoError(f"{path}: missing key {where}{key!r}")
        v = obj[key]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise MinidpoError(f"{path}: {where}{key!r} must be a finite number, got {v!r}")
        return float(v)

    for key in ("prompt", "chosen", "rejected"):
        if not isinstance(raw.get(key), str) or not raw[key].strip():
            raise MinidpoError(f"{path}: {key!r} must be a non-empty string")
    logps = {k: number(raw, k) for k in _LOGP_KEYS}
    for k, v in logps.items():
        if v > 0:
            raise MinidpoError(f"{path}: {k!r} is a log-probability and must be <= 0, got {v}")
    beta = number(raw, "beta")
    if beta <= 0:
        raise MinidpoError(f"{path}: 'beta' must be > 0, got {beta}")
    card = raw.get("card_printed")
    if not isinstance(card, dict):
        raise MinidpoError(f"{path}: 'card_printed' must be an object with 'sigmoid' and 'loss'")
    card_sigmoid = number(card, "sigmoid", "card_printed.")
    if not 0 < card_sigmoid < 1:
        raise MinidpoError(f"{path}: 'card_printed.sigmoid' must be in (0, 1), got {card_sigmoid}")
    return GravityExample(
        prompt=raw["prompt"], chosen=raw["chosen"], rejected=raw["rejected"], **logps,
        beta=beta, card_sigmoid=card_sigmoid, card_loss=number(card, "loss", "card_printed."),
    )  # fmt: skip


def _torch_numbers(ex: GravityExample) -> PairNumbers:
    t = lambda x: torch.tensor([x], dtype=torch.float64, requires_grad=True)  # noqa: E731
    pc, rc, pr, rr = (t(getattr(ex, k)) for k in _LOGP_KEYS)
    out = preference_loss(pc, pr, rc, rr, beta=ex.beta)  # Eq. 7, arXiv 2305.18290
    out.losses.sum().backward()
    h = (pc - rc) - (pr - rr)
    return PairNumbers(
        chosen_logratio=(pc - rc).item(),
        rejected_logratio=(pr - rr).item(),
        h=h.item(),
        margin=(out.chosen_rewards - out.rejected_rewards).item(),
        sigmoid=torch.sigmoid(ex.beta * h).item(),  # Eq. 1 with the rewards of Eq. 5
        loss=out.losses.item(),
        grad_chosen=pc.grad.item(),
        grad_rejected=pr.grad.item(),
        chosen_reward=out.chosen_rewards.item(),
        rejected_reward=out.rejected_rewards.item(),
    )


def _numpy_numbers(ex: GravityExample) -> PairNumbers:
    pc, rc, pr, rr = (np.array([getattr(ex, k)]) for k in _LOGP_KEYS)
    out = numpy_ref.preference_loss(pc, pr, rc, rr, beta=ex.beta)  # Eq. 7, hand gradients
    h = (pc - rc) - (pr - rr)
    return PairNumbers(
        chosen_logratio=float((pc - rc)[0]),
        rejected_logratio=float((pr - rr)[0]),
        h=float(h[0]),
        margin=float((out.chosen_rewards - out.rejected_rewards)[0]),
        sigmoid=float(numpy_ref.sigmoid(ex.beta * h)[0]),
        loss=float(out.losses[0]),
        grad_chosen=float(out.grad_policy_chosen[0]),
        grad_rejected=float(out.grad_policy_rejected[0]),
        chosen_reward=float(out.chosen_rewards[0]),
        rejected_reward=float(out.rejected_rewards[0]),
    )


def compute(example: GravityExample) -> GravityResult:
    """Every number of the example by both implementations, and the card's rounding."""
    a, b = _torch_numbers(example), _numpy_numbers(example)
    diff = max(abs(x - y) for x, y in zip(a.values(), b.values(), strict=True))
    from_card = -math.log(example.card_sigmoid)
    return GravityResult(
        example=example,
        torch=a,
        numpy=b,
        max_abs_diff=diff,
        loss_from_card_sigmoid=from_card,
        loss_from_card_sigmoid_cut=math.floor(from_card * 1000) / 1000,
    )


_STEPS = (  # (field, label, equation)
    ("chosen_logratio", "log-ratio, chosen", "log pi_theta(y_w|x) - log pi_ref(y_w|x)"),
    ("rejected_logratio", "log-ratio, rejected", "log pi_theta(y_l|x) - log pi_ref(y_l|x)"),
    ("h", "h", "(1) - (2)"),
    ("margin", "margin beta*h", "r(y_w) - r(y_l), rewards of Eq. 5 (Z cancels)"),
    ("sigmoid", "sigma(beta*h)", "P(y_w > y_l), Bradley-Terry Eq. 1"),
    ("loss", "loss", "-log sigma(beta*h), Eq. 7"),
    ("grad_chosen", "dL/d log pi_theta(y_w|x)", "-beta * sigma(-beta*h)"),
    ("grad_rejected", "dL/d log pi_theta(y_l|x)", "+beta * sigma(-beta*h)"),
    ("chosen_reward", "implicit reward, chosen", "beta * (1), Eq. 5 less beta log Z(x)"),
    ("rejected_reward", "implicit reward, rejected", "beta * (2), Eq. 5 less beta log Z(x)"),
)


def render(result: GravityResult) -> str:
    """A readable walk-through of the example, number by number, each with its equation."""
    ex, t, n = result.example, result.torch, result.numpy
    lines = [
        "DPO on one preference pair: the seed card's worked example",
        "(Rafailov et al. 2023, arXiv 2305.18290; equations numbered as in the paper)",
        "",
        f"  prompt x          {ex.prompt!r}",
        f"  chosen y_w        {ex.chosen!r}",
        f"  rejected y_l      {ex.rejected!r}",
        f"  log pi_theta(y_w|x) = {ex.policy_chosen_logp:<+8.4g}"
        f"log pi_ref(y_w|x) = {ex.ref_chosen_logp:+.4g}",
        f"  log pi_theta(y_l|x) = {ex.policy_rejected_logp:<+8.4g}"
        f"log pi_ref(y_l|x) = {ex.ref_rejected_logp:+.4g}",
        f"  beta = {ex.beta:g}",
        "",
        f"  {'step':31}{'equation':48}{'torch':>9}{'numpy':>9}",
    ]
    for i, (field, label, eq) in enumerate(_STEPS, start=1):
        lines.append(
            f"  {i:>2} {label:28}{eq:48}{getattr(t, field):+9.4f}{getattr(n, field):+9.4f}"
        )
    lines.append(
        f"  torch (autograd, float64) and numpy (hand-derived gradients) agree to "
        f"{result.max_abs_diff:.1e} (max |difference|)."
    )
    lines += ["", *_reading(ex, t), "", *_card_rounding(result)]
    return "\n".join(lines) + "\n"


def _reading(ex: GravityExample, t: PairNumbers) -> list[str]:
    """What the gradient does, in words that follow from the sign of h."""
    weight = abs(t.grad_chosen)  # beta sigma(-beta h)
    if t.h > 0:
        how = f"already prefers y_w more than the reference does (h = {t.h:+.4f} > 0)"
        size = f"less than the beta/2 = {ex.beta / 2:.4f} it would get at h = 0"
    elif t.h < 0:
        how = f"prefers y_w less than the reference does (h = {t.h:+.4f} < 0)"
        size = f"more than the beta/2 = {ex.beta / 2:.4f} it would get at h = 0"
    else:
        how, size = "prefers y_w exactly as much as the reference (h = 0)", "exactly beta/2"
    return [
        f"  Reading it: the policy {how};",
        "  a gradient step raises log pi_theta(y_w|x) and lowers log pi_theta(y_l|x), each with",
        f"  weight beta sigma(-beta h) = {weight:.4f}, {size}.",
    ]


def _card_rounding(result: GravityResult) -> list[str]:
    """Explain the card's printed loss from the numbers, or say that they do not explain it."""
    ex, t = result.example, result.torch
    lines = [f"  The card prints sigma = {ex.card_sigmoid:.3f} and loss = {ex.card_loss:.3f}."]
    rounded_first = round(t.sigmoid, 3) == ex.card_sigmoid
    if rounded_first and math.isclose(result.loss_from_card_sigmoid_cut, ex.card_loss):
        lines += [
            f"  It rounded sigma(beta h) = {t.sigmoid:.6f} to {ex.card_sigmoid:.3f} first, and "
            f"-ln({ex.card_sigmoid:.3f}) = {result.loss_from_card_sigmoid:.4f}",
            f"  cut (not rounded) to three digits is {result.loss_from_card_sigmoid_cut:.3f}.",
        ]
    elif math.isclose(round(t.loss, 3), ex.card_loss):
        lines.append("  Both agree with the exact values rounded to three digits.")
    else:
        lines.append(
            f"  Rounding sigma first gives -ln({ex.card_sigmoid:.3f}) = "
            f"{result.loss_from_card_sigmoid:.4f}, which does not explain {ex.card_loss:.3f}."
        )
    lines.append(
        f"  Carried exactly, the loss is -ln({t.sigmoid:.6f}) = {t.loss:.6f}, i.e. {t.loss:.4f} "
        f"({t.loss:.3f} to three digits)."
    )
    return lines


if __name__ == "__main__":
    print(render(compute(load_example())), end="")
