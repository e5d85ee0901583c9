"""Device and precision choice, seeded generators, and synchronisation for honest timing."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

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
