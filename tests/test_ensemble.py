"""Ensemble weight search: correctness of the batched scorer and of the choice."""

from __future__ import annotations

import numpy as np
import pytest

from mri_ensemble import ensemble
from mri_ensemble.ensemble import combine, search_weights
from mri_ensemble.errors import ConfigError, DataError
from mri_ensemble.metrics import segmentation_scores

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


@pytest.mark.parametrize("method", ensemble.METHODS)
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
    np.testing.assert_allclose(result.weights, [0, 1, 0], atol=0.01)


@pytest.mark.parametrize("method", ensemble.METHODS)
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
    for method in ensemble.METHODS:
        result = search_weights(probs, target, case, method=method, n_random=30, seed=seed)
        assert result.score >= max(singles) - 1e-12
        assert result.weights.shape == (3,) and np.all(result.weights >= 0)
        assert result.weights.sum() == pytest.approx(1.0)
        assert result.score == pytest.approx(_naive_score(probs, result.weights, target, case))
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
    scorer = ensemble._BatchScorer(probs, target, case)
    np.testing.assert_allclose(scorer(weights), naive, rtol=0, atol=1e-12)
    monkeypatch.setattr(ensemble, "CHUNK_ELEMENTS", 50)  # many small chunks, same counts
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
