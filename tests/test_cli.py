"""The command line: help, bad input as one line with exit code 2, and the tiny pipeline."""

import json
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

from minidpo.checkpoints import save_checkpoint
from minidpo.cli import main
from minidpo.errors import MinidpoError
from minidpo.reward_model import build_reward_model


def _err_lines(capsys):
    err = capsys.readouterr().err.strip().splitlines()
    return [line for line in err if line.strip()]


def test_python_m_minidpo_help():
    out = subprocess.run(
        [sys.executable, "-m", "minidpo", "--help"], capture_output=True, text=True, check=True
    )
    for cmd in ("tokenizer", "sft", "sample", "score", "demo"):
        assert cmd in out.stdout


def test_every_command_help_renders(capsys):
    """argparse formats help with %: a help string with a bare % crashes --help."""
    from minidpo.cli import build_parser

    sub = next(a for a in build_parser()._actions if a.choices and "sft" in a.choices)
    for name in sub.choices:
        with pytest.raises(SystemExit) as e:
            main([name, "--help"])
        assert e.value.code == 0, name
        assert "usage: minidpo " + name in capsys.readouterr().out


def test_missing_checkpoint(tmp_path, capsys):
    assert (
        main(["sample", "--runs-dir", str(tmp_path), "--checkpoint", str(tmp_path / "x.pt")]) == 2
    )
    (line,) = _err_lines(capsys)
    assert f"{tmp_path / 'x.pt'}: not found" in line


def test_tokenizer_of_another_version_is_rebuilt(tmp_path, capsys):
    """A file the stage layer did not stamp (here a tokenizer of another version) is not
    the stage's output: the stage runs and writes its own, as for any damaged output."""
    from minidpo.tokenizer import Tokenizer

    path = tmp_path / "default" / "tokenizer.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"format": "minidpo-bpe", "version": 99, "merges": []}))
    assert main(["tokenizer", "--preset", "tiny", "--runs-dir", str(tmp_path)]) == 0
    assert Tokenizer.load(path).vocab_size == 1856
    assert "[tokenizer] running" in capsys.readouterr().out


def test_score_prints_breakdown(capsys):
    assert main(["score", "Explain gravity.", "Gravity is when things fall down."]) == 0
    out = capsys.readouterr().out
    assert "0.25" in out


def test_score_unknown_prompt(capsys):
    assert main(["score", "Explain cheese.", "Cheese is food."]) == 2
    (line,) = _err_lines(capsys)
    assert "Explain cheese." in line


def test_tiny_sft_then_sample(tmp_path, capsys):
    common = ["--preset", "tiny", "--runs-dir", str(tmp_path), "--device", "cpu"]
    assert main(["sft", *common]) == 0
    assert main(["sample", *common, "--n", "5", "--show", "2"]) == 0
    out = capsys.readouterr().out
    assert "held-out loss" in out and "(3 more not shown" in out
    shown = [float(m) for m in re.findall(r"^\[([+-]\d+\.\d+)\]", out, flags=re.M)]
    assert len(shown) == 2
    # the three summary lines agree with a recomputation from the same samples
    from minidpo.oracle import reward_breakdown
    from minidpo.policy import load_policy
    from minidpo.sampling import sample_responses
    from minidpo.world import load_world

    model, tok = load_policy(tmp_path / "default" / "sft" / "checkpoint.pt")
    prompts = [p.text for p in load_world().prompts("eval")][:5]
    samples = sample_responses(model, tok, prompts, seed=0, max_new_tokens=48)
    b = [reward_breakdown(x.prompt, x.response, terminated=x.terminated) for x in samples]
    r = np.array([x.total for x in b])
    mean, se = r.mean(), r.std(ddof=1) / np.sqrt(5)
    unp = sum(x.unparseable > 0 for x in b)
    unt = sum(not x.terminated for x in samples)
    assert shown == pytest.approx(list(np.round(r[:2], 2)), abs=1e-9)
    assert f"oracle reward: {mean:+.3f} ± {se:.3f} (mean ± se over 5 samples, eval prompts" in out
    assert f"unparseable: {100 * unp / 5:.1f} % ± " in out and f"({unp} of 5 hold" in out
    assert f"unterminated: {100 * unt / 5:.1f} % ± " in out and f"({unt} of 5 never" in out


def test_sample_summary_known_answer():
    from minidpo.cli import sample_summary
    from minidpo.config import SampleConfig
    from minidpo.evaluate import EvalResult

    res = EvalResult(n_samples=1000, reward_mean=1.2345, reward_se=0.0321, reward_std=1.0,
                     kl_mean=None, kl_se=None, win_rate_vs_ref=None, mean_length=20.0,
                     unparseable_rate=0.02, unterminated_rate=0.001)  # fmt: skip
    lines = sample_summary(res, SampleConfig())
    assert lines[0].startswith("oracle reward: +1.234 ± 0.032 (mean ± se over 1000 samples")
    # binomial se: sqrt(0.02 * 0.98 / 1000) = 0.443 %; sqrt(0.001 * 0.999 / 1000) = 0.0999 %
    assert lines[1].startswith("unparseable: 2.0 % ± 0.4 (20 of 1000")
    assert lines[2].startswith("unterminated: 0.1 % ± 0.1 (1 of 1000")


def test_gravity_prints_the_worked_example(capsys):
    assert main(["gravity"]) == 0
    out = capsys.readouterr().out
    for number in ("+1.8000", "-1.3000", "0.3100", "0.5769", "0.5501", "0.0423", "0.549"):
        assert number in out, number


def test_dpo_with_malformed_pairs_file(tmp_path, capsys, tiny_sft):
    bad = tmp_path / "pairs.jsonl"
    bad.write_text('{"prompt": "Explain gravity.", "chosen": "x", "rejected": "y"}\n{oops\n')
    rc = main(["dpo", "--preset", "tiny", "--runs-dir", str(tmp_path), "--sft", str(tiny_sft),
               "--pairs", str(bad)])  # fmt: skip
    assert rc == 2
    (line,) = _err_lines(capsys)
    assert f"{bad}:2: not valid JSON" in line


@pytest.mark.slow
def test_tiny_demo_end_to_end(tmp_path, capsys):
    common = ["--preset", "tiny", "--runs-dir", str(tmp_path), "--device", "cpu"]
    assert main(["demo", *common]) == 0
    out = capsys.readouterr().out
    assert "SFT" in out and "PPO" in out and "win vs SFT" in out and "report:" in out
    assert "PPO-GT" not in out and "GRPO" not in out  # the demo runs DPO against RLHF alone
    run = tmp_path / "default"
    assert not (run / "ppo-oracle-kl0.05").exists() and not (run / "best-of-n").exists()
    for f in ("sft/checkpoint.pt", "prefs/train.jsonl", "prefs/eval.jsonl", "report.md",
              "dpo-sigmoid-beta0.1/checkpoint.pt", "dpo-sigmoid-beta0.1/metrics.jsonl"):  # fmt: skip
        assert (run / f).exists(), f
    assert (
        main(["eval", *common, "--checkpoint", str(run / "dpo-sigmoid-beta0.1/checkpoint.pt")]) == 0
    )
    assert (run / "dpo-sigmoid-beta0.1" / "eval.json").exists()


def test_rlhf_commands_on_tiny(tmp_path, capsys, tiny_sft):
    common = ["--preset", "tiny", "--runs-dir", str(tmp_path), "--device", "cpu",
              "--sft", str(tiny_sft)]  # fmt: skip
    assert main(["prefs", *common]) == 0
    assert main(["rm", *common]) == 0
    rm = tmp_path / "default" / "rm" / "checkpoint.pt"
    assert main(["ppo", *common]) == 0
    assert main(["ppo", *common, "--reward", "oracle"]) == 0
    assert main(["preferred-ft", *common]) == 0
    assert main(["best-of-n", *common, "--n", "2"]) == 0
    out = capsys.readouterr().out
    assert "held-out accuracy" in out and "best-of-2 (rm)" in out and "preferred-ft:" in out
    for d in ("ppo-rm-kl0.05", "ppo-oracle-kl0.05", "preferred-ft", "best-of-2-rm"):
        assert (tmp_path / "default" / d).is_dir(), d
    # a reward model where a policy is expected, and the reverse: one line, exit 2
    assert main(["sample", *common[:-2], "--checkpoint", str(rm)]) == 2
    assert "expected 'policy'" in _err_lines(capsys)[-1]
    assert main(["ppo", *common, "--rm", str(tiny_sft)]) == 2
    assert "expected 'reward_model'" in _err_lines(capsys)[-1]
    assert main(["ppo", *common, "--kl-coef", "0"]) == 2
    assert "--kl-coef" in _err_lines(capsys)[-1]
    # a prompt file: a line too long for the context is named by file:line, nothing written
    long = tmp_path / "long.txt"
    long.write_text("Explain gravity.\n\nExplain " + "the gravity of rain " * 40 + "\n")
    assert main(["ppo", *common, "--name", "custom", "--rm", str(rm), "--prompts", str(long)]) == 2
    assert f"{long}:3: prompt is" in _err_lines(capsys)[-1]
    assert not (tmp_path / "custom").exists()
    unknown = tmp_path / "unknown.txt"
    unknown.write_text("Explain gravity.\nWhat is love?\n")
    assert (
        main(["ppo", *common, "--name", "custom", "--rm", str(rm), "--prompts", str(unknown)]) == 2
    )
    assert f"{unknown}:2: prompt not in the world" in _err_lines(capsys)[-1]
    ok = tmp_path / "ok.txt"
    ok.write_text("Explain gravity.\n\nWhat is buoyancy?\n")
    assert main(["ppo", *common, "--name", "custom", "--rm", str(rm), "--prompts", str(ok)]) == 0
    assert (tmp_path / "custom" / "ppo-rm-kl0.05" / "summary.json").exists()


def test_prompt_file_errors_name_the_file(tmp_path, tiny_sft):
    from minidpo.errors import MinidpoError
    from minidpo.policy import load_policy
    from minidpo.sampling import load_prompts

    _, tok = load_policy(tiny_sft)
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("Explain caf\xe9.\n".encode("latin-1"))
    cases = {
        tmp_path / "missing.txt": "prompt file not found",
        bad: "cannot read the prompt file (UnicodeDecodeError)",
        tmp_path / "blank.txt": "no prompts",
    }
    (tmp_path / "blank.txt").write_text("\n  \n")
    for path, msg in cases.items():
        with pytest.raises(MinidpoError, match=re.escape(f"{path}: {msg}")):
            load_prompts(path, tok, block_size=128, max_new_tokens=48)
    good = tmp_path / "good.txt"
    good.write_text(" Explain gravity. \n\nWhat is buoyancy?\n")
    assert load_prompts(good, tok, 128, 48) == ["Explain gravity.", "What is buoyancy?"]


@pytest.mark.parametrize(
    "argv",
    [["sft", "--resume"], ["dpo", "--resume"], ["rm", "--resume"], ["preferred-ft", "--resume"],
     ["ppo", "--resume"], ["pipeline", "--sft-resume"], ["pipeline", "--dpo-resume"]],
)  # fmt: skip
def test_resume_is_automatic_so_no_stage_has_a_resume_flag(argv, tmp_path, capsys):
    """One rule, in every stage command and in the pipeline: a finished stage with the
    same settings is skipped, an interrupted one resumes, --force starts afresh. A
    --resume flag that could disagree with it does not exist."""
    with pytest.raises(SystemExit) as e:
        main([*argv, "--runs-dir", str(tmp_path)])
    assert e.value.code == 2
    (line,) = _err_lines(capsys)
    assert "unrecognized arguments: --" in line and "resume" in line
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("damage", ["no model_config", "weights of another width"])
def test_a_malformed_checkpoint_is_one_line_naming_it(tmp_path, capsys, tiny_sft, damage):
    ckpt = torch.load(tiny_sft, weights_only=True)
    if damage == "no model_config":
        del ckpt["model_config"]
    else:
        ckpt["model_config"] = {
            **ckpt["model_config"],
            "n_embd": 2 * ckpt["model_config"]["n_embd"],
        }
    bad = tmp_path / "bad.pt"  # re-stamped, so it passes the format and checksum checks
    save_checkpoint(
        bad, {k: v for k, v in ckpt.items() if k not in ("format", "version", "sha256")}
    )
    assert main(["sample", "--preset", "tiny", "--runs-dir", str(tmp_path), "--checkpoint",
                 str(bad), "--n", "1"]) == 2  # fmt: skip
    (line,) = _err_lines(capsys)
    assert f"{bad}: malformed checkpoint" in line
    with pytest.raises(MinidpoError, match="malformed checkpoint"):
        build_reward_model(ckpt, bad)  # the reward model's loader says the same


def test_ppo_and_grpo_on_the_shaped_reward_on_tiny(tmp_path, capsys, tiny_sft):
    """`--reward shaped`: the limits experiments' stage, scored by r_shaped (here -10 per
    sentence, none free, so every rollout scores well below its r*), into its own run."""
    from minidpo.training import read_metrics

    common = ["--preset", "tiny", "--runs-dir", str(tmp_path), "--device", "cpu",
              "--sft", str(tiny_sft), "--reward", "shaped", "--shaping-weight", "10",
              "--shaping-free-sentences", "0"]  # fmt: skip
    run = tmp_path / "default"
    assert main(["ppo", *common]) == 0
    out = capsys.readouterr().out
    assert "ppo-shaped-kl0.05" in out and "last rollouts r_shaped" in out
    summary = json.loads((run / "stages" / "ppo_shaped.json").read_text())["summary"]
    assert summary["rollout_scores"] < summary["rollout_oracle"] - 5
    rows = [r for r in read_metrics(run / "ppo-shaped-kl0.05" / "metrics.jsonl")
            if "objective/scores" in r]  # fmt: skip
    assert rows and all(r["objective/scores"] < r["objective/oracle"] - 5 for r in rows)
    assert not (run / "ppo-rm-kl0.05").exists() and not (run / "ppo-oracle-kl0.05").exists()

    assert main(["grpo", *common]) == 0
    assert "last rollouts r_shaped" in capsys.readouterr().out
    (folder,) = run.glob("grpo-shaped-beta*")
    rows = [r for r in read_metrics(folder / "metrics.jsonl") if "objective/scores" in r]
    assert rows and all(r["objective/scores"] < r["objective/oracle"] - 5 for r in rows)
    assert (run / "stages" / "grpo_shaped.json").exists()


@pytest.mark.parametrize("command", ["ppo", "grpo"])
def test_bad_reward_and_shaping_flags_are_one_line(tmp_path, capsys, command):
    with pytest.raises(SystemExit) as e:
        main([command, "--runs-dir", str(tmp_path), "--reward", "shapd"])
    assert e.value.code == 2
    (line,) = _err_lines(capsys)
    assert "--reward" in line and "'shapd'" in line and "shaped" in line
    assert main([command, "--preset", "tiny", "--runs-dir", str(tmp_path), "--reward", "shaped",
                 "--shaping-weight", "-1"]) == 2  # fmt: skip
    (line,) = _err_lines(capsys)
    assert line.startswith("minidpo: error: --shaping-weight: must be finite and >= 0")
    assert not (tmp_path / "default").exists()
