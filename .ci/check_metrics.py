"""Fail if any committed metric in `dvc metrics diff --json` moved beyond tolerance.

Every numeric metric is compared: IoU, Dice, per-class scores, SSIM, NMSE, cross-fitted
scores, parameter counts (``--tolerance``, absolute), PSNR in dB (``--psnr-tolerance``).
The default run is bitwise reproducible on one platform, so the tolerances sit far below
the smallest gain the README states. Prints the largest difference seen.
"""

from __future__ import annotations

import argparse
import json
import math
import sys


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("diff_json")
    ap.add_argument("--tolerance", type=float, default=1e-4)
    ap.add_argument("--psnr-tolerance", type=float, default=0.01)
    args = ap.parse_args()
    diff = json.load(open(args.diff_json))
    checked, bad, largest = 0, [], (0.0, "")
    for path, metrics in diff.items():
        for key, d in metrics.items():
            old, new = d.get("old"), d.get("new")
            if old is None and new is None:
                continue  # undefined in both (class absent everywhere)
            if not all(isinstance(v, int | float) or v is None for v in (old, new)):
                continue
            tol = args.psnr_tolerance if key.endswith(".psnr") else args.tolerance
            checked += 1
            if old is None or new is None:
                bad.append(f"{path}:{key} committed {old} reproduced {new}")
                continue
            delta = abs(new - old)
            if delta > largest[0]:
                largest = (delta, f"{path}:{key}")
            if not math.isclose(old, new, rel_tol=0.0, abs_tol=tol):
                bad.append(f"{path}:{key} committed {old} reproduced {new} (|diff| {delta:.3g})")
    if checked == 0:
        print("no metrics found to compare: is metrics.json committed?")
        return 1
    for line in bad:
        print("MISMATCH", line)
    print(
        f"{checked} metrics compared (tolerance {args.tolerance:g}, PSNR {args.psnr_tolerance:g} "
        f"dB), {len(bad)} outside; largest difference {largest[0]:.3g}"
        + (f" ({largest[1]})" if largest[1] else "")
    )
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
