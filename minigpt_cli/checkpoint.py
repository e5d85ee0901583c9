"""Save and load runs: safetensors weights, JSON metadata, training state; atomic writes, safe loading.

A run directory looks like this:

    runs/default-20261124-101500/
        latest.json        {"checkpoint": "checkpoints/step-002000"}, replaced atomically
        best.json          the checkpoint with the lowest validation loss
        metrics.jsonl      one JSON object per log line or evaluation
        checkpoints/step-002000/
            model.safetensors  weights (float32)
            meta.json          format version, config, vocabulary, step, losses, data fingerprint
            state.safetensors  optimizer tensors and random-number-generator states
            state.json         optimizer hyper-parameters and other plain training state

A checkpoint folder is written under a temporary name and renamed into place, and only then do the
pointer files move to it, so a crash at any moment leaves the previous checkpoint whole. Nothing is
ever unpickled: tensors come from safetensors, everything else from JSON.
"""

from __future__ import annotations

import datetime as dt
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from minigpt_cli.config import Config, UserError, config_from_checkpoint_dict
from minigpt_cli.corpus import run_copy
from minigpt_cli.device import shapes_only
from minigpt_cli.model import GPT
from minigpt_cli.rundir import (BEST, CHECKPOINT_FILES, CHECKPOINT_NAME, CHECKPOINTS_DIR, LATEST, META_FILE,
                                META_MAX_BYTES, MODEL_FILE, SAFETENSORS_TMP_NAME, STATE_FILE, STATE_JSON,
                                TMP_CHECKPOINT_NAME, TMP_FILE_NAME, TMP_PREFIX, CheckpointError, CheckpointWriteError,
                                complete_checkpoints, data_copy, finite_or_none, fsync_dir,
                                loads_bounded, newest_run, point, pointer_target, read_bounded, strict_json,
                                write_bytes_synced)
from minigpt_cli.tokenizer import CharTokenizer

FORMAT_VERSION = 1


@dataclass
class LoadedCheckpoint:
    path: Path
    run_dir: Path
    config: Config
    tokenizer: CharTokenizer
    meta: dict[str, Any]
    model_state: dict[str, torch.Tensor]
    train_tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    train_state: dict[str, Any] = field(default_factory=dict)

    @property
    def step(self) -> int:
        return int(self.meta.get("step", 0))

    def build_model(self, device: torch.device | str = "cpu") -> GPT:
        model = GPT(self.config.model, self.tokenizer.vocab_size)
        load_weights(model, self.model_state, self.path / MODEL_FILE)
        return model.to(device)


def run_text(run_dir: Path) -> Path | None:
    """The text a run was trained on, kept in the run (its encoded copy, or an older run's text
    copy), which `eval` and `--resume` read instead of data.path; None: the run keeps none."""
    return run_copy(run_dir) or data_copy(run_dir)


def flatten_optimizer(prefix: str, state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split an optimizer state_dict into tensors (for safetensors) and plain values (for JSON)."""
    tensors: dict[str, torch.Tensor] = {}
    plain: dict[str, Any] = {"param_groups": finite_or_none(state["param_groups"]), "state": {}}
    for index, values in state["state"].items():
        entry = {}
        for name, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{prefix}.{index}.{name}"] = value.detach().cpu().contiguous()
            else:
                entry[name] = value
        plain["state"][str(index)] = entry
    # Which tensors each entry had, so a state file that lost some is refused instead of resuming
    # with a silently reset optimizer.
    plain["tensors"] = {str(i): sorted(k for k, v in values.items() if isinstance(v, torch.Tensor))
                        for i, values in state["state"].items()}
    return tensors, plain


def unflatten_optimizer(prefix: str, tensors: dict[str, torch.Tensor], plain: dict[str, Any]) -> dict[str, Any]:
    """The optimizer state_dict flatten_optimizer split; CheckpointError if a part is missing or malformed."""
    try:
        state: dict[int, dict[str, Any]] = {int(i): dict(entry) for i, entry in plain["state"].items()}
        for key, value in tensors.items():
            if key.startswith(prefix + "."):
                index, name = key[len(prefix) + 1:].split(".", 1)
                state.setdefault(int(index), {})[name] = value
        missing = [f"{prefix}.{i}.{name}" for i, names in plain.get("tensors", {}).items() for name in names
                   if name not in state.get(int(i), {})]
        groups = plain["param_groups"]
    except (KeyError, ValueError, TypeError, AttributeError) as exc:
        raise CheckpointError(f"{STATE_JSON}: malformed optimizer state ({type(exc).__name__}: {exc})") from None
    if missing:
        raise CheckpointError(f"{STATE_FILE}: {len(missing)} optimizer tensor(s) missing, e.g. {missing[0]} "
                              f"(a damaged checkpoint: resuming would reset the optimizer)")
    return {"state": state, "param_groups": groups}


def model_tensors(model: GPT) -> dict[str, torch.Tensor]:
    state = model.state_dict()
    if model.config.tie_weights:
        del state["lm_head.weight"]  # the same tensor as wte.weight
    return {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in state.items()}


def load_weights(model: GPT, state: dict[str, torch.Tensor], source: Path) -> None:
    expected = model.state_dict()
    broken = [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if broken:
        raise CheckpointError(f"{source}: {broken[0]} holds NaN or infinite values (a damaged checkpoint)")
    wrong = [f"{k} is {tuple(v.shape)}, the model needs {tuple(expected[k].shape)}"
             for k, v in state.items() if k in expected and v.shape != expected[k].shape]
    if wrong:
        raise CheckpointError(f"{source}: weights do not fit the model in its config ({'; '.join(wrong[:3])})")
    missing, unexpected = model.load_state_dict(state, strict=False)
    if model.config.tie_weights:
        missing = [k for k in missing if k != "lm_head.weight"]
    if missing or unexpected:
        raise CheckpointError(
            f"{source}: weights do not fit the model in its config "
            f"(missing: {', '.join(missing[:5]) or 'none'}; unexpected: {', '.join(unexpected[:5]) or 'none'})"
        )


def save_checkpoint(run_dir: Path, model: GPT, config: Config, tokenizer: CharTokenizer, meta: dict[str, Any],
                    train_tensors: dict[str, torch.Tensor], train_state: dict[str, Any], is_best: bool) -> Path:
    """Write a complete checkpoint, then point latest.json (and best.json if is_best) at it."""
    step = int(meta["step"])
    checkpoints = run_dir / CHECKPOINTS_DIR
    if checkpoints.is_symlink():
        raise CheckpointWriteError(f"could not save the checkpoint for step {step}: {checkpoints} is a symbolic "
                                   f"link, and minigpt writes only inside the run folder")
    had_one = pointer_target(run_dir, "latest") is not None
    name = f"step-{step:07d}"
    # The same step saved again (an interrupt right after a periodic save, say) gets a new folder, so
    # the one the pointers name stays whole until they move; prune removes it afterwards.
    n = 1
    while os.path.lexists(checkpoints / name):
        n += 1
        name = f"step-{step:07d}-{n}"
    final = checkpoints / name
    tmp = checkpoints / f"{TMP_PREFIX}{name}.{os.getpid()}"
    full_meta = {
        "format_version": FORMAT_VERSION,
        "config": config.to_dict(),
        "config_name": config.name,
        "vocab": tokenizer.to_dict(),
        "torch_version": torch.__version__,
        "saved_at": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        **meta,
    }
    try:
        checkpoints.mkdir(parents=True, exist_ok=True)
        _remove_checkpoint_folder(tmp)
        tmp.mkdir()
        save_file(model_tensors(model), str(tmp / MODEL_FILE), metadata={"format": "pt"})
        save_file(train_tensors or {"_empty": torch.zeros(0)}, str(tmp / STATE_FILE))
        write_bytes_synced(tmp / STATE_JSON, strict_json(train_state).encode("utf-8"))
        write_bytes_synced(tmp / META_FILE, (strict_json(full_meta, indent=2) + "\n").encode("utf-8"))
        for f in (MODEL_FILE, STATE_FILE):
            with open(tmp / f, "rb+") as handle:
                os.fsync(handle.fileno())
        fsync_dir(tmp)
        os.replace(tmp, final)
        fsync_dir(checkpoints)
        point(run_dir, LATEST, final, step)
        if is_best:
            point(run_dir, BEST, final, step)
    except (OSError, SafetensorError) as exc:
        # safetensors reports a full disk as SafetensorError ("... No space left on device (os error 28)").
        _remove_checkpoint_folder(tmp)
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise CheckpointWriteError(
            f"could not save the checkpoint for step {step} in {run_dir}: {reason}; "
            + ("the previous checkpoint is intact" if had_one else "no checkpoint had been saved yet")
        ) from exc
    prune(run_dir)
    return final


def _remove_checkpoint_folder(path: Path) -> bool:
    """Remove a checkpoint folder minigpt wrote: a real folder (not a link) holding nothing but the
    files of a checkpoint (and safetensors' temporary file of a save killed while writing one).
    Anything else in it, and it stays."""
    try:
        if not path.is_dir() or path.is_symlink():
            return False
        names = os.listdir(path)
        if any(name not in CHECKPOINT_FILES and not SAFETENSORS_TMP_NAME.fullmatch(name) for name in names):
            return False
        for name in [n for n in names if SAFETENSORS_TMP_NAME.fullmatch(n)] + list(CHECKPOINT_FILES):
            if name in names and not (path / name).is_symlink() and (path / name).is_file():
                (path / name).unlink()
        path.rmdir()
    except OSError:
        return False
    return True


def prune(run_dir: Path) -> None:
    """Remove leftovers of interrupted saves and checkpoints that neither pointer names: only folders
    and files with minigpt's own names, never through a symbolic link."""
    keep = {p for p in (pointer_target(run_dir, "latest"), pointer_target(run_dir, "best")) if p}
    folder = run_dir / CHECKPOINTS_DIR
    if not keep or folder.is_symlink() or not folder.is_dir():
        return
    for entry in folder.iterdir():
        # Only the writer (it holds the run's lock, one save at a time) calls this, so no save is in flight here.
        if TMP_CHECKPOINT_NAME.fullmatch(entry.name) or (CHECKPOINT_NAME.fullmatch(entry.name) and entry not in keep):
            _remove_checkpoint_folder(entry)
    for entry in run_dir.iterdir():
        if TMP_FILE_NAME.fullmatch(entry.name) and entry.is_file() and not entry.is_symlink():
            entry.unlink(missing_ok=True)


# -- the run directory's life: claimed new, proven ours for --resume, locked while written -----------

def find_checkpoint(path: Path | None, which: str = "best") -> Path:
    """A checkpoint folder from a run directory (its best or latest) or a checkpoint folder itself."""
    if path is None:
        path = newest_run()
    path = Path(path)
    if path.is_file():
        if path.name in (MODEL_FILE, META_FILE):
            path = path.parent
        else:
            raise CheckpointError(f"{path} is not a minigpt run: expected a run directory or a checkpoint folder")
    if not path.exists():
        raise CheckpointError(f"run not found: {path}")
    if (path / META_FILE).exists() or (path / MODEL_FILE).exists():
        return path
    target = pointer_target(path, which) or pointer_target(path, "latest" if which == "best" else "best")
    if target is None:
        complete = complete_checkpoints(path)
        if not complete:
            raise CheckpointError(f"{path} holds no checkpoint (is it a run directory made by `minigpt train`?)")
        target = complete[-1]
    return target


def load_checkpoint(path: Path | None, which: str = "best", with_train_state: bool = False) -> LoadedCheckpoint:
    """A whole checkpoint of a run (its best or latest) or a checkpoint folder itself. A writer may prune
    the folder a pointer named while it is read: then the pointers are read again, so a reader beside
    a running `train` always gets a whole checkpoint."""
    for attempt in range(LOAD_ATTEMPTS):
        folder = find_checkpoint(path, which)
        try:
            return _load_folder(folder, with_train_state)
        except (CheckpointError, OSError):
            chosen = path is None or Path(path).resolve() != folder.resolve()  # by a pointer, not named
            if attempt + 1 < LOAD_ATTEMPTS and chosen and _moved_on(folder, path, which):
                continue
            raise
    raise AssertionError("unreachable")


LOAD_ATTEMPTS = 20


def _moved_on(folder: Path, path: Path | None, which: str) -> bool:
    """Whether the folder was pruned under the reader (the pointers name another one now)."""
    try:
        return not (folder / META_FILE).is_file() or find_checkpoint(path, which) != folder
    except CheckpointError:
        return False


def _load_folder(folder: Path, with_train_state: bool) -> LoadedCheckpoint:
    run_dir = folder.parent.parent if folder.parent.name == CHECKPOINTS_DIR else folder
    meta_path = folder / META_FILE
    try:
        meta = loads_bounded(read_bounded(meta_path, META_MAX_BYTES), meta_path)
    except FileNotFoundError:
        raise CheckpointError(f"{meta_path}: missing (the checkpoint is incomplete)") from None
    except (OSError, UnicodeDecodeError, ValueError, RecursionError):
        raise CheckpointError(f"{meta_path}: unreadable or not JSON (truncated or corrupted checkpoint)") from None
    if not isinstance(meta, dict) or "config" not in meta or "vocab" not in meta:
        raise CheckpointError(f"{meta_path}: not minigpt checkpoint metadata")
    version = meta.get("format_version")
    if version != FORMAT_VERSION:
        raise CheckpointError(f"{meta_path}: checkpoint format {version!r}; this minigpt reads format {FORMAT_VERSION}")
    for key in ("step", "tokens"):
        if type(meta.get(key, 0)) is not int or meta.get(key, 0) < 0:
            raise CheckpointError(f"{meta_path}: '{key}' must be a whole number, got {meta.get(key)!r}")
    for key in ("best_val_loss", "val_loss", "train_seconds"):
        if meta.get(key) is not None and type(meta[key]) not in (int, float):
            raise CheckpointError(f"{meta_path}: '{key}' must be a number, got {meta[key]!r}")
    try:
        config = config_from_checkpoint_dict(meta["config"], name=meta.get("config_name", "checkpoint"))
        tokenizer = CharTokenizer.from_dict(meta["vocab"])
    except (UserError, ValueError) as exc:
        raise CheckpointError(f"{meta_path}: invalid config or vocabulary ({exc})") from None
    model_state = _load_tensors(folder / MODEL_FILE, expected_shapes(config, tokenizer.vocab_size))
    loaded = LoadedCheckpoint(folder, run_dir, config, tokenizer, meta, model_state)
    if with_train_state:
        loaded.train_tensors = _load_tensors(folder / STATE_FILE)
        state_path = folder / STATE_JSON
        try:
            loaded.train_state = loads_bounded(read_bounded(state_path, META_MAX_BYTES), state_path)
        except (OSError, UnicodeDecodeError, ValueError, RecursionError):
            raise CheckpointError(f"{state_path}: missing or corrupted training state") from None
        if not isinstance(loaded.train_state, dict) or not isinstance(loaded.train_state.get("optimizers", []), list):
            raise CheckpointError(f"{state_path}: not minigpt training state")
    return loaded


def expected_shapes(config: Config, vocab_size: int) -> dict[str, tuple[int, ...]]:
    """The shape of every weight the config's model has, from a model on the meta device (no memory)."""
    with shapes_only():
        model = GPT(config.model, vocab_size)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if config.model.tie_weights:
        shapes.pop("lm_head.weight", None)  # saved once, as wte.weight
    return shapes


def _check_header(path: Path, expected: dict[str, tuple[int, ...]]) -> None:
    """Compare the shapes in a safetensors header with the model's before any tensor is read, so
    metadata with inflated sizes never allocates a model or reads a huge file."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        found = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    wrong = [f"{k} is {found[k]}, the model needs {shape}" for k, shape in expected.items()
             if k in found and found[k] != shape]
    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected]
    if wrong:
        raise CheckpointError(f"{path}: weights do not fit the model in its config ({'; '.join(wrong[:3])})")
    if missing or unexpected:
        raise CheckpointError(f"{path}: weights do not fit the model in its config "
                              f"(missing: {', '.join(missing[:5]) or 'none'}; "
                              f"unexpected: {', '.join(unexpected[:5]) or 'none'})")


def _load_tensors(path: Path, expected: dict[str, tuple[int, ...]] | None = None) -> dict[str, torch.Tensor]:
    try:
        info = path.stat()
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing (the checkpoint is incomplete)") from None
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read ({exc.strerror or exc})") from None
    if not stat.S_ISREG(info.st_mode):
        raise CheckpointError(f"{path}: not a regular file")
    if info.st_size == 0:
        raise CheckpointError(f"{path}: empty file (truncated checkpoint)")
    try:
        with open(path, "rb"):
            pass
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing (the checkpoint is incomplete)") from None
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read ({exc.strerror or exc})") from None
    try:
        if expected is not None:
            _check_header(path, expected)
        return load_file(str(path))
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing (the checkpoint is incomplete)") from None
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise CheckpointError(f"{path}: not a readable safetensors file ({detail})") from None

