"""minigpt runs: list the runs under a folder (a table, newest first), or `runs rm` to delete some."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, List, Optional

import typer

from minigpt_cli.config import UserError
from minigpt_cli.options import JsonOut
from minigpt_cli.output import EXIT_FAILURE, count, emit_json, err, fmt_seconds, out, size

EXAMPLES = ("Examples:\n\n  minigpt runs\n\n  minigpt runs --json\n\n"
            "  minigpt runs rm runs/tiny-20261124-101500 --yes")
STATE_STYLES = {"finished": "green", "live": "bold cyan", "paused": "yellow", "interrupted": "yellow",
                "failed": "red", "damaged": "red", "not a run": "dim"}
# How a run ended, as short as the state column allows ("" for the plain end: max_iters reached).
SHORT_ENDINGS = {"time_budget": "budget", "max_iters": "", "stop_after": "stop_after"}  # by RunInfo.ending
COLUMNS = (("run", "left"), ("config", "left"), ("params", "right"), ("steps", "right"), ("tokens", "right"),
           ("val loss", "right"), ("best step", "right"), ("wall", "right"), ("state", "left"), ("size", "right"))
# Under the table: what the two loss columns are, so that no one compares a sampled estimate with val loss.
LOSS_NOTE = ("val loss: the final weights on the validation split (a fixed sample of it where it is large or the "
             "time budget short); best step: the checkpoint sample and eval load, chosen during training by the loss "
             "on {measures}")


def runs(
    items: Annotated[Optional[List[str]], typer.Argument(
        metavar="[FOLDER] | rm RUN...", help="Folder to list (default: ./runs); or rm and the runs to delete.",
        show_default=False)] = None,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="With rm: delete without asking.")] = False,
    json_out: JsonOut = False,
) -> None:
    """List your runs, newest first (what, how far, how good, how it ended, size); `runs rm RUN...` deletes runs."""
    from minigpt_cli.runs import list_runs

    items = list(items or [])
    if items and items[0] == "rm":
        _remove(items[1:], yes, json_out)
        return
    if yes:
        raise UserError("--yes goes with rm (minigpt runs rm RUN... --yes)")
    if len(items) > 1:
        raise UserError("runs lists one FOLDER; to delete runs: minigpt runs rm RUN...")
    folder = Path(items[0]) if items else Path("runs")
    infos = [] if not items and not folder.exists() else list_runs(folder)
    if json_out:
        emit_json({"folder": str(folder), "runs": [r.to_dict() for r in infos]})
        return
    _render(folder, infos)


def _remove(paths: List[str], yes: bool, json_out: bool) -> None:
    from minigpt_cli.runs import plan_removal, remove_run

    plans = plan_removal([Path(p) for p in paths])
    total = sum(p.size_bytes for p in plans)
    for p in plans:
        err.print(f"  {_what_goes(p)}", markup=False)
    runs = f"{len(plans)} run{'s' if len(plans) > 1 else ''} ({size(total)})"
    if not yes and not _confirmed(f"Delete {runs}?"):
        err.print("nothing deleted (pass --yes to delete without asking)", markup=False)
        raise typer.Exit(EXIT_FAILURE)
    kept = {p.info.path: remove_run(p) for p in plans}
    kept = {path: names for path, names in kept.items() if names}
    if json_out:
        emit_json({"removed": [p.info.path for p in plans], "bytes": total, "kept": kept})
        return
    err.print(f"deleted {runs}", markup=False)
    for path, names in kept.items():
        err.print(f"  kept in {path} (not written by minigpt): {', '.join(names)}", markup=False)


def _what_goes(plan: Any) -> str:
    r = plan.info
    if plan.contents is None:
        return f"the link {r.path} (its target {r.link} stays)"
    foreign = len(plan.contents.foreign)
    keeps = f"; keeps {foreign} entr{'ies' if foreign > 1 else 'y'} minigpt did not write" if foreign else ""
    return f"{r.path} ({r.state}, {size(plan.size_bytes)}){keeps}"


def _confirmed(prompt: str) -> bool:
    """The user's answer; no answer (end of input) is no. Ctrl-C at the prompt ends with 130, as anywhere."""
    try:
        return typer.confirm(prompt, default=False, err=True)
    except EOFError:
        return False
    except typer.Abort:
        raise KeyboardInterrupt from None


def _render(folder: Path, infos: List[Any]) -> None:
    """The runs as a table where it fits the width (a wide terminal), else a block per run (a pipe, a
    small terminal: 80 columns); what is not a run is counted in one note, not listed row by row."""
    from rich.markup import escape

    shown = [r for r in infos if r.is_run]
    notes: List[str] = []
    rows = [_row(r, notes) for r in shown]
    if not rows:
        out.print(f"no runs under {escape(str(folder))} (train one with: minigpt train)")
    else:
        if _table_width(rows) <= out.get().width:
            out.print(_table(folder, rows))
        else:
            out.print(f"[bold]runs under {escape(str(folder))}, newest first[/]")
            for row in rows:
                out.print(_block(row))
        measures = sorted({r.best_measure for r in shown if r.best_measure}) or ["sampled batches"]
        out.print(LOSS_NOTE.format(measures=" or ".join(measures)), markup=False, soft_wrap=False)
    for note in notes:
        out.print(f"  {note}", markup=False)
    others = [r for r in infos if not r.is_run]
    if others:
        named = ", ".join(f"{r.name} ({r.detail})" for r in others[:3])
        more = f" and {len(others) - 3:,} more" if len(others) > 3 else ""
        out.print(f"  not runs: {named}{more}", markup=False)


def _table(folder: Path, rows: List[List[str]]) -> Any:
    from rich.markup import escape
    from rich.table import Table

    table = Table(title=f"runs under {escape(str(folder))}, newest first", title_justify="left",
                  title_style="bold", box=None, pad_edge=False)
    for column, justify in COLUMNS:
        table.add_column(column, justify=justify, header_style="bold", no_wrap=True)
    for row in rows:
        table.add_row(*row)
    return table


def _table_width(rows: List[List[str]]) -> int:
    """Columns as wide as their widest cell, a space of padding either side between them."""
    from rich.text import Text

    widths = [max([len(column)] + [Text.from_markup(row[i]).cell_len for row in rows])
              for i, (column, _) in enumerate(COLUMNS)]
    return sum(widths) + 2 * (len(widths) - 1)


def _block(row: List[str]) -> str:
    """One run in two or three lines, for a width the table does not fit."""
    cells = dict(zip((c for c, _ in COLUMNS), row))
    first = f"[bold]{cells.pop('run')}[/]  {cells.pop('state')}"
    rest = [f"{column} {value}" for column, value in cells.items() if value != "-"]
    return "\n".join([first] + [f"  {'  '.join(rest[i:i + 4])}" for i in range(0, len(rest), 4)])


def _row(r: Any, notes: List[str]) -> List[str]:
    """One run's cells; what does not fit a cell goes to notes."""
    from rich.markup import escape

    name = escape(r.name) + (f" -> {escape(r.link)}" if r.link else "")
    # A known ending fits the state column; any other detail is a note under the table.
    detail = SHORT_ENDINGS.get(r.ending) if r.ending else None
    if detail is None and r.detail:
        notes.append(f"{r.name}: {r.detail}")
    elif r.state == "paused":
        notes.append(f"{r.name}: {r.detail}")
    state = f"[{STATE_STYLES.get(r.state, '')}]{r.state}[/]" + (f" ({detail})" if detail else "")
    if r.parent:
        notes.append(f"{r.name}: started from the weights of {r.parent}")
    return [name, escape(r.config or "-"), count(r.params) if r.params is not None else "-",
            f"{r.steps:,}" if r.steps is not None else "-",
            count(r.tokens) if r.tokens is not None else "-",
            f"{r.final_val_loss:.4f}" if r.final_val_loss is not None else "-",
            f"{r.best_step:,}" if r.best_step is not None else "-",
            fmt_seconds(r.wall_seconds) if r.wall_seconds is not None else "-", state,
            size(r.size_bytes) if r.is_run and not r.link else "-"]
