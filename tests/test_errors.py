"""Bad input gets a clear error that names the shapes or values at fault, in both backends."""

import math

import numpy as np
import pytest
import torch
from torch import nn

from lora_ref import numpy as ln
from lora_ref import torch as lt

BACKENDS = [pytest.param(ln, id="numpy"), pytest.param(lt, id="torch")]


def _arrays(backend, *shapes):
    out = [np.ones(s) for s in shapes]
    return [torch.from_numpy(a) for a in out] if backend is lt else out


@pytest.mark.parametrize("backend", BACKENDS)
def test_B_and_A_with_different_r_is_named(backend):
    x, W0, A, B = _arrays(backend, (2, 5), (4, 5), (3, 5), (4, 2))
    with pytest.raises(ValueError, match=r"A is \(3, 5\) = \(r, k\) and B is \(4, 2\) = \(d, r\): B has 2 columns but A has 3 rows"):
        backend.lora_forward(x, W0, A, B, 1.0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_transposed_A_is_named(backend):
    x, W0, A, B = _arrays(backend, (2, 5), (4, 5), (5, 2), (4, 2))
    with pytest.raises(ValueError, match=r"B has 2 columns but A has 5 rows"):
        backend.delta_w(A, B, 1.0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_W0_shape_mismatch_is_named(backend):
    W0, A, B = _arrays(backend, (5, 4), (2, 5), (4, 2))
    with pytest.raises(ValueError, match=r"W0 is \(5, 4\) but B A is \(4, 5\)"):
        backend.merge(W0, A, B, 1.0)
    with pytest.raises(ValueError, match=r"W is \(5, 4\) but B A is \(4, 5\)"):
        backend.unmerge(W0, A, B, 1.0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_x_with_wrong_width_is_named(backend):
    x, W0, A, B = _arrays(backend, (2, 6), (4, 5), (2, 5), (4, 2))
    with pytest.raises(ValueError, match=r"x has shape \(2, 6\); its last axis must be k=5"):
        backend.lora_forward(x, W0, A, B, 1.0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_grad_y_with_wrong_shape_is_named(backend):
    x, g, A, B = _arrays(backend, (3, 5), (3, 5), (2, 5), (4, 2))
    with pytest.raises(ValueError, match=r"grad_y has shape \(3, 5\) but y .* has shape \(3, 4\)"):
        backend.lora_grads(x, g, A, B, 1.0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("r", [0, -3])
def test_nonpositive_r_is_rejected(backend, r):
    with pytest.raises(ValueError, match=rf"r must be a positive integer, got r={r}"):
        backend.init_lora(4, 5, r)
    with pytest.raises(ValueError, match=rf"r={r}"):
        backend.scaling(8, r)


@pytest.mark.parametrize("backend", BACKENDS)
def test_r_above_min_d_k_is_rejected(backend):
    with pytest.raises(ValueError, match=r"r=6 exceeds min\(d, k\) = min\(4, 5\) = 4"):
        backend.init_lora(4, 5, 6)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("r", [2.0, True, "4"])
def test_non_integer_r_is_a_type_error(backend, r):
    with pytest.raises(TypeError, match=r"r must be an integer"):
        backend.init_lora(4, 5, r)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("alpha", [math.nan, math.inf, -math.inf])
def test_non_finite_alpha_is_rejected(backend, alpha):
    with pytest.raises(ValueError, match=rf"alpha must be finite, got alpha={alpha}"):
        backend.scaling(alpha, 4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_finite_weights_are_rejected_by_merge(backend):
    W0, A, B = _arrays(backend, (4, 5), (2, 5), (4, 2))
    W0[1, 2] = math.nan
    with pytest.raises(ValueError, match=r"W0 has 1 non-finite value\(s\) \(nan or inf\) in shape \(4, 5\)"):
        backend.merge(W0, A, B, 1.0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_unknown_init_is_rejected(backend):
    with pytest.raises(ValueError, match=r"init must be 'kaiming' or 'gaussian', got init='xavier'"):
        backend.init_lora(4, 5, 2, init="xavier")
    with pytest.raises(ValueError, match=r"a_std .* init='gaussian'"):
        backend.init_lora(4, 5, 2, a_std=0.1)


def test_lora_linear_rejects_bad_r_alpha_and_dropout():
    with pytest.raises(ValueError, match=r"r=9 exceeds min\(d, k\) = min\(8, 16\) = 8"):
        lt.LoRALinear(nn.Linear(16, 8), r=9, alpha=1)
    with pytest.raises(ValueError, match=r"alpha must be finite"):
        lt.LoRALinear(nn.Linear(16, 8), r=2, alpha=math.nan)
    with pytest.raises(ValueError, match=r"dropout must be in \[0, 1\), got dropout=1.0"):
        lt.LoRALinear(nn.Linear(16, 8), r=2, alpha=1, dropout=1.0)
    with pytest.raises(TypeError, match=r"wraps an nn.Linear, got Conv1d"):
        lt.LoRALinear(nn.Conv1d(2, 2, 1), r=1, alpha=1)


def test_add_lora_with_unmatched_targets_names_the_available_layers_and_changes_nothing():
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    with pytest.raises(ValueError, match=r"target_modules=\['q_proj'\] selects none of the 2 linear layers.*\['0', '2'\]"):
        lt.add_lora(model, ["q_proj"], r=2, alpha=2)
    assert all(p.requires_grad for p in model.parameters())


def test_add_lora_with_r_too_large_for_one_layer_replaces_nothing():
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    with pytest.raises(ValueError, match=r"r=4 exceeds min\(d, k\) = min\(2, 8\) = 2"):
        lt.add_lora(model, ["0", "2"], r=4, alpha=4)
    assert not lt.lora_modules(model) and all(p.requires_grad for p in model.parameters())
