"""One writer per run folder: a second process stops at once naming the holder; a lock
left by a killed process is taken over."""

import os
import signal
import subprocess
import sys
import textwrap

import pytest

from minidpo import lock
from minidpo.cli import main
from minidpo.errors import MinidpoError

HOLDER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from minidpo.lock import hold
    hold(Path(sys.argv[1]))
    print("held", flush=True)
    time.sleep(60)
    """
)


@pytest.fixture
def holder(tmp_path):
    """Another process holding the lock of tmp_path/runs/x until it is killed."""
    folder = tmp_path / "runs" / "x"
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(folder)], stdout=subprocess.PIPE,
                            text=True)  # fmt: skip
    assert proc.stdout.readline().strip() == "held"
    yield folder, proc
    proc.kill()
    proc.wait()


def test_a_second_process_is_refused_naming_the_holder(holder):
    folder, proc = holder
    with pytest.raises(
        MinidpoError, match=rf"in use by another minidpo process \(pid {proc.pid}\)"
    ):
        lock.hold(folder)


def test_a_command_on_a_locked_run_exits_2_with_one_line_and_writes_nothing(holder, capsys):
    folder, proc = holder
    code = main(["tokenizer", "--preset", "tiny", "--runs-dir", str(folder.parent), "--name", "x"])
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 2 and len(err) == 1 and f"pid {proc.pid}" in err[0], err
    assert sorted(p.name for p in folder.iterdir()) == [".lock"]  # nothing else written


def test_a_killed_holders_lock_is_taken_over(holder):
    folder, proc = holder
    proc.send_signal(signal.SIGKILL)  # dies without releasing: the lock is stale
    proc.wait()
    lock.hold(folder)
    assert (folder / ".lock").read_text().strip() == str(os.getpid())
    lock._release(folder / ".lock")
    assert not (folder / ".lock").exists()
