"""Per-rank state in checkpoints of data-parallel runs.

Lightning writes a checkpoint from global rank 0, but every rank has state of its own that an exact
resume needs: its masking generator, its dropout RNG, the tokens it counted per source. Components
that hold such state return ``with_all_ranks(own)`` from ``state_dict`` (which Lightning calls on
every rank while it builds a checkpoint, so a collective is allowed there) and call
``own_rank_state(saved)`` in ``load_state_dict`` (every rank reads the checkpoint file).
"""

from __future__ import annotations

import logging
from typing import Any

import torch

log = logging.getLogger(__name__)

RANKS_KEY = "ranks"


def rank_and_world() -> tuple[int, int]:
    """This process's global rank and the world size (0, 1 outside a process group)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def with_all_ranks(own: dict[str, Any]) -> dict[str, Any]:
    """``own`` (this rank's state, as before: a single-process checkpoint is unchanged) plus, under a
    process group of more than one rank, every rank's state under ``"ranks"`` (a collective: every
    rank must call it at the same point)."""
    rank, world = rank_and_world()
    if world == 1:
        return own
    gathered: list[Any] = [None] * world
    torch.distributed.all_gather_object(gathered, own)
    return {**own, RANKS_KEY: gathered}


def own_rank_state(saved: dict[str, Any], what: str) -> dict[str, Any]:
    """This rank's part of a state written by ``with_all_ranks``.

    A checkpoint from the same number of ranks gives each rank exactly its own state. From another
    number of ranks (or an older single-rank state) each rank takes rank 0's, with a warning: the
    run goes on, but it is no longer the run that was interrupted (each rank's data shard changed too).
    """
    rank, world = rank_and_world()
    ranks = saved.get(RANKS_KEY)
    if ranks is not None and len(ranks) == world:
        return ranks[rank]
    if world > 1 or ranks is not None:
        written = len(ranks) if ranks is not None else 1
        if rank == 0:
            log.warning("%s: the checkpoint was written by %d rank(s) and is resumed on %d; every rank starts from "
                        "rank 0's state (not an exact resume)", what, written, world)
    return {k: v for k, v in saved.items() if k != RANKS_KEY}


def _all_reduce(values: list[int], op: Any) -> list[int]:
    """``values`` reduced element-wise over the ranks with ``op`` (a collective). NCCL reduces only
    tensors on this rank's GPU; gloo (CPU ranks) only CPU tensors."""
    backend = torch.distributed.get_backend()
    device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
    tensor = torch.tensor(values, dtype=torch.long, device=device)
    torch.distributed.all_reduce(tensor, op=op)
    return [int(v) for v in tensor.tolist()]


def all_ranks_max(value: int) -> int:
    """The largest ``value`` over the ranks (a collective; ``value`` itself outside a process group)."""
    _, world = rank_and_world()
    if world == 1:
        return value
    return _all_reduce([value], torch.distributed.ReduceOp.MAX)[0]


def all_ranks_sum(values: list[int]) -> list[int]:
    """``values`` summed element-wise over the ranks (a collective; ``values`` outside a process group)."""
    _, world = rank_and_world()
    if world == 1 or not values:
        return list(values)
    return _all_reduce(list(values), torch.distributed.ReduceOp.SUM)
