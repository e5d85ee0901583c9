"""Every `minigpt` command in README.md runs and exits 0, so the documentation cannot drift from the tool.

Commands run as written, in order, in one folder (a run trained by an early command is sampled by a
later one), with settings appended that make them quick: a one-layer model for two steps, a few
sampled characters, the quick benchmark. Lines for torchrun need several GPUs or machines and are
checked for their shape only; tests/test_distributed.py runs `minigpt train` under torchrun on CPU.
Each `minigpt` runs through tests/cli_server.py: a process of its own, forked from one that has
already imported torch, with the line's pipes as its standard streams.
"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import BUNDLED_TEXT, REPO, cli_env

SERVER = Path(__file__).resolve().parent / "cli_server.py"

README = REPO / "README.md"

# A bench of a named config (not of a trained run) also gets a small model.
SMALL_MODEL = ["--set", "model.n_layer=1", "--set", "model.n_embd=32", "--set", "model.n_head=2",
               "--set", "model.block_size=32"]

QUICK = {
    "train": ["--device", "cpu", "--set", "train.max_iters=2", "--set", "train.eval_interval=1",
              "--set", "train.eval_iters=1", "--set", "train.batch_size=2", "--set", "model.n_layer=1",
              "--set", "model.n_head=2", "--set", "model.n_embd=16", "--set", "model.block_size=16"],
    "sample": ["--max-new-tokens", "20"],
    "eval": ["--batch-size", "64"],
    "bench": ["--quick", "--max-seq", "64", "--repeats", "1"],
    "inspect": [],
    "runs": [],
    "compare": [],
}


def readme_commands() -> list[str]:
    """Shell lines from the README's bash blocks that run minigpt (comments and continuations joined)."""
    blocks = re.findall(r"```bash\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.S)
    lines = []
    for block in blocks:
        joined = block.replace("\\\n", " ")
        for line in joined.splitlines():
            line = re.sub(r"\s+#.*$", "", line).strip()
            if "minigpt" in line and not line.startswith("#"):
                lines.append(line)
    return lines


@pytest.fixture(scope="module")
def minigpt(tmp_path_factory: pytest.TempPathFactory):
    """The command line that runs `minigpt` through a warm cli_server (one per pytest worker)."""
    path = str(tmp_path_factory.mktemp("server") / "minigpt.sock")
    server = subprocess.Popen([sys.executable, str(SERVER), path], env=cli_env(), stdout=subprocess.PIPE, text=True)
    try:
        assert server.stdout.readline().strip() == "ready"
        yield [sys.executable, str(SERVER), "--run", path]
    finally:
        server.kill()
        server.wait()


def quick(line: str, minigpt: list[str] | None = None) -> str:
    """The README line with quick settings appended to its minigpt command (the last one in a pipeline),
    run by `minigpt` (a fresh `python -m minigpt_cli` when None)."""
    if "pip install" in line:
        line = line.split("&&")[-1].strip()  # the set-up commands: run what follows the install
    parts = line.split("|")
    words = shlex.split(parts[-1])
    if "minigpt" in words:
        at = words.index("minigpt")
        command = words[at + 1]
        extra = list(QUICK[command])
        if command == "bench" and any(not w.startswith("-") for w in words[at + 2:]):
            extra += SMALL_MODEL
        if command == "compare" and "--vary" in words:
            extra = list(QUICK["train"])  # each variant trains as a quick `train` would
        words = [*(minigpt or [sys.executable, "-m", "minigpt_cli"]), *words[at + 1:], *extra]
        parts[-1] = " " + shlex.join(words)
    return "|".join(parts)


def test_the_warm_server_runs_minigpt_as_a_process_would(tmp_path: Path, minigpt: list[str]):
    """Exit codes, stderr, stdin and the folder reach the shell as from `python -m minigpt_cli`, so a
    README command that fails fails its test."""
    def run(command: str) -> subprocess.CompletedProcess:
        return subprocess.run(["bash", "-c", f"set -o pipefail; {command}"], cwd=tmp_path, env=cli_env(),
                              capture_output=True, text=True, timeout=60)

    line = shlex.join(minigpt)
    bad = run(f"{line} train --set train.eval_interval=0")
    assert (bad.returncode, bad.stderr) == (2, "error: train.eval_interval must be at least 1, got 0\n")
    short = run(f"printf 'hi' | {line} train --data -")  # stdin reaches the command
    assert short.returncode == 2 and "the train split of stdin has 2 characters" in short.stderr
    listed = run(f"{line} runs | head -1")  # the folder and stdout too
    assert listed.returncode == 0 and listed.stdout.startswith("no runs under runs")


def test_readme_opens_with_the_train_and_test_commands():
    text = README.read_text(encoding="utf-8")
    first_blocks = re.findall(r"```bash\n(.*?)```", text, flags=re.S)[:2]
    assert "pip install -e ." in first_blocks[0] and "minigpt train" in first_blocks[0]
    assert "pytest" in first_blocks[1] and "<!-- test-command -->" in text


CHUNKS = 3  # the README's commands run as this many tests, which a parallel run (pytest -n) spreads out


def command_chunks(commands: list[str], parts: int = CHUNKS) -> list[list[str]]:
    """The commands cut into about `parts` runs of consecutive lines that stand alone: each begins
    with a `minigpt train` (so commands that use the newest run have one), and none uses a
    runs/NAME folder made before its chunk begins."""
    def names(line: str) -> set[str]:
        return set(re.findall(r"runs/[\w.-]+", line))

    def made(line: str) -> set[str]:
        return set(re.findall(r"--out (runs/[\w.-]+)", line))

    cuts = [0]
    for i in range(1, len(commands)):
        train = re.search(r"(^|\|\s*)minigpt train\b", commands[i]) is not None
        earlier = set().union(*(made(line) for line in commands[:i]))
        needed = set().union(*(names(line) for line in commands[i:]))
        later = set().union(*(made(line) for line in commands[i:]))
        if train and not (needed & earlier - later) and i - cuts[-1] >= 0.8 * len(commands) / parts:
            cuts.append(i)
    return [commands[a:b] for a, b in zip(cuts, cuts[1:] + [len(commands)])]


def test_the_readme_commands_are_cut_into_chunks_that_stand_alone():
    chunks = command_chunks(readme_commands())
    assert len(chunks) >= 2 and sum(map(len, chunks)) == len(readme_commands())
    for chunk in chunks:
        assert "minigpt train" in chunk[0]


@pytest.mark.parametrize("chunk", range(CHUNKS))
def test_every_readme_command_runs(tmp_path: Path, chunk: int, minigpt: list[str]):
    (tmp_path / "my_novel.txt").write_text(BUNDLED_TEXT.read_text(encoding="utf-8")[:30_000], encoding="utf-8")
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "a.txt").write_text(BUNDLED_TEXT.read_text(encoding="utf-8")[:20_000], encoding="utf-8")
    (tmp_path / "my_config.yaml").write_text((REPO / "configs" / "tiny.yaml").read_text(), encoding="utf-8")
    commands = readme_commands()
    assert len(commands) >= 10
    chunks = command_chunks(commands)
    if chunk >= len(chunks):
        pytest.skip(f"the README's commands make {len(chunks)} chunks")
    ran = 0
    seen = set(line for earlier in chunks[:chunk] for line in earlier)  # run by an earlier chunk's test
    for line in chunks[chunk]:
        if line.startswith("torchrun"):
            assert "-m minigpt_cli train" in line
            continue
        if line in seen:
            continue  # shown twice in the README (the tour and a later section): once is enough
        seen.add(line)
        command = quick(line, minigpt)
        proc = subprocess.run(["bash", "-c", f"set -o pipefail; {command}"], cwd=tmp_path, env=cli_env(),
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, f"README command failed: {line}\n{proc.stderr[-2000:]}"
        assert "Traceback" not in proc.stderr
        ran += 1
    assert ran >= 5


def learn_section() -> str:
    text = README.read_text(encoding="utf-8")
    start = text.index("## Learn by running it")
    return text[start:text.index("\n## ", start + 1)]


def test_learn_by_running_it_covers_each_idea_with_a_command():
    section = learn_section()
    commands = [line for line in readme_commands() if line in section or line.split("|")[-1].strip() in section]
    for fragment in ("minigpt eval", "--show", "--attention", "--lens", "--top", "norm_placement=post",
                     "--vocab-size 50257", "minigpt inspect default", "minigpt bench"):
        assert any(fragment in line for line in commands), fragment
    # The attention and lens texts fit the block_size of the run test_every_readme_command_runs trains (16).
    texts = re.findall(r'--(?:attention|lens) "([^"]*)"', section)
    assert len(texts) >= 2
    for text in texts:
        assert 0 < len(text) <= 16


def test_learn_by_running_it_quotes_what_the_config_commands_print(tmp_path: Path, minigpt: list[str]):
    """The outputs quoted for commands that need no trained run (so print the same everywhere) are
    lines the tool prints now."""
    blocks = re.findall(r"```bash\n(.*?)```\n```\n(.*?)```", learn_section(), flags=re.S)
    checked = 0
    for commands, quoted in blocks:
        if "minigpt inspect gpt2_small" not in commands and "norm_placement=post" not in commands:
            continue
        printed = ""
        for line in commands.strip().splitlines():
            proc = subprocess.run([*minigpt, *shlex.split(line)[1:]], cwd=tmp_path,
                                  env=cli_env(), capture_output=True, text=True, timeout=300)
            assert proc.returncode == 0, proc.stderr
            printed += proc.stdout
        for line in quoted.splitlines():
            if line.strip() and line.strip() != "...":
                assert line.strip() in printed, line
                checked += 1
    assert checked >= 8
