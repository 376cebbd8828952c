"""Fail if any IoU/Dice/SSIM (or PSNR) in `dvc metrics diff --json` moved beyond tolerance.

IoU, Dice and SSIM (all in [0, 1]) use ``--tolerance`` (absolute); PSNR in dB uses
``--psnr-tolerance``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("diff_json")
    ap.add_argument("--tolerance", type=float, required=True)
    ap.add_argument("--psnr-tolerance", type=float, default=1.0)
    args = ap.parse_args()
    diff = json.load(open(args.diff_json))
    checked, bad = 0, []
    for path, metrics in diff.items():
        for key, d in metrics.items():
            if key.endswith((".iou", ".dice", ".ssim")):
                tol = args.tolerance
            elif key.endswith(".psnr"):
                tol = args.psnr_tolerance
            else:
                continue
            old, new = d.get("old"), d.get("new")
            if old is None and new is None:
                continue  # undefined in both (class absent everywhere)
            checked += 1
            if old is None or new is None or not math.isclose(old, new, abs_tol=tol):
                bad.append(f"{path}:{key} committed {old} reproduced {new}")
    if checked == 0:
        print("no IoU/Dice/SSIM metrics found to compare: is metrics.json committed?")
        return 1
    for line in bad:
        print("MISMATCH", line)
    print(f"{checked} metrics compared, {len(bad)} outside tolerance")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
