"""Sharding work over the processes of a run (``accelerate launch``): who does which unit, without talking.

Units (batches of images, of scores) go to processes by a pure function of the plan, so every process computes
the same assignment; each unit is done by exactly one process.
"""

from __future__ import annotations


def assign_units(sizes: list[int], num_processes: int) -> list[int]:
    """The process of each unit of work: in order, to the process with the fewest images so far (ties: the lower
    index). A pure function of the plan, so every process computes the same assignment without talking.
    (``unit mod N`` would give process 0 every full batch when each folder ends in a short one.)"""
    load = [0] * num_processes
    out = []
    for size in sizes:
        rank = min(range(num_processes), key=lambda r: (load[r], r))
        load[rank] += size
        out.append(rank)
    return out


def distributed_state():
    """accelerate's process state; like ``Accelerator``, honour ACCELERATE_USE_CPU, or processes launched on a
    machine without GPUs would each believe they run alone."""
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    return PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))
