"""Device and precision choice, seeded generators, and synchronisation for honest timing."""

from __future__ import annotations

import contextlib
import datetime
import functools
import math
import os
import platform
import re
import statistics
import subprocess
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


def _version(text: str) -> tuple[int, ...]:
    """'14.2.1' -> (14, 2); '2.5.0+cu124' -> (2, 5); '' (not a Mac) -> ()."""
    return tuple(int(part) for part in re.findall(r"\d+", text)[:2])


def cuda_capability(device: torch.device) -> tuple[int, int]:
    return tuple(torch.cuda.get_device_capability(device))


def mps_bfloat16_issue() -> str | None:
    """Why bfloat16 cannot run on this Mac's MPS, or None: Metal has bfloat16 from macOS 14, and
    PyTorch's autocast for MPS arrived in 2.5 (2.4 turns it off with a warning and runs float32)."""
    mac, version = _version(platform.mac_ver()[0]), _version(torch.__version__)
    if mac < (14, 0):
        return f"bfloat16 on Apple MPS needs macOS 14 or newer (this is macOS {platform.mac_ver()[0] or 'unknown'})"
    if version < (2, 5):
        return f"bfloat16 on Apple MPS needs PyTorch 2.5 or newer (this is {torch.__version__})"
    return None


def native_bfloat16(device: torch.device) -> bool:
    """Whether `device` multiplies bfloat16 in hardware. CUDA: compute capability 8.0 (Ampere) and
    up; torch.cuda.is_bf16_supported() also says yes on a T4 or V100, which emulate it (slowly, and
    Triton refuses to compile it there: "'.bf16' requires sm_80"). MPS: see mps_bfloat16_issue.
    CPU: see cpu_has_fast_bfloat16. Anything else (meta): yes, the published recipe's choice."""
    if device.type == "cuda":
        return cuda_capability(device) >= (8, 0)
    if device.type == "mps":
        return mps_bfloat16_issue() is None
    if device.type == "cpu":
        return cpu_has_fast_bfloat16()
    return True


def check_inference_dtype(name: str, device: torch.device, allowed: tuple[str, ...] = tuple(DTYPES)) -> None:
    """Refuse a --dtype that is not one of `allowed`, float16 on a CPU (no fast kernels there), or
    bfloat16 on a Mac whose MPS lacks it."""
    if name not in allowed:
        raise UserError(f"--dtype must be {', '.join(allowed[:-1])} or {allowed[-1]}, got {name!r}")
    if name == "float16" and device.type == "cpu":
        raise UserError("--dtype float16 is for GPUs; on CPU use bfloat16 or float32")
    if name == "bfloat16" and device.type == "mps" and mps_bfloat16_issue():
        raise UserError(f"--dtype bfloat16: {mps_bfloat16_issue()}; use float32 or float16")


@dataclass(frozen=True)
class Precision:
    """Weights stay float32; `autocast_dtype` is the compute dtype inside autocast (None: plain fp32).
    `use_grad_scaler`: training must scale the loss (float16 on CUDA; the trainer makes the scaler)."""

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


def _auto_cuda_precision(device: torch.device, training: bool) -> Precision:
    major, minor = cuda_capability(device)
    if native_bfloat16(device):
        return Precision(torch.bfloat16, False, f"auto: compute capability {major}.{minor} runs bfloat16 natively")
    return Precision(torch.float16, training, f"auto: compute capability {major}.{minor} has no native bfloat16 "
                                          f"(8.0+ has; below it is emulated and cannot be compiled); float16 "
                                          f"with a gradient scaler")


def _check_mps_autocast(dtype: torch.dtype) -> None:
    """PyTorch before 2.5 turns MPS autocast off with a warning and runs float32: refuse instead of
    reporting a precision that is not used."""
    if _version(torch.__version__) < (2, 5):
        raise UserError(f"autocast on Apple MPS needs PyTorch 2.5 or newer (this is {torch.__version__}); "
                        f"use dtype float32 or upgrade PyTorch")
    if dtype == torch.bfloat16 and mps_bfloat16_issue():
        raise UserError(f"dtype bfloat16: {mps_bfloat16_issue()}; use float32")


def choose_precision(device: torch.device, requested: str = "auto", training: bool = True) -> Precision:
    """auto: bfloat16 autocast on CUDA GPUs of compute capability 8.0+, float16 with a gradient
    scaler on older ones, float32 elsewhere. A request the device cannot honour is a UserError:
    float16 on a CPU, float16 training on MPS (no gradient scaler there: small gradients underflow
    to zero), autocast on MPS before PyTorch 2.5, bfloat16 on MPS before macOS 14."""
    if requested == "auto":
        if device.type == "cuda":
            return _auto_cuda_precision(device, training)
        return Precision(None, False, f"auto: float32 on {device.type}")
    if requested == "float32":
        return Precision(None, False, "requested")
    if requested not in ("bfloat16", "float16"):
        raise UserError(f"unknown dtype '{requested}' (use auto, float32, bfloat16 or float16)")
    dtype = DTYPES[requested]
    if dtype == torch.float16 and device.type == "cpu":
        raise UserError("dtype float16 is not supported on CPU (use bfloat16 or float32)")
    if dtype == torch.float16 and device.type == "mps" and training:
        raise UserError("dtype float16 training is not supported on Apple MPS: PyTorch has no gradient scaler "
                        "for it, so small gradients would underflow to zero (use float32, or bfloat16 on macOS 14+)")
    if device.type == "mps":
        _check_mps_autocast(dtype)
    reason = "requested"
    if dtype == torch.bfloat16 and device.type == "cuda" and not native_bfloat16(device):
        major, minor = cuda_capability(device)
        reason = f"requested (emulated on compute capability {major}.{minor}: slow, and --compile fails)"
    return Precision(dtype, dtype == torch.float16 and device.type == "cuda" and training, reason)


def autocast(device: torch.device, precision: Precision) -> contextlib.AbstractContextManager:
    if precision.autocast_dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=precision.autocast_dtype)


def check_compile(device: torch.device) -> None:
    """Refuse torch.compile on Apple MPS: it would go to Inductor's experimental MPS backend, untested
    here, with no word to the user. (On a CPU and on CUDA it compiles.)"""
    if device.type == "mps":
        raise UserError("--compile (train.compile) is not supported on Apple MPS: PyTorch's compiler for MPS is "
                        "experimental; run without it (the model runs eagerly)")


@contextlib.contextmanager
def fast_float32_matmuls(device: torch.device) -> Iterator[None]:
    """TF32 tensor-core matmuls on CUDA (float32 weights, about 10 mantissa bits per product, several
    times faster on Ampere and up), restored on the way out; nothing changes on other devices."""
    if device.type != "cuda":
        yield
        return
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def _meminfo_available(path: str = "/proc/meminfo") -> int | None:
    with open(path, encoding="ascii") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return None


def vm_stat_available(text: str) -> int | None:
    """Bytes free or reclaimable at once (free, inactive and speculative pages) from macOS's vm_stat."""
    page = re.search(r"page size of (\d+) bytes", text)
    counts = dict(re.findall(r"^Pages (free|inactive|speculative):\s+(\d+)", text, re.MULTILINE))
    if not page or "free" not in counts:
        return None
    return int(page.group(1)) * sum(int(n) for n in counts.values())


def system_available_memory() -> int | None:
    """Bytes of RAM free for a new allocation now: /proc/meminfo on Linux, vm_stat on macOS, else
    sysconf; None when the platform does not say."""
    try:
        return _meminfo_available()
    except (OSError, ValueError):
        pass
    if platform.system() == "Darwin":
        try:
            out = subprocess.run(["vm_stat"], capture_output=True, text=True, timeout=5, check=True).stdout
            return vm_stat_available(out)
        except (OSError, subprocess.SubprocessError):
            return None
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def available_memory(device: torch.device) -> int | None:
    """Bytes free on the device now (None when the platform does not say). MPS shares the Mac's RAM:
    what Metal recommends this process use, less what it holds, and no more than the RAM free."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    system = system_available_memory()
    if device.type == "mps" and hasattr(torch.mps, "recommended_max_memory"):
        metal = torch.mps.recommended_max_memory() - torch.mps.driver_allocated_memory()
        return metal if system is None else min(metal, system)
    return system


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
    # How many CPUs other processes keep busy: the CPU time they used over a short window (see
    # cpu_state), or 0 when no thread of theirs was even waiting for a CPU.
    others_running: float


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


# A neighbour is a process that keeps a CPU busy, not one that is runnable at the moment we look: a
# program starting up, or the reader of our output woken by a pipe, is runnable for an instant and
# uses little CPU time, while a busy loop uses all of it. So when a snapshot shows others running,
# the CPU time they use over this window decides. 50 ms is 5 clock ticks of each CPU at Linux's
# usual 100 Hz, enough to tell a busy CPU from an idle one; a quiet machine never waits for it.
LOAD_WINDOW_SECONDS = 0.05


@dataclass(frozen=True)
class CpuTimes:
    """Cumulative CPU time, in clock ticks, of the CPUs this process may use, and this process's own."""

    busy: float  # ticks the CPUs spent running anything (user, nice, system, irq, softirq, steal)
    total: float  # ticks they counted in all (busy, idle and iowait)
    own: float  # ticks this process's threads ran
    cpus: int = 0  # the per-CPU lines counted (a container's /proc/stat may show fewer than the mask)


def cpu_times(stat_text: str, cpus: set[int], own_seconds: float, ticks_per_second: float) -> CpuTimes:
    """CpuTimes from the text of /proc/stat (its per-CPU lines: user nice system idle iowait irq
    softirq steal ...; guest time is counted inside user)."""
    busy = total = counted = 0
    for line in stat_text.splitlines():
        name, _, rest = line.partition(" ")
        if not (name.startswith("cpu") and name[3:].isdigit() and int(name[3:]) in cpus):
            continue
        ticks = [int(v) for v in rest.split()[:8]]
        total += sum(ticks)
        busy += sum(ticks) - ticks[3] - ticks[4]
        counted += 1
    return CpuTimes(busy, total, own_seconds * ticks_per_second, counted)


def others_busy(before: CpuTimes, after: CpuTimes, ncpus: int) -> float | None:
    """How many CPUs other processes kept busy between two readings (this process's own time taken
    out); None if the CPUs counted no tick in between. ncpus is at most the CPUs the readings counted."""
    total = after.total - before.total
    if total <= 0:
        return None
    ncpus = min(ncpus, after.cpus) if after.cpus else ncpus
    others = (after.busy - before.busy) - (after.own - before.own)
    return max(0.0, ncpus * others / total)


def _proc_stat() -> str:
    with open("/proc/stat", encoding="ascii") as f:
        return f.read()


def _read_cpu_times(cpus: set[int]) -> CpuTimes:
    own = os.times()  # this process's threads, children not included
    return cpu_times(_proc_stat(), cpus, own.user + own.system, os.sysconf("SC_CLK_TCK"))


def _allowed_cpus() -> set[int]:
    try:
        return set(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return set(range(os.cpu_count() or 1))


def cpu_state(samples: int = 3, gap_seconds: float = 0.001, window_seconds: float = LOAD_WINDOW_SECONDS) -> CpuState:
    """The CPUs this process may use, and how many of them other processes keep busy: first the
    median of a few snapshots of the threads waiting for a CPU, a few milliseconds apart; if they
    show any, the CPU time others used over window_seconds (LOAD_WINDOW_SECONDS). Without /proc, the
    one-minute load average."""
    allowed = _allowed_cpus()
    try:
        readings = []
        for i in range(samples):
            if i:
                time.sleep(gap_seconds)
            readings.append(_others_running_once())
        others = statistics.median(readings)
        if others > 0:
            before = _read_cpu_times(allowed)
            time.sleep(window_seconds)
            busy = others_busy(before, _read_cpu_times(allowed), len(allowed))
            others = others if busy is None else busy
    except (OSError, ValueError, IndexError):
        try:
            others = os.getloadavg()[0]
        except (AttributeError, OSError):
            others = 0.0
    return CpuState(len(allowed), float(others))


def use_threads(work: float, requested: int = 0, state: CpuState | None = None,
                device: torch.device | None = None) -> ThreadChoice | None:
    """Choose the intra-op thread count for `work` (see choose_threads) and set it in torch. Off the
    CPU (a `device` other than cpu) the work is the GPU's: nothing is chosen or set, and None returned."""
    if not 0 <= requested <= 1024:
        raise UserError(f"--threads must be between 1 and 1024 (or 0 to choose), got {requested}")
    if device is not None and device.type != "cpu":
        return None
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
    threads: ThreadChoice | None  # None: the caller chooses threads per piece of work, or not on a CPU


def _join_process_group(dist_info: Distributed, requested: str) -> DeviceChoice:
    """Under torchrun: this rank's device (its own GPU, or the CPU), and the process group joined."""
    import torch.distributed as dist

    if torch.cuda.is_available() and requested in ("auto", "cuda"):
        visible = torch.cuda.device_count()
        if dist_info.local_rank >= visible:
            raise UserError(f"LOCAL_RANK {dist_info.local_rank} but this machine shows {visible} CUDA device(s) "
                            f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}): start at "
                            f"most {visible} process(es) per machine (torchrun --nproc_per_node {visible})")
        torch.cuda.set_device(dist_info.local_rank)
        device, backend = torch.device("cuda", dist_info.local_rank), "nccl"
    else:
        if requested not in ("auto", "cpu"):
            raise UserError(f"under torchrun use --device auto, cuda or cpu, got '{requested}'")
        device, backend = torch.device("cpu"), "gloo"
    # Ranks wait in a collective while rank 0 saves a checkpoint (and scores the final evaluation):
    # NCCL's default of 10 minutes would kill a run whose save is slow; 30 covers a save of GBs.
    dist.init_process_group(backend=backend, timeout=datetime.timedelta(minutes=30))
    return DeviceChoice(device, f"torchrun rank {dist_info.rank} of {dist_info.world_size} ({backend})")


def request_determinism() -> None:
    """Before anything touches CUDA: cuBLAS reads CUBLAS_WORKSPACE_CONFIG when it makes its first
    handle, so set after a first matmul it is ignored (and cuBLAS stays nondeterministic)."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")


def use_deterministic(device: torch.device) -> None:
    """Deterministic kernels. On CUDA an operation without a deterministic kernel is an error, not
    a warning: with warn_only, SDPA's memory-efficient backward would stay nondeterministic while
    the run claims determinism (with it off, PyTorch picks its deterministic variant). Elsewhere a
    warning, as the CPU's few such operations are deterministic in practice."""
    torch.use_deterministic_algorithms(True, warn_only=device.type != "cuda")
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = False


@contextlib.contextmanager
def runtime(device: str = "auto", dtype: str = "auto", seed: int | None = None, deterministic: bool = False,
            work: float | None = None, threads: int = 0, distributed: bool = False,
            compile: bool = False) -> Iterator[Runtime]:
    """Set up, in this order, what running the model needs, and undo it on the way out:
    with `deterministic`, CUBLAS_WORKSPACE_CONFIG (before CUDA is touched); the device (under
    torchrun, with `distributed`, the rank's device and the process group); CPU threads for `work`
    multiply-adds per step on a CPU (see use_threads; None leaves them to the caller); deterministic
    kernels if asked; TF32 matmuls on CUDA (float32 weights, tensor-core speed); the precision for
    `dtype`; with `compile`, a refusal where torch.compile is not supported (check_compile); and
    the global seed (seed + rank, so ranks draw apart). The TF32 settings are put back afterwards
    (deterministic algorithms, once asked for, stay on, as CUBLAS_WORKSPACE_CONFIG must); the
    process group is destroyed."""
    dist_info = detect_distributed() if distributed else Distributed()
    if deterministic:
        request_determinism()
    try:
        choice = _join_process_group(dist_info, device) if dist_info.enabled else resolve_device(device)
        chosen_threads = use_threads(work, threads, device=choice.device) if work is not None else None
        if deterministic:
            use_deterministic(choice.device)
        precision = choose_precision(choice.device, dtype)
        if compile:
            check_compile(choice.device)
        if seed is not None:
            torch.manual_seed(seed + dist_info.rank)
        with fast_float32_matmuls(choice.device):
            yield Runtime(choice.device, choice.reason, precision, dist_info, chosen_threads)
    finally:
        if dist_info.enabled:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()
