"""The decoder-only GPT: forward(idx, kv_cache=None) -> logits (B, T, vocab_size)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from minigpt_cli.config import ModelConfig
from minigpt_cli.kv_cache import KVCache


class Linear(nn.Linear):
    """nn.Linear whose weight may be stored in a lower precision than the activations.

    Sampling with --dtype bfloat16 keeps only the weight matrices in bfloat16 (half the bytes a
    decode step must read) while norms, attention and the residual stream stay float32.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
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
        if self.kind == "rmsnorm":
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, self.eps)


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
    """Rotate channel pairs (i, i + head_dim/2) by a position-dependent angle. x: (B, n_head, T, head_dim)."""
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


@torch.no_grad()
def prepare_for_inference(model: GPT, dtype: torch.dtype = torch.float32) -> GPT:
    """Ready a model for sampling: weight matrices in `dtype`, everything else float32.

    A decode step reads every weight matrix once, so its time is set by bytes read: bfloat16
    matrices halve it, while embeddings, norms, attention and the residual stream stay float32
    (cheap, and exact where it matters). On CPU each matrix is also stored transposed (column-major
    for F.linear), which MKL's matrix-vector product reads about 25% faster (measured on a
    2-core EPYC for the 6 x 384 model: 2.85 ms against 3.64 ms for all its matrices).
    Tied embedding and head weights are untied here: the embedding stays float32.
    """
    model.eval()
    on_cpu = model.lm_head.weight.device.type == "cpu"
    for module in model.modules():
        if isinstance(module, Linear):
            weight = module.weight.detach().to(dtype)
            if on_cpu:
                weight = weight.t().contiguous().t()
            module.weight = nn.Parameter(weight, requires_grad=False)
            if module.bias is not None:
                module.bias = nn.Parameter(module.bias.detach().to(dtype), requires_grad=False)
    return model
