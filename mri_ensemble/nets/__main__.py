"""``python -m mri_ensemble.nets``: every registered network with its parameter count."""

import sys

from . import RECONSTRUCTION, SEGMENTATION, build_model, count_parameters

out = [f"{'network':<22} {'task':<15} {'parameters (default config)':>28}"]
for table, task, (cin, cout) in (
    (SEGMENTATION, "segmentation", (1, 4)),
    (RECONSTRUCTION, "reconstruction", (2, 1)),
):
    for name in sorted(table):
        n = count_parameters(build_model(name, cin, cout))
        out.append(f"{name:<22} {task:<15} {n:>28,}")
sys.stdout.write("\n".join(out) + "\n")
