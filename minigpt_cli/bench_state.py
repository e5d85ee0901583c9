"""What every bench measurement shares: the options, the bound on work per measurement, and the timing
itself (warm-ups, then repeats each between two device synchronisations, reported as a median with its spread)."""

from __future__ import annotations

import contextlib
import math
import statistics
import time
from dataclasses import dataclass
from collections import defaultdict
from typing import Any, Callable, Iterator, Sequence

import torch

from minigpt_cli.config import UserError
from minigpt_cli.device import Runtime, available_memory, check_inference_dtype, synchronize
from minigpt_cli.kv_cache import KVCache
from minigpt_cli.model import flops_per_token, forward_flops, input_slots
from minigpt_cli.targets import Target

Progress = Callable[[str], None]

# Work per timed call on a CPU (or Apple GPU), in FLOPs: big enough to time, small enough that
# `minigpt bench gpt2_small` finishes in well under a minute on two cores.
CPU_FLOP_BUDGET = 5e10
QUICK_FLOP_BUDGET = 1e10
# Median absolute deviation, relative to the median, above which a timing is called unsteady.
UNSTEADY = 0.2
# Memory a single measurement may take, as a fraction of what the device has free.
MEMORY_FRACTION = 0.5
# A timing needs this many repeats for its spread to mean anything.
MIN_REPEATS = 3
# Between two rows of a table, where the second has more FLOPs: its time may fall by this fraction
# (noise) and may grow this many times faster than the FLOPs (caches overflowing), not more.
MAX_FALL = 0.2
# Rows whose FLOPs differ by less than this (a cached decode step at two contexts) do nearly the same
# work: the first one measured (a scripted step's first use, say) may be the slower without a fault.
MIN_WORK_FOR_FALL = 1.5
MAX_EXCESS_GROWTH = 3.0
# Above this a measurement's fixed costs (Python, kernel launches) are a small part of it, so twice the
# FLOPs or more must take visibly longer (at least MIN_GROWTH times): a flat time there is a stall.
FIXED_COST_MS = 2.0
MIN_GROWTH = 1.2


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


class BenchState:
    """What every measurement shares: the target's shape, the work bound, the timing settings, the notes
    and the one generator every input is drawn from (so the sections draw in the order they run)."""

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
        self.untrusted = 0  # rows still implausible after measuring them again (see settle)
        self.generator = torch.Generator(device=self.device)
        self.generator.manual_seed(0)

    def time(self, fn: Callable[[], Any], flops: float = 0.0) -> Timing:
        """Fewer repeats for calls that are expensive under the FLOP budget."""
        warmup, repeats = self.warmup, self.repeats
        if flops > self.budget / 4:
            warmup, repeats = min(warmup, 1), min(repeats, 3)
        timing = measure(fn, self.device, warmup, repeats, self.max_seconds)
        if timing.repeats >= MIN_REPEATS and timing.mad > UNSTEADY * timing.median:
            self.unsteady += 1
        return timing

    @contextlib.contextmanager
    def measuring_again(self) -> Iterator[None]:
        """A row measured again has at least MIN_REPEATS repeats, whatever --repeats asked for."""
        saved, self.repeats = self.repeats, max(self.repeats, MIN_REPEATS)
        try:
            yield
        finally:
            self.repeats = saved

    def tokens(self, *shape: int) -> torch.Tensor:
        return torch.randint(0, self.V, shape, generator=self.generator, device=self.device)

    def fits(self, nbytes: float) -> bool:
        free = available_memory(self.device)
        return free is None or nbytes <= MEMORY_FRACTION * free

    def forward_flops(self, tokens: int, context: int) -> float:
        """FLOPs of a forward pass over `tokens` new positions whose keys span `context` positions."""
        return forward_flops(self.m, self.V, tokens, context)

    def cache(self, batch: int, positions: int, m: Any = None) -> KVCache:
        """An empty KV cache of `positions` positions for `batch` sequences of the model (or of shape m)."""
        m = m or self.m
        return KVCache(m.n_layer, batch, m.n_head, positions, m.head_dim, device=self.device,
                       input_slots=input_slots(m))


# ---------------------------------------------------------------------------------------------
# Plausibility: a row of a table whose timings cannot be trusted is measured again, then flagged
# ---------------------------------------------------------------------------------------------

Doubts = dict[int, list[str]]  # row index -> why its numbers cannot be trusted


def spread_doubts(timing: dict | None, what: str) -> list[str]:
    """A timing (Timing.to_dict) that varied too much between its repeats. One with fewer than
    MIN_REPEATS (the user's --repeats) has no spread to judge: output.ms prints its repeats, not a ±."""
    if not timing or timing["repeats"] < MIN_REPEATS:
        return []
    if timing["mad_ms"] > UNSTEADY * timing["median_ms"]:
        return [f"{what} varied by {timing['mad_ms'] / timing['median_ms']:.0%} between repeats"]
    return []


def growth_doubts(points: Sequence[tuple[str, float, dict | None]], what: str, cpu: bool = True) -> Doubts:
    """Rows (label, FLOPs, timing) in order of growing work: a time that falls as the FLOPs clearly grow
    (MIN_WORK_FOR_FALL times), or that grows far faster than they do, is impossible for one kernel; both
    rows of the pair are in doubt. On a CPU a flat time for twice the FLOPs is a stall too; a GPU's
    small steps are bound by kernel launches, whose cost does not grow with the FLOPs."""
    doubts: Doubts = defaultdict(list)
    for i in range(1, len(points)):
        (label0, flops0, t0), (label1, flops1, t1) = points[i - 1], points[i]
        if not t0 or not t1 or flops1 <= flops0:
            continue
        times, work = t1["median_ms"] / t0["median_ms"], flops1 / flops0
        if times < 1 - MAX_FALL and work >= MIN_WORK_FOR_FALL:
            reason = f"{what} took {1 / times:.1f}x less time at {label1} than at {label0}, for {work:.1f}x the FLOPs"
        elif cpu and times < MIN_GROWTH and work >= 2 and t0["median_ms"] >= FIXED_COST_MS:
            reason = f"{what} took about the same time at {label1} as at {label0}, for {work:.1f}x the FLOPs"
        elif times > MAX_EXCESS_GROWTH * work:
            reason = f"{what} took {times:.0f}x the time at {label1} as at {label0}, for {work:.1f}x the FLOPs"
        else:
            continue
        doubts[i - 1].append(reason)
        doubts[i].append(reason)
    return doubts


def merge_doubts(*found: Doubts) -> Doubts:
    merged: Doubts = defaultdict(list)
    for doubts in found:
        for i, reasons in doubts.items():
            merged[i].extend(r for r in reasons if r not in merged[i])
    return merged


def settle(rows: list[dict], doubts: Callable[[list[dict]], Doubts], remeasure: Callable[[int], dict]) -> int:
    """Measure again, once, every row `doubts` finds fault with; mark each row `trusted`, with the reason
    where it is not. Returns the number of rows still in doubt."""
    found = {i: r for i, r in doubts(rows).items() if r}
    if found:
        for i in sorted(found):
            rows[i] = remeasure(i)
        # Only a row that had its second chance is flagged (a neighbour that now disagrees with a
        # re-measured row was fine the first time).
        found = {i: r for i, r in doubts(rows).items() if r and i in found}
    for i, row in enumerate(rows):
        row["trusted"] = i not in found
        row.pop("reason", None)
        if i in found:
            row["reason"] = "; ".join(found[i])
    return len(found)
