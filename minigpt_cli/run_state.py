"""What a run keeps between invocations: the counters a checkpoint records, the optimizers' and
random streams' state beside the weights, the save itself, and putting them back on --resume.

checkpoint.py owns the files' format; this module owns what the trainer puts in them.
"""

from __future__ import annotations

import dataclasses
import math
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from minigpt_cli import checkpoint as ckpt
from minigpt_cli import rundir
from minigpt_cli.budget import TimeBudget
from minigpt_cli.config import Config, UserError
from minigpt_cli.corpus import Corpus, keep_in_run, run_copy
from minigpt_cli.device import Distributed, Precision
from minigpt_cli.model import GPT
from minigpt_cli.optim import AnyOptimizer
from minigpt_cli.ranks import Ranks
from minigpt_cli.rundir import pointer_target

# Model keys a resumed run may change: they change training, not the model its weights are.
RESUMABLE_MODEL_KEYS = ("dropout",)


class NonFiniteLoss(Exception):
    def __init__(self, step: int, run_dir: Path):
        kept = (f"the last good checkpoint in {run_dir} is kept" if (run_dir / "latest.json").exists()
                else "no checkpoint had been saved yet")
        super().__init__(
            f"loss became non-finite at step {step}; stopped without saving it; {kept} "
            f"(try a lower train.learning_rate or train.grad_clip)"
        )
        self.step = step


@dataclass
class RunState:
    """What a run knows as it trains: the counters saved in every checkpoint (and restored on
    --resume), the time spent evaluating, and what the result reports about the run's text."""

    step: int = 0
    tokens: int = 0  # training tokens seen, over every invocation
    best_val: float = math.inf  # by the periodic evaluations' measure (see train_eval.Evaluator.final)
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


def model_differences(saved: Any, now: Any, source: str) -> list[str]:
    """The model keys of a saved run (`source`, in words) that differ from the config's, in words.
    Dropout is a training setting (the weights and the function are the same model): it may change."""
    return [f"model.{f.name}: {source} has {getattr(saved, f.name)!r}, config has {getattr(now, f.name)!r}"
            for f in dataclasses.fields(saved)
            if f.name not in RESUMABLE_MODEL_KEYS and getattr(saved, f.name) != getattr(now, f.name)]


def load_resume(config: Config, run_dir: Path, world_size: int) -> ckpt.LoadedCheckpoint:
    """The latest checkpoint of the run --resume continues, refused where the model or the global batch differ."""
    loaded = ckpt.load_checkpoint(run_dir, which="latest", with_train_state=True)
    differ = model_differences(loaded.config.model, config.model, "run")
    if differ:
        raise UserError("cannot resume with a different model; differing keys: " + "; ".join(differ))
    saved_world = int(loaded.train_state.get("world_size", 1))
    if saved_world * loaded.config.train.batch_size != world_size * config.train.batch_size:
        raise UserError(
            f"cannot resume: the run used {saved_world} process(es) x batch {loaded.config.train.batch_size}, "
            f"now {world_size} x {config.train.batch_size}; keep world_size * train.batch_size equal"
        )
    return loaded


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


def restore_optimizers(optimizers: Sequence[AnyOptimizer], loaded: ckpt.LoadedCheckpoint,
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


def train_state(optimizers: Sequence[AnyOptimizer], rng: Sequence[dict[str, torch.Tensor]]
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


def stopped_by(signum: int) -> str:
    """How a run stopped by a signal is recorded: "interrupted" (Ctrl-C) or "terminated" (SIGTERM)."""
    return "interrupted" if signum == signal.SIGINT else "terminated"


class Saver:
    """The run's folder as the trainer writes it: its config and text before the first step, a whole
    checkpoint (weights, optimizers, every rank's random streams, the counters) at each save, and
    all of it put back on --resume. Only the main rank writes; every rank joins a save's collectives."""

    def __init__(self, config: Config, run_dir: Path, model: GPT, corpus: Corpus,
                 optimizers: Sequence[AnyOptimizer], precision: Precision, ranks: Ranks,
                 budget: TimeBudget, state: RunState, emit: Callable[..., None]):
        self.config, self.run_dir, self.model, self.corpus = config, run_dir, model, corpus
        self.optimizers, self.precision, self.ranks, self.budget = optimizers, precision, ranks, budget
        self.state, self.emit = state, emit
        self.latest: Path | None = None  # the newest checkpoint this invocation wrote
        self.saved_here: int | None = None  # the step of that checkpoint, known on every rank

    @property
    def dist(self) -> Distributed:
        return self.ranks.dist

    def restore(self, loaded: ckpt.LoadedCheckpoint) -> None:
        """A resumed run's optimizers, random streams and counters, as its latest checkpoint saved them."""
        restore_optimizers(self.optimizers, loaded, self.config.train.optimizer)
        restore_rng(loaded, self.ranks.device, self.dist.rank, self.dist.world_size, self.config.train.seed)
        self.state.resume_from(loaded.step, loaded.meta)

    def write_run(self) -> None:
        """The run's folder, by the main rank: metrics past the checkpoint dropped, the text kept, the config."""
        cfg, state = self.config, self.state
        state.data_kept = "nothing: the bundled text ships with minigpt" if not cfg.data.path else None
        if not self.dist.is_main:
            return
        # Resumed: drop records past the checkpoint. New: drop those of an attempt killed before its first save.
        rundir.truncate_metrics(self.run_dir, state.step)
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
        rundir.save_config(self.run_dir, written)

    def save(self, is_best: bool, val_loss: float | None = None, final: bool = False) -> None:
        model, state, device = self.model, self.state, self.ranks.device
        # An update can break the weights while the step's own loss was still finite: never save those.
        if not all(bool(torch.isfinite(p).all()) for p in model.parameters()):
            raise NonFiniteLoss(state.step, self.run_dir)
        began = self.budget.now()
        rng = self.ranks.gather(rng_states(device))  # every rank's: a collective, before the main rank saves
        if self.dist.is_main:
            tensors, plain = train_state(self.optimizers, rng)
            meta = dict(step=state.step, tokens=state.tokens, best_val_loss=state.best_val,
                        val_loss=val_loss, data_fingerprint=state.fingerprint, device=str(device),
                        precision=self.precision.name, train_seconds=state.prior_seconds + self.budget.elapsed(),
                        final=final, world_size=self.dist.world_size,
                        # why this invocation ended, for `minigpt runs` (None: a periodic save)
                        stopped=state.stopped)
            if state.parent:
                meta["parent"] = state.parent
            self.latest = ckpt.save_checkpoint(self.run_dir, model, self.config, self.corpus.tokenizer, meta,
                                               tensors, plain, is_best)
            self.emit("checkpoint", state.step, path=str(self.latest), is_best=is_best)
        state.saved_step = self.saved_here = state.step
        # The other ranks wait here for the save (the process group's timeout must cover one).
        self.ranks.barrier()
        self.budget.saved(self.budget.now() - began)

    def finish(self, is_best: bool, val_loss: float) -> None:
        """The final checkpoint. Where the trained weights were saved at this step (before the final
        evaluation, or by a periodic save), they stay as written: only that checkpoint's meta.json
        learns the final loss (a rename into place) and best.json moves to it if it is the best, so
        the run ends with one checkpoint of its last step, not a second copy named step-N-2."""
        state, folder = self.state, self.latest
        if self.saved_here != state.step:  # the same on every rank (a resumed run that took no step: None)
            self.save(is_best=is_best, val_loss=val_loss, final=True)
            return
        began = self.budget.now()
        if self.dist.is_main:
            try:
                rundir.update_meta(folder, best_val_loss=state.best_val, val_loss=val_loss, final=True,
                                   stopped=state.stopped, train_seconds=state.prior_seconds + self.budget.elapsed())
                if is_best:
                    rundir.point(self.run_dir, rundir.BEST, folder, state.step)
                    ckpt.prune(self.run_dir)  # the checkpoint best.json named before, if no pointer names it now
            except (OSError, ValueError, rundir.CheckpointError) as exc:
                raise ckpt.CheckpointWriteError(f"could not record the final evaluation in {folder}: {exc}; "
                                                f"the checkpoint's weights are intact") from exc
            self.emit("checkpoint", state.step, path=str(folder), is_best=is_best)
        self.ranks.barrier()
        self.budget.saved(self.budget.now() - began)

    def mark_stopped(self, signum: int) -> None:
        """A second signal ends the invocation at once, without the save the first one asks for: the
        newest checkpoint it wrote (the trained weights, saved before the final evaluation, say) is
        marked with how the run ended, so that `minigpt runs` lists it as interrupted, not failed.
        Only meta.json changes (a rename into place): the weights and training state are as saved."""
        folder = self.latest
        if not self.dist.is_main or folder is None or pointer_target(self.run_dir, "latest") != folder:
            return
        try:
            meta = rundir.read_meta(folder)
            if meta.get("final") is not True:  # a final checkpoint is a finished run, however it exits
                rundir.atomic_write_json(folder / rundir.META_FILE, {**meta, "stopped": stopped_by(signum)})
        except (OSError, ValueError, rundir.CheckpointError):
            pass  # the run stays listed as it was; the checkpoint itself is whole either way
