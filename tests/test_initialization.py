"""lora_ref.initialization: each closed form of chapter 04 against an independent oracle
(exact enumeration, Monte Carlo with a stated bound, torch optimisers, real PEFT layers)."""

import math
from fractions import Fraction

import numpy as np
import pytest
import torch
from torch import nn

from lora_ref import initialization as ini
from lora_ref import numpy as ln
from lora_ref import torch as lt


def test_var_BA_closed_form_matches_monte_carlo_within_4_standard_errors():
    for r in (1, 3, 16):
        x = ini.sample_ba_entries(r, 200_000, "gaussian", "uniform", seed=r) * math.sqrt(0.3 * 0.7)
        mean, half = ini.mean_with_ci(x**2, z=4.0)
        assert abs(mean - ini.ba_second_moment(r, 0.3, 0.7)) < half < 0.05 * r * 0.21


def test_kaiming_variance_is_bound_squared_over_three_by_quadrature():
    k = 300
    b = 1 / math.sqrt(k)
    t = np.linspace(-b, b, 200_001)
    var = np.trapezoid(t**2, t) / (2 * b)                    # (1 / 2b) * integral of t^2
    assert ini.a_variance("kaiming", k, 5) == pytest.approx(var, rel=1e-8)
    assert ini.a_variance("gaussian", k, 8) == 1 / 64         # std 1/r: variance 1/r^2, not 1/r


def test_excess_kurtosis_of_one_product_matches_exact_moments():
    # uniform U(-sqrt3, sqrt3): E x^4 = 9/5; N(0,1): 3. One product: E[(ab)^4] = 27/5 -> excess 12/5.
    assert ini.ba_excess_kurtosis(1, Fraction(-6, 5), Fraction(0)) == Fraction(27, 5) - 3
    assert ini.ba_excess_kurtosis(3, Fraction(0), Fraction(0)) == 2          # (9 - 3) / 3


@pytest.mark.parametrize("r", [1, 4])
def test_excess_kurtosis_closed_form_matches_samples(r):
    kappa, se = ini.sample_excess_kurtosis(ini.sample_ba_entries(r, 400_000, "gaussian", "gaussian", seed=11))
    assert abs(kappa - 6 / r) < 5 * se + 0.01


def test_ks_distance_detects_a_non_gaussian_law():
    assert ini.ks_distance_to_normal(np.random.default_rng(0).standard_normal(50_000)) < 0.01
    assert ini.ks_distance_to_normal(np.random.default_rng(0).uniform(size=50_000)) > 0.05


def test_symmetric_output_rms_matches_monte_carlo():
    d, k, r, sb = 64, 128, 8, 0.2
    x = np.ones(k)
    outs = [ln.lora_forward(x, np.zeros((d, k)), *ln.init_lora(d, k, r, seed=i, b_std=sb), 2.0) for i in range(400)]
    rms = math.sqrt(np.mean(np.square(outs)))
    assert rms == pytest.approx(ini.symmetric_output_rms(r, 1 / (3 * k), sb**2, math.sqrt(k), 2.0), rel=0.05)


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_first_step_delta_y_matches_a_torch_optimiser_step(optimizer):
    torch.manual_seed(0)
    layer = lt.LoRALinear(nn.Linear(40, 30).double(), r=6, alpha=12)
    x, gy = torch.randn(40, dtype=torch.float64), torch.randn(30, dtype=torch.float64)
    A0 = layer.lora_A.detach().clone().numpy()
    opt = (torch.optim.SGD if optimizer == "sgd" else torch.optim.Adam)([layer.lora_A, layer.lora_B], lr=1e-2)
    y0 = layer(x)
    (y0 @ gy).backward()
    opt.step()
    with torch.no_grad():
        measured = (layer(x) - y0).numpy()
    predicted = ini.first_step_delta_y(x.numpy(), gy.numpy(), A0, layer.scaling, 1e-2, optimizer)
    assert np.allclose(measured, predicted, rtol=1e-6, atol=1e-12)


def test_first_step_size_is_the_expectation_of_the_exact_step():
    d = k = 128
    rng = np.random.default_rng([1, 2])
    x, gy = rng.standard_normal(k), rng.standard_normal(d)
    for opt in ("sgd", "adam"):
        for r in (8, 32):
            sizes = [np.linalg.norm(ini.first_step_delta_y(x, gy, ln.init_lora(d, k, r, seed=i, init="gaussian")[0],
                                                           0.5, 1e-3, opt)) for i in range(200)]
            expected = ini.first_step_size(opt, r, 1 / r**2, 0.5, 1e-3, np.linalg.norm(x), np.linalg.norm(gy), d=d)
            assert np.mean(sizes) == pytest.approx(expected, rel=0.06)


def test_first_step_exponent_table():
    e = ini.first_step_exponent
    assert (e("sgd", "kaiming", "alpha/r"), e("sgd", "kaiming", "alpha/sqrt(r)")) == (-1, 0)
    assert (e("adam", "kaiming", "alpha/r"), e("adam", "kaiming", "alpha/sqrt(r)")) == (0, Fraction(1, 2))
    assert (e("sgd", "gaussian", "alpha/r"), e("adam", "gaussian", "alpha/sqrt(r)")) == (-3, Fraction(-1, 2))
    # a constant s (alpha = 2r) is flat under Adam with the gaussian A, and falls like 1/r under SGD
    assert (e("adam", "gaussian", "alpha=2r"), e("sgd", "gaussian", "alpha=2r")) == (0, -1)
    assert (e("adam", "kaiming", "alpha=2r"), e("sgd", "kaiming", "alpha=2r")) == (1, 1)


def test_constant_scale_with_gaussian_A_keeps_adams_first_step_flat():
    """Measured, not derived: the mean first-step size under Adam at s = 2 with sigma_A = 1/r."""
    d = k = 64
    rng = np.random.default_rng(5)
    x, gy = rng.standard_normal(k), rng.standard_normal(d)
    sizes = [np.mean([np.linalg.norm(ini.first_step_delta_y(x, gy, ln.init_lora(d, k, r, seed=i, init="gaussian")[0],
                                                            2.0, 1e-3, "adam")) for i in range(100)])
             for r in (2, 8, 32)]
    assert max(sizes) / min(sizes) < 1.15


def test_bad_inputs_name_the_value():
    with pytest.raises(ValueError, match="optimizer"):
        ini.first_step_delta_y(np.ones(3), np.ones(2), np.ones((1, 3)), 1.0, 1.0, "rmsprop")
    with pytest.raises(ValueError, match="x"):
        ini.first_step_delta_y(np.ones(4), np.ones(2), np.ones((1, 3)), 1.0, 1.0)
    with pytest.raises(ValueError, match="var_a"):
        ini.ba_second_moment(2, -1.0, 1.0)


@pytest.mark.parametrize("r", [2, 16])
def test_peft_false_init_gives_var_ba_one_ninth_k(r):
    """PEFT's init_lora_weights=False keeps nn.Linear's init: Var((BA)_ij) = 1/(9k) for every r."""
    peft = pytest.importorskip("peft")
    k, n = 64, 96
    torch.manual_seed(r)
    model = nn.Sequential(*[nn.Linear(k, k) for _ in range(n)])
    pm = peft.get_peft_model(model, peft.LoraConfig(r=r, lora_alpha=r, target_modules=[str(i) for i in range(n)],
                                                    init_lora_weights=False))
    sq = []
    for m in pm.modules():
        if isinstance(m, peft.tuners.lora.Linear):
            sq.append((m.lora_B["default"].weight @ m.lora_A["default"].weight).detach().double().square().mean().item())
    mean, half = ini.mean_with_ci(sq)                    # the n layers are independent draws (entries are not)
    assert abs(mean - float(ini.peft_false_ba_variance(k))) < half       # the bound is 4 standard errors
    assert half < 0.15 * float(ini.peft_false_ba_variance(k))
