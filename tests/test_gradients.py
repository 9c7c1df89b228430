"""The hand-derived gradients dL/dB = s G (A X)^T and dL/dA = s B^T G X^T, against two oracles:
torch autograd and central finite differences, in both backends."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lora_ref import numpy as ln
from lora_ref import torch as lt

BACKENDS = {"numpy": ln, "torch": lt}


def _problem(seed, n=5, d=4, k=6, r=2, lead=()):
    rng = np.random.default_rng(seed)
    return dict(
        x=rng.normal(size=lead + (n, k)),
        W0=rng.normal(size=(d, k)),
        A=rng.normal(size=(r, k)),
        B=rng.normal(size=(d, r)),
        c=rng.normal(size=lead + (n, d)),
        s=ln.scaling(alpha=3.0, r=r),
    )


def _loss_np(p, A, B):
    """A genuinely nonlinear loss: L = sum(c * tanh(y)),  dL/dy = c (1 - tanh(y)^2)."""
    y = ln.lora_forward(p["x"], p["W0"], A, B, p["s"])
    return np.sum(p["c"] * np.tanh(y)), p["c"] * (1 - np.tanh(y) ** 2)


def _to(backend, a):
    return torch.from_numpy(a) if backend is lt else a


def _back(a):
    return a.numpy() if isinstance(a, torch.Tensor) else a


@pytest.mark.parametrize("name", BACKENDS)
@pytest.mark.parametrize("lead", [(), (3,)], ids=["2d", "batched"])
def test_lora_grads_match_torch_autograd(name, lead):
    lr = BACKENDS[name]
    p = _problem(0, lead=lead)
    x, W0, c = (torch.from_numpy(p[key]) for key in ("x", "W0", "c"))
    A = torch.from_numpy(p["A"]).requires_grad_()
    B = torch.from_numpy(p["B"]).requires_grad_()
    y = x @ W0.T + p["s"] * (x @ A.T) @ B.T          # autograd sees only the forward formula
    (c * torch.tanh(y)).sum().backward()
    grad_y = (c * (1 - torch.tanh(y) ** 2)).detach().numpy()
    dA, dB = lr.lora_grads(_to(lr, p["x"]), _to(lr, grad_y), _to(lr, p["A"]), _to(lr, p["B"]), p["s"])
    np.testing.assert_allclose(_back(dA), A.grad.numpy(), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(_back(dB), B.grad.numpy(), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", BACKENDS)
def test_lora_grads_match_central_finite_differences(name):
    lr = BACKENDS[name]
    p = _problem(1)
    _, grad_y = _loss_np(p, p["A"], p["B"])
    dA, dB = (_back(g) for g in lr.lora_grads(*(_to(lr, p[k]) for k in ("x",)), _to(lr, grad_y),
                                              _to(lr, p["A"]), _to(lr, p["B"]), p["s"]))
    h = 1e-6
    for which, analytic in (("A", dA), ("B", dB)):
        fd = np.zeros_like(p[which])
        for idx in np.ndindex(fd.shape):
            plus, minus = p[which].copy(), p[which].copy()
            plus[idx] += h
            minus[idx] -= h
            args_p = (plus, p["B"]) if which == "A" else (p["A"], plus)
            args_m = (minus, p["B"]) if which == "A" else (p["A"], minus)
            fd[idx] = (_loss_np(p, *args_p)[0] - _loss_np(p, *args_m)[0]) / (2 * h)
        # central differences have O(h^2) truncation error and O(eps/h) rounding error: ~1e-9 here
        np.testing.assert_allclose(analytic, fd, rtol=1e-6, atol=1e-8, err_msg=f"dL/d{which}")


@pytest.mark.parametrize("name", BACKENDS)
def test_at_zero_B_grad_A_vanishes_and_grad_B_does_not(name):
    lr = BACKENDS[name]
    p = _problem(2)
    A, B = lr.init_lora(4, 6, 2, seed=0)                      # B = 0
    dA, dB = lr.lora_grads(_to(lr, p["x"]), _to(lr, p["c"]), A, B, p["s"])
    assert np.all(_back(dA) == 0)
    assert np.linalg.norm(_back(dB)) > 0.1


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(1, 6), d=st.integers(1, 7), k=st.integers(1, 7), r_frac=st.floats(0, 1),
    seed=st.integers(0, 2**31 - 1),
)
def test_lora_grads_match_autograd_on_random_shapes(n, d, k, r_frac, seed):
    r = 1 + int(r_frac * (min(d, k) - 1))
    rng = np.random.default_rng(seed)
    x, W0, A, B, g = (rng.normal(size=s) for s in ((n, k), (d, k), (r, k), (d, r), (n, d)))
    At = torch.from_numpy(A).requires_grad_()
    Bt = torch.from_numpy(B).requires_grad_()
    y = lt.lora_forward(torch.from_numpy(x), torch.from_numpy(W0), At, Bt, 0.5)
    y.backward(torch.from_numpy(g))
    dA, dB = ln.lora_grads(x, g, A, B, 0.5)
    np.testing.assert_allclose(dA, At.grad.numpy(), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(dB, Bt.grad.numpy(), rtol=1e-10, atol=1e-12)
