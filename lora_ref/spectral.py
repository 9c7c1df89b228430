"""Spectral analysis of weights and adapters: SVD, Eckart-Young, effective rank, subspace similarity.

Every function takes a NumPy array or a torch tensor (it is read as float64 NumPy,
so the answers are the same from either backend) and returns NumPy arrays or
Python floats. This module never imports torch.

W = U diag(sigma) V^T with sigma_1 >= sigma_2 >= ... >= 0 throughout.
"""

from __future__ import annotations

import math

import numpy as np

from . import _checks

__all__ = [
    "singular_values",
    "truncated_svd",
    "best_rank_r",
    "eckart_young_error",
    "effective_rank",
    "effective_rank_of_spectrum",
    "subspace_similarity",
]


def _as_matrix(M, name="W"):
    """A torch tensor or array-like -> a finite float64 (m, n) NumPy array."""
    if hasattr(M, "detach"):                      # torch.Tensor, without importing torch
        M = M.detach().cpu().double().numpy()
    M = np.asarray(M, dtype=np.float64)
    if M.ndim != 2:
        raise ValueError(f"{name} must be a 2-D matrix, got shape {M.shape}")
    if M.size == 0:
        raise ValueError(f"{name} is empty, shape {M.shape}")
    if not np.all(np.isfinite(M)):
        raise ValueError(f"{name} has non-finite values (nan or inf), shape {M.shape}")
    return M


def singular_values(W):
    """sigma_1 >= ... >= sigma_min(m,n) >= 0."""
    return np.linalg.svd(_as_matrix(W), compute_uv=False)


def truncated_svd(W, r):
    """The top-r singular triplets: U_r (m, r), sigma_r (r,), Vt_r (r, n).

    W_r = U_r diag(sigma_r) Vt_r is the best rank-r approximation of W (Eckart-Young).
    """
    W = _as_matrix(W)
    _checks.check_rank(r, *W.shape)
    U, sigma, Vt = np.linalg.svd(W, full_matrices=False)      # (m, p), (p,), (p, n); p = min(m, n)
    return U[:, :r], sigma[:r], Vt[:r, :]


def best_rank_r(W, r):
    """W_r = U_r diag(sigma_r) Vt_r, the closest rank-r matrix to W in Frobenius and spectral norm."""
    U, sigma, Vt = truncated_svd(W, r)
    return (U * sigma) @ Vt                           # (m, r) * (r,) @ (r, n) -> (m, n)


def eckart_young_error(W, r, norm="fro"):
    """min over rank-r X of ||W - X||, read off the singular values of W.

    norm="fro":       ||W - W_r||_F = sqrt(sum_{i > r} sigma_i^2)
    norm="spectral":  ||W - W_r||_2 = sigma_{r+1}   (0 when r = min(m, n))
    """
    if norm not in ("fro", "spectral"):
        raise ValueError(f"norm must be 'fro' or 'spectral', got norm={norm!r}")
    W = _as_matrix(W)
    _checks.check_rank(r, *W.shape)
    sigma = singular_values(W)
    tail = sigma[r:]                                  # sigma_{r+1}, sigma_{r+2}, ...
    if norm == "fro":
        return float(math.sqrt(np.sum(tail**2)))
    return float(tail[0]) if tail.size else 0.0


def effective_rank_of_spectrum(sigma):
    """Roy & Vetterli (2007): erank = exp(H(p)),  p_i = sigma_i / sum_j sigma_j,  H(p) = -sum p_i log p_i.

    1 <= erank <= rank: it is 1 when one direction holds all the energy and equals
    the rank when the nonzero singular values are equal. Zero terms contribute 0 (0 log 0 = 0).
    """
    sigma = np.asarray(sigma, dtype=np.float64)
    if sigma.ndim != 1 or sigma.size == 0:
        raise ValueError(f"singular values must be a non-empty 1-D array, got shape {sigma.shape}")
    if not np.all(np.isfinite(sigma)) or np.any(sigma < 0):
        raise ValueError(f"singular values must be finite and >= 0, got {sigma}")
    total = sigma.sum()
    if total == 0:
        raise ValueError("the effective rank of the zero matrix is undefined (all singular values are 0)")
    p = sigma[sigma > 0] / total                  # distribution of the spectral mass
    return float(np.exp(-np.sum(p * np.log(p))))


def effective_rank(M):
    """Effective rank of a matrix M, from its singular values (Roy & Vetterli 2007).

    effective_rank(diag(3, 2, 1)) = exp(H(1/2, 1/3, 1/6)) = 2.7495...
    """
    return effective_rank_of_spectrum(singular_values(M))


def subspace_similarity(A1, A2, i, j):
    """The LoRA paper's phi (Hu et al. 2021, Sec. 7.2) between two adapters' A matrices.

    With A = U Sigma V^T, let V1_i be the top-i right-singular vectors of A1 (k, i)
    and V2_j the top-j of A2 (k, j). Then

        phi(A1, A2, i, j) = ||V1_i^T V2_j||_F^2 / min(i, j)   in [0, 1]:

    1 when one subspace contains the other, 0 when they are orthogonal.
    A1: (r1, k), A2: (r2, k), 1 <= i <= r1, 1 <= j <= r2. For B matrices (d, r), pass B.T.
    """
    A1 = _as_matrix(A1, "A1")
    A2 = _as_matrix(A2, "A2")
    if A1.shape[1] != A2.shape[1]:
        raise ValueError(
            f"A1 {A1.shape} and A2 {A2.shape} must have the same number of columns k (the input width)"
        )
    for name, idx, A in (("i", i, A1), ("j", j, A2)):
        if isinstance(idx, bool) or not isinstance(idx, (int, np.integer)):
            raise TypeError(f"{name} must be an integer, got {name}={idx!r}")
        if not 1 <= idx <= min(A.shape):
            raise ValueError(f"{name}={idx} must be in [1, {min(A.shape)}] for a matrix of shape {A.shape}")
    V1 = np.linalg.svd(A1, full_matrices=False)[2][:i].T      # (k, i) top-i right-singular vectors
    V2 = np.linalg.svd(A2, full_matrices=False)[2][:j].T      # (k, j)
    return float(np.linalg.norm(V1.T @ V2, "fro") ** 2 / min(i, j))
