"""The seed card's "Explain gravity." example: every printed number, and its loading."""

from __future__ import annotations

import json
import math
import re

import pytest

from minidpo.errors import MinidpoError
from minidpo.gravity import DEFAULT_PATH, compute, load_example, render

# (field, the number to 4 decimals): worked by hand from the card's inputs
EXPECTED = {
    "chosen_logratio": 1.8,  # -12.3 - (-14.1)
    "rejected_logratio": -1.3,  # -8.5 - (-7.2)
    "h": 3.1,
    "margin": 0.31,  # beta h = 0.1 * 3.1
    "sigmoid": 0.5769,  # 1 / (1 + e^-0.31) = 0.576885
    "loss": 0.5501,  # ln(1 + e^-0.31) = 0.550112
    "grad_chosen": -0.0423,  # -0.1 * sigma(-0.31) = -0.1 * 0.423115
    "grad_rejected": 0.0423,
    "chosen_reward": 0.18,
    "rejected_reward": -0.13,
}


@pytest.fixture(scope="module")
def result():
    return compute(load_example())


def test_the_example_file_holds_the_card_inputs():
    ex = load_example()
    assert ex.prompt == "Explain gravity."
    assert ex.chosen == "Gravity is the force that attracts objects with mass toward each other."
    assert ex.rejected == "Gravity is when things fall down."
    assert (ex.policy_chosen_logp, ex.ref_chosen_logp) == (-12.3, -14.1)
    assert (ex.policy_rejected_logp, ex.ref_rejected_logp) == (-8.5, -7.2)
    assert (ex.beta, ex.card_sigmoid, ex.card_loss) == (0.1, 0.577, 0.549)


@pytest.mark.parametrize("impl", ["torch", "numpy"])
@pytest.mark.parametrize(("field", "want"), list(EXPECTED.items()))
def test_each_number_to_four_decimals(result, impl, field, want):
    got = getattr(getattr(result, impl), field)
    assert round(got, 4) == pytest.approx(want, abs=1e-12), (impl, field, got)


def test_exact_values_to_float64_precision(result):
    s = 1 / (1 + math.exp(-0.31))
    for impl in (result.torch, result.numpy):
        assert impl.sigmoid == pytest.approx(s, rel=1e-14)
        assert impl.loss == pytest.approx(math.log1p(math.exp(-0.31)), rel=1e-14)
        assert impl.grad_chosen == pytest.approx(-0.1 * (1 - s), rel=1e-13)
        assert impl.grad_rejected == pytest.approx(0.1 * (1 - s), rel=1e-13)


def test_torch_and_numpy_agree(result):
    assert result.max_abs_diff <= 1e-14, result.max_abs_diff


def test_the_cards_0549_is_rounding_then_truncation(result):
    assert round(result.torch.sigmoid, 3) == 0.577  # the card rounded sigma first
    assert round(result.loss_from_card_sigmoid, 4) == pytest.approx(0.5499, abs=1e-12)
    assert result.loss_from_card_sigmoid_cut == pytest.approx(0.549, abs=1e-12)
    assert round(result.torch.loss, 3) == pytest.approx(0.550, abs=1e-12)  # not 0.549


def test_render_prints_every_number_and_the_explanation(result):
    text = render(result)
    for want in EXPECTED.values():
        cell = f"{want:+.4f}"
        # the torch and the numpy column both print it
        assert re.search(re.escape(cell) + r"\s+" + re.escape(cell), text), (cell, text)
    for piece in (
        "Eq. 7",
        "Eq. 5",
        "Eq. 1",
        "Explain gravity.",
        "0.576885 to 0.577 first",
        "-ln(0.577) = 0.5499",
        "to three digits is 0.549",
        "-ln(0.576885) = 0.550112, i.e. 0.5501",
    ):
        assert piece in text, (piece, text)
    assert max(len(line) for line in text.splitlines()) <= 100


def _write(tmp_path, obj_or_text):
    p = tmp_path / "example.json"
    p.write_text(obj_or_text if isinstance(obj_or_text, str) else json.dumps(obj_or_text))
    return p


def _good() -> dict:
    return json.loads(DEFAULT_PATH.read_text())


@pytest.mark.parametrize(
    ("mutate", "match"),
    [
        (lambda d: d.pop("beta"), "missing key 'beta'"),
        (lambda d: d.update(beta=0), "'beta' must be > 0"),
        (lambda d: d.update(beta="0.1"), "'beta' must be a finite number"),
        (lambda d: d.update(policy_chosen_logp=1.5), "'policy_chosen_logp' is a log-probability"),
        (lambda d: d.update(chosen=""), "'chosen' must be a non-empty string"),
        (lambda d: d.update(version=2), "version"),
        (lambda d: d["card_printed"].pop("loss"), "missing key card_printed.'loss'"),
        (lambda d: d.update(card_printed=[0.5]), "'card_printed' must be an object"),
    ],
)
def test_bad_files_name_the_file_and_the_problem(tmp_path, mutate, match):
    d = _good()
    mutate(d)
    p = _write(tmp_path, d)
    with pytest.raises(MinidpoError, match=re.escape(match)) as err:
        load_example(p)
    assert str(p) in str(err.value) and "\n" not in str(err.value)


def test_unreadable_and_malformed_files(tmp_path):
    with pytest.raises(MinidpoError, match="cannot read"):
        load_example(tmp_path / "missing.json")
    p = _write(tmp_path, '{\n  "format": ,\n}')
    with pytest.raises(MinidpoError, match=re.escape(f"{p}:2: not valid JSON")):
        load_example(p)


def test_a_different_pair_renders_without_the_card_explanation(tmp_path):
    d = _good()
    d.update(policy_chosen_logp=-16.0)  # h = -0.6 < 0 now; the card's printed numbers no longer fit
    text = render(compute(load_example(_write(tmp_path, d))))
    assert "prefers y_w less than the reference does" in text
    assert "does not explain" in text
