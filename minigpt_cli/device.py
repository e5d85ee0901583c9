"""Device and precision choice, seeded generators, and synchronisation for honest timing."""

from __future__ import annotations

import contextlib
import functools
import math
import os
import statistics
import time
from dataclasses import dataclass
from typing import Iterator
from pathlib import Path

import torch

from minigpt_cli.config import UserError


@dataclass(frozen=True)
class DeviceChoice:
    device: torch.device
    reason: str


def _mps_available() -> bool:
    return bool(getattr(torch.backends, "mps", None)) and torch.backends.mps.is_available()


def resolve_device(name: str = "auto") -> DeviceChoice:
    """'auto' picks CUDA, then MPS, then CPU; an explicit device that is not available is a UserError."""
    name = (name or "auto").strip().lower()
    if name == "auto":
        if torch.cuda.is_available():
            return DeviceChoice(torch.device("cuda"), f"auto: CUDA is available ({torch.cuda.get_device_name(0)})")
        if _mps_available():
            return DeviceChoice(torch.device("mps"), "auto: no CUDA; Apple MPS is available")
        return DeviceChoice(torch.device("cpu"), "auto: no CUDA or MPS device found")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"unknown device '{name}' (use auto, cpu, cuda, cuda:N or mps)") from None
    if device.type == "cpu":
        return DeviceChoice(device, "requested")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"device '{name}' requested but CUDA is not available (use --device cpu or auto)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UserError(f"device '{name}' requested but only {torch.cuda.device_count()} CUDA device(s) exist")
        return DeviceChoice(device, "requested")
    if device.type == "mps":
        if not _mps_available():
            raise UserError(f"device '{name}' requested but Apple MPS is not available (use --device cpu or auto)")
        return DeviceChoice(device, "requested")
    raise UserError(f"unsupported device '{name}' (use auto, cpu, cuda, cuda:N or mps)")


class _NoRandomInit(torch.overrides.TorchFunctionMode):
    """Skips normal_ and uniform_: on the meta device they run torch's Python reference kernels, whose
    first use imports torch._refs and torch._dynamo (2-3 s on a quiet 2-core machine, 15-24 s on a busy
    one) for tensors that hold no numbers anyway."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if getattr(func, "__name__", "") in ("normal_", "uniform_", "trunc_normal_"):
            return args[0] if args else kwargs["tensor"]  # the tensor, left as it is
        return func(*args, **kwargs)


@contextlib.contextmanager
def shapes_only() -> Iterator[None]:
    """Modules built inside have their shapes and no storage (the meta device), and skip their random
    initialisation: for counting parameters and checking shapes, even of GPT-2 XL, in no time."""
    with torch.device("meta"), _NoRandomInit():
        yield


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def check_inference_dtype(name: str, device: torch.device, allowed: tuple[str, ...] = tuple(DTYPES)) -> None:
    """Refuse a --dtype that is not one of `allowed`, or float16 on a CPU (no fast kernels there)."""
    if name not in allowed:
        raise UserError(f"--dtype must be {', '.join(allowed[:-1])} or {allowed[-1]}, got {name!r}")
    if name == "float16" and device.type == "cpu":
        raise UserError("--dtype float16 is for GPUs; on CPU use bfloat16 or float32")


@dataclass(frozen=True)
class Precision:
    """Weights stay float32; `autocast_dtype` is the compute dtype inside autocast (None: plain fp32)."""

    autocast_dtype: torch.dtype | None
    use_grad_scaler: bool
    reason: str

    @property
    def name(self) -> str:
        return {None: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}[self.autocast_dtype]


@functools.lru_cache(maxsize=None)
def cpu_has_fast_bfloat16() -> bool:
    """Whether this CPU multiplies bfloat16 matrices natively (AVX512-BF16, AMX, Arm BF16) through
    oneDNN; without it (AVX2 only: most laptops) bfloat16 products are emulated, many times slower."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def choose_precision(device: torch.device, requested: str = "auto") -> Precision:
    """bf16 autocast on CUDA GPUs that support it, fp16 plus a gradient scaler on older ones, fp32 elsewhere."""
    if requested == "auto":
        if device.type == "cuda":
            if torch.cuda.is_bf16_supported():
                return Precision(torch.bfloat16, False, "auto: this CUDA GPU supports bfloat16")
            return Precision(torch.float16, True, "auto: this CUDA GPU lacks bfloat16; float16 with a gradient scaler")
        return Precision(None, False, f"auto: float32 on {device.type}")
    if requested == "float32":
        return Precision(None, False, "requested")
    if requested == "bfloat16":
        return Precision(torch.bfloat16, False, "requested")
    if requested == "float16":
        if device.type == "cpu":
            raise UserError("dtype float16 is not supported for training on CPU (use bfloat16 or float32)")
        # The CUDA gradient scaler exists only for CUDA; MPS float16 runs without one.
        return Precision(torch.float16, device.type == "cuda", "requested")
    raise UserError(f"unknown dtype '{requested}' (use auto, float32, bfloat16 or float16)")


def autocast(device: torch.device, precision: Precision) -> contextlib.AbstractContextManager:
    if precision.autocast_dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=precision.autocast_dtype)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def make_generator(seed: int, device: torch.device | str = "cpu") -> torch.Generator:
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    return generator


# ---------------------------------------------------------------------------------------------
# CPU threads: how many intra-op threads a kind of work should use on this machine now.
# ---------------------------------------------------------------------------------------------

# A thread must get at least this many multiply-adds per step to repay itself: every parallel
# operation waits for its slowest thread, so a thread woken late (or one the OS has given to
# another process) costs the whole step. A batch-1 decode step reads each weight once, so its
# work is the weights read: the default 0.8M model stays on one thread, the 6 x 384 model
# (10.6M) may use two.
WORK_PER_THREAD = 2**21


@dataclass(frozen=True)
class CpuState:
    cpus: int  # CPUs this process may run on (its affinity mask)
    others_running: float  # threads of other processes running or waiting for a CPU at this moment


@dataclass(frozen=True)
class ThreadChoice:
    threads: int
    reason: str

    def to_dict(self) -> dict:
        return {"threads": self.threads, "reason": self.reason}


def choose_threads(work: float, state: CpuState, requested: int = 0, env_threads: str | None = None) -> ThreadChoice:
    """Intra-op threads for a step of `work` multiply-adds: `requested` (--threads) if given, else
    OMP_NUM_THREADS if the user set it, else the CPUs other processes leave free now, no more than
    the work can keep busy (WORK_PER_THREAD each), and at least one."""
    if requested > 0:
        return ThreadChoice(requested, "requested (--threads)")
    if env_threads and env_threads.strip().isdigit() and int(env_threads) > 0:
        return ThreadChoice(int(env_threads), f"OMP_NUM_THREADS={int(env_threads)}")
    cpus = max(1, state.cpus)
    free = max(1, min(cpus, math.floor(cpus - state.others_running + 0.5)))
    useful = max(1, int(work // WORK_PER_THREAD))
    threads = min(free, useful)
    busy = f"{state.others_running:.0f} other thread(s) running on {cpus} CPU(s)"
    if threads == cpus:
        return ThreadChoice(threads, f"every CPU ({busy})")
    if useful < free:
        return ThreadChoice(threads, f"a step of {work / 1e6:.2g}M multiply-adds keeps {threads} thread(s) busy "
                                     f"({busy})")
    return ThreadChoice(threads, f"the CPUs left free ({busy})")


def _own_running_threads() -> int:
    """This process's threads in state R (running or runnable), from /proc/self/task."""
    count = 0
    for task in Path("/proc/self/task").iterdir():
        try:
            stat = (task / "stat").read_text()
        except OSError:
            continue
        if stat.rsplit(")", 1)[1].split()[0] == "R":
            count += 1
    return count


def _others_running_once() -> float:
    # /proc/loadavg's fourth field is "runnable/total" scheduling entities right now, this
    # process's running threads (at least the one reading) included.
    with open("/proc/loadavg", encoding="ascii") as f:
        runnable = int(f.read().split()[3].split("/")[0])
    return max(0, runnable - max(1, _own_running_threads()))


def cpu_state(samples: int = 3, gap_seconds: float = 0.001) -> CpuState:
    """The CPUs this process may use, and how many other threads want one now: the median of a
    few snapshots a few milliseconds apart (a snapshot alone catches bursts), or, without /proc,
    the one-minute load average."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    try:
        readings = []
        for i in range(samples):
            if i:
                time.sleep(gap_seconds)
            readings.append(_others_running_once())
        others = statistics.median(readings)
    except (OSError, ValueError, IndexError):
        try:
            others = os.getloadavg()[0]
        except (AttributeError, OSError):
            others = 0.0
    return CpuState(cpus, float(others))


def use_threads(work: float, requested: int = 0, state: CpuState | None = None) -> ThreadChoice:
    """Choose the intra-op thread count for `work` (see choose_threads) and set it in torch."""
    if not 0 <= requested <= 1024:
        raise UserError(f"--threads must be between 1 and 1024 (or 0 to choose), got {requested}")
    env_threads = os.environ.get("OMP_NUM_THREADS")
    if state is None and requested == 0 and not (env_threads or "").strip().isdigit():
        state = cpu_state()  # read only when the choice depends on it
    choice = choose_threads(work, state or CpuState(os.cpu_count() or 1, 0.0), requested, env_threads)
    if torch.get_num_threads() != choice.threads:
        torch.set_num_threads(choice.threads)
    return choice


# ---------------------------------------------------------------------------------------------
# The runtime: what a command that runs the model sets up first and undoes last (train and bench).
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Distributed:
    """This process's place under torchrun (world_size 1 without it)."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def detect_distributed() -> Distributed:
    """torchrun sets RANK, LOCAL_RANK and WORLD_SIZE for each process it starts."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return Distributed(int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", 0)),
                           int(os.environ["WORLD_SIZE"]))
    return Distributed()


@dataclass(frozen=True)
class Runtime:
    device: torch.device
    device_reason: str
    precision: Precision
    dist: Distributed
    threads: ThreadChoice | None  # None: the caller chooses threads per piece of work


def _join_process_group(dist_info: Distributed, requested: str) -> DeviceChoice:
    """Under torchrun: this rank's device (its own GPU, or the CPU), and the process group joined."""
    import torch.distributed as dist

    if torch.cuda.is_available() and requested in ("auto", "cuda"):
        torch.cuda.set_device(dist_info.local_rank)
        device, backend = torch.device("cuda", dist_info.local_rank), "nccl"
    else:
        if requested not in ("auto", "cpu"):
            raise UserError(f"under torchrun use --device auto, cuda or cpu, got '{requested}'")
        device, backend = torch.device("cpu"), "gloo"
    dist.init_process_group(backend=backend)
    return DeviceChoice(device, f"torchrun rank {dist_info.rank} of {dist_info.world_size} ({backend})")


@contextlib.contextmanager
def runtime(device: str = "auto", dtype: str = "auto", seed: int | None = None, deterministic: bool = False,
            work: float | None = None, threads: int = 0, distributed: bool = False) -> Iterator[Runtime]:
    """Set up, in this order, what running the model needs, and undo it on the way out:
    CPU threads for `work` multiply-adds per step (see use_threads; None leaves them to the caller),
    the device (under torchrun, with `distributed`, the rank's device and the process group),
    deterministic kernels if asked, TF32 matmuls on CUDA (float32 weights, tensor-core speed),
    the precision for `dtype`, and the global seed (seed + rank, so ranks draw apart).
    The TF32 settings are put back afterwards (deterministic algorithms, once asked for, stay on, as
    CUBLAS_WORKSPACE_CONFIG must); the process group is destroyed."""
    dist_info = detect_distributed() if distributed else Distributed()
    chosen_threads = use_threads(work, threads) if work is not None else None
    tf32 = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    try:
        choice = _join_process_group(dist_info, device) if dist_info.enabled else resolve_device(device)
        if deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)
            if choice.device.type == "cuda":
                os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
                torch.backends.cudnn.benchmark = False
        if choice.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        precision = choose_precision(choice.device, dtype)
        if seed is not None:
            torch.manual_seed(seed + dist_info.rank)
        yield Runtime(choice.device, choice.reason, precision, dist_info, chosen_threads)
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
        if dist_info.enabled:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()
