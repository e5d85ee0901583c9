"""Optimizers: AdamW groups, Muon for hidden weight matrices, and the learning-rate schedule."""

from __future__ import annotations

import math

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


class Muon(torch.optim.Optimizer):
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
    def step(self, closure=None):
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


def build_optimizers(model: nn.Module, train: TrainConfig, device: torch.device) -> list[torch.optim.Optimizer]:
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
    # Fused AdamW is one kernel for all parameters; PyTorch offers it on CUDA, MPS and CPU.
    fused = device.type in ("cuda", "cpu", "mps")
    try:
        adamw = torch.optim.AdamW(groups, lr=train.learning_rate, betas=(train.beta1, train.beta2), fused=fused)
    except (RuntimeError, TypeError):
        adamw = torch.optim.AdamW(groups, lr=train.learning_rate, betas=(train.beta1, train.beta2))
    for group in adamw.param_groups:
        group["base_lr"] = train.learning_rate
        group["min_lr"] = train.min_lr
    optimizers: list[torch.optim.Optimizer] = [adamw]
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
    'wsd' (warm-up, stable, decay) holds the base rate and decays linearly over the final
    decay_fraction. Under a time budget, `time_share` (the share of its training time gone) ends
    the warm-up at WARMUP_SHARE of that time if warmup_iters steps have not ended it sooner.
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
    return min(1.0, (1.0 - progress) / train.decay_fraction)


def set_lr(optimizers: list[torch.optim.Optimizer], factor: float) -> float:
    for opt in optimizers:
        for group in opt.param_groups:
            group["lr"] = group["min_lr"] + factor * (group["base_lr"] - group["min_lr"])
    return optimizers[0].param_groups[0]["lr"]
