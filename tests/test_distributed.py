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
