"""The run's clock and its time budget: when to stop so that the whole command ends within
train.time_budget seconds of the process's start, and how far through its training time it is.

One TimeBudget serves every run (unlimited without a budget): it owns the clock that the trainer
reads everywhere, so a test can drive a whole run from a fake one.

"progress" means one thing throughout training: the share of the run's training that is done, 0 to
1 (by steps, or by the budget's training time, whichever is further along).
"""

from __future__ import annotations

import math
import time
from typing import Callable


class TimeBudget:
    """When to stop so that the whole command (start-up, training, final evaluation, saves) ends
    within `budget` seconds of `started_at` (no limit when budget is None or 0).

    The next step is estimated from the steady-state rate: the median of recent step times, leaving
    out the first (allocation, kernel choice and caches make it slow). The final evaluation's cost is
    measured before the loop on a batch of its own windows; saves are timed as they happen. The first
    MIN_STEPS steps are taken if they end within GRACE seconds of the budget, so a short budget trains
    a few steps instead of none; after them, a step starts only if it fits.
    """

    WARMUP_STEPS = 1
    MIN_STEPS = 3
    RECENT = 20
    # Seconds kept for what follows the final evaluation: the summary and the process's exit.
    MARGIN = 0.5
    # The most of the time left at the loop's start that the final evaluation may take: past it, it
    # scores a fixed sample of the validation windows, so that a short budget still trains.
    FINAL_EVAL_SHARE = 0.25
    # Seconds past the budget the first MIN_STEPS may run into: a run that shows something beats
    # one that ends on time having trained nothing.
    GRACE = 1.0

    def __init__(self, budget: float | None, started_at: float, clock: Callable[[], float] = time.perf_counter):
        self.budget = budget
        self.limited = bool(budget)
        self.started_at = started_at
        self.deadline = started_at + budget if budget else math.inf
        self.clock = clock
        self.step_seconds: list[float] = []
        self.final_eval_seconds = 0.0
        self.eval_fraction = 1.0
        self.fixed_eval_seconds = 0.0
        self.save_seconds = 0.0
        self.loop_began = clock()
        self.loop_first_step = 0

    def now(self) -> float:
        return self.clock()

    def elapsed(self) -> float:
        """Seconds since the process started."""
        return self.clock() - self.started_at

    def begin(self, final_eval_seconds: float, save_seconds: float, fixed_eval_seconds: float = 0.0,
              step: int = 0) -> None:
        """The loop starts now, at `step`; the whole-split final evaluation, one save, and the evaluation
        work that cannot be cut (the sampled batches the best checkpoint is chosen by) are expected to
        cost this much. A whole-split evaluation that would take more than FINAL_EVAL_SHARE of the time
        left is cut to a sample of its windows that fits (eval_fraction of them)."""
        self.save_seconds = save_seconds
        self.fixed_eval_seconds = fixed_eval_seconds
        self.loop_began, self.loop_first_step = self.clock(), step
        available = max(0.0, self.deadline - self.loop_began - 2 * save_seconds - fixed_eval_seconds - self.MARGIN)
        share = self.FINAL_EVAL_SHARE * available
        self.eval_fraction = 1.0 if final_eval_seconds <= share else share / final_eval_seconds
        self.final_eval_seconds = final_eval_seconds * self.eval_fraction

    def keep_for_estimate(self, seconds: float) -> None:
        """A checkpoint has been measured by the sampled batches: keep time to measure the final one so."""
        self.fixed_eval_seconds = seconds

    def step_done(self, seconds: float) -> None:
        self.step_seconds.append(seconds)

    def saved(self, seconds: float) -> None:
        self.save_seconds = max(self.save_seconds, seconds)

    def step_estimate(self) -> float:
        steady = self.step_seconds[self.WARMUP_STEPS:] or self.step_seconds
        recent = sorted(steady[-self.RECENT:])
        return recent[len(recent) // 2] if recent else 0.0

    def reserve(self) -> float:
        """Seconds kept back from the deadline: the final evaluation, the saves around it, the exit."""
        return self.final_eval_seconds + self.fixed_eval_seconds + 2 * self.save_seconds + self.MARGIN

    def left(self) -> float:
        """Seconds left for training (and periodic evaluations) before the reserve."""
        return self.deadline - self.reserve() - self.clock()

    def out_of_time(self) -> bool:
        """Whether to stop before the next step."""
        if not self.limited:
            return False
        left = self.left()
        if len(self.step_seconds) < self.MIN_STEPS:
            return left + self.GRACE < self.step_estimate()
        return left < self.step_estimate()

    def allows(self, seconds: float) -> bool:
        """Whether work of this many seconds (a periodic evaluation) still fits before the reserve."""
        return not self.limited or self.left() >= seconds + self.step_estimate()

    def progress(self) -> float | None:
        """How far through its training time the run is, 0 to 1 (None without a budget)."""
        if not self.limited:
            return None
        usable = self.deadline - self.reserve() - self.loop_began
        return (self.clock() - self.loop_began) / max(usable, 1e-9)

    def eta(self, step: int, max_iters: int) -> float:
        """Seconds until training ends: the budget's deadline, or max_iters at the loop's rate so far."""
        if self.limited:
            return max(0.0, self.deadline - self.clock())
        return (self.clock() - self.loop_began) / max(1, step - self.loop_first_step) * (max_iters - step)
