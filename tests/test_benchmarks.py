"""The benchmark scripts the README names run, and report what they claim to measure."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from minigpt_cli.config import apply_overrides, load_config

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


def test_muon_step_times_the_iteration_in_both_precisions_and_names_the_one_chosen(tmp_path):
    result = run_script("muon_step.py", "--repeats", "1", "--config", "tiny", tmp_path=tmp_path)
    # tiny: 2 layers of c_attn (3 square blocks), attn c_proj, c_fc and mlp c_proj
    assert result["matrices"] == 2 * 6
    assert result["chosen_dtype"] == ("bfloat16" if result["cpu_has_fast_bfloat16"] else "float32")
    assert all(t > 0 for t in result["seconds"].values()) and result["bfloat16_over_float32"] > 0
    # as Muon.step batches them: the C x C squares (c_attn's blocks, attn c_proj) and the C x 4C MLP pair
    assert result["batches"] == 2 and result["one_by_one_over_batched"] > 0
    spec = importlib.util.spec_from_file_location("muon_step", REPO / "benchmarks" / "muon_step.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    # One 128 x 512 matrix: five iterations of 128x128x512, 128x128x128 and 128x128x512 products.
    assert module.newton_schulz_flops([(512, 128)]) == 5 * 2 * (128 * 128 * 512 * 2 + 128 ** 3)


def test_busy_machine_reports_quiet_and_busy_rates_of_real_sample_processes(tmp_path):
    result = run_script("busy_machine.py", "--configs", "tiny", "--rounds", "1", "--new-tokens", "4",
                        "--train-steps", "0", "--competing", "1", tmp_path=tmp_path)
    (row,) = result["rows"]
    assert row["case"] == "new sample tiny" and result["competing"] == 1
    assert row["quiet"] > 0 and row["busy"] > 0 and row["busy_over_quiet"] > 0
    assert row["threads_quiet"] not in (None, "default")  # the tool reports the thread count it chose


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(name.removesuffix(".py"), REPO / "benchmarks" / name)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_time_to_loss_finds_the_first_whole_split_evaluation_at_the_target():
    ttl = load_script("time_to_loss.py")
    evals = [{"step": 10, "elapsed": 2.0, "val_loss": 3.5, "scope": "full", "eval_seconds": 0.5},
             {"step": 20, "elapsed": 4.0, "val_loss": 2.9, "scope": "sampled", "eval_seconds": 0.6},
             {"step": 30, "elapsed": 6.0, "val_loss": 2.95, "scope": "full", "eval_seconds": 1.5},
             {"step": 40, "elapsed": 8.0, "val_loss": 2.5, "scope": "full", "eval_seconds": 2.0}]
    first = ttl.first_crossing(evals, 3.0)
    # A sampled estimate below the target does not count; the first whole-split one does.
    assert first == {"step": 30, "val_loss": 2.95, "elapsed": 6.0, "train_seconds": 4.5, "eval_seconds": 1.5}
    assert ttl.first_crossing(evals, 2.5)["step"] == 40
    assert ttl.first_crossing(evals, 2.0) is None


def test_time_to_loss_runs_a_step_budget_or_a_time_budget():
    ttl = load_script("time_to_loss.py")
    by_steps = ttl.train_command("tiny", [], Path("out"), None, 60, 20, "cpu")
    assert "--time-budget" not in by_steps and "train.max_iters=60" in by_steps
    assert "train.eval_full=true" in by_steps and "train.eval_interval=20" in by_steps
    by_time = ttl.train_command("tiny", [], Path("out"), 39.0, None, 0, "")
    assert by_time[by_time.index("--time-budget") + 1] == "39.0" and "train.eval_full=true" not in by_time


def test_the_nanogpt_reference_is_its_cpu_recipe_in_this_tools_config():
    ttl = load_script("time_to_loss.py")
    config = apply_overrides(load_config("default"), list(ttl.NANOGPT_CPU))
    m, t = config.model, config.train
    assert (m.n_layer, m.n_head, m.n_embd, m.block_size, m.dropout) == (4, 4, 128, 64, 0.0)
    assert (m.pos_encoding, m.norm, m.activation, m.tie_weights, m.bias, m.qk_norm) == (
        "learned", "layernorm", "gelu", True, False, False)
    assert (t.optimizer, t.batch_size, t.learning_rate, t.min_lr, t.schedule, t.warmup_iters) == (
        "adamw", 12, 1e-3, 1e-4, "cosine", 100)
    assert (t.beta2, t.weight_decay, t.grad_clip) == (0.99, 0.1, 1.0)
    # nanoGPT has no short convolutions and draws its windows at random.
    assert (m.short_conv, t.sampling) == (0, "random")


def test_time_to_loss_reports_the_run_and_the_reference_on_the_whole_split(tmp_path, small_corpus):
    # A step budget, not a time budget: the same work on a busy machine as on a quiet one.
    result = run_script("time_to_loss.py", "tiny", "--target", "100", "--steps", "20", "--eval-every", "10",
                        "--device", "cpu", "--data", str(small_corpus), "--reference", "nanogpt",
                        "--reference-steps", "10", tmp_path=tmp_path)
    run = result["runs"][0]
    assert result["steps"] == 20 and run["steps"] == 20 and result["reached_all"]
    assert [step for step, _, _ in run["curve"]] == [10, 20]
    first = run["first_reached"]  # every loss is below 100: the first evaluation is the crossing
    assert first["step"] == 10 and round(first["val_loss"], 4) == run["curve"][0][2]
    assert first["eval_seconds"] > 0 and first["train_seconds"] > 0 and run["eval_seconds"] > 0
    reference = result["reference"]
    assert reference["name"] == "nanogpt" and reference["runs"][0]["steps"] == 10
    assert reference["runs"][0]["final_val_loss"] < 5


def test_hf_generate_compares_both_dtypes_when_transformers_is_installed(tmp_path):
    pytest.importorskip("transformers")  # not a dependency: only benchmarks/hf_generate.py needs it
    result = run_script("hf_generate.py", "--repeats", "1", "--new-tokens", "4", tmp_path=tmp_path)
    assert set(result["tokens_per_second"]) == {"minigpt_float32", "minigpt_bfloat16", "hf_float32", "hf_bfloat16"}
    assert all(rate > 0 for rate in result["tokens_per_second"].values())
    assert all(ratio > 0 for ratio in result["minigpt_over_hf"].values())
    assert 0 < result["weight_read_floor_ms"]["bfloat16"] < result["weight_read_floor_ms"]["float32"]
