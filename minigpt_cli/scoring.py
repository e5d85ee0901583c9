"""How well a model predicts text: the negative log-likelihood of a text under a model (score_text,
shared by the trainer's evaluations and `minigpt eval`), and the units people read it in.

Nothing here imports torch at import time: `minigpt runs` uses bits_per_char without it.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np
    import torch

    from minigpt_cli.device import Precision
    from minigpt_cli.model import GPT
    from minigpt_cli.progress import ProgressCallback


def bits_per_char(nats: float) -> float:
    """A loss in nats per character as bits per character (divide by ln 2)."""
    return nats / math.log(2.0)


def score_text(model: GPT, ids: np.ndarray, block_size: int, stride: int, batch_size: int,
               device: torch.device, precision: Precision, progress: ProgressCallback | None = None,
               task: str = "scoring", max_chars: int = 0) -> tuple[float, int]:
    """Sum of -log p over every character after the first (or a fixed sample of windows when there
    are more than max_chars, see batches.scoring_windows), and how many were scored.

    Windows of up to block_size characters start every `stride` characters; each window scores
    only the characters no earlier window scored, so with stride < block_size every character
    after the first window sees at least block_size - stride characters of context. With
    stride == block_size the windows do not overlap and each position is scored once. Windows are
    read from ids (a memory map, usually) a batch at a time; progress is reported in characters.
    The sum is kept in Python floats (math.fsum: exactly rounded), not in a float64 tensor, which
    Apple's MPS lacks.
    """
    import torch
    import torch.nn.functional as F

    from minigpt_cli.batches import read_windows, scoring_windows
    from minigpt_cli.device import autocast
    from minigpt_cli.progress import progress_task

    windows = scoring_windows(len(ids), block_size, stride, max_chars)
    partials: list[float] = []  # each batch's fsum
    count = 0
    model.eval()
    with torch.no_grad(), autocast(device, precision), \
            progress_task(progress, task, total=windows.chars, unit="chars") as report:
        for begins, skips, length in windows.batches(batch_size):
            xy = torch.from_numpy(read_windows(ids, begins, length + 1)).to(device)  # (B, T+1)
            logits = model(xy[:, :-1]).float()  # (B, T, vocab_size)
            nll = F.cross_entropy(logits.transpose(1, 2), xy[:, 1:], reduction="none")  # (B, T)
            skip = torch.from_numpy(skips).to(device)
            keep = torch.arange(length, device=device)[None] >= skip[:, None]  # (B, T)
            scored = nll[keep].tolist()  # one copy to the host per batch (int(keep.sum()) waited anyway)
            partials.append(math.fsum(scored))
            count += len(scored)
            report.advance(len(scored))
    return math.fsum(partials), count
