"""Honest timing of a run or a config: a training step, prefill and decode, attention against length, memory.

Every measurement warms up first, synchronises the device around each repeat, and reports the
median with its spread. The global random state is saved and restored around the whole bench,
so a later `train` or `sample` in the same process draws exactly what it would have without it.
On a CPU the work per measurement is bounded (smaller batches, shorter lengths, fewer repeats),
and every such reduction is stated in the result.

Each section is a function of one shared `bench_state.BenchState` (which also holds the timing
itself); the sampling measurements are in `bench_sample`, the rest here with the run that orders them.
"""

from __future__ import annotations

import contextlib
import os
import platform
import resource
import sys
import time
import weakref
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from minigpt_cli.bench_sample import time_sampling
from minigpt_cli.bench_state import (MEMORY_FRACTION, UNSTEADY, BenchOptions, BenchState, Doubts, Progress,
                                     growth_doubts, merge_doubts, settle, spread_doubts)
from minigpt_cli.config import UserError
from minigpt_cli.device import DTYPES, Runtime, available_memory, runtime, synchronize, use_threads
from minigpt_cli.inference import Decoder
from minigpt_cli.model import GPT, count_parameters, flops_per_token, visible_keys, written_out_attention
from minigpt_cli.targets import Target

# BenchOptions and written_out_attention are re-exported: the command and the tests import them from here.
__all__ = ["Bench", "BenchOptions", "bench", "written_out_attention"]

# Dense (no sparsity) peak tensor-core throughput in TFLOP/s from the vendors' data sheets:
# (bfloat16/float16, TF32 for float32 matmuls). Matched against torch.cuda.get_device_name,
# most specific name first.
GPU_PEAK_TFLOPS: list[tuple[str, float, float | None]] = [
    ("GB200", 2500.0, 1250.0),
    ("B200", 2250.0, 1100.0),
    ("H200", 989.0, 494.0),
    ("GH200", 989.0, 494.0),
    ("H100 PCIe", 756.0, 378.0),
    ("H100 NVL", 835.0, 418.0),
    ("H100", 989.0, 494.0),
    ("H800", 989.0, 494.0),
    ("A100", 312.0, 156.0),
    ("A800", 312.0, 156.0),
    ("L40S", 362.0, 183.0),
    ("L40", 181.0, 90.5),
    ("L4", 121.0, 60.0),
    ("A40", 150.0, 74.8),
    ("A30", 165.0, 82.0),
    ("A10G", 70.0, 35.0),
    ("A10", 125.0, 62.5),
    ("RTX 6000 Ada", 364.0, 182.0),
    ("RTX A6000", 155.0, 77.4),
    ("RTX 4090", 165.0, 82.6),
    ("RTX 3090", 71.0, 35.6),
    ("V100", 125.0, None),
    ("T4", 65.0, None),
    ("MI300X", 1307.0, 654.0),
    ("MI250X", 383.0, None),
]


# ---------------------------------------------------------------------------------------------
# FLOPs (the estimate itself is model.flops_per_token)
# ---------------------------------------------------------------------------------------------

def gpu_peak_tflops(name: str, precision: str) -> float | None:
    for key, half, tf32 in GPU_PEAK_TFLOPS:
        if key.lower() in name.lower():
            return half if precision in ("bfloat16", "float16") else tf32
    return None


# ---------------------------------------------------------------------------------------------
# Memory and machine helpers (the timing itself is bench_state.measure)
# ---------------------------------------------------------------------------------------------

class LiveTensorBytes(TorchDispatchMode):
    """Peak bytes of tensors alive at once, counted at every operator (for devices without an allocator peak).

    Each operator's outputs are added when their storage first appears and taken away when the
    last tensor seen on that storage is freed; scratch space inside a fused kernel is not seen.
    """

    def __init__(self) -> None:
        super().__init__()
        self.live: dict[int, list[int]] = {}  # storage address -> [bytes, tensors seen on it]
        self.current = 0
        self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        result = func(*args, **(kwargs or {}))
        for leaf in tree_leaves(result):
            if isinstance(leaf, torch.Tensor):
                self._track(leaf)
        return result

    def _track(self, tensor: torch.Tensor) -> None:
        storage = tensor.untyped_storage()
        key, nbytes = storage.data_ptr(), storage.nbytes()
        if not nbytes:
            return
        entry = self.live.get(key)
        if entry is None:
            self.live[key] = [nbytes, 1]
            self.current += nbytes
            self.peak = max(self.peak, self.current)
        else:
            entry[1] += 1
        weakref.finalize(tensor, self._release, key)

    def _release(self, key: int) -> None:
        entry = self.live.get(key)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] == 0:
            self.current -= entry[0]
            del self.live[key]


def peak_bytes(fn: Callable[[], Any], device: torch.device) -> tuple[int, str]:
    """Extra memory fn needs at its peak: the allocator's peak on CUDA, tensors alive elsewhere."""
    if device.type == "cuda":
        synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        result = fn()
        synchronize(device)
        del result
        return torch.cuda.max_memory_allocated(device) - base, "CUDA allocator peak"
    tracker = LiveTensorBytes()
    with tracker:
        result = fn()
        del result
    return tracker.peak, "tensors alive at once"


def _load_average() -> float | None:
    """Processes running or waiting for a CPU, averaged over the last minute (None where unknown)."""
    try:
        return os.getloadavg()[0]
    except (OSError, AttributeError):
        return None


def peak_rss_bytes() -> int:
    """The process's resident-set high-water mark (ru_maxrss is KiB on Linux, bytes on macOS)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "mps":
        return f"Apple GPU (MPS) on {platform.machine()}"
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "CPU"


@contextlib.contextmanager
def preserved_global_state(device: torch.device) -> Iterator[None]:
    """Put back the random states a bench draws from (device.runtime puts back the matmul settings)."""
    if device.type == "cuda":
        torch.cuda.init()
    cpu_rng = torch.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
    mps_rng = torch.mps.get_rng_state() if device.type == "mps" else None
    try:
        yield
    finally:
        torch.set_rng_state(cpu_rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state_all(cuda_rng)
        if mps_rng is not None:
            torch.mps.set_rng_state(mps_rng)


# ---------------------------------------------------------------------------------------------
# The bench
# ---------------------------------------------------------------------------------------------

class Bench:
    """The whole bench: the header, then each section in turn (each a function of the shared BenchState)."""

    def __init__(self, target: Target, options: BenchOptions, rt: Runtime, progress: Progress | None = None):
        self.s = BenchState(target, options, rt, progress)

    def build_model(self) -> GPT:
        s = self.s
        weights = 4 * count_parameters(s.m, s.V)
        if not s.fits(weights):
            free = available_memory(s.device) or 0
            raise UserError(f"{s.cfg.name} needs {weights / 2**30:.1f} GiB for its float32 weights, but "
                            f"{s.device.type} has {free / 2**30:.1f} GiB free; bench it on a larger device")
        s.progress(f"building the model ({weights / 2**20:,.0f} MiB of weights)")
        if s.target.loaded is not None:
            return s.target.loaded.build_model(s.device)
        with torch.device(s.device):
            return GPT(s.m, s.V)

    def run(self) -> dict[str, Any]:
        s = self.s
        began = time.perf_counter()
        if s.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(s.device)
        result: dict[str, Any] = {
            "target": s.target.describe(),
            "device": str(s.device),
            "device_name": device_name(s.device),
            "torch_version": torch.__version__,
            "threads": torch.get_num_threads(),
            "quick": s.options.quick,
            "load_average": _load_average(),
            "flops_convention": s.flops["convention"],
        }
        cores = os.cpu_count() or 1
        if s.device.type == "cpu" and result["load_average"] is not None and result["load_average"] > cores / 2:
            s.notes.append(f"the load average was {result['load_average']:.1f} on {cores} CPU cores before the "
                           f"bench began: other programs compete for the CPU, so times will be slower and less "
                           f"steady than on an idle machine")
        sections = s.options.sections
        result["model"] = {"n_params": count_parameters(s.m, s.V), "matmul_params": s.flops["matmul_params"],
                           "n_layer": s.m.n_layer, "n_head": s.m.n_head, "n_embd": s.m.n_embd,
                           "block_size": s.m.block_size, "vocab_size": s.V, "flops_per_token": s.flops}
        choices = result["thread_choice"] = {}

        def threads_for(section: str, work: float) -> None:
            # Every section chooses its threads for its own work and the CPUs free now: all of them on a
            # busy machine make each small operation wait at a barrier for a thread the OS has not run.
            chosen = use_threads(work, s.options.threads, device=s.device)
            if chosen is not None:
                choices[section] = chosen.to_dict()

        with preserved_global_state(s.device):
            # Sampling times the decoder `minigpt sample` builds from the model (inference.Decoder).
            if "attention" in sections:
                T = s.options.max_seq  # multiply-adds of the longest length's QK^T and AV
                threads_for("attention", 2 * s.m.n_head * T * T * s.m.head_dim)
                result["attention"] = attention(s)
            if "sample" in sections or "train" in sections:
                model = self.build_model()
                params = model.num_parameters()
                if "train" in sections:
                    threads_for("train", params * (s.options.batch_size or s.cfg.train.batch_size) * s.m.block_size)
                    result["train"] = time_training(s, model)
                if "sample" in sections:
                    threads_for("sample", params)  # as minigpt sample chooses: the weights a step reads
                    result["sample"] = time_sampling(s, Decoder(model, DTYPES[s.options.dtype]))
                del model
        result["threads"] = torch.get_num_threads()
        result["memory"] = memory(s)
        _closing_notes(s)
        result["notes"] = s.notes
        result["seconds"] = time.perf_counter() - began
        return result


def _closing_notes(s: BenchState) -> None:
    if s.unsteady:
        s.notes.append(f"{s.unsteady} timing(s) varied by more than {UNSTEADY:.0%} between repeats: "
                       f"another program may be using the {s.device.type}; rerun for steadier numbers")
    if s.untrusted:
        s.notes.append(f"{s.untrusted} row(s) marked ! were still implausible when measured again (reasons "
                       f"under their tables): do not quote them; rerun on a quieter {s.device.type}")


def time_training(s: BenchState, model: GPT) -> dict[str, Any]:
    from minigpt_cli.optim import build_optimizers
    from minigpt_cli.trainer import apply_gradients, training_loss

    B, T, requested = _train_shape(s)
    # float32 weights, their gradients, two optimizer moments, activations of every layer.
    n_params = model.num_parameters()
    need = 16 * n_params + B * T * (s.m.n_layer * s.m.n_embd * 4 * 24 + 3 * 4 * s.V)
    if not s.fits(need):
        reason = (f"skipped: a training step needs about {need / 2**30:.1f} GiB, more than "
                  f"{MEMORY_FRACTION:.0%} of the {(available_memory(s.device) or 0) / 2**30:.1f} GiB free")
        s.notes.append(f"training {reason}")
        return {"skipped": reason, "batch_size": B, "seq_len": T}
    if (B, T) != requested:
        s.notes.append(f"training measured at batch {B} x {T} tokens instead of the config's "
                       f"{requested[0]} x {requested[1]}, to bound the time on {s.device.type} "
                       f"(--batch-size and --seq-len choose)")
    s.progress(f"training: timing steps of batch {B} x {T} tokens")
    if s.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(s.device)
    model.train()
    optimizers = build_optimizers(model, s.cfg.train, s.device)
    scaler = torch.amp.GradScaler("cuda") if s.precision.use_grad_scaler else None
    x, y = s.tokens(B, T), s.tokens(B, T)

    def step() -> None:
        # The trainer's own step: forward and loss under autocast, backward, clip, optimizers.
        loss = training_loss(model, x, y, s.device, s.precision)
        (scaler.scale(loss) if scaler else loss).backward()
        apply_gradients(model, optimizers, scaler, s.cfg.train.grad_clip)

    flops_per_iter = B * T * _train_flops_per_token(s, T)
    timing = s.time(step, flops_per_iter)
    model.eval()
    achieved = flops_per_iter / timing.median
    out: dict[str, Any] = {
        "batch_size": B, "seq_len": T, "precision": s.precision.name,
        "optimizer": s.cfg.train.optimizer, "ms_per_iter": timing.to_dict(),
        "tokens_per_sec": B * T / timing.median, "flops_per_iter": flops_per_iter,
        "achieved_gflops": achieved / 1e9,
    }
    out.update(_utilisation(s, achieved))
    for p in model.parameters():
        p.grad = None
    return out


def _train_flops_per_token(s: BenchState, seq_len: int) -> float:
    return flops_per_token(s.m, s.V, seq_len)["train"]


def _train_shape(s: BenchState) -> tuple[int, int, tuple[int, int]]:
    """The batch and sequence length to time, and the config's: halved (batch first) until a step
    fits the time bound, unless --batch-size or --seq-len chose."""
    B = s.options.batch_size or s.cfg.train.batch_size
    T = min(s.options.seq_len or s.m.block_size, s.m.block_size)
    if s.options.seq_len is not None and s.options.seq_len > T:
        s.notes.append(f"--seq-len {s.options.seq_len} is past the model's block_size: timed at {T}")
    requested = (B, T)
    if s.options.batch_size is None and s.options.seq_len is None:
        while B * T * _train_flops_per_token(s, T) > s.budget and B > 1:
            B = max(1, B // 2)
        while B * T * _train_flops_per_token(s, T) > s.budget and T > 16:
            T //= 2
    return B, T, requested


def _utilisation(s: BenchState, achieved: float) -> dict[str, Any]:
    """MFU against the GPU's published peak, and the step's peak memory; elsewhere no peak to compare."""
    if s.device.type != "cuda":
        return {"peak_tflops": None, "mfu": None,
                "peak_source": f"no published peak for {s.device.type}: achieved GFLOP/s only"}
    name = device_name(s.device)
    peak = gpu_peak_tflops(name, s.precision.name)
    return {"peak_tflops": peak, "mfu": achieved / (peak * 1e12) if peak else None,
            "peak_source": (f"{name}, {s.precision.name}" if peak
                            else f"peak of {name} unknown: add it to bench.GPU_PEAK_TFLOPS"),
            "peak_memory_bytes": torch.cuda.max_memory_allocated(s.device)}


# The fused kernel does at least half the written-out product's FLOPs (a causal kernel may skip the
# masked half); what it saves is the written-out (T, T) scores' memory traffic. Even where that product
# is bound by memory bandwidth and the kernel by compute, the ratio stays within about 8 x (peak FLOP/s
# / bandwidth) / head_dim: 40-80x on today's GPUs, far less on CPUs. A larger speed-up is a stall.
MAX_SDPA_SPEEDUP = 100.0


def attention_lengths(max_seq: int) -> list[int]:
    """64, 128, ... doubling below max_seq, then max_seq itself."""
    lengths, T = [], 64
    while T < max_seq:
        lengths.append(T)
        T *= 2
    return lengths + [max_seq]


@torch.inference_mode()
def attention(s: BenchState) -> dict[str, Any]:
    """softmax(QK^T / sqrt(head_dim)) V written out, next to F.scaled_dot_product_attention."""
    m = s.m
    dtype = s.precision.autocast_dtype or torch.float32
    lengths = attention_lengths(s.options.max_seq)
    rows: list[dict] = []
    method = None
    for i, T in enumerate(lengths):
        s.progress(f"attention: sequence length {T} ({i + 1}/{len(lengths)})")
        scores = m.n_head * T * T * dtype.itemsize  # one (1, n_head, T, T) matrix
        if not s.fits(3 * scores):
            s.notes.append(f"attention at length {T} skipped: the written-out scores need "
                           f"{3 * scores / 2**30:.1f} GiB")
            break
        row, method = _attention_row(s, T, dtype)
        rows.append(row)

    def remeasure(i: int) -> dict:
        s.progress(f"attention: measuring length {rows[i]['seq_len']} again (its numbers were implausible)")
        with s.measuring_again():
            return _attention_row(s, rows[i]["seq_len"], dtype)[0]

    s.untrusted += settle(rows, lambda rows: attention_doubts(rows, s.device.type == "cpu"), remeasure)
    return {"batch_size": 1, "n_head": m.n_head, "head_dim": m.head_dim, "dtype": str(dtype).removeprefix("torch."),
            "causal": True, "memory_method": method, "rows": rows}


def _attention_row(s: BenchState, T: int, dtype: torch.dtype) -> tuple[dict[str, Any], str]:
    m = s.m
    q, k, v = (torch.randn(1, m.n_head, T, m.head_dim, generator=s.generator, device=s.device,
                           dtype=dtype) for _ in range(3))  # (B, n_head, T, head_dim)
    # Made once, as a model would keep it in a buffer: True on and below the diagonal.
    visible = visible_keys(T, 0, s.device)

    def plain() -> torch.Tensor:
        return written_out_attention(q, k, v, visible)

    def fused() -> torch.Tensor:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    flops = 4 * m.n_head * T * T * m.head_dim
    plain_t, fused_t = s.time(plain, flops), s.time(fused, flops)
    plain_b, method = peak_bytes(plain, s.device)
    fused_b, method = peak_bytes(fused, s.device)
    return {"seq_len": T, "flops": flops, "plain_ms": plain_t.to_dict(), "sdpa_ms": fused_t.to_dict(),
            "plain_peak_bytes": plain_b, "sdpa_peak_bytes": fused_b,
            "speedup": plain_t.median / fused_t.median}, method


def attention_doubts(rows: list[dict], cpu: bool = True) -> Doubts:
    """Why each row of the attention table cannot be trusted (see bench_state.settle)."""
    found = [growth_doubts([(f"T={r['seq_len']}", r["flops"], r[key]) for r in rows], name, cpu)
             for key, name in (("plain_ms", "the written-out product"), ("sdpa_ms", "SDPA"))]
    for i, row in enumerate(rows):
        reasons = spread_doubts(row["plain_ms"], "the written-out product") + spread_doubts(row["sdpa_ms"], "SDPA")
        if row["speedup"] > MAX_SDPA_SPEEDUP:
            reasons.append(f"SDPA's speed-up of {row['speedup']:.0f}x is beyond what the same FLOPs allow "
                           f"(at most about {MAX_SDPA_SPEEDUP:.0f}x)")
        found.append({i: reasons})
    return merge_doubts(*found)


def memory(s: BenchState) -> dict[str, Any]:
    if s.device.type == "cuda":
        return {"peak_bytes": torch.cuda.max_memory_allocated(s.device),
                "method": "CUDA allocator peak (torch.cuda.max_memory_allocated) over the bench"}
    return {"peak_bytes": peak_rss_bytes(),
            "method": "peak resident set of this process (getrusage ru_maxrss), including Python and torch"}


def bench(target: Target, options: BenchOptions | None = None, progress: Progress | None = None) -> dict[str, Any]:
    options = options or BenchOptions()
    # The device, precision and matmul settings a training run would use (threads: per section).
    with runtime(options.device, target.config.train.dtype) as rt:
        return Bench(target, options, rt, progress).run()

