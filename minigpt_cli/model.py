"""The decoder-only GPT, to be read top to bottom.

One forward serves training, prefill and decoding: idx (B, T) -> logits (B, T, vocab_size). With a KV cache
(passed in: the model holds no inference state) new positions follow the cached ones, so decoding feeds T = 1
and gets (B, 1, vocab_size). The fast decode path (inference.py) is built from this file's functions.
"""

# No `from __future__ import annotations`: inference.py compiles these functions and reads their annotations.
import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from minigpt_cli.config import ModelConfig
from minigpt_cli.device import shapes_only
from minigpt_cli.kv_cache import KVCache


# --- The arithmetic: normalization, activation, positions, attention, logit cap ---------------

def normalize(x: torch.Tensor, kind: str, weight: torch.Tensor, bias: Optional[torch.Tensor], eps: float) -> torch.Tensor:
    """RMSNorm or LayerNorm over the last dimension (bias only for LayerNorm)."""
    if kind == "rmsnorm":
        return F.rms_norm(x, [x.shape[-1]], weight, eps)
    return F.layer_norm(x, [x.shape[-1]], weight, bias, eps)


def rms(x: torch.Tensor) -> torch.Tensor:
    """RMSNorm without a learned scale: the qk-norm of each head's queries and keys."""
    return F.rms_norm(x, [x.shape[-1]])


def mlp_activation(h: torch.Tensor, kind: str, inplace: bool = False) -> torch.Tensor:
    """GELU (GPT-2's tanh form) or ReLU squared (Primer; used by modded-nanoGPT). With `inplace`, h is
    overwritten: without autograd only (it needs h), where it saves allocations (evaluation is 16% faster)."""
    if kind == "relu2":
        return F.relu(h, inplace=True).square_() if inplace else F.relu(h).square()
    return torch.ops.aten.gelu_(h, approximate="tanh") if inplace else F.gelu(h, approximate="tanh")


def sinusoidal_table(block_size: int, n_embd: int) -> torch.Tensor:
    """The fixed encoding of 'Attention Is All You Need': sin on even, cos on odd channels (made as rope_tables)."""
    position = torch.arange(block_size, dtype=torch.float32, device="cpu")[:, None]
    freq = torch.exp(torch.arange(0, n_embd, 2, dtype=torch.float32, device="cpu") * (-math.log(10000.0) / n_embd))
    table = torch.zeros(block_size, n_embd, device="cpu")
    table[:, 0::2] = torch.sin(position * freq)
    table[:, 1::2] = torch.cos(position * freq[: n_embd // 2])
    return table.to(torch.get_default_device())  # (block_size, C)


def embedding_scale(config: ModelConfig) -> float:
    """Token embeddings are multiplied by this before positions are added. A sinusoidal row has norm
    sqrt(n_embd / 2) against 0.02 * sqrt(n_embd) for a new token embedding and would drown it (the
    original Transformer scales by sqrt(d_model))."""
    return math.sqrt(config.n_embd) if config.pos_encoding == "sinusoidal" else 1.0


def rope_tables(block_size: int, head_dim: int, base: float = 10000.0) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of each position's rotation angles, (block_size, head_dim) each. Computed on the CPU:
    on the meta device (device.shapes_only) these ops would import torch._dynamo, which takes seconds."""
    inv_freq = 1.0 / base ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device="cpu") / head_dim)
    angles = torch.outer(torch.arange(block_size, dtype=torch.float32, device="cpu"), inv_freq)  # (block_size, head_dim/2)
    angles = torch.cat([angles, angles], dim=-1)  # (block_size, head_dim)
    device = torch.get_default_device()
    return angles.cos().to(device), angles.sin().to(device)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate channel pairs (i, i + head_dim/2) by a position-dependent angle. x: (..., head_dim)."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


def softcap(logits: torch.Tensor, cap: float) -> torch.Tensor:
    """Squash logits smoothly into (-cap, cap) (Gemma 2); cap 0 leaves them alone."""
    return cap * torch.tanh(logits / cap) if cap > 0 else logits


def causal_conv(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """A causal depthwise 1-D convolution: y[t, c] = sum_j weight[c, 0, j] * x[t - k + 1 + j, c], with zeros
    before the first position. Each channel mixes only its own last k values. x: (B, T, C), weight: (C, 1, k)."""
    k = weight.shape[-1]
    return F.conv1d(F.pad(x.transpose(1, 2), (k - 1, 0)), weight, groups=x.shape[-1]).transpose(1, 2)


def visible_keys(T: int, past: int, device: torch.device) -> torch.Tensor:
    """(T, past + T) bool: new position past + i may look at keys 0 .. past + i (causal)."""
    return torch.ones(T, past + T, dtype=torch.bool, device=device).tril(diagonal=past)


def attention_probs(q: torch.Tensor, k: torch.Tensor, visible: Optional[torch.Tensor] = None) -> torch.Tensor:
    """softmax(q k^T / sqrt(head_dim)), hiding keys where `visible` is False.

    q: (B, n_head, T, head_dim), k: (B, n_head, S, head_dim) -> (B, n_head, T, S); each row sums to 1.
    """
    scores = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(q.shape[-1]))  # (B, n_head, T, S)
    if visible is not None:
        scores = scores.masked_fill(~visible, float("-inf"))
    return scores.softmax(dim=-1)


# --- One block, as functions over tensors ------------------------------------------------------
# Block.forward and the decode step (inference.DecodeStep, compiled by TorchScript) both call these, so
# each model option is written once; hence TorchScript's subset of Python (typed Optional, no closures).

def sublayer_input(x: torch.Tensor, pre_norm: bool, kind: str, weight: torch.Tensor, bias: Optional[torch.Tensor],
                   eps: float) -> torch.Tensor:
    """What a sublayer reads from the residual stream x: norm(x) in a pre-norm block (GPT-2), x itself in a
    post-norm one (the original Transformer)."""
    return normalize(x, kind, weight, bias, eps) if pre_norm else x


def residual(x: torch.Tensor, y: torch.Tensor, pre_norm: bool, kind: str, weight: torch.Tensor,
             bias: Optional[torch.Tensor], eps: float, inplace: bool = False) -> torch.Tensor:
    """The residual stream after a sublayer whose output is y: x + y, normalized in a post-norm block.
    With `inplace`, y is overwritten: a decode step's fresh product, so one allocation fewer."""
    x = y.add_(x) if inplace else x + y
    return x if pre_norm else normalize(x, kind, weight, bias, eps)


def queries_and_keys(q: torch.Tensor, k: torch.Tensor, qk_norm: bool, cos: Optional[torch.Tensor],
                     sin: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Queries and keys (..., head_dim) as attention compares them: RMS-normed per head with qk_norm,
    then rotated by RoPE's cos and sin (None without RoPE)."""
    if qk_norm:
        q, k = rms(q), rms(k)
    if cos is not None and sin is not None:
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    return q, k


def changes_queries_and_keys(config: ModelConfig) -> bool:
    """Whether queries_and_keys changes anything under this config (where it does not, a decode step
    stores the projected keys and values as they are, with one copy)."""
    return config.qk_norm or config.pos_encoding == "rope"


def written_out_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, visible: Optional[torch.Tensor] = None,
                          dropout: float = 0.0) -> torch.Tensor:
    """The textbook product softmax(q k^T / sqrt(head_dim)) v, with the (T, S) scores in memory.
    F.scaled_dot_product_attention computes the same without keeping them; tests hold the two equal."""
    probs = attention_probs(q, k, visible)
    if dropout:
        probs = F.dropout(probs, dropout, training=True)
    return probs @ v  # (B, n_head, T, head_dim)


# --- The modules -------------------------------------------------------------------------------

class Norm(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.kind = config.norm
        self.weight = nn.Parameter(torch.ones(config.n_embd))
        self.bias = nn.Parameter(torch.zeros(config.n_embd)) if (config.bias and self.kind == "layernorm") else None
        self.eps = 1e-5

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return normalize(x, self.kind, self.weight, self.bias, self.eps)

    def sublayer_input(self, x: torch.Tensor, pre_norm: bool) -> torch.Tensor:
        return sublayer_input(x, pre_norm, self.kind, self.weight, self.bias, self.eps)

    def residual(self, x: torch.Tensor, y: torch.Tensor, pre_norm: bool) -> torch.Tensor:
        return residual(x, y, pre_norm, self.kind, self.weight, self.bias, self.eps)


class ShortConv(nn.Module):
    """x + causal_conv(x) over the last `short_conv` positions, on the input of attention and of the MLP.

    A character model's first need is the previous few characters, which attention has to learn to find
    head by head; here each channel gets them directly, for 2k FLOPs a channel. The weights start at zero,
    so a block starts as it would without them. The "Canon layers" of Allen-Zhu (2025); the short
    convolutions of H3 and Mamba and RWKV's token shift are the same idea. With a KV cache the earlier
    inputs are kept beside the keys and values (slot 2 * layer for attention's, + 1 for the MLP's), so a
    new position sees the k - 1 before it.
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(config.n_embd, 1, config.short_conv))

    def forward(self, x: torch.Tensor, kv_cache: Optional[KVCache], slot: int) -> torch.Tensor:
        T = x.shape[1]
        if kv_cache is not None:  # (B', past + T, C) -> the last T + k - 1 positions, all the new ones need
            x = kv_cache.update_inputs(slot, x)[:, -(T + self.weight.shape[-1] - 1):]
        return x[:, -T:] + causal_conv(x, self.weight)[:, -T:]


class CausalSelfAttention(nn.Module):
    def __init__(self, config: ModelConfig, sdpa: bool = True):
        super().__init__()
        self.n_head = config.n_head
        self.head_dim = config.head_dim
        self.dropout = config.dropout
        self.qk_norm = config.qk_norm
        self.sdpa = sdpa  # True: F.scaled_dot_product_attention; False: the written-out product (same numbers)
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)

    def qkv(self, x: torch.Tensor, rope: Optional[tuple[torch.Tensor, torch.Tensor]]):
        """Queries, keys and values of x (B, T, C), each (B, n_head, T, head_dim), qk-normed and rotated;
        with attention_probs, what a caller needs to see a layer's attention weights."""
        B, T, C = x.shape
        # (B, T, 3C) -> three (B, T, C) -> split C into heads: each (B, n_head, T, head_dim)
        q, k, v = (t.view(B, T, self.n_head, self.head_dim).transpose(1, 2) for t in self.c_attn(x).split(C, dim=2))
        cos, sin = rope if rope is not None else (None, None)
        q, k = queries_and_keys(q, k, self.qk_norm, cos, sin)
        return q, k, v

    def forward(self, x: torch.Tensor, rope: Optional[tuple[torch.Tensor, torch.Tensor]],
                kv_cache: Optional[KVCache], layer: int) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(x, rope)
        past = 0
        if kv_cache is not None:
            past = kv_cache.length
            k, v = kv_cache.update(layer, k, v)  # (B, n_head, past + T, head_dim)
        dropout = self.dropout if self.training else 0.0
        if not self.sdpa:
            y = written_out_attention(q, k, v, visible_keys(T, past, x.device), dropout)
        elif past == 0 or T == 1:  # causal from the start, or one new position that sees every cached one
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=past == 0)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=visible_keys(T, past, x.device), dropout_p=dropout)
        # (B', T, C), heads side by side; B' is the cache's batch (a prompt prefilled once serves several samples).
        y = y.transpose(1, 2).reshape(y.shape[0], T, C)
        y = self.c_proj(y)
        return F.dropout(y, dropout, training=True) if dropout else y


class MLP(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        hidden = config.mlp_ratio * config.n_embd
        self.c_fc = nn.Linear(config.n_embd, hidden, bias=config.bias)
        self.c_proj = nn.Linear(hidden, config.n_embd, bias=config.bias)
        self.activation = config.activation
        self.dropout = config.dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = mlp_activation(self.c_fc(x), self.activation, inplace=not torch.is_grad_enabled())  # (B, T, mlp_ratio * C)
        h = self.c_proj(h)  # (B, T, C)
        return F.dropout(h, self.dropout, training=True) if (self.training and self.dropout) else h


class Block(nn.Module):
    """Pre-norm (GPT-2): x + attn(norm(x)). Post-norm (the original Transformer): norm(x + attn(x)).
    With short_conv each sublayer reads its input after a short convolution: x + attn(conv(norm(x)))."""

    def __init__(self, config: ModelConfig, sdpa: bool = True):
        super().__init__()
        self.pre_norm = config.norm_placement == "pre"
        self.norm_1 = Norm(config)
        self.conv_attn = ShortConv(config) if config.short_conv else None
        self.attn = CausalSelfAttention(config, sdpa)
        self.norm_2 = Norm(config)
        self.conv_mlp = ShortConv(config) if config.short_conv else None
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, rope, kv_cache: Optional[KVCache], layer: int) -> torch.Tensor:
        a = convolve(self.conv_attn, self.norm_1.sublayer_input(x, self.pre_norm), kv_cache, 2 * layer)
        x = self.norm_1.residual(x, self.attn(a, rope, kv_cache, layer), self.pre_norm)
        a = convolve(self.conv_mlp, self.norm_2.sublayer_input(x, self.pre_norm), kv_cache, 2 * layer + 1)
        return self.norm_2.residual(x, self.mlp(a), self.pre_norm)


def convolve(conv: Optional[ShortConv], h: torch.Tensor, kv_cache: Optional[KVCache], slot: int) -> torch.Tensor:
    return h if conv is None else conv(h, kv_cache, slot)


class GPT(nn.Module):
    def __init__(self, config: ModelConfig, vocab_size: int, sdpa: bool = True):
        super().__init__()
        self.config = config
        self.vocab_size = vocab_size
        self.wte = nn.Embedding(vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.block_size, config.n_embd) if config.pos_encoding == "learned" else None
        self.register_buffer("pos_table", sinusoidal_table(config.block_size, config.n_embd)
                             if config.pos_encoding == "sinusoidal" else None, persistent=False)
        cos, sin = rope_tables(config.block_size, config.head_dim) if config.pos_encoding == "rope" else (None, None)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.blocks = nn.ModuleList(Block(config, sdpa) for _ in range(config.n_layer))
        # Post-norm blocks already end in a norm; pre-norm needs one before the head.
        self.norm_f = Norm(config) if config.norm_placement == "pre" else None
        self.lm_head = nn.Linear(config.n_embd, vocab_size, bias=False)
        if config.tie_weights:
            self.lm_head.weight = self.wte.weight
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Matrices N(0, 0.02); residual projections (c_proj) zero, or GPT-2's N(0, 0.02 / sqrt(2 * n_layer)) so
        the residual stream's variance stays put however deep; short convolutions and biases zero; norm weights one."""
        for name, p in self.named_parameters():
            if ".conv_" in name:
                nn.init.zeros_(p)
            elif name.endswith("c_proj.weight") and self.config.zero_init_proj:
                nn.init.zeros_(p)
            elif name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * self.config.n_layer))
            elif p.dim() >= 2:
                nn.init.normal_(p, mean=0.0, std=0.02)
            elif name.endswith("bias"):
                nn.init.zeros_(p)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    @property
    def device(self) -> torch.device:
        return self.wte.weight.device

    def forward(self, idx: torch.Tensor, kv_cache: Optional[KVCache] = None) -> torch.Tensor:
        B, T = idx.shape
        start = kv_cache.length if kv_cache is not None else 0  # positions already in the cache
        if start + T > self.config.block_size:
            raise ValueError(f"sequence of {start + T} positions exceeds block_size {self.config.block_size}")
        x = self.wte(idx)  # (B, T, C)
        if self.wpe is not None:
            x = x + self.wpe.weight[start:start + T]  # (T, C), broadcast over B
        elif self.pos_table is not None:
            x = x * embedding_scale(self.config) + self.pos_table[start:start + T].to(x.dtype)
        if self.training and self.config.dropout:
            x = F.dropout(x, self.config.dropout, training=True)
        rope = None
        if self.rope_cos is not None:
            rope = (self.rope_cos[start:start + T].to(x.dtype), self.rope_sin[start:start + T].to(x.dtype))
        for layer, block in enumerate(self.blocks):
            x = block(x, rope, kv_cache, layer)
        if kv_cache is not None:
            kv_cache.advance(T)
        return self.read_out(x)

    def read_out(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (B, T, vocab_size) of a residual stream x (B, T, C): the final norm and the head."""
        if self.norm_f is not None:
            x = self.norm_f(x)
        return softcap(self.lm_head(x), self.config.logit_softcap)

    def new_kv_cache(self, batch_size: int) -> KVCache:
        """A cache in the dtype of the residual stream (the embedding's), on the model's device."""
        c = self.config
        return KVCache(c.n_layer, batch_size, c.n_head, c.block_size, c.head_dim,
                       dtype=self.wte.weight.dtype, device=self.device, input_slots=input_slots(c))


def input_slots(config: ModelConfig) -> int:
    """Sublayer inputs a KV cache keeps per layer: attention's and the MLP's with short convolutions."""
    return 2 if config.short_conv else 0


# --- Accounting: parameters, FLOPs and KV-cache bytes, from the config alone -------------------

def count_parameters(config: ModelConfig, vocab_size: int) -> int:
    """Parameters of the model, counted on the meta device (no memory, no time)."""
    with shapes_only():
        return GPT(config, vocab_size).num_parameters()


def matmul_params(config: ModelConfig, vocab_size: int) -> int:
    """N: weights every token is multiplied by (attention, MLP and lm_head; not the embedding lookups)."""
    C = config.n_embd
    per_layer = 3 * C * C + C * C + 2 * config.mlp_ratio * C * C  # c_attn, attn c_proj, c_fc, mlp c_proj
    return config.n_layer * per_layer + C * vocab_size


# One FLOP convention for inspect and bench (and train's MFU), stated beside every figure it gives.
FLOPS_CONVENTION = ("PaLM's (appendix B), as nanoGPT's MFU and torch's FLOP counter: 2N a token for the "
                    "weights, 4 x n_layer x n_embd for each query-key pair (QK^T and AV; every key for every "
                    "query, the masked half too), 2 x short_conv x n_embd for each short convolution; "
                    "training 3 x forward")


def attention_flops(config: ModelConfig, tokens: int, context: int) -> int:
    """QK^T and AV of `tokens` queries, each against all `context` keys: 2 FLOPs a multiply-add, 2 products."""
    return 4 * config.n_layer * config.n_embd * tokens * context


def short_conv_flops(config: ModelConfig, tokens: int) -> int:
    """The two short convolutions of each layer: short_conv multiply-adds a channel and position."""
    return 2 * 2 * config.n_layer * config.short_conv * config.n_embd * tokens


def forward_flops(config: ModelConfig, vocab_size: int, tokens: int, context: int) -> int:
    """FLOPs of a forward pass over `tokens` new positions whose keys span `context` positions (the
    prompt's own: tokens == context; a decode step with L cached: tokens 1, context L + 1)."""
    weights = 2 * matmul_params(config, vocab_size) * tokens
    return weights + attention_flops(config, tokens, context) + short_conv_flops(config, tokens)


def flops_per_token(config: ModelConfig, vocab_size: int, seq_len: Optional[int] = None) -> dict:
    """The forward and training FLOPs per token of a sequence of seq_len (block_size) tokens, by
    FLOPS_CONVENTION (Kaplan et al. 2020; PaLM appendix B): backward costs twice the forward."""
    T = seq_len or config.block_size
    N = matmul_params(config, vocab_size)
    forward = forward_flops(config, vocab_size, T, T) // T
    return {"matmul_params": N, "seq_len": T, "convention": FLOPS_CONVENTION, "forward": forward,
            "weights_forward": 2 * N, "attention_forward": attention_flops(config, T, T) // T,
            "short_conv_forward": short_conv_flops(config, T) // T, "train": 3 * forward}


def kv_bytes_per_token(config: ModelConfig, dtype_bytes: int = 4) -> int:
    """Keys and values for every layer: 2 * n_layer * n_embd numbers per position; with short_conv, the
    two sublayers' inputs too (4 * n_layer * n_embd)."""
    return (4 if config.short_conv else 2) * config.n_layer * config.n_embd * dtype_bytes


def training_bytes(config: ModelConfig, vocab_size: int, batch_size: int) -> dict:
    """A float32 training step's memory, estimated before anything is allocated (so a model far too big
    for the machine is refused with the numbers, not killed by the kernel after minutes of allocating):
    weights, gradients and two optimizer moments (AdamW's; Muon keeps one) at 4 bytes a value each,
    plus the activations autograd keeps, per token and layer: the block's inputs, norms, q/k/v, the
    attention output and the MLP's hidden layer before and after its activation; and the logits with
    their softmax and gradient. A lower bound of the real peak (allocator slack, temporaries)."""
    params = count_parameters(config, vocab_size)
    C, tokens = config.n_embd, batch_size * config.block_size
    per_token = config.n_layer * (10 + 2 * config.mlp_ratio) * C + 3 * vocab_size
    return {"params": params, "weights_and_optimizer": 16 * params, "activations": 4 * tokens * per_token,
            "total": 16 * params + 4 * tokens * per_token}
