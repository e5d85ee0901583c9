"""The training loop: optimizers, schedule, evaluation, checkpoints, signals, and torchrun (DDP).

The trainer never prints: it reports TrainEvents through a callback and returns a TrainResult.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from minigpt_cli import checkpoint as ckpt
from minigpt_cli.config import Config, UserError, absolute_data_path, apply_overrides, load_config
from minigpt_cli.batches import batch_indices, epoch_batch_indices, get_batch, scoring_windows
from minigpt_cli.corpus import Corpus, check_split_lengths, keep_in_run, load_corpus, run_copy
from minigpt_cli.device import Precision, autocast, detect_distributed, resolve_device, runtime
from minigpt_cli.model import GPT
from minigpt_cli.tokenizer import CharTokenizer, UnknownCharactersError, describe_chars
from minigpt_cli.optim import build_optimizers, lr_factor, set_lr
from minigpt_cli.progress import FINAL_EVAL_TASK, Progress
from minigpt_cli.scoring import bits_per_char, score_text

# Model keys a resumed run may change: they change training, not the model its weights are.
RESUMABLE_MODEL_KEYS = ("dropout",)
# Eval batches draw from generators keyed past any training micro-step, so they never overlap.
EVAL_STREAM = 1 << 30


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
    data_kept: str | None = None  # what the run keeps of its text, in words
    data_seconds: float = 0.0  # reading (hashing, encoding on a cache miss) the text before the first step
    data_cache: str = ""  # encoded: read and encoded now | cached: from the encoded cache | run: the run's copy
    vocab_size: int = 0  # a uniform guess over it scores ln(vocab_size): the loss of a model that knows nothing

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class TrainingStopped(Exception):
    """Ctrl-C or SIGTERM: the checkpoint was saved; the CLI exits with 128 + signal number."""

    def __init__(self, signum: int, result: TrainResult):
        super().__init__(f"stopped by {signal.Signals(signum).name} after step {result.steps}")
        self.signum = signum
        self.result = result


class NonFiniteLoss(Exception):
    def __init__(self, step: int, run_dir: Path):
        kept = (f"the last good checkpoint in {run_dir} is kept" if (run_dir / "latest.json").exists()
                else "no checkpoint had been saved yet")
        super().__init__(
            f"loss became non-finite at step {step}; stopped without saving it; {kept} "
            f"(try a lower train.learning_rate or train.grad_clip)"
        )
        self.step = step


class _SignalCatcher:
    """The first SIGINT/SIGTERM asks the loop to stop after the current step; a second exits at once."""

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
        # A repeat of the same signal exits at once: the last good checkpoint is whole on disk,
        # since every save is a rename into place. A different one (torchrun turns the Ctrl-C it
        # received into SIGTERM for its workers) does not cut the save short.
        if self.signum == signum:
            os._exit(128 + signum)
        first = not self.signum
        self.signum = self.signum or signum
        if first and self.on_first is not None:
            self.on_first(signum)

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def training_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor, device: torch.device,
                  precision: Precision) -> torch.Tensor:
    """Mean cross entropy of the next-token predictions for a batch x, y (B, T), under the run's autocast."""
    with autocast(device, precision):
        logits = model(x)  # (B, T, vocab_size)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), y.reshape(-1))


def apply_gradients(model: nn.Module, optimizers: Sequence[torch.optim.Optimizer],
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


@dataclass
class RunState:
    """What a run knows as it trains: the counters saved in every checkpoint (and restored on
    --resume), the time spent evaluating, and what the result reports about the run's text."""

    step: int = 0
    tokens: int = 0  # training tokens seen, over every invocation
    best_val: float = math.inf  # by the periodic evaluations' measure (see _final_eval)
    prior_seconds: float = 0.0  # training seconds of earlier invocations of a resumed run
    fingerprint: str = ""  # of the text trained on
    parent: dict[str, Any] | None = None  # the run --init-from started from
    eval_seconds: float = 0.0  # spent evaluating in this invocation
    periodic_eval_seconds: float | None = None  # the latest periodic evaluation's cost (None: none yet)
    evaluated_at: int | None = None  # the step of the latest periodic evaluation
    stopped: str | None = None  # why this invocation ended (None while it trains)
    saved_step: int | None = None  # the step of the newest checkpoint on disk (None: none yet)
    loop_start: tuple[float, int] = (0.0, 0)  # (time.perf_counter(), step) as the loop began
    val_chars: int = 0
    data_kept: str | None = None
    data_seconds: float = 0.0
    data_cache: str = ""

    def resume_from(self, step: int, meta: dict[str, Any]) -> None:
        """The counters of the checkpoint a resumed run continues from."""
        self.step = self.saved_step = step
        self.tokens = int(meta.get("tokens", 0))
        best = meta.get("best_val_loss")  # null until a first evaluation
        self.best_val = float(best) if isinstance(best, (int, float)) else math.inf
        self.prior_seconds = float(meta.get("train_seconds", 0.0))


class TimeBudget:
    """When to stop so that the whole command (start-up, training, final evaluation, saves) ends
    within train.time_budget seconds of the process's start.

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

    def __init__(self, budget: float, started_at: float, clock: Callable[[], float] = time.perf_counter):
        self.budget = budget
        self.deadline = started_at + budget
        self.clock = clock
        self.step_seconds: list[float] = []
        self.final_eval_seconds = 0.0
        self.eval_fraction = 1.0
        self.fixed_eval_seconds = 0.0
        self.save_seconds = 0.0
        self.loop_began = clock()

    def begin(self, final_eval_seconds: float, save_seconds: float, fixed_eval_seconds: float = 0.0) -> None:
        """The loop starts now; the whole-split final evaluation, one save, and the evaluation work
        that cannot be cut (the sampled batches the best checkpoint is chosen by) are expected to cost
        this much. A whole-split evaluation that would take more than FINAL_EVAL_SHARE of the time left
        is cut to a sample of its windows that fits (eval_fraction of them)."""
        self.save_seconds = save_seconds
        self.fixed_eval_seconds = fixed_eval_seconds
        self.loop_began = self.clock()
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
        left = self.left()
        if len(self.step_seconds) < self.MIN_STEPS:
            return left + self.GRACE < self.step_estimate()
        return left < self.step_estimate()

    def allows(self, seconds: float) -> bool:
        """Whether work of this many seconds (a periodic evaluation) still fits before the reserve."""
        return self.left() >= seconds + self.step_estimate()

    def progress(self) -> float:
        """How far through the training time the run is, 0 to 1 (the learning-rate schedule's clock)."""
        usable = self.deadline - self.reserve() - self.loop_began
        return (self.clock() - self.loop_began) / max(usable, 1e-9)


class Trainer:
    # The fewest windows a final evaluation cut to fit a time budget scores.
    MIN_FINAL_WINDOWS = 8

    def __init__(self, config: Config, run_dir: Path, resume: bool = False,
                 callback: Callable[[TrainEvent], None] | None = None, started_at: float | None = None,
                 clock: Callable[[], float] = time.perf_counter):
        self.clock = clock
        self.started_at = started_at if started_at is not None else clock()
        self.budget: TimeBudget | None = None
        self.estimate_seconds = 0.0  # under a time budget: what the sampled validation batches cost
        self.state = RunState()
        self.progress_step = 0
        self.config = config
        self.run_dir = Path(run_dir)
        self.resume = resume
        self.callback = callback or (lambda event: None)
        self.dist = detect_distributed()
        # Made by _set_up, inside runtime() (which chooses the device and precision):
        self.corpus: Corpus
        self.model: GPT
        self.train_model: nn.Module  # the model, or its compiled or DDP wrapper: what the steps call
        self.optimizers: list[torch.optim.Optimizer]
        self.scaler: torch.amp.GradScaler | None
        self.tokens_per_step: int

    def emit(self, kind: str, step: int, **data: Any) -> None:
        if self.dist.is_main:
            self.callback(TrainEvent(kind, step, data))

    def _report(self, progress: Progress) -> None:
        """Progress of long work inside the run (encoding the text, the final evaluation)."""
        self.emit("progress", self.progress_step, progress=progress)

    def _load_resume(self) -> ckpt.LoadedCheckpoint | None:
        if not self.resume:
            return None
        loaded = ckpt.load_checkpoint(self.run_dir, which="latest", with_train_state=True)
        saved = loaded.config.model
        # Dropout is a training setting (the weights and the function are the same model): it may change.
        differ = [f"model.{f.name}: run has {getattr(saved, f.name)!r}, config has {getattr(self.config.model, f.name)!r}"
                  for f in dataclasses.fields(saved)
                  if f.name not in RESUMABLE_MODEL_KEYS and getattr(saved, f.name) != getattr(self.config.model, f.name)]
        if differ:
            raise UserError("cannot resume with a different model; differing keys: " + "; ".join(differ))
        saved_world = int(loaded.train_state.get("world_size", 1))
        if saved_world * loaded.config.train.batch_size != self.dist.world_size * self.config.train.batch_size:
            raise UserError(
                f"cannot resume: the run used {saved_world} process(es) x batch {loaded.config.train.batch_size}, "
                f"now {self.dist.world_size} x {self.config.train.batch_size}; keep world_size * train.batch_size equal"
            )
        return loaded

    def _load_parent(self) -> ckpt.LoadedCheckpoint | None:
        """The run named by train.init_from, whose weights a new run starts from."""
        t = self.config.train
        if self.resume or not t.init_from:
            return None
        parent = ckpt.load_checkpoint(Path(t.init_from), which="best")
        saved, now = parent.config.model, self.config.model
        # Dropout is applied in training only and changes no weight; every other model key does.
        differ = [f"model.{f.name}: {parent.run_dir} has {getattr(saved, f.name)!r}, config has "
                  f"{getattr(now, f.name)!r}" for f in dataclasses.fields(saved)
                  if f.name != "dropout" and getattr(saved, f.name) != getattr(now, f.name)]
        if differ:
            raise UserError("--init-from needs the same model shape as the run it starts from; differing keys: "
                            + "; ".join(differ))
        return parent

    def _parent_corpus(self, parent: ckpt.LoadedCheckpoint) -> tuple[Corpus, list[str]]:
        """The new text in the parent's vocabulary; with extend_vocab, characters it lacks are added."""
        cfg = self.config
        try:
            corpus = load_corpus(cfg.data.path or None, cfg.data.val_fraction, parent.tokenizer,
                                 progress=self._report)
            return corpus, []
        except UnknownCharactersError as exc:
            if not cfg.train.extend_vocab:
                raise UserError(
                    f"the text has {len(exc.chars)} character(s) that {parent.run_dir}'s vocabulary lacks: "
                    f"{describe_chars(exc.chars)}; add --extend-vocab to give them new embedding and output "
                    f"rows, or remove them from the text") from None
            added = exc.chars
        tokenizer = CharTokenizer([*parent.tokenizer.chars, *added])
        corpus = load_corpus(cfg.data.path or None, cfg.data.val_fraction, tokenizer, progress=self._report)
        return corpus, added

    # -- the run --------------------------------------------------------------------------------
    def run(self) -> TrainResult:
        t, m = self.config.train, self.config.model
        # A training step's multiply-adds: threads as many as that work and the free CPUs allow.
        work = t.batch_size * m.block_size * 12 * m.n_layer * m.n_embd ** 2
        with runtime(t.device, t.dtype, seed=t.seed, deterministic=t.deterministic, work=work,
                     threads=t.num_threads, distributed=True) as rt:
            self.dist, self.device, self.device_reason, self.precision = rt.dist, rt.device, rt.device_reason, rt.precision
            # One writer per run: the lock is held until the last save, and refused at once to a second.
            with ckpt.RunLock(self.run_dir) if self.dist.is_main else contextlib.nullcontext():
                return self._run()

    def _run(self) -> TrainResult:
        """Set up, train, then save and evaluate the last weights: the whole run, top to bottom."""
        self._set_up()
        state = self.state
        if self.config.train.time_budget:
            self._start_budget()
        with _SignalCatcher() as signals:
            stopped = self._loop(signals)
            if stopped == "stop_after":
                return self._result(math.nan, 0, stopped)
            state.stopped = stopped
            if state.saved_step != state.step:
                # The trained weights are saved before the final evaluation (a while on a large split),
                # so a second Ctrl-C during it, which exits at once, loses no training.
                self._save(is_best=False)
            signals.on_first = self._finishing_notice
            final_loss, scored = self._final_eval()
            # A signal during the final evaluation: it finished and saved, so stop as a signal stops.
            # (Each rank's own signal: no collective is left to agree on, and none should run this
            # close to the process group's teardown.)
            signum = signals.signum
        result = self._result(final_loss, scored, stopped)
        if signum:
            result.stopped = "interrupted" if signum == signal.SIGINT else "terminated"
            raise TrainingStopped(signum, result)
        return result

    def _set_up(self) -> None:
        """The text, the model (new, resumed or grown from --init-from), its optimizers and the run's
        state, held on the trainer for the loop; the run's config and text written to its folder."""
        cfg, t = self.config, self.config.train
        loaded = self._load_resume()
        parent = self._load_parent()
        added: list[str] = []
        if parent is not None:
            corpus, added = self._parent_corpus(parent)
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

        model = self.model = GPT(cfg.model, corpus.tokenizer.vocab_size)
        if loaded:
            ckpt.load_weights(model, loaded.model_state, loaded.path / ckpt.MODEL_FILE)
        lineage = loaded.meta.get("parent") if loaded else None
        if parent is not None:
            weights = grow_vocabulary(parent.model_state, parent.tokenizer.chars, corpus.tokenizer.chars)
            ckpt.load_weights(model, weights, parent.path / ckpt.MODEL_FILE)
            lineage = {"run": str(parent.run_dir.resolve()), "checkpoint": str(parent.path.resolve()),
                       "step": parent.step, "config": parent.config.name, "added_chars": "".join(added)}
        model.to(self.device)
        self.optimizers = build_optimizers(model, t, self.device)
        state = self.state = RunState(fingerprint=corpus.fingerprint, parent=lineage, val_chars=len(corpus.val),
                                      data_seconds=corpus.seconds, data_cache=corpus.cache)
        if loaded:
            self._restore_train_state(loaded)
            state.resume_from(loaded.step, loaded.meta)
        state.data_kept = "nothing: the bundled text ships with minigpt" if not cfg.data.path else None
        if self.dist.is_main:
            # Resumed: drop records past the checkpoint. New: drop those of an attempt killed before its first save.
            ckpt.truncate_metrics(self.run_dir, state.step)
            # The bundled text ships with minigpt; any other is kept in the run (its encoded ids, linked
            # from the cache where possible), so the run needs nothing outside itself to be evaluated
            # or resumed. A run resumed on other text (--resume --data NEW) keeps the new text.
            if cfg.data.path:
                state.data_kept = keep_in_run(self.run_dir, corpus)
            written = cfg
            if cfg.data.path == "-" and run_copy(self.run_dir) is not None:
                # Text from stdin cannot be read again: the config names the run's copy of it instead.
                written = dataclasses.replace(cfg, data=dataclasses.replace(
                    cfg.data, path=str(run_copy(self.run_dir).resolve())))
            ckpt.save_config(self.run_dir, written)

        # What the steps run: the model, compiled and wrapped for DDP when asked (the same weights).
        self.train_model: torch.nn.Module = model
        if t.compile:
            self.train_model = torch.compile(model)
        if self.dist.enabled:
            from torch.nn.parallel import DistributedDataParallel

            self.train_model = DistributedDataParallel(
                self.train_model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        self.scaler = torch.amp.GradScaler("cuda") if self.precision.use_grad_scaler else None
        self.tokens_per_step = t.batch_size * cfg.model.block_size * t.grad_accum_steps * self.dist.world_size
        self.emit("start", state.step, n_params=model.num_parameters(), device=str(self.device),
                  device_reason=self.device_reason, precision=self.precision.name,
                  precision_reason=self.precision.reason, vocab_size=corpus.tokenizer.vocab_size,
                  train_chars=len(corpus.train), val_chars=len(corpus.val), source=corpus.source,
                  data_cache=corpus.cache, data_seconds=corpus.seconds, data_kept=state.data_kept,
                  val_scored=self._val_windows().chars,
                  max_iters=t.max_iters, tokens_per_step=self.tokens_per_step, time_budget=t.time_budget,
                  run_dir=str(self.run_dir), resumed_from=str(loaded.path) if loaded else None,
                  world_size=self.dist.world_size, seed=t.seed,
                  init_from=str(parent.run_dir) if parent else None, added_chars="".join(added))

    def _loop(self, signals: "_SignalCatcher") -> str:
        """Step until max_iters or the time budget; returns why it stopped. A signal saves and raises
        TrainingStopped; train.stop_after saves and returns "stop_after"."""
        t, state = self.config.train, self.state
        state.loop_start = last_log = (time.perf_counter(), state.step)
        while state.step < t.max_iters:
            if self.budget is not None and self._out_of_time():
                return "time_budget"
            time_share = self.budget.progress() if self.budget is not None else None
            lr = set_lr(self.optimizers, lr_factor(t, state.step, self._progress(state.step), time_share))
            step_began = self.clock()
            short = self._short_windows(state.step)
            loss = self._train_step(state.step, short)
            if self.budget is not None:
                self.budget.step_done(self.clock() - step_began)
            state.step += 1
            length, batch = self._windows(short)
            state.tokens += length * batch * t.grad_accum_steps * self.dist.world_size
            step = self.progress_step = state.step
            flags = self._agree([0.0 if math.isfinite(loss) else 1.0, float(signals.signum)])
            if flags[0]:
                raise NonFiniteLoss(step, self.run_dir)
            if step % t.log_interval == 0 or step == t.max_iters:
                now = time.perf_counter()
                rate = (step - last_log[1]) * self.tokens_per_step / max(now - last_log[0], 1e-9)
                last_log = (now, step)
                self._log(step, loss, lr, rate)
            if step % t.eval_interval == 0 and step < t.max_iters and self._eval_fits():
                self._periodic_eval()
            elif t.checkpoint_interval and step % t.checkpoint_interval == 0:
                self._save(is_best=False)
            if flags[1]:
                signum = int(flags[1])
                state.stopped = "interrupted" if signum == signal.SIGINT else "terminated"
                self._save(is_best=False)
                raise TrainingStopped(signum, self._result(math.nan, 0, state.stopped))
            if t.stop_after and step - state.loop_start[1] >= t.stop_after and step < t.max_iters:
                state.stopped = "stop_after"
                self._save(is_best=False)
                return "stop_after"
        return "max_iters"

    def _finishing_notice(self, signum: int) -> None:
        again = "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name
        self.emit("notice", self.progress_step, message=f"finishing the evaluation, {again} again to skip it "
                                                        f"(the trained weights are saved)")

    def _elapsed(self) -> float:
        return self.clock() - self.started_at

    def _windows(self, short: bool) -> tuple[int, int]:
        """Window length and windows per micro-batch: block_size and batch_size, or with train.short_windows
        half the length at twice the batch."""
        t, m = self.config.train, self.config.model
        return (m.block_size // 2, 2 * t.batch_size) if short else (m.block_size, t.batch_size)

    def _short_windows(self, step: int) -> bool:
        """Whether this step still reads the short windows of train.short_windows."""
        t = self.config.train
        if not t.short_windows:
            return False
        share = step / max(1, t.max_iters)
        if self.budget is not None:
            share = max(share, self.budget.progress())
            if self.dist.enabled:  # each rank's clock: agree, so that every rank reads the same length
                share = self._agree([share])[0]
        return share < t.short_windows

    def _progress(self, step: int) -> float:
        t = self.config.train
        by_steps = (step - t.warmup_iters) / max(1, t.max_iters - t.warmup_iters)
        if self.budget is None:
            return by_steps
        # Decay ends when the training time does: the budget less the final evaluation and saves.
        return max(by_steps, self.budget.progress())

    def _out_of_time(self) -> bool:
        assert self.budget is not None
        return self._agree([float(self.budget.out_of_time())])[0] > 0

    def _eval_batch(self) -> int:
        """Windows a whole-split evaluation scores at once."""
        return max(self.config.train.batch_size, 32)

    def _seconds_per_window(self) -> float:
        """Seconds to score one block_size window of validation text, from timing one batch of them
        as the final evaluation scores them, after the same batch untimed (the first forward pass
        at a shape pays for allocation and kernel choice). Timing 8 windows after 1 overestimated
        the default model's final evaluation by half and more: time a budget then left unused."""
        m, model = self.config.model, self.model
        batch = self._eval_batch()
        val = self.corpus.val
        sample = val[:min(len(val), batch * m.block_size + 1)]
        score_text(model, sample, m.block_size, m.block_size, batch, self.device, self.precision)
        began = self.clock()
        _, scored = score_text(model, sample, m.block_size, m.block_size, batch, self.device, self.precision)
        return (self.clock() - began) / max(1, math.ceil(scored / m.block_size))

    def _start_budget(self) -> None:
        t, m = self.config.train, self.config.model
        self.budget = TimeBudget(t.time_budget, self.started_at, self.clock)
        per_window = self.seconds_per_window = self._seconds_per_window()
        windows = max(1, math.ceil(self._val_windows().chars / m.block_size))
        # The sampled validation batches the best checkpoint is chosen by, scored again at the end: time
        # is kept for them once a checkpoint has been measured so (by a periodic evaluation, or before a
        # resume). Until then the final checkpoint is the only candidate, the best without a measure.
        self.estimate_seconds = 0.0 if t.eval_full else per_window * t.eval_iters * t.batch_size
        fixed = self.estimate_seconds if math.isfinite(self.state.best_val) else 0.0
        # Until a save is timed: the weights and two Adam moments, written at a modest 100 MB/s.
        save_guess = 0.1 + 12 * self.model.num_parameters() / 100e6
        self.budget.begin(per_window * windows, save_guess, fixed)

    def _eval_fits(self) -> bool:
        """Under a time budget, a periodic evaluation only where it leaves time for the final one
        (which measures the same weights more fully a moment later anyway)."""
        if self.budget is None:
            return True
        t, m = self.config.train, self.config.model
        cost = self.state.periodic_eval_seconds
        if cost is None:  # not yet timed: its batches (and the whole split with eval_full) at the measured rate
            windows = math.ceil(self._val_windows().chars / m.block_size) if t.eval_full else 0
            cost = self.seconds_per_window * (2 * t.eval_iters * t.batch_size + windows)
        if not self.budget.fixed_eval_seconds:
            cost += self.estimate_seconds  # after it, time is kept to measure the final checkpoint too
        return self._agree([float(self.budget.allows(cost))])[0] > 0

    def _agree(self, values: list[float]) -> list[float]:
        """One decision for every rank: the largest value any rank saw."""
        if not self.dist.enabled:
            return values
        import torch.distributed as dist

        tensor = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
        return tensor.tolist()

    def _train_step(self, step: int, short: bool = False) -> float:
        """One optimizer step over grad_accum_steps micro-batches; returns the mean loss (over ranks too).
        With `short`, windows of half the block size, twice as many (train.short_windows)."""
        t = self.config.train
        train_model, scaler = self.train_model, self.scaler
        train_model.train()
        total = torch.zeros((), device=self.device)
        length, batch = self._windows(short)
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
            sync = train_model.no_sync() if (self.dist.enabled and not last) else contextlib.nullcontext()
            with sync:
                loss = training_loss(train_model, x, y, self.device, self.precision) / t.grad_accum_steps
                (scaler.scale(loss) if scaler else loss).backward()
            total += loss.detach()
        apply_gradients(self.model, self.optimizers, scaler, t.grad_clip)
        value = total.item()
        if self.dist.enabled:
            value = self._mean(value)
        return value

    def _mean(self, value: float) -> float:
        import torch.distributed as dist

        tensor = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.all_reduce(tensor)
        return tensor.item() / self.dist.world_size

    def _log(self, step: int, loss: float, lr: float, rate: float) -> None:
        t = self.config.train
        elapsed = self._elapsed()
        if self.budget is not None:
            eta = max(0.0, self.budget.deadline - self.clock())
        else:
            began, first = self.state.loop_start
            eta = (time.perf_counter() - began) / max(1, step - first) * (t.max_iters - step)
        record = dict(kind="train", step=step, loss=loss, lr=lr, tokens_per_sec=rate, elapsed=elapsed,
                      tokens=self.state.tokens)
        if self.dist.is_main:
            ckpt.append_metrics(self.run_dir, record)
        self.emit("step", step, loss=loss, lr=lr, tokens_per_sec=rate, eta=eta, elapsed=elapsed,
                  tokens=self.state.tokens, max_iters=t.max_iters)

    def _estimate(self, splits: Sequence[str] = ("train", "val")) -> dict[str, float]:
        """Mean loss over eval_iters fixed batches of each split (the same batches every time)."""
        t, m, model, corpus = self.config.train, self.config.model, self.model, self.corpus
        out = {}
        model.eval()
        with torch.no_grad():
            for split_id, (name, ids) in enumerate((("train", corpus.train), ("val", corpus.val))):
                if name not in splits:
                    continue
                losses = []
                for i in range(t.eval_iters):
                    starts = batch_indices(len(ids), m.block_size, t.batch_size, t.seed, i, EVAL_STREAM + split_id,
                                           self.dist.rank, self.dist.world_size)
                    x, y = get_batch(ids, starts, m.block_size, self.device, corpus.tokenizer.vocab_size)
                    losses.append(training_loss(model, x, y, self.device, self.precision))
                out[name] = torch.stack(losses).mean().item()
        if self.dist.enabled:
            out = {k: self._mean(v) for k, v in out.items()}
        return out

    def _periodic_eval(self) -> None:
        t, corpus = self.config.train, self.corpus
        began = self.clock()
        losses = self._estimate()
        seconds = self.clock() - began
        scope = f"{t.eval_iters} sampled batches"
        if t.eval_full:
            losses["val"], count = self._full_val_loss(with_count=True)
            seconds = self.clock() - began
            scope = self.describe_scope(count, len(corpus.val))
        self.state.periodic_eval_seconds = seconds
        self.state.eval_seconds += seconds
        if self.budget is not None:
            self.budget.keep_for_estimate(self.estimate_seconds)
        is_best = losses["val"] < self.state.best_val
        self.state.best_val = min(self.state.best_val, losses["val"])
        self.state.evaluated_at = self.state.step
        step = self.state.step
        if self.dist.is_main:
            ckpt.append_metrics(self.run_dir, dict(kind="eval", step=step, train_loss=losses["train"],
                                                   val_loss=losses["val"], elapsed=self._elapsed(),
                                                   scope="full" if t.eval_full else "sampled",
                                                   eval_seconds=self.state.eval_seconds))
        self.emit("eval", step, train_loss=losses["train"], val_loss=losses["val"], best_val_loss=self.state.best_val,
                  scope=scope, seconds=seconds, elapsed=self._elapsed(), eval_seconds=self.state.eval_seconds)
        self._save(is_best=is_best, val_loss=losses["val"])

    def _val_windows(self):
        m = self.config.model
        return scoring_windows(len(self.corpus.val), m.block_size, m.block_size, self.config.train.eval_max_chars)

    def describe_scope(self, scored: int, val_chars: int) -> str:
        if scored >= val_chars - 1:
            return f"whole validation split, {scored:,} characters"
        if self.budget is not None and self.budget.eval_fraction < 1.0:
            return (f"{scored:,} characters sampled of {val_chars:,}: fixed windows, as many as the time budget "
                    f"leaves time for")
        return (f"{scored:,} characters sampled of {val_chars:,}: fixed windows; train.eval_max_chars=0 "
                f"scores the whole split")

    def _full_val_loss(self, with_count: bool = False, task: str = "evaluation", max_chars: int | None = None):
        """Mean loss over the validation split in non-overlapping block_size windows: all of them, or a
        fixed sample of them when the split has more than train.eval_max_chars (or max_chars) characters."""
        t, m = self.config.train, self.config.model
        limit = t.eval_max_chars if max_chars is None else (min(max_chars, t.eval_max_chars) if t.eval_max_chars
                                                            else max_chars)
        total, count = score_text(self.model, self.corpus.val, m.block_size, m.block_size, self._eval_batch(),
                                  self.device, self.precision, self._report, task, limit)
        loss = total / max(count, 1)
        if self.dist.enabled:
            loss = self._mean(loss)
        return (loss, count) if with_count else loss

    def _final_eval(self) -> tuple[float, int]:
        """Validation loss over the validation split (or its fixed sample), in non-overlapping windows."""
        t, m, corpus = self.config.train, self.config.model, self.corpus
        began = time.perf_counter()
        max_chars = None
        if self.budget is not None and self.budget.eval_fraction < 1.0:
            # A fixed sample of windows (as train.eval_max_chars draws) that fits the time budget.
            chars = round(self.budget.eval_fraction * self._val_windows().chars)
            max_chars = max(self.MIN_FINAL_WINDOWS * m.block_size, chars)
        loss, count = self._full_val_loss(with_count=True, task=FINAL_EVAL_TASK, max_chars=max_chars)
        seconds = time.perf_counter() - began
        # The best checkpoint is chosen by one measure throughout, the periodic evaluations' (their
        # fixed sampled batches, or the whole split with eval_full), never this loss against theirs.
        if t.eval_full:
            candidate = loss
        elif self.state.evaluated_at == self.state.step:
            candidate = math.inf  # these weights were measured and saved at this step's evaluation
        elif self.budget is not None and self._agree([float(self.budget.deadline - self.clock()
                                                             < self.estimate_seconds)])[0]:
            candidate = math.inf  # no time left to measure it as the best checkpoint is measured
        else:
            candidate = self._estimate(splits=("val",))["val"]
        self.state.eval_seconds += time.perf_counter() - began
        # Nothing measured before it (no periodic evaluation ran): the final checkpoint is the best.
        is_best = candidate < self.state.best_val or not math.isfinite(self.state.best_val)
        self.state.best_val = min(self.state.best_val, candidate)
        if self.dist.is_main:
            record = dict(kind="eval", step=self.state.step, val_loss=loss,
                          scope="full" if count >= len(corpus.val) - 1 else "windows", chars_scored=count,
                          val_chars=len(corpus.val), elapsed=self._elapsed(), eval_seconds=self.state.eval_seconds,
                          final=True)
            if not t.eval_full and math.isfinite(candidate):
                record["sampled_val_loss"] = candidate  # the measure the best checkpoint is chosen by
            ckpt.append_metrics(self.run_dir, record)
        self.emit("final_eval", self.state.step, val_loss=loss, bpc=bits_per_char(loss), tokens=count, seconds=seconds,
                  best_val_loss=self.state.best_val, val_chars=len(corpus.val),
                  scope=self.describe_scope(count, len(corpus.val)))
        self._save(is_best=is_best, val_loss=loss, final=True)
        return loss, count

    # -- checkpoints ----------------------------------------------------------------------------
    def _save(self, is_best: bool, val_loss: float | None = None, final: bool = False) -> None:
        model = self.model
        # An update can break the weights while the step's own loss was still finite: never save those.
        if not all(bool(torch.isfinite(p).all()) for p in model.parameters()):
            raise NonFiniteLoss(self.state.step, self.run_dir)
        began = self.clock()
        if self.dist.is_main:
            tensors, plain = self._train_state()
            meta = dict(step=self.state.step, tokens=self.state.tokens, best_val_loss=self.state.best_val,
                        val_loss=val_loss, data_fingerprint=self.state.fingerprint, device=str(self.device),
                        precision=self.precision.name, train_seconds=self.state.prior_seconds + self._elapsed(),
                        final=final, world_size=self.dist.world_size,
                        # why this invocation ended, for `minigpt runs` (None: a periodic save)
                        stopped=self.state.stopped)
            if self.state.parent:
                meta["parent"] = self.state.parent
            saved = ckpt.save_checkpoint(self.run_dir, model, self.config, self.corpus.tokenizer, meta,
                                         tensors, plain, is_best)
            self.emit("checkpoint", self.state.step, path=str(saved), is_best=is_best)
        self.state.saved_step = self.state.step
        if self.dist.enabled:
            import torch.distributed as dist

            dist.barrier()
        if self.budget is not None:
            self.budget.saved(self.clock() - began)

    def _train_state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        tensors = {"rng.torch": torch.get_rng_state()}
        if self.device.type == "cuda":
            tensors["rng.cuda"] = torch.cuda.get_rng_state(self.device)
        plain: dict[str, Any] = {"world_size": self.dist.world_size, "optimizers": []}
        for i, opt in enumerate(self.optimizers):
            opt_tensors, opt_plain = ckpt.flatten_optimizer(f"optimizer.{i}", opt.state_dict())
            tensors.update(opt_tensors)
            plain["optimizers"].append(opt_plain)
        return tensors, plain

    def _restore_train_state(self, loaded: ckpt.LoadedCheckpoint) -> None:
        optimizers = self.optimizers
        plain = loaded.train_state.get("optimizers", [])
        if len(plain) != len(optimizers):
            raise UserError(f"cannot resume: the checkpoint has {len(plain)} optimizer state(s) but train.optimizer "
                            f"'{self.config.train.optimizer}' needs {len(optimizers)}")
        for i, opt in enumerate(optimizers):
            saved = ckpt.unflatten_optimizer(f"optimizer.{i}", loaded.train_tensors, plain[i])
            # load_state_dict also restores the saved hyper-parameters; the config given now wins.
            settings = [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]
            try:
                opt.load_state_dict(saved)
            except (ValueError, KeyError, RuntimeError) as exc:
                raise UserError(f"cannot resume: optimizer state does not fit ({exc})") from None
            for group, values in zip(opt.param_groups, settings):
                group.update(values)
        if "rng.torch" in loaded.train_tensors and self.dist.world_size == int(loaded.train_state.get("world_size", 1)):
            torch.set_rng_state(loaded.train_tensors["rng.torch"])
        if "rng.cuda" in loaded.train_tensors and self.device.type == "cuda":
            torch.cuda.set_rng_state(loaded.train_tensors["rng.cuda"], self.device)

    def _result(self, final_loss: float, scored: int, stopped: str) -> TrainResult:
        wall, model = self._elapsed(), self.model
        return TrainResult(
            run_dir=str(self.run_dir), steps=self.state.step, tokens=self.state.tokens,
            best_val_loss=self.state.best_val, final_val_loss=final_loss,
            final_val_bpc=bits_per_char(final_loss) if math.isfinite(final_loss) else math.nan,
            wall_seconds=wall, train_seconds=wall - self.state.eval_seconds, eval_seconds=self.state.eval_seconds,
            stopped=stopped, device=str(self.device), precision=self.precision.name,
            n_params=model.num_parameters(), val_tokens_scored=scored, val_chars=self.state.val_chars,
            data_kept=self.state.data_kept, data_seconds=self.state.data_seconds, data_cache=self.state.data_cache,
            vocab_size=model.vocab_size)


def train(config: Config, run_dir: Path, resume: bool = False,
          callback: Callable[[TrainEvent], None] | None = None, started_at: float | None = None,
          clock: Callable[[], float] = time.perf_counter) -> TrainResult:
    return Trainer(config, run_dir, resume, callback, started_at, clock).run()


@dataclass
class TrainPlan:
    config: Config
    run_dir: Path
    note: str | None  # how the config was chosen when none was named
    created: bool  # the run folder was made now (removed again if the run saves nothing)


def plan_training(config_name: str | None, resume: bool, out_dir: Path | None, overrides: Sequence[str] = (),
                  data: str | None = None, time_budget: float | None = None, device: str | None = None,
                  seed: int | None = None, deterministic: bool = False, init_from: Path | None = None,
                  extend_vocab: bool = False) -> TrainPlan:
    """What `minigpt train` runs: the config (named, the run's own on --resume, the parent's with
    --init-from, or the default for the device), the options given on top of it, the text it reads
    (the run's kept copy on --resume unless other text is given; paths stored absolute), and the run
    folder (claimed new, or proven a run for --resume)."""
    run_dir = out_dir
    note = None
    flags = list(overrides)
    if init_from is not None:
        if resume:
            raise UserError("--resume continues a run and --init-from starts a new one: use one of them")
        # The parent's config unless one is given; fresh optimizer, schedule and records either way.
        parent = ckpt.load_checkpoint(init_from, which="best")
        config = load_config(config_name) if config_name else dataclasses.replace(
            parent.config, train=dataclasses.replace(parent.config.train, stop_after=0))
        flags += [f"train.init_from={Path(init_from).expanduser().resolve()}", f"train.extend_vocab={extend_vocab}"]
    elif extend_vocab:
        raise UserError("--extend-vocab goes with --init-from RUN (it adds characters to that run's vocabulary)")
    elif resume:
        run_dir, _ = ckpt.prepare_run_dir(out_dir, "", resume=True)
        if config_name is None:
            config = ckpt.load_checkpoint(run_dir, which="latest").config
            # stop_after pauses one invocation; it is not part of the recipe a plain --resume continues.
            config = dataclasses.replace(config, train=dataclasses.replace(config.train, stop_after=0))
        else:
            config = load_config(config_name)
    else:
        if config_name is None:
            config_name, note = default_config_name(device)
        config = load_config(config_name)
    copy = ckpt.run_text(run_dir) if resume else None
    if copy is not None and data is None and not any(f.strip().startswith("data.path=") for f in flags):
        data = str(copy)  # the run's own copy of the text it was trained on
    if data is not None:
        flags.append(f"data.path={absolute_data_path(data)}")
    for key, value in (("time_budget", time_budget), ("device", device), ("seed", seed)):
        if value is not None:
            flags.append(f"train.{key}={value}")
    config = apply_overrides(config, flags)
    if deterministic:
        config = dataclasses.replace(config, train=dataclasses.replace(config.train, deterministic=True))
    if not resume:
        config = dataclasses.replace(config, data=dataclasses.replace(
            config.data, path=absolute_data_path(config.data.path)))
    created = False
    if not resume:
        # Only the process that writes (rank 0 under torchrun) claims a directory.
        run_dir, created = ckpt.prepare_run_dir(out_dir, config.name, resume=False,
                                                claim=detect_distributed().is_main)
    return TrainPlan(config, Path(run_dir), note, created)


def default_config_name(device: str | None) -> tuple[str, str]:
    """With no CONFIG: the GPU recipe when the chosen device is a CUDA GPU, the CPU-sized default
    otherwise; and the note that says so."""
    choice = resolve_device(device or "auto")
    if choice.device.type == "cuda":
        return "shakespeare_char", "config shakespeare_char (the GPU recipe, since the device is a CUDA GPU)"
    return "default", f"config default (sized for {choice.device.type})"
