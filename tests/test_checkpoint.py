"""Checkpoints: exact save/load, atomic writes, a full disk, damaged files, and nothing unpickled."""

from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import SafetensorError

from conftest import assert_usage_error, invoke
from minigpt_cli import checkpoint as ckpt
from minigpt_cli import rundir
from minigpt_cli.config import Config, ModelConfig, UserError
from minigpt_cli.model import GPT
from minigpt_cli.tokenizer import CharTokenizer


def save_random_model(run_dir: Path, step: int = 1, is_best: bool = True, **model_overrides) -> GPT:
    config = Config(model=ModelConfig(n_layer=2, n_head=2, n_embd=16, block_size=16, **model_overrides))
    tokenizer = CharTokenizer.from_text("abcdefghij \n")
    torch.manual_seed(step)
    model = GPT(config.model, tokenizer.vocab_size)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_()
    ckpt.save_checkpoint(run_dir, model, config, tokenizer, {"step": step}, {}, {}, is_best=is_best)
    return model


@pytest.mark.parametrize("overrides", [{}, {"tie_weights": True, "pos_encoding": "learned", "bias": True,
                                            "norm": "layernorm"}], ids=["default", "tied-learned-bias"])
def test_save_then_load_gives_bit_identical_logits(tmp_path: Path, overrides: dict):
    model = save_random_model(tmp_path / "run", **overrides).eval()
    loaded = ckpt.load_checkpoint(tmp_path / "run")
    again = loaded.build_model().eval()
    idx = torch.randint(0, 12, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model(idx), again(idx))
    assert loaded.tokenizer.chars == CharTokenizer.from_text("abcdefghij \n").chars
    assert loaded.config.model == model.config


def test_a_run_holds_everything_needed(tiny_run: Path):
    latest = json.loads((tiny_run / "latest.json").read_text())
    folder = tiny_run / latest["checkpoint"]
    for name in (ckpt.MODEL_FILE, ckpt.META_FILE, ckpt.STATE_FILE, ckpt.STATE_JSON):
        assert (folder / name).is_file(), name
    meta = json.loads((folder / ckpt.META_FILE).read_text())
    assert meta["format_version"] == ckpt.FORMAT_VERSION
    assert meta["step"] == 6
    assert len(meta["data_fingerprint"]) == 64
    assert "chars" in meta["vocab"] and "model" in meta["config"]
    assert (tiny_run / "best.json").is_file()
    kinds = {r["kind"] for r in rundir.read_metrics(tiny_run)}
    assert kinds == {"train", "eval"}
    # Only the newest and the best checkpoints are kept, and no leftovers of saves.
    assert len(list((tiny_run / "checkpoints").iterdir())) <= 2
    assert not [p for p in tiny_run.rglob(f"{ckpt.TMP_PREFIX}*")]


def test_the_same_step_saved_twice_keeps_a_whole_checkpoint(tmp_path: Path):
    run = tmp_path / "run"
    save_random_model(run, step=3)
    first = ckpt.find_checkpoint(run, "latest")
    # A second save of step 3 (an interrupt right after a periodic save) must not remove the first
    # before the pointers move: the pointed-at folder is always whole.
    model = save_random_model(run, step=3, is_best=False)
    latest = ckpt.find_checkpoint(run, "latest")
    assert (latest / ckpt.META_FILE).is_file()
    assert ckpt.find_checkpoint(run, "best") == first
    with torch.no_grad():
        idx = torch.zeros(1, 4, dtype=torch.long)
        assert torch.equal(ckpt.load_checkpoint(run, "latest").build_model().eval()(idx), model.eval()(idx))


def test_leftovers_of_an_interrupted_save_are_ignored_and_cleaned(tmp_path: Path):
    run = tmp_path / "run"
    save_random_model(run, step=1)
    good = ckpt.find_checkpoint(run, "latest")
    # What a kill -9 in the middle of a save leaves behind: a half-written folder and pointer file.
    half = run / "checkpoints" / f"{ckpt.TMP_PREFIX}step-0000002.4242"
    half.mkdir()
    (half / ckpt.MODEL_FILE).write_bytes(b"\x00" * 10)
    (run / f"{ckpt.TMP_PREFIX}latest.json.4242").write_text('{"checkp')
    assert ckpt.find_checkpoint(run, "latest") == good
    ckpt.load_checkpoint(run, "latest")
    save_random_model(run, step=2)
    assert not list(run.rglob(f"{ckpt.TMP_PREFIX}*"))
    assert ckpt.load_checkpoint(run, "latest").step == 2


def test_a_pointer_to_a_missing_checkpoint_falls_back(tmp_path: Path):
    run = tmp_path / "run"
    save_random_model(run, step=1)
    (run / "latest.json").write_text(json.dumps({"checkpoint": "checkpoints/step-0000009", "step": 9}))
    (run / "best.json").unlink()
    assert ckpt.load_checkpoint(run, "latest").step == 1


def full_disk(*args, **kwargs):
    raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")


def full_disk_os(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@pytest.mark.parametrize("module, target, failure", [
    (ckpt, "save_file", full_disk), (ckpt, "write_bytes_synced", full_disk_os),
    (rundir, "atomic_write_json", full_disk_os)])  # the pointer files, written by rundir.point
def test_full_disk_gives_a_clear_error_and_keeps_the_previous_checkpoint(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, module, target: str, failure):
    run = tmp_path / "run"
    model = save_random_model(run, step=1).eval()
    monkeypatch.setattr(module, target, failure)
    with pytest.raises(ckpt.CheckpointWriteError, match="No space left on device") as info:
        save_random_model(run, step=2)
    assert "step 2" in str(info.value)
    monkeypatch.undo()
    loaded = ckpt.load_checkpoint(run, "latest")
    assert loaded.step == 1
    with torch.no_grad():
        idx = torch.zeros(1, 4, dtype=torch.long)
        assert torch.equal(loaded.build_model().eval()(idx), model(idx))
    assert not list(run.rglob(f"{ckpt.TMP_PREFIX}*"))


def test_full_disk_during_training_exits_1_and_keeps_the_run(run_copy: Path, monkeypatch: pytest.MonkeyPatch):
    before = ckpt.load_checkpoint(run_copy, "latest")
    monkeypatch.setattr(ckpt, "save_file", full_disk)
    result = invoke("train", "--resume", "--out", run_copy, "--set", "train.max_iters=7")
    assert result.exit_code == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert "No space left on device" in result.stderr
    monkeypatch.undo()
    after = ckpt.load_checkpoint(run_copy, "latest")
    assert after.step == before.step == 6
    assert after.model_state.keys() == before.model_state.keys()


def test_full_disk_while_logging_exits_1_and_keeps_the_run(run_copy: Path, monkeypatch: pytest.MonkeyPatch):
    real_open = open

    def no_space_for_metrics(file, mode="r", *args, **kwargs):
        if str(file).endswith("metrics.jsonl") and "a" in mode:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(file))
        return real_open(file, mode, *args, **kwargs)

    monkeypatch.setattr(rundir, "open", no_space_for_metrics, raising=False)  # where metrics.jsonl is written
    result = invoke("train", "--resume", "--out", run_copy, "--set", "train.max_iters=8")
    assert result.exit_code == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert "metrics.jsonl" in result.stderr and "No space left on device" in result.stderr
    monkeypatch.undo()
    assert ckpt.load_checkpoint(run_copy, "latest", with_train_state=True).step == 6


def test_weights_of_another_shape_are_a_clear_error(run_copy: Path, tmp_path: Path):
    other = tmp_path / "other"
    save_random_model(other)  # n_embd 16 and another vocabulary: nothing fits
    for folder in both_checkpoints(run_copy):
        shutil.copy(ckpt.find_checkpoint(other) / ckpt.MODEL_FILE, folder / ckpt.MODEL_FILE)
    assert_usage_error(invoke("sample", run_copy, "--no-stream", "-n", "2"), ckpt.MODEL_FILE, "do not fit")
    assert_usage_error(invoke("eval", run_copy), ckpt.MODEL_FILE)
    assert_usage_error(invoke("train", "--resume", "--out", run_copy, "--set", "train.max_iters=8"), ckpt.MODEL_FILE)


# -- damaged checkpoints: one line naming the file, exit code 2 -------------------------------------

def both_checkpoints(run: Path) -> set[Path]:
    return {ckpt.find_checkpoint(run, "latest"), ckpt.find_checkpoint(run, "best")}


def damage(folder: Path, name: str, how: str) -> Path:
    path = folder / name
    if how == "truncated":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif how == "empty":
        path.write_bytes(b"")
    elif how == "garbage":
        path.write_bytes(os.urandom(64))
    elif how == "missing":
        path.unlink()
    return path


@pytest.mark.parametrize("name", [ckpt.MODEL_FILE, ckpt.META_FILE])
@pytest.mark.parametrize("how", ["truncated", "empty", "garbage", "missing"])
def test_damaged_checkpoint_is_a_one_line_error_naming_the_file(run_copy: Path, name: str, how: str):
    for folder in both_checkpoints(run_copy):
        damage(folder, name, how)
    with pytest.raises(ckpt.CheckpointError):
        ckpt.load_checkpoint(run_copy)
    # A missing meta.json makes the folder no checkpoint at all; the error names the run then.
    named = name if (name, how) != (ckpt.META_FILE, "missing") else str(run_copy)
    assert_usage_error(invoke("sample", run_copy, "--max-new-tokens", "3", "--no-stream"), named)
    assert_usage_error(invoke("eval", run_copy), named)


@pytest.mark.parametrize("name", [ckpt.STATE_FILE, ckpt.STATE_JSON])
@pytest.mark.parametrize("how", ["truncated", "empty", "garbage"])
def test_damaged_training_state_refuses_resume_naming_the_file(run_copy: Path, name: str, how: str):
    damage(ckpt.find_checkpoint(run_copy, "latest"), name, how)
    before = (run_copy / "metrics.jsonl").read_bytes()
    result = invoke("train", "--resume", "--out", run_copy, "--set", "train.max_iters=8")
    assert_usage_error(result, name)
    assert (run_copy / "metrics.jsonl").read_bytes() == before


@pytest.mark.parametrize("change", [
    {"format_version": 99}, {"step": "ten"}, {"step": None}, {"config": {"model": {"n_layers": 2}}},
    {"vocab": {"type": "bpe"}}, {"vocab": None},
], ids=lambda c: ",".join(c))
def test_metadata_that_is_json_but_not_ours_is_refused(run_copy: Path, change: dict):
    for folder in both_checkpoints(run_copy):
        meta = json.loads((folder / ckpt.META_FILE).read_text())
        (folder / ckpt.META_FILE).write_text(json.dumps({**meta, **change}))
    assert_usage_error(invoke("sample", run_copy, "--no-stream", "-n", "2"), ckpt.META_FILE)


def test_a_file_that_is_not_a_run_is_refused(tmp_path: Path):
    path = tmp_path / "notes.txt"
    path.write_text("hello")
    assert_usage_error(invoke("sample", path, "--no-stream"), str(path))


# -- nothing runs from a file -----------------------------------------------------------------------

class Payload:
    """Unpickling this object runs os.system: what a crafted checkpoint would do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def write_pickle_bomb(path: Path, marker: Path) -> Path:
    torch.save({"model": Payload(marker)}, path)
    return path


@pytest.mark.parametrize("command", ["sample", "eval"])
def test_crafted_pickle_given_as_run_is_not_executed(tmp_path: Path, command: str):
    marker = tmp_path / "pwned"
    bomb = write_pickle_bomb(tmp_path / "model.pt", marker)
    assert_usage_error(invoke(command, bomb), str(bomb))
    assert not marker.exists()
    with pytest.raises(UserError):
        ckpt.load_checkpoint(bomb, with_train_state=True)
    assert not marker.exists()


@pytest.mark.parametrize("name", [ckpt.MODEL_FILE, ckpt.STATE_FILE])
def test_crafted_pickle_inside_a_checkpoint_is_not_executed(run_copy: Path, tmp_path: Path, name: str):
    marker = tmp_path / "pwned"
    for folder in both_checkpoints(run_copy):
        write_pickle_bomb(folder / name, marker)
    if name == ckpt.MODEL_FILE:
        commands = [("sample", run_copy, "--no-stream", "--max-new-tokens", "2"), ("eval", run_copy)]
    else:
        commands = [("train", "--resume", "--out", run_copy, "--set", "train.max_iters=8")]
    for command in commands:
        assert_usage_error(invoke(*command), name)
    assert not marker.exists()


def test_the_crafted_pickle_is_a_real_threat(tmp_path: Path):
    # Checks the checks above: loading the same file the unsafe way does run the payload.
    marker = tmp_path / "pwned"
    bomb = write_pickle_bomb(tmp_path / "model.pt", marker)
    torch.load(bomb, weights_only=False)
    assert marker.exists()

def test_checkpoint_code_never_unpickles():
    source = Path(ckpt.__file__).read_text(encoding="utf-8")
    assert "import pickle" not in source
    assert "torch.load(" not in source or "weights_only=True" in source


def test_runs_started_in_the_same_second_get_their_own_directories(tmp_path: Path):
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(8) as pool:
        dirs = list(pool.map(lambda _: rundir.new_run_dir("tiny", tmp_path / "runs"), range(16)))
    assert len(set(dirs)) == 16 and all(d.is_dir() for d in dirs)  # each claimed, none shared


def test_a_run_keeps_its_text_so_eval_and_resume_need_nothing_outside_it(tmp_path: Path):
    from conftest import FAST, set_flags, write_small_corpus

    corpus = write_small_corpus(tmp_path / "mine.txt")
    text = corpus.read_text(encoding="utf-8")
    trained = invoke("train", "tiny", "--data", corpus, "--out", "run", *set_flags(*FAST, "train.max_iters=4"),
                     "--json")
    assert trained.exit_code == 0, trained.stderr
    # The run keeps the encoded text and its vocabulary, as a hard link to the cache entry: no second copy.
    import numpy as np
    from minigpt_cli.tokenizer import CharTokenizer

    kept = json.loads((tmp_path / "run" / "data.json").read_text(encoding="utf-8"))
    assert CharTokenizer(kept["chars"]).decode(np.load(tmp_path / "run" / "data.npy").tolist()) == text
    assert (tmp_path / "run" / "data.npy").stat().st_nlink == 2
    assert "hard link" in trained.json()["data_kept"]
    reference = invoke("eval", "run", "--json").json()  # while the file is still there
    corpus.unlink()
    shutil.rmtree(tmp_path / "cache")  # nor the cache
    evaluated = invoke("eval", "run", "--json")
    assert evaluated.exit_code == 0, evaluated.stderr
    assert evaluated.json()["nll"] == reference["nll"] and not evaluated.json()["warnings"]
    resumed = invoke("train", "--resume", "--out", "run", *set_flags("train.max_iters=6"), "--json")
    assert resumed.exit_code == 0 and resumed.json()["steps"] == 6, resumed.stderr
    # Text from stdin is kept too, so such a run can be evaluated later without piping it again.
    piped = invoke("train", "tiny", "--data", "-", "--out", "piped", *set_flags(*FAST, "train.max_iters=2"),
                   "--json", input=text)
    assert piped.exit_code == 0, piped.stderr
    assert invoke("eval", "piped", "--json").json()["nll"] > 0


def test_a_run_trained_on_a_relative_path_evaluates_and_resumes_from_elsewhere(tmp_path: Path):
    from conftest import FAST, set_flags, write_small_corpus

    write_small_corpus(tmp_path / "my.txt")
    trained = invoke("train", "tiny", "--out", "run", *set_flags(*FAST, "data.path=my.txt", "train.max_iters=4"),
                     "--json")
    assert trained.exit_code == 0, trained.stderr
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    os.chdir(elsewhere)  # the autouse fixture restores the working directory
    evaluated = invoke("eval", tmp_path / "run", "--json")
    assert evaluated.exit_code == 0, evaluated.stderr
    resumed = invoke("train", "--resume", "--out", tmp_path / "run", *set_flags("train.max_iters=6"), "--json")
    assert resumed.exit_code == 0, resumed.stderr
    assert resumed.json()["steps"] == 6


def test_damaged_metrics_lines_do_not_stop_inspect_or_resume(tmp_path: Path):
    from conftest import FAST, train_in_process

    run = tmp_path / "run"
    train_in_process([*FAST, "train.max_iters=4"], run)
    with open(run / "metrics.jsonl", "ab") as f:
        f.write(b'\xff\xfe\n[1, 2]\n{"step": "abc"}\n{"kind": "train", "step": 2, "loss": "x"}\n')
    inspected = invoke("inspect", run, "--json")
    assert inspected.exit_code == 0, inspected.stderr
    assert [step for step, _ in inspected.json()["run"]["curves"]["train"]] == [1, 2, 3, 4]
    train_in_process([*FAST, "train.max_iters=6"], run, resume=True)
    steps = [r["step"] for r in rundir.read_metrics(run) if r.get("kind") == "train" and isinstance(r.get("loss"), float)]
    assert steps == [1, 2, 3, 4, 5, 6]


def test_a_checkpoint_that_lost_optimizer_tensors_or_holds_nan_is_refused(tmp_path: Path):
    from safetensors.torch import load_file, save_file

    from conftest import FAST, train_in_process

    run = tmp_path / "run"
    train_in_process([*FAST, "train.max_iters=3", "train.optimizer=adamw"], run)
    folder = ckpt.load_checkpoint(run).path
    state = load_file(str(folder / ckpt.STATE_FILE))
    save_file({k: v for k, v in state.items() if ".exp_avg_sq" not in k}, str(folder / ckpt.STATE_FILE))
    resumed = invoke("train", "--resume", "--out", run, "--set", "train.max_iters=5")
    assert_usage_error(resumed, "optimizer tensor", "missing")
    save_file(state, str(folder / ckpt.STATE_FILE))
    weights = load_file(str(folder / ckpt.MODEL_FILE))
    name = next(iter(weights))
    weights[name][0] = float("nan")
    save_file(weights, str(folder / ckpt.MODEL_FILE))
    assert_usage_error(invoke("sample", run, "-n", "3"), name, "NaN")
