"""Allreduce schedules: which rank sends which slice to whom, at every step. Pure functions, no processes.

A schedule is planned once per (algorithm, rank, world size, element count) and then executed by
:mod:`hybrid_ext.comm.api` over any transport (see :mod:`hybrid_ext.comm.transports.contract`). Plans are cached: a
training loop that reduces the same bucket sizes every step plans each of them once.

Notation (as in Gloo's ``docs/algorithms.md``): P ranks, P' the largest power of two <= P, N elements.
Costs are per rank: messages sent and elements sent.

``recursive_doubling`` — the latency-optimal butterfly.
    log2(P') steps; at step k rank r exchanges its whole vector with ``r XOR 2^k`` and reduces.
    Messages: log2 P'. Elements: N·log2 P'. Best for small N.

``rabenseifner`` — recursive halving, then recursive doubling (Rabenseifner; Thakur, Rabenseifner & Gropp 2005).
    1. Reduce-scatter: at step k (k = 0 .. log2 P' - 1) rank r exchanges half of its current segment with
       ``r XOR 2^k``: it sends the half it gives up and reduces the half it keeps. After log2 P' steps each rank
       holds one fully reduced block of N/P' elements.
    2. Allgather: the same pairs in reverse order; each rank sends everything it holds and receives its partner's.
    Messages: 2·log2 P'. Elements: 2·(P'-1)/P'·N. Optimal in both terms for a power of two. The distance
    doubles during the reduce-scatter, so the largest halves travel between neighbouring ranks (usually
    the same node) and the long-distance messages are the small ones.

``ring`` — reduce-scatter then allgather around a ring (Patarasuk & Yuan 2009); the baseline the paper compares
    against. Any P, no fold. Messages: 2·(P-1). Elements: 2·(P-1)/P·N.

Non-power-of-two P (MPICH's fold), for the two butterflies. Let R = P - P'. Among ranks 0 .. 2R-1 each even rank
sends its whole vector to the odd rank above it, which reduces it and takes part in the power-of-two
algorithm as rank ``r // 2``; ranks >= 2R take part as ``r - R``. At the end each of those odd ranks sends the
result back to its even partner. Cost: +2 messages and +2N elements on the folded pairs.

Every element's final value is computed on exactly one rank and then copied, and pairwise reductions are
commutative, so all ranks end with bitwise-identical results.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

ALGORITHMS = ("recursive_doubling", "rabenseifner", "ring")

Range = tuple[int, int]  # [start, stop) in elements of the flat buffer


@dataclass(frozen=True, slots=True)
class Step:
    """One step of one rank: send a slice to ``send_to`` while receiving a slice from ``recv_from``.

    ``reduce`` says whether the received values are reduced into ``recv`` (True) or copied over it (False).
    Either half may be absent (None) — e.g. the fold's hand-off only sends. Ranks are the group's ranks.
    """

    phase: str
    send_to: int | None
    send: Range | None
    recv_from: int | None
    recv: Range | None
    reduce: bool

    @property
    def send_count(self) -> int:
        return 0 if self.send is None else self.send[1] - self.send[0]

    @property
    def recv_count(self) -> int:
        return 0 if self.recv is None else self.recv[1] - self.recv[0]


@dataclass(frozen=True, slots=True)
class Plan:
    """Every step one rank takes in one allreduce of ``count`` elements."""

    algorithm: str
    rank: int
    world_size: int
    count: int
    steps: tuple[Step, ...]
    collective: str = "allreduce"

    @property
    def messages_sent(self) -> int:
        return sum(1 for s in self.steps if s.send is not None)

    @property
    def elements_sent(self) -> int:
        return sum(s.send_count for s in self.steps)

    @property
    def elements_received(self) -> int:
        return sum(s.recv_count for s in self.steps)

    @property
    def scratch_elements(self) -> int:
        """Size of the receive buffer the reducing steps need (copying steps receive in place)."""
        return max((s.recv_count for s in self.steps if s.reduce), default=0)

    @property
    def largest_step_elements(self) -> int:
        """The longest message sent or received in one step (staging size for a narrower wire dtype)."""
        return max((max(s.send_count, s.recv_count) for s in self.steps), default=0)


def largest_power_of_two_at_most(p: int) -> int:
    return 1 << (p.bit_length() - 1)


def block_bounds(count: int, blocks: int) -> list[int]:
    """Offsets splitting ``count`` elements into ``blocks`` contiguous blocks whose sizes differ by at most one."""
    return [(i * count) // blocks for i in range(blocks + 1)]


@functools.lru_cache(maxsize=4096)
def plan_allreduce(algorithm: str, rank: int, world_size: int, count: int) -> Plan:
    """Plan rank ``rank``'s part of an allreduce of ``count`` elements over ``world_size`` ranks."""
    if algorithm not in ALGORITHMS:
        raise ValueError(f"unknown allreduce algorithm {algorithm!r}; choose one of {', '.join(ALGORITHMS)}")
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in a group of {world_size}")
    if count < 0:
        raise ValueError(f"element count must be >= 0, got {count}")
    if world_size == 1 or count == 0:
        steps: list[Step] = []
    elif algorithm == "ring":
        steps = _ring(rank, world_size, count)
    else:
        steps = _folded(algorithm, rank, world_size, count)
    # Empty slices (fewer elements than blocks) are not sent at all: both sides know it from the plan.
    kept = tuple(s for s in (_drop_empty(step) for step in steps) if s is not None)
    return Plan(algorithm, rank, world_size, count, kept)


def _drop_empty(step: Step) -> Step | None:
    send_to, send = (step.send_to, step.send) if step.send_count else (None, None)
    recv_from, recv = (step.recv_from, step.recv) if step.recv_count else (None, None)
    if send is None and recv is None:
        return None
    return Step(step.phase, send_to, send, recv_from, recv, step.reduce and recv is not None)


def _folded(algorithm: str, rank: int, p: int, n: int) -> list[Step]:
    """A power-of-two algorithm, with MPICH's fold for the ranks beyond the largest power of two."""
    p2 = largest_power_of_two_at_most(p)
    extra = p - p2
    everything = (0, n)
    if rank < 2 * extra and rank % 2 == 0:  # hands its vector to rank + 1, gets the result back
        return [
            Step("fold", rank + 1, everything, None, None, reduce=False),
            Step("unfold", None, None, rank + 1, everything, reduce=False),
        ]
    new_rank = rank // 2 if rank < 2 * extra else rank - extra

    def real(r: int) -> int:
        return 2 * r + 1 if r < extra else r + extra

    steps: list[Step] = []
    if rank < 2 * extra:
        steps.append(Step("fold", None, None, rank - 1, everything, reduce=True))
    if algorithm == "recursive_doubling":
        steps += _recursive_doubling(new_rank, p2, n, real)
    else:
        steps += _halving_doubling(new_rank, p2, n, real)
    if rank < 2 * extra:
        steps.append(Step("unfold", rank - 1, everything, None, None, reduce=False))
    return steps


def _recursive_doubling(rank: int, p: int, n: int, real) -> list[Step]:
    steps = []
    mask = 1
    while mask < p:
        peer = real(rank ^ mask)
        steps.append(Step("exchange", peer, (0, n), peer, (0, n), reduce=True))
        mask <<= 1
    return steps


def _halving_doubling(rank: int, p: int, n: int, real) -> list[Step]:
    bounds = block_bounds(n, p)
    lo, hi = 0, p  # the blocks this rank is still responsible for
    reduce_scatter = []
    mask = 1
    while mask < p:
        mid = (lo + hi) // 2
        keep, give = ((lo, mid), (mid, hi)) if rank & mask == 0 else ((mid, hi), (lo, mid))
        peer = real(rank ^ mask)
        keep_range = (bounds[keep[0]], bounds[keep[1]])
        give_range = (bounds[give[0]], bounds[give[1]])
        reduce_scatter.append(Step("reduce_scatter", peer, give_range, peer, keep_range, reduce=True))
        lo, hi = keep
        mask <<= 1
    # The allgather retraces the same pairs backwards: send what was kept, receive what was given away.
    allgather = [Step("allgather", s.send_to, s.recv, s.recv_from, s.send, reduce=False) for s in reduce_scatter[::-1]]
    return reduce_scatter + allgather


def _ring(rank: int, p: int, n: int) -> list[Step]:
    bounds = block_bounds(n, p)
    right, left = (rank + 1) % p, (rank - 1) % p

    def block(i: int) -> Range:
        i %= p
        return (bounds[i], bounds[i + 1])

    steps = [
        Step("reduce_scatter", right, block(rank - k), left, block(rank - k - 1), reduce=True) for k in range(p - 1)
    ]
    # Rank r now holds block r + 1 fully reduced; pass finished blocks around once more.
    steps += [Step("allgather", right, block(rank + 1 - k), left, block(rank - k), reduce=False) for k in range(p - 1)]
    return steps


# ------------------------------------------------------------------------------------------------------------
# All-gather and reduce-scatter along blocks (the partitioner's batch dimension): rank r owns elements
# [offsets[r], offsets[r+1]) of a vector of sum(counts) elements, counts[r] = offsets[r+1] - offsets[r].
#
# ``recursive_doubling`` all-gather: at step k rank r exchanges everything its aligned group of 2^k ranks holds
# with ``r XOR 2^k`` (log2 P' messages, (P'-1)/P'·N elements). ``recursive_halving`` reduce-scatter: the mirror
# image, distance halving, so that every rank ends holding its own block. Non-powers of two use the same fold
# as the allreduce (the even rank of each folded pair hands its block / vector to the odd one, which answers at
# the end). ``ring`` for both: P-1 steps to the right neighbour, any P.

GATHER_ALGORITHMS = ("recursive_doubling", "ring")
SCATTER_ALGORITHMS = ("recursive_halving", "ring")


def _offsets(counts: tuple[int, ...]) -> list[int]:
    out = [0]
    for c in counts:
        if c < 0:
            raise ValueError(f"block sizes must be >= 0, got {list(counts)}")
        out.append(out[-1] + c)
    return out


def _check_blocks(algorithm: str, allowed: tuple[str, ...], rank: int, counts: tuple[int, ...]) -> list[int]:
    if algorithm not in allowed:
        raise ValueError(f"unknown algorithm {algorithm!r}; choose one of {', '.join(allowed)}")
    if not 0 <= rank < len(counts):
        raise ValueError(f"rank {rank} is not in a group of {len(counts)}")
    return _offsets(counts)


def _fold_map(p: int):
    p2 = largest_power_of_two_at_most(p)
    extra = p - p2

    def members(new_rank: int) -> tuple[int, int]:
        """The original ranks [first, last] a new rank stands for (two for a folded pair)."""
        return (2 * new_rank, 2 * new_rank + 1) if new_rank < extra else (new_rank + extra, new_rank + extra)

    return p2, extra, members


def _ring_neighbours(rank: int, offsets: list[int]):
    """Right and left neighbours in the ring, and block i's element range (i taken modulo P)."""
    p = len(offsets) - 1

    def block(i: int) -> Range:
        i %= p
        return (offsets[i], offsets[i + 1])

    return (rank + 1) % p, (rank - 1) % p, block


@functools.lru_cache(maxsize=4096)
def plan_allgather(algorithm: str, rank: int, counts: tuple[int, ...]) -> Plan:
    """Plan rank ``rank``'s part of an all-gather of blocks of sizes ``counts`` (one per rank)."""
    offsets = _check_blocks(algorithm, GATHER_ALGORITHMS, rank, counts)
    p, n = len(counts), offsets[-1]
    steps: list[Step] = []
    if p > 1 and n > 0:
        if algorithm == "ring":
            right, left, block = _ring_neighbours(rank, offsets)
            steps = [Step("allgather", right, block(rank - k), left, block(rank - k - 1), False) for k in range(p - 1)]
        else:
            p2, extra, members = _fold_map(p)
            everything = (0, n)
            if rank < 2 * extra and rank % 2 == 0:
                steps = [
                    Step("fold", rank + 1, (offsets[rank], offsets[rank + 1]), None, None, False),
                    Step("unfold", None, None, rank + 1, everything, False),
                ]
            else:
                new_rank = rank // 2 if rank < 2 * extra else rank - extra
                real = lambda r: members(r)[1]  # noqa: E731 - the rank that takes part for new rank r

                def span(first_new: int, last_new: int) -> Range:
                    return (offsets[members(first_new)[0]], offsets[members(last_new)[1] + 1])

                if rank < 2 * extra:
                    steps.append(Step("fold", None, None, rank - 1, (offsets[rank - 1], offsets[rank]), False))
                mask = 1
                while mask < p2:
                    mine = new_rank & ~(mask - 1)
                    theirs = (new_rank ^ mask) & ~(mask - 1)
                    peer = real(new_rank ^ mask)
                    steps.append(
                        Step(
                            "allgather", peer, span(mine, mine + mask - 1), peer, span(theirs, theirs + mask - 1), False
                        )
                    )
                    mask <<= 1
                if rank < 2 * extra:
                    steps.append(Step("unfold", rank - 1, everything, None, None, False))
    kept = tuple(x for x in (_drop_empty(step) for step in steps) if x is not None)
    return Plan(algorithm, rank, p, n, kept, collective="allgather")


@functools.lru_cache(maxsize=4096)
def plan_reduce_scatter(algorithm: str, rank: int, counts: tuple[int, ...]) -> Plan:
    """Plan rank ``rank``'s part of a reduce-scatter: every rank ends with its own block, reduced over all."""
    offsets = _check_blocks(algorithm, SCATTER_ALGORITHMS, rank, counts)
    p, n = len(counts), offsets[-1]
    steps: list[Step] = []
    if p > 1 and n > 0:
        if algorithm == "ring":
            right, left, block = _ring_neighbours(rank, offsets)
            steps = [
                Step("reduce_scatter", right, block(rank - k - 1), left, block(rank - k - 2), True)
                for k in range(p - 1)
            ]
        else:
            p2, extra, members = _fold_map(p)
            everything = (0, n)
            if rank < 2 * extra and rank % 2 == 0:
                steps = [
                    Step("fold", rank + 1, everything, None, None, False),
                    Step("unfold", None, None, rank + 1, (offsets[rank], offsets[rank + 1]), False),
                ]
            else:
                new_rank = rank // 2 if rank < 2 * extra else rank - extra
                real = lambda r: members(r)[1]  # noqa: E731

                def span(first_new: int, last_new: int) -> Range:
                    return (offsets[members(first_new)[0]], offsets[members(last_new)[1] + 1])

                if rank < 2 * extra:
                    steps.append(Step("fold", None, None, rank - 1, everything, True))
                lo, hi = 0, p2  # new ranks whose blocks this rank still reduces
                mask = p2 >> 1
                while mask >= 1:
                    mid = (lo + hi) // 2
                    keep, give = ((mid, hi), (lo, mid)) if new_rank & mask else ((lo, mid), (mid, hi))
                    peer = real(new_rank ^ mask)
                    steps.append(
                        Step(
                            "reduce_scatter",
                            peer,
                            span(give[0], give[1] - 1),
                            peer,
                            span(keep[0], keep[1] - 1),
                            True,
                        )
                    )
                    lo, hi = keep
                    mask >>= 1
                if rank < 2 * extra:
                    steps.append(Step("unfold", rank - 1, (offsets[rank - 1], offsets[rank]), None, None, False))
    kept = tuple(x for x in (_drop_empty(step) for step in steps) if x is not None)
    return Plan(algorithm, rank, p, n, kept, collective="reduce_scatter")
