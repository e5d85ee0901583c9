"""A run folder without torch: the names minigpt writes in it, bounded reading of its JSON, the
pointers to its checkpoints, the lock its writer holds, and what of it minigpt may delete.

    runs/default-20261124-101500/
        .minigpt.lock      flock-ed by the training process while it writes the run
        config.yaml        the resolved config
        data.npy, data.json    the encoded training text and what it is (data.txt in older runs)
        metrics.jsonl      one JSON object per log line or evaluation
        latest.json        {"checkpoint": "checkpoints/step-0002000"}, replaced atomically
        best.json          the checkpoint with the lowest validation loss
        checkpoints/step-0002000/
            meta.json, model.safetensors, state.safetensors, state.json

Everything else in such a folder is the user's: `runs`, `runs rm` and pruning never delete it.
checkpoint.py (save/load, with torch), runs.py (listing, deleting) and data.py share these names.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import os
import re
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional

from minigpt_cli.config import Config, UserError

try:
    import fcntl
except ImportError:  # Windows: runs are not locked there
    fcntl = None  # type: ignore[assignment]

RUNS_DIR = Path("runs")
LATEST, BEST = "latest.json", "best.json"
CHECKPOINTS_DIR = "checkpoints"
META_FILE, MODEL_FILE = "meta.json", "model.safetensors"
STATE_FILE, STATE_JSON = "state.safetensors", "state.json"
CONFIG_FILE, METRICS_FILE = "config.yaml", "metrics.jsonl"
LOCK_FILE = ".minigpt.lock"
RUN_IDS, RUN_DATA_JSON = "data.npy", "data.json"  # the encoded text (ids) and what it is
DATA_COPY = "data.txt"  # runs made before data.npy kept their training text as this file
TMP_PREFIX = ".tmp-"

CHECKPOINT_FILES = (META_FILE, MODEL_FILE, STATE_FILE, STATE_JSON)  # meta first: removed first, so a
# folder being pruned stops looking whole before its weights go
RUN_FILES = (LOCK_FILE, CONFIG_FILE, RUN_IDS, RUN_DATA_JSON, DATA_COPY, METRICS_FILE, LATEST, BEST)
# The only other names minigpt writes: its checkpoint folders, their temporary names, and the
# temporary files of its atomic writes (each ends in the writer's PID).
CHECKPOINT_NAME = re.compile(r"step-\d{7}(-\d+)?")
TMP_CHECKPOINT_NAME = re.compile(re.escape(TMP_PREFIX) + r"step-\d{7}(-\d+)?\.\d+")
TMP_FILE_NAME = re.compile(re.escape(TMP_PREFIX) + r"[\w.-]+\.\d+")
# safetensors' save_file writes each file as ".tmp" and six random letters or digits beside it, then
# renames it: a save killed meanwhile leaves one inside the checkpoint folder minigpt was writing.
SAFETENSORS_TMP_NAME = re.compile(r"\.tmp[A-Za-z0-9]{6}")


class CheckpointError(UserError):
    """A checkpoint that is missing, truncated, empty or not ours."""


# -- bounded JSON: a crafted file is refused in one line instead of filling memory or the stack -----

JSON_MAX_DEPTH = 64
POINTER_MAX_BYTES = 2**16
META_MAX_BYTES = 2**26
_JSON_TOKENS = re.compile(r'"(?:[^"\\]|\\.)*"|[\[\]{}]')  # strings (skipped) and brackets


def too_deep(text: str) -> bool:
    if text.count("[") + text.count("{") <= JSON_MAX_DEPTH:
        return False  # the common case, without a scan
    depth = 0
    for match in _JSON_TOKENS.finditer(text):
        token = match.group()
        if token in "[{":
            depth += 1
            if depth > JSON_MAX_DEPTH:
                return True
        elif token in "]}":
            depth -= 1
    return False


def loads_bounded(text: str, where: str | Path) -> Any:
    """json.loads, with nesting deeper than JSON_MAX_DEPTH refused (CheckpointError) before parsing."""
    if too_deep(text):
        raise CheckpointError(f"{where}: JSON nested deeper than {JSON_MAX_DEPTH} levels (not a file minigpt wrote)")
    return json.loads(text)


def read_bounded(path: Path, max_bytes: int) -> str:
    """The UTF-8 text of a regular file of at most max_bytes; CheckpointError for anything else (a FIFO
    is not waited on). OSError and UnicodeDecodeError pass to the caller."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    with os.fdopen(fd, "rb") as f:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise CheckpointError(f"{path}: not a regular file")
        if info.st_size > max_bytes:
            raise CheckpointError(f"{path}: {info.st_size:,} bytes, more than a minigpt run's file holds "
                                  f"({max_bytes:,}); not a file minigpt wrote")
        data = f.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise CheckpointError(f"{path}: more than {max_bytes:,} bytes; not a file minigpt wrote")
    return data.decode("utf-8")


def finite_or_none(value: Any) -> Any:
    """value in plain JSON types: a one-element tensor or numpy scalar (an optimizer's step) as its
    number, and every NaN or infinite float as None, since strict JSON (jq, JavaScript) has neither."""
    if not isinstance(value, (str, int, float, dict, list, tuple)) and callable(getattr(value, "item", None)):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): finite_or_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_none(v) for v in value]
    return value


def strict_json(value: Any, indent: int | None = None) -> str:
    return json.dumps(finite_or_none(value), indent=indent, allow_nan=False)


# -- pointers and whole checkpoints ---------------------------------------------------------------

def listing(path: Path) -> list[str]:
    try:
        return os.listdir(path)
    except OSError:
        return []


def pointer_target(run_dir: Path, which: str) -> Path | None:
    """The checkpoint folder latest.json or best.json names, if it is one of this run's and whole."""
    try:
        raw = json.loads(read_bounded(Path(run_dir) / f"{which}.json", POINTER_MAX_BYTES))
        parts = Path(raw["checkpoint"]).parts
    except (OSError, ValueError, KeyError, TypeError, CheckpointError):
        return None
    # Only checkpoints/<a checkpoint name>: a pointer never leads out of the run folder.
    if len(parts) != 2 or parts[0] != CHECKPOINTS_DIR or not CHECKPOINT_NAME.fullmatch(parts[1]):
        return None
    target = Path(run_dir) / CHECKPOINTS_DIR / parts[1]
    return target if (target / META_FILE).is_file() and not target.is_symlink() else None


def pointer_step(run_dir: Path, which: str) -> int | None:
    """The step of the checkpoint latest.json or best.json names (its folder's name: step-0002000)."""
    target = pointer_target(run_dir, which)
    return int(target.name.split("-")[1]) if target is not None else None


def complete_checkpoints(run_dir: Path) -> list[Path]:
    folder = Path(run_dir) / CHECKPOINTS_DIR
    if folder.is_symlink() or not folder.is_dir():
        return []
    return sorted(folder / name for name in listing(folder)
                  if CHECKPOINT_NAME.fullmatch(name) and not (folder / name).is_symlink()
                  and (folder / name / META_FILE).is_file())


def is_run(path: Path) -> bool:
    """path holds a minigpt run: a pointer naming one of its whole checkpoints, or one such checkpoint."""
    return bool(pointer_target(path, "latest") or pointer_target(path, "best") or complete_checkpoints(path))


# -- the writer's lock ------------------------------------------------------------------------------

def live_writer(run: Path) -> Optional[int]:
    """The PID (0 if unknown) of a process writing the run, found by trying its lock without waiting;
    None when no process holds it. Nothing is created: a run without a lock file has no writer."""
    if fcntl is None:
        return None
    try:
        fd = os.open(Path(run) / LOCK_FILE, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0)
                     | getattr(os, "O_CLOEXEC", 0))
    except OSError:
        return None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None  # a FIFO or device named like the lock: no minigpt process holds it
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
            return int(holder) if holder.isdigit() else 0
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


class RunLockedError(UserError):
    """Another process is writing to the run."""


class RunLock:
    """An exclusive lock on a run folder for the life of its writer: flock on LOCK_FILE, which the
    OS drops when the process ends (kill -9 included), so no stale lock is ever left. The file keeps
    the holder's PID for the message a second writer gets, and marks the folder as minigpt's."""

    def __init__(self, run_dir: Path, holder: str = "another minigpt train"):
        self.run_dir = Path(run_dir)
        self.holder = holder
        self.fd: int | None = None
        self.made_file = False

    def __enter__(self) -> "RunLock":
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise UserError(f"cannot create run directory {self.run_dir}: {exc.strerror or exc}") from None
        path = self.run_dir / LOCK_FILE
        self.made_file = not os.path.lexists(path)
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0)
                         | getattr(os, "O_CLOEXEC", 0), 0o644)
        except OSError as exc:
            raise UserError(f"cannot lock the run directory {self.run_dir} ({path.name}: "
                            f"{exc.strerror or exc})") from None
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_nlink > 1:  # writing our PID would change another file
            os.close(fd)
            raise UserError(f"cannot lock the run directory {self.run_dir}: {path.name} is not a regular file of "
                            f"its own (a special file or a hard link); remove it")
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
                os.close(fd)
                who = f"PID {holder}" if holder.isdigit() else "another process"
                raise RunLockedError(f"{self.run_dir} is being written by {self.holder} ({who}); wait for "
                                     f"it to finish or stop it, or pick another --out") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode("ascii"), 0)
        self.fd = fd
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.fd is None:
            return
        # A lock file this writer made in a folder it left otherwise empty goes with it.
        if self.made_file and listing(self.run_dir) == [LOCK_FILE]:
            (self.run_dir / LOCK_FILE).unlink(missing_ok=True)
        os.close(self.fd)  # releases the flock
        self.fd = None


# -- what of a folder minigpt wrote -----------------------------------------------------------------

def _regular_file(path: Path) -> bool:
    return path.is_file() and not path.is_symlink()


def _real_dir(path: Path) -> bool:
    return path.is_dir() and not path.is_symlink()


@dataclass
class RunContents:
    """A folder's entries split into what minigpt wrote (by name and kind, never through a link) and
    everything else. Paths are relative to the folder; `folders` deepest first."""
    files: list[str] = field(default_factory=list)
    folders: list[str] = field(default_factory=list)
    foreign: list[str] = field(default_factory=list)
    # (device, inode) of the folder itself (".") and of each folder in `folders`, as planned: a folder
    # swapped for another (or for a link) before the deletion is not deleted from.
    identity: dict[str, tuple[int, int]] = field(default_factory=dict)

    @property
    def minigpt_wrote_any(self) -> bool:
        return bool(self.files or self.folders)


def _identity(path: Path) -> tuple[int, int]:
    info = os.lstat(path)
    return info.st_dev, info.st_ino


def _checkpoint_contents(folder: Path, rel: str, found: RunContents) -> None:
    for name in sorted(listing(folder)):
        if (name in CHECKPOINT_FILES or SAFETENSORS_TMP_NAME.fullmatch(name)) and _regular_file(folder / name):
            found.files.append(f"{rel}/{name}")
        else:
            found.foreign.append(f"{rel}/{name}")
    found.folders.append(rel)
    found.identity[rel] = _identity(folder)


def run_contents(path: Path) -> RunContents:
    """Which entries of path (a real folder) minigpt wrote as a run folder, and which it did not."""
    path = Path(path)
    found = RunContents()
    for name in sorted(listing(path)):
        entry = path / name
        if (name in RUN_FILES or TMP_FILE_NAME.fullmatch(name)) and _regular_file(entry):
            found.files.append(name)
        elif name == CHECKPOINTS_DIR and _real_dir(entry):
            for sub in sorted(listing(entry)):
                if (CHECKPOINT_NAME.fullmatch(sub) or TMP_CHECKPOINT_NAME.fullmatch(sub)) and _real_dir(entry / sub):
                    _checkpoint_contents(entry / sub, f"{CHECKPOINTS_DIR}/{sub}", found)
                else:
                    found.foreign.append(f"{CHECKPOINTS_DIR}/{sub}")
            found.folders.append(CHECKPOINTS_DIR)
            found.identity[CHECKPOINTS_DIR] = _identity(entry)
        else:
            found.foreign.append(name)
    found.identity["."] = _identity(path)
    return found


# A walk for live runs below a folder stops after this many entries: what it did not reach is not
# deleted anyway (only minigpt's own names at the top are), so the bound costs no safety.
LIVE_SCAN_MAX_ENTRIES = 20_000


def live_runs_below(path: Path, skip_top: bool = True) -> Iterator[tuple[Path, int]]:
    """(folder, PID) for each folder under path, at any depth, whose lock a live process holds.
    Symbolic links are not followed."""
    stack, seen = [Path(path)], 0
    while stack and seen < LIVE_SCAN_MAX_ENTRIES:
        folder = stack.pop()
        if not (skip_top and folder == Path(path)):
            pid = live_writer(folder) if os.path.lexists(folder / LOCK_FILE) else None
            if pid is not None:
                yield folder, pid
        try:
            entries = list(os.scandir(folder))
        except OSError:
            continue
        seen += len(entries)
        stack += [Path(e.path) for e in entries if e.is_dir(follow_symlinks=False)]


class _Moved(Exception):
    pass


def _open_folder(name: str, dir_fd: int | None, expected: tuple[int, int] | None) -> int:
    """A descriptor on the folder `name` (relative to dir_fd), never through a link at its last name,
    and only if it is still the folder that was planned (expected identity)."""
    fd = os.open(name, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_NOFOLLOW", 0), dir_fd=dir_fd)
    info = os.fstat(fd)
    if expected is not None and (info.st_dev, info.st_ino) != expected:
        os.close(fd)
        raise _Moved(name)
    return fd


def delete_contents(path: Path, contents: RunContents) -> list[str]:
    """Delete the files and (emptied) folders run_contents found minigpt wrote, holding the run's lock
    meanwhile so no writer starts in a half-deleted run; then the folder itself if nothing is left.
    Every step works through descriptors of the folders as planned (a folder since replaced, by a link
    or anything else, is refused) and unlinks only regular files. Returns what stays: the foreign
    entries, and any of minigpt's that could not be removed."""
    path = Path(os.path.realpath(path.parent)) / path.name if path.name not in ("", ".", "..") else \
        Path(os.path.realpath(path))
    parent_fd = os.open(path.parent, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        try:
            run_fd = _open_folder(path.name, parent_fd, contents.identity.get("."))
        except (_Moved, OSError):
            raise UserError(f"{path} changed since it was listed; nothing was deleted") from None
        try:
            kept = _delete_in(run_fd, path, contents)
        finally:
            os.close(run_fd)
        if not kept:
            try:
                os.rmdir(path.name, dir_fd=parent_fd)
            except OSError:
                kept.append(".")
    finally:
        os.close(parent_fd)
    return kept


def _delete_in(run_fd: int, path: Path, contents: RunContents) -> list[str]:
    kept = list(contents.foreign)
    lock_fd = _lock_for_deletion(run_fd, path)
    folders = {".": run_fd}
    try:
        for rel in contents.files:
            if rel == LOCK_FILE:
                continue  # last, while still held
            parent, name = os.path.split(rel)
            try:
                if _unlink_file(name, _folder_fd(folders, parent or ".", contents)):
                    continue
            except (OSError, _Moved):
                pass  # its folder is gone or was replaced: nothing in it is touched
            kept.append(rel)
        for rel in contents.folders:  # deepest first, each only if now empty
            parent, name = os.path.split(rel)
            if rel in folders:
                os.close(folders.pop(rel))
            try:
                os.rmdir(name, dir_fd=_folder_fd(folders, parent or ".", contents))
            except (OSError, _Moved):
                if not any(k.startswith(rel + "/") for k in kept):
                    kept.append(rel)
        _unlink_file(LOCK_FILE, run_fd)  # still held until closed below: no writer slips in
    finally:
        for rel, fd in folders.items():
            if rel != ".":
                os.close(fd)
        if lock_fd is not None:
            os.close(lock_fd)
    return kept


def _folder_fd(folders: dict[str, int], rel: str, contents: RunContents) -> int:
    """The descriptor of a planned folder inside the run, opened once (and checked) on first use."""
    if rel not in folders:
        parent, name = os.path.split(rel)
        folders[rel] = _open_folder(name, _folder_fd(folders, parent or ".", contents), contents.identity.get(rel))
    return folders[rel]


def _unlink_file(name: str, dir_fd: int) -> bool:
    """Unlink name in dir_fd if it is a regular file (never a link or folder); False if it stays."""
    try:
        if not stat.S_ISREG(os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode):
            return False
        os.unlink(name, dir_fd=dir_fd)
    except FileNotFoundError:
        pass
    except OSError:
        return False
    return True


def _lock_for_deletion(run_fd: int, path: Path) -> int | None:
    """The run's lock, taken (created if missing) through the folder's descriptor; UserError if a
    writer holds it."""
    try:
        fd = os.open(LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0)
                     | getattr(os, "O_CLOEXEC", 0), 0o644, dir_fd=run_fd)
    except OSError as exc:
        raise UserError(f"cannot lock {path} ({LOCK_FILE}: {exc.strerror or exc}); nothing was deleted") from None
    if fcntl is not None:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise UserError(f"{path} started being written meanwhile; nothing was deleted") from None
    return fd


def bytes_on_disk(path: Path) -> int:
    try:
        info = os.lstat(path)
    except OSError:
        return 0
    return getattr(info, "st_blocks", 0) * 512 or info.st_size


# -- the run folder's life: claimed new, proven ours for --resume, written atomically, its records ----

METRICS_LINE_MAX_CHARS = 2**16


class CheckpointWriteError(Exception):
    """A save that failed (a full disk, say); the previous checkpoint is untouched."""


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


def fsync_dir(path: Path) -> None:
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


def write_bytes_synced(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def data_copy(run_dir: Path) -> Path | None:
    """The run's copy of its training text, if it has one."""
    path = Path(run_dir) / DATA_COPY
    return path if path.is_file() else None


def save_config(run_dir: Path, config: Config) -> Path:
    """Write the run's resolved config as run_dir/config.yaml (atomically), trainable as it is."""
    from minigpt_cli.config import to_yaml

    path = run_dir / CONFIG_FILE
    header = (f"The resolved config of this run. `minigpt train {path}` trains the same thing again\n"
              f"in a new run directory.")
    tmp = path.with_name(f"{TMP_PREFIX}{CONFIG_FILE}.{os.getpid()}")
    try:
        write_bytes_synced(tmp, to_yaml(config, header).encode("utf-8"))
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise CheckpointWriteError(f"could not write {path}: {exc.strerror or exc}") from exc
    return path


def atomic_write_json(path: Path, value: Any) -> None:
    tmp = path.with_name(f"{TMP_PREFIX}{path.name}.{os.getpid()}")
    try:
        write_bytes_synced(tmp, (strict_json(value, indent=2) + "\n").encode("utf-8"))
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def point(run_dir: Path, pointer: str, folder: Path, step: int) -> None:
    """Make the pointer file (LATEST or BEST) name the checkpoint in `folder`, a rename into place."""
    atomic_write_json(run_dir / pointer, {"checkpoint": f"{CHECKPOINTS_DIR}/{folder.name}", "step": step})


def read_meta(folder: Path) -> dict[str, Any]:
    """A checkpoint's meta.json, read within bounds (CheckpointError, OSError or ValueError otherwise)."""
    meta = loads_bounded(read_bounded(folder / META_FILE, META_MAX_BYTES), folder / META_FILE)
    if not isinstance(meta, dict):
        raise CheckpointError(f"{folder / META_FILE}: not a JSON object")
    return meta


def update_meta(folder: Path, **changes: Any) -> None:
    """A checkpoint's meta.json with `changes`, renamed into place; its weights are left as written."""
    atomic_write_json(folder / META_FILE, {**read_meta(folder), **changes})


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
    if names and (LOCK_FILE not in names or run_contents(path).foreign):
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
    if is_run(path):
        return  # a save completed after all: the run is kept
    try:
        delete_contents(path, run_contents(path))  # under the run's lock: not while another process writes
    except (UserError, OSError):
        pass


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
