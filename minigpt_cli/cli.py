"""The `minigpt` command: parse, call one library function, render. The only module that prints or exits.

torch is imported inside the commands that need it, so `minigpt --help` stays fast.
"""

from __future__ import annotations

import errno
import functools
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
from minigpt_cli.progress import FINAL_EVAL_TASK

STARTED_AT = time.perf_counter()


def _process_started_at() -> float:
    """The perf_counter reading of this process's start, so a --time-budget counts Python's own
    start-up and imports too (Linux /proc); elsewhere, the moment this module was imported."""
    try:
        with open("/proc/self/stat", encoding="ascii") as f:
            start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/uptime", encoding="ascii") as f:
            uptime = float(f.read().split()[0])
        age = uptime - start_ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return STARTED_AT
    return time.perf_counter() - max(age, 0.0)
SAMPLE_SEPARATOR = "-----"
# Text that cannot be streamed (several samples, --json, --no-stream) is held until the end: bounded.
HELD_TEXT_MAX_CHARS = 10_000_000

app = typer.Typer(
    name="minigpt",
    help="Train, sample, evaluate, benchmark and inspect a small character-level GPT.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

# Logs and progress go to stderr, results to stdout; rich drops colour for NO_COLOR and non-terminals.
class _Console(Console):
    """rich's consoles answer a reader that went away as every other output does (reader_went_away)."""

    def on_broken_pipe(self) -> None:
        raise typer.Exit(reader_went_away())


class _LazyConsole:
    """A _Console made on first use: rich reads the environment (NO_COLOR, COLUMNS, ...) when one is
    made, and nothing should happen at import."""

    def __init__(self, **options: Any):
        self._options = options
        self._console: _Console | None = None

    def get(self) -> _Console:
        if self._console is None:
            self._console = _Console(**self._options)
        return self._console

    def __getattr__(self, name: str) -> Any:
        return getattr(self.get(), name)


err = _LazyConsole(stderr=True, highlight=False, soft_wrap=True)
out = _LazyConsole(highlight=False, soft_wrap=True)

EXIT_USAGE, EXIT_FAILURE = 2, 1


MESSAGE_MAX_CHARS = 1000  # an error is one readable line, whatever the input quoted in it


def fail(message: str, code: int = EXIT_USAGE) -> None:
    message = " ".join(message.splitlines())
    if len(message) > MESSAGE_MAX_CHARS:
        message = message[:MESSAGE_MAX_CHARS] + f"... ({len(message):,} characters in all)"
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
            raise typer.Exit(reader_went_away())
        except OSError as exc:
            if not _is_output_error(exc):
                raise
            raise typer.Exit(output_failed(exc))
        except (MemoryError, RuntimeError) as exc:
            if not _out_of_memory(exc):
                raise
            detail = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else type(exc).__name__
            fail(f"out of memory ({detail}); try a smaller batch_size, block_size, model or --num-samples",
                 EXIT_FAILURE)
        except KeyboardInterrupt:
            err.print("interrupted")
            raise typer.Exit(130)

    return wrapper


def _out_of_memory(exc: BaseException) -> bool:
    """An allocation that failed, on any device (numpy's and torch's CPU allocators, CUDA, MPS)."""
    if isinstance(exc, MemoryError):
        return True
    text = str(exc)
    return any(s in text for s in ("can't allocate memory", "out of memory", "Storage size calculation overflowed"))


def reader_went_away() -> int:
    """The one broken-pipe policy: when the reader of stdout went away (`minigpt sample | head`), the
    command ends at once, quietly, with exit code 0 (the reader had all it wanted; not a failure).
    Further output, Python's own final flush included, goes nowhere. Returns the exit code."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):  # ValueError: sys.stdout itself was closed
        pass
    return 0


class _OutlivesReader:
    """A standard stream whose reader may go away without stopping the command: from the first write
    that finds the pipe closed, the stream's descriptor writes to /dev/null and the command goes on."""

    def __init__(self, stream: Any):
        self._stream = stream

    def _guard(self, action: Callable[[], Any], fallback: Any) -> Any:
        try:
            return action()
        except OSError as exc:
            if not isinstance(exc, BrokenPipeError) and exc.errno != errno.EPIPE:
                raise
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, self._stream.fileno())
            os.close(devnull)
            self._stream.flush()  # what the closed pipe refused goes to /dev/null now
        except (OSError, ValueError):
            pass
        return fallback

    def write(self, text: str) -> int:
        return self._guard(lambda: self._stream.write(text), len(text))

    def flush(self) -> None:
        self._guard(self._stream.flush, None)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


def outlives_readers(command: Callable) -> Callable:
    """For commands that train: a reader of the log or the result that goes away (`minigpt train 2>&1 |
    head -3`) must not stop or lose a training. Its output goes nowhere from then on; the run finishes,
    saves and exits as it would have (0 only when it finished)."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        saved = sys.stdout, sys.stderr
        sys.stdout, sys.stderr = _OutlivesReader(saved[0]), _OutlivesReader(saved[1])
        try:
            return command(*args, **kwargs)
        finally:
            sys.stdout, sys.stderr = saved

    return wrapper


def _is_output_error(exc: OSError) -> bool:
    """A write with no file named failed for want of space or a device error: stdout or stderr on a full
    disk (writes to named files report their own errors). Not a bug to show a traceback for."""
    return exc.errno in (errno.ENOSPC, errno.EIO, errno.EFBIG, errno.EDQUOT) and exc.filename is None


def output_failed(exc: OSError) -> int:
    """The one policy for output that cannot be written: one line on stderr (if stderr can take it),
    and exit code 1, since what was asked for did not reach its reader. Returns the exit code."""
    reader_went_away()  # nothing more is written to stdout, Python's final flush included
    try:
        os.write(2, f"error: cannot write the output: {exc.strerror or exc}\n".encode("utf-8", "replace"))
    except OSError:
        pass
    return EXIT_FAILURE


def emit_json(value: Any) -> None:
    """Exactly one JSON object on stdout, as its last line. NaN and infinity become null."""
    from minigpt_cli.rundir import strict_json

    sys.stdout.write(strict_json(value) + "\n")
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


class ProgressView:
    """Draws the Progress that library code reports: a tqdm bar per task on a terminal (tqdm.auto:
    widgets in a notebook), a plain line every few seconds otherwise, nothing with --quiet.
    Work that ends within a second shows nothing."""

    SHOW_AFTER = 1.0
    PLAIN_EVERY = 5.0

    def __init__(self, quiet: bool, terminal: Optional[bool] = None):
        self.quiet = quiet
        self.terminal = err.is_terminal if terminal is None else terminal
        self.bars: dict[str, Any] = {}
        self.plain_at: dict[str, float] = {}

    def __call__(self, event: Any) -> None:
        if self.quiet:
            return
        (self._bar if self.terminal else self._plain)(event)

    def _bar(self, p: Any) -> None:
        bar = self.bars.get(p.task)
        if bar is None:
            if p.finished:
                return
            from tqdm.auto import tqdm

            bar = self.bars[p.task] = tqdm(total=p.total, desc=p.task, unit=f" {p.unit}" if p.unit else "it",
                                           unit_scale=True, file=sys.stderr, leave=False, dynamic_ncols=True,
                                           delay=self.SHOW_AFTER)
        bar.update(p.done - bar.n)
        if p.finished:
            bar.close()
            del self.bars[p.task]

    def _plain(self, p: Any) -> None:
        shown = self.plain_at.get(p.task)
        if p.finished:
            if shown is not None:
                del self.plain_at[p.task]
                err.print(f"{p.task}: done, {p.done:,.0f} {p.unit} in {p.elapsed:.1f}s", markup=False)
            return
        if p.elapsed < self.SHOW_AFTER or (shown is not None and p.elapsed - shown < self.PLAIN_EVERY):
            return
        self.plain_at[p.task] = p.elapsed
        share = f" ({100 * p.done / p.total:.0f}%)" if p.total else ""
        total = f"/{p.total:,.0f}" if p.total else ""
        eta = f", ETA {_fmt_seconds(p.elapsed / p.done * (p.total - p.done))}" if p.total and p.done else ""
        err.print(f"{p.task}: {p.done:,.0f}{total} {p.unit}{share}, {p.elapsed:.0f}s{eta}", markup=False)

    def write(self, text: str) -> None:
        """A line of text above any bars being drawn."""
        if self.bars:
            from tqdm.auto import tqdm

            tqdm.write(text, file=sys.stderr)
        else:
            err.print(text, markup=False)

    def close(self) -> None:
        for bar in self.bars.values():
            bar.close()
        self.bars.clear()


class _Starting:
    """A transient 'loading PyTorch' line on a terminal, so that the first output comes at once;
    it goes away when the command's own output begins (or at the end)."""

    def __init__(self, quiet: bool, what: str = "loading PyTorch"):
        self.status = None
        if not quiet and err.is_terminal:
            self.status = err.status(what)
            self.status.start()

    def done(self) -> None:
        if self.status is not None:
            self.status.stop()
            self.status = None


class TrainView:
    """Renders TrainEvents: a tqdm bar on a terminal, plain lines (every few seconds) otherwise."""

    def __init__(self, quiet: bool, starting: Optional[_Starting] = None):
        self.quiet = quiet
        self.live = err.is_terminal and not quiet
        self.bar = None
        self.budget_mode = False
        self.last_plain = 0.0
        self.progress = ProgressView(quiet)
        self.starting = starting

    def __call__(self, event: Any) -> None:
        kind, d = event.kind, event.data
        if self.starting is not None:
            self.starting.done()
        if kind == "warning":
            self._line(f"warning: {d['message']}", force=True)
            return
        if kind == "notice":  # an answer to the user's own action (a Ctrl-C): shown even with --quiet
            self._line(d["message"], force=True)
            return
        if self.quiet:
            return
        if kind == "progress":
            if d["progress"].task == FINAL_EVAL_TASK:
                self._close_bar()  # training is over; the evaluation's own bar follows
            self.progress(d["progress"])
        elif kind == "start":
            self._start(event.step, d)
        elif kind == "step":
            self._step(event.step, d)
        elif kind == "eval":
            self._line(f"step {event.step}: train loss {d['train_loss']:.4f}, val loss {d['val_loss']:.4f} "
                       f"({d['scope']}, {d['seconds']:.1f}s)")
        elif kind == "final_eval":
            self._line(f"step {event.step}: val loss {d['val_loss']:.4f} ({d['bpc']:.3f} bits/char) over the "
                       f"{d['scope']} ({d['seconds']:.1f}s)")

    def _start(self, step: int, d: dict) -> None:
        resumed = f", resuming from {d['resumed_from']}" if d["resumed_from"] else ""
        parent = f", starting from the weights of {d['init_from']}" if d.get("init_from") else ""
        world = f", {d['world_size']} processes" if d["world_size"] > 1 else ""
        err.print(f"training {d['n_params'] / 1e6:.2f}M parameters on {d['device']} ({d['device_reason']}), "
                  f"{d['precision']} ({d['precision_reason']}), seed {d['seed']}{world}{resumed}{parent}",
                  markup=False)
        err.print(f"data: {d['source']}: {d['train_chars']:,} train / {d['val_chars']:,} val characters, "
                  f"vocabulary {d['vocab_size']}; run directory {d['run_dir']}", markup=False)
        read = {"cached": "read from the encoded cache", "run": "read from the run's encoded copy",
                "encoded": "read and encoded"}.get(d["data_cache"], d["data_cache"])
        sampled = ("" if d["val_scored"] >= d["val_chars"] - 1 else
                   f"; final evaluation: {d['val_scored']:,} characters sampled of {d['val_chars']:,}")
        err.print(f"data {read} in {d['data_seconds']:.1f}s{sampled}", markup=False)
        if d["data_kept"]:
            err.print(f"the run keeps {d['data_kept']}", markup=False)
        if self.live:
            from tqdm.auto import tqdm

            self.budget_mode = bool(d["time_budget"])
            if self.budget_mode:
                self.bar = tqdm(total=d["time_budget"], desc="train", file=sys.stderr, leave=False,
                                dynamic_ncols=True, bar_format="{desc} {percentage:3.0f}%|{bar}| {postfix}")
            else:
                self.bar = tqdm(total=d["max_iters"], initial=step, desc="train", file=sys.stderr, leave=False,
                                dynamic_ncols=True, bar_format="{desc} {percentage:3.0f}%|{bar}| {postfix}")

    def _step(self, step: int, d: dict) -> None:
        text = (f"step {step}/{d['max_iters']}  loss {d['loss']:.4f}  lr {d['lr']:.2e}  "
                f"{d['tokens_per_sec'] / 1000:.1f}k tok/s  ETA {_fmt_seconds(d['eta'])}")
        if self.bar is not None:
            done = min(d["elapsed"], self.bar.total) if self.budget_mode else step
            self.bar.update(done - self.bar.n)
            self.bar.set_postfix_str(text, refresh=True)
        elif time.perf_counter() - self.last_plain >= 5.0:
            self.last_plain = time.perf_counter()
            err.print(text, markup=False)

    def _line(self, text: str, force: bool = False) -> None:
        if self.quiet and not force:
            return
        if self.bar is not None:
            from tqdm.auto import tqdm

            tqdm.write(text, file=sys.stderr)
        else:
            self.progress.write(text)

    def _close_bar(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def close(self) -> None:
        if self.starting is not None:
            self.starting.done()
        self._close_bar()
        self.progress.close()


@app.command(epilog="Examples:\n\n  minigpt train\n\n  minigpt train shakespeare_char --device cuda\n\n"
                    "  minigpt train --data my.txt --set model.n_layer=2 --time-budget 60")
@handle_errors
@outlives_readers
def train(
    config: Optional[str] = typer.Argument(None, help="YAML path or shipped config name (default: default, "
                                                      "or shakespeare_char on a CUDA GPU)."),
    data: Optional[str] = typer.Option(None, "--data", help="Text file, folder of .txt files, or - for stdin "
                                                            "(default: the bundled tiny Shakespeare)."),
    out_dir: Optional[Path] = typer.Option(None, "--out", help="Run directory (default: runs/<config>-<date>-<time>)."),
    set_: List[str] = typer.Option([], "--set", help="Override a config key, e.g. --set model.n_layer=4 (repeatable)."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in --out (default: newest under ./runs) "
                                                        "from its latest checkpoint."),
    time_budget: Optional[float] = typer.Option(None, "--time-budget", help="Stop after this many seconds of "
                                                "wall clock, with the learning-rate decay planned to end then."),
    device: Optional[str] = typer.Option(None, "--device", help="auto, cpu, cuda, cuda:N or mps (default: auto)."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Random seed (default: the config's train.seed)."),
    deterministic: bool = typer.Option(False, "--deterministic", help="Use PyTorch's deterministic algorithms "
                                                                      "(matters on CUDA)."),
    init_from: Optional[Path] = typer.Option(None, "--init-from", help="Start from the weights of this run "
                                             "(its best checkpoint), with a fresh optimizer and schedule."),
    extend_vocab: bool = typer.Option(False, "--extend-vocab", help="With --init-from: give characters the "
                                      "run's vocabulary lacks new embedding and output rows (else refused)."),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON object with the result on stdout."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Print only the result."),
) -> None:
    """Train a model on text and save checkpoints in a run directory."""
    starting = _Starting(quiet)
    try:
        from minigpt_cli.trainer import plan_training

        plan = plan_training(config, resume, out_dir, set_, data, time_budget, device, seed, deterministic, init_from,
                             extend_vocab)
        cfg, run_dir, note, created = plan.config, plan.run_dir, plan.note, plan.created
    except BaseException:
        starting.done()
        raise
    from minigpt_cli.checkpoint import CheckpointWriteError, remove_unused_run_dir
    from minigpt_cli.device import detect_distributed
    from minigpt_cli.trainer import NonFiniteLoss, TrainingStopped
    from minigpt_cli.trainer import train as run_training

    is_main = detect_distributed().is_main
    view = TrainView(quiet or not is_main, starting)
    if note and not quiet and is_main:
        err.print(f"using {note}", markup=False)
    try:
        result = run_training(cfg, run_dir, resume=resume, callback=view, started_at=_process_started_at())
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
        if created:
            remove_unused_run_dir(run_dir)  # claimed for a run that failed before writing anything
    if not is_main:
        return
    summary = {**result.to_dict(), "config": cfg.name}
    if result.vocab_size:
        summary["uniform_loss"] = math.log(result.vocab_size)
    if json_out:
        emit_json(summary)
        return
    from rich.table import Table

    from minigpt_cli.scoring import bits_per_char

    finished = result.stopped != "stop_after"
    table = Table(title="training finished" if finished else "training paused (train.stop_after)",
                  show_header=False, box=None)
    table.add_column(style="bold")
    table.add_column()
    measure = "whole validation split" if cfg.train.eval_full else f"{cfg.train.eval_iters} sampled batches"
    if math.isfinite(result.best_val_loss):
        table.add_row("best val loss", f"{result.best_val_loss:.4f}  ({bits_per_char(result.best_val_loss):.3f} "
                                       f"bits/char, {measure})")
    else:
        table.add_row("best val loss", "-  (no periodic evaluation ran: the best checkpoint is the final one)"
                      if math.isfinite(result.final_val_loss) else "-  (no evaluation yet)")
    if math.isfinite(result.final_val_loss):
        scope = (f"whole validation split, {result.val_tokens_scored:,} characters"
                 if result.val_tokens_scored >= result.val_chars - 1 else
                 f"{result.val_tokens_scored:,} characters sampled of {result.val_chars:,}")
        table.add_row("final val loss", f"{result.final_val_loss:.4f}  ({scope})")
    if result.vocab_size:
        table.add_row("uniform baseline", f"{math.log(result.vocab_size):.4f}  ({math.log2(result.vocab_size):.3f} "
                                          f"bits/char: ln({result.vocab_size}), a model that knows nothing)")
    table.add_row("steps", f"{result.steps:,}  (stopped: {result.stopped.replace('_', ' ')})")
    table.add_row("tokens seen", f"{result.tokens:,}")
    table.add_row("wall time", f"{result.wall_seconds:.1f}s  (evaluation {result.eval_seconds:.1f}s)")
    table.add_row("model", f"{result.n_params / 1e6:.2f}M parameters, {result.device}, {result.precision}")
    table.add_row("run directory", result.run_dir)
    out.print(table)
    if not quiet:
        if finished:
            err.print(f"next: minigpt sample {result.run_dir} --prompt \"ROMEO:\"", markup=False)
        else:
            err.print(f"next: minigpt train --resume --out {result.run_dir}", markup=False)


# ---------------------------------------------------------------------------------------------
# sample
# ---------------------------------------------------------------------------------------------

def _read_prompt(prompt: Optional[str]) -> str:
    if prompt == "-":
        if sys.stdin is None or sys.stdin.isatty():
            raise UserError("--prompt - reads the prompt from stdin, but stdin is a terminal (pipe text in)")
        raw = sys.stdin.buffer.read()
        try:
            return raw.decode("utf-8").removeprefix("\ufeff")  # a byte-order mark, as files have theirs dropped
        except UnicodeDecodeError as exc:
            raise UserError(f"prompt from stdin is not valid UTF-8: byte at offset {exc.start}") from None
    return prompt or ""


@app.command(epilog="Examples:\n\n  minigpt sample --prompt \"ROMEO:\"\n\n"
                    "  minigpt sample runs/default-20261124-101500 --temperature 0 --max-new-tokens 200\n\n"
                    "  echo \"JULIET:\" | minigpt sample --prompt - --json")
@handle_errors
def sample(
    run: Optional[Path] = typer.Argument(None, help="Run directory or checkpoint folder (default: newest under ./runs)."),
    prompt: Optional[str] = typer.Option(None, "--prompt", "-p", help="Text to continue, or - for stdin "
                                                                       "(default: a newline)."),
    max_new_tokens: int = typer.Option(500, "--max-new-tokens", "-n", help="Characters to generate per sample."),
    temperature: float = typer.Option(0.8, "--temperature", "-t", help="Softness of sampling; 0 is greedy."),
    top_k: Optional[int] = typer.Option(None, "--top-k", help="Sample from the k most likely characters (default: off)."),
    top_p: float = typer.Option(1.0, "--top-p", help="Nucleus sampling: smallest set with this much probability "
                                                     "(default: 1, off)."),
    min_p: float = typer.Option(0.0, "--min-p", help="Drop characters below this fraction of the top one's "
                                                     "probability (default: 0, off)."),
    repetition_penalty: float = typer.Option(1.0, "--repetition-penalty", help="Penalise characters already in the "
                                                                               "context; 1 is off."),
    num_samples: int = typer.Option(1, "--num-samples", help="Samples generated together from one prefill."),
    stop: List[str] = typer.Option([], "--stop", help="End a sample when its text ends with this (repeatable; "
                                                      "the stop text is not printed)."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Random seed (default: a fresh one, shown with --json)."),
    no_kv_cache: bool = typer.Option(False, "--no-kv-cache", help="Recompute the whole window every step "
                                                                   "(slow; the reference)."),
    dtype: str = typer.Option("float32", "--dtype", help="Inference precision: float32, bfloat16, or float16 "
                                                         "(GPU only)."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda, cuda:N or mps."),
    compile_step: bool = typer.Option(False, "--compile", help="Compile the decode step with torch.compile "
                                                               "(CUDA graphs on a GPU); the first characters "
                                                               "wait for the compiler."),
    unknown: str = typer.Option("error", "--unknown", help="Prompt characters outside the vocabulary: error or skip."),
    stream: Optional[bool] = typer.Option(None, "--stream/--no-stream", help="Print text as it is made "
                                                                             "(default: on, for one sample "
                                                                             "without --json)."),
    threads: int = typer.Option(0, "--threads", help="CPU threads per operation (default: chosen from the model's "
                                                    "size and the CPUs other programs leave free)."),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON object with samples and speed."),
) -> None:
    """Generate text from a trained run (prints the prompt, then its continuation)."""
    from minigpt_cli import sampler

    if max_new_tokens < 0:
        raise UserError(f"--max-new-tokens must be zero or positive, got {max_new_tokens}")
    if num_samples < 1:
        raise UserError(f"--num-samples must be at least 1, got {num_samples}")
    if seed is not None and not 0 <= seed < 2**63:
        raise UserError(f"--seed must be in [0, 2**63), got {seed}")
    if any(s == "" for s in stop):
        raise UserError("--stop needs a non-empty text (an empty one would end every sample at once)")
    if unknown not in ("error", "skip"):
        raise UserError(f"--unknown must be error or skip, got {unknown!r}")
    text = _read_prompt(prompt)
    # One sample streams wherever stdout goes (a terminal, a pipe, a file), so a reader that has had
    # enough (`| head`) ends the command; several samples, or JSON, are printed whole at the end.
    streaming = stream is not False and not json_out and num_samples == 1
    if not streaming and max_new_tokens * num_samples > HELD_TEXT_MAX_CHARS:
        raise UserError(f"--max-new-tokens {max_new_tokens:,} x --num-samples {num_samples} is more text than is held "
                        f"to print at the end (at most {HELD_TEXT_MAX_CHARS:,} characters); a single sample without "
                        f"--json or --no-stream streams any length")
    settings = sampler.SamplingSettings(temperature, top_k, top_p, min_p, repetition_penalty)
    request = sampler.SampleRequest(
        run=run, prompt=text, settings=settings, max_new_tokens=max_new_tokens, num_samples=num_samples, stop=stop,
        seed=seed,
        use_cache=not no_kv_cache, dtype=dtype, device=device, skip_unknown=unknown == "skip", compile=compile_step,
        threads=threads)
    session = sampler.prepare(request)
    for warning in session.warnings:
        err.print(f"warning: {warning}", markup=False)
    text = session.prompt  # without any characters --unknown skip dropped
    if streaming:
        sys.stdout.write(text)
        sys.stdout.flush()
        for piece in session.stream():
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
        sys.stdout.flush()
        return
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


# ---------------------------------------------------------------------------------------------
# eval, bench, inspect
# ---------------------------------------------------------------------------------------------

def _mib(nbytes: Optional[float]) -> str:
    if nbytes is None:
        return "-"
    if nbytes >= 2**30:
        return f"{nbytes / 2**30:,.2f} GiB"
    return f"{nbytes / 2**20:,.1f} MiB"


def _count(n: float) -> str:
    """1234567 -> '1.23M': parameter and FLOP counts for people."""
    for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n:.0f}"


def _ms(timing: Optional[dict]) -> str:
    """Median and median absolute deviation of a bench timing."""
    if not timing:
        return "-"
    spread = 100 * timing["mad_ms"] / timing["median_ms"] if timing["median_ms"] else 0.0
    return f"{timing['median_ms']:.3g} ms ±{spread:.0f}%"


def _key_value_table(title: str, rows: List[tuple]) -> Any:
    from rich.table import Table

    table = Table(title=title, show_header=False, box=None, title_justify="left", title_style="bold")
    table.add_column(style="bold", no_wrap=True)
    table.add_column(overflow="fold")
    for key, value in rows:
        table.add_row(key, value)
    return table


@app.command(name="eval", epilog="Examples:\n\n  minigpt eval\n\n  minigpt eval runs/default-20261124-101500 "
                                 "--data other.txt\n\n  cat notes.txt | minigpt eval --data - --json")
@handle_errors
def eval_(
    run: Optional[Path] = typer.Argument(None, help="Run directory or checkpoint folder (default: newest under ./runs)."),
    data: Optional[str] = typer.Option(None, "--data", help="UTF-8 file, folder of .txt files, or - for stdin "
                                                            "(default: the run's own validation split)."),
    stride: Optional[int] = typer.Option(None, "--stride", help="Characters between window starts: each character "
                                         "after the first window sees at least block_size - stride of context "
                                         "(default: block_size / 2)."),
    batch_size: int = typer.Option(32, "--batch-size", help="Windows scored together."),
    which: str = typer.Option("best", "--checkpoint", help="Which checkpoint of the run: best or latest."),
    dtype: str = typer.Option("float32", "--dtype", help="float32, bfloat16, float16 (GPU only), or auto "
                                                         "(the training precision)."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda, cuda:N or mps."),
    threads: int = typer.Option(0, "--threads", help="CPU threads per operation (default: the CPUs other "
                                                    "programs leave free)."),
    max_chars: Optional[int] = typer.Option(None, "--max-chars", help="Score a longer text on a fixed sample of "
                                            "windows holding about this many characters; 0 scores all of it "
                                            "(default: the run's train.eval_max_chars, 2,000,000)."),
    show: bool = typer.Option(False, "--show", help="Print the text's first 1,000 characters coloured by each "
                                                    "one's surprisal in bits (--json: the values)."),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON object with the result."),
) -> None:
    """Score a text with a trained run: NLL per character, bits per character, perplexity."""
    starting = _Starting(False)
    try:
        from minigpt_cli.evaluate import EvalRequest, evaluate, surprisal
    finally:
        starting.done()

    if show:
        shown = surprisal(EvalRequest(run=run, data=data, stride=stride, batch_size=batch_size, device=device,
                                      dtype=dtype, which=which, threads=threads))
        if json_out:
            emit_json(shown.to_dict())
        else:
            _render_surprisal(shown.to_dict())
        return
    progress = ProgressView(quiet=False)
    try:
        result = evaluate(EvalRequest(run=run, data=data, stride=stride, batch_size=batch_size, device=device,
                                      dtype=dtype, which=which, threads=threads, max_chars=max_chars,
                                      progress=progress))
    finally:
        progress.close()
    for warning in result.warnings:
        err.print(f"warning: {warning}", markup=False)
    if json_out:
        emit_json(result.to_dict())
        return
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
        rows.append(("val loss in training", f"{result.checkpoint_val_loss:.4f} (as recorded with this checkpoint)"))
    rows.append(("speed", f"{result.chars_per_second:,.0f} characters/s on {result.device}, {result.precision} "
                          f"({result.seconds:.2f}s)"))
    out.print(_key_value_table("evaluation", rows))


# Surprisal colours, from expected to astonishing: (style, bits below).
_SURPRISE = (("green", 1.0), ("default", 2.0), ("yellow", 4.0), ("dark_orange", 8.0), ("bold red", math.inf))


def _render_surprisal(result: dict) -> None:
    from rich.text import Text

    from minigpt_cli.inspection import visible_char

    chars = result["chars"]
    out.print(f"[bold]surprisal[/] -log2 p(character | the ones before it) of the first {result['shown_chars']:,} of "
              f"{result['text_chars']:,} characters of {result['source']}, scored in windows of "
              f"{result['block_size']} characters as training sees them:", highlight=False)
    legend = Text("  ")
    low = 0.0
    for style, below in _SURPRISE:
        legend.append(f"{low:g}-{below:g} bits " if below < math.inf else f"{low:g}+ bits", style=style)
        legend.append("  ")
        low = below
    out.print(legend)
    text = Text()
    for item in chars:
        bits = item["bits"]
        style = "dim" if bits is None else next(s for s, below in _SURPRISE if bits < below)
        text.append("↵\n" if item["char"] == "\n" else item["char"], style=style)
    out.print(text)
    scored = [c for c in chars if c["bits"] is not None]
    if not scored:
        return
    early = [c["bits"] for c in scored if c["context"] <= 4]
    later = [c["bits"] for c in scored if c["context"] > 4]
    out.print()
    out.print(f"mean {result['mean_bits']:.3f} bits per character; a uniform guess over the {result['vocab_size']} "
              f"characters costs {result['uniform_bits']:.3f}", markup=False)
    if early and later:
        out.print(f"with at most 4 characters of context (each window's start): {sum(early) / len(early):.2f} bits "
                  f"on average over {len(early)}; with more: {sum(later) / len(later):.2f} over {len(later)}",
                  markup=False)
    hardest = sorted(range(len(chars)), key=lambda i: -(chars[i]["bits"] or 0.0))[:8]
    out.print("hardest: " + ", ".join(
        f"{visible_char(chars[i]['char'])!r} after {''.join(visible_char(c['char']) for c in chars[max(0, i - 8):i])!r} "
        f"({chars[i]['bits']:.1f} bits, context {chars[i]['context']})" for i in hardest if chars[i]["bits"] is not None),
        markup=False, highlight=False)


def _comma_ints(text: Optional[str], option: str) -> Optional[List[int]]:
    if text is None:
        return None
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise UserError(f"{option} expects numbers separated by commas, e.g. 1,4,16; got {text!r}") from None
    if not values:
        raise UserError(f"{option} expects at least one number, got {text!r}")
    return values


class _ProgressLine:
    """One live status line on a terminal; plain lines on stderr otherwise; nothing when quiet."""

    def __init__(self, quiet: bool):
        self.quiet = quiet
        self.status = None
        if not quiet and err.is_terminal:
            self.status = err.status("bench: starting")
            self.status.start()

    def __call__(self, message: str) -> None:
        if self.quiet:
            return
        if self.status is not None:
            self.status.update(f"bench: {message}")
        else:
            err.print(f"bench: {message}", markup=False)

    def close(self) -> None:
        if self.status is not None:
            self.status.stop()
            self.status = None


def _render_bench(result: dict) -> None:
    from rich.table import Table

    model = result["model"]
    out.print(f"[bold]bench[/] {result['target']['kind']} {result['target']['name']}: "
              f"{_count(model['n_params'])} parameters, {model['n_layer']} layers x {model['n_embd']}, "
              f"block_size {model['block_size']}, vocabulary {model['vocab_size']} "
              f"({_vocab_source(result['target'])})")
    choice = result.get("thread_choice") or {}
    threads = (", ".join(f"{section} {c['threads']}" for section, c in choice.items()) + " threads"
               if choice else f"{result['threads']} threads")
    out.print(f"on {result['device']} ({result['device_name']}), {threads}, "
              f"torch {result['torch_version']}; times are medians ± median absolute deviation of "
              f"repeated, synchronised runs after warm-up", markup=False)
    train = result.get("train")
    if train:
        if "skipped" in train:
            out.print(f"\n[bold]training[/]: {train['skipped']}")
        else:
            rows = [
                ("batch", f"{train['batch_size']} x {train['seq_len']} tokens, {train['precision']}, "
                          f"{train['optimizer']} (forward, backward, clip, step)"),
                ("time per iteration", _ms(train["ms_per_iter"])),
                ("tokens per second", f"{train['tokens_per_sec']:,.0f}"),
                ("achieved", f"{train['achieved_gflops']:,.1f} GFLOP/s (model FLOPs: 6N + attention per token)"),
            ]
            if train.get("mfu") is not None:
                rows.append(("MFU", f"{100 * train['mfu']:.1f}% of {train['peak_tflops']:g} TFLOP/s "
                                    f"({train['peak_source']})"))
            else:
                rows.append(("MFU", train["peak_source"]))
            if train.get("peak_memory_bytes"):
                rows.append(("peak memory", _mib(train["peak_memory_bytes"])))
            out.print()
            out.print(_key_value_table("training", rows))
    sample = result.get("sample")
    if sample:
        floor = sample["weight_floor"]
        out.print()
        out.print(_key_value_table(f"sampling (batch 1, {sample['dtype']} weights, as minigpt sample runs)", [
            ("time to first token", f"{_ms(sample['time_to_first_token_ms'])} (prefill of {sample['prompt_len']} "
                                    f"tokens + choosing one)"),
            ("prefill", f"{sample['prefill_tokens_per_sec']:,.0f} tokens/s"),
            ("weight-read floor", f"{floor['ms']:.3g} ms: {floor['matrices']} matrix-vector products reading "
                                  f"{_mib(floor['bytes'])} ({floor['gb_per_s']:.1f} GB/s, "
                                  f"{'oneDNN packed' if floor['kernel'] == 'model' else 'F.linear'})"),
        ]))
        table = Table(title="decode step at a context length, with the KV cache and without it (recomputing "
                            "the whole prefix)", title_justify="left", title_style="bold")
        for column in ("context", "KV cache", "FLOP", "no cache", "FLOP", "cache speed-up", "floor reached"):
            table.add_column(column, justify="right")
        for row in sample["decode"]:
            context = f"{row['context']}*" if row.get("past_block_size") else str(row["context"])
            table.add_row(context, _ms(row["cached_ms"]), _count(row["cached_flops"]),
                          _ms(row.get("uncached_ms")), _count(row["uncached_flops"]),
                          f"{row['cache_speedup']:.1f}x" if row.get("cache_speedup") else "-",
                          f"{row['floor_pct']:.0f}%")
        out.print(table)
        out.print(f"cost: {sample['cost']}", markup=False)
        if sample.get("past_block_size"):
            out.print(f"* {sample['past_block_size']}", markup=False)
        if sample["batch"]:
            table = Table(title=f"batched decode (KV cache, context {sample['batch'][0]['context']})",
                          title_justify="left", title_style="bold")
            for column in ("batch", "step", "tokens/s"):
                table.add_column(column, justify="right")
            for row in sample["batch"]:
                table.add_row(str(row["batch_size"]), _ms(row["step_ms"]), f"{row['tokens_per_sec']:,.0f}")
            out.print(table)
    attention = result.get("attention")
    if attention and attention["rows"]:
        table = Table(title=f"causal attention, batch 1 x {attention['n_head']} heads x {attention['head_dim']}, "
                            f"{attention['dtype']}: softmax(QK^T/sqrt(d))V written out, and "
                            f"F.scaled_dot_product_attention (SDPA); memory: {attention['memory_method']}",
                      title_justify="left", title_style="bold")
        for column in ("T", "written out", "memory", "SDPA", "memory", "SDPA speed-up"):
            table.add_column(column, justify="right")
        for row in attention["rows"]:
            table.add_row(str(row["seq_len"]), _ms(row["plain_ms"]), _mib(row["plain_peak_bytes"]),
                          _ms(row["sdpa_ms"]), _mib(row["sdpa_peak_bytes"]), f"{row['speedup']:.1f}x")
        out.print(table)
    memory = result["memory"]
    out.print(f"\npeak memory: {_mib(memory['peak_bytes'])} ({memory['method']}); bench took "
              f"{result['seconds']:.1f}s", markup=False)
    for note in result["notes"]:
        err.print(f"note: {note}", markup=False)


@app.command(epilog="Examples:\n\n  minigpt bench\n\n  minigpt bench gpt2_small --quick\n\n"
                    "  minigpt bench runs/default-20261124-101500 --device cuda --json")
@handle_errors
def bench(
    target: Optional[str] = typer.Argument(None, help="Run directory, config path or shipped config name "
                                                      "(default: newest run under ./runs, else config default)."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda, cuda:N or mps."),
    quick: bool = typer.Option(False, "--quick", help="Fewer repeats and smaller work per measurement."),
    repeats: Optional[int] = typer.Option(None, "--repeats", help="Timed repeats per measurement "
                                                                  "(default: 10, or 3 with --quick)."),
    max_seq: int = typer.Option(1024, "--max-seq", help="Longest sequence of the attention sweep "
                                                        "(64, 128, ... doubling) and longest context of the "
                                                        "decode table."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Training batch (default: the config's, "
                                                                        "reduced on CPU to bound the time)."),
    seq_len: Optional[int] = typer.Option(None, "--seq-len", help="Training sequence length (default: block_size, "
                                                                  "reduced on CPU to bound the time)."),
    batch_sizes: Optional[str] = typer.Option(None, "--batch-sizes", help="Batches for decode throughput, e.g. "
                                                                          "1,8,32 (default: 1,4,16,64; 1,4 quick)."),
    only: Optional[str] = typer.Option(None, "--only", help="Sections to run, comma-separated: train, sample, "
                                                            "attention (default: all)."),
    dtype: str = typer.Option("float32", "--dtype", help="Sampling precision, as for minigpt sample: float32, "
                                                         "bfloat16, or float16 (GPU only)."),
    set_: List[str] = typer.Option([], "--set", help="Override a key of a CONFIG, e.g. --set model.n_layer=8 "
                                                     "(repeatable)."),
    threads: int = typer.Option(0, "--threads", help="CPU threads per operation (default: chosen per section as "
                                                    "train and sample choose them)."),
    vocab_size: Optional[int] = typer.Option(None, "--vocab-size", help="Size a CONFIG's model for this many "
                                             "tokens instead of its text's characters, e.g. 50257 for GPT-2's own "
                                             "vocabulary."),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON object with every measurement."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress line."),
) -> None:
    """Measure training and sampling speed, attention cost against length, and peak memory."""
    progress = _ProgressLine(quiet)  # at once: loading PyTorch takes a moment
    try:
        from minigpt_cli.bench import BenchOptions, resolve_target
        from minigpt_cli.bench import bench as run_bench

        sections = tuple(s.strip() for s in only.split(",") if s.strip()) if only else ("train", "sample", "attention")
        options = BenchOptions(device=device, quick=quick, repeats=repeats, max_seq=max_seq, batch_size=batch_size,
                               seq_len=seq_len, batch_sizes=_comma_ints(batch_sizes, "--batch-sizes"),
                               sections=sections, dtype=dtype, threads=threads)
        chosen = resolve_target(target, set_, vocab_size=vocab_size)
        result = run_bench(chosen, options, progress)
    finally:
        progress.close()
    if json_out:
        emit_json(result)
        return
    _render_bench(result)


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


def _vocab_source(target: dict) -> str:
    source = target.get("vocab_source", "")
    return "set by --vocab-size, not the text's characters" if source == "--vocab-size" else source


def _vocab_comparison(params: dict, target: dict) -> str:
    """Which parameter count is which: this vocabulary's, and GPT-2's 50,257-token one."""
    from minigpt_cli.inspection import GPT2_VOCAB_SIZE

    total, V, gpt2 = params["total"], params["vocab_size"], params["at_gpt2_vocab"]
    if V == GPT2_VOCAB_SIZE:
        return (f"{_count(total)} parameters with GPT-2's own vocabulary of {V:,} BPE tokens "
                f"(what GPT-2's own sizes count: 124M, 355M, 774M, 1.5B)")
    option = f"--vocab-size {GPT2_VOCAB_SIZE}"
    how = f"minigpt inspect {target['name']} {option}" if target["kind"] == "config" else option + " on its config"
    return (f"{_count(total)} parameters with this vocabulary of {V:,} characters; the same blocks with GPT-2's "
            f"own vocabulary of {GPT2_VOCAB_SIZE:,} BPE tokens would have {_count(gpt2)} ({how})")


def _render_inspect(result: dict) -> None:
    from rich.markup import escape
    from rich.table import Table

    params, flops, kv = result["params"], result["flops_per_token"], result["kv_cache"]
    target = result["target"]
    config = f"config {escape(target['config'])}, " if target["kind"] == "run" else ""
    out.print(f"[bold]{target['kind']}[/] {escape(target['name'])} ({config}vocabulary {target['vocab_size']}: "
              f"{escape(_vocab_source(target))})")
    out.print(_tree(params["tree"]))
    table = Table(title="parameters", title_justify="left", title_style="bold")
    table.add_column("module")
    table.add_column("parameters", justify="right")
    for name, count in params["by_module"].items():
        table.add_row(name, f"{count:,}")
    table.add_row("[bold]total[/]", f"[bold]{params['total']:,}[/]")
    out.print(table)
    out.print(f"embeddings {params['embedding']:,}, everything else {params['non_embedding']:,}; "
              f"{params['per_layer']:,} per layer; float32 weights {_mib(result['weights_bytes'])}"
              + ("; lm_head shares wte's weight" if params["tied_weights"] else ""), markup=False)
    out.print(_vocab_comparison(params, target), markup=False)
    counted = flops.get("counted")
    config_has_conv = bool(result["config"]["model"].get("short_conv"))
    rows = [
        ("N (matmul weights)", f"{flops['matmul_params']:,} (attention, MLP and lm_head; not the embeddings)"),
        ("forward", f"{_count(flops['forward'])}FLOP per token = 2N + {_count(flops['attention_forward'])} "
                    f"attention at T = {flops['seq_len']} (causal: 2 x n_layer x T x n_embd)"
                    + (f" + {_count(flops['short_conv_forward'])} short convolutions"
                       if flops.get("short_conv_forward") else "")),
        ("training", f"{_count(flops['train'])}FLOP per token (3 x forward: backward costs twice the forward)"),
        ("full attention", f"{_count(flops['forward_full_attention'])} forward, {_count(flops['train_full_attention'])} "
                           f"training (the masked half computed too, as kernels often do)"),
    ]
    if counted:
        rows.append(("torch's FLOP counter", f"{_count(counted['forward'])} forward, {_count(counted['train'])} "
                                             f"training per token (counts full attention)"))
    out.print(_key_value_table("FLOPs per token", rows))
    out.print(_key_value_table("KV cache", [
        ("per token", f"{kv['bytes_per_token']:,} bytes: keys and values of every layer"
                      + (" and its sublayers' inputs (for the short convolutions)" if config_has_conv else "")
                      + ", in float32 at "
                      f"every sampling --dtype ({kv['bytes_per_token_bf16']:,} if they were bfloat16)"),
        ("per sequence at block_size", f"{_mib(kv['bytes_at_block_size'])} ({kv['block_size']} positions)"),
    ]))
    config = result["config"]
    for stage, title in (("training", f"shapes of a training batch (B = {config['train']['batch_size']}, "
                                      f"T = block_size = {config['model']['block_size']})"),
                         ("decoding", "shapes of one decoding step (KV cache full but one position)")):
        table = Table(title=title, title_justify="left", title_style="bold")
        table.add_column("tensor", overflow="fold", min_width=30)
        table.add_column("shape", no_wrap=True)
        table.add_column("as", overflow="fold")
        for row in result["shapes"]:
            if row["stage"] == stage:
                note = f" [dim]({escape(row['note'])})[/]" if row["note"] else ""
                table.add_row(escape(row["name"]) + note, "(" + ", ".join(map(str, row["shape"])) + ")",
                              escape(row["symbols"]))
        out.print(table)
    run = result.get("run")
    if run:
        from minigpt_cli.inspection import text_chart

        best = (f"{run['best_val_loss']:.4f} ({run['best_val_bpc']:.3f} bits per character)"
                if run["best_val_loss"] is not None else "-")
        out.print(_key_value_table("training record", [
            ("vocabulary", escape(f"{run['vocab']['size']} characters: {run['vocab']['chars']}")),
            ("steps", f"{run['steps']:,}"),
            ("tokens seen", f"{run['tokens_seen']:,}"),
            ("wall time", f"{run['wall_seconds']:.1f}s"),
            ("device", escape(f"{run['device']}, {run['precision']}, torch {run['torch_version']}")),
            ("best val loss", best),
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


@app.command(epilog="Examples:\n\n  minigpt inspect\n\n  minigpt inspect gpt2_small\n\n"
                    "  minigpt inspect runs/default-20261124-101500 --plot losses.png")
@handle_errors
def inspect(
    target: Optional[str] = typer.Argument(None, help="Run directory, config path or shipped config name "
                                                      "(default: newest run under ./runs, else config default)."),
    attention_text: Optional[str] = typer.Option(None, "--attention", help="Show each layer's and head's attention "
                                                 "weights over this text (at most block_size characters) as a "
                                                 "heat map; needs a run."),
    plot: Optional[Path] = typer.Option(None, "--plot", help="Write the loss curves of a run (with --attention: its "
                                                             "attention maps) as an image (.png, .svg or .pdf; "
                                                             "needs matplotlib)."),
    set_: List[str] = typer.Option([], "--set", help="Override a key of a CONFIG, e.g. --set model.n_layer=8 "
                                                     "(repeatable)."),
    vocab_size: Optional[int] = typer.Option(None, "--vocab-size", help="Size a CONFIG's model for this many "
                                             "tokens instead of its text's characters, e.g. 50257 for GPT-2's own "
                                             "vocabulary."),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON object with everything shown."),
) -> None:
    """Show what a run or config is made of: modules, parameters, FLOPs, cache, shapes, training record."""
    starting = _Starting(False)
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


def _render_attention(result: dict) -> None:
    from rich.columns import Columns
    from rich.markup import escape
    from rich.table import Table

    from minigpt_cli.inspection import visible_char

    chars = [visible_char(c) for c in result["chars"]]
    out.print(f"[bold]attention[/] of {escape(result['target']['name'])} (step {result['step']:,}) over "
              f"{len(chars)} characters: {escape(''.join(chars))}")
    out.print("softmax(QK^T/sqrt(head_dim)) of every layer and head: row = the character attending, columns = the "
              "characters up to it (the causal mask hides the rest); weight · under 0.05, ░ under 0.25, ▒ under 0.5, "
              "▓ under 0.75, █ 0.75 to 1", markup=False)
    for layer in result["layers"]:
        out.print(f"\n[bold]layer {layer['layer']}[/]")
        out.print(Columns([_attention_map(head, chars) for head in layer["heads"]], padding=(0, 3)))
    table = Table(title="where each head looks: its mean weight on the character itself, the previous one and the "
                        "first one, and its mean largest weight (over positions 1..T-1)", title_justify="left",
                  title_style="bold")
    for column in ("layer", "head", "itself", "previous", "first", "largest"):
        table.add_column(column, justify="right")
    for layer in result["layers"]:
        for head in layer["heads"]:
            cells = [head[k] for k in ("to_self", "to_previous", "to_first", "max")]
            table.add_row(str(layer["layer"]), str(head["head"]), *("-" if v is None else f"{v:.2f}" for v in cells))
    out.print()
    out.print(table)


# ---------------------------------------------------------------------------------------------
# runs, compare
# ---------------------------------------------------------------------------------------------

def _size(nbytes: Optional[float]) -> str:
    if nbytes is None:
        return "-"
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if nbytes >= scale:
            return f"{nbytes / scale:,.1f} {unit}"
    return f"{nbytes:,.0f} B"


def _loss(value: Optional[float]) -> str:
    return f"{value:.4f}" if value is not None else "-"


def _render_runs(folder: Path, infos: List[Any]) -> None:
    from rich.markup import escape
    from rich.table import Table

    if not infos:
        out.print(f"no runs under {escape(str(folder))} (train one with: minigpt train)")
        return
    table = Table(title=f"runs under {escape(str(folder))}, newest first", title_justify="left",
                  title_style="bold", box=None, pad_edge=False)
    for column, justify in (("run", "left"), ("config", "left"), ("params", "right"), ("steps", "right"),
                            ("tokens", "right"), ("best val", "right"), ("final val", "right"),
                            ("wall", "right"), ("state", "left"), ("size", "right")):
        table.add_column(column, justify=justify, overflow="fold", header_style="bold",
                         no_wrap=column not in ("run", "config"))
    styles = {"finished": "green", "live": "bold cyan", "paused": "yellow", "interrupted": "yellow",
              "failed": "red", "damaged": "red", "not a run": "dim"}
    short = {"time budget used": "budget", "max_iters reached": "", "train.stop_after": "stop_after"}
    notes, measures = [], set()
    for r in infos:
        name = escape(r.name) + (f" -> {escape(r.link)}" if r.link else "")
        best = "-"
        if r.best_val_loss is not None:
            whole = r.best_measure == "whole val split"
            best = f"{r.best_val_loss:.4f}" + ("*" if whole else "")
            measures.add(r.best_measure)
        detail = short.get(r.detail.split(";")[0], None)
        if detail is None and r.detail:
            notes.append(f"{r.name}: {r.detail}")
        elif r.state == "paused":
            notes.append(f"{r.name}: {r.detail}")
        state = f"[{styles.get(r.state, '')}]{r.state}[/]" + (f" ({detail})" if detail else "")
        if r.parent:
            notes.append(f"{r.name}: started from the weights of {r.parent}")
        table.add_row(name, escape(r.config or "-"), _count(r.params) if r.params is not None else "-",
                      f"{r.steps:,}" if r.steps is not None else "-",
                      _count(r.tokens) if r.tokens is not None else "-", best,
                      f"{r.final_val_loss:.4f}" if r.final_val_loss is not None else "-",
                      _fmt_seconds(r.wall_seconds) if r.wall_seconds is not None else "-", state,
                      _size(r.size_bytes) if r.is_run and not r.link else "-")
    out.print(table)
    sampled = sorted(m for m in measures if m != "whole val split")
    out.print(f"best val: the lowest periodic validation loss ({', '.join(sampled) or 'sampled batches'}; "
              f"* the whole validation split); final val: the validation split at the end (a fixed sample of it "
              f"where it is large or the time budget short)", markup=False)
    for note in notes:
        out.print(f"  {note}", markup=False)


def _runs_rm(paths: List[str], yes: bool, json_out: bool) -> None:
    from minigpt_cli.runs import plan_removal, remove_run

    plans = plan_removal([Path(p) for p in paths])
    total = sum(p.size_bytes for p in plans)
    for p in plans:
        r = p.info
        what = (f"the link {r.path} (its target {r.link} stays)" if p.contents is None
                else f"{r.path} ({r.state}, {_size(p.size_bytes)})")
        if p.contents is not None and p.contents.foreign:
            what += f"; keeps {len(p.contents.foreign)} entr{'ies' if len(p.contents.foreign) > 1 else 'y'} minigpt did not write"
        err.print(f"  {what}", markup=False)
    if not yes:
        prompt = f"Delete {len(plans)} run{'s' if len(plans) > 1 else ''} ({_size(total)})?"
        try:
            confirmed = typer.confirm(prompt, default=False, err=True)
        except (typer.Abort, EOFError):
            confirmed = False
        if not confirmed:
            err.print("nothing deleted (pass --yes to delete without asking)", markup=False)
            raise typer.Exit(EXIT_FAILURE)
    kept = {p.info.path: remove_run(p) for p in plans}
    if json_out:
        emit_json({"removed": [p.info.path for p in plans], "bytes": total,
                   "kept": {path: names for path, names in kept.items() if names}})
        return
    err.print(f"deleted {len(plans)} run{'s' if len(plans) > 1 else ''} ({_size(total)})", markup=False)
    for path, names in kept.items():
        if names:
            err.print(f"  kept in {path} (not written by minigpt): {', '.join(names)}", markup=False)


@app.command(epilog="Examples:\n\n  minigpt runs\n\n  minigpt runs --json\n\n"
                    "  minigpt runs rm runs/tiny-20261124-101500 --yes")
@handle_errors
def runs(
    items: Optional[List[str]] = typer.Argument(None, metavar="[FOLDER] | rm RUN...",
                                                help="Folder to list (default: ./runs); or rm and the runs to "
                                                     "delete."),
    yes: bool = typer.Option(False, "--yes", "-y", help="With rm: delete without asking."),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON object with every run."),
) -> None:
    """List your runs, newest first (what, how far, how good, how it ended, size); `runs rm RUN...` deletes runs."""
    from minigpt_cli.runs import list_runs

    items = list(items or [])
    if items and items[0] == "rm":
        _runs_rm(items[1:], yes, json_out)
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
    _render_runs(folder, infos)


CURVE_MARKS = "o*+x#@%&"


def _render_compare(result: dict) -> None:
    from rich.markup import escape
    from rich.table import Table

    from minigpt_cli.inspection import text_chart

    rows = result["runs"]
    if not rows:
        out.print("no run finished a checkpoint: nothing to compare")
        return
    table = Table(title="runs side by side", title_justify="left", title_style="bold")
    table.add_column("")
    for r in rows:
        table.add_column(escape(r["label"]), justify="right", overflow="fold")

    def row(name: str, cells: List[str]) -> None:
        table.add_row(name, *cells)

    for key in result["differences"]:
        section, name = key.split(".", 1)
        row(escape(key), [escape(str(r["config_values"][section].get(name, "-")) or "(none)") for r in rows])
    if result["differences"]:
        table.add_section()
    row("parameters", [_count(r["params"]) if r["params"] is not None else "-" for r in rows])
    row("tokens/s", [f"{r['tokens_per_sec']:,.0f}" if r["tokens_per_sec"] else "-" for r in rows])
    row("steps", [f"{r['steps']:,}" if r["steps"] is not None else "-" for r in rows])
    row("best val loss", [f"{_loss(r['best_val_loss'])} ({r['best_measure']})" if r["best_val_loss"] is not None
                          else "-" for r in rows])
    row("final val loss", [f"{_loss(r['final_val_loss'])} ({r['final_measure']})" if r["final_val_loss"] is not None
                           else "-" for r in rows])
    row("bits per char", [f"{r['final_val_bpc']:.3f}" if r["final_val_bpc"] is not None else "-" for r in rows])
    row("wall time", [f"{r['wall_seconds']:.1f}s" if r["wall_seconds"] is not None else "-" for r in rows])
    row("state", [escape(r["state"]) for r in rows])
    row("run", [escape(r["path"]) for r in rows])
    out.print(table)
    if not result["differences"]:
        out.print("(the runs' configs are the same)")
    marks = {r["label"]: CURVE_MARKS[i % len(CURVE_MARKS)] for i, r in enumerate(rows)}
    out.print("[bold]validation loss against step[/]")
    for line in text_chart({r["label"]: r["val_curve"] for r in rows}, marks=marks):
        out.print(line, markup=False, highlight=False)


@app.command(epilog="Examples:\n\n  minigpt compare runs/a runs/b\n\n"
                    "  minigpt compare tiny --vary model.pos_encoding=learned,sinusoidal,rope --time-budget 30\n\n"
                    "  minigpt compare tiny --vary model.norm_placement=pre,post --set train.max_iters=200 --json")
@handle_errors
@outlives_readers
def compare(
    targets: List[str] = typer.Argument(..., metavar="RUN RUN... | CONFIG",
                                        help="Two or more run directories; or one config (path or shipped name) "
                                             "with --vary."),
    vary: List[str] = typer.Option([], "--vary", help="Train one run per value: KEY=V1,V2 (repeatable: every "
                                                      "combination)."),
    set_: List[str] = typer.Option([], "--set", help="Override a key for every variant, e.g. "
                                                     "--set train.max_iters=200 (repeatable)."),
    time_budget: Optional[float] = typer.Option(None, "--time-budget", help="Seconds of wall clock for each "
                                                                           "variant."),
    data: Optional[str] = typer.Option(None, "--data", help="Text for every variant (default: the config's)."),
    device: Optional[str] = typer.Option(None, "--device", help="auto, cpu, cuda, cuda:N or mps."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Random seed of every variant (default: the config's)."),
    out_dir: Path = typer.Option(Path("runs"), "--out", help="Folder the variants' runs go in."),
    plot: Optional[Path] = typer.Option(None, "--plot", help="Also write the validation curves as an image "
                                                             "(.png, .svg or .pdf; needs matplotlib)."),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON object with the whole comparison."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No training progress, only the result."),
) -> None:
    """Compare runs side by side, or train variants of a config (--vary) and compare them."""
    from minigpt_cli import runs as runs_lib
    from minigpt_cli.config import absolute_data_path

    starting = _Starting(quiet, "loading")
    interrupted = False
    try:
        if vary:
            if len(targets) != 1:
                raise UserError("--vary trains variants of one CONFIG; give one config, not "
                                f"{len(targets)} arguments")
            flags = list(set_)
            if data is not None:
                flags.append(f"data.path={absolute_data_path(data)}")
            for key, value in (("time_budget", time_budget), ("device", device), ("seed", seed)):
                if value is not None:
                    flags.append(f"train.{key}={value}")
            if any(f.startswith("data.path=-") for f in flags):
                raise UserError("compare trains several runs on the same text, so it cannot read it from stdin; "
                                "give --data PATH")
            variants = runs_lib.plan_variants(targets[0], vary, flags)
            starting.done()
            result = _train_variants(variants, out_dir, quiet)
            interrupted = any(v["state"] == "interrupted" for v in result["variants"])
        else:
            if set_ or time_budget is not None or data is not None or seed is not None or device is not None:
                raise UserError("--set, --time-budget, --data, --seed and --device shape the runs --vary trains; "
                                "comparing existing runs takes none of them")
            result = runs_lib.compare_runs([Path(t) for t in targets])
    finally:
        starting.done()
    if plot is not None:
        from minigpt_cli.inspection import plot_curves

        curves = {r["label"]: r["val_curve"] for r in result["runs"]}
        result["plot"] = str(plot_curves(curves, plot, "validation loss"))
        err.print(f"wrote {result['plot']}", markup=False)
    result["interrupted"] = interrupted
    if json_out:
        emit_json(result)
    else:
        _render_compare(result)
    if interrupted:
        done = sum(v["state"] == "finished" for v in result["variants"])
        err.print(f"stopped by Ctrl-C: {done} of {len(result['variants'])} variants finished", markup=False)
        raise typer.Exit(130)


def _train_variants(variants: List[Any], base: Path, quiet: bool) -> dict:
    from minigpt_cli import runs as runs_lib
    from minigpt_cli.trainer import train as run_training

    first = variants[0].config.train
    budget = f"{first.time_budget:g}s each" if first.time_budget else f"{first.max_iters:,} steps each"
    if not quiet:
        err.print(f"compare: {len(variants)} variants of {variants[0].config.name} ({budget}, seed {first.seed}, "
                  f"same data): " + "; ".join(v.label for v in variants), markup=False)

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


def _click_errors() -> tuple[type, type]:
    """click's ClickException and UsageError, found through typer's public BadParameter (recent typer
    releases carry their own copy of click, older ones use click itself)."""
    by_name = {c.__name__: c for c in typer.BadParameter.__mro__}
    return by_name["ClickException"], by_name["UsageError"]


def main() -> None:
    """The console command: click's own messages (an unknown option, a missing value) become one
    line like every other error, and help piped into `head` ends quietly."""
    import rich.console

    _reopen_closed_std_streams()
    _encode_what_the_terminal_cannot_show()
    # OpenMP's wait policy is left to libgomp (spin briefly, then sleep): device.choose_threads
    # already keeps to the CPUs other programs leave free, and forcing PASSIVE (sleep at once) made
    # a quiet machine's 2-thread decode of the 6 x 384 model about 20% slower (98 against 121-127
    # tokens/s, benchmarks/README.md). OMP_WAIT_POLICY=PASSIVE is the user's choice for a machine
    # that may get busy after a long command starts.
    click_exception, usage_error = _click_errors()
    # typer prints help through its own rich consoles, whose answer to a reader that went away is
    # exit code 1: give them ours (exit 0, as a pipe into `head` is not a failure).
    rich.console.Console.on_broken_pipe = _Console.on_broken_pipe
    try:
        code = app(standalone_mode=False)
    except click_exception as exc:
        ctx = getattr(exc, "ctx", None)
        if type(exc).__name__ == "NoArgsIsHelpError" and ctx is not None:
            sys.stdout.write(ctx.get_help() + "\n")  # `minigpt` alone shows the help
            code = 0
        else:
            hint = f" (see: {ctx.command_path} --help)" if isinstance(exc, usage_error) and ctx is not None else ""
            err.print(f"error: {exc.format_message()}{hint}", markup=False, soft_wrap=True)
            code = exc.exit_code
    except typer.Abort:
        err.print("interrupted", markup=False)
        code = 130
    except BrokenPipeError:
        code = reader_went_away()
    except OSError as exc:
        if not _is_output_error(exc):
            raise
        code = output_failed(exc)
    exit_now(code if isinstance(code, int) else 0)


def _reopen_closed_std_streams() -> None:
    """A standard stream the shell closed (`minigpt train >&-`) becomes /dev/null. Python leaves it
    None (a traceback at the first print), and the next file opened, a checkpoint, would take its
    descriptor and with it anything written there."""
    for name, mode in (("stdin", "r"), ("stdout", "w"), ("stderr", "w")):  # in descriptor order: 0, 1, 2
        if getattr(sys, name) is None:
            setattr(sys, name, open(os.devnull, mode, encoding="utf-8"))


def _encode_what_the_terminal_cannot_show() -> None:
    """A character the output's encoding lacks (PYTHONIOENCODING=ascii, a Latin-1 terminal) is written as
    a backslash escape instead of ending the command with UnicodeEncodeError."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.reconfigure(errors="backslashreplace")
        except (AttributeError, ValueError, OSError):
            pass  # not a text stream we can reconfigure (a test's capture): left as it is


def exit_now(code: int) -> None:
    """End the process without the interpreter's teardown. With torch loaded, freeing its modules and
    libraries takes 0.9-1.5 s after the last line is printed (measured on 2 cores): the shell's prompt
    came back that much later, and a --time-budget run overran its budget by it. Output is flushed and
    exit handlers run first, as sys.exit would; nothing of the run is left to write by now."""
    if "torch" not in sys.modules:
        failed = _flush_streams()
        sys.exit(failed if failed and not code else code)  # help, version, usage errors: nothing heavy to skip
    import atexit
    import ctypes

    atexit._run_exitfuncs()
    failed = _flush_streams()  # after the handlers: what they printed too
    code = failed if failed and not code else code
    try:
        ctypes.CDLL(None).fflush(None)  # C's stdio too (oneDNN's or NCCL's verbose logs)
    except (OSError, AttributeError, TypeError):
        pass  # no C library to ask (Windows): its buffers are flushed by its own exit
    os._exit(code)


def _flush_streams() -> int | None:
    """Flush stdout and stderr; the exit code output_failed chose if stdout could not take its output."""
    failed = None
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except BrokenPipeError:
            if stream is sys.stdout:
                reader_went_away()
        except OSError as exc:
            if stream is sys.stdout:
                failed = output_failed(exc)
        except ValueError:
            if stream is sys.stdout:
                reader_went_away()
    return failed


if __name__ == "__main__":
    main()
