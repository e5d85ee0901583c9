"""minigpt compare: existing runs side by side, or train variants of a config (--vary) and compare them."""

from __future__ import annotations

import signal
import sys
from pathlib import Path
from typing import Annotated, Any, List, Optional

import typer

from minigpt_cli.config import UNTIL_BUDGET, UserError, overridden
from minigpt_cli.options import Device, JsonOut, Overrides, Plot, Quiet, Seed, TimeBudget
from minigpt_cli.output import EXIT_FAILURE, count, emit_json, err, loss, out
from minigpt_cli.views import Starting, TrainView

EXAMPLES = ("Examples:\n\n  minigpt compare runs/a runs/b\n\n"
            "  minigpt compare tiny --vary model.pos_encoding=learned,sinusoidal,rope --time-budget 30\n\n"
            "  minigpt compare tiny --vary model.norm_placement=pre,post --set train.max_iters=200 --json")
CURVE_MARKS = "abcdefghjkmnpqrstuvwxyz"  # a run's training curve; its validation points in capitals
ASK_ABOVE = 16  # variants trained without asking


def compare(
    targets: Annotated[List[str], typer.Argument(
        metavar="RUN RUN... | CONFIG", help="Two or more run directories; or one config (path or shipped name) "
                                            "with --vary.")],
    vary: Annotated[List[str], typer.Option(
        "--vary", help="Train one run per value: KEY=V1,V2 (repeatable: every combination).")] = [],
    set_: Overrides = [],
    time_budget: TimeBudget = None,
    data: Annotated[Optional[str], typer.Option(
        "--data", help="Text for every variant (default: the config's).")] = None,
    device: Device = None,
    seed: Seed = None,
    out_dir: Annotated[Path, typer.Option("--out", help="Folder the variants' runs go in.")] = Path("runs"),
    plot: Plot = None,
    yes: Annotated[bool, typer.Option(
        "--yes", "-y", help=f"Train more than {ASK_ABOVE} variants without asking.")] = False,
    json_out: JsonOut = False,
    quiet: Quiet = False,
) -> None:
    """Compare runs side by side, or train variants of a config (--vary) and compare them."""
    from minigpt_cli import runs as runs_lib
    from minigpt_cli.config import option_overrides

    starting = Starting(quiet, "loading")
    interrupted = False
    try:
        if plot is not None:
            from minigpt_cli.inspection import check_plot_path

            check_plot_path(plot)  # before anything trains
        if vary:
            if len(targets) != 1:
                raise UserError("--vary trains variants of one CONFIG; give one config, not "
                                f"{len(targets)} arguments")
            flags = [*set_, *option_overrides(data, time_budget, device, seed)]
            if overridden(flags).get("data.path", "").strip() == "-":
                raise UserError("compare trains several runs on the same text, so it cannot read it from stdin; "
                                "give --data PATH")
            variants = runs_lib.plan_variants(targets[0], vary, flags)
            starting.done()
            _confirm_many(variants, yes)
            result = _train_variants(variants, out_dir, quiet)
            interrupted = any(v["state"] == "interrupted" for v in result["variants"])
        else:
            if set_ or time_budget is not None or data is not None or seed is not None or device is not None:
                raise UserError("--set, --time-budget, --data, --seed and --device shape the runs --vary trains; "
                                "comparing existing runs takes none of them")
            result = runs_lib.compare_runs([Path(t) for t in targets])
    finally:
        starting.done()
    _show(result, plot, json_out, interrupted)


def _show(result: dict, plot: Optional[Path], json_out: bool, interrupted: bool) -> None:
    """The plot if asked, then JSON or the table; after a Ctrl-C, what finished and exit code 130."""
    if plot is not None:
        from minigpt_cli.inspection import plot_curves

        curves = {f"{r['label']} {kind}": r[f"{kind}_curve"] for r in result["runs"] for kind in ("train", "val")}
        result["plot"] = str(plot_curves(curves, plot, "training and validation loss"))
        err.print(f"wrote {result['plot']}", markup=False)
    result["interrupted"] = interrupted
    if json_out:
        emit_json(result)
    else:
        _render(result)
    variants = result.get("variants", [])
    done = sum(v["state"] == "finished" for v in variants)
    if interrupted:
        signum = next(v["signal"] for v in variants if v["state"] == "interrupted") or 2
        by = "Ctrl-C" if signum == 2 else signal.Signals(signum).name
        err.print(f"stopped by {by}: {done} of {len(variants)} variants finished", markup=False)
        raise typer.Exit(128 + signum)
    failed = [v["label"] for v in variants if v["state"] == "failed"]
    if failed:
        err.print(f"{len(failed)} of {len(variants)} variants failed: {'; '.join(failed)}", markup=False)
        raise typer.Exit(EXIT_FAILURE)


def _confirm_many(variants: List[Any], yes: bool) -> None:
    """Above ASK_ABOVE variants (a 100 x 100 --vary is 10,000 runs), the count is stated and asked about."""
    if len(variants) <= ASK_ABOVE or yes:
        return
    what = f"--vary makes {len(variants):,} variants, each a training run"
    if sys.stdin is None or not sys.stdin.isatty():
        raise UserError(f"{what}; pass --yes to train them all")
    try:
        if typer.confirm(f"{what}. Train them all?", default=False, err=True):
            return
    except EOFError:
        pass
    except typer.Abort:
        raise KeyboardInterrupt from None
    raise UserError(f"{what}; nothing was trained")


def _train_variants(variants: List[Any], base: Path, quiet: bool) -> dict:
    from minigpt_cli import runs as runs_lib
    from minigpt_cli.trainer import train as run_training

    if not quiet:
        err.print(f"compare: {len(variants)} variants of {variants[0].config.name} ({_what_each_gets(variants)}): "
                  + "; ".join(v.label for v in variants), markup=False)

    def run(variant: Any, run_dir: Path) -> None:
        index = variants.index(variant) + 1
        if not quiet:
            err.print(f"\n[bold]variant {index}/{len(variants)}[/]: {variant.label} -> {run_dir}")
        view = TrainView(quiet)
        try:
            run_training(variant.config, run_dir, callback=view)
        finally:
            view.close()

    for variant in runs_lib.train_variants(variants, base, run):
        if variant.state == "failed":
            err.print(f"variant {variant.label} failed: {variant.error}", markup=False)
    return runs_lib.compare_variants(variants)


def _what_each_gets(variants: List[Any]) -> str:
    """The length, seed and data the variants share, or that they vary."""
    trains = [v.config.train for v in variants]
    budgets, steps = {t.time_budget for t in trains}, {t.max_iters for t in trains}
    if len(budgets) > 1 or len(steps) > 1:
        length = "length varied"
    elif trains[0].time_budget:
        steps_too = f" or {trains[0].max_iters:,} steps" if trains[0].max_iters < UNTIL_BUDGET else ""
        length = f"{trains[0].time_budget:g}s{steps_too} each"
    else:
        length = f"{trains[0].max_iters:,} step{'s' if trains[0].max_iters != 1 else ''} each"
    seeds = {t.seed for t in trains}
    seed = f"seed {trains[0].seed}" if len(seeds) == 1 else "seed varied"
    data = "same data" if len({v.config.data.path for v in variants}) == 1 else "data varied"
    return f"{length}, {seed}, {data}"


def _render(result: dict) -> None:
    from rich.markup import escape
    from rich.table import Table

    rows = result["runs"]
    if not rows:
        out.print("no run finished a checkpoint: nothing to compare")
        return
    table = Table(title="runs side by side", title_justify="left", title_style="bold")
    table.add_column("", overflow="fold")  # a config key folded, never cut: "train.max_it…" hides which key
    for r in rows:
        table.add_column(escape(r["label"]), justify="right", overflow="fold")
    for key in result["differences"]:
        section, name = key.split(".", 1)
        table.add_row(escape(key), *[escape(str(r["config_values"][section].get(name, "-")) or "(none)") for r in rows])
    if result["differences"]:
        table.add_section()
    for name, cell in _ROWS:
        table.add_row(name, *[cell(r) for r in rows])
    out.print(table)
    if not result["differences"]:
        out.print("(the runs' configs are the same)")
    measures = " or ".join(sorted({r["best_measure"] for r in rows if r["best_measure"]})) or "sampled batches"
    out.print(f"val loss: the final weights on the validation split; best checkpoint: what sample and eval load, "
              f"chosen during training by the loss on {measures}", markup=False, soft_wrap=False)
    _render_chart(rows)


def _render_chart(rows: List[dict]) -> None:
    """Every run's training loss (a point per log line: a curve even where a short run evaluated once
    or twice) and validation loss on one chart, a letter per run: lower case training, capital validation."""
    from rich.markup import escape

    from minigpt_cli.inspection import text_chart

    series, marks = {}, {}
    for kind in ("train", "val"):  # validation drawn last, over the training curve
        for i, r in enumerate(rows):
            letter = CURVE_MARKS[i % len(CURVE_MARKS)]
            series[f"{i} {kind}"] = r[f"{kind}_curve"]
            marks[f"{i} {kind}"] = letter if kind == "train" else letter.upper()
    out.print("[bold]loss against step[/]: lower case the training loss at each log line, capitals the validation "
              "loss at each evaluation", soft_wrap=False)
    for line in text_chart(series, marks=marks, legend=False):
        out.print(line, markup=False, highlight=False)
    for i, r in enumerate(rows):
        letter = CURVE_MARKS[i % len(CURVE_MARKS)]
        out.print(f"  {letter} {letter.upper()}  {escape(r['label'])}", soft_wrap=False)


def _best_cell(r: dict) -> str:
    """The best checkpoint's step, and its loss on the measure that chose it (not val loss's)."""
    if r["best_val_loss"] is None:
        return "-"
    step = f"step {r['best_step']:,}: " if r["best_step"] is not None else ""
    return f"{step}{loss(r['best_val_loss'])} on {_escaped(r['best_measure'] or '?')}"


def _escaped(text: str) -> str:
    from rich.markup import escape

    return escape(text)


# The rows every comparison shows, after the config keys that differ: (name, cell of one run).
_ROWS = (
    ("parameters", lambda r: count(r["params"]) if r["params"] is not None else "-"),
    ("tokens/s", lambda r: f"{r['tokens_per_sec']:,.0f}" if r["tokens_per_sec"] else "-"),
    ("steps", lambda r: f"{r['steps']:,}" if r["steps"] is not None else "-"),
    ("val loss", lambda r: f"{loss(r['final_val_loss'])} ({r['final_measure']})"
        if r["final_val_loss"] is not None else "-"),
    ("bits per char", lambda r: f"{r['final_val_bpc']:.3f}" if r["final_val_bpc"] is not None else "-"),
    ("best checkpoint", lambda r: _best_cell(r)),
    ("wall time", lambda r: f"{r['wall_seconds']:.1f}s" if r["wall_seconds"] is not None else "-"),
    ("state", lambda r: _escaped(r["state"])),
    ("run", lambda r: _escaped(r["path"])),
)
