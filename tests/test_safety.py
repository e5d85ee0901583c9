"""Nothing of the user's is ever deleted, one writer per run, and no file makes minigpt crash (issue 19)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from conftest import FAST, assert_usage_error, invoke, set_flags
from minigpt_cli import checkpoint as ckpt
from minigpt_cli import rundir
from test_checkpoint import save_random_model


def snapshot(folder: Path) -> dict[str, bytes | str]:
    """Every file (its bytes) and link (its target) under folder, by relative path."""
    found: dict[str, bytes | str] = {}
    for path in sorted(folder.rglob("*")):
        key = str(path.relative_to(folder))
        if path.is_symlink():
            found[key] = os.readlink(path)
        elif path.is_file():
            found[key] = path.read_bytes()
        else:
            found[key] = "<dir>"
    return found


# -- 1. a new run goes only into a new or empty folder (or an unused one of minigpt's) -------------

def test_train_into_a_folder_that_is_not_a_run_is_refused_and_deletes_nothing(tmp_path: Path, small_corpus: Path):
    mine = tmp_path / "p"
    (mine / "checkpoints" / "my_resnet").mkdir(parents=True)
    (mine / "checkpoints" / "my_resnet" / "w.pt").write_text("x")
    (mine / ".tmp-notes.12").write_text("mine")
    (mine / "data.txt").write_text("not the training text")
    before = snapshot(mine)
    os.chdir(mine)
    result = invoke("train", "tiny", "--out", ".", "--data", small_corpus, *set_flags(*FAST, "train.max_iters=2"))
    assert_usage_error(result, "not empty and is not a minigpt run")
    assert snapshot(mine) == before


def test_a_new_run_into_an_empty_folder_trains(tmp_path: Path, small_corpus: Path):
    (tmp_path / "empty").mkdir()
    result = invoke("train", "tiny", "--out", "empty", "--data", small_corpus, *set_flags(*FAST, "train.max_iters=2"))
    assert result.exit_code == 0, result.stderr
    assert ckpt.load_checkpoint(tmp_path / "empty", "latest").step == 2


def test_a_claimed_folder_is_removed_when_the_run_fails_before_writing(tmp_path: Path, small_corpus: Path):
    result = invoke("train", "tiny", "--out", "new/run", "--data", tmp_path / "missing.txt", *set_flags(*FAST))
    assert result.exit_code == 2
    assert not (tmp_path / "new" / "run").exists()


# -- 2. deletes touch only minigpt's own names, never through a link ------------------------------

def test_a_symlinked_checkpoints_folder_is_refused_and_its_target_kept(run_copy: Path, tmp_path: Path):
    elsewhere = tmp_path / "elsewhere"
    (run_copy / "checkpoints").rename(elsewhere)
    (elsewhere / "my_models").mkdir()
    (elsewhere / "my_models" / "w.pt").write_text("precious")
    (run_copy / "checkpoints").symlink_to(elsewhere, target_is_directory=True)
    before = snapshot(elsewhere)
    ckpt.prune(run_copy)
    assert snapshot(elsewhere) == before
    result = invoke("train", "--resume", "--out", run_copy, "--set", "train.max_iters=8")
    assert_usage_error(result, "symbolic link")
    assert snapshot(elsewhere) == before


def test_prune_removes_only_checkpoints_and_temporary_files_it_wrote(tmp_path: Path):
    run = tmp_path / "run"
    save_random_model(run, step=1)
    outside = tmp_path / "outside"
    (outside / "step-0000005").mkdir(parents=True)
    (outside / "step-0000005" / ckpt.META_FILE).write_text("{}")
    checkpoints = run / "checkpoints"
    (checkpoints / "my_notes").mkdir()
    (checkpoints / "my_notes" / "a.txt").write_text("mine")
    (checkpoints / "step-0000002").mkdir()  # named like a checkpoint, but holding a file of the user's
    (checkpoints / "step-0000002" / "notes.txt").write_text("mine")
    (checkpoints / "step-0000005").symlink_to(outside / "step-0000005", target_is_directory=True)
    (run / ".tmp-keep").write_text("mine")  # the prefix, but not a name minigpt writes
    leftover = checkpoints / f"{ckpt.TMP_PREFIX}step-0000003.4242"  # what a killed save leaves
    leftover.mkdir()
    (leftover / ckpt.MODEL_FILE).write_bytes(b"\0" * 8)
    (leftover / ".tmpA1b2C3").write_bytes(b"\0" * 8)  # safetensors' own temporary file, killed mid-save
    foreign = checkpoints / f"{ckpt.TMP_PREFIX}step-0000006.4242"  # minigpt's name, but a file of the user's in it
    foreign.mkdir()
    (foreign / ".tmp-mine.txt").write_text("mine")
    (run / f"{ckpt.TMP_PREFIX}latest.json.4242").write_text("{")
    keep = {k: v for k, v in snapshot(tmp_path).items()
            if k.startswith(("outside", "run/checkpoints/my_notes", "run/checkpoints/step-0000002",
                             "run/checkpoints/step-0000005", "run/.tmp-keep",
                             "run/checkpoints/.tmp-step-0000006"))}
    save_random_model(run, step=4)
    after = snapshot(tmp_path)
    assert {k: v for k, v in after.items() if k in keep} == keep
    assert not leftover.exists() and not (run / f"{ckpt.TMP_PREFIX}latest.json.4242").exists()
    assert not (checkpoints / "step-0000001").exists()  # replaced by step 4: its own checkpoint goes
    assert ckpt.load_checkpoint(run, "latest").step == 4


def test_a_pointer_never_leads_out_of_the_run(tmp_path: Path):
    run = tmp_path / "run"
    save_random_model(run, step=1)
    other = tmp_path / "other"
    save_random_model(other, step=7)
    (run / "latest.json").write_text('{"checkpoint": "../other/checkpoints/step-0000007"}')
    (run / "best.json").write_text('{"checkpoint": "../other/checkpoints/step-0000007"}')
    assert ckpt.load_checkpoint(run, "latest").step == 1


# -- 3. one writer per run --------------------------------------------------------------------------

def _wait_for(predicate, proc, seconds: float = 240) -> None:
    import time

    deadline = time.monotonic() + seconds  # a bound on a hang, not a timing assertion
    while not predicate():
        assert proc.poll() is None, proc.communicate()[1]
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.2)


def test_a_second_writer_is_refused_at_once_naming_the_first(run_copy: Path):
    import signal
    import subprocess

    from conftest import cli_command, cli_env, run_cli

    first = subprocess.Popen(cli_command("train", "--resume", "--out", run_copy, "--quiet",
                                         "--set", "train.max_iters=1000000"),
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=cli_env(), text=True)
    try:
        _wait_for(lambda: any(r.get("step", 0) > 6 for r in rundir.read_metrics(run_copy)), first)
        second = run_cli("train", "--resume", "--out", run_copy, "--set", "train.stop_after=1")
        assert_usage_error(second, "being written by another minigpt train", f"PID {first.pid}")
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    # kill -9 leaves no stale lock: the run continues at once.
    again = invoke("train", "--resume", "--out", run_copy, "--set", "train.max_iters=1000000",
                   "--set", "train.stop_after=1", "--json")
    assert again.exit_code == 0, again.stderr


def test_the_run_lock_is_exclusive_and_names_its_holder(tmp_path: Path):
    with rundir.RunLock(tmp_path / "run"):
        with pytest.raises(rundir.RunLockedError, match=f"PID {os.getpid()}"):
            with rundir.RunLock(tmp_path / "run"):
                pass
    with rundir.RunLock(tmp_path / "run"):
        pass


# -- 4. a reader beside a writer always gets a whole checkpoint --------------------------------------

@pytest.mark.parametrize("when", [1, 2], ids=["reading-weights", "reading-training-state"])
def test_a_reader_gets_a_whole_checkpoint_when_the_writer_prunes_meanwhile(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, when: int):
    run = tmp_path / "run"
    save_random_model(run, step=1)
    real_load_file = ckpt.load_file
    calls = []

    def writer_saves_meanwhile(*args, **kwargs):
        calls.append(args)
        if len(calls) == when:
            save_random_model(run, step=2, is_best=True)  # moves both pointers, prunes step 1
            save_random_model(run, step=3, is_best=True)
        return real_load_file(*args, **kwargs)

    monkeypatch.setattr(ckpt, "load_file", writer_saves_meanwhile)
    loaded = ckpt.load_checkpoint(run, "latest", with_train_state=True)
    assert loaded.step == 3
    assert loaded.path == ckpt.find_checkpoint(run, "latest")


# -- 5. no traceback from any file: JSON is read bounded in size and depth ---------------------------

DEEP = "[" * 100_000 + "]" * 100_000


def test_deeply_nested_metadata_is_a_one_line_error(run_copy: Path):
    meta = ckpt.find_checkpoint(run_copy, "best") / ckpt.META_FILE
    meta.write_text(DEEP)
    assert_usage_error(invoke("sample", meta.parent, "-n", "5"), ckpt.META_FILE)


def test_deeply_nested_training_state_is_a_one_line_error(run_copy: Path):
    (ckpt.find_checkpoint(run_copy, "latest") / ckpt.STATE_JSON).write_text(DEEP)
    assert_usage_error(invoke("train", "--resume", "--out", run_copy, "--set", "train.max_iters=8"), ckpt.STATE_JSON)


def test_deeply_nested_pointers_and_metrics_are_passed_over(run_copy: Path):
    (run_copy / "latest.json").write_text(DEEP)
    (run_copy / "best.json").write_text(DEEP)
    with open(run_copy / "metrics.jsonl", "a") as f:
        f.write(DEEP + "\n")
    assert ckpt.find_checkpoint(run_copy, "latest").name.startswith("step-")
    assert invoke("inspect", run_copy, "--json").exit_code == 0
    assert invoke("sample", run_copy, "-n", "5").exit_code == 0
    result = invoke("train", "--resume", "--out", run_copy, "--set", "train.max_iters=8", "--json")
    assert result.exit_code == 0, result.stderr


def test_a_metadata_file_past_the_size_bound_is_refused_unread(run_copy: Path):
    meta = ckpt.find_checkpoint(run_copy, "best") / ckpt.META_FILE
    with open(meta, "ab") as f:
        f.truncate(ckpt.META_MAX_BYTES + 1)
    assert_usage_error(invoke("sample", meta.parent, "-n", "5"), ckpt.META_FILE, "bytes")


# -- 7. the weights' shapes are checked against the config before a model is made -------------------

def inflate(folder: Path, **sizes: int) -> None:
    import json

    meta = json.loads((folder / ckpt.META_FILE).read_text())
    meta["config"]["model"].update(sizes)
    (folder / ckpt.META_FILE).write_text(json.dumps(meta))


def test_metadata_with_inflated_sizes_is_refused_before_a_model_is_made(run_copy: Path):
    folder = ckpt.find_checkpoint(run_copy, "best")
    inflate(folder, n_embd=4096, n_layer=48)  # a model of about 10 GB, were it built
    with pytest.raises(ckpt.CheckpointError, match="weights do not fit"):
        ckpt.load_checkpoint(folder)  # which builds no model at all
    assert_usage_error(invoke("sample", folder, "-n", "5"), "weights do not fit", ckpt.MODEL_FILE)


def test_inspect_checks_the_weights_of_a_run(run_copy: Path):
    inflate(ckpt.find_checkpoint(run_copy, "best"), n_embd=64)
    inflate(ckpt.find_checkpoint(run_copy, "latest"), n_embd=64)
    assert_usage_error(invoke("inspect", run_copy), "weights do not fit", ckpt.MODEL_FILE)


# -- 8. an error message is one bounded line, whatever the input ----------------------------------

def test_a_yaml_alias_bomb_gives_a_short_error(tmp_path: Path):
    # Five levels of nine aliases: a small file whose value expands to 9**5 strings when printed.
    levels = ['&a ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    for prev, name in zip("abcd", "bcde"):
        levels.append(f"&{name} [" + ", ".join([f"*{prev}"] * 9) + "]")
    (tmp_path / "bomb.yaml").write_text("model:\n  n_layer: [" + ", ".join(levels) + "]\n")
    line = assert_usage_error(invoke("train", "bomb.yaml"), "n_layer")
    assert len(line) < 400


# -- 9. sample streams into a pipe, so a reader that has had enough ends it --------------------------

def test_sample_into_a_pipe_ends_when_the_reader_closes_it(tiny_run: Path):
    import subprocess

    from conftest import cli_command, cli_env

    proc = subprocess.Popen(cli_command("sample", tiny_run, "-n", "1000000000", "--seed", "1"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=cli_env())
    head = proc.stdout.read(10)  # what `| head -c 10` reads before it goes away
    proc.stdout.close()
    try:
        code = proc.wait(timeout=300)  # a bound on a hang, not a timing assertion
    finally:
        proc.kill()
    stderr = proc.stderr.read().decode()
    assert len(head) == 10
    assert code == 0 and "Traceback" not in stderr, stderr


def test_a_sample_streamed_into_a_pipe_is_the_text_printed_whole(tiny_run: Path):
    from conftest import run_cli

    streamed = run_cli("sample", tiny_run, "-n", "40", "--seed", "3", "--prompt", "AB")
    whole = run_cli("sample", tiny_run, "-n", "40", "--seed", "3", "--prompt", "AB", "--json")
    assert streamed.returncode == 0 and whole.returncode == 0, streamed.stderr + whole.stderr
    import json

    assert streamed.stdout == "AB" + json.loads(whole.stdout.splitlines()[-1])["samples"][0] + "\n"


@pytest.mark.parametrize("flags", [("--json",), ("--num-samples", "2"), ("--no-stream",)])
def test_lengths_that_cannot_be_streamed_are_bounded(tiny_run: Path, flags: tuple):
    assert_usage_error(invoke("sample", tiny_run, "-n", "1000000000", *flags), "--max-new-tokens")


# -- 11. messages and behaviours that surprised ------------------------------------------------------

def test_a_byte_order_mark_on_a_stdin_prompt_is_dropped(tiny_run: Path):
    plain = invoke("sample", tiny_run, "--prompt", "-", "-n", "5", "--seed", "2", "--json", input="ROMEO:")
    marked = invoke("sample", tiny_run, "--prompt", "-", "-n", "5", "--seed", "2", "--json",
                    input="\ufeffROMEO:".encode("utf-8"))
    assert marked.exit_code == 0, marked.stderr
    assert marked.json()["samples"] == plain.json()["samples"] and marked.json()["prompt"] == "ROMEO:"


# -- 10. the trained weights are saved before the final evaluation; a signal during it is answered ---

def test_weights_are_saved_before_the_final_evaluation_and_a_ctrl_c_during_it_is_answered(
        tmp_path: Path, small_corpus: Path, monkeypatch: pytest.MonkeyPatch):
    import signal

    from conftest import train_in_process
    from minigpt_cli import train_eval, trainer

    run = tmp_path / "run"
    real_score_text = train_eval.score_text
    seen: list[int] = []

    def ctrl_c_during_the_final_evaluation(*args, **kwargs):
        if not seen:
            seen.append(ckpt.load_checkpoint(run, "latest").step)  # what a second Ctrl-C would leave
            os.kill(os.getpid(), signal.SIGINT)
        return real_score_text(*args, **kwargs)

    monkeypatch.setattr(train_eval, "score_text", ctrl_c_during_the_final_evaluation)
    events: list = []
    with pytest.raises(trainer.TrainingStopped):
        train_in_process([*FAST, f"data.path={small_corpus}", "train.max_iters=5", "train.eval_interval=100"],
                         run, events=events)
    assert seen == [5]
    notices = [e.data["message"] for e in events if e.kind == "notice"]
    assert len(notices) == 1 and notices[0].startswith("finishing the evaluation, Ctrl-C again to skip it")
    assert ckpt.load_checkpoint(run, "latest").meta["final"]  # the evaluation finished and was saved


@pytest.mark.parametrize("special", ["/dev/null", "fifo"])
def test_a_fifo_or_device_as_data_is_named_as_such(tmp_path: Path, special: str):
    if special == "fifo":
        os.mkfifo(tmp_path / "fifo")
        special = str(tmp_path / "fifo")
    line = assert_usage_error(invoke("train", "tiny", "--data", special, *set_flags(*FAST)), special,
                              "not a regular file")
    assert "not found" not in line


def test_a_failed_first_save_does_not_claim_a_previous_checkpoint(tmp_path: Path, small_corpus: Path,
                                                                  monkeypatch: pytest.MonkeyPatch):
    from test_checkpoint import full_disk

    monkeypatch.setattr(ckpt, "save_file", full_disk)
    result = invoke("train", "tiny", "--out", "run", "--data", small_corpus, *set_flags(*FAST, "train.max_iters=2"))
    assert result.exit_code == 1
    assert "No space left on device" in result.stderr and "no checkpoint had been saved yet" in result.stderr
    assert "intact" not in result.stderr


def test_resume_with_another_dropout_continues(stopped_run_dir: Path):
    result = invoke("train", "--resume", "--out", stopped_run_dir, "--set", "model.dropout=0.3", "--json")
    assert result.exit_code == 0, result.stderr
    assert ckpt.load_checkpoint(stopped_run_dir, "latest").config.model.dropout == 0.3


def test_a_plain_resume_does_not_pause_again_at_stop_after(stopped_run_dir: Path):
    result = invoke("train", "--resume", "--out", stopped_run_dir, "--json")
    assert result.exit_code == 0, result.stderr
    assert result.json()["stopped"] == "max_iters" and result.json()["steps"] == 12


def test_resume_on_new_text_makes_it_the_runs_text(stopped_run_dir: Path, small_corpus: Path, tmp_path: Path):
    new = tmp_path / "new.txt"
    new.write_text(small_corpus.read_text(encoding="utf-8")[5_000:], encoding="utf-8")
    moved_on = invoke("train", "--resume", "--out", stopped_run_dir, "--data", new, "--set", "train.stop_after=2")
    assert moved_on.exit_code == 0 and "data differs" in moved_on.stderr, moved_on.stderr
    new.unlink()  # the run keeps what it needs of the new text
    # A later plain --resume goes on with the new text, not silently back to the old one.
    plain = invoke("train", "--resume", "--out", stopped_run_dir)
    assert plain.exit_code == 0, plain.stderr
    assert "warning" not in plain.stderr.lower()


@pytest.fixture
def stopped_run_dir(tmp_path: Path, small_corpus: Path) -> Path:
    """A run of 12 steps paused by train.stop_after after 4, with its own copy of its text."""
    result = invoke("train", "tiny", "--out", "stopped", "--data", small_corpus, "--json",
                    *set_flags(*FAST, "train.max_iters=12", "train.eval_interval=100", "train.stop_after=4",
                               "model.dropout=0.1"))
    assert result.exit_code == 0 and result.json()["steps"] == 4, result.stderr
    return tmp_path / "stopped"


# -- 5. runs rm deletes only what minigpt wrote, by name (issue 25) ----------------------------------

def test_runs_rm_refuses_a_project_folder_that_holds_a_config_yaml(tmp_path: Path):
    proj = tmp_path / "proj"
    (proj / "src").mkdir(parents=True)
    (proj / "src" / "code.py").write_text("important")
    (proj / "config.yaml").write_text("a: 1\n")
    before = snapshot(proj)
    assert_usage_error(invoke("runs", "rm", proj, "--yes"), "not a minigpt run", "nothing was deleted")
    assert snapshot(proj) == before


def test_runs_rm_refuses_a_home_folder_holding_every_familiar_name(tmp_path: Path):
    home = tmp_path / "home"
    (home / "Documents").mkdir(parents=True)
    (home / "Documents" / "thesis.tex").write_text("years of work")
    for name in ("config.yaml", "metrics.jsonl", "best.json", ".minigpt.lock"):
        (home / name).write_text("{}")
    (home / "latest.json").write_text('{"checkpoint": "checkpoints/step-0000001"}')  # names nothing whole
    (home / "checkpoints" / "my_model").mkdir(parents=True)
    (home / "checkpoints" / "my_model" / "meta.json").write_text("{}")
    before = snapshot(home)
    assert_usage_error(invoke("runs", "rm", home, "--yes"), "nothing was deleted")
    assert snapshot(home) == before


def test_runs_rm_refuses_a_folder_with_a_live_run_at_any_depth(run_copy: Path, tmp_path: Path):
    import shutil

    runs2 = tmp_path / "runs2"
    runs2.mkdir()
    (runs2 / "config.yaml").write_text("a: 1\n")  # a stray file beside a run being trained
    shutil.copytree(run_copy, runs2 / "live")
    outer = tmp_path / "outer"  # a whole run, with another run being written inside it
    shutil.copytree(run_copy, outer)
    shutil.copytree(run_copy, outer / "nested" / "live")
    before = snapshot(tmp_path)
    with rundir.RunLock(runs2 / "live"), rundir.RunLock(outer / "nested" / "live"):
        assert_usage_error(invoke("runs", "rm", runs2, "--yes"), "nothing was deleted")
        assert_usage_error(invoke("runs", "rm", outer, "--yes"), "being written", "nothing was deleted")
        assert {k: v for k, v in snapshot(tmp_path).items() if ".minigpt.lock" not in k} == \
               {k: v for k, v in before.items() if ".minigpt.lock" not in k}


def test_runs_rm_deletes_minigpt_files_and_keeps_and_names_the_users(run_copy: Path, tmp_path: Path):
    step = sorted((run_copy / "checkpoints").iterdir())[-1].name
    mine = {"notes.txt": "my notes", "analysis/plot.txt": "a plot", "checkpoints/my_resnet/w.pt": "weights",
            f"checkpoints/{step}/README": "what this checkpoint is"}
    for rel, text in mine.items():
        (run_copy / rel).parent.mkdir(parents=True, exist_ok=True)
        (run_copy / rel).write_text(text)
    result = invoke("runs", "rm", run_copy, "--yes")
    assert result.exit_code == 0, result.stderr
    for name in ("notes.txt", "analysis", "my_resnet", "README"):
        assert name in result.stderr
    left = {k: v for k, v in snapshot(run_copy).items() if v != "<dir>"}
    assert left == {rel: text.encode() for rel, text in mine.items()}  # the user's, and nothing of minigpt's


def test_runs_rm_removes_a_failed_run_only_when_it_holds_nothing_but_minigpt_files(tmp_path: Path):
    failed = tmp_path / "runs" / "failed"
    failed.mkdir(parents=True)
    for name in (".minigpt.lock", "config.yaml", "metrics.jsonl", "data.json", ".tmp-config.yaml.4242"):
        (failed / name).write_text("{}")
    listing = invoke("runs", "runs", "--json").json()["runs"]
    assert [r["state"] for r in listing] == ["failed"]
    (failed / "notes.txt").write_text("mine")
    before = snapshot(failed)
    assert_usage_error(invoke("runs", "rm", failed, "--yes"), "notes.txt", "nothing was deleted")
    assert snapshot(failed) == before
    (failed / "notes.txt").unlink()
    assert invoke("runs", "rm", failed, "--yes").exit_code == 0
    assert not failed.exists()


def test_runs_rm_never_deletes_through_a_link_in_the_run(run_copy: Path, tmp_path: Path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "config.yaml").write_text("the user's own config")
    (outside / "checkpoints").mkdir()
    (outside / "checkpoints" / "data.bin").write_text("the user's data")
    (run_copy / "config.yaml").unlink()
    (run_copy / "config.yaml").symlink_to(outside / "config.yaml")  # a familiar name, but a link
    (run_copy / "metrics.jsonl").unlink()
    (run_copy / "metrics.jsonl").symlink_to(outside / "checkpoints", target_is_directory=True)
    before = snapshot(outside)
    result = invoke("runs", "rm", run_copy, "--yes")
    assert result.exit_code == 0, result.stderr
    assert snapshot(outside) == before
    assert sorted(os.listdir(run_copy)) == ["config.yaml", "metrics.jsonl"]  # the links, kept and named
    assert "config.yaml" in result.stderr


def test_runs_rm_of_the_same_run_twice_deletes_it_once(run_copy: Path):
    result = invoke("runs", "rm", run_copy, run_copy, "--yes")
    assert result.exit_code == 0, result.stderr
    assert not run_copy.exists() and "deleted 1 run" in result.stderr


# -- 6. a reader that goes away never stops or loses a training (issue 25) ---------------------------

@pytest.mark.parametrize("merged", [True, False], ids=["log-and-result-piped", "result-piped"])
def test_a_training_outlives_the_reader_of_its_output(tmp_path: Path, small_corpus: Path, merged: bool):
    """`minigpt train 2>&1 | head -3`: the run trains to its last step, saves, and says so in its exit code."""
    import subprocess

    from conftest import cli_command, cli_env

    args = ["train", "tiny", "--data", small_corpus, "--out", "run", *set_flags(*FAST, "train.max_iters=60")]
    proc = subprocess.Popen(cli_command(*args, *([] if merged else ["--json"])), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT if merged else subprocess.DEVNULL, env=cli_env(), cwd=tmp_path)
    proc.stdout.read(1)  # the first byte, then the reader goes away (`| head -c 1`)
    proc.stdout.close()
    assert proc.wait(timeout=240) == 0
    assert ckpt.load_checkpoint(tmp_path / "run", "latest").step == 60
    listed = {r["name"]: r["state"] for r in invoke("runs", tmp_path, "--json").json()["runs"]}
    assert listed["run"] == "finished"


# -- 7. text from a file or a user is shown, never obeyed by the terminal (issue 25.15) ---------------

STEERING = ("\x1b", "\x07", "\x9b", "\u202e")
EVIL = "clipboard \x1b]52;c;ZXZpbA==\x07 link \x1b]8;;http://x\x07 title \x1b]0;pwned\x07 \u202egnp.exe\n"


def assert_shown_not_obeyed(*texts: str) -> None:
    for text in texts:
        assert not any(c in text for c in STEERING), repr(text)


def test_eval_show_runs_and_errors_make_escape_sequences_visible(tmp_path: Path, small_corpus: Path):
    import json

    from conftest import train_in_process

    corpus = tmp_path / "evil.txt"
    corpus.write_text(EVIL * 20 + small_corpus.read_text()[:4000])
    run = tmp_path / "runs" / "x\x1b]0;t\x07y"
    train_in_process([*FAST, "train.max_iters=2", f"data.path={corpus}"], run)
    shown = invoke("eval", run, "--data", corpus, "--show")
    assert shown.exit_code == 0, shown.stderr
    assert "\\x1b]52" in shown.stdout
    meta = sorted((run / "checkpoints").iterdir())[-1] / "meta.json"
    forged = json.loads(meta.read_text())
    forged["config_name"] = "tiny\x1b]0;pwned\x07\u202e"
    meta.write_text(json.dumps(forged))
    listed = invoke("runs")
    assert listed.exit_code == 0, listed.stderr
    failed = invoke("sample", tmp_path / "nowhere\x1b]0;t\x07", "--max-new-tokens", "1")
    assert failed.exit_code == 2
    assert_shown_not_obeyed(shown.stdout, shown.stderr, listed.stdout, listed.stderr, failed.stderr)


def test_ctrl_c_at_the_runs_rm_prompt_deletes_nothing_and_exits_130(run_copy: Path, monkeypatch):
    import typer

    def pressed_ctrl_c(*args, **kwargs):
        raise typer.Abort()  # what click raises for a KeyboardInterrupt at its prompt

    monkeypatch.setattr(typer, "confirm", pressed_ctrl_c)
    before = snapshot(run_copy)
    assert invoke("runs", "rm", run_copy).exit_code == 130
    assert snapshot(run_copy) == before


# -- 8. what an independent review of the deletion found (issue 25) --------------------------------

def test_runs_rm_refuses_a_users_folder_whose_files_only_look_like_a_runs(tmp_path: Path):
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "data.txt").write_text("precious")
    (notes / "config.yaml").write_text("a: 1\n")
    before = snapshot(notes)
    assert_usage_error(invoke("runs", "rm", notes, "--yes"), "nothing was deleted")
    assert snapshot(notes) == before
    assert {r["name"]: r["state"] for r in invoke("runs", tmp_path, "--json").json()["runs"]}["notes"] == "not a run"


@pytest.mark.parametrize("swapped", [".", "checkpoints"])
def test_runs_rm_deletes_nothing_from_a_folder_swapped_after_it_was_planned(run_copy: Path, tmp_path: Path,
                                                                            swapped: str):
    """The y/N prompt is a human-length gap: a run folder (or its checkpoints/) replaced by a link to a
    folder of the user's meanwhile must not lose that folder's files."""
    from minigpt_cli.runs import plan_removal, remove_run

    project = tmp_path / "project"
    step = sorted((run_copy / "checkpoints").iterdir())[-1].name
    (project / step).mkdir(parents=True)
    for name in ("config.yaml", "metrics.jsonl", f"{step}/meta.json", f"{step}/model.safetensors"):
        (project / name).write_text("the user's")  # named as minigpt's files, where the swap would put them
    [plan] = plan_removal([run_copy])
    target = run_copy if swapped == "." else run_copy / "checkpoints"
    target.rename(tmp_path / "moved")
    target.symlink_to(project, target_is_directory=True)
    before = snapshot(project)
    try:
        remove_run(plan)
    except Exception as exc:  # refusing is right too
        assert "nothing was deleted" in str(exc) or "changed" in str(exc)
    assert snapshot(project) == before


def test_runs_rm_of_a_path_ending_in_dotdot_removes_the_run_it_names(run_copy: Path):
    result = invoke("runs", "rm", str(run_copy / "checkpoints" / ".."), "--yes")
    assert result.exit_code == 0, result.stderr
    assert not run_copy.exists()


def test_a_lock_file_hard_linked_to_a_users_file_is_refused_not_overwritten(tmp_path: Path):
    mine = tmp_path / "diary.txt"
    mine.write_text("dear diary")
    run = tmp_path / "run"
    run.mkdir()
    os.link(mine, run / ".minigpt.lock")
    with pytest.raises(Exception, match="hard link"):
        with rundir.RunLock(run):
            pass
    assert mine.read_text() == "dear diary"
