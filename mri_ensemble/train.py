"""The training engine: one ``fit`` for every task and network.

Adam + weight decay, an LR schedule, early stopping on the validation loss, a progress
bar, deterministic seeding, device ``auto`` (CUDA with mixed precision where present),
self-describing checkpoints written atomically every epoch (``last.pt``) and on every
improvement (``best.pt``), and resume from ``last.pt`` after a killed run.

The engine knows nothing of trackers: it calls ``on_epoch(row)`` after each epoch and the
stage decides what to log.

Under ``torchrun`` (``WORLD_SIZE`` > 1) the same ``fit`` trains data-parallel
(DistributedDataParallel): each rank draws its share of every epoch from a
``DistributedSampler`` and takes ``batch_size / world`` of the global batch, the gradients
are averaged over the ranks, rank 0 alone validates, writes checkpoints and calls the
hooks, and every rank resumes from the same ``last.pt``.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import random
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from tqdm.auto import tqdm

from . import distributed
from .errors import ConfigError, DataError
from .io import atomic_path
from .nets import build_model

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "mri-ensemble-checkpoint/1"


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings; every default lives here and nowhere else."""

    epochs: int = 20
    batch_size: int = 16
    lr: float = 1e-3
    weight_decay: float = 1e-4
    scheduler: str = "cosine"  # cosine | step | none
    step_epochs: tuple[int, ...] = (10, 15, 20, 25)  # for "step": halve at these epochs (R0)
    gamma: float = 0.5
    patience: int = 5  # early stopping on val_loss (R2)
    min_delta: float = 0.0
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda
    amp: bool = True  # mixed precision, CUDA only

    @classmethod
    def from_params(cls, params: Mapping[str, Any]) -> TrainConfig:
        """Build from a params.yaml mapping, rejecting unknown keys by name."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(params) - known)
        if unknown:
            raise ConfigError(f"unknown training param(s) {unknown}; known: {sorted(known)}")
        kw: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v for k, v in params.items()}
        cfg = cls(**kw)
        cfg.validate()
        return cfg

    def validate(self) -> None:
        checks = {
            "epochs": self.epochs >= 1,
            "batch_size": self.batch_size >= 1,
            "lr": self.lr > 0,
            "weight_decay": self.weight_decay >= 0,
            "patience": self.patience >= 1,
            "scheduler": self.scheduler in ("cosine", "step", "none"),
            "device": self.device in ("auto", "cpu", "cuda"),
        }
        for key, ok in checks.items():
            if not ok:
                raise ConfigError(f"bad training param {key}={getattr(self, key)!r}")


@dataclass
class ModelSpec:
    """What rebuilds a network: registry name, its config and its channel counts."""

    arch: str
    config: dict[str, Any] = field(default_factory=dict)
    in_channels: int = 1
    out_channels: int = 4

    def build(self) -> nn.Module:
        return build_model(self.arch, self.in_channels, self.out_channels, self.config)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device 'cuda' requested but CUDA is not available; use 'auto'")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch; deterministic kernels (warn only where none exists)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.benchmark = False


def fingerprint(obj: Any) -> str:
    """Stable hash of a JSON-able object (resolved params + data identity)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def training_fingerprint(spec: ModelSpec, cfg: TrainConfig, meta: Mapping[str, Any]) -> str:
    """Identity of a training run: a ``last.pt`` with the same one is resumed."""
    return fingerprint({"meta": meta, "spec": asdict(spec), "cfg": asdict(cfg)})


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Write ``state`` atomically, byte-reproducibly: ``torch.save`` names the zip archive
    after the file it writes to, so it is serialised in memory (archive name fixed) and
    the bytes are written to the temporary name."""
    buf = io.BytesIO()
    torch.save(state, buf)
    with atomic_path(path) as tmp:
        tmp.write_bytes(buf.getvalue())


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Load a checkpoint written by this engine; DataError if missing or not one.

    Checkpoints are untrusted (teammates, DVC remotes, the registry): they are unpickled
    with ``weights_only=True``, which builds only tensors and plain containers (plus numpy
    scalars, which a metric may leave in the history). A file whose pickle names any other
    callable is refused before that callable can run.
    """
    import pickle
    import re

    if not path.is_file():
        raise DataError(f"{path}: checkpoint not found")
    numpy_scalars: list[Any] = [np.dtype, type(np.dtype(np.float64)), type(np.dtype(np.float32))]
    numpy_scalars.append(np.float64(0).__reduce__()[0])  # numpy's scalar constructor
    try:
        with torch.serialization.safe_globals(numpy_scalars):
            state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        found = re.search(r"(?:unsupported|Unsupported global:) GLOBAL (\S+)", str(exc))
        if found is None:  # not a pickle of ours at all: corrupt
            raise DataError(f"{path}: unreadable checkpoint (UnpicklingError)") from exc
        raise DataError(
            f"{path}: refused: a checkpoint may hold only tensors and plain types, it names "
            f"{found.group(1)} (code that unpickling would run)"
        ) from exc
    except Exception as exc:  # torch raises many types for a corrupt file
        first = str(exc).splitlines()[0] if str(exc) else ""
        raise DataError(f"{path}: unreadable checkpoint ({type(exc).__name__}: {first})") from exc
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise DataError(f"{path}: not a {CHECKPOINT_FORMAT} checkpoint")
    return state


def load_model(path: Path, device: torch.device | str = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild a network from its checkpoint alone; returns (model in eval mode, checkpoint)."""
    state = load_checkpoint(path)
    model = ModelSpec(**state["spec"]).build()
    model.load_state_dict(state["state_dict"])
    return model.to(device).eval(), state


def _interned_keys(obj: Any) -> Any:
    """``obj`` with every dict's str keys interned (through dicts and lists).

    Pickle writes a string object once and refers back to it after. In an unbroken run the
    keys of history rows, optimizer, scheduler and scaler state are the interned literals
    of the code; after a resume they come from unpickling, separate objects, which would
    change the bytes of every later checkpoint (not its contents). Interned, the bytes are
    an unbroken run's; for a fresh run this changes nothing.
    """
    if isinstance(obj, dict):
        return {(sys.intern(k) if type(k) is str else k): _interned_keys(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_interned_keys(v) for v in obj]
    return obj


def _make_scheduler(
    opt: torch.optim.Optimizer, cfg: TrainConfig
) -> torch.optim.lr_scheduler.LRScheduler | None:
    if cfg.scheduler == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.epochs)
    if cfg.scheduler == "step":
        return torch.optim.lr_scheduler.MultiStepLR(opt, list(cfg.step_epochs), gamma=cfg.gamma)
    return None


Tensors = torch.Tensor | tuple[torch.Tensor, ...]
Batch = tuple[Tensors, Tensors]
Validate = Callable[[nn.Module, torch.device], dict[str, float]]
# (inputs, targets, generator) -> (inputs, targets), e.g. mixup; runs on CPU before the step
BatchTransform = Callable[
    [tuple[torch.Tensor, ...], tuple[torch.Tensor, ...], torch.Generator],
    tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]],
]


def _to(x: Tensors, device: torch.device) -> tuple[torch.Tensor, ...]:
    """A batch part (one tensor or a tuple of them) as a tuple on ``device``."""
    return tuple(t.to(device) for t in x) if isinstance(x, (tuple, list)) else (x.to(device),)


def fit(
    spec: ModelSpec,
    train_set: Dataset[Batch],
    loss_fn: nn.Module,
    validate: Validate,
    cfg: TrainConfig,
    work_dir: Path,
    meta: Mapping[str, Any],
    on_epoch: Callable[[dict[str, float]], None] | None = None,
    progress: bool = True,
    batch_transform: BatchTransform | None = None,
    on_checkpoint: Callable[[list[Path]], None] | None = None,
    init: Mapping[str, torch.Tensor] | None = None,
) -> dict[str, Any]:
    """Train ``spec`` on ``train_set``; checkpoints go to ``work_dir``.

    ``train_set`` yields ``(inputs, targets)``, each a tensor or a tuple of tensors: the
    step is ``loss_fn(model(*inputs), *targets)``. A dataset with a ``set_epoch(epoch)``
    method is told the epoch before each one (fresh, reproducible per-epoch sampling,
    e.g. undersampling masks). ``validate(model, device)`` returns at least ``val_loss``
    (lower is better) plus any task metrics; it is called once per epoch in eval mode.
    ``batch_transform`` (e.g. mixup) rewrites each training batch with a generator seeded
    per epoch, so a resumed run draws the same.
    ``meta`` (task, model name, resolved params, data identity, ...) is stored in every
    checkpoint; its fingerprint decides whether an existing ``work_dir/last.pt`` is
    resumed (same run, killed) or discarded (anything changed).
    ``on_checkpoint(paths)`` runs after each epoch's checkpoints are written, with those
    written (``best.pt`` when it improved, and ``last.pt``), e.g. to share them so that
    another machine can resume.
    What training costs: the state counts ``samples_seen`` (over all ranks and epochs, the
    same on every machine); ``on_epoch`` also gets the epoch's measured
    ``epoch_cpu_seconds`` (process CPU time summed over the ranks: core-seconds) and
    ``epoch_wall_seconds``, which stay out of the history and the checkpoints (their bytes
    do not depend on the machine).
    ``init``: weights to start from (fine-tuning, e.g. a distilled student) instead of the
    seeded initialisation; name what they are in ``meta`` (it decides the resume).
    Returns the final ``last.pt`` state without weights: history, best epoch, etc.
    """
    device = resolve_device(cfg.device)
    use_amp = cfg.amp and device.type == "cuda"
    world = distributed.init(device.type == "cuda")
    if world.distributed:
        if cfg.batch_size % world.size:
            raise ConfigError(
                f"batch_size {cfg.batch_size} does not split over {world.size} processes"
            )
        if device.type == "cuda":
            device = torch.device("cuda", world.local_rank)
    seed_everything(cfg.seed)
    model = spec.build().to(device)
    if init is not None:
        model.load_state_dict(init)
    net: nn.Module = model
    if world.distributed:
        from torch.nn.parallel import DistributedDataParallel

        if device.type == "cuda":  # SyncBatchNorm runs on CUDA only: CPU ranks keep their own
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        net = DistributedDataParallel(
            model, device_ids=[world.local_rank] if device.type == "cuda" else None
        )
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = _make_scheduler(opt, cfg)
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
    fp = training_fingerprint(spec, cfg, meta)

    state: dict[str, Any] = {
        "format": CHECKPOINT_FORMAT,
        "spec": asdict(spec),
        "train_config": asdict(cfg),
        "meta": dict(meta),
        "fingerprint": fp,
        "epoch": 0,
        "history": [],
        "best_epoch": 0,
        "best_val_loss": float("inf"),
        "bad_epochs": 0,
        "stopped_early": False,
        "samples_seen": 0,
    }
    last_path, best_path = work_dir / "last.pt", work_dir / "best.pt"
    if last_path.is_file():
        old = load_checkpoint(last_path)
        if old.get("fingerprint") == fp:
            model.load_state_dict(old["state_dict"])
            opt.load_state_dict(old["optimizer"])
            if sched is not None and old.get("scheduler"):
                sched.load_state_dict(old["scheduler"])
            scaler.load_state_dict(old["scaler"])
            torch.set_rng_state(old["rng"]["torch"])
            # progress only: spec, config and meta are this run's own (the fingerprint says
            # they are equal), so the checkpoint pickles as an unbroken run's would
            kept = ("epoch", "history", "best_epoch", "best_val_loss", "bad_epochs",
                        "stopped_early", "samples_seen")  # fmt: skip
            state.update({k: old[k] for k in kept if k in old})
            log.info("resuming %s from epoch %d", last_path, old["epoch"])
        else:
            log.info("%s belongs to other params or data; starting afresh", last_path)
    if world.main:
        work_dir.mkdir(parents=True, exist_ok=True)

    for epoch in range(state["epoch"] + 1, cfg.epochs + 1):
        if state["stopped_early"]:
            break
        cpu0, wall0 = time.process_time(), time.perf_counter()
        gen = torch.Generator().manual_seed(cfg.seed * 1000 + epoch)  # resumable shuffling
        mix_gen = torch.Generator().manual_seed(cfg.seed * 1000 + epoch + 10**9)
        set_epoch = getattr(train_set, "set_epoch", None)
        if callable(set_epoch):
            set_epoch(epoch)
        if world.distributed:  # this rank's share of the epoch, its part of each global batch
            sampler: DistributedSampler[Batch] = DistributedSampler(
                train_set, world.size, world.rank, seed=cfg.seed
            )
            sampler.set_epoch(epoch)
            loader = DataLoader(train_set, batch_size=cfg.batch_size // world.size, sampler=sampler)
        else:
            loader = DataLoader(train_set, batch_size=cfg.batch_size, shuffle=True, generator=gen)
        model.train()
        total, count = 0.0, 0
        bar = tqdm(
            loader,
            desc=f"epoch {epoch}/{cfg.epochs}",
            leave=False,
            disable=None if progress and world.main else True,
        )
        for inputs, targets in bar:
            if batch_transform is not None:
                inputs, targets = batch_transform(
                    _to(inputs, torch.device("cpu")), _to(targets, torch.device("cpu")), mix_gen
                )
            x, y = _to(inputs, device), _to(targets, device)
            opt.zero_grad(set_to_none=True)
            with torch.autocast(device.type, dtype=torch.float16, enabled=use_amp):
                out = net(*x)
            loss = loss_fn(out, *y)
            if not torch.isfinite(loss):
                raise DataError(f"training loss became {loss.item()} at epoch {epoch}")
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            total += loss.item() * y[0].shape[0]
            count += y[0].shape[0]
            bar.set_postfix(loss=f"{total / count:.4f}")
        if sched is not None:
            sched.step()
        total, seen = distributed.all_sum([total, float(count)], device)  # over the ranks
        model.eval()
        val = None
        if world.main:  # one validation; every rank takes its numbers (same early stopping)
            with torch.no_grad():
                val = validate(model, device)
        val = distributed.broadcast(val)
        state["samples_seen"] += int(seen)
        (cpu,) = distributed.all_sum([time.process_time() - cpu0], device)
        row = {
            "epoch": epoch,
            "train_loss": total / max(seen, 1.0),
            "lr": opt.param_groups[0]["lr"],
        }
        row.update(val)
        state["history"].append(row)
        state["epoch"] = epoch
        improved = val["val_loss"] < state["best_val_loss"] - cfg.min_delta
        if improved:
            state["best_val_loss"], state["best_epoch"], state["bad_epochs"] = (
                val["val_loss"],
                epoch,
                0,
            )
        else:
            state["bad_epochs"] += 1
            state["stopped_early"] = state["bad_epochs"] >= cfg.patience
        if not world.main:
            continue
        if on_epoch is not None:  # before the checkpoint: a kill re-logs, never loses, an epoch
            cost = {"epoch_cpu_seconds": cpu, "epoch_wall_seconds": time.perf_counter() - wall0}
            on_epoch({**row, **cost, "samples_seen": float(state["samples_seen"])})
        ckpt = dict(
            state,
            history=_interned_keys(state["history"]),
            state_dict=model.state_dict(),
            optimizer=_interned_keys(opt.state_dict()),
            scheduler=_interned_keys(sched.state_dict()) if sched is not None else None,
            scaler=_interned_keys(scaler.state_dict()),
            rng={"torch": torch.get_rng_state()},
        )
        if improved:
            save_checkpoint(best_path, ckpt)
        save_checkpoint(last_path, ckpt)
        if on_checkpoint is not None:
            on_checkpoint([best_path, last_path] if improved else [last_path])
        log.info(
            "epoch %d/%d %s",
            epoch,
            cfg.epochs,
            " ".join(f"{k}={v:.4f}" for k, v in row.items() if k != "epoch"),
        )
        if state["stopped_early"]:
            log.info("early stopping: val_loss did not improve for %d epochs", cfg.patience)
    distributed.barrier()  # rank 0's checkpoints are written before any rank returns
    return state


def set_threads_from_env() -> None:
    """Honour ``MRI_ENSEMBLE_THREADS`` (set by the Prefect flow for parallel training)."""
    n = os.environ.get("MRI_ENSEMBLE_THREADS")
    if n:
        torch.set_num_threads(max(1, int(n)))
