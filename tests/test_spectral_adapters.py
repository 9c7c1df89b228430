"""The amplification factor (LoRA paper, Table 7) and intruder dimensions (Shuttleworth et al. 2024)
on matrices whose answer is known by construction, and against PEFT's intruder detection."""

import math

import numpy as np
import pytest
import torch

from lora_ref import spectral


def _orthogonal(n, seed):
    Q, R = np.linalg.qr(np.random.default_rng(seed).normal(size=(n, n)))
    return Q * np.sign(np.diag(R))


def _rotated(M, seed):
    """Q1 M Q2^T with random orthogonal Q1, Q2: the same singular values, rotated directions."""
    d, k = M.shape
    return _orthogonal(d, seed) @ M @ _orthogonal(k, seed + 1).T


# --------------------------------------------------------------------------- amplification


def test_amplification_of_a_diagonal_update_is_its_size_over_w0s_entries():
    # W0 = diag(10, 5, 1, 0.5); Delta W = 4 e3 e3^T + 2 e4 e4^T: U^T W0 V = diag(1, 0.5),
    # so the factor is sqrt(16 + 4) / sqrt(1 + 0.25) = 4 exactly; at r = 1 it is 4 / 1.
    W0 = np.diag([10.0, 5.0, 1.0, 0.5])
    dW = np.diag([0.0, 0.0, 4.0, 2.0])
    assert spectral.amplification_factor(dW, W0, 2) == pytest.approx(4.0, rel=1e-12)
    assert spectral.amplification_factor(4.0 * np.outer(np.eye(4)[2], np.eye(4)[2]), W0, 1) == pytest.approx(4.0)
    assert spectral.projected_norm(W0, dW, 2) == pytest.approx(math.sqrt(1.25), rel=1e-12)


def test_amplification_is_invariant_under_rotating_w0_and_the_update_together():
    W0 = np.zeros((6, 5))
    W0[:5, :5] = np.diag([10.0, 5.0, 1.0, 0.5, 0.1])
    dW = np.zeros((6, 5))
    dW[2, 2], dW[3, 3] = 4.0, 2.0
    d, k = W0.shape
    Q1, Q2 = _orthogonal(d, 3), _orthogonal(k, 4)
    assert spectral.amplification_factor(Q1 @ dW @ Q2.T, Q1 @ W0 @ Q2.T, 2) == pytest.approx(4.0, rel=1e-10)


def test_projected_norm_of_w0_in_its_own_top_directions_is_its_top_energy():
    W0 = _rotated(np.diag([9.0, 4.0, 2.0, 1.0, 0.5]), 5)
    assert spectral.projected_norm(W0, W0, 3) == pytest.approx(math.sqrt(81 + 16 + 4), rel=1e-12)


def test_amplification_scales_with_the_update_and_not_with_its_sign():
    rng = np.random.default_rng(0)
    W0, dW = rng.normal(size=(8, 7)), rng.normal(size=(8, 2)) @ rng.normal(size=(2, 7))
    a = spectral.amplification_factor(dW, W0, 2)
    assert spectral.amplification_factor(3.0 * dW, W0, 2) == pytest.approx(3 * a, rel=1e-12)
    assert spectral.amplification_factor(-dW, W0, 2) == pytest.approx(a, rel=1e-12)


def test_amplification_agrees_with_torch_svd():
    g = torch.Generator().manual_seed(1)
    W0 = torch.randn(12, 9, generator=g, dtype=torch.float64)
    dW = torch.randn(12, 3, generator=g, dtype=torch.float64) @ torch.randn(3, 9, generator=g, dtype=torch.float64)
    U, _, Vh = torch.linalg.svd(dW)
    oracle = float(dW.norm() / (U[:, :3].T @ W0 @ Vh[:3].T).norm())
    assert spectral.amplification_factor(dW, W0, 3) == pytest.approx(oracle, rel=1e-10)


def test_amplification_is_infinite_when_w0_has_no_component_in_the_update_directions():
    W0 = np.diag([1.0, 1.0, 0.0])
    dW = np.diag([0.0, 0.0, 2.0])
    assert spectral.amplification_factor(dW, W0, 1) == math.inf


def test_table_7_ratios():
    """The paper's 21.5 is 6.91 / 0.32 = 21.59 from its own rounded entries; r = 64 gives 3.57 / 1.90 = 1.88."""
    assert round(6.91 / 0.32, 2) == 21.59 and 6.905 / 0.325 <= 21.5 <= 6.915 / 0.315
    assert round(3.57 / 1.90, 2) == 1.88


def test_amplification_bad_input():
    with pytest.raises(ValueError, match=r"W0 \(3, 4\) and M \(4, 3\) must have the same shape"):
        spectral.amplification_factor(np.ones((4, 3)), np.ones((3, 4)), 1)
    with pytest.raises(ValueError, match=r"numerical rank 1 < r=2"):
        spectral.amplification_factor(np.outer([1.0, 2, 3], [1.0, 1, 1]), np.eye(3), 2)
    with pytest.raises(ValueError, match=r"numerical rank 0 < r=1|zero"):
        spectral.amplification_factor(np.zeros((3, 3)), np.eye(3), 1)
    with pytest.raises(ValueError, match=r"r=4 exceeds min\(d, k\)"):
        spectral.amplification_factor(np.eye(3), np.eye(3), 4)
    with pytest.raises(ValueError, match=r"non-finite"):
        spectral.amplification_factor(np.eye(3), np.full((3, 3), np.nan), 1)


# --------------------------------------------------------------------------- intruder dimensions


def _decaying_w0(d=60, k=40, seed=0):
    """A W0 with singular values 10 * 0.8^i (the top ten well separated) and random directions."""
    sigma = 10.0 * 0.8 ** np.arange(min(d, k))
    M = np.zeros((d, k))
    M[: len(sigma), : len(sigma)] = np.diag(sigma)
    return _orthogonal(d, seed) @ M @ _orthogonal(k, seed + 1).T


def test_a_planted_direction_larger_than_w0s_spectrum_is_an_intruder():
    W0 = _decaying_w0()
    rng = np.random.default_rng(7)
    u, v = rng.normal(size=60), rng.normal(size=40)
    u, v = u / np.linalg.norm(u), v / np.linalg.norm(v)
    W = W0 + 30.0 * np.outer(u, v)                      # above sigma_1(W0) = 10: the new top direction
    found = spectral.intruder_dimensions(W0, W)
    assert found == [0]
    U = np.linalg.svd(W)[0]
    assert abs(U[:, 0] @ u) > 0.9                        # and it is the planted one


def test_a_tiny_perturbation_finds_no_intruder():
    W0 = _decaying_w0()
    W = W0 + 1e-3 * np.random.default_rng(8).normal(size=W0.shape)
    assert spectral.intruder_dimensions(W0, W) == []
    assert spectral.singular_vector_overlap(W0, W).min() > 0.99


def test_an_update_along_w0s_own_directions_is_no_intruder():
    W0 = _decaying_w0()
    U, sigma, Vt = np.linalg.svd(W0, full_matrices=False)
    W = W0 + 25.0 * np.outer(U[:, 5], Vt[5])             # amplifies an existing direction to the top
    assert spectral.intruder_dimensions(W0, W) == []


def test_intruders_depend_on_the_threshold_and_the_window():
    W0 = _decaying_w0()
    rng = np.random.default_rng(9)
    u, v = rng.normal(size=60), rng.normal(size=40)
    W = W0 + 30.0 * np.outer(u / np.linalg.norm(u), v / np.linalg.norm(v))
    c = spectral.singular_vector_overlap(W0, W, 10)[0]
    assert spectral.intruder_dimensions(W0, W, eps=c * 0.99) == []
    assert spectral.intruder_dimensions(W0, W, eps=c * 1.01)[:1] == [0]
    assert all(j < 3 for j in spectral.intruder_dimensions(W0, W, top_k=3, eps=1.0))


def test_intruders_match_the_authors_definition_in_torch():
    """reeceshuttle/intruder-dimensions, find_intruder_dimensions.py: |U_tuned^T U_base| max over base, top k."""
    g = torch.Generator().manual_seed(2)
    W0 = torch.randn(24, 16, generator=g, dtype=torch.float64)
    W = W0 + 6.0 * torch.randn(24, 2, generator=g, dtype=torch.float64) @ torch.randn(2, 16, generator=g,
                                                                                      dtype=torch.float64)
    U_base, U_tuned = torch.linalg.svd(W0, full_matrices=False)[0], torch.linalg.svd(W, full_matrices=False)[0]
    best = torch.einsum("ji,jk->ik", U_tuned, U_base).abs().max(dim=1).values[:10]
    expected = torch.where(best < 0.5)[0].tolist()
    assert spectral.intruder_dimensions(W0, W) == expected
    assert expected, "the planted rank-2 update should produce an intruder here"


def test_intruders_match_peft_reduce_intruder_dimension():
    """PEFT 0.21's reduce_intruder_dimension logs how many intruders each LoRA layer has."""
    peft = pytest.importorskip("peft")
    from peft.tuners.lora.intruders import reduce_intruder_dimension

    torch.manual_seed(0)
    base = torch.nn.Sequential(torch.nn.Linear(32, 48, bias=False))
    model = peft.get_peft_model(base, peft.LoraConfig(r=2, lora_alpha=2, target_modules=["0"]))
    layer = model.base_model.model[0]
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_(0.0, 2.0)         # a large update: intruders appear
    W0 = layer.base_layer.weight.detach().double()
    dW = layer.get_delta_weight("default").detach().double()
    logs = []
    reduce_intruder_dimension(model, logging_sink=logs.append)
    peft_count = next((int(m.split("Intruders: ")[1]) for m in logs if "Intruders:" in m), 0)
    ours = spectral.intruder_dimensions(W0, W0 + dW, top_k=10, eps=0.5)
    assert len(ours) == peft_count and peft_count > 0


def test_intruder_bad_input():
    with pytest.raises(ValueError, match=r"W0 \(3, 4\) and W \(4, 3\) must have the same shape"):
        spectral.intruder_dimensions(np.ones((3, 4)), np.ones((4, 3)))
    with pytest.raises(ValueError, match=r"top_k=5 must be in \[1, 3\]"):
        spectral.intruder_dimensions(np.eye(3), np.eye(3), top_k=5)
    with pytest.raises(TypeError, match=r"top_k must be an integer"):
        spectral.intruder_dimensions(np.eye(3), np.eye(3), top_k=2.0)
    with pytest.raises(ValueError, match=r"eps must be a number in \(0, 1\]"):
        spectral.intruder_dimensions(np.eye(3), np.eye(3), top_k=2, eps=1.5)
    with pytest.raises(ValueError, match=r"non-finite"):
        spectral.intruder_dimensions(np.eye(3), np.full((3, 3), np.inf), top_k=2)
