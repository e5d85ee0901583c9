"""Command-line behaviour a script relies on: pipes, unwritable paths, and resume honouring new settings."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from conftest import FAST, assert_usage_error, cli_command, cli_env, invoke, set_flags, train_in_process


def test_a_table_piped_into_head_ends_with_exit_0():
    shell = " ".join(f"'{a}'" for a in cli_command("inspect", "gpt2_small"))
    proc = subprocess.run(["bash", "-c", f"set -o pipefail; {shell} | head -2"], capture_output=True, text=True,
                          env=cli_env(), timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert len(proc.stdout.splitlines()) == 2 and "Traceback" not in proc.stderr


def test_commands_run_with_their_standard_streams_closed(tmp_path: Path):
    """`minigpt ... >&- <&-` (a cron job, a daemon): no traceback, and nothing meant for stdout lands in
    a file the command opened in its place."""
    train = " ".join(f"'{a}'" for a in cli_command("train", "tiny", "--out", "run", *set_flags(*FAST),
                                                     "--set", "train.max_iters=2", "--set", "train.eval_interval=1",
                                                     "--set", "model.n_layer=1"))
    sample = " ".join(f"'{a}'" for a in cli_command("sample", "run", "--max-new-tokens", "5"))
    for command in (train, sample):
        proc = subprocess.run(["bash", "-c", f"{command} >&- <&-"], cwd=tmp_path, capture_output=True, text=True,
                              env=cli_env(), timeout=180)
        assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    assert invoke("eval", tmp_path / "run", "--json").exit_code == 0  # the run's files are whole


def test_help_piped_into_head_ends_with_exit_0():
    for args in (("--help",), ("sample", "--help"), ()):
        shell = " ".join(f"'{a}'" for a in cli_command(*args))
        proc = subprocess.run(["bash", "-c", f"set -o pipefail; {shell} | head -n 1"], capture_output=True,
                              text=True, env=cli_env(), timeout=120)
        assert proc.returncode == 0 and proc.stderr == "", (args, proc.returncode, proc.stderr)


@pytest.mark.parametrize("args,fragment", [
    (("train", "--bogus"), "--bogus"), (("frobnicate",), "frobnicate"), (("train", "--seed", "abc"), "--seed"),
    (("sample", "--top-k"), "--top-k")])
def test_a_mistyped_command_line_is_one_line_and_exit_2(args, fragment):
    proc = subprocess.run(cli_command(*args), capture_output=True, text=True, env=cli_env(), timeout=120)
    assert_usage_error(proc, fragment)
    assert proc.stdout == ""


def test_an_out_that_cannot_be_created_is_a_usage_error(tmp_path: Path, small_corpus: Path):
    (tmp_path / "afile").write_text("x")
    result = invoke("train", "tiny", "--out", tmp_path / "afile" / "run", *set_flags(*FAST, "train.max_iters=1",
                                                                                  f"data.path={small_corpus}"))
    assert_usage_error(result, "cannot create run directory")


def test_resume_uses_the_learning_rate_given_now(tmp_path: Path, small_corpus: Path):
    run = tmp_path / "run"
    flags = [*FAST, f"data.path={small_corpus}", "train.max_iters=8", "train.eval_interval=100",
             "train.warmup_iters=0", "train.schedule=wsd", "train.decay_fraction=0.0", "train.optimizer=adamw"]
    train_in_process([*flags, "train.stop_after=4"], run)
    events: list = []
    train_in_process([*flags, "train.stop_after=0", "train.learning_rate=1e-4", "train.min_lr=1e-5"], run,
                     resume=True, events=events)
    lrs = [e.data["lr"] for e in events if e.kind == "step"]
    assert lrs and all(abs(lr - 1e-4) < 1e-12 for lr in lrs)


@pytest.mark.parametrize("args", [["--version"], ["--help"], ["runs", "RUNS", "--json"], ["inspect", "RUN"],
                                  ["sample", "RUN", "--max-new-tokens", "5"], ["eval", "RUN", "--json"]],
                         ids=["version", "help", "runs", "inspect", "sample", "eval"])
def test_stdout_on_a_full_disk_is_one_line_and_exit_1(tiny_run: Path, args: list[str]):
    args = [str(tiny_run) if a == "RUN" else str(tiny_run.parent) if a == "RUNS" else a for a in args]
    with open("/dev/full", "w") as full:
        proc = subprocess.run(cli_command(*args), stdout=full, stderr=subprocess.PIPE, text=True, env=cli_env(),
                              timeout=180)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == ["error: cannot write the output: No space left on device"]


def test_a_terminal_that_cannot_show_a_character_gets_an_escape_not_a_traceback(tiny_run: Path):
    env = {**cli_env(), "PYTHONIOENCODING": "ascii"}
    proc = subprocess.run(cli_command("sample", tiny_run, "--prompt", "\u4e00\u4e01"), capture_output=True,
                          text=True, env=env, timeout=180)
    assert_usage_error(proc, "\\u4e00")


def test_the_next_hint_after_training_suggests_a_prompt_the_model_knows(tmp_path: Path):
    """Issue 28: after a text without 'ROMEO:' the hint's prompt is taken from the run's own text."""
    import shlex

    text = tmp_path / "numbers.txt"
    text.write_text("one two three four five six seven\n" * 300)
    result = invoke("train", "tiny", "--data", text, "--out", "run", *set_flags(*FAST, "train.max_iters=2"))
    assert result.exit_code == 0, result.stderr
    hint = next(line for line in result.stderr.splitlines() if line.startswith("next: minigpt sample"))
    assert hint == "next: minigpt sample run --prompt 'one two three four'"
    args = shlex.split(hint.removeprefix("next: minigpt "))
    assert invoke(*args, "--max-new-tokens", "3").exit_code == 0


def test_inspect_at_80_columns_wraps_the_blocks_formula_and_never_cuts_it():
    """Issue 28: piped at 80 columns the module tree cut its own formula ('...mlp(conv_mlp(norm_')."""
    proc = subprocess.run(cli_command("inspect", "default"), capture_output=True, text=True,
                          env={**cli_env(), "COLUMNS": "80"}, timeout=120)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("GPT "))
    tree = [lines[start]]
    for line in lines[start + 1:]:
        if not line.startswith(("│", "├", "└")):  # the tree ends where the next view begins
            break
        tree.append(line)
    assert all(len(line) <= 80 for line in tree)
    joined = " ".join(" ".join(line.strip("│ ├└─").split()) for line in tree)
    assert "x = x + mlp(conv_mlp(norm_2(x)))" in joined
