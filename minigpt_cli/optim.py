"""Optimizers: AdamW groups, Muon for hidden weight matrices, and the learning-rate schedule."""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Any, Iterable, Sequence

import torch
from torch import nn

from minigpt_cli.config import TrainConfig
from minigpt_cli.device import cpu_has_fast_bfloat16, native_bfloat16

# Coefficients of the quintic Newton-Schulz iteration published with Muon (Keller Jordan, 2024):
# chosen so that five steps push every singular value of the normalised matrix close to 1.
NS_COEFFS = (3.4445, -4.7750, 2.0315)


def newton_schulz_dtype(device: torch.device) -> torch.dtype:
    """bfloat16 as in the published method where the hardware runs it natively, else float32.

    The iteration tolerates bfloat16's rounding, and it is about 1.5x faster than float32 on a CPU
    with AVX512-BF16. Hardware without native bfloat16 emulates it: a CPU with AVX2 only (most
    laptops) runs these products 10-30x slower than float32 (benchmarks/README.md), which made
    Muon's step most of a training step there; a CUDA GPU below compute capability 8.0 (T4, V100)
    emulates it too, and MPS has it only from macOS 14 (device.native_bfloat16).
    """
    if device.type == "cpu":
        return torch.bfloat16 if cpu_has_fast_bfloat16() else torch.float32
    return torch.bfloat16 if native_bfloat16(device) else torch.float32


def orthogonalize(g: torch.Tensor, steps: int = 5, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Approximately replace g (..., m, n) by U V^T from its SVD, using only matrix products, in
    `dtype` (default: newton_schulz_dtype for g's device). A stack of matrices is done as one batch."""
    a, b, c = NS_COEFFS
    x = g.to(dtype or newton_schulz_dtype(g.device))
    transposed = x.shape[-2] > x.shape[-1]
    if transposed:
        x = x.mT
    shape = x.shape
    x = x.reshape(-1, *shape[-2:])  # (batch, m, n), m <= n
    x = x / (x.norm(dim=(-2, -1), keepdim=True) + 1e-7)
    for _ in range(steps):
        A = x @ x.mT  # (batch, m, m)
        B = torch.baddbmm(A, A, A, beta=b, alpha=c)  # b A + c A^2, the scaling fused into the product
        x = torch.baddbmm(x, B, x, beta=a)  # a x + B x
    x = x.view(shape)
    if transposed:
        x = x.mT
    return x.to(g.dtype)


class Optimizer:
    """What the trainer, torch.amp.GradScaler and checkpoints use of torch.optim.Optimizer:
    `param_groups`, per-parameter `state`, `zero_grad`, and `state_dict` / `load_state_dict` in its
    format (so checkpoints saved by torch.optim's AdamW resume here, and the other way round).

    Not torch.optim.Optimizer itself: its methods (the constructor's add_param_group, step, zero_grad,
    state_dict) import torch._dynamo on first use, 1.5-2 s of every training's start-up on a CPU
    (benchmarks/README.md, "Start-up")."""

    def __init__(self, params: Iterable, defaults: dict[str, Any]):
        self.defaults = defaults
        self.state: defaultdict[torch.Tensor, dict[str, Any]] = defaultdict(dict)
        groups = list(params)
        if not groups:
            raise ValueError("optimizer got an empty parameter list")
        if not isinstance(groups[0], dict):
            groups = [{"params": groups}]
        self.param_groups = [{**defaults, **group, "params": list(group["params"])} for group in groups]

    def zero_grad(self, set_to_none: bool = True) -> None:
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None and set_to_none:
                    p.grad = None
                elif p.grad is not None:
                    p.grad.detach_().zero_()

    def state_dict(self) -> dict[str, Any]:
        """{"state": {index: {name: value}}, "param_groups": [{settings..., "params": [index, ...]}]},
        parameters numbered in group order, as torch.optim numbers them."""
        index: dict[int, int] = {}
        groups = []
        for group in self.param_groups:
            for p in group["params"]:
                index.setdefault(id(p), len(index))
            settings = {k: v for k, v in group.items() if k != "params"}
            groups.append({**settings, "params": [index[id(p)] for p in group["params"]]})
        return {"state": {index[id(p)]: values for p, values in self.state.items()}, "param_groups": groups}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """The state and settings state_dict saved; ValueError or KeyError if they do not fit these
        parameters. Tensors move to their parameter's device and dtype (AdamW's step count stays float32)."""
        saved = state_dict["param_groups"]
        if len(saved) != len(self.param_groups):
            raise ValueError("loaded state dict has a different number of parameter groups")
        if any(len(s["params"]) != len(g["params"]) for s, g in zip(saved, self.param_groups)):
            raise ValueError("loaded state dict contains a parameter group that doesn't match the size of "
                             "optimizer's group")
        by_index = {i: p for s, g in zip(saved, self.param_groups) for i, p in zip(s["params"], g["params"])}
        state: defaultdict[torch.Tensor, dict[str, Any]] = defaultdict(dict)
        for i, values in state_dict["state"].items():
            p = by_index[i]
            state[p] = {name: _state_value(p, name, value) for name, value in values.items()}
        self.state = state
        self.param_groups = [{**{k: v for k, v in s.items() if k != "params"}, "params": g["params"]}
                             for s, g in zip(saved, self.param_groups)]


def _state_value(p: torch.Tensor, name: str, value: Any) -> Any:
    if not isinstance(value, torch.Tensor):
        return value
    if name == "step":  # the fused kernel's step count: float32 beside its parameter
        return value.to(dtype=torch.float32, device=p.device)
    return value.to(dtype=p.dtype if p.is_floating_point() else value.dtype, device=p.device)


class AdamW(Optimizer):
    """AdamW as torch.optim.AdamW(fused=True) runs it: the same kernel (torch._fused_adamw_) on the
    same state, so the same numbers to the bit; under float16's GradScaler the kernel takes the
    scale and the inf flag itself, as there."""

    _step_supports_amp_scaling = True  # read by torch.amp.GradScaler.step

    def __init__(self, params: Iterable, lr: float, betas: tuple[float, float], eps: float = 1e-8,
                 weight_decay: float = 0.01):
        # fused: read by torch.optim.AdamW loading this state (an older minigpt resuming the run),
        # which then keeps the step count beside its parameter, as this kernel does.
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, fused=True))

    @torch.no_grad()
    def step(self) -> None:
        grad_scale, found_inf = getattr(self, "grad_scale", None), getattr(self, "found_inf", None)
        for group in self.param_groups:
            # The kernel takes lists of one device and dtype.
            lists: dict[tuple[torch.device, torch.dtype], tuple[list, list, list, list, list]] = {}
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                kind = lists.setdefault((p.device, p.dtype), ([], [], [], [], []))
                for into, tensor in zip(kind, (p, p.grad, state["exp_avg"], state["exp_avg_sq"], state["step"])):
                    into.append(tensor)
            beta1, beta2 = group["betas"]
            for (device, _), (params, grads, exp_avgs, exp_avg_sqs, steps) in lists.items():
                scale = None if grad_scale is None else grad_scale.to(device, non_blocking=True)
                inf = None if found_inf is None else found_inf.to(device, non_blocking=True)
                torch._foreach_add_(steps, 1)
                torch._fused_adamw_(params, grads, exp_avgs, exp_avg_sqs, [], steps, amsgrad=False,
                                    lr=group["lr"], beta1=beta1, beta2=beta2, weight_decay=group["weight_decay"],
                                    eps=group["eps"], maximize=False, grad_scale=scale, found_inf=inf)
                if inf is not None:  # a skipped step is not counted
                    torch._foreach_sub_(steps, [inf] * len(steps))


def fused_adamw_devices() -> list[str]:
    """The device types torch.optim.AdamW(fused=True) accepts in this PyTorch (2.4: cuda, xpu, cpu;
    mps from 2.5)."""
    from torch.utils._foreach_utils import _get_fused_kernels_supported_devices

    return list(_get_fused_kernels_supported_devices())


class Muon(Optimizer):
    """MomentUm Orthogonalized by Newton-Schulz, for 2-D weight matrices only.

    Each step: momentum buffer m = mu * m + g; the update direction is the Nesterov look-ahead
    g + mu * m, orthogonalised, scaled by sqrt(max(1, rows / cols)) so that every matrix gets a
    comparable per-element step. Parameters with `split` > 1 (the fused q, k, v projection) are
    orthogonalised as that many separate square blocks.
    """

    def __init__(self, params, lr: float = 0.02, momentum: float = 0.95, weight_decay: float = 0.0,
                 ns_steps: int = 5):
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay, ns_steps=ns_steps))

    @torch.no_grad()
    def step(self) -> None:
        for group in self.param_groups:
            lr, mu, wd = group["lr"], group["momentum"], group["weight_decay"]
            # Matrices of one shape (up to a transpose) are orthogonalised as one batch: a small model's
            # iteration is mostly per-call overhead (the default's in 2 batches: 1.5x, benchmarks/README.md).
            by_shape: dict[tuple[int, int], list[tuple[torch.Tensor, torch.Tensor]]] = {}
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p)
                buf = state["momentum_buffer"]
                buf.mul_(mu).add_(p.grad)
                g = p.grad.add(buf, alpha=mu)
                split = getattr(p, "muon_split", 1)
                g = g.view(split, p.shape[0] // split, p.shape[1])
                g = g.mT if g.shape[1] > g.shape[2] else g  # wide: (split, m, n) with m <= n
                by_shape.setdefault(tuple(g.shape[1:]), []).append((p, g))
            for items in by_shape.values():
                updates = orthogonalize(torch.cat([g for _, g in items]), group["ns_steps"])
                for (p, g), update in zip(items, updates.split([len(g) for _, g in items])):
                    rows, cols = p.shape[0] // len(g), p.shape[1]
                    if rows > cols:
                        update = update.mT
                    if wd:
                        p.mul_(1 - lr * wd)
                    p.add_(update.reshape(p.shape), alpha=-lr * math.sqrt(max(1.0, rows / cols)))


# What build_optimizers returns: the project's own optimizers, or torch's AdamW where no fused one exists.
AnyOptimizer = Optimizer | torch.optim.Optimizer


def build_optimizers(model: nn.Module, train: TrainConfig, device: torch.device) -> list[AnyOptimizer]:
    """AdamW with weight decay on matrices only; with optimizer 'muon' the blocks' matrices go to Muon."""
    muon_params, decay, no_decay = [], [], []
    seen = set()
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        if train.optimizer == "muon" and p.dim() == 2 and name.startswith("blocks."):
            if name.endswith("attn.c_attn.weight"):
                p.muon_split = 3
            muon_params.append(p)
        elif p.dim() >= 2:
            decay.append(p)
        else:
            no_decay.append(p)
    groups = [
        {"params": decay, "weight_decay": train.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    # Fused AdamW is one kernel for all parameters. Where PyTorch has none (MPS before 2.5), its
    # torch.optim.AdamW (and with it the import of torch._dynamo) does the step.
    betas = (train.beta1, train.beta2)
    if device.type in fused_adamw_devices():
        adamw: AnyOptimizer = AdamW(groups, lr=train.learning_rate, betas=betas)
    else:
        adamw = torch.optim.AdamW(groups, lr=train.learning_rate, betas=betas)
    for group in adamw.param_groups:
        group["base_lr"] = train.learning_rate
        group["min_lr"] = train.min_lr
    optimizers: list[AnyOptimizer] = [adamw]
    if muon_params:
        # No weight decay on Muon's matrices (train.weight_decay is AdamW's): the recipe the default
        # config was tuned with has none, and the README says so.
        muon = Muon(muon_params, lr=train.muon_lr, momentum=train.muon_momentum)
        for group in muon.param_groups:
            group["base_lr"] = train.muon_lr
            group["min_lr"] = train.muon_lr * train.min_lr / train.learning_rate
        optimizers.append(muon)
    return optimizers


# Under a time budget the warm-up ends by this share of the training time at the latest: a short
# budget (a hundred steps on a slow CPU) would otherwise spend half its steps below the base rate.
WARMUP_SHARE = 0.05


def lr_factor(train: TrainConfig, step: int, progress: float, time_share: float | None = None) -> float:
    """Where the learning rate stands between min_lr (0) and its base (1).

    Linear warm-up over warmup_iters steps, then by training progress (0 to 1, by steps or by the
    time budget, whichever is further along): 'cosine' decays over the whole rest of the run,
    'wsd' (warm-up, stable, decay) holds the base rate and decays over the final decay_fraction
    (train.decay_shape: 1 - sqrt of the decay's progress, or linearly). Under a time budget,
    `time_share` (the share of its training time gone) ends the warm-up at WARMUP_SHARE of that
    time if warmup_iters steps have not ended it sooner.
    """
    if train.warmup_iters and step < train.warmup_iters:
        warm = (step + 1) / train.warmup_iters
        if time_share is not None:
            warm = max(warm, time_share / WARMUP_SHARE)
        if warm < 1.0:
            return warm
    progress = min(max(progress, 0.0), 1.0)
    if train.schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    if train.decay_fraction == 0:
        return 1.0
    remaining = min(1.0, (1.0 - progress) / train.decay_fraction)  # 1 until the decay, then down to 0
    return 1.0 - math.sqrt(1.0 - remaining) if train.decay_shape == "sqrt" else remaining


def set_lr(optimizers: Sequence[AnyOptimizer], factor: float) -> float:
    for opt in optimizers:
        for group in opt.param_groups:
            group["lr"] = group["min_lr"] + factor * (group["base_lr"] - group["min_lr"])
    return optimizers[0].param_groups[0]["lr"]
