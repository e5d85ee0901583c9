"""Reproducible batches of windows of the encoded text, and the windows that score a text."""

from __future__ import annotations

import functools
import mmap
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch

from minigpt_cli.config import UserError


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


def read_windows(ids: np.ndarray, starts: np.ndarray, length: int, vocab_size: int | None = None) -> np.ndarray:
    """ids[start : start + length] for each start, as int64 (B, length), leaving no page mapped. With
    vocab_size, ids past the vocabulary are a UserError naming the damaged file: the ids were checked
    when loaded, but the file is a memory map that can be written to while it is read."""
    windows = ids[starts[:, None] + np.arange(length)].astype(np.int64)
    release_pages(ids)
    if vocab_size is not None and windows.size and int(windows.max()) >= vocab_size:
        where = getattr(ids, "filename", None) or "the encoded text"
        raise UserError(f"{where} is damaged: it holds id {int(windows.max())}, past the vocabulary of {vocab_size} "
                        f"characters (was it written to?); pass the text with --data PATH")
    return windows


def get_batch(ids: np.ndarray, starts: np.ndarray, block_size: int, device: torch.device | None = None,
              vocab_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    chunk = torch.from_numpy(read_windows(ids, starts, block_size + 1, vocab_size))  # (B, T+1)
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
