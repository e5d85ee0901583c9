"""Experiments: listing and deleting runs, comparing them, building on a run, config.yaml, the time budget."""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import pytest

from conftest import FAST, assert_fits_80, assert_usage_error, invoke, set_flags, train_in_process

# ---------------------------------------------------------------------------------------------
# The time budget, on a fake clock
# ---------------------------------------------------------------------------------------------


class FakeClock:
    def __init__(self, now: float = 0.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


def charge_fake_clock(monkeypatch, clock: FakeClock, step: float, window: float | None = None,
                      first_step: float | None = None, estimate: bool = False) -> None:
    """Make the trainer's work cost fake-clock time: each training step `step` seconds (the first
    `first_step`), each scored validation window `window` seconds, and with `estimate` each window of
    the sampled evaluation batches too. The work itself still runs."""
    from minigpt_cli import train_eval, trainer

    real_step, real_score, real_estimate = trainer.Stepper.step, train_eval.score_text, train_eval.Evaluator.estimate
    taken = []

    def timed_step(self, *args, **kwargs):
        clock.now += first_step if (first_step is not None and not taken) else step
        taken.append(1)
        return real_step(self, *args, **kwargs)

    def timed_score(model, ids, block_size, stride, *args, **kwargs):
        total, count = real_score(model, ids, block_size, stride, *args, **kwargs)
        clock.now += window * max(1, count // stride)
        return total, count

    def timed_estimate(self, splits=("train", "val")):
        clock.now += window * self.config.train.eval_iters * self.config.train.batch_size * len(splits)
        return real_estimate(self, splits)

    monkeypatch.setattr(trainer.Stepper, "step", timed_step)
    if window is not None:
        monkeypatch.setattr(train_eval, "score_text", timed_score)
    if estimate:
        monkeypatch.setattr(train_eval.Evaluator, "estimate", timed_estimate)


def simulate_budget(budget: float, startup: float, first_step: float, step: float, final_eval: float,
                    save: float = 0.1, measured_final_eval: float | None = None) -> tuple[int, float]:
    """The trainer's loop against a TimeBudget: steps until it says stop, then the final evaluation
    and two saves as long as they really take. Returns (steps, seconds since the process started)."""
    from minigpt_cli.trainer import TimeBudget

    clock = FakeClock(startup)
    timer = TimeBudget(budget, started_at=0.0, clock=clock)
    timer.begin(final_eval if measured_final_eval is None else measured_final_eval, save)
    steps = 0
    while steps < 100_000 and not timer.out_of_time():
        took = first_step if steps == 0 else step
        clock.now += took
        timer.step_done(took)
        steps += 1
    clock.now += final_eval * timer.eval_fraction + 2 * save  # the evaluation as cut to fit, if it was
    return steps, clock.now


@pytest.mark.parametrize("budget", [8, 20, 60])
def test_budget_ends_on_time_and_uses_it(budget: float):
    # What went wrong before: 4 s of start-up, a slow first step, a final evaluation of 2 s.
    steps, ended = simulate_budget(budget, startup=4.0, first_step=0.6, step=0.1, final_eval=2.0)
    assert ended <= budget, f"ran {ended - budget:.2f}s past a {budget}s budget"
    assert ended >= budget - 1.0, f"stopped {budget - ended:.2f}s early"
    assert steps >= 3


def test_budget_estimates_from_the_steady_rate_not_the_first_step():
    # A first step of 5 s must not make the loop think there is no time for another 0.05 s step.
    steps, ended = simulate_budget(12, startup=1.0, first_step=5.0, step=0.05, final_eval=1.0)
    assert steps > 50
    assert 11.0 <= ended <= 12.0


def test_budget_trains_a_few_steps_when_a_step_barely_fits():
    # 0.3 s left after the reserve, steps of 0.5 s: still the few steps that show anything.
    steps, ended = simulate_budget(6, startup=4.2, first_step=0.5, step=0.5, final_eval=0.5, save=0.0)
    assert steps == 3
    assert ended <= 6 + 1.0  # within a second of the budget


def test_budget_cuts_a_final_evaluation_that_would_not_fit():
    # What a loaded machine did with --time-budget 15: 10 s to start, a whole-split evaluation of 60 s.
    steps, ended = simulate_budget(15, startup=10.0, first_step=0.5, step=0.1, final_eval=60.0)
    assert steps >= 3
    assert 13.5 <= ended <= 15.0


def test_budget_spent_before_training_trains_nothing():
    steps, _ = simulate_budget(5, startup=6.0, first_step=1.0, step=0.1, final_eval=1.0)
    assert steps == 0


def test_budget_progress_ends_at_the_reserve():
    from minigpt_cli.trainer import TimeBudget

    clock = FakeClock(2.0)
    timer = TimeBudget(10.0, started_at=0.0, clock=clock)
    timer.begin(final_eval_seconds=1.5, save_seconds=0.0)
    assert timer.progress() == pytest.approx(0.0)
    clock.now = 10.0 - 1.5 - timer.MARGIN  # where training must end
    assert timer.progress() == pytest.approx(1.0)


def test_training_under_a_budget_on_a_fake_clock(small_corpus: Path, tmp_path: Path, monkeypatch):
    """The real loop: steps cost 0.2 s (the first 2 s), scoring a window 0.01 s; 6 s of start-up."""
    from minigpt_cli import trainer
    from minigpt_cli.config import apply_overrides, load_config

    clock = FakeClock(6.0)
    charge_fake_clock(monkeypatch, clock, step=0.2, first_step=2.0, window=0.01)
    config = apply_overrides(load_config("tiny"), [*FAST, f"data.path={small_corpus}", "train.max_iters=100000",
                                                   "train.eval_interval=100000", "train.time_budget=15"])
    result = trainer.train(config, tmp_path / "run", started_at=0.0, clock=clock)
    assert result.stopped == "time_budget"
    assert result.steps >= 3
    assert clock.now <= 15.0, f"ended at {clock.now:.2f}s of a 15s budget"
    assert clock.now >= 13.0, f"ended at {clock.now:.2f}s, wasting the budget"


@pytest.mark.parametrize("eval_interval", [100000, 20])
def test_a_budget_keeps_time_to_measure_the_final_checkpoint_only_when_one_was_measured(
        small_corpus: Path, tmp_path: Path, monkeypatch, eval_interval: int):
    """Without a periodic evaluation the final checkpoint is the only candidate: it is the best with no
    sampled measure, and the time that measure would take trains. With one, the final checkpoint is
    measured the same way and time is kept for it."""
    from minigpt_cli import trainer
    from minigpt_cli.checkpoint import load_checkpoint
    from minigpt_cli.config import apply_overrides, load_config

    from minigpt_cli.train_eval import Evaluator

    clock = FakeClock(2.0)
    charge_fake_clock(monkeypatch, clock, step=0.1, window=0.002, estimate=True)
    monkeypatch.setattr(Evaluator, "PERIODIC_SHARE", 1.0)  # evaluations as often as eval_interval asks
    config = apply_overrides(load_config("tiny"), [*FAST, f"data.path={small_corpus}", "train.max_iters=100000",
                                                   f"train.eval_interval={eval_interval}", "train.eval_iters=50",
                                                   "train.batch_size=8", "train.time_budget=15"])
    result = trainer.train(config, tmp_path / "run", started_at=0.0, clock=clock)
    assert result.stopped == "time_budget" and clock.now <= 15.0
    final = [r for r in map(json.loads, (tmp_path / "run" / "metrics.jsonl").read_text().splitlines())
             if r.get("final")][0]
    best = load_checkpoint(tmp_path / "run", which="best")
    if eval_interval > result.steps:
        assert "sampled_val_loss" not in final and best.step == result.steps
        assert best.meta["best_val_loss"] is None
        assert clock.now >= 15.0 - 0.5 - 0.4  # the measure's 0.8 s was not kept back
    else:
        assert math.isfinite(final["sampled_val_loss"])  # measured
        assert best.meta["best_val_loss"] == pytest.approx(result.best_val_loss)


def test_periodic_evaluations_under_a_budget_take_a_small_share_of_its_time(small_corpus: Path, tmp_path: Path,
                                                                           monkeypatch):
    """Evaluating every 5 steps would spend a third of a 60 s budget; spread out, the evaluations take
    at most Evaluator.PERIODIC_SHARE of the time gone at each one, and the rest trains."""
    from minigpt_cli import trainer
    from minigpt_cli.config import apply_overrides, load_config
    from minigpt_cli.train_eval import Evaluator

    clock = FakeClock(2.0)
    charge_fake_clock(monkeypatch, clock, step=0.1, window=0.0005, estimate=True)
    config = apply_overrides(load_config("tiny"), [*FAST, f"data.path={small_corpus}", "train.max_iters=100000",
                                                   "train.eval_interval=5", "train.eval_iters=25",
                                                   "train.batch_size=8", "train.time_budget=60"])
    result = trainer.train(config, tmp_path / "run", started_at=0.0, clock=clock)
    evals = [r for r in map(json.loads, (tmp_path / "run" / "metrics.jsonl").read_text().splitlines())
             if r.get("kind") == "eval" and not r.get("final")]
    cost = 0.0005 * 25 * 8 * 2  # 0.2 s each: every 5 steps would be 0.2 s per 0.5 s of training
    assert 2 <= len(evals) <= Evaluator.PERIODIC_SHARE * 60 / cost
    for n, record in enumerate(evals, start=1):
        assert n * cost <= Evaluator.PERIODIC_SHARE * record["elapsed"] + 1e-9
    assert result.steps > 500  # 58 s of 0.1 s steps, less the few evaluations and the final one


def test_a_short_budget_warms_up_over_a_share_of_its_time_not_warmup_iters(small_corpus: Path, tmp_path: Path,
                                                                           monkeypatch):
    """Steps cost 0.2 s: about 40 of them fit, far fewer than the 1000 warm-up steps asked for."""
    from minigpt_cli import optim, trainer
    from minigpt_cli.config import apply_overrides, load_config

    clock = FakeClock(2.0)
    charge_fake_clock(monkeypatch, clock, step=0.2)
    events = []
    config = apply_overrides(load_config("tiny"), [*FAST, f"data.path={small_corpus}", "train.max_iters=100000",
                                                   "train.eval_interval=100000", "train.time_budget=12",
                                                   "train.warmup_iters=1000", "train.learning_rate=0.001",
                                                   "train.schedule=wsd", "train.decay_fraction=0.3"])
    result = trainer.train(config, tmp_path / "run", callback=events.append, started_at=0.0, clock=clock)
    lrs = [e.data["lr"] for e in events if e.kind == "step"]
    assert result.stopped == "time_budget" and 20 <= len(lrs) < 1000
    assert max(lrs) == pytest.approx(0.001)  # warmed up, though 1000 warm-up steps never came
    warm = next(i for i, lr in enumerate(lrs) if lr == pytest.approx(0.001))
    assert warm <= optim.WARMUP_SHARE * len(lrs) + 2
    assert lrs[-1] < 0.5 * 0.001  # and decayed at the end


def test_a_final_evaluation_too_slow_for_the_budget_scores_a_sample(small_corpus: Path, tmp_path: Path,
                                                                      monkeypatch):
    """Scoring a window costs 0.1 s, so the whole split (about 125 windows) would take 12.5 s of a 15 s budget."""
    from minigpt_cli import trainer
    from minigpt_cli.config import apply_overrides, load_config

    clock = FakeClock(2.0)
    charge_fake_clock(monkeypatch, clock, step=0.1, window=0.1)
    events = []
    config = apply_overrides(load_config("tiny"), [*FAST, f"data.path={small_corpus}", "train.max_iters=100000",
                                                   "train.eval_interval=100000", "train.eval_iters=1",
                                                   "train.time_budget=15"])
    result = trainer.train(config, tmp_path / "run", callback=events.append, started_at=0.0, clock=clock)
    final = [e for e in events if e.kind == "final_eval"][0]
    assert "time budget" in final.data["scope"] and 0 < result.val_tokens_scored < final.data["val_chars"] // 2
    assert result.steps >= 3 and clock.now <= 15.0


# ---------------------------------------------------------------------------------------------
# config.yaml
# ---------------------------------------------------------------------------------------------

def test_config_yaml_round_trips_and_trains_the_same_run(small_corpus: Path, tmp_path: Path):
    from minigpt_cli.checkpoint import load_checkpoint
    from minigpt_cli.config import load_config

    first = tmp_path / "first"
    train_in_process([*FAST, f"data.path={small_corpus}", "train.max_iters=3", "train.eval_interval=2",
                      "train.seed=7"], first)
    saved = load_checkpoint(first, which="latest")
    written = load_config(str(first / "config.yaml"))
    assert written == saved.config  # name included: a run of it is named like the first
    assert written.name == "tiny" and written.train.seed == 7

    result = invoke("train", first / "config.yaml", "--out", tmp_path / "again", "--json", "--quiet")
    assert result.exit_code == 0, result.stderr
    again = load_checkpoint(tmp_path / "again", which="latest")
    assert again.config == saved.config
    for key, tensor in saved.model_state.items():
        assert (again.model_state[key] == tensor).all(), f"{key} differs: not the same training"


def test_training_header_prints_the_seed(small_corpus: Path, tmp_path: Path):
    result = invoke("train", "tiny", "--data", small_corpus, "--out", tmp_path / "r", "--seed", "4242",
                    *set_flags(*FAST, "train.max_iters=1"))
    assert result.exit_code == 0, result.stderr
    assert "seed 4242" in result.stderr


# ---------------------------------------------------------------------------------------------
# minigpt runs
# ---------------------------------------------------------------------------------------------

def _runs_json(*args) -> list[dict]:
    result = invoke("runs", *args, "--json")
    assert result.exit_code == 0, result.stderr
    return result.json()["runs"]


def test_runs_lists_a_damaged_run_and_a_foreign_folder(run_copy: Path, tmp_path: Path):
    runs = tmp_path / "runs"
    damaged = runs / "damaged"
    shutil.copytree(run_copy, damaged)
    pointer = json.loads((damaged / "latest.json").read_text())
    (damaged / pointer["checkpoint"] / "meta.json").write_text("[" * 100_000)  # deeper than any parser allows
    (runs / "photos").mkdir()
    (runs / "photos" / "cat.jpg").write_bytes(b"\xff\xd8")
    (runs / "notes.txt").write_text("not a folder")
    listed = {r["name"]: r for r in _runs_json()}
    assert listed["tiny"]["state"] == "finished"
    assert listed["tiny"]["steps"] == 6 and listed["tiny"]["params"] > 0
    assert listed["tiny"]["best_val_loss"] is not None and listed["tiny"]["final_val_loss"] is not None
    assert listed["damaged"]["state"] == "damaged" and "meta.json" in listed["damaged"]["detail"]
    assert listed["photos"]["state"] == "not a run"
    assert listed["notes.txt"]["state"] == "not a run"
    table = invoke("runs")
    assert table.exit_code == 0 and "damaged" in table.stdout and "finished" in table.stdout


def test_runs_names_how_a_run_ended(small_corpus: Path, tmp_path: Path):
    paused = tmp_path / "runs" / "paused"
    train_in_process([*FAST, f"data.path={small_corpus}", "train.max_iters=6", "train.stop_after=2"], paused)
    listed = {r["name"]: r for r in _runs_json()}
    assert listed["paused"]["state"] == "paused" and listed["paused"]["final_val_loss"] is None
    meta_path = paused / json.loads((paused / "latest.json").read_text())["checkpoint"] / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta_path.write_text(json.dumps({**meta, "stopped": None}))  # the last save a periodic one: it died
    assert _runs_json()[0]["state"] == "failed"


def test_runs_rm_refuses_a_live_run_and_deletes_a_finished_one(run_copy: Path):
    from minigpt_cli.rundir import RunLock

    with RunLock(run_copy):  # what a live `minigpt train` holds while it writes the run
        assert _runs_json()[0]["state"] == "live"
        assert_usage_error(invoke("runs", "rm", run_copy, "--yes"), "live process", str(os.getpid()))
        assert (run_copy / "latest.json").exists()
    assert _runs_json()[0]["state"] == "finished"
    declined = invoke("runs", "rm", run_copy, input="n\n")
    assert declined.exit_code == 1 and run_copy.exists()
    assert invoke("runs", "rm", run_copy, input="y\n").exit_code == 0
    assert not run_copy.exists()


def test_runs_rm_removes_links_not_what_they_point_to(run_copy: Path, tmp_path: Path):
    keep = tmp_path / "keep"
    keep.mkdir()
    (keep / "precious.txt").write_text("mine")
    (run_copy / "outside").symlink_to(keep)  # a link inside a run: not minigpt's, so kept (issue 25)
    elsewhere = tmp_path / "elsewhere"
    shutil.copytree(run_copy, elsewhere, symlinks=True)
    (tmp_path / "runs" / "linked").symlink_to(elsewhere)  # a linked run: the link goes, the run stays
    result = invoke("runs", "rm", tmp_path / "runs" / "linked", run_copy, "--yes")
    assert result.exit_code == 0 and "outside" in result.stderr
    assert not os.path.lexists(tmp_path / "runs" / "linked") and os.listdir(run_copy) == ["outside"]
    assert (run_copy / "outside").is_symlink()
    assert (elsewhere / "latest.json").exists()
    assert (keep / "precious.txt").read_text() == "mine"


def test_runs_rm_refuses_what_is_not_a_run(tmp_path: Path):
    (tmp_path / "runs" / "photos").mkdir(parents=True)
    assert_usage_error(invoke("runs", "rm", tmp_path / "runs" / "photos", "--yes"), "not a minigpt run")
    assert_usage_error(invoke("runs", "rm", tmp_path / "nothing", "--yes"), "not found")
    assert (tmp_path / "runs" / "photos").exists()


# ---------------------------------------------------------------------------------------------
# minigpt compare
# ---------------------------------------------------------------------------------------------

COMPARE_FLAGS = set_flags(*FAST, "train.max_iters=4", "train.eval_interval=2")


def test_compare_trains_two_variants_and_shows_them_side_by_side(small_corpus: Path, tmp_path: Path):
    result = invoke("compare", "tiny", "--vary", "model.pos_encoding=learned,rope", "--data", small_corpus,
                    *COMPARE_FLAGS, "--json", "--quiet")
    assert result.exit_code == 0, result.stderr
    report = result.json()
    assert [v["state"] for v in report["variants"]] == ["finished", "finished"]
    assert report["differences"] == ["model.pos_encoding"]
    assert [r["config_values"]["model"]["pos_encoding"] for r in report["runs"]] == ["learned", "rope"]
    for run in report["runs"]:
        assert run["steps"] == 4 and run["final_val_loss"] is not None and run["val_curve"]
        assert run["config_values"]["train"]["seed"] == report["runs"][0]["config_values"]["train"]["seed"]
    # Each variant is a normal run: it samples, and compares again from its folder.
    runs = [r["path"] for r in report["runs"]]
    assert invoke("sample", runs[0], "--max-new-tokens", "5", "--prompt", "A").exit_code == 0
    table = invoke("compare", *runs)
    assert table.exit_code == 0, table.stderr
    assert "model.pos_encoding" in table.stdout and "learned" in table.stdout and "bits per char" in table.stdout
    assert "train.seed" not in table.stdout  # only the differences


def test_compare_stopped_by_ctrl_c_shows_what_finished(small_corpus: Path, monkeypatch):
    from minigpt_cli import trainer

    real_train, calls = trainer.train, []

    def train_then_interrupt(config, run_dir, **kwargs):
        calls.append(run_dir)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_train(config, run_dir, **kwargs)

    monkeypatch.setattr(trainer, "train", train_then_interrupt)
    result = invoke("compare", "tiny", "--vary", "model.n_layer=1,2,3", "--data", small_corpus, *COMPARE_FLAGS,
                    "--json", "--quiet")
    assert result.exit_code == 130
    report = result.json()
    assert [v["state"] for v in report["variants"]] == ["finished", "interrupted", "pending"]
    assert len(report["runs"]) == 1 and report["interrupted"] is True


def test_compare_checks_every_variant_before_training(small_corpus: Path, tmp_path: Path):
    assert_usage_error(invoke("compare", "tiny", "--vary", "model.pos_encoding=rope,spiral", "--data", small_corpus),
                       "spiral")
    assert_usage_error(invoke("compare", "tiny", "--vary", "model.n_layr=1,2"), "model.n_layer")
    assert not (tmp_path / "runs").exists()


# ---------------------------------------------------------------------------------------------
# train --init-from
# ---------------------------------------------------------------------------------------------

def test_init_from_a_run_on_text_it_knows(tiny_run: Path, small_corpus: Path, tmp_path: Path):
    from minigpt_cli.checkpoint import load_checkpoint

    new_text = tmp_path / "more.txt"
    new_text.write_text(small_corpus.read_text()[-8000:])  # characters the run has seen
    child = tmp_path / "child"
    result = invoke("train", "--init-from", tiny_run, "--data", new_text, "--out", child, "--quiet", "--json",
                    *set_flags("train.max_iters=2", "train.eval_interval=1"))
    assert result.exit_code == 0, result.stderr
    parent, loaded = load_checkpoint(tiny_run), load_checkpoint(child, which="latest")
    assert loaded.tokenizer.chars == parent.tokenizer.chars
    assert loaded.meta["parent"]["run"] == str(tiny_run.resolve())
    assert loaded.step == 2  # a fresh schedule and step count
    # Its best is measured on its own validation text only, never the parent's.
    records = [r for r in map(json.loads, (child / "metrics.jsonl").read_text().splitlines()) if r["kind"] == "eval"]
    own = [r.get("sampled_val_loss") if r.get("final") else r["val_loss"] for r in records]
    assert loaded.meta["best_val_loss"] == pytest.approx(min(v for v in own if v is not None))
    assert loaded.meta["best_val_loss"] != parent.meta["best_val_loss"]
    shown = invoke("inspect", child)
    assert shown.exit_code == 0 and "started from" in shown.stdout and tiny_run.name in shown.stdout


def test_init_from_new_characters_refused_or_added(tiny_run: Path, small_corpus: Path, tmp_path: Path):
    import torch

    from minigpt_cli.checkpoint import load_checkpoint

    new_text = tmp_path / "accents.txt"
    new_text.write_text(small_corpus.read_text()[:6000] + "\nÉtienne à Noel {}\n" * 3)
    refused = invoke("train", "--init-from", tiny_run, "--data", new_text, "--out", tmp_path / "no")
    assert_usage_error(refused, "--extend-vocab", "'É'", "'{'")
    assert not (tmp_path / "no" / "latest.json").exists()

    child = tmp_path / "grown"
    result = invoke("train", "--init-from", tiny_run, "--data", new_text, "--out", child, "--extend-vocab",
                    "--quiet", *set_flags("train.max_iters=1", "train.learning_rate=1e-9", "train.min_lr=0",
                                          "train.muon_lr=1e-9"))
    assert result.exit_code == 0, result.stderr
    parent, grown = load_checkpoint(tiny_run), load_checkpoint(child, which="latest")
    assert set(grown.tokenizer.chars) == set(parent.tokenizer.chars) | set("É{}à")
    assert grown.meta["parent"]["added_chars"] == "".join(sorted(set("É{}à") - set(parent.tokenizer.chars)))
    # Old rows kept at the characters' new ids (a near-zero learning rate barely moves them).
    for key in ("wte.weight", "lm_head.weight"):
        old, new = parent.model_state[key], grown.model_state[key]
        for i, c in enumerate(parent.tokenizer.chars):
            assert torch.allclose(new[grown.tokenizer.stoi[c]], old[i], atol=1e-5), (key, c)
        added = new[grown.tokenizer.stoi["É"]]
        assert torch.allclose(added, old.mean(dim=0), atol=1e-5)  # a new row starts as the mean of the old
    sample = invoke("sample", child, "--prompt", "Étienne", "--max-new-tokens", "3")
    assert sample.exit_code == 0, sample.stderr


def test_init_from_refuses_a_different_model_shape(tiny_run: Path, small_corpus: Path, tmp_path: Path):
    result = invoke("train", "--init-from", tiny_run, "--data", small_corpus, "--out", tmp_path / "x",
                    *set_flags("model.n_layer=3"))
    assert_usage_error(result, "model.n_layer")


# -- compare and runs, hostile input (issue 25) ----------------------------------------------------

def test_a_fifo_in_a_run_is_reported_not_waited_on(run_copy: Path, tmp_path: Path):
    from conftest import run_cli

    model = sorted((run_copy / "checkpoints").iterdir())[-1] / "model.safetensors"
    model.unlink()
    os.mkfifo(model)
    listed = run_cli("runs", run_copy.parent, "--json", timeout=60)
    assert listed.returncode == 0, listed.stderr
    assert {r["name"]: r["state"] for r in json.loads(listed.stdout)["runs"]}[run_copy.name] == "damaged"
    assert_usage_error(run_cli("compare", run_copy, run_copy, timeout=60), "not a regular file")


def test_compare_names_a_run_that_does_not_exist(run_copy: Path, tmp_path: Path):
    assert_usage_error(invoke("compare", run_copy, tmp_path / "nonexist"), "not found")


def test_compare_refuses_values_that_give_the_same_config():
    assert_usage_error(invoke("compare", "tiny", "--vary", "model.n_layer=1,01"), "same config")


def test_compare_reports_a_variant_whose_loss_diverges_and_keeps_the_others(small_corpus: Path):
    result = invoke("compare", "tiny", "--vary", "train.learning_rate=1e-3,1e30", "--data", small_corpus,
                    *COMPARE_FLAGS, "--json", "--quiet")
    report = result.json()
    assert result.exit_code == 1 and "1 of 2 variants failed" in result.stderr
    assert [v["state"] for v in report["variants"]] == ["finished", "failed"]
    assert "non-finite" in report["variants"][1]["error"]
    assert [r["label"] for r in report["runs"]][:1] == ["train.learning_rate=1e-3"]


def test_runs_at_80_columns_splits_no_word_and_counts_what_is_not_a_run(run_copy: Path, tmp_path: Path):
    import subprocess

    from conftest import cli_command, cli_env

    for i in range(2000):
        (tmp_path / "runs" / f"file{i}.txt").write_text("x")
    proc = subprocess.run(cli_command("runs"), capture_output=True, text=True, env={**cli_env(), "COLUMNS": "80"},
                          cwd=tmp_path, timeout=120)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert len(lines) < 12 and "and 1,997 more" in proc.stdout  # not a row per stray file
    assert all(len(line) <= 80 for line in lines if not line.startswith("  not runs:"))  # the note wraps too
    assert f"{run_copy.name}  finished" in proc.stdout and "config tiny" in proc.stdout  # whole words
    wide = subprocess.run(cli_command("runs"), capture_output=True, text=True, env={**cli_env(), "COLUMNS": "200"},
                          cwd=tmp_path, timeout=120)
    header = wide.stdout.splitlines()[1]  # the table, where it fits
    assert "val loss" in header and "best step" in header  # issue 28: no "best val" beside "final val"


def test_compare_checks_the_plot_before_training_and_never_replaces_a_users_file(small_corpus: Path, tmp_path: Path):
    args = ("compare", "tiny", "--vary", "model.n_layer=1,2", "--data", small_corpus, *COMPARE_FLAGS, "--quiet")
    assert_usage_error(invoke(*args, "--plot", "curves.jpg"), "curves.jpg", ".png")
    (tmp_path / "holiday.png").write_bytes(b"\x89PNG my holiday")
    assert_usage_error(invoke(*args, "--plot", "holiday.png"), "holiday.png", "did not write")
    assert (tmp_path / "holiday.png").read_bytes() == b"\x89PNG my holiday"
    assert not (tmp_path / "runs").exists()  # nothing trained


def test_compare_asks_before_training_many_variants(small_corpus: Path, tmp_path: Path):
    result = invoke("compare", "tiny", "--vary", "model.n_layer=1,2,3,4,5", "--vary", "model.n_head=1,2,4,8",
                    "--data", small_corpus, *COMPARE_FLAGS)
    assert_usage_error(result, "20 variants", "--yes")
    assert not (tmp_path / "runs").exists()


def test_compare_says_what_the_variants_share_and_what_they_vary(small_corpus: Path):
    result = invoke("compare", "tiny", "--vary", "train.seed=1,2", "--data", small_corpus, *COMPARE_FLAGS)
    assert result.exit_code == 0, result.stderr
    assert "4 steps each, seed varied, same data" in result.stderr


def test_compare_stopped_by_sigterm_exits_143(small_corpus: Path, monkeypatch):
    from minigpt_cli import trainer

    def terminated(config, run_dir, **kwargs):
        stop = trainer.TrainingStopped.__new__(trainer.TrainingStopped)
        Exception.__init__(stop, "stopped by SIGTERM after step 0")
        stop.signum = 15
        raise stop

    monkeypatch.setattr(trainer, "train", terminated)
    result = invoke("compare", "tiny", "--vary", "model.n_layer=1,2", "--data", small_corpus, *COMPARE_FLAGS,
                    "--quiet")
    assert result.exit_code == 143 and "stopped by SIGTERM" in result.stderr


# -- a time budget means what it says (issue 30) ------------------------------------------------------

def test_a_time_budget_alone_governs_and_a_step_count_of_the_users_stops_first(tmp_path: Path):
    from minigpt_cli.config import UNTIL_BUDGET
    from minigpt_cli.plan import TrainOptions, plan_run

    def planned(**options) -> int:
        return plan_run(TrainOptions(out_dir=tmp_path / f"run{len(list(tmp_path.iterdir()))}", **options)).config.train.max_iters

    assert planned(config_name="tiny") == 100  # no budget: the config's steps
    assert planned(config_name="tiny", time_budget=30) == UNTIL_BUDGET  # the shipped recipe's steps are no choice
    assert planned(config_name="tiny", time_budget=30, overrides=["train.max_iters=50"]) == 50
    own = tmp_path / "mine.yaml"
    own.write_text("train:\n  max_iters: 70\n")
    assert planned(config_name=str(own), time_budget=30) == 70
    own.write_text("train:\n  time_budget: 30\n")
    assert planned(config_name=str(own)) == UNTIL_BUDGET


def test_training_under_a_governing_budget_runs_past_the_configs_steps(small_corpus: Path, tmp_path: Path, monkeypatch):
    """tiny's recipe is 100 steps; a 6 s budget of 0.02 s steps (fake clock) trains until the budget."""
    from minigpt_cli import trainer
    from minigpt_cli.config import apply_overrides, budget_governs, load_config

    clock = FakeClock(0.0)
    charge_fake_clock(monkeypatch, clock, step=0.02, window=0.001)
    flags = [*FAST, f"data.path={small_corpus}", "train.eval_interval=100000", "train.time_budget=6"]
    config = budget_governs(apply_overrides(load_config("tiny"), flags), flags, "tiny")
    events = []
    result = trainer.train(config, tmp_path / "run", started_at=0.0, clock=clock, callback=events.append)
    assert result.stopped == "time_budget" and result.steps > 150
    lrs = [e.data["lr"] for e in events if e.kind == "step"]
    assert lrs[-1] < 0.2 * max(lrs)  # the schedule decayed by the budget's end, not by step 100's


def test_the_training_header_says_what_ends_a_budgeted_run(small_corpus: Path):
    result = invoke("train", "tiny", "--data", small_corpus, "--time-budget", "60", "--out", "run",
                    *set_flags(*FAST, "train.max_iters=3"))
    assert result.exit_code == 0, result.stderr
    assert "stops at 60 s or 3 steps, whichever comes first" in result.stderr


def test_compare_at_80_columns_folds_and_never_cuts_a_key(small_corpus: Path, tmp_path: Path):
    import subprocess

    from conftest import cli_command, cli_env

    for name, interval in (("a", 1), ("b", 2)):
        train_in_process([*FAST, f"data.path={small_corpus}", "train.max_iters=2", f"train.log_interval={interval}",
                          f"train.eval_interval={interval + 1}"], tmp_path / name)
    proc = subprocess.run(cli_command("compare", "a", "b", "a", "b"), capture_output=True, text=True,
                          env={**cli_env(), "COLUMNS": "80"}, cwd=tmp_path, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "…" not in proc.stdout and max(len(line) for line in proc.stdout.splitlines()) <= 80
    first_column = "".join(line.split("│")[1].strip() for line in proc.stdout.splitlines() if line.startswith("│"))
    assert "train.eval_interval" in first_column and "train.log_interval" in first_column  # folded, whole


def test_compare_reports_a_variant_whose_save_fails_and_leaves_no_folder(small_corpus: Path, tmp_path: Path,
                                                                          monkeypatch):
    """A full disk (or a file-size limit) in one variant's first save: that variant failed, one line, the
    others kept, exit 1, and the failed variant's claimed folder removed."""
    from minigpt_cli import checkpoint as ckpt
    from minigpt_cli import run_state

    real_save, saves = run_state.ckpt.save_checkpoint, []

    def second_variant_fails(run_dir, *args, **kwargs):
        saves.append(run_dir)
        if "n_layer-2" in str(run_dir):
            raise ckpt.CheckpointWriteError(f"could not write {run_dir}: File too large")
        return real_save(run_dir, *args, **kwargs)

    monkeypatch.setattr(run_state.ckpt, "save_checkpoint", second_variant_fails)
    result = invoke("compare", "tiny", "--vary", "model.n_layer=1,2", "--data", small_corpus, *COMPARE_FLAGS,
                    "--json", "--quiet")
    assert result.exit_code == 1 and "Traceback" not in result.stderr
    assert [v["state"] for v in result.json()["variants"]] == ["finished", "failed"]
    assert [p.name for p in (tmp_path / "runs").iterdir() if "n_layer-2" in p.name] == []


def test_init_from_keeps_the_step_count_of_the_users_own_config(tiny_run: Path, tmp_path: Path):
    from minigpt_cli.plan import TrainOptions, plan_run

    own = tmp_path / "mine.yaml"
    own.write_text("train:\n  max_iters: 70\n")
    plan = plan_run(TrainOptions(config_name=str(own), init_from=tiny_run, time_budget=30, out_dir=tmp_path / "r"))
    assert plan.config.train.max_iters == 70


def test_compare_charts_the_training_loss_where_runs_evaluated_once(small_corpus: Path, tmp_path: Path,
                                                                     at_80_columns: None):
    """Issue 28.2: a short run evaluates once or twice, so its validation "curve" is a point or two; the
    training loss at every log line makes a curve of it, a letter per run (capitals: validation)."""
    for name, seed in (("a", 1), ("b", 2)):
        train_in_process([*FAST, f"data.path={small_corpus}", "train.max_iters=8", "train.eval_interval=6",
                          f"train.seed={seed}"], tmp_path / name)
    report = invoke("compare", tmp_path / "a", tmp_path / "b", "--json").json()
    for run in report["runs"]:
        assert [step for step, _ in run["train_curve"]] == list(range(1, 9))
        assert [step for step, _ in run["val_curve"]] == [6, 8]
    got = invoke("compare", tmp_path / "a", tmp_path / "b")
    assert got.exit_code == 0, got.stderr
    assert_fits_80(got.stdout)
    grid = "".join(line.split("|", 1)[1] for line in got.stdout.splitlines() if "|" in line)
    assert grid.count("a") + grid.count("b") >= 8 and set("AB") & set(grid)  # curves, and validation points
    assert "  a A  a" in got.stdout and "  b B  b" in got.stdout
    table = got.stdout.split("loss against step")[0]
    assert table.index("val loss") < table.index("best checkpoint") and "best val loss" not in table
    assert f"step {report['runs'][0]['best_step']}:" in table and "on 2 sampled batches" in table


def test_compare_plot_draws_each_runs_training_and_validation_in_one_colour(small_corpus: Path, tmp_path: Path,
                                                                            monkeypatch: pytest.MonkeyPatch):
    from minigpt_cli import inspection

    drawn = []

    class Axes:
        def plot(self, xs, ys, label, **style):
            drawn.append((label, list(xs), style))

        def __getattr__(self, name):
            return lambda *args, **kwargs: None

    class Figure:
        def __init__(self, **kwargs):
            pass

        def add_subplot(self):
            return Axes()

    monkeypatch.setattr(inspection, "_figure_for", lambda path: Figure)
    monkeypatch.setattr(inspection, "_save_figure", lambda figure, path: path)
    for name in ("a", "b"):
        train_in_process([*FAST, f"data.path={small_corpus}", "train.max_iters=4", "train.eval_interval=10"],
                         tmp_path / name)
    got = invoke("compare", tmp_path / "a", tmp_path / "b", "--plot", tmp_path / "curves.png", "--json")
    assert got.exit_code == 0, got.stderr
    styles = {label: (xs, style) for label, xs, style in drawn}
    assert set(styles) == {"a train", "a val", "b train", "b val"}
    assert styles["a train"][0] == [1, 2, 3, 4] and styles["a val"][0] == [4]
    assert styles["a val"][1]["marker"] == "o"  # a single evaluation is still seen
    assert styles["a train"][1]["color"] == styles["a val"][1]["color"] != styles["b val"][1]["color"]


@pytest.mark.parametrize("window, short", [(0.01, True), (0.0001, False)])
def test_a_governing_budget_reads_short_windows_first_only_when_it_affords_few_steps(
        small_corpus: Path, tmp_path: Path, monkeypatch, window: float, short: bool):
    """Issue 29.1: a budget that affords about a hundred steps learns faster with half its time in short
    windows; one that affords thousands does not. The step's cost is estimated from the final
    evaluation's timed window (fake clock: `window` seconds each), before the first step."""
    from minigpt_cli import trainer
    from minigpt_cli.config import apply_overrides, budget_governs, load_config

    clock = FakeClock(0.0)
    charge_fake_clock(monkeypatch, clock, step=0.02, window=window)
    shapes = []
    real_step = trainer.Stepper.step

    def recorded(self, step, short=False):
        shapes.append(short)
        return real_step(self, step, short)

    monkeypatch.setattr(trainer.Stepper, "step", recorded)
    flags = [*FAST, f"data.path={small_corpus}", "train.eval_interval=100000", "train.time_budget=6"]
    config = budget_governs(apply_overrides(load_config("tiny"), flags), flags, "tiny")
    assert config.train.short_windows_auto
    events = []
    trainer.train(config, tmp_path / "run", started_at=0.0, clock=clock, callback=events.append)
    notices = [e.data["message"] for e in events if e.kind == "notice"]
    if short:  # STEP_COST_PER_WINDOW x 8 windows x 0.01 s a step: a few dozen steps in 6 s
        assert any("affords about" in n and "first half reads windows of 8" in n for n in notices), notices
        assert shapes[0] and not shapes[-1] and 0.3 < sum(shapes) / len(shapes) < 0.7
    else:
        assert not any(shapes) and not any("affords about" in n for n in notices)
    # The user's own choice, or a step count of theirs, leaves the budget nothing to choose.
    for own in ("train.short_windows=0", "train.max_iters=50"):
        mine = [*flags, own]
        assert not budget_governs(apply_overrides(load_config("tiny"), mine), mine, "tiny").train.short_windows_auto
