"""Shared helpers: hermetic working directories, small corpora, and ways to run the CLI.

Every test runs in its own tmp_path with MINIGPT_CACHE_DIR inside it, so nothing outside the
test's folder is read or written. Training runs that several tests look at are module-scoped
fixtures, trained once in-process (torch is imported once per pytest process, which keeps the
suite fast); tests that need real exit codes or real signals start `python -m minigpt_cli`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Sequence

import pytest

# Tiny models gain nothing from several threads, and on a busy machine threads that wait for each
# other make every small operation slow: one thread per process (this one and every CLI process it
# starts) keeps the suite fast and its timings steady. Set before any test imports torch.
os.environ.setdefault("OMP_NUM_THREADS", "1")

REPO = Path(__file__).resolve().parent.parent
CONFIGS_DIR = REPO / "configs"
BUNDLED_TEXT = REPO / "data" / "tinyshakespeare.txt"

# Small and quick: a few milliseconds per step for the tiny model on 2 CPU cores. On the CPU even
# where a GPU exists, since the tests compare results bit for bit.
FAST = ("train.eval_iters=2", "train.log_interval=1", "train.batch_size=8", "model.block_size=16",
        "train.device=cpu")


def pytest_xdist_auto_num_workers(config: pytest.Config) -> int:
    """`pytest -n auto`: one worker per CPU this process may use, at most 4 (each worker and the CLI
    processes it starts import torch: about half a GiB of memory apiece)."""
    return max(1, min(4, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1))


def set_flags(*overrides: str) -> list[str]:
    """['a=1', 'b=2'] -> ['--set', 'a=1', '--set', 'b=2']."""
    flags: list[str] = []
    for item in overrides:
        flags += ["--set", item]
    return flags


def write_small_corpus(path: Path, n_chars: int = 20_000) -> Path:
    """The first n_chars characters of the bundled text: every line is plain ASCII Shakespeare."""
    path.write_text(BUNDLED_TEXT.read_text(encoding="utf-8")[:n_chars], encoding="utf-8")
    return path


@pytest.fixture(autouse=True)
def hermetic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("MINIGPT_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("NO_COLOR", "1")
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture(scope="session")
def small_corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_small_corpus(tmp_path_factory.mktemp("corpus") / "small.txt")


def cli_env(cache_dir: Path | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env["NO_COLOR"] = "1"
    env["COLUMNS"] = "200"
    env.pop("RANK", None)
    env.pop("WORLD_SIZE", None)
    if cache_dir is not None:
        env["MINIGPT_CACHE_DIR"] = str(cache_dir)
    return env


def cli_command(*args: object) -> list[str]:
    return [sys.executable, "-m", "minigpt_cli", *map(str, args)]


def run_cli(*args: object, input: str | bytes | None = None, cwd: Path | None = None,
            timeout: float = 180) -> subprocess.CompletedProcess:
    """Run `minigpt ARGS` in a fresh Python process, as a user's shell would."""
    return subprocess.run(cli_command(*args), input=input, capture_output=True, cwd=cwd, env=cli_env(),
                          timeout=timeout, text=not isinstance(input, bytes))


class Invocation:
    def __init__(self, exit_code: int, stdout: str, stderr: str):
        self.exit_code = exit_code
        self.stdout = stdout
        self.stderr = stderr

    @property
    def error_lines(self) -> list[str]:
        return [line for line in self.stderr.splitlines() if line.strip()]

    def json(self) -> dict:
        lines = self.stdout.strip().splitlines()
        assert lines, f"no JSON on stdout; stderr: {self.stderr}"
        return json.loads(lines[-1])


def invoke(*args: object, input: str | bytes | None = None) -> Invocation:
    """Run the CLI in this process (fast: torch is already imported). An exception that escapes
    the CLI's error handling is re-raised, so a would-be traceback fails the test."""
    from typer.testing import CliRunner

    from minigpt_cli.cli import app

    result = CliRunner().invoke(app, [str(a) for a in args], input=input)
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return Invocation(result.exit_code, result.stdout, result.stderr)


@pytest.fixture
def at_80_columns(monkeypatch: pytest.MonkeyPatch) -> None:
    """invoke() renders as into a pipe at COLUMNS=80: the stdout console is made afresh, reading COLUMNS."""
    from minigpt_cli import output

    monkeypatch.setenv("COLUMNS", "80")
    monkeypatch.setattr(output.out, "_console", None)


def assert_fits_80(text: str) -> None:
    """Every line within 80 columns, and nothing cut short with an ellipsis."""
    from rich.cells import cell_len

    wide = [line for line in text.splitlines() if cell_len(line) > 80]
    assert not wide, f"{len(wide)} lines over 80 columns, the first: {wide[0]!r}"
    assert "…" not in text


def assert_usage_error(result: Invocation | subprocess.CompletedProcess, *fragments: str) -> str:
    """Exit code 2, exactly one non-empty line on stderr (no traceback), naming every fragment."""
    code = result.exit_code if isinstance(result, Invocation) else result.returncode
    stderr = result.stderr if isinstance(result.stderr, str) else result.stderr.decode()
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert code == 2, f"exit code {code}, stderr:\n{stderr}"
    assert "Traceback" not in stderr, stderr
    assert len(lines) == 1, f"expected one line on stderr, got:\n{stderr}"
    for fragment in fragments:
        assert fragment in lines[0], f"{fragment!r} not in {lines[0]!r}"
    return lines[0]


def train_in_process(overrides: Sequence[str], run_dir: Path, config: str = "tiny", resume: bool = False,
                     events: list | None = None):
    """Train with the library call the CLI makes; returns the TrainResult."""
    from minigpt_cli.config import apply_overrides, load_config
    from minigpt_cli.trainer import train

    cfg = apply_overrides(load_config(config), list(overrides))
    return train(cfg, run_dir, resume=resume, callback=events.append if events is not None else None)


def train_losses(run_dir: Path) -> list[tuple[int, float]]:
    from minigpt_cli.rundir import read_metrics

    return [(r["step"], r["loss"]) for r in read_metrics(run_dir) if r["kind"] == "train"]


def latest_weights(run_dir: Path):
    from minigpt_cli.checkpoint import load_checkpoint

    return load_checkpoint(run_dir, which="latest").model_state


def assert_same_weights(a: dict, b: dict) -> None:
    import torch

    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), f"weights differ in {key}"


@pytest.fixture(scope="module")
def module_dir(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest):
    """A folder for a module's shared runs, with its own cache, entered while the fixture builds them."""
    folder = tmp_path_factory.mktemp(request.module.__name__.rsplit(".", 1)[-1])
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MINIGPT_CACHE_DIR", str(folder / "cache"))
        mp.chdir(folder)
        yield folder


TINY_RUN_FLAGS = (*FAST, "train.max_iters=6", "train.eval_interval=3", "model.dropout=0.1")


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory: pytest.TempPathFactory, small_corpus: Path) -> Path:
    """A finished 6-step run of the tiny model on the small corpus. Read it; copy it to change it."""
    folder = tmp_path_factory.mktemp("tiny_run")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MINIGPT_CACHE_DIR", str(folder / "cache"))
        run_dir = folder / "run"
        train_in_process([*TINY_RUN_FLAGS, f"data.path={small_corpus}"], run_dir)
    return run_dir


@pytest.fixture
def run_copy(tiny_run: Path, tmp_path: Path) -> Path:
    """A private copy of tiny_run under ./runs of this test's folder."""
    import shutil

    target = tmp_path / "runs" / "tiny"
    shutil.copytree(tiny_run, target)
    return target
