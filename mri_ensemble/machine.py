"""The platform a run's bytes hold on.

The CPU kernels a training runs (oneDNN's convolutions, MKL's GEMMs, ATen's vector code)
pick their instruction set and blocking from the CPU they find, and so the order in which
they sum. The default run is bitwise reproducible on one CPU type, not across types: the
same code, venv, data and seed trained the U-Net to a first-epoch train loss of 0.899721
on the CPU the results committed before 2026-12-04 came from and 0.899735 on an Intel Xeon
with AVX-512 FP16 and AMX, and every metric after it moved in the second to fourth decimal.
Capping the Xeon's kernels (``ONEDNN_MAX_CPU_ISA``, ``MKL_CBWR``, ``ATEN_CPU_CAPABILITY``)
gave other bytes again, none the old ones. The report stage writes :func:`fingerprint` to
``reports/platform.json`` so that a rerun on another type says so instead of leaving a
reader to guess (``.ci/run`` prints both when they differ).
"""

from __future__ import annotations

import platform
from pathlib import Path
from typing import Any

# the cpuinfo flags that choose a kernel's code path (vector width, FMA, VNNI, AMX)
_ISA_PREFIXES = ("avx", "amx", "fma", "f16c", "sse4")


def _cpuinfo() -> dict[str, str]:
    """The first processor's fields of ``/proc/cpuinfo`` ({} off Linux)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return {}
    out: dict[str, str] = {}
    for line in text.split("\n\n", 1)[0].splitlines():
        key, sep, value = line.partition(":")
        if sep:
            out.setdefault(key.strip(), value.strip())
    return out


def _l2_cache() -> str | None:
    """The first core's unified level-2 cache size (it sets oneDNN's blocking), or None."""
    for index in sorted(Path("/sys/devices/system/cpu/cpu0/cache").glob("index*")):
        try:
            if (index / "level").read_text().strip() == "2":
                return (index / "size").read_text().strip()
        except OSError:
            continue
    return None


def fingerprint() -> dict[str, Any]:
    """What the bytes of a CPU training depend on besides the code, venv, data and seed."""
    import torch

    info = _cpuinfo()
    flags = info.get("flags", "").split()
    return {
        "machine": platform.machine(),
        "cpu_vendor": info.get("vendor_id") or platform.processor() or None,
        "cpu_model": info.get("model name"),
        "cpu_isa": sorted(f for f in flags if f.startswith(_ISA_PREFIXES)),
        "l2_cache": _l2_cache(),
        "torch": torch.__version__,
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cuda_device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
