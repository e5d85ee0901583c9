"""The decoder-only GPT: forward(idx, kv_cache=None) -> logits (B, T, vocab_size)."""

# No `from __future__ import annotations` here: TorchScript must read DecodeStep's annotations.
import functools
import math
import platform
import warnings
from typing import List, Optional

import torch
import torch.nn.functional as F
from torch import nn

from minigpt_cli.config import ModelConfig
from minigpt_cli.kv_cache import KVCache


class Linear(nn.Linear):
    """nn.Linear whose weight may be stored in a lower precision than the activations.

    Sampling with --dtype bfloat16 keeps the weight matrices in bfloat16 (half the bytes a decode
    step must read); the activations are cast to meet them. On CPU, prepare_for_inference may also
    attach `packed`, a copy of the weight in oneDNN's blocked layout, which this then uses.
    """

    packed: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed is not None and not torch.is_grad_enabled():
            return project(x.to(self.packed.dtype), self).to(x.dtype)
        if x.dtype == self.weight.dtype or torch.is_autocast_enabled(x.device.type):
            return F.linear(x, self.weight, self.bias)
        return F.linear(x.to(self.weight.dtype), self.weight, self.bias).to(x.dtype)


class Norm(nn.Module):
    def __init__(self, config: ModelConfig, dim: int):
        super().__init__()
        self.kind = config.norm
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim)) if (config.bias and self.kind == "layernorm") else None
        self.eps = 1e-5

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return normalize(x, self.kind, self.weight, self.bias, self.eps)


def normalize(x: torch.Tensor, kind: str, weight: torch.Tensor, bias: torch.Tensor | None, eps: float) -> torch.Tensor:
    """RMSNorm or LayerNorm over the last dimension (bias only for LayerNorm)."""
    if kind == "rmsnorm":
        return F.rms_norm(x, weight.shape, weight, eps)
    return F.layer_norm(x, weight.shape, weight, bias, eps)


def sinusoidal_table(block_size: int, n_embd: int) -> torch.Tensor:
    """The fixed encoding of 'Attention Is All You Need': sin on even, cos on odd channels."""
    position = torch.arange(block_size, dtype=torch.float32)[:, None]
    freq = torch.exp(torch.arange(0, n_embd, 2, dtype=torch.float32) * (-math.log(10000.0) / n_embd))
    table = torch.zeros(block_size, n_embd)
    table[:, 0::2] = torch.sin(position * freq)
    table[:, 1::2] = torch.cos(position * freq[: n_embd // 2])
    return table  # (block_size, C)


def rope_tables(block_size: int, head_dim: int, base: float = 10000.0) -> tuple[torch.Tensor, torch.Tensor]:
    inv_freq = 1.0 / base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    angles = torch.outer(torch.arange(block_size, dtype=torch.float32), inv_freq)  # (block_size, head_dim/2)
    angles = torch.cat([angles, angles], dim=-1)  # (block_size, head_dim)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate channel pairs (i, i + head_dim/2) by a position-dependent angle. x: (..., head_dim)."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


class CausalSelfAttention(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.n_head = config.n_head
        self.n_embd = config.n_embd
        self.head_dim = config.head_dim
        self.dropout = config.dropout
        self.qk_norm = config.qk_norm
        self.c_attn = Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = Linear(config.n_embd, config.n_embd, bias=config.bias)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None,
                kv_cache: KVCache | None, layer: int) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q = q.view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, n_head, T, head_dim)
        k = k.view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, n_head, T, head_dim)
        v = v.view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, n_head, T, head_dim)
        if self.qk_norm:
            q = F.rms_norm(q, (self.head_dim,))
            k = F.rms_norm(k, (self.head_dim,))
        if rope is not None:
            q = apply_rope(q, *rope)
            k = apply_rope(k, *rope)
        past = 0
        if kv_cache is not None:
            past = kv_cache.length
            k_all, v_all = kv_cache.update(layer, k, v)
            if past:
                k, v = k_all, v_all  # (B, n_head, past + T, head_dim)
        dropout = self.dropout if self.training else 0.0
        if past == 0:
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True)
        elif T == 1:
            # One new position attends to every cached one: no mask needed.
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout)
        else:
            # Several new positions after cached ones: position past + i sees keys 0 .. past + i.
            mask = torch.ones(T, past + T, dtype=torch.bool, device=x.device).tril(diagonal=past)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)
        y = y.transpose(1, 2).reshape(y.shape[0], T, C)  # (B, T, C)
        y = self.c_proj(y)
        return F.dropout(y, dropout, training=True) if dropout else y


class MLP(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        hidden = config.mlp_ratio * config.n_embd
        self.c_fc = Linear(config.n_embd, hidden, bias=config.bias)
        self.c_proj = Linear(hidden, config.n_embd, bias=config.bias)
        self.activation = config.activation
        self.dropout = config.dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.c_fc(x)
        h = F.relu(h).square() if self.activation == "relu2" else F.gelu(h, approximate="tanh")
        h = self.c_proj(h)
        # Called only when it acts: even a no-op module call costs time in every decode step.
        return F.dropout(h, self.dropout, training=True) if (self.training and self.dropout) else h


class Block(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.pre_norm = config.norm_placement == "pre"
        self.norm_1 = Norm(config, config.n_embd)
        self.attn = CausalSelfAttention(config)
        self.norm_2 = Norm(config, config.n_embd)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, rope, kv_cache: KVCache | None, layer: int) -> torch.Tensor:
        if self.pre_norm:
            x = x + self.attn(self.norm_1(x), rope, kv_cache, layer)
            return x + self.mlp(self.norm_2(x))
        x = self.norm_1(x + self.attn(x, rope, kv_cache, layer))
        return self.norm_2(x + self.mlp(x))


class GPT(nn.Module):
    def __init__(self, config: ModelConfig, vocab_size: int):
        super().__init__()
        self.config = config
        self.vocab_size = vocab_size
        self.wte = nn.Embedding(vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.block_size, config.n_embd) if config.pos_encoding == "learned" else None
        if config.pos_encoding == "sinusoidal":
            self.register_buffer("pos_table", sinusoidal_table(config.block_size, config.n_embd), persistent=False)
        else:
            self.pos_table = None
        if config.pos_encoding == "rope":
            cos, sin = rope_tables(config.block_size, config.head_dim)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)
        else:
            self.rope_cos = self.rope_sin = None
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        # Post-norm blocks already end in a norm; pre-norm needs one before the head.
        self.norm_f = Norm(config, config.n_embd) if config.norm_placement == "pre" else None
        self.lm_head = Linear(config.n_embd, vocab_size, bias=False)
        if config.tie_weights:
            self.lm_head.weight = self.wte.weight
        # Set by prepare_for_inference where a faster one-position step is available (see Decoder).
        self.decoder: Decoder | None = None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for name, p in self.named_parameters():
            if p.dim() < 2:
                continue
            if name.endswith("c_proj.weight"):
                if self.config.zero_init_proj:
                    nn.init.zeros_(p)
                else:
                    # GPT-2: scale residual projections by 1/sqrt(2 * n_layer) so the stream's variance stays put.
                    nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * self.config.n_layer))
            else:
                nn.init.normal_(p, mean=0.0, std=0.02)
        for module in self.modules():
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def forward(self, idx: torch.Tensor, kv_cache: KVCache | None = None) -> torch.Tensor:
        B, T = idx.shape
        start = kv_cache.length if kv_cache is not None else 0
        if start + T > self.config.block_size:
            raise ValueError(f"sequence of {start + T} positions exceeds block_size {self.config.block_size}")
        if (T == 1 and self.decoder is not None and kv_cache is not None and kv_cache.batch_size == B
                and not self.training):
            return self.decoder(idx, kv_cache)
        x = self.wte(idx)  # (B, T, C)
        if self.wpe is not None:
            x = x + self.wpe.weight[start:start + T]
        elif self.pos_table is not None:
            x = x + self.pos_table[start:start + T].to(x.dtype)
        if self.training and self.config.dropout:
            x = F.dropout(x, self.config.dropout, training=True)
        rope = None
        if self.rope_cos is not None:
            rope = (self.rope_cos[start:start + T].to(x.dtype), self.rope_sin[start:start + T].to(x.dtype))
        for layer, block in enumerate(self.blocks):
            x = block(x, rope, kv_cache, layer)
        if kv_cache is not None:
            kv_cache.advance(T)
        if self.norm_f is not None:
            x = self.norm_f(x)
        logits = self.lm_head(x)  # (B, T, vocab_size)
        if self.config.logit_softcap:
            cap = self.config.logit_softcap
            logits = cap * torch.tanh(logits / cap)
        return logits

    def new_kv_cache(self, batch_size: int) -> KVCache:
        """A cache in the dtype of the residual stream (the embedding's), on the model's device."""
        weight = self.wte.weight
        c = self.config
        return KVCache(c.n_layer, batch_size, c.n_head, c.block_size, c.head_dim,
                       dtype=weight.dtype, device=weight.device)


# ---------------------------------------------------------------------------------------------
# Inference: oneDNN's prepacked matrices (CPU) and a lean one-position decode step.
# ---------------------------------------------------------------------------------------------

@functools.cache
def onednn_linear():
    """oneDNN's linear on a weight reordered once into its blocked layout (the operator behind
    torch.compile's CPU freezing), with an optional activation post-op. Looked up when first
    needed, as a build of PyTorch without oneDNN lacks it."""
    return torch.ops.mkldnn._linear_pointwise.default

# A oneDNN call costs about 13 us more than MKL's F.linear before it reads a byte (measured on a
# 2-core EPYC), so float32 matrices are packed only when large enough to repay that: for a vector
# through a 384 x 384 matrix, packed takes 40 us against 58 us; through the 65 x 384 head, 19 us
# against 9 us; and a decode step of the default 4 x 128 model takes 0.69 ms with none of its
# 128 x 512 matrices packed against 0.99 ms with them. bfloat16 matrices are always packed:
# F.linear on them is oneDNN without the packing.
PACK_MIN_ELEMENTS = 2**17


def _worth_packing(weight: torch.Tensor) -> bool:
    return weight.dtype != torch.float32 or weight.numel() >= PACK_MIN_ELEMENTS


@functools.cache
def packing_supported(dtype: torch.dtype) -> bool:
    """True where oneDNN's prepacked linear runs here and agrees with F.linear (x86-64 CPUs only:
    that is where it was measured to be faster)."""
    if platform.machine().lower() not in ("x86_64", "amd64") or not torch.backends.mkldnn.is_available():
        return False
    try:
        with torch.inference_mode():
            generator = torch.Generator().manual_seed(0)
            weight = torch.randn(24, 40, generator=generator).to(dtype)
            x = torch.randn(3, 40, generator=generator).to(dtype)
            got = onednn_linear()(x, pack_weight(weight), None, "none", [], "").float()
            want = F.linear(x.float(), weight.float())
    except (RuntimeError, AttributeError, NotImplementedError):
        return False
    tolerance = 1e-4 if dtype == torch.float32 else 0.1
    return got.shape == want.shape and bool(((got - want).abs() <= tolerance * (1 + want.abs())).all())


def pack_weight(weight: torch.Tensor) -> torch.Tensor:
    """The matrix reordered into oneDNN's layout for onednn_linear (an opaque tensor, for inference only)."""
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous(), 1)


def project(x: torch.Tensor, m: Linear) -> torch.Tensor:
    """m(x) with the kernel prepare_for_inference chose for m; x in m's weight dtype."""
    if m.packed is not None:
        return onednn_linear()(x, m.packed, m.bias, "none", [], "")
    return F.linear(x, m.weight, m.bias)


# The step itself, in the subset of Python that TorchScript compiles (typing.List/Optional
# annotations, no closures), so the same code runs three ways: as plain Python, scripted (the CPU
# default), and traced by torch.compile with fixed shapes (CUDA graphs on a GPU).

class DecodeStep(nn.Module):
    """GPT.forward's arithmetic for one new position per row, reading and writing the KV cache.

    forward(idx (B, 1), position, kv (n_layer, B, 2, n_head, block_size, head_dim), fixed_position)
    -> logits (B, 1, vocab_size) in float32. With fixed_position None, `position` (an int) is
    where the new keys and values go, and attention reads the positions up to it. With a (1,)
    tensor fixed_position instead, every shape is the same at every step (for torch.compile):
    the keys and values go in with index_copy_ and attention reads the whole cache, masked.

    Made from a prepared model's weights (after packing). Matrices are held as a flat list, four
    per block (attention in, attention out, MLP in, MLP out) and then the head; `packed[j]` says
    matrix j is in oneDNN's blocked layout.
    """

    positions: Optional[torch.Tensor]
    rope_cos: Optional[torch.Tensor]
    rope_sin: Optional[torch.Tensor]
    norm_weights: List[torch.Tensor]
    norm_biases: List[Optional[torch.Tensor]]
    weights: List[torch.Tensor]
    biases: List[Optional[torch.Tensor]]
    packed: List[bool]

    def __init__(self, model: "GPT", dtype: torch.dtype):
        super().__init__()
        c = model.config

        def norm(module: Norm) -> tuple:
            bias = None if module.bias is None else module.bias.detach().to(dtype)
            return module.weight.detach().to(dtype), bias

        # Two norms per block (before attention and MLP, or after them when post-norm), then the
        # final norm if there is one, in `dtype`.
        norms = [norm(n) for b in model.blocks for n in (b.norm_1, b.norm_2)]
        if model.norm_f is not None:
            norms.append(norm(model.norm_f))
        matrices = [m for b in model.blocks for m in (b.attn.c_attn, b.attn.c_proj, b.mlp.c_fc, b.mlp.c_proj)]
        matrices.append(model.lm_head)
        self.wte = model.wte.weight.detach()
        self.positions = model.wpe.weight.detach() if model.wpe is not None else model.pos_table
        self.rope_cos = model.rope_cos
        self.rope_sin = model.rope_sin
        self.norm_weights = [w for w, _ in norms]
        self.norm_biases = [b for _, b in norms]
        self.weights = [m.weight if m.packed is None else m.packed for m in matrices]
        self.biases = [m.bias for m in matrices]
        self.packed = [m.packed is not None for m in matrices]
        self.n_layer = c.n_layer
        self.n_head = c.n_head
        self.head_dim = c.head_dim
        self.n_embd = c.n_embd
        self.dtype = dtype
        self.norm_kind = c.norm
        self.eps = model.blocks[0].norm_1.eps
        self.pre_norm = c.norm_placement == "pre"
        self.has_final_norm = model.norm_f is not None
        self.activation = "gelu" if c.activation == "gelu" else "relu2"
        # oneDNN's activation post-op where it pays: bfloat16 (see Decoder).
        self.fuse_activation = dtype != torch.float32
        self.qk_norm = c.qk_norm
        self.logit_softcap = float(c.logit_softcap or 0.0)

    def _norm(self, x: torch.Tensor, i: int) -> torch.Tensor:
        return normalize(x, self.norm_kind, self.norm_weights[i], self.norm_biases[i], self.eps)

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


def script_step(step: DecodeStep) -> Optional[torch.jit.ScriptModule]:
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


class Decoder:
    """The one-position step GPT.forward uses for T == 1 once prepare_for_inference has run: a
    DecodeStep made from the model's weights, run scripted by TorchScript on a
    CPU, compiled by torch.compile with `compile`, or else as Python.

    A decode step of a small model is bound by reading the weight matrices. Next comes the cost of
    each eager PyTorch operation, which is far above its few microseconds on a warm cache: each
    big matrix streams megabytes through the core's cache, evicting the code and data of the small
    operations between the products (measured on a 2-core EPYC: a 384-element add_ between packed
    products costs about 9 us, against 1 us in a loop). So the step runs as few operations as it
    can: no module calls; views between heads and channels; one copy to store a position's key
    and value; residual adds and activations in place on the products' outputs. oneDNN's
    activation post-ops pay in bfloat16 but not in float32, where its GELU adds about 20 us to a
    384 x 1536 product against about 4 us for GELU after it; its fused add was no faster than add_.
    With `dtype` bfloat16 the residual stream, norms and matrices run in bfloat16, while attention
    and the KV cache stay float32 (faster on a CPU than bfloat16 attention, and exact). Measured
    on the default run's model with an earlier form of this step, a bfloat16 residual stream
    changed the validation loss by less than 0.001 (1.40017 against 1.40039 in float32).
    """

    def __init__(self, model: GPT, dtype: torch.dtype, script_on_cpu: bool = True):
        self.step = DecodeStep(model, dtype)
        on_cpu = model.lm_head.weight.device.type == "cpu"
        self.scripted = script_step(self.step) if script_on_cpu and on_cpu else None
        self.compiled = None  # set by compile()

    def compile(self, cache_device: torch.device) -> None:
        """Compile the fixed-shape step with torch.compile; on CUDA with CUDA graphs ("reduce-overhead"),
        so a step is one graph replay instead of a few hundred kernel launches."""
        mode = "reduce-overhead" if cache_device.type == "cuda" else None
        self.compiled = torch.compile(self.step, mode=mode, fullgraph=True)

    def __call__(self, idx: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """idx (B, 1) -> logits (B, 1, vocab_size) in float32; stores the position in `cache`."""
        cache.end_after(1)  # raises if the cache is full
        if self.compiled is not None:
            if not cache.static_address:
                # Written in place by every replay: a CUDA graph must see it at a fixed address.
                torch._dynamo.mark_static_address(cache.kv, guard=False)
                cache.static_address = True
            position = torch.full((1,), cache.length, dtype=torch.long, device=idx.device)
            logits = self.compiled(idx, 0, cache.kv, position)
        else:
            step = self.scripted if self.scripted is not None else self.step
            logits = step(idx, cache.length, cache.kv)
        cache.advance(1)
        return logits


@torch.no_grad()
def prepare_for_inference(model: GPT, dtype: torch.dtype = torch.float32, fast: bool = True,
                          compile: bool = False, script: bool = True) -> GPT:
    """Ready a model for sampling: weight matrices in `dtype`; embeddings and the KV cache float32.

    A decode step reads every weight matrix once, so its time is set by the bytes read and by how
    well the matrix-vector product reads them: bfloat16 matrices halve the bytes. On CPU each
    matrix is stored transposed (column-major for F.linear), which MKL reads about 25% faster
    than row-major over the 6 x 384 model's matrices. With `fast` (the default):
    - single-position steps run through Decoder, one flat DecodeStep with about half the module
      path's operations (417 against 734 for the 6 x 384 model); with `script` (the default)
      TorchScript compiles it on a CPU, which takes about 0.2 s and saves the Python
      interpreter's share of every operation (a step of the 6 x 384 model: 2.79 ms against
      3.23 ms as Python);
    - on an x86-64 CPU where oneDNN works, the matrices worth it (_worth_packing) are reordered
      once into oneDNN's layout (the 6 x 384 model's matrices take 2.0 ms that way against
      3.1 ms with F.linear in float32, and 0.9 ms against 1.5 ms in bfloat16).
    `compile` (with `fast`) compiles DecodeStep's fixed-shape form with torch.compile, with CUDA
    graphs on a GPU; the first steps then wait for the compiler (about 10 s for a tiny model on
    this CPU, where compiled steps are no faster than eager ones).
    Tied embedding and head weights are untied: the embedding stays float32. The prepared model
    is for inference only and frozen: packed matrices and Decoder's copies of the norms do not
    follow later changes to the weights (load_state_dict, .to(device)); prepare a fresh model.
    """
    model.eval()
    on_cpu = model.lm_head.weight.device.type == "cpu"
    # oneDNN's packed linear has no fake-tensor implementation, so torch.compile cannot trace it.
    pack = fast and on_cpu and not compile and packing_supported(dtype)
    for module in model.modules():
        if isinstance(module, Linear):
            weight = module.weight.detach().to(dtype)
            if on_cpu:
                weight = weight.t().contiguous().t()
            module.weight = nn.Parameter(weight, requires_grad=False)
            if module.bias is not None:
                module.bias = nn.Parameter(module.bias.detach().to(dtype), requires_grad=False)
            module.packed = pack_weight(weight) if pack and _worth_packing(weight) else None
    # float16 (GPUs only) keeps the module path, whose residual stream stays float32: Decoder's
    # would be float16, whose range (65504) a residual stream can outgrow.
    model.decoder = Decoder(model, dtype, script and not compile) if fast and dtype != torch.float16 else None
    if compile and model.decoder is not None:
        model.decoder.compile(model.lm_head.weight.device)
    return model
