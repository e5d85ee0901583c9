"""Sampling speed of the classic Shakespeare model shape: cached vs uncached, float32 vs bfloat16,
and a decode step against the weight-read floor, all measured in one process.

    python benchmarks/sample_speed.py [--repeats 7] [--new-tokens 255] [--threads N] [--json]

Random weights (speed does not depend on them). Each configuration runs once as a warm-up, then
the configurations take turns for --repeats rounds, so a slow moment on a shared machine hits them
all alike; the figure reported is the median round.

The weight-read floor is the time to push one vector through every weight matrix of the model
once (one matrix-vector product per matrix, back to back, on the same tensors the model reads):
no decode step can be faster, since it must read all of them.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from minigpt_cli.config import ModelConfig
from minigpt_cli.model import GPT, Linear, prepare_for_inference
from minigpt_cli.sampler import SamplingSettings, generate

CLASSIC = ModelConfig(n_layer=6, n_head=6, n_embd=384, block_size=256, dropout=0.0, pos_encoding="learned",
                      norm="layernorm", activation="gelu", qk_norm=False, tie_weights=True, bias=False,
                      zero_init_proj=False)
VOCAB = 65


def weight_matrices(model: GPT) -> list[torch.Tensor]:
    return [m.weight for m in model.modules() if isinstance(m, Linear)]


@torch.inference_mode()
def floor_seconds(model: GPT) -> float:
    weights = weight_matrices(model)
    inputs = {w.shape[1]: torch.randn(1, w.shape[1], dtype=w.dtype) for w in weights}
    start = time.perf_counter()
    for w in weights:
        F.linear(inputs[w.shape[1]], w)
    return time.perf_counter() - start


def generation_seconds(model: GPT, new_tokens: int, use_cache: bool) -> float:
    settings = SamplingSettings(temperature=0.0)
    start = time.perf_counter()
    for _ in generate(model, [0], new_tokens, settings, None, 1, use_cache):
        pass
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--new-tokens", type=int, default=255)
    parser.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: PyTorch's default)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    models = {name: prepare_for_inference(GPT(CLASSIC, VOCAB), dtype)
              for name, dtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16))}
    n = args.new_tokens
    cases = {
        "cached_float32": lambda: generation_seconds(models["float32"], n, True),
        "uncached_float32": lambda: generation_seconds(models["float32"], n, False),
        "cached_bfloat16": lambda: generation_seconds(models["bfloat16"], n, True),
        # The floor is summed over 20 back-to-back passes per round to get above timer noise.
        "floor_float32": lambda: sum(floor_seconds(models["float32"]) for _ in range(20)) / 20,
        "floor_bfloat16": lambda: sum(floor_seconds(models["bfloat16"]) for _ in range(20)) / 20,
    }
    times: dict[str, list[float]] = {k: [] for k in cases}
    for fn in cases.values():
        fn()  # warm-up
    for _ in range(args.repeats):
        for name, fn in cases.items():
            times[name].append(fn())
    med = {k: statistics.median(v) for k, v in times.items()}
    spread = {k: (min(v), max(v)) for k, v in times.items()}
    step32 = med["cached_float32"] / n
    step16 = med["cached_bfloat16"] / n
    result = {
        "model": "6 layers, 6 heads, 384 wide, block 256, vocab 65, batch 1",
        "params": models["float32"].num_parameters(),
        "threads": torch.get_num_threads(),
        "new_tokens": n,
        "repeats": args.repeats,
        "tokens_per_second": {
            "cached_float32": n / med["cached_float32"],
            "uncached_float32": n / med["uncached_float32"],
            "cached_bfloat16": n / med["cached_bfloat16"],
        },
        "cached_over_uncached": med["uncached_float32"] / med["cached_float32"],
        "bfloat16_over_float32": med["cached_float32"] / med["cached_bfloat16"],
        "decode_step_ms": {"float32": step32 * 1e3, "bfloat16": step16 * 1e3},
        "floor_ms": {"float32": med["floor_float32"] * 1e3, "bfloat16": med["floor_bfloat16"] * 1e3},
        "step_over_floor": {"float32": step32 / med["floor_float32"], "bfloat16": step16 / med["floor_bfloat16"]},
        "spread_seconds": {k: [round(a, 5), round(b, 5)] for k, (a, b) in spread.items()},
    }
    if args.json:
        print(json.dumps(result))
        return
    tps = result["tokens_per_second"]
    print(f"{result['model']}, {result['params'] / 1e6:.2f}M parameters, {result['threads']} threads, "
          f"{n} new tokens, median of {args.repeats}")
    print(f"  cached   float32 : {tps['cached_float32']:8.1f} tok/s  step {step32 * 1e3:.3f} ms  "
          f"floor {med['floor_float32'] * 1e3:.3f} ms  ratio {result['step_over_floor']['float32']:.2f}")
    print(f"  uncached float32 : {tps['uncached_float32']:8.1f} tok/s  "
          f"(cached is {result['cached_over_uncached']:.2f}x faster)")
    print(f"  cached   bfloat16: {tps['cached_bfloat16']:8.1f} tok/s  step {step16 * 1e3:.3f} ms  "
          f"floor {med['floor_bfloat16'] * 1e3:.3f} ms  ratio {result['step_over_floor']['bfloat16']:.2f}  "
          f"({result['bfloat16_over_float32']:.2f}x float32)")


if __name__ == "__main__":
    sys.exit(main())
