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
    "as_matrix",
    "singular_values",
    "truncated_svd",
    "best_rank_r",
    "eckart_young_error",
    "effective_rank",
    "effective_rank_of_spectrum",
    "subspace_similarity",
    "projected_norm",
    "amplification_factor",
    "singular_vector_overlap",
    "intruder_dimensions",
]


def as_matrix(M, name="W"):
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
    return np.linalg.svd(as_matrix(W), compute_uv=False)


def truncated_svd(W, r):
    """The top-r singular triplets: U_r (m, r), sigma_r (r,), Vt_r (r, n).

    W_r = U_r diag(sigma_r) Vt_r is the best rank-r approximation of W (Eckart-Young).
    """
    W = as_matrix(W)
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
    W = as_matrix(W)
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
    Book: eq-ch07-erank (notebooks/07_trained_adapters).
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

    effective_rank(diag(3, 2, 1)) = exp(H(1/2, 1/3, 1/6)) = 2^(2/3) sqrt(3) = 2.7495...
    Book: eq-ch07-erank, prop-ch07-erank (notebooks/07_trained_adapters).
    """
    return effective_rank_of_spectrum(singular_values(M))


def subspace_similarity(A1, A2, i, j):
    """The LoRA paper's phi (Hu et al. 2021, Sec. 7.2) between two adapters' A matrices.

    With A = U Sigma V^T, let V1_i be the top-i right-singular vectors of A1 (k, i)
    and V2_j the top-j of A2 (k, j). Then

        phi(A1, A2, i, j) = ||V1_i^T V2_j||_F^2 / min(i, j)   in [0, 1]:

    1 when one subspace contains the other, 0 when they are orthogonal.
    A1: (r1, k), A2: (r2, k), 1 <= i <= r1, 1 <= j <= r2. For B matrices (d, r), pass B.T.
    Book: eq-ch07-phi (notebooks/07_trained_adapters).
    """
    A1 = as_matrix(A1, "A1")
    A2 = as_matrix(A2, "A2")
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


def _top_singular_vectors(M, r, name):
    """U_r (m, r), V_r (n, r): the top-r left and right singular vectors of M, which must have
    rank >= r numerically (else its r-th direction is not determined by M)."""
    U, sigma, Vt = np.linalg.svd(M, full_matrices=False)       # (m, p), (p,), (p, n)
    tol = sigma[0] * max(M.shape) * np.finfo(np.float64).eps   # numpy's matrix_rank tolerance
    if sigma[r - 1] <= tol:
        q = int(np.sum(sigma > tol))
        raise ValueError(f"{name} {M.shape} has numerical rank {q} < r={r}: its top-{r} singular vectors "
                         f"are not determined by it (sigma_{r} = {sigma[r - 1]:.3g})")
    return U[:, :r], Vt[:r].T


def projected_norm(W0, M, r):
    """||U_r^T W0 V_r||_F, with U_r (d, r) and V_r (k, r) the top-r left and right singular
    vectors of M (d, k): how large W0 is inside the r directions of M.

    The LoRA paper's Table 7 tabulates this for M = Delta W (the update's directions),
    M = W0 (its own top-r: sqrt(sigma_1^2 + ... + sigma_r^2)) and M = a random matrix.
    Book: eq-ch07-amplification (notebooks/07_trained_adapters).
    """
    W0, M = as_matrix(W0, "W0"), as_matrix(M, "M")
    if W0.shape != M.shape:
        raise ValueError(f"W0 {W0.shape} and M {M.shape} must have the same shape (d, k)")
    _checks.check_rank(r, *W0.shape)
    U, V = _top_singular_vectors(M, r, "M")                    # (d, r), (k, r)
    return float(np.linalg.norm(U.T @ W0 @ V, "fro"))          # ||(r, d) (d, k) (k, r)||_F


def amplification_factor(delta_W, W0, r):
    """The LoRA paper's feature amplification factor (Hu et al. 2021, Sec. 7.3 and App. H.4):

        ||Delta W||_F / ||U_r^T W0 V_r||_F,   U_r (d, r), V_r (k, r) the top-r singular vectors of Delta W.

    Since Delta W lies in its own top-r directions when rank(Delta W) = r, the ratio is
    ||U_r^T Delta W V_r||_F / ||U_r^T W0 V_r||_F: how many times larger the update is than the
    pretrained weight in the update's own r x r block. The paper writes U^T W V^T with V holding
    the right singular vectors as rows (numpy's Vt); here V_r holds them as columns, the same number.
    delta_W, W0: (d, k); 1 <= r <= min(d, k) and rank(Delta W) >= r. Returns inf when W0 has no
    component in those directions.
    Book: eq-ch07-amplification (notebooks/07_trained_adapters).
    """
    delta_W = as_matrix(delta_W, "delta_W")
    denominator = projected_norm(W0, delta_W, r)               # checks the shapes, r and rank(Delta W)
    numerator = float(np.linalg.norm(delta_W, "fro"))
    return numerator / denominator if denominator > 0 else math.inf


def singular_vector_overlap(W0, W, top_k=10):
    """max_i |cos(u_j(W), u_i(W0))| for j = 1..top_k: how well each of the top_k left singular
    vectors of W (d, k) is matched by some left singular vector of W0 (d, k).

    Singular vectors are unit vectors defined up to sign, so the cosine is |u_j^T u_i|.
    Returns a (top_k,) array in [0, 1].
    Book: eq-ch07-intruder (notebooks/07_trained_adapters).
    """
    W0, W = as_matrix(W0, "W0"), as_matrix(W, "W")
    if W0.shape != W.shape:
        raise ValueError(f"W0 {W0.shape} and W {W.shape} must have the same shape (d, k)")
    if isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)):
        raise TypeError(f"top_k must be an integer, got top_k={top_k!r}")
    if not 1 <= top_k <= min(W.shape):
        raise ValueError(f"top_k={top_k} must be in [1, {min(W.shape)}] for matrices of shape {W.shape}")
    U0 = np.linalg.svd(W0, full_matrices=False)[0]            # (d, p) left singular vectors of W0
    U = np.linalg.svd(W, full_matrices=False)[0][:, :top_k]   # (d, top_k) the top_k of W
    return np.abs(U.T @ U0).max(axis=1)                        # (top_k,) best match of each


def intruder_dimensions(W0, W, top_k=10, eps=0.5):
    """Intruder dimensions (Shuttleworth et al. 2024, Definition 1): the indices j < top_k
    (0-based) of the top_k left singular vectors u_j of the fine-tuned W (d, k) with

        max_i |cos(u_j(W), u_i(W0))| < eps   over every left singular vector u_i of W0 (d, k):

    new high-ranking directions that no direction of the pretrained W0 resembles. top_k=10 and
    eps=0.5 are the defaults of the authors' code and of PEFT's reduce_intruder_dimension.
    Book: eq-ch07-intruder (notebooks/07_trained_adapters).
    """
    if isinstance(eps, bool) or not isinstance(eps, (int, float, np.floating)) or not 0 < eps <= 1:
        raise ValueError(f"eps must be a number in (0, 1] (a cosine threshold), got eps={eps!r}")
    overlap = singular_vector_overlap(W0, W, top_k)
    return [int(j) for j in np.flatnonzero(overlap < eps)]
