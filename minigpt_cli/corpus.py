"""Read UTF-8 text, build the vocabulary, encode it once into a cached array, and keep it in a run."""

from __future__ import annotations

import contextlib
import errno
import functools
import hashlib
import json
import os
import re
import shutil
import signal
import stat
import struct
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Iterator

import numpy as np

from minigpt_cli.batches import release_pages
from minigpt_cli.config import UserError, default_data_path
from minigpt_cli.progress import ProgressCallback, Task, progress_task
from minigpt_cli.rundir import RUN_DATA_JSON, RUN_IDS  # data.npy: the ids; data.json: what they encode, and how kept
from minigpt_cli.tokenizer import CharTokenizer, UnknownCharactersError


# Text is read, hashed and encoded this many bytes at a time, so memory does not grow with the corpus.
CHUNK_BYTES = 4 * 2**20
BOM = b"\xef\xbb\xbf"
MAX_CODE_POINT = 0x110000


@dataclass(frozen=True)
class TextSource:
    """Where a text comes from: one file, or the .txt files of a folder joined in name order."""
    files: tuple[Path, ...]
    description: str
    joined: bool  # a folder's files: each ends with a newline, so one's last line does not run into the next


def text_source(path: str | Path) -> TextSource:
    path = Path(path).expanduser()
    if path.is_dir():
        files = tuple(sorted(p for p in path.rglob("*.txt") if p.is_file()))
        if not files:
            raise UserError(f"data folder {path} has no .txt files")
        return TextSource(files, f"{path} ({len(files)} files)", True)
    if path.is_file():
        return TextSource((path,), str(path), False)
    if path.exists():
        raise UserError(f"data path {path} is not a regular file or a folder")
    raise UserError(f"data path not found: {path}")


def _complete_utf8(data: bytes) -> int:
    """Length of the longest prefix of data that does not end inside a UTF-8 sequence."""
    for back in range(1, min(4, len(data)) + 1):
        byte = data[-back]
        if byte & 0xC0 != 0x80:  # a lead byte (or ASCII): does its sequence fit?
            need = 1 if byte < 0x80 else 2 if byte >> 5 == 0b110 else 3 if byte >> 4 == 0b1110 else 4
            return len(data) if need <= back else len(data) - back
    return len(data)


def _chunks(source: TextSource, chunk_bytes: int, decode: bool = True,
            task: Task | None = None) -> Iterator[tuple[bytes, str | None]]:
    """(UTF-8 bytes, decoded text or None) pieces of the text as minigpt reads it: a leading byte order
    mark dropped from each file, and a folder's files each ending with a newline. Pieces end on
    character boundaries; invalid UTF-8 raises a UserError naming the file and the byte offset.
    A task is advanced by the bytes read."""
    for file in source.files:
        offset = 0  # of the next piece in the file, in bytes
        pending = b""
        last = b""
        try:
            with open(file, "rb") as f:
                while True:
                    block = f.read(chunk_bytes)
                    if task is not None:
                        task.advance(len(block))
                    data = pending + block
                    if offset == 0 and (len(data) >= len(BOM) or not block) and data.startswith(BOM):
                        data, offset = data[len(BOM):], len(BOM)
                    elif offset == 0 and block and len(data) < len(BOM):
                        pending = data
                        continue
                    cut = _complete_utf8(data) if block else len(data)
                    piece, pending = data[:cut], data[cut:]
                    text = _decode_utf8(piece, str(file), offset) if decode else None
                    if piece:
                        last = piece[-1:]
                        yield piece, text
                    offset += len(piece)
                    if not block:
                        break
        except OSError as exc:
            raise UserError(f"cannot read {file}: {exc.strerror or exc}") from None
        if source.joined and last != b"\n":
            yield b"\n", "\n"


def _decode_utf8(raw: bytes, where: str, offset: int = 0) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UserError(
            f"{where} is not valid UTF-8: byte 0x{raw[exc.start]:02x} at offset {offset + exc.start} ({exc.reason})"
        ) from None


def read_text(path: str | Path) -> tuple[str, str]:
    """Return (text, description) from a file, a folder of .txt files, or '-' for stdin, whole in memory
    (for small texts; corpora go through load_corpus, which never holds the text)."""
    if str(path) == "-":
        if sys.stdin is None or sys.stdin.isatty():
            raise UserError("--data - reads text from stdin, but stdin is a terminal (pipe text in)")
        text = _decode_utf8(sys.stdin.buffer.read(), "stdin").removeprefix("\ufeff")
        source = "stdin"
    else:
        found = text_source(path)
        text = "".join(piece for _, piece in _chunks(found, CHUNK_BYTES))
        source = found.description
    if not text:
        raise UserError(f"data from {source} is empty")
    return text, source


def dtype_for_vocab(vocab_size: int) -> np.dtype:
    """The smallest unsigned integer type that holds every token id."""
    for dtype in (np.uint8, np.uint16, np.uint32):
        if vocab_size <= np.iinfo(dtype).max + 1:
            return np.dtype(dtype)
    raise AssertionError("vocabulary larger than 2**32")


def _code_points(text: str) -> np.ndarray:
    return np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)


class _Encoder:
    """Code point -> id through one lookup table (a few MB), instead of a search per character."""

    def __init__(self, tokenizer: CharTokenizer):
        self.dtype = dtype_for_vocab(tokenizer.vocab_size)
        self.table = np.zeros(MAX_CODE_POINT, dtype=self.dtype)
        self.known = np.zeros(MAX_CODE_POINT, dtype=bool)
        codes = np.array([ord(c) for c in tokenizer.chars], dtype=np.int64)
        self.table[codes] = np.arange(len(codes))
        self.known[codes] = True

    def __call__(self, text: str) -> np.ndarray | None:
        """The ids of text, or None when it has a character outside the vocabulary."""
        codes = _code_points(text)
        if not self.known[codes].all():
            return None
        return self.table[codes]


def encode_array(text: str, tokenizer: CharTokenizer) -> np.ndarray:
    """Vectorised encode of a text in memory."""
    ids = _Encoder(tokenizer)(text)
    if ids is None:
        raise UnknownCharactersError(tokenizer.unknown(text), "data")
    return ids


def cache_dir() -> Path:
    override = os.environ.get("MINIGPT_CACHE_DIR")
    if override:
        return Path(override)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "minigpt"


def _size(source: TextSource) -> int:
    try:
        return sum(f.stat().st_size for f in source.files)
    except OSError:
        return 0


def fingerprint_text(source: TextSource, chunk_bytes: int = CHUNK_BYTES,
                     progress: ProgressCallback | None = None) -> str:
    """SHA-256 of the whole text as minigpt reads it (UTF-8, without a byte order mark). Every byte is
    read: a same-size edit with the old modification time still changes it (cost: one read of the
    file and about 3 s per GB on a slow core)."""
    digest = hashlib.sha256()
    with progress_task(progress, "hashing text", total=_size(source), unit="bytes") as task:
        for piece, _ in _chunks(source, chunk_bytes, decode=False, task=task):
            digest.update(piece)
    return digest.hexdigest()


def _changed_while_read(source: TextSource) -> UserError:
    return UserError(f"{source.description} changed while minigpt read it (two reads of it differ); "
                     f"run again once nothing writes to it")


def _scan(source: TextSource, chunk_bytes: int,
          progress: ProgressCallback | None = None) -> tuple[CharTokenizer, int, str]:
    """First pass: the vocabulary (every character the text has), the number of characters, and the
    SHA-256 of the bytes read (so the vocabulary is known to be that of the fingerprinted text)."""
    counts = np.zeros(MAX_CODE_POINT, dtype=np.int64)
    n_chars = 0
    digest = hashlib.sha256()
    with progress_task(progress, "reading the vocabulary", total=_size(source), unit="bytes") as task:
        for piece, text in _chunks(source, chunk_bytes, task=task):
            digest.update(piece)
            counts += np.bincount(_code_points(text), minlength=MAX_CODE_POINT)
            n_chars += len(text)
    if not n_chars:
        raise UserError(f"data from {source.description} is empty")
    return CharTokenizer(chr(c) for c in np.flatnonzero(counts)), n_chars, digest.hexdigest()


# .npy header written before the number of characters is known and rewritten in place after:
# 128 bytes holds any length.
NPY_HEADER_BYTES = 128


def _npy_header(n: int, dtype: np.dtype) -> bytes:
    header = repr({"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": (n,)})
    header = header.ljust(NPY_HEADER_BYTES - 11) + "\n"
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(header)) + header.encode("latin1")


def _encode_to(path: Path, source: TextSource, tokenizer: CharTokenizer, chunk_bytes: int,
               progress: ProgressCallback | None = None) -> tuple[int, str]:
    """Second pass: write the ids of the text to path (.npy) a chunk at a time; returns their number
    and the SHA-256 of the bytes encoded, hashed in the same pass (a text replaced between the passes
    must not be cached under the first one's fingerprint)."""
    encode = _Encoder(tokenizer)
    n = 0
    digest = hashlib.sha256()
    with open(path, "wb") as f, progress_task(progress, "encoding text", total=_size(source), unit="bytes") as task:
        f.write(_npy_header(0, encode.dtype))
        for piece, text in _chunks(source, chunk_bytes, task=task):
            digest.update(piece)
            ids = encode(text)
            if ids is None:
                raise UnknownCharactersError(_unknown(source, tokenizer, chunk_bytes), source.description)
            f.write(ids.tobytes())
            n += len(ids)
        f.seek(0)
        f.write(_npy_header(n, encode.dtype))
    return n, digest.hexdigest()


def _unknown(source: TextSource, tokenizer: CharTokenizer, chunk_bytes: int) -> list[str]:
    chars: set[str] = set()
    for _, text in _chunks(source, chunk_bytes):
        chars |= set(text) - tokenizer.stoi.keys()
    return sorted(chars)


def _open_regular(path: Path) -> BinaryIO:
    """path opened for reading, if it is a regular file; OSError for anything else. Opened
    non-blocking, so a FIFO in place of a cache file is refused at once instead of waited on."""
    f = open(path, "rb", opener=lambda name, flags: os.open(name, flags | getattr(os, "O_NONBLOCK", 0)))
    if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
        f.close()
        raise OSError(errno.EINVAL, "not a regular file", str(path))
    return f


def _open_ids(path: Path, n_chars: int | None, vocab_size: int, chunk_bytes: int = CHUNK_BYTES,
              check: bool = True) -> np.memmap | None:
    """A read-only memory map of an encoded array fit to train on, or None: a regular file, its shape
    and dtype right, and (with check) every id inside the vocabulary. Ids are checked with plain reads,
    a chunk at a time (through a memory map every page read would stay resident)."""
    try:
        with _open_regular(path) as f:
            version = np.lib.format.read_magic(f)
            read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                           else np.lib.format.read_array_header_2_0)
            shape, fortran, dtype = read_header(f)
            if (len(shape) != 1 or fortran or dtype != dtype_for_vocab(vocab_size) or shape[0] == 0
                    or (n_chars is not None and shape[0] != n_chars)):
                return None
            offset = f.tell()
            if check and not _ids_inside(f, shape[0], dtype, vocab_size, chunk_bytes):
                return None
            # Mapped from the file just checked (not opened again by name, which could now be another).
            return np.memmap(f, dtype=dtype, mode="r", shape=shape, offset=offset)
    except (OSError, ValueError, EOFError, SyntaxError):
        return None


def _ids_inside(f: BinaryIO, n: int, dtype: np.dtype, vocab_size: int, chunk_bytes: int) -> bool:
    """Whether the n ids at f's position are all below vocab_size (and all there)."""
    if vocab_size == np.iinfo(dtype).max + 1:
        return os.fstat(f.fileno()).st_size >= f.tell() + n * dtype.itemsize
    step = max(1, chunk_bytes // dtype.itemsize)
    while n:
        block = np.fromfile(f, dtype=dtype, count=min(step, n))
        if len(block) == 0 or int(block.max()) >= vocab_size:
            return False
        n -= len(block)
    return True


def _vocab_key(tokenizer: CharTokenizer) -> str:
    return hashlib.sha256(tokenizer.to_dict()["chars"].encode("utf-8")).hexdigest()[:16]


def _write_json(path: Path, value: dict) -> None:
    tmp = path.with_name(f".tmp-{path.name}.{os.getpid()}")  # minigpt's temporary-file pattern
    try:
        tmp.write_text(json.dumps(value), encoding="utf-8")
        os.replace(tmp, path)
    except OSError:
        tmp.unlink(missing_ok=True)


def _read_json(path: Path, limit: int = 64 * 2**20) -> dict | None:
    try:
        with _open_regular(path) as f:
            raw = f.read(limit + 1)
        if len(raw) > limit:
            return None
        value = json.loads(raw.decode("utf-8"))
    except (OSError, ValueError, RecursionError):
        return None
    return value if isinstance(value, dict) else None


@dataclass
class Corpus:
    tokenizer: CharTokenizer
    train: np.ndarray  # ids, usually a read-only memory map of the cached array
    val: np.ndarray
    fingerprint: str
    source: str
    n_chars: int
    ids_path: Path | None = None  # the whole encoded text on disk, when it is there
    # encoded: read and encoded now | cached: read from the cache | run: the run's own copy; or, when
    # the ids could not be cached, what was done and why, in words.
    cache: str = "encoded"
    seconds: float = 0.0  # reading, hashing and encoding
    # A run's own copy may refer to the text it came from, and how it was kept.
    origin: dict = field(default_factory=dict)
    path: Path | None = None  # the text's file or folder (or a run's data.npy); None: stdin, read once


def _split(ids: np.ndarray, val_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    n_val = int(len(ids) * val_fraction)
    split = len(ids) - n_val
    return ids[:split], ids[split:]


# -- temporary files: removed on every way out, and those of dead processes by the next load --------

# Their names carry the writer's PID: .encoding-<pid>-<random>.npy and .stdin-<pid>-<random>.txt.
ENCODING_PREFIX, STDIN_PREFIX = ".encoding-", ".stdin-"
STALE_NAME = re.compile(r"\.(?:encoding|stdin)-(\d+)-\w+\.(?:npy|txt)")
# A writer writes steadily; one of its files untouched this long is left over even if its PID lives
# (PIDs are reused).
STALE_SECONDS = 24 * 3600


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (OSError, OverflowError):  # another user's process (EPERM), or not a PID: leave it be
        return True
    return True


def remove_stale_files(folder: Path) -> list[Path]:
    """Remove the temporary files of processes that died in the cache folder (killed while encoding
    or copying stdin); returns them. Only regular files named as minigpt names them."""
    removed = []
    try:
        names = os.listdir(folder)
    except OSError:
        return removed
    for name in names:
        match = STALE_NAME.fullmatch(name)
        if match is None:
            continue
        path = folder / name
        try:
            info = os.lstat(path)
            old = time.time() - info.st_mtime > STALE_SECONDS
            if stat.S_ISREG(info.st_mode) and (old or not _pid_alive(int(match[1]))):
                path.unlink()
                removed.append(path)
        except OSError:
            pass
    return removed


def _exit_on_sigterm(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)


@contextlib.contextmanager
def _sigterm_unwinds() -> Iterator[None]:
    """While the block runs, SIGTERM raises SystemExit(143) instead of ending the process at once, so
    that the finally clauses that remove temporary files run. Only where nothing else handles SIGTERM
    (the trainer's own handler stays) and in the main thread (the only one that may set handlers)."""
    previous = None
    try:
        if signal.getsignal(signal.SIGTERM) == signal.SIG_DFL:
            previous = signal.signal(signal.SIGTERM, _exit_on_sigterm)
    except ValueError:
        pass
    try:
        yield
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _spool_stdin(folder: Path) -> Path:
    """Standard input copied to a temporary file a chunk at a time, so it can be read twice. It is
    checked as UTF-8 as it is copied, so binary input stops at its first invalid byte, and the file
    is removed on any failure."""
    if sys.stdin is None or sys.stdin.isatty():
        raise UserError("--data - reads text from stdin, but stdin is a terminal (pipe text in)")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        handle, name = tempfile.mkstemp(dir=folder, prefix=f"{STDIN_PREFIX}{os.getpid()}-", suffix=".txt")
    except OSError:
        handle, name = tempfile.mkstemp(prefix="minigpt-stdin-", suffix=".txt")
    spool = Path(name)
    try:
        with os.fdopen(handle, "wb") as f:
            offset, pending = 0, b""
            while True:
                block = sys.stdin.buffer.read(CHUNK_BYTES)
                data = pending + block
                cut = _complete_utf8(data) if block else len(data)  # a character cut by the block waits
                _decode_utf8(data[:cut], "stdin", offset)
                f.write(data[:cut])
                offset, pending = offset + cut, data[cut:]
                if not block:
                    break
    except OSError as exc:
        spool.unlink(missing_ok=True)
        raise UserError(f"cannot copy stdin to {spool}: {exc.strerror or exc}") from None
    except BaseException:
        spool.unlink(missing_ok=True)
        raise
    return spool


def load_corpus(path: str | Path | None, val_fraction: float, tokenizer: CharTokenizer | None = None,
                chunk_bytes: int = CHUNK_BYTES, progress: ProgressCallback | None = None) -> Corpus:
    """Read and encode a corpus; the last val_fraction of the text is the validation split.

    The text is never held in memory: a first pass hashes it, and on a cache miss a second builds
    the vocabulary (unless one is given) and a third writes the ids to the cache, a chunk at a time.
    The splits are read-only memory maps of the cached ids, so memory does not grow with the corpus.
    """
    began = time.perf_counter()
    if path is not None and str(path) != "-" and is_run_copy(Path(path)):
        return load_run_copy(Path(path), val_fraction, tokenizer, chunk_bytes, progress)
    remove_stale_files(cache_dir())
    spooled = None
    with _sigterm_unwinds():
        try:
            spooled = _spool_stdin(cache_dir()) if str(path) == "-" else None
            source = text_source(spooled if spooled else path if path else default_data_path())
            if spooled:
                source = TextSource(source.files, "stdin", False)
            corpus = _load(source, val_fraction, tokenizer, chunk_bytes, progress)
        finally:
            if spooled:
                spooled.unlink(missing_ok=True)
    if not spooled:
        corpus.path = Path(path if path else default_data_path()).expanduser().absolute()
    corpus.seconds = time.perf_counter() - began
    return corpus


def _load(source: TextSource, val_fraction: float, tokenizer: CharTokenizer | None, chunk_bytes: int,
          progress: ProgressCallback | None) -> Corpus:
    fingerprint = fingerprint_text(source, chunk_bytes, progress)
    folder = cache_dir()
    about_path = folder / f"{fingerprint[:32]}.json"  # the text's own vocabulary and length
    about = _read_json(about_path) or {}
    known = about.get("fingerprint") == fingerprint and isinstance(about.get("chars"), str) \
        and isinstance(about.get("n_chars"), int)
    n_chars = about["n_chars"] if known else None
    given = tokenizer is not None
    scanned = None
    if tokenizer is None:
        if known and about["chars"]:
            tokenizer = CharTokenizer(about["chars"])
        else:
            tokenizer, n_chars, digest = _scan(source, chunk_bytes, progress)
            if digest != fingerprint:
                raise _changed_while_read(source)
            scanned = tokenizer
    if n_chars == 0:
        raise UserError(f"data from {source.description} is empty")
    ids_path: Path | None = folder / f"{fingerprint[:32]}-{_vocab_key(tokenizer)}.npy"
    ids = _open_ids(ids_path, n_chars, tokenizer.vocab_size, chunk_bytes) if n_chars is not None else None
    cache = "cached"
    if ids is None:
        try:
            ids_path, n_chars, not_cached = _encode_into_cache(ids_path, source, tokenizer, fingerprint,
                                                               chunk_bytes, progress)
        except UnknownCharactersError:
            if given:
                raise
            raise _changed_while_read(source) from None  # it had only the characters its first read found
        cache = f"read and encoded, not cached ({not_cached})" if not_cached else "encoded"
        if not not_cached and (not known or (scanned and not about["chars"])):
            # The text's own vocabulary only when it was scanned (a given one may hold more characters).
            chars = "".join(scanned.chars) if scanned else about.get("chars", "") if known else ""
            _write_json(about_path, {"fingerprint": fingerprint, "n_chars": n_chars, "chars": chars})
        ids = _open_ids(ids_path, n_chars, tokenizer.vocab_size, check=False) if n_chars else None
        if not_cached:
            # A private temporary file: mapped, then unlinked (the map keeps it until it is closed).
            ids_path.unlink(missing_ok=True)
            ids_path = None
        if ids is None:
            raise UserError(f"data from {source.description} is empty" if n_chars == 0
                            else f"cannot read back the encoded text of {source.description}")
    train, val = _split(ids, val_fraction)
    return Corpus(tokenizer, train, val, fingerprint, source.description, n_chars, ids_path, cache)


def _encode_into_cache(path: Path, source: TextSource, tokenizer: CharTokenizer, fingerprint: str,
                       chunk_bytes: int, progress: ProgressCallback | None = None) -> tuple[Path, int, str]:
    """Encode into the cache entry at path. Where the cache cannot be written (not a folder,
    read-only, full), into a private temporary file instead. Returns the file, the number of ids, and
    why they are not in the cache ('' when they are)."""
    encode = functools.partial(_encode_file, source=source, tokenizer=tokenizer, fingerprint=fingerprint,
                               chunk_bytes=chunk_bytes, progress=progress)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        return (*encode(path.parent, f"{ENCODING_PREFIX}{os.getpid()}-", into=path), "")
    except OSError as exc:
        why = f"{path.parent}: {exc.strerror or exc}"
    try:
        return (*encode(None, "minigpt-encoding-", into=None), why)
    except OSError as exc:
        raise UserError(f"cannot write the encoded text of {source.description}: {why}; "
                        f"{tempfile.gettempdir()}: {exc.strerror or exc}") from None


def _encode_file(folder: Path | None, prefix: str, source: TextSource, tokenizer: CharTokenizer, fingerprint: str,
                 chunk_bytes: int, progress: ProgressCallback | None, into: Path | None) -> tuple[Path, int]:
    """Encode to a new temporary file in folder (None: the system's), made read-only (a cache entry is
    hard-linked by the runs trained on it, so it is never written in place), then renamed to into, so a
    crash or a concurrent run never leaves a half-written entry. The temporary file is removed on any
    failure; OSError: it could not be written."""
    handle, name = tempfile.mkstemp(dir=folder, prefix=prefix, suffix=".npy")
    os.close(handle)
    tmp = Path(name)
    try:
        n, digest = _encode_to(tmp, source, tokenizer, chunk_bytes, progress)
        if digest != fingerprint:
            raise _changed_while_read(source)
        os.chmod(tmp, 0o444)
        if into is not None:
            os.replace(tmp, into)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return (into or tmp), n


def scan_vocabulary(path: str | Path | None, chunk_bytes: int = CHUNK_BYTES) -> int:
    """The vocabulary size of a text (the number of distinct characters), read a chunk at a time."""
    if path is not None and is_run_copy(Path(path)):
        about = _read_json(Path(path).with_name(RUN_DATA_JSON)) or {}
        return len(about.get("chars", "")) or 1
    return _scan(text_source(path if path else default_data_path()), chunk_bytes)[0].vocab_size


# -- the run's own copy of its text --------------------------------------------------------------

# Past this size, ids that cannot be hard-linked from the cache are not copied into the run.
RUN_COPY_MAX_BYTES = 100 * 2**20


def is_run_copy(path: Path) -> bool:
    return path.name == RUN_IDS and (path.parent / RUN_DATA_JSON).is_file()


def run_copy(run_dir: Path) -> Path | None:
    """The path that stands for the run's text, if the run keeps it: its encoded copy (data.npy), or,
    for a run that keeps only a reference to its text, that same name, which load_corpus reads as the
    reference (the text it names, checked against its fingerprint)."""
    path = Path(run_dir) / RUN_IDS
    if not is_run_copy(path) or path.is_symlink():
        return None
    if path.is_file():
        return path
    about = _read_json(path.with_name(RUN_DATA_JSON)) or {}
    return path if about.get("kept") == "reference" and not path.exists() else None


def load_run_copy(path: Path, val_fraction: float, tokenizer: CharTokenizer | None = None,
                  chunk_bytes: int = CHUNK_BYTES, progress: ProgressCallback | None = None) -> Corpus:
    began = time.perf_counter()
    about = _read_json(path.with_name(RUN_DATA_JSON)) or {}
    chars, fingerprint = about.get("chars"), about.get("fingerprint")
    if not isinstance(chars, str) or not chars or not isinstance(fingerprint, str):
        raise UserError(f"{path.with_name(RUN_DATA_JSON)} is damaged: pass the text with --data PATH")
    own = CharTokenizer(chars)
    if tokenizer is not None and tokenizer.chars != own.chars:
        raise UserError(f"{path} was encoded with another vocabulary than the run's: pass the text with --data PATH")
    if about.get("kept") == "reference" and not path.exists():
        corpus = _load_reference(path, about, own, val_fraction, chunk_bytes, progress)
        corpus.seconds = time.perf_counter() - began
        return corpus
    ids = _open_ids(path, about.get("n_chars"), own.vocab_size, chunk_bytes)
    if ids is None:
        raise UserError(f"{path} is damaged (ids outside the vocabulary, or a wrong length): pass the text with "
                        f"--data PATH")
    train, val = _split(ids, val_fraction)
    source = f"{about.get('source', 'text')} (the run's encoded copy)"
    return Corpus(own, train, val, fingerprint, source, len(ids), path, "run", time.perf_counter() - began, about,
                  path)


def _load_reference(path: Path, about: dict, tokenizer: CharTokenizer, val_fraction: float, chunk_bytes: int,
                    progress: ProgressCallback | None) -> Corpus:
    """The text a run refers to (it keeps no copy), checked against the fingerprint the run recorded."""
    run_dir, text, fingerprint = path.parent, about.get("path"), about["fingerprint"]
    if not isinstance(text, str) or not text:
        raise UserError(f"{path.with_name(RUN_DATA_JSON)} is damaged: pass the text with --data PATH")
    where = f"{run_dir} keeps no copy of its text and refers to {text}"
    if not os.path.exists(text):
        raise UserError(f"{where}, which is gone: pass the text it was trained on with --data PATH")
    try:
        corpus = load_corpus(text, val_fraction, tokenizer, chunk_bytes, progress)
    except UnknownCharactersError:
        corpus = None  # characters the run's text did not have: it has changed
    if corpus is None or corpus.fingerprint != fingerprint:
        now = f"sha256 {corpus.fingerprint[:12]}, " if corpus is not None else ""
        raise UserError(f"{where}, which has changed since ({now}trained on {fingerprint[:12]}): pass the text "
                        f"it was trained on with --data PATH")
    corpus.origin = about
    return corpus


def keep_in_run(run_dir: Path, corpus: Corpus, copy_max_bytes: int | None = None) -> str:
    """Keep the corpus's ids in the run (data.npy + data.json), so that `eval` and `--resume` need
    nothing outside it: a hard link to the cache entry where the file system allows (no extra disk;
    read-only, as cache entries are, and never changed in place), else a copy up to copy_max_bytes
    (RUN_COPY_MAX_BYTES; any size for stdin, which cannot be read again), else only a reference to
    the text's path and fingerprint, which `eval` and `--resume` read and check. Returns what the run
    keeps, in words."""
    limit = RUN_COPY_MAX_BYTES if copy_max_bytes is None else copy_max_bytes
    run_dir = Path(run_dir)
    target = run_dir / RUN_IDS
    if corpus.ids_path is not None and target.exists() and corpus.ids_path.resolve() == target.resolve():
        return f"its encoded copy of {corpus.origin.get('source', corpus.source)} ({target})"
    about = {"fingerprint": corpus.fingerprint, "source": corpus.origin.get("source", corpus.source),
             "n_chars": corpus.n_chars, "chars": "".join(corpus.tokenizer.chars)}
    tmp = run_dir / f".tmp-{RUN_IDS}.{os.getpid()}"
    how, why = _put_ids(corpus, tmp, limit)
    if how is None:
        return _keep_reference(run_dir, corpus, about, why)
    about["kept"] = how
    # data.json first, then data.npy: a reader that sees data.npy sees the json that describes it.
    (run_dir / RUN_DATA_JSON).unlink(missing_ok=True)
    os.replace(tmp, target)
    _write_json(run_dir / RUN_DATA_JSON, about)
    words = ("a read-only hard link to the encoded cache, no extra disk" if how == "link"
             else f"a read-only copy, {_ids_bytes(corpus) / 2**20:,.1f} MiB")
    return f"the encoded text in {RUN_IDS} ({corpus.n_chars:,} ids; {words}) and its vocabulary in {RUN_DATA_JSON}"


def _ids_bytes(corpus: Corpus) -> int:
    return corpus.train.nbytes + corpus.val.nbytes


def _put_ids(corpus: Corpus, tmp: Path, limit: int) -> tuple[str | None, str]:
    """Put the corpus's ids at tmp, read-only: ("link" or "copy", ""), or (None, why not)."""
    tmp.unlink(missing_ok=True)
    if corpus.ids_path is not None:
        try:
            os.link(corpus.ids_path, tmp)
            return "link", ""
        except OSError as exc:
            why = f"the encoded cache cannot be linked into the run: {exc.strerror or exc}"
    else:
        why = f"the encoded text is not cached: {corpus.cache}"
    size = _ids_bytes(corpus)
    if size > limit and corpus.path is not None:
        return None, f"{why}; its {size / 2**20:,.1f} MiB of ids are more than the {limit / 2**20:,.1f} MiB copied"
    try:
        _copy_ids(corpus, tmp)
        os.chmod(tmp, 0o444)
        return "copy", ""
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        return None, f"{why}; a copy could not be written: {exc.strerror or exc}"


def _copy_ids(corpus: Corpus, tmp: Path) -> None:
    if corpus.ids_path is not None:
        shutil.copyfile(corpus.ids_path, tmp)
        return
    # Not cached: the ids are only in the corpus's memory maps (of a file already unlinked).
    n, step = corpus.n_chars, max(1, CHUNK_BYTES // corpus.train.itemsize)
    with open(tmp, "wb") as f:
        f.write(_npy_header(n, corpus.train.dtype))
        for ids in (corpus.train, corpus.val):
            for i in range(0, len(ids), step):
                f.write(np.ascontiguousarray(ids[i:i + step]).tobytes())
                release_pages(ids)


def _keep_reference(run_dir: Path, corpus: Corpus, about: dict, why: str) -> str:
    """The run keeps no copy of its text: data.json names the text and its fingerprint (any old copy goes)."""
    (run_dir / RUN_IDS).unlink(missing_ok=True)
    if corpus.path is None:  # stdin, read once: nothing to refer to
        (run_dir / RUN_DATA_JSON).unlink(missing_ok=True)
        return f"no copy of the text from {corpus.source} ({why}): `eval` and `--resume` need it again with --data"
    about.update(kept="reference", path=str(corpus.path))
    _write_json(run_dir / RUN_DATA_JSON, about)
    return (f"no copy of the text ({why}): it refers to {corpus.path} (sha256 {corpus.fingerprint[:12]}), "
            f"which `eval` and `--resume` read and check against that fingerprint")


def check_split_lengths(corpus: Corpus, block_size: int) -> None:
    for name, ids in (("train", corpus.train), ("val", corpus.val)):
        if len(ids) < block_size + 1:
            raise UserError(
                f"the {name} split of {corpus.source} has {len(ids)} characters, fewer than "
                f"block_size + 1 = {block_size + 1}; use more text, a smaller model.block_size, "
                f"or another data.val_fraction"
            )
