"""The fast decode path: a Decoder built from a trained GPT, owning everything it runs on.

`Decoder(model, dtype)` makes its own copy of the model's structure with each nn.Linear swapped for
an InferenceLinear (weights in `dtype`, laid out for the CPU's kernels, and on x86-64 reordered
for oneDNN where that pays), and a DecodeStep: the model's arithmetic for one new position,
assembled from model.py's functions as a flat sequence of few operations, scripted by
TorchScript on a CPU where that works. The model it was built from is never modified.

Why a second path at all: a decode step of a small model is bound by reading the weight
matrices, and next by the cost of each eager PyTorch operation, which is far above its few
microseconds on a warm cache (each big matrix streams megabytes through the core's cache,
evicting the code and data of the small operations between the products). So the step runs as
few operations as it can: no module calls; views between heads and channels; one copy to store a
position's key and value; residual adds in place. Measurements: benchmarks/README.md.
"""

# Annotations stay real objects (no `from __future__ import annotations`): TorchScript reads them.
import copy
import functools
import platform
import warnings
from typing import List, Optional

import torch
import torch.nn.functional as F
from torch import nn

from minigpt_cli.kv_cache import KVCache
from minigpt_cli.model import (GPT, changes_queries_and_keys, embedding_scale, input_slots, mlp_activation, normalize,
                               queries_and_keys, residual, softcap, sublayer_input)


# ---------------------------------------------------------------------------------------------
# oneDNN's prepacked matrices (x86-64 CPUs)
# ---------------------------------------------------------------------------------------------

@functools.cache
def onednn_linear():
    """oneDNN's linear on a weight reordered once into its blocked layout (the operator behind
    torch.compile's CPU freezing), with an optional activation post-op. Looked up when first
    needed, as a build of PyTorch without oneDNN lacks it."""
    return torch.ops.mkldnn._linear_pointwise.default


# A oneDNN call costs more than MKL's F.linear before it reads a byte, so float32 matrices are
# packed only when large enough to repay that (measured: benchmarks/README.md). bfloat16 matrices
# are always packed: F.linear on them is oneDNN without the packing.
PACK_MIN_ELEMENTS = 2**17


def worth_packing(weight: torch.Tensor) -> bool:
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
            weight = torch.randn(24, 40, generator=generator).to(dtype)  # CPU-only: a oneDNN probe
            x = torch.randn(3, 40, generator=generator).to(dtype)  # CPU-only: a oneDNN probe
            got = onednn_linear()(x, pack_weight(weight), None, "none", [], "").float()
            want = F.linear(x.float(), weight.float())
    except (RuntimeError, AttributeError, NotImplementedError):
        return False
    tolerance = 1e-4 if dtype == torch.float32 else 0.1
    return got.shape == want.shape and bool(((got - want).abs() <= tolerance * (1 + want.abs())).all())


def pack_weight(weight: torch.Tensor) -> torch.Tensor:
    """The matrix reordered into oneDNN's layout for onednn_linear (an opaque tensor, for inference only)."""
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous(), 1)


class InferenceLinear(nn.Module):
    """What the Decoder's copy uses in place of nn.Linear: a frozen copy of its weight in `dtype`
    (half the bytes a step reads in bfloat16), with the activations cast to meet it, and on a CPU
    stored transposed (column-major for F.linear, which MKL reads about 25% faster) or packed."""

    def __init__(self, linear: nn.Linear, dtype: torch.dtype, pack: bool):
        super().__init__()
        weight = linear.weight.detach().to(dtype)
        if weight.device.type == "cpu":
            weight = weight.t().contiguous().t()
        self.register_buffer("weight", weight)
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().to(dtype))
        self.packed = pack_weight(weight) if pack and worth_packing(weight) else None
        self.in_features = linear.in_features

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """x @ weight^T + bias with the kernel chosen for this matrix; x in the weight's dtype."""
        if self.packed is not None:
            return onednn_linear()(x, self.packed, self.bias, "none", [], "")
        return F.linear(x, self.weight, self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == self.weight.dtype:
            return self.project(x)
        return self.project(x.to(self.weight.dtype)).to(x.dtype)


def weight_matrices(model: GPT) -> list[nn.Module]:
    """The matrices a token passes through, in order: four per block (attention in and out, MLP in
    and out), then the head."""
    blocks = [m for b in model.blocks for m in (b.attn.c_attn, b.attn.c_proj, b.mlp.c_fc, b.mlp.c_proj)]
    return blocks + [model.lm_head]


def inference_copy(model: GPT, dtype: torch.dtype, pack: bool) -> GPT:
    """A copy of `model` for inference, in eval mode, with every nn.Linear swapped for an
    InferenceLinear. Embeddings, norms and position tables are shared with the model, read only."""
    shared = {id(t): t for t in [*model.parameters(), *model.buffers()]}
    twin = copy.deepcopy(model, memo=shared).eval()
    for module in list(twin.modules()):
        for name, child in module.named_children():
            if isinstance(child, nn.Linear):
                setattr(module, name, InferenceLinear(child, dtype, pack))
    return twin


# ---------------------------------------------------------------------------------------------
# The one-position step, in the subset of Python that TorchScript compiles (typing.List/Optional
# annotations, no closures), so the same code runs as plain Python, scripted, and traced by
# torch.compile with fixed shapes (CUDA graphs on a GPU).
# ---------------------------------------------------------------------------------------------

# oneDNN post-ops that compute model.mlp_activation inside the MLP's first product: (post-op, its algorithm,
# square after). An activation missing here runs unfused, after the product: correct, a little slower.
FUSED_ACTIVATIONS = {"gelu": ("gelu", "tanh", False), "relu2": ("relu", "", True)}


class DecodeStep(nn.Module):
    """GPT.forward's arithmetic for one new position per row, reading and writing the KV cache.

    forward(idx (B, 1), position, kv (n_layer, B, 2, n_head, block_size, head_dim), fixed_position,
    inputs) -> logits (B, 1, vocab_size) in float32. `inputs` (2 n_layer, B, block_size, C) is the
    cache's store of the sublayers' inputs, for a model with short convolutions (None otherwise).
    With fixed_position None, `position` (an int) is where the new keys and values go, and attention
    reads the positions up to it. With a (1,) tensor fixed_position instead, every shape is the same
    at every step (for torch.compile): the keys and values go in with index_copy_ and attention reads
    the whole cache, masked.

    The block's arithmetic is model.py's (sublayer_input, residual, queries_and_keys, mlp_activation,
    normalize, softcap); what is this step's own is how it reads the cache and the matrices. Made from
    the Decoder's copy (after its matrices are swapped): weight_matrices' order, four per block and
    then the head; `packed[j]` says matrix j is in oneDNN's blocked layout.
    """

    positions: Optional[torch.Tensor]
    rope_cos: Optional[torch.Tensor]
    rope_sin: Optional[torch.Tensor]
    norm_weights: List[torch.Tensor]
    norm_biases: List[Optional[torch.Tensor]]
    weights: List[torch.Tensor]
    biases: List[Optional[torch.Tensor]]
    packed: List[bool]
    conv_weights: List[torch.Tensor]

    def __init__(self, twin: GPT, dtype: torch.dtype):
        super().__init__()
        c = twin.config
        # Two norms per block (before attention and MLP, or after them when post-norm), then the
        # final norm if there is one, in `dtype`.
        norms = [n for b in twin.blocks for n in (b.norm_1, b.norm_2)] + ([twin.norm_f] if twin.norm_f else [])
        matrices = weight_matrices(twin)
        scale = embedding_scale(c)
        self.wte = twin.wte.weight.detach() * scale if scale != 1.0 else twin.wte.weight.detach()
        self.positions = twin.wpe.weight.detach() if twin.wpe is not None else twin.pos_table
        self.rope_cos = twin.rope_cos
        self.rope_sin = twin.rope_sin
        self.norm_weights = [n.weight.detach().to(dtype) for n in norms]
        self.norm_biases = [None if n.bias is None else n.bias.detach().to(dtype) for n in norms]
        self.weights = [m.weight if m.packed is None else m.packed for m in matrices]
        self.biases = [m.bias for m in matrices]
        self.packed = [m.packed is not None for m in matrices]
        # The short convolutions, attention's then the MLP's for each layer (slot 2 * layer + i), as (k, C),
        # oldest position first, in the cache's dtype (float32), with 1 added to the newest position's
        # weights: x + conv(x) as one weighted sum.
        self.conv_weights = [conv.weight.detach()[:, 0].t().clone() for b in twin.blocks
                             for conv in (b.conv_attn, b.conv_mlp) if conv is not None]
        for weight in self.conv_weights:
            weight[-1] += 1.0
        self.conv_kernel = c.short_conv
        self.n_layer = c.n_layer
        self.n_head = c.n_head
        self.head_dim = c.head_dim
        self.n_embd = c.n_embd
        self.dtype = dtype
        self.norm_kind = c.norm
        self.eps = twin.blocks[0].norm_1.eps
        self.pre_norm = twin.blocks[0].pre_norm
        self.has_final_norm = twin.norm_f is not None
        self.activation = c.activation
        post_op = FUSED_ACTIVATIONS.get(c.activation)
        self.post_op, self.post_op_algorithm, self.square_after = post_op if post_op else ("none", "", False)
        # oneDNN's activation post-op pays in bfloat16 but not in float32 (benchmarks/README.md).
        self.fuse_activation = dtype != torch.float32 and post_op is not None
        self.qk_norm = c.qk_norm
        self.changes_qk = changes_queries_and_keys(c)
        self.logit_softcap = float(c.logit_softcap)

    def _sublayer_input(self, x: torch.Tensor, i: int) -> torch.Tensor:
        return sublayer_input(x, self.pre_norm, self.norm_kind, self.norm_weights[i], self.norm_biases[i], self.eps)

    def _residual(self, x: torch.Tensor, y: torch.Tensor, i: int) -> torch.Tensor:
        return residual(x, y, self.pre_norm, self.norm_kind, self.norm_weights[i], self.norm_biases[i], self.eps, True)

    def _linear(self, x: torch.Tensor, j: int) -> torch.Tensor:
        if self.packed[j]:
            return torch.ops.mkldnn._linear_pointwise(x, self.weights[j], self.biases[j], "none", [], "")
        return F.linear(x, self.weights[j], self.biases[j])

    def _embed(self, idx: torch.Tensor, position: int, fixed_position: Optional[torch.Tensor]) -> torch.Tensor:
        """The residual stream's first value for the new positions: (B, C) in the step's dtype."""
        x = torch.index_select(self.wte, 0, idx.view(idx.shape[0]))  # (B, C), a new tensor
        positions = self.positions
        if positions is not None:
            if fixed_position is None:
                x.add_(positions[position])
            else:
                x.add_(positions.index_select(0, fixed_position))
        return x if x.dtype == self.dtype else x.to(self.dtype)

    def _rotation(self, position: int,
                  fixed_position: Optional[torch.Tensor]) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
        """RoPE's cos and sin at the new position, (D,) or (1, D); None without RoPE."""
        rope_cos, rope_sin = self.rope_cos, self.rope_sin
        if rope_cos is None or rope_sin is None:
            return None, None
        if fixed_position is None:
            return rope_cos[position], rope_sin[position]
        return rope_cos.index_select(0, fixed_position), rope_sin.index_select(0, fixed_position)

    def _conv(self, a: torch.Tensor, slot: int, position: int, inputs_all: Optional[torch.Tensor],
              fixed_position: Optional[torch.Tensor]) -> torch.Tensor:
        """ShortConv for one new position: store a (B, C) in the slot's inputs (B, block_size, C) and return
        a + the weighted sum of the last k inputs, computed in the cache's dtype. Without convolutions, a."""
        if inputs_all is None or self.conv_kernel == 0:
            return a
        inputs = inputs_all[slot]
        k = self.conv_kernel
        weight = self.conv_weights[slot]  # (k, C), the identity folded into the last row
        if fixed_position is None:
            inputs.select(1, position).copy_(a)
            start = max(0, position - k + 1)
            mixed = (inputs[:, start:position + 1] * weight[k - (position + 1 - start):]).sum(1)
        else:
            inputs.index_copy_(1, fixed_position, a.unsqueeze(1).to(inputs.dtype))
            offsets = fixed_position + torch.arange(1 - k, 1, device=a.device)  # (k,), before the start if < 0
            window = inputs.index_select(1, offsets.clamp(min=0)) * (offsets >= 0).view(1, k, 1).to(inputs.dtype)
            mixed = (window * weight).sum(1)
        return mixed if mixed.dtype == a.dtype else mixed.to(a.dtype)

    def _attention(self, a: torch.Tensor, layer: int, cos: Optional[torch.Tensor], sin: Optional[torch.Tensor],
                   position: int, kv_all: torch.Tensor, fixed_position: Optional[torch.Tensor]) -> torch.Tensor:
        """Attention's output before its projection, (B, C) in the step's dtype, for the input a (B, C);
        the new key and value go into the layer's cache (B, 2, H, block_size, D), which attention runs in."""
        B, H, D = a.shape[0], self.n_head, self.head_dim
        qkv = self._linear(a, 4 * layer).view(B, 3, H, D)
        if self.changes_qk:
            q, k, v = qkv.unbind(1)  # (B, H, D) each
            q, k = queries_and_keys(q, k, self.qk_norm, cos, sin)
            new = torch.stack([k, v], dim=1)  # (B, 2, H, D)
            q = q.unsqueeze(2)
        else:
            new = qkv[:, 1:]  # keys and values, stored with one copy
            q = qkv[:, :1].transpose(1, 2)
        kv = kv_all[layer]
        if q.dtype != kv.dtype:
            q = q.to(kv.dtype)  # (B, H, 1, D)
        if fixed_position is None:
            kv.select(3, position).copy_(new)
            y = F.scaled_dot_product_attention(q, kv[:, 0, :, :position + 1], kv[:, 1, :, :position + 1])
        else:
            kv.index_copy_(3, fixed_position, new.unsqueeze(3).to(kv.dtype))
            block_size = kv.shape[-2]
            visible = (torch.arange(block_size, device=a.device) <= fixed_position).view(1, 1, 1, block_size)
            y = F.scaled_dot_product_attention(q, kv[:, 0], kv[:, 1], attn_mask=visible)
        y = y.view(B, self.n_embd)  # (B, H, 1, D) -> (B, C)
        return y if y.dtype == self.dtype else y.to(self.dtype)

    def _mlp_hidden(self, x: torch.Tensor, j: int) -> torch.Tensor:
        """mlp_activation(x @ W_fc^T), fused into the product as oneDNN's post-op where it can (FUSED_ACTIVATIONS)."""
        if self.fuse_activation and self.packed[j]:
            h = torch.ops.mkldnn._linear_pointwise(x, self.weights[j], self.biases[j], self.post_op, [],
                                                   self.post_op_algorithm)
            return h.square_() if self.square_after else h
        return mlp_activation(self._linear(x, j), self.activation, True)

    def forward(self, idx: torch.Tensor, position: int, kv_all: torch.Tensor,
                fixed_position: Optional[torch.Tensor] = None, inputs_all: Optional[torch.Tensor] = None) -> torch.Tensor:
        # Block.forward for one position: its sublayers' norms are 2 * layer + i, its matrices 4 * layer + j
        # (attention in and out, MLP in and out) and its short convolutions' slots 2 * layer + i.
        x = self._embed(idx, position, fixed_position)  # (B, C)
        cos, sin = self._rotation(position, fixed_position)
        for layer in range(self.n_layer):
            a = self._conv(self._sublayer_input(x, 2 * layer), 2 * layer, position, inputs_all, fixed_position)
            y = self._attention(a, layer, cos, sin, position, kv_all, fixed_position)
            x = self._residual(x, self._linear(y, 4 * layer + 1), 2 * layer)
            a = self._conv(self._sublayer_input(x, 2 * layer + 1), 2 * layer + 1, position, inputs_all, fixed_position)
            x = self._residual(x, self._linear(self._mlp_hidden(a, 4 * layer + 2), 4 * layer + 3), 2 * layer + 1)
        if self.has_final_norm:
            x = normalize(x, self.norm_kind, self.norm_weights[2 * self.n_layer], self.norm_biases[2 * self.n_layer],
                          self.eps)
        logits = self._linear(x, 4 * self.n_layer)
        if logits.dtype != torch.float32:
            logits = logits.float()
        return softcap(logits, self.logit_softcap).view(idx.shape[0], 1, -1)


def script_step(step: DecodeStep) -> Optional[nn.Module]:
    """The step compiled by TorchScript, or None where that fails (no TorchScript in this build of
    PyTorch, no source files to read, an operator it cannot resolve): the step then runs as Python.

    TorchScript is deprecated in favour of torch.compile, but on a CPU it is what runs a decode
    step's ~150 small operations without a Python frame, argument parsing and Python tensor
    object apiece (figures against the alternatives: benchmarks/README.md).
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.jit.script(step)
    except Exception:  # noqa: BLE001 - any failure to compile leaves the Python step, which is correct
        return None


def cache_dtype(device: torch.device, dtype: torch.dtype) -> torch.dtype:
    """The KV cache's dtype, which attention runs in, for a decode step in `dtype`: float32 on a CPU,
    where it was faster than bfloat16 attention, and exact; the step's own dtype elsewhere (on a
    GPU: half the cache's bytes to read each step, and attention on tensor cores)."""
    return torch.float32 if device.type == "cpu" else dtype


class Decoder:
    """A trained model readied for sampling: call it as the model, `decoder(idx, kv_cache=None)`.

    Prefill and uncached windows run the copy's modules; one-position steps with a cache run the
    DecodeStep: scripted by TorchScript on a CPU (with `script`), compiled by torch.compile with
    `compile` (CUDA graphs on a GPU; oneDNN's packed matrices cannot be traced, so none are packed
    then), or else as Python. With `fast` False every call runs the copy's modules.

    With `dtype` bfloat16 the weight matrices, norms and residual stream of a step run in bfloat16;
    embeddings stay float32, and so do attention and the KV cache on a CPU (faster there than
    bfloat16 attention, and exact) but not on a GPU (cache_dtype: half the bytes each step reads,
    and attention on tensor cores). float16 (GPUs only) keeps the module path, whose residual stream stays
    float32: float16's range (65504) is one a residual stream can outgrow. Weights are copied when
    the decoder is built: later changes to the model's weights do not reach it.
    """

    def __init__(self, model: GPT, dtype: torch.dtype = torch.float32, fast: bool = True, compile: bool = False,
                 script: bool = True):
        self.config = model.config
        self.vocab_size = model.vocab_size
        self.device = model.device
        on_cpu = self.device.type == "cpu"
        pack = fast and on_cpu and not compile and packing_supported(dtype)
        with torch.no_grad():
            self.model = inference_copy(model, dtype, pack)  # its own copy; `model` is left as it was
        self.matrices: list[InferenceLinear] = weight_matrices(self.model)
        self.step = DecodeStep(self.model, dtype) if fast and dtype != torch.float16 else None
        self.scripted = script_step(self.step) if self.step is not None and script and on_cpu and not compile else None
        self.compiled = None
        # CUDA graphs (reduce-overhead) return outputs in memory the next replay overwrites: such
        # logits are copied before they are handed out, so a caller may keep them.
        self.copy_logits = compile and self.step is not None and self.device.type == "cuda"
        if compile and self.step is not None:
            mode = "reduce-overhead" if self.device.type == "cuda" else None
            self.compiled = torch.compile(self.step, mode=mode, fullgraph=True)
        self.cache_dtype = cache_dtype(self.device, dtype if self.step is not None else torch.float32)

    def new_kv_cache(self, batch_size: int) -> KVCache:
        c = self.config
        return KVCache(c.n_layer, batch_size, c.n_head, c.block_size, c.head_dim, dtype=self.cache_dtype,
                       device=self.device, input_slots=input_slots(c))

    @torch.inference_mode()
    def __call__(self, idx: torch.Tensor, kv_cache: Optional[KVCache] = None) -> torch.Tensor:
        """idx (B, T) -> logits (B, T, vocab_size), storing the new positions in kv_cache if given."""
        B, T = idx.shape
        if self.step is None or kv_cache is None or T != 1 or kv_cache.batch_size != B:
            return self.model(idx, kv_cache)
        kv_cache.end_after(1)  # raises if the cache is full
        if self.config.short_conv and kv_cache.inputs is None:
            raise ValueError("a model with short convolutions needs a KV cache that keeps their inputs "
                             "(model.new_kv_cache)")
        if self.compiled is not None:
            if not kv_cache.static_address:
                # Written in place by every replay: a CUDA graph must see it at a fixed address.
                for store in (kv_cache.kv, kv_cache.inputs):
                    if store is not None:
                        torch._dynamo.mark_static_address(store, guard=False)
                kv_cache.static_address = True
            position = torch.full((1,), kv_cache.length, dtype=torch.long, device=idx.device)
            logits = self.compiled(idx, 0, kv_cache.kv, position, kv_cache.inputs)
            if self.copy_logits:
                logits = logits.clone()
        else:
            step = self.scripted if self.scripted is not None else self.step
            logits = step(idx, kv_cache.length, kv_cache.kv, None, kv_cache.inputs)
        kv_cache.advance(1)
        return logits
