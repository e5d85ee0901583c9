"""`minigpt train` under torchrun (gloo on CPU) trains the same model as one process with the whole batch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

STEPS = 12


def _train(tmp_path: Path, out: str, nproc: int, batch: int, extra: list[str] = ()) -> subprocess.CompletedProcess:
    args = ["train", "tiny", "--out", out, "--json", "--quiet",
            "--set", f"train.max_iters={STEPS}", "--set", f"train.batch_size={batch}",
            "--set", "train.log_interval=1", "--set", "train.eval_interval=6", "--set", "train.eval_iters=2",
            "--set", "model.dropout=0.0", *extra]
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
               "--standalone", "-m", "minigpt_cli", *args]
    else:
        cmd = [sys.executable, "-m", "minigpt_cli", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MINIGPT_CACHE_DIR": str(tmp_path / "cache")}
    return subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=180)


def _losses(run: Path) -> list[float]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if r["kind"] == "train"]


def _weights(run: Path) -> dict[str, torch.Tensor]:
    pointer = json.loads((run / "latest.json").read_text())
    return load_file(str(run / pointer["checkpoint"] / "model.safetensors"))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("ddp")
    two = _train(tmp_path, "two", nproc=2, batch=4)
    one = _train(tmp_path, "one", nproc=1, batch=8)
    assert two.returncode == 0, two.stderr[:2000] + "\n...\n" + two.stderr[-1000:]
    assert one.returncode == 0, one.stderr[-2000:]
    return tmp_path, two, one


def test_two_ranks_match_one_process_with_twice_the_batch(runs):
    tmp_path, two, one = runs
    a, b = _losses(tmp_path / "two"), _losses(tmp_path / "one")
    assert len(a) == len(b) == STEPS
    assert a[-1] < a[0]  # it trains
    torch.testing.assert_close(torch.tensor(a), torch.tensor(b), rtol=1e-4, atol=1e-5)
    wa, wb = _weights(tmp_path / "two"), _weights(tmp_path / "one")
    assert wa.keys() == wb.keys()
    for key in wa:
        torch.testing.assert_close(wa[key], wb[key], rtol=1e-4, atol=1e-5)
    # Each rank scored its share of the validation split; together, the whole split, as one process does.
    ra, rb = json.loads(two.stdout.strip().splitlines()[-1]), json.loads(one.stdout.strip().splitlines()[-1])
    assert ra["val_tokens_scored"] == rb["val_tokens_scored"] == rb["val_chars"] - 1
    assert ra["final_val_loss"] == pytest.approx(rb["final_val_loss"], rel=1e-4)


def test_only_rank_zero_writes_and_prints_one_json_object(runs):
    tmp_path, two, _ = runs
    lines = [line for line in two.stdout.splitlines() if line.strip()]
    assert len(lines) == 1
    result = json.loads(lines[0])
    assert result["steps"] == STEPS
    assert result["tokens"] == STEPS * 2 * 4 * 32  # ranks x batch x block_size
    # One metrics line per step (not one per rank) and a checkpoint a single process can load.
    assert len(_losses(tmp_path / "two")) == STEPS
    sample = subprocess.run([sys.executable, "-m", "minigpt_cli", "sample", "two", "--prompt", "ROMEO:",
                             "--max-new-tokens", "20", "--seed", "1"],
                            cwd=tmp_path, capture_output=True, text=True, timeout=60,
                            env={**os.environ, "MINIGPT_CACHE_DIR": str(tmp_path / "cache")})
    assert sample.returncode == 0, sample.stderr
    assert sample.stdout.startswith("ROMEO:")


def test_resume_with_a_different_global_batch_is_refused(runs):
    tmp_path, _, _ = runs
    result = _train(tmp_path, "two", nproc=1, batch=4, extra=["--resume", "--set", f"train.max_iters={STEPS + 2}"])
    assert result.returncode == 2
    assert "world_size" in result.stderr and "batch" in result.stderr


# -- ranks on clocks that disagree, and ranks resumed: tests/rank_worker.py runs each rank ------------

WORKER = Path(__file__).resolve().parent / "rank_worker.py"


def _ranks(tmp_path: Path, out: Path, run: str, *flags: str, resume: bool = False) -> None:
    from conftest import write_small_corpus

    corpus = tmp_path / "small.txt"
    if not corpus.exists():
        write_small_corpus(corpus)
    out.mkdir(exist_ok=True)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone", str(WORKER),
           str(out), str(tmp_path / run), *(["--resume"] if resume else []),
           f"data.path={corpus}", "train.device=cpu", "train.batch_size=4", "model.block_size=16",
           "train.eval_iters=2", "train.log_interval=1", *flags]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MINIGPT_CACHE_DIR": str(tmp_path / "cache")}
    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]


def test_ranks_with_skewed_clocks_agree_on_the_learning_rate_under_a_time_budget(tmp_path: Path):
    """Rank 1's clock runs twice as fast as rank 0's: each once set the rate by its own clock, the
    ranks applied different updates, and only rank 0's weights were saved."""
    out = tmp_path / "out"
    _ranks(tmp_path, out, "budget", "train.time_budget=4", "train.schedule=cosine", "train.max_iters=100000",
           "train.eval_interval=100000", "train.warmup_iters=0", "model.dropout=0.0")
    zero, one = torch.load(out / "params.0.pt"), torch.load(out / "params.1.pt")
    for a, b in zip(zero, one):
        assert torch.equal(a, b), "the ranks' weights drifted apart"
    steps = [json.loads(line) for line in (tmp_path / "budget" / "metrics.jsonl").read_text().splitlines()]
    lrs = [r["lr"] for r in steps if r["kind"] == "train"]
    assert len(lrs) >= 3 and lrs[-1] < lrs[0]  # the cosine decay ran on the (agreed) time budget


def test_ranks_resumed_with_dropout_draw_different_masks(tmp_path: Path):
    """On resume every rank restored rank 0's random state: all ranks drew the same dropout masks."""
    flags = ("train.max_iters=6", "train.eval_interval=100000", "model.dropout=0.1")
    _ranks(tmp_path, tmp_path / "first", "run", *flags, "train.stop_after=3")
    first_zero, first_one = torch.load(tmp_path / "first" / "rng.0.pt"), torch.load(tmp_path / "first" / "rng.1.pt")
    assert not torch.equal(first_zero, first_one)  # seed + rank: apart from the start
    _ranks(tmp_path, tmp_path / "resumed", "run", *flags, "train.stop_after=0", resume=True)
    zero, one = torch.load(tmp_path / "resumed" / "rng.0.pt"), torch.load(tmp_path / "resumed" / "rng.1.pt")
    assert not torch.equal(zero, one), "every rank resumed with rank 0's random state"


def test_a_training_step_under_torchrun_agrees_in_one_all_reduce(tmp_path: Path):
    """Issue 27.12: every step synced the ranks 2-4 times (the loss, the mean, the agreement, the budget);
    the loss, a signal and the budget now travel in one all-reduce a step."""
    out = tmp_path / "out"
    _ranks(tmp_path, out, "sync", "train.max_iters=8", "train.eval_interval=100000", "train.time_budget=60")
    for rank in (0, 1):
        per_step = [int(n) for n in (out / f"collectives.{rank}.txt").read_text().split()]
        assert len(per_step) >= 6 and set(per_step) == {1}, per_step
