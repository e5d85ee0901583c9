"""What each attention head does, summed up from its (T, T) weights over one text: its mean weight by
relative offset, on the first character, on the induction targets, and the pattern it follows where
one clearly holds. Pure functions of the weights and the text's ids, so hand-made matrices test them.

Every mean is over the query positions that have a choice (i >= 1: position 0 can only read itself)
and where the key it measures exists and is not the first character, which has its own mean.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

# Offsets 0 (the character itself), -1, ..., -OFFSETS each get their own mean; the keys farther back
# (but the first character) are summed into "rest".
OFFSETS = 8

# A head is named after the pattern with the largest mean weight when that mean is at least NAME_AT and at
# least NAME_MARGIN more than the runner-up. Measured: tiny models trained to copy (tests/test_heads.py, 5
# seeds) each grew one induction head scoring 0.41 to 0.51 with nothing else above 0.15; the default config
# at 300 steps over "ROMEO: ROMEO: what say you?" has one head at 0.40 on itself (next 0.16) and fifteen
# mixed ones, 0.2 to 0.38 on their top pattern and often within 0.1 of another; classic at 300 steps has
# nothing above 0.25. Uniform attention over 27 characters scores 0.11 on itself and on the first one.
NAME_AT = 0.4
NAME_MARGIN = 0.15
# An induction score from fewer query positions than this is shown but never named.
INDUCTION_MIN_POSITIONS = 3
PATTERNS = ("self", "previous", "first", "induction")
PATTERN_RULE = (f"a head is named after the pattern ({', '.join(PATTERNS)}) with the largest mean "
                f"weight when it is at least {NAME_AT} and {NAME_MARGIN} above the next; induction needs "
                f"{INDUCTION_MIN_POSITIONS} or more positions that repeat an earlier character")


def offset_key(offset: int) -> str:
    """The name of an offset in `offsets`: "0", "-1", ... (keys of a JSON object are strings)."""
    return str(-offset)


def offset_means(weights: torch.Tensor) -> dict[str, float | None]:
    """Mean weight at each offset 0, -1, ..., -OFFSETS and on the keys farther back ("rest"), each over
    the positions i >= 1 where that key exists and is not position 0. weights: (T, T), row i the weights
    position i gives to positions 0..i. None where no position has the key (a short text)."""
    T = weights.shape[0]
    means: dict[str, float | None] = {}
    for d in range(OFFSETS + 1):
        # The diagonal d below the main one is W[i, i - d] for i = d .. T-1; its first entry is the
        # key at position 0 (or, for d = 0, position 0 reading itself): left out.
        diagonal = torch.diagonal(weights, offset=-d)[1:]
        means[offset_key(d)] = float(diagonal.mean()) if diagonal.numel() else None
    # Keys 1 .. i - OFFSETS - 1: farther than the last named offset, and not the first character.
    far = torch.ones(T, T, dtype=torch.bool).tril(diagonal=-(OFFSETS + 1))
    far[:, 0] = False
    rows = far.any(dim=-1)
    means["rest"] = float((weights * far).sum(dim=-1)[rows].mean()) if rows.any() else None
    return means


def induction_targets(ids: Sequence[int]) -> torch.Tensor:
    """(T, T) bool: [i, t] is True where key t is an induction target of query i: t = j + 1 right after
    an earlier occurrence j of query i's character (ids[j] == ids[i], j < i), the character a copy of
    what followed it last time would predict. Targets at i itself or at i - 1 are left out: self and
    previous-character heads already look there (an "aa" or "aba" is no evidence of copying)."""
    idx = torch.as_tensor(list(ids), dtype=torch.long)
    T = idx.shape[0]
    same = idx[:, None] == idx[None, :]  # (T, T): [i, j] ids[i] == ids[j]
    earlier = torch.ones(T, T, dtype=torch.bool).tril(diagonal=-3)  # j <= i - 3, so that t = j + 1 <= i - 2
    targets = torch.zeros(T, T, dtype=torch.bool)
    targets[:, 1:] = (same & earlier)[:, :-1]  # column t = j + 1
    return targets


def induction_score(weights: torch.Tensor, targets: torch.Tensor) -> float | None:
    """Mean over the query positions with at least one induction target of the weight on all of them."""
    rows = targets.any(dim=-1)
    return float((weights * targets).sum(dim=-1)[rows].mean()) if rows.any() else None


def name_pattern(scores: dict[str, float | None], induction_positions: int) -> str | None:
    """The pattern a head follows by PATTERN_RULE, or None where none clearly holds."""
    known = {k: v for k, v in scores.items() if v is not None
             and (k != "induction" or induction_positions >= INDUCTION_MIN_POSITIONS)}
    if not known:
        return None
    ranked = sorted(known.items(), key=lambda kv: kv[1], reverse=True)
    best, score = ranked[0]
    runner_up = ranked[1][1] if len(ranked) > 1 else 0.0
    return best if score >= NAME_AT and score - runner_up >= NAME_MARGIN else None


def head_profile(weights: torch.Tensor, ids: Sequence[int]) -> dict[str, Any]:
    """A head summed up: `offsets` (offset_means), `first` (mean weight on position 0 over i >= 1),
    `induction` (induction_score), `max` (mean largest weight over i >= 1: how sharp it is) and `pattern`."""
    weights = weights.float()
    T = weights.shape[0]
    assert weights.shape == (T, T) and len(ids) == T, "one row and one column per character"
    offsets = offset_means(weights)
    targets = induction_targets(ids)
    first = float(weights[1:, 0].mean()) if T > 1 else None
    largest = float(weights[1:].max(dim=-1).values.mean()) if T > 1 else None
    induction = induction_score(weights, targets)
    scores = {"self": offsets["0"], "previous": offsets["-1"], "first": first, "induction": induction}
    return {"offsets": offsets, "first": first, "induction": induction, "max": largest,
            "pattern": name_pattern(scores, int(targets.any(dim=-1).sum()))}


def induction_baseline(ids: Sequence[int]) -> dict[str, Any]:
    """How many query positions have an induction target, and the score uniform attention (each position
    reading 0..i equally) would get on them: a head's induction score means something only above it."""
    targets = induction_targets(ids)
    rows = targets.any(dim=-1)
    if not rows.any():
        return {"positions": 0, "uniform": None}
    reach = torch.arange(1, targets.shape[0] + 1, dtype=torch.float32)  # row i reads i + 1 positions
    return {"positions": int(rows.sum()), "uniform": float((targets.sum(dim=-1) / reach)[rows].mean())}
