"""Read UTF-8 text, build the vocabulary, encode once into a cached array, and draw reproducible batches."""

from __future__ import annotations

import functools
import hashlib
import json
import mmap
import os
import shutil
import struct
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from minigpt_cli.config import UserError, default_data_path
from minigpt_cli.progress import ProgressCallback, Task, progress_task
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


def _scan(source: TextSource, chunk_bytes: int,
          progress: ProgressCallback | None = None) -> tuple[CharTokenizer, int]:
    """First pass: the vocabulary (every character the text has) and the number of characters."""
    counts = np.zeros(MAX_CODE_POINT, dtype=np.int64)
    n_chars = 0
    with progress_task(progress, "reading the vocabulary", total=_size(source), unit="bytes") as task:
        for _, text in _chunks(source, chunk_bytes, task=task):
            counts += np.bincount(_code_points(text), minlength=MAX_CODE_POINT)
            n_chars += len(text)
    if not n_chars:
        raise UserError(f"data from {source.description} is empty")
    return CharTokenizer(chr(c) for c in np.flatnonzero(counts)), n_chars


# .npy header written before the number of characters is known and rewritten in place after:
# 128 bytes holds any length.
NPY_HEADER_BYTES = 128


def _npy_header(n: int, dtype: np.dtype) -> bytes:
    header = repr({"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": (n,)})
    header = header.ljust(NPY_HEADER_BYTES - 11) + "\n"
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(header)) + header.encode("latin1")


def _encode_to(path: Path, source: TextSource, tokenizer: CharTokenizer, chunk_bytes: int,
               progress: ProgressCallback | None = None) -> int:
    """Second pass: write the ids of the text to path (.npy) a chunk at a time; returns their number."""
    encode = _Encoder(tokenizer)
    n = 0
    with open(path, "wb") as f, progress_task(progress, "encoding text", total=_size(source), unit="bytes") as task:
        f.write(_npy_header(0, encode.dtype))
        for _, text in _chunks(source, chunk_bytes, task=task):
            ids = encode(text)
            if ids is None:
                raise UnknownCharactersError(_unknown(source, tokenizer, chunk_bytes), source.description)
            f.write(ids.tobytes())
            n += len(ids)
        f.seek(0)
        f.write(_npy_header(n, encode.dtype))
    return n


def _unknown(source: TextSource, tokenizer: CharTokenizer, chunk_bytes: int) -> list[str]:
    chars: set[str] = set()
    for _, text in _chunks(source, chunk_bytes):
        chars |= set(text) - tokenizer.stoi.keys()
    return sorted(chars)


def _ids_ok(path: Path, n_chars: int | None, vocab_size: int, chunk_bytes: int) -> bool:
    """An encoded array fit to train on: its shape, dtype and every id inside the vocabulary. Read with
    plain reads, a chunk at a time (through a memory map every page read would stay resident)."""
    try:
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                           else np.lib.format.read_array_header_2_0)
            shape, fortran, dtype = read_header(f)
            if (len(shape) != 1 or fortran or dtype != dtype_for_vocab(vocab_size)
                    or (n_chars is not None and shape[0] != n_chars)):
                return False
            left = shape[0]
            if left == 0 or vocab_size == np.iinfo(dtype).max + 1:
                return left > 0 or n_chars == 0
            step = max(1, chunk_bytes // dtype.itemsize)
            while left:
                block = np.fromfile(f, dtype=dtype, count=min(step, left))
                if len(block) == 0 or int(block.max()) >= vocab_size:
                    return False
                left -= len(block)
    except (OSError, ValueError, EOFError, SyntaxError):
        return False
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
        if path.stat().st_size > limit:
            return None
        value = json.loads(path.read_text(encoding="utf-8"))
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
    cache: str = "encoded"  # encoded: read and encoded now | cached: read from the cache | run: the run's own copy
    seconds: float = 0.0  # reading, hashing and encoding
    # A run's own copy may refer to the text it came from, and how it was kept.
    origin: dict = field(default_factory=dict)


def _split(ids: np.ndarray, val_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    n_val = int(len(ids) * val_fraction)
    split = len(ids) - n_val
    return ids[:split], ids[split:]


def _spool_stdin(folder: Path) -> Path:
    """Standard input copied to a temporary file a chunk at a time, so it can be read twice."""
    if sys.stdin is None or sys.stdin.isatty():
        raise UserError("--data - reads text from stdin, but stdin is a terminal (pipe text in)")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        handle, name = tempfile.mkstemp(dir=folder, prefix=".stdin-", suffix=".txt")
    except OSError:
        handle, name = tempfile.mkstemp(prefix="minigpt-stdin-", suffix=".txt")
    with os.fdopen(handle, "wb") as f:
        while block := sys.stdin.buffer.read(CHUNK_BYTES):
            f.write(block)
    return Path(name)


def load_corpus(path: str | Path | None, val_fraction: float, tokenizer: CharTokenizer | None = None,
                chunk_bytes: int = CHUNK_BYTES, progress: ProgressCallback | None = None) -> Corpus:
    """Read and encode a corpus; the last val_fraction of the text is the validation split.

    The text is never held in memory: a first pass hashes it, and on a cache miss a second builds
    the vocabulary (unless one is given) and a third writes the ids to the cache, a chunk at a time.
    The splits are read-only memory maps of the cached ids, so memory does not grow with the corpus.
    """
    began = time.perf_counter()
    if path is not None and str(path) != "-" and is_run_copy(Path(path)):
        return load_run_copy(Path(path), val_fraction, tokenizer, chunk_bytes)
    spooled = _spool_stdin(cache_dir()) if str(path) == "-" else None
    try:
        source = text_source(spooled if spooled else path if path else default_data_path())
        if spooled:
            source = TextSource(source.files, "stdin", False)
        corpus = _load(source, val_fraction, tokenizer, chunk_bytes, progress)
    finally:
        if spooled:
            spooled.unlink(missing_ok=True)
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
    scanned = None
    if tokenizer is None:
        if known and about["chars"]:
            tokenizer = CharTokenizer(about["chars"])
        else:
            tokenizer, n_chars = scanned = _scan(source, chunk_bytes, progress)
    ids_path = folder / f"{fingerprint[:32]}-{_vocab_key(tokenizer)}.npy"
    cache = "cached"
    if n_chars is None or not _ids_ok(ids_path, n_chars, tokenizer.vocab_size, chunk_bytes):
        cache = "encoded"
        ids_path, n_chars = _encode_into_cache(ids_path, source, tokenizer, chunk_bytes, progress)
    if ids_path.parent == folder and (not known or (scanned and not about["chars"])):
        # The text's own vocabulary only when it was scanned (a given one may hold more characters).
        chars = "".join(scanned[0].chars) if scanned else about.get("chars", "") if known else ""
        _write_json(about_path, {"fingerprint": fingerprint, "n_chars": n_chars, "chars": chars})
    if n_chars == 0:
        raise UserError(f"data from {source.description} is empty")
    ids = np.load(ids_path, mmap_mode="r")
    if ids_path.parent != folder:
        # A cache that could not be written: a private temporary file, mapped and then unlinked.
        ids_path.unlink(missing_ok=True)
        ids_path = None
    train, val = _split(ids, val_fraction)
    return Corpus(tokenizer, train, val, fingerprint, source.description, n_chars, ids_path, cache)


def _encode_into_cache(path: Path, source: TextSource, tokenizer: CharTokenizer, chunk_bytes: int,
                       progress: ProgressCallback | None = None) -> tuple[Path, int]:
    """Encode to a temporary name beside path and rename it into place, so a crash or a concurrent run
    never leaves a half-written cache. Where the cache cannot be written, to a temporary file."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, name = tempfile.mkstemp(dir=path.parent, prefix=".encoding-", suffix=".npy")
    except OSError:
        handle, name = tempfile.mkstemp(prefix="minigpt-encoding-", suffix=".npy")
    os.close(handle)
    tmp = Path(name)
    try:
        n = _encode_to(tmp, source, tokenizer, chunk_bytes, progress)
        os.chmod(tmp, 0o644)  # mkstemp made it private; the ids are no more private than the text
        if tmp.parent == path.parent:
            os.replace(tmp, path)
            return path, n
        return tmp, n
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def scan_vocabulary(path: str | Path | None, chunk_bytes: int = CHUNK_BYTES) -> int:
    """The vocabulary size of a text (the number of distinct characters), read a chunk at a time."""
    if path is not None and is_run_copy(Path(path)):
        about = _read_json(Path(path).with_name(RUN_DATA_JSON)) or {}
        return len(about.get("chars", "")) or 1
    return _scan(text_source(path if path else default_data_path()), chunk_bytes)[0].vocab_size


# -- the run's own copy of its text --------------------------------------------------------------

RUN_IDS = "data.npy"  # the encoded text (ids); the vocabulary is in data.json
RUN_DATA_JSON = "data.json"  # fingerprint, source, vocabulary, and how data.npy was kept
# Past this size, ids that cannot be hard-linked from the cache are not copied into the run.
RUN_COPY_MAX_BYTES = 100 * 2**20


def is_run_copy(path: Path) -> bool:
    return path.name == RUN_IDS and (path.parent / RUN_DATA_JSON).is_file()


def run_copy(run_dir: Path) -> Path | None:
    """The run's own encoded text (data.npy), if it keeps one."""
    path = Path(run_dir) / RUN_IDS
    return path if is_run_copy(path) and not path.is_symlink() else None


def load_run_copy(path: Path, val_fraction: float, tokenizer: CharTokenizer | None = None,
                  chunk_bytes: int = CHUNK_BYTES) -> Corpus:
    began = time.perf_counter()
    about = _read_json(path.with_name(RUN_DATA_JSON)) or {}
    chars, fingerprint = about.get("chars"), about.get("fingerprint")
    if not isinstance(chars, str) or not chars or not isinstance(fingerprint, str):
        raise UserError(f"{path.with_name(RUN_DATA_JSON)} is damaged: pass the text with --data PATH")
    own = CharTokenizer(chars)
    if tokenizer is not None and tokenizer.chars != own.chars:
        raise UserError(f"{path} was encoded with another vocabulary than the run's: pass the text with --data PATH")
    if not _ids_ok(path, about.get("n_chars"), own.vocab_size, chunk_bytes):
        raise UserError(f"{path} is damaged (ids outside the vocabulary, or a wrong length): pass the text with "
                        f"--data PATH")
    ids = np.load(path, mmap_mode="r")
    train, val = _split(ids, val_fraction)
    source = f"{about.get('source', 'text')} (the run's encoded copy)"
    return Corpus(own, train, val, fingerprint, source, len(ids), path, "run", time.perf_counter() - began, about)


def keep_in_run(run_dir: Path, corpus: Corpus, copy_max_bytes: int = RUN_COPY_MAX_BYTES) -> str:
    """Keep the corpus's ids in the run (data.npy + data.json), so that `eval` and `--resume` need
    nothing outside it: a hard link to the cache entry where the file system allows (no extra disk;
    cache entries are never changed in place), else a copy up to copy_max_bytes, else only a
    reference to the source with its fingerprint. Returns what the run keeps, in words."""
    run_dir = Path(run_dir)
    target = run_dir / RUN_IDS
    about = {"fingerprint": corpus.fingerprint, "source": corpus.source, "n_chars": corpus.n_chars,
             "chars": "".join(corpus.tokenizer.chars)}
    if corpus.ids_path is not None and corpus.ids_path.resolve() == target.resolve():
        return f"its encoded copy of {corpus.origin.get('source', corpus.source)} ({target})"
    tmp = run_dir / f".tmp-{RUN_IDS}.{os.getpid()}"
    size = corpus.ids_path.stat().st_size if corpus.ids_path else 0
    how = None
    if corpus.ids_path is not None:
        try:
            os.link(corpus.ids_path, tmp)
            how = "link"
        except OSError:
            if size <= copy_max_bytes:
                try:
                    shutil.copyfile(corpus.ids_path, tmp)
                    how = "copy"
                except OSError:
                    tmp.unlink(missing_ok=True)
    if how is None:
        # The run refers to its source: data.json names it and its fingerprint, and any old copy goes.
        about["kept"] = "reference"
        target.unlink(missing_ok=True)
        _write_json(run_dir / RUN_DATA_JSON, about)
        return (f"no copy of the text ({size / 2**20:,.0f} MiB of ids, too large to copy and not linkable): "
                f"it refers to {corpus.source} (sha256 {corpus.fingerprint[:12]}), which `eval` and "
                f"`--resume` will read")
    about["kept"] = how
    # data.json first, then data.npy: a reader that sees data.npy sees the json that describes it.
    (run_dir / RUN_DATA_JSON).unlink(missing_ok=True)
    os.replace(tmp, target)
    _write_json(run_dir / RUN_DATA_JSON, about)
    words = ("a hard link to the encoded cache, no extra disk" if how == "link"
             else f"a copy, {size / 2**20:,.1f} MiB")
    return f"the encoded text in {RUN_IDS} ({corpus.n_chars:,} ids; {words}) and its vocabulary in {RUN_DATA_JSON}"


def check_split_lengths(corpus: Corpus, block_size: int) -> None:
    for name, ids in (("train", corpus.train), ("val", corpus.val)):
        if len(ids) < block_size + 1:
            raise UserError(
                f"the {name} split of {corpus.source} has {len(ids)} characters, fewer than "
                f"block_size + 1 = {block_size + 1}; use more text, a smaller model.block_size, "
                f"or another data.val_fraction"
            )


def batch_indices(n_tokens: int, block_size: int, batch_size: int, seed: int, step: int,
                  micro_step: int = 0, rank: int = 0, world_size: int = 1) -> np.ndarray:
    """Window starts for one micro-batch. The whole global batch comes from one generator seeded by
    (seed, step, micro_step) and each rank takes its own slice, so any step is reproducible and
    N ranks with batch B read exactly the windows one process with batch N*B would."""
    rng = np.random.default_rng([seed, step, micro_step])
    starts = rng.integers(0, n_tokens - block_size, size=batch_size * world_size)
    return starts[rank * batch_size:(rank + 1) * batch_size]


# Above this many windows a pass over the text is longer than any run and its order would take memory
# (4 bytes a window): training then draws windows at random, as batch_indices does.
MAX_EPOCH_WINDOWS = 1 << 24


def epoch_batch_indices(n_tokens: int, block_size: int, batch_size: int, seed: int, step: int,
                        micro_step: int = 0, rank: int = 0, world_size: int = 1, accum_steps: int = 1) -> np.ndarray:
    """Window starts for one training micro-batch, in epochs: the text is cut into windows of block_size
    (shifted by a random offset each epoch, so their edges move), the windows are shuffled, and batches
    take them in that order; every window is read once an epoch before any is read again (the offset's
    first characters wait for another epoch, and the last window is pulled in to fit). Drawing
    windows at random instead (batch_indices) reads some text twice and misses some (after two epochs'
    worth, e^-2 = 14% of it): measured on the default run, epochs ended 0.016 lower (benchmarks/README.md).

    Stateless like batch_indices: micro-batch (step, micro_step) of the global batch takes windows
    [g, g + batch_size * world_size) of the shuffled sequence, g counting every window before it, and
    each rank its slice; so a step is reproducible and resuming continues the same order.
    """
    n_windows = (n_tokens - 1) // block_size
    if n_windows > MAX_EPOCH_WINDOWS:
        return batch_indices(n_tokens, block_size, batch_size, seed, step, micro_step, rank, world_size)
    position = (step * accum_steps + micro_step) * batch_size * world_size + rank * batch_size
    end, parts = position + batch_size, []
    while position < end:  # a batch may run from one epoch into the next
        epoch, index = divmod(position, n_windows)
        take = min(end - position, n_windows - index)
        order, offset = _epoch_order(n_windows, block_size, seed, epoch)
        parts.append(order[index:index + take].astype(np.int64) * block_size + offset)
        position += take
    return np.minimum(np.concatenate(parts), n_tokens - block_size - 1)


@functools.lru_cache(maxsize=2)
def _epoch_order(n_windows: int, block_size: int, seed: int, epoch: int) -> tuple[np.ndarray, int]:
    """The shuffled window order of one epoch, and its offset in [0, block_size)."""
    rng = np.random.default_rng([seed, epoch, EPOCH_STREAM])
    return rng.permutation(n_windows).astype(np.int32), int(rng.integers(0, block_size))


# Keys the epoch generators apart from batch_indices' (seed, step, micro_step) ones.
EPOCH_STREAM = 1 << 40


def release_pages(ids: np.ndarray) -> None:
    """Unmap the pages of a memory-mapped array that reads have mapped in. The kernel maps a whole
    page-cache folio per fault (up to MBs with large read-ahead), so random windows of a big corpus
    would otherwise keep growing the resident set towards the file's size; the pages stay in the
    page cache and a later read maps them again."""
    mapping = getattr(ids, "_mmap", None)  # np.memmap's mapping, shared by its slices
    if mapping is not None and hasattr(mapping, "madvise") and hasattr(mmap, "MADV_DONTNEED"):
        try:
            mapping.madvise(mmap.MADV_DONTNEED)
        except (OSError, ValueError):
            pass


def read_windows(ids: np.ndarray, starts: np.ndarray, length: int) -> np.ndarray:
    """ids[start : start + length] for each start, as int64 (B, length), leaving no page mapped."""
    windows = ids[starts[:, None] + np.arange(length)].astype(np.int64)
    release_pages(ids)
    return windows


def get_batch(ids: np.ndarray, starts: np.ndarray, block_size: int,
              device: torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    chunk = torch.from_numpy(read_windows(ids, starts, block_size + 1))  # (B, T+1)
    x, y = chunk[:, :-1], chunk[:, 1:]  # (B, T) each
    if device is not None and device.type == "cuda":
        return (x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True))
    if device is not None and device.type != "cpu":
        return x.to(device), y.to(device)
    return x, y


# The sampled windows depend only on the text's length and the window shape, never on a run's seed,
# so every run and every checkpoint on one text is measured on the same characters.
EVAL_SAMPLE_SEED = 0


@dataclass(frozen=True)
class ScoringWindows:
    """The windows that score a text of n ids, each once, and the sample of them when it is long.

    Window i (i < n_regular) reads ids[i*stride : i*stride + block_size + 1] (inputs and targets) and
    scores its targets from offset skip on: all of them in the first window, then the last `stride`
    (each sees at least block_size - stride characters of context). One tail window ends at the
    text's end, started a full window earlier so its characters get full context too. With a sample
    (`chosen`), only those regular windows are read, each scoring its last `stride` targets.
    """
    n: int
    block_size: int
    stride: int
    chosen: np.ndarray | None = None  # sorted indices of the sampled regular windows

    @property
    def n_regular(self) -> int:
        if self.n - 1 <= self.block_size:
            return 0
        return -(-(self.n - 1 - self.block_size) // self.stride)  # ceil

    @property
    def sampled(self) -> bool:
        return self.chosen is not None

    @property
    def chars(self) -> int:
        """Characters scored: every one after the first, or those of the sample."""
        return len(self.chosen) * self.stride if self.chosen is not None else max(self.n - 1, 0)

    def batches(self, batch_size: int) -> Iterator[tuple[np.ndarray, np.ndarray, int]]:
        """(begins, skips, length) per batch of windows of equal length."""
        if self.chosen is not None:
            skip = self.block_size - self.stride
            for i in range(0, len(self.chosen), batch_size):
                idx = self.chosen[i:i + batch_size]
                yield idx * self.stride, np.full(len(idx), skip), self.block_size
            return
        regular = self.n_regular
        for i in range(0, regular, batch_size):
            idx = np.arange(i, min(i + batch_size, regular))
            yield idx * self.stride, np.where(idx == 0, 0, self.block_size - self.stride), self.block_size
        if self.n >= 2:
            end = self.n - 1
            begin = max(0, end - self.block_size)
            scored_to = (regular - 1) * self.stride + self.block_size if regular else 0
            yield np.array([begin]), np.array([scored_to - begin]), end - begin


def scoring_windows(n: int, block_size: int, stride: int, max_chars: int = 0,
                    seed: int = EVAL_SAMPLE_SEED) -> ScoringWindows:
    """Every window of a text of n ids, or, when it has more than max_chars characters to score (and
    max_chars is not 0), a fixed sample of windows scoring about max_chars of them."""
    whole = ScoringWindows(n, block_size, stride)
    if not max_chars or whole.chars <= max_chars:
        return whole
    k = max(1, -(-max_chars // stride))
    if k >= whole.n_regular:
        return whole
    rng = np.random.default_rng([seed, n, block_size, stride])
    chosen = np.sort(rng.choice(whole.n_regular, size=k, replace=False))
    return ScoringWindows(n, block_size, stride, chosen)
