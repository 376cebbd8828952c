"""Robust (worst-group) ensemble selection, the below-baseline guard and member exclusion."""

from __future__ import annotations

import numpy as np
import pytest

from mri_ensemble import ensemble
from mri_ensemble.ensemble import (
    ImageObjective,
    SearchConfig,
    SegmentationObjective,
    combine,
    members_below,
    search,
)
from mri_ensemble.errors import DataError
from mri_ensemble.metrics import segmentation_scores
from mri_ensemble.mri.quality import reconstruction_scores

C = 4


def _one_hot(labels: np.ndarray) -> np.ndarray:
    """(N, H, W) labels -> (N, C, H, W) float32 one-hot."""
    out = np.zeros((labels.shape[0], C, *labels.shape[1:]), dtype=np.float32)
    np.put_along_axis(out, labels[:, None].astype(np.int64), 1.0, axis=1)
    return out


def _corrupt(target: np.ndarray, fraction: float, rng: np.random.Generator) -> np.ndarray:
    """Labels wrong (shifted by one class) on about ``fraction`` of the pixels."""
    wrong = rng.random(target.shape) < fraction
    return np.where(wrong, (target + 1) % C, target).astype(np.uint8)


def _segmentation_two_groups(seed: int = 0):
    """g1: cases a, b, c; g2: case d (2 slices each). Member A (0) exact on g1 and 70 % wrong
    on g2; member B (1) 20 % wrong everywhere. A wins on the mean over cases, B on the worst
    group."""
    rng = np.random.default_rng(seed)
    target = rng.integers(0, C, (8, 12, 12)).astype(np.uint8)
    case = np.repeat(["a", "b", "c", "d"], 2)
    groups = np.array(["g1"] * 6 + ["g2"] * 2)
    a = np.concatenate([target[:6], _corrupt(target[6:], 0.7, rng)])
    b = _corrupt(target, 0.2, rng)
    probs = np.stack([_one_hot(a), 0.9 * _one_hot(b) + 0.025])  # B a bit less confident
    return probs, target, case, groups


def _seg_group_scores(probs, weights, target, case, groups) -> dict[str, float]:
    """Hand computation: fuse, then mean IoU of each group's slices by the metrics module."""
    pred = combine(probs, weights).argmax(axis=1).astype(np.uint8)
    return {
        str(g): segmentation_scores(pred[groups == g], target[groups == g], case[groups == g])[
            "iou"
        ]
        for g in np.unique(groups)
    }


def _image_two_groups(seed: int = 0):
    """g1: 3 volumes, g2: 1 volume. Member A (0) exact on g1, very noisy on g2; member B (1)
    moderately noisy everywhere; a zero-filled-like baseline between them on g2."""
    rng = np.random.default_rng(seed)
    n, h, w = 8, 20, 18
    target = rng.random((n, h, w)) * 3.0
    case = np.repeat([f"vol{i}" for i in range(4)], 2)
    groups = np.array(["g1"] * 6 + ["g2"] * 2)
    a = target.copy()
    a[6:] += rng.normal(0, 1.5, (2, h, w))
    b = target + rng.normal(0, 1.0, (n, h, w))
    baseline = target + rng.normal(0, 1.2, (n, h, w))
    return np.stack([a, b]), target, case, groups, baseline


def _image_group_scores(recons, weights, target, case, groups) -> dict[str, float]:
    """Hand computation: fuse in float64 (combine_images rounds to float32), SSIM per group."""
    w = np.asarray(weights, dtype=np.float64)
    fused = np.einsum("m,mnhw->nhw", w / w.sum(), recons)
    return {
        str(g): reconstruction_scores(fused[groups == g], target[groups == g], case[groups == g])[
            "ssim"
        ]
        for g in np.unique(groups)
    }


# --- (a) robust selection does not pick the member that only shines on the big group -------


def test_segmentation_mean_picks_a_robust_picks_b_with_the_hand_computed_worst_group() -> None:
    probs, target, case, groups = _segmentation_two_groups()
    obj = SegmentationObjective(probs, target, case, groups)
    plain = search(obj, SearchConfig("random+nelder_mead", n_random=50, seed=0))
    robust = search(obj, SearchConfig("random+nelder_mead", n_random=50, seed=0, robust=True))
    # the mean picks A's labels (uniform weights already give them: A is more confident),
    # the worst group picks B's
    np.testing.assert_array_equal(obj.fuse(plain), probs[0].argmax(axis=1))
    np.testing.assert_array_equal(obj.fuse(robust), probs[1].argmax(axis=1))
    assert robust.weights[1] > robust.weights[0]
    hand = _seg_group_scores(probs, robust.weights, target, case, groups)
    assert robust.score == pytest.approx(min(hand.values()), abs=1e-12)
    assert robust.group_scores == pytest.approx(hand, abs=1e-12)
    assert "robust: score is the worst-group val score" in robust.note
    assert "worst" in robust.note and not plain.note and plain.group_scores == {}
    plain_worst = min(_seg_group_scores(probs, plain.weights, target, case, groups).values())
    assert robust.score > plain_worst + 0.1
    # B alone: its worst group is the robust score, A's mean over cases the plain one
    b_worst = min(_seg_group_scores(probs, np.array([0.0, 1.0]), target, case, groups).values())
    assert robust.score == b_worst
    assert plain.score == segmentation_scores(probs[0].argmax(axis=1), target, case)["iou"]


def test_image_mean_picks_a_robust_lifts_the_worst_group() -> None:
    recons, target, case, groups, _ = _image_two_groups()
    obj = ImageObjective(recons, target, case, groups)
    plain = search(obj, SearchConfig("random+nelder_mead", n_random=50, seed=0))
    robust = search(obj, SearchConfig("random+nelder_mead", n_random=50, seed=0, robust=True))
    assert plain.weights[0] > 0.5
    assert robust.weights[1] > plain.weights[1]
    hand = _image_group_scores(recons, robust.weights, target, case, groups)
    assert robust.score == pytest.approx(min(hand.values()), abs=1e-9)
    assert robust.group_scores == pytest.approx(hand, abs=1e-9)
    plain_worst = min(_image_group_scores(recons, plain.weights, target, case, groups).values())
    assert robust.score > plain_worst
    assert float(obj.scorer()(robust.weights[None])[0]) < plain.score  # the price: the mean


@pytest.mark.parametrize("method", ensemble.OPTIMISERS)
def test_every_optimiser_keeps_its_promise_in_the_worst_group_score(method: str) -> None:
    probs, target, case, groups = _segmentation_two_groups(1)
    probs = np.concatenate([probs, probs[1:] * 0.5 + probs[:1] * 0.5])  # a third member
    obj = SegmentationObjective(probs, target, case, groups)
    result = search(obj, SearchConfig(method, n_random=20, seed=0, robust=True))
    singles = [
        min(_seg_group_scores(probs, np.eye(3)[i], target, case, groups).values()) for i in range(3)
    ]
    assert result.score >= max(singles) - 1e-12
    hand = _seg_group_scores(probs, result.weights, target, case, groups)
    assert result.score == pytest.approx(min(hand.values()), abs=1e-12)
    assert set(result.group_scores) == {"g1", "g2"}


def test_image_optimisers_and_vote_robust() -> None:
    recons, target, case, groups, _ = _image_two_groups(2)
    obj = ImageObjective(recons, target, case, groups)
    for method in ("mean", "best_single", "random", "nelder_mead", "greedy"):
        result = search(obj, SearchConfig(method, n_random=20, seed=0, robust=True))
        hand = _image_group_scores(recons, result.weights, target, case, groups)
        assert result.score == pytest.approx(min(hand.values()), abs=1e-9), method
    probs, target, case, groups = _segmentation_two_groups(2)
    seg = SegmentationObjective(probs, target, case, groups)
    voted = search(seg, SearchConfig("vote", robust=True))
    labels = ensemble.vote(probs)
    hand = {
        g: segmentation_scores(labels[groups == g], target[groups == g], case[groups == g])["iou"]
        for g in ("g1", "g2")
    }
    assert voted.score == pytest.approx(min(hand.values()), abs=1e-12)
    assert voted.group_scores == pytest.approx(hand, abs=1e-12)


# --- (b) one group: robust is the plain score, exactly ---------------------------------------


@pytest.mark.parametrize("method", ensemble.METHODS)
def test_one_group_robust_equals_plain_exactly(method: str) -> None:
    probs, target, case, _ = _segmentation_two_groups(3)
    plain_obj = SegmentationObjective(probs, target, case)
    one_obj = SegmentationObjective(probs, target, case, np.full(len(case), "only"))
    plain = search(plain_obj, SearchConfig(method, n_random=20, seed=0))
    for obj in (one_obj, plain_obj):  # one group; no groups at all
        robust = search(obj, SearchConfig(method, n_random=20, seed=0, robust=True))
        np.testing.assert_array_equal(robust.weights, plain.weights)
        assert robust.score == plain.score
        assert robust.trace == plain.trace
        assert robust.candidates_evaluated == plain.candidates_evaluated
        assert robust.note.endswith(
            "score equals the plain val score"
            if obj is one_obj
            else "the objective has no groups, score is the plain val score"
        )


def test_worst_group_scorer_of_one_group_is_that_scorer() -> None:
    recons, target, case, _, _ = _image_two_groups(4)
    obj = ImageObjective(recons, target, case, np.full(len(case), "x"))
    weights = np.random.default_rng(0).dirichlet(np.ones(2), 9)
    plain = obj.scorer()(weights)
    np.testing.assert_array_equal(obj.group_scorer()(weights), plain)
    wrapped = ensemble.WorstGroupScorer(["x"], [obj.scorer()])
    np.testing.assert_array_equal(wrapped(weights), plain)


def test_worst_group_scorer_is_the_elementwise_min_ignoring_nan() -> None:
    first = lambda w: np.array([0.2, np.nan, 0.9])  # noqa: E731
    second = lambda w: np.array([0.5, 0.4, np.nan])  # noqa: E731
    out = ensemble.WorstGroupScorer(["a", "b"], [first, second])(np.ones((3, 2)))
    np.testing.assert_array_equal(out, [0.2, 0.4, 0.9])


# --- (c) the guard ---------------------------------------------------------------------------


def test_members_below_flags_exactly_the_member_below_the_baseline_on_one_group() -> None:
    recons, target, case, groups, baseline = _image_two_groups()
    obj = ImageObjective(recons, target, case, groups)
    assert members_below(obj, baseline) == {0: ["g2"], 1: []}
    labels, scores = ensemble.group_member_scores(obj, baseline)
    assert labels == ["g1", "g2"] and scores.shape == (2, 3)
    for row, g in zip(scores, labels, strict=True):
        sel = groups == g
        hand = [
            reconstruction_scores(x[sel], target[sel], case[sel])["ssim"]
            for x in (*recons, baseline)
        ]
        np.testing.assert_allclose(row, hand, atol=1e-9)
    # without groups: one group "all", where A is not below (it is exact on 3 of 4 volumes)
    assert members_below(ImageObjective(recons, target, case), baseline) == {0: [], 1: []}


def test_members_below_segmentation_labels_or_probabilities_baseline() -> None:
    probs, target, case, groups = _segmentation_two_groups()
    obj = SegmentationObjective(probs, target, case, groups)
    baseline = _corrupt(target, 0.4, np.random.default_rng(9))  # between A and B on g2
    assert members_below(obj, baseline) == {0: ["g2"], 1: []}
    assert members_below(obj, _one_hot(baseline)) == {0: ["g2"], 1: []}
    assert members_below(obj, baseline, slices=np.arange(6)) == {0: [], 1: []}  # g1 only
    with pytest.raises(DataError, match="segmentation baseline"):
        members_below(obj, baseline[:3])


# --- (d) exclusion ---------------------------------------------------------------------------


def test_excluded_member_gets_exactly_zero_and_the_note_names_it() -> None:
    recons, target, case, groups, baseline = _image_two_groups()
    recons = np.concatenate([recons, recons[1:] + 0.1])  # a third member
    obj = ImageObjective(recons, target, case, groups)
    cfg = SearchConfig("random+nelder_mead", n_random=30, seed=0)
    result = search(obj, cfg, exclude=[0])
    assert result.weights.shape == (3,) and result.weights[0] == 0.0
    np.testing.assert_allclose(result.weights.sum(), 1.0)
    assert "excluded members [0]: member 0: excluded by the caller" in result.note
    inner = search(obj, cfg, models=[1, 2])
    np.testing.assert_array_equal(result.weights[1:], inner.weights)
    assert result.score == inner.score  # the promise: vs the best *allowed* single member
    assert all(len(w) == 3 and w[0] == 0.0 for w, _ in result.trace)
    why = search(obj, cfg, exclude={2: "below zero-filled on 'g2'"})
    assert why.weights[2] == 0.0 and "member 2: below zero-filled on 'g2'" in why.note
    greedy = search(obj, SearchConfig("greedy", rounds=4), exclude=[1])
    assert greedy.weights[1] == 0.0 and 1 not in greedy.order
    guarded = ensemble.guarded_search(obj, cfg, baseline)
    assert guarded.weights[0] == 0.0
    assert "member 0: below the baseline on group(s) 'g2'" in guarded.note
    with pytest.raises(DataError, match="every ensemble member is excluded"):
        search(obj, cfg, exclude=[0, 1, 2])
    with pytest.raises(DataError, match="every ensemble member is excluded"):
        ensemble.guarded_search(obj, cfg, np.asarray(target, dtype=np.float64))  # perfect
    with pytest.raises(DataError, match="member 5 does not exist"):
        search(obj, cfg, exclude=[5])


def test_exclusion_for_per_class_and_vote_segmentation() -> None:
    probs, target, case, groups = _segmentation_two_groups()
    probs = np.concatenate([probs, probs[:1]])
    obj = SegmentationObjective(probs, target, case, groups)
    pc = search(obj, SearchConfig("per_class", n_random=10, seed=0, robust=True), exclude=[0])
    assert pc.weights.shape == (3, C) and np.all(pc.weights[0] == 0.0)
    np.testing.assert_allclose(pc.weights.sum(axis=0), 1.0)
    voted = search(obj, SearchConfig("vote"), exclude=[2])
    np.testing.assert_array_equal(voted.weights, [0.5, 0.5, 0.0])
    np.testing.assert_array_equal(obj.fuse(voted), ensemble.vote(probs[:2]))


# --- (e) groups must be constant within a case ------------------------------------------------


def test_groups_not_constant_within_a_case_are_a_data_error() -> None:
    probs, target, case, groups = _segmentation_two_groups()
    mixed = groups.copy()
    mixed[5] = "g2"  # case "c": slice 4 in g1, slice 5 in g2
    with pytest.raises(DataError, match="constant within a case: case 'c'"):
        SegmentationObjective(probs, target, case, mixed)
    recons, target_i, case_i, groups_i, _ = _image_two_groups()
    with pytest.raises(DataError, match="constant within a case"):
        ImageObjective(recons, target_i, case_i, mixed)
    with pytest.raises(DataError, match="groups must have shape"):
        ImageObjective(recons, target_i, case_i, groups_i[:3])
    decoded = ImageObjective(recons, target_i, case_i, np.char.encode(groups_i))  # HDF5 bytes
    assert decoded.groups is not None and decoded.groups.tolist() == groups_i.tolist()


# --- (g) cross-fitting subsets the groups per fold ---------------------------------------------


@pytest.mark.parametrize("kind", ["segmentation", "image"])
def test_crossfit_robust_subsets_groups_per_fold(kind: str) -> None:
    if kind == "segmentation":
        probs, target, case, groups = _segmentation_two_groups(5)
        obj: ensemble.Objective = SegmentationObjective(probs, target, case, groups)
    else:
        recons, target, case, groups, _ = _image_two_groups(5)
        obj = ImageObjective(recons, target, case, groups)
    cfg = SearchConfig("random+nelder_mead", n_random=20, seed=0, robust=True)
    fused, results = ensemble.crossfit(obj, cfg, folds=4)
    assert fused.shape == target.shape and len(results) == 4
    for held, result in zip(ensemble.case_folds(case, 4, cfg.seed), results, strict=True):
        fitted = np.setdiff1d(np.arange(len(case)), held)
        sub = obj.subset(fitted)
        assert sub.groups is not None
        np.testing.assert_array_equal(sub.groups, groups[fitted])
        alone = search(sub, cfg)  # the fold's fit = a search on the fold's own objective
        np.testing.assert_array_equal(result.weights, alone.weights)
        assert result.score == alone.score
        present = set(np.unique(groups[fitted]).tolist())
        assert set(result.group_scores) == (present if len(present) > 1 else set())
        np.testing.assert_array_equal(fused[held], obj.fuse(result, slices=held))
    excluded, fold_results = ensemble.crossfit(obj, cfg, folds=2, exclude=[0])
    assert excluded.shape == target.shape
    assert all(r.weights[0] == 0.0 and "member 0" in r.note for r in fold_results)
