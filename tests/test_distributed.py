"""torchrun: 2 CPU processes (gloo) train as 1 process does at the same global batch.

Each supervised trainer (sft, dpo, rm) is run at the tiny preset once by one process and
once by `torchrun --nproc-per-node 2`, and the two runs' metrics logs are compared row by
row: the same steps and token counts, and every step's training loss within `LOSS_TOL`.
The 2-process run folder holds the same files as the 1-process one (rank 0 writes them,
and nothing half-written is left behind); a second launch finds the stage up to date; a
1-process run killed after its first checkpoint is resumed by 2 processes to the curve of
an uninterrupted run. Under torchrun, a command that does not train across processes and
a batch the processes cannot share are bad input.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from minidpo import cli, distributed, threads, training
from minidpo.checkpoints import load_checkpoint
from minidpo.lock import release

# |2 processes - 1 process| of a step's train/loss: two sums of half-batch gradients
# against one sum over the whole batch, float32. Measured on the tiny preset (10-12
# steps): at most 9.5e-7 (sft, loss 7.5), 5.1e-7 (dpo), 1.2e-7 (rm).
LOSS_TOL = 5e-6
ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow


def _env() -> dict[str, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    env.pop("WORLD_SIZE", None)
    return env


def minidpo(args: list[str], processes: int = 1) -> subprocess.CompletedProcess:
    """`minidpo ARGS` in one process, or under torchrun with `processes` of them."""
    launch = [sys.executable, "-m", "minidpo"]
    if processes > 1:
        launch = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                  "--nproc-per-node", str(processes), "-m", "minidpo"]  # fmt: skip
    return subprocess.run([*launch, *args], env=_env(), capture_output=True, text=True,
                          timeout=300)  # fmt: skip


def _ok(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _files(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()} - {".lock"}


def same_curve(one: Path, two: Path) -> None:
    """The two metrics logs: the same rows, steps, tokens; train/loss within LOSS_TOL."""
    a, b = _rows(one), _rows(two)
    assert [r["step"] for r in a] == [r["step"] for r in b] and len(a) >= 10
    assert [r["tokens"] for r in a] == [r["tokens"] for r in b]
    assert [sorted(r) for r in a] == [sorted(r) for r in b]
    gaps = [abs(x["train/loss"] - y["train/loss"]) for x, y in zip(a, b, strict=True)]
    assert max(gaps) <= LOSS_TOL, gaps


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """A tiny run with its SFT policy and preference pairs (the dpo and rm inputs)."""
    runs = tmp_path_factory.mktemp("ddp") / "runs"
    for command in ("sft", "prefs"):
        _ok(minidpo([command, "--preset", "tiny", "--runs-dir", str(runs), "--name", "base"]))
    return runs


OUT = {"sft": "sft", "dpo": "dpo-sigmoid-beta0.1", "rm": "rm"}


@pytest.mark.parametrize("stage", ["sft", "dpo", "rm"])
def test_two_processes_train_as_one(stage, base):
    runs = base
    for name in (f"{stage}-one", f"{stage}-two"):
        shutil.rmtree(runs / name, ignore_errors=True)
        if stage != "sft":  # the same SFT policy and pairs for both
            shutil.copytree(runs / "base", runs / name)
    common = [stage, "--preset", "tiny", "--runs-dir", str(runs)]
    _ok(minidpo([*common, "--name", f"{stage}-one"]))
    two = _ok(minidpo([*common, "--name", f"{stage}-two"], processes=2))
    assert two.stdout.count(f"{stage}:") == 1, two.stdout  # one report: rank 0's
    one_dir, two_dir = runs / f"{stage}-one", runs / f"{stage}-two"
    same_curve(one_dir / OUT[stage] / "metrics.jsonl", two_dir / OUT[stage] / "metrics.jsonl")
    assert _files(two_dir) == _files(one_dir)  # rank 0 wrote them all, nothing half-written
    if stage == "sft":  # a second launch: rank 0 reads the stamp and every rank skips
        again = _ok(minidpo([*common, "--name", f"{stage}-two"], processes=2))
        assert "[sft] up to date" in again.stdout, again.stdout


def test_two_processes_resume_a_killed_run(base, monkeypatch, capsys):
    """A 1-process SFT run killed after its first checkpoint, resumed by 2 processes."""
    runs, args = base, ["sft", "--preset", "tiny", "--runs-dir", str(base), "--threads", "1"]
    shutil.rmtree(runs / "cut", ignore_errors=True)
    original = training._LoopState.checkpoint

    def checkpoint(self, step, finished):
        original(self, step, finished)
        if not finished:
            raise KeyboardInterrupt  # killed after the first intermediate checkpoint

    monkeypatch.setattr(training._LoopState, "checkpoint", checkpoint)
    assert cli.main([*args, "--name", "cut"]) == 130
    monkeypatch.undo()
    threads.configure(
        "auto"
    )  # --threads 1 held for this process: later in-process runs must not inherit it
    release(runs / "cut")  # as the killed process would, by exiting
    cut = load_checkpoint(runs / "cut" / "sft" / "checkpoint.pt")
    assert not cut["done"] and 0 < cut["step"] < len(_rows(runs / "base" / "sft" / "metrics.jsonl"))
    resumed = _ok(minidpo([*args[:-2], "--name", "cut"], processes=2))
    assert "[sft] resuming" in resumed.stdout, resumed.stdout
    same_curve(runs / "base" / "sft" / "metrics.jsonl", runs / "cut" / "sft" / "metrics.jsonl")


def test_a_batch_the_processes_cannot_share_is_refused(tmp_path):
    out = minidpo(["sft", "--preset", "tiny", "--runs-dir", str(tmp_path / "runs"),
                   "--name", "odd", "--batch-size", "7"], processes=2)  # fmt: skip
    assert out.returncode != 0
    lines = [ln for ln in out.stderr.splitlines() if ln.startswith("minidpo: error:")]
    assert lines and set(lines) == {
        "minidpo: error: --batch-size 7: torchrun's 2 processes must divide it"
    }, out.stderr[-2000:]
    assert not (tmp_path / "runs").exists()  # nothing written


@pytest.mark.parametrize("command", ["ppo", "grpo", "pipeline", "online-dpo"])
def test_a_command_that_stays_in_one_process_is_refused(command, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")
    code = cli.main([command, "--preset", "tiny", "--runs-dir", str(tmp_path), "--name", "x"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith(f"minidpo: error: torchrun: `minidpo {command}` runs in one process")
    assert not any(tmp_path.iterdir())


def test_in_one_process_the_helpers_change_nothing():
    import numpy as np
    import torch

    rows = np.arange(6)
    assert distributed.world() == 1 and distributed.is_writer()
    assert distributed.shard(rows) is rows
    value = torch.tensor(3.0)
    assert distributed.mean(value) is value
    metrics = {"loss": 0.5, "tokens": 7}
    assert distributed.mean_metrics(metrics) is metrics
    assert distributed.from_main(lambda: 42) == 42
    model = torch.nn.Linear(2, 2)
    assert distributed.wrap(model) is model


def test_a_malformed_world_size_is_bad_input(monkeypatch, capsys, tmp_path):
    monkeypatch.setenv("WORLD_SIZE", "two")
    assert cli.main(["sft", "--preset", "tiny", "--runs-dir", str(tmp_path)]) == 2
    assert capsys.readouterr().err.strip() == (
        "minidpo: error: WORLD_SIZE: must be a whole number >= 1, got 'two'"
    )


def test_a_rank_ends_with_its_code_after_the_exit_work(tmp_path):
    """`end_process` skips the C++ destructors but not Python's exit work: the atexit
    handlers run (the lock's release is one), buffered output is flushed, the code kept."""
    marker = tmp_path / "atexit-ran"
    code = (
        "import atexit, pathlib, sys\n"
        "from minidpo import distributed\n"
        f"atexit.register(pathlib.Path({str(marker)!r}).write_text, 'yes')\n"
        "sys.stdout.write('unflushed')\n"
        "distributed.end_process(3)\n"
        "print('not reached')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], env=_env(), capture_output=True,
                         text=True, timeout=60)  # fmt: skip
    assert out.returncode == 3, out.stderr
    assert out.stdout == "unflushed" and marker.read_text() == "yes"
