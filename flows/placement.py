"""Where the flow's trainings run: one slot per training that may run at once.

- GPUs: the visible ones (``CUDA_VISIBLE_DEVICES`` if set, else
  ``torch.cuda.device_count()``), each with ``trainings_per_device`` slots (params.yaml
  ``scale.trainings_per_device``, default 1). A stage process on a slot sees only its GPU
  (``CUDA_VISIBLE_DEVICES=<id>``: it trains on ``cuda:0`` there), and the CPU cores are
  split between the slots for data loading and GRAPPA.
- CPU only (no GPU, or ``device: cpu``): ``parallel`` slots (``scale.parallel``; 0: one per
  training, all at once), the cores split between them as torch threads (at least one
  each), or ``threads_per_training`` each (``scale.threads_per_training``; 0, the default:
  split). A fixed count keeps the bytes a training writes independent of how many run at
  once: torch's CPU kernels sum in a thread-dependent order (the tiny Attention U-Net's
  weights differ by 5e-4 after two epochs on 1 thread against 2), so ``parallel`` 1 and 2
  give the same models only at the same thread count.

A training takes a free slot, and the next waits until one is free; its evaluate runs on
the same slot.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Slot:
    """One concurrent training: a name for the logs and the environment of its stages."""

    name: str
    env: Mapping[str, str] = field(default_factory=dict)


def visible_gpus(environ: Mapping[str, str] | None = None, count: int | None = None) -> list[str]:
    """GPU ids the flow may hand out: ``CUDA_VISIBLE_DEVICES`` (ids or UUIDs) if set, else
    ``range(torch.cuda.device_count())`` (``count`` stands in for it in tests)."""
    environ = os.environ if environ is None else environ
    listed = environ.get("CUDA_VISIBLE_DEVICES")
    if listed is not None:
        ids = []
        for part in (p.strip() for p in listed.split(",")):
            if not part or part.startswith("-"):  # CUDA stops at the first invalid id
                break
            ids.append(part)
        return ids
    if count is None:
        import torch

        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return [str(i) for i in range(count)]


def plan_slots(
    n_trainings: int,
    *,
    device: str = "auto",
    gpus: list[str],
    trainings_per_device: int = 1,
    parallel: int = 0,
    threads_per_training: int = 0,
    cpu_count: int | None = None,
) -> list[Slot]:
    """The slots for ``n_trainings`` trainings (never more slots than trainings)."""
    if n_trainings < 1:
        return []
    if trainings_per_device < 1:
        raise ValueError(f"scale.trainings_per_device must be >= 1, got {trainings_per_device}")
    if parallel < 0:
        raise ValueError(f"scale.parallel must be >= 0 (0: all at once), got {parallel}")
    if threads_per_training < 0:
        raise ValueError(
            f"scale.threads_per_training must be >= 0 (0: the cores split), got {threads_per_training}"
        )
    cores = cpu_count or os.cpu_count() or 1
    if device != "cpu" and gpus:
        # round-robin over GPUs first: two trainings on two GPUs, not both on the first
        order = [(g, k) for k in range(trainings_per_device) for g in gpus]
        if parallel:
            order = order[:parallel]
        order = order[:n_trainings]
        threads = max(1, cores // len(order))
        return [
            Slot(f"cuda:{g}/{k}", {"CUDA_VISIBLE_DEVICES": g, "MRI_ENSEMBLE_THREADS": str(threads)})
            for g, k in order
        ]
    n = n_trainings if parallel == 0 else min(parallel, n_trainings)
    threads = threads_per_training or max(1, cores // n)
    return [Slot(f"cpu/{i}", {"MRI_ENSEMBLE_THREADS": str(threads)}) for i in range(n)]
