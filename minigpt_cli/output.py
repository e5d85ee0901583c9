"""What reaches the terminal, once each: the two consoles, the broken-pipe policy, the one error line,
JSON on stdout, and the formatters and tables the commands render results with.

Logs and progress go to stderr (`err`), results to stdout (`out`); rich drops colour for NO_COLOR and
non-terminals. Nothing here imports torch, and nothing reads the environment until first use.
"""

from __future__ import annotations

import errno
import functools
import os
import re
import sys
from typing import Any, Callable, List, Optional

import typer
from rich.console import Console

EXIT_USAGE, EXIT_FAILURE, EXIT_INTERRUPTED = 2, 1, 130
MESSAGE_MAX_CHARS = 1000  # an error is one readable line, whatever the input quoted in it


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


def is_output_error(exc: OSError) -> bool:
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


class _OutlivesReader:
    """A standard stream whose reader may go away without stopping the command: from the first write
    that finds the pipe closed, the stream's descriptor writes to /dev/null and the command goes on."""

    def __init__(self, stream: Any):
        self._stream = stream

    def _guard(self, action: Callable[[], Any], fallback: Any) -> Any:
        try:
            return action()
        except OSError as exc:  # the reader went away, or the log's disk is full: the training goes on
            if not isinstance(exc, BrokenPipeError) and exc.errno != errno.EPIPE and not is_output_error(exc):
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


# Characters that steer a terminal instead of showing: C0 controls but newline and tab, DEL, C1
# controls (ESC starts OSC 52 clipboard writes, OSC 8 links, window titles), and the bidirectional
# overrides and isolates that reorder what follows (U+202E makes "txt.exe" read "exe.txt").
_STEERING = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]")


def visible(text: str) -> str:
    """text with every character that would steer a terminal written as its escape (\\x1b, \\u202e):
    whatever a file or a user put in it is shown, never obeyed."""
    return _STEERING.sub(lambda m: m.group().encode("unicode_escape").decode("ascii"), text)


class _Console(Console):
    """rich's consoles answer a reader that went away as every other output does (reader_went_away),
    and show every string they render (messages, table cells, titles) through visible()."""

    def on_broken_pipe(self) -> None:
        raise typer.Exit(reader_went_away())

    def render_str(self, text: str, **options: Any) -> Any:
        return super().render_str(visible(text), **options)


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


def use_our_broken_pipe_policy() -> None:
    """typer prints help through its own rich consoles, whose answer to a reader that went away is
    exit code 1: give them ours (exit 0, as a pipe into `head` is not a failure)."""
    import rich.console

    rich.console.Console.on_broken_pipe = _Console.on_broken_pipe


def fail(message: str, code: int = EXIT_USAGE) -> None:
    """The one error line on stderr, then the exit code."""
    message = " ".join(message.splitlines())
    if len(message) > MESSAGE_MAX_CHARS:
        message = message[:MESSAGE_MAX_CHARS] + f"... ({len(message):,} characters in all)"
    err.print(f"error: {message}", markup=False, soft_wrap=True)
    raise typer.Exit(code)


def warn(message: str) -> None:
    err.print(f"warning: {message}", markup=False)


def emit_json(value: Any) -> None:
    """Exactly one JSON object on stdout, as its last line. NaN and infinity become null."""
    from minigpt_cli.rundir import strict_json

    sys.stdout.write(strict_json(value) + "\n")
    sys.stdout.flush()


# ---------------------------------------------------------------------------------------------
# Numbers for people
# ---------------------------------------------------------------------------------------------

def fmt_seconds(seconds: float) -> str:
    """75 -> '1:15'; an hour or more -> '1h05m'."""
    seconds = max(0, int(seconds))
    return f"{seconds // 60}:{seconds % 60:02d}" if seconds < 3600 else f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def mib(nbytes: Optional[float]) -> str:
    """Memory sizes: MiB, or GiB from one GiB up."""
    if nbytes is None:
        return "-"
    if nbytes >= 2**30:
        return f"{nbytes / 2**30:,.2f} GiB"
    return f"{nbytes / 2**20:,.1f} MiB"


def size(nbytes: Optional[float]) -> str:
    """File sizes, from bytes to GiB."""
    if nbytes is None:
        return "-"
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if nbytes >= scale:
            return f"{nbytes / scale:,.1f} {unit}"
    return f"{nbytes:,.0f} B"


def count(n: float) -> str:
    """1234567 -> '1.23M': parameters and tokens as the field writes them (GPT-2 XL is "1.5B", not "1.5G")."""
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n:.0f}"


def si(n: float) -> str:
    """1234567 -> '1.23M': the SI prefix of a quantity with a unit after it ("3.12GFLOP", never "3.12BFLOP")."""
    for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n:.0f}"


def ms(timing: Optional[dict]) -> str:
    """Median and median absolute deviation of a bench timing."""
    if not timing:
        return "-"
    if timing.get("repeats", 3) < 3:  # no spread to give: say how few runs, never a precise-looking ±0%
        return f"{timing['median_ms']:.3g} ms ({timing['repeats']} run{'s' if timing['repeats'] != 1 else ''})"
    spread = 100 * timing["mad_ms"] / timing["median_ms"] if timing["median_ms"] else 0.0
    return f"{timing['median_ms']:.3g} ms ±{spread:.0f}%"


def loss(value: Optional[float]) -> str:
    return f"{value:.4f}" if value is not None else "-"


def vocab_source(target: dict) -> str:
    """Where a bench or inspect target's vocabulary size came from, for people."""
    source = target.get("vocab_source", "")
    return "set by --vocab-size, not the text's characters" if source == "--vocab-size" else source


# ---------------------------------------------------------------------------------------------
# Tables
# ---------------------------------------------------------------------------------------------

def key_value_table(title: str, rows: List[tuple]) -> Any:
    from rich.table import Table

    table = Table(title=title, show_header=False, box=None, title_justify="left", title_style="bold")
    table.add_column(style="bold", no_wrap=True)
    table.add_column(overflow="fold")
    for key, value in rows:
        table.add_row(key, value)
    return table


def titled_table(title: str, columns: List[str], justify: str = "right") -> Any:
    """A table with a bold title on the left and these column headers."""
    from rich.table import Table

    table = Table(title=title, title_justify="left", title_style="bold")
    for column in columns:
        table.add_column(column, justify=justify)
    return table
