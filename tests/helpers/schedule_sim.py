"""Run allreduce plans for every rank of a group inside one process, with symbolic data.

Each element holds the set of ranks whose contribution it contains, as a bitmask. A reducing step may only
combine disjoint sets (overlap = a contribution counted twice) and a copying step overwrites. Messages travel
through FIFO queues per (sender, receiver), so a plan whose sends and receives do not match deadlocks here
(SimulationError) exactly as it would on real ranks, and a size mismatch is caught at delivery.
"""

from __future__ import annotations

from collections import defaultdict, deque

import numpy as np

from hybrid_ext.comm.schedule import Plan


class SimulationError(AssertionError):
    pass


def simulate(plans: list[Plan], initial: list[list[int]] | None = None) -> list[np.ndarray]:
    """Execute every rank's plan; return each rank's final buffer of contribution bitmasks (object arrays).

    By default every element of rank r starts as ``1 << r`` (an allreduce or reduce-scatter input); pass
    ``initial`` to start otherwise (an all-gather: only a rank's own block is known).
    """
    p = len(plans)
    n = plans[0].count
    if initial is None:
        initial = [[1 << r] * n for r in range(p)]
    buffers = [np.array(values, dtype=object) for values in initial]
    queues: dict[tuple[int, int], deque] = defaultdict(deque)
    cursor = [0] * p
    sent = [False] * p  # whether the current step's send was already posted
    while any(cursor[r] < len(plans[r].steps) for r in range(p)):
        progressed = False
        for r in range(p):
            if cursor[r] == len(plans[r].steps):
                continue
            step = plans[r].steps[cursor[r]]
            if step.send is not None and not sent[r]:
                queues[(r, step.send_to)].append(buffers[r][step.send[0] : step.send[1]].copy())
                sent[r] = True
                progressed = True
            if step.recv is not None:
                queue = queues[(step.recv_from, r)]
                if not queue:
                    continue
                data = queue.popleft()
                start, stop = step.recv
                if len(data) != stop - start:
                    raise SimulationError(
                        f"rank {r} step {cursor[r]}: expected {stop - start} elements, got {len(data)}"
                    )
                if step.reduce:
                    mine = buffers[r][start:stop]
                    if any(a & b for a, b in zip(mine, data)):
                        raise SimulationError(f"rank {r} step {cursor[r]} ({step.phase}): a contribution reduced twice")
                    buffers[r][start:stop] = [a | b for a, b in zip(mine, data)]
                else:
                    buffers[r][start:stop] = data
            cursor[r] += 1
            sent[r] = False
            progressed = True
        if not progressed:
            stuck = {r: plans[r].steps[cursor[r]] for r in range(p) if cursor[r] < len(plans[r].steps)}
            raise SimulationError(f"deadlock: ranks waiting at {stuck}")
    leftover = {k: len(q) for k, q in queues.items() if q}
    if leftover:
        raise SimulationError(f"messages never received: {leftover}")
    return buffers
