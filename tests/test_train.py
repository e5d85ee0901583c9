"""Training: the loss goes down, --json is machine-readable, runs are reproducible, bad losses stop."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch

from conftest import (BUNDLED_TEXT, FAST, assert_fits_80, assert_same_weights, assert_usage_error, invoke,
                      latest_weights, run_cli, set_flags, train_in_process, train_losses)
from minigpt_cli import checkpoint as ckpt
from minigpt_cli import rundir
from minigpt_cli.rundir import read_metrics


def test_tiny_model_learns_the_bundled_text(tmp_path: Path):
    # The tiny config on the bundled Shakespeare (vocabulary 65): a uniform guess costs ln(65) = 4.17 nats.
    result = train_in_process(["train.max_iters=60", "train.eval_interval=1000", "train.log_interval=1",
                               "train.device=cpu"], tmp_path / "run")
    first_loss = train_losses(tmp_path / "run")[0][1]
    assert abs(first_loss - math.log(65)) < 0.1
    # 60 steps reach about 2.65 on every seed tried; 3.2 leaves a wide margin.
    assert result.final_val_loss < 3.2
    assert result.best_val_loss < 3.3
    assert result.steps == 60
    assert result.val_tokens_scored > 100_000  # the whole validation split was scored
    loaded = ckpt.load_checkpoint(tmp_path / "run")
    assert loaded.tokenizer.vocab_size == 65
    assert loaded.meta["data_fingerprint"] == __import__("hashlib").sha256(BUNDLED_TEXT.read_bytes()).hexdigest()


def test_short_windows_read_half_the_block_at_twice_the_batch_for_the_first_share(tmp_path: Path,
                                                                                small_corpus: Path, monkeypatch):
    from minigpt_cli import trainer

    shapes = []
    real_get_batch = trainer.get_batch

    def recording(ids, starts, block_size, device=None, vocab_size=None):
        shapes.append((len(starts), block_size))
        return real_get_batch(ids, starts, block_size, device, vocab_size)

    monkeypatch.setattr(trainer, "get_batch", recording)
    result = train_in_process([*FAST, f"data.path={small_corpus}", "train.max_iters=10", "train.eval_interval=1000",
                               "train.short_windows=0.3"], tmp_path / "run")
    # FAST: batch 8 of block 16. Steps 0-2 (a share under 0.3) read 16 windows of 8; the rest 8 of 16.
    assert shapes[:10] == [(16, 8)] * 3 + [(8, 16)] * 7
    assert result.tokens == 10 * 8 * 16 and result.final_val_loss < math.log(65)


def test_train_json_from_stdin_in_a_real_process(tmp_path: Path, small_corpus: Path):
    result = run_cli("train", "tiny", "--data", "-", "--json",
                     *set_flags(*FAST, "train.max_iters=4", "train.eval_interval=2"),
                     input=small_corpus.read_text(encoding="utf-8"), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 1, f"stdout must hold only the JSON object: {result.stdout!r}"
    summary = json.loads(lines[0])
    for key in ("run_dir", "best_val_loss", "steps", "tokens", "wall_seconds"):
        assert key in summary, key
    assert summary["steps"] == 4
    assert summary["tokens"] == 4 * 8 * 16
    assert 0 < summary["best_val_loss"] < 5
    assert summary["wall_seconds"] > 0
    # A new run goes to runs/<config>-<date>-<time>, and holds a checkpoint that records where the text came from.
    assert re.fullmatch(r"runs/tiny-\d{8}-\d{6}(-\d+)?", summary["run_dir"])
    run_dir = tmp_path / summary["run_dir"]
    loaded = ckpt.load_checkpoint(run_dir)
    assert loaded.step == 4
    assert loaded.config.data.path == "-"


def test_same_seed_same_curve_and_weights(tmp_path: Path, small_corpus: Path):
    flags = [*FAST, f"data.path={small_corpus}", "train.max_iters=8", "train.eval_interval=4", "model.dropout=0.1"]
    train_in_process(flags, tmp_path / "a")
    train_in_process(flags, tmp_path / "b")
    train_in_process([*flags, "train.seed=7"], tmp_path / "c")
    assert train_losses(tmp_path / "a") == train_losses(tmp_path / "b")
    assert_same_weights(latest_weights(tmp_path / "a"), latest_weights(tmp_path / "b"))
    assert train_losses(tmp_path / "a") != train_losses(tmp_path / "c")


def test_same_seed_same_samples(tiny_run: Path):
    def sample(seed: int) -> list[str]:
        result = invoke("sample", tiny_run, "--seed", seed, "--max-new-tokens", 40, "--num-samples", 2, "--json",
                        "--device", "cpu")
        assert result.exit_code == 0, result.stderr
        return result.json()["samples"]

    first = sample(3)
    assert first == sample(3)
    assert first != sample(4)
    assert all(len(s) == 40 for s in first)


def test_deterministic_flag_turns_on_deterministic_algorithms(tmp_path: Path, small_corpus: Path):
    assert not torch.are_deterministic_algorithms_enabled()
    try:
        result = invoke("train", "tiny", "--data", small_corpus, "--out", "runs/det", "--deterministic", "--json",
                        *set_flags(*FAST, "train.max_iters=1"))
        assert result.exit_code == 0, result.stderr
        assert torch.are_deterministic_algorithms_enabled()
    finally:
        torch.use_deterministic_algorithms(False)
    assert ckpt.load_checkpoint(Path("runs/det")).config.train.deterministic is True


def test_stop_after_saves_and_reports(tmp_path: Path, small_corpus: Path):
    result = invoke("train", "tiny", "--data", small_corpus, "--out", "runs/part", "--json",
                    *set_flags(*FAST, "train.max_iters=20", "train.eval_interval=100", "train.stop_after=3"))
    assert result.exit_code == 0, result.stderr
    summary = result.json()
    assert summary["steps"] == 3
    assert summary["stopped"] == "stop_after"
    assert ckpt.load_checkpoint(Path("runs/part"), "latest").step == 3


def test_non_finite_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint(small_corpus: Path):
    # A learning rate this large breaks the weights in the second update; an evaluation and a save
    # follow every step, so a careless trainer would save the broken weights.
    result = invoke("train", "tiny", "--data", small_corpus, "--out", "runs/nan",
                    *set_flags(*FAST, "train.max_iters=10", "train.eval_interval=1", "train.learning_rate=1e30",
                               "train.min_lr=0", "train.warmup_iters=0"))
    assert result.exit_code == 1, result.stderr
    assert "Traceback" not in result.stderr
    match = re.search(r"non-finite at step (\d+)", result.stderr)
    assert match, result.stderr
    stopped_at = int(match.group(1))
    loaded = ckpt.load_checkpoint(Path("runs/nan"), "latest")
    assert loaded.step < stopped_at
    for folder in Path("runs/nan/checkpoints").iterdir():
        weights = ckpt.load_checkpoint(folder).model_state
        assert all(torch.isfinite(w).all() for w in weights.values()), folder
    assert all(math.isfinite(r.get("loss", 0.0)) for r in rundir.read_metrics(Path("runs/nan")) if r["kind"] == "train")


def test_a_new_run_never_overwrites_an_old_one(run_copy: Path, small_corpus: Path):
    before = {p: p.read_bytes() for p in run_copy.rglob("*") if p.is_file()}
    result = invoke("train", "tiny", "--data", small_corpus, "--out", run_copy, *set_flags(*FAST))
    assert result.exit_code == 2
    assert "--resume" in result.stderr
    assert {p: p.read_bytes() for p in run_copy.rglob("*") if p.is_file()} == before


def test_a_run_killed_before_its_first_save_can_be_started_again(tmp_path: Path, small_corpus: Path):
    # What kill -9 before the first checkpoint leaves: the run's lock file (which marks the folder as
    # minigpt's) and metrics of steps that were never saved.
    run = tmp_path / "runs" / "again"
    run.mkdir(parents=True)
    (run / rundir.LOCK_FILE).write_text("4242\n")
    (run / "metrics.jsonl").write_text('{"kind": "train", "step": 1, "loss": 9.0}\n{"kind": "train", "st')
    result = invoke("train", "tiny", "--data", small_corpus, "--out", run, "--json",
                    *set_flags(*FAST, "train.max_iters=3", "train.eval_interval=100"))
    assert result.exit_code == 0, result.stderr
    assert [s for s, _ in train_losses(run)] == [1, 2, 3]
    assert 9.0 not in [loss for _, loss in train_losses(run)]


def _strict(text: str):
    """json.loads that refuses NaN and Infinity, as jq and JavaScript do."""
    def refuse(name):
        raise ValueError(f"not strict JSON: {name}")
    return json.loads(text, parse_constant=refuse)


def test_best_checkpoint_is_chosen_by_one_measure_and_meta_is_strict_json(tmp_path: Path):
    """The periodic evaluations use fixed sampled batches; the final one scores the whole split. The
    best checkpoint is the lowest by the sampled measure (the final weights measured that way too),
    not a sampled figure against a whole-split one."""
    run = tmp_path / "run"
    result = train_in_process(["train.max_iters=40", "train.eval_interval=10", "train.eval_iters=2",
                               "train.device=cpu"], run)
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if r["kind"] == "eval"]
    sampled = [r["val_loss"] for r in evals if r.get("scope") == "sampled"]
    final = evals[-1]
    assert final["final"] and final["scope"] == "full" and len(sampled) == 3
    assert result.best_val_loss == pytest.approx(min(sampled + [final["sampled_val_loss"]]))
    best = ckpt.load_checkpoint(run, which="best")
    meta = _strict((best.path / ckpt.META_FILE).read_text())
    assert meta["best_val_loss"] == pytest.approx(result.best_val_loss)
    if final["sampled_val_loss"] < min(sampled):
        assert meta["step"] == 40
    # Stopped before any evaluation: no best loss yet is null, not Infinity.
    early = tmp_path / "early"
    train_in_process(["train.max_iters=40", "train.eval_interval=1000", "train.stop_after=2", "train.log_interval=1",
                      "train.device=cpu"], early)
    latest = ckpt.load_checkpoint(early)
    assert _strict((latest.path / ckpt.META_FILE).read_text())["best_val_loss"] is None
    for line in (early / "metrics.jsonl").read_text().splitlines():
        _strict(line)


def test_the_final_evaluation_of_a_large_split_is_a_stated_sample(tmp_path: Path, small_corpus: Path):
    # A small threshold stands in for a large corpus: the 2,000-character split is scored on 4 windows of 16.
    flags = set_flags(*FAST, "train.max_iters=2", "train.eval_interval=100", "train.eval_max_chars=64")
    got = invoke("train", "tiny", "--data", small_corpus, "--out", "sampled", *flags)
    assert got.exit_code == 0, got.stderr
    summary = " ".join(got.stdout.split())  # the summary wraps its values at the terminal's width
    assert "64 characters sampled of 2,000" in got.stderr and "64 characters sampled of the validation split's 2,000" in summary
    result = invoke("train", "tiny", "--data", small_corpus, "--out", "again", "--json", *flags).json()
    assert (result["val_tokens_scored"], result["val_chars"]) == (64, 2_000)
    final = [r for r in read_metrics(tmp_path / "again") if r.get("final")][-1]
    assert final["scope"] == "windows" and final["chars_scored"] == 64
    whole = invoke("train", "tiny", "--data", small_corpus, "--out", "whole", "--json",
                   *flags, "--set", "train.eval_max_chars=0").json()
    assert whole["val_tokens_scored"] == 1_999


# -- issue 25.8: a model too big for memory is refused before anything is allocated ---------------

def test_a_model_too_big_for_memory_is_refused_before_it_is_built(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    from minigpt_cli import trainer
    from minigpt_cli.config import apply_overrides, load_config
    from minigpt_cli.device import available_memory
    from minigpt_cli.model import training_bytes

    big = ("model.n_embd=8192", "model.n_layer=64", "model.n_head=64")
    config = apply_overrides(load_config("default"), list(big))
    needed = training_bytes(config.model, 65, config.train.batch_size)["total"]  # the bundled text: 65 characters
    free = available_memory(torch.device("cpu"))
    if free is None or free >= needed:
        pytest.skip("this machine does not say what memory is free, or has more than the big model needs")

    def never(*args, **kwargs):
        raise AssertionError("the model was built before the memory check")

    monkeypatch.setattr(trainer, "GPT", never)
    # Before the check, this allocated for 95 s until the kernel killed it, leaving a lock-only folder.
    result = invoke("train", *set_flags(*big))
    line = result.stderr.strip().splitlines()[-1]
    assert result.exit_code == 2 and "Traceback" not in result.stderr, result.stderr
    assert re.search(r"needs about \d+ GiB \(weights and optimizer \d+ GiB, activations \d+ GiB\); [\d.]+ GiB free: "
                     r"try a smaller model.n_embd, n_layer or batch_size", line), line
    runs = tmp_path / "runs"
    assert not runs.exists() or list(runs.iterdir()) == []  # the claimed run folder was removed again


def test_the_memory_check_uses_the_devices_figure(tmp_path: Path, small_corpus: Path, monkeypatch: pytest.MonkeyPatch):
    from minigpt_cli import trainer

    flags = set_flags(*FAST, f"data.path={small_corpus}", "train.max_iters=2", "train.eval_interval=100")
    seen = []
    monkeypatch.setattr(trainer, "available_memory", lambda device: seen.append(device.type) or 2**20)
    line = assert_usage_error(invoke("train", "tiny", "--out", tmp_path / "small", *flags),
                              "the model is too big to train on cpu", "1.0 MiB free")
    assert seen == ["cpu"] and "needs about" in line
    assert not (tmp_path / "small").exists()
    # Where the device does not say what is free, nothing is checked: even a huge estimate trains.
    monkeypatch.setattr(trainer, "available_memory", lambda device: None)
    monkeypatch.setattr(trainer, "training_bytes", lambda *args: {"total": 2**60, "weights_and_optimizer": 2**60,
                                                                  "activations": 0})
    result = invoke("train", "tiny", "--out", tmp_path / "unknown", *flags)
    assert result.exit_code == 0, result.stderr


def test_summary_shows_val_loss_first_and_the_best_checkpoint_on_its_own_measure(small_corpus: Path, tmp_path: Path):
    """Issue 28.1: "best val loss" (sampled batches) above "final val loss" (the whole split) read as a
    contradiction when best was the larger; now val loss comes first, and the best checkpoint is named by
    its step and compared only with the final weights on the batches that chose it."""
    flags = ["tiny", "--data", small_corpus, *set_flags(*FAST, "train.max_iters=6", "train.eval_interval=3")]
    data = invoke("train", *flags, "--out", tmp_path / "a", "--json", "--quiet").json()
    best_step = rundir.pointer_step(tmp_path / "a", "best")
    assert data["best_step"] == best_step and best_step in (3, 6)
    assert data["best_measure"] == "2 sampled batches"
    final = [r for r in read_metrics(tmp_path / "a") if r.get("final")][0]
    assert data["final_on_best_measure"] == pytest.approx(final["sampled_val_loss"])
    assert data["best_val_loss"] == pytest.approx(min(data["final_on_best_measure"], *(
        r["val_loss"] for r in read_metrics(tmp_path / "a") if r.get("kind") == "eval" and not r.get("final"))))
    people = invoke("train", *flags, "--out", tmp_path / "b").stdout
    assert "best val loss" not in people and "final val loss" not in people
    assert people.index("val loss") < people.index("best checkpoint")
    assert f"best checkpoint   step {best_step}" in people and "on 2 sampled batches" in people.replace("\n", " ")


def test_summary_compares_an_earlier_best_checkpoint_with_the_final_weights_like_for_like():
    from minigpt_cli.commands.train import _loss_rows
    from minigpt_cli.trainer import TrainResult

    result = TrainResult(run_dir="r", steps=1000, tokens=1, best_val_loss=1.5320, final_val_loss=1.4996,
                         final_val_bpc=2.163, wall_seconds=1, train_seconds=1, eval_seconds=0, stopped="max_iters",
                         device="cpu", precision="float32", n_params=1, val_tokens_scored=111_538,
                         val_chars=111_539, vocab_size=65, best_step=750, best_measure="20 sampled batches",
                         final_on_best_measure=1.5410)
    rows = dict(_loss_rows(result))
    assert list(rows) == ["val loss", "uniform baseline", "best checkpoint"]
    assert rows["val loss"].startswith("1.4996") and "whole validation split" in rows["val loss"]
    assert rows["best checkpoint"] == ("step 750 (sample and eval load it): 1.5320 on 20 sampled batches, where the "
                                       "final weights score 1.5410")


def test_summary_at_80_columns_keeps_a_long_run_directory_whole(small_corpus: Path, tmp_path: Path,
                                                                at_80_columns: None):
    out = tmp_path / ("a-run-directory-named-at-length-" * 3)
    got = invoke("train", "tiny", "--data", small_corpus, "--out", out, *set_flags(*FAST, "train.max_iters=2"))
    assert got.exit_code == 0, got.stderr
    assert_fits_80(got.stdout)
    assert str(out) in "".join(line.strip() for line in got.stdout.splitlines())  # folded, not cut to "…"


def test_the_final_evaluation_can_score_overlapping_windows_and_says_so(tmp_path: Path, small_corpus: Path):
    # train.eval_stride: every character after the first window sees at least block_size - stride of
    # context; the final loss is then the number `minigpt eval --stride` gives for the same weights.
    flags = set_flags(*FAST, "train.max_iters=30", "train.eval_interval=100", "train.eval_stride=4")
    got = invoke("train", "tiny", "--data", small_corpus, "--out", "overlap", *flags)
    assert got.exit_code == 0, got.stderr
    assert "windows of 16 every 4: each character with at least 12 of context" in " ".join(got.stdout.split())
    final = [r for r in read_metrics(tmp_path / "overlap") if r.get("final")][-1]
    scored = invoke("eval", "overlap", "--checkpoint", "latest", "--stride", 4, "--json").json()
    assert final["val_loss"] == pytest.approx(scored["nll"], rel=1e-5)
    assert final["chars_scored"] == scored["chars_scored"]
    assert scored["checkpoint_val_measure"] == "final evaluation, windows of 16 every 4"
    # inspect's training record names the same measures as the summary: the final loss's windows, and
    # the periodic evaluations' measure that chose the best checkpoint
    record = invoke("inspect", "overlap", "--json").json()["run"]
    assert (record["val_chars_scored"], record["val_chars"]) == (final["chars_scored"], final["val_chars"])
    assert record["val_windows"].startswith("windows of 16 every 4") and record["best_measure"] == "2 sampled batches"
    shown = " ".join(invoke("inspect", "overlap").stdout.split())
    assert f"on the whole validation split, {final['chars_scored']:,} characters (windows of 16 every 4" in shown
    assert_usage_error(invoke("train", "tiny", "--data", small_corpus, "--out", "bad",
                              *set_flags(*FAST, "train.eval_stride=17")), "train.eval_stride", "block_size (16)")


def test_a_finished_run_keeps_one_checkpoint_of_its_last_step_with_the_final_loss(tmp_path: Path, small_corpus: Path):
    # The trained weights are saved before the final evaluation (a second Ctrl-C during it loses
    # nothing); the evaluation's result then goes into that checkpoint's meta.json, not a second copy.
    got = invoke("train", "tiny", "--data", small_corpus, "--out", "once", "--json",
                 *set_flags(*FAST, "train.max_iters=12", "train.eval_interval=5")).json()
    run = tmp_path / "once"
    names = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert names[-1] == "step-0000012" and not any(name.startswith("step-0000012-") for name in names)
    meta = json.loads((run / "checkpoints" / "step-0000012" / "meta.json").read_text())
    assert meta["final"] is True and meta["val_loss"] == pytest.approx(got["final_val_loss"])
    assert rundir.pointer_target(run, "latest").name == "step-0000012"
    best = rundir.pointer_target(run, "best").name
    assert best in names and meta["best_val_loss"] == pytest.approx(got["best_val_loss"])
    assert set(names) == {"step-0000012", best}  # nothing left that neither pointer names
