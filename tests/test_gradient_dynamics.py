"""lora_ref.gradient_dynamics against independent oracles: autograd, torch's FLOP counter and saved-tensor
hooks, torch's Adam, Monte Carlo with a confidence interval, and the tiny model's own training loop."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.flop_counter import FlopCounterMode

from lora_ref import gradient_dynamics as gd
from lora_ref import numpy as ln
from lora_ref import torch as lt


def _rand(seed, *shapes):
    rng = np.random.default_rng(seed)
    return [rng.normal(size=s) for s in shapes]


# --------------------------------------------------------------------------- gradients


def test_central_differences_recover_a_known_gradient():
    """L = <C, B A> + 1/2 ||A||^2 has dL/dA = B^T C + A and dL/dB = C A^T exactly."""
    C, A, B = _rand(0, (4, 5), (2, 5), (4, 2))
    dA, dB = gd.central_difference_grads(lambda A, B: np.sum(C * (B @ A)) + 0.5 * np.sum(A**2), A, B)
    np.testing.assert_allclose(dA, B.T @ C + A, rtol=1e-8, atol=1e-8)
    np.testing.assert_allclose(dB, C @ A.T, rtol=1e-8, atol=1e-8)


def test_factor_gradients_do_not_depend_on_W0():
    """eq-ch05-grads: with dL/dY fixed (a linear loss <C, Y>), autograd gives the same bits for any W0."""
    x, C, A, B, W1, W2 = (torch.from_numpy(a) for a in _rand(1, (7, 5), (7, 4), (2, 5), (4, 2), (4, 5), (4, 5)))
    grads = []
    for W0 in (W1, 100 * W2):
        At, Bt = A.clone().requires_grad_(), B.clone().requires_grad_()
        (C * lt.lora_forward(x, W0, At, Bt, 1.5)).sum().backward()
        grads.append((At.grad, Bt.grad))
    assert torch.equal(grads[0][0], grads[1][0]) and torch.equal(grads[0][1], grads[1][1])


def test_grad_B_at_zero_B_vanishes_exactly_when_A_x_is_zero():
    """prop-ch05-zero-b for one token: dL/dB = s ybar z^T, zero iff z = A x = 0 (ybar != 0)."""
    A = np.array([[1.0, 1.0, 0.0]])                          # (r, k) = (1, 3)
    B = np.zeros((2, 1))
    ybar = np.array([[1.0, -1.0]])                           # (n, d)
    dA, dB = ln.lora_grads(np.array([[1.0, -1.0, 5.0]]), ybar, A, B, 2.0)        # A x = 0
    assert not dA.any() and not dB.any()
    dA, dB = ln.lora_grads(np.array([[1.0, 2.0, 3.0]]), ybar, A, B, 2.0)         # A x = 3
    assert not dA.any() and dB.tolist() == [[6.0], [-6.0]]


def test_grad_A_is_bounded_by_the_size_of_B():
    """eq-ch05-bound: ||dL/dA||_F = s ||B^T G||_F <= s ||B||_2 ||G||_F, on random problems and at B -> 0."""
    for seed in range(5):
        x, g, A, B = _rand(seed, (9, 6), (9, 5), (3, 6), (5, 3))
        for scale in (1.0, 1e-3):
            dA, _ = ln.lora_grads(x, g, A, scale * B, 0.7)
            G = g.T @ x                                                    # (d, k)
            assert np.linalg.norm(dA) <= 0.7 * np.linalg.norm(scale * B, 2) * np.linalg.norm(G) * (1 + 1e-12)


def test_adam_first_step_of_A_matches_torch_adam():
    """eq-ch05-adam-a: from B = 0, Adam's step 1 moves B by lr per entry and A by 0; step 2 moves A by
    lr sqrt(1 + beta2) / (1 + beta1) per entry, whatever the size of its gradient (eps = 1e-12 here)."""
    torch.manual_seed(0)
    layer = lt.LoRALinear(torch.nn.Linear(12, 10).double(), r=3, alpha=3)
    x, target = torch.randn(8, 12, dtype=torch.float64), torch.randn(8, 10, dtype=torch.float64)
    lr, betas = 1e-3, (0.8, 0.99)
    opt = torch.optim.Adam([layer.lora_A, layer.lora_B], lr=lr, betas=betas, eps=1e-12)
    moves = []
    for _ in range(2):
        A0, B0 = layer.lora_A.detach().clone(), layer.lora_B.detach().clone()
        opt.zero_grad()
        ((layer(x) - target) ** 2).sum().backward()
        opt.step()
        moves.append(((layer.lora_A - A0).detach().abs() / lr, (layer.lora_B - B0).detach().abs() / lr))
    assert float(moves[0][0].max()) == 0.0
    torch.testing.assert_close(moves[0][1], torch.full_like(moves[0][1], gd.adam_first_step(*betas, t=1)),
                               rtol=1e-6, atol=0)
    torch.testing.assert_close(moves[1][0], torch.full_like(moves[1][0], gd.adam_first_step(*betas, t=2)),
                               rtol=1e-6, atol=0)
    assert gd.adam_first_step(*betas, t=2) == pytest.approx(math.sqrt(1.99) / 1.8, rel=1e-15)
    assert gd.adam_first_step(0.9, 0.999, t=1) == 1.0


@pytest.mark.parametrize("bad", [dict(beta1=1.0), dict(beta2=-0.1), dict(t=0)])
def test_adam_first_step_refuses_bad_arguments(bad):
    with pytest.raises((ValueError, TypeError)):
        gd.adam_first_step(**bad)


# --------------------------------------------------------------------------- one step's geometry


def _tangent_basis(A, B):
    """An orthonormal basis (columns) of T = {U A + B V} as vectors of R^(d k), by brute force."""
    d, r = B.shape
    k = A.shape[1]
    vecs = []
    for i in range(d):
        for j in range(r):
            U = np.zeros((d, r))
            U[i, j] = 1
            vecs.append((U @ A).ravel())
    for i in range(r):
        for j in range(k):
            V = np.zeros((r, k))
            V[i, j] = 1
            vecs.append((B @ V).ravel())
    M = np.array(vecs).T
    Q, s, _ = np.linalg.svd(M, full_matrices=False)
    return Q[:, s > 1e-10 * s[0]]


@pytest.mark.parametrize("B_zero", [False, True])
def test_tangent_projection_equals_brute_force_projection(B_zero):
    """eq-ch05-tangent against the projection onto a basis of {U A + B V} built entry by entry."""
    G, A, B = _rand(2, (5, 6), (2, 6), (5, 2))
    B = 0 * B if B_zero else B
    Q = _tangent_basis(A, B)
    brute = (Q @ (Q.T @ G.ravel())).reshape(G.shape)
    np.testing.assert_allclose(gd.tangent_projection(G, A, B), brute, atol=1e-12)
    if B_zero:
        np.testing.assert_allclose(gd.tangent_projection(G, A, B), G @ gd.row_space_projector(A), atol=1e-12)


@settings(max_examples=40, deadline=None)
@given(d=st.integers(2, 8), k=st.integers(2, 8), r_frac=st.floats(0, 1), seed=st.integers(0, 2**31 - 1),
       B_zero=st.booleans())
def test_step_cosine_never_exceeds_the_expressible_fraction(d, k, r_frac, seed, B_zero):
    """prop-ch05-projected: LoRA's step lies in T, so its cosine with G is at most ||P_T G|| / ||G|| <= 1."""
    r = 1 + int(r_frac * (min(d, k) - 1))
    G, A, B = _rand(seed, (d, k), (r, k), (d, r))
    B = 0 * B if B_zero else B
    cos, frac = gd.step_cosine(G, A, B, 0.5), gd.expressible_fraction(G, A, B)
    assert -1e-12 <= cos <= frac + 1e-12 and frac <= 1 + 1e-12


def test_step_cosine_is_the_cosine_of_a_real_small_sgd_step():
    """step_cosine against autograd: one SGD step of lr 1e-7 on L = <G, s B A>, whose gradient at W is G."""
    G, A, B = _rand(3, (6, 5), (2, 5), (6, 2))
    At, Bt = torch.from_numpy(A).requires_grad_(), torch.from_numpy(B).requires_grad_()
    (torch.from_numpy(G) * lt.delta_w(At, Bt, 1.3)).sum().backward()
    with torch.no_grad():
        step = (lt.delta_w(At - 1e-7 * At.grad, Bt - 1e-7 * Bt.grad, 1.3) - lt.delta_w(At, Bt, 1.3)).numpy()
    cos = float(np.sum(step * -G) / (np.linalg.norm(step) * np.linalg.norm(G)))
    assert gd.step_cosine(G, A, B, 1.3) == pytest.approx(cos, abs=1e-6)


def test_random_init_keeps_r_over_k_of_G_squared_in_expectation():
    """eq-ch05-fractions: E ||G P_A||^2 / ||G||^2 = r / k for PEFT's uniform A, for a strongly anisotropic G.
    2000 draws; the sample mean lies within 4 standard errors of r / k."""
    k, r = 32, 4
    G = np.diag(np.arange(1, k + 1, dtype=float) ** -2)[:12]                          # (12, k), rank 12, steep
    vals = np.array([gd.expressible_fraction(G, ln.init_lora(12, k, r, seed=i)[0], np.zeros((12, r))) ** 2
                     for i in range(2000)])
    se = vals.std(ddof=1) / math.sqrt(vals.size)
    assert abs(vals.mean() - gd.random_init_fraction_sq(r, k)) < 4 * se
    assert se < 0.1 * r / k                                                           # a tight interval
    assert gd.best_rank_fraction(G, r) > 0.9 > vals.max()                             # far from the best r


def test_best_rank_fraction_is_the_truncated_svd():
    (G,) = _rand(4, (7, 9))
    U, s, Vt = np.linalg.svd(G, full_matrices=False)
    for r in (1, 3, 7):
        Gr = (U[:, :r] * s[:r]) @ Vt[:r]
        assert gd.best_rank_fraction(G, r) == pytest.approx(np.linalg.norm(Gr) / np.linalg.norm(G), rel=1e-12)
    assert gd.best_rank_fraction(G, 7) == pytest.approx(1.0)


def test_first_step_geometry_is_the_general_formulas_at_B_zero():
    grads = dict(zip("abc", _rand(5, (6, 9), (9, 6), (4, 4))))
    geo = gd.first_step_geometry(grads, [1, 3, 4], seed=7)
    for r, row in geo.items():
        for i, (name, G) in enumerate(grads.items()):
            A, B = ln.init_lora(*G.shape, r, seed=7 + i)
            assert row["layers"][i] == name
            assert row["cosine"][i] == pytest.approx(gd.step_cosine(G, A, B, 2.0), rel=1e-12)
            assert row["fraction"][i] == pytest.approx(gd.expressible_fraction(G, A, B), rel=1e-12)
            assert row["best"][i] == pytest.approx(gd.best_rank_fraction(G, r), rel=1e-12)
    assert geo[4]["best"][2] == pytest.approx(1.0) and geo[4]["fraction"][2] == pytest.approx(1.0)   # r = k


def test_zero_gradient_is_refused():
    with pytest.raises(ValueError, match="zero"):
        gd.expressible_fraction(np.zeros((3, 4)), np.ones((1, 4)), np.zeros((3, 1)))


# --------------------------------------------------------------------------- backward cost


@pytest.mark.parametrize("r", [None, 1, 3])
@pytest.mark.parametrize("input_grad", [True, False])
def test_training_macs_match_torch_flop_counter(r, input_grad):
    """eq-ch05-macs against torch.utils.flop_counter (2 FLOPs per MAC), forward + backward of one layer."""
    T, d, k = 5, 6, 7
    torch.manual_seed(0)
    layer = torch.nn.Linear(k, d) if r is None else lt.LoRALinear(torch.nn.Linear(k, d), r=r, alpha=2)
    if r is not None:
        with torch.no_grad():
            layer.lora_B.normal_()
    x = torch.randn(T, k, requires_grad=input_grad)
    with FlopCounterMode(display=False) as counter:
        layer(x).backward(torch.randn(T, d))
    assert counter.get_total_flops() == 2 * gd.training_macs(T, d, k, r, input_grad)["total"]


@pytest.mark.parametrize("r", [None, 2, 5])
def test_saved_activations_match_what_autograd_saves(r):
    """eq-ch05-memory: the non-parameter tensors autograd packs for the backward pass (distinct storages)."""
    T, d, k = 4, 6, 7
    torch.manual_seed(0)
    layer = torch.nn.Linear(k, d) if r is None else lt.LoRALinear(torch.nn.Linear(k, d), r=r, alpha=2)
    params = {p.untyped_storage().data_ptr() for p in layer.parameters()}
    saved = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in params:
            saved[t.untyped_storage().data_ptr()] = t.numel()
        return t

    x = torch.randn(T, k, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = layer(x)
    y.sum().backward()
    assert sum(saved.values()) == gd.saved_activations(T, k, r)


def test_training_mac_ratio_tends_to_two_thirds():
    for r in (8, 64):
        full, lora = gd.training_macs(1024, 4096, 4096), gd.training_macs(1024, 4096, 4096, r)
        assert lora["total"] / full["total"] == pytest.approx(2 / 3 + r * 8192 / 4096**2, rel=1e-15)
        assert full["backward_weights"] - gd.training_macs(1024, 4096, 4096, r)["backward_weights"] > 0


def test_total_norm_is_the_frobenius_norm_over_layers():
    assert gd.total_norm([[3.0, 4.0], [0.0, 0.0]]).tolist() == [5.0, 0.0]
    with pytest.raises(ValueError):
        gd.total_norm([1.0, 2.0])


def test_first_step_reaching():
    assert gd.first_step_reaching([0.0, 0.1, 0.3, 0.2], 0.25) == 2
    assert gd.first_step_reaching([0.0, 0.1], 0.25) is None


# --------------------------------------------------------------------------- the benchmark


@pytest.fixture(scope="module")
def bench(load_benchmark):
    return load_benchmark("bench_backward")


def test_backward_benchmark_runs_and_reports_the_counted_ratios(bench):
    rec = bench.bench_shape(32, 4, 8, reps=2, target_rep_s=0.002)
    assert set(rec["median_ms"]) == set(bench.VARIANTS) and rec["reps"] == 2
    assert rec["mac_ratio"] == pytest.approx(2 / 3 + 4 * 64 / 32**2) and rec["saved_ratio"] == pytest.approx(36 / 32)
    assert math.isfinite(rec["time_ratio"]) and rec["time_ratio"] > 0 and str(rec["T"]) in bench.format_row(rec)
    assert [t["status"] for t in bench.check_targets([rec])] in (["PASS"], ["MISS"])


def test_backward_benchmark_catches_a_variant_that_computes_something_else(bench):
    s = bench.make_setup(16, 2, 4)
    module, params, _ = s["variants"]["lora"]
    frozen_B = lt.LoRALinear(torch.nn.Linear(16, 16), 2, bench.ALPHA)
    with torch.no_grad():
        frozen_B.base_layer.weight.copy_(s["W0"])
        frozen_B.base_layer.bias.copy_(s["bias"])
        frozen_B.lora_A.copy_(s["A"])
        frozen_B.lora_B.copy_(2 * s["B"])                                           # twice the update
    with pytest.raises(bench.MismatchError, match="lora2"):
        bench.check_same_outputs(s, {"lora2": (frozen_B, [frozen_B.lora_A, frozen_B.lora_B], "lora")})
    frozen = module.base_layer                                  # right output, but W0 gets no gradient
    with pytest.raises(bench.MismatchError, match="param0.grad"):
        bench.check_same_outputs(s, {"full": (frozen, [frozen.weight, frozen.bias], "full")})


# --------------------------------------------------------------------------- the figures


def _slider_ok(fig, n_steps):
    steps = fig.layout.sliders[0].steps
    assert len(steps) == n_steps and len(fig.data) % n_steps == 0
    n = len(fig.data) // n_steps
    for i, step in enumerate(steps):
        visible, layout = step.args
        assert list(layout) == ["title.text"] and visible["visible"] == [j // n == i for j in range(len(fig.data))]
    return n


def test_figures_of_the_chapter_have_sliders_titles_and_axis_units():
    from lora_ref import figures

    steps, layers = 12, ["model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"]
    rng = np.random.default_rng(0)
    rec = {"layers": layers, "grad_A": np.r_[np.zeros((1, 2)), rng.random((steps - 1, 2))],
           "grad_B": rng.random((steps, 2)) + 0.1, "norm_B": np.r_[np.zeros((1, 2)), rng.random((steps - 1, 2))],
           "moved_A": np.r_[np.zeros((2, 2)), rng.random((steps - 2, 2))]}
    fig = figures.gradient_norms_figure(rec, [0, 1, 5, 11])
    assert _slider_ok(fig, 4) == 5 and list(fig.data[0].x) == ["0.q", "1.down"]
    assert "Step 0" in fig.layout.title.text and "0%" in fig.layout.title.text
    geo = {r: {"layers": layers, "cosine": [0.1 * r, 0.2], "fraction": [0.2, 0.3], "best": [0.9, 0.95]} for r in (1, 2)}
    fig = figures.step_projection_figure([1, 2], geo, [128, 344], active_r=2)
    assert _slider_ok(fig, 2) == 4 and fig.layout.sliders[0].active == 1
    assert fig.data[7].y == pytest.approx((math.sqrt(2 / 128), math.sqrt(2 / 344)))       # sqrt(r / k) markers
    fig = figures.loraplus_figure([1, 2, 4], {1: [1.0, 1.1], 2: [0.9, 0.95], 4: [0.8, 0.85]},
                                  {lam: [5.0, 1.0, 0.5] for lam in (1, 2, 4)}, active=2)
    assert _slider_ok(fig, 3) == 5 and "λ = 4" in fig.layout.title.text and "0.825" in fig.layout.title.text
    for f in (fig,):
        assert f.layout.xaxis.title.text and f.layout.yaxis.title.text and f.layout.yaxis2.title.text
