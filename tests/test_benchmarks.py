"""The benchmark scripts the README names run, and report what they claim to measure."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from conftest import cli_env

REPO = Path(__file__).resolve().parents[1]


def run_script(name: str, *args: str, tmp_path: Path) -> dict:
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / name), *args, "--json"],
                          capture_output=True, text=True, cwd=tmp_path, env=cli_env(tmp_path), timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_sample_speed_reports_rates_floors_and_that_the_fast_path_matches(tmp_path):
    result = run_script("sample_speed.py", "--repeats", "1", "--new-tokens", "6", "--config", "tiny",
                        tmp_path=tmp_path)
    assert result["model"].startswith("2 layers, 2 heads, 32 wide") and result["new_tokens"] == 6
    assert all(result["greedy_text_equals_plain_uncached"].values())
    for name in ("cached_float32", "uncached_float32", "cached_bfloat16", "plain_cached_float32",
                 "python_cached_float32", "python_cached_bfloat16"):
        assert result["tokens_per_second"][name] > 0
    assert all(ratio > 0 for ratio in result["python_over_scripted"].values())
    for dtype in ("float32", "bfloat16"):
        assert result["floor_ms"][dtype] == min(v for k, v in result["floor_kernel_ms"].items() if k.endswith(dtype))
        assert result["step_over_floor"][dtype] > 0
    assert result["weight_mb"]["float32"] == 2 * result["weight_mb"]["bfloat16"]


def test_time_to_loss_reports_the_first_crossing_on_the_whole_split(tmp_path):
    result = run_script("time_to_loss.py", "tiny", "--target", "3.0", "--budget", "12", "--eval-every", "10",
                        "--device", "cpu", tmp_path=tmp_path)
    run = result["runs"][0]
    assert result["reached_all"] and run["reached"]
    first = run["first_reached"]
    losses = [loss for _, _, loss in run["curve"]]
    assert losses[0] > 3.0 >= first["val_loss"] > losses[-1]  # the whole-split loss really falls through the target
    crossing = next(step for step, _, loss in run["curve"] if loss <= 3.0)
    assert first["step"] == crossing and first["eval_seconds"] > 0 and first["train_seconds"] > 0
    assert run["eval_seconds"] > 0 and run["wall_seconds"] < 12 + 5
