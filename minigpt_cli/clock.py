"""When this process started, for a --time-budget that counts Python's start-up and imports too."""

from __future__ import annotations

import os
import time

# The fallback start: this module is imported on the way to the command, before torch.
IMPORTED_AT = time.perf_counter()


def process_started_at() -> float:
    """The perf_counter reading of this process's start (Linux /proc); elsewhere, the moment this
    module was imported."""
    try:
        with open("/proc/self/stat", encoding="ascii") as f:
            start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/uptime", encoding="ascii") as f:
            uptime = float(f.read().split()[0])
        age = uptime - start_ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return IMPORTED_AT
    return time.perf_counter() - max(age, 0.0)
