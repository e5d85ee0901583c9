"""The trainer's evaluations: the periodic estimate (fixed sampled batches of each split), the final
evaluation over the validation split, and what they cost, so that a time budget keeps time for them.

An Evaluator measures and records (metrics and events); the trainer saves what it measured.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from minigpt_cli import rundir
from minigpt_cli.batches import ScoringWindows, batch_indices, get_batch, scoring_windows
from minigpt_cli.budget import TimeBudget
from minigpt_cli.config import Config, windows_measure
from minigpt_cli.corpus import Corpus
from minigpt_cli.device import Precision, autocast
from minigpt_cli.model import GPT
from minigpt_cli.progress import FINAL_EVAL_TASK, Progress
from minigpt_cli.ranks import Ranks
from minigpt_cli.run_state import RunState
from minigpt_cli.scoring import bits_per_char, score_text

# Eval batches draw from generators keyed past any training micro-step, so they never overlap.
EVAL_STREAM = 1 << 30


def training_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor, device: torch.device,
                  precision: Precision) -> torch.Tensor:
    """Mean cross entropy of the next-token predictions for a batch x, y (B, T), under the run's autocast."""
    with autocast(device, precision):
        logits = model(x)  # (B, T, vocab_size)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), y.reshape(-1))


class Evaluator:
    """Evaluations of one invocation's model, on every rank alike (their work shared out, their
    results agreed by self.ranks), timed by the run's clock (self.budget's)."""

    # The fewest windows a final evaluation cut to fit a time budget scores.
    MIN_FINAL_WINDOWS = 8
    # Under a time budget, periodic evaluations take at most this share of the time gone so far: spread
    # out, and most of the budget trains. Measured (benchmarks/README.md): on 2 CPU cores a 300 s budget
    # evaluating every 250 steps of the default config spent 56 steps on five evaluations, 0.006 of its
    # final loss; this share leaves two, at about 2 and 4 minutes.
    PERIODIC_SHARE = 0.02

    def __init__(self, config: Config, run_dir: Path, corpus: Corpus, model: GPT, precision: Precision,
                 ranks: Ranks, budget: TimeBudget, state: RunState, emit: Callable[..., None],
                 report: Callable[[Progress], None]):
        self.config, self.run_dir, self.corpus, self.model = config, run_dir, corpus, model
        self.precision, self.ranks, self.device, self.budget = precision, ranks, ranks.device, budget
        self.state, self.emit, self.report = state, emit, report
        self.estimate_seconds = 0.0  # under a time budget: what the sampled validation batches cost
        self.seconds_per_window = 0.0
        self.periodic_val = math.nan  # the validation loss of the latest periodic evaluation (at state.evaluated_at)
        # The final weights on the measure the best checkpoint is chosen by (NaN: not measured so), so
        # that the summary compares the best checkpoint with the final weights like for like.
        self.final_on_best_measure = math.nan

    # -- what evaluations cost, for the time budget --------------------------------------------------
    def start_budget(self) -> None:
        """The loop starts now: under train.time_budget, with the final evaluation and a save measured
        (or guessed) so that the budget keeps time for them."""
        t, state = self.config.train, self.state
        if not t.time_budget:
            self.budget.begin(0.0, 0.0, step=state.step)
            return
        per_window = self.seconds_per_window = self._seconds_per_window()
        windows = max(1, math.ceil(self.val_windows().chars / self.stride))
        # The sampled validation batches the best checkpoint is chosen by, scored again at the end: time
        # is kept for them once a checkpoint has been measured so (by a periodic evaluation, or before a
        # resume). Until then the final checkpoint is the only candidate, the best without a measure.
        self.estimate_seconds = 0.0 if t.eval_full else per_window * t.eval_iters * t.batch_size
        fixed = self.estimate_seconds if math.isfinite(state.best_val) else 0.0
        # Until a save is timed: the weights and two Adam moments, written at a modest 100 MB/s.
        save_guess = 0.1 + 12 * self.model.num_parameters() / 100e6
        self.budget.begin(per_window * windows, save_guess, fixed, step=state.step)

    def _seconds_per_window(self) -> float:
        """Seconds to score one block_size window of validation text, from timing one batch of them
        as the final evaluation scores them, after the same batch untimed (the first forward pass
        at a shape pays for allocation and kernel choice). Timing 8 windows after 1 overestimated
        the default model's final evaluation by half and more: time a budget then left unused."""
        m, model = self.config.model, self.model
        batch = self.eval_batch()
        val = self.corpus.val
        sample = val[:min(len(val), batch * m.block_size + 1)]
        score_text(model, sample, m.block_size, m.block_size, batch, self.device, self.precision)
        began = self.budget.now()
        _, scored = score_text(model, sample, m.block_size, m.block_size, batch, self.device, self.precision)
        return (self.budget.now() - began) / max(1, math.ceil(scored / m.block_size))

    def fits(self) -> bool:
        """Under a time budget, a periodic evaluation only where it leaves time for the final one
        (which measures the same weights more fully a moment later anyway), and where evaluations so
        far, this one included, take at most PERIODIC_SHARE of the time gone."""
        if not self.budget.limited:
            return True
        t = self.config.train
        cost = self.state.periodic_eval_seconds
        if cost is None:  # not yet timed: its batches (and the whole split with eval_full) at the measured rate
            windows = math.ceil(self.val_windows().chars / self.stride) if t.eval_full else 0
            cost = self.seconds_per_window * (2 * t.eval_iters * t.batch_size + windows)
        spread = self.state.eval_seconds + cost <= self.PERIODIC_SHARE * self.budget.elapsed()
        if not self.budget.fixed_eval_seconds:
            cost += self.estimate_seconds  # after it, time is kept to measure the final checkpoint too
        return self.ranks.all(spread and self.budget.allows(cost))

    # -- measures -------------------------------------------------------------------------------------
    def eval_batch(self) -> int:
        """Windows a whole-split evaluation scores at once."""
        return max(self.config.train.batch_size, 32)

    @property
    def stride(self) -> int:
        """Characters between the starts of a whole-split evaluation's windows (train.eval_stride)."""
        return self.config.train.eval_stride or self.config.model.block_size

    def val_windows(self) -> ScoringWindows:
        m = self.config.model
        return scoring_windows(len(self.corpus.val), m.block_size, self.stride, self.config.train.eval_max_chars)

    def windows_measure(self) -> str:
        """How the whole-split evaluation's windows score: the measure its loss is."""
        return windows_measure(self.config.model.block_size, self.stride)

    def describe_scope(self, scored: int, val_chars: int) -> str:
        if scored >= val_chars - 1:
            if self.stride != self.config.model.block_size:
                return f"whole validation split, {scored:,} characters, {self.windows_measure()}"
            return f"whole validation split, {scored:,} characters"
        if self.budget.eval_fraction < 1.0:
            return (f"{scored:,} characters sampled of {val_chars:,}: fixed windows, as many as the time budget "
                    f"leaves time for")
        return (f"{scored:,} characters sampled of {val_chars:,}: fixed windows; train.eval_max_chars=0 "
                f"scores the whole split")

    def estimate(self, splits: Sequence[str] = ("train", "val")) -> dict[str, float]:
        """Mean loss over eval_iters fixed batches of each split (the same batches every time), over ranks."""
        t, m, model, corpus, ranks = self.config.train, self.config.model, self.model, self.corpus, self.ranks
        names = [name for name in ("train", "val") if name in splits]
        sums = []
        model.eval()
        with torch.no_grad():
            for name in names:
                split_id, ids = (0, corpus.train) if name == "train" else (1, corpus.val)
                losses = []
                for i in range(t.eval_iters):
                    starts = batch_indices(len(ids), m.block_size, t.batch_size, t.seed, i, EVAL_STREAM + split_id,
                                           ranks.dist.rank, ranks.dist.world_size)
                    x, y = get_batch(ids, starts, m.block_size, self.device, corpus.tokenizer.vocab_size)
                    losses.append(training_loss(model, x, y, self.device, self.precision))
                sums.append(torch.stack(losses).mean().item())
        world = ranks.dist.world_size
        return {name: total / world for name, total in zip(names, ranks.sum(sums))}

    def val_loss(self, task: str = "evaluation", max_chars: int | None = None) -> tuple[float, int]:
        """Mean loss over the validation split in windows of block_size every self.stride characters, and
        the characters scored: all of them, shared out among ranks, or a fixed sample of them (the same on every rank)
        when the split has more than train.eval_max_chars (or max_chars) characters."""
        t, m, val = self.config.train, self.config.model, self.corpus.val
        limit = t.eval_max_chars if max_chars is None else (min(max_chars, t.eval_max_chars) if t.eval_max_chars
                                                            else max_chars)
        # Ranks share the split's windows out only where they do not overlap (each rank's slice then
        # scores exactly its own windows); overlapping windows are scored whole on every rank.
        share = None if self.stride != m.block_size or scoring_windows(len(val), m.block_size, m.block_size,
                                                                        limit).sampled \
            else self.ranks.share(len(val), m.block_size)
        ids = val if share is None else val[share[0]:share[1]]
        total, count = score_text(self.model, ids, m.block_size, self.stride, self.eval_batch(),
                                  self.device, self.precision, self.report, task, limit)
        if share is not None:
            total, count = self.ranks.sum([total, float(count)])
        return total / max(count, 1), int(count)

    # -- the periodic and the final evaluation ------------------------------------------------------
    def periodic(self) -> tuple[bool, float]:
        """The periodic evaluation, recorded: whether it is the best so far, and its validation loss."""
        t, corpus, state = self.config.train, self.corpus, self.state
        began = self.budget.now()
        losses = self.estimate()
        scope = f"{t.eval_iters} sampled batches"
        if t.eval_full:
            losses["val"], count = self.val_loss()
            scope = self.describe_scope(count, len(corpus.val))
        seconds = self.budget.now() - began
        state.periodic_eval_seconds = seconds
        state.eval_seconds += seconds
        self.budget.keep_for_estimate(self.estimate_seconds)
        is_best = losses["val"] < state.best_val
        state.best_val = min(state.best_val, losses["val"])
        state.evaluated_at = step = state.step
        self.periodic_val = losses["val"]
        if self.ranks.dist.is_main:
            rundir.append_metrics(self.run_dir, dict(kind="eval", step=step, train_loss=losses["train"],
                                                   val_loss=losses["val"], elapsed=self.budget.elapsed(),
                                                   scope="full" if t.eval_full else "sampled",
                                                   eval_seconds=state.eval_seconds))
        self.emit("eval", step, train_loss=losses["train"], val_loss=losses["val"], best_val_loss=state.best_val,
                  scope=scope, seconds=seconds, elapsed=self.budget.elapsed(), eval_seconds=state.eval_seconds)
        return is_best, losses["val"]

    def final(self) -> tuple[float, int, bool]:
        """Validation loss over the validation split (or its fixed sample), in its windows (self.stride),
        recorded: the loss, the characters scored, and whether these weights are the best checkpoint."""
        t, m, state, budget = self.config.train, self.config.model, self.state, self.budget
        began = budget.now()
        max_chars = None
        if budget.eval_fraction < 1.0:
            # A fixed sample of windows (as train.eval_max_chars draws) that fits the time budget.
            max_chars = max(self.MIN_FINAL_WINDOWS * m.block_size, round(budget.eval_fraction * self.val_windows().chars))
        loss, count = self.val_loss(task=FINAL_EVAL_TASK, max_chars=max_chars)
        seconds = budget.now() - began
        # The best checkpoint is chosen by one measure throughout, the periodic evaluations' (their
        # fixed sampled batches, or the whole split with eval_full), never this loss against theirs.
        if t.eval_full:
            candidate = loss
        elif state.evaluated_at == state.step:
            candidate = math.inf  # these weights were measured and saved at this step's evaluation
        elif budget.limited and self.ranks.any(budget.deadline - budget.now() < self.estimate_seconds):
            candidate = math.inf  # no time left to measure it as the best checkpoint is measured
        else:
            candidate = self.estimate(splits=("val",))["val"]
        state.eval_seconds += budget.now() - began
        # Nothing measured before it (no periodic evaluation ran): the final checkpoint is the best.
        is_best = candidate < state.best_val or not math.isfinite(state.best_val)
        state.best_val = min(state.best_val, candidate)
        self.final_on_best_measure = self.periodic_val if state.evaluated_at == state.step else candidate
        self._record_final(loss, count, self.final_on_best_measure, seconds)
        return loss, count, is_best

    def _record_final(self, loss: float, count: int, candidate: float, seconds: float) -> None:
        t, state, val_chars = self.config.train, self.state, len(self.corpus.val)
        if self.ranks.dist.is_main:
            record: dict[str, Any] = dict(kind="eval", step=state.step, val_loss=loss,
                                          scope="full" if count >= val_chars - 1 else "windows", chars_scored=count,
                                          val_chars=val_chars, elapsed=self.budget.elapsed(),
                                          eval_seconds=state.eval_seconds, final=True)
            if not t.eval_full and math.isfinite(candidate):
                record["sampled_val_loss"] = candidate  # the measure the best checkpoint is chosen by
            rundir.append_metrics(self.run_dir, record)
        self.emit("final_eval", state.step, val_loss=loss, bpc=bits_per_char(loss), tokens=count, seconds=seconds,
                  best_val_loss=state.best_val, val_chars=val_chars, scope=self.describe_scope(count, val_chars))
