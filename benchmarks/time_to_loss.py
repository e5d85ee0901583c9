"""Time to loss: train a config under a wall-clock budget and report when the validation loss over
the WHOLE validation split (not a few sampled batches) first reached a target.

    python benchmarks/time_to_loss.py --target 1.88 --budget 39 [CONFIG] [--set KEY=VALUE]...
        [--steps N] [--eval-every STEPS] [--device cpu] [--data PATH] [--repeats N] [--reference nanogpt] [--json]

Each repeat runs `minigpt train CONFIG --time-budget BUDGET --json` as a fresh process, so the wall
clock counts from the command's start (Python and torch imports included), as a user would see it.
--steps N runs N steps instead (train.max_iters, no time budget): the same run on any machine.

--reference nanogpt also trains, in the same invocation and taking turns with CONFIG (so a slow
minute on a shared machine hits both), nanoGPT's CPU recipe for Shakespeare characters made with
this tool: its model (4 layers, 4 heads, 128 wide, block 64, learned positions, LayerNorm, GELU, no
bias, tied embeddings), its optimizer (AdamW at 1e-3 with betas 0.9/0.99, weight decay 0.1, clip 1,
100 warm-up steps, cosine to 1e-4) and batch (12), for its 2000 steps (--reference-steps).
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


# nanoGPT's `python train.py config/train_shakespeare_char.py --device=cpu --compile=False
# --eval_iters=20 --log_interval=1 --block_size=64 --batch_size=12 --n_layer=4 --n_head=4
# --n_embd=128 --max_iters=2000 --lr_decay_iters=2000 --dropout=0.0`, in this tool's keys.
NANOGPT_CPU = ("model.n_layer=4", "model.n_head=4", "model.n_embd=128", "model.block_size=64", "model.dropout=0.0",
               "model.pos_encoding=learned", "model.norm=layernorm", "model.norm_placement=pre",
               "model.activation=gelu", "model.qk_norm=false", "model.tie_weights=true", "model.bias=false",
               "model.zero_init_proj=false", "train.batch_size=12", "train.optimizer=adamw",
               "train.learning_rate=1e-3", "train.min_lr=1e-4", "train.schedule=cosine", "train.warmup_iters=100",
               "train.weight_decay=0.1", "train.beta1=0.9", "train.beta2=0.99", "train.grad_clip=1.0",
               "train.grad_accum_steps=1", "train.dtype=float32", "model.short_conv=0", "train.sampling=random")


def train_command(config: str | None, overrides: list[str], out: Path, budget: float | None, steps: int | None,
                  eval_every: int, device: str, data: str | None = None) -> list[str]:
    """`minigpt train` for one run: a time budget or a number of steps, whole-split evaluations every
    `eval_every` steps (0: only the final one)."""
    cmd = [sys.executable, "-m", "minigpt_cli", "train", *([config] if config else []),
           "--out", str(out), "--json", "--quiet"]
    if steps:
        cmd += ["--set", f"train.max_iters={steps}", "--set", "train.time_budget=0"]
    elif budget:
        cmd += ["--time-budget", str(budget)]
    if device:
        cmd += ["--device", device]
    if data:
        cmd += ["--data", data]
    for item in overrides:
        cmd += ["--set", item]
    if eval_every:
        cmd += ["--set", "train.eval_full=true", "--set", f"train.eval_interval={eval_every}"]
    return cmd


def first_crossing(evals: list[dict], target: float) -> dict | None:
    """The first whole-split evaluation at or below `target`, with its time split into training and
    evaluating (records in step order, as metrics.jsonl holds them); None if none reached it."""
    first = next((e for e in evals if e.get("scope") == "full" and e["val_loss"] <= target), None)
    if first is None:
        return None
    eval_seconds = first.get("eval_seconds", 0.0)
    return {"step": first["step"], "val_loss": first["val_loss"], "elapsed": first["elapsed"],
            "train_seconds": first["elapsed"] - eval_seconds, "eval_seconds": eval_seconds}


def run_once(args: argparse.Namespace, out: Path, reference: bool = False) -> dict:
    if reference:
        cmd = train_command(None, list(NANOGPT_CPU), out, None, args.reference_steps, args.eval_every, args.device,
                            args.data)
    else:
        cmd = train_command(args.config, args.set, out, args.budget, args.steps, args.eval_every, args.device,
                            args.data)
    began = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - began
    if proc.returncode != 0:
        sys.exit(f"training failed ({proc.returncode}): {proc.stderr.strip().splitlines()[-1:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    evals = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [e for e in evals if e.get("kind") == "eval" and e.get("scope") == "full"]
    first = first_crossing(evals, args.target)
    return {
        "wall_seconds": wall,
        "final_val_loss": result["final_val_loss"],
        "steps": result["steps"],
        "tokens": result["tokens"],
        "train_seconds": result["train_seconds"],
        "eval_seconds": result["eval_seconds"],
        "reached": first is not None,
        "first_reached": first,
        "curve": [(e["step"], round(e["elapsed"], 2), round(e["val_loss"], 4)) for e in evals],
    }


def report(label: str, r: dict, args: argparse.Namespace) -> None:
    print(f"{label}: wall {r['wall_seconds']:.1f}s (train {r['train_seconds']:.1f}s, eval {r['eval_seconds']:.1f}s), "
          f"{r['steps']} steps, {r['tokens']:,} tokens, final val loss {r['final_val_loss']:.4f} (whole split) -> "
          f"{'reached' if r['reached'] else 'NOT reached'} {args.target}", flush=True)
    if r["first_reached"] and args.eval_every:
        f = r["first_reached"]
        print(f"   first reached at step {f['step']}: {f['elapsed']:.1f}s wall, {f['train_seconds']:.1f}s "
              f"training, {f['eval_seconds']:.1f}s evaluating", flush=True)


def summarise(runs: list[dict]) -> dict:
    return {
        "runs": runs,
        "median_final_val_loss": statistics.median(r["final_val_loss"] for r in runs),
        "median_wall_seconds": statistics.median(r["wall_seconds"] for r in runs),
        "reached_all": all(r["reached"] for r in runs),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", nargs="?", default=None, help="config name or path (default: default)")
    parser.add_argument("--target", type=float, required=True, help="validation loss to reach (nats/char)")
    parser.add_argument("--budget", type=float, default=None, help="wall-clock seconds for the whole command")
    parser.add_argument("--steps", type=int, default=None, help="train this many steps instead of a time budget")
    parser.add_argument("--set", action="append", default=[], help="config override, repeatable")
    parser.add_argument("--eval-every", type=int, default=0, help="score the whole val split every N steps")
    parser.add_argument("--device", default="", help="device for training (default: auto)")
    parser.add_argument("--data", default=None, help="training text for every run (default: the config's)")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--reference", choices=["nanogpt"], default=None,
                        help="also train nanoGPT's CPU recipe, taking turns with CONFIG")
    parser.add_argument("--reference-steps", type=int, default=2000, help="steps of the reference (default: 2000)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if (args.budget is None) == (args.steps is None):
        parser.error("give one of --budget SECONDS or --steps N")
    for name in ("budget", "steps", "reference_steps", "repeats"):
        value = getattr(args, name)
        if value is not None and value <= 0:
            parser.error(f"--{name.replace('_', '-')} must be positive, got {value}")
    runs, references = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.repeats):
            runs.append(run_once(args, Path(tmp) / f"run{i}"))
            if not args.json:
                report(f"run {i + 1}", runs[-1], args)
            if args.reference:
                references.append(run_once(args, Path(tmp) / f"reference{i}", reference=True))
                if not args.json:
                    report(f"reference {i + 1} ({args.reference})", references[-1], args)
    summary = {"config": args.config or "default", "target": args.target, "budget": args.budget,
               "steps": args.steps, "overrides": args.set, **summarise(runs)}
    if args.reference:
        summary["reference"] = {"name": args.reference, "overrides": list(NANOGPT_CPU),
                                "steps": args.reference_steps, **summarise(references)}
    if args.json:
        print(json.dumps(summary))
        return
    for label, s in (("", summary), ("reference ", summary.get("reference"))):
        if s:
            print(f"{label}median over {len(s['runs'])}: val loss {s['median_final_val_loss']:.4f}, wall "
                  f"{s['median_wall_seconds']:.1f}s; target {args.target} reached in "
                  f"{sum(r['reached'] for r in s['runs'])}/{len(s['runs'])} runs")


if __name__ == "__main__":
    main()
