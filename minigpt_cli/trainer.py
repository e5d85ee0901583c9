"""The training loop: set up a run, step it (optimizers, schedule, signals, torchrun's DDP), then
evaluate and save the last weights. Evaluations are train_eval.py's, checkpoint state run_state.py's.

The trainer never prints: it reports TrainEvents through a callback and returns a TrainResult.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import nn

from minigpt_cli import checkpoint as ckpt
from minigpt_cli import rundir
from minigpt_cli.batches import batch_indices, epoch_batch_indices, get_batch
from minigpt_cli.budget import TimeBudget
from minigpt_cli.config import Config, TrainConfig, UserError, best_measure
from minigpt_cli.corpus import Corpus, check_split_lengths, load_corpus
from minigpt_cli.device import Precision, available_memory, detect_distributed, runtime
from minigpt_cli.model import GPT, training_bytes
from minigpt_cli.tokenizer import CharTokenizer, UnknownCharactersError, describe_chars
from minigpt_cli.optim import AnyOptimizer, build_optimizers, lr_factor, set_lr
from minigpt_cli.progress import Progress
from minigpt_cli.ranks import Ranks
from minigpt_cli.run_state import NonFiniteLoss, RunState, Saver, load_resume, model_differences, stopped_by
from minigpt_cli.scoring import bits_per_char
from minigpt_cli.train_eval import Evaluator, training_loss


@dataclass
class TrainEvent:
    kind: str  # start | step | eval | checkpoint | warning | notice | progress | final_eval
    step: int
    data: dict[str, Any] = field(default_factory=dict)


@dataclass
class TrainResult:
    run_dir: str
    steps: int
    tokens: int
    best_val_loss: float
    final_val_loss: float
    final_val_bpc: float
    wall_seconds: float
    train_seconds: float
    eval_seconds: float
    stopped: str  # max_iters | time_budget | stop_after | interrupted | terminated
    device: str
    precision: str
    n_params: int
    val_tokens_scored: int
    val_chars: int = 0  # characters in the validation split (val_tokens_scored is fewer when sampled)
    val_windows: str = ""  # the windows the final loss was scored in (train.eval_stride), in words
    val_stride: int = 0  # characters between those windows' starts where they overlap; 0: they do not
    data_kept: str | None = None  # what the run keeps of its text, in words
    data_seconds: float = 0.0  # reading (hashing, encoding on a cache miss) the text before the first step
    data_cache: str = ""  # encoded: read and encoded now | cached: from the encoded cache | run: the run's copy
    vocab_size: int = 0  # a uniform guess over it scores ln(vocab_size): the loss of a model that knows nothing
    prompt: str = ""  # the start of the run's own text, a prompt its vocabulary surely holds (the next: hint)
    # best_val_loss is measured as the periodic evaluations measure (best_measure), which is not how
    # final_val_loss is: final_on_best_measure is the final weights on best_measure, to compare with it.
    best_step: int | None = None  # the step of the checkpoint best.json names (what sample and eval load)
    best_measure: str = ""  # "20 sampled batches" or "whole validation split"
    final_on_best_measure: float = math.nan

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class TrainingStopped(Exception):
    """Ctrl-C or SIGTERM: the checkpoint was saved; the CLI exits with 128 + signal number."""

    def __init__(self, signum: int, result: TrainResult):
        super().__init__(f"stopped by {signal.Signals(signum).name} after step {result.steps}")
        self.signum = signum
        self.result = result



class SecondSignal(KeyboardInterrupt):
    """The same signal twice: stop at once, without finishing the step or saving. The last good
    checkpoint is whole on disk (every save is a rename into place). A KeyboardInterrupt, so that the
    CLI ends as on any Ctrl-C; exit with 128 + signum."""

    def __init__(self, signum: int):
        super().__init__(f"stopped at once by a second {signal.Signals(signum).name}")
        self.signum = signum


class _SignalCatcher:
    """The first SIGINT/SIGTERM asks the loop to stop after the current step; a second stops at once."""

    def __init__(self) -> None:
        self.signum = 0
        self._previous: dict[int, Any] = {}
        # Called with the signal's number on a first signal while set (during the final evaluation),
        # so the user learns why the command goes on and how to end it.
        self.on_first: Callable[[int], None] | None = None

    def __enter__(self) -> "_SignalCatcher":
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:
                pass  # not the main thread: leave signals alone
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        # A repeat of the same signal stops at once (SecondSignal). A different one (torchrun turns the Ctrl-C it
        # received into SIGTERM for its workers) does not cut the save short.
        if self.signum == signum:
            raise SecondSignal(signum)
        first = not self.signum
        self.signum = self.signum or signum
        if first and self.on_first is not None:
            self.on_first(signum)

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)



def apply_gradients(model: nn.Module, optimizers: Sequence[AnyOptimizer],
                    scaler: torch.amp.GradScaler | None, grad_clip: float) -> None:
    """After backward: unscale (float16), clip the global gradient norm, step every optimizer, clear."""
    if scaler:
        for opt in optimizers:
            scaler.unscale_(opt)
    if grad_clip:
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    for opt in optimizers:
        if scaler:
            scaler.step(opt)
        else:
            opt.step()
    if scaler:
        scaler.update()
    for opt in optimizers:
        opt.zero_grad(set_to_none=True)


def grow_vocabulary(state: dict[str, torch.Tensor], old_chars: Sequence[str],
                    new_chars: Sequence[str]) -> dict[str, torch.Tensor]:
    """Weights for a vocabulary with characters added (ids are sorted by character, so old ones may
    move): each old character keeps its embedding and output rows, at its new id. A new character's
    rows start as the mean of the old rows: an average input, and an average logit, so the loss on
    text without it is unchanged and its first appearances cost about as much as any character's."""
    if list(old_chars) == list(new_chars):
        return state
    at = {c: i for i, c in enumerate(new_chars)}
    index = torch.tensor([at[c] for c in old_chars])
    grown = dict(state)
    for key in ("wte.weight", "lm_head.weight"):  # (vocab_size, n_embd); lm_head is absent when tied
        if key in state:
            old = state[key]
            rows = old.mean(dim=0, keepdim=True).repeat(len(new_chars), 1)
            rows[index] = old
            grown[key] = rows
    return grown


def load_parent(config: Config) -> ckpt.LoadedCheckpoint:
    """The run named by train.init_from, whose weights a new run starts from."""
    parent = ckpt.load_checkpoint(Path(config.train.init_from), which="best")
    differ = model_differences(parent.config.model, config.model, str(parent.run_dir))
    if differ:
        raise UserError("--init-from needs the same model shape as the run it starts from; differing keys: "
                        + "; ".join(differ))
    return parent


def parent_corpus(config: Config, parent: ckpt.LoadedCheckpoint,
                  report: Callable[[Progress], None]) -> tuple[Corpus, list[str]]:
    """The new text in the parent's vocabulary; with extend_vocab, characters it lacks are added."""
    try:
        return load_corpus(config.data.path or None, config.data.val_fraction, parent.tokenizer, progress=report), []
    except UnknownCharactersError as exc:
        if not config.train.extend_vocab:
            raise UserError(
                f"the text has {len(exc.chars)} character(s) that {parent.run_dir}'s vocabulary lacks: "
                f"{describe_chars(exc.chars)}; add --extend-vocab to give them new embedding and output "
                f"rows, or remove them from the text") from None
        added = exc.chars
    tokenizer = CharTokenizer([*parent.tokenizer.chars, *added])
    return load_corpus(config.data.path or None, config.data.val_fraction, tokenizer, progress=report), added



def build_model(config: Config, corpus: Corpus, device: torch.device, loaded: ckpt.LoadedCheckpoint | None,
                parent: ckpt.LoadedCheckpoint | None, added: list[str]
                ) -> tuple[GPT, list[AnyOptimizer], dict[str, Any] | None]:
    """The model (its resumed weights, or the parent's grown to the new vocabulary) on the device, its
    optimizers, and the run's lineage (the run --init-from started from)."""
    model = GPT(config.model, corpus.tokenizer.vocab_size)
    lineage = loaded.meta.get("parent") if loaded else None
    if loaded:
        ckpt.load_weights(model, loaded.model_state, loaded.path / ckpt.MODEL_FILE)
    if parent is not None:
        weights = grow_vocabulary(parent.model_state, parent.tokenizer.chars, corpus.tokenizer.chars)
        ckpt.load_weights(model, weights, parent.path / ckpt.MODEL_FILE)
        lineage = {"run": str(parent.run_dir.resolve()), "checkpoint": str(parent.path.resolve()),
                   "step": parent.step, "config": parent.config.name, "added_chars": "".join(added)}
    model.to(device)
    return model, build_optimizers(model, config.train, device), lineage


def check_memory(config: Config, vocab_size: int, device: torch.device) -> None:
    """Refuse, before anything is allocated, a model whose training step needs more memory than the
    device has free: allocating it would take minutes before the kernel killed the process. Where
    the platform does not say what is free (None), nothing is checked."""
    free = available_memory(device)
    if free is None:
        return
    need = training_bytes(config.model, vocab_size, config.train.batch_size)  # counted on the meta device
    if need["total"] > free:
        raise UserError(
            f"the model is too big to train on {device.type}: it needs about {_size(need['total'])} (weights and "
            f"optimizer {_size(need['weights_and_optimizer'])}, activations {_size(need['activations'])}); "
            f"{_size(free)} free: try a smaller model.n_embd, n_layer or batch_size")


def _size(n: float) -> str:
    if n >= 10 * 2**30:
        return f"{n / 2**30:.0f} GiB"
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


# train.short_windows_auto: a budget that affords fewer steps than this reads short windows for the first
# AUTO_SHORT_SHARE of its time. Measured (benchmarks/README.md): at about 100-120 steps half the time in short
# windows lowered the whole-split loss by 0.01-0.05 on both seeds; at 1,000 steps it cost 0.006-0.009.
AUTO_SHORT_STEPS = 300
AUTO_SHORT_SHARE = 0.5
# A training step's cost in evaluation windows (a no-grad forward of one window, as the evaluator times one at
# the loop's start): forward, backward, the optimizer. Calibrated on the default config on 2 CPU cores: with
# 4.3 the notice of a 31 s budget said about 50 steps where 98-104 were taken (a third of them cheaper short
# steps), so a step costs about 2.5 of the windows timed then.
STEP_COST_PER_WINDOW = 2.5


def run_progress(t: TrainConfig, step: int, budget_progress: float | None) -> float:
    """The run's progress: by steps past the warm-up, or by the budget's (agreed) training time,
    whichever is further along, so that the decay ends when the training time does."""
    by_steps = (step - t.warmup_iters) / max(1, t.max_iters - t.warmup_iters)
    return by_steps if budget_progress is None else max(by_steps, budget_progress)


class Stepper:
    """One optimizer step, as training runs it: over grad_accum_steps micro-batches of this rank's
    windows, through the model wrapped for DDP and compiled when asked, under the run's precision."""

    def __init__(self, config: Config, model: GPT, corpus: Corpus, optimizers: Sequence[AnyOptimizer],
                 precision: Precision, ranks: Ranks):
        self.config, self.model, self.corpus, self.optimizers = config, model, corpus, optimizers
        self.precision, self.ranks, self.dist, self.device = precision, ranks, ranks.dist, ranks.device
        t = config.train
        # What the steps call: the model, wrapped for DDP and then compiled when asked (the same weights).
        # Compiling the DDP module lets the compiler split its graph at DDP's gradient buckets, so their
        # all-reduces overlap the backward pass; DDP around a compiled module cannot.
        self.ddp: nn.Module | None = None  # the DDP wrapper, whose no_sync skips gradient all-reduces
        self.train_model: nn.Module = model
        if self.dist.enabled:
            from torch.nn.parallel import DistributedDataParallel

            self.ddp = self.train_model = DistributedDataParallel(
                model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        if t.compile:
            self.train_model = torch.compile(self.train_model)
        self.scaler = torch.amp.GradScaler("cuda") if precision.use_grad_scaler else None
        self.tokens_per_step = t.batch_size * config.model.block_size * t.grad_accum_steps * self.dist.world_size
        self.short_share = 0.0  # set by choose_short_share under train.short_windows_auto

    def choose_short_share(self, budget: TimeBudget, seconds_per_window: float) -> float | None:
        """Under train.short_windows_auto (a time budget that governs, short_windows left to it): half
        the training in short windows when the budget affords fewer than AUTO_SHORT_STEPS steps, by a
        step's cost estimated from the final evaluation's timed window (about STEP_COST_PER_WINDOW of
        those per training window: forward, backward, optimizer). Every rank decides alike. Returns the
        steps afforded where it chose short windows, else None."""
        t = self.config.train
        if not (t.short_windows_auto and budget.limited) or t.short_windows or seconds_per_window <= 0:
            return None
        step = STEP_COST_PER_WINDOW * t.batch_size * t.grad_accum_steps * seconds_per_window
        affordable = max(0.0, budget.deadline - budget.reserve() - budget.now()) / step
        if not self.ranks.all(affordable < AUTO_SHORT_STEPS):
            return None
        self.short_share = AUTO_SHORT_SHARE
        return affordable

    def windows(self, short: bool) -> tuple[int, int]:
        """Window length and windows per micro-batch: block_size and batch_size, or with train.short_windows
        half the length at twice the batch."""
        t, m = self.config.train, self.config.model
        return (m.block_size // 2, 2 * t.batch_size) if short else (m.block_size, t.batch_size)

    def short_windows(self, step: int, budget_progress: float | None) -> bool:
        """Whether this step still reads the short windows of train.short_windows (or of the share the
        time budget chose, self.short_share)."""
        t = self.config.train
        share = t.short_windows or self.short_share
        return bool(share) and max(step / max(1, t.max_iters), budget_progress or 0.0) < share

    def step(self, step: int, short: bool = False) -> torch.Tensor:
        """One optimizer step over grad_accum_steps micro-batches; returns the loss on the device (this
        rank's, the mean over micro-batches), left unread so that the step needs no host sync.
        With `short`, windows of half the block size, twice as many (train.short_windows)."""
        t = self.config.train
        train_model, scaler = self.train_model, self.scaler
        train_model.train()
        total = torch.zeros((), device=self.device)
        length, batch = self.windows(short)
        for micro in range(t.grad_accum_steps):
            if t.sampling == "epochs":
                starts = epoch_batch_indices(len(self.corpus.train), length, batch, t.seed, step, micro,
                                             self.dist.rank, self.dist.world_size, t.grad_accum_steps)
            else:
                starts = batch_indices(len(self.corpus.train), length, batch, t.seed, step, micro,
                                       self.dist.rank, self.dist.world_size)
            x, y = get_batch(self.corpus.train, starts, length, self.device, self.corpus.tokenizer.vocab_size)
            last = micro == t.grad_accum_steps - 1
            # Under DDP, gradients are all-reduced only after the last micro-step.
            sync = self.ddp.no_sync() if (self.ddp is not None and not last) else contextlib.nullcontext()
            with sync:
                loss = training_loss(train_model, x, y, self.device, self.precision) / t.grad_accum_steps
                (scaler.scale(loss) if scaler else loss).backward()
            total += loss.detach()
        apply_gradients(self.model, self.optimizers, scaler, t.grad_clip)
        return total


class Trainer:
    """One invocation of a run: set up, the loop, then the final evaluation and save. The time budget
    (and the clock) is self.budget's; what ranks agree on is self.ranks'."""

    def __init__(self, config: Config, run_dir: Path, resume: bool = False,
                 callback: Callable[[TrainEvent], None] | None = None, started_at: float | None = None,
                 clock: Callable[[], float] = time.perf_counter):
        self.config, self.run_dir, self.resume = config, Path(run_dir), resume
        self.callback = callback or (lambda event: None)
        # The clock every measurement in the run reads; the budget counts from the process's start.
        self.budget = TimeBudget(config.train.time_budget, started_at if started_at is not None else clock(), clock)
        self.state = RunState()
        self.reported_step = 0  # the step that reports of long work (the final evaluation) carry
        self.dist = detect_distributed()
        # Made by _set_up, inside runtime() (which chooses the device and precision):
        self.ranks: Ranks
        self.corpus: Corpus
        self.model: GPT
        self.optimizers: list[AnyOptimizer]
        self.saver: Saver  # what a save writes
        self.evaluator: Evaluator  # the evaluations and what they cost
        self.stepper: Stepper  # an optimizer step

    def emit(self, kind: str, step: int, **data: Any) -> None:
        if self.dist.is_main:
            self.callback(TrainEvent(kind, step, data))

    def _report(self, progress: Progress) -> None:
        """Reports of long work inside the run (encoding the text, the final evaluation)."""
        self.emit("progress", self.reported_step, progress=progress)

    # -- the run: set up, loop, finish ------------------------------------------------------------
    def run(self) -> TrainResult:
        t, m = self.config.train, self.config.model
        # A training step's multiply-adds: threads as many as that work and the free CPUs allow.
        work = t.batch_size * m.block_size * 12 * m.n_layer * m.n_embd ** 2
        with runtime(t.device, t.dtype, seed=t.seed, deterministic=t.deterministic, work=work,
                     threads=t.num_threads, distributed=True, compile=t.compile) as rt:
            self.dist, self.device, self.device_reason, self.precision = rt.dist, rt.device, rt.device_reason, rt.precision
            self.ranks = Ranks(rt.dist, rt.device)
            # One writer per run: the lock is held until the last save, and refused at once to a second.
            with rundir.RunLock(self.run_dir) if self.dist.is_main else contextlib.nullcontext():
                return self._run()

    def _run(self) -> TrainResult:
        """Set up, train, then save and evaluate the last weights: the whole run, top to bottom."""
        self._set_up()
        self.evaluator.start_budget()
        affordable = self.stepper.choose_short_share(self.budget, self.evaluator.seconds_per_window)
        if affordable is not None:
            self.emit("notice", self.state.step, message=(
                f"the time budget affords about {affordable:,.0f} steps: the first half reads windows of "
                f"{self.config.model.block_size // 2} at twice the batch (set train.short_windows=0 to keep "
                f"full windows)"))
        with _SignalCatcher() as signals:
            try:
                stopped = self._loop(signals)
                if stopped == "stop_after":
                    return self._result(math.nan, 0, stopped)
                final_loss, scored = self._finish(stopped, signals)
            except SecondSignal as second:
                # No save follows a second signal: the newest checkpoint records how the run ended.
                self.saver.mark_stopped(second.signum)
                raise
            # A signal during the final evaluation: it finished and saved, so stop as a signal stops.
            # (Each rank's own signal: no collective is left to agree on, and none should run this
            # close to the process group's teardown.)
            signum = signals.signum
        result = self._result(final_loss, scored, stopped)
        if signum:
            result.stopped = stopped_by(signum)
            raise TrainingStopped(signum, result)
        return result

    def _set_up(self) -> None:
        """The text, the model (new, resumed or grown from --init-from), its optimizers and the run's
        state, held on the trainer for the loop; the run's config and text written to its folder."""
        cfg = self.config
        loaded = load_resume(cfg, self.run_dir, self.dist.world_size) if self.resume else None
        parent = load_parent(cfg) if not self.resume and cfg.train.init_from else None
        added: list[str] = []
        if parent is not None:
            corpus, added = parent_corpus(cfg, parent, self._report)
        else:
            corpus = load_corpus(cfg.data.path or None, cfg.data.val_fraction, loaded.tokenizer if loaded else None,
                                 progress=self._report)
        check_split_lengths(corpus, cfg.model.block_size)
        if loaded and loaded.meta.get("data_fingerprint") not in (None, corpus.fingerprint):
            self.emit("warning", loaded.step, message=(
                f"the data differs from the data this run was trained on (fingerprint "
                f"{loaded.meta['data_fingerprint'][:12]} vs {corpus.fingerprint[:12]}); continuing on the new "
                f"data. To keep runs apart, train a new run with a different --out instead of --resume."))
        self.corpus = corpus
        check_memory(cfg, corpus.tokenizer.vocab_size, self.device)
        self.model, self.optimizers, lineage = build_model(cfg, corpus, self.device, loaded, parent, added)
        self.state = RunState(fingerprint=corpus.fingerprint, parent=lineage, val_chars=len(corpus.val),
                              data_seconds=corpus.seconds, data_cache=corpus.cache)
        self.saver = Saver(cfg, self.run_dir, self.model, corpus, self.optimizers, self.precision, self.ranks,
                           self.budget, self.state, self.emit)
        self.evaluator = Evaluator(cfg, self.run_dir, corpus, self.model, self.precision, self.ranks, self.budget,
                                   self.state, self.emit, self._report)
        if loaded:
            self.saver.restore(loaded)
        self.saver.write_run()
        self.stepper = Stepper(cfg, self.model, corpus, self.optimizers, self.precision, self.ranks)
        self._emit_start(loaded, parent, added)

    def _emit_start(self, loaded: ckpt.LoadedCheckpoint | None, parent: ckpt.LoadedCheckpoint | None,
                    added: list[str]) -> None:
        t, corpus = self.config.train, self.corpus
        self.emit("start", self.state.step, n_params=self.model.num_parameters(), device=str(self.device),
                  device_reason=self.device_reason, precision=self.precision.name,
                  precision_reason=self.precision.reason, vocab_size=corpus.tokenizer.vocab_size,
                  train_chars=len(corpus.train), val_chars=len(corpus.val), source=corpus.source,
                  data_cache=corpus.cache, data_seconds=corpus.seconds, data_kept=self.state.data_kept,
                  val_scored=self.evaluator.val_windows().chars,
                  max_iters=t.max_iters, tokens_per_step=self.stepper.tokens_per_step, time_budget=t.time_budget,
                  run_dir=str(self.run_dir), resumed_from=str(loaded.path) if loaded else None,
                  world_size=self.dist.world_size, seed=t.seed,
                  init_from=str(parent.run_dir) if parent else None, added_chars="".join(added))

    def _loop(self, signals: "_SignalCatcher") -> str:
        """Step until max_iters or the time budget; returns why it stopped. A signal saves and raises
        TrainingStopped; train.stop_after saves and returns "stop_after"."""
        t, state, budget = self.config.train, self.state, self.budget
        state.loop_first_step = last_log_step = state.step
        last_log_time = budget.now()
        agreed = self.ranks.agree(budget, signals.signum)
        while state.step < t.max_iters and not agreed.out_of_time:
            # schedule
            lr = set_lr(self.optimizers, lr_factor(t, state.step, run_progress(t, state.step, agreed.progress),
                                                   agreed.progress))
            short = self.stepper.short_windows(state.step, agreed.progress)
            # forward, backward and step
            step_began = budget.now()
            loss_sum = self.stepper.step(state.step, short)
            budget.step_done(budget.now() - step_began)
            length, batch = self.stepper.windows(short)
            state.tokens += length * batch * t.grad_accum_steps * self.dist.world_size
            step = self.reported_step = state.step = state.step + 1
            log = step % t.log_interval == 0 or step == t.max_iters
            # The loss is read (a host sync) to be logged, or checked before an evaluation or save, and
            # under a time budget, whose step times must include the device's work; otherwise the
            # steps between run on without waiting for the device.
            agreed = self.ranks.agree(budget, signals.signum, loss_sum,
                                      read_loss=log or budget.limited or self._due(step))
            if agreed.loss is not None and not math.isfinite(agreed.loss):
                raise NonFiniteLoss(step, self.run_dir)
            # log
            if log:
                now = budget.now()
                self._log(step, agreed.loss, lr, (step - last_log_step) * self.stepper.tokens_per_step
                          / max(now - last_log_time, 1e-9))
                last_log_step, last_log_time = step, now
            # evaluate, save; both take time the budget's verdict above did not see
            if self._evaluate_or_save(step):
                agreed = self.ranks.agree(budget, agreed.signum)
            stop = self._stop_early(step, agreed.signum)
            if stop:
                return stop
        return "max_iters" if state.step >= t.max_iters else "time_budget"

    def _due(self, step: int) -> bool:
        """Whether an evaluation or a checkpoint may come after this step."""
        t = self.config.train
        return step % t.eval_interval == 0 or bool(t.checkpoint_interval and step % t.checkpoint_interval == 0)

    def _evaluate_or_save(self, step: int) -> bool:
        """The periodic evaluation (and save) or checkpoint due after this step; whether one ran."""
        t = self.config.train
        if step % t.eval_interval == 0 and step < t.max_iters and self.evaluator.fits():
            is_best, val_loss = self.evaluator.periodic()
            self.saver.save(is_best=is_best, val_loss=val_loss)
            return True
        if t.checkpoint_interval and step % t.checkpoint_interval == 0:
            self.saver.save(is_best=False)
            return True
        return False

    def _stop_early(self, step: int, signum: int) -> str | None:
        """A signal saves and raises TrainingStopped; train.stop_after saves and returns "stop_after"."""
        t, state = self.config.train, self.state
        if signum:
            state.stopped = stopped_by(signum)
            self.saver.save(is_best=False)
            raise TrainingStopped(signum, self._result(math.nan, 0, state.stopped))
        if t.stop_after and step - state.loop_first_step >= t.stop_after and step < t.max_iters:
            state.stopped = "stop_after"
            self.saver.save(is_best=False)
            return "stop_after"
        return None

    def _finish(self, stopped: str, signals: "_SignalCatcher") -> tuple[float, int]:
        """The trained weights saved, then the final evaluation (and its save)."""
        state = self.state
        state.stopped = stopped
        if state.saved_step != state.step:
            # The trained weights are saved before the final evaluation (a while on a large split),
            # so a second Ctrl-C during it, which stops at once, loses no training.
            self.saver.save(is_best=False)
        signals.on_first = self._finishing_notice
        loss, count, is_best = self.evaluator.final()
        self.saver.finish(is_best, loss)
        return loss, count

    def _finishing_notice(self, signum: int) -> None:
        again = "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name
        self.emit("notice", self.reported_step, message=f"finishing the evaluation, {again} again to skip it "
                                                        f"(the trained weights are saved)")

    def _log(self, step: int, loss: float, lr: float, rate: float) -> None:
        t, elapsed = self.config.train, self.budget.elapsed()
        eta = self.budget.eta(step, t.max_iters)
        if self.dist.is_main:
            rundir.append_metrics(self.run_dir, dict(kind="train", step=step, loss=loss, lr=lr, tokens_per_sec=rate,
                                                   elapsed=elapsed, tokens=self.state.tokens))
        self.emit("step", step, loss=loss, lr=lr, tokens_per_sec=rate, eta=eta, elapsed=elapsed,
                  tokens=self.state.tokens, max_iters=t.max_iters)

    def _result(self, final_loss: float, scored: int, stopped: str) -> TrainResult:
        wall, model, state = self.budget.elapsed(), self.model, self.state
        return TrainResult(
            run_dir=str(self.run_dir), steps=state.step, tokens=state.tokens,
            best_val_loss=state.best_val, final_val_loss=final_loss,
            final_val_bpc=bits_per_char(final_loss) if math.isfinite(final_loss) else math.nan,
            wall_seconds=wall, train_seconds=wall - state.eval_seconds, eval_seconds=state.eval_seconds,
            stopped=stopped, device=str(self.device), precision=self.precision.name,
            n_params=model.num_parameters(), val_tokens_scored=scored, val_chars=state.val_chars,
            data_kept=state.data_kept, data_seconds=state.data_seconds, data_cache=state.data_cache,
            vocab_size=model.vocab_size, prompt=opening_words(self.corpus),
            best_step=rundir.pointer_step(self.run_dir, "best"),
            best_measure=best_measure(self.config.train.eval_full, self.config.train.eval_iters),
            final_on_best_measure=self.evaluator.final_on_best_measure,
            val_windows=self.evaluator.windows_measure(),
            val_stride=0 if self.evaluator.stride == self.config.model.block_size else self.evaluator.stride)


def opening_words(corpus: Corpus, max_chars: int = 20) -> str:
    """The first words of the text's first line (at most max_chars, cut at a space): a prompt made of
    characters the model knows, whatever text it was trained on."""
    text = corpus.tokenizer.decode(corpus.train[:4 * max_chars].tolist())
    line = next((line.strip() for line in text.splitlines() if line.strip()), "")
    if len(line) > max_chars:
        cut = line[:max_chars].rfind(" ")
        line = line[:cut if cut > 0 else max_chars]
    return line


def train(config: Config, run_dir: Path, resume: bool = False,
          callback: Callable[[TrainEvent], None] | None = None, started_at: float | None = None,
          clock: Callable[[], float] = time.perf_counter) -> TrainResult:
    return Trainer(config, run_dir, resume, callback, started_at, clock).run()
