"""The `minigpt` command: parse, call one library function, render. The only module that prints or exits.

torch is imported inside the commands that need it, so `minigpt --help` stays fast.
"""

from __future__ import annotations

import functools
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable, List, Optional

import typer
from rich.console import Console

from minigpt_cli import __version__
from minigpt_cli.config import UserError

STARTED_AT = time.perf_counter()
SAMPLE_SEPARATOR = "-----"

app = typer.Typer(
    name="minigpt",
    help="Train, sample, evaluate, benchmark and inspect a small character-level GPT.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

# Logs and progress go to stderr, results to stdout; rich drops colour for NO_COLOR and non-terminals.
err = Console(stderr=True, highlight=False, soft_wrap=True)
out = Console(highlight=False, soft_wrap=True)

EXIT_USAGE, EXIT_FAILURE = 2, 1


def fail(message: str, code: int = EXIT_USAGE) -> None:
    err.print(f"error: {message}", markup=False, soft_wrap=True)
    raise typer.Exit(code)


def handle_errors(fn: Callable) -> Callable:
    """Turn expected failures into one line on stderr and the exit codes of DESIGN.md."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except UserError as exc:
            fail(str(exc), EXIT_USAGE)
        except BrokenPipeError:
            _silence_stdout()
            raise typer.Exit(0)
        except KeyboardInterrupt:
            err.print("interrupted")
            raise typer.Exit(130)

    return wrapper


def _silence_stdout() -> None:
    """After the reader of a pipe went away (`| head`), send further output nowhere."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except OSError:
        pass


def emit_json(value: Any) -> None:
    """Exactly one JSON object on stdout, as its last line. NaN and infinity become null."""

    def clean(v: Any) -> Any:
        if isinstance(v, float) and not math.isfinite(v):
            return None
        if isinstance(v, dict):
            return {str(k): clean(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [clean(x) for x in v]
        return v

    sys.stdout.write(json.dumps(clean(value)) + "\n")
    sys.stdout.flush()


def _version(value: bool) -> None:
    if value:
        typer.echo(f"minigpt {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    version: bool = typer.Option(False, "--version", "-V", callback=_version, is_eager=True,
                                 help="Print the version and exit."),
) -> None:
    """Train, sample, evaluate, benchmark and inspect a small character-level GPT.

    Exit codes: 0 success, 1 failure, 2 bad usage or input, 130 Ctrl-C (after saving), 143 SIGTERM (after saving).
    """


# ---------------------------------------------------------------------------------------------
# train
# ---------------------------------------------------------------------------------------------

def _fmt_seconds(seconds: float) -> str:
    seconds = max(0, int(seconds))
    return f"{seconds // 60}:{seconds % 60:02d}" if seconds < 3600 else f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


class TrainView:
    """Renders TrainEvents: a live bar on a terminal, plain lines (every few seconds) otherwise."""

    def __init__(self, quiet: bool):
        self.quiet = quiet
        self.live = err.is_terminal and not quiet
        self.progress = None
        self.task = None
        self.last_plain = 0.0

    def __call__(self, event: Any) -> None:
        kind, d = event.kind, event.data
        if kind == "warning":
            self._line(f"[yellow]warning:[/] {d['message']}", force=True)
            return
        if self.quiet:
            return
        if kind == "start":
            self._start(event.step, d)
        elif kind == "step":
            self._step(event.step, d)
        elif kind == "eval":
            self._line(f"step {event.step}: train loss {d['train_loss']:.4f}, val loss {d['val_loss']:.4f} "
                       f"({d['scope']}, {d['seconds']:.1f}s)")
        elif kind == "final_eval":
            self._line(f"step {event.step}: val loss {d['val_loss']:.4f} ({d['bpc']:.3f} bits/char) over the whole "
                       f"validation split ({d['tokens']:,} characters, {d['seconds']:.1f}s)")

    def _start(self, step: int, d: dict) -> None:
        resumed = f", resuming from {d['resumed_from']}" if d["resumed_from"] else ""
        world = f", {d['world_size']} processes" if d["world_size"] > 1 else ""
        err.print(f"training {d['n_params'] / 1e6:.2f}M parameters on {d['device']} ({d['device_reason']}), "
                  f"{d['precision']} ({d['precision_reason']}){world}{resumed}", markup=False)
        err.print(f"data: {d['source']}: {d['train_chars']:,} train / {d['val_chars']:,} val characters, "
                  f"vocabulary {d['vocab_size']}; run directory {d['run_dir']}", markup=False)
        if self.live:
            from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

            self.progress = Progress(TextColumn("[bold]train"), BarColumn(), TextColumn("{task.description}"),
                                     TimeElapsedColumn(), console=err, transient=True)
            total = d["time_budget"] if d["time_budget"] else d["max_iters"]
            self.task = self.progress.add_task("", total=total, completed=0 if d["time_budget"] else step)
            self.progress.start()

    def _step(self, step: int, d: dict) -> None:
        text = (f"step {step}/{d['max_iters']}  loss {d['loss']:.4f}  lr {d['lr']:.2e}  "
                f"{d['tokens_per_sec'] / 1000:.1f}k tok/s  ETA {_fmt_seconds(d['eta'])}")
        if self.progress is not None:
            budget_mode = self.progress.tasks[0].total != d["max_iters"]
            self.progress.update(self.task, completed=d["elapsed"] if budget_mode else step, description=text)
        elif time.perf_counter() - self.last_plain >= 5.0:
            self.last_plain = time.perf_counter()
            err.print(text, markup=False)

    def _line(self, text: str, force: bool = False) -> None:
        if self.quiet and not force:
            return
        (self.progress.console if self.progress else err).print(text)

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None


def _resolve_train_config(config_name: Optional[str], resume: bool, out_dir: Optional[Path],
                          overrides: List[str], data: Optional[str], time_budget: Optional[float],
                          device: Optional[str], seed: Optional[int], deterministic: bool):
    import dataclasses

    from minigpt_cli import checkpoint as ckpt
    from minigpt_cli.config import apply_overrides, load_config

    run_dir = out_dir
    note = None
    if resume:
        run_dir = out_dir or ckpt.newest_run()
        if config_name is None:
            config = ckpt.load_checkpoint(run_dir, which="latest").config
        else:
            config = load_config(config_name)
    else:
        if config_name is None:
            config_name, note = _default_config_name(device)
        config = load_config(config_name)
    flags = list(overrides)
    if data is not None:
        flags.append(f"data.path={data if data == '-' else Path(data).expanduser().resolve()}")
    if time_budget is not None:
        flags.append(f"train.time_budget={time_budget}")
    if device is not None:
        flags.append(f"train.device={device}")
    if seed is not None:
        flags.append(f"train.seed={seed}")
    config = apply_overrides(config, flags)
    if deterministic:
        config = dataclasses.replace(config, train=dataclasses.replace(config.train, deterministic=True))
    if run_dir is None:
        run_dir = ckpt.new_run_dir(config.name)
    elif not resume and (Path(run_dir) / "latest.json").exists():
        raise UserError(f"{run_dir} already holds a run; continue it with --resume, or pick another --out")
    return config, Path(run_dir), note


def _default_config_name(device: Optional[str]) -> tuple[str, str]:
    """With no CONFIG: the GPU recipe when the chosen device is a CUDA GPU, the CPU-sized default otherwise."""
    from minigpt_cli.device import resolve_device

    choice = resolve_device(device or "auto")
    if choice.device.type == "cuda":
        return "shakespeare_char", "config shakespeare_char (the GPU recipe, since the device is a CUDA GPU)"
    return "default", f"config default (sized for {choice.device.type})"


@app.command(epilog="Examples:  minigpt train  |  minigpt train shakespeare_char --device cuda  |  "
                    "minigpt train --data my.txt --set model.n_layer=2 --time-budget 60")
@handle_errors
def train(
    config: Optional[str] = typer.Argument(None, help="YAML path or shipped config name [default: default, "
                                                      "or shakespeare_char on a CUDA GPU]."),
    data: Optional[str] = typer.Option(None, "--data", help="Text file, folder of .txt files, or - for stdin "
                                                            "[default: the bundled tiny Shakespeare]."),
    out: Optional[Path] = typer.Option(None, "--out", help="Run directory [default: runs/<config>-<date>-<time>]."),
    set_: List[str] = typer.Option([], "--set", help="Override a config key, e.g. --set model.n_layer=4 (repeatable)."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in --out (default: newest under ./runs) "
                                                        "from its latest checkpoint."),
    time_budget: Optional[float] = typer.Option(None, "--time-budget", help="Stop after this many seconds of "
                                                "wall clock, with the learning-rate decay planned to end then."),
    device: Optional[str] = typer.Option(None, "--device", help="auto, cpu, cuda, cuda:N or mps [default: auto]."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Random seed [default: the config's train.seed]."),
    deterministic: bool = typer.Option(False, "--deterministic", help="Use PyTorch's deterministic algorithms "
                                                                      "(matters on CUDA)."),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON object with the result on stdout."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Print only the result."),
) -> None:
    """Train a model on text and save checkpoints in a run directory."""
    cfg, run_dir, note = _resolve_train_config(config, resume, out, set_, data, time_budget, device, seed,
                                               deterministic)
    from minigpt_cli.checkpoint import CheckpointWriteError
    from minigpt_cli.trainer import NonFiniteLoss, TrainingStopped, detect_distributed
    from minigpt_cli.trainer import train as run_training

    is_main = detect_distributed().is_main
    view = TrainView(quiet or not is_main)
    if note and not quiet and is_main:
        err.print(f"using {note}", markup=False)
    try:
        result = run_training(cfg, run_dir, resume=resume, callback=view, started_at=STARTED_AT)
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
    if not is_main:
        return
    summary = {**result.to_dict(), "config": cfg.name}
    if json_out:
        emit_json(summary)
        return
    from rich.table import Table

    table = Table(title="training finished", show_header=False, box=None)
    table.add_column(style="bold")
    table.add_column()
    table.add_row("best val loss", f"{result.best_val_loss:.4f}  ({result.best_val_loss / math.log(2):.3f} bits/char)")
    table.add_row("final val loss", f"{result.final_val_loss:.4f}  (whole validation split, "
                                    f"{result.val_tokens_scored:,} characters)")
    table.add_row("steps", f"{result.steps:,}  (stopped: {result.stopped.replace('_', ' ')})")
    table.add_row("tokens seen", f"{result.tokens:,}")
    table.add_row("wall time", f"{result.wall_seconds:.1f}s  (evaluation {result.eval_seconds:.1f}s)")
    table.add_row("model", f"{result.n_params / 1e6:.2f}M parameters, {result.device}, {result.precision}")
    table.add_row("run directory", result.run_dir)
    out.print(table)
    if not quiet:
        err.print(f"next: minigpt sample {result.run_dir} --prompt \"ROMEO:\"", markup=False)


# ---------------------------------------------------------------------------------------------
# sample
# ---------------------------------------------------------------------------------------------

def _read_prompt(prompt: Optional[str]) -> str:
    if prompt == "-":
        if sys.stdin is None or sys.stdin.isatty():
            raise UserError("--prompt - reads the prompt from stdin, but stdin is a terminal (pipe text in)")
        raw = sys.stdin.buffer.read()
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise UserError(f"prompt from stdin is not valid UTF-8: byte at offset {exc.start}") from None
    return prompt or ""


@app.command(epilog="Examples:  minigpt sample --prompt \"ROMEO:\"  |  minigpt sample runs/default-... "
                    "--temperature 0 --max-new-tokens 200  |  echo \"JULIET:\" | minigpt sample --prompt - --json")
@handle_errors
def sample(
    run: Optional[Path] = typer.Argument(None, help="Run directory or checkpoint folder [default: newest under ./runs]."),
    prompt: Optional[str] = typer.Option(None, "--prompt", "-p", help="Text to continue, or - for stdin "
                                                                       "[default: a newline]."),
    max_new_tokens: int = typer.Option(500, "--max-new-tokens", "-n", help="Characters to generate per sample."),
    temperature: float = typer.Option(0.8, "--temperature", "-t", help="Softness of sampling; 0 is greedy."),
    top_k: Optional[int] = typer.Option(None, "--top-k", help="Sample from the k most likely characters [default: off]."),
    top_p: float = typer.Option(1.0, "--top-p", help="Nucleus sampling: smallest set with this much probability "
                                                     "[default: 1, off]."),
    min_p: float = typer.Option(0.0, "--min-p", help="Drop characters below this fraction of the top one's "
                                                     "probability [default: 0, off]."),
    repetition_penalty: float = typer.Option(1.0, "--repetition-penalty", help="Penalise characters already in the "
                                                                               "context; 1 is off."),
    num_samples: int = typer.Option(1, "--num-samples", help="Samples generated together from one prefill."),
    stop: List[str] = typer.Option([], "--stop", help="End a sample when its text ends with this (repeatable; "
                                                      "the stop text is not printed)."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Random seed [default: a fresh one, shown with --json]."),
    no_kv_cache: bool = typer.Option(False, "--no-kv-cache", help="Recompute the whole window every step "
                                                                   "(slow; the reference)."),
    dtype: str = typer.Option("float32", "--dtype", help="Inference precision: float32, bfloat16, or float16 "
                                                         "(GPU only)."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda, cuda:N or mps."),
    unknown: str = typer.Option("error", "--unknown", help="Prompt characters outside the vocabulary: error or skip."),
    stream: Optional[bool] = typer.Option(None, "--stream/--no-stream", help="Print text as it is made "
                                                                             "[default: on a terminal]."),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON object with samples and speed."),
) -> None:
    """Generate text from a trained run (prints the prompt, then its continuation)."""
    from minigpt_cli import sampler

    if max_new_tokens < 0:
        raise UserError(f"--max-new-tokens must be zero or positive, got {max_new_tokens}")
    if num_samples < 1:
        raise UserError(f"--num-samples must be at least 1, got {num_samples}")
    if unknown not in ("error", "skip"):
        raise UserError(f"--unknown must be error or skip, got {unknown!r}")
    text = _read_prompt(prompt)
    streaming = (out.is_terminal if stream is None else stream) and not json_out and num_samples == 1
    request = sampler.SampleRequest(
        run=run, prompt=text, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
        min_p=min_p, repetition_penalty=repetition_penalty, num_samples=num_samples, stop=stop, seed=seed,
        use_cache=not no_kv_cache, dtype=dtype, device=device, skip_unknown=unknown == "skip")
    session = sampler.prepare(request)
    for warning in session.warnings:
        err.print(f"warning: {warning}", markup=False)
    if streaming:
        sys.stdout.write(text if text else "")
        sys.stdout.flush()
        for piece in session.stream():
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
        sys.stdout.flush()
        result = session.result()
    else:
        for _ in session.stream():
            pass
        result = session.result()
        if json_out:
            emit_json(result)
            return
        for i, continuation in enumerate(result["samples"]):
            if i:
                sys.stdout.write(f"{SAMPLE_SEPARATOR}\n")
            sys.stdout.write(text + continuation + "\n")
        sys.stdout.flush()
    if json_out:
        emit_json(result)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
