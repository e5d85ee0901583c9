"""minigpt inspect: what a run or config is made of (modules, parameters, FLOPs, cache, shapes,
training record), or with --attention a run's attention maps over a text."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated, Any, Callable, List, Optional

import typer

from minigpt_cli.config import UserError
from minigpt_cli.options import JsonOut, Overrides, Plot, Target, VocabSize
from minigpt_cli.output import count, emit_json, err, key_value_table, mib, out, si, titled_table, vocab_source
from minigpt_cli.views import Starting, final_scope

EXAMPLES = ("Examples:\n\n  minigpt inspect\n\n  minigpt inspect gpt2_small\n\n"
            "  minigpt inspect runs/default-20261124-101500 --plot losses.png")


def inspect(
    target: Target = None,
    attention_text: Annotated[Optional[str], typer.Option(
        "--attention", help="Show each layer's and head's attention weights over this text (at most block_size "
                            "characters) as a heat map; needs a run.")] = None,
    lens_text: Annotated[Optional[str], typer.Option(
        "--lens", help="Show what each layer predicts for the next character of this text (at most block_size "
                       "characters): the residual stream after the embeddings and after each block, read through "
                       "the final norm and head (the logit lens); needs a run.")] = None,
    plot: Plot = None,
    set_: Overrides = [],
    vocab_size: VocabSize = None,
    json_out: JsonOut = False,
) -> None:
    """Show what a run or config is made of: modules, parameters, FLOPs, cache, shapes, training record."""
    if lens_text is not None:
        _inspect_lens(target, lens_text, attention_text is not None, plot, set_, vocab_size, json_out)
        return
    starting = Starting(False)
    try:
        from minigpt_cli.inspection import inspect as run_inspect
        from minigpt_cli.inspection import plot_curves

        if attention_text is None:
            result = run_inspect(target, set_, vocab_size)
    finally:
        starting.done()
    if attention_text is not None:
        _inspect_attention(target, attention_text, plot, set_, vocab_size, json_out)
        return
    if plot is not None and "run" not in result:
        raise UserError("--plot draws a run's loss curves; a config has none (pass a run directory)")
    _show_inspection(result, plot, lambda path: plot_curves(result["run"]["curves"], path, result["target"]["name"]),
                     json_out, _render_inspect)


def _tree(node: dict) -> Any:
    from rich.markup import escape
    from rich.tree import Tree

    def label(n: dict) -> str:
        name = n["name"] if n["repeat"] == 1 else f"{n['name']} (x{n['repeat']})"
        name = name if n["name"] == n["type"] else f"{name}: {n['type']}"
        detail = f"  {n['detail']}" if n["detail"] else ""
        tied = f"  [tied: {', '.join(n['tied_to'])}]" if n.get("tied_to") else ""
        params = f"{n['params']:,} params" + (" each" if n["repeat"] > 1 else "")
        order = f"\n{n['order']}" if n.get("order") else ""  # a block's order of operations, on its own line
        return escape(f"{name}{detail}  [{params}]{tied}{order}")

    def grow(branch: Any, n: dict) -> None:
        for child in n["children"]:
            grow(branch.add(label(child), highlight=False), child)

    root = Tree(label(node), highlight=False)
    grow(root, node)
    return root


def _vocab_comparison(params: dict, target: dict) -> str:
    """Which parameter count is which: this vocabulary's, and GPT-2's 50,257-token one."""
    from minigpt_cli.inspection import GPT2_VOCAB_SIZE

    total, V, gpt2 = params["total"], params["vocab_size"], params["at_gpt2_vocab"]
    if V == GPT2_VOCAB_SIZE:
        return (f"{count(total)} parameters with GPT-2's own vocabulary of {V:,} BPE tokens "
                f"(what GPT-2's own sizes count: 124M, 355M, 774M, 1.5B)")
    option = f"--vocab-size {GPT2_VOCAB_SIZE}"
    how = f"minigpt inspect {target['name']} {option}" if target["kind"] == "config" else option + " on its config"
    return (f"{count(total)} parameters with this vocabulary of {V:,} characters; the same blocks with GPT-2's "
            f"own vocabulary of {GPT2_VOCAB_SIZE:,} BPE tokens would have {count(gpt2)} ({how})")


def _render_inspect(result: dict) -> None:
    from rich.markup import escape
    from rich.table import Table

    params = result["params"]
    target = result["target"]
    config = f"config {escape(target['config'])}, " if target["kind"] == "run" else ""
    out.print(f"[bold]{target['kind']}[/] {escape(target['name'])} ({config}vocabulary {target['vocab_size']}: "
              f"{escape(vocab_source(target))})")
    out.print(_tree(params["tree"]), soft_wrap=False)  # a long label wraps under its branch, never cut
    table = Table(title="parameters", title_justify="left", title_style="bold")
    table.add_column("module")
    table.add_column("parameters", justify="right")
    for name, n in params["by_module"].items():
        table.add_row(name, f"{n:,}")
    table.add_row("[bold]total[/]", f"[bold]{params['total']:,}[/]")
    out.print(table)
    # Prose wraps at the terminal's width (at spaces: a number is never split).
    out.print(f"embeddings {params['embedding']:,}, everything else {params['non_embedding']:,}; "
              f"{params['per_layer']:,} per layer; float32 weights {mib(result['weights_bytes'])}"
              + ("; lm_head shares wte's weight" if params["tied_weights"] else ""), markup=False, soft_wrap=False)
    out.print(_vocab_comparison(params, target), markup=False, soft_wrap=False)
    _render_costs(result)
    _render_shapes(result)
    if result.get("run"):
        _render_run(result["run"])


def _counter_note(flops: dict, counted: dict) -> str:
    if not flops.get("short_conv_forward") or counted["train"] <= 1.001 * flops["train"]:
        return ""
    return " (more than 3 x forward: it counts the short convolutions' backward as if they mixed every channel)"


def _render_costs(result: dict) -> None:
    """FLOPs per token and the KV cache's size."""
    flops, kv = result["flops_per_token"], result["kv_cache"]
    counted = flops.get("counted")
    config_has_conv = bool(result["config"]["model"].get("short_conv"))
    rows = [
        ("N (matmul weights)", f"{flops['matmul_params']:,} (attention, MLP and lm_head; not the embeddings)"),
        ("forward", f"{si(flops['forward'])}FLOP per token = 2N + {si(flops['attention_forward'])} "
                    f"attention at T = {flops['seq_len']} (4 x n_layer x T x n_embd)"
                    + (f" + {si(flops['short_conv_forward'])} short convolutions"
                       if flops.get("short_conv_forward") else "")),
        ("training", f"{si(flops['train'])}FLOP per token (3 x forward: backward costs twice the forward)"),
        ("counted as", flops["convention"]),
    ]
    if counted:
        rows.append(("torch's FLOP counter", f"{si(counted['forward'])} forward, {si(counted['train'])} "
                                             f"training per token" + _counter_note(flops, counted)))
    out.print(key_value_table("FLOPs per token", rows))
    out.print(key_value_table("KV cache", [
        ("per token", f"{kv['bytes_per_token']:,} bytes: keys and values of every layer"
                      + (" and its sublayers' inputs (for the short convolutions)" if config_has_conv else "")
                      + ", in float32 at "
                      f"every sampling --dtype ({kv['bytes_per_token_bf16']:,} if they were bfloat16)"),
        ("per sequence at block_size", f"{mib(kv['bytes_at_block_size'])} ({kv['block_size']} positions)"),
    ]))


def _render_shapes(result: dict) -> None:
    """The tensors of a training batch and of one decoding step."""
    from rich.markup import escape
    from rich.table import Table

    config = result["config"]
    for stage, title in (("training", f"shapes of a training batch (B = {config['train']['batch_size']}, "
                                      f"T = block_size = {config['model']['block_size']})"),
                         ("decoding", "shapes of one decoding step (KV cache full but one position)")):
        table = Table(title=title, title_justify="left", title_style="bold")
        table.add_column("tensor", overflow="fold")  # wraps at spaces; rich never folds a word it can fit
        table.add_column("shape", no_wrap=True)
        table.add_column("as", overflow="fold")
        for row in result["shapes"]:
            if row["stage"] == stage:
                note = f" [dim]({escape(row['note'])})[/]" if row["note"] else ""
                table.add_row(escape(row["name"]) + note, "(" + ", ".join(map(str, row["shape"])) + ")",
                              escape(row["symbols"]))
        out.print(table)


def _render_run(run: dict) -> None:
    """A run's training record and its loss curves."""
    from rich.markup import escape

    from minigpt_cli.inspection import text_chart
    from minigpt_cli.scoring import bits_per_char

    scope = (final_scope(run["val_chars_scored"], run["val_chars"], run["val_windows"])
             if run.get("val_chars_scored") is not None and run.get("val_chars") else "the validation split")
    val = (f"{run['val_loss']:.4f} ({bits_per_char(run['val_loss']):.3f} bits per character) on {scope}, the "
           f"final weights" if run.get("val_loss") is not None else "-")
    best = (f"step {run['best_step'] if run.get('best_step') is not None else '?'}: {run['best_val_loss']:.4f} "
            f"on {run['best_measure']}, the measure that chose it" if run["best_val_loss"] is not None else "-")
    out.print(key_value_table("training record", [
        ("vocabulary", escape(f"{run['vocab']['size']} characters: {run['vocab']['chars']}")),
        ("steps", f"{run['steps']:,}"),
        ("tokens seen", f"{run['tokens_seen']:,}"),
        ("wall time", f"{run['wall_seconds']:.1f}s"),
        ("device", escape(f"{run['device']}, {run['precision']}, torch {run['torch_version']}")),
        ("val loss", val),
        ("best checkpoint", best),
        ("data fingerprint", f"{run['data_fingerprint']}"),
        ("checkpoint", escape(run["checkpoint"])),
        *_parent_rows(run.get("parent")),
    ]))
    out.print("[bold]loss against step[/]")
    for line in text_chart(run["curves"]):
        out.print(line, markup=False, highlight=False)


def _parent_rows(parent: Optional[dict]) -> List[tuple]:
    from rich.markup import escape

    if not parent:
        return []
    added = parent.get("added_chars") or ""
    grown = f"; added to its vocabulary: {escape(repr(added))}" if added else ""
    return [("started from", escape(f"{parent.get('run')} (step {parent.get('step')}, "
                                    f"{parent.get('checkpoint')})") + grown)]


def _show_inspection(result: dict, plot: Optional[Path], draw: Callable[[Path], Path], json_out: bool,
                     render: Callable[[dict], None]) -> None:
    """With --plot, draw(plot) writes the image; then one JSON object or the rendered view."""
    if plot is not None:
        written = draw(plot)
        result["plot"] = str(written)
        err.print(f"wrote {written}", markup=False)
    if json_out:
        emit_json(result)
        return
    render(result)


def _inspect_attention(target: Optional[str], text: str, plot: Optional[Path], overrides: List[str],
                       vocab_size: Optional[int], json_out: bool) -> None:
    from minigpt_cli.inspection import attention, plot_attention

    if overrides or vocab_size is not None:
        raise UserError("--attention reads a trained run's weights; --set and --vocab-size change a CONFIG")
    result = attention(target, text)
    _show_inspection(result, plot, lambda path: plot_attention(result, path), json_out, _render_attention)


# Heat-map cells: a shade for the weight (readable without colour) and a colour from dark blue to yellow.
_SHADES = (("·", 0.05), ("░", 0.25), ("▒", 0.5), ("▓", 0.75), ("█", math.inf))  # glyph, weights below


def _heat_cell(weight: float) -> Any:
    from rich.color import Color
    from rich.style import Style

    w = min(max(weight, 0.0), 1.0)
    glyph = next(g for g, below in _SHADES if w < below)
    colour = Color.from_rgb(int(40 + 215 * w), int(40 + 190 * w ** 0.5), int(120 * (1 - w)))
    return glyph, Style(color=colour)


def _attention_map(head: dict, chars: List[str]) -> Any:
    """One head as characters: a row per position attending, a column per position read."""
    from rich.text import Text

    text = Text()
    text.append(f"head {head['head']}\n", style="bold")
    text.append("  " + "".join(chars) + "\n", style="dim")
    for i, row in enumerate(head["weights"]):
        text.append(f"{chars[i]} ", style="dim")
        for weight in row:
            glyph, style = _heat_cell(weight)
            text.append(glyph, style=style)
        text.append(" " * (len(chars) - len(row)) + "\n")
    return text


def _attention_notes(result: dict) -> List[str]:
    """What the heat maps show, and where this model's attention departs from the textbook's."""
    qk = ("Q and K are each RMS-normalised per head before the product (qk_norm; the textbook has no norm "
          "there), so a score is a cosine scaled by sqrt(head_dim); " if result["qk_norm"] else "")
    positions = {
        "rope": ("positions: RoPE rotates Q and K by their positions (nothing is added to the input), so a "
                 "score depends on how far apart two characters are"),
        "learned": "positions: a learned vector per position is added to the input (GPT-2)",
        "sinusoidal": "positions: the fixed sinusoidal table is added to the input (the original Transformer)",
    }
    notes = [(f"softmax(QK^T/sqrt(head_dim)) of every layer and head: {qk}row = the character attending, "
              f"columns = the characters up to it (the causal mask hides the rest); weight · under 0.05, "
              f"░ under 0.25, ▒ under 0.5, ▓ under 0.75, █ 0.75 to 1"),
             positions[result["pos_encoding"]]]
    k = result["short_conv"]
    if k > 1:  # a width of 1 only scales each channel: nothing from other positions
        notes.append(f"short_conv = {k}: each attention input also mixes its own last {k} positions, so a "
                     f"query or key already carries the {k - 1} characters before its own")
    return notes


def _head_table(result: dict) -> Any:
    """Each head summed up: its mean weight by offset, on the first character, on induction targets."""
    table = titled_table("what each head does: mean weight on the character itself, 1 to 3 back, the first "
                         "character and the induction targets (over the positions 1..T-1 where each exists)",
                         ["layer", "head", "self", "-1", "-2", "-3", "first", "induction", "pattern"])
    for layer in result["layers"]:
        for head in layer["heads"]:
            offsets = head["offsets"]
            cells = [offsets["0"], offsets["-1"], offsets["-2"], offsets["-3"], head["first"], head["induction"]]
            table.add_row(str(layer["layer"]), str(head["head"]), *("-" if v is None else f"{v:.2f}" for v in cells),
                          head["pattern"] or "-")
    return table


def _induction_line(baseline: dict) -> str:
    if not baseline["positions"]:
        return "induction: no character of this text repeats an earlier one (-: nothing to measure)"
    return (f"induction: the weight a position gives to the characters that followed earlier occurrences of its "
            f"own character (not itself or the one before it); {baseline['positions']} positions here have "
            f"one, where uniform attention would score {baseline['uniform']:.2f}")


def _render_attention(result: dict) -> None:
    from rich.columns import Columns
    from rich.markup import escape

    from minigpt_cli.tokenizer import visible_char

    chars = [visible_char(c) for c in result["chars"]]
    out.print(f"[bold]attention[/] of {escape(result['target']['name'])} (step {result['step']:,}) over "
              f"{len(chars)} characters: {escape(''.join(chars))}", soft_wrap=False)
    for note in _attention_notes(result):
        out.print(note, markup=False, soft_wrap=False)  # wrapped at the terminal's width, piped too
    for layer in result["layers"]:
        out.print(f"\n[bold]layer {layer['layer']}[/]")
        out.print(Columns([_attention_map(head, chars) for head in layer["heads"]], padding=(0, 3)))
    out.print()
    out.print(_head_table(result), soft_wrap=False)
    out.print(_induction_line(result["induction_baseline"]), markup=False, soft_wrap=False)
    out.print(result["pattern_rule"], markup=False, soft_wrap=False)


# ---------------------------------------------------------------------------------------------
# What each layer adds: inspect --lens
# ---------------------------------------------------------------------------------------------

def _inspect_lens(target: Optional[str], text: str, with_attention: bool, plot: Optional[Path],
                  overrides: List[str], vocab_size: Optional[int], json_out: bool) -> None:
    if with_attention:
        raise UserError("--lens and --attention are two views: give one of them")
    if plot is not None:
        raise UserError("--plot draws loss curves or --attention maps; --lens has no plot (use --json for its values)")
    if overrides or vocab_size is not None:
        raise UserError("--lens reads a trained run's weights; --set and --vocab-size change a CONFIG")
    starting = Starting(False)
    try:
        from minigpt_cli.lens import lens

        result = lens(target, text)
    finally:
        starting.done()
    if json_out:
        emit_json(result)
        return
    _render_lens(result)


def _lens_cell(cell: dict, next_char: Optional[str]) -> Any:
    """'e 31%': the layer's top guess and the probability it gives the true next character (the top
    guess alone at the last position); bold green where the top guess is the true next character."""
    from rich.text import Text

    from minigpt_cli.tokenizer import visible_char

    guess = cell["top"][0]["char"]
    if "p_next" not in cell:
        return Text(visible_char(guess))
    p = cell["p_next"]
    shown = f"{visible_char(guess)} {'<1%' if p < 0.005 else f'{p:.0%}'}"
    return Text(shown, style="bold green" if guess == next_char else "")


def _lens_layer_groups(n_columns: int, rows: int, width: int) -> List[range]:
    """Layer columns split into tables that fit the terminal's width: each layer column takes 9
    characters ('e 100%' and its border), the position, character and next-character columns the rest."""
    fixed = len(str(rows - 1)) + len("char") + len("next") + 3 * 3 + 1
    tables = -(-n_columns // max(1, (width - fixed) // 9))
    per_table = -(-n_columns // tables)  # as even as they come: 13 layers at 80 columns in 5, 5 and 3
    return [range(start, min(start + per_table, n_columns)) for start in range(0, n_columns, per_table)]


def _lens_table(result: dict, layers: range) -> Any:
    from rich.table import Table

    from minigpt_cli.tokenizer import visible_char

    last = result["n_layer"]
    table = Table(title_justify="left", title_style="bold")
    table.add_column("#", justify="right")
    table.add_column("char", justify="center")
    table.add_column("next", justify="center")
    for layer in layers:
        table.add_column(f"{layer}\n" + ("emb" if layer == 0 else "out" if layer == last else "block"),
                         justify="right", no_wrap=True)
    for position in result["positions"]:
        nxt = position["next"]
        table.add_row(str(position["position"]), visible_char(position["char"]),
                      "" if nxt is None else visible_char(nxt),
                      *(_lens_cell(position["layers"][layer], nxt) for layer in layers))
    return table


def _render_lens(result: dict) -> None:
    from rich.markup import escape

    from minigpt_cli.tokenizer import visible_char

    text, last = result["text"], result["n_layer"]
    readout = "the final norm and head" if result["final_norm"] else "the head (post-norm blocks end in a norm)"
    if result["logit_softcap"]:
        readout += f", soft-capped at {result['logit_softcap']:g}"
    out.print(f"[bold]logit lens[/] of {escape(result['target']['name'])} (step {result['step']:,}) over "
              f"{len(text)} characters: {escape(''.join(visible_char(c) for c in text))}", soft_wrap=False)
    out.print(f"Each layer's residual stream read through {readout}, softmaxed: what the model would predict "
              f"if it stopped there. Layer 0 is the embeddings alone, layer {last} (out) the model's own output. "
              f"A cell is the layer's top guess for the next character and the probability it gives the true "
              f"next one (in bold where the guess is right).", markup=False, soft_wrap=False)
    if result["tie_weights"]:
        out.print("The head shares the token embedding's weights (tied), so layer 0 mostly guesses the character "
                  "itself.", markup=False, soft_wrap=False)
    groups = _lens_layer_groups(last + 1, len(text), out.width)
    for group in groups:
        if len(groups) > 1:
            out.print(f"\n[bold]layers {group.start} to {group.stop - 1}[/]")
        out.print(_lens_table(result, group))
    _render_lens_summary(result)


def _render_lens_summary(result: dict) -> None:
    """One line per layer: what the true next characters cost there, falling layer by layer."""
    if not result["layers"][0]["positions"]:
        out.print("A text of one character has no next character to score: give two or more to see what each "
                  "layer gives the true next one.", markup=False, soft_wrap=False)
        return
    table = titled_table(f"per layer, over the {result['layers'][0]['positions']} positions with a next "
                         f"character (a uniform guess costs {result['uniform_bits']:.2f} bits)",
                         ["layer", "after", "mean p(next)", "mean bits", "top = next"])
    table.columns[1].justify = "left"
    for layer in result["layers"]:
        after = layer["after"] + (" (output)" if layer["layer"] == result["n_layer"] else "")
        table.add_row(str(layer["layer"]), after, f"{layer['mean_p_next']:.3f}", f"{layer['mean_bits']:.2f}",
                      f"{layer['top_is_next']}/{layer['positions']}")
    out.print(table, soft_wrap=False)  # the title wraps to the table's width
