"""minigpt train: plan the run, train it with a live view, render the summary."""

from __future__ import annotations

import math
import shlex
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from minigpt_cli.clock import process_started_at
from minigpt_cli.config import WHOLE_SPLIT
from minigpt_cli.options import Device, JsonOut, Overrides, Quiet, Seed, TimeBudget
from minigpt_cli.output import EXIT_FAILURE, count, emit_json, err, fail, out
from minigpt_cli.views import Starting, TrainView, final_scope

EXAMPLES = ("Examples:\n\n  minigpt train\n\n  minigpt train shakespeare_char --device cuda\n\n"
            "  minigpt train --data my.txt --set model.n_layer=2 --time-budget 60")


def train(
    config: Annotated[Optional[str], typer.Argument(
        help="YAML path or shipped config name (default: default, or shakespeare_char on a CUDA GPU).",
        show_default=False)] = None,
    data: Annotated[Optional[str], typer.Option(
        "--data", help="Text file, folder of .txt files, or - for stdin (default: the bundled tiny "
                       "Shakespeare).")] = None,
    out_dir: Annotated[Optional[Path], typer.Option(
        "--out", help="Run directory (default: runs/<config>-<date>-<time>).")] = None,
    set_: Overrides = [],
    resume: Annotated[bool, typer.Option(
        "--resume", help="Continue the run in --out (default: newest under ./runs) from its latest "
                         "checkpoint.")] = False,
    time_budget: TimeBudget = None,
    device: Device = None,
    seed: Seed = None,
    deterministic: Annotated[bool, typer.Option(
        "--deterministic", help="Use PyTorch's deterministic algorithms (matters on CUDA).")] = False,
    init_from: Annotated[Optional[Path], typer.Option(
        "--init-from", help="Start from the weights of this run (its best checkpoint), with a fresh "
                            "optimizer and schedule.")] = None,
    extend_vocab: Annotated[bool, typer.Option(
        "--extend-vocab", help="With --init-from: give characters the run's vocabulary lacks new embedding "
                               "and output rows (else refused).")] = False,
    json_out: JsonOut = False,
    quiet: Quiet = False,
) -> None:
    """Train a model on text and save checkpoints in a run directory."""
    starting = Starting(quiet)
    try:
        from minigpt_cli.plan import TrainOptions, plan_run

        plan = plan_run(TrainOptions(config, resume, out_dir, set_, data, time_budget, device, seed, deterministic,
                                     init_from, extend_vocab))
    except BaseException:
        starting.done()
        raise
    from minigpt_cli.device import detect_distributed

    is_main = detect_distributed().is_main
    view = TrainView(quiet or not is_main, starting)
    if plan.note and not quiet and is_main:
        err.print(f"using {plan.note}", markup=False)
    result = _run(plan, resume, view, is_main, json_out)
    if not is_main:
        return
    summary = {**result.to_dict(), "config": plan.config.name}
    if result.vocab_size:
        summary["uniform_loss"] = uniform_baseline(result.vocab_size)[0]
    if json_out:
        emit_json(summary)
        return
    _render(result, plan.config)
    if not quiet:
        if result.stopped != "stop_after":
            prompt = shlex.quote(result.prompt) if result.prompt else '""'
            err.print(f"next: minigpt sample {shlex.quote(result.run_dir)} --prompt {prompt}", markup=False)
        else:
            err.print(f"next: minigpt train --resume --out {result.run_dir}", markup=False)


def _run(plan: Any, resume: bool, view: TrainView, is_main: bool, json_out: bool) -> Any:
    """Train; a signal saves and exits 128 + its number, a failure to go on exits 1 with one line."""
    from minigpt_cli.rundir import CheckpointWriteError, remove_unused_run_dir
    from minigpt_cli.trainer import NonFiniteLoss, TrainingStopped
    from minigpt_cli.trainer import train as run_training

    cfg, run_dir = plan.config, plan.run_dir
    try:
        return run_training(cfg, run_dir, resume=resume, callback=view, started_at=process_started_at())
    except TrainingStopped as stop:
        view.close()
        if is_main:
            err.print(f"{stop}; checkpoint saved in {run_dir} (continue with: minigpt train --resume --out {run_dir})",
                      markup=False)
            if json_out:
                emit_json({**stop.result.to_dict(), "config": cfg.name})
        raise typer.Exit(128 + stop.signum)
    except (NonFiniteLoss, CheckpointWriteError) as exc:
        view.close()
        fail(str(exc), EXIT_FAILURE)
    finally:
        view.close()
        if plan.created:
            remove_unused_run_dir(run_dir)  # claimed for a run that failed before writing anything


def uniform_baseline(vocab_size: int) -> tuple[float, float]:
    """The loss of a model that knows nothing, in nats and in bits per character: ln(V), log2(V)."""
    return math.log(vocab_size), math.log2(vocab_size)


def _render(result: Any, cfg: Any) -> None:
    finished = result.stopped != "stop_after"
    rows = _loss_rows(result)
    rows += [
        ("steps", f"{result.steps:,}  (stopped: {result.stopped.replace('_', ' ')})"),
        ("tokens seen", f"{result.tokens:,}"),
        ("wall time", f"{result.wall_seconds:.1f}s  (evaluation {result.eval_seconds:.1f}s)"),
        ("model", f"{count(result.n_params)} parameters, {result.device}, {result.precision}"),
        ("run directory", result.run_dir),
    ]
    out.print(_summary_table("training finished" if finished else "training paused (train.stop_after)", rows))


def _loss_rows(result: Any) -> list:
    """The final weights' validation loss first, then the best checkpoint (what sample and eval load),
    whose loss was measured differently during training: compared only with the final weights' loss
    on the same measure, never with the val loss row."""
    from minigpt_cli.scoring import bits_per_char

    rows = []
    final, best, step = result.final_val_loss, result.best_val_loss, result.best_step
    if math.isfinite(final):
        # train.eval_stride's windows named: a gentler measure than the default's
        scope = final_scope(result.val_tokens_scored, result.val_chars,
                            result.val_windows if result.val_stride else None)
        rows.append(("val loss", f"{final:.4f}  ({bits_per_char(final):.3f} bits/char) on {scope}, the final "
                                 f"weights"))
    if result.vocab_size:
        nats, bits = uniform_baseline(result.vocab_size)
        rows.append(("uniform baseline", f"{nats:.4f}  ({bits:.3f} bits/char: ln({result.vocab_size}), a model "
                                         f"that knows nothing)"))
    where = f"step {step:,}" if step is not None else "-"
    if not math.isfinite(best):
        rows.append(("best checkpoint", f"{where}, the final weights (no periodic evaluation ran)"
                     if math.isfinite(final) else "-  (no evaluation yet)"))
        return rows
    loads = "sample and eval load it"
    on = f"on {result.best_measure}" if result.best_measure else "as the periodic evaluations measure"
    if step == result.steps and result.best_measure == WHOLE_SPLIT:
        rows.append(("best checkpoint", f"{where}, the final weights ({loads}), chosen on val loss's measure"))
    elif step == result.steps and math.isfinite(final):
        rows.append(("best checkpoint", f"{where}, the final weights ({loads}); chosen during training by its "
                                        f"loss {on}, {best:.4f}, a smaller sample than val loss's"))
    elif math.isfinite(result.final_on_best_measure):
        rows.append(("best checkpoint", f"{where} ({loads}): {best:.4f} {on}, where the final weights score "
                                        f"{result.final_on_best_measure:.4f}"))
    else:
        rows.append(("best checkpoint", f"{where} ({loads}): {best:.4f} {on}"))
    return rows


def _summary_table(title: str, rows: list) -> Any:
    """The training summary's own look: a centred title, keys in bold."""
    from rich.table import Table

    table = Table(title=title, show_header=False, box=None)
    table.add_column(style="bold", no_wrap=True)
    table.add_column(overflow="fold")  # a long run directory folds onto the next line, never cut to "…"
    for key, value in rows:
        table.add_row(key, value)
    return table
