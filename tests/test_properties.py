"""Identities over random shapes (hypothesis): merge/unmerge invert each other, the
factored forward equals the merged one, and rank(B A) <= r."""

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lora_ref import numpy as ln
from lora_ref import torch as lt


@st.composite
def lora_problem(draw):
    n = draw(st.integers(1, 8))
    d = draw(st.integers(1, 12))
    k = draw(st.integers(1, 12))
    r = draw(st.integers(1, min(d, k)))
    s = draw(st.floats(-4, 4, allow_nan=False, allow_infinity=False))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    return dict(x=rng.normal(size=(n, k)), W0=rng.normal(size=(d, k)), A=rng.normal(size=(r, k)),
                B=rng.normal(size=(d, r)), s=s, r=r)


@settings(max_examples=60, deadline=None)
@given(lora_problem())
def test_unmerge_inverts_merge(p):
    W = ln.merge(p["W0"], p["A"], p["B"], p["s"])
    np.testing.assert_allclose(ln.unmerge(W, p["A"], p["B"], p["s"]), p["W0"], rtol=1e-12, atol=1e-12)
    Wt = lt.merge(torch.from_numpy(p["W0"]), torch.from_numpy(p["A"]), torch.from_numpy(p["B"]), p["s"])
    np.testing.assert_allclose(lt.unmerge(Wt, torch.from_numpy(p["A"]), torch.from_numpy(p["B"]), p["s"]).numpy(),
                               p["W0"], rtol=1e-12, atol=1e-12)


@settings(max_examples=60, deadline=None)
@given(lora_problem())
def test_factored_forward_equals_merged_weight_forward(p):
    y = ln.lora_forward(p["x"], p["W0"], p["A"], p["B"], p["s"])
    W = p["W0"] + p["s"] * p["B"] @ p["A"]                      # (W0 + s B A), formed explicitly
    np.testing.assert_allclose(y, p["x"] @ W.T, rtol=1e-10, atol=1e-10)
    yt = lt.lora_forward(*(torch.from_numpy(p[k]) for k in ("x", "W0", "A", "B")), p["s"])
    np.testing.assert_allclose(yt.numpy(), y, rtol=1e-12, atol=1e-12)


@settings(max_examples=60, deadline=None)
@given(lora_problem())
def test_rank_of_delta_w_is_at_most_r(p):
    dW = ln.delta_w(p["A"], p["B"], 1.0)
    assert np.linalg.matrix_rank(dW) <= p["r"]
