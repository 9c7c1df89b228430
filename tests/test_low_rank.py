"""lora_ref.low_rank against independent oracles: torch autograd SGD (rank_scaling.train_regression),
closed-form spectra, brute-force critical points, and a direct edit of the model's weights."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lora_ref import low_rank, spectral, tiny
from lora_ref import numpy as ln
from lora_ref import rank_scaling as rs
from lora_ref.tiny import experiments


def _planted(d, k, sigma, seed=0):
    """U diag(sigma) V^T with random orthonormal U (d, p), V (k, p): its spectrum is sigma by construction."""
    rng = np.random.default_rng(seed)
    U, _ = np.linalg.qr(rng.normal(size=(d, len(sigma))))
    V, _ = np.linalg.qr(rng.normal(size=(k, len(sigma))))
    return (U * np.asarray(sigma)) @ V.T


def test_gradient_descent_matches_torch_autograd_sgd_step_for_step():
    W = rs.target_update(20, 16, decay=0.5, seed=3)[0]
    ours = low_rank.fit_low_rank(W, 4, 25, 0.2, scaling=1.5, seed=7)
    A0, B0 = ln.init_lora(20, 16, 4, seed=7)
    ref = rs.train_regression(torch.tensor(W), torch.tensor(A0), torch.tensor(B0), 1.5, 0.2, 0.2, "sgd", 25,
                              keep_delta_w=True)
    assert np.allclose(ours["error"], [math.sqrt(2 * v) for v in ref["loss"]], rtol=1e-12, atol=1e-14)
    assert np.allclose(1.5 * ours["B"] @ ours["A"], ref["delta_w"][-1].numpy(), rtol=0, atol=1e-12)


@pytest.mark.parametrize("r", [1, 3, 6])
def test_gradient_descent_from_b_zero_reaches_the_eckart_young_bound(r):
    W = _planted(24, 18, [1.0, 0.8, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1])
    err = low_rank.fit_low_rank(W, r, 1500, 0.3)["error"]
    bound = spectral.eckart_young_error(W, r)
    assert err[0] == pytest.approx(np.linalg.norm(W), rel=1e-15)          # B = 0: s B A = 0
    assert abs(err[-1] - bound) < 1e-6 * np.linalg.norm(W)
    assert min(err) >= bound - 1e-12                                      # never below the theorem's bound


@settings(max_examples=30, deadline=None)
@given(sigma=st.lists(st.floats(0.01, 10), min_size=1, max_size=12), seed=st.integers(0, 2**31))
def test_energy_curve_is_one_minus_the_relative_eckart_young_error_squared(sigma, seed):
    W = _planted(15, 13, sorted(sigma, reverse=True), seed)
    e = low_rank.energy_curve(spectral.singular_values(W))
    for r in range(1, len(sigma) + 1):
        assert e[r - 1] == pytest.approx(1 - spectral.eckart_young_error(W, r) ** 2 / np.sum(W**2), abs=1e-10)
    assert np.all(np.diff(e) >= -1e-15) and e[-1] == pytest.approx(1.0)


def test_energy_curve_of_a_geometric_spectrum_has_a_closed_form():
    rho, n = 0.9, 40
    e = low_rank.energy_curve(rho ** np.arange(n))
    r = np.arange(1, n + 1)
    assert np.allclose(e, (1 - rho ** (2 * r)) / (1 - rho ** (2 * n)), rtol=1e-13)


@pytest.mark.parametrize("sigma, tau, expected", [
    ([3.0, 4.0], 0.64, 1),                 # 16 / 25 = 0.64 exactly at r = 1 (order does not matter)
    ([3.0, 4.0], 0.65, 2),
    ([1.0, 1.0, 1.0, 1.0], 0.5, 2),        # equal values: tau = 1/2 needs half of them
    ([1.0, 1.0, 1.0, 1.0], 1.0, 4),
    ([2.0, 0.0, 0.0], 1.0, 1),             # a rank-1 matrix keeps everything at r = 1
])
def test_rank_for_energy_is_the_smallest_rank_reaching_tau(sigma, tau, expected):
    assert low_rank.rank_for_energy(sigma, tau) == expected


def test_critical_losses_equal_brute_force_critical_points_and_only_the_top_set_is_a_minimum():
    """Every critical point of 1/2||BA - W*||^2 with rank-r B A keeps r singular directions (Baldi & Hornik):
    build each one, check its gradient is 0 and its loss, and that a step towards a dropped larger
    direction lowers the loss unless it keeps 1..r."""
    sigma = np.array([4.0, 3.0, 2.0, 1.0])
    rng = np.random.default_rng(0)
    U, _ = np.linalg.qr(rng.normal(size=(6, 4)))
    V, _ = np.linalg.qr(rng.normal(size=(5, 4)))
    W = (U * sigma) @ V.T                                     # (6, 5)
    for kept in [(1, 2), (1, 3), (2, 4), (3, 4)]:
        idx = np.array(kept) - 1
        B, A = U[:, idx] * sigma[idx], V[:, idx].T           # (6, 2), (2, 5): B A keeps the set
        R = B @ A - W
        assert np.allclose(R @ A.T, 0, atol=1e-12) and np.allclose(B.T @ R, 0, atol=1e-12)  # a critical point
        loss = 0.5 * np.sum(R**2)
        assert loss == pytest.approx(low_rank.critical_loss(sigma, kept), rel=1e-12)
        dropped = [i for i in range(4) if i not in idx]
        # rotate B's weakest kept column towards the strongest dropped direction: A fitted to it
        j, i = idx[np.argmin(sigma[idx])], min(dropped)
        col = list(idx).index(j)
        t = 1e-3
        B2 = B.copy()
        B2[:, col] = np.cos(t) * U[:, j] + np.sin(t) * U[:, i]
        A2 = np.linalg.lstsq(B2, W, rcond=None)[0]
        lower = 0.5 * np.sum((B2 @ A2 - W) ** 2) < loss - 1e-12
        assert lower == (kept != (1, 2)), kept                 # a descent direction: a saddle, not a minimum
    assert low_rank.critical_loss(sigma, (1, 2)) == 0.5 * (2**2 + 1**2)


def test_truncate_updates_cuts_each_layer_to_rank_r_and_keeps_full_rank_ones():
    updates = {"a": _planted(12, 8, [3.0, 2.0, 1.0, 0.5]), "b": torch.tensor(_planted(6, 9, [1.0, 0.5]))}
    one = low_rank.truncate_updates(updates, 1)
    assert {n: np.linalg.matrix_rank(m) for n, m in one.items()} == {"a": 1, "b": 1}
    assert np.linalg.norm(updates["a"] - one["a"]) == pytest.approx(math.sqrt(2**2 + 1 + 0.25))
    full = low_rank.truncate_updates(updates, 9)               # r >= min(d, k): unchanged
    assert np.array_equal(full["a"], updates["a"]) and np.array_equal(full["b"], updates["b"].numpy())


def test_with_updates_sets_w0_plus_delta_w_and_leaves_the_base_and_other_layers_alone():
    base = tiny.load_tiny_llama()
    name = "model.layers.1.self_attn.v_proj"
    before = {n: p.clone() for n, p in base.named_parameters()}
    dW = np.random.default_rng(0).normal(size=tuple(base.get_submodule(name).weight.shape)) * 1e-2
    model = experiments.with_updates(base, {name: dW})
    w0 = before[name + ".weight"]
    expected = (w0.double() + torch.tensor(dW)).float()
    assert torch.equal(model.get_submodule(name).weight, expected)
    assert all(torch.equal(p, before[n]) for n, p in base.named_parameters())      # base untouched
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters() if n != name + ".weight")
    rest = copy_with_noise(base)                                   # another model gives the other parameters
    model = experiments.with_updates(base, {name: dW}, rest=rest)
    assert torch.equal(model.get_submodule(name).weight, expected)                 # W0 still from base
    assert all(torch.equal(p, dict(rest.named_parameters())[n]) for n, p in model.named_parameters()
               if n != name + ".weight")
    assert not torch.equal(dict(rest.named_parameters())[name + ".weight"], expected)


def copy_with_noise(model):
    import copy

    other = copy.deepcopy(model)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(1e-3)
    return other


def test_truncation_at_full_rank_reproduces_the_fine_tuned_linear_layers():
    base = tiny.load_tiny_llama()
    tuned, _ = tiny.standard_fine_tune(None, base=base, steps=2)
    updates = tiny.weight_updates(base, tuned)
    model = experiments.with_updates(base, low_rank.truncate_updates(updates, 128))
    for name in updates:
        torch.testing.assert_close(model.get_submodule(name).weight, tuned.get_submodule(name).weight,
                                   rtol=0, atol=1e-6)


def test_low_rank_bad_input():
    with pytest.raises(ValueError, match=r"r=5 exceeds min\(d, k\) = min\(4, 6\) = 4"):
        low_rank.fit_low_rank(np.ones((4, 6)), 5, 10, 0.1)
    with pytest.raises(ValueError, match=r"W_star must be a finite, non-empty 2-D matrix, got shape \(3,\)"):
        low_rank.fit_low_rank(np.ones(3), 1, 10, 0.1)
    with pytest.raises(ValueError, match=r"lr must be > 0, got lr=-0.1"):
        low_rank.fit_low_rank(np.ones((4, 6)), 1, 10, -0.1)
    with pytest.raises(ValueError, match=r"tau must be in \(0, 1\], got tau=1.5"):
        low_rank.rank_for_energy([1.0, 0.5], 1.5)
    with pytest.raises(ValueError, match=r"zero matrix"):
        low_rank.energy_curve([0.0, 0.0])
    with pytest.raises(ValueError, match=r"descending"):
        low_rank.critical_loss([1.0, 2.0], [1])
    with pytest.raises(ValueError, match=r"distinct indices in 1..2"):
        low_rank.critical_loss([2.0, 1.0], [1, 3])
    base = tiny.load_tiny_llama()
    with pytest.raises(ValueError, match=r"has shape \(2, 2\), the layer's weight \(64, 128\)"):
        experiments.with_updates(base, {"model.layers.0.self_attn.k_proj": np.zeros((2, 2))})


def test_relative_tail_is_the_distance_of_the_layerwise_truncation_over_all_layers():
    rng = np.random.default_rng(3)
    updates = {"a": rng.normal(size=(12, 8)), "b": rng.normal(size=(6, 9)) * 3}
    spectra = {n: spectral.singular_values(m) for n, m in updates.items()}
    for r in (1, 3, 6, 8):
        cut = low_rank.truncate_updates(updates, r)
        num = sum(np.sum((updates[n] - cut[n]) ** 2) for n in updates)
        den = sum(np.sum(updates[n] ** 2) for n in updates)
        assert low_rank.relative_tail(spectra, r) == pytest.approx(math.sqrt(num / den), rel=1e-12)
    assert low_rank.relative_tail(spectra, 9) == 0.0
    with pytest.raises(ValueError, match="descending"):
        low_rank.relative_tail({"a": [1.0, 2.0]}, 1)
    with pytest.raises(ValueError, match="every update is zero"):
        low_rank.relative_tail({"a": [0.0, 0.0]}, 1)
