"""Read UTF-8 text, build the vocabulary, encode once into a cached array, and draw reproducible batches."""

from __future__ import annotations

import hashlib
import os
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from minigpt_cli.config import UserError, default_data_path
from minigpt_cli.progress import ProgressCallback, progress_task
from minigpt_cli.tokenizer import CharTokenizer, UnknownCharactersError

# Characters encoded at a time: large enough to stay vectorised, small enough to report progress
# on a large corpus and to bound the 4-bytes-a-character temporaries.
ENCODE_CHUNK = 1 << 22


def _decode_utf8(raw: bytes, where: str) -> str:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UserError(
            f"{where} is not valid UTF-8: byte 0x{raw[exc.start]:02x} at offset {exc.start} ({exc.reason})"
        ) from None
    return text.removeprefix("\ufeff")


def read_text(path: str | Path) -> tuple[str, str]:
    """Return (text, description) from a file, a folder of .txt files, or '-' for stdin."""
    if str(path) == "-":
        if sys.stdin is None or sys.stdin.isatty():
            raise UserError("--data - reads text from stdin, but stdin is a terminal (pipe text in)")
        text = _decode_utf8(sys.stdin.buffer.read(), "stdin")
        source = "stdin"
    else:
        path = Path(path).expanduser()
        if path.is_dir():
            files = sorted(p for p in path.rglob("*.txt") if p.is_file())
            if not files:
                raise UserError(f"data folder {path} has no .txt files")
            parts = [_decode_utf8(_read_bytes(f), str(f)) for f in files]
            # Keep files apart by a newline so the last line of one does not run into the next.
            text = "".join(p if p.endswith("\n") else p + "\n" for p in parts)
            source = f"{path} ({len(files)} files)"
        elif path.is_file():
            text = _decode_utf8(_read_bytes(path), str(path))
            source = str(path)
        else:
            raise UserError(f"data path not found: {path}")
    if not text:
        raise UserError(f"data from {source} is empty")
    return text, source


def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise UserError(f"cannot read {path}: {exc.strerror}") from None


def dtype_for_vocab(vocab_size: int) -> np.dtype:
    """The smallest unsigned integer type that holds every token id."""
    for dtype in (np.uint8, np.uint16, np.uint32):
        if vocab_size <= np.iinfo(dtype).max + 1:
            return np.dtype(dtype)
    raise AssertionError("vocabulary larger than 2**32")


def encode_array(text: str, tokenizer: CharTokenizer, progress: ProgressCallback | None = None) -> np.ndarray:
    """Vectorised encode: code points looked up in the sorted vocabulary, a chunk at a time."""
    vocab = np.array([ord(c) for c in tokenizer.chars], dtype=np.uint32)
    out = np.empty(len(text), dtype=dtype_for_vocab(tokenizer.vocab_size))
    with progress_task(progress, "encoding text", total=len(text), unit="chars") as task:
        for begin in range(0, len(text), ENCODE_CHUNK):
            piece = text[begin:begin + ENCODE_CHUNK]
            codes = np.frombuffer(piece.encode("utf-32-le"), dtype=np.uint32)
            ids = np.minimum(np.searchsorted(vocab, codes), len(vocab) - 1)
            if not np.array_equal(vocab[ids], codes):
                raise UnknownCharactersError(tokenizer.unknown(text), "data")
            out[begin:begin + len(piece)] = ids
            task.advance(len(piece))
    return out


def cache_dir() -> Path:
    override = os.environ.get("MINIGPT_CACHE_DIR")
    if override:
        return Path(override)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "minigpt"


def _cached_encode(text: str, fingerprint: str, tokenizer: CharTokenizer,
                   progress: ProgressCallback | None = None) -> np.ndarray:
    """Encode once; later runs on the same text and vocabulary read the array back from disk."""
    vocab_hash = hashlib.sha256(tokenizer.to_dict()["chars"].encode("utf-8")).hexdigest()[:16]
    path = cache_dir() / f"{fingerprint[:32]}-{vocab_hash}.npy"
    try:
        ids = np.load(path, allow_pickle=False)
        if ids.shape == (len(text),) and ids.dtype == dtype_for_vocab(tokenizer.vocab_size):
            return ids
    except (OSError, ValueError):
        pass
    ids = encode_array(text, tokenizer, progress)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path.parent, suffix=".tmp", delete=False) as f:
            tmp = f.name
            np.save(f, ids, allow_pickle=False)
        os.replace(tmp, path)
    except OSError:
        # A cache that cannot be written only costs time on the next run.
        if tmp:
            Path(tmp).unlink(missing_ok=True)
    return ids


@dataclass
class Corpus:
    tokenizer: CharTokenizer
    train: np.ndarray
    val: np.ndarray
    fingerprint: str
    source: str
    n_chars: int
    text: str | None = field(default=None, repr=False)  # the text itself, with keep_text


def load_corpus(path: str | Path | None, val_fraction: float, tokenizer: CharTokenizer | None = None,
                keep_text: bool = False, progress: ProgressCallback | None = None) -> Corpus:
    """Read and encode a corpus; the last val_fraction of the text is the validation split."""
    text, source = read_text(path if path else default_data_path())
    fingerprint = hashlib.sha256(text.encode("utf-8")).hexdigest()
    tokenizer = tokenizer or CharTokenizer.from_text(text)
    ids = _cached_encode(text, fingerprint, tokenizer, progress)
    n_val = int(len(ids) * val_fraction)
    split = len(ids) - n_val
    return Corpus(tokenizer, ids[:split], ids[split:], fingerprint, source, len(text), text if keep_text else None)


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


def get_batch(ids: np.ndarray, starts: np.ndarray, block_size: int,
              device: torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    window = starts[:, None] + np.arange(block_size + 1)  # (B, T+1)
    chunk = torch.from_numpy(ids[window].astype(np.int64))
    x, y = chunk[:, :-1], chunk[:, 1:]  # (B, T) each
    if device is not None and device.type == "cuda":
        return (x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True))
    if device is not None and device.type != "cpu":
        return x.to(device), y.to(device)
    return x, y
