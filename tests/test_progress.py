"""minidpo.progress: tqdm on a terminal; off one, a bounded number of plain lines, no redraws."""

from __future__ import annotations

import io

from tqdm import tqdm

from minidpo.progress import INTERVAL_S, PlainProgress, progress


class FakeClock:
    """A clock the test advances by hand: no sleeping, fully deterministic."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class TTY(io.StringIO):
    def isatty(self) -> bool:
        return True


def _run(steps: int, dt: float, **kw) -> tuple[list[int], str]:
    """Loop `steps` times over range(steps), each step taking `dt` seconds of fake time."""
    stream, clock = io.StringIO(), FakeClock()
    bar = progress(range(steps), desc="sft", stream=stream, clock=clock, **kw)
    seen = []
    for step in bar:
        seen.append(step)
        clock.now += dt
        bar.set_postfix(loss=f"{1 / (step + 1):.3f}", tok_s=12000.0)
    bar.close()
    return seen, stream.getvalue()


def test_non_tty_output_has_no_redraws_and_bounded_lines():
    # 100,000 steps of 10 ms = 1,000 s: at most one line per 30 s, plus the final one.
    _, out = _run(100_000, 0.01)
    assert "\r" not in out and "\x1b" not in out
    lines = out.splitlines()
    assert 2 <= len(lines) <= 1000 / INTERVAL_S + 2
    assert lines[0].startswith("sft: step ") and lines[0].endswith(" s)")


def test_a_fast_loop_prints_only_the_final_line_with_the_postfix():
    seen, out = _run(3000, 0.001)  # 3 s in all: never reaches the 30 s interval
    assert out == "sft: step 3000/3000, loss=0.000, tok_s=12000 (3 s)\n"
    assert seen == list(range(3000))


def test_throttled_lines_show_progress_and_elapsed_time():
    _, out = _run(100, 1.0, interval=30.0)  # one step a second for 100 s
    assert out.splitlines() == [
        "sft: step 30/100, loss=0.033, tok_s=12000 (30 s)",
        "sft: step 60/100, loss=0.017, tok_s=12000 (60 s)",
        "sft: step 90/100, loss=0.011, tok_s=12000 (90 s)",
        "sft: step 100/100, loss=0.010, tok_s=12000 (100 s)",
    ]


def test_final_line_on_close_after_break_printed_once():
    stream, clock = io.StringIO(), FakeClock()
    bar = progress(range(10, 50), desc="dpo", initial=10, stream=stream, clock=clock)
    for step in bar:
        clock.now += 2.0
        bar.set_postfix({"loss": "0.693"})
        if step == 19:
            break
    bar.close()
    bar.close()
    assert stream.getvalue() == "dpo: step 20/50, loss=0.693 (20 s)\n"


def test_the_last_throttled_line_is_not_repeated_as_the_final_line():
    _, out = _run(60, 1.0, interval=30.0)
    assert out.splitlines() == [
        "sft: step 30/60, loss=0.033, tok_s=12000 (30 s)",
        "sft: step 60/60, loss=0.017, tok_s=12000 (60 s)",
    ]


def test_unsized_iterable_and_explicit_total():
    stream, clock = io.StringIO(), FakeClock()
    assert list(progress(iter("abc"), desc="x", stream=stream, clock=clock)) == list("abc")
    assert list(progress(iter("ab"), desc="y", total=5, stream=stream, clock=clock)) == ["a", "b"]
    assert stream.getvalue() == "x: step 3 (0 s)\ny: step 2/5 (0 s)\n"


def test_disabled_prints_nothing_and_yields_the_items_unchanged():
    items = [{"a": 1}, None, 3.5, "x"]
    for stream in (io.StringIO(), TTY()):
        bar = progress(items, desc="ppo", enabled=False, stream=stream, clock=FakeClock())
        got = list(bar)
        bar.set_postfix(kl="0.01")
        bar.close()
        assert got == items and all(g is i for g, i in zip(got, items, strict=True))
        assert stream.getvalue() == ""


def test_items_are_yielded_unchanged_when_enabled():
    items = [object() for _ in range(5)]
    bar = progress(items, desc="sft", stream=io.StringIO(), clock=FakeClock())
    assert isinstance(bar, PlainProgress)
    assert all(g is i for g, i in zip(bar, items, strict=True))


def test_a_terminal_gets_a_real_tqdm_bar_that_does_not_stay():
    stream = TTY()
    bar = progress(range(5), desc="sft", stream=stream)
    assert isinstance(bar, tqdm) and not bar.leave and bar.total == 5
    assert list(bar) == list(range(5))
    bar.set_postfix(loss="0.5")
    bar.close()
    resumed = progress(range(3, 8), desc="sft", initial=3, stream=TTY())
    assert resumed.n == 3 and resumed.total == 8
    resumed.close()
