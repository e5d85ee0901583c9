"""Start-up: what a command has imported when it ends. A mistake on the command line is refused
before torch is imported (seconds), and training or sampling without torch.compile never imports
torch._dynamo (1.5-2 s more: torch.optim's optimizers import it on first use). Each case runs the
CLI in a fresh Python process, since this one has long imported both."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import FAST, assert_usage_error, cli_env, set_flags

WATCHED = ("torch", "torch._dynamo")


def run_watched(tmp_path: Path, *args: object) -> tuple[subprocess.CompletedProcess, list[str]]:
    """`minigpt ARGS` in a new process; also which of WATCHED it had imported when it exited (an
    exit handler records them: the CLI runs those before it ends, on every path)."""
    record = tmp_path / "imported.json"
    code = ("import atexit, json, sys\n"
            f"atexit.register(lambda: open({str(record)!r}, 'w').write("
            f"json.dumps([m for m in {WATCHED!r} if m in sys.modules])))\n"
            f"sys.argv = ['minigpt', *{[str(a) for a in args]!r}]\n"
            "from minigpt_cli.cli import main\n"
            "main()\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=cli_env(),
                            cwd=tmp_path, timeout=300)
    return result, json.loads(record.read_text())


@pytest.mark.parametrize("args, named", [
    (("train", "--set", "train.bogus=1"), "train.bogus"),  # no config named: refused before the device is probed
    (("train", "--set", "train.max_iters=many"), "train.max_iters"),
    (("train", "--set", "model.n_layer"), "--set"),
    (("train", "default", "--set", "train.max_iters=0"), "train.max_iters"),
    (("train", "--time-budget", "-5"), "time_budget"),
    (("sample", "runs/none", "--max-new-tokens", "-1"), "--max-new-tokens"),
])
def test_a_mistake_on_the_command_line_is_refused_before_torch_is_imported(tmp_path, args, named):
    result, imported = run_watched(tmp_path, *args)
    assert_usage_error(result, named)
    assert imported == []
    assert not (tmp_path / "runs").exists()  # and no run folder was made for it


def test_training_and_sampling_do_not_import_torch_dynamo(tmp_path, small_corpus):
    trained, imported = run_watched(tmp_path, "train", "tiny", "--out", tmp_path / "run", "--quiet",
                                    *set_flags(*FAST, f"data.path={small_corpus}", "train.max_iters=2"))
    assert trained.returncode == 0, trained.stderr
    assert imported == ["torch"]
    sampled, imported = run_watched(tmp_path, "sample", tmp_path / "run", "--max-new-tokens", "3")
    assert sampled.returncode == 0, sampled.stderr
    assert imported == ["torch"]
