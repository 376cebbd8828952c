"""Ensemble weight search: correctness of the batched scorer and of the choice."""

from __future__ import annotations

import numpy as np
import pytest

from mri_ensemble import ensemble
from mri_ensemble.ensemble import combine, optimise, scorers, search_weights
from mri_ensemble.errors import ConfigError, DataError
from mri_ensemble.metrics import segmentation_scores
from mri_ensemble.mri.quality import reconstruction_scores

C = 4


def _random_data(seed: int, m: int = 3, n: int = 8, size: int = 12) -> tuple[np.ndarray, ...]:
    """Random Dirichlet probabilities (M, N, C, H, W), random labels, 4 cases of 2 slices."""
    rng = np.random.default_rng(seed)
    probs = rng.dirichlet(np.full(C, 0.5), (m, n, size, size)).transpose(0, 1, 4, 2, 3)
    target = rng.integers(0, C, (n, size, size)).astype(np.uint8)
    case = np.repeat([f"p{i}" for i in range(n // 2)], 2)
    return probs.astype(np.float32), target, case


def _one_hot(labels: np.ndarray, on: float = 1.0) -> np.ndarray:
    """(N, H, W) labels -> (N, C, H, W) with ``on`` at the label, the rest shared evenly."""
    probs = np.full((*labels.shape[:1], C, *labels.shape[1:]), (1 - on) / (C - 1))
    np.put_along_axis(probs, labels[:, None].astype(np.int64), on, axis=1)
    return probs.astype(np.float32)


def _naive_score(probs: np.ndarray, weights: np.ndarray, target, case) -> float:
    pred = combine(probs, weights).argmax(axis=1).astype(np.uint8)
    return segmentation_scores(pred, target, case)["iou"]


def _single_scores(probs, target, case) -> list[float]:
    return [_naive_score(probs, np.eye(len(probs))[i], target, case) for i in range(len(probs))]


@pytest.mark.parametrize("method", ensemble.OPTIMISERS)
def test_perfect_model_among_noisy_gets_all_weight(method: str) -> None:
    rng = np.random.default_rng(1)
    target = rng.integers(0, C, (6, 10, 10)).astype(np.uint8)
    case = np.repeat(["a", "b", "c"], 2)
    # right everywhere but barely (0.2504 vs 0.2499): any weight on the others flips pixels
    perfect = _one_hot(target, on=0.2504)
    noisy = []
    for _ in range(2):  # confidently wrong on 30 % of the pixels
        wrong = np.where(rng.random(target.shape) < 0.3, (target + 1) % C, target)
        noisy.append(_one_hot(wrong.astype(np.uint8)))
    probs = np.stack([noisy[0], perfect, noisy[1]])
    result = search_weights(probs, target, case, method=method, n_random=50, seed=0)
    assert result.score == 1.0
    expected = np.array([0.0, 1.0, 0.0])
    if result.weights.ndim == 2:  # per_class: the same column for every class
        expected = np.repeat(expected[:, None], C, axis=1)
    np.testing.assert_allclose(result.weights, expected, atol=0.01)


@pytest.mark.parametrize("method", [m for m in ensemble.METHODS if m != "best_single"])
def test_complementary_models_beat_each_single(method: str) -> None:
    rng = np.random.default_rng(2)
    target = rng.integers(0, C, (4, 10, 10)).astype(np.uint8)
    case = np.array(["a", "a", "b", "b"])
    good, bad = _one_hot(target, on=0.9), _one_hot(((target + 1) % C).astype(np.uint8), 0.4)
    first = np.concatenate([good[:2], bad[2:]])  # right on case "a" only
    second = np.concatenate([bad[:2], good[2:]])  # right on case "b" only
    probs = np.stack([first, second])
    result = search_weights(probs, target, case, method=method, n_random=20, seed=0)
    best_single = max(_single_scores(probs, target, case))
    assert result.score == 1.0 > best_single + 0.1
    assert np.all(result.weights > 0.2)


@pytest.mark.parametrize("seed", range(4))
def test_never_below_best_single_model(seed: int) -> None:
    probs, target, case = _random_data(seed)
    singles = _single_scores(probs, target, case)
    for method in ensemble.OPTIMISERS:
        result = search_weights(probs, target, case, method=method, n_random=30, seed=seed)
        assert result.score >= max(singles) - 1e-12
        assert np.all(result.weights >= 0)
        np.testing.assert_allclose(result.weights.sum(axis=0), 1.0)
        assert result.score == pytest.approx(_naive_score(probs, result.weights, target, case))
        if method in ("random", "nelder_mead", "random+nelder_mead"):
            assert result.weights.shape == (3,)
            trace_scores = [s for _, s in result.trace]
            np.testing.assert_allclose(trace_scores[:3], singles, atol=1e-12)  # one-hots first
            assert result.trace[3][0] == pytest.approx([1 / 3] * 3)  # then uniform


def test_deterministic_for_a_seed() -> None:
    probs, target, case = _random_data(5)
    runs = [
        search_weights(probs, target, case, method="random+nelder_mead", n_random=40, seed=7)
        for _ in range(2)
    ]
    np.testing.assert_array_equal(runs[0].weights, runs[1].weights)
    assert runs[0].score == runs[1].score
    assert runs[0].trace == runs[1].trace
    assert runs[0].candidates_evaluated == runs[1].candidates_evaluated


def test_candidate_counts_and_single_model() -> None:
    probs, target, case = _random_data(6)
    result = search_weights(probs, target, case, method="random", n_random=25, seed=0)
    assert result.candidates_evaluated == 3 + 1 + 25
    assert result.method == "random"
    one = search_weights(probs[:1], target, case, method="random+nelder_mead", n_random=5, seed=0)
    np.testing.assert_array_equal(one.weights, [1.0])


def test_batched_scorer_equals_naive_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    probs, target, case = _random_data(8, m=3, n=6, size=10)
    probs = probs.astype(np.float16)
    rng = np.random.default_rng(0)
    weights = np.vstack([np.eye(3), rng.random((9, 3))])
    weights /= weights.sum(axis=1, keepdims=True)
    naive = [_naive_score(probs, w, target, case) for w in weights]
    scorer = ensemble.BatchScorer(probs, target, case)
    np.testing.assert_allclose(scorer(weights), naive, rtol=0, atol=1e-12)
    monkeypatch.setattr(scorers, "CHUNK_ELEMENTS", 50)  # many small chunks, same counts
    np.testing.assert_allclose(scorer(weights), naive, rtol=0, atol=1e-12)


def test_combine_shapes_and_normalisation() -> None:
    probs, _, _ = _random_data(9, m=2, n=3, size=5)
    out = combine(probs.astype(np.float16), np.array([2.0, 2.0]))
    assert out.shape == (3, C, 5, 5) and out.dtype == np.float32
    expected = (probs[0].astype(np.float16).astype(np.float32) + probs[1].astype(np.float16)) / 2
    np.testing.assert_allclose(out, expected, atol=1e-6)
    np.testing.assert_allclose(combine(probs, [10.0, 0.0]), probs[0])
    np.testing.assert_allclose(combine(probs, [0.3, 0.1]), combine(probs, [3.0, 1.0]))
    with pytest.raises(DataError, match="non-negative"):
        combine(probs, [1.0, -1.0])
    with pytest.raises(DataError, match="shape"):
        combine(probs, [1.0, 1.0, 1.0])


def test_unknown_method_and_bad_inputs() -> None:
    probs, target, case = _random_data(10, m=2, n=2, size=4)
    with pytest.raises(ConfigError, match="unknown ensemble method 'grid'; known: mean"):
        search_weights(probs, target, case, method="grid", n_random=1, seed=0)
    with pytest.raises(DataError, match=r"\(M, N, C, H, W\)"):
        search_weights(probs[0], target, case, method="mean", n_random=0, seed=0)
    with pytest.raises(DataError, match="M = 0"):
        search_weights(probs[:0], target, case, method="mean", n_random=0, seed=0)
    with pytest.raises(DataError, match="target must have shape"):
        search_weights(probs, target[:, :3], case, method="mean", n_random=0, seed=0)
    with pytest.raises(DataError, match="case must have shape"):
        search_weights(probs, target, case[:1], method="mean", n_random=0, seed=0)
    bad = probs.copy()
    bad[1, 0, 0, 0, 0] = np.nan
    with pytest.raises(DataError, match="model 1 contain NaN"):
        search_weights(bad, target, case, method="mean", n_random=0, seed=0)


# --- methods beyond the weighted pool: vote, greedy, per-class, cross-fitting, sizes -------


def test_per_class_weights_recover_a_split_between_complementary_models() -> None:
    """Model A is exact on RV (class 1) and noisy on myocardium (2), model B the reverse:
    no shared weights are perfect, per-class weights [A on RV, B on myocardium] are."""
    rng = np.random.default_rng(3)
    target = rng.integers(0, C, (8, 12, 12)).astype(np.uint8)
    case = np.repeat([f"p{i}" for i in range(4)], 2)
    exact = (target[:, None] == np.arange(C)[None, :, None, None]).astype(np.float32)
    a, b = 0.45 * exact, 0.45 * exact  # background and LV: right but unsure in both
    a[:, 1], b[:, 2] = 0.9 * exact[:, 1], 0.9 * exact[:, 2]  # each exact on its own class
    a[:, 2] = (rng.random(target.shape) < 0.4).astype(np.float32)  # confident noise
    b[:, 1] = (rng.random(target.shape) < 0.4).astype(np.float32)
    probs = np.stack([a, b])
    shared = search_weights(probs, target, case, method="random+nelder_mead", n_random=50, seed=0)
    result = search_weights(probs, target, case, method="per_class", n_random=50, seed=0)
    assert shared.score < 0.95
    assert result.score == 1.0
    assert result.weights.shape == (2, C)
    w = result.weights  # RV leans on A, myocardium on B (the split); score 1 needs no more
    assert w[0, 1] > w[1, 1] and w[1, 2] > w[0, 2], w
    assert "kept per-class" in result.note
    assert result.score == pytest.approx(_naive_score(probs, result.weights, target, case))


def test_per_class_scorer_handles_pixels_where_every_model_agrees() -> None:
    """With per-class weights a pixel all models label alike can still change: the batched
    scorer must keep it among the re-scored pixels (naive loop as reference)."""
    probs, target, case = _random_data(11, m=3, n=6, size=10)
    rng = np.random.default_rng(1)
    weights = rng.dirichlet(np.ones(3), (12, C)).transpose(0, 2, 1)  # (K, M, C)
    scorer = ensemble.BatchScorer(probs, target, case, per_class=True)
    naive = [_naive_score(probs, w, target, case) for w in weights]
    np.testing.assert_allclose(scorer(weights), naive, rtol=0, atol=1e-12)


def test_vote_is_the_majority_label_with_ties_broken_by_mean_probability() -> None:
    target = np.zeros((1, 1, 3), dtype=np.uint8)
    p = np.zeros((3, 1, C, 1, 3), dtype=np.float32)
    # pixel 0: votes 1, 1, 2 -> 1; pixel 1: votes 1, 2, 3 (all tied) -> largest mean prob (3)
    for m, (l0, l1, p1) in enumerate([(1, 1, 0.5), (1, 2, 0.5), (2, 3, 0.9)]):
        p[m, 0, l0, 0, 0] = 0.9
        p[m, 0, l1, 0, 1] = p1
        p[m, 0, 0, 0, 2] = 1.0
    np.testing.assert_array_equal(ensemble.vote(p)[0, 0], [1, 3, 0])
    result = search_weights(p, target, np.array(["a"]), method="vote", n_random=0, seed=0)
    assert result.method == "vote"
    np.testing.assert_array_equal(ensemble.fuse_labels(p, result), ensemble.vote(p))


def test_greedy_selection_starts_with_the_best_model_and_reports_its_order() -> None:
    probs, target, case = _random_data(12, m=4)
    singles = _single_scores(probs, target, case)
    result = search_weights(probs, target, case, method="greedy", n_random=0, seed=0, rounds=6)
    assert result.order[0] == int(np.argmax(singles))
    assert result.candidates_evaluated == 6 * 4
    counts = result.weights * np.round(1 / result.weights[result.weights > 0].min())
    np.testing.assert_allclose(counts, np.round(counts), atol=1e-9)  # bag counts / bag size


def test_crossfit_is_no_better_than_in_sample_on_data_built_to_overfit() -> None:
    """Pure-noise models: any weights that beat the others in-sample fit noise, so the score
    of weights chosen on other cases is lower than the in-sample one."""
    probs, target, case = _random_data(13, m=5, n=16, size=10)
    case = np.repeat([f"p{i}" for i in range(8)], 2)
    obj = ensemble.SegmentationObjective(probs, target, case)
    for method in ("random+nelder_mead", "per_class", "greedy"):
        cfg = ensemble.SearchConfig(method, n_random=100, seed=0)
        in_sample = ensemble.search(obj, cfg)
        fused, folds = ensemble.crossfit(obj, cfg, folds=4)
        crossfit = segmentation_scores(fused, target, case)["iou"]
        assert len(folds) == 4
        assert crossfit <= in_sample.score, method


def test_case_folds_keep_patients_together_and_cover_every_slice() -> None:
    case = np.array([f"patient{p:03d}_{ph}" for p in range(5) for ph in ("ED", "ES")])
    case = np.repeat(case, 3)
    folds = ensemble.case_folds(case, 3, seed=0)
    assert len(folds) == 3
    np.testing.assert_array_equal(np.sort(np.concatenate(folds)), np.arange(len(case)))
    for fold in folds:
        patients = {c[:10] for c in case[fold]}
        for p in patients:  # both phases of a patient in the same fold
            assert np.isin(np.flatnonzero(np.char.startswith(case, p)), fold).all()
    with pytest.raises(DataError, match="at least 2 case groups"):
        ensemble.case_folds(case[:6], 5, seed=0)  # one patient
    with pytest.raises(ConfigError, match="folds must be >= 2"):
        ensemble.case_folds(case, 1, seed=0)


def test_forward_selection_and_leave_one_out() -> None:
    probs, target, case = _random_data(14, m=4)
    obj = ensemble.SegmentationObjective(probs, target, case)
    cfg = ensemble.SearchConfig("random", n_random=20, seed=0)
    sizes = ensemble.forward_selection(obj, cfg)
    assert [len(members) for members, _ in sizes] == [1, 2, 3, 4]
    assert sizes[0][0] == [int(np.argmax(_single_scores(probs, target, case)))]
    assert sorted(sizes[-1][0]) == [0, 1, 2, 3]
    for (members, _), (nxt, _) in zip(sizes, sizes[1:], strict=False):
        assert nxt[: len(members)] == members  # nested
    full = ensemble.search(obj, cfg)  # the last size is the search over every member
    np.testing.assert_array_equal(sizes[-1][1].weights, full.weights)
    loo = ensemble.leave_one_out(obj, cfg)
    assert len(loo) == 4 and all(r is not None and r.weights.shape == (3,) for r in loo)
    assert ensemble.leave_one_out(ensemble.SegmentationObjective(probs[:1], target, case), cfg) == [
        None
    ]


def test_bad_settings_are_config_errors() -> None:
    probs, target, case = _random_data(15, m=2, n=2, size=4)
    with pytest.raises(ConfigError, match="rounds must be >= 1"):
        search_weights(probs, target, case, method="greedy", n_random=0, seed=0, rounds=0)
    with pytest.raises(ConfigError, match="penalty must be >= 0"):
        search_weights(probs, target, case, method="per_class", n_random=0, seed=0, penalty=-1)


def _image_data(seed: int, m: int = 4, n: int = 6, h: int = 20, w: int = 18):
    rng = np.random.default_rng(seed)
    target = rng.random((n, h, w)) * 3.0
    recons = target[None] + rng.normal(0, 0.5, (m, n, h, w)) * rng.random((m, 1, 1, 1))
    case = np.repeat([f"vol{i}" for i in range(n // 2)], 2)
    return recons, target, case


def test_ssim_scorer_equals_fastmri_scores_of_the_fused_images() -> None:
    """The filtered-once SSIM (box-filter linearity) equals filtering each fused image."""
    recons, target, case = _image_data(20)
    rng = np.random.default_rng(0)
    weights = np.vstack([np.eye(4), rng.dirichlet(np.ones(4), 7)])
    scorer = ensemble.SSIMScorer(recons, target, case)
    naive = [
        reconstruction_scores(ensemble.combine_images(recons, wt), target, case)["ssim"]
        for wt in weights
    ]
    np.testing.assert_allclose(scorer(weights), naive, rtol=0, atol=1e-9)


def test_image_methods_crossfit_and_segmentation_only_methods() -> None:
    recons, target, case = _image_data(21, m=5, n=8)
    case = np.repeat([f"vol{i}" for i in range(4)], 2)
    obj = ensemble.ImageObjective(recons, target, case)
    for method in ("mean", "best_single", "greedy", "random+nelder_mead"):
        cfg = ensemble.SearchConfig(method, n_random=50, seed=0)
        in_sample = ensemble.search(obj, cfg)
        fused, _ = ensemble.crossfit(obj, cfg, folds=4)
        assert fused.shape == target.shape
        assert reconstruction_scores(fused, target, case)["ssim"] <= in_sample.score + 1e-6
    for method in ("vote", "per_class"):
        with pytest.raises(ConfigError, match="segmentation only"):
            ensemble.search(obj, ensemble.SearchConfig(method))


def test_a_search_below_the_best_single_model_is_an_error_naming_the_method(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The promise is an explicit check (it survives ``python -O``), not an assert."""
    probs, target, case = _random_data(3)
    broken = ensemble.SearchResult("random", np.full(3, 1 / 3), -1.0, 1)
    # the module, not the package's ``search`` (the function of the same name)
    monkeypatch.setattr(optimise, "pool_search", lambda *a, **k: broken)
    with pytest.raises(ensemble.SearchGuaranteeError, match="'random': val score -1.000000 is"):
        search_weights(probs, target, case, method="random", n_random=5, seed=0)


@pytest.mark.parametrize(
    "weights, members",
    [
        ({"a": 0.7, "b": 0.3, "c": 0.0}, ["a", "b"]),
        ({"a": 1.0, "b": 1e-9}, ["a"]),
        ({"a": {"RV": 1.0, "LV": 0.0}, "b": {"RV": 0.0, "LV": 2.0}}, ["a", "b"]),
        ({"a": {"RV": 1.0, "LV": 1.0}, "b": {"RV": 0.0, "LV": 0.0}}, ["a"]),
    ],
)
def test_one_membership_rule(weights: dict, members: list[str]) -> None:
    assert ensemble.ensemble_members(weights) == members
