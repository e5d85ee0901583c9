"""What a run or a config is made of: modules and parameters, FLOPs, cache size, shapes, training record.

The model is built on the meta device (shapes without storage), so even GPT-2 XL is inspected
instantly and without memory.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from minigpt_cli import rundir
from minigpt_cli.config import UserError, best_measure, windows_measure
from minigpt_cli.device import shapes_only
from minigpt_cli.heads import PATTERN_RULE, head_profile, induction_baseline
from minigpt_cli.model import (GPT, MLP, Block, CausalSelfAttention, Norm, ShortConv, attention_probs,
                               count_parameters, flops_per_token, kv_bytes_per_token, visible_keys)
from minigpt_cli.scoring import bits_per_char
from minigpt_cli.targets import Target, resolve_target
from minigpt_cli.tokenizer import visible_char

# GPT-2's byte-pair vocabulary (Radford et al. 2019): the size its published parameter counts include.
GPT2_VOCAB_SIZE = 50257


def escape_vocab(chars: Sequence[str]) -> str:
    """The vocabulary as one line: unprintable characters (newline, tab, ...) and the backslash escaped."""
    out = []
    for c in chars:
        if c == "\\":
            out.append("\\\\")
        elif c.isprintable():
            out.append(c)
        else:
            out.append(c.encode("unicode_escape").decode("ascii"))
    return "".join(out)


# ---------------------------------------------------------------------------------------------
# Modules and parameters
# ---------------------------------------------------------------------------------------------

def _describe(module: nn.Module) -> str:
    if isinstance(module, nn.Linear):
        return f"{module.in_features} -> {module.out_features}" + (", bias" if module.bias is not None else "")
    if isinstance(module, nn.Embedding):
        return f"{module.num_embeddings} x {module.embedding_dim}"
    if isinstance(module, Norm):
        return f"{module.kind} over {module.weight.shape[0]}"
    if isinstance(module, CausalSelfAttention):
        return f"{module.n_head} heads x {module.head_dim}, causal"
    if isinstance(module, MLP):
        return f"{module.activation}, {module.c_fc.out_features // module.c_fc.in_features}x wide"
    if isinstance(module, ShortConv):
        return f"causal, each channel over its last {module.weight.shape[-1]} positions"
    if isinstance(module, Block):
        return "pre-norm" if module.pre_norm else "post-norm"
    if isinstance(module, GPT):
        return f"{module.config.n_layer} layers, {module.config.pos_encoding} positions"
    return ""


def block_order(pre_norm: bool, short_conv: bool = False) -> str:
    """A block's order of operations: where the normalization sits around each sublayer (and the short
    convolutions before attention and the MLP, if there are any)."""
    attn_in, mlp_in = ("conv_attn({})", "conv_mlp({})") if short_conv else ("{}", "{}")
    if pre_norm:  # GPT-2: the residual stream itself is never normalized inside a block
        return (f"pre-norm: x = x + attn({attn_in.format('norm_1(x)')}); "
                f"x = x + mlp({mlp_in.format('norm_2(x)')})")
    # The original Transformer: each sublayer's sum is normalized
    return f"post-norm: x = norm_1(x + attn({attn_in.format('x')})); x = norm_2(x + mlp({mlp_in.format('x')}))"


def _signature(module: nn.Module) -> tuple:
    return tuple((name, tuple(p.shape)) for name, p in module.named_parameters()) + (type(module).__name__,)


def module_tree(module: nn.Module, name: str = "", seen: set[int] | None = None,
                owners: dict[int, str] | None = None, path: str = "") -> dict[str, Any]:
    """A node per module: own parameters, total parameters, children.

    `params` = `own_params` + sum(child `params` * child `repeat`), so summing over the tree gives
    the model's total. A parameter shared by two modules (tied weights) is counted at the first one
    and named in `tied_to` at the other. Identical layers of a ModuleList collapse into one child
    with `repeat` = their number.
    """
    seen = set() if seen is None else seen
    owners = {} if owners is None else owners
    own = 0
    tied = []
    for pname, p in module.named_parameters(recurse=False):
        full = f"{path}.{pname}" if path else pname
        if id(p) in seen:
            tied.append(f"{pname} = {owners[id(p)]}")
            continue
        seen.add(id(p))
        owners[id(p)] = full
        own += p.numel()
    children = []
    items = list(module.named_children())
    if isinstance(module, nn.ModuleList) and len(items) > 1 and len({_signature(m) for _, m in items}) == 1:
        first_name, first = items[0]
        child = module_tree(first, f"{first_name}..{items[-1][0]}", seen, owners,
                            f"{path}.{first_name}" if path else first_name)
        child["repeat"] = len(items)
        children.append(child)
    else:
        for child_name, child_module in items:
            children.append(module_tree(child_module, child_name, seen, owners,
                                        f"{path}.{child_name}" if path else child_name))
    total = own + sum(c["params"] * c["repeat"] for c in children)
    node: dict[str, Any] = {"name": name or type(module).__name__, "type": type(module).__name__,
                            "detail": _describe(module), "params": total, "own_params": own, "repeat": 1,
                            "children": children}
    if tied:
        node["tied_to"] = tied
    if isinstance(module, Block):
        node["order"] = block_order(module.pre_norm, module.conv_attn is not None)
    return node


def meta_model(target: Target) -> GPT:
    with shapes_only():
        return GPT(target.config.model, target.vocab_size)


def parameter_counts(model: GPT) -> dict[str, Any]:
    tree = module_tree(model)
    c = model.config
    top = {child["name"]: child["params"] * child["repeat"] for child in tree["children"]}
    embedding = model.wte.weight.numel() + (model.wpe.weight.numel() if model.wpe is not None else 0)
    # One layer: the collapsed child of `blocks` (or its only child when n_layer is 1).
    block = tree_child(tree, "blocks")["children"][0]
    return {
        "total": model.num_parameters(),
        "by_module": top,
        "embedding": embedding,
        "non_embedding": model.num_parameters() - embedding,
        "per_layer": block["params"],
        "tied_weights": model.config.tie_weights,
        "block_order": block_order(c.norm_placement == "pre", c.short_conv > 0),
        "vocab_size": model.vocab_size,
        # The same blocks with GPT-2's own vocabulary: what its published sizes (124M ... 1.5B) count.
        "at_gpt2_vocab": parameters_at_vocab(model, GPT2_VOCAB_SIZE),
        "tree": tree,
    }


def parameters_at_vocab(model: GPT, vocab_size: int) -> int:
    """The model's parameter count if its vocabulary had vocab_size entries (only wte and lm_head change)."""
    return model.num_parameters() if vocab_size == model.vocab_size else count_parameters(model.config, vocab_size)


def tree_child(node: dict[str, Any], name: str) -> dict[str, Any]:
    for child in node["children"]:
        if child["name"] == name:
            return child
    raise KeyError(name)


def counted_flops(model: GPT, seq_len: int) -> dict[str, float] | None:
    """FLOPs per token of one forward and one training step as torch.utils.flop_counter counts them
    on the meta model; it counts attention in full (the masked half too)."""
    try:
        from torch.utils.flop_counter import FlopCounterMode
    except ImportError:  # pragma: no cover - very old torch
        return None
    idx = torch.zeros(1, seq_len, dtype=torch.long, device="meta")
    with FlopCounterMode(display=False) as counter:
        logits = model(idx)
    forward = counter.get_total_flops()
    with FlopCounterMode(display=False) as counter:
        model(idx).float().sum().backward()
    train = counter.get_total_flops()
    del logits
    for p in model.parameters():
        p.grad = None
    return {"forward": forward / seq_len, "train": train / seq_len}


# ---------------------------------------------------------------------------------------------
# Shapes
# ---------------------------------------------------------------------------------------------

@torch.no_grad()
def _position_and_conv_shapes(model: GPT) -> list[tuple]:
    """(name, shape, symbols, note) of the position encoding's tensor and the short convolutions' weights."""
    c = model.config
    T, C = c.block_size, c.n_embd
    if model.wpe is not None:
        rows = [("position embeddings wpe", (T, C), "(T, C)", "added to every row")]
    elif c.pos_encoding == "rope":
        rows = [("rotary cos/sin tables", (T, c.head_dim), "(T, head_dim)", "rotate q and k")]
    else:
        rows = [("sinusoidal position table", (T, C), "(T, C)", "added to every row")]
    if c.short_conv:
        rows.append(("short convolution weights (2 per layer)", (C, 1, c.short_conv), "(C, 1, k)",
                     "each channel mixes its last k values, before attention and before the MLP"))
    return rows


def batch_shapes(model: GPT, batch_size: int) -> list[dict[str, Any]]:
    """The shapes a training batch and a decoding step take, read from forward hooks on the meta model."""
    c = model.config
    B, T, V, H, D = batch_size, c.block_size, model.vocab_size, c.n_head, c.head_dim
    seen: dict[str, tuple[int, ...]] = {}
    hooks = []

    def record(key: str):
        def hook(module, inputs, output):
            seen.setdefault(key, tuple(output.shape))
        return hook

    block = model.blocks[0]
    for key, module in (("embeddings", model.wte), ("qkv", block.attn.c_attn), ("attention_out", block.attn),
                        ("mlp_hidden", block.mlp.c_fc), ("block_out", block), ("logits", model.lm_head)):
        hooks.append(module.register_forward_hook(record(key)))
    rows: list[dict[str, Any]] = []

    def add(stage: str, name: str, shape: Sequence[int], symbols: str, note: str = "") -> None:
        rows.append({"stage": stage, "name": name, "shape": list(shape), "symbols": symbols, "note": note})

    try:
        idx = torch.zeros(B, T, dtype=torch.long, device="meta")
        logits = model(idx)
        add("training", "idx (token ids)", idx.shape, "(B, T)")
        add("training", "token embeddings wte(idx)", seen["embeddings"], "(B, T, C)")
        for row in _position_and_conv_shapes(model):
            add("training", *row)
        add("training", "q, k, v (each, per layer)", (B, H, T, D), "(B, n_head, T, head_dim)",
            f"from c_attn's {tuple(seen['qkv'])}")
        add("training", "attention weights softmax(QK^T/sqrt(d))", (B, H, T, T), "(B, n_head, T, T)",
            "never written out by the fused kernel")
        add("training", "attention output", seen["attention_out"], "(B, T, C)")
        add("training", "MLP hidden", seen["mlp_hidden"], f"(B, T, {c.mlp_ratio}C)")
        add("training", "block output", seen["block_out"], "(B, T, C)", f"after each of {c.n_layer} layers")
        add("training", "logits", logits.shape, "(B, T, vocab_size)")
        seen.clear()
        cache = model.new_kv_cache(B)
        cache.advance(T - 1)
        step = torch.zeros(B, 1, dtype=torch.long, device="meta")
        step_logits = model(step, cache)
        add("decoding", "idx (one new token per sample)", step.shape, "(B, 1)")
        add("decoding", "KV cache keys (values alike)", cache.k.shape, "(n_layer, B, n_head, block_size, head_dim)",
            "allocated once")
        if cache.inputs is not None:
            add("decoding", "KV cache's sublayer inputs", cache.inputs.shape, "(2 n_layer, B, block_size, C)",
                "the short convolutions read the last k")
        add("decoding", "attention weights at the last position", (B, H, 1, T), "(B, n_head, 1, T)")
        add("decoding", "logits", step_logits.shape, "(B, 1, vocab_size)")
    finally:
        for h in hooks:
            h.remove()
    assert tuple(logits.shape) == (B, T, V) and tuple(step_logits.shape) == (B, 1, V)
    return rows


# ---------------------------------------------------------------------------------------------
# Training record of a run
# ---------------------------------------------------------------------------------------------

def loss_curves(run_dir: Path, records: Sequence[dict[str, Any]] | None = None) -> dict[str, list[list[float]]]:
    """train: [step, loss] at every log line; val: [step, val_loss] at every evaluation (of the run's
    metrics, or of the records already read from them)."""
    train, val = [], []
    for record in rundir.read_metrics(run_dir) if records is None else records:
        kind, step = record.get("kind"), record.get("step")
        value = record.get("loss") if kind == "train" else record.get("val_loss") if kind == "eval" else None
        if not (isinstance(step, int) and isinstance(value, (int, float))):
            continue  # not a record minigpt wrote
        (train if kind == "train" else val).append([step, float(value)])
    return {"train": train, "val": val}


def _finite(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and math.isfinite(float(value)) else None


def run_record(target: Target) -> dict[str, Any]:
    loaded = target.loaded
    assert loaded is not None
    meta = loaded.meta
    best = meta.get("best_val_loss")
    best = float(best) if best is not None and math.isfinite(float(best)) else None
    records = rundir.read_metrics(loaded.run_dir)
    final = next((r for r in reversed(records) if r.get("kind") == "eval" and r.get("final") is True
                  and r.get("step") == loaded.step), {})
    t, block = loaded.config.train, loaded.config.model.block_size
    return {
        "run_dir": str(loaded.run_dir),
        "checkpoint": str(loaded.path),
        "steps": loaded.step,
        "tokens_seen": int(meta.get("tokens", 0)),
        "wall_seconds": float(meta.get("train_seconds", 0.0)),
        "device": meta.get("device"),
        "precision": meta.get("precision"),
        "torch_version": meta.get("torch_version"),
        "saved_at": meta.get("saved_at"),
        "best_val_loss": best,
        "best_val_bpc": bits_per_char(best) if best is not None else None,
        "best_step": rundir.pointer_step(loaded.run_dir, "best"),
        # the final weights on the whole validation split (a finished run's final checkpoint only)
        "val_loss": _finite(meta.get("val_loss")) if meta.get("final") is True else None,
        # what the final evaluation scored: characters (of val_chars) and its windows where they overlap
        "val_chars_scored": final.get("chars_scored") if isinstance(final.get("chars_scored"), int) else None,
        "val_chars": final.get("val_chars") if isinstance(final.get("val_chars"), int) else None,
        "val_windows": windows_measure(block, t.eval_stride) if t.eval_stride not in (0, block) else None,
        "best_measure": best_measure(t.eval_full, t.eval_iters),
        "data_fingerprint": meta.get("data_fingerprint"),
        "parent": meta.get("parent") if isinstance(meta.get("parent"), dict) else None,  # train --init-from
        "vocab": {"size": loaded.tokenizer.vocab_size, "chars": escape_vocab(loaded.tokenizer.chars)},
        "curves": loss_curves(loaded.run_dir, records),
    }


# ---------------------------------------------------------------------------------------------
# inspect
# ---------------------------------------------------------------------------------------------

def inspect(arg: str | None, overrides: Sequence[str] = (), vocab_size: int | None = None) -> dict[str, Any]:
    target = resolve_target(arg, overrides, which="latest", vocab_size=vocab_size)
    c = target.config.model
    model = meta_model(target)
    params = parameter_counts(model)
    flops = flops_per_token(c, target.vocab_size)
    flops["counted"] = counted_flops(model, c.block_size)
    kv = {
        "bytes_per_token": kv_bytes_per_token(c, 4),
        "bytes_per_token_bf16": kv_bytes_per_token(c, 2),
        "bytes_at_block_size": kv_bytes_per_token(c, 4) * c.block_size,
        "block_size": c.block_size,
        "layout": "(n_layer, B, n_head, block_size, head_dim), keys and values, float32",
    }
    result: dict[str, Any] = {
        "target": target.describe(),
        "config": target.config.to_dict(),
        "params": params,
        "flops_per_token": flops,
        "flops_convention": flops["convention"],
        "kv_cache": kv,
        "weights_bytes": 4 * params["total"],
        "shapes": batch_shapes(model, target.config.train.batch_size),
    }
    if target.kind == "run":
        result["run"] = run_record(target)
    return result


# ---------------------------------------------------------------------------------------------
# Drawing the loss curves
# ---------------------------------------------------------------------------------------------

def text_chart(series: dict[str, list[list[float]]], width: int = 64, height: int = 14,
               marks: dict[str, str] | None = None, legend: bool = True) -> list[str]:
    """Lines of plain text: each series' points on a character grid, with the y range at the left
    (and a legend line of mark and name, unless the caller writes its own)."""
    marks = marks or {"train": ".", "val": "o"}
    points = [(name, x, y) for name, values in series.items() for x, y in values if math.isfinite(y)]
    if not points:
        return ["(no losses recorded yet)"]
    xs, ys = [p[1] for p in points], [p[2] for p in points]
    x0, x1, y0, y1 = min(xs), max(xs), min(ys), max(ys)
    if y1 - y0 < 1e-9:
        y0, y1 = y0 - 0.5, y1 + 0.5
    if x1 == x0:
        x1 = x0 + 1
    grid = [[" "] * width for _ in range(height)]
    for name in series:  # later series are drawn over earlier ones
        for _, x, y in (p for p in points if p[0] == name):
            col = round((x - x0) / (x1 - x0) * (width - 1))
            row = round((y1 - y) / (y1 - y0) * (height - 1))
            grid[row][col] = marks.get(name, "*")
    label = max(len(f"{y1:.3f}"), len(f"{y0:.3f}"))
    lines = []
    for i, row in enumerate(grid):
        value = y1 - (y1 - y0) * i / (height - 1)
        tick = f"{value:.3f}" if i in (0, height // 2, height - 1) else ""
        lines.append(f"{tick:>{label}} |{''.join(row)}")
    lines.append(" " * label + " +" + "-" * width)
    left, right = f"step {int(x0)}", f"{int(x1)}"
    lines.append(" " * (label + 2) + left + right.rjust(width - len(left)))
    if legend:
        lines.append(" " * (label + 2) + "   ".join(f"{marks.get(name, '*')} {name}"
                                                   for name, values in series.items() if values))
    return lines


PLOT_SUFFIXES = (".png", ".svg", ".pdf")


# Written into every image minigpt saves (PNG Software, PDF and SVG Creator), so that a later --plot
# to the same name replaces minigpt's own plot and never a file of the user's.
PLOT_MARK = b"minigpt (character-level GPT)"
PLOT_MARK_SEARCH_BYTES = 2**26


def _ours(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return PLOT_MARK in f.read(PLOT_MARK_SEARCH_BYTES)
    except OSError:
        return False


def check_plot_path(path: Path) -> None:
    """Before any work: a suffix matplotlib writes, and no file of the user's at that name (minigpt
    replaces only a plot it wrote); UserError naming the problem otherwise."""
    path = Path(path)
    if path.suffix.lower() not in PLOT_SUFFIXES:
        raise UserError(f"--plot {path}: use a file ending in {', '.join(PLOT_SUFFIXES)}")
    if os.path.lexists(path) and not (path.is_file() and not path.is_symlink() and _ours(path)):
        raise UserError(f"--plot {path}: a file is already there that minigpt did not write; pick another name "
                        f"(minigpt replaces only its own plots)")
    _figure_for(path)


def _figure_for(path: Path) -> Any:
    """matplotlib's Figure class; UserError without matplotlib."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise UserError("--plot needs matplotlib, which is not installed: pip install 'minigpt-cli[plot]' "
                        "(or pip install matplotlib)") from None
    return Figure


def _save_figure(figure: Any, path: Path) -> Path:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        key = "Software" if path.suffix.lower() == ".png" else "Creator"
        figure.savefig(path, metadata={key: PLOT_MARK.decode("ascii")})
    except OSError as exc:
        raise UserError(f"cannot write {path}: {exc.strerror or exc}") from None
    return path


def plot_curves(curves: dict[str, list[list[float]]], path: Path, title: str) -> Path:
    """Write the loss curves as an image (PNG, SVG or PDF by the file's suffix); needs matplotlib."""
    path = Path(path)
    check_plot_path(path)
    Figure = _figure_for(path)
    if not any(curves.values()):
        raise UserError(f"{title}: no losses recorded yet, nothing to plot")
    figure = Figure(figsize=(8, 4.5), layout="constrained")
    axes = figure.add_subplot()
    styles = {"train": dict(linewidth=1, alpha=0.8), "val": dict(marker="o", linewidth=1.5)}
    colours: dict[str, str] = {}
    for name, values in curves.items():
        if values:
            run, _, kind = name.rpartition(" ")  # "train", "val", or compare's "LABEL train", "LABEL val"
            style = dict(styles.get(kind, {}))
            if run:  # one run's two curves in one colour
                style["color"] = colours.setdefault(run, f"C{len(colours) % 10}")
            axes.plot([v[0] for v in values], [v[1] for v in values], label=name, **style)
    axes.set_xlabel("step")
    axes.set_ylabel("loss (nats per character)")
    axes.set_title(title)
    axes.grid(alpha=0.3)
    axes.legend()
    return _save_figure(figure, path)


# ---------------------------------------------------------------------------------------------
# Attention weights of a run for a short text
# ---------------------------------------------------------------------------------------------

def attention_probabilities(model: GPT, idx: torch.Tensor) -> list[torch.Tensor]:
    """softmax(QK^T / sqrt(head_dim)) of every layer for idx (1, T): a list of (n_head, T, T), row i
    the weights position i gives to positions 0..i. Read from forward hooks on each attention
    module, which recompute its queries and keys from the module's own input with its qkv and
    the model's attention_probs, so what is shown is what the model computes."""
    maps: list[torch.Tensor] = [torch.empty(0)] * len(model.blocks)

    def hook_for(layer: int):
        def hook(module: CausalSelfAttention, inputs: tuple, output: torch.Tensor) -> None:
            x, rope = inputs[0], inputs[1]
            q, k, _ = module.qkv(x, rope)  # (B, n_head, T, head_dim) each
            maps[layer] = attention_probs(q, k, visible_keys(x.shape[1], 0, x.device))[0].float()  # (n_head, T, T)
        return hook

    hooks = [block.attn.register_forward_hook(hook_for(i)) for i, block in enumerate(model.blocks)]
    try:
        with torch.no_grad():
            model(idx)
    finally:
        for h in hooks:
            h.remove()
    return maps


def run_and_text(arg: str | None, text: str, option: str, example: str) -> tuple[Target, Any, list[int]]:
    """A trained run (its latest checkpoint) and the ids of a text a view reads through it (`option`:
    --attention, --lens); UserError for a config, an empty text, one longer than block_size, or
    characters outside the run's vocabulary."""
    target = resolve_target(arg, which="latest")
    if target.kind != "run":
        raise UserError(f"{option} needs a trained run (a config has no weights yet): pass a run directory")
    loaded = target.loaded
    assert loaded is not None
    if not text:
        raise UserError(f"{option} needs a text of at least one character, e.g. {option} \"{example}\"")
    block_size = loaded.config.model.block_size
    if len(text) > block_size:
        raise UserError(f"{option} text has {len(text)} characters, more than this run's block_size "
                        f"({block_size}): give at most {block_size}")
    unknown = loaded.tokenizer.unknown(text)
    if unknown:
        from minigpt_cli.tokenizer import describe_chars

        raise UserError(f"{option} text has {len(unknown)} character(s) not in this run's vocabulary: "
                        f"{describe_chars(unknown)}")
    return target, loaded, loaded.tokenizer.encode(text)


def attention(arg: str | None, text: str) -> dict[str, Any]:
    """Every layer's and head's attention weights over `text` for a trained run (its latest checkpoint)."""
    target, loaded, ids = run_and_text(arg, text, "--attention", "ROMEO:")
    model = loaded.build_model("cpu").eval()
    maps = attention_probabilities(model, torch.tensor([ids], dtype=torch.long))  # idx (1, T)
    layers = []
    for layer, weights in enumerate(maps):
        heads = []
        for head in range(weights.shape[0]):
            w = weights[head]
            heads.append({"head": head, **head_profile(w, ids),
                          "weights": [[round(float(v), 5) for v in row[:i + 1]] for i, row in enumerate(w)]})
        layers.append({"layer": layer, "heads": heads})
    c = model.config
    return {"target": target.describe(), "checkpoint": str(loaded.path), "step": loaded.step, "text": text,
            "chars": list(text), "n_layer": len(maps), "n_head": c.n_head, "norm_placement": c.norm_placement,
            "pos_encoding": c.pos_encoding, "qk_norm": c.qk_norm, "short_conv": c.short_conv,
            "pattern_rule": PATTERN_RULE, "induction_baseline": induction_baseline(ids), "layers": layers}


def plot_attention(result: dict[str, Any], path: Path) -> Path:
    """Every head's weights as an image grid (layers down, heads across); needs matplotlib."""
    path = Path(path)
    check_plot_path(path)
    Figure = _figure_for(path)
    import numpy as np

    chars = [visible_char(c) for c in result["chars"]]
    T, L, H = len(chars), result["n_layer"], result["n_head"]
    side = max(2.0, 0.18 * T + 1.0)
    figure = Figure(figsize=(side * H, side * L), layout="constrained")
    axes = figure.subplots(L, H, squeeze=False)
    for layer in result["layers"]:
        for head in layer["heads"]:
            grid = np.full((T, T), np.nan)
            for i, row in enumerate(head["weights"]):
                grid[i, :len(row)] = row
            ax = axes[layer["layer"]][head["head"]]
            ax.imshow(grid, vmin=0.0, vmax=1.0, cmap="viridis")
            ax.set_title(f"layer {layer['layer']}, head {head['head']}", fontsize=9)
            ax.set_xticks(range(T), chars, fontsize=7)
            ax.set_yticks(range(T), chars, fontsize=7)
    figure.suptitle(f"attention of {result['target']['name']} (rows: the position attending; columns: "
                    f"the positions it reads)", fontsize=10)
    return _save_figure(figure, path)
