"""What an ensemble costs, by ensemble size: parameters and multiply-accumulates (MACs) per
slice, both properties of the networks (the same on every machine, so the cost stage's
output is reproducible byte for byte), and, measured by the benchmark
``bench/ensemble_cost.py``, latency per slice and peak memory on the machine at hand.

MACs are counted by ``torch.utils.flop_counter.FlopCounterMode`` over one forward pass on a
batch of test inputs (convolutions and matrix products; FFTs and element-wise operations are
not counted), halved (one MAC = two FLOPs) and divided by the batch size.

Latency is measured, not estimated: one batch of test inputs, ``warmup`` calls, then the
median of ``repeats`` timed calls, on the device the stage resolves (CUDA where present,
with synchronisation). Each member is timed alone and each ensemble of size k as an
:class:`~mri_ensemble.inference.EnsembleNet` over the same batch; their ratio shows that
batching every member over one input costs no more than running them one by one.

Peak memory is measured in a fresh process per ensemble (``python -m mri_ensemble.cost``):
on CPU the growth of the peak resident set (VmHWM) from just before the members
are loaded to after one batch (weights + activations); on CUDA ``max_memory_allocated``.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .errors import PipelineError
from .inference import EnsembleNet, load_members


def macs_per_slice(
    checkpoints: dict[str, Path], inputs: tuple[torch.Tensor, ...]
) -> dict[str, float]:
    """Multiply-accumulates per slice of each member's forward pass on ``inputs`` (CPU)."""
    from torch.utils.flop_counter import FlopCounterMode

    names = list(checkpoints)
    members = load_members([checkpoints[n] for n in names], "cpu")
    out = {}
    for name, net in zip(names, members, strict=True):
        counter = FlopCounterMode(display=False)
        with torch.no_grad(), counter:
            net(*inputs)
        out[name] = counter.get_total_flops() / 2 / len(inputs[0])
    return out


def median_seconds(
    fn: Callable[[], Any], device: torch.device, repeats: int = 5, warmup: int = 1
) -> float:
    """Median wall time of ``fn()`` over ``repeats`` calls after ``warmup`` calls."""

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def _autocast(device: torch.device) -> Any:
    return torch.autocast(device.type, dtype=torch.float16, enabled=device.type == "cuda")


def latencies(
    task: str,
    checkpoints: dict[str, Path],
    sizes: Sequence[tuple[list[str], np.ndarray]],
    inputs: tuple[torch.Tensor, ...],
    device: torch.device,
    repeats: int = 5,
) -> list[tuple[float, float]]:
    """Per ensemble (members, weights): (seconds per slice of the ensemble, sum of its
    members' seconds per slice alone). Both are timed side by side, interleaved within each
    repeat, so a busy machine slows both alike; each is the median over ``repeats``."""
    names = list(checkpoints)
    members = dict(zip(names, load_members([checkpoints[n] for n in names], device), strict=True))
    x = tuple(t.to(device) for t in inputs)
    per_slice = 1.0 / len(x[0])

    def call(net: torch.nn.Module) -> Callable[[], None]:
        def run() -> None:
            with torch.no_grad(), _autocast(device):
                net(*x)

        return run

    out = []
    for ms, w in sizes:
        ensemble = call(EnsembleNet([members[n] for n in ms], w, task))
        alone = [call(EnsembleNet([members[n]], [1.0], task)) for n in ms]
        ens_t, sum_t = [], []
        for r in range(repeats + 1):  # the first round warms up
            e = median_seconds(ensemble, device, repeats=1, warmup=0)
            s = sum(median_seconds(a, device, repeats=1, warmup=0) for a in alone)
            if r:
                ens_t.append(e)
                sum_t.append(s)
        out.append((float(np.median(ens_t)) * per_slice, float(np.median(sum_t)) * per_slice))
    return out


def peak_memory_mb(
    task: str, checkpoints: Sequence[Path], weights: np.ndarray, inputs: Path, device: str
) -> float:
    """Peak memory (MiB) of loading the ensemble and running one batch, in a fresh process.

    ``inputs``: a ``torch.save``d tuple of input tensors (small, so reading it does not set
    the process's peak before the members are loaded)."""
    spec = {
        "task": task,
        "checkpoints": [str(p) for p in checkpoints],
        "weights": np.asarray(weights).tolist(),
        "inputs": str(inputs),
        "device": device,
    }
    proc = subprocess.run(
        [sys.executable, "-m", "mri_ensemble.cost", json.dumps(spec)],
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        raise PipelineError(f"peak-memory probe failed: {proc.stderr.strip().splitlines()[-1:]}")
    return float(json.loads(proc.stdout.strip().splitlines()[-1])["peak_mb"])


def _peak_rss_mib() -> float:
    """Peak resident set of this process (MiB): Linux's VmHWM, which starts afresh at exec
    (``ru_maxrss`` can carry the forking parent's peak into the child); else ru_maxrss."""
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _probe(spec: dict[str, Any]) -> dict[str, float]:
    device = torch.device(spec["device"])
    inputs = tuple(t.to(device) for t in torch.load(spec["inputs"], weights_only=True))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        before: float = torch.cuda.max_memory_allocated(device)
    else:
        before = _peak_rss_mib()
    net = EnsembleNet(
        load_members([Path(p) for p in spec["checkpoints"]], device), spec["weights"], spec["task"]
    ).to(device)
    with torch.no_grad(), _autocast(device):
        net(*inputs)
    if device.type == "cuda":
        peak = (torch.cuda.max_memory_allocated(device) - before) / 2**20
    else:
        peak = _peak_rss_mib() - before
    return {"peak_mb": float(peak)}


def recommend(sizes: Sequence[dict[str, Any]], key: str, share: float = 0.95) -> str:
    """One line: the smallest ensemble (in greedy order) with ``share`` of the full
    ensemble's val gain over the best single model, and what it costs. Chosen on val;
    the test scores are quoted beside."""
    first, full = sizes[0], sizes[-1]
    label = {"iou": "IoU", "ssim": "SSIM"}.get(key, key)
    gain = full[f"val_{key}"] - first[f"val_{key}"]
    if not gain > 0:
        return (
            f"The ensemble gains nothing on val over the best single model "
            f"({first['members'][0]}, test {label} {first[f'test_{key}']:.4f}): ship that model."
        )
    pick = next(s for s in sizes if s[f"val_{key}"] - first[f"val_{key}"] >= share * gain)
    got = (pick[f"val_{key}"] - first[f"val_{key}"]) / gain
    k = pick["size"]
    return (
        f"{k} model{'s' if k > 1 else ''} ({', '.join(pick['members'])}) give "
        f"{100 * got:.0f} % of the full {full['size']}-model ensemble's val {label} gain "
        f"(+{pick[f'val_{key}'] - first[f'val_{key}']:.4f} of +{gain:.4f} over "
        f"{first['members'][0]}) at {100 * pick['macs'] / full['macs']:.0f} % of its "
        f"compute (MACs per slice) and {100 * pick['params'] / full['params']:.0f} % of its "
        "parameters; "
        f"test {label} {pick[f'test_{key}']:.4f} vs {full[f'test_{key}']:.4f} (full) and "
        f"{first[f'test_{key}']:.4f} (best single)."
    )


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="peak-memory probe (one JSON spec argument)")
    ap.add_argument("spec")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    print(json.dumps(_probe(json.loads(args.spec))))


if __name__ == "__main__":
    main()
