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
import json
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
from minigpt_cli.rundir import (  # noqa: F401 (names re-exported for the modules that save and load)
                                BEST, CHECKPOINT_FILES, CHECKPOINT_NAME, CHECKPOINTS_DIR, CONFIG_FILE, DATA_COPY,
                                LATEST, LOCK_FILE, META_FILE, META_MAX_BYTES, METRICS_FILE, MODEL_FILE,
                                POINTER_MAX_BYTES, RUN_DATA_JSON, RUN_IDS, RUNS_DIR, SAFETENSORS_TMP_NAME, STATE_FILE,
                                STATE_JSON, TMP_CHECKPOINT_NAME, TMP_FILE_NAME, TMP_PREFIX, CheckpointError, RunLock,
                                RunLockedError, complete_checkpoints, finite_or_none, is_run, listing, loads_bounded,
                                pointer_target, read_bounded, strict_json, too_deep)
from minigpt_cli.tokenizer import CharTokenizer

FORMAT_VERSION = 1
METRICS_LINE_MAX_CHARS = 2**16


class CheckpointWriteError(Exception):
    """A save that failed (a full disk, say); the previous checkpoint is untouched."""


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


def new_run_dir(config_name: str, base: Path = RUNS_DIR, claim: bool = True) -> Path:
    """A directory name under base that no run has: <config>-<date>-<time>, with -2, -3, ... after it
    when taken. With `claim` the directory is created here, atomically, so two runs started in the
    same second never share one."""
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    if os.path.lexists(base) and not base.is_dir():
        raise UserError(f"cannot keep runs in {base}: it is a file, not a folder (move it, or pick another --out)")
    try:
        if claim:
            base.mkdir(parents=True, exist_ok=True)
        n = 1
        while True:
            path = base / (f"{config_name}-{stamp}" if n == 1 else f"{config_name}-{stamp}-{n}")
            try:
                if claim:
                    path.mkdir()  # fails if another run took the name first
                elif path.exists():
                    raise FileExistsError(path)
                return path
            except FileExistsError:
                n += 1
    except OSError as exc:
        raise UserError(f"cannot create a run directory under {base}: {exc.strerror or exc}") from None


def newest_run(base: Path = RUNS_DIR) -> Path:
    """The run under base whose latest checkpoint was written last."""
    candidates = []
    if base.is_dir():
        for run in base.iterdir():
            try:
                candidates.append((os.stat(run / LATEST).st_mtime, run))
            except OSError:
                continue
    if not candidates:
        raise UserError(f"no trained run found under ./{base} (train one with `minigpt train`, or pass RUN)")
    return max(candidates)[1]


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_bytes_synced(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def data_copy(run_dir: Path) -> Path | None:
    """The run's copy of its training text, if it has one."""
    path = Path(run_dir) / DATA_COPY
    return path if path.is_file() else None


def run_text(run_dir: Path) -> Path | None:
    """The text a run was trained on, kept in the run (its encoded copy, or an older run's text
    copy), which `eval` and `--resume` read instead of data.path; None: the run keeps none."""
    return run_copy(run_dir) or data_copy(run_dir)


def save_config(run_dir: Path, config: Config) -> Path:
    """Write the run's resolved config as run_dir/config.yaml (atomically), trainable as it is."""
    from minigpt_cli.config import to_yaml

    path = run_dir / CONFIG_FILE
    header = (f"The resolved config of this run. `minigpt train {path}` trains the same thing again\n"
              f"in a new run directory.")
    tmp = path.with_name(f"{TMP_PREFIX}{CONFIG_FILE}.{os.getpid()}")
    try:
        _write_bytes_synced(tmp, to_yaml(config, header).encode("utf-8"))
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise CheckpointWriteError(f"could not write {path}: {exc.strerror or exc}") from exc
    return path


def atomic_write_json(path: Path, value: Any) -> None:
    tmp = path.with_name(f"{TMP_PREFIX}{path.name}.{os.getpid()}")
    try:
        _write_bytes_synced(tmp, (strict_json(value, indent=2) + "\n").encode("utf-8"))
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


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
        _write_bytes_synced(tmp / STATE_JSON, strict_json(train_state).encode("utf-8"))
        _write_bytes_synced(tmp / META_FILE, (strict_json(full_meta, indent=2) + "\n").encode("utf-8"))
        for f in (MODEL_FILE, STATE_FILE):
            with open(tmp / f, "rb+") as handle:
                os.fsync(handle.fileno())
        _fsync_dir(tmp)
        os.replace(tmp, final)
        _fsync_dir(checkpoints)
        pointer = {"checkpoint": f"{CHECKPOINTS_DIR}/{name}", "step": step}
        atomic_write_json(run_dir / LATEST, pointer)
        if is_best:
            atomic_write_json(run_dir / BEST, pointer)
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

def prepare_run_dir(out: Path | None, config_name: str, resume: bool, claim: bool = True) -> tuple[Path, bool]:
    """The run directory of `minigpt train`, checked and claimed; returns (path, created here).

    A new run goes into a new or empty folder (or one minigpt claimed for a run that never saved a
    checkpoint); with no --out, a fresh name under ./runs. --resume takes only a folder holding a
    run. Anything else is refused, so a run never writes among, or removes, files it did not make.
    """
    if out is None:
        if resume:
            try:
                return newest_run(), False
            except UserError:
                raise UserError("no run to resume under ./runs: name one with --out RUN_DIR") from None
        path = new_run_dir(config_name, claim=claim)
        return path, claim
    path = Path(out)
    if resume:
        if not path.exists():
            raise CheckpointError(f"run not found: {path}")
        if (path / CHECKPOINTS_DIR).is_symlink():
            raise UserError(f"{path / CHECKPOINTS_DIR} is a symbolic link; minigpt keeps a run's checkpoints inside "
                            f"its folder (replace the link with a copy of what it points to)")
        if not path.is_dir() or not is_run(path):
            raise CheckpointError(f"{path} holds no minigpt run to resume (no checkpoint in it); "
                                  f"start a new run without --resume")
        return path, False
    if path.exists() and not path.is_dir():
        raise UserError(f"cannot create run directory {path}: a file is in the way")
    names = set(listing(path))
    if is_run(path):
        raise UserError(f"{path} already holds a run; continue it with --resume, or pick another --out")
    if names and LOCK_FILE not in names:
        raise UserError(f"{path} is not empty and is not a minigpt run; pick a new or empty folder for --out")
    if not claim:
        return path, False
    created = not path.exists()
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot create run directory {path}: {exc.strerror or exc}") from None
    return path, created


def remove_unused_run_dir(path: Path) -> None:
    """Remove a run directory this process created, for a run that failed before its first checkpoint:
    the files such a run writes (lock, config, text copy, records, temporary files) go, then the folder
    if nothing else is in it."""
    if is_run(path) or (path / CHECKPOINTS_DIR).exists():
        return
    try:
        with RunLock(path):  # not while another process writes here
            for name in listing(path):
                entry = path / name
                if (name in (LOCK_FILE, CONFIG_FILE, DATA_COPY, RUN_IDS, RUN_DATA_JSON, METRICS_FILE)
                        or TMP_FILE_NAME.fullmatch(name)) \
                        and entry.is_file() and not entry.is_symlink():
                    entry.unlink(missing_ok=True)
    except (UserError, OSError):
        return
    try:
        path.rmdir()  # fails, and so keeps it, unless the directory is empty
    except OSError:
        pass


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


def _open_nofollow(path: str, flags: int) -> int:
    """os.open that does not follow a link at the last name: a link in a run folder is not written through."""
    return os.open(path, flags | getattr(os, "O_NOFOLLOW", 0), 0o644)


def append_metrics(run_dir: Path, record: dict[str, Any]) -> None:
    path = run_dir / METRICS_FILE
    try:
        with open(path, "a", encoding="utf-8", opener=_open_nofollow) as f:
            f.write(strict_json(record) + "\n")
    except OSError as exc:
        kept = "the last checkpoint is intact" if pointer_target(run_dir, "latest") else "no checkpoint had been saved yet"
        raise CheckpointWriteError(f"could not write {path}: {exc.strerror or exc}; {kept}") from exc


def read_metrics(run_dir: Path, strict: bool = False) -> list[dict[str, Any]]:
    """The records of metrics.jsonl, skipping lines minigpt did not write whole (a crash can cut the
    last one short). An unreadable file reads as no records, or raises OSError with `strict`."""
    path = run_dir / METRICS_FILE
    try:
        text = path.read_text(encoding="utf-8", errors="replace") if path.is_file() else ""
    except OSError:
        if strict:
            raise
        text = ""
    records = []
    for line in text.splitlines():
        if len(line) > METRICS_LINE_MAX_CHARS or too_deep(line):
            continue  # not a line minigpt wrote
        try:
            record = json.loads(line)
        except (ValueError, RecursionError):
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


def _step_of(record: dict[str, Any]) -> int:
    try:
        return int(record.get("step", 0))
    except (TypeError, ValueError):
        return 0


def truncate_metrics(run_dir: Path, step: int) -> None:
    """On resume, drop records past the checkpoint's step so the curve has no repeated steps."""
    path = run_dir / METRICS_FILE
    if not path.is_file():
        return
    try:
        kept = [r for r in read_metrics(run_dir, strict=True) if _step_of(r) <= step]
    except OSError as exc:
        raise CheckpointWriteError(f"could not read {path}: {exc.strerror or exc}") from exc
    tmp = path.with_name(f"{TMP_PREFIX}metrics.{os.getpid()}")
    try:
        tmp.write_text("".join(strict_json(r) + "\n" for r in kept), encoding="utf-8")
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise CheckpointWriteError(f"could not rewrite {path}: {exc.strerror or exc}") from exc
