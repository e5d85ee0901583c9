"""Exact resume: a run stopped and resumed equals one trained in one go, step for step and bit for bit."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from conftest import (FAST, assert_same_weights, assert_usage_error, invoke, latest_weights, set_flags,
                      train_in_process, write_small_corpus)
from minigpt_cli import checkpoint as ckpt
from minigpt_cli import rundir

# Dropout on, evaluations (with saves) and extra checkpoints at steps that do not line up with the
# stops, and a warm-up that the first stop falls inside: everything that must be restored is in play.
TOTAL = 16


def resume_flags(corpus: Path, optimizer: str) -> list[str]:
    return [*FAST, f"data.path={corpus}", f"train.max_iters={TOTAL}", "train.eval_interval=5",
            "train.checkpoint_interval=3", "model.dropout=0.1", "train.warmup_iters=6",
            f"train.optimizer={optimizer}"]


def curve(run_dir: Path) -> list[tuple]:
    """Everything that must match: per-step loss and learning rate, and every evaluation."""
    out = []
    for r in rundir.read_metrics(run_dir):
        if r["kind"] == "train":
            out.append(("train", r["step"], r["loss"], r["lr"], r["tokens"]))
        else:
            out.append(("eval", r["step"], r.get("train_loss"), r["val_loss"], r["scope"]))
    return out


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Path]]:
    """For each optimizer: (corpus, run trained for TOTAL steps in one go)."""
    folder = tmp_path_factory.mktemp("uninterrupted")
    corpus = write_small_corpus(folder / "small.txt")
    runs = {}
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MINIGPT_CACHE_DIR", str(folder / "cache"))
        for optimizer in ("adamw", "muon"):
            run_dir = folder / optimizer
            train_in_process(resume_flags(corpus, optimizer), run_dir)
            runs[optimizer] = (corpus, run_dir)
    return runs


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_stop_and_resume_equals_one_go(uninterrupted, tmp_path: Path, optimizer: str):
    corpus, reference = uninterrupted[optimizer]
    flags = resume_flags(corpus, optimizer)
    run = tmp_path / "run"
    first = train_in_process([*flags, "train.stop_after=8"], run)
    assert first.stopped == "stop_after" and first.steps == 8
    second = train_in_process([*flags, "train.stop_after=0"], run, resume=True)
    assert second.steps == TOTAL
    assert curve(run) == curve(reference)
    assert_same_weights(latest_weights(run), latest_weights(reference))
    assert second.best_val_loss == ckpt.load_checkpoint(reference).meta["best_val_loss"]


def test_resuming_several_times_never_replays_or_skips(uninterrupted, tmp_path: Path):
    corpus, reference = uninterrupted["adamw"]
    run = tmp_path / "runs" / "several"
    result = invoke("train", "tiny", "--out", run, "--json", *set_flags(*resume_flags(corpus, "adamw"),
                                                                        "train.stop_after=3"))
    assert result.exit_code == 0, result.stderr
    steps = [3]
    # stop_after pauses the invocation that asks for it: each resume asks for 3 more steps.
    for _ in range(3):
        result = invoke("train", "--resume", "--out", run, "--json", "--set", "train.stop_after=3")
        assert result.exit_code == 0, result.stderr
        steps.append(result.json()["steps"])
    result = invoke("train", "--resume", "--out", run, "--json", "--set", "train.stop_after=0")
    assert result.exit_code == 0, result.stderr
    steps.append(result.json()["steps"])
    assert steps == [3, 6, 9, 12, TOTAL]
    logged = [r["step"] for r in rundir.read_metrics(run) if r["kind"] == "train"]
    assert logged == list(range(1, TOTAL + 1))
    assert curve(run) == curve(reference)
    assert_same_weights(latest_weights(run), latest_weights(reference))


@pytest.fixture
def stopped_run(uninterrupted, tmp_path: Path) -> tuple[Path, Path]:
    """(corpus, a run stopped after 4 of TOTAL steps), in ./runs of this test."""
    corpus, _ = uninterrupted["adamw"]
    run = tmp_path / "runs" / "stopped"
    train_in_process([*resume_flags(corpus, "adamw"), "train.stop_after=4"], run)
    return corpus, run


def snapshot(run: Path) -> dict[Path, bytes]:
    return {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}


def test_resume_with_a_different_model_shape_is_refused(stopped_run):
    _, run = stopped_run
    before = snapshot(run)
    result = invoke("train", "--resume", "--out", run, *set_flags("model.n_layer=3", "model.n_embd=48",
                                                                  "model.n_head=4"))
    line = assert_usage_error(result, "model.n_layer", "model.n_embd", "model.n_head")
    assert "model.dropout" not in line
    assert snapshot(run) == before


def test_resume_with_a_config_file_of_another_shape_is_refused(stopped_run):
    _, run = stopped_run
    before = snapshot(run)
    # configs/tiny.yaml has block_size 32; the run was trained with 16.
    assert_usage_error(invoke("train", "tiny", "--resume", "--out", run), "model.block_size")
    assert snapshot(run) == before


def test_resume_with_a_different_vocabulary_is_refused(stopped_run, tmp_path: Path):
    corpus, run = stopped_run
    other = tmp_path / "other.txt"
    other.write_text(corpus.read_text(encoding="utf-8") + "§¶ new characters\n", encoding="utf-8")
    before = snapshot(run)
    result = invoke("train", "--resume", "--out", run, "--data", other)
    assert_usage_error(result, "'§'", "'¶'", "vocabulary")
    assert snapshot(run) == before


def test_resume_on_different_data_warns_and_says_how_to_proceed(stopped_run, tmp_path: Path):
    corpus, run = stopped_run
    other = tmp_path / "other.txt"
    text = corpus.read_text(encoding="utf-8")
    other.write_text(text[len(text) // 2:] + text[: len(text) // 2], encoding="utf-8")  # same characters
    result = invoke("train", "--resume", "--out", run, "--data", other, "--json", "--set", "train.stop_after=1")
    assert result.exit_code == 0, result.stderr
    warning = [line for line in result.stderr.splitlines() if "warning" in line.lower()]
    assert warning, result.stderr
    assert "differs" in warning[0] and "--out" in warning[0]
    assert result.json()["steps"] == 5
    assert "warning" not in result.stdout


def test_resume_on_the_same_data_does_not_warn(stopped_run):
    _, run = stopped_run
    result = invoke("train", "--resume", "--out", run, "--json", "--set", "train.stop_after=1")
    assert result.exit_code == 0, result.stderr
    assert "warning" not in result.stderr.lower()


def test_resume_without_a_run_is_a_clear_error():
    assert_usage_error(invoke("train", "--resume"), "no run to resume", "--out")
    assert_usage_error(invoke("train", "--resume", "--out", "runs/nothing-here"), "runs/nothing-here")


def test_resume_picks_the_newest_run_by_default(stopped_run, tmp_path: Path):
    _, run = stopped_run
    older = tmp_path / "runs" / "older"
    shutil.copytree(run, older)
    import os
    os.utime(older / "latest.json", (1, 1))
    result = invoke("train", "--resume", "--json", "--set", "train.stop_after=1")
    assert result.exit_code == 0, result.stderr
    assert Path(result.json()["run_dir"]).resolve() == run.resolve()
