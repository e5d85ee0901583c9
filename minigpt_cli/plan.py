"""What `minigpt train` runs: the config (named, the run's own on --resume, the parent's with
--init-from, or the default for the device), the options on top of it, and the run folder."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from minigpt_cli import rundir
from minigpt_cli.config import (Config, UserError, absolute_data_path, apply_overrides, budget_governs, load_config,
                                option_overrides, overridden)

# checkpoint and device import torch (seconds): only once the command line has been checked, so that
# a mistake in it is refused at once (tests/test_startup.py).


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
    copy = None
    if o.resume:
        from minigpt_cli.checkpoint import run_text

        copy = run_text(run_dir)
    if copy is not None and data is None and "data.path" not in overridden(flags):
        data = str(copy)  # the run's own copy of the text it was trained on
    config = apply_overrides(config, flags + option_overrides(data, o.time_budget, o.device, o.seed))
    if o.deterministic:
        config = dataclasses.replace(config, train=dataclasses.replace(config.train, deterministic=True))
    created = False
    if not o.resume:
        config = budget_governs(config, flags, o.config_name)  # None: no file of the user's was named
        config = dataclasses.replace(config, data=dataclasses.replace(
            config.data, path=absolute_data_path(config.data.path)))
        from minigpt_cli.device import detect_distributed

        # Only the process that writes (rank 0 under torchrun) claims a directory.
        run_dir, created = rundir.prepare_run_dir(o.out_dir, config.name, resume=False,
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
        from minigpt_cli.checkpoint import load_checkpoint

        parent = load_checkpoint(o.init_from, which="best")
        config = load_config(o.config_name) if o.config_name else dataclasses.replace(
            parent.config, train=dataclasses.replace(parent.config.train, stop_after=0))
        flags += [f"train.init_from={Path(o.init_from).expanduser().resolve()}", f"train.extend_vocab={o.extend_vocab}"]
    elif o.extend_vocab:
        raise UserError("--extend-vocab goes with --init-from RUN (it adds characters to that run's vocabulary)")
    elif o.resume:
        run_dir, _ = rundir.prepare_run_dir(o.out_dir, "", resume=True)
        if o.config_name is None:
            from minigpt_cli.checkpoint import load_checkpoint

            config = load_checkpoint(run_dir, which="latest").config
            # stop_after pauses one invocation; it is not part of the recipe a plain --resume continues.
            config = dataclasses.replace(config, train=dataclasses.replace(config.train, stop_after=0))
        else:
            config = load_config(o.config_name)
    else:
        config_name = o.config_name
        if config_name is None:
            refuse_what_every_default_refuses(flags + option_overrides(o.data, o.time_budget, o.device, o.seed))
            config_name, note = default_config_name(o.device)
        config = load_config(config_name)
    return config, run_dir, note, flags


# The configs default_config_name chooses from.
DEFAULT_CONFIGS = ("default", "shakespeare_char")


def refuse_what_every_default_refuses(flags: Sequence[str]) -> None:
    """Without a config named, the device chooses it, and asking for the device imports torch
    (seconds). Flags that every config it could choose refuses, in the same words (a mistyped key, a
    negative budget), are refused before that."""
    refusals = set()
    for name in DEFAULT_CONFIGS:
        try:
            apply_overrides(load_config(name), flags)
            return
        except UserError as exc:
            refusals.add(str(exc))
    if len(refusals) == 1:
        raise UserError(refusals.pop())


def default_config_name(device: str | None) -> tuple[str, str]:
    """With no CONFIG: the GPU recipe when the chosen device is a CUDA GPU, the CPU-sized default
    otherwise; and the note that says so."""
    from minigpt_cli.device import resolve_device

    choice = resolve_device(device or "auto")
    if choice.device.type == "cuda":
        return "shakespeare_char", "config shakespeare_char (the GPU recipe, since the device is a CUDA GPU)"
    return "default", f"config default (sized for {choice.device.type})"