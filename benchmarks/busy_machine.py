"""Sampling and training speed on a quiet machine and beside competing CPU-bound processes.

    python benchmarks/busy_machine.py [--configs shakespeare_char,default] [--competing 1]
        [--rounds 3] [--new-tokens 255] [--train-steps 30] [--baseline PATH] [--json]

What a user sees: each measurement is a real `minigpt sample RUN --json` (or `minigpt train`)
process, with the tool's own choices (threads, OpenMP wait policy), so start-up, thread choice and
the decode path are all in it. For each config a one-step run is trained first (random-ish weights:
speed does not depend on them). Then, round after round, every case runs once with no competing
process and once with --competing busy loops that this script starts and stops itself; rates are
the median over rounds, and "busy/quiet" the median of each round's ratio (the issue's target is
at least 0.40). With --baseline PATH (another checkout of minigpt, e.g. an older commit), every
case also runs on that code in the same rounds, so old and new see the same machine.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

REPO = Path(__file__).resolve().parents[1]
BUSY_LOOP = "while True: pass"


@contextmanager
def competing(n: int) -> Iterator[None]:
    """n CPU-bound Python processes for the life of the block."""
    procs = [subprocess.Popen([sys.executable, "-c", BUSY_LOOP]) for _ in range(n)]
    try:
        yield
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()


def env_for(code: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(code)
    for key in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY"):  # the tool's own choices are what is measured
        env.pop(key, None)
    return env


def minigpt(code: Path, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "minigpt_cli", *args], cwd=cwd, env=env_for(code),
                          capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0:
        raise SystemExit(f"minigpt {' '.join(args)} failed:\n{proc.stderr[-2000:]}")
    return proc


def sample_rate(code: Path, run: Path, new_tokens: int, cwd: Path) -> tuple[float, str]:
    proc = minigpt(code, "sample", str(run), "--prompt", "A", "--max-new-tokens", str(new_tokens),
                   "--temperature", "0", "--device", "cpu", "--json", cwd=cwd)
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    threads = result.get("threads") or {}
    return float(result["tokens_per_second"]), str(threads.get("threads", "default"))


def train_rate(code: Path, steps: int, cwd: Path, out: Path) -> float:
    """Median logged training tokens/s of the default config, leaving out the first log line."""
    minigpt(code, "train", "default", "--device", "cpu", "--quiet", "--out", str(out),
            "--set", f"train.max_iters={steps}", "--set", "train.log_interval=5",
            "--set", f"train.eval_interval={steps}", cwd=cwd)
    rates = [json.loads(line)["tokens_per_sec"] for line in (out / "metrics.jsonl").read_text().splitlines()
             if '"kind": "train"' in line]
    return statistics.median(rates[1:] or rates)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", default="shakespeare_char,default")
    parser.add_argument("--competing", type=int, default=1, help="busy-loop processes beside the busy cases")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=255)
    parser.add_argument("--train-steps", type=int, default=30, help="0 skips the training cases")
    parser.add_argument("--baseline", type=Path, default=None, help="another minigpt checkout to run beside this one")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    codes = {"new": REPO}
    if args.baseline:
        codes["old"] = args.baseline.resolve()
    rates: dict[str, list[float]] = {}
    threads: dict[str, str] = {}
    with tempfile.TemporaryDirectory(prefix="minigpt-busy-") as tmp:
        work = Path(tmp)
        runs: dict[str, dict[str, Path]] = {}
        for name, code in codes.items():  # each checkout samples a run of its own format
            for config in args.configs.split(","):
                run = runs.setdefault(name, {})[config] = work / f"run-{name}-{config}"
                minigpt(code, "train", config, "--device", "cpu", "--quiet", "--out", str(run),
                        "--set", "train.max_iters=1", "--set", "train.eval_iters=1", "--set", "train.batch_size=1",
                        "--set", "data.val_fraction=0.01", cwd=work)
        for round_ in range(args.rounds):
            for busy in (0, args.competing):
                with competing(busy):
                    for name, code in codes.items():
                        for config, run in runs[name].items():
                            key = f"{name} sample {config} {'busy' if busy else 'quiet'}"
                            rate, used = sample_rate(code, run, args.new_tokens, work)
                            rates.setdefault(key, []).append(rate)
                            threads[key] = used
                        if args.train_steps:
                            key = f"{name} train default {'busy' if busy else 'quiet'}"
                            out = work / f"train-{name}-{round_}-{busy}"
                            rates.setdefault(key, []).append(train_rate(code, args.train_steps, work, out))
                print(f"round {round_ + 1}/{args.rounds} with {busy} competing: done", file=sys.stderr)

    rows = []
    for key in rates:
        if not key.endswith(" quiet"):
            continue
        base = key[:-len(" quiet")]
        quiet, busy = rates[key], rates[f"{base} busy"]
        ratio = statistics.median(b / q for q, b in zip(quiet, busy))
        rows.append({"case": base, "quiet": statistics.median(quiet), "busy": statistics.median(busy),
                     "busy_over_quiet": ratio, "threads_quiet": threads.get(key),
                     "threads_busy": threads.get(f"{base} busy")})
    result = {"competing": args.competing, "rounds": args.rounds, "new_tokens": args.new_tokens,
              "load_average": os.getloadavg(), "rows": rows}
    if args.json:
        print(json.dumps(result))
        return
    print(f"tokens/s, median of {args.rounds} rounds; busy: beside {args.competing} busy-loop process(es)")
    print(f"{'case':34} {'quiet':>10} {'busy':>10} {'busy/quiet':>11}  threads (quiet, busy)")
    for row in rows:
        print(f"{row['case']:34} {row['quiet']:>10.1f} {row['busy']:>10.1f} {row['busy_over_quiet']:>11.2f}  "
              f"{row['threads_quiet'] or '-'}, {row['threads_busy'] or '-'}")


if __name__ == "__main__":
    main()
