"""Sampling speed of the classic Shakespeare model shape: cached vs uncached, float32 vs bfloat16,
the decode step against the weight-read floor, and the fast CPU path against the plain one, all
measured in one process.

    python benchmarks/sample_speed.py [--repeats 7] [--new-tokens 255] [--threads N] [--json]
        [--device cuda] [--compile] [--batch-sizes 1,64] [--config default]

The fast path is inference.Decoder's decode step, scripted by TorchScript on a CPU; "python step"
is the same step unscripted (what scripting buys), "plain path" the model's own modules.
With --config, the model shape of that config (a name in configs/ or a YAML path) replaces the
classic one.

Random weights (speed does not depend on them). Each configuration runs once as a warm-up, then
the configurations take turns for --repeats rounds, so a slow moment on a shared machine hits them
all alike; times are the median round, and ratios the median over rounds of each round's ratio.

Floors, for each dtype:
- weight-read floor: the time to push one vector through every weight matrix of the model once
  (one matrix-vector product per matrix, back to back, on the same matrices the model reads), the
  fastest of three ways: F.linear (MKL) on every matrix, oneDNN on every matrix packed, and the
  model's own choice per matrix. A decode step must do at least this work.
- bandwidth floor: the bytes of those matrices divided by the rate this machine streams memory
  (a sum over 256 MiB): what a perfect matrix-vector kernel would take.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from minigpt_cli.config import ModelConfig, load_config
from minigpt_cli.device import resolve_device, synchronize
from minigpt_cli.inference import Decoder, onednn_linear, pack_weight, packing_supported
from minigpt_cli.model import GPT
from minigpt_cli.sampler import SamplingSettings, generate

CLASSIC = ModelConfig(n_layer=6, n_head=6, n_embd=384, block_size=256, dropout=0.0, pos_encoding="learned",
                      norm="layernorm", activation="gelu", qk_norm=False, tie_weights=True, bias=False,
                      zero_init_proj=False)
VOCAB = 65


def matrix_passes(decoder: Decoder) -> dict[str, list]:
    """Ways to push one vector through every weight matrix: F.linear (MKL) on every matrix, oneDNN
    on every matrix packed, and the decoder's own choice per matrix (what a decode step does)."""
    modules = decoder.matrices
    linear = [(lambda x, w=m.weight: F.linear(x, w), m.in_features) for m in modules]
    passes = {"linear": linear}
    if modules[0].weight.device.type == "cpu" and packing_supported(modules[0].weight.dtype):
        linear_packed = onednn_linear()
        passes["packed"] = [(lambda x, w=pack_weight(m.weight): linear_packed(x, w, None, "none", [], ""),
                             m.in_features)
                            for m in modules]
        passes["model"] = [(lambda x, m=m: m.project(x), m.in_features) for m in modules]
    return passes


@torch.inference_mode()
def floor_seconds(decoder: Decoder, matrices: list) -> float:
    weight = decoder.matrices[-1].weight
    inputs = {n: torch.randn(1, n, dtype=weight.dtype, device=weight.device) for _, n in matrices}
    synchronize(weight.device)
    start = time.perf_counter()
    for product, n in matrices:
        product(inputs[n])
    synchronize(weight.device)
    return time.perf_counter() - start


def stream_bytes_per_second(device: torch.device) -> float:
    """How fast this device reads memory: the median of 5 sums over 256 MiB, after a warm-up."""
    x = torch.ones(64 * 2**20, device=device)
    x.sum()
    times = []
    for _ in range(5):
        synchronize(device)
        start = time.perf_counter()
        x.sum()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return x.nbytes / statistics.median(times)


def greedy_tokens(model: GPT | Decoder, new_tokens: int, use_cache: bool) -> list[int]:
    steps = generate(model, [0], new_tokens, SamplingSettings(temperature=0.0), None, 1, use_cache)
    return [step.tokens.item() for step in steps]


def generation_seconds(model: GPT | Decoder, new_tokens: int, use_cache: bool, batch: int = 1) -> float:
    """Greedy decoding of `batch` samples together, each `new_tokens` long."""
    device = model.device
    settings = SamplingSettings(temperature=0.0)
    synchronize(device)
    start = time.perf_counter()
    for _ in generate(model, [0], new_tokens, settings, None, batch, use_cache):
        pass
    synchronize(device)
    return time.perf_counter() - start


def take_turns(cases: dict, repeats: int) -> dict[str, list[float]]:
    """Each case's seconds in each of `repeats` rounds, the cases taking turns within a round, after
    one warm-up call each: a slow moment on a shared machine hits them all alike."""
    times: dict[str, list[float]] = {k: [] for k in cases}
    for fn in cases.values():
        fn()  # warm-up
    for _ in range(repeats):
        for name, fn in cases.items():
            times[name].append(fn())
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--new-tokens", type=int, default=255)
    parser.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: PyTorch's default)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or mps (default: cpu)")
    parser.add_argument("--compile", action="store_true",
                        help="also time the decode step compiled with torch.compile (CUDA graphs on a GPU)")
    parser.add_argument("--batch-sizes", default="1",
                        help="comma-separated batch sizes for the cached rates, e.g. 1,64 (default: 1)")
    parser.add_argument("--config", default=None, help="time this config's model shape instead of the classic one")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    shape = CLASSIC if args.config is None else dataclasses.replace(load_config(args.config).model, dropout=0.0)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device).device
    batches = [int(b) for b in args.batch_sizes.split(",")]
    n = args.new_tokens
    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16}
    models, python, plain, compiled = {}, {}, {}, {}
    for name, dtype in dtypes.items():
        torch.manual_seed(0)
        trained = GPT(shape, VOCAB).to(device)  # random weights: speed does not depend on them
        models[name] = Decoder(trained, dtype)
        python[name] = Decoder(trained, dtype, script=False)
        plain[name] = Decoder(trained, dtype, fast=False)
        if args.compile:
            compiled[name] = Decoder(trained, dtype, compile=True)
    packed = {name: device.type == "cpu" and packing_supported(dtype) for name, dtype in dtypes.items()}
    cases = {
        "cached_float32": lambda: generation_seconds(models["float32"], n, True),
        "uncached_float32": lambda: generation_seconds(models["float32"], n, False),
        "cached_bfloat16": lambda: generation_seconds(models["bfloat16"], n, True),
        "python_cached_float32": lambda: generation_seconds(python["float32"], n, True),
        "python_cached_bfloat16": lambda: generation_seconds(python["bfloat16"], n, True),
        "plain_cached_float32": lambda: generation_seconds(plain["float32"], n, True),
        "plain_cached_bfloat16": lambda: generation_seconds(plain["bfloat16"], n, True),
    }
    batch_of: dict[str, int] = {}  # the cases that generate more than one sample at once
    for name in dtypes:
        for B in batches:
            suffix = "" if B == 1 else f"_batch{B}"
            if B != 1:
                cases[f"cached_{name}{suffix}"] = lambda m=models[name], B=B: generation_seconds(m, n, True, B)
                batch_of[f"cached_{name}{suffix}"] = B
            if args.compile:
                cases[f"compiled_cached_{name}{suffix}"] = (
                    lambda m=compiled[name], B=B: generation_seconds(m, n, True, B))
                batch_of[f"compiled_cached_{name}{suffix}"] = B
        for kind, matrices in matrix_passes(models[name]).items():
            # Summed over 20 back-to-back passes per round to get above timer noise.
            cases[f"floor_{kind}_{name}"] = (
                lambda m=models[name], mats=matrices: sum(floor_seconds(m, mats) for _ in range(20)) / 20)
    # The speed figures are only worth having if the fast path computes the same thing.
    reference = greedy_tokens(plain["float32"], n, False)
    same_text = {"cached_float32": greedy_tokens(models["float32"], n, True) == reference,
                 "uncached_float32": greedy_tokens(models["float32"], n, False) == reference,
                 "plain_cached_float32": greedy_tokens(plain["float32"], n, True) == reference}
    if args.compile:
        same_text["compiled_cached_float32"] = greedy_tokens(compiled["float32"], n, True) == reference
    times = take_turns(cases, args.repeats)
    med = {k: statistics.median(v) for k, v in times.items()}
    bandwidth = stream_bytes_per_second(device)
    step = {name: med[f"cached_{name}"] / n for name in dtypes}
    plain_step = {name: med[f"plain_cached_{name}"] / n for name in dtypes}
    python_step = {name: med[f"python_cached_{name}"] / n for name in dtypes}
    floor = {name: min(v for k, v in med.items() if k.startswith("floor") and k.endswith(name)) for name in dtypes}
    # Ratios are taken within each round (its step against its own fastest floor pass), then the
    # median over rounds: a slow minute on a shared machine moves both sides of a ratio together.
    floor_kinds = {name: [k for k in cases if k.startswith("floor") and k.endswith(name)] for name in dtypes}

    def per_round(numerator, denominator) -> float:
        return statistics.median(numerator(r) / denominator(r) for r in range(args.repeats))

    step_over_floor = {name: per_round(lambda r, name=name: times[f"cached_{name}"][r] / n,
                                       lambda r, name=name: min(times[k][r] for k in floor_kinds[name]))
                       for name in dtypes}
    weight_bytes = {name: sum(m.weight.nbytes for m in models[name].matrices) for name in dtypes}
    result = {
        "model": f"{shape.n_layer} layers, {shape.n_head} heads, {shape.n_embd} wide, block {shape.block_size}, "
                 f"vocab {VOCAB}, batch 1",
        "scripted": {name: models[name].scripted is not None for name in dtypes},
        "params": trained.num_parameters(),
        "threads": torch.get_num_threads(),
        "new_tokens": n,
        "repeats": args.repeats,
        "packed_matrices": packed,
        "greedy_text_equals_plain_uncached": same_text,
        "device": str(device),
        "tokens_per_second": {k: n * batch_of.get(k, 1) / med[k] for k in cases if not k.startswith("floor")},
        "cached_over_uncached": per_round(lambda r: times["uncached_float32"][r], lambda r: times["cached_float32"][r]),
        "bfloat16_over_float32": per_round(lambda r: times["cached_float32"][r], lambda r: times["cached_bfloat16"][r]),
        "decode_step_ms": {name: step[name] * 1e3 for name in dtypes},
        "plain_decode_step_ms": {name: plain_step[name] * 1e3 for name in dtypes},
        "python_decode_step_ms": {name: python_step[name] * 1e3 for name in dtypes},
        # What TorchScript buys: the unscripted step's time over the scripted one's, per round.
        "python_over_scripted": {name: per_round(lambda r, name=name: times[f"python_cached_{name}"][r],
                                                 lambda r, name=name: times[f"cached_{name}"][r]) for name in dtypes},
        "floor_ms": {name: floor[name] * 1e3 for name in dtypes},
        "floor_kernel_ms": {k[len("floor_"):]: med[k] * 1e3 for k in med if k.startswith("floor")},
        "step_over_floor": step_over_floor,
        "stream_gb_per_s": bandwidth / 1e9,
        "weight_mb": {name: weight_bytes[name] / 1e6 for name in dtypes},
        "bandwidth_floor_ms": {name: weight_bytes[name] / bandwidth * 1e3 for name in dtypes},
        "spread_seconds": {k: [round(min(v), 5), round(max(v), 5)] for k, v in times.items()},
    }
    if args.json:
        print(json.dumps(result))
        return
    tps, kernel = result["tokens_per_second"], result["floor_kernel_ms"]
    print(f"{result['model']}, {result['params'] / 1e6:.2f}M parameters, {result['threads']} threads, "
          f"{n} new tokens, median of {args.repeats}")
    for name in dtypes:
        kernels = "  ".join(f"{k.split('_')[0]} {v:.3f}" for k, v in kernel.items() if k.endswith(name))
        print(f"  cached   {name:8}: {tps[f'cached_{name}']:7.1f} tok/s  step {step[name] * 1e3:.3f} ms  "
              f"floor {floor[name] * 1e3:.3f} ms ({kernels})  ratio {result['step_over_floor'][name]:.2f}")
        print(f"           {'':8}  python step {tps[f'python_cached_{name}']:7.1f} tok/s  "
              f"step {python_step[name] * 1e3:.3f} ms  ({result['python_over_scripted'][name]:.2f}x the scripted step)")
        print(f"           {'':8}  plain path {tps[f'plain_cached_{name}']:7.1f} tok/s  "
              f"step {plain_step[name] * 1e3:.3f} ms"
              f"  ({plain_step[name] / step[name]:.2f}x slower)")
    print(f"  uncached float32 : {tps['uncached_float32']:7.1f} tok/s  "
          f"(cached is {result['cached_over_uncached']:.2f}x faster)")
    print("  greedy text equal to the plain path without the cache: "
          + ", ".join(f"{k} {'yes' if v else 'NO'}" for k, v in same_text.items()))
    print(f"  bfloat16 over float32 (cached): {result['bfloat16_over_float32']:.2f}x")
    for k, v in tps.items():
        if k in batch_of:
            print(f"  {k:32}: {v:9.1f} tok/s")
    print(f"  bandwidth floor at {result['stream_gb_per_s']:.1f} GB/s: " + ", ".join(
        f"{name} {weight_bytes[name] / 1e6:.1f} MB in {result['bandwidth_floor_ms'][name]:.3f} ms" for name in dtypes))


if __name__ == "__main__":
    sys.exit(main())
