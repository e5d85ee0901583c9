"""The `minigpt` command: the app built from one table of commands, and the one policy for how a
command ends (exit codes, error lines, Ctrl-C, a reader that went away). Each command lives in
minigpt_cli/commands/; nothing here imports torch, so `minigpt --help` stays fast.
"""

from __future__ import annotations

import functools
import os
import sys
from typing import Any, Callable

import typer

from minigpt_cli import __version__
from minigpt_cli.commands import bench, compare, eval, inspect, runs, sample, train
from minigpt_cli.config import UserError
from minigpt_cli.rundir import CheckpointWriteError
from minigpt_cli.output import (EXIT_FAILURE, EXIT_INTERRUPTED, EXIT_USAGE, err, fail, is_output_error,
                                outlives_readers, output_failed, reader_went_away, use_our_broken_pipe_policy)

# The commands in the order --help lists them: (name, function, examples shown under its --help).
# Those that train outlive a reader that goes away: a training is never lost to a closed log pipe.
COMMANDS = (
    ("train", outlives_readers(train.train), train.EXAMPLES),
    ("sample", sample.sample, sample.EXAMPLES),
    ("eval", eval.eval_, eval.EXAMPLES),
    ("bench", bench.bench, bench.EXAMPLES),
    ("inspect", inspect.inspect, inspect.EXAMPLES),
    ("runs", runs.runs, runs.EXAMPLES),
    ("compare", outlives_readers(compare.compare), compare.EXAMPLES),
)


def handle_errors(fn: Callable) -> Callable:
    """Turn expected failures into one line on stderr and the exit codes README.md lists."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except UserError as exc:
            fail(str(exc), EXIT_USAGE)
        except CheckpointWriteError as exc:  # a full disk, a file-size limit: not the user's input
            fail(str(exc), EXIT_FAILURE)
        except BrokenPipeError:
            raise typer.Exit(reader_went_away())
        except OSError as exc:
            if not is_output_error(exc):
                raise
            raise typer.Exit(output_failed(exc))
        except (MemoryError, RuntimeError) as exc:
            if not _out_of_memory(exc):
                raise
            detail = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else type(exc).__name__
            fail(f"out of memory ({detail}); try a smaller batch_size, block_size, model or --num-samples",
                 EXIT_FAILURE)
        except KeyboardInterrupt as exc:  # Ctrl-C; or the trainer's SecondSignal, which names its signal
            err.print(str(exc) or "interrupted", markup=False)
            raise typer.Exit(128 + getattr(exc, "signum", 2))

    return wrapper


def _out_of_memory(exc: BaseException) -> bool:
    """An allocation that failed, on any device (numpy's and torch's CPU allocators, CUDA, MPS)."""
    if isinstance(exc, MemoryError):
        return True
    text = str(exc)
    return any(s in text for s in ("can't allocate memory", "out of memory", "Storage size calculation overflowed"))


def _version(value: bool) -> None:
    if value:
        typer.echo(f"minigpt {__version__}")
        raise typer.Exit()


def build_app() -> typer.Typer:
    app = typer.Typer(name="minigpt", no_args_is_help=True, pretty_exceptions_enable=False,
                      help="Train, sample, evaluate, benchmark and inspect a small character-level GPT.",
                      context_settings={"help_option_names": ["-h", "--help"]})

    @app.callback()
    def root(
        version: bool = typer.Option(False, "--version", "-V", callback=_version, is_eager=True,
                                     help="Print the version and exit."),
    ) -> None:
        """Train, sample, evaluate, benchmark and inspect a small character-level GPT.

        Exit codes: 0 success, 1 failure, 2 bad usage or input, 130 Ctrl-C (after saving), 143 SIGTERM (after saving).
        """

    for name, command, examples in COMMANDS:
        app.command(name=name, epilog=examples)(handle_errors(command))
    return app


app = build_app()


def _click_errors() -> tuple[type, type]:
    """click's ClickException and UsageError, found through typer's public BadParameter (recent typer
    releases carry their own copy of click, older ones use click itself)."""
    by_name = {c.__name__: c for c in typer.BadParameter.__mro__}
    return by_name["ClickException"], by_name["UsageError"]


def main() -> None:
    """The console command: click's own messages (an unknown option, a missing value) become one
    line like every other error, and help piped into `head` ends quietly."""
    _reopen_closed_std_streams()
    _encode_what_the_terminal_cannot_show()
    click_exception, usage_error = _click_errors()
    use_our_broken_pipe_policy()
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
        code = EXIT_INTERRUPTED
    except BrokenPipeError:
        code = reader_went_away()
    except OSError as exc:
        if not is_output_error(exc):
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
    try:
        ctypes.CDLL(None).fflush(None)  # C's stdio too (oneDNN's or NCCL's verbose logs)
    except (OSError, AttributeError, TypeError):
        pass  # no C library to ask (Windows): its buffers are flushed by its own exit
    os._exit(failed if failed and not code else code)


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
