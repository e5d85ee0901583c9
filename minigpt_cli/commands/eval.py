"""minigpt eval: score a text with a run, then a table of the result (or, with --show, each
character coloured by its surprisal)."""

from __future__ import annotations

import math
from typing import Annotated, Optional

import typer

from minigpt_cli.config import UserError
from minigpt_cli.options import AUTO_DEVICE, Device, JsonOut, RunDir, Threads
from minigpt_cli.output import emit_json, key_value_table, out, visible, warn
from minigpt_cli.views import ProgressView, Starting

EXAMPLES = ("Examples:\n\n  minigpt eval\n\n  minigpt eval runs/default-20261124-101500 --data other.txt\n\n"
            "  cat notes.txt | minigpt eval --data - --json")
# Surprisal colours, from expected to astonishing: (style, bits below).
SURPRISE = (("green", 1.0), ("default", 2.0), ("yellow", 4.0), ("dark_orange", 8.0), ("bold red", math.inf))


def eval_(
    run: RunDir = None,
    data: Annotated[Optional[str], typer.Option(
        "--data", help="UTF-8 file, folder of .txt files, or - for stdin (default: the run's own validation "
                       "split).")] = None,
    stride: Annotated[Optional[int], typer.Option(
        "--stride", help="Characters between window starts: each character after the first window sees at "
                         "least block_size - stride of context (default: block_size / 2).")] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Windows scored together.")] = 32,
    which: Annotated[str, typer.Option("--checkpoint", help="Which checkpoint of the run: best or latest.")] = "best",
    dtype: Annotated[str, typer.Option(
        "--dtype", help="float32, bfloat16, float16 (GPU only), or auto (the training precision).")] = "float32",
    device: Device = None,
    threads: Threads = 0,
    max_chars: Annotated[Optional[int], typer.Option(
        "--max-chars", help="Score a longer text on a fixed sample of windows holding about this many "
                            "characters; 0 scores all of it (default: the run's train.eval_max_chars, "
                            "2,000,000).")] = None,
    show: Annotated[bool, typer.Option(
        "--show", help="Print the text's first 1,000 characters (--limit) coloured by each one's surprisal in "
                       "bits, and a table of surprisal by class of character (--json: the values).")] = False,
    limit: Annotated[Optional[int], typer.Option(
        "--limit", help="With --show: how many characters from the start; 0 is the whole text (default: "
                        "1,000).")] = None,
    json_out: JsonOut = False,
) -> None:
    """Score a text with a trained run: NLL per character, bits per character, perplexity."""
    starting = Starting(False)
    try:
        from minigpt_cli.evaluate import SHOW_CHARS, EvalRequest, evaluate, surprisal
    finally:
        starting.done()

    common = dict(run=run, data=data, stride=stride, batch_size=batch_size, device=device or AUTO_DEVICE, dtype=dtype,
                  which=which, threads=threads)
    if limit is not None and not show:
        raise UserError("--limit applies to --show (how many characters it shows); eval without --show scores "
                        "the whole text (--max-chars bounds that)")
    if show:
        progress = ProgressView(quiet=False)
        try:
            shown = surprisal(EvalRequest(**common, progress=progress), SHOW_CHARS if limit is None else limit)
        finally:
            progress.close()
        if json_out:
            emit_json(shown.to_dict())
        else:
            _render_surprisal(shown.to_dict())
        return
    progress = ProgressView(quiet=False)
    try:
        result = evaluate(EvalRequest(**common, max_chars=max_chars, progress=progress))
    finally:
        progress.close()
    for warning in result.warnings:
        warn(warning)
    if json_out:
        emit_json(result.to_dict())
        return
    _render(result)


def _render(result) -> None:
    context = (f"windows of {result.block_size} every {result.stride} characters: each character after the first "
               f"window sees {result.min_context} to {result.block_size} characters of context"
               if result.stride < result.block_size else
               f"non-overlapping windows of {result.block_size} characters (context 0 to {result.block_size - 1})")
    rows = [
        ("NLL", f"{result.nll:.4f} nats per character (mean -ln p of each next character)"),
        ("bits per character", f"{result.bpc:.4f} (NLL / ln 2)"),
        ("perplexity", f"{result.perplexity:.3f} (e^NLL)"),
        ("uniform baseline", f"{result.uniform_nll:.4f} nats = ln({result.vocab_size}), {result.uniform_bpc:.3f} bits: "
                             f"a model that knows nothing"),
        ("characters scored", f"{result.chars_scored:,} sampled of {result.text_chars:,} (fixed windows; "
                              f"--max-chars 0 scores all)" if result.sampled else
                              f"{result.chars_scored:,} of {result.text_chars:,} (the first is only context)"),
        ("text", result.source),
        ("scoring", context),
        ("checkpoint", f"{result.checkpoint} (step {result.step:,})"),
    ]
    if result.checkpoint_val_loss is not None:
        measure = result.checkpoint_val_measure
        how = ("training's final evaluation of these weights, in non-overlapping windows"
               if measure == "final evaluation" else
               f"training's {measure}" if measure and measure.startswith("final evaluation") else
               f"during training: these weights on {measure}")
        rows.append(("val loss in training", f"{result.checkpoint_val_loss:.4f} ({how})"))
    rows.append(("speed", f"{result.chars_per_second:,.0f} characters/s on {result.device}, {result.precision} "
                          f"({result.seconds:.2f}s)"))
    out.print(key_value_table("evaluation", rows))


def _render_surprisal(result: dict) -> None:
    from rich.text import Text

    chars = result["chars"]
    out.print(f"[bold]surprisal[/] -log2 p(character | the ones before it) of the first {result['shown_chars']:,} of "
              f"{result['text_chars']:,} characters of {result['source']}, scored in windows of "
              f"{result['block_size']} characters as training sees them:", highlight=False, soft_wrap=False)
    legend = Text("  ")
    low = 0.0
    for style, below in SURPRISE:
        legend.append(f"{low:g}-{below:g} bits " if below < math.inf else f"{low:g}+ bits", style=style)
        legend.append("  ")
        low = below
    out.print(legend)
    text = Text()
    for item in chars:
        bits = item["bits"]
        style = "dim" if bits is None else next(s for s, below in SURPRISE if bits < below)
        text.append("↵\n" if item["char"] == "\n" else visible(item["char"]), style=style)
    out.print(text, soft_wrap=False)  # a long line of the text wraps at the terminal's width (↵ marks its own)
    if any(c["bits"] is not None for c in chars):
        _surprisal_summary(result)


def _surprisal_summary(result: dict) -> None:
    """The mean against a uniform guess, short context against long, and the hardest characters."""
    from minigpt_cli.tokenizer import visible_char

    chars = result["chars"]
    scored = [c for c in chars if c["bits"] is not None]
    early = [c["bits"] for c in scored if c["context"] <= 4]
    later = [c["bits"] for c in scored if c["context"] > 4]
    out.print()
    out.print(f"mean {result['mean_bits']:.3f} bits per character; a uniform guess over the {result['vocab_size']} "
              f"characters costs {result['uniform_bits']:.3f}", markup=False, soft_wrap=False)
    out.print(_class_table(result))
    if early and later:
        out.print(f"with at most 4 characters of context (each window's start): {sum(early) / len(early):.2f} bits "
                  f"on average over {len(early)}; with more: {sum(later) / len(later):.2f} over {len(later)}",
                  markup=False, soft_wrap=False)
    hardest = sorted(range(len(chars)), key=lambda i: -(chars[i]["bits"] or 0.0))[:8]
    out.print("hardest characters, after the 8 before them:", markup=False)
    for i in (i for i in hardest if chars[i]["bits"] is not None):  # one a line: each fits 80 columns
        before = "".join(visible_char(c["char"]) for c in chars[max(0, i - 8):i])
        out.print(f"  {visible_char(chars[i]['char'])!r} after {before!r} ({chars[i]['bits']:.1f} bits, context "
                  f"{chars[i]['context']})", markup=False, highlight=False, soft_wrap=False)


def _class_table(result: dict) -> object:
    """Surprisal summed up by class of character: which kinds of character the bits go to."""
    from minigpt_cli.output import titled_table

    table = titled_table("where the bits go, by class of character", [
        "class", "characters", "% of characters", "mean bits", "% of all bits"])
    table.columns[0].justify = "left"
    for row in result["classes"]:
        if not row["chars"]:
            table.add_row(row["class"], "0", "-", "-", "-")
            continue
        table.add_row(row["class"], f"{row['chars']:,}", f"{row['share_chars']:.1%}", f"{row['mean_bits']:.2f}",
                      "-" if row["share_bits"] is None else f"{row['share_bits']:.1%}")
    scored = sum(row["chars"] for row in result["classes"])
    table.add_section()
    table.add_row("all", f"{scored:,}", "100.0%", f"{result['mean_bits']:.2f}", "100.0%")
    return table
