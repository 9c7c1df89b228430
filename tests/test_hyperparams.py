"""lora_ref.hyperparams against independent oracles: PEFT's lora_dropout sampled (Monte Carlo, with bounds
from the sample size), torch autograd through PEFT's layer, chapter 03's retune rule, lora_ref.budget."""

import math

import numpy as np
import pytest
import torch

from lora_ref import budget, hyperparams, rank_scaling, tiny
from lora_ref import numpy as ln

peft = pytest.importorskip("peft")

N_MC = 40_000          # masks per Monte Carlo estimate


def peft_layer(d, k, r, alpha, dropout, seed=0):
    """A PEFT LoRA layer on one nn.Linear (k -> d) with random A and B (init_lora_weights=False), in train
    mode so that lora_dropout is live. Returns (model, layer, ΔW = s B A as float64 NumPy)."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Linear(k, d, bias=False))
    model = get_peft_model(net, LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=["0"],
                                           init_lora_weights=False))
    layer = model.base_model.model[0]
    model.train()
    dW = (layer.scaling["default"] * layer.lora_B["default"].weight @ layer.lora_A["default"].weight).double()
    return model, layer, dW.detach().numpy()


def adapter_outputs(layer, x, n):
    """n samples of PEFT's adapter output Δy = layer(x) - W0 x, each with a fresh dropout mask."""
    with torch.no_grad():
        X = torch.as_tensor(x, dtype=torch.float32).expand(n, -1).contiguous()       # (n, k): one mask per row
        return (layer(X) - layer.base_layer(X)).double().numpy()                      # (n, d)


@pytest.mark.parametrize("dropout", [0.1, 0.3, 0.5])
def test_dropout_moments_match_peft_samples(dropout):
    d, k, r = 6, 9, 3
    _, layer, dW = peft_layer(d, k, r, 6.0, dropout)
    x = np.random.default_rng(1).normal(size=k)
    mean, cov = hyperparams.dropout_moments(x, dW, dropout)
    samples = adapter_outputs(layer, x, N_MC)
    se = np.sqrt(np.diag(cov) / N_MC)                               # the standard error of each sample mean
    assert np.all(np.abs(samples.mean(0) - mean) < 5 * se + 1e-6)
    emp = np.cov(samples, rowvar=False)
    # the sample covariance's relative error is O(1/sqrt(N)) (about 0.5% here); 5% leaves room for kurtosis
    assert np.linalg.norm(emp - cov) < 0.05 * np.linalg.norm(cov)
    # and the total variance, tr Cov = rho/(1-rho) sum_j ||dW[:, j]||^2 x_j^2, closed form by hand
    assert np.trace(cov) == pytest.approx(dropout / (1 - dropout) * np.sum(dW**2, axis=0) @ x**2, rel=1e-12)


def test_dropout_moments_at_zero_rate_are_the_plain_update():
    dW = np.arange(6.0).reshape(2, 3)
    mean, cov = hyperparams.dropout_moments(np.array([1.0, -1.0, 2.0]), dW, 0.0)
    np.testing.assert_array_equal(mean, dW @ np.array([1.0, -1.0, 2.0]))
    np.testing.assert_array_equal(cov, np.zeros((2, 2)))


def test_dropout_penalty_matches_the_sampled_squared_loss():
    d, k, r, dropout = 5, 8, 2, 0.2
    _, layer, dW = peft_layer(d, k, r, 4.0, dropout, seed=3)
    rng = np.random.default_rng(2)
    X, T = rng.normal(size=(4, k)), rng.normal(size=(4, d))
    W0 = layer.base_layer.weight.detach().double().numpy()
    with_dropout = []
    for x, t in zip(X, T):
        out = adapter_outputs(layer, x, N_MC) + W0 @ x                            # (N, d) samples of y
        with_dropout.append(0.5 * np.mean(np.sum((out - t) ** 2, axis=1)))
    plain = np.mean([0.5 * np.sum((W0 @ x + dW @ x - t) ** 2) for x, t in zip(X, T)])
    penalty = hyperparams.dropout_penalty(X, dW, dropout)
    assert penalty > 0
    assert np.mean(with_dropout) - plain == pytest.approx(penalty, rel=0.05)


def test_b_gradient_noise_at_the_start_matches_autograd_through_peft():
    d, k, r, dropout, alpha = 4, 7, 3, 0.25, 6.0
    model, layer, _ = peft_layer(d, k, r, alpha, dropout, seed=4)
    with torch.no_grad():
        layer.lora_B["default"].weight.zero_()                                    # LoRA's start, B = 0
    A = layer.lora_A["default"].weight.detach().double().numpy()
    rng = np.random.default_rng(5)
    x, g = rng.normal(size=k), rng.normal(size=d)
    n = 4000
    X = torch.as_tensor(x, dtype=torch.float32).expand(n, -1).contiguous()
    G = torch.as_tensor(g, dtype=torch.float32)
    grads = []
    B = layer.lora_B["default"].weight
    for chunk in X.split(500):
        for row in chunk:                                   # one mask, one backward: dL/dB of L = g . y
            B.grad = None
            (layer(row[None]) @ G).sum().backward()
            grads.append(B.grad.double().numpy().copy())
    grads = np.asarray(grads)                                                     # (n, d, r)
    mean, var = hyperparams.dropout_b_grad_noise(x, g, A, ln.scaling(alpha, r), dropout)
    np.testing.assert_allclose(mean, ln.scaling(alpha, r) * np.outer(g, A @ x), rtol=1e-12)
    total_var = np.sum(grads.var(axis=0))
    assert total_var == pytest.approx(var, rel=0.1)                               # about 2.5% standard error
    se = np.sqrt(grads.var(axis=0) / n)
    assert np.all(np.abs(grads.mean(axis=0) - mean) < 5 * se + 1e-6)


@pytest.mark.parametrize("bad", [-0.1, 1.0, float("nan")])
def test_dropout_functions_refuse_a_bad_rate(bad):
    with pytest.raises(ValueError, match="dropout"):
        hyperparams.dropout_moments(np.ones(3), np.ones((2, 3)), bad)
    with pytest.raises(ValueError, match="dropout"):
        hyperparams.dropout_penalty(np.ones((4, 3)), np.ones((2, 3)), bad)


def test_dropout_functions_name_the_shapes_at_fault():
    with pytest.raises(ValueError, match=r"x has shape \(4,\).*\(2, 3\)"):
        hyperparams.dropout_moments(np.ones(4), np.ones((2, 3)), 0.1)
    with pytest.raises(ValueError, match=r"X is \(4, 5\).*\(2, 3\)"):
        hyperparams.dropout_penalty(np.ones((4, 5)), np.ones((2, 3)), 0.1)
    with pytest.raises(ValueError, match=r"A is \(2, 3\)"):
        hyperparams.dropout_b_grad_noise(np.ones(4), np.ones(2), np.ones((2, 3)), 1.0, 0.1)


@pytest.mark.parametrize("rule", list(rank_scaling.SCALE_RULES))
@pytest.mark.parametrize("r_new", [1, 8, 64])
def test_predicted_lr_is_chapter_03s_retune_factor_within_one_rule(rule, r_new):
    r, lr, alpha = 16, 3e-3, 16.0
    a, a_new = (2.0 * r, 2.0 * r_new) if rule == "alpha=2r" else (alpha, alpha)
    rs = rule == "alpha/sqrt(r)"
    got = hyperparams.predicted_lr(lr, r, a, r_new, a_new, rslora=rs, rslora_new=rs)
    assert got == pytest.approx(lr * rank_scaling.retune_factor(r, r_new, rule, "adam"), rel=1e-12)


def test_predicted_lr_across_rules():
    # alpha = 16 at r = 16 (s r = 16) to alpha = 2r at r = 64 (s r = 128): an eighth
    assert hyperparams.predicted_lr(1e-2, 16, 16.0, 64, 128.0) == pytest.approx(1e-2 / 8, rel=1e-12)
    # rsLoRA at alpha = 16, r = 64 moves like alpha = 16 sqrt(64) = 128 under alpha / r
    assert hyperparams.step_size(64, 16.0, rslora=True) == pytest.approx(hyperparams.step_size(64, 128.0))
    with pytest.raises(ValueError, match="lr must be positive"):
        hyperparams.predicted_lr(0.0, 16, 16.0, 64, 128.0)


def test_lr_optimum_finds_a_parabolas_vertex():
    lrs = np.logspace(-4, -1, 7)
    u0 = -2.3
    losses = 0.2 + (np.log10(lrs) - u0) ** 2
    got = hyperparams.lr_optimum(lrs, losses)
    assert got["interior"] and got["lr"] == pytest.approx(10**u0, rel=1e-9) and got["loss"] == pytest.approx(0.2)


def test_lr_optimum_at_an_edge_and_with_diverged_runs():
    lrs = [1e-3, 2e-3, 5e-3, 1e-2]
    edge = hyperparams.lr_optimum(lrs, [0.1, 0.2, 0.3, 0.4])
    assert edge == {"lr": 1e-3, "loss": 0.1, "index": 0, "interior": False}
    diverged = hyperparams.lr_optimum(lrs, [0.5, 0.3, 0.2, float("nan")])          # NaN next to the best
    assert diverged["index"] == 2 and not diverged["interior"]
    with pytest.raises(ValueError, match="every run diverged"):
        hyperparams.lr_optimum(lrs, [float("nan")] * 4)
    with pytest.raises(ValueError, match="increasing"):
        hyperparams.lr_optimum([1e-3, 5e-4, 1e-2], [1, 0, 1])
    with pytest.raises(ValueError, match="length >= 3"):
        hyperparams.lr_optimum([1e-3, 1e-2], [1, 0])


def test_optima_per_seed_reads_the_shipped_layout():
    curves = {1e-3: {0: 0.5, 1: 0.6}, 1e-2: {0: 0.2, 1: 0.3}, 1e-1: {0: 0.4, 1: 0.1}}
    got = hyperparams.optima_per_seed(curves)
    assert got[0]["interior"] and got[0]["index"] == 1
    assert got[1] == {"lr": 1e-1, "loss": 0.1, "index": 2, "interior": False}
    with pytest.raises(ValueError, match="seeds"):
        hyperparams.optima_per_seed({1e-3: {0: 1.0}, 1e-2: {1: 1.0}, 1e-1: {0: 1.0}})


def test_seed_stats():
    got = hyperparams.seed_stats({2: {0: {"test_loss": 1.0}, 1: {"test_loss": 3.0}}, 1: {0: {"test_loss": 2.0}}})
    assert got == {"x": [1, 2], "mean": [2.0, 2.0], "lo": [2.0, 1.0], "hi": [2.0, 3.0]}
    assert hyperparams.seed_stats({1: {0: float("nan"), 1: 1.0}})["hi"] == [math.inf]


@pytest.mark.parametrize("config", [tiny.CONFIG, budget.load_config("llama-3.1-8b")])
def test_equal_budget_ranks_are_the_nearest_counts(config):
    sets = {"qv": "qv", "attention": "attention", "mlp": ("gate_proj", "up_proj", "down_proj"),
            "all-linear": "all-linear"}
    got = hyperparams.equal_budget_ranks(config, sets, "all-linear", 4)
    want = budget.lora_param_count(config, 4, "all-linear")
    assert got["all-linear"] == {"r": 4, "params": want, "ratio": 1.0}
    for name, targets in sets.items():
        r_max = min(min(shape) for shape in budget.linear_shapes(config).values())    # r <= min(d, k)
        counts = {r: budget.lora_param_count(config, r, targets) for r in range(1, r_max + 1)}
        best = min(counts, key=lambda r: (abs(counts[r] - want), r))                # brute force
        assert got[name]["r"] == best and got[name]["params"] == counts[best]


def test_equal_budget_ranks_on_the_tiny_model():
    got = hyperparams.equal_budget_ranks(tiny.CONFIG, {"qv": "qv", "mlp": ("gate_proj", "up_proj", "down_proj")})
    # q: 128 -> 128 and v: 128 -> 64 cost 256 + 192 per rank and layer; gate, up, down 3 (128 + 344)
    assert got["qv"]["r"] == round(4 * 2312 / 448) and got["mlp"]["r"] == round(4 * 2312 / 1416)
