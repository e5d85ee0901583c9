"""Bad input: exit code 2, one line naming the problem, no traceback, nothing overwritten.

Config and data mistakes are also covered next to their modules (test_config.py, test_data.py, test_data_safety.py);
this file holds the sampling settings, prompts, devices, missing runs, and a few checks in a real
process so that the exit code and stderr are exactly what a shell sees.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import FAST, assert_usage_error, invoke, run_cli, set_flags


def snapshot(run: Path) -> dict[Path, bytes]:
    return {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}


@pytest.mark.parametrize("option, value, fragment", [
    ("--temperature", "-1", "--temperature"),
    ("--temperature", "nan", "--temperature"),
    ("--top-k", "0", "--top-k"),
    ("--top-p", "0", "--top-p"),
    ("--top-p", "1.5", "--top-p"),
    ("--min-p", "-0.1", "--min-p"),
    ("--min-p", "2", "--min-p"),
    ("--repetition-penalty", "0", "--repetition-penalty"),
    ("--max-new-tokens", "-1", "--max-new-tokens"),
    ("--seed", "18446744073709551616", "--seed"),
    ("--seed", "-5", "--seed"),
    ("--stop", "", "--stop"),
    ("--num-samples", "0", "--num-samples"),
    ("--dtype", "float64", "--dtype"),
    ("--unknown", "ignore", "--unknown"),
])
def test_out_of_range_sampling_settings(run_copy: Path, option: str, value: str, fragment: str):
    before = snapshot(run_copy)
    result = invoke("sample", run_copy, option, value, "--max-new-tokens" if option != "--max-new-tokens" else "-n",
                    "5" if option != "--max-new-tokens" else value, "--no-stream")
    assert_usage_error(result, fragment)
    assert result.stdout == ""
    assert snapshot(run_copy) == before


def test_prompt_characters_outside_the_vocabulary_are_named(run_copy: Path):
    result = invoke("sample", run_copy, "--prompt", "ROMEO€ 🙂", "--no-stream", "-n", "5")
    assert_usage_error(result, "'€'", "'🙂'", "prompt")
    skipped = invoke("sample", run_copy, "--prompt", "ROMEO€", "--unknown", "skip", "-n", "5", "--json")
    assert skipped.exit_code == 0, skipped.stderr
    assert "'€'" in skipped.stderr
    assert skipped.json()["prompt"]


@pytest.mark.parametrize("device", ["cuda:99", "tpu", "mps:7"])
def test_a_device_that_is_not_available(run_copy: Path, small_corpus: Path, device: str):
    before = snapshot(run_copy)
    assert_usage_error(invoke("sample", run_copy, "--device", device, "--no-stream"), device)
    assert_usage_error(invoke("train", "tiny", "--data", small_corpus, "--device", device), device)
    assert snapshot(run_copy) == before
    assert not any(Path("runs").glob("tiny-*"))


@pytest.mark.parametrize("command", ["sample", "eval"])
def test_sample_or_eval_when_no_run_exists(command: str):
    assert_usage_error(invoke(command), "no trained run")
    assert_usage_error(invoke(command, "runs/missing"), "runs/missing")
    Path("runs/empty").mkdir(parents=True)
    assert_usage_error(invoke(command, "runs/empty"), "runs/empty")


@pytest.mark.parametrize("flag", ["model.n_layer", "n_layer=2", "=2", "model.n_layr=2", "optim.lr=1"])
def test_malformed_or_unknown_set_on_resume_changes_nothing(run_copy: Path, flag: str):
    before = snapshot(run_copy)
    result = invoke("train", "--resume", "--out", run_copy, "--set", flag)
    assert_usage_error(result)
    assert snapshot(run_copy) == before


def test_in_a_real_process_config_error_is_one_line_and_exit_2(tmp_path: Path):
    result = run_cli("train", "tiny", *set_flags("model.n_layr=2"), cwd=tmp_path)
    line = assert_usage_error(result, "model.n_layr", "model.n_layer")
    assert line.startswith("error:")
    assert result.stdout == ""
    assert not (tmp_path / "runs").exists()


def test_in_a_real_process_sampling_error_is_one_line_and_exit_2(tiny_run: Path, tmp_path: Path):
    result = run_cli("sample", tiny_run, "--top-p", "7", "--json", cwd=tmp_path)
    assert_usage_error(result, "--top-p")
    assert result.stdout == ""


def test_a_file_or_folder_named_like_a_shipped_config_does_not_hide_it(tmp_path: Path):
    (tmp_path / "default").mkdir()
    (tmp_path / "tiny").write_text("not a config")
    assert invoke("inspect", "tiny", "--json").json()["target"]["name"] == "tiny"
    assert invoke("inspect", "--json").json()["target"]["name"] == "default"
    assert_usage_error(invoke("inspect", "./tiny"), "tiny", "mapping")  # the file, when asked for by path
    assert_usage_error(invoke("train", "./default"), "folder")


@pytest.mark.parametrize("key, value", [("train.seed", "99999999999999999999999"), ("model.n_layer", "1000000000"),
                                        ("model.block_size", "1000000000000"), ("train.num_threads", "100000")])
def test_absurd_sizes_and_seeds_are_refused_before_any_work(key: str, value: str):
    assert_usage_error(invoke("train", "tiny", "--set", f"{key}={value}"), key)


def test_a_batch_too_big_for_memory_is_one_line_and_leaves_no_run_behind(tmp_path: Path):
    # Refused by the memory estimate before anything is allocated (issue 25.8); it ran out of memory before.
    result = run_cli("train", "tiny", *set_flags("train.batch_size=100000000", "train.max_iters=1",
                                                 "train.device=cpu"), cwd=tmp_path)
    lines = [line for line in result.stderr.splitlines() if line.startswith("error")]
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert len(lines) == 1 and "too big" in lines[0] and "batch_size" in lines[0]
    assert not any((tmp_path / "runs").glob("*"))


def test_running_out_of_memory_is_one_line_and_leaves_no_run_behind(tmp_path: Path, small_corpus: Path,
                                                                     monkeypatch: pytest.MonkeyPatch):
    """The estimate is a lower bound: an allocation can still fail in training."""
    from minigpt_cli import trainer

    def out_of_memory(*args, **kwargs):
        raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 1099511627776 bytes.")

    monkeypatch.setattr(trainer, "training_loss", out_of_memory)
    result = invoke("train", "tiny", "--data", small_corpus, *set_flags(*FAST, "train.max_iters=1"))
    lines = [line for line in result.stderr.splitlines() if line.startswith("error")]
    assert result.exit_code == 1 and "Traceback" not in result.stderr
    assert len(lines) == 1 and "out of memory" in lines[0] and "batch_size" in lines[0]
    assert not any((tmp_path / "runs").glob("*"))


def test_a_runs_folder_that_cannot_be_made_is_one_line(tmp_path: Path, small_corpus: Path):
    """Issue 25.12: ./runs being a file, compare --out a file or under /proc."""
    (tmp_path / "runs").write_text("not a folder")
    assert_usage_error(invoke("train", "tiny", "--data", small_corpus, *set_flags(*FAST, "train.max_iters=2")),
                       "runs", "not a folder")
    (tmp_path / "existing.png").write_text("a picture")
    assert_usage_error(invoke("compare", "tiny", "--vary", "model.n_layer=1,2", "--data", small_corpus, "--out",
                              "existing.png", *set_flags(*FAST, "train.max_iters=2"), "--quiet"), "existing.png")
    assert (tmp_path / "existing.png").read_text() == "a picture"
    assert_usage_error(invoke("compare", "tiny", "--vary", "model.n_layer=1,2", "--data", small_corpus, "--out",
                              "/proc/foo", *set_flags(*FAST, "train.max_iters=2"), "--quiet"), "/proc/foo")
