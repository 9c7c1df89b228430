"""What trained adapters look like: baselines for random directions, and the per-layer
measurements of the book's standard fine-tunes (notebooks/07_trained_adapters).

* ``random_subspace_similarity`` and ``random_projected_norm`` are the closed forms that say what
  the LoRA paper's phi and Table 7 give for directions drawn at random;
* ``similarity_grid`` is phi(A1, A2, i, j) for every i, j at once (the paper's heatmaps);
* ``measure_update`` measures one ΔW against its W0: effective rank, amplification, intruders.

They take NumPy arrays or torch tensors and never import torch. The runs they measure are
``lora_ref.tiny.experiments.train_run`` and ``measure_run``.
"""

from __future__ import annotations

import math

import numpy as np

from . import _checks, spectral

__all__ = [
    "random_subspace_similarity",
    "random_projected_norm",
    "similarity_grid",
    "similarity_over_random",
    "measure_update",
    "rank_correlation",
    "AMPLIFICATION_RANKS",
]

# The ranks at which the chapter reads the amplification factor (the LoRA paper's 4 and 64, and between).
AMPLIFICATION_RANKS = (4, 8, 16, 64)


def random_subspace_similarity(i, j, k):
    """E[phi] for a fixed i-dimensional and a uniformly random j-dimensional subspace of R^k:

        E ||U_i^T V_j||_F^2 = i j / k,   so   E[phi] = i j / (k min(i, j)) = max(i, j) / k.

    Book: eq-ch07-phi-random (notebooks/07_trained_adapters).
    """
    for name, value in (("i", i), ("j", j), ("k", k)):
        _checks.check_dim(name, value)
    if max(i, j) > k:
        raise ValueError(f"subspaces of dimensions i={i}, j={j} do not fit in R^k with k={k}")
    return max(i, j) / k


def random_projected_norm(w0_fro, d, k, r):
    """The root mean square of ||U^T W0 V||_F over independent uniformly random orthonormal
    U (d, r) and V (k, r), for a (d, k) matrix W0 of Frobenius norm w0_fro (the LoRA paper's
    "Random" row of Table 7):

        E ||U^T W0 V||_F^2 = (r/d)(r/k) ||W0||_F^2,   so   rms = r ||W0||_F / sqrt(d k).

    Book: eq-ch07-random-projection (notebooks/07_trained_adapters).
    """
    _checks.check_finite_scalar("w0_fro", w0_fro)
    if w0_fro < 0:
        raise ValueError(f"w0_fro is a norm, so it must be >= 0, got w0_fro={w0_fro}")
    _checks.check_dim("d", d)
    _checks.check_dim("k", k)
    _checks.check_rank(r, d, k)
    return r * float(w0_fro) / math.sqrt(d * k)


def similarity_grid(A1, A2, i_max, j_max):
    """(i_max, j_max) array whose [i-1, j-1] entry is phi(A1, A2, i, j), the LoRA paper's eq. (4).

    A1: (r1, k), A2: (r2, k). One SVD per matrix: with M = (V1^T V2)**2 entrywise,
    ||V1_i^T V2_j||_F^2 is the sum of M over the first i rows and j columns (a 2-D cumulative sum).
    Book: eq-ch07-phi (notebooks/07_trained_adapters).
    """
    A1, A2 = (np.asarray(A.detach().cpu().double() if hasattr(A, "detach") else A, dtype=np.float64)
              for A in (A1, A2))
    spectral.subspace_similarity(A1, A2, i_max, j_max)        # checks shapes and the ranges of i_max, j_max
    V1 = np.linalg.svd(A1, full_matrices=False)[2][:i_max].T   # (k, i_max) top right-singular vectors
    V2 = np.linalg.svd(A2, full_matrices=False)[2][:j_max].T   # (k, j_max)
    M = (V1.T @ V2) ** 2                                       # (i_max, j_max) squared cosines
    cum = M.cumsum(axis=0).cumsum(axis=1)                      # ||V1_i^T V2_j||_F^2
    i = np.arange(1, i_max + 1)[:, None]
    j = np.arange(1, j_max + 1)[None, :]
    return cum / np.minimum(i, j)


def similarity_over_random(grid, k, j_from=17):
    """The median of phi(i, j) / E[phi] over the columns j >= j_from of a similarity grid.

    grid: (i_max, j_max), the [i-1, j-1] entry phi(i, j), as from ``similarity_grid``; k: the
    input width; E[phi] = max(i, j) / k (``random_subspace_similarity``). 1 means "as a random
    subspace would", away from the top directions.
    Book: eq-ch07-phi-random (notebooks/07_trained_adapters).
    """
    grid = np.asarray(grid, dtype=np.float64)
    if grid.ndim != 2 or not 1 <= j_from <= grid.shape[1]:
        raise ValueError(f"need a 2-D grid with at least j_from={j_from} columns, got shape {grid.shape}")
    i = np.arange(1, grid.shape[0] + 1)[:, None]
    j = np.arange(1, grid.shape[1] + 1)[None, :]
    if grid.shape[0] > k or grid.shape[1] > k:
        raise ValueError(f"a grid of shape {grid.shape} does not fit in R^k with k={k}")
    ratio = grid / (np.maximum(i, j) / k)                      # phi / E[phi], entry by entry
    return float(np.median(ratio[:, j_from - 1:]))


def measure_update(W0, delta_W, r=None, top_k=10, eps=0.5):
    """What one update looks like next to its pretrained weight: a dict of

    * ``erank``: effective rank of ΔW (Roy & Vetterli), ``fro``: ||ΔW||_F;
    * ``amplification``: {r': the amplification factor at r'} and ``projected``: {r': ||U_r'^T W0 V_r'||_F}
      for r' in AMPLIFICATION_RANKS up to r (a LoRA update has only r directions; r=None for a full
      fine-tune takes every r' <= min(d, k)), and ``random_projected``: {r': the same for random directions};
    * ``overlap``: the top_k values of max_i |cos(u_j(W0 + ΔW), u_i(W0))|, and ``intruders``: those
      below eps (Shuttleworth et al.).

    W0, delta_W: (d, k).
    """
    W0 = np.asarray(W0.detach().cpu().double() if hasattr(W0, "detach") else W0, dtype=np.float64)
    delta_W = np.asarray(delta_W.detach().cpu().double() if hasattr(delta_W, "detach") else delta_W,
                         dtype=np.float64)
    ranks = [q for q in AMPLIFICATION_RANKS if q <= min(W0.shape) and (r is None or q <= r)]
    overlap = spectral.singular_vector_overlap(W0, W0 + delta_W, top_k)
    return {
        "erank": spectral.effective_rank(delta_W),
        "fro": float(np.linalg.norm(delta_W)),
        "amplification": {q: spectral.amplification_factor(delta_W, W0, q) for q in ranks},
        "projected": {q: spectral.projected_norm(W0, delta_W, q) for q in ranks},
        "random_projected": {q: random_projected_norm(float(np.linalg.norm(W0)), *W0.shape, q) for q in ranks},
        "overlap": [float(c) for c in overlap],
        "intruders": spectral.intruder_dimensions(W0, W0 + delta_W, top_k, eps),
    }


def rank_correlation(x, y):
    """Spearman's rank correlation of two equal-length samples: the Pearson correlation of their
    ranks, tied values sharing the mean of their ranks. In [-1, 1]."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if x.ndim != 1 or x.shape != y.shape or x.size < 3:
        raise ValueError(f"x and y must be 1-D of the same length >= 3, got shapes {x.shape} and {y.shape}")

    def ranks(a):
        order = np.argsort(a, kind="stable")
        r = np.empty(a.size)
        r[order] = np.arange(1, a.size + 1)
        for v in np.unique(a):                                     # ties share their mean rank
            r[a == v] = r[a == v].mean()
        return r

    return float(np.corrcoef(ranks(x), ranks(y))[0, 1])
