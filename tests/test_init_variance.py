"""E[(BA)_ij^2] = r sigma_A^2 sigma_B^2, by Monte Carlo with a stated confidence bound.

(BA)_ij = sum_{l=1}^r B_il A_lj is a sum of r independent products of independent
zero-mean factors, so its variance is r Var(A) Var(B).

The estimator: for each of N independent draws of (A, B), the mean of (BA)_ij^2 over
all (i, j). These N per-draw means are i.i.d. with mean r s_A^2 s_B^2, so by the CLT
their average lies within z * (sample sd) / sqrt(N) of it; z = 4.5 makes a false
failure a ~7e-6 event, and the seeds are fixed, so the test is deterministic.
"""

import math

import numpy as np
import pytest

from lora_ref import numpy as ln
from lora_ref import torch as lt

Z = 4.5
N_DRAWS = 400


def _mc_second_moment(lr, d, k, r, **init):
    per_draw = []
    for seed in range(N_DRAWS):
        A, B = lr.init_lora(d, k, r, seed=seed, **init)
        dW = lr.delta_w(A, B, 1.0)                               # (d, k) = B A
        per_draw.append(float((dW**2).mean()))
    per_draw = np.array(per_draw)
    return per_draw.mean(), per_draw.std(ddof=1) / math.sqrt(N_DRAWS)


@pytest.mark.parametrize("lr", [ln, lt], ids=["numpy", "torch"])
@pytest.mark.parametrize("r", [1, 4, 16])
def test_var_BA_matches_closed_form_gaussian(lr, r):
    sa, sb = 0.3, 0.7
    mean, se = _mc_second_moment(lr, 24, 20, r, init="gaussian", a_std=sa, b_std=sb)
    closed = r * sa**2 * sb**2
    assert abs(mean - closed) < Z * se, f"MC {mean:.5f} +- {se:.5f} vs closed form {closed:.5f}"
    assert se < 0.05 * closed, "the bound must be tight enough to mean something"


def test_var_BA_with_peft_default_A_is_r_over_3k_times_var_B():
    d, k, r, sb = 16, 30, 8, 1.0
    mean, se = _mc_second_moment(ln, d, k, r, b_std=sb)          # A ~ U(-1/sqrt(k), 1/sqrt(k))
    closed = r * sb**2 / (3 * k)
    assert abs(mean - closed) < Z * se


def test_var_BA_grows_linearly_in_r():
    """Doubling r doubles Var((BA)_ij): the reason alpha/r (or alpha/sqrt(r)) rescales the update."""
    means = {r: _mc_second_moment(ln, 32, 32, r, init="gaussian", a_std=1.0, b_std=1.0)[0] for r in (2, 4, 8, 16)}
    slope = np.polyfit(list(means), list(means.values()), 1)[0]
    assert slope == pytest.approx(1.0, rel=0.05)


def test_the_mc_check_rejects_a_wrong_closed_form():
    """Power check: the same bound rejects r*sa^2*sb^2 off by 10%."""
    mean, se = _mc_second_moment(ln, 24, 20, 4, init="gaussian", a_std=0.3, b_std=0.7)
    assert abs(mean - 1.1 * 4 * 0.09 * 0.49) > Z * se


def test_zero_B_init_gives_exactly_zero_update():
    for lr in (ln, lt):
        A, B = lr.init_lora(50, 40, 8, seed=3)
        assert float(abs(lr.delta_w(A, B, 2.0)).max()) == 0.0
