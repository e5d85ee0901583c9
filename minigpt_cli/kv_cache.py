"""A key/value store for every layer, allocated once for block_size positions."""

from __future__ import annotations

import torch


class KVCache:
    """Keys and values of the positions seen so far, written in place (no concatenation per step).

    One tensor `kv` of shape (n_layer, B, 2, n_head, block_size, head_dim) holds both, so a decode
    step can store a position's key and value with a single copy; `k` and `v` are views of it,
    (n_layer, B, n_head, block_size, head_dim) each. A forward pass writes each layer's new
    positions at [length, length + T) through `update`, then calls `advance(T)` once.
    """

    def __init__(self, n_layer: int, batch_size: int, n_head: int, block_size: int, head_dim: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
        self.kv = torch.zeros((n_layer, batch_size, 2, n_head, block_size, head_dim), dtype=dtype, device=device)
        self.k = self.kv[:, :, 0]
        self.v = self.kv[:, :, 1]
        # Per-layer views, made once, so a step indexes no more than it must.
        self.k_layers = [self.k[i] for i in range(n_layer)]
        self.v_layers = [self.v[i] for i in range(n_layer)]
        self.length = 0
        # Set once `kv` is marked as living at a fixed address for a compiled decode step.
        self.static_address = False

    @property
    def batch_size(self) -> int:
        return self.k.shape[1]

    @property
    def block_size(self) -> int:
        return self.k.shape[3]

    def update(self, layer: int, k_new: torch.Tensor, v_new: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store (B, n_head, T, head_dim) keys and values after the cached ones; return all of them.

        A batch of 1 is broadcast to every row, so several samples can share one prefill of the prompt.
        """
        end = self.end_after(k_new.shape[2])
        k, v = self.k_layers[layer], self.v_layers[layer]
        k[:, :, self.length:end] = k_new
        v[:, :, self.length:end] = v_new
        return k[:, :, :end], v[:, :, :end]  # (B, n_head, end, head_dim)

    def end_after(self, n: int) -> int:
        """The length after storing n more positions; raises if they do not fit."""
        end = self.length + n
        if end > self.block_size:
            raise ValueError(f"KV cache full: {end} positions needed, {self.block_size} allocated")
        return end

    def advance(self, n: int) -> None:
        self.length += n

    def reset(self) -> None:
        self.length = 0

    @property
    def nbytes(self) -> int:
        return self.kv.nbytes

