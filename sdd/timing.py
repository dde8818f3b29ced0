"""Named timing regions: a method marks the phases of its step, a benchmark reads them, training pays nothing.

    with timing.region("sampling"):          # inside a method's compute_loss
        z_t, t = sample_to_k(...)

    with timing.collect() as seconds:        # in a benchmark, around whole steps
        loss, logs = method.compute_loss(...)
    seconds["sampling"]                      # time spent in that region (summed over its entries)

Outside ``collect`` a region does nothing (no clock, no device synchronisation), so the training loop runs the same
code at full speed. Inside, the clock is read after a CUDA synchronisation, so a region's time is the work it
launched, not the time to queue it.
"""

from __future__ import annotations

import contextlib
import time
from collections import defaultdict
from typing import Iterator

_collectors: list[defaultdict] = []


def _sync() -> None:
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


@contextlib.contextmanager
def region(name: str) -> Iterator[None]:
    """Time the block as ``name`` for every active ``collect``; a no-op when none is active."""
    if not _collectors:
        yield
        return
    _sync()
    start = time.perf_counter()
    try:
        yield
    finally:
        _sync()
        elapsed = time.perf_counter() - start
        for seconds in _collectors:
            seconds[name] += elapsed


@contextlib.contextmanager
def collect() -> Iterator[defaultdict]:
    """Seconds per region name for the regions entered inside the block (0.0 for names never entered)."""
    seconds: defaultdict = defaultdict(float)
    _collectors.append(seconds)
    try:
        yield seconds
    finally:  # by identity: two collectors with the same times are equal dicts
        del _collectors[next(i for i, c in enumerate(_collectors) if c is seconds)]
