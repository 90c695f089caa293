"""The bad-input matrix: every mistake a user makes is one line naming what and where,
exit code 2, and nothing written; and the faults of the file system and of a killed
process leave nothing half-written, with a rerun that resumes to the same numbers.

Each row of `MATRIX` is (case, command, expected first line of stderr). In a command,
``{tmp}`` is the test's folder (which holds the input files `_inputs` writes),
``{sft}`` a finished tiny SFT checkpoint and ``{big}`` a 1 MB word. Every row runs
`minidpo` in-process with ``--runs-dir {tmp}/runs`` (unless it names its own) and checks:
exit code 2, exactly one line on stderr, of a readable length, matching the expected one,
and no file created or changed under ``{tmp}``.
"""

from __future__ import annotations

import errno
import gzip
import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import minidpo.atomic as atomic
from minidpo.checkpoints import content_sha256, load_checkpoint, save_checkpoint
from minidpo.cli import main
from minidpo.model import GPT, GPTConfig, ScalarHeadModel
from minidpo.policy import load_policy
from minidpo.preferences import save_pairs
from minidpo.training import read_metrics

ROOT = Path(__file__).resolve().parents[1]
E = "minidpo: error: "

MATRIX: list[tuple[str, str, str]] = [
    # usage: argparse's own line
    ("unknown flag", "sft --no-such-flag", r"unrecognized arguments: --no-such-flag"),
    ("not a number", "sft --steps many", r"argument --steps: invalid int value: 'many'"),
    ("unknown command", "nope", r"invalid choice: 'nope'"),
    ("unknown preset", "sft --preset huge", E + r"--preset.*huge"),
    ("unknown stage to force", "pipeline --force nope", E + r".*--force.*nope"),
    # numbers out of range, in every command and group (config.check_ranges)
    ("zero steps", "dpo --steps 0", E + r"--steps: must be >= 1, got 0"),
    ("negative lr", "dpo --lr -1", E + r"--lr: must be finite and > 0"),
    ("zero batch", "dpo --batch-size 0", E + r"--batch-size: must be >= 1"),
    ("zero eval-every", "dpo --eval-every 0", E + r"--eval-every: must be >= 1"),
    ("negative patience", "dpo --patience -1", E + r"--patience: must be >= 0, got -1"),
    ("validation fraction 1", "dpo --validation-fraction 1", E + r"--validation-fraction: must be in \[0, 1\)"),
    ("validation fraction nan", "dpo --validation-fraction nan", E + r"--validation-fraction: must be in"),
    ("rule without validation", "dpo --validation-fraction 0", E + r"--patience: the convergence rule needs"),
    ("snapshots past the cap", "dpo --steps 10 --snapshot-every 20", E + r"--snapshot-every: 20 is past"),
    ("pipeline patience", "pipeline --dpo-patience -2", E + r"--dpo-patience: must be >= 0"),
    ("sweep one seed", "sweep --seeds 1", E + r"--seeds: the sweep needs at least 2"),
    ("sweep zero seeds", "sweep --seeds 0", E + r"--seeds: the sweep needs at least 2"),
    ("negative seed", "sft --seed -1", E + r"--seed: must be >= 0"),
    ("nan lr", "sft --lr nan", E + r"--lr: must be finite and > 0"),
    ("huge n-demos", "sft --n-demos 1000000000000", E + r"--n-demos: at most 2,000,000"),
    ("zero samples", "eval --samples-per-prompt 0", E + r"--samples-per-prompt: must be >= 1"),
    ("zero samples to print", "sample --n 0", E + r"--n: must be >= 1"),
    ("prefixed group flag", "pipeline --ppo-iterations 0", E + r"--ppo-iterations: must be >= 1"),
    # method settings, named by the flag the user typed
    ("beta inf", "dpo --beta inf", E + r".*--beta"),
    ("negative nll alpha", "dpo --nll-alpha -1", E + r".*--nll-alpha"),
    ("nan dpop lambda", "dpo --dpop-lambda nan", E + r".*--dpop-lambda"),
    ("zero KL target", "ppo --adaptive-kl --kl-target 0", E + r".*--kl-target"),
    ("pipeline beta 0", "pipeline --dpo-beta 0", E + r".*--dpo-beta"),
    ("pipeline nll alpha", "pipeline --dpo-nll-alpha -0.5", E + r".*--dpo-nll-alpha"),
    ("context too long", "pipeline --ppo-max-new-tokens 200", E + r".*--ppo-max-new-tokens 200"),
    ("sweep context", "sweep --eval-max-new-tokens 500", E + r".*--eval-max-new-tokens 500"),
    ("sweep list", "sweep --sweep-ppo-kl-targets 2,0", E + r".*--sweep-ppo-kl-targets"),
    ("sweep alphas", "sweep --sweep-unlikelihood-alphas -0.1", E + r".*--sweep-unlikelihood-alphas"),
    ("GRPO group of one", "grpo --group-size 1", E + r".*--group-size"),
    ("GRPO clip range 0", "grpo --clip-range 0", E + r".*--clip-range"),
    ("online DPO zero rounds", "online-dpo --rounds 0", E + r".*--rounds"),
    ("online DPO one response", "online-dpo --responses-per-prompt 1", E + r".*--responses-per-prompt"),
    ("online DPO reference", "online-dpo --reference final", E + r".*--reference"),
    ("shaping weight nan", "sweep --shaping-weight nan", E + r".*--shaping-weight"),
    ("sweep GRPO betas", "sweep --sweep-grpo-betas 0", E + r".*--sweep-grpo-betas"),
    ("vocabulary too small", "tokenizer --vocab-size 300", E + r".*--vocab-size"),
    ("heads do not divide width", "sft --n-head 5", E + r"--n-head: 5 does not divide --n-embd 32"),
    ("zero threads", "sft --threads 0", E + r"--threads: must be auto or a whole number >= 1, got '0'"),
    ("dropout of 1", "sft --dropout 1", E + r"--dropout: must be in \[0, 1\)"),
    # run names that would leave the runs folder
    ("name escapes", "sft --name ../escape", E + r"--name: '../escape' is not a folder name"),
    ("absolute name", "sft --name /tmp/absolute", E + r"--name: '/tmp/absolute'"),
    ("empty name", "sft --name=", E + r"--name: '' is not a folder name"),
    # missing inputs
    ("no SFT yet", "dpo", E + r".*sft/checkpoint\.pt: not found; stage dpo reads it \(run the stages before"),
    ("pairs not there", "dpo --sft {sft} --pairs {tmp}/nope.jsonl", E + r".*nope\.jsonl: not found; stage dpo reads it$"),
    ("held-out pairs not there", "dpo --sft {sft} --pairs {tmp}/good.jsonl --eval-pairs {tmp}/nope.jsonl",
     E + r".*nope\.jsonl: not found; stage dpo reads it$"),
    ("a folder as checkpoint", "dpo --sft {tmp} --pairs {tmp}/good.jsonl", E + r".*: a folder, not a file; stage dpo reads it$"),
    ("a folder to sample", "sample --checkpoint {tmp}", E + r".*: a folder, not a file$"),
    ("a folder of prompts", "ppo --reward oracle --sft {sft} --prompts {tmp}/full",
     E + r".*full: a folder, not a file; stage ppo_gt reads it$"),
    # damaged checkpoints
    ("flipped bytes", "dpo --sft {tmp}/flipped.pt --pairs {tmp}/good.jsonl",
     E + r".*flipped\.pt: content does not match its checksum"),
    ("truncated checkpoint", "dpo --sft {tmp}/truncated.pt --pairs {tmp}/good.jsonl",
     E + r".*truncated\.pt: truncated or damaged; stage dpo reads it$"),
    ("truncated to sample", "sample --checkpoint {tmp}/truncated.pt", E + r".*truncated\.pt: truncated or damaged$"),
    ("truncated reward model", "ppo --sft {sft} --rm {tmp}/truncated.pt",
     E + r".*truncated\.pt: truncated or damaged; stage ppo reads it$"),
    ("text as checkpoint", "dpo --sft {tmp}/text.pt --pairs {tmp}/good.jsonl",
     E + r".*text\.pt: not a minidpo checkpoint; stage dpo reads it$"),
    ("text to sample", "sample --checkpoint {tmp}/text.pt", E + r".*text\.pt: not a minidpo checkpoint$"),
    ("code in a checkpoint", "dpo --sft {tmp}/code.pt --pairs {tmp}/good.jsonl",
     E + r".*code\.pt: holds code or objects beyond tensors and plain values \(\w+\.getpid; refused unread\); stage dpo"),
    ("code to sample", "sample --checkpoint {tmp}/code.pt", E + r".*code\.pt: holds code or objects beyond"),
    ("foreign pickle", "sample --checkpoint {tmp}/foreign.pt", E + r".*foreign\.pt: not a minidpo checkpoint"),
    # pairs files
    ("gzip pairs", "dpo --sft {sft} --pairs {tmp}/pairs.jsonl.gz", E + r".*pairs\.jsonl\.gz.*not UTF-8"),
    ("latin-1 pairs", "dpo --sft {sft} --pairs {tmp}/latin1.jsonl", E + r".*latin1\.jsonl:1.*not UTF-8"),
    ("invalid JSON line", "dpo --sft {sft} --pairs {tmp}/badline.jsonl", E + r".*badline\.jsonl:2"),
    ("missing key", "dpo --sft {sft} --pairs {tmp}/nokey.jsonl", E + r".*nokey\.jsonl:1.*rejected"),
    ("all pairs equal", "dpo --sft {sft} --pairs {tmp}/equal.jsonl",
     E + r".*equal\.jsonl: no usable preference pairs \(all 3 have chosen == rejected\)"),
    ("bad held-out pairs", "dpo --sft {sft} --pairs {tmp}/good.jsonl --eval-pairs {tmp}/nokey.jsonl",
     E + r".*nokey\.jsonl:1"),
    # other inputs
    ("binary gravity example", "gravity --example {tmp}/binary.json", E + r".*binary\.json.*not UTF-8"),
    ("prompt not of the world", "ppo --reward oracle --sft {sft} --prompts {tmp}/prompts.txt",
     E + r".*prompts\.txt:1"),
    # export
    ("export nothing", "export", E + r"export: give --hf DIR and/or --trl-pairs OUT\.jsonl"),
    ("export an untrained default", "export --hf {tmp}/hf",
     E + r".*dpo-sigmoid-beta0\.1/checkpoint\.pt: not found$"),
    ("export a foreign file", "export --hf {tmp}/hf --checkpoint {tmp}/foreign.pt",
     E + r".*foreign\.pt: not a minidpo checkpoint"),
    ("export another kind", "export --hf {tmp}/hf --checkpoint {tmp}/value.pt",
     E + r".*value\.pt: holds a 'value' checkpoint; export takes a policy or a reward model"),
    ("export into a full folder", "export --hf {tmp}/full --checkpoint {sft}",
     E + r".*full: folder is not empty \(--force replaces it\)"),
    ("export a sum-pooled reward model", "export --hf {tmp}/hf --checkpoint {tmp}/rm-sum.pt",
     E + r".*rm-sum\.pt: a reward model with pooling 'sum' does not map"),
    ("export an unfinished reward model", "export --hf {tmp}/hf --checkpoint {tmp}/rm-raw.pt",
     E + r".*rm-raw\.pt: reward model is not normalised yet"),
    ("export pairs holding the marker", "export --trl-pairs {tmp}/out.jsonl --pairs {tmp}/eot.jsonl",
     E + r".*eot\.jsonl: pair 1 holds the text '<\|endoftext\|>'"),
    ("export bad pairs", "export --trl-pairs {tmp}/out.jsonl --pairs {tmp}/badline.jsonl",
     E + r".*badline\.jsonl:2"),
    # sizes bounded by what they can mean, checked before anything is written
    ("batch past the data", "sft --batch-size 100000000000",
     E + r"--batch-size 100000000000: more than the 200 demonstrations it is drawn from \(--n-demos\)"),
    ("pipeline batch past the data", "pipeline --sft-batch-size 201", E + r"--sft-batch-size 201: more than"),
    ("block past memory", "sft --block-size 100000000000",
     E + r"--block-size 100000000000: a model of [\d,]+ parameters needs at least [\d,]+ GiB to train"),
    ("width past memory", "sft --n-embd 100000000 --n-head 1", E + r"--n-layer 1 with --n-embd 100000000: a model of"),
    ("block below the demonstrations", "sft --block-size 8",
     E + r"--block-size 8: the longest demonstration needs 47 tokens of context$"),
    # an output folder that is a file
    ("runs folder a file", "sft --runs-dir {tmp}/good.jsonl", E + r"--runs-dir .*good\.jsonl: a file, not a folder$"),
    ("runs folder under a file", "dpo --runs-dir {tmp}/good.jsonl/runs",
     E + r"--runs-dir .*good\.jsonl/runs: .*good\.jsonl is a file, not a folder$"),
    ("run folder a file", "pipeline --runs-dir {tmp} --name good.jsonl",
     E + r"--name good\.jsonl: .*good\.jsonl is a file, not a folder$"),
    # every message names the flag as the user typed it
    ("negative top-k", "sample --checkpoint {sft} --top-k -1", E + r"--top-k: must be >= 0, got -1$"),
    ("vocabulary below the bytes", "tokenizer --vocab-size 100",
     E + r"--vocab-size: at least 257 \(the 256 bytes and <\|endoftext\|>\), got 100$"),
    ("reward model of another shape", "ppo --sft {sft} --rm {tmp}/rm-narrow.pt",
     E + r".*rm-narrow\.pt: the reward model's shape is not that of the policy .*checkpoint\.pt \(n_embd 16 vs 32\)"),
    ("sample past the context", "sample --checkpoint {sft} --max-new-tokens 500",
     E + r"--max-new-tokens 500: prompt '.*' is \d+ tokens; with 500 new tokens it exceeds the model's context of 128$"),
    ("PPO past the context", "ppo --reward oracle --sft {sft} --max-new-tokens 500", E + r"--max-new-tokens 500: prompt"),
    ("GRPO past the context", "grpo --reward oracle --sft {sft} --max-new-tokens 500", E + r"--max-new-tokens 500: prompt"),
    ("eval past the context", "eval --sft {sft} --max-new-tokens 500", E + r"--max-new-tokens 500: prompt"),
    # echoed input cut to a readable length
    ("a 1 MB prompt", "score {big} x", E + r"prompt not in the world: 'a+\.\.\.\[999,\d+ characters cut\]\.\.\.a+'$"),
    ("a 1 MB flag value", "sft --steps {big}", r"invalid int value: 'a+\.\.\.\[999,\d+ characters cut\]"),
]  # fmt: skip

BIG = "a" * 1_000_000  # ``{big}``: a word of 1 MB
MAX_LINE = 500  # the longest line a row may print (`errors.MAX_LINE` and the prefixes)


class _Code:
    """An object a pickle rebuilds by calling a function (here a harmless one): what a
    checkpoint must never hold, since loading it would run the call."""

    def __reduce__(self):
        return (os.getpid, ())


def _inputs(tmp: Path, sft: Path, save_model_checkpoint, fact_pairs) -> None:
    """The files the matrix's commands read."""
    save_pairs(tmp / "good.jsonl", fact_pairs("train", 6))
    good = (tmp / "good.jsonl").read_text()
    (tmp / "pairs.jsonl.gz").write_bytes(gzip.compress(good.encode()))
    row = {"prompt": "Explain gravity.", "chosen": "Gravity is caf\u00e9.", "rejected": "No."}
    (tmp / "latin1.jsonl").write_bytes(json.dumps(row, ensure_ascii=False).encode("latin-1"))
    (tmp / "badline.jsonl").write_text(good.splitlines()[0] + "\n{not json\n")
    (tmp / "nokey.jsonl").write_text(
        json.dumps({"prompt": "Explain gravity.", "chosen": "A."}) + "\n"
    )
    same = {"prompt": "Explain gravity.", "chosen": "Gravity is when things fall down."}
    (tmp / "equal.jsonl").write_text(3 * (json.dumps({**same, "rejected": same["chosen"]}) + "\n"))
    (tmp / "binary.json").write_bytes(bytes(range(256)))
    (tmp / "prompts.txt").write_text("Explain the stock market.\n")
    raw = bytearray(sft.read_bytes())
    w = load_checkpoint(sft)["model"]["transformer.wte.weight"]
    at = bytes(raw).find(w.numpy().tobytes()[:64])
    raw[at + 10] ^= 0x40
    (tmp / "flipped.pt").write_bytes(bytes(raw))
    (tmp / "truncated.pt").write_bytes(sft.read_bytes()[:1000])
    torch.save({"state_dict": {}}, tmp / "foreign.pt")
    (tmp / "text.pt").write_text("not a checkpoint\n")
    torch.save({"format": "minidpo-checkpoint", "x": _Code()}, tmp / "code.pt")
    body, tok = load_policy(sft)
    narrow = ScalarHeadModel(GPT(GPTConfig(**{**body.config.to_dict(), "n_embd": 16})))
    save_model_checkpoint(tmp / "rm-narrow.pt", narrow, tok, normalization={"gain": 1.0, "bias": 0.0},
                          pooling="last")  # fmt: skip
    rm = ScalarHeadModel(body)
    save_model_checkpoint(tmp / "rm-sum.pt", rm, tok, normalization={"gain": 1.0, "bias": 0.0},
                          pooling="sum")  # fmt: skip
    save_model_checkpoint(tmp / "rm-raw.pt", rm, tok, normalization=None, pooling="last")
    value = load_checkpoint(sft)
    save_checkpoint(tmp / "value.pt", {k: v for k, v in value.items()
                                       if k not in ("format", "version", "sha256")} | {"kind": "value"})  # fmt: skip
    (tmp / "full").mkdir()
    (tmp / "full" / "mine.txt").write_text("keep me")
    eot = {"prompt": "Explain gravity.", "chosen": "Gravity<|endoftext|>", "rejected": "No."}
    (tmp / "eot.jsonl").write_text(json.dumps(eot) + "\n")


def _tree(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in folder.rglob("*")}  # fmt: skip


def _run(argv: list[str]) -> int:
    try:
        return main(argv)
    except SystemExit as e:  # argparse's usage errors
        return int(e.code)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, tiny_sft, save_model_checkpoint, fact_pairs) -> Path:
    tmp = tmp_path_factory.mktemp("inputs")
    _inputs(tmp, tiny_sft, save_model_checkpoint, fact_pairs)
    return tmp


@pytest.mark.parametrize("case, command, expected", MATRIX, ids=[c for c, _, _ in MATRIX])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(
    case, command, expected, inputs, tiny_sft, tmp_path, capsys
) -> None:
    for f in inputs.iterdir():
        (shutil.copytree if f.is_dir() else shutil.copy)(f, tmp_path / f.name)
    argv = command.format(tmp=tmp_path, sft=tiny_sft, big=BIG).split()
    if argv[0] not in ("nope", "gravity", "score"):  # the commands that take a preset and a run
        argv += [] if "--runs-dir" in argv else ["--runs-dir", str(tmp_path / "runs")]
        argv += [] if "--preset" in argv else ["--preset", "tiny"]
    before = _tree(tmp_path)
    assert _run(argv) == 2, case
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1, err
    assert len(err[0]) <= MAX_LINE, (len(err[0]), err[0][:200])
    assert re.search(expected, err[0]), (err[0][:1000], expected)
    assert _tree(tmp_path) == before, "something was written"


@pytest.mark.parametrize(
    "command", ["dpo --sft {f} --pairs {tmp}/good.jsonl", "sample --checkpoint {f}"]
)
def test_a_file_not_to_be_read_is_permission_denied_in_every_command(
    command, inputs, tiny_sft, tmp_path, capsys, monkeypatch
) -> None:
    """A named checkpoint the user may not read: "permission denied", the same words in the
    stage layer and in `minidpo sample`, without the advice to run the stages before it
    (the file is the user's, not the run's). Faked, since root reads any file."""
    shutil.copy(inputs / "good.jsonl", tmp_path / "good.jsonl")
    locked = tmp_path / "locked.pt"
    shutil.copy(tiny_sft, locked)
    real_open = Path.open

    def refuse(self, *a, **k):
        if self == locked:
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(self))
        return real_open(self, *a, **k)

    monkeypatch.setattr(Path, "open", refuse)
    argv = command.format(f=locked, tmp=tmp_path).split()
    before = _tree(tmp_path)
    assert main([*argv, "--preset", "tiny", "--runs-dir", str(tmp_path / "runs")]) == 2
    (line,) = [x for x in capsys.readouterr().err.splitlines() if x.strip()]
    expected = rf"{re.escape(str(locked))}: permission denied(; stage dpo reads it)?"
    assert re.fullmatch(E + expected, line), line
    assert _tree(tmp_path) == before


class _FullDisk:
    """`os` as `minidpo.lock` sees it on a full disk: creating the lock file (`where` =
    "open") or writing the pid into the file just made ("write") raises ENOSPC, with no
    file name in the error."""

    def __init__(self, where: str) -> None:
        self.where = where

    def __getattr__(self, name: str):
        if name != self.where:
            return getattr(os, name)

        def refuse(*a, **k):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        return refuse


@pytest.mark.parametrize("where", ["open", "write"])
@pytest.mark.parametrize("command", ["dpo --sft {sft} --pairs {tmp}/good.jsonl", "pipeline"])
def test_a_full_disk_at_the_lock_is_one_line_naming_it_and_leaves_nothing(
    command, where, inputs, tiny_sft, tmp_path, capsys, monkeypatch
) -> None:
    """Disk full when the run folder's lock is taken: one line naming the lock file and
    the error, exit 2, and neither an empty ``.lock`` nor the run folder made for it."""
    import minidpo.lock as lock

    shutil.copy(inputs / "good.jsonl", tmp_path / "good.jsonl")
    monkeypatch.setattr(lock, "os", _FullDisk(where))
    runs = tmp_path / "runs"
    argv = [*command.format(sft=tiny_sft, tmp=tmp_path).split(), "--preset", "tiny",
            "--runs-dir", str(runs), "--name", "new"]  # fmt: skip
    assert main(argv) == 2
    (line,) = [x for x in capsys.readouterr().err.splitlines() if x.strip()]
    lock_file = runs / "new" / ".lock"
    assert line == E + f"{lock_file}: cannot take the run folder's lock (No space left on device)"
    assert not runs.exists()


@pytest.mark.parametrize(
    "error, asked",
    [(MemoryError("Unable to allocate 745. GiB for an array with shape (100000000000,) and data type int64"),
      "745 GiB"),
     (RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate memory: "
                   "you tried to allocate 12800000000000 bytes. Error code 12 (Cannot allocate memory)"),
      "11,921 GiB")],
)  # fmt: skip
def test_an_allocation_that_fails_is_one_line_naming_the_sizes_typed(
    error, asked, tmp_path, capsys, monkeypatch
) -> None:
    """Memory runs out inside a stage (sizes within their bounds, more than the machine
    holds): one line with what was asked for and the size flags as the user typed them,
    exit 2, and the stage's start taken back (no ``.started`` stamp to resume from)."""
    import minidpo.sft as sft

    def no_memory(idx):
        raise error

    monkeypatch.setattr(sft.distributed, "shard", no_memory)
    runs = tmp_path / "runs"
    assert main(_sft(runs, "oom", "--batch-size", "150")) == 2
    (line,) = [x for x in capsys.readouterr().err.splitlines() if x.strip()]
    sizes = "more than this machine holds at --batch-size 150; try smaller"
    assert line == E + f"out of memory ({asked} asked for): {sizes}"
    assert not (runs / "oom" / "stages" / "sft.started").exists()


def test_a_runtime_error_that_is_not_memory_stays_a_traceback(tmp_path, monkeypatch) -> None:
    """Only a failed allocation is bad input: any other RuntimeError is a bug, and keeps its
    traceback."""
    import minidpo.sft as sft

    def bug(idx):
        raise RuntimeError("shape mismatch")

    monkeypatch.setattr(sft.distributed, "shard", bug)
    with pytest.raises(RuntimeError, match="shape mismatch"):
        main(_sft(tmp_path / "runs", "bug"))


def test_a_line_appended_to_a_full_disk_names_the_file(tmp_path, monkeypatch) -> None:
    """A metrics line refused by the file system (the error carries no file name) is one
    MinidpoError naming the log."""
    from minidpo.atomic import append_line
    from minidpo.errors import MinidpoError

    class Full:
        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def write(self, text):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(Path, "open", lambda self, *a, **k: Full())
    log = tmp_path / "metrics.jsonl"
    with pytest.raises(
        MinidpoError, match=rf"^{re.escape(str(log))}: cannot write \(No space left on device\)$"
    ):
        append_line(log, "{}")


def test_the_readme_promise_names_the_matrix() -> None:
    readme = (ROOT / "README.md").read_text()
    assert "tests/test_bad_input.py" in readme
    assert f"{len(MATRIX)} cases" in readme


# ------------------------------------------------------------------ file-system faults


def _sft(runs: Path, name: str, *extra: str) -> list[str]:
    return ["sft", "--preset", "tiny", "--runs-dir", str(runs), "--name", name, *extra]


@pytest.mark.parametrize(
    "err, where",
    [(errno.ENOSPC, "fsync"), (errno.EROFS, "mkstemp"), (errno.EACCES, "mkstemp"),
     (errno.ENOSPC, "append")],
)  # fmt: skip
def test_a_refused_write_is_one_line_and_a_rerun_resumes_to_the_same_weights(
    err, where, tmp_path, capsys, monkeypatch
) -> None:
    """The file system refuses the Nth write (disk full, read-only, permission denied):
    one line naming a path, exit 2, no temp file left; with the fault gone, the same
    command finishes with the weights of a run that never failed."""
    runs = tmp_path / "runs"
    assert main(_sft(runs, "clean")) == 0
    capsys.readouterr()
    calls = {"n": 0}

    def refuse(*a, **k):
        calls["n"] += 1
        if calls["n"] == 4:
            raise OSError(err, os.strerror(err), str(runs / "faulty" / "sft" / "x"))
        return real(*a, **k)

    if where == "fsync":
        real = os.fsync
        monkeypatch.setattr(atomic.os, "fsync", refuse)
    elif where == "mkstemp":
        real = atomic.tempfile.mkstemp
        monkeypatch.setattr(atomic.tempfile, "mkstemp", refuse)
    else:
        import minidpo.training as training

        real_log = training.MetricsLog.log

        def real(self, row):
            return real_log(self, row)

        monkeypatch.setattr(training.MetricsLog, "log", lambda self, row: refuse(self, row))
    assert main(_sft(runs, "faulty")) == 2
    (line,) = [x for x in capsys.readouterr().err.splitlines() if x.strip()]
    assert line.startswith(E) and str(runs / "faulty") in line and os.strerror(err) in line
    assert not list((runs / "faulty").rglob("*.tmp"))
    monkeypatch.undo()
    assert main(_sft(runs, "faulty")) == 0
    clean, again = (runs / n / "sft" / "checkpoint.pt" for n in ("clean", "faulty"))
    assert torch.equal(load_checkpoint(clean)["model"]["lm_head.weight"],
                       load_checkpoint(again)["model"]["lm_head.weight"])  # fmt: skip
    assert content_sha256([clean]) == content_sha256([again])


_KILL_AT_RENAME = """
import os, signal, sys
import minidpo.atomic as atomic
real, n = os.replace, {"n": 0}
def replace(src, dst):
    if str(dst).endswith("checkpoint.pt"):
        n["n"] += 1
        if n["n"] == int(sys.argv[1]):
            os.kill(os.getpid(), signal.SIGKILL)  # the temp file is written, not renamed
    return real(src, dst)
atomic.os.replace = replace
from minidpo.cli import main
sys.exit(main(sys.argv[2:]))
"""


@pytest.mark.slow
def test_killed_between_temp_file_and_rename_resumes_to_the_same_numbers(tmp_path) -> None:
    runs = tmp_path / "runs"
    assert main(_sft(runs, "clean", "--ckpt-every", "5")) == 0
    argv = _sft(runs, "killed", "--ckpt-every", "5")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    killed = subprocess.run([sys.executable, "-c", _KILL_AT_RENAME, "3", *argv], env=env,
                            capture_output=True, text=True)  # fmt: skip
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    folder = runs / "killed" / "sft"
    assert list(folder.glob(".checkpoint.pt.*.tmp"))  # the write it was killed in
    assert load_checkpoint(folder / "checkpoint.pt")["step"] == 10  # the last renamed one
    assert main(argv) == 0  # resumes from step 10
    assert not list(folder.glob("*.tmp"))
    a, b = runs / "clean" / "sft", folder
    assert content_sha256([a / "checkpoint.pt"]) == content_sha256([b / "checkpoint.pt"])
    untimed = [[{k: v for k, v in r.items() if not k.startswith("time/")} for r in read_metrics(d / "metrics.jsonl")]
               for d in (a, b)]  # fmt: skip
    assert untimed[0] == untimed[1] and len(untimed[0]) == 20
