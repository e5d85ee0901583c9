"""What the ranks under torchrun agree on, all in one place: each step's one all-reduce (the loss,
a signal, the time budget), the occasional decision (does an evaluation fit?), sums of evaluation
work shared out, and every rank's random state for a checkpoint. With one process, nothing to agree:
the values pass through without a collective.
"""

from __future__ import annotations

import signal
from dataclasses import dataclass
from typing import Any

import torch

from minigpt_cli.budget import TimeBudget
from minigpt_cli.device import Distributed


@dataclass(frozen=True)
class Agreed:
    """What every rank goes on with after a step (or at the loop's start)."""

    signum: int = 0  # a signal some rank caught (0: none)
    out_of_time: bool = False  # no time for another step on some rank
    progress: float | None = None  # the time budget's progress, the same on every rank (None: no budget)
    loss: float | None = None  # the step's loss, averaged over ranks (None: not read this step)


class Ranks:
    # Slots of the step's all-reduce (summed over ranks): the loss, one count per signal, flags.
    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, dist: Distributed, device: torch.device):
        self.dist = dist
        self.device = device

    @property
    def enabled(self) -> bool:
        return self.dist.enabled

    def agree(self, budget: TimeBudget, signum: int, loss_sum: torch.Tensor | None = None,
              read_loss: bool = False) -> Agreed:
        """The step's one all-reduce: the loss (a sum over micro-batches, on the device), the signal
        and the budget's verdict by each rank's own clock. One process reads the loss (a host sync)
        only when asked to."""
        progress = budget.progress()
        if not self.enabled:
            loss = loss_sum.item() if (read_loss and loss_sum is not None) else None
            return Agreed(signum, budget.out_of_time(), progress, loss)
        import torch.distributed as dist

        host = [0.0, *(float(signum == s) for s in self.SIGNALS), float(budget.out_of_time()), progress or 0.0]
        values = torch.tensor(host, dtype=torch.float64, device=self.device)  # not MPS: torchrun is CUDA or CPU
        if loss_sum is not None:
            values[0] = loss_sum.detach().double()  # not MPS (as above)
        dist.all_reduce(values)
        total, *signals, late, progress_sum = values.tolist()  # the step's one host sync
        caught = [s for s, n in zip(self.SIGNALS, signals) if n]
        world = self.dist.world_size
        return Agreed(int(max(caught, default=0)), late > 0,
                      None if progress is None else progress_sum / world,  # one rank's clock is no better
                      total / world if loss_sum is not None else None)

    def all(self, flag: bool) -> bool:
        """One decision for every rank: yes only where every rank says yes."""
        return not self.any(not flag)

    def any(self, flag: bool) -> bool:
        if not self.enabled:
            return flag
        return self.sum([float(flag)])[0] > 0

    def sum(self, values: list[float]) -> list[float]:
        if not self.enabled:
            return values
        import torch.distributed as dist

        tensor = torch.tensor(values, dtype=torch.float64, device=self.device)  # not MPS: torchrun is CUDA or CPU
        dist.all_reduce(tensor)
        return tensor.tolist()

    def share(self, n: int, block_size: int) -> tuple[int, int] | None:
        """This rank's share of a text of n ids scored in block_size windows that do not overlap:
        (begin, end) of a slice whose windows are exactly the whole text's windows there (its tail
        window too); None where there are too few windows to share out."""
        windows, rank, world = -(-(n - 1) // block_size), self.dist.rank, self.dist.world_size
        if not self.enabled or windows < 2 * world:
            return None
        first, last = windows * rank // world, windows * (rank + 1) // world
        return first * block_size, min(n, last * block_size + 1)

    def gather(self, value: Any) -> list[Any]:
        """Every rank's value, in rank order (a rare collective: a save)."""
        if not self.enabled:
            return [value]
        import torch.distributed as dist

        gathered: list[Any] = [None] * self.dist.world_size
        dist.all_gather_object(gathered, value)
        return gathered

    def barrier(self) -> None:
        if self.enabled:
            import torch.distributed as dist

            dist.barrier()
