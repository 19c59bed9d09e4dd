"""Which process of a torchrun job this is, read from the environment torchrun sets (the one reader of it): used
by the training loop's ranks (`training.distributed`) and by the data download (rank 0 alone downloads)."""

from __future__ import annotations

import os
from dataclasses import dataclass

from cifarbench.errors import CifarbenchError


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


SINGLE = DistEnv()


def env_world() -> DistEnv:
    """The ranks torchrun announced in the environment (a single process when there are none)."""
    try:
        return DistEnv(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
                       int(os.environ.get("LOCAL_RANK", 0)))
    except ValueError:
        raise CifarbenchError("RANK, WORLD_SIZE and LOCAL_RANK must be integers (as torchrun sets them)") from None
