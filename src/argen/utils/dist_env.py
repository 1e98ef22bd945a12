"""`process_ranks()`: this process's (rank, world_size, local_rank) from the torchrun environment.

The one parser of RANK, WORLD_SIZE and LOCAL_RANK (unset: a single process, 0 / 1 / RANK). Values that
are not integers, or a rank outside [0, world_size), are an `ArgenError` naming the variables.
"""

from __future__ import annotations

import os
from typing import NamedTuple

from argen.utils.errors import ArgenError


class ProcessRanks(NamedTuple):
    rank: int
    world_size: int
    local_rank: int


def process_ranks() -> ProcessRanks:
    env = os.environ
    try:
        rank = int(env.get("RANK", "0"))
        world = int(env.get("WORLD_SIZE", "1"))
        local = int(env.get("LOCAL_RANK", str(rank)))
    except ValueError:
        raise ArgenError(f"RANK, WORLD_SIZE and LOCAL_RANK must be integers (as torchrun sets them), got "
                         f"RANK={env.get('RANK')!r} WORLD_SIZE={env.get('WORLD_SIZE')!r} "
                         f"LOCAL_RANK={env.get('LOCAL_RANK')!r}") from None
    if world < 1 or not 0 <= rank < world or local < 0:
        raise ArgenError(f"bad torchrun environment: RANK={rank} WORLD_SIZE={world} LOCAL_RANK={local}")
    return ProcessRanks(rank, world, local)
