"""One torchrun rank of a test run: `trainer.train` on a fake clock skewed by rank, recording what
the ranks must agree on (or must not), for tests/test_distributed.py.

    python -m torch.distributed.run --nproc_per_node 2 --standalone tests/rank_worker.py OUT RUN_DIR [--resume] KEY=VALUE...

Each training step costs 0.1 s on rank 0's clock and 0.2 s on rank 1's (clocks that disagree, as
two machines' may). Written to OUT, per rank r: rng.r.pt, the torch random state as the
invocation's first step begins (what its dropout masks are drawn from), and params.r.pt, the
parameters after the last step.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

from minigpt_cli import trainer
from minigpt_cli.config import apply_overrides, load_config


class SkewedClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def main() -> None:
    out, run_dir, *rest = sys.argv[1:]
    resume = "--resume" in rest
    overrides = [a for a in rest if a != "--resume"]
    out_dir, rank = Path(out), int(os.environ["RANK"])
    clock, real_step, began = SkewedClock(), trainer.Stepper.step, []

    def recorded_step(self, *args, **kwargs):
        if not began:
            began.append(True)
            torch.save(torch.get_rng_state(), out_dir / f"rng.{rank}.pt")
        clock.now += 0.1 * (1 + rank)
        loss = real_step(self, *args, **kwargs)
        torch.save([p.detach().clone() for p in self.model.parameters()], out_dir / f"params.{rank}.pt")
        return loss

    # Collectives the trainer asks for between one step and the next (DDP's own gradient all-reduces run
    # in C++ and are not counted): the loop's agreement should be one all-reduce a step.
    import torch.distributed as dist

    counted, per_step, real_all_reduce = [0], [], dist.all_reduce

    def counting_all_reduce(*args, **kwargs):
        counted[0] += 1
        return real_all_reduce(*args, **kwargs)

    def counted_step(self, *args, **kwargs):
        per_step.append(counted[0])
        counted[0] = 0
        loss = recorded_step(self, *args, **kwargs)
        (out_dir / f"collectives.{rank}.txt").write_text(" ".join(map(str, per_step[1:])))
        return loss

    dist.all_reduce = counting_all_reduce
    trainer.Stepper.step = counted_step
    config = apply_overrides(load_config("tiny"), overrides)
    trainer.train(config, Path(run_dir), resume=resume, started_at=0.0, clock=clock)


if __name__ == "__main__":
    main()
