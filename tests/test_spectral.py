"""Eckart-Young, effective rank and subspace similarity against closed forms."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lora_ref import spectral


def _matrix(seed, m=12, n=9):
    return np.random.default_rng(seed).normal(size=(m, n))


@pytest.mark.parametrize("r", [1, 3, 8, 9])
def test_truncated_svd_error_equals_singular_value_tail(r):
    W = _matrix(0)
    s = np.linalg.svd(W, compute_uv=False)
    Wr = spectral.best_rank_r(W, r)
    assert np.linalg.matrix_rank(Wr) == r
    fro_tail = math.sqrt(np.sum(s[r:] ** 2))
    spec_tail = s[r] if r < len(s) else 0.0
    assert abs(np.linalg.norm(W - Wr, "fro") - fro_tail) < 1e-10
    assert abs(np.linalg.norm(W - Wr, 2) - spec_tail) < 1e-10
    assert abs(spectral.eckart_young_error(W, r, "fro") - fro_tail) < 1e-10
    assert abs(spectral.eckart_young_error(W, r, "spectral") - spec_tail) < 1e-10


def test_no_random_rank_r_matrix_beats_the_truncated_svd():
    W, r = _matrix(1), 3
    best_fro = spectral.eckart_young_error(W, r, "fro")
    best_2 = spectral.eckart_young_error(W, r, "spectral")
    rng = np.random.default_rng(2)
    Wr = spectral.best_rank_r(W, r)
    for trial in range(300):
        # random rank-r competitors: random factors, and perturbations of the optimum
        X = rng.normal(size=(12, r)) @ rng.normal(size=(r, 9)) if trial % 2 else (
            Wr + 0.05 * rng.normal(size=(12, r)) @ rng.normal(size=(r, 9)))
        X = spectral.best_rank_r(X, r) if np.linalg.matrix_rank(X) > r else X
        assert np.linalg.norm(W - X, "fro") >= best_fro - 1e-12
        assert np.linalg.norm(W - X, 2) >= best_2 - 1e-12


@settings(max_examples=40, deadline=None)
@given(m=st.integers(1, 10), n=st.integers(1, 10), seed=st.integers(0, 2**31), frac=st.floats(0, 1))
def test_eckart_young_error_is_the_tail_on_random_shapes(m, n, seed, frac):
    W = np.random.default_rng(seed).normal(size=(m, n))
    r = 1 + int(frac * (min(m, n) - 1))
    err = np.linalg.norm(W - spectral.best_rank_r(W, r), "fro")
    assert abs(err - spectral.eckart_young_error(W, r)) < 1e-10


def test_effective_rank_of_diag_3_2_1():
    p = np.array([3, 2, 1]) / 6
    closed = math.exp(-np.sum(p * np.log(p)))
    assert spectral.effective_rank(np.diag([3.0, 2.0, 1.0])) == pytest.approx(closed, abs=1e-12)
    assert round(spectral.effective_rank(np.diag([3.0, 2.0, 1.0])), 4) == 2.7495


def test_effective_rank_bounds_and_extremes():
    assert spectral.effective_rank(np.outer(np.arange(1.0, 6), np.arange(1.0, 4))) == pytest.approx(1.0)
    assert spectral.effective_rank(np.eye(7)) == pytest.approx(7.0)
    for seed in range(5):
        W = _matrix(seed, 8, 6)
        e = spectral.effective_rank(W)
        assert 1.0 <= e <= np.linalg.matrix_rank(W)


def test_spectral_functions_accept_torch_tensors_with_the_same_answer():
    W = _matrix(3)
    Wt = torch.from_numpy(W).float()
    assert spectral.effective_rank(Wt) == pytest.approx(spectral.effective_rank(W), rel=1e-6)
    assert spectral.eckart_young_error(Wt, 2) == pytest.approx(spectral.eckart_young_error(W, 2), rel=1e-6)


def test_subspace_similarity_of_nested_and_orthogonal_subspaces():
    rng = np.random.default_rng(0)
    k = 20
    Q, _ = np.linalg.qr(rng.normal(size=(k, k)))
    A8 = np.diag(np.arange(8, 0, -1.0)) @ Q[:, :8].T             # (8, k), rows span Q[:, :8]
    A64 = np.diag(np.arange(12, 0, -1.0)) @ Q[:, :12].T          # (12, k), contains A8's row space
    assert spectral.subspace_similarity(A8, A64, 8, 12) == pytest.approx(1.0)
    assert spectral.subspace_similarity(A8, A64, 3, 3) == pytest.approx(1.0)
    A_orth = Q[:, 12:16].T                                        # (4, k), orthogonal to both
    assert spectral.subspace_similarity(A8, A_orth, 8, 4) == pytest.approx(0.0, abs=1e-12)


def test_subspace_similarity_of_random_subspaces_is_about_ij_over_k():
    """Random i- and j-dim subspaces of R^k: E||V1^T V2||_F^2 = i j / k, so phi ~ max(i, j)/k."""
    rng = np.random.default_rng(1)
    k, i, j = 200, 4, 8
    vals = [spectral.subspace_similarity(rng.normal(size=(i, k)), rng.normal(size=(j, k)), i, j) for _ in range(200)]
    assert np.mean(vals) == pytest.approx(j / k, rel=0.1)


def test_spectral_bad_input():
    with pytest.raises(ValueError, match=r"r=4 exceeds min\(d, k\) = min\(3, 5\) = 3"):
        spectral.truncated_svd(np.ones((3, 5)), 4)
    with pytest.raises(ValueError, match=r"norm must be 'fro' or 'spectral', got norm='nuc'"):
        spectral.eckart_young_error(np.ones((3, 5)), 1, "nuc")
    with pytest.raises(ValueError, match=r"non-finite"):
        spectral.effective_rank(np.array([[1.0, np.nan]]))
    with pytest.raises(ValueError, match=r"zero matrix"):
        spectral.effective_rank(np.zeros((3, 3)))
    with pytest.raises(ValueError, match=r"same number of columns"):
        spectral.subspace_similarity(np.ones((2, 5)), np.ones((2, 6)), 1, 1)
    with pytest.raises(ValueError, match=r"j=3 must be in \[1, 2\]"):
        spectral.subspace_similarity(np.ones((2, 5)), np.eye(2, 5), 1, 3)
