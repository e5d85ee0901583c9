"""Big corpora: time to the first step (cold and cached), peak memory, speed and final-evaluation cost.

    python benchmarks/big_corpus.py [--sizes 10MB,100MB,1GB] [--max-iters 20] [--rss-limit-gb 12]
        [--vocab-steps] [--json]

For each size, a UTF-8 corpus is built on the fly from the Python standard library's own sources
(repeated until the size is reached) in a temporary folder, and `minigpt train tiny --data CORPUS`
runs twice as a fresh process under `/usr/bin/time -v`: first with an empty encoded-text cache
(cold), then again with the cache the first run left (cached). Reported per run: seconds from the
process's start to the first training step (the `elapsed` of step 1 in metrics.jsonl), peak
resident memory (time's "Maximum resident set size"), training tokens per second (median of the
logged steps after the second), and the final evaluation's seconds and characters scored. A run
whose process tree passes --rss-limit-gb is stopped, and that is reported instead. Everything the
script writes lives under one temporary folder, removed at the end.

--vocab-steps also times one training step of the same model at vocabulary 65 and 7,000
(interleaved, median of repeats, in this process).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
UNITS = {"KB": 10**3, "MB": 10**6, "GB": 10**9}


def parse_size(text: str) -> int:
    match = re.fullmatch(r"(\d+(?:\.\d+)?)\s*(KB|MB|GB)", text.strip().upper())
    if not match:
        raise argparse.ArgumentTypeError(f"size like 10MB or 1GB, got {text!r}")
    return int(float(match[1]) * UNITS[match[2]])


def stdlib_sources() -> list[bytes]:
    """Every UTF-8 .py file of the standard library, in a fixed order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    parts = []
    for path in sorted(root.rglob("*.py")):
        if "site-packages" in path.parts:
            continue
        try:
            raw = path.read_bytes()
            raw.decode("utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        parts.append(raw)
    return parts


def build_corpus(path: Path, size: int, sources: list[bytes]) -> int:
    """Write the sources, repeated, until size bytes; cut at a line end so the text stays valid UTF-8."""
    written = 0
    with open(path, "wb") as f:
        while written < size:
            for raw in sources:
                if written + len(raw) > size:
                    cut = raw[:size - written]
                    cut = cut[:cut.rfind(b"\n") + 1]
                    f.write(cut)
                    written += len(cut)
                    return written
                f.write(raw)
                written += len(raw)
    return written


def tree_rss(pid: int) -> int:
    """Resident bytes of a process and all its descendants (Linux /proc)."""
    children: dict[int, list[int]] = {}
    rss: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(entry))
        rss[int(entry)] = int(fields[21]) * os.sysconf("SC_PAGE_SIZE")
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        total += rss.get(p, 0)
        todo += children.get(p, [])
    return total


def train_once(corpus: Path, out: Path, cache: Path, args: argparse.Namespace) -> dict:
    cmd = ["/usr/bin/time", "-v", sys.executable, "-m", "minigpt_cli", "train", "tiny", "--data", str(corpus),
           "--out", str(out), "--device", "cpu", "--json", "--quiet",
           "--set", f"train.max_iters={args.max_iters}", "--set", "train.log_interval=1",
           "--set", "train.eval_interval=1000000", "--set", f"train.num_threads={args.threads}"]
    env = {**os.environ, "MINIGPT_CACHE_DIR": str(cache)}
    limit = args.rss_limit_gb * 2**30
    began = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)
    peak_seen, stopped = 0, None
    while proc.poll() is None:
        peak_seen = max(peak_seen, tree_rss(proc.pid))
        if peak_seen > limit:
            stopped = f"stopped at {peak_seen / 2**30:.1f} GB resident after {time.perf_counter() - began:.0f}s"
            os.killpg(proc.pid, signal.SIGKILL)
            break
        time.sleep(0.2)
    stdout, stderr = proc.communicate()
    wall = time.perf_counter() - began
    if stopped:
        return {"stopped": stopped, "peak_rss_gb": peak_seen / 2**30, "wall_seconds": wall}
    if proc.returncode != 0:
        tail = [line for line in stderr.splitlines() if line.strip() and not line.startswith("\t")][-3:]
        return {"stopped": f"failed with exit code {proc.returncode}: {' | '.join(tail)}", "wall_seconds": wall}
    match = re.search(r"Maximum resident set size \(kbytes\): (\d+)", stderr)
    result = json.loads(stdout.strip().splitlines()[-1])
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if r.get("kind") == "train"]
    final = [r for r in records if r.get("kind") == "eval" and r.get("final")]
    return {
        "first_step_seconds": next(r["elapsed"] for r in steps if r["step"] == 1),
        "data_seconds": result.get("data_seconds"),  # reading/encoding the text (newer minigpt only)
        "peak_rss_gb": int(match[1]) * 1024 / 2**30 if match else None,
        "tokens_per_sec": statistics.median(r["tokens_per_sec"] for r in steps if r["step"] > 2),
        "final_eval_seconds": final[-1]["eval_seconds"] if final else None,
        "final_eval_chars": result.get("val_tokens_scored"),
        "val_chars": result.get("val_chars"),
        "wall_seconds": wall,
        "run_keeps": sorted(p.name for p in out.iterdir() if p.is_file()),
        "run_bytes": sum(p.stat().st_size for p in out.rglob("*") if p.is_file() and p.stat().st_nlink == 1),
    }


def vocab_steps(repeats: int) -> dict:
    """One training step of the tiny model at vocabulary 65 and 7,000, interleaved; median ms."""
    import torch

    from minigpt_cli.config import load_config
    from minigpt_cli.device import choose_precision
    from minigpt_cli.model import GPT
    from minigpt_cli.optim import build_optimizers
    from minigpt_cli.trainer import apply_gradients, training_loss

    torch.set_num_threads(1)
    cfg = load_config("tiny")
    device = torch.device("cpu")
    precision = choose_precision(device, "float32")
    setups = {}
    for vocab in (65, 7000):
        torch.manual_seed(0)
        model = GPT(cfg.model, vocab)
        opts = build_optimizers(model, cfg.train, device)
        x = torch.randint(0, vocab, (cfg.train.batch_size, cfg.model.block_size))
        setups[vocab] = (model, opts, x, torch.roll(x, -1, 1))
    times: dict[int, list[float]] = {v: [] for v in setups}
    for i in range(repeats + 3):
        for vocab, (model, opts, x, y) in setups.items():
            began = time.perf_counter()
            training_loss(model, x, y, device, precision).backward()
            apply_gradients(model, opts, None, cfg.train.grad_clip)
            if i >= 3:  # the first few are warm-up
                times[vocab].append(time.perf_counter() - began)
    ms = {v: 1000 * statistics.median(t) for v, t in times.items()}
    return {"model": f"tiny ({cfg.model.n_layer} layers x {cfg.model.n_embd}, batch {cfg.train.batch_size} x "
                     f"{cfg.model.block_size}), 1 thread", "ms_per_step": ms,
            "params": {v: sum(p.numel() for p in setups[v][0].parameters()) for v in setups},
            "ratio_7000_over_65": ms[7000] / ms[65]}


def fmt(value, spec: str, unit: str = "") -> str:
    return "-" if value is None else f"{value:{spec}}{unit}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="10MB,100MB,1GB")
    parser.add_argument("--max-iters", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rss-limit-gb", type=float, default=12.0)
    parser.add_argument("--vocab-steps", action="store_true")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--workdir", type=Path, default=None, help="parent of the temporary folder")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    sizes = [parse_size(s) for s in args.sizes.split(",") if s.strip()]
    report: dict = {"sizes": [], "max_iters": args.max_iters, "threads": args.threads}
    sources = stdlib_sources()
    folder = Path(tempfile.mkdtemp(prefix="minigpt-big-", dir=args.workdir))
    try:
        for size in sizes:
            corpus = folder / "corpus.txt"
            nbytes = build_corpus(corpus, size, sources)
            cache = folder / "cache"
            row = {"bytes": nbytes}
            for name in ("cold", "cached"):
                row[name] = train_once(corpus, folder / f"run-{name}", cache, args)
                print(f"{nbytes / 1e6:,.0f} MB {name}: {json.dumps(row[name])}", file=sys.stderr, flush=True)
                if "stopped" in row[name]:
                    break
            report["sizes"].append(row)
            for path in folder.iterdir():  # the next size starts from nothing
                shutil.rmtree(path) if path.is_dir() else path.unlink()
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    if args.vocab_steps:
        report["vocab_steps"] = vocab_steps(args.repeats)
    if args.json:
        print(json.dumps(report))
        return
    print("| corpus | run | first step (s) | of which data (s) | peak RSS (GB) | tokens/s | final eval (s) "
          "| characters scored |")
    print("|---|---|---|---|---|---|---|---|")
    for row in report["sizes"]:
        for name in ("cold", "cached"):
            r = row.get(name)
            if r is None:
                continue
            if "stopped" in r:
                print(f"| {row['bytes'] / 1e6:,.0f} MB | {name} | {r['stopped']} | - | {fmt(r.get('peak_rss_gb'), '.2f')} "
                      f"| - | - | - |")
                continue
            scored = f"{r['final_eval_chars']:,}" + (f" of {r['val_chars']:,}" if r.get("val_chars") else "")
            print(f"| {row['bytes'] / 1e6:,.0f} MB | {name} | {r['first_step_seconds']:.1f} "
                  f"| {fmt(r.get('data_seconds'), '.1f')} | {r['peak_rss_gb']:.2f} "
                  f"| {r['tokens_per_sec']:,.0f} | {fmt(r['final_eval_seconds'], '.1f')} | {scored} |")
    if args.vocab_steps:
        v = report["vocab_steps"]
        print(f"\ntraining step of {v['model']}: vocabulary 65 {v['ms_per_step'][65]:.2f} ms, "
              f"7,000 {v['ms_per_step'][7000]:.2f} ms ({v['ratio_7000_over_65']:.2f}x; parameters "
              f"{v['params'][65]:,} vs {v['params'][7000]:,})")


if __name__ == "__main__":
    main()
