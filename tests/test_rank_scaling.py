"""Chapter 03 (notebooks/03_scaling): what s = alpha/r does to a training step, checked against
autograd, finite differences, exact trajectories and closed forms."""

from fractions import Fraction

import numpy as np
import pytest
import torch

from lora_ref import numpy as ln
from lora_ref import rank_scaling as rs
from lora_ref import torch as lt


def _problem(seed, d=7, k=5, r=3):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(d, k)), rng.normal(size=(r, k)), rng.normal(size=(d, r))   # G, A, B


def _exact_change_after_sgd_step(G, A, B, s, lr):
    """Oracle: one autograd SGD step on A, B for the linear loss L = <G, s B A> (so dL/dW = G exactly)."""
    A_t = torch.tensor(A, requires_grad=True)
    B_t = torch.tensor(B, requires_grad=True)
    loss = (torch.tensor(G) * (s * (B_t @ A_t))).sum()
    loss.backward()
    with torch.no_grad():
        A1, B1 = A_t - lr * A_t.grad, B_t - lr * B_t.grad
        return (s * (B1 @ A1) - s * (B_t @ A_t)).numpy()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_sgd_step_change_of_delta_w_is_first_order_plus_eta_squared_term(seed):
    G, A, B = _problem(seed)
    s = 1.7
    rel = []
    for lr in (1e-2, 1e-3, 1e-4):
        exact = _exact_change_after_sgd_step(G, A, B, s, lr)
        first = ln.delta_w_sgd_step(G, A, B, s, lr)
        second = lr**2 * s**3 * G @ A.T @ B.T @ G                  # the exact remainder
        np.testing.assert_allclose(exact, first + second, rtol=1e-9, atol=1e-14)
        rel.append(np.abs(exact - first).max() / np.abs(first).max())
    # the remainder is O(lr^2) against the O(lr) first term: it shrinks tenfold per decade of lr
    assert all(8 < a / b < 12 for a, b in zip(rel, rel[1:])), rel


def test_sgd_step_is_the_derivative_of_delta_w_along_the_step_by_finite_differences():
    G, A, B = _problem(3)
    s, h = 0.8, 1e-5
    path = lambda lr: s * (B - lr * s * G @ A.T) @ (A - lr * s * B.T @ G)      # Delta W after a step of lr
    fd = (path(h) - path(-h)) / (2 * h)                                          # d Delta W / d lr at lr = 0
    np.testing.assert_allclose(ln.delta_w_sgd_step(G, A, B, s, 1.0), fd, rtol=1e-8, atol=1e-10)


def test_backends_agree_on_delta_w_sgd_step():
    G, A, B = _problem(4)
    np.testing.assert_allclose(lt.delta_w_sgd_step(torch.tensor(G), torch.tensor(A), torch.tensor(B), 2.0, 0.1).numpy(),
                               ln.delta_w_sgd_step(G, A, B, 2.0, 0.1), rtol=0, atol=1e-12)


def test_delta_w_sgd_step_names_the_shape_at_fault():
    G, A, B = _problem(5)
    with pytest.raises(ValueError, match=r"grad_W is \(5, 7\)"):
        ln.delta_w_sgd_step(G.T, A, B, 1.0, 0.1)
    with pytest.raises(ValueError, match="B has 3 columns but A has 5 rows"):
        ln.delta_w_sgd_step(G, A.T, B, 1.0, 0.1)
    with pytest.raises(ValueError, match="lr must be finite"):
        lt.delta_w_sgd_step(torch.tensor(G), torch.tensor(A), torch.tensor(B), 1.0, float("nan"))


def _trajectory(optimizer, W_star, A0, B0, settings, steps=25):
    return rs.train_regression(W_star, settings["a"] * A0, settings["b"] * B0, settings["scaling"],
                               settings["lr_A"], settings["lr_B"], optimizer, steps,
                               eps_A=settings["eps_A"], eps_B=settings["eps_B"], keep_delta_w=True)["delta_w"]


@pytest.mark.parametrize("optimizer, lr", [("sgd", 0.05), ("adam", 0.01)])
@pytest.mark.parametrize("a, b", [(0.5, 0.5), (1.0, 0.25), (4.0, 2.0)])
def test_equivalent_settings_give_bitwise_identical_trajectories_for_power_of_two_rescalings(optimizer, lr, a, b):
    W_star = torch.tensor(rs.target_update(12, 10, seed=1)[0])
    A0, B0 = lt.init_lora(12, 10, 3, seed=2, b_std=0.3)
    base = rs.equivalent_settings(2.0, lr, lr, 1.0, 1.0, optimizer)
    other = rs.equivalent_settings(2.0, lr, lr, a, b, optimizer)
    for x, y in zip(_trajectory(optimizer, W_star, A0, B0, base), _trajectory(optimizer, W_star, A0, B0, other)):
        assert torch.equal(x, y)


def test_equivalent_settings_are_not_equivalent_with_the_other_optimizers_exponent():
    W_star = torch.tensor(rs.target_update(12, 10, seed=1)[0])
    A0, B0 = lt.init_lora(12, 10, 3, seed=2, b_std=0.3)
    base = rs.equivalent_settings(2.0, 0.05, 0.05, 1.0, 1.0, "sgd")
    wrong = rs.equivalent_settings(2.0, 0.05, 0.05, 0.5, 0.5, "adam")          # p = 1 used under SGD
    diff = (_trajectory("sgd", W_star, A0, B0, base)[-1] - _trajectory("sgd", W_star, A0, B0, wrong)[-1]).abs().max()
    assert diff > 1e-3


def test_first_step_decrease_matches_one_real_optimizer_step_to_first_order():
    W_star = torch.tensor(rs.target_update(16, 12, seed=0)[0])
    A0, B0 = lt.init_lora(16, 12, 4, seed=0)                                   # B0 = 0: G = -W*
    for optimizer, lr in (("sgd", 1e-6), ("adam", 1e-6)):
        out = rs.train_regression(W_star, A0, B0, 3.0, lr, lr, optimizer, 1, eps_A=1e-30, eps_B=1e-30)
        predicted = rs.first_step_decrease(-W_star.numpy(), A0.numpy(), 3.0, lr, optimizer)
        assert out["loss"][0] - out["loss"][1] == pytest.approx(predicted, rel=1e-4)


def test_first_step_rank_exponents_are_the_closed_forms():
    table = {(rule, opt): rs.first_step_rank_exponent(rule, opt) for rule in rs.SCALE_RULES for opt in ("sgd", "adam")}
    assert table == {("alpha/r", "sgd"): -1, ("alpha/sqrt(r)", "sgd"): 0, ("alpha=2r", "sgd"): 1,
                     ("alpha/r", "adam"): 0, ("alpha/sqrt(r)", "adam"): Fraction(1, 2), ("alpha=2r", "adam"): 1}


def test_first_step_decrease_grows_with_r_as_the_exponent_says():
    """Monte Carlo over A: the fitted exponent over r = 4..256 lies within 0.1 of the closed form."""
    W_star = rs.target_update(256, 256, seed=0)[0]
    ranks = [4, 16, 64, 256]
    for optimizer in ("sgd", "adam"):
        for rule in rs.SCALE_RULES:
            dec = [rs.first_step_decrease(-W_star, ln.init_lora(256, 256, r, seed=r)[0],
                                          rs.scale_for_rule(rule, 8.0, r), 1.0, optimizer) for r in ranks]
            assert abs(rs.loglog_slope(ranks, dec) - float(rs.first_step_rank_exponent(rule, optimizer))) < 0.1


def test_scale_rules_are_the_named_formulas():
    assert rs.scale_for_rule("alpha/r", 16, 4) == ln.scaling(16, 4) == 4.0
    assert rs.scale_for_rule("alpha/sqrt(r)", 16, 4) == ln.scaling(16, 4, rslora=True) == 8.0
    assert rs.scale_for_rule("alpha=2r", 16, 64) == ln.scaling(2 * 64, 64) == 2.0


def test_loglog_slope_recovers_a_power_law():
    x = np.array([1.0, 2.0, 4.0, 8.0])
    assert rs.loglog_slope(x, 3 * x**-0.5) == pytest.approx(-0.5, abs=1e-12)
    with pytest.raises(ValueError, match="positive"):
        rs.loglog_slope(x, -x)


def test_target_update_has_the_stated_spectrum():
    W, sigma = rs.target_update(20, 8, decay=0.5, seed=3)
    np.testing.assert_allclose(np.linalg.svd(W, compute_uv=False), np.arange(1, 9) ** -0.5, rtol=1e-12)
    assert W.shape == (20, 8) and sigma.shape == (8,)


def test_bad_options_are_named():
    with pytest.raises(ValueError, match="optimizer must be one of"):
        rs.first_step_rank_exponent("alpha/r", "rmsprop")
    with pytest.raises(ValueError, match="rule must be one of"):
        rs.scale_for_rule("alpha", 8, 4)
    with pytest.raises(ValueError, match="a and b must be positive"):
        rs.equivalent_settings(1.0, 0.1, 0.1, -1.0, 1.0, "sgd")


def test_retune_factor_undoes_the_rank_exponent():
    assert rs.retune_factor(16, 64, "alpha/r", "sgd") == 4.0                    # decrease ~ 1/r: lr x 4
    assert rs.retune_factor(16, 64, "alpha/sqrt(r)", "sgd") == 1.0
    assert rs.retune_factor(16, 64, "alpha/sqrt(r)", "adam") == 0.5             # decrease ~ sqrt(r)
    assert rs.first_step_rank_exponent(Fraction(-1, 4), "sgd") == Fraction(1, 2)
