"""How the commands draw work in progress on stderr: library code reports it (progress.Progress,
the trainer's TrainEvents, bench's messages) and these views decide what a person sees."""

from __future__ import annotations

import sys
import time
from typing import Any, Optional

from minigpt_cli.config import UNTIL_BUDGET
from minigpt_cli.output import err, fmt_seconds
from minigpt_cli.progress import FINAL_EVAL_TASK


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
        eta = f", ETA {fmt_seconds(p.elapsed / p.done * (p.total - p.done))}" if p.total and p.done else ""
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


class Starting:
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


def stop_rule(time_budget: float, max_iters: int) -> str:
    """What ends a run with a time budget, in the training header."""
    if max_iters >= UNTIL_BUDGET:
        return (f"stops at {time_budget:g} s: the time budget plans the schedule (set train.max_iters too to stop "
                f"at a step count first)")
    return f"stops at {time_budget:g} s or {max_iters:,} steps, whichever comes first"


class TrainView:
    """Renders TrainEvents: a tqdm bar on a terminal, plain lines (every few seconds) otherwise."""

    def __init__(self, quiet: bool, starting: Optional[Starting] = None):
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
        if d["time_budget"]:
            err.print(stop_rule(d["time_budget"], d["max_iters"]), markup=False)
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
        of = "" if d["max_iters"] >= UNTIL_BUDGET else f"/{d['max_iters']}"
        text = (f"step {step}{of}  loss {d['loss']:.4f}  lr {d['lr']:.2e}  "
                f"{d['tokens_per_sec'] / 1000:.1f}k tok/s  ETA {fmt_seconds(d['eta'])}")
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


class ProgressLine(Starting):
    """One live status line on a terminal; plain lines on stderr otherwise; nothing when quiet."""

    def __init__(self, quiet: bool):
        super().__init__(quiet, "bench: starting")
        self.quiet = quiet

    def __call__(self, message: str) -> None:
        if self.quiet:
            return
        if self.status is not None:
            self.status.update(f"bench: {message}")
        else:
            err.print(f"bench: {message}", markup=False)

    def close(self) -> None:
        self.done()


def final_scope(scored: int, val_chars: int, windows: Optional[str]) -> str:
    """What a final evaluation scored, in words: the whole split or its sample, and its windows where
    they overlap (windows: None where they do not, the default measure)."""
    scope = (f"the whole validation split, {scored:,} characters" if scored >= val_chars - 1 else
             f"{scored:,} characters sampled of the validation split's {val_chars:,}")
    return f"{scope} ({windows})" if windows else scope
