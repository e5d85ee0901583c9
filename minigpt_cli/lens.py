"""The logit lens: what the model would predict for the next character if it stopped after the
embeddings or after any block (nostalgebraist, 2020).

Each layer's residual stream is read out as the model reads out its last one: the final norm (where
the model has one: post-norm blocks already end in a norm), the head, the logit soft-cap, a softmax.
The last layer's reading is therefore the model's own output. Early layers can only guess from the
current character (and with tied weights the embeddings mostly point back at it); later ones use the
context, and the bits spent on the true next character fall layer by layer.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from minigpt_cli.model import GPT
from minigpt_cli.inspection import run_and_text

TOP_K = 3  # guesses kept per position and layer in the result


def residual_streams(model: GPT, idx: torch.Tensor) -> list[torch.Tensor]:
    """The residual stream for idx (B, T) after the embeddings and after each block: n_layer + 1
    tensors (B, T, C). Read from hooks on the blocks, so what is read is what GPT.forward computes
    (positions added, every block as it is called)."""
    streams: list[torch.Tensor] = []
    first = model.blocks[0].register_forward_pre_hook(lambda module, inputs: streams.append(inputs[0]))
    after = [block.register_forward_hook(lambda module, inputs, output: streams.append(output))
             for block in model.blocks]
    try:
        with torch.no_grad():
            model(idx)
    finally:
        for hook in (first, *after):
            hook.remove()
    assert len(streams) == len(model.blocks) + 1
    return streams


def lens_probabilities(model: GPT, idx: torch.Tensor) -> torch.Tensor:
    """(n_layer + 1, T, vocab_size): for idx (1, T), each layer's next-character distribution at each position."""
    with torch.no_grad():
        return torch.stack([model.read_out(x)[0].float().softmax(dim=-1) for x in residual_streams(model, idx)])


def _cell(probs: torch.Tensor, chars: list[str], true_id: int | None, top: int) -> dict[str, Any]:
    """One position at one layer: the top guesses and, where there is a next character, its probability."""
    values, ids = probs.topk(min(top, probs.shape[-1]))
    cell: dict[str, Any] = {"top": [{"char": chars[i], "p": float(p)} for p, i in zip(values.tolist(), ids.tolist())]}
    if true_id is not None:
        p_true = float(probs[true_id])
        cell["p_next"] = p_true
        cell["bits"] = -math.log2(p_true) if p_true > 0 else math.inf
    return cell


def _layer_summary(layer: int, cells: list[dict[str, Any]], next_chars: list[str]) -> dict[str, Any]:
    """Means over the positions that have a true next character (all but the last)."""
    scored = [c for c in cells if "p_next" in c]
    n = len(scored)
    return {"layer": layer, "after": "embeddings" if layer == 0 else f"block {layer}", "positions": n,
            "mean_p_next": sum(c["p_next"] for c in scored) / n if n else None,
            "mean_bits": sum(c["bits"] for c in scored) / n if n else None,
            "top_is_next": sum(c["top"][0]["char"] == nxt for c, nxt in zip(scored, next_chars))}


def lens(arg: str | None, text: str, top: int = TOP_K) -> dict[str, Any]:
    """The logit lens of a trained run (its latest checkpoint) over text: per position and layer the
    top guesses for the next character and the probability of the true one; per layer their means."""
    target, loaded, ids = run_and_text(arg, text, "--lens", "ROMEO: What say you?")
    model = loaded.build_model("cpu").eval()
    probs = lens_probabilities(model, torch.tensor([ids], dtype=torch.long))  # (n_layer + 1, T, vocab_size)
    chars = loaded.tokenizer.chars
    positions = []
    for t, char in enumerate(text):
        true_id = ids[t + 1] if t + 1 < len(ids) else None
        positions.append({"position": t, "char": char, "next": text[t + 1] if true_id is not None else None,
                          "layers": [_cell(probs[layer, t], chars, true_id, top) for layer in range(probs.shape[0])]})
    layers = [_layer_summary(layer, [p["layers"][layer] for p in positions], list(text[1:]))
              for layer in range(probs.shape[0])]
    c = model.config
    return {"target": target.describe(), "checkpoint": str(loaded.path), "step": loaded.step, "text": text,
            "n_layer": c.n_layer, "vocab_size": len(chars), "uniform_bits": math.log2(len(chars)),
            "final_norm": model.norm_f is not None, "logit_softcap": c.logit_softcap,
            "tie_weights": c.tie_weights, "layers": layers, "positions": positions}
