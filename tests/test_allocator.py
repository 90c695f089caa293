"""The allocator setting: it takes effect (page faults per training step fall), it is read
from its environment variable, and a bad value is one line and exit 2."""

import json
import os
import platform
import subprocess
import sys

import pytest

from minidpo import allocator, cli
from minidpo.errors import MinidpoError

GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"

# 20 training steps of a small GPT (2 MB of logits a step) in a fresh process, counting
# the minor page faults (first touches of fresh pages) per step after 3 warm-up steps
_FAULTS = """
import json, resource, torch
from minidpo.allocator import keep_freed_memory
from minidpo.model import GPT, GPTConfig
applied = keep_freed_memory()
torch.manual_seed(0)
torch.set_num_threads(1)
m = GPT(GPTConfig(vocab_size=512, block_size=64, n_layer=2, n_head=2, n_embd=64))
opt = torch.optim.AdamW(m.parameters())
x = torch.randint(0, 512, (16, 64))
def step():
    loss = m(x).logsumexp(-1).mean()
    opt.zero_grad()
    loss.backward()
    opt.step()
for _ in range(3):
    step()
f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):
    step()
faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0) / 20
print(json.dumps({"applied": applied, "faults": faults}))
"""


def _faults_per_step(setting: str) -> dict:
    env = {**os.environ, allocator.ENV: setting}
    out = subprocess.run([sys.executable, "-c", _FAULTS], env=env, capture_output=True,
                         text=True, check=True)  # fmt: skip
    return json.loads(out.stdout)


@pytest.mark.skipif(not GLIBC, reason="the setting applies to glibc's malloc only")
def test_keeping_freed_memory_stops_the_page_faults() -> None:
    default, keep = _faults_per_step("default"), _faults_per_step("keep")
    assert (default["applied"], keep["applied"]) == (False, True)
    # measured: about 700 faults a step with glibc as it comes, about 50 kept
    assert default["faults"] > 200, default
    assert keep["faults"] < default["faults"] / 5, (keep, default)


def test_mode_reads_the_environment() -> None:
    assert allocator.mode({}) == "keep"
    assert allocator.mode({allocator.ENV: ""}) == "keep"
    assert allocator.mode({allocator.ENV: "default"}) == "default"
    assert allocator.keep_freed_memory({allocator.ENV: "default"}) is False
    with pytest.raises(MinidpoError, match="MINIDPO_MALLOC: must be keep or default, got 'on'"):
        allocator.mode({allocator.ENV: "on"})


def test_a_bad_value_is_one_line_and_exit_2(monkeypatch, capsys, tmp_path) -> None:
    monkeypatch.setenv(allocator.ENV, "jemalloc")
    rc = cli.main(["sft", "--preset", "tiny", "--runs-dir", str(tmp_path), "--name", "x"])
    err = capsys.readouterr().err
    assert rc == 2
    assert err == "minidpo: error: MINIDPO_MALLOC: must be keep or default, got 'jemalloc'\n"
    assert list(tmp_path.iterdir()) == []  # nothing written
