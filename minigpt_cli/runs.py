"""The runs you have: list them (what each is, how it ended, what it cost), delete them, compare them.

Listing reads only small JSON files and the safetensors header, never the weights, and imports no
torch, so `minigpt runs` answers at once. A folder that is not a run, or a run whose files are
damaged, is listed as such: describing a run never raises. Comparing trains variants of a config in
turn through the trainer, each a normal run folder.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import os
import stat
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

from minigpt_cli.config import Config, UserError, apply_overrides, best_measure, budget_governs, load_config
from minigpt_cli.rundir import LATEST, LOCK_FILE, META_FILE as META, META_MAX_BYTES as JSON_MAX_BYTES
from minigpt_cli.rundir import MODEL_FILE as MODEL
from minigpt_cli.rundir import (CheckpointWriteError, RunContents, bytes_on_disk, complete_checkpoints, delete_contents,
                                is_run, live_runs_below, live_writer, new_run_dir, pointer_step, read_metrics,
                                remove_unused_run_dir, run_contents)
from minigpt_cli.scoring import bits_per_char

STATES = ("live", "finished", "paused", "interrupted", "failed", "damaged", "not a run")


@dataclass
class RunInfo:
    name: str
    path: str
    state: str  # one of STATES
    detail: str = ""  # why, in words: the stop reason, what is damaged, which process writes it
    ending: Optional[str] = None  # how training ended: max_iters, time_budget, stop_after, interrupted, terminated
    config: Optional[str] = None
    params: Optional[int] = None
    steps: Optional[int] = None
    tokens: Optional[int] = None
    best_val_loss: Optional[float] = None  # the best checkpoint's loss on best_measure (not final_val_loss's)
    best_measure: Optional[str] = None  # what the periodic evaluations measure: "20 sampled batches" or the whole split
    best_step: Optional[int] = None  # the step of the checkpoint best.json names (what sample and eval load)
    final_val_loss: Optional[float] = None  # over the whole validation split (or its fixed sample), at the end
    wall_seconds: Optional[float] = None
    size_bytes: int = 0
    modified: float = 0.0  # seconds since the epoch of the run's last save (or of the folder)
    link: Optional[str] = None  # where a symbolic link listed in the folder points
    parent: Optional[str] = None  # the run it started from (train --init-from)
    pid: Optional[int] = None  # the live writer

    @property
    def is_run(self) -> bool:
        return self.state != "not a run"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------------------------------------
# Reading a run without torch
# ---------------------------------------------------------------------------------------------

class _Damaged(Exception):
    pass


def _read_json(path: Path) -> Any:
    try:
        info = path.stat()
        if not stat.S_ISREG(info.st_mode):
            raise _Damaged(f"{path.name} is not a regular file")
        if info.st_size > JSON_MAX_BYTES:
            raise _Damaged(f"{path.name} is {info.st_size:,} bytes, not a file minigpt wrote")
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise _Damaged(f"{path.name} is missing") from None
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise _Damaged(f"{path.name} is unreadable ({type(exc).__name__})") from None


def _safetensors_params(path: Path) -> int:
    """The number of values in a safetensors file, from its JSON header alone."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))  # a FIFO is not waited on
        with os.fdopen(fd, "rb") as f:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise _Damaged(f"{path.parent.name}/{path.name} is not a regular file")
            (length,) = struct.unpack("<Q", f.read(8))
            if length > JSON_MAX_BYTES:
                raise _Damaged(f"{path.name} has an implausible header")
            header = json.loads(f.read(length))
        return sum(math.prod(entry["shape"]) for key, entry in header.items() if key != "__metadata__")
    except FileNotFoundError:
        raise _Damaged(f"{path.parent.name}/{path.name} is missing") from None
    except (OSError, struct.error, ValueError, TypeError, KeyError, AttributeError, RecursionError):
        raise _Damaged(f"{path.parent.name}/{path.name} is not a readable safetensors file") from None


def _checkpoint_folder(run: Path) -> Path:
    """The folder latest.json names (inside the run), else the newest whole checkpoint."""
    pointer = run / LATEST
    if pointer.exists():
        raw = _read_json(pointer)
        name = raw.get("checkpoint") if isinstance(raw, dict) else None
        if not isinstance(name, str):
            raise _Damaged(f"{LATEST} names no checkpoint")
        folder = run / name
        if not _inside(folder, run):
            raise _Damaged(f"{LATEST} points outside the run folder")
        if not (folder / META).is_file():
            raise _Damaged(f"{LATEST} names {name}, which is missing or incomplete")
        return folder
    whole = complete_checkpoints(run)
    if not whole:
        raise FileNotFoundError
    return whole[-1]


def _children(folder: Path) -> list[Path]:
    try:
        return [folder / name for name in os.listdir(folder)]
    except OSError:
        return []


def _inside(path: Path, folder: Path) -> bool:
    try:
        return os.path.realpath(path).startswith(os.path.realpath(folder) + os.sep)
    except OSError:
        return False


def folder_size(path: Path) -> int:
    """Bytes on disk under path, counting links as links (never following them out of the folder)."""
    total = 0
    stack = [str(path)]
    while stack:
        try:
            entries = list(os.scandir(stack.pop()))
        except OSError:
            continue
        for entry in entries:
            try:
                info = entry.stat(follow_symlinks=False)
            except OSError:
                continue
            total += getattr(info, "st_blocks", 0) * 512 or info.st_size
            if entry.is_dir(follow_symlinks=False):
                stack.append(entry.path)
    return total


def _float(value: Any) -> Optional[float]:
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return None


def _int(value: Any) -> Optional[int]:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


STOPPED = {"max_iters": "max_iters reached", "time_budget": "time budget used"}


def describe_run(path: Path) -> RunInfo:
    """What a folder under runs/ is; never raises."""
    path = Path(path)
    info = RunInfo(name=path.name, path=str(path), state="not a run")
    try:
        info.modified = path.lstat().st_mtime
    except OSError:
        pass
    if path.is_symlink():
        info.link = os.readlink(path)
    if not path.is_dir():
        info.detail = ("a broken link" if info.link is not None else "not a folder" if os.path.lexists(path)
                       else "not found")
        return info
    contents = run_contents(path)
    if not contents.minigpt_wrote_any:
        info.detail = "no minigpt files in it"
        return info
    info.size_bytes = folder_size(path)
    info.pid = live_writer(path)
    try:
        folder = _checkpoint_folder(path)
    except FileNotFoundError:
        if info.pid is not None:
            info.state, info.detail = "live", "no checkpoint yet"
        elif contents.foreign:
            info.detail = f"no checkpoint, and files minigpt did not write ({_some(contents.foreign)})"
        elif LOCK_FILE not in contents.files:  # a run claims its folder with the lock before writing anything
            info.detail = "no checkpoint and no minigpt lock: files named like a run's, not a run"
        else:
            info.state, info.detail = "failed", "stopped before its first checkpoint"
        return info
    except _Damaged as exc:
        info.state, info.detail = ("live", str(exc)) if info.pid is not None else ("damaged", str(exc))
        return info
    try:
        meta = _read_json(folder / META)
        if not isinstance(meta, dict) or not isinstance(meta.get("config"), dict):
            raise _Damaged(f"{folder.name}/{META} is not minigpt checkpoint metadata")
        info.params = _safetensors_params(folder / MODEL)
    except _Damaged as exc:
        info.state, info.detail = ("live", str(exc)) if info.pid is not None else ("damaged", str(exc))
        return info
    try:
        info.modified = (folder / META).stat().st_mtime
    except OSError:
        pass
    _read_meta(info, meta, path)
    return info


def _read_meta(info: RunInfo, meta: dict[str, Any], path: Path) -> None:
    """What a run's newest checkpoint records: its figures, and how the run ended."""
    train = meta["config"].get("train") if isinstance(meta["config"].get("train"), dict) else {}
    info.config = str(meta.get("config_name", "?"))
    info.steps, info.tokens = _int(meta.get("step")), _int(meta.get("tokens"))
    info.best_val_loss = _float(meta.get("best_val_loss"))
    info.best_measure = best_measure(train.get("eval_full"), train.get("eval_iters", "?"))
    info.best_step = pointer_step(path, "best")
    info.wall_seconds = _float(meta.get("train_seconds"))
    parent = meta.get("parent")
    info.parent = str(parent.get("run")) if isinstance(parent, dict) and parent.get("run") else None
    stopped = meta.get("stopped")
    if meta.get("final") is True:
        info.final_val_loss = _float(meta.get("val_loss"))
    if info.pid is not None:
        info.state, info.detail = "live", f"being written by PID {info.pid}" if info.pid else "being written"
    elif meta.get("final") is True:
        info.state, info.detail = "finished", STOPPED.get(str(stopped), "")
        info.ending = str(stopped) if stopped in STOPPED else None
    elif stopped == "stop_after":
        info.state, info.detail = "paused", f"train.stop_after; continue: minigpt train --resume --out {path}"
        info.ending = "stop_after"
    elif stopped in ("interrupted", "terminated"):
        info.state, info.detail = "interrupted", f"by {'Ctrl-C' if stopped == 'interrupted' else 'SIGTERM'}"
        info.ending = stopped
    else:
        info.state, info.detail = "failed", f"ended after step {info.steps} without a final checkpoint"


def list_runs(folder: Path) -> list[RunInfo]:
    """Every entry under folder, newest first (hidden names skipped)."""
    folder = Path(folder)
    if not folder.exists():
        raise UserError(f"no such folder: {folder} (runs are kept under ./runs by default)")
    if not folder.is_dir():
        raise UserError(f"{folder} is not a folder")
    entries = [p for p in _children(folder) if not p.name.startswith(".")]
    infos = [describe_run(p) for p in entries]
    return sorted(infos, key=lambda r: (r.modified, r.name), reverse=True)


# ---------------------------------------------------------------------------------------------
# Deleting runs
# ---------------------------------------------------------------------------------------------

def _some(names: Sequence[str], shown: int = 3) -> str:
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more


@dataclass
class Removal:
    """What `runs rm` does to one RUN: unlink a symbolic link, or delete the files minigpt wrote in a
    run folder (contents.files, by name) and keep the rest (contents.foreign)."""
    info: RunInfo
    contents: Optional[RunContents]  # None for a link
    size_bytes: int  # what deleting frees


def _plan_one(path: Path, cwd: str) -> Removal:
    if path.name in ("", ".", ".."):  # runs/b/checkpoints/..: the folder it names, by its own name
        path = Path(os.path.realpath(path))
    if not os.path.lexists(path):
        raise UserError(f"run not found: {path}")
    info = describe_run(path)
    if info.link is not None:
        if not info.is_run:
            raise UserError(f"{path} is a link to what is not a minigpt run ({info.detail}); nothing was deleted")
        return Removal(info, None, 0)
    if info.state == "live":
        raise UserError(f"{path} is being written by a live process"
                        f"{f' (PID {info.pid})' if info.pid else ''}; stop it first, nothing was deleted")
    if not info.is_run:
        raise UserError(f"{path} is not a minigpt run ({info.detail}); nothing was deleted")
    if (cwd + os.sep).startswith(os.path.realpath(path) + os.sep):
        raise UserError(f"{path} holds the working directory; run this from elsewhere")
    for folder, pid in live_runs_below(path):
        raise UserError(f"{path} holds a run being written below it ({folder}"
                        f"{f', PID {pid}' if pid else ''}); nothing was deleted")
    contents = run_contents(path)
    if not is_run(path) and contents.foreign:
        raise UserError(f"{path} has no whole checkpoint and holds files minigpt did not write "
                        f"({_some(contents.foreign)}); nothing was deleted")
    if not is_run(path) and LOCK_FILE not in contents.files:
        raise UserError(f"{path} has no whole checkpoint and no minigpt lock: its files are named like a run's "
                        f"but minigpt did not claim the folder; nothing was deleted")
    return Removal(info, contents, sum(bytes_on_disk(path / rel) for rel in contents.files))


def plan_removal(paths: Sequence[Path]) -> list[Removal]:
    """What `runs rm` would do to each RUN (each named once); UserError, and nothing planned, for
    anything that is not a run, is being written, or holds a run being written."""
    if not paths:
        raise UserError("runs rm needs at least one RUN (a run directory)")
    cwd = os.path.realpath(os.getcwd())
    plans: dict[str, Removal] = {}
    for raw in paths:
        path = Path(raw)
        key = os.path.abspath(path) if path.is_symlink() else os.path.realpath(path)
        if key not in plans:
            plans[key] = _plan_one(path, cwd)
    return list(plans.values())


def remove_run(plan: Removal) -> list[str]:
    """Carry out one Removal: a symbolic link loses the link only (its target stays); in a folder only
    the files minigpt wrote go, by name, never through a link. Returns the entries kept (relative to
    the folder): files minigpt did not write are never deleted."""
    path = Path(plan.info.path)
    if plan.contents is None:
        path.unlink()
        return []
    try:
        return delete_contents(path, plan.contents)
    except OSError as exc:
        raise UserError(f"could not delete all of {path}: {exc.strerror or exc}") from None


# ---------------------------------------------------------------------------------------------
# Comparing runs
# ---------------------------------------------------------------------------------------------

def _flatten(config: dict[str, Any]) -> dict[str, Any]:
    return {f"{section}.{key}": value for section, values in config.items() if isinstance(values, dict)
            for key, value in values.items()}


def config_differences(configs: Sequence[dict[str, Any]]) -> list[str]:
    """The section.key names whose values are not the same in every config, in config order."""
    flat = [_flatten(c) for c in configs]
    keys = list(dict.fromkeys(k for f in flat for k in f))
    return [k for k in keys if len({json.dumps(f.get(k), sort_keys=True) for f in flat}) > 1]


def _median(values: list[float]) -> Optional[float]:
    values = sorted(v for v in values if v is not None and math.isfinite(v))
    return values[len(values) // 2] if values else None


def run_summary(path: Path, label: Optional[str] = None) -> dict[str, Any]:
    """One run's row of a comparison: its listing, config, speed and validation curve."""
    from minigpt_cli import checkpoint as ckpt
    from minigpt_cli.inspection import loss_curves

    info = describe_run(Path(path))
    if info.state in ("not a run", "damaged"):
        raise UserError(f"{path}: cannot compare it, {info.state} ({info.detail})")
    if info.params is None:
        raise UserError(f"{path}: no checkpoint to compare yet ({info.detail})")
    loaded = ckpt.load_checkpoint(Path(path), which="latest")
    records = read_metrics(Path(path))
    rates = [r.get("tokens_per_sec") for r in records if r.get("kind") == "train"]
    final = info.final_val_loss
    last = next((r for r in reversed(records) if r.get("kind") == "eval" and r.get("final")), {})
    scored = last.get("chars_scored")
    curves = loss_curves(Path(path), records)
    final_measure = (f"{scored:,} chars sampled" if last.get("scope") not in (None, "full") and isinstance(scored, int)
                     else "whole split")
    return {
        "label": label or info.name,
        **info.to_dict(),
        "config_values": loaded.config.to_dict(),
        # The first log line's rate includes the warming-up steps: the median of the rest is steadier.
        "tokens_per_sec": _median([r for r in rates[1:] or rates if isinstance(r, (int, float))]),
        "final_val_bpc": bits_per_char(final) if final is not None else None,
        "final_measure": final_measure,
        "best_val_bpc": bits_per_char(info.best_val_loss) if info.best_val_loss is not None else None,
        "val_curve": curves["val"],
        "train_curve": curves["train"],  # the training loss at every log line: a curve where val has a point or two
    }


def compare_runs(paths: Sequence[Path], labels: Optional[Sequence[str]] = None) -> dict[str, Any]:
    if len(paths) < 2:
        raise UserError("compare needs at least two runs (or one CONFIG with --vary KEY=V1,V2)")
    rows = [run_summary(p, labels[i] if labels else None) for i, p in enumerate(paths)]
    return {"runs": rows, "differences": config_differences([r["config_values"] for r in rows])}


@dataclass
class Variant:
    label: str  # "model.pos_encoding=rope, model.n_layer=2"
    settings: list[str]  # the --set items that make it
    config: Config
    run_dir: Optional[str] = None
    state: str = "pending"  # pending | finished | interrupted | failed
    error: Optional[str] = None
    signal: Optional[int] = None  # what interrupted it: SIGINT (Ctrl-C) or SIGTERM


def parse_vary(items: Sequence[str]) -> list[tuple[str, list[str]]]:
    """--vary KEY=V1,V2 items -> [(KEY, [V1, V2])]."""
    varied = []
    for item in items:
        key, sep, values = item.partition("=")
        key = key.strip()
        if not sep or "." not in key:
            raise UserError(f"--vary expects section.key=V1,V2 (e.g. model.pos_encoding=learned,rope), got {item!r}")
        options = [v.strip() for v in values.split(",")]
        if not all(options):
            raise UserError(f"--vary {key}: empty value in {values!r}")
        if len(set(options)) != len(options):
            raise UserError(f"--vary {key}: a value is repeated in {values!r}")
        if any(k == key for k, _ in varied):
            raise UserError(f"--vary {key} is given twice; list every value in one --vary")
        varied.append((key, options))
    return varied


def plan_variants(config_name: str, varies: Sequence[str], overrides: Sequence[str]) -> list[Variant]:
    """Every combination of the varied values, each checked as a config before anything trains."""
    varied = parse_vary(varies)
    if not varied:
        raise UserError("compare CONFIG needs at least one --vary KEY=V1,V2")
    base = apply_overrides(load_config(config_name), list(overrides))
    variants = []
    for combo in itertools.product(*[[(k, v) for v in values] for k, values in varied]):
        settings = [f"{k}={v}" for k, v in combo]
        config = budget_governs(apply_overrides(base, settings), [*overrides, *settings], config_name)
        same = next((v for v in variants if v.config == config), None)
        if same is not None:
            raise UserError(f"--vary gives the same config twice: {same.label} and {', '.join(settings)}; "
                            f"list each value once")
        variants.append(Variant(", ".join(settings), settings, config))
    if len(variants) < 2:
        raise UserError("--vary gives a single variant: list two values or more, e.g. KEY=V1,V2")
    return variants


def variant_dir_name(config: Config, settings: Sequence[str]) -> str:
    """runs/<config>-<key>-<value>... : which variant a folder holds, readable in `minigpt runs`."""
    parts = [config.name]
    for item in settings:
        key, _, value = item.partition("=")
        parts.append(f"{key.split('.')[-1]}-{value}")
    name = "-".join(parts)
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)[:80]


def train_variants(variants: Sequence[Variant], base: Path,
                   run: Callable[[Variant, Path], None]) -> Iterator[Variant]:
    """Train each variant in turn into a new folder under base: `run(variant, run_dir)` trains it
    (the CLI passes its own renderer). A Ctrl-C stops the series: the variant being trained is
    marked interrupted and the ones after it stay pending."""
    from minigpt_cli.trainer import NonFiniteLoss, TrainingStopped

    for variant in variants:
        run_dir = new_run_dir(variant_dir_name(variant.config, variant.settings), base=base)
        variant.run_dir = str(run_dir)
        try:
            run(variant, run_dir)
            variant.state = "finished"
        except (TrainingStopped, KeyboardInterrupt) as exc:
            variant.state, variant.signal = "interrupted", getattr(exc, "signum", 2)
            if isinstance(exc, TrainingStopped):
                variant.error = str(exc)
            remove_unused_run_dir(run_dir)
            yield variant
            return
        except (UserError, NonFiniteLoss, CheckpointWriteError) as exc:  # this one failed; the others train
            variant.state, variant.error = "failed", str(exc)
            remove_unused_run_dir(run_dir)
        yield variant


def compare_variants(variants: Sequence[Variant]) -> dict[str, Any]:
    """The comparison of the variants that have a checkpoint, with the state of every variant."""
    done = [v for v in variants if v.run_dir and describe_run(Path(v.run_dir)).params is not None]
    rows = [run_summary(Path(v.run_dir), v.label) for v in done] if done else []
    return {
        "runs": rows,
        "differences": config_differences([r["config_values"] for r in rows]) if len(rows) > 1 else [],
        "variants": [{"label": v.label, "state": v.state, "run_dir": v.run_dir, "error": v.error,
                      "signal": v.signal} for v in variants],
    }
