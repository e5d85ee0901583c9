"""Time to loss: train a config under a wall-clock budget and report when the validation loss over
the WHOLE validation split (not a few sampled batches) first reached a target.

    python benchmarks/time_to_loss.py --target 1.88 --budget 39 [CONFIG] [--set KEY=VALUE]...
        [--eval-every STEPS] [--device cpu] [--repeats N] [--json]

Each repeat runs `minigpt train CONFIG --time-budget BUDGET --json` as a fresh process, so the wall
clock counts from the command's start (Python and torch imports included), as a user would see it.
With --eval-every, every evaluation scores the whole validation split (train.eval_full) so the first
crossing of the target can be seen; that evaluation time is reported apart from training time (and
it does take time out of the budget). Without it, only the final full-split evaluation is made.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def run_once(args: argparse.Namespace, out: Path) -> dict:
    cmd = [sys.executable, "-m", "minigpt_cli", "train", *([args.config] if args.config else []),
           "--time-budget", str(args.budget), "--out", str(out), "--json", "--quiet"]
    if args.device:
        cmd += ["--device", args.device]
    for item in args.set:
        cmd += ["--set", item]
    if args.eval_every:
        cmd += ["--set", "train.eval_full=true", "--set", f"train.eval_interval={args.eval_every}"]
    began = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - began
    if proc.returncode != 0:
        sys.exit(f"training failed ({proc.returncode}): {proc.stderr.strip().splitlines()[-1:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    evals = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [e for e in evals if e.get("kind") == "eval" and e.get("scope") == "full"]
    first = next((e for e in evals if e["val_loss"] <= args.target), None)
    return {
        "wall_seconds": wall,
        "final_val_loss": result["final_val_loss"],
        "steps": result["steps"],
        "tokens": result["tokens"],
        "train_seconds": result["train_seconds"],
        "eval_seconds": result["eval_seconds"],
        "reached": first is not None,
        "first_reached": None if first is None else {
            "step": first["step"], "val_loss": first["val_loss"], "elapsed": first["elapsed"],
            "train_seconds": first["elapsed"] - first.get("eval_seconds", 0.0),
            "eval_seconds": first.get("eval_seconds", 0.0)},
        "curve": [(e["step"], round(e["elapsed"], 2), round(e["val_loss"], 4)) for e in evals],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", nargs="?", default=None, help="config name or path (default: default)")
    parser.add_argument("--target", type=float, required=True, help="validation loss to reach (nats/char)")
    parser.add_argument("--budget", type=float, required=True, help="wall-clock seconds for the whole command")
    parser.add_argument("--set", action="append", default=[], help="config override, repeatable")
    parser.add_argument("--eval-every", type=int, default=0, help="score the whole val split every N steps")
    parser.add_argument("--device", default="", help="device for training (default: auto)")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.repeats):
            runs.append(run_once(args, Path(tmp) / f"run{i}"))
            if not args.json:
                r = runs[-1]
                print(f"run {i + 1}: wall {r['wall_seconds']:.1f}s (train {r['train_seconds']:.1f}s, eval "
                      f"{r['eval_seconds']:.1f}s), {r['steps']} steps, {r['tokens']:,} tokens, final val loss "
                      f"{r['final_val_loss']:.4f} (whole split) -> {'reached' if r['reached'] else 'NOT reached'} "
                      f"{args.target}", flush=True)
                if r["first_reached"] and args.eval_every:
                    f = r["first_reached"]
                    print(f"   first reached at step {f['step']}: {f['elapsed']:.1f}s wall, {f['train_seconds']:.1f}s "
                          f"training, {f['eval_seconds']:.1f}s evaluating")
    summary = {
        "config": args.config or "default", "target": args.target, "budget": args.budget, "overrides": args.set,
        "runs": runs,
        "median_final_val_loss": statistics.median(r["final_val_loss"] for r in runs),
        "median_wall_seconds": statistics.median(r["wall_seconds"] for r in runs),
        "reached_all": all(r["reached"] for r in runs),
    }
    if args.json:
        print(json.dumps(summary))
    else:
        print(f"median over {len(runs)}: val loss {summary['median_final_val_loss']:.4f}, wall "
              f"{summary['median_wall_seconds']:.1f}s; target {args.target} reached in "
              f"{sum(r['reached'] for r in runs)}/{len(runs)} runs")


if __name__ == "__main__":
    main()
