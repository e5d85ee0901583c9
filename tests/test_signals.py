"""Interruptions with real signals: Ctrl-C and SIGTERM save and exit 130/143, kill -9 loses nothing.

Each test starts `python -m minigpt_cli train` as a separate process, waits until it is training,
signals it, and then checks the run on disk: it loads, and resuming it continues exactly where the
process stopped (compared with a run that was never interrupted).
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import time
from pathlib import Path

import pytest

from conftest import (FAST, assert_same_weights, cli_command, cli_env, invoke, latest_weights, set_flags,
                      train_in_process, train_losses)
from minigpt_cli import checkpoint as ckpt
from minigpt_cli import rundir
from minigpt_cli.progress import FINAL_EVAL_TASK

# Long enough that no test ever reaches the end; the schedule depends on it, so the reference
# runs below use the same value and stop early with train.stop_after.
MAX_ITERS = 100_000


def flags(corpus: Path, *extra: str) -> list[str]:
    return [*FAST, f"data.path={corpus}", f"train.max_iters={MAX_ITERS}", "train.eval_interval=100000",
            "model.dropout=0.1", *extra]


_started: list[subprocess.Popen] = []


@pytest.fixture(autouse=True)
def no_process_left_behind():
    """A failing test must not leave a training process running."""
    yield
    while _started:
        proc = _started.pop()
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def start_training(run: Path, corpus: Path, *extra: str, resume: bool = False) -> subprocess.Popen:
    args = ["train", "--out", run, "--json"]
    args += ["--resume", *set_flags(*extra)] if resume else ["tiny", *set_flags(*flags(corpus, *extra))]
    proc = subprocess.Popen(cli_command(*args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=cli_env())
    _started.append(proc)
    return proc


def wait_for(condition, proc: subprocess.Popen, what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None:
            raise AssertionError(f"training exited with {proc.returncode} before {what}: {proc.stderr.read()}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def logged_steps(run: Path) -> int:
    return len([r for r in rundir.read_metrics(run) if r["kind"] == "train"])


def latest_step(run: Path) -> int:
    try:
        return json.loads((run / "latest.json").read_text())["step"]
    except (OSError, ValueError, KeyError):
        return 0


def assert_resumes_exactly(run: Path, corpus: Path, tmp_path: Path, *extra: str) -> None:
    """Resume the run for 3 more steps in-process; it must match a run never interrupted."""
    step = ckpt.load_checkpoint(run, "latest", with_train_state=True).step
    train_in_process([*flags(corpus, *extra), "train.stop_after=3"], run, resume=True)
    assert not list(run.rglob(f"{ckpt.TMP_PREFIX}*")), "leftovers of an interrupted save were not cleaned up"
    reference = tmp_path / "reference"
    train_in_process([*flags(corpus, *extra), f"train.stop_after={step + 3}"], reference)
    assert [s for s, _ in train_losses(run)] == list(range(1, step + 4))
    assert train_losses(run) == train_losses(reference)
    assert_same_weights(latest_weights(run), latest_weights(reference))


@pytest.mark.parametrize("signum, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)], ids=["SIGINT", "SIGTERM"])
def test_signal_finishes_the_step_saves_and_exits(tmp_path: Path, small_corpus: Path, signum: int, code: int):
    run = tmp_path / "runs" / "sig"
    proc = start_training(run, small_corpus)
    wait_for(lambda: logged_steps(run) >= 3, proc, "the third step")
    proc.send_signal(signum)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == code, err
    assert "Traceback" not in err
    assert f"stopped by {signal.Signals(signum).name}" in err and "--resume" in err
    summary = json.loads(out.strip().splitlines()[-1])
    # The step under way when the signal came was finished, logged and saved.
    saved = ckpt.load_checkpoint(run, "latest", with_train_state=True)
    assert saved.step == summary["steps"] == logged_steps(run) >= 3
    assert_resumes_exactly(run, small_corpus, tmp_path)


def test_second_ctrl_c_exits_at_once_and_keeps_the_last_checkpoint(tmp_path: Path, small_corpus: Path):
    run = tmp_path / "runs" / "twice"
    train_in_process([*flags(small_corpus), "train.stop_after=2"], run)
    # Resumed with so many micro-steps that one step takes minutes: the second Ctrl-C must not wait for it.
    proc = start_training(run, small_corpus, "train.grad_accum_steps=100000", "train.stop_after=0", resume=True)
    assert proc.stderr.readline(), "the trainer printed nothing before it started"
    time.sleep(0.5)  # inside the training loop, in the middle of the first step
    # Two signals sent close together can reach Python as one; keep pressing until it exits.
    deadline = time.monotonic() + 30
    while proc.poll() is None and time.monotonic() < deadline:
        proc.send_signal(signal.SIGINT)
        time.sleep(0.3)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 130, err
    # It did not finish the step and save: no summary, no "checkpoint saved" line.
    assert "checkpoint saved" not in err
    assert out.strip() == ""
    assert ckpt.load_checkpoint(run, "latest", with_train_state=True).step == 2
    assert_resumes_exactly(run, small_corpus, tmp_path)


def test_kill_9_at_random_moments_never_loses_the_run(tmp_path: Path, small_corpus: Path):
    # A checkpoint after every step: much of the time goes to saving, so a kill often lands inside a save.
    run = tmp_path / "runs" / "killed"
    every_step = ("train.checkpoint_interval=1",)
    rng = random.Random()
    delays = []
    proc = start_training(run, small_corpus, *every_step)
    for attempt in range(2):
        reached = latest_step(run)
        wait_for(lambda: latest_step(run) > reached, proc, "a new checkpoint")
        delays.append(rng.uniform(0.0, 0.3))
        time.sleep(delays[-1])
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=30)
        assert proc.returncode == -signal.SIGKILL
        # Whatever the moment, the run loads, training state included.
        ckpt.load_checkpoint(run, "latest", with_train_state=True)
        if attempt == 0:
            proc = start_training(run, small_corpus, resume=True)
    print(f"killed {delays} seconds after a new checkpoint appeared")  # shown if the test fails
    assert_resumes_exactly(run, small_corpus, tmp_path, *every_step)


def test_a_second_signal_raises_for_the_cli_to_exit_and_never_exits_the_process_itself():
    """The library never ends the process (it called os._exit): the CLI turns SecondSignal into 130."""
    import sys

    code = ("import os, signal\n"
            "from minigpt_cli.trainer import SecondSignal, _SignalCatcher\n"
            "try:\n"
            "    with _SignalCatcher():\n"
            "        os.kill(os.getpid(), signal.SIGTERM)\n"
            "        os.kill(os.getpid(), signal.SIGTERM)\n"
            "except SecondSignal as exc:\n"
            "    print('raised', exc.signum)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=cli_env())
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"raised {int(signal.SIGTERM)}"


@pytest.mark.parametrize("signum, code, stopped, detail", [(signal.SIGINT, 130, "interrupted", "by Ctrl-C"),
                                                           (signal.SIGTERM, 143, "terminated", "by SIGTERM")],
                         ids=["SIGINT", "SIGTERM"])
def test_two_signals_in_the_final_evaluation_leave_the_run_interrupted_with_its_weights(
        tmp_path: Path, small_corpus: Path, monkeypatch: pytest.MonkeyPatch, signum: int, code: int, stopped: str,
        detail: str):
    """Issue 25.17b: the second signal stops at once, so the trained weights saved before the final
    evaluation are the run's last checkpoint; it must say how the run ended (it said "max_iters" and
    was not final, so `minigpt runs` listed the run as failed)."""
    from minigpt_cli import train_eval

    real_score_text = train_eval.score_text

    def twice_during_the_final_evaluation(*args, **kwargs):
        if kwargs.get("task", args[8] if len(args) > 8 else None) == FINAL_EVAL_TASK:
            os.kill(os.getpid(), signum)
            os.kill(os.getpid(), signum)  # the handler raises SecondSignal here
        return real_score_text(*args, **kwargs)

    monkeypatch.setattr(train_eval, "score_text", twice_during_the_final_evaluation)
    run, overrides = tmp_path / "runs" / "twice", [*FAST, f"data.path={small_corpus}", "train.max_iters=4",
                                                   "train.eval_interval=100"]
    result = invoke("train", "tiny", "--out", run, *set_flags(*overrides))
    assert result.exit_code == code, result.stderr
    assert "Traceback" not in result.stderr
    latest = ckpt.load_checkpoint(run, "latest")
    assert (latest.step, latest.meta["final"], latest.meta["stopped"]) == (4, False, stopped)
    listed = invoke("runs", run.parent, "--json").json()["runs"]
    assert [(r["state"], r["detail"], r["steps"]) for r in listed] == [("interrupted", detail, 4)]
    # Resumed, it runs the final evaluation it skipped and finishes.
    monkeypatch.setattr(train_eval, "score_text", real_score_text)
    assert train_in_process(overrides, run, resume=True).stopped == "max_iters"
    assert ckpt.load_checkpoint(run, "latest").meta["final"] is True
