"""What Muon's orthogonalisation costs in a training step, in bfloat16 and in float32.

    python benchmarks/muon_step.py [--config default] [--repeats 7] [--threads N] [--json]

For the config's model (random weights, a random batch of train.batch_size x block_size), each
round times, in turn: a forward and backward pass; the Newton-Schulz iteration on every Muon
matrix in bfloat16; the same in float32; the same in float32 with the matrices of one shape in one
batch, as Muon.step runs it. Times are the median round, ratios the median over rounds
of each round's ratio. The iteration's work is about 2.5 GFLOP a step for the default model (five
iterations of three products per matrix), against about 10 GFLOP for its forward and backward.

It also says which precision the optimizer picks on this machine (optim.newton_schulz_dtype): a
CPU without native bfloat16 (AVX2 only) emulates it, and the iteration runs many times slower.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F

from minigpt_cli import optim
from minigpt_cli.config import load_config
from minigpt_cli.device import cpu_has_fast_bfloat16
from minigpt_cli.model import GPT


def newton_schulz_flops(shapes: list[tuple[int, int]], steps: int = 5) -> int:
    """Multiply-adds x 2 of the iteration: per step A = X X^T, A A and B X, with X (m, n), m <= n."""
    total = 0
    for rows, cols in shapes:
        m, n = min(rows, cols), max(rows, cols)
        total += steps * 2 * (m * m * n + m * m * m + m * m * n)
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="default")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: PyTorch's default)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = load_config(args.config)
    torch.manual_seed(0)
    model = GPT(cfg.model, 65)
    muon = optim.build_optimizers(model, cfg.train.__class__(**{**cfg.train.__dict__, "optimizer": "muon"}),
                                  torch.device("cpu"))[-1]
    params = [p for group in muon.param_groups for p in group["params"]]
    mats = [(p.view(getattr(p, "muon_split", 1), -1, p.shape[1])) for p in params]
    shapes = [(m.shape[1], m.shape[2]) for m in mats for _ in range(m.shape[0])]
    B, T = cfg.train.batch_size, cfg.model.block_size
    x = torch.randint(0, 65, (B, T))
    y = torch.randint(0, 65, (B, T))

    def forward_backward() -> None:
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(x).view(-1, 65), y.view(-1)).backward()

    def iterate(dtype: torch.dtype) -> None:
        for m in mats:
            optim.orthogonalize(m, dtype=dtype)

    # As Muon.step runs it: the matrices of one shape (up to a transpose) stacked into one batch.
    by_shape: dict[tuple[int, int], list[torch.Tensor]] = {}
    for m in mats:
        wide = m.mT if m.shape[1] > m.shape[2] else m
        by_shape.setdefault(tuple(wide.shape[1:]), []).append(wide)
    stacks = [torch.cat(group) for group in by_shape.values()]

    def iterate_batched(dtype: torch.dtype) -> None:
        for stack in stacks:
            optim.orthogonalize(stack, dtype=dtype)

    cases = {"forward_backward": forward_backward,
             "newton_schulz_bfloat16": lambda: iterate(torch.bfloat16),
             "newton_schulz_float32": lambda: iterate(torch.float32),
             "newton_schulz_float32_batched": lambda: iterate_batched(torch.float32)}
    times: dict[str, list[float]] = {name: [] for name in cases}
    for fn in cases.values():
        fn()  # warm-up
    for _ in range(args.repeats):
        for name, fn in cases.items():
            began = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - began)
    median = {name: statistics.median(t) for name, t in times.items()}

    def ratio(a: str, b: str) -> float:
        return statistics.median(x / y for x, y in zip(times[a], times[b]))

    flops = newton_schulz_flops(shapes)
    result = {
        "config": args.config, "threads": torch.get_num_threads(), "matrices": len(shapes),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpu_has_fast_bfloat16": cpu_has_fast_bfloat16(),
        "chosen_dtype": str(optim.newton_schulz_dtype(torch.device("cpu"))).removeprefix("torch."),
        "seconds": median,
        "newton_schulz_gflop": flops / 1e9,
        "gflops": {"bfloat16": flops / median["newton_schulz_bfloat16"] / 1e9,
                   "float32": flops / median["newton_schulz_float32"] / 1e9},
        "bfloat16_over_float32": ratio("newton_schulz_bfloat16", "newton_schulz_float32"),
        "batches": len(stacks),
        "one_by_one_over_batched": ratio("newton_schulz_float32", "newton_schulz_float32_batched"),
        "float32_over_forward_backward": ratio("newton_schulz_float32", "forward_backward"),
        "bfloat16_over_forward_backward": ratio("newton_schulz_bfloat16", "forward_backward"),
    }
    if args.json:
        print(json.dumps(result))
        return
    print(f"{args.config}: {len(shapes)} matrices, {flops / 1e9:.2f} GFLOP of Newton-Schulz a step; "
          f"{result['threads']} thread(s); CPU {result['cpu_capability']}, native bfloat16: "
          f"{result['cpu_has_fast_bfloat16']} -> Muon iterates in {result['chosen_dtype']}")
    print(f"  forward + backward       {median['forward_backward'] * 1e3:8.1f} ms")
    for dtype in ("bfloat16", "float32"):
        print(f"  Newton-Schulz {dtype:9}  {median['newton_schulz_' + dtype] * 1e3:8.1f} ms  "
              f"({result['gflops'][dtype]:.1f} GFLOP/s, {result[dtype + '_over_forward_backward']:.2f}x the forward + backward)")
    print(f"  bfloat16 / float32: {result['bfloat16_over_float32']:.2f}x")
    print(f"  float32 in {len(stacks)} batches, as Muon.step runs it: "
          f"{median['newton_schulz_float32_batched'] * 1e3:.1f} ms ({result['one_by_one_over_batched']:.2f}x faster "
          f"than one matrix at a time)")


if __name__ == "__main__":
    main()
