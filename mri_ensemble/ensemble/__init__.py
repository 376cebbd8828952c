"""Ensembles of trained members: weights searched on validation outputs only, then fused.

- :mod:`~mri_ensemble.ensemble.fusion`: fusing member outputs with weights (``combine``,
  ``vote``, ``combine_images``), the membership rule, ``SearchResult``.
- :mod:`~mri_ensemble.ensemble.scorers`: the fast batched metric scorers (IoU, SSIM,
  worst group) that score many candidate weights at once.
- :mod:`~mri_ensemble.ensemble.protocol`: objectives (a task's val outputs, scored and fused
  on subsets), case folds and the below-baseline member guard.
- :mod:`~mri_ensemble.ensemble.optimise`: the optimisers (``METHODS``), ``search`` and its
  guarded, cross-fitted, forward-selection and leave-one-out uses.

Dependencies go one way: scorers <- fusion <- protocol <- optimise. The public names are
re-exported here; the tuning constants (``CHUNK_ELEMENTS``, ``SSIM_BLOCK``, ...) are not:
read or patch them in the submodule that uses them.
"""

from mri_ensemble.ensemble.fusion import (
    MIN_WEIGHT,
    SearchResult,
    combine,
    combine_images,
    ensemble_members,
    fuse_labels,
    vote,
)
from mri_ensemble.ensemble.optimise import (
    METHODS,
    OPTIMISERS,
    SEGMENTATION_ONLY,
    SearchConfig,
    SearchGuaranteeError,
    crossfit,
    forward_selection,
    guarded_search,
    leave_one_out,
    search,
    search_image_weights,
    search_weights,
)
from mri_ensemble.ensemble.protocol import (
    ALL_GROUP,
    ImageObjective,
    Objective,
    SegmentationObjective,
    case_folds,
    case_groups,
    group_member_scores,
    members_below,
)
from mri_ensemble.ensemble.scorers import BatchScorer, Scorer, SSIMScorer, WorstGroupScorer

__all__ = [
    "ALL_GROUP",
    "METHODS",
    "MIN_WEIGHT",
    "OPTIMISERS",
    "SEGMENTATION_ONLY",
    "BatchScorer",
    "ImageObjective",
    "Objective",
    "SSIMScorer",
    "Scorer",
    "SearchConfig",
    "SearchGuaranteeError",
    "SearchResult",
    "SegmentationObjective",
    "WorstGroupScorer",
    "case_folds",
    "case_groups",
    "combine",
    "combine_images",
    "crossfit",
    "ensemble_members",
    "forward_selection",
    "fuse_labels",
    "group_member_scores",
    "guarded_search",
    "leave_one_out",
    "members_below",
    "search",
    "search_image_weights",
    "search_weights",
    "vote",
]
