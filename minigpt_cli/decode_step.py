"""One decode step of a prepared model as a module TorchScript can compile (see model.Decoder).

Written in the subset of Python that TorchScript compiles (typing.List/Optional annotations, no
closures), so the same code runs three ways: as plain Python, scripted (the CPU default), and
traced by torch.compile with fixed shapes (CUDA graphs on a GPU).
"""

import warnings
from typing import List, Optional

import torch
import torch.nn.functional as F
from torch import nn


class DecodeStep(nn.Module):
    """GPT.forward's arithmetic for one new position per row, reading and writing the KV cache.

    forward(idx (B, 1), position, kv (n_layer, B, 2, n_head, block_size, head_dim), fixed_position)
    -> logits (B, 1, vocab_size) in float32. With fixed_position None, `position` (an int) is
    where the new keys and values go, and attention reads the positions up to it. With a (1,)
    tensor fixed_position instead, every shape is the same at every step (for torch.compile):
    the keys and values go in with index_copy_ and attention reads the whole cache, masked.

    Matrices come as a flat list, four per block (attention in, attention out, MLP in, MLP out)
    and then the head; `packed[j]` says matrix j is in oneDNN's blocked layout.
    """

    positions: Optional[torch.Tensor]
    rope_cos: Optional[torch.Tensor]
    rope_sin: Optional[torch.Tensor]
    norm_weights: List[torch.Tensor]
    norm_biases: List[Optional[torch.Tensor]]
    weights: List[torch.Tensor]
    biases: List[Optional[torch.Tensor]]
    packed: List[bool]

    def __init__(self, *, wte: torch.Tensor, positions: Optional[torch.Tensor], rope: Optional[tuple],
                 norms: list, weights: list, biases: list, packed: list, n_layer: int, n_head: int,
                 head_dim: int, dtype: torch.dtype, norm_kind: str, pre_norm: bool, activation: str,
                 fuse_activation: bool, qk_norm: bool, logit_softcap: float):
        super().__init__()
        self.wte = wte
        self.positions = positions
        self.rope_cos = None if rope is None else rope[0]
        self.rope_sin = None if rope is None else rope[1]
        # Two norms per block (before attention and MLP, or after them when post-norm), then
        # the final norm if there is one: (weight, bias or None) each, in `dtype`.
        self.norm_weights = [w for w, _ in norms]
        self.norm_biases = [b for _, b in norms]
        self.weights = weights
        self.biases = biases
        self.packed = packed
        self.n_layer = n_layer
        self.n_head = n_head
        self.head_dim = head_dim
        self.n_embd = n_head * head_dim
        self.dtype = dtype
        self.norm_kind = norm_kind
        self.eps = 1e-5
        self.pre_norm = pre_norm
        self.has_final_norm = len(norms) > 2 * n_layer
        self.activation = activation  # "gelu" or "relu2"
        self.fuse_activation = fuse_activation
        self.qk_norm = qk_norm
        self.logit_softcap = logit_softcap

    def _norm(self, x: torch.Tensor, i: int) -> torch.Tensor:
        if self.norm_kind == "rmsnorm":
            return torch.rms_norm(x, [self.n_embd], self.norm_weights[i], self.eps)
        return torch.layer_norm(x, [self.n_embd], self.norm_weights[i], self.norm_biases[i], self.eps)

    def _linear(self, x: torch.Tensor, j: int, activation: str = "none") -> torch.Tensor:
        if self.packed[j]:
            return torch.ops.mkldnn._linear_pointwise(x, self.weights[j], self.biases[j], activation, [],
                                                     "tanh" if activation == "gelu" else "")
        return F.linear(x, self.weights[j], self.biases[j])

    def _mlp_hidden(self, x: torch.Tensor, j: int) -> torch.Tensor:
        """The MLP's hidden activations for x (normalized): GELU, or ReLU squared."""
        gelu = self.activation == "gelu"
        if self.fuse_activation and self.packed[j]:
            h = self._linear(x, j, "gelu" if gelu else "relu")
        else:
            h = self._linear(x, j)
            h = torch.ops.aten.gelu_(h, approximate="tanh") if gelu else h.relu_()
        return h if gelu else h.square_()

    def forward(self, idx: torch.Tensor, position: int, kv_all: torch.Tensor,
                fixed_position: Optional[torch.Tensor] = None) -> torch.Tensor:
        B = idx.shape[0]
        H, D, C = self.n_head, self.head_dim, self.n_embd
        attention_dtype = kv_all.dtype  # attention and the cache run in the cache's dtype
        x = torch.index_select(self.wte, 0, idx.view(B))  # (B, C), a new tensor
        positions = self.positions
        if positions is not None:
            if fixed_position is None:
                x.add_(positions[position])
            else:
                x.add_(positions.index_select(0, fixed_position))
        if x.dtype != self.dtype:
            x = x.to(self.dtype)
        for layer in range(self.n_layer):
            qkv = self._linear(self._norm(x, 2 * layer) if self.pre_norm else x, 4 * layer).view(B, 3, H, D)
            rope_cos, rope_sin = self.rope_cos, self.rope_sin
            if self.qk_norm or rope_cos is not None:
                q, k, v = qkv.unbind(1)  # (B, H, D) each
                if self.qk_norm:
                    q = torch.rms_norm(q, [D])
                    k = torch.rms_norm(k, [D])
                if rope_cos is not None and rope_sin is not None:
                    if fixed_position is None:
                        cos, sin = rope_cos[position], rope_sin[position]  # (D,)
                    else:
                        cos, sin = rope_cos.index_select(0, fixed_position), rope_sin.index_select(0, fixed_position)
                    q = apply_rope(q, cos, sin)
                    k = apply_rope(k, cos, sin)
                new = torch.stack([k, v], dim=1)  # (B, 2, H, D)
                q = q.unsqueeze(2)
            else:
                new = qkv[:, 1:]  # keys and values, stored with one copy
                q = qkv[:, :1].transpose(1, 2)
            if q.dtype != attention_dtype:
                q = q.to(attention_dtype)  # (B, H, 1, D)
            kv = kv_all[layer]  # (B, 2, H, block_size, D)
            if fixed_position is None:
                kv.select(3, position).copy_(new)
                y = F.scaled_dot_product_attention(q, kv[:, 0, :, :position + 1], kv[:, 1, :, :position + 1])
            else:
                kv.index_copy_(3, fixed_position, new.unsqueeze(3).to(attention_dtype))
                block_size = kv.shape[-2]
                visible = (torch.arange(block_size, device=idx.device) <= fixed_position).view(1, 1, 1, block_size)
                y = F.scaled_dot_product_attention(q, kv[:, 0], kv[:, 1], attn_mask=visible)
            y = y.view(B, C)  # (B, H, 1, D) -> (B, C)
            if y.dtype != self.dtype:
                y = y.to(self.dtype)
            x = self._linear(y, 4 * layer + 1).add_(x)
            if not self.pre_norm:
                x = self._norm(x, 2 * layer)
            h = self._mlp_hidden(self._norm(x, 2 * layer + 1) if self.pre_norm else x, 4 * layer + 2)
            x = self._linear(h, 4 * layer + 3).add_(x)
            if not self.pre_norm:
                x = self._norm(x, 2 * layer + 1)
        if self.has_final_norm:
            x = self._norm(x, 2 * self.n_layer)
        logits = self._linear(x, 4 * self.n_layer)
        if logits.dtype != torch.float32:
            logits = logits.float()
        if self.logit_softcap > 0:
            logits = self.logit_softcap * torch.tanh(logits / self.logit_softcap)
        return logits.view(B, 1, -1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate channel pairs (i, i + head_dim/2) by a position-dependent angle. x: (..., head_dim)."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


def script(step: DecodeStep) -> Optional[torch.jit.ScriptModule]:
    """The step compiled by TorchScript, or None where that fails (no TorchScript in this build of
    PyTorch, no source files to read, an operator it cannot resolve): the step then runs as Python.

    TorchScript is deprecated in favour of torch.compile, but on a CPU it is what runs a decode
    step's ~150 small operations without a Python frame, argument parsing and Python tensor
    object apiece: 13% faster a step of the 6 x 384 model on a 2-core EPYC (2.79 against 3.23 ms),
    where torch.compile's CPU step was slower than eager.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.jit.script(step)
    except Exception:  # noqa: BLE001 - any failure to compile leaves the Python step, which is correct
        return None
