"""The training loop: optimizers, schedule, evaluation, checkpoints, signals, and torchrun (DDP).

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
import torch.nn.functional as F
from torch import nn

from minigpt_cli import checkpoint as ckpt
from minigpt_cli.batches import batch_indices, epoch_batch_indices, get_batch, scoring_windows
from minigpt_cli.budget import TimeBudget
from minigpt_cli.config import Config, UserError, absolute_data_path, apply_overrides, load_config, option_overrides
from minigpt_cli.corpus import Corpus, check_split_lengths, keep_in_run, load_corpus, run_copy
from minigpt_cli.device import Precision, autocast, detect_distributed, resolve_device, runtime
from minigpt_cli.model import GPT
from minigpt_cli.tokenizer import CharTokenizer, UnknownCharactersError, describe_chars
from minigpt_cli.optim import build_optimizers, lr_factor, set_lr
from minigpt_cli.progress import FINAL_EVAL_TASK, Progress
from minigpt_cli.ranks import Ranks
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
    loop_first_step: int = 0  # the step this invocation's loop began at
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


def load_resume(config: Config, run_dir: Path, world_size: int) -> ckpt.LoadedCheckpoint:
    """The latest checkpoint of the run --resume continues, refused where the model or the global batch differ."""
    loaded = ckpt.load_checkpoint(run_dir, which="latest", with_train_state=True)
    saved = loaded.config.model
    # Dropout is a training setting (the weights and the function are the same model): it may change.
    differ = [f"model.{f.name}: run has {getattr(saved, f.name)!r}, config has {getattr(config.model, f.name)!r}"
              for f in dataclasses.fields(saved)
              if f.name not in RESUMABLE_MODEL_KEYS and getattr(saved, f.name) != getattr(config.model, f.name)]
    if differ:
        raise UserError("cannot resume with a different model; differing keys: " + "; ".join(differ))
    saved_world = int(loaded.train_state.get("world_size", 1))
    if saved_world * loaded.config.train.batch_size != world_size * config.train.batch_size:
        raise UserError(
            f"cannot resume: the run used {saved_world} process(es) x batch {loaded.config.train.batch_size}, "
            f"now {world_size} x {config.train.batch_size}; keep world_size * train.batch_size equal"
        )
    return loaded


def load_parent(config: Config) -> ckpt.LoadedCheckpoint:
    """The run named by train.init_from, whose weights a new run starts from."""
    parent = ckpt.load_checkpoint(Path(config.train.init_from), which="best")
    saved, now = parent.config.model, config.model
    # Dropout is applied in training only and changes no weight; every other model key does.
    differ = [f"model.{f.name}: {parent.run_dir} has {getattr(saved, f.name)!r}, config has "
              f"{getattr(now, f.name)!r}" for f in dataclasses.fields(saved)
              if f.name != "dropout" and getattr(saved, f.name) != getattr(now, f.name)]
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


def rng_states(device: torch.device) -> dict[str, torch.Tensor]:
    """This process's random states: its dropout masks' streams."""
    states = {"rng.torch": torch.get_rng_state()}
    if device.type == "cuda":
        states["rng.cuda"] = torch.cuda.get_rng_state(device)
    return states


def restore_rng(loaded: ckpt.LoadedCheckpoint, device: torch.device, rank: int, world_size: int, seed: int) -> None:
    """This rank's own random streams as saved (rank 0's as rng.torch, rank r's as rng.torch.r); where
    the checkpoint lacks them (another world size, or saved before ranks' states were kept), a stream
    of the rank's own from seed, rank and step: never another rank's, whose dropout masks it would repeat."""
    import numpy as np

    tensors, suffix = loaded.train_tensors, f".{rank}" if rank else ""
    same_world = world_size == int(loaded.train_state.get("world_size", 1))
    derived = np.random.SeedSequence([seed, rank, loaded.step]).generate_state(2)
    if same_world and f"rng.torch{suffix}" in tensors:
        torch.set_rng_state(tensors[f"rng.torch{suffix}"])
    elif rank:
        torch.manual_seed(int(derived[0]))
    if device.type == "cuda":
        if same_world and f"rng.cuda{suffix}" in tensors:
            torch.cuda.set_rng_state(tensors[f"rng.cuda{suffix}"], device)
        elif rank:
            torch.cuda.manual_seed(int(derived[1]))


def restore_optimizers(optimizers: Sequence[torch.optim.Optimizer], loaded: ckpt.LoadedCheckpoint,
                       optimizer_name: str) -> None:
    plain = loaded.train_state.get("optimizers", [])
    if len(plain) != len(optimizers):
        raise UserError(f"cannot resume: the checkpoint has {len(plain)} optimizer state(s) but train.optimizer "
                        f"'{optimizer_name}' needs {len(optimizers)}")
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


def train_state(optimizers: Sequence[torch.optim.Optimizer], rng: Sequence[dict[str, torch.Tensor]]
                ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """What a checkpoint keeps besides the weights: every rank's random states (rng: in rank order)
    and the optimizers' state."""
    tensors = {(key if rank == 0 else f"{key}.{rank}"): value
               for rank, states in enumerate(rng) for key, value in states.items()}
    plain: dict[str, Any] = {"world_size": len(rng), "optimizers": []}
    for i, opt in enumerate(optimizers):
        opt_tensors, opt_plain = ckpt.flatten_optimizer(f"optimizer.{i}", opt.state_dict())
        tensors.update(opt_tensors)
        plain["optimizers"].append(opt_plain)
    return tensors, plain


class Trainer:
    """One invocation of a run: set up, the loop, then the final evaluation and save. The time budget
    (and the clock) is self.budget's; what ranks agree on is self.ranks'."""

    # The fewest windows a final evaluation cut to fit a time budget scores.
    MIN_FINAL_WINDOWS = 8

    def __init__(self, config: Config, run_dir: Path, resume: bool = False,
                 callback: Callable[[TrainEvent], None] | None = None, started_at: float | None = None,
                 clock: Callable[[], float] = time.perf_counter):
        self.config = config
        self.run_dir = Path(run_dir)
        self.resume = resume
        self.callback = callback or (lambda event: None)
        # Unlimited until _start_budget: the clock every measurement in the run reads.
        self.budget = TimeBudget(None, started_at if started_at is not None else clock(), clock)
        self.estimate_seconds = 0.0  # under a time budget: what the sampled validation batches cost
        self.seconds_per_window = 0.0
        self.state = RunState()
        self.reported_step = 0  # the step that reports of long work (the final evaluation) carry
        self.dist = detect_distributed()
        # Made by _set_up, inside runtime() (which chooses the device and precision):
        self.ranks: Ranks
        self.corpus: Corpus
        self.model: GPT
        self.train_model: nn.Module  # the model, or its DDP and compiled wrapper: what the steps call
        self.ddp: nn.Module | None  # the DDP wrapper, whose no_sync skips gradient all-reduces
        self.optimizers: list[torch.optim.Optimizer]
        self.scaler: torch.amp.GradScaler | None
        self.tokens_per_step: int

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
            with ckpt.RunLock(self.run_dir) if self.dist.is_main else contextlib.nullcontext():
                return self._run()

    def _run(self) -> TrainResult:
        """Set up, train, then save and evaluate the last weights: the whole run, top to bottom."""
        self._set_up()
        self._start_budget()
        with _SignalCatcher() as signals:
            stopped = self._loop(signals)
            if stopped == "stop_after":
                return self._result(math.nan, 0, stopped)
            final_loss, scored = self._finish(stopped, signals)
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
        model = self.model = GPT(cfg.model, corpus.tokenizer.vocab_size)
        lineage = loaded.meta.get("parent") if loaded else None
        if loaded:
            ckpt.load_weights(model, loaded.model_state, loaded.path / ckpt.MODEL_FILE)
        if parent is not None:
            weights = grow_vocabulary(parent.model_state, parent.tokenizer.chars, corpus.tokenizer.chars)
            ckpt.load_weights(model, weights, parent.path / ckpt.MODEL_FILE)
            lineage = {"run": str(parent.run_dir.resolve()), "checkpoint": str(parent.path.resolve()),
                       "step": parent.step, "config": parent.config.name, "added_chars": "".join(added)}
        model.to(self.device)
        self.optimizers = build_optimizers(model, cfg.train, self.device)
        self.state = RunState(fingerprint=corpus.fingerprint, parent=lineage, val_chars=len(corpus.val),
                              data_seconds=corpus.seconds, data_cache=corpus.cache)
        if loaded:
            restore_optimizers(self.optimizers, loaded, cfg.train.optimizer)
            restore_rng(loaded, self.device, self.dist.rank, self.dist.world_size, cfg.train.seed)
            self.state.resume_from(loaded.step, loaded.meta)
        self._write_run()
        self._wrap_model()
        self._emit_start(loaded, parent, added)

    def _write_run(self) -> None:
        """The run's folder, by the main rank: metrics past the checkpoint dropped, the text kept, the config."""
        cfg, state = self.config, self.state
        state.data_kept = "nothing: the bundled text ships with minigpt" if not cfg.data.path else None
        if not self.dist.is_main:
            return
        # Resumed: drop records past the checkpoint. New: drop those of an attempt killed before its first save.
        ckpt.truncate_metrics(self.run_dir, state.step)
        # The bundled text ships with minigpt; any other is kept in the run (its encoded ids, linked
        # from the cache where possible), so the run needs nothing outside itself to be evaluated
        # or resumed. A run resumed on other text (--resume --data NEW) keeps the new text.
        if cfg.data.path:
            state.data_kept = keep_in_run(self.run_dir, self.corpus)
        written = cfg
        if cfg.data.path == "-" and run_copy(self.run_dir) is not None:
            # Text from stdin cannot be read again: the config names the run's copy of it instead.
            written = dataclasses.replace(cfg, data=dataclasses.replace(
                cfg.data, path=str(run_copy(self.run_dir).resolve())))
        ckpt.save_config(self.run_dir, written)

    def _wrap_model(self) -> None:
        """What the steps run: the model, wrapped for DDP and then compiled when asked (the same weights).
        Compiling the DDP module lets the compiler split its graph at DDP's gradient buckets, so their
        all-reduces overlap the backward pass; DDP around a compiled module cannot."""
        t = self.config.train
        self.ddp = None
        self.train_model = self.model
        if self.dist.enabled:
            from torch.nn.parallel import DistributedDataParallel

            self.ddp = self.train_model = DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        if t.compile:
            self.train_model = torch.compile(self.train_model)
        self.scaler = torch.amp.GradScaler("cuda") if self.precision.use_grad_scaler else None
        self.tokens_per_step = t.batch_size * self.config.model.block_size * t.grad_accum_steps * self.dist.world_size

    def _emit_start(self, loaded: ckpt.LoadedCheckpoint | None, parent: ckpt.LoadedCheckpoint | None,
                    added: list[str]) -> None:
        t, corpus = self.config.train, self.corpus
        self.emit("start", self.state.step, n_params=self.model.num_parameters(), device=str(self.device),
                  device_reason=self.device_reason, precision=self.precision.name,
                  precision_reason=self.precision.reason, vocab_size=corpus.tokenizer.vocab_size,
                  train_chars=len(corpus.train), val_chars=len(corpus.val), source=corpus.source,
                  data_cache=corpus.cache, data_seconds=corpus.seconds, data_kept=self.state.data_kept,
                  val_scored=self._val_windows().chars,
                  max_iters=t.max_iters, tokens_per_step=self.tokens_per_step, time_budget=t.time_budget,
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
            lr = set_lr(self.optimizers, lr_factor(t, state.step, self._progress(state.step, agreed.progress),
                                                   agreed.progress))
            short = self._short_windows(state.step, agreed.progress)
            # forward, backward and step
            step_began = budget.now()
            loss_sum = self._train_step(state.step, short)
            budget.step_done(budget.now() - step_began)
            length, batch = self._windows(short)
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
                self._log(step, agreed.loss, lr, (step - last_log_step) * self.tokens_per_step
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
        if step % t.eval_interval == 0 and step < t.max_iters and self._eval_fits():
            self._periodic_eval()
            return True
        if t.checkpoint_interval and step % t.checkpoint_interval == 0:
            self._save(is_best=False)
            return True
        return False

    def _stop_early(self, step: int, signum: int) -> str | None:
        """A signal saves and raises TrainingStopped; train.stop_after saves and returns "stop_after"."""
        t, state = self.config.train, self.state
        if signum:
            state.stopped = "interrupted" if signum == signal.SIGINT else "terminated"
            self._save(is_best=False)
            raise TrainingStopped(signum, self._result(math.nan, 0, state.stopped))
        if t.stop_after and step - state.loop_first_step >= t.stop_after and step < t.max_iters:
            state.stopped = "stop_after"
            self._save(is_best=False)
            return "stop_after"
        return None

    def _finish(self, stopped: str, signals: "_SignalCatcher") -> tuple[float, int]:
        """The trained weights saved, then the final evaluation (and its save)."""
        state = self.state
        state.stopped = stopped
        if state.saved_step != state.step:
            # The trained weights are saved before the final evaluation (a while on a large split),
            # so a second Ctrl-C during it, which stops at once, loses no training.
            self._save(is_best=False)
        signals.on_first = self._finishing_notice
        return self._final_eval()

    def _finishing_notice(self, signum: int) -> None:
        again = "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name
        self.emit("notice", self.reported_step, message=f"finishing the evaluation, {again} again to skip it "
                                                        f"(the trained weights are saved)")

    def _windows(self, short: bool) -> tuple[int, int]:
        """Window length and windows per micro-batch: block_size and batch_size, or with train.short_windows
        half the length at twice the batch."""
        t, m = self.config.train, self.config.model
        return (m.block_size // 2, 2 * t.batch_size) if short else (m.block_size, t.batch_size)

    def _short_windows(self, step: int, budget_progress: float | None) -> bool:
        """Whether this step still reads the short windows of train.short_windows."""
        t = self.config.train
        return bool(t.short_windows) and max(step / max(1, t.max_iters), budget_progress or 0.0) < t.short_windows

    def _progress(self, step: int, budget_progress: float | None) -> float:
        """The run's progress: by steps past the warm-up, or by the budget's (agreed) training time,
        whichever is further along, so that the decay ends when the training time does."""
        t = self.config.train
        by_steps = (step - t.warmup_iters) / max(1, t.max_iters - t.warmup_iters)
        return by_steps if budget_progress is None else max(by_steps, budget_progress)

    def _train_step(self, step: int, short: bool = False) -> torch.Tensor:
        """One optimizer step over grad_accum_steps micro-batches; returns the loss on the device (this
        rank's, the mean over micro-batches), left unread so that the step needs no host sync.
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
            sync = self.ddp.no_sync() if (self.ddp is not None and not last) else contextlib.nullcontext()
            with sync:
                loss = training_loss(train_model, x, y, self.device, self.precision) / t.grad_accum_steps
                (scaler.scale(loss) if scaler else loss).backward()
            total += loss.detach()
        apply_gradients(self.model, self.optimizers, scaler, t.grad_clip)
        return total

    def _log(self, step: int, loss: float, lr: float, rate: float) -> None:
        t, elapsed = self.config.train, self.budget.elapsed()
        eta = self.budget.eta(step, t.max_iters)
        if self.dist.is_main:
            ckpt.append_metrics(self.run_dir, dict(kind="train", step=step, loss=loss, lr=lr, tokens_per_sec=rate,
                                                   elapsed=elapsed, tokens=self.state.tokens))
        self.emit("step", step, loss=loss, lr=lr, tokens_per_sec=rate, eta=eta, elapsed=elapsed,
                  tokens=self.state.tokens, max_iters=t.max_iters)

    # -- the time budget ----------------------------------------------------------------------------
    def _start_budget(self) -> None:
        """The loop starts now: under train.time_budget, with the final evaluation and a save measured
        (or guessed) so that the budget keeps time for them."""
        t, m = self.config.train, self.config.model
        if not t.time_budget:
            self.budget.begin(0.0, 0.0, step=self.state.step)
            return
        self.budget = TimeBudget(t.time_budget, self.budget.started_at, self.budget.clock)
        per_window = self.seconds_per_window = self._seconds_per_window()
        windows = max(1, math.ceil(self._val_windows().chars / m.block_size))
        # The sampled validation batches the best checkpoint is chosen by, scored again at the end: time
        # is kept for them once a checkpoint has been measured so (by a periodic evaluation, or before a
        # resume). Until then the final checkpoint is the only candidate, the best without a measure.
        self.estimate_seconds = 0.0 if t.eval_full else per_window * t.eval_iters * t.batch_size
        fixed = self.estimate_seconds if math.isfinite(self.state.best_val) else 0.0
        # Until a save is timed: the weights and two Adam moments, written at a modest 100 MB/s.
        save_guess = 0.1 + 12 * self.model.num_parameters() / 100e6
        self.budget.begin(per_window * windows, save_guess, fixed, step=self.state.step)

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
        began = self.budget.now()
        _, scored = score_text(model, sample, m.block_size, m.block_size, batch, self.device, self.precision)
        return (self.budget.now() - began) / max(1, math.ceil(scored / m.block_size))

    def _eval_fits(self) -> bool:
        """Under a time budget, a periodic evaluation only where it leaves time for the final one
        (which measures the same weights more fully a moment later anyway)."""
        if not self.budget.limited:
            return True
        t, m = self.config.train, self.config.model
        cost = self.state.periodic_eval_seconds
        if cost is None:  # not yet timed: its batches (and the whole split with eval_full) at the measured rate
            windows = math.ceil(self._val_windows().chars / m.block_size) if t.eval_full else 0
            cost = self.seconds_per_window * (2 * t.eval_iters * t.batch_size + windows)
        if not self.budget.fixed_eval_seconds:
            cost += self.estimate_seconds  # after it, time is kept to measure the final checkpoint too
        return self.ranks.all(self.budget.allows(cost))

    # -- evaluation -----------------------------------------------------------------------------------
    def _eval_batch(self) -> int:
        """Windows a whole-split evaluation scores at once."""
        return max(self.config.train.batch_size, 32)

    def _val_windows(self):
        m = self.config.model
        return scoring_windows(len(self.corpus.val), m.block_size, m.block_size, self.config.train.eval_max_chars)

    def describe_scope(self, scored: int, val_chars: int) -> str:
        if scored >= val_chars - 1:
            return f"whole validation split, {scored:,} characters"
        if self.budget.eval_fraction < 1.0:
            return (f"{scored:,} characters sampled of {val_chars:,}: fixed windows, as many as the time budget "
                    f"leaves time for")
        return (f"{scored:,} characters sampled of {val_chars:,}: fixed windows; train.eval_max_chars=0 "
                f"scores the whole split")

    def _estimate(self, splits: Sequence[str] = ("train", "val")) -> dict[str, float]:
        """Mean loss over eval_iters fixed batches of each split (the same batches every time), over ranks."""
        t, m, model, corpus = self.config.train, self.config.model, self.model, self.corpus
        names = [name for name in ("train", "val") if name in splits]
        sums = []
        model.eval()
        with torch.no_grad():
            for name in names:
                split_id, ids = (0, corpus.train) if name == "train" else (1, corpus.val)
                losses = []
                for i in range(t.eval_iters):
                    starts = batch_indices(len(ids), m.block_size, t.batch_size, t.seed, i, EVAL_STREAM + split_id,
                                           self.dist.rank, self.dist.world_size)
                    x, y = get_batch(ids, starts, m.block_size, self.device, corpus.tokenizer.vocab_size)
                    losses.append(training_loss(model, x, y, self.device, self.precision))
                sums.append(torch.stack(losses).mean().item())
        world = self.dist.world_size
        return {name: total / world for name, total in zip(names, self.ranks.sum(sums))}

    def _val_loss(self, task: str = "evaluation", max_chars: int | None = None) -> tuple[float, int]:
        """Mean loss over the validation split in non-overlapping block_size windows, and the characters
        scored: all of them, shared out among ranks, or a fixed sample of them (the same on every rank)
        when the split has more than train.eval_max_chars (or max_chars) characters."""
        t, m, val = self.config.train, self.config.model, self.corpus.val
        limit = t.eval_max_chars if max_chars is None else (min(max_chars, t.eval_max_chars) if t.eval_max_chars
                                                            else max_chars)
        share = None if scoring_windows(len(val), m.block_size, m.block_size, limit).sampled \
            else self.ranks.share(len(val), m.block_size)
        ids = val if share is None else val[share[0]:share[1]]
        total, count = score_text(self.model, ids, m.block_size, m.block_size, self._eval_batch(),
                                  self.device, self.precision, self._report, task, limit)
        if share is not None:
            total, count = self.ranks.sum([total, float(count)])
        return total / max(count, 1), int(count)

    def _periodic_eval(self) -> None:
        t, corpus, state = self.config.train, self.corpus, self.state
        began = self.budget.now()
        losses = self._estimate()
        scope = f"{t.eval_iters} sampled batches"
        if t.eval_full:
            losses["val"], count = self._val_loss()
            scope = self.describe_scope(count, len(corpus.val))
        seconds = self.budget.now() - began
        state.periodic_eval_seconds = seconds
        state.eval_seconds += seconds
        self.budget.keep_for_estimate(self.estimate_seconds)
        is_best = losses["val"] < state.best_val
        state.best_val = min(state.best_val, losses["val"])
        state.evaluated_at = step = state.step
        if self.dist.is_main:
            ckpt.append_metrics(self.run_dir, dict(kind="eval", step=step, train_loss=losses["train"],
                                                   val_loss=losses["val"], elapsed=self.budget.elapsed(),
                                                   scope="full" if t.eval_full else "sampled",
                                                   eval_seconds=state.eval_seconds))
        self.emit("eval", step, train_loss=losses["train"], val_loss=losses["val"], best_val_loss=state.best_val,
                  scope=scope, seconds=seconds, elapsed=self.budget.elapsed(), eval_seconds=state.eval_seconds)
        self._save(is_best=is_best, val_loss=losses["val"])

    def _final_eval(self) -> tuple[float, int]:
        """Validation loss over the validation split (or its fixed sample), in non-overlapping windows."""
        t, m, state, budget = self.config.train, self.config.model, self.state, self.budget
        began = budget.now()
        max_chars = None
        if budget.eval_fraction < 1.0:
            # A fixed sample of windows (as train.eval_max_chars draws) that fits the time budget.
            max_chars = max(self.MIN_FINAL_WINDOWS * m.block_size, round(budget.eval_fraction * self._val_windows().chars))
        loss, count = self._val_loss(task=FINAL_EVAL_TASK, max_chars=max_chars)
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
            candidate = self._estimate(splits=("val",))["val"]
        state.eval_seconds += budget.now() - began
        # Nothing measured before it (no periodic evaluation ran): the final checkpoint is the best.
        is_best = candidate < state.best_val or not math.isfinite(state.best_val)
        state.best_val = min(state.best_val, candidate)
        self._record_final_eval(loss, count, candidate, seconds)
        self._save(is_best=is_best, val_loss=loss, final=True)
        return loss, count

    def _record_final_eval(self, loss: float, count: int, candidate: float, seconds: float) -> None:
        t, state, val_chars = self.config.train, self.state, len(self.corpus.val)
        if self.dist.is_main:
            record = dict(kind="eval", step=state.step, val_loss=loss,
                          scope="full" if count >= val_chars - 1 else "windows", chars_scored=count,
                          val_chars=val_chars, elapsed=self.budget.elapsed(), eval_seconds=state.eval_seconds,
                          final=True)
            if not t.eval_full and math.isfinite(candidate):
                record["sampled_val_loss"] = candidate  # the measure the best checkpoint is chosen by
            ckpt.append_metrics(self.run_dir, record)
        self.emit("final_eval", state.step, val_loss=loss, bpc=bits_per_char(loss), tokens=count, seconds=seconds,
                  best_val_loss=state.best_val, val_chars=val_chars, scope=self.describe_scope(count, val_chars))

    # -- checkpoints --------------------------------------------------------------------------------
    def _save(self, is_best: bool, val_loss: float | None = None, final: bool = False) -> None:
        model, state = self.model, self.state
        # An update can break the weights while the step's own loss was still finite: never save those.
        if not all(bool(torch.isfinite(p).all()) for p in model.parameters()):
            raise NonFiniteLoss(state.step, self.run_dir)
        began = self.budget.now()
        rng = self.ranks.gather(rng_states(self.device))  # every rank's: a collective, before the main rank saves
        if self.dist.is_main:
            tensors, plain = train_state(self.optimizers, rng)
            meta = dict(step=state.step, tokens=state.tokens, best_val_loss=state.best_val,
                        val_loss=val_loss, data_fingerprint=state.fingerprint, device=str(self.device),
                        precision=self.precision.name, train_seconds=state.prior_seconds + self.budget.elapsed(),
                        final=final, world_size=self.dist.world_size,
                        # why this invocation ended, for `minigpt runs` (None: a periodic save)
                        stopped=state.stopped)
            if state.parent:
                meta["parent"] = state.parent
            saved = ckpt.save_checkpoint(self.run_dir, model, self.config, self.corpus.tokenizer, meta,
                                         tensors, plain, is_best)
            self.emit("checkpoint", state.step, path=str(saved), is_best=is_best)
        state.saved_step = state.step
        # The other ranks wait here for the save (the process group's timeout must cover one).
        self.ranks.barrier()
        self.budget.saved(self.budget.now() - began)

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


@dataclass(frozen=True)
class TrainOptions:
    """What `minigpt train` was asked for on its command line."""

    config_name: str | None = None
    resume: bool = False
    out_dir: Path | None = None
    overrides: Sequence[str] = ()  # --set KEY=VALUE
    data: str | None = None
    time_budget: float | None = None
    device: str | None = None
    seed: int | None = None
    deterministic: bool = False
    init_from: Path | None = None
    extend_vocab: bool = False


def plan_run(options: TrainOptions) -> TrainPlan:
    """What `minigpt train` runs: the config (named, the run's own on --resume, the parent's with
    --init-from, or the default for the device), the options given on top of it, the text it reads
    (the run's kept copy on --resume unless other text is given; paths stored absolute), and the run
    folder (claimed new, or proven a run for --resume)."""
    o = options
    config, run_dir, note, flags = _base_config(o)
    data = o.data
    copy = ckpt.run_text(run_dir) if o.resume else None
    if copy is not None and data is None and not any(f.strip().startswith("data.path=") for f in flags):
        data = str(copy)  # the run's own copy of the text it was trained on
    config = apply_overrides(config, flags + option_overrides(data, o.time_budget, o.device, o.seed))
    if o.deterministic:
        config = dataclasses.replace(config, train=dataclasses.replace(config.train, deterministic=True))
    created = False
    if not o.resume:
        config = dataclasses.replace(config, data=dataclasses.replace(
            config.data, path=absolute_data_path(config.data.path)))
        # Only the process that writes (rank 0 under torchrun) claims a directory.
        run_dir, created = ckpt.prepare_run_dir(o.out_dir, config.name, resume=False,
                                                claim=detect_distributed().is_main)
    return TrainPlan(config, Path(run_dir), note, created)


def _base_config(o: TrainOptions) -> tuple[Config, Path | None, str | None, list[str]]:
    """The config before the options (and --set overrides, with what --init-from adds to them), the
    run folder --resume continues, and the note on how a config was chosen when none was named."""
    run_dir, note, flags = o.out_dir, None, list(o.overrides)
    if o.init_from is not None:
        if o.resume:
            raise UserError("--resume continues a run and --init-from starts a new one: use one of them")
        # The parent's config unless one is given; fresh optimizer, schedule and records either way.
        parent = ckpt.load_checkpoint(o.init_from, which="best")
        config = load_config(o.config_name) if o.config_name else dataclasses.replace(
            parent.config, train=dataclasses.replace(parent.config.train, stop_after=0))
        flags += [f"train.init_from={Path(o.init_from).expanduser().resolve()}", f"train.extend_vocab={o.extend_vocab}"]
    elif o.extend_vocab:
        raise UserError("--extend-vocab goes with --init-from RUN (it adds characters to that run's vocabulary)")
    elif o.resume:
        run_dir, _ = ckpt.prepare_run_dir(o.out_dir, "", resume=True)
        if o.config_name is None:
            config = ckpt.load_checkpoint(run_dir, which="latest").config
            # stop_after pauses one invocation; it is not part of the recipe a plain --resume continues.
            config = dataclasses.replace(config, train=dataclasses.replace(config.train, stop_after=0))
        else:
            config = load_config(o.config_name)
    else:
        config_name = o.config_name
        if config_name is None:
            config_name, note = default_config_name(o.device)
        config = load_config(config_name)
    return config, run_dir, note, flags


def default_config_name(device: str | None) -> tuple[str, str]:
    """With no CONFIG: the GPU recipe when the chosen device is a CUDA GPU, the CPU-sized default
    otherwise; and the note that says so."""
    choice = resolve_device(device or "auto")
    if choice.device.type == "cuda":
        return "shakespeare_char", "config shakespeare_char (the GPU recipe, since the device is a CUDA GPU)"
    return "default", f"config default (sized for {choice.device.type})"
