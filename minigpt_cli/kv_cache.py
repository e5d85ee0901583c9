"""A key/value store for every layer, allocated once for block_size positions."""

from __future__ import annotations

import torch


class KVCache:
    """Keys and values of the positions seen so far, written in place (no concatenation per step).

    One tensor `kv` of shape (n_layer, B, 2, n_head, block_size, head_dim) holds both, so a decode
    step can store a position's key and value with a single copy; `k` and `v` are views of it,
    (n_layer, B, n_head, block_size, head_dim) each. A forward pass writes each layer's new
    positions at [length, length + T) through `update`, then calls `advance(T)` once.

    With input_slots (a model with short convolutions: 2, attention's and the MLP's), `inputs`
    (n_layer * input_slots, B, block_size, n_head * head_dim) keeps those sublayers' inputs as well,
    written through `update_inputs`.
    """

    def __init__(self, n_layer: int, batch_size: int, n_head: int, block_size: int, head_dim: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu", input_slots: int = 0):
        self.kv = torch.zeros((n_layer, batch_size, 2, n_head, block_size, head_dim), dtype=dtype, device=device)
        self.inputs = (torch.zeros((n_layer * input_slots, batch_size, block_size, n_head * head_dim), dtype=dtype,
                                   device=device) if input_slots else None)
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
        # In the new keys' dtype: a bfloat16 cache (on a GPU) serves a float32 prefill too.
        return k[:, :, :end].to(k_new.dtype), v[:, :, :end].to(v_new.dtype)  # (B, n_head, end, head_dim)

    def update_inputs(self, slot: int, x_new: torch.Tensor) -> torch.Tensor:
        """Store a sublayer's (B, T, C) inputs after the cached ones (a batch of 1 broadcast, as in
        update); return all of them, (B, length + T, C)."""
        assert self.inputs is not None, "this cache keeps no inputs (the model has no short convolution)"
        end = self.end_after(x_new.shape[1])
        inputs = self.inputs[slot]
        inputs[:, self.length:end] = x_new
        return inputs[:, :end].to(x_new.dtype)  # a no-op when the dtypes agree (always, on a CPU)

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
        return self.kv.nbytes + (self.inputs.nbytes if self.inputs is not None else 0)

