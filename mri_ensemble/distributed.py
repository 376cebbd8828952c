"""Data-parallel training under ``torchrun``: who this process is, and the process group.

``torchrun --nproc_per_node=N`` starts N copies of a script with ``RANK``, ``WORLD_SIZE``
and ``LOCAL_RANK`` set; :func:`init` joins them into one process group (NCCL when the
training device is CUDA, gloo on CPU, chosen at run time). Without those variables
everything here is a no-op for one process, so the single-process path is untouched.
"""

from __future__ import annotations

import os
import signal
import sys
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        """Rank 0: the one process that writes checkpoints, history and MLflow."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


def world() -> World:
    """This process's place, from torchrun's environment (one process without it)."""
    return World(
        int(os.environ.get("RANK", 0)),
        int(os.environ.get("WORLD_SIZE", 1)),
        int(os.environ.get("LOCAL_RANK", 0)),
    )


def launched() -> bool:
    """Whether this process was started by torchrun (as one of several)."""
    return world().distributed


def die_with_parent(sig: int = signal.SIGKILL) -> None:
    """Linux: this process receives ``sig`` when its parent exits.

    torchrun starts each rank in a session of its own, so killing a stage's process group
    (a cancelled flow, a dead worker) would leave the ranks training on, holding their
    GPUs; with this they go with their torchrun, as torchrun goes with the stage.
    """
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, int(sig), 0, 0, 0)  # PR_SET_PDEATHSIG
        if os.getppid() == 1:  # the parent was already gone
            os.kill(os.getpid(), sig)


def init(cuda: bool) -> World:
    """Join torchrun's process group once (NCCL for CUDA, else gloo); returns the world."""
    w = world()
    if w.distributed and not dist.is_initialized():
        die_with_parent()
        if cuda:
            torch.cuda.set_device(w.local_rank)
        dist.init_process_group("nccl" if cuda else "gloo")
    return w


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def broadcast(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank (a picklable value: a metrics row, a flag)."""
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_sum(values: list[float], device: torch.device) -> list[float]:
    """Element-wise sum of ``values`` over the ranks (e.g. loss totals and sample counts)."""
    if not dist.is_initialized():
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def shutdown() -> None:
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
