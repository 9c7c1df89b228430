"""LoRA's variants (chapter 10) against PEFT 0.21.2, closed forms and torch autograd.

PEFT is the oracle for PiSSA, OLoRA, DoRA, VeRA, LoRA-GA and the PiSSA-to-LoRA conversion, on a
one-layer model in float32 (PEFT refuses float64 for PiSSA). MiLoRA is not in PEFT: its oracle is
the SVD identity of its residual. Shapes: tall, wide and square; several r and alpha.
"""

import copy
import json

import numpy as np
import pytest
import torch
from torch import nn

from lora_ref import low_rank, spectral, variants
from lora_ref import numpy as ln
from lora_ref import torch as lt

peft = pytest.importorskip("peft")
from peft import LoraConfig, PeftModel, VeraConfig, get_peft_model  # noqa: E402

SHAPES = [(24, 16), (16, 24), (20, 20)]                 # tall, wide, square (d, k)
RANKS_ALPHAS = [(1, 8), (4, 16), (8, 3)]


class OneLayer(nn.Module):
    def __init__(self, d, k, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.lin = nn.Linear(k, d, bias=False)

    def forward(self, x):
        return self.lin(x)


def peft_layer(d, k, seed=0, **config):
    """(W0, the PEFT model, its LoRA layer) for one (d, k) linear layer."""
    net = OneLayer(d, k, seed)
    W0 = net.lin.weight.detach().clone()
    model = get_peft_model(copy.deepcopy(net), LoraConfig(target_modules=["lin"], **config))
    return W0, model, model.base_model.model.lin


def factors(layer):
    return (layer.lora_A["default"].weight.detach(), layer.lora_B["default"].weight.detach(),
            layer.base_layer.weight.detach())


def projector(M):
    """The orthogonal projector onto the column space of M (float64)."""
    Q, _ = torch.linalg.qr(torch.as_tensor(M).double())
    return Q @ Q.T


# --------------------------------------------------------------------------- PiSSA, OLoRA: PEFT exactly


@pytest.mark.parametrize("d,k", SHAPES)
@pytest.mark.parametrize("r,alpha", RANKS_ALPHAS)
@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_init_equals_peft_bit_for_bit_in_torch(d, k, r, alpha, init):
    W0, _, layer = peft_layer(d, k, r=r, lora_alpha=alpha, init_lora_weights=init)
    A_p, B_p, W_res_p = factors(layer)
    f = lt.pissa_init if init == "pissa" else lt.olora_init
    A, B, W_res = f(W0, r, layer.scaling["default"])
    assert (A.shape, B.shape, W_res.shape) == ((r, k), (d, r), (d, k))
    assert torch.equal(A, A_p) and torch.equal(B, B_p) and torch.equal(W_res, W_res_p)


@pytest.mark.parametrize("d,k", SHAPES)
@pytest.mark.parametrize("r,alpha", RANKS_ALPHAS)
@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_numpy_init_matches_peft_in_its_products(d, k, r, alpha, init):
    """LAPACK through NumPy may flip the sign of a singular pair: compare s B A and W_res."""
    W0, _, layer = peft_layer(d, k, r=r, lora_alpha=alpha, init_lora_weights=init)
    A_p, B_p, W_res_p = (t.double().numpy() for t in factors(layer))
    s = layer.scaling["default"]
    f = ln.pissa_init if init == "pissa" else ln.olora_init
    A, B, W_res = f(W0.double().numpy(), r, s)
    np.testing.assert_allclose(s * B @ A, s * B_p @ A_p, atol=2e-5)
    np.testing.assert_allclose(W_res, W_res_p, atol=2e-5)


@pytest.mark.parametrize("d,k", SHAPES)
@pytest.mark.parametrize("init", [ln.pissa_init, ln.milora_init, ln.olora_init])
def test_residual_plus_adapter_is_w0(d, k, init):
    W0 = np.random.default_rng(1).normal(size=(d, k))
    s = ln.scaling(16, 4)
    A, B, W_res = init(W0, 4, s)
    np.testing.assert_allclose(W_res + ln.delta_w(A, B, s), W0, atol=1e-12)


@pytest.mark.parametrize("d,k", SHAPES)
@pytest.mark.parametrize("r", [1, 3, 7])
def test_pissa_and_milora_take_the_two_ends_of_the_spectrum(d, k, r):
    """Eckart-Young: PiSSA leaves the smallest residual sum_{i>r} sigma_i^2, MiLoRA the largest."""
    W0 = np.random.default_rng(2).normal(size=(d, k))
    sigma = spectral.singular_values(W0)
    p = min(d, k)
    s = ln.scaling(8, r)
    _, _, top_res = ln.pissa_init(W0, r, s)
    A, B, bottom_res = ln.milora_init(W0, r, s)
    np.testing.assert_allclose(np.sum(top_res**2), np.sum(sigma[r:] ** 2), rtol=1e-10)
    np.testing.assert_allclose(np.sum(bottom_res**2), np.sum(sigma[: p - r] ** 2), rtol=1e-10)
    np.testing.assert_allclose(top_res, W0 - spectral.best_rank_r(W0, r), atol=1e-10)
    np.testing.assert_allclose(bottom_res, spectral.best_rank_r(W0, p - r), atol=1e-10)
    np.testing.assert_allclose(spectral.singular_values(ln.delta_w(A, B, s))[:r], sigma[p - r:], rtol=1e-8)


def test_pissa_factors_are_balanced():
    """B^T B = A A^T = diag(S_r / s): each factor carries half of the spectrum."""
    W0 = np.random.default_rng(3).normal(size=(30, 20))
    s = ln.scaling(32, 5)
    A, B, _ = ln.pissa_init(W0, 5, s)
    half = np.diag(spectral.singular_values(W0)[:5] / s)
    np.testing.assert_allclose(B.T @ B, half, atol=1e-10)
    np.testing.assert_allclose(A @ A.T, half, atol=1e-10)


# --------------------------------------------------------------------------- the conversion to plain LoRA


def test_pissa_to_lora_equals_peft_save_pretrained(tmp_path):
    from safetensors.torch import load_file

    d, k, r = 24, 16, 4
    net = OneLayer(d, k)
    model = get_peft_model(copy.deepcopy(net), LoraConfig(r=r, lora_alpha=8, target_modules=["lin"],
                                                          init_lora_weights="pissa"))
    model.peft_config["default"].init_lora_weights = True        # PEFT's recipe for the initial copy
    model.save_pretrained(tmp_path / "init")
    model.peft_config["default"].init_lora_weights = "pissa"
    layer = model.base_model.model.lin
    A0, B0 = (t.clone() for t in factors(layer)[:2])
    torch.manual_seed(1)
    with torch.no_grad():                                         # "training": any move of A and B
        layer.lora_A["default"].weight.add_(0.1 * torch.randn(r, k))
        layer.lora_B["default"].weight.add_(0.1 * torch.randn(d, r))
    with pytest.warns(UserWarning, match="PiSSA changes the base weights"):
        model.save_pretrained(tmp_path / "lora", path_initial_model_for_weight_conversion=str(tmp_path / "init"))
    saved = load_file(tmp_path / "lora" / "adapter_model.safetensors")
    A2, B2 = lt.pissa_to_lora(*factors(layer)[:2], A0, B0)
    assert torch.equal(saved["base_model.model.lin.lora_A.weight"], A2)
    assert torch.equal(saved["base_model.model.lin.lora_B.weight"], B2)
    config = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"]) == (2 * r, 2 * 8)
    x = torch.randn(5, k)
    on_w0 = PeftModel.from_pretrained(copy.deepcopy(net), tmp_path / "lora")
    torch.testing.assert_close(on_w0(x), model(x), atol=1e-5, rtol=0)
    W0 = net.lin.weight.detach()
    torch.testing.assert_close(lt.lora_forward(x, W0, A2, B2, layer.scaling["default"]), model(x), atol=1e-5, rtol=0)
    with model.disable_adapter():
        assert (model(x) - net(x)).abs().max() > 0.1, "PiSSA's disabled model is W_res, not W0"


def test_pissa_to_lora_refuses_mismatched_factors():
    A, B = np.ones((3, 5)), np.ones((4, 3))
    with pytest.raises(ValueError, match=r"A0 \(2, 5\)"):
        ln.pissa_to_lora(A, B, np.ones((2, 5)), np.ones((4, 2)))


# --------------------------------------------------------------------------- DoRA


def dora_layer(d, k, r, alpha, seed=0, **config):
    """A PEFT DoRA layer with B != 0 and a magnitude away from the row norms."""
    W0, model, layer = peft_layer(d, k, seed, r=r, lora_alpha=alpha, use_dora=True, **config)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        layer.lora_B["default"].weight.copy_(torch.randn(d, r, generator=g))
        layer.lora_magnitude_vector["default"].weight.mul_(0.5 + torch.rand(d, generator=g))
    return W0, model, layer


def dora_params(layer):
    return (layer.lora_A["default"].weight, layer.lora_B["default"].weight,
            layer.lora_magnitude_vector["default"].weight, layer.scaling["default"])


@pytest.mark.parametrize("d,k", SHAPES)
@pytest.mark.parametrize("r,alpha", RANKS_ALPHAS)
def test_dora_forward_and_gradients_equal_peft(d, k, r, alpha):
    W0, model, layer = dora_layer(d, k, r, alpha)
    A, B, m, s = dora_params(layer)
    x, g = torch.randn(7, k), torch.randn(7, d)
    model.eval()
    y = model(x)
    torch.testing.assert_close(lt.dora_forward(x, W0, A, B, m, s), y, atol=2e-6, rtol=1e-6)
    (y * g).sum().backward()
    dA, dB, dm = lt.dora_grads(x, g, W0, A.detach(), B.detach(), m.detach(), s)
    for mine, peft_grad in ((dA, A.grad), (dB, B.grad), (dm, m.grad)):
        torch.testing.assert_close(mine, peft_grad, atol=2e-5, rtol=1e-5)


def test_dora_grads_match_autograd_with_and_without_the_detached_norm():
    rng = np.random.default_rng(4)
    d, k, r, s = 9, 7, 3, 0.7
    W0, A, B, x, g = (torch.tensor(rng.normal(size=shape)) for shape in ((d, k), (r, k), (d, r), (5, k), (5, d)))
    m = torch.tensor(rng.uniform(0.5, 2.0, size=d))
    for detach in (True, False):
        A_, B_, m_ = (t.clone().requires_grad_() for t in (A, B, m))
        V = W0 + s * B_ @ A_
        norm = torch.linalg.norm(V, dim=1)
        y = (m_ / (norm.detach() if detach else norm)) * (x @ V.T)
        (y * g).sum().backward()
        mine = ln.dora_grads(x.numpy(), g.numpy(), W0.numpy(), A.numpy(), B.numpy(), m.numpy(), s, detach_norm=detach)
        for a, b in zip(mine, (A_.grad, B_.grad, m_.grad)):
            np.testing.assert_allclose(a, b.numpy(), atol=1e-12)
    # and lora_ref.torch's forward differentiates exactly as its detached closed form
    A_, B_, m_ = (t.clone().requires_grad_() for t in (A, B, m))
    (lt.dora_forward(x, W0, A_, B_, m_, s) * g).sum().backward()
    for a, b in zip(lt.dora_grads(x, g, W0, A, B, m, s), (A_.grad, B_.grad, m_.grad)):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=0)


def test_detaching_the_norm_changes_the_gradient_of_b():
    rng = np.random.default_rng(5)
    W0, A, B, x, g = (rng.normal(size=shape) for shape in ((6, 5), (2, 5), (6, 2), (4, 5), (4, 6)))
    m = rng.uniform(0.5, 2.0, size=6)
    _, dB, dm = ln.dora_grads(x, g, W0, A, B, m, 1.0)
    _, dB_full, dm_full = ln.dora_grads(x, g, W0, A, B, m, 1.0, detach_norm=False)
    np.testing.assert_allclose(dm, dm_full, atol=1e-14)       # m never enters the norm
    assert np.abs(dB - dB_full).max() > 1e-2


def test_dora_magnitude_starts_at_the_row_norms_and_merging_is_exact():
    d, k, r = 24, 16, 4
    W0, model, layer = peft_layer(d, k, r=r, lora_alpha=8, use_dora=True)
    torch.testing.assert_close(layer.lora_magnitude_vector["default"].weight.detach(), lt.dora_magnitude(W0),
                               atol=0, rtol=0)
    W0, model, layer = dora_layer(d, k, r, 8)
    A, B, m, s = (p.detach() if torch.is_tensor(p) else p for p in dora_params(layer))
    x = torch.randn(5, k)
    model.eval()
    unmerged = model(x).detach()
    merged = model.merge_and_unload()
    V = lt.merge(W0, A, B, s)
    W_merged = (m / lt.dora_magnitude(V))[:, None] * V         # diag(m / ||V||_row) V
    torch.testing.assert_close(merged.lin.weight.detach(), W_merged, atol=1e-6, rtol=0)
    torch.testing.assert_close(merged(x).detach(), unmerged, atol=2e-6, rtol=0)


def test_dora_with_dropout_is_peft_s_corrected_formula():
    """PEFT #2153: with dropout x~ on the adapter's input, DoRA outputs
    W0 x + (c - 1) W0 x~ + c s B A x~, c = m / ||W0 + s B A||_row, whose mean over masks is dora_forward."""
    d, k, r, p = 24, 16, 4, 0.3
    W0, model, layer = dora_layer(d, k, r, 8, lora_dropout=p)
    A, B, m, s = (t.detach() if torch.is_tensor(t) else t for t in dora_params(layer))
    x = torch.randn(7, k)
    model.train()
    torch.manual_seed(5)
    y = model(x).detach()
    torch.manual_seed(5)
    x_drop = nn.Dropout(p)(x)                                    # the same mask
    c = m / lt.dora_magnitude(lt.merge(W0, A, B, s))
    expected = x @ W0.T + (c - 1) * (x_drop @ W0.T) + c * s * ((x_drop @ A.T) @ B.T)
    torch.testing.assert_close(y, expected, atol=2e-6, rtol=0)


def test_dora_refuses_bad_magnitude_and_zero_rows():
    W0, A, B, x = np.ones((4, 3)), np.zeros((2, 3)), np.zeros((4, 2)), np.ones((1, 3))
    with pytest.raises(ValueError, match=r"m has shape \(3,\); expected \(4,\)"):
        ln.dora_forward(x, W0, A, B, np.ones(3), 1.0)
    W0[1] = 0
    with pytest.raises(ValueError, match="1 of the 4 rows of W0 \\+ s B A are zero"):
        lt.dora_forward(torch.tensor(x), torch.tensor(W0), torch.tensor(A), torch.tensor(B), torch.ones(4, dtype=torch.float64), 1.0)


# --------------------------------------------------------------------------- VeRA


@pytest.mark.parametrize("d,k", SHAPES)
@pytest.mark.parametrize("r", [1, 4, 8])
def test_vera_forward_equals_peft(d, k, r):
    net = OneLayer(d, k)
    model = get_peft_model(copy.deepcopy(net), VeraConfig(r=r, target_modules=["lin"], projection_prng_key=3))
    layer = model.base_model.model.lin
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        layer.vera_lambda_b["default"].copy_(torch.randn(d, generator=g))
        layer.vera_lambda_d["default"].copy_(torch.randn(r, generator=g))
    A = layer.vera_A["default"][:, :k]                            # PEFT's slices of the shared A and B
    B = layer.vera_B["default"][:d, :]
    x = torch.randn(6, k)
    y = lt.vera_forward(x, net.lin.weight, A, B, layer.vera_lambda_d["default"], layer.vera_lambda_b["default"])
    assert torch.equal(y, model(x))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable == r + d


def test_vera_refuses_wrong_vector_shapes():
    W0, A, B, x = np.ones((4, 3)), np.ones((2, 3)), np.ones((4, 2)), np.ones((1, 3))
    with pytest.raises(ValueError, match=r"d_vec has shape \(4,\); expected \(2,\)"):
        ln.vera_forward(x, W0, A, B, np.ones(4), np.ones(4))
    with pytest.raises(ValueError, match=r"b_vec has shape \(2,\); expected \(4,\)"):
        ln.vera_forward(x, W0, A, B, np.ones(2), np.ones(2))


# --------------------------------------------------------------------------- LoRA-GA


@pytest.mark.parametrize("d,k,r", [(24, 16, 4), (40, 12, 3), (20, 20, 5), (16, 24, 2)])
def test_loraga_spans_the_subspaces_peft_finds(d, k, r):
    """PEFT uses svd_lowrank(q = min(4r, d, k), niter=4): with 4r >= min(d, k) it is the exact
    SVD up to rounding, else an approximation; compare the projectors onto A's rows and B's columns
    and the column norms of B (the signs of singular pairs are free)."""
    from peft.tuners.lora.config import LoraGAConfig
    from peft.tuners.lora.loraga import preprocess_loraga

    net = OneLayer(d, k)
    W0 = net.lin.weight.detach().clone()
    x, t = torch.randn(32, k), torch.randn(32, d)
    G = torch.func.grad(lambda W: ((x @ W.T - t) ** 2).mean())(W0)   # autograd's dL/dW0
    config = LoraConfig(r=r, lora_alpha=2 * r, target_modules=["lin"], init_lora_weights="lora_ga",
                        lora_ga_config=LoraGAConfig())
    with pytest.warns(UserWarning, match="Full backward hook"):
        preprocess_loraga(net, config, lambda: ((net.lin(x) - t) ** 2).mean().backward())
    layer = get_peft_model(net, config).base_model.model.lin
    A_p, B_p, W_res_p = factors(layer)
    A, B, W_res = lt.loraga_init(W0, G, r, layer.scaling["default"])
    tol = 2e-5 if 4 * r >= min(d, k) else 2e-3
    torch.testing.assert_close(projector(A.T), projector(A_p.T), atol=tol, rtol=0)
    torch.testing.assert_close(projector(B), projector(B_p), atol=tol, rtol=0)
    torch.testing.assert_close(torch.linalg.norm(B, dim=0), torch.linalg.norm(B_p, dim=0), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(W_res + lt.delta_w(A, B, layer.scaling["default"]), W0, atol=1e-6, rtol=0)


def test_loraga_needs_two_r_triplets():
    with pytest.raises(ValueError, match=r"r=3 needs 2r = 6 singular triplets of the \(8, 5\) gradient"):
        ln.loraga_init(np.ones((8, 5)), np.ones((8, 5)), 3, 1.0)
    with pytest.raises(ValueError, match=r"grad_W is \(5, 8\) but W0 is \(8, 5\)"):
        ln.loraga_init(np.ones((8, 5)), np.ones((5, 8)), 1, 1.0)


# --------------------------------------------------------------------------- both backends, bad input


VARIANT_INITS = ["pissa_init", "milora_init", "olora_init"]


@pytest.mark.parametrize("name", VARIANT_INITS)
@pytest.mark.parametrize("backend", [ln, lt])
def test_rank_above_min_d_k_names_r_and_the_shape(name, backend):
    W0 = np.ones((6, 4)) if backend is ln else torch.ones(6, 4)
    with pytest.raises(ValueError, match=r"r=5 exceeds min\(d, k\) = min\(6, 4\) = 4"):
        getattr(backend, name)(W0, 5, 1.0)


@pytest.mark.parametrize("backend", [ln, lt])
def test_pissa_refuses_a_scale_it_cannot_take_the_root_of(backend):
    W0 = np.ones((6, 4)) if backend is ln else torch.ones(6, 4)
    with pytest.raises(ValueError, match="scaling must be > 0, got scaling=-2"):
        backend.pissa_init(W0, 2, -2.0)
    with pytest.raises(ValueError, match="W0 must be 2-D"):
        backend.pissa_init(W0[0], 1, 1.0)


@pytest.mark.parametrize("seed", [0, 1])
def test_the_two_backends_give_the_same_numbers(seed):
    rng = np.random.default_rng(seed)
    d, k, r, s = 11, 8, 3, 0.9
    W0, A, B, x, g, G = (rng.normal(size=shape) for shape in ((d, k), (r, k), (d, r), (5, k), (5, d), (d, k)))
    m, dv, bv = rng.uniform(0.5, 2, d), rng.normal(size=r), rng.normal(size=d)
    T = torch.from_numpy
    for name in ("pissa_init", "milora_init", "olora_init"):
        for a, b in zip(getattr(ln, name)(W0, r, s), getattr(lt, name)(T(W0), r, s)):
            # singular vectors and Q's columns may differ in sign: compare what is sign-free
            np.testing.assert_allclose(a.T @ a if a.shape != (d, k) else a, (b.T @ b if b.shape != (d, k) else b).numpy(),
                                       atol=1e-10)
    for a, b in zip(ln.loraga_init(W0, G, r, s), lt.loraga_init(T(W0), T(G), r, s)):
        np.testing.assert_allclose(np.abs(a.T @ a) if a.shape != (d, k) else a,
                                   (b.T @ b).abs().numpy() if b.shape != (d, k) else b.numpy(), atol=1e-10)
    np.testing.assert_allclose(ln.dora_magnitude(W0), lt.dora_magnitude(T(W0)).numpy(), atol=1e-12)
    np.testing.assert_allclose(ln.dora_forward(x, W0, A, B, m, s), lt.dora_forward(T(x), T(W0), T(A), T(B), T(m), s).numpy(),
                               atol=1e-12)
    for a, b in zip(ln.dora_grads(x, g, W0, A, B, m, s), lt.dora_grads(T(x), T(g), T(W0), T(A), T(B), T(m), s)):
        np.testing.assert_allclose(a, b.numpy(), atol=1e-12)
    np.testing.assert_allclose(ln.vera_forward(x, W0, A, B, dv, bv), lt.vera_forward(T(x), T(W0), T(A), T(B), T(dv), T(bv)).numpy(),
                               atol=1e-12)
    for a, b in zip(ln.pissa_to_lora(A, B, A, B), lt.pissa_to_lora(T(A), T(B), T(A), T(B))):
        np.testing.assert_array_equal(a, b.numpy())


# --------------------------------------------------------------------------- lora_ref.variants: what the chapter measures


@pytest.mark.parametrize("variant", ["lora", "pissa", "olora", "dora", "vera", "adalora", "loraga"])
def test_trainable_params_is_what_peft_trains(variant):
    d, k, r = 24, 16, 4
    net = OneLayer(d, k)
    if variant == "vera":
        config = VeraConfig(r=r, target_modules=["lin"])
    elif variant == "adalora":
        config = peft.AdaLoraConfig(init_r=r, target_r=2, total_step=10, target_modules=["lin"])
    else:
        init = {"lora": True, "pissa": "pissa", "olora": "olora", "dora": True, "loraga": "gaussian"}[variant]
        config = LoraConfig(r=r, target_modules=["lin"], init_lora_weights=init, use_dora=variant == "dora")
    model = get_peft_model(net, config)
    assert model.get_nb_trainable_parameters()[0] == variants.trainable_params(variant, d, k, r)


def test_trainable_params_refuses_unknown_variants_and_ranks():
    with pytest.raises(ValueError, match="variant must be one of"):
        variants.trainable_params("qlora", 8, 8, 2)
    with pytest.raises(ValueError, match=r"r=9 exceeds min\(d, k\)"):
        variants.trainable_params("dora", 8, 16, 9)
    assert variants.trainable_params("vera", 8, 16, 9) == 9 + 8      # VeRA's rank is not capped


def test_residual_energy_is_the_two_ends_of_eckart_young():
    W0 = np.random.default_rng(6).normal(size=(12, 9))
    for r in (1, 4):
        top, bottom = variants.residual_energy(W0, r)
        s = ln.scaling(4, r)
        total = np.sum(W0**2)
        assert top == pytest.approx(np.sum(ln.pissa_init(W0, r, s)[2] ** 2) / total, rel=1e-10)
        assert bottom == pytest.approx(np.sum(ln.milora_init(W0, r, s)[2] ** 2) / total, rel=1e-10)
        assert top < bottom


def test_planted_target_lies_in_the_chosen_subspace():
    W0 = np.random.default_rng(7).normal(size=(20, 14))
    U, _, Vh = np.linalg.svd(W0, full_matrices=False)
    for subspace, idx in (("principal", slice(0, 3)), ("minor", slice(11, 14))):
        delta = variants.planted_target(W0, 3, subspace, scale=2.0, seed=1) - W0
        P_U, P_V = U[:, idx] @ U[:, idx].T, Vh[idx].T @ Vh[idx]
        np.testing.assert_allclose(P_U @ delta @ P_V, delta, atol=1e-12)
        assert np.linalg.matrix_rank(delta) == 3
    with pytest.raises(ValueError, match="subspace must be 'principal' or 'minor'"):
        variants.planted_target(W0, 3, "middle")


def test_an_init_orthogonal_to_the_target_is_a_critical_point():
    """prop-ch10-saddle: with Delta in the minor subspace, PiSSA's gradient is exactly 0, so gradient
    descent never leaves its start; MiLoRA (whose factors span it) and LoRA reach the target."""
    rng = np.random.default_rng(8)
    W0 = rng.normal(size=(30, 20)) / np.sqrt(20)
    r, s = 3, 1.0
    W_star = variants.planted_target(W0, r, "minor", seed=2)
    A, B, W_res = ln.pissa_init(W0, r, s)
    R = W_res + ln.delta_w(A, B, s) - W_star                  # = -Delta
    np.testing.assert_allclose(s * R @ A.T, 0, atol=1e-12)    # dL/dB
    np.testing.assert_allclose(s * B.T @ R, 0, atol=1e-12)    # dL/dA
    errors = variants.init_race(W0, W_star, r, s, steps=400, lr=0.05, inits=("lora", "pissa", "milora"))
    assert errors["pissa"][-1] == pytest.approx(errors["pissa"][0], rel=1e-9)
    assert errors["milora"][-1] < 0.15 * errors["milora"][0]
    assert errors["lora"][-1] < 0.5 * errors["lora"][0]
    principal = variants.init_race(W0, variants.planted_target(W0, r, "principal", seed=2), r, s, 100, 0.05,
                                   inits=("pissa", "milora"))
    assert principal["pissa"][-1] < 1e-3 * principal["pissa"][0]
    assert principal["milora"][-1] == pytest.approx(principal["milora"][0], rel=1e-9)


def test_fit_low_rank_from_a_start_checks_it():
    W = np.ones((5, 4))
    with pytest.raises(ValueError, match=r"start has rank 2 .* but r=3"):
        low_rank.fit_low_rank(W, 3, 2, 0.1, start=(np.ones((2, 4)), np.ones((5, 2))))
    out = low_rank.fit_low_rank(W, 2, 1, 0.1, start=(np.ones((2, 4)), np.zeros((5, 2))))
    assert out["error"][0] == pytest.approx(np.linalg.norm(W))          # B = 0: s B A = 0 at the start


def test_magnitude_direction_change_by_hand():
    W0 = np.array([[3.0, 4.0], [1.0, 0.0]])
    W = np.array([[6.0, 8.0], [0.0, 2.0]])        # row 0: same direction, norm 5 -> 10; row 1: turned 90°, 1 -> 2
    dm, dd = variants.magnitude_direction_change(W0, W)
    assert dm == pytest.approx((5 + 1) / 2) and dd == pytest.approx((0 + 1) / 2)
    with pytest.raises(ValueError, match="zero"):
        variants.magnitude_direction_change(W0, np.zeros((2, 2)))


def test_md_slope_reads_the_sign():
    d = np.linspace(0.0, 1.0, 20)
    assert variants.md_slope(2 * d + 1, d)["slope"] == pytest.approx(2.0)
    assert variants.md_slope(-d, d)["r"] == pytest.approx(-1.0)
    with pytest.raises(ValueError, match=">= 3 paired points"):
        variants.md_slope([1.0, 2.0], [1.0, 2.0])


def test_steps_to_reach():
    assert variants.steps_to_reach([3.0, 2.0, 1.0, 0.5], 1.0) == 2
    assert variants.steps_to_reach([3.0, 2.0], 1.0) is None
    assert variants.steps_to_reach([3.0, 0.0, 3.0, 1.0, 1.0], 1.0, window=2) == 4    # a lucky batch is smoothed out
    assert variants.steps_to_reach([3.0, 0.0, 3.0, 1.0, 1.0], 1.5, window=2) == 1
    assert variants.steps_to_reach([0.5], 1.0, window=2) is None


def test_init_race_refuses_unknown_inits_and_mismatched_targets():
    W0 = np.random.default_rng(9).normal(size=(6, 5))
    with pytest.raises(ValueError, match="inits must name 'lora' or one of"):
        variants.init_race(W0, W0, 2, 1.0, 3, 0.1, inits=("dora",))
    with pytest.raises(ValueError, match=r"W0 is \(6, 5\) but W_star is \(5, 6\)"):
        variants.init_race(W0, W0.T, 2, 1.0, 3, 0.1)


def test_adalora_triplet_scores_by_hand_and_their_shapes():
    score_A = np.array([[1.0, 3.0], [0.0, 0.0]])          # (r, k): row means 2, 0
    score_E = np.array([[0.5], [4.0]])                    # (r, 1), as PEFT stores lora_E
    score_B = np.array([[2.0, 0.0], [0.0, 0.0], [4.0, 3.0]])   # (d, r): column means 2, 1
    np.testing.assert_allclose(variants.adalora_triplet_scores(score_A, score_E, score_B), [4.5, 5.0])
    with pytest.raises(ValueError, match=r"score_E has shape \(3,\); expected \(2,\)"):
        variants.adalora_triplet_scores(score_A, np.ones(3), score_B)
