"""Honest timing of a run or a config: a training step, prefill and decode, attention against length, memory.

Every measurement warms up first, synchronises the device around each repeat, and reports the
median with its spread. The global random state is saved and restored around the whole bench,
so a later `train` or `sample` in the same process draws exactly what it would have without it.
On a CPU the work per measurement is bounded (smaller batches, shorter lengths, fewer repeats),
and every such reduction is stated in the result.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import platform
import resource
import statistics
import sys
import time
import weakref
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from minigpt_cli.config import UserError
from minigpt_cli.device import (DTYPES, Runtime, available_memory, check_inference_dtype, runtime, synchronize,
                                use_threads)
from minigpt_cli.inference import Decoder
from minigpt_cli.kv_cache import KVCache
from minigpt_cli.model import (GPT, count_parameters, flops_per_token, input_slots, kv_bytes_per_token,
                               visible_keys, written_out_attention)
from minigpt_cli.targets import Target

Progress = Callable[[str], None]

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

# Work per timed call on a CPU (or Apple GPU), in FLOPs: big enough to time, small enough that
# `minigpt bench gpt2_small` finishes in well under a minute on two cores.
CPU_FLOP_BUDGET = 5e10
QUICK_FLOP_BUDGET = 1e10
# Median absolute deviation, relative to the median, above which a timing is called unsteady.
UNSTEADY = 0.2
# Memory a single measurement may take, as a fraction of what the device has free.
MEMORY_FRACTION = 0.5


# ---------------------------------------------------------------------------------------------
# FLOPs (the estimate itself is model.flops_per_token)
# ---------------------------------------------------------------------------------------------

def gpu_peak_tflops(name: str, precision: str) -> float | None:
    for key, half, tf32 in GPU_PEAK_TFLOPS:
        if key.lower() in name.lower():
            return half if precision in ("bfloat16", "float16") else tf32
    return None


# ---------------------------------------------------------------------------------------------
# Timing and memory helpers
# ---------------------------------------------------------------------------------------------

@dataclass
class Timing:
    median: float  # seconds
    mad: float  # median absolute deviation, seconds
    min: float
    max: float
    repeats: int

    def to_dict(self) -> dict[str, Any]:
        return {"median_ms": self.median * 1e3, "mad_ms": self.mad * 1e3, "min_ms": self.min * 1e3,
                "max_ms": self.max * 1e3, "repeats": self.repeats}


def measure(fn: Callable[[], Any], device: torch.device, warmup: int, repeats: int,
            max_seconds: float = math.inf) -> Timing:
    """Run fn warmup times untimed, then up to repeats times (at least 3 once max_seconds has passed)."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    times: list[float] = []
    began = time.perf_counter()
    for _ in range(max(1, repeats)):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
        if len(times) >= 3 and time.perf_counter() - began > max_seconds:
            break
    median = statistics.median(times)
    mad = statistics.median(abs(t - median) for t in times)
    return Timing(median, mad, min(times), max(times), len(times))


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

@dataclass
class BenchOptions:
    device: str = "auto"
    quick: bool = False
    # None: 10 timed repeats (3 with quick), fewer for calls over max_seconds.
    repeats: int | None = None
    warmup: int | None = None
    # Longest sequence of the attention sweep (64, 128, ... doubling up to it).
    max_seq: int = 1024
    # None: the config's (bounded on CPU by CPU_FLOP_BUDGET).
    batch_size: int | None = None
    seq_len: int | None = None
    batch_sizes: Sequence[int] | None = None
    sections: Sequence[str] = ("train", "sample", "attention")
    # Sampling precision, as `minigpt sample --dtype` runs it (see inference.Decoder).
    dtype: str = "float32"
    # Stop repeating one measurement after this many seconds (once it has 3 repeats).
    max_seconds: float | None = None
    # CPU threads per operation; 0: each section chooses as the command it times does (use_threads).
    threads: int = 0

    def __post_init__(self) -> None:
        for name in ("repeats", "batch_size", "seq_len"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise UserError(f"--{name.replace('_', '-')} must be at least 1, got {value}")
        if self.warmup is not None and self.warmup < 0:
            raise UserError(f"--warmup must be zero or positive, got {self.warmup}")
        if self.max_seq < 64:
            raise UserError(f"--max-seq must be at least 64, got {self.max_seq}")
        if not self.sections:
            raise UserError("--only needs at least one of train, sample, attention")
        unknown = set(self.sections) - {"train", "sample", "attention"}
        if unknown:
            raise UserError(f"unknown bench section(s) {', '.join(sorted(unknown))} (use train, sample, attention)")
        if not 0 <= self.threads <= 1024:
            raise UserError(f"--threads must be between 1 and 1024 (or 0 to choose), got {self.threads}")
        if self.batch_sizes is not None and any(b < 1 for b in self.batch_sizes):
            raise UserError(f"--batch-sizes must all be at least 1, got {list(self.batch_sizes)}")


class Bench:
    def __init__(self, target: Target, options: BenchOptions, rt: Runtime, progress: Progress | None = None):
        self.target = target
        self.options = options
        self.progress = progress or (lambda message: None)
        self.device = rt.device
        self.cfg = target.config
        self.m = target.config.model
        self.V = target.vocab_size
        self.precision = rt.precision
        check_inference_dtype(options.dtype, self.device)
        o = options
        bounded = self.device.type != "cuda"
        self.budget = (QUICK_FLOP_BUDGET if o.quick else CPU_FLOP_BUDGET) if bounded else math.inf
        self.repeats = o.repeats or (3 if o.quick else 10)
        self.warmup = o.warmup if o.warmup is not None else (1 if o.quick else 2)
        self.max_seconds = o.max_seconds if o.max_seconds is not None else (0.5 if o.quick else 2.0)
        self.flops = flops_per_token(self.m, self.V)
        self.notes: list[str] = []
        self.unsteady = 0
        self.generator = torch.Generator(device=self.device)
        self.generator.manual_seed(0)

    # -- helpers --------------------------------------------------------------------------------
    def _time(self, fn: Callable[[], Any], flops: float = 0.0) -> Timing:
        """Fewer repeats for calls that are expensive under the FLOP budget."""
        warmup, repeats = self.warmup, self.repeats
        if flops > self.budget / 4:
            warmup, repeats = min(warmup, 1), min(repeats, 3)
        timing = measure(fn, self.device, warmup, repeats, self.max_seconds)
        if timing.repeats > 2 and timing.mad > UNSTEADY * timing.median:
            self.unsteady += 1
        return timing

    def _tokens(self, *shape: int) -> torch.Tensor:
        return torch.randint(0, self.V, shape, generator=self.generator, device=self.device)

    def _fits(self, nbytes: float) -> bool:
        free = available_memory(self.device)
        return free is None or nbytes <= MEMORY_FRACTION * free

    def _forward_flops(self, tokens: int, context: int) -> float:
        """FLOPs of a forward pass over `tokens` new positions whose keys span `context` positions."""
        return tokens * (2 * self.flops["matmul_params"] + 4 * self.m.n_layer * self.m.n_embd * context)

    def build_model(self) -> GPT:
        weights = 4 * count_parameters(self.m, self.V)
        if not self._fits(weights):
            free = available_memory(self.device) or 0
            raise UserError(f"{self.cfg.name} needs {weights / 2**30:.1f} GiB for its float32 weights, but "
                            f"{self.device.type} has {free / 2**30:.1f} GiB free; bench it on a larger device")
        self.progress(f"building the model ({weights / 2**20:,.0f} MiB of weights)")
        if self.target.loaded is not None:
            return self.target.loaded.build_model(self.device)
        with torch.device(self.device):
            return GPT(self.m, self.V)

    # -- the sections -----------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        began = time.perf_counter()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        result: dict[str, Any] = {
            "target": self.target.describe(),
            "device": str(self.device),
            "device_name": device_name(self.device),
            "torch_version": torch.__version__,
            "threads": torch.get_num_threads(),
            "quick": self.options.quick,
            "load_average": _load_average(),
        }
        cores = os.cpu_count() or 1
        if self.device.type == "cpu" and result["load_average"] is not None and result["load_average"] > cores / 2:
            self.notes.append(f"the load average was {result['load_average']:.1f} on {cores} CPU cores before the "
                              f"bench began: other programs compete for the CPU, so times will be slower and less "
                              f"steady than on an idle machine")
        sections = self.options.sections
        result["model"] = {"n_params": count_parameters(self.m, self.V), "matmul_params": self.flops["matmul_params"],
                           "n_layer": self.m.n_layer, "n_head": self.m.n_head, "n_embd": self.m.n_embd,
                           "block_size": self.m.block_size, "vocab_size": self.V, "flops_per_token": self.flops}
        with preserved_global_state(self.device):
            # Sampling times the decoder `minigpt sample` builds from the model (inference.Decoder).
            if "attention" in sections:
                result["attention"] = self.attention()
            if "sample" in sections or "train" in sections:
                model = self.build_model()
                params = model.num_parameters()
                choices = result["thread_choice"] = {}
                if "train" in sections:
                    B = self.options.batch_size or self.cfg.train.batch_size
                    chosen = use_threads(params * B * self.m.block_size, self.options.threads, device=self.device)
                    if chosen is not None:
                        choices["train"] = chosen.to_dict()
                    result["train"] = self.train(model)
                if "sample" in sections:
                    # As minigpt sample chooses for one sample: the weights a decode step reads.
                    chosen = use_threads(params, self.options.threads, device=self.device)
                    if chosen is not None:
                        choices["sample"] = chosen.to_dict()
                    result["sample"] = self.sample(Decoder(model, DTYPES[self.options.dtype]))
                result["threads"] = torch.get_num_threads()
                del model
        result["memory"] = self.memory()
        if self.unsteady:
            self.notes.append(f"{self.unsteady} timing(s) varied by more than {UNSTEADY:.0%} between repeats: "
                              f"another program may be using the {self.device.type}; rerun for steadier numbers")
        result["notes"] = self.notes
        result["seconds"] = time.perf_counter() - began
        return result

    def train(self, model: GPT) -> dict[str, Any]:
        from minigpt_cli.optim import build_optimizers
        from minigpt_cli.trainer import apply_gradients, training_loss

        B, T, requested = self._train_shape()
        # float32 weights, their gradients, two optimizer moments, activations of every layer.
        n_params = model.num_parameters()
        need = 16 * n_params + B * T * (self.m.n_layer * self.m.n_embd * 4 * 24 + 3 * 4 * self.V)
        if not self._fits(need):
            reason = (f"skipped: a training step needs about {need / 2**30:.1f} GiB, more than "
                      f"{MEMORY_FRACTION:.0%} of the {(available_memory(self.device) or 0) / 2**30:.1f} GiB free")
            self.notes.append(f"training {reason}")
            return {"skipped": reason, "batch_size": B, "seq_len": T}
        if (B, T) != requested:
            self.notes.append(f"training measured at batch {B} x {T} tokens instead of the config's "
                              f"{requested[0]} x {requested[1]}, to bound the time on {self.device.type} "
                              f"(--batch-size and --seq-len choose)")
        self.progress(f"training: timing steps of batch {B} x {T} tokens")
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        model.train()
        optimizers = build_optimizers(model, self.cfg.train, self.device)
        scaler = torch.amp.GradScaler("cuda") if self.precision.use_grad_scaler else None
        x, y = self._tokens(B, T), self._tokens(B, T)

        def step() -> None:
            # The trainer's own step: forward and loss under autocast, backward, clip, optimizers.
            loss = training_loss(model, x, y, self.device, self.precision)
            (scaler.scale(loss) if scaler else loss).backward()
            apply_gradients(model, optimizers, scaler, self.cfg.train.grad_clip)

        flops_per_iter = B * T * self._train_flops_per_token(T)
        timing = self._time(step, flops_per_iter)
        model.eval()
        achieved = flops_per_iter / timing.median
        out: dict[str, Any] = {
            "batch_size": B, "seq_len": T, "precision": self.precision.name,
            "optimizer": self.cfg.train.optimizer, "ms_per_iter": timing.to_dict(),
            "tokens_per_sec": B * T / timing.median, "flops_per_iter": flops_per_iter,
            "achieved_gflops": achieved / 1e9,
        }
        out.update(self._utilisation(achieved))
        for p in model.parameters():
            p.grad = None
        return out

    def _train_flops_per_token(self, seq_len: int) -> float:
        return flops_per_token(self.m, self.V, seq_len)["train"]

    def _train_shape(self) -> tuple[int, int, tuple[int, int]]:
        """The batch and sequence length to time, and the config's: halved (batch first) until a step
        fits the time bound, unless --batch-size or --seq-len chose."""
        B = self.options.batch_size or self.cfg.train.batch_size
        T = min(self.options.seq_len or self.m.block_size, self.m.block_size)
        if self.options.seq_len is not None and self.options.seq_len > T:
            self.notes.append(f"--seq-len {self.options.seq_len} is past the model's block_size: timed at {T}")
        requested = (B, T)
        if self.options.batch_size is None and self.options.seq_len is None:
            while B * T * self._train_flops_per_token(T) > self.budget and B > 1:
                B = max(1, B // 2)
            while B * T * self._train_flops_per_token(T) > self.budget and T > 16:
                T //= 2
        return B, T, requested

    def _utilisation(self, achieved: float) -> dict[str, Any]:
        """MFU against the GPU's published peak, and the step's peak memory; elsewhere no peak to compare."""
        if self.device.type != "cuda":
            return {"peak_tflops": None, "mfu": None,
                    "peak_source": f"no published peak for {self.device.type}: achieved GFLOP/s only"}
        name = device_name(self.device)
        peak = gpu_peak_tflops(name, self.precision.name)
        return {"peak_tflops": peak, "mfu": achieved / (peak * 1e12) if peak else None,
                "peak_source": (f"{name}, {self.precision.name}" if peak
                                else f"peak of {name} unknown: add it to bench.GPU_PEAK_TFLOPS"),
                "peak_memory_bytes": torch.cuda.max_memory_allocated(self.device)}

    def _cache(self, batch: int, positions: int, m: Any = None) -> KVCache:
        """An empty KV cache of `positions` positions for `batch` sequences of the model (or of shape m)."""
        m = m or self.m
        return KVCache(m.n_layer, batch, m.n_head, positions, m.head_dim, device=self.device,
                       input_slots=input_slots(m))

    @torch.inference_mode()
    def sample(self, model: Decoder) -> dict[str, Any]:
        bs = self.m.block_size
        cache = self._cache(1, bs)
        out = self._time_to_first_token(model, cache)
        floor = self.weight_floor(model)
        out["weight_floor"] = floor
        contexts = decode_contexts(bs, self.options.max_seq)
        out["decode"] = self._decode_rows(model, cache, contexts, floor)
        out["floor_pct"] = out["decode"][0]["floor_pct"]
        out["cost"] = ("with the KV cache a step computes one new position: its weights cost the same at every "
                       "context and its attention grows linearly with the context L (one query, L keys); without "
                       "it a step recomputes all L positions: the weights' cost grows linearly with L and "
                       "attention's quadratically (L queries x L keys)")
        if contexts[-1] >= bs:
            out["past_block_size"] = (f"contexts past block_size {bs} are timed on a model of the same shape "
                                      f"with room for {contexts[-1] + 1} positions and fresh weights (a step's "
                                      f"cost does not depend on their values); sampling past block_size itself "
                                      f"slides a window of at most {bs} characters")
        out["batch"] = self._batched_decode(model)
        return out

    def _time_to_first_token(self, model: Decoder, cache: KVCache) -> dict[str, Any]:
        """Prefill half a window (fewer tokens if that is over the budget), then choose one token."""
        P = max(1, self.m.block_size // 2)
        while P > 8 and self._forward_flops(P, P) > self.budget:
            P //= 2
        self.progress(f"sampling: prefill of {P} tokens")
        prompt = self._tokens(1, P)

        def prefill() -> None:
            cache.reset()
            model(prompt, cache)[:, -1].argmax(-1).item()

        ttft = self._time(prefill, self._forward_flops(P, P))
        return {"dtype": self.options.dtype, "prompt_len": P, "time_to_first_token_ms": ttft.to_dict(),
                "prefill_tokens_per_sec": P / ttft.median}

    def _decode_rows(self, model: Decoder, cache: KVCache, contexts: list[int], floor: dict) -> list[dict]:
        """One decode step at each context, with the cache and without; contexts past block_size on a
        model of the same shape with room for them."""
        bs = self.m.block_size
        long_model = long_cache = None
        rows = []
        for L in contexts:
            self.progress(f"sampling: one decode step after {L} tokens, with and without the KV cache")
            step_model, step_cache = model, cache
            if L >= bs:
                if long_model is None:
                    long_model, long_cache = self._long_model(contexts[-1] + 1)
                step_model, step_cache = long_model, long_cache
            rows.append(self._decode_row(step_model, step_cache, L, floor))
        return rows

    def _decode_row(self, model: Decoder, cache: KVCache, L: int, floor: dict) -> dict[str, Any]:
        token = self._tokens(1, 1)

        def cached_step() -> None:
            cache.reset()
            cache.advance(L)  # L positions cached (their values do not change the cost)
            model(token, cache)[:, -1].argmax(-1)

        row: dict[str, Any] = {"context": L, "past_block_size": L >= self.m.block_size,
                               "cached_flops": self._forward_flops(1, L + 1),
                               "uncached_flops": self._forward_flops(L + 1, L + 1)}
        timing = self._time(cached_step, self._forward_flops(1, L + 1))
        row["cached_ms"] = timing.to_dict()
        row["cached_tokens_per_sec"] = 1 / timing.median
        row["floor_pct"] = 100 * floor["ms"] / (timing.median * 1e3)
        if self._forward_flops(L + 1, L + 1) <= self.budget:
            window = self._tokens(1, L + 1)
            timing_full = self._time(lambda: model(window)[:, -1].argmax(-1), self._forward_flops(L + 1, L + 1))
            row["uncached_ms"] = timing_full.to_dict()
            row["uncached_tokens_per_sec"] = 1 / timing_full.median
            row["cache_speedup"] = timing_full.median / timing.median
        else:
            row["uncached_ms"] = row["uncached_tokens_per_sec"] = row["cache_speedup"] = None
            self.notes.append(f"decode without the KV cache at context {L} skipped: one step is "
                              f"{self._forward_flops(L + 1, L + 1) / 1e9:.0f} GFLOP, over the "
                              f"{self.device.type} time bound")
        return row

    def _batched_decode(self, model: Decoder) -> list[dict]:
        """Throughput of one decode step at half a window of context, for each batch size that fits."""
        L = max(1, self.m.block_size // 2)
        sizes = self.options.batch_sizes or ((1, 4) if self.options.quick else (1, 4, 16, 64))
        batch = []
        for B in sizes:
            need = kv_bytes_per_token(self.m) * B * (L + 1)
            if not self._fits(need):
                self.notes.append(f"decode at batch {B} skipped: its KV cache needs {need / 2**30:.1f} GiB")
                continue
            if self._forward_flops(B, L + 1) > self.budget:
                self.notes.append(f"decode at batch {B} skipped: one step is {self._forward_flops(B, L + 1) / 1e9:.0f} "
                                  f"GFLOP, over the {self.device.type} time bound")
                continue
            self.progress(f"sampling: one decode step for a batch of {B} after {L} tokens")
            batch_cache = self._cache(B, L + 1)
            tokens = self._tokens(B, 1)

            def batch_step() -> None:
                batch_cache.reset()
                batch_cache.advance(L)
                model(tokens, batch_cache)[:, -1].argmax(-1)

            timing = self._time(batch_step, self._forward_flops(B, L + 1))
            batch.append({"batch_size": B, "context": L, "step_ms": timing.to_dict(),
                          "tokens_per_sec": B / timing.median})
        return batch

    def _long_model(self, positions: int) -> tuple[Decoder, KVCache]:
        """The model's shape with room for `positions` positions, readied as `minigpt sample` readies it."""
        m = dataclasses.replace(self.m, block_size=positions)
        with torch.device(self.device):
            long_model = GPT(m, self.V)
        return Decoder(long_model, DTYPES[self.options.dtype]), self._cache(1, positions, m)

    def weight_floor(self, model: Decoder) -> dict[str, Any]:
        """One batch-1 matrix-vector product per weight matrix a decode step reads, back to back.

        A decode step must read every weight once, so this is the least one step can take on this
        device; its ratio to the real step shows how much time goes elsewhere (attention, norms,
        kernel launches, Python). Timed with F.linear on every matrix and, where the decoder
        packed some for oneDNN, with the decoder's own kernels too; the faster of the two is the floor.
        """
        self.progress("sampling: weight-read floor")
        modules = model.matrices
        vectors = {(m.in_features, m.weight.dtype): torch.randn(1, m.in_features, generator=self.generator,
                                                                device=self.device).to(m.weight.dtype)
                   for m in modules}

        def with_linear() -> None:
            for m in modules:
                F.linear(vectors[m.in_features, m.weight.dtype], m.weight)

        def with_model_kernels() -> None:
            for m in modules:
                m.project(vectors[m.in_features, m.weight.dtype])

        nbytes = sum(m.weight.numel() * m.weight.element_size() for m in modules)
        kernels = {"F.linear": self._time(with_linear, 2 * nbytes / 4)}
        if any(m.packed is not None for m in modules):
            kernels["model"] = self._time(with_model_kernels, 2 * nbytes / 4)
        kernel, timing = min(kernels.items(), key=lambda item: item[1].median)
        return {"ms": timing.median * 1e3, "timing": timing.to_dict(), "bytes": nbytes, "matrices": len(modules),
                "gb_per_s": nbytes / timing.median / 1e9, "kernel": kernel,
                "kernels_ms": {k: t.median * 1e3 for k, t in kernels.items()}}

    @torch.inference_mode()
    def attention(self) -> dict[str, Any]:
        """softmax(QK^T / sqrt(head_dim)) V written out, next to F.scaled_dot_product_attention."""
        m = self.m
        dtype = self.precision.autocast_dtype or torch.float32
        lengths = []
        T = 64
        while T < self.options.max_seq:
            lengths.append(T)
            T *= 2
        lengths.append(self.options.max_seq)
        rows = []
        method = None
        for i, T in enumerate(lengths):
            self.progress(f"attention: sequence length {T} ({i + 1}/{len(lengths)})")
            scores = m.n_head * T * T * dtype.itemsize  # one (1, n_head, T, T) matrix
            if not self._fits(3 * scores):
                self.notes.append(f"attention at length {T} skipped: the written-out scores need "
                                  f"{3 * scores / 2**30:.1f} GiB")
                break
            q, k, v = (torch.randn(1, m.n_head, T, m.head_dim, generator=self.generator, device=self.device,
                                   dtype=dtype) for _ in range(3))  # (B, n_head, T, head_dim)
            # Made once, as a model would keep it in a buffer: True on and below the diagonal.
            visible = visible_keys(T, 0, self.device)

            def plain() -> torch.Tensor:
                return written_out_attention(q, k, v, visible)

            def fused() -> torch.Tensor:
                return F.scaled_dot_product_attention(q, k, v, is_causal=True)

            flops = 4 * m.n_head * T * T * m.head_dim
            plain_t, fused_t = self._time(plain, flops), self._time(fused, flops)
            plain_b, method = peak_bytes(plain, self.device)
            fused_b, method = peak_bytes(fused, self.device)
            rows.append({"seq_len": T, "plain_ms": plain_t.to_dict(), "sdpa_ms": fused_t.to_dict(),
                         "plain_peak_bytes": plain_b, "sdpa_peak_bytes": fused_b,
                         "speedup": plain_t.median / fused_t.median})
        return {"batch_size": 1, "n_head": m.n_head, "head_dim": m.head_dim, "dtype": str(dtype).removeprefix("torch."),
                "causal": True, "memory_method": method, "rows": rows}

    def memory(self) -> dict[str, Any]:
        if self.device.type == "cuda":
            return {"peak_bytes": torch.cuda.max_memory_allocated(self.device),
                    "method": "CUDA allocator peak (torch.cuda.max_memory_allocated) over the bench"}
        return {"peak_bytes": peak_rss_bytes(),
                "method": "peak resident set of this process (getrusage ru_maxrss), including Python and torch"}


def decode_contexts(block_size: int, max_seq: int) -> list[int]:
    """Contexts of the cached-against-uncached decode table: an eighth, half and all of the window,
    then doubling past block_size up to max_seq, where the uncached step's quadratic attention shows."""
    contexts = {max(1, block_size // 8), max(1, block_size // 2), block_size - 1}
    length = 2 * block_size
    while length <= max_seq:
        contexts.add(length - 1)
        length *= 2
    return sorted(contexts)


def bench(target: Target, options: BenchOptions | None = None, progress: Progress | None = None) -> dict[str, Any]:
    options = options or BenchOptions()
    # The device, precision and matmul settings a training run would use (threads: per section).
    with runtime(options.device, target.config.train.dtype) as rt:
        return Bench(target, options, rt, progress).run()

